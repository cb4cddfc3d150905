"""The Pallas kernels against the jnp reference, in Pallas interpret mode on CPU.

Each case is a ragged batch (decode only, prefill only, or mixed with chunked prefills) with
pages shuffled in the page table, NaN in every page and slot nobody wrote, unused page-table
slots pointing at a NaN page or holding a garbage index, and padding tokens, blocks and
requests as a shape bucket has them. The cases are chosen to cover, not to cross: every GQA
ratio (1, 3, 4, 8), head dims 64 and 128, float32 and bfloat16, sliding window on and off,
page sizes 4 to 32, and tiles small enough that each request spans several of them. The
kernels never write the cache (the read/write split is kept; `write_kv` is tested in
test_attention.py). The TPU interpret mode also runs the DMA semaphores, so a wrong double
buffer wait or an out-of-bounds copy raises there.

Beyond interpret mode, the real lowering of each kernel is checked on CPU: the TPU kernel
lowers to Mosaic and the GPU kernel to Triton IR at a production shape (nothing compiles them
for a device here).
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxserve import kernels
from jaxserve.kernels import (build_metadata, gpu_ragged_paged_attention, num_query_blocks,
                              ref_ragged_paged_attention, tpu_ragged_paged_attention)

KERNELS = {"gpu": gpu_ragged_paged_attention, "tpu": tpu_ragged_paged_attention}


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str  # "decode" | "prefill" | "mixed"
    page_size: int
    group: int  # query heads per kv head
    head_dim: int
    dtype: str
    window: int | None = None
    query_block: int = 4
    soft_cap: float | None = None
    pages_per_tile: int = 2  # small, so that requests span several K/V tiles
    garbage_table: bool = False  # unused page-table slots: garbage index instead of page 0
    kv_heads: int = 2


CASES = [
    Case("decode", 16, 1, 128, "float32", query_block=1),
    Case("decode", 8, 8, 64, "bfloat16", window=7, query_block=1, garbage_table=True),
    Case("prefill", 16, 4, 64, "float32", query_block=8, pages_per_tile=1),
    Case("prefill", 32, 3, 128, "bfloat16", window=10, pages_per_tile=1),
    Case("mixed", 8, 3, 64, "float32", window=5, soft_cap=20.0, garbage_table=True),
    Case("mixed", 16, 8, 128, "bfloat16", kv_heads=1),
    Case("mixed", 4, 4, 64, "float32", query_block=2, pages_per_tile=4),
    Case("mixed", 16, 1, 64, "bfloat16", window=3, query_block=8, garbage_table=True),
]


def case_id(c: Case) -> str:
    w = f"w{c.window}" if c.window else "full"
    return f"{c.mode}-S{c.page_size}-G{c.group}-E{c.head_dim}-{c.dtype}-{w}"


def make_batch(rng, c: Case, num_requests=4, max_len=70):
    """A padded ragged batch for case c: metadata and float32 q [T,H,E], caches [P,S,K,E],
    k_new / v_new [T,K,E]. Pages are handed out shuffled; every slot nobody wrote is NaN."""
    q_lens, kv_lens = [], []
    for r in range(num_requests):
        kv = int(rng.integers(1, max_len))
        if c.mode == "decode" or (c.mode == "mixed" and r % 2 == 0):
            q = 1
        elif c.mode == "prefill" and r % 2 == 0:
            q = kv  # a whole prompt
        else:
            q = int(rng.integers(1, kv + 1))  # a prefill chunk after cached tokens
        q_lens.append(q), kv_lens.append(kv)
    s, kh = c.page_size, c.kv_heads
    needed = [-(-kv // s) for kv in kv_lens]
    num_pages = sum(needed) + 4
    perm = rng.permutation(np.arange(1, num_pages))  # page 0 stays unused: all NaN
    tables = np.split(perm[:sum(needed)], np.cumsum(needed)[:-1])
    width = max(needed) + 2
    t = sum(q_lens) + 3  # padding tokens
    md = build_metadata(query_lens=q_lens, kv_lens=kv_lens, page_tables=tables, page_size=s,
                        num_tokens=t, num_requests=num_requests + 1, num_pages_per_request=width,
                        num_blocks=num_query_blocks(q_lens, c.query_block) + 2,
                        query_block=c.query_block)
    if c.garbage_table:
        table = np.array(md.page_table)
        for r in range(num_requests + 1):
            table[r, needed[r] if r < num_requests else 0:] = 10 ** 6 + r
        md = dataclasses.replace(md, page_table=table)
    h, e = kh * c.group, c.head_dim
    k_cache = np.full((num_pages, s, kh, e), np.nan, np.float32)
    v_cache = k_cache.copy()
    k_new = np.zeros((t, kh, e), np.float32)
    v_new = np.zeros_like(k_new)
    for r, (ql, kv) in enumerate(zip(q_lens, kv_lens)):
        keys = rng.standard_normal((kv, kh, e)).astype(np.float32)
        values = rng.standard_normal((kv, kh, e)).astype(np.float32)
        for pos in range(kv - ql):  # cached before this step
            k_cache[tables[r][pos // s], pos % s] = keys[pos]
            v_cache[tables[r][pos // s], pos % s] = values[pos]
        start = md.query_start[r]
        k_new[start:start + ql], v_new[start:start + ql] = keys[kv - ql:], values[kv - ql:]
    q = rng.standard_normal((t, h, e)).astype(np.float32)
    return md, (q, k_cache, v_cache, k_new, v_new), sum(q_lens)


def check_against_reference(got, want, num_used, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), "NaN from unused pages or slots leaked into the output"
    tol = 2e-2 if dtype == "bfloat16" else 2e-5
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    assert np.all(got[num_used:] == 0), "padding tokens must produce zeros"


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference(impl, case):
    rng = np.random.default_rng(CASES.index(case))
    md, arrays, num_used = make_batch(rng, case)
    q, kc, vc, kn, vn = (jnp.asarray(x, case.dtype) for x in arrays)
    scale = case.head_dim ** -0.5
    opts = dict(sm_scale=scale, sliding_window=case.window, soft_cap=case.soft_cap)
    want = ref_ragged_paged_attention(q, kc, vc, kn, vn, md, **opts)
    got = KERNELS[impl].ragged_paged_attention(
        q, kc, vc, kn, vn, md, pages_per_tile=case.pages_per_tile, interpret=True, **opts)
    check_against_reference(got, want, num_used, case.dtype)


def test_tpu_double_buffering_has_no_races():
    """The interpreter's happens-before race detector over the DMA double buffer: a tile's
    buffer is never read before its copy is waited on, nor overwritten while in use."""
    races = pytest.importorskip("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
    case = CASES[6]  # four pages per tile, several tiles per request, cache then new tokens
    md, arrays, num_used = make_batch(np.random.default_rng(1), case, num_requests=2, max_len=40)
    args = [jnp.asarray(x) for x in arrays]
    got = tpu_ragged_paged_attention.ragged_paged_attention(
        *args, md, sm_scale=0.125, pages_per_tile=case.pages_per_tile,
        interpret=pltpu.InterpretParams(detect_races=True))
    check_against_reference(got, ref_ragged_paged_attention(*args, md, sm_scale=0.125),
                            num_used, "float32")
    assert not races.races.races_found


def test_dispatch_runs_kernel_in_interpret_mode():
    case = CASES[4]
    md, arrays, num_used = make_batch(np.random.default_rng(7), case, num_requests=3, max_len=30)
    args = [jnp.asarray(x) for x in arrays]
    opts = dict(sm_scale=0.125, sliding_window=case.window, soft_cap=case.soft_cap)
    want = ref_ragged_paged_attention(*args, md, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # supported shapes: no fallback warning
        got = jax.jit(lambda *a: kernels.ragged_paged_attention(
            *a, md, impl="gpu", interpret=True, **opts))(*args)
    check_against_reference(got, want, num_used, "float32")


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_unsupported_head_dim_falls_back_with_one_warning(impl):
    case = Case("mixed", 8, 2, 48, "float32")  # 48: neither a power of two nor lane-aligned
    md, arrays, _ = make_batch(np.random.default_rng(3), case, num_requests=2, max_len=20)
    args = [jnp.asarray(x) for x in arrays]
    want = ref_ragged_paged_attention(*args, md, sm_scale=0.1)
    kernels._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [kernels.ragged_paged_attention(*args, md, sm_scale=0.1, impl=impl, interpret=True)
                for _ in range(2)]
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "head dim 48" in str(caught[0].message) and impl in str(caught[0].message)
    for out in outs:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_dispatch_defaults_and_errors():
    case = Case("decode", 8, 2, 16, "float32", query_block=1)
    md, arrays, _ = make_batch(np.random.default_rng(5), case, num_requests=2, max_len=12)
    args = [jnp.asarray(x) for x in arrays]
    assert kernels.backend_of(args[0]) == "cpu"
    want = ref_ragged_paged_attention(*args, md, sm_scale=0.1)
    out = kernels.ragged_paged_attention(*args, md, sm_scale=0.1, impl="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    # on CPU the default is the C++ decode kernel for decode-only steps, the reference otherwise
    assert md.decode_only
    kernel = kernels.ragged_paged_attention(*args, md, sm_scale=0.1, impl="cpu")
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(want), atol=1e-5, rtol=1e-5)
    out = kernels.ragged_paged_attention(*args, md, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(kernel))

    with pytest.raises(ValueError, match="interpret=True"):
        kernels.ragged_paged_attention(*args, md, sm_scale=0.1, impl="tpu")
    with pytest.raises(ValueError, match="unknown attention impl"):
        kernels.ragged_paged_attention(*args, md, sm_scale=0.1, impl="cuda")


@pytest.mark.parametrize("impl,platform", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_lowers_for_its_backend(impl, platform, dtype):
    """The non-interpret path (Mosaic strided loads and DMAs; Triton gathers and dots at
    power-of-two tiles) lowers at a production shape: 8 kv heads, GQA 4, head dim 128."""
    case = Case("mixed", 16, 4, 128, dtype, window=64, kv_heads=8)
    md, arrays, _ = make_batch(np.random.default_rng(11), case, num_requests=3, max_len=40)
    args = [jnp.asarray(x, dtype) for x in arrays]
    md = jax.tree_util.tree_map(jnp.asarray, md)
    f = jax.jit(lambda *a: KERNELS[impl].ragged_paged_attention(
        *a, md, sm_scale=0.1, sliding_window=case.window, soft_cap=30.0))
    text = f.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" if impl == "tpu" else "triton") in text


def test_benchmark_runs_tiny():
    from benchmarks import kernels as bench

    rows = bench.main(["--tiny"])
    assert len(rows) == 5 and all(r["ok"] for r in rows), rows  # bundled kernel: decode only
