"""Ragged paged attention as a Pallas GPU kernel: the same function as the jnp reference.

Lowering: Pallas' Triton lowering, one kernel for Ampere (sm_80/86/89) and Hopper (sm_90). It
is the only Pallas GPU lowering that runs on both under JAX 0.10 and 0.11: Mosaic GPU needs
Hopper (TMA, wgmma) and would leave A100/L40-class machines without a kernel, while the Triton
lowering is deprecated in 0.11 but still ships and works there. The kernel passes
`plgpu.CompilerParams` explicitly, so it keeps the Triton lowering whatever
`jax_pallas_use_mosaic_gpu` says, and uses only lowering-neutral primitives (ref indexing,
`lax.dot_general`, `lax.fori_loop`), which also keeps it testable in Pallas interpret mode on
CPU. A Hopper-only Mosaic GPU variant is future work, to be added beside it if the Triton path
falls short of bandwidth on H100/H200 or when Triton is removed.

Grid: (N query blocks, K kv heads, row chunks). One query block is up to `query_block` tokens
of one request (metadata.py); its Qb tokens times the G query heads that share kv head k are
stacked as the rows of one [Rb, E] tile, so each K/V tile is read once for all G heads (GQA)
and, for a decode token, the program streams its request's K/V for head k exactly once. Large
prefill blocks are split into row chunks of at most `max_rows` rows (grid axis 2).

Each program walks the visible key positions in tiles of C = pages_per_tile * S rows with an
online softmax in float32: first the positions already in the cache (pages gathered through the
page table, `k_cache[pages] -> [Pp, S, E]`), then this step's own tokens read from
k_new / v_new (the read/write split of ragged_paged_attention.py is kept: the kernel never
writes the cache, `write_kv` does, in its own program). Only tiles that hold a visible key are
visited: up to the block's last position (causal) and, with a sliding window, from its first
position minus the window. Page-table slots past a request's pages are redirected to page 0 and
every key outside the valid range is zeroed before use, so NaN or stale data in unused pages
never reaches the result.

Triton needs power-of-two tile shapes, so the head dim and page size must be powers of two
(`unsupported_reason` says so and the dispatch then falls back to the reference); rows are
padded to a power of two of at least 16 (the smallest tensor-core tile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxserve.kernels.metadata import AttentionMetadata
from jaxserve.kernels.tpu_ragged_paged_attention import (cdiv, div, gather_query_blocks,
                                                         scatter_query_blocks, visible_range)

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def unsupported_reason(q_shape, cache_shape, q_dtype, cache_dtype) -> str | None:
    """Why the kernel cannot run these shapes (None if it can): the dispatch falls back."""
    _, h, e = q_shape
    _, s, k, _ = cache_shape
    if not (_pow2(e) and e >= 16):
        return f"head dim {e} is not a power of two >= 16 (Triton tiles)"
    if not _pow2(s):
        return f"page size {s} is not a power of two (Triton tiles)"
    if h % k:
        return f"{h} query heads are not a multiple of {k} kv heads"
    for dt in (q_dtype, cache_dtype):
        if jnp.dtype(dt) not in map(jnp.dtype, DTYPES):
            return f"dtype {jnp.dtype(dt).name} (supported: float32, bfloat16, float16)"
    return None


def _kernel(block_request_ref, block_start_ref, block_len_ref, query_start_ref, kv_lens_ref,
            page_table_ref,  # metadata, whole arrays
            q_ref,  # [Rb, E] rows of this block for kv head k
            k_cache_ref, v_cache_ref,  # [P, S, E] kv head k of the caches
            k_new_ref, v_new_ref,  # [T, E] kv head k of this step's keys / values
            o_ref,  # [Rb, E]
            *, sm_scale, sliding_window, soft_cap, group, pages_per_tile, precision):
    rows_per_chunk, e = q_ref.shape
    _, page_size, _ = k_cache_ref.shape
    t_total = k_new_ref.shape[0]
    table_width = page_table_ref.shape[1]
    tile = pages_per_tile * page_size  # C key rows per step
    n, chunk = pl.program_id(0), pl.program_id(2)

    r = block_request_ref[n]
    q0 = query_start_ref[r]
    kv_len = kv_lens_ref[r]
    cached = kv_len - (query_start_ref[r + 1] - q0)  # positions read from the cache
    p0 = cached + block_start_ref[n] - q0  # position of the block's first token
    block_len = block_len_ref[n]
    lo, hi = visible_range(p0, block_len, chunk * rows_per_chunk, rows_per_chunk, group,
                           sliding_window)

    q = q_ref[...].astype(jnp.promote_types(q_ref.dtype, k_cache_ref.dtype))
    # Row i of the chunk is token (row0 + i) // G of the block; all masks below are written
    # without the division: key position p is visible to row i iff G * (p - p0) <= row0 + i.
    rows = chunk * rows_per_chunk + lax.broadcasted_iota(jnp.int32, (rows_per_chunk, tile), 0)
    cols = lax.broadcasted_iota(jnp.int32, (rows_per_chunk, tile), 1)

    def update(carry, k, v, first_pos, limit):
        """Online-softmax step over keys first_pos + [0, C); keys at or past `limit` are not
        this source's to give (unwritten cache slots, other requests' tokens)."""
        m_prev, l_prev, acc = carry
        pos = first_pos + lax.iota(jnp.int32, tile)  # [C]
        ok = pos < limit
        k = jnp.where(ok[:, None], k, 0).astype(q.dtype)  # NaN in unused slots must not leak
        v = jnp.where(ok[:, None], v, 0)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale  # [Rb, C]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        d = group * (first_pos - p0 + cols)
        mask = (d <= rows) & (rows < group * block_len) & ok[None, :]
        if sliding_window is not None:
            mask &= rows < d + group * sliding_window
        s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # fully masked rows so far
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)  # [Rb, E]
        return m_next, alpha * l_prev + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    def cache_tile(j, carry):
        slots = j * pages_per_tile + lax.iota(jnp.int32, pages_per_tile)
        pages = page_table_ref[r, jnp.minimum(slots, table_width - 1)]
        pages = jnp.where(slots * page_size < cached, pages, 0)  # unused slots: page 0
        k = k_cache_ref[pages].reshape(tile, e)
        v = v_cache_ref[pages].reshape(tile, e)
        return update(carry, k, v, j * tile, cached)

    def new_tile(j, carry):
        tok = jnp.clip(q0 + j * tile + lax.iota(jnp.int32, tile), 0, t_total - 1)
        return update(carry, k_new_ref[tok], v_new_ref[tok], cached + j * tile, kv_len)

    carry = (jnp.full((rows_per_chunk,), -jnp.inf, jnp.float32),
             jnp.zeros((rows_per_chunk,), jnp.float32), jnp.zeros((rows_per_chunk, e), jnp.float32))
    cache_hi = jnp.minimum(hi, cached)
    carry = lax.fori_loop(div(lo, tile), cdiv(cache_hi, tile), cache_tile, carry)
    new_lo = jnp.maximum(lo, cached) - cached
    carry = lax.fori_loop(div(new_lo, tile), cdiv(jnp.maximum(hi - cached, 0), tile), new_tile,
                          carry)
    _, l, acc = carry
    o_ref[...] = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)


def default_pages_per_tile(page_size: int, rows: int = 16) -> int:
    """Pages per K/V step: 64 key rows (128 for small row tiles, i.e. decode)."""
    target = 128 if rows <= 32 else 64
    return max(1, target // page_size)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "pages_per_tile", "max_rows", "num_warps",
    "num_stages", "interpret"))
def ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, pages_per_tile: int | None = None,
                           max_rows: int = 64, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool = False):
    """q [T, H, E]; caches [P, S, K, E] (read only); k_new/v_new [T, K, E] -> out [T, H, E]."""
    t, h, e = q.shape
    num_pages, page_size, kh, _ = k_cache.shape
    group = h // kh
    rows = _next_pow2(max(16, md.query_block * group))  # Rp: Triton tiles are powers of two
    rows_per_chunk = min(rows, max(16, _next_pow2(max_rows)))
    pages_per_tile = pages_per_tile or default_pages_per_tile(page_size, rows_per_chunk)
    if not _pow2(pages_per_tile) or pages_per_tile * page_size < 16:
        raise ValueError(f"pages_per_tile={pages_per_tile} must be a power of two giving >= 16 "
                         f"key rows at page size {page_size}")
    n = md.block_start.shape[0]
    q_blocks = gather_query_blocks(q, md, kh, rows)  # [N, K, Rp, E]
    k_new, v_new = k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype)  # as the reference
    # float32 stays float32 (no TF32), as in the reference.
    compute = jnp.promote_types(q.dtype, k_cache.dtype)
    precision = lax.Precision.HIGHEST if compute == jnp.float32 else None
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        group=group, pages_per_tile=pages_per_tile, precision=precision)
    whole = pl.no_block_spec
    rows_spec = pl.BlockSpec((None, None, rows_per_chunk, e), lambda i, k, c: (i, k, c, 0))
    cache_spec = pl.BlockSpec((num_pages, page_size, None, e), lambda i, k, c: (0, 0, k, 0))
    new_spec = pl.BlockSpec((t, None, e), lambda i, k, c: (0, k, 0))
    out = pl.pallas_call(
        kernel,
        grid=(n, kh, rows // rows_per_chunk),
        in_specs=[whole] * 6 + [rows_spec, cache_spec, cache_spec, new_spec, new_spec],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct((n, kh, rows, e), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(md.block_request, md.block_start, md.block_len, md.query_start, md.kv_lens, md.page_table,
      q_blocks, k_cache, v_cache, k_new, v_new)
    return scatter_query_blocks(out, md, t, group)
