"""HTML views for Jupyter of what users hold: a `RequestOutput` (its text shaded by each token's
log-probability) and an `LLM` (the model, mesh and KV cache at a glance). Host only: the classes
call these lazily from their `_repr_html_`, so nothing here is imported with `jaxserve`.
(Step records and the KV cache state render themselves: records.py, kv_state.py.)
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve.llm import LLM
    from jaxserve.outputs import CompletionOutput, RequestOutput

_PRE = "style='white-space:pre-wrap;margin:0'"


def token_shade(logprob: float) -> str:
    """Background for a token of this log-prob: clear when the model was sure (p near 1),
    orange as p falls (alpha = 1 - p)."""
    return f"rgba(255,127,14,{1 - math.exp(logprob):.2f})"


def completion_html(o: CompletionOutput) -> str:
    """A completion's text; with log-probs, one span per token, shaded by its probability, its
    top alternatives in the tooltip."""
    if not o.logprobs:
        return f"<pre {_PRE}>{html.escape(o.text)}</pre>"
    spans = []
    for token, position in zip(o.token_ids, o.logprobs):
        chosen = position[token]
        alts = sorted(((lp.rank or 99, t, lp) for t, lp in position.items() if t != token))
        tip = f"p={math.exp(chosen.logprob):.3f} (log-prob {chosen.logprob:.2f}, rank {chosen.rank})"
        tip += "".join(f"\n#{r} {lp.decoded_token!r} p={math.exp(lp.logprob):.3f}"
                       for r, _, lp in alts)
        spans.append(f"<span title='{html.escape(tip, quote=True)}' style='background:"
                     f"{token_shade(chosen.logprob)}'>{html.escape(chosen.decoded_token or '')}</span>")
    return f"<pre {_PRE}>{''.join(spans)}</pre>"


def request_output_html(out: RequestOutput) -> str:
    rows = "".join(f"<tr><td>{o.index}</td><td style='text-align:left'>{completion_html(o)}</td>"
                   f"<td>{len(o.token_ids)}</td><td>{o.finish_reason}</td></tr>" for o in out.outputs)
    m = out.metrics
    ttft = "" if m.time_to_first_token is None else f", first token after {m.time_to_first_token * 1e3:.0f} ms"
    shaded = any(o.logprobs for o in out.outputs)
    legend = ("<div style='font-size:11px'>shading: 1 - p of each sampled token "
              "(hover for its top alternatives)</div>") if shaded else ""
    prompt = out.prompt if out.prompt is not None else f"[{len(out.prompt_token_ids)} token ids]"
    return (f"<div><b>request {html.escape(out.request_id)}</b> ({len(out.prompt_token_ids)} prompt "
            f"tokens{ttft})<pre {_PRE}>{html.escape(prompt)}</pre>"
            f"<table><tr><th>#</th><th>completion</th><th>tokens</th><th>finish</th></tr>{rows}"
            f"</table>{legend}</div>")


def llm_html(llm: LLM) -> str:
    engine = llm.engine
    c, cfg = engine.model_config, engine.config
    mesh = engine.runner.mesh
    shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    devices = f"{mesh.devices.size} x {mesh.devices.flat[0].platform}"
    rows = [("model", f"{c.architecture}: {c.num_layers} layers, D={c.hidden_size}, "
                      f"H={c.num_heads}, K={c.num_kv_heads}, E={c.head_dim}, V={c.vocab_size}"),
            ("dtype", cfg.dtype), ("mesh", f"{shape} on {devices}"),
            ("KV cache", f"{engine.runner.num_pages} pages x {cfg.page_size} slots"),
            ("limits", f"max_model_len={engine.max_model_len}, max_num_seqs={cfg.max_num_seqs}, "
                       f"max_num_batched_tokens={cfg.max_num_batched_tokens}"),
            ("requests", f"{engine.scheduler.num_running} running, "
                         f"{engine.scheduler.num_waiting} waiting"),
            ("warmup", f"{engine.warmup_seconds:.1f} s")]
    body = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>"
                   f"{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<div><b>LLM</b><table>{body}</table></div>"
