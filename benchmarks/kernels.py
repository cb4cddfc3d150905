"""Time ragged paged attention: the Pallas kernel, the jnp reference under jit, and JAX's
bundled Pallas GPU paged_attention (decode only), against a measured copy bandwidth.

    python benchmarks/kernels.py            # on a GPU (or TPU): realistic shapes, bfloat16
    python benchmarks/kernels.py --sweep    # ... plus the GPU kernel at other tile settings
    python benchmarks/kernels.py --tiny     # anywhere: tiny shapes, kernels in interpret mode

Shapes (full): 32 query heads, 8 kv heads, head dim 128, page sizes 16 and 64; decode at batch
64 with 2k and 8k tokens of context; one mixed batch (56 decode tokens at 4k context and 4
prefill chunks of 512 tokens after 1536 cached). Pages are shuffled. Every result is checked
against the reference before anything is timed. GB/s counts the bytes the attention must
move at least (each request's K and V once, plus q and the output) over the median time; "of
copy" compares it with a device-to-device copy of a 1 GiB buffer (read + write bytes). The
bundled kernel takes its own [K, P, S, E] cache layout, transposed outside the timing, and
reads the new token from the cache, so it gets the cache after `write_kv`.

On a GPU the kernel is the Triton-lowered Pallas kernel, on a TPU the Mosaic one; elsewhere
(--tiny on CPU) both run in Pallas interpret mode, so the numbers only show that it works.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import kernels
from jaxserve.kernels import build_metadata, num_query_blocks, ref_ragged_paged_attention, write_kv


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    page_size: int
    decode_context: int  # context of each decode request
    num_decode: int
    prefill_chunks: tuple[tuple[int, int], ...] = ()  # (cached, new tokens) per prefill request
    query_block: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    num_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    shapes: tuple[Shape, ...]
    copy_bytes: int
    repeats: int  # back-to-back calls per timed round
    rounds: int  # timed rounds (the median is reported)


def full_config(dtype: str) -> Config:
    shapes = []
    for s in (16, 64):
        for ctx in (2048, 8192):
            shapes.append(Shape(f"decode B=64 ctx={ctx // 1024}k S={s}", s, ctx, 64))
        shapes.append(Shape(f"mixed 56x4k+4x512 S={s}", s, 4096, 56, ((1536, 512),) * 4, 16))
    return Config(32, 8, 128, dtype, tuple(shapes), 1 << 30, 20, 5)


def tiny_config(dtype: str) -> Config:
    shapes = (Shape("decode B=3 ctx=40 S=16", 16, 40, 3),
              Shape("mixed 2x24+1x(8+12) S=8", 8, 24, 2, ((8, 12),), 4))
    return Config(4, 2, 64, dtype, shapes, 1 << 22, 1, 1)


def make_inputs(cfg: Config, shape: Shape, rng):
    """Metadata, q, caches holding each request's history, new K/V; kv bytes moved at least."""
    q_lens = [1] * shape.num_decode + [new for _, new in shape.prefill_chunks]
    kv_lens = [shape.decode_context] * shape.num_decode + [c + n for c, n in shape.prefill_chunks]
    s, kh, e = shape.page_size, cfg.kv_heads, cfg.head_dim
    needed = [-(-kv // s) for kv in kv_lens]
    num_pages = sum(needed) + 1
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.split(perm, np.cumsum(needed)[:-1])
    t = sum(q_lens)
    md = build_metadata(query_lens=q_lens, kv_lens=kv_lens, page_tables=tables, page_size=s,
                        num_tokens=t, num_requests=len(q_lens), num_pages_per_request=max(needed),
                        num_blocks=num_query_blocks(q_lens, shape.query_block),
                        query_block=shape.query_block)
    md = jax.tree_util.tree_map(jnp.asarray, md)
    dtype = jnp.dtype(cfg.dtype)
    shapes = [(t, cfg.num_heads, e), (num_pages, s, kh, e), (num_pages, s, kh, e), (t, kh, e),
              (t, kh, e)]
    if jax.default_backend() == "cpu":  # tiny: numpy is faster than compiling jax.random
        arrays = [jnp.asarray(rng.standard_normal(x, np.float32), dtype) for x in shapes]
    else:  # GB of cache: generate it on the device
        keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
        arrays = [jax.random.normal(key, x, dtype) for key, x in zip(keys, shapes)]
    moved = (2 * sum(kv_lens) * kh * e + 2 * arrays[0].size) * dtype.itemsize
    return md, tuple(arrays), moved, kv_lens


def median_seconds(fn, args, repeats: int, rounds: int = 5) -> float:
    """Median over rounds of the mean time of `repeats` back-to-back calls (dispatch overlaps
    the previous call, as in a serving loop)."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(repeats)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / repeats)
    return statistics.median(times)


def copy_bandwidth(cfg: Config) -> float:
    """Bytes per second of a device-to-device copy (x + 1 reads and writes every byte)."""
    x = jnp.zeros((cfg.copy_bytes // 4,), jnp.float32)
    seconds = median_seconds(jax.jit(lambda x: x + 1), (x,), cfg.repeats, cfg.rounds)
    return 2 * cfg.copy_bytes / seconds


def bundled_paged_attention():
    """JAX's bundled Pallas (Triton) decode kernel, or None where this JAX lacks it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of tokamax after JAX 0.11
            from jax.experimental.pallas.ops.gpu import paged_attention
        return paged_attention.paged_attention
    except Exception:  # removed, or its Triton backend missing: skip it
        return None


def bundled_fn(shape: Shape, md, arrays, kv_lens, sm_scale: float, interpret: bool):
    """Bundled kernel on this decode batch: (jitted fn, its args), or None. It applies no
    softmax scale, so it gets q pre-scaled."""
    impl = bundled_paged_attention()
    if impl is None or shape.prefill_chunks:
        return None
    q, k_cache, v_cache, k_new, v_new = arrays
    ((k_after, v_after),) = write_kv(((k_cache, v_cache),), ((k_new, v_new),), md.slot_mapping)
    k_pages, v_pages = (jnp.transpose(c, (2, 0, 1, 3)) for c in (k_after, v_after))  # [K, P, S, E]
    pages_per_seq = md.page_table.shape[1]
    k_splits = next(k for k in (16, 8, 4, 2, 1) if pages_per_seq % k == 0)
    per_split = pages_per_seq // k_splits
    per_block = next(b for b in (8, 4, 2, 1) if per_split % b == 0)
    fn = jax.jit(lambda q, k, v, table, lens: impl(
        q, k, v, table, lens, k_splits=k_splits, pages_per_compute_block=per_block,
        interpret=interpret))
    q_scaled = (q * sm_scale).astype(q.dtype)
    return fn, (q_scaled, k_pages, v_pages, md.page_table, jnp.asarray(kv_lens, jnp.int32))


def gpu_sweep(shape: Shape, arrays, md, opts, interpret: bool) -> dict:
    """The GPU kernel at other settings: key rows per step, warps, pipeline stages."""
    from jaxserve.kernels import gpu_ragged_paged_attention as gpu

    out = {}
    for rows, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 2), (256, 8, 2), (256, 4, 2)):
        pages = max(1, rows // shape.page_size)
        fn = jax.jit(lambda *a, p=pages, w=warps, st=stages: gpu.ragged_paged_attention(
            *a, pages_per_tile=p, num_warps=w, num_stages=st, interpret=interpret, **opts))
        out[f"pallas gpu C={pages * shape.page_size} w={warps} st={stages}"] = (fn, (*arrays, md))
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes; kernels in interpret mode off GPU/TPU")
    parser.add_argument("--dtype", default=None,
                        help="bfloat16 (full) / float32 (tiny) by default")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sweep", action="store_true",
                        help="also time the GPU kernel at other tile / warp / stage settings")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    cfg = (tiny_config if args.tiny else full_config)(dtype)
    if args.repeats:
        cfg = dataclasses.replace(cfg, repeats=args.repeats)
    backend = jax.default_backend()
    kernel = backend if backend in kernels.KERNELS else "gpu"
    interpret = backend != kernel
    if interpret and not args.tiny:
        sys.exit(f"no GPU/TPU here ({backend}); run with --tiny")
    bandwidth = copy_bandwidth(cfg)
    print(f"{jax.devices()[0].device_kind}: copy {bandwidth / 1e9:.0f} GB/s; H={cfg.num_heads} "
          f"K={cfg.kv_heads} E={cfg.head_dim} {cfg.dtype}; {kernel} kernel"
          f"{' (interpret mode)' if interpret else ''}")
    opts = dict(sm_scale=cfg.head_dim ** -0.5)
    tol = 2e-2 if cfg.dtype != "float32" else 1e-4
    rows = []
    for shape in cfg.shapes:
        md, arrays, moved, kv_lens = make_inputs(cfg, shape, np.random.default_rng(0))
        ref = jax.jit(lambda *a: ref_ragged_paged_attention(*a, **opts))
        want = ref(*arrays, md)
        impls = {"reference (jit)": (ref, (*arrays, md)),
                 f"pallas {kernel}": (jax.jit(lambda *a: kernels.ragged_paged_attention(
                     *a, impl=kernel, interpret=interpret, **opts)), (*arrays, md))}
        bundled = None if kernel == "tpu" else bundled_fn(shape, md, arrays, kv_lens,
                                                            opts["sm_scale"], interpret)
        if bundled is not None:
            impls["bundled paged_attention"] = bundled
        if args.sweep and kernel == "gpu":
            impls.update(gpu_sweep(shape, arrays, md, opts, interpret))
        for name, (fn, fn_args) in impls.items():
            got = fn(*fn_args).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(got - want.astype(jnp.float32))))
            seconds = (median_seconds(fn, fn_args, cfg.repeats, cfg.rounds) if err <= tol
                       else float("nan"))
            rows.append(dict(shape=shape.name, impl=name, ms=seconds * 1e3, max_err=err,
                             gbps=moved / seconds / 1e9, of_copy=moved / seconds / bandwidth,
                             ok=err <= tol))
    print(f"{'shape':<28}{'impl':<26}{'ms':>9}{'GB/s':>9}{'of copy':>9}{'max err':>10}")
    for r in rows:
        flag = "" if r["ok"] else "  MISMATCH (not timed)"
        print(f"{r['shape']:<28}{r['impl']:<26}{r['ms']:>9.3f}{r['gbps']:>9.1f}"
              f"{r['of_copy']:>8.0%}{r['max_err']:>10.2e}{flag}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["ok"] for r in main()) else 1)
