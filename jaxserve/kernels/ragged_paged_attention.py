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
so each block gathers its request's pages a chunk at a time, `[N, C, K, E]`, and does two
batched matmuls per chunk; the loop runs only over the chunks the longest request needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.kernels.metadata import AttentionMetadata
from jaxserve.kernels.storage import from_storage, to_storage


CHUNK_TOKENS = 256  # cache positions per step of the online-softmax loop
# Decode-only steps: cache positions of all requests together per step of the loop, so each
# request's chunk is DECODE_STEP_TOKENS / N positions (at most CHUNK_TOKENS, at least a page).
# Each step gathers its K and V pages into a [N, K, C, E] copy that both products then read;
# smaller copies stay in cache between the gather and the products. Measured on SmolLM2-135M's
# shape, one layer, caches evicted before each call (benchmarks/decode_attention.py and paired
# runs alternating the variants in one process on a shared 2-core machine, median of 21-25
# pairs): against chunks of 256, float32 batch 32 with 1024 cached tokens 1.30-1.41x faster,
# batch 64 with 256 1.49-1.76x, bfloat16 batch 32 with 256 1.15x (one full-table run saw no
# gain: see docs/performance.md). Batches up to 8 keep chunks of 256.
DECODE_STEP_TOKENS = 2048
BLOCKS_PER_GROUP = 8  # query blocks attended together (a prefill step loops over groups)


def write_kv(kv, new_kv, slot_mapping):
    """Scatter each layer's new K/V rows [T, K, E] into its caches [P, S, K, E] at the flat
    slots [T]. Run it as its own program with `kv` donated: it is then done in place. A cache
    stored as bits (bfloat16 on CPU, see storage.py) gets the rows' bits."""
    out = []
    for (k_cache, v_cache), (k_new, v_new) in zip(kv, new_kv):
        p, s, k, e = k_cache.shape
        page, off = slot_mapping // s, slot_mapping % s
        out.append((k_cache.at[page, off].set(to_storage(k_new, k_cache.dtype)),
                    v_cache.at[page, off].set(to_storage(v_new, v_cache.dtype))))
    return tuple(out)


def ref_ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None):
    """q [T, H, E]; caches [P, S, K, E] (read only; bfloat16 may be stored as its uint16 bits,
    see storage.py); k_new/v_new [T, K, E] -> out [T, H, E]."""
    md = jax.tree_util.tree_map(jnp.asarray, md)  # host (numpy) metadata works too
    if md.decode_only:
        return _decode_attention(q, k_cache, v_cache, k_new, v_new, md, sm_scale=sm_scale,
                                 sliding_window=sliding_window, soft_cap=soft_cap)
    t, h, e = q.shape
    _, s, kh, _ = k_cache.shape
    g, qb = h // kh, md.query_block
    n = md.block_start.shape[0]
    nb = min(BLOCKS_PER_GROUP, n)
    num_groups = -(-n // nb)
    pad = lambda x: jnp.pad(x, (0, num_groups * nb - n))  # padding blocks: length 0
    block_request, block_start, block_len = pad(md.block_request), pad(md.block_start), \
        pad(md.block_len)
    cp = max(1, min(CHUNK_TOKENS // s, md.page_table.shape[1]))  # pages per chunk
    num_chunks = -(-md.page_table.shape[1] // cp)
    table = jnp.pad(md.page_table, ((0, 0), (0, num_chunks * cp - md.page_table.shape[1])))
    offs = jnp.arange(qb, dtype=jnp.int32)

    # Query blocks run in groups of `nb`, one group after another, and each group's loop over
    # cache chunks stops at its own last query position (causal): the blocks of a long prompt's
    # early tokens do not walk the whole context, and the padding blocks of the bucket (most of
    # them when one long prompt fills the step) are never visited. Measured on SmolLM2-135M's
    # shape, one layer, a 512-token chunk ending at 8192 tokens (bucket of 160 blocks, 32 used):
    # 2190 ms as one group over every block, 330-500 ms in groups of 8 (shared machine; groups
    # of 4-16 and 512-token chunks within that noise).
    def group(j, out):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, j * nb, nb)
        req, start, blen = sl(block_request), sl(block_start), sl(block_len)  # [nb]
        q_valid = offs[None, :] < blen[:, None]  # [nb, Qb]
        tok = jnp.where(q_valid, start[:, None] + offs[None, :], 0)  # [nb, Qb]
        qs = q[tok].reshape(nb, qb, kh, g, e)  # [nb, Qb, K, G, E]
        q_pos = jnp.where(q_valid, md.positions[tok], -1)  # [nb, Qb]
        # Positions cached before this step come from the *incoming* cache; this step's own
        # tokens straight from k_new / v_new.
        kv_len = jnp.where(blen > 0, md.kv_lens[req], 0)  # [nb]
        q_start = md.query_start[req]
        cached = kv_len - (md.query_start[req + 1] - q_start)  # [nb] positions already cached
        rows = table[req]  # [nb, P']

        def chunk(i, carry):
            m, l, acc = carry  # [nb, K, G, Qb] running max and sum; [nb, K, G, Qb, E] values
            pages = jax.lax.dynamic_slice_in_dim(rows, i * cp, cp, axis=1)  # [nb, cp]
            kv_pos = i * cp * s + jnp.arange(cp * s, dtype=jnp.int32)  # [C]
            kv_valid = kv_pos[None, :] < kv_len[:, None]  # [nb, C]
            is_new = kv_pos[None, :] >= cached[:, None]
            new_tok = jnp.clip(q_start[:, None] + kv_pos[None, :] - cached[:, None], 0, t - 1)
            use_cache = (kv_valid & ~is_new)[:, :, None, None]
            use_new = (kv_valid & is_new)[:, :, None, None]

            def keys_or_values(cache, new):  # [nb, C, K, E]; zero where invalid (may be NaN)
                old = from_storage(cache[pages]).reshape(nb, cp * s, kh, e)
                return jnp.where(use_cache, old, jnp.where(use_new, new[new_tok].astype(old.dtype), 0))

            ks, vs = keys_or_values(k_cache, k_new), keys_or_values(v_cache, v_new)
            scores = jnp.einsum("NQKGE,NCKE->NKGQC", qs, ks,
                                preferred_element_type=jnp.float32) * sm_scale  # [nb, K, G, Qb, C]
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            mask = kv_valid[:, None, :] & (kv_pos[None, None, :] <= q_pos[:, :, None])  # [nb, Qb, C]
            if sliding_window is not None:
                mask &= kv_pos[None, None, :] > q_pos[:, :, None] - sliding_window
            scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0)  # rows with nothing to attend to yet
            probs = jnp.exp(scores - m_safe[..., None])
            scale = jnp.exp(m - m_safe)
            l = l * scale + jnp.sum(probs, axis=-1)
            acc = acc * scale[..., None] + jnp.einsum(
                "NKGQC,NCKE->NKGQE", probs.astype(vs.dtype), vs, preferred_element_type=jnp.float32)
            return m_new, l, acc

        shape = (nb, kh, g, qb)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (e,), jnp.float32))
        first = 0
        if sliding_window is not None:  # chunks wholly before every query's window are skipped
            lowest = jnp.min(jnp.where(q_valid, q_pos, jnp.iinfo(jnp.int32).max))
            first = jnp.clip((lowest - sliding_window + 1) // (cp * s), 0, num_chunks)
        # chunks up to the last query position, or the (compacted, sparse.py) context's end
        last = jnp.max(jnp.minimum(jnp.max(q_pos, axis=1) + 1, kv_len))
        needed = (last + cp * s - 1) // (cp * s)
        _, l, acc = jax.lax.fori_loop(first, jnp.minimum(needed, num_chunks), chunk, init)
        res = acc / jnp.where(l == 0, 1, l)[..., None]  # padding rows: all zero
        res = res.transpose(0, 3, 1, 2, 4).reshape(nb * qb, h, e)  # [nb * Qb, H, E]
        # back to the flat token axis; padding rows of blocks scatter to a dropped index
        dest = jnp.where(q_valid, tok, t).reshape(-1)
        return out.at[dest].set(res.astype(q.dtype), mode="drop")

    used = (jnp.max(jnp.where(block_len > 0, jnp.arange(num_groups * nb), -1)) + nb) // nb
    return jax.lax.fori_loop(0, used, group, jnp.zeros((t, h, e), q.dtype))


def _decode_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *, sm_scale,
                      sliding_window, soft_cap):
    """Every request has one new token, in a query block of its own (`md.decode_only`). The
    online softmax starts from the token attending to itself (k_new / v_new of its own row), then
    runs over the chunks of cached positions: no per-position gather of this step's K/V and no
    merge of it into each chunk, which the general path needs for prefill chunks."""
    t, h, e = q.shape
    _, s, kh, _ = k_cache.shape
    g, n = h // kh, md.block_start.shape[0]
    valid_block = md.block_len > 0  # [N]
    tok = jnp.where(valid_block, md.block_start, 0)  # [N]: the one token of each block
    qs = q[tok].reshape(n, kh, g, e)  # [N, K, G, E]
    q_pos = md.positions[tok]  # [N]
    cached = md.kv_lens[md.block_request] - 1  # [N] positions before the token
    cp = max(1, min(CHUNK_TOKENS // s, md.page_table.shape[1]))  # pages per chunk
    num_chunks = -(-md.page_table.shape[1] // cp)
    table = jnp.pad(md.page_table, ((0, 0), (0, num_chunks * cp - md.page_table.shape[1])))
    table = table[md.block_request]  # [N, P']

    def scale(scores):
        scores = scores * sm_scale
        return soft_cap * jnp.tanh(scores / soft_cap) if soft_cap is not None else scores

    # The token itself: score [N, K, G], value [N, K, E] (always inside any sliding window).
    own = scale(jnp.einsum("NKGE,NKE->NKG", qs, k_new[tok], preferred_element_type=jnp.float32))
    init = (own, jnp.ones_like(own),
            jnp.broadcast_to(v_new[tok].astype(jnp.float32)[:, :, None], (n, kh, g, e)))

    def chunk(i, carry):
        m, l, acc = carry  # [N, K, G] running max and sum; [N, K, G, E] weighted values
        pages = jax.lax.dynamic_slice_in_dim(table, i * cp, cp, axis=1)  # [N, cp]
        kv_pos = i * cp * s + jnp.arange(cp * s, dtype=jnp.int32)  # [C]
        valid = kv_pos[None, :] < cached[:, None]  # [N, C]
        if sliding_window is not None:
            valid &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        ks = from_storage(k_cache[pages]).reshape(n, cp * s, kh, e)  # [N, C, K, E]
        # unused slots may hold anything, NaN included: zero their values (0 * NaN is NaN)
        vs = jnp.where(valid[:, :, None, None], from_storage(v_cache[pages]).reshape(n, cp * s, kh, e), 0)
        scores = scale(jnp.einsum("NKGE,NCKE->NKGC", qs, ks, preferred_element_type=jnp.float32))
        scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))  # finite: m starts at the own score
        probs = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(probs, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "NKGC,NCKE->NKGE", probs.astype(vs.dtype), vs, preferred_element_type=jnp.float32)
        return m_new, l, acc

    needed = (jnp.max(jnp.where(valid_block, cached, 0)) + cp * s - 1) // (cp * s)
    _, l, acc = jax.lax.fori_loop(0, jnp.minimum(needed, num_chunks), chunk, init)
    out = (acc / l[..., None]).reshape(n, h, e)
    dest = jnp.where(valid_block, tok, t)  # padding blocks write nowhere
    return jnp.zeros((t, h, e), q.dtype).at[dest].set(out.astype(q.dtype), mode="drop")


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
