"""Decode attention on CPU as a C++ kernel called through the XLA FFI (`jax.ffi`).

XLA:CPU gathers element by element, redoing the index arithmetic for every element, so the jnp
path's page gathers alone ran 3-12x above the copy-bandwidth floor (docs/performance.md).
`cpu_paged_decode.cc` reads each page in place, in the cache's own [P, S, K, E] layout, once,
with an online softmax per (request, KV head) spread over XLA's intra-op thread pool. It serves
decode-only steps (`md.decode_only`); prefill chunks and mixed steps keep the jnp path.

How it is built and loaded, and what happens without a compiler: cpu_library.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kernels import cpu_library
from jaxserve.kernels.metadata import AttentionMetadata
from jaxserve.kernels.storage import BITS

TARGET = "jaxserve_paged_decode"


def supports(k_cache) -> bool:
    """Whether the kernel reads this cache's dtype (float32, or bfloat16 kept as bits)."""
    return jnp.dtype(k_cache.dtype) in (jnp.dtype(jnp.float32), BITS)


def paged_decode(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *, sm_scale: float,
                 sliding_window: int | None = None, soft_cap: float | None = None):
    """Decode-only attention (`md.decode_only`), the same function as the jnp path's
    `_decode_attention`: q [T, H, E], caches [P, S, K, E] (read only), this step's k_new /
    v_new [T, K, E] -> out [T, H, E]."""
    cpu_library.require("CPU decode kernel")
    md = jax.tree_util.tree_map(jnp.asarray, md)
    t, h, e = q.shape
    valid = md.block_len > 0  # [N]: padding blocks attend to nothing and write nowhere
    tok = jnp.where(valid, md.block_start, 0)
    cached = jnp.where(valid, md.kv_lens[md.block_request] - 1, 0)
    f32 = lambda x: x[tok].astype(jnp.float32)
    n = tok.shape[0]
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, h, e), jnp.float32),
                           vmap_method="sequential")(
        f32(q), k_cache, v_cache, f32(k_new), f32(v_new),
        md.page_table[md.block_request].astype(jnp.int32), cached.astype(jnp.int32),
        md.positions[tok].astype(jnp.int32),
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        window=np.int64(sliding_window or 0))
    dest = jnp.where(valid, tok, t)
    return jnp.zeros((t, h, e), q.dtype).at[dest].set(out.astype(q.dtype), mode="drop")
