"""Ragged paged attention as a Pallas TPU (Mosaic) kernel: the same function as the jnp reference.

Both Pallas kernels see the batch in the reference's query blocks (metadata.py) and share the
helpers at the top of this module: `gather_query_blocks` lays q out as [N, K, Rp, E], the Qb
tokens times G query heads of one block and kv head as the Rp (padded) rows of one tile, so a
K/V tile is read once for all G heads that share it (GQA); `scatter_query_blocks` puts the
result back on the flat token axis (padding tokens get zeros, as in the reference).

TPU kernel. Grid: (N,), one program per query block, all K kv heads in it, so every K/V page
is fetched from HBM once per block as one contiguous [S, K, E] DMA. Scalar prefetch
(`pltpu.PrefetchScalarGridSpec`) puts the metadata and the flattened page table in SMEM. The
program walks the keys its block can see (causal, and from the first position minus the window
with a sliding window) in tiles of C = pages_per_tile * S positions: first the positions
already in the cache, `pages_per_tile` pages per tile copied HBM -> VMEM by
`pltpu.make_async_copy`, then this step's own tokens, copied the same way from k_new / v_new.
Tiles are double-buffered: tile i + 1's copies are started before tile i is waited on and
computed, one DMA semaphore per buffer. Per tile and kv head the head's [C, E] rows are taken
from the [C * K, E] buffer with a strided load (bf16: a uint32 strided load and a shift, since
two bf16 rows share a 32-bit sublane), then one online-softmax step in float32 with m, l and
the accumulator in VMEM scratch.

The cache is only read: the read/write split of ragged_paged_attention.py is kept, and the new
K/V reach the cache through `write_kv`, a program of its own with the cache donated. (Fusing
the write would need the cache aliased as an output and the model to take it back from here;
the split costs one extra scatter of T * K * E rows per layer, small next to the cache reads.)

Unused page-table slots of a tile are redirected to page 0 and every key outside the valid range
is zeroed or masked, so whatever unused pages hold (NaN in the tests) never reaches the result.
Supported: head dim a multiple of 128 or 64; kv heads that tile the (sublane, packing) layout as
in JAX's bundled TPU ragged paged attention (K divisible by the dtype's packing, K / packing in
{1, 2, 4} or a multiple of 8); float32 and bfloat16 caches. Otherwise the dispatch falls back.
Not run on a TPU yet: tested in TPU interpret mode and checked to lower to Mosaic on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxserve.kernels.metadata import AttentionMetadata

LANES = 128


# ---- Blocked query layout, shared with the GPU kernel -------------------------------------

def gather_query_blocks(q, md: AttentionMetadata, kv_heads: int, rows: int):
    """q [T, H, E] -> [N, K, rows, E]: row i * G + g of block n, kv head k is token
    block_start[n] + i, query head k * G + g. Rows past Qb * G are zero."""
    t, h, e = q.shape
    n, qb, g = md.block_start.shape[0], md.query_block, h // kv_heads
    tok = jnp.minimum(md.block_start[:, None] + jnp.arange(qb, dtype=jnp.int32), t - 1)  # [N, Qb]
    x = q[tok].reshape(n, qb, kv_heads, g, e).transpose(0, 2, 1, 3, 4)  # [N, K, Qb, G, E]
    x = x.reshape(n, kv_heads, qb * g, e)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows - qb * g), (0, 0)))


def scatter_query_blocks(out, md: AttentionMetadata, num_tokens: int, group: int):
    """[N, K, Rp, E] -> [T, H, E], the inverse of gather_query_blocks; tokens in no block
    (padding) get zeros."""
    n, kv_heads, _, e = out.shape
    qb = md.query_block
    x = out[:, :, :qb * group].reshape(n, kv_heads, qb, group, e).transpose(0, 2, 1, 3, 4)
    offs = jnp.arange(qb, dtype=jnp.int32)
    dest = jnp.where(offs[None] < md.block_len[:, None], md.block_start[:, None] + offs, num_tokens)
    flat = jnp.zeros((num_tokens, kv_heads * group, e), out.dtype)
    return flat.at[dest.reshape(-1)].set(x.reshape(n * qb, kv_heads * group, e), mode="drop")


def div(a, b):
    """a // b for a >= 0. lax.div truncates, so unlike jnp's floor division it needs no sign
    fix-up (whose Mosaic lowering asks for a TPU device)."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def cdiv(a, b):
    """ceil(a / b) for a >= 0."""
    return div(a + (b - 1), b)


def visible_range(p0, block_len, row0, rows: int, group: int, sliding_window: int | None):
    """Key positions [lo, hi) that rows row0 .. row0 + rows - 1 of a block starting at position
    p0 can see (empty: hi = 0)."""
    t_first = div(row0, group)
    t_end = jnp.minimum(block_len, cdiv(row0 + rows, group))
    nonempty = t_first < t_end
    hi = jnp.where(nonempty, p0 + t_end, 0)
    if sliding_window is None:
        return jnp.int32(0), hi
    return jnp.where(nonempty, jnp.maximum(p0 + t_first - sliding_window + 1, 0), 0), hi


# ---- TPU kernel ----------------------------------------------------------------------------

def _packing(dtype) -> int:
    return 4 // jnp.dtype(dtype).itemsize


def unsupported_reason(q_shape, cache_shape, q_dtype, cache_dtype) -> str | None:
    """Why the kernel cannot run these shapes (None if it can): the dispatch falls back."""
    _, h, e = q_shape
    _, _, k, _ = cache_shape
    if e % LANES and e != 64:
        return f"head dim {e} is neither 64 nor a multiple of {LANES} (TPU lanes)"
    if h % k:
        return f"{h} query heads are not a multiple of {k} kv heads"
    for dt in (q_dtype, cache_dtype):
        if jnp.dtype(dt) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            return f"dtype {jnp.dtype(dt).name} (supported: float32, bfloat16)"
    pack = _packing(cache_dtype)
    if k % pack or not (k // pack in (1, 2, 4) or (k // pack) % 8 == 0):
        return f"{k} kv heads of {jnp.dtype(cache_dtype).name} do not tile TPU sublanes"
    return None


def _head_rows(buf, slot, head: int, *, interpret: bool):
    """Rows of kv head `head` from buffer slot `slot` of a [2, ..., K, E] VMEM tile -> [C, E].

    On a TPU the slot is viewed as [C * K, E] (row c * K + k) and read with a sublane-strided
    load, the pattern of JAX's bundled TPU ragged paged attention; bf16 goes through uint32
    since two bf16 rows share a 32-bit sublane word (even row in the low half). TPU interpret
    mode cannot reshape or bitcast refs, so there the same rows are sliced out of the loaded
    value instead."""
    k, e = buf.shape[-2:]
    rows = math.prod(buf.shape[1:-2])
    if interpret:
        return buf[slot].reshape(rows, k, e)[:, head, :]
    flat = buf.at[slot].reshape(rows * k, e)
    if k == 1:
        return flat[...]
    if _packing(buf.dtype) == 1:
        return flat[pl.ds(head, rows, stride=k), :]
    words = flat.bitcast(jnp.uint32)[pl.ds(head // 2, rows, stride=k // 2), :]
    bits = words << 16 if head % 2 == 0 else words & jnp.uint32(0xFFFF0000)
    return pltpu.bitcast(bits, jnp.float32).astype(buf.dtype)


def _kernel(block_request_ref, block_start_ref, block_len_ref, query_start_ref, kv_lens_ref,
            page_table_ref,  # SMEM scalar prefetch; page table flattened [R * Pw]
            q_ref,  # [K, Rp, E] this block's rows per kv head
            k_cache_hbm, v_cache_hbm,  # [P, S, K, E] in HBM
            k_new_hbm, v_new_hbm,  # [T + C, K, E] in HBM (padded by one tile)
            o_ref,  # [K, Rp, E]
            k_buf, v_buf,  # [2, Pp, S, K, E] cache tiles, double-buffered
            kn_buf, vn_buf,  # [2, C, K, E] new-token tiles, double-buffered
            sems,  # DMA semaphores [2], one per buffer slot
            m_ref, l_ref,  # [K, Rp, 128] float32 running max / sum, replicated over lanes
            acc_ref,  # [K, Rp, E] float32
            *, sm_scale, sliding_window, soft_cap, group, table_width, interpret):
    num_heads, rows, e = q_ref.shape
    _, pages_per_tile, page_size, _, _ = k_buf.shape
    tile = pages_per_tile * page_size
    n = pl.program_id(0)
    r = block_request_ref[n]
    q0 = query_start_ref[r]
    kv_len = kv_lens_ref[r]
    cached = kv_len - (query_start_ref[r + 1] - q0)
    p0 = cached + block_start_ref[n] - q0
    block_len = block_len_ref[n]
    lo, hi = visible_range(p0, block_len, 0, rows, group, sliding_window)
    first_cache_tile = div(lo, tile)
    num_cache_tiles = jnp.maximum(cdiv(jnp.minimum(hi, cached), tile) - first_cache_tile, 0)
    first_new_tile = div(jnp.maximum(lo, cached) - cached, tile)
    num_new_tiles = jnp.maximum(cdiv(jnp.maximum(hi - cached, 0), tile) - first_new_tile, 0)
    num_tiles = num_cache_tiles + num_new_tiles

    def cache_copies(step, slot):  # tile `step`: its pages, each one [S, K, E] copy for K and V
        copies = []
        for i in range(pages_per_tile):
            idx = (first_cache_tile + step) * pages_per_tile + i
            page = page_table_ref[r * table_width + jnp.minimum(idx, table_width - 1)]
            page = jnp.where(idx * page_size < cached, page, 0)  # unused slots: page 0
            for hbm, buf in ((k_cache_hbm, k_buf), (v_cache_hbm, v_buf)):
                copies.append(pltpu.make_async_copy(hbm.at[page], buf.at[slot, i], sems.at[slot]))
        return copies

    def new_copies(step, slot):  # tile `step` of this step's tokens: C rows of k_new / v_new
        rows_now = pl.ds(q0 + (first_new_tile + step - num_cache_tiles) * tile, tile)
        return [pltpu.make_async_copy(hbm.at[rows_now], buf.at[slot], sems.at[slot])
                for hbm, buf in ((k_new_hbm, kn_buf), (v_new_hbm, vn_buf))]

    def for_copies(step, slot, action):
        @pl.when(step < num_cache_tiles)
        def _():
            for c in cache_copies(step, slot):
                getattr(c, action)()

        @pl.when(step >= num_cache_tiles)
        def _():
            for c in new_copies(step, slot):
                getattr(c, action)()

    row_ids = lax.broadcasted_iota(jnp.int32, (rows, tile), 0)
    col_ids = lax.broadcasted_iota(jnp.int32, (rows, tile), 1)
    key_ids = lax.broadcasted_iota(jnp.int32, (tile, e), 0)

    def attend(k_tile, v_tile, slot, first_pos, limit):
        """One online-softmax step over keys first_pos + [0, C) for every kv head; keys at or
        past `limit` are not this source's to give."""
        d = group * (first_pos - p0 + col_ids)  # row i sees key p iff G * (p - p0) <= i
        mask = (d <= row_ids) & (row_ids < group * block_len) & (first_pos + col_ids < limit)
        if sliding_window is not None:
            mask &= row_ids < d + group * sliding_window
        key_ok = first_pos + key_ids < limit
        for h in range(num_heads):
            q = q_ref[h]
            k = _head_rows(k_tile, slot, h, interpret=interpret)
            k = k.astype(jnp.promote_types(q.dtype, k.dtype))
            v = jnp.where(key_ok, _head_rows(v_tile, slot, h, interpret=interpret), 0)  # no NaN
            s = lax.dot_general(q.astype(k.dtype), k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * sm_scale  # [Rp, C]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, -jnp.inf)
            m_prev = m_ref[h]  # [Rp, 128]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows with nothing visible yet
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [Rp, E]
            m_ref[h] = m_next
            l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
            acc_ref[h] = alpha[:, :1] * acc_ref[h] + pv

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(num_tiles > 0)
    def _():
        for_copies(0, 0, "start")

    def body(step, carry):
        slot = lax.rem(step, 2)

        @pl.when(step + 1 < num_tiles)
        def _():
            for_copies(step + 1, 1 - slot, "start")  # prefetch the next tile while computing

        for_copies(step, slot, "wait")

        @pl.when(step < num_cache_tiles)
        def _():
            attend(k_buf, v_buf, slot, (first_cache_tile + step) * tile, cached)

        @pl.when(step >= num_cache_tiles)
        def _():
            first = cached + (first_new_tile + step - num_cache_tiles) * tile
            attend(kn_buf, vn_buf, slot, first, kv_len)

        return carry

    lax.fori_loop(0, num_tiles, body, 0)
    for h in range(num_heads):
        l = l_ref[h][:, :1]
        o_ref[h] = (acc_ref[h] / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)


def default_pages_per_tile(page_size: int) -> int:
    """Pages per DMA tile: at least 256 key positions (lane-dense [Rp, C] scores)."""
    return max(1, -(-256 // page_size))


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "pages_per_tile", "interpret"))
def ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, pages_per_tile: int | None = None,
                           interpret: bool | pltpu.InterpretParams = False):
    """q [T, H, E]; caches [P, S, K, E] (read only); k_new/v_new [T, K, E] -> out [T, H, E].
    `interpret=True` (or an InterpretParams, e.g. with detect_races) runs it in TPU interpret
    mode on CPU."""
    if interpret is True:
        interpret = pltpu.InterpretParams()
    t, h, e = q.shape
    _, page_size, kh, _ = k_cache.shape
    group = h // kh
    pages_per_tile = pages_per_tile or default_pages_per_tile(page_size)
    tile = pages_per_tile * page_size
    rows = -(-md.query_block * group // 16) * 16  # Rp: whole (16, 128) bf16 tiles
    q_blocks = gather_query_blocks(q, md, kh, rows)  # [N, K, Rp, E]
    # In the cache's dtype, as the reference; one tile of padding so that a new-token tile
    # never reads past the end.
    k_new = jnp.pad(k_new.astype(k_cache.dtype), ((0, tile), (0, 0), (0, 0)))
    v_new = jnp.pad(v_new.astype(v_cache.dtype), ((0, tile), (0, 0), (0, 0)))
    table_width = md.page_table.shape[1]
    n = md.block_start.shape[0]
    rows_spec = pl.BlockSpec((None, kh, rows, e), lambda i, *_: (i, 0, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, group=group, table_width=table_width,
                               interpret=bool(interpret))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(n,),
            in_specs=[rows_spec, hbm, hbm, hbm, hbm],
            out_specs=rows_spec,
            scratch_shapes=[
                pltpu.VMEM((2, pages_per_tile, page_size, kh, e), k_cache.dtype),
                pltpu.VMEM((2, pages_per_tile, page_size, kh, e), v_cache.dtype),
                pltpu.VMEM((2, tile, kh, e), k_new.dtype),
                pltpu.VMEM((2, tile, kh, e), v_new.dtype),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((kh, rows, LANES), jnp.float32),
                pltpu.VMEM((kh, rows, LANES), jnp.float32),
                pltpu.VMEM((kh, rows, e), jnp.float32),
            ]),
        out_shape=jax.ShapeDtypeStruct((n, kh, rows, e), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(md.block_request, md.block_start, md.block_len, md.query_start, md.kv_lens,
      md.page_table.reshape(-1), q_blocks, k_cache, v_cache, k_new, v_new)
    return scatter_query_blocks(out, md, t, group)
