"""The Quest page bound of sparse decode attention as a Pallas TPU (Mosaic) kernel, beside its
reference `sparse.ref_page_bounds` and the GPU kernel (gpu_sparse_scores.py): same bounds, and
the same soft vote after it (`sparse._vote`, a few [R, H, W] operations left to XLA).

Grid: (R requests, W / Cp chunks of the page table). Scalar prefetch puts the flattened page
table and each request's page count in SMEM. A program copies the summaries of its Cp pages
HBM -> VMEM, one [2, K, E] DMA per page (pages past the request's count are not copied; a chunk
wholly past it copies nothing and writes -inf), then per kv head k takes the head's min and max
rows out of the [Cp * 2 * K, E] buffer with sublane-strided loads (row (i * 2 + j) * K + k, the
pattern of tpu_ragged_paged_attention.py) and computes the bound of the G query heads that
share head k as two matmuls, `max(q, 0) . kmax + min(q, 0) . kmin` (= sum_e max(q_e kmin_e,
q_e kmax_e)), G padded to the 8 float32 sublanes. Slots past the request's pages get -inf.

Supported as the attention kernel: head dim 64 or a multiple of 128, K in {1, 2, 4} or a
multiple of 8 (sublane tiling of the strided load). Not run on a TPU yet: tested in TPU
interpret mode against the reference and checked to lower to Mosaic on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxserve.kernels.tpu_ragged_paged_attention import LANES

CHUNK_PAGES = LANES  # pages per program: lane-dense [G, Cp] bounds


def unsupported_reason(qs_shape, summary_shape, table_width: int) -> str | None:
    _, k, _, e = qs_shape
    if e % LANES and e != 64:
        return f"head dim {e} is neither 64 nor a multiple of {LANES} (TPU lanes)"
    if not (k in (1, 2, 4) or k % 8 == 0):
        return f"{k} kv heads do not tile TPU sublanes"
    return None


def _head_rows(buf, which: int, head: int, *, interpret: bool):
    """[Cp, E]: the min (which=0) or max (1) rows of kv head `head` of a [Cp, 2, K, E] buffer."""
    cp, _, k, e = buf.shape
    if interpret:  # TPU interpret mode cannot reshape refs: slice the loaded value instead
        return buf[...][:, which, head, :]
    return buf.reshape(cp * 2 * k, e)[pl.ds(which * k + head, cp, stride=2 * k), :]


def _kernel(table_ref, num_pages_ref,  # SMEM scalar prefetch: table [R * W], pages [R]
            q_pos_ref, q_neg_ref,  # [K, Gp, E] this request's query, split by sign
            summ_hbm,  # [P, 2, K, E] float32 in HBM
            o_ref,  # [K, Gp, Cp]
            buf, sem,  # [Cp, 2, K, E] VMEM; DMA semaphore [1]
            *, table_width: int, interpret: bool):
    num_heads, gp, _ = q_pos_ref.shape
    cp = buf.shape[0]
    r, c = pl.program_id(0), pl.program_id(1)
    n = num_pages_ref[r]
    first = c * cp
    count = jnp.clip(n - first, 0, cp)  # this chunk's pages in use

    def copy(i):
        page = table_ref[r * table_width + jnp.minimum(first + i, table_width - 1)]
        return pltpu.make_async_copy(summ_hbm.at[page], buf.at[i], sem.at[0])

    def start(i, carry):
        copy(i).start()
        return carry

    def wait(i, carry):
        copy(i).wait()
        return carry

    lax.fori_loop(0, count, start, 0)
    lax.fori_loop(0, count, wait, 0)
    in_use = first + lax.broadcasted_iota(jnp.int32, (gp, cp), 1) < n

    @pl.when(count > 0)
    def _():
        dims = (((1,), (1,)), ((), ()))
        for h in range(num_heads):
            lo = _head_rows(buf, 0, h, interpret=interpret)
            hi = _head_rows(buf, 1, h, interpret=interpret)
            # buffer rows past `count` hold whatever an earlier program left: their columns
            # only, masked below
            b = (lax.dot_general(q_pos_ref[h], hi, dims, precision=lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32)
                 + lax.dot_general(q_neg_ref[h], lo, dims, precision=lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32))  # [Gp, Cp]
            o_ref[h] = jnp.where(in_use, b, -jnp.inf)

    @pl.when(count == 0)
    def _():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk_pages", "interpret"))
def page_bounds(qs, summaries, table, num_pages, *, chunk_pages: int = CHUNK_PAGES,
                interpret: bool | pltpu.InterpretParams = False):
    """qs [R, K, G, E]; summaries [P, 2, K, E] float32; table [R, W]; num_pages [R] ->
    bounds [R, K, G, W] float32, -inf past each request's pages."""
    if interpret is True:
        interpret = pltpu.InterpretParams()
    r, kh, g, e = qs.shape
    w = table.shape[1]
    if w <= chunk_pages:  # one chunk: the block is the whole (padded) width
        chunk_pages = -(-w // 8) * 8
    w_pad = -(-w // chunk_pages) * chunk_pages
    gp = -(-g // 8) * 8
    qf = jnp.pad(qs.astype(jnp.float32), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    q_spec = pl.BlockSpec((None, kh, gp, e), lambda i, c, *_: (i, 0, 0, 0))
    kernel = functools.partial(_kernel, table_width=w, interpret=bool(interpret))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(r, w_pad // chunk_pages),
            in_specs=[q_spec, q_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((None, kh, gp, chunk_pages), lambda i, c, *_: (i, 0, 0, c)),
            scratch_shapes=[pltpu.VMEM((chunk_pages, 2, kh, e), jnp.float32),
                            pltpu.SemaphoreType.DMA((1,))]),
        out_shape=jax.ShapeDtypeStruct((r, kh, gp, w_pad), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="sparse_page_bounds_tpu",
    )(table.reshape(-1).astype(jnp.int32), num_pages.astype(jnp.int32), jnp.maximum(qf, 0),
      jnp.minimum(qf, 0), summaries.astype(jnp.float32))
    return out[:, :, :g, :w]


def page_votes(qs, summaries, table, num_pages, *, sm_scale: float, axis_name=None,
               interpret: bool = False):
    """The kernel's bounds through the reference's vote: a drop-in for `sparse.ref_page_votes`."""
    from jaxserve.kernels.sparse import _vote

    bounds = page_bounds(qs, summaries, table, num_pages, interpret=interpret)
    return _vote(bounds, num_pages, sm_scale=sm_scale, axis_name=axis_name)
