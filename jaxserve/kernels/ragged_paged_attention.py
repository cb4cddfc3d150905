"""Ragged paged attention, pure jnp: the CPU path and the reference for the Pallas kernels.

One call serves a flat batch of tokens from many requests (decode tokens and prefill chunks
mixed): each token attends causally to its own request's earlier tokens, read through the page
table from the cache, and to this step's tokens of its request, read from k_new / v_new.

Reading and writing are two functions, and the runner calls them as two compiled programs:
`ragged_paged_attention` only reads the cache, `write_kv` only writes it (cache donated). On
XLA:CPU any program that both gathers from a donated buffer and scatters into it gets copies
of the whole buffer inserted (measured: a 1-token step over 4000 pages of 16 slots took
120-230 ms whatever the order or barriers, against 0.02 ms to write and 0.4 ms to read as
separate programs), so fusing the two would make every step O(cache size).

How it stays fast on CPU: queries are grouped into blocks of one request (see metadata.py),
so each block gathers its request's pages once, `[N, P*S, K, E]`, and does two batched
matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.kernels.metadata import AttentionMetadata


def write_kv(kv, new_kv, slot_mapping):
    """Scatter each layer's new K/V rows [T, K, E] into its caches [P, S, K, E] at the flat
    slots [T]. Run it as its own program with `kv` donated: it is then done in place."""
    out = []
    for (k_cache, v_cache), (k_new, v_new) in zip(kv, new_kv):
        p, s, k, e = k_cache.shape
        page, off = slot_mapping // s, slot_mapping % s
        out.append((k_cache.at[page, off].set(k_new.astype(k_cache.dtype)),
                    v_cache.at[page, off].set(v_new.astype(v_cache.dtype))))
    return tuple(out)


def ref_ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None):
    """q [T, H, E]; caches [P, S, K, E] (read only); k_new/v_new [T, K, E] -> out [T, H, E]."""
    md = jax.tree_util.tree_map(jnp.asarray, md)  # host (numpy) metadata works too
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

    # Each block sees its request's C = P * S cache positions. Positions cached before this step
    # are read from the *incoming* cache; this step's own tokens straight from k_new / v_new.
    req = md.block_request  # [N]
    pages = md.page_table[req]  # [N, P]
    c = pages.shape[1] * s
    kv_len = md.kv_lens[req]  # [N]
    q_len = md.query_start[req + 1] - md.query_start[req]  # [N]
    cached = kv_len - q_len  # [N] positions already in the cache
    kv_pos = jnp.arange(c, dtype=jnp.int32)
    kv_valid = kv_pos[None, :] < kv_len[:, None]  # [N, C]
    is_new = kv_pos[None, :] >= cached[:, None]  # [N, C]
    new_tok = jnp.clip(md.query_start[req][:, None] + kv_pos[None, :] - cached[:, None], 0, t - 1)
    use_cache = (kv_valid & ~is_new)[:, :, None, None]
    use_new = (kv_valid & is_new)[:, :, None, None]

    def keys_or_values(cache, new):  # [N, C, K, E]; zero where invalid (unwritten slots may be NaN)
        old = cache[pages].reshape(n, c, kh, e)
        return jnp.where(use_cache, old, jnp.where(use_new, new[new_tok].astype(old.dtype), 0))

    ks, vs = keys_or_values(k_cache, k_new), keys_or_values(v_cache, v_new)

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
    return flat


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
