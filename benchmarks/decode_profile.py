"""Where a decode step's time goes, part by part, against each part's limit on this machine.

    python benchmarks/decode_profile.py [--batches 1,8,32,64] [--dtype float32] [--context 256]

(Not benchmarks/profile.py: run as a script, that name would shadow the standard library's
`profile`, which IPython, imported by Flax, needs.)

For each batch size B (B requests, one token each, `--context` cached tokens each), the parts are
timed as the runner runs them, each its own compiled program on the same inputs:
  embed              the embedding lookup
  layers             every layer group's program (what the step runs)
    matmuls alone    the four projections of every layer (qkv, o, gate_up, down) at T = B, each
                     layer's own weights, in one program of their own: an estimate of the
                     matmuls' share (XLA fuses and schedules them differently inside the
                     group, so the two "alone" rows may add up to more than the group)
    attention alone  ragged paged attention over every layer's cache, one program, likewise
  head               final norm and the logits (tied: the embedding table)
  cache write        write_kv of the step's K/V, cache donated
  sampler            greedy sampling of B rows
  host               ModelRunner.prepare of the step (numpy only) and the result's fetch
Limits: a part's bytes (weights it reads, KV it reads or writes) over the measured copy
bandwidth (numpy, read + write), and its FLOPs over the measured rate of one large matmul
(jnp.dot of 2048 x 2048 in the dtype); the larger of the two is the part's floor, and
"x floor" is how far above it the part runs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import kernels
from jaxserve.kernels import cpu_matmul
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.models import llama
from jaxserve.runner import ModelRunner
from jaxserve.sampling import SamplingParams, SamplingTensors
from jaxserve.sched import SchedulerOutput
from timing import timed

SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192)


def machine_limits(dtype, repeats: int) -> tuple[float, float]:
    """(copy bandwidth bytes/s, read + write; matmul FLOP/s in `dtype`)."""
    x = np.ones(64 * 2**20, np.float32)
    y = np.empty_like(x)
    t = timed(lambda: np.copyto(y, x), repeats)
    a = jnp.ones((2048, 2048), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * x.nbytes / t, 2 * 2048 ** 3 / timed(lambda: mm(a), repeats)


def load(dtype, random_weights: bool) -> llama.LlamaModel:
    if random_weights:
        return llama.init_model(ModelConfig.from_hf(SMOLLM2_135M), 0, dtype)
    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint

    return load_checkpoint(default_model_path(), dtype=dtype).model


def profile(runner: ModelRunner, batch: int, context: int, bw: float, peak: float,
            repeats: int, prompt: int = 0) -> list[tuple]:
    """The parts of a decode step of `batch` requests; with `prompt`, of a prefill step of
    `batch` prompts of `prompt` tokens instead (no cached tokens, logits of each last token)."""
    r, c = runner, runner.config
    itemsize = jnp.dtype(r.model.dtype).itemsize
    new = prompt or 1  # tokens each request computes this step
    kv_len = prompt or context + 1
    tokens = batch * new
    b = r.bucket_for(tokens, batch, not prompt)
    pages = -(-kv_len // r.page_size)
    tables = [list(range(1 + i * pages, 1 + (i + 1) * pages)) for i in range(batch)]
    md_host = r._metadata(b, [new] * batch, [kv_len] * batch, tables)
    last = np.zeros(b.num_requests, np.int32)
    last[:batch] = np.arange(1, batch + 1) * new - 1
    ids, md, li = r._put((np.zeros(b.num_tokens, np.int32), md_host, last))
    el, hl, g = r._embed_leaves, r._head_leaves, r.layers_per_program
    groups = c.num_layers // g
    hidden = r._program(("embed", b.num_tokens), r._embed, el, ids)(el, ids)
    group, lkv = tuple(r._layer_leaves[:g]), r.kv[:g]
    dense_args = (None, None, None)  # no sparse attention: summaries, dense layers, selections
    layers = r._program(("layers", b, None, None), r._layers, group, lkv, hidden, md, *dense_args,
                        sparse=None, refresh=None)

    def head(head_leaves, embed_leaves, hidden, logits_indices):  # as the runner calls it
        return r.logits(b, hidden, logits_indices)


    # The projections and the attention of every layer, as programs of their own, on every
    # layer's weights as the runner's programs take them (llama.packed_weights): from memory as
    # in a step (one layer's 7 MB would stay in the L3 from call to call)
    view = llama.packed_weights if r._pack else (lambda module: module)
    ws = [(l.attn.qkv.kernel[...], l.attn.o.kernel[...], l.mlp.gate_up.kernel[...],
           l.mlp.down.kernel[...]) for l in map(view, r.model.layers)]
    x = jnp.zeros((b.num_tokens, c.hidden_size), r.model.dtype)
    q = jnp.zeros((b.num_tokens, c.num_heads, c.head_dim), r.model.dtype)
    kn = jnp.zeros((b.num_tokens, c.num_kv_heads, c.head_dim), r.model.dtype)
    f = jnp.zeros((b.num_tokens, c.intermediate_size), r.model.dtype)

    op = r.model.layers[0].attn.qkv.einsum_op  # as the runner runs them (llama.project_cpu on one CPU)

    @jax.jit
    def matmuls(x, q, f, ws):
        kw = dict(preferred_element_type=jnp.float32)
        out = []
        for wqkv, wo, wgu, wd in ws:
            gate_up = (cpu_matmul.swiglu(x, wgu) if wgu.dtype == jnp.uint32  # as llama.MLP
                       else op("TD,DCF->TCF", x, wgu, **kw))
            out.append((op("TD,DKCE->TKCE", x, wqkv, **kw), op("THE,HED->TD", q, wo, **kw),
                        gate_up, op("TF,FD->TD", f, wd, **kw)))
        return out

    @jax.jit
    def attention(q, kv, kn, md):  # every layer's cache: distinct calls (identical ones are CSE'd)
        return [kernels.ragged_paged_attention(q, kc, vc, kn, kn, md, sm_scale=c.head_dim ** -0.5)
                for kc, vc in kv]

    t_mm = timed(lambda: matmuls(x, q, f, ws), repeats)
    t_attn = timed(lambda: attention(q, r.kv, kn, md), repeats)
    t_layers = timed(lambda: layers(group, lkv, hidden, md, *dense_args)[0], repeats) * groups
    logits = head(hl, el, hidden, li)
    new_kv = tuple((kn, kn) for _ in range(c.num_layers))
    t_write = timed(lambda: (r._write_kv(b, new_kv, md.slot_mapping), r.kv)[1], repeats)
    sp = SamplingTensors.from_params([SamplingParams(temperature=0)] * batch, [0] * batch,
                                     [[]] * batch, [[]] * batch, c.vocab_size, pad_to=b.num_requests)
    sp, ban = r._put((sp, np.zeros((b.num_requests, 0), np.int32)))
    t_sample = timed(lambda: r._run_sampler(logits, sp, ban, 0)[0].token_ids, repeats)

    t_host = _host_time(r, batch, context, repeats) if not prompt else 0.0

    # bytes (a packed weight, uint32 pairs of bf16, has the bf16 weight's bytes)
    weights = {name: sum(x.nbytes for x in jax.tree_util.tree_leaves(v)) for name, v in (
        ("matmuls", ws[0]), ("embed", ()), ("head", el))}
    attended = kv_len if not prompt else prompt * (prompt + 1) // 2  # (query, key) pairs
    kv_read = batch * kv_len * 2 * c.num_kv_heads * c.head_dim * itemsize * c.num_layers
    rows = [  # part, seconds, bytes, flops
        ("embed", timed(lambda: r._embed(el, ids), repeats), batch * c.hidden_size * itemsize, 0),
        ("layers", t_layers, weights["matmuls"] * c.num_layers + kv_read,
         2 * tokens * weights["matmuls"] // itemsize * c.num_layers),
        ("  matmuls alone", t_mm, weights["matmuls"] * c.num_layers,
         2 * tokens * weights["matmuls"] // itemsize * c.num_layers),
        ("  attention alone", t_attn, kv_read,  # causal: a prompt's scores are a triangle
         4 * batch * attended * c.num_heads * c.head_dim * c.num_layers),
        ("head", timed(lambda: head(hl, el, hidden, li), repeats), weights["head"],
         2 * batch * c.hidden_size * c.vocab_size),
        ("cache write", t_write, 2 * tokens * c.num_layers * c.num_kv_heads * c.head_dim * itemsize, 0),
        ("sampler", t_sample, batch * c.vocab_size * 4, 0),
        *([("host", t_host, 0, 0)] if not prompt else []),
    ]
    out = []
    for part, seconds, nbytes, flops in rows:
        floor = max(nbytes / bw, flops / peak)
        out.append((batch, part, seconds * 1e3, floor * 1e3, seconds / floor if floor else None))
    return out


def _host_time(r: ModelRunner, batch: int, context: int, repeats: int) -> float:
    """ModelRunner.prepare of a decode step of `batch` requests, from a real scheduler (after
    their prompts' prefill); the engine's postprocess and detokenization are not counted."""
    from jaxserve.sched import Request, Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(num_pages=r.num_pages, page_size=r.page_size,
                                      max_num_seqs=batch, max_num_batched_tokens=batch * context,
                                      max_model_len=r.engine.max_model_len, enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=8)
    for i in range(batch):
        sched.add_request(Request(str(i), list(range(1, context + 1)), 8, sampling_params=params))
    prefill = sched.schedule()
    sched.update(prefill, {s.request_id: [1] for s in prefill.scheduled})
    out: SchedulerOutput = sched.schedule()  # one decode token per request
    assert all(s.num_new_tokens == 1 for s in out.scheduled) and len(out.scheduled) == batch
    params_of = {s.request_id: params for s in out.scheduled}
    return timed(lambda: r.prepare(out, params_of), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=0, help="profile a prefill step instead: each of "
                    "the batch's requests computes a prompt of this many tokens")
    ap.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's shape")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    dtype = jnp.dtype(a.dtype)
    bw, peak = machine_limits(dtype, a.repeats)
    model = load(dtype, a.random)
    pages = -(-max(a.context + 1, a.prompt) // 16)
    engine = EngineConfig(max_model_len=pages * 16, max_num_seqs=max(batches),
                          decode_buckets=tuple(batches),
                          max_num_batched_tokens=max(16, max(batches) * a.prompt),
                          num_kv_pages=1 + max(batches) * pages, page_size=16)
    runner = ModelRunner(model, engine, engine.num_kv_pages)
    step = f"prefill of {a.prompt}-token prompts" if a.prompt else f"decode, context {a.context}"
    print(f"{a.dtype}, {step}; copy {bw / 1e9:.1f} GB/s, matmul "
          f"{peak / 1e9:.0f} GFLOP/s (2048^2, {a.dtype})")
    print(f"{'B':>3} {'part':<18} {'ms':>8} {'floor ms':>9} {'x floor':>8}")
    for batch in batches:
        rows = profile(runner, batch, a.context, bw, peak, a.repeats, a.prompt)
        for b, part, ms, floor, ratio in rows:
            print(f"{b:>3} {part:<18} {ms:8.2f} {floor:9.2f} {'-' if ratio is None else f'{ratio:.1f}':>8}")
        total = sum(ms for _, part, ms, _, _ in rows if not part.startswith("  "))
        print(f"{batch:>3} {'step (sum)':<18} {total:8.2f}   -> {batch * max(a.prompt, 1) / total * 1e3:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
