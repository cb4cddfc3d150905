"""Ragged paged attention, pure jnp: the CPU path and the reference for the Pallas kernels.

One call serves a flat batch of tokens from many requests (decode tokens and prefill chunks
mixed): it writes the new K/V of every token into its cache slot, then lets each token attend
causally to its own request's cache, read through the page table.

How it stays fast on CPU: queries are grouped into blocks of one request (see metadata.py),
so each block gathers its request's pages once, `[N, P*S, K, E]`, and does two batched
matmuls. The cache arrays are only written by one scatter of T rows; with the cache donated
XLA updates them in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.kernels.metadata import AttentionMetadata


def write_kv(k_cache, v_cache, k_new, v_new, slot_mapping):
    """Scatter new K/V rows [T, K, E] into caches [P, S, K, E] at flat slots [T]."""
    p, s, k, e = k_cache.shape
    k_cache = k_cache.reshape(p * s, k, e).at[slot_mapping].set(k_new.astype(k_cache.dtype))
    v_cache = v_cache.reshape(p * s, k, e).at[slot_mapping].set(v_new.astype(v_cache.dtype))
    return k_cache.reshape(p, s, k, e), v_cache.reshape(p, s, k, e)


def ref_ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None):
    """q [T, H, E]; caches [P, S, K, E]; k_new/v_new [T, K, E] -> (out [T, H, E], k_cache, v_cache)."""
    md = jax.tree_util.tree_map(jnp.asarray, md)  # host (numpy) metadata works too
    k_cache, v_cache = write_kv(k_cache, v_cache, k_new, v_new, md.slot_mapping)
    t, h, e = q.shape
    _, s, kh, _ = k_cache.shape
    g, qb = h // kh, md.query_block
    n = md.block_start.shape[0]

    # Query blocks: [N, Qb] token indices; rows past block_len are padding.
    offs = jnp.arange(qb, dtype=jnp.int32)
    q_valid = offs[None, :] < md.block_len[:, None]  # [N, Qb]
    tok = jnp.where(q_valid, md.block_start[:, None] + offs[None, :], 0)  # [N, Qb]
    qs = q[tok].reshape(n, qb, kh, g, e)  # [N, Qb, K, G, E]
    q_pos = md.positions[tok]  # [N, Qb]

    # Each block's request's pages: [N, C, K, E] with C = P * S cache positions.
    pages = md.page_table[md.block_request]  # [N, P]
    c = pages.shape[1] * s
    kv_len = md.kv_lens[md.block_request]  # [N]
    kv_pos = jnp.arange(c, dtype=jnp.int32)
    kv_valid = kv_pos[None, :] < kv_len[:, None]  # [N, C]
    ks = k_cache[pages].reshape(n, c, kh, e)
    # Unwritten slots may hold anything (NaN included): zero V there, since 0 * NaN is NaN.
    vs = jnp.where(kv_valid[:, :, None, None], v_cache[pages].reshape(n, c, kh, e), 0)

    scores = jnp.einsum("NQKGE,NCKE->NKGQC", qs, ks,
                        preferred_element_type=jnp.float32) * sm_scale  # [N, K, G, Qb, C]
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    mask = kv_valid[:, None, :] & (kv_pos[None, None, :] <= q_pos[:, :, None])  # [N, Qb, C]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    mx = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(mx), mx, 0))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0, 1, denom)  # padding rows: all zero
    out = jnp.einsum("NKGQC,NCKE->NQKGE", probs.astype(vs.dtype), vs,
                     preferred_element_type=jnp.float32)  # [N, Qb, K, G, E]

    # Back to the flat token axis; padding rows of blocks scatter to a dropped index.
    dest = jnp.where(q_valid, tok, t).reshape(-1)
    flat = jnp.zeros((t, h, e), q.dtype).at[dest].set(
        out.reshape(n * qb, h, e).astype(q.dtype), mode="drop")
    return flat, k_cache, v_cache


def ref_dense_attention(q, k, v, q_pos, kv_len, *, sm_scale, sliding_window=None, soft_cap=None):
    """Naive attention of one request: q [Q, H, E] at positions q_pos over k/v [C, K, E] (the
    first kv_len valid). The test oracle for the paged version."""
    h, kh = q.shape[1], k.shape[1]
    k = jnp.repeat(k[:kv_len], h // kh, axis=1)
    v = jnp.repeat(v[:kv_len], h // kh, axis=1)
    s = jnp.einsum("QHE,CHE->HQC", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    pos = jnp.arange(kv_len)
    mask = pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] > q_pos[:, None] - sliding_window
    s = jnp.where(mask[None], s, -jnp.inf)
    return jnp.einsum("HQC,CHE->QHE", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
