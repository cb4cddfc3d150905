"""Ragged paged attention on CPU as a C++ kernel called through the XLA FFI (`jax.ffi`).

XLA:CPU gathers element by element, redoing the index arithmetic for every element, so the jnp
path's page gathers alone ran 3-12x above the copy-bandwidth floor (docs/performance.md), and
its prefill ~48x above its FLOP floor. `cpu_paged_attention.cc` reads each page in place, in the
cache's own [P, S, K, E] layout, with an online softmax per (query block, KV head) spread over
XLA's intra-op thread pool. It serves every step: decode-only, prompt chunks, and both mixed.
Each token's arithmetic is independent of its batch and of how its prompt was chunked.

How it is built and loaded, and what happens without a compiler: cpu_library.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kernels import cpu_library
from jaxserve.kernels.metadata import AttentionMetadata
from jaxserve.kernels.storage import BITS

TARGET = "jaxserve_paged_attention"


def supports(k_cache) -> bool:
    """Whether the kernel reads this cache's dtype (float32, or bfloat16 kept as bits)."""
    return jnp.dtype(k_cache.dtype) in (jnp.dtype(jnp.float32), BITS)


def paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *, sm_scale: float,
                    sliding_window: int | None = None, soft_cap: float | None = None):
    """The same function as the jnp path (`ref_ragged_paged_attention`): q [T, H, E], caches
    [P, S, K, E] (read only), this step's k_new / v_new [T, K, E] -> out [T, H, E]."""
    cpu_library.require("CPU attention kernel")
    md = jax.tree_util.tree_map(jnp.asarray, md)
    f32 = lambda x: x.astype(jnp.float32)
    s32 = lambda x: x.astype(jnp.int32)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           vmap_method="sequential")(
        f32(q), k_cache, v_cache, f32(k_new), f32(v_new), s32(md.page_table),
        s32(md.block_request), s32(md.block_start), s32(md.block_len), s32(md.kv_lens),
        s32(md.query_start),
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        window=np.int64(sliding_window or 0))
    return out.astype(q.dtype)
