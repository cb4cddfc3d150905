"""The quality of an approximation, measured on the real model through the engine itself.

Three measures, each run for dense attention and for every sparse configuration on one engine
(`Engine.set_sparse_attention` switches between them; prefill is dense in all of them, so the
prefix cache serves the same prompts to every configuration and only decode is recomputed):

- `perplexity`: a long text under teacher forcing. Windows of the text are prompts; the tokens
  after each window are *forced* one decode step at a time (`Engine.step_forced`), so every
  scored token goes through the decode path that sparse attention changes, with the
  cross-entropy of each forced token taken from the step's logits (`optax.losses`).
- `passkey`: a five-digit number planted at a depth of a long natural text ("The secret pass
  key is 68417. Remember it."), the raw completion prompt ending "The secret pass key is"; the
  greedy answer must start with the number. The default model, SmolLM2-135M-Instruct, retrieves
  it this way but not in chat form.
- `greedy_agreement`: the greedy tokens of a configuration against dense ones over the same
  prompts: the share of positions that match, and of tokens before the first divergence.

The text is the Python Language Reference as it ships with CPython (`pydoc_data.topics`, about
465,000 characters, 100k+ tokens of English prose with code): present wherever jaxserve runs, no
network needed. `evaluate` runs everything; `jaxserve eval` prints it as a table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxserve.config import SparseAttentionConfig
from jaxserve.sampling import SamplingParams

PASSKEY_QUESTION = " The secret pass key is"


def haystack_text() -> str:
    """The long text: CPython's own Language Reference topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def haystack_ids(tokenizer, num_tokens: int) -> list[int]:
    ids = tokenizer.encode(haystack_text())
    if len(ids) < num_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, {num_tokens} asked")
    return ids[:num_tokens]


def _run(engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return out


def perplexity(engine, ids: Sequence[int], *, window: int, forced: int, num_windows: int,
               prefix: str = "ppl") -> float:
    """exp(mean cross-entropy) of `forced` tokens after each of `num_windows` windows of `window`
    tokens of `ids` (consecutive, non-overlapping), every one fed through a decode step."""
    span = window + forced
    if num_windows * span > len(ids):
        raise ValueError(f"{num_windows} windows of {span} tokens need {num_windows * span} "
                         f"tokens; the text has {len(ids)}")
    targets = {f"{prefix}{w}": list(ids[w * span + window:(w + 1) * span]) for w in range(num_windows)}
    params = SamplingParams(temperature=0, max_tokens=forced, ignore_eos=True)
    for w, rid in enumerate(targets):
        engine.add_request(rid, list(ids[w * span:w * span + window]), params)
    done = {rid: 0 for rid in targets}
    losses: list[float] = []
    while engine.has_unfinished_requests():
        nexts = {rid: targets[rid][done[rid]] for rid in targets if done[rid] < forced}
        for rid, ce in engine.step_forced(nexts).items():
            losses.append(ce)
            done[rid] += 1
    if any(n != forced for n in done.values()):
        raise RuntimeError(f"teacher forcing ended early: {done}")
    return float(math.exp(np.mean(losses)))


def passkey_prompt(tokenizer, hay: Sequence[int], length: int, depth: float, key: int) -> list[int]:
    """`length` tokens: the text with the key's sentence at `depth` (0 = start, 1 = end; moved
    back to a lone newline token if one is within 256 tokens before) and the question at the
    end."""
    needle = tokenizer.encode(f"\nThe secret pass key is {key}. Remember it.\n")
    question = tokenizer.encode(PASSKEY_QUESTION)
    body = length - len(needle) - len(question)
    text = list(hay[:body])
    at = want = int(depth * body)
    newline = tokenizer.encode("\n")[-1]
    while at > 0 and text[at - 1] != newline and want - at < 256:
        at -= 1
    at = at if at > 0 and text[at - 1] == newline else want
    return text[:at] + needle + text[at:] + question


def passkey(engine, lengths: Sequence[int], depths: Sequence[float], *, seed: int = 0,
            prefix: str = "key") -> dict[tuple[int, float], bool]:
    """{(length, depth): retrieved} for every length and depth, each with its own key."""
    tok = engine.tokenizer
    hay = haystack_ids(tok, max(lengths))
    rng = np.random.default_rng(seed)
    keys = {(n, d): int(rng.integers(10000, 100000)) for n in lengths for d in depths}
    prompts = {f"{prefix}-{n}-{d}": passkey_prompt(tok, hay, n, d, k) for (n, d), k in keys.items()}
    outs = _run(engine, prompts, SamplingParams(temperature=0, max_tokens=6))
    return {(n, d): tok.decode(outs[f"{prefix}-{n}-{d}"]).strip().startswith(str(k))
            for (n, d), k in keys.items()}


def greedy_tokens(engine, prompts: Sequence[Sequence[int]], max_tokens: int,
                  prefix: str = "agree") -> list[list[int]]:
    outs = _run(engine, {f"{prefix}{i}": list(p) for i, p in enumerate(prompts)},
                SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [outs[f"{prefix}{i}"] for i in range(len(prompts))]


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """(share of positions with the same token, share of tokens before the first divergence)."""
    same = prefix = total = 0
    for a, b in zip(reference, other, strict=True):
        match = [x == y for x, y in zip(a, b)]
        same += sum(match)
        prefix += match.index(False) if False in match else len(match)
        total += len(a)
    return same / total, prefix / total


@dataclasses.dataclass
class Result:
    """One configuration's measurements (dense: config None)."""

    config: SparseAttentionConfig | None
    perplexity: float
    passkey: dict[tuple[int, float], bool]
    agreement: tuple[float, float] | None  # against dense; None for dense itself
    seconds: float

    @property
    def label(self) -> str:
        if self.config is None:
            return "dense"
        c = self.config
        label = f"{c.budget_tokens} tokens" if c.budget_tokens is not None else \
            f"1/{1 / c.budget_fraction:g}"
        return label + (f", reuse {c.reuse_steps}" if c.reuse_steps > 1 else "")


def evaluate(engine, configs: Sequence[SparseAttentionConfig], *, lengths=(1024, 2048, 4096, 8192),
             depths=(0.25, 0.75), ppl_window: int = 3072, ppl_forced: int = 64,
             ppl_windows: int = 2, agreement_tokens: int = 256, progress=print) -> list[Result]:
    """Dense, then each configuration, on one engine (whose sparse setting is restored).

    Every prompt starts at the start of the text, so the prefix cache shares their common
    prefixes (a passkey prompt's text before its key, the first perplexity window), and the
    greedy agreement continues the perplexity windows: on a CPU the dense prefill of the long
    prompts is most of the cost, and it is paid once for all configurations."""
    import time

    tok = engine.tokenizer
    span = ppl_window + ppl_forced
    ppl_ids = haystack_ids(tok, ppl_windows * span)
    agree_prompts = [ppl_ids[w * span:w * span + ppl_window] for w in range(ppl_windows)]
    before = engine.sparse_attention
    results, dense_tokens = [], None
    try:
        for i, config in enumerate([None, *configs]):
            engine.set_sparse_attention(config)
            t0 = time.perf_counter()
            ppl = perplexity(engine, ppl_ids, window=ppl_window, forced=ppl_forced,
                             num_windows=ppl_windows, prefix=f"ppl{i}-")
            keys = passkey(engine, lengths, depths, prefix=f"key{i}")
            toks = greedy_tokens(engine, agree_prompts, agreement_tokens, prefix=f"agree{i}-")
            if config is None:
                dense_tokens = toks
            res = Result(config, ppl, keys, None if config is None else agreement(dense_tokens, toks),
                         time.perf_counter() - t0)
            results.append(res)
            if progress:
                progress(f"{res.label}: perplexity {ppl:.3f}, passkey {sum(keys.values())}/"
                         f"{len(keys)}, agreement {res.agreement}, {res.seconds:.0f} s")
    finally:
        engine.set_sparse_attention(before)
    return results


def table(results: Sequence[Result], speedups: dict[str, dict[int, float]] | None = None) -> str:
    """A markdown table: per configuration the perplexity ratio to dense, passkey hits per
    length (over the depths), greedy agreement, and decode speedups if given."""
    dense = results[0]
    lengths = sorted({n for n, _ in dense.passkey})
    depths = sorted({d for _, d in dense.passkey})
    head = ["budget", "perplexity (ratio)"] + [f"passkey {n}" for n in lengths] + [
        "agreement (match / prefix)"]
    speed_lengths = sorted({n for s in (speedups or {}).values() for n in s})
    head += [f"decode speedup {n}" for n in speed_lengths]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.label, f"{r.perplexity:.3f} ({r.perplexity / dense.perplexity:.3f})"]
        cells += ["".join("✓" if r.passkey[(n, d)] else "✗" for d in depths) for n in lengths]
        cells.append("-" if r.agreement is None else f"{r.agreement[0]:.2f} / {r.agreement[1]:.2f}")
        cells += [f"{(speedups or {}).get(r.label, {}).get(n, float('nan')):.2f}x"
                  for n in speed_lengths]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\npasskey: one mark per depth {', '.join(map(str, depths))}"


__all__ = ["Result", "agreement", "evaluate", "greedy_tokens", "haystack_text", "passkey",
           "passkey_prompt", "perplexity", "table"]
