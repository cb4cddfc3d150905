"""One table of what an accelerator does with jaxserve: the engine's decode and prefill steps on a
random-weight 8B-class Llama, against the device's own measured limits, and the swap bandwidth.

    python benchmarks/device_check.py            # a GPU or TPU: Llama-3-8B shapes, bfloat16
    python benchmarks/device_check.py --tiny     # anywhere (CPU): a 2-layer model, small shapes

Rows:
  copy        device-to-device copy of a large buffer: read + write bytes / time (the bandwidth
              every decode step is bounded by)
  matmul      one large bf16 matmul (8192^3 on a GPU): its FLOP/s (the prefill bound)
  decode B=n  one engine step (embed, layer groups, head, cache write, greedy sampler: the
              runner's own compiled programs) for n requests at --context cached tokens each;
              its floor is (weight bytes + the KV bytes read) / copy bandwidth
  prefill T   one request's T-token prompt chunk; its floor is 2 * params * T / matmul FLOP/s
  swap        1 GiB (tiny: 64 MiB) device -> pinned_host -> device, as preemption swaps KV pages
  sparse      one layer's decode attention, dense against sparse attention at budgets 1/8 and
              1/16 (page scoring kernel, selection, attention over the compacted page table;
              kernels/sparse.py), at 2k, 4k and 8k tokens of context (`sparse_rows`)
No tokenizer, scheduler or checkpoint: the runner is driven directly, so the figures are the
device's. benchmarks/device_check.sh runs this after the kernel benchmark.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.models.llama import init_model
from jaxserve.runner import ModelRunner
from jaxserve.sampling import SamplingParams, SamplingTensors
from timing import timed

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False)
TINY = dict(LLAMA3_8B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    x = jnp.ones(num_bytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    return 2 * num_bytes / timed(lambda: copy(x), repeats)


def matmul_flops(n: int, dtype, repeats: int) -> float:
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / timed(lambda: mm(a), repeats)


def swap_bandwidth(num_bytes: int, repeats: int) -> tuple[float, float] | None:
    """(device -> pinned_host, pinned_host -> device) bytes/s, or None without host memory kinds."""
    x = jnp.ones(num_bytes // 2, jnp.bfloat16)
    try:
        host = x.sharding.with_memory_kind("pinned_host")
        on_host = jax.device_put(x, host)
    except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    out = timed(lambda: jax.device_put(x, host), repeats)
    back = timed(lambda: jax.device_put(on_host, x.sharding), repeats)
    return num_bytes / out, num_bytes / back


class StepTimer:
    """The runner's programs for one bucket, run on a synthetic batch (pages distinct)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.greedy = SamplingParams(temperature=0)

    def __call__(self, query_lens: list[int], kv_lens: list[int], decode: bool, repeats: int) -> float:
        r = self.runner
        b = r.bucket_for(sum(query_lens), len(query_lens), decode)
        pages, tables = 1, []
        for n in kv_lens:
            need = -(-n // r.page_size)
            tables.append(list(range(pages, pages + need)) + [0] * (r.max_pages_per_request - need))
            pages += need
        assert pages <= r.num_pages, "the cache is too small for this row"
        md = r._metadata(b, query_lens, kv_lens, tables)
        ids = np.zeros(b.num_tokens, np.int32)
        li = np.zeros(b.num_requests, np.int32)
        li[:len(query_lens)] = np.cumsum(query_lens) - 1
        t = SamplingTensors.from_params([self.greedy] * len(query_lens), [0] * len(query_lens),
                                        [[]] * len(query_lens), [[]] * len(query_lens),
                                        r.config.vocab_size, pad_to=b.num_requests)
        ids, md, li, t, ban = r._put((ids, md, li, t, np.zeros((b.num_requests, 0), np.int32)))

        def step():
            logits, new_kv, _ = r._forward(b, ids, md, li)
            r._write_kv(b, new_kv, md.slot_mapping)
            return r._run_sampler(logits, t, ban, 0)[0].token_ids, r.kv

        return timed(step, repeats)


def sparse_rows(config: ModelConfig, dtype, batches, contexts, repeats) -> list[tuple]:
    """Decode attention of one layer, dense against sparse budgets, on the dispatch's kernels
    (Pallas on GPU/TPU): rows of (name, time, speedup over dense, '')."""
    import functools

    from jaxserve.config import SparseAttentionConfig
    from jaxserve.kernels import build_metadata, ragged_paged_attention
    from jaxserve.kernels.sparse import ref_page_summaries

    rng = np.random.default_rng(0)
    kh, e, h, s = config.num_kv_heads, config.head_dim, config.num_heads, 16
    width = max(contexts) // s
    rows = []
    for batch in batches:
        for context in contexts:
            used = -(-context // s)
            tables = [list(range(1 + r * used, 1 + (r + 1) * used)) for r in range(batch)]
            md = jax.device_put(build_metadata(
                query_lens=[1] * batch, kv_lens=[context] * batch, page_tables=tables, page_size=s,
                num_tokens=batch, num_requests=batch, num_pages_per_request=width,
                num_blocks=batch, query_block=1))
            shape = (1 + batch * used, s, kh, e)
            kc = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
            vc = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
            summ = ref_page_summaries(kc, np.full(shape[0], s))
            q = jnp.asarray(rng.standard_normal((batch, h, e)), dtype)
            kn = jnp.asarray(rng.standard_normal((batch, kh, e)), dtype)
            dense = None
            for frac in (None, 1 / 8, 1 / 16):
                sparse = None if frac is None else SparseAttentionConfig(budget_fraction=frac, min_context=0)
                f = jax.jit(functools.partial(ragged_paged_attention, sm_scale=e ** -0.5,
                                              sparse=sparse))
                t = timed(lambda: f(q, kc, vc, kn, kn, md, summaries=summ), repeats)
                dense = dense or t
                rows.append((f"sparse B={batch} ctx={context} {'dense' if frac is None else f'1/{round(1 / frac)}'}",
                             f"{t * 1e3:.3f} ms", f"{dense / t:.2f}x vs dense", ""))
                print(*rows[-1], flush=True)
            del kc, vc, summ
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model and small shapes (CPU)")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,32,128; tiny 1,8)")
    ap.add_argument("--context", type=int, default=None, help="cached tokens per decode request")
    ap.add_argument("--prefill", type=int, default=None, help="prompt tokens of the prefill row")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=None)
    a = ap.parse_args()
    tiny = a.tiny
    batches = [int(x) for x in (a.batches or ("1,8" if tiny else "1,32,128")).split(",")]
    context = a.context or (64 if tiny else 1024)
    prefill = a.prefill or (64 if tiny else 512)
    repeats = a.repeats or (3 if tiny else 10)
    dtype = jnp.dtype(a.dtype)
    device = jax.devices()[0]
    config = ModelConfig.from_hf(TINY if tiny else LLAMA3_8B)
    print(f"{device.platform} {device.device_kind}, jax {jax.__version__}; "
          f"{'tiny' if tiny else 'Llama-3-8B-shaped'} random weights, {dtype.name}", flush=True)

    rows = []
    bw = copy_bandwidth((64 if tiny else 2048) * 2**20, repeats)
    rows.append(("copy", f"{bw / 1e9:.1f} GB/s", "", ""))
    peak = matmul_flops(512 if tiny else 8192, dtype, repeats)
    rows.append(("matmul", f"{peak / 1e12:.2f} TFLOP/s", "", ""))

    t0 = time.perf_counter()
    model = init_model(config, 0, dtype)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model)))
    weight_bytes = num_params * dtype.itemsize
    page_size = 16
    pages_per_request = -(-max(context + 1, prefill) // page_size)
    num_pages = 1 + max(batches) * pages_per_request
    engine = EngineConfig(max_model_len=pages_per_request * page_size, max_num_seqs=max(batches),
                          max_num_batched_tokens=max(prefill, 16), decode_buckets=tuple(batches),
                          page_size=page_size, num_kv_pages=num_pages)
    runner = ModelRunner(model, engine, num_pages)
    del model
    print(f"{num_params / 1e6:,.1f} M params, {weight_bytes / 2**30:.2f} GiB; model and "
          f"{num_pages} KV pages ready in {time.perf_counter() - t0:.1f} s", flush=True)
    c = runner.config
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype.itemsize
    step = StepTimer(runner)
    for batch in batches:
        t0 = time.perf_counter()
        seconds = step([1] * batch, [context + 1] * batch, True, repeats)
        compile_s = time.perf_counter() - t0 - seconds * (repeats + 1)
        floor = (weight_bytes + batch * (context + 1) * kv_per_token) / bw
        rows.append((f"decode B={batch} ctx={context}", f"{seconds * 1e3:.2f} ms",
                     f"{batch / seconds:.0f} tok/s", f"{floor / seconds:.0%} of copy bw "
                     f"(compile {compile_s:.0f} s)"))
        print(*rows[-1], flush=True)
    seconds = step([prefill], [prefill], False, repeats)
    floor = 2 * num_params * prefill / peak
    rows.append((f"prefill T={prefill}", f"{seconds * 1e3:.2f} ms", f"{prefill / seconds:.0f} tok/s",
                 f"{floor / seconds:.0%} of matmul FLOP/s"))
    rows += sparse_rows(config, dtype, [1, 8], [256, 512] if tiny else [2048, 4096, 8192], repeats)
    swap = swap_bandwidth((64 if tiny else 1024) * 2**20, repeats)
    rows.append(("swap out / in", "-" if swap is None else
                 f"{swap[0] / 1e9:.1f} / {swap[1] / 1e9:.1f} GB/s", "", "pinned_host" if swap else
                 "no pinned_host memory kind"))

    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))


if __name__ == "__main__":
    main()
