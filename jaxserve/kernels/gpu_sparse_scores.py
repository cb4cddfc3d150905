"""The Quest page bound of sparse decode attention as a Pallas GPU kernel (Triton lowering, as
gpu_ragged_paged_attention.py and for the same reasons), beside its reference
`sparse.ref_page_votes`: same bounds, same soft vote.

Grid: (R requests, K kv heads, W / Cp chunks of the page table). A program gathers the summaries
of Cp pages of its request for kv head k through the page table (`summaries[pages] -> [Cp, 2,
E]`) and computes the bound of the G query heads that share head k as two matmuls,
`max(q, 0) . kmax + min(q, 0) . kmin` (= sum_e max(q_e kmin_e, q_e kmax_e)), rows padded to 16
for the tensor-core tile. Chunks past the request's pages are skipped and written -inf;
page-table slots past them read page 0. The softmax over pages and the vote across heads are a
few [R, H, W] operations left to XLA (`sparse._vote`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxserve.kernels.gpu_ragged_paged_attention import _next_pow2, _pow2


def unsupported_reason(qs_shape, summary_shape, table_width: int) -> str | None:
    _, _, _, e = qs_shape
    if not (_pow2(e) and e >= 16):
        return f"head dim {e} is not a power of two >= 16 (Triton tiles)"
    return None


def _kernel(table_ref, num_pages_ref, q_pos_ref, q_neg_ref, s_ref, o_ref, *, chunk_pages):
    r, c = pl.program_id(0), pl.program_id(2)
    width = table_ref.shape[1]
    slots = c * chunk_pages + lax.iota(jnp.int32, chunk_pages)
    n = num_pages_ref[r]

    @pl.when(c * chunk_pages < n)
    def _():
        pages = table_ref[r, jnp.minimum(slots, width - 1)]
        pages = jnp.where(slots < n, pages, 0)
        s = s_ref[pages]  # [Cp, 2, E]
        dims = (((1,), (1,)), ((), ()))
        hi = lax.dot_general(q_pos_ref[...], s[:, 1], dims, precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
        lo = lax.dot_general(q_neg_ref[...], s[:, 0], dims, precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
        o_ref[...] = hi + lo  # [Gp, Cp]

    @pl.when(c * chunk_pages >= n)
    def _():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk_pages", "interpret"))
def page_bounds(qs, summaries, table, num_pages, *, chunk_pages: int = 32,
                interpret: bool = False):
    """qs [R, K, G, E]; summaries [P, 2, K, E] float32; table [R, W]; num_pages [R] ->
    bounds [R, K, G, W] float32 (-inf or garbage past a request's pages: the vote masks them)."""
    r, kh, g, e = qs.shape
    num_pages_total = summaries.shape[0]
    w = table.shape[1]
    chunk_pages = min(chunk_pages, _next_pow2(w))
    w_pad = -(-w // chunk_pages) * chunk_pages
    gp = _next_pow2(max(16, g))
    qf = jnp.pad(qs.astype(jnp.float32), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    whole = pl.no_block_spec
    q_spec = pl.BlockSpec((None, None, gp, e), lambda i, k, c: (i, k, 0, 0))
    s_spec = pl.BlockSpec((num_pages_total, 2, None, e), lambda i, k, c: (0, 0, k, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, chunk_pages=chunk_pages),
        grid=(r, kh, w_pad // chunk_pages),
        in_specs=[whole, whole, q_spec, q_spec, s_spec],
        out_specs=pl.BlockSpec((None, None, gp, chunk_pages), lambda i, k, c: (i, k, 0, c)),
        out_shape=jax.ShapeDtypeStruct((r, kh, gp, w_pad), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="sparse_page_bounds_gpu",
    )(table, num_pages, jnp.maximum(qf, 0), jnp.minimum(qf, 0), summaries)
    return out[:, :, :g, :w]


def page_votes(qs, summaries, table, num_pages, *, sm_scale: float, axis_name=None,
               interpret: bool = False):
    """The kernel's bounds through the reference's vote: a drop-in for `sparse.ref_page_votes`."""
    from jaxserve.kernels.sparse import _vote

    bounds = page_bounds(qs, summaries, table, num_pages, interpret=interpret)
    return _vote(bounds, num_pages, sm_scale=sm_scale, axis_name=axis_name)
