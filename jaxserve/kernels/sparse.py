"""Sparse decode attention over the paged cache: read only the pages that matter.

Per layer, page and KV head the cache keeps a summary of its keys, their element-wise min and
max (`summaries`, per layer `[P, 2, K, E]` float32: index 0 the min, 1 the max), written by
`write_summaries` in the cache write's program. A summary is a function of its page's keys, so
pages shared by prefix caching share their summaries, and a tensor-parallel mesh splits them on
K like the cache.

At a decode step each layer chooses, per request, the pages to read (in a step that mixes
decodes with prefill chunks, for the decodes only: the chunks read every page):

1. Score (Quest, arXiv 2406.10774): for query head h and page p, `sum_e max(q_e kmin_e,
   q_e kmax_e)` bounds q . k from above for every key k of the page.
2. Vote (TokenSelect, arXiv 2411.02886): a softmax of the scaled bounds over the pages within
   each head, summed over all heads, gives one score per page shared by the heads (a head's
   few strong pages weigh as much as another's flat preference, unlike a plain sum of bounds).
3. Keep the sink pages (the first `sink_tokens`, attention sinks) and the window pages (the last
   `window_tokens`, which include the page of the current token) always, then the best-voted
   pages up to the budget. A request whose context is under `min_context` or fits in the
   budget keeps every page, and then attends exactly as dense attention does.
4. Attend through a compacted page table: the chosen pages in ascending order, with the
   request's KV length shrunk to match. Every page but the last is full and the last page is
   always chosen, so the compacted request is an ordinary shorter one: its new token sits at the
   same offset of the same last page, and any ragged paged attention (the jnp path, the Pallas
   kernels) runs it unchanged. Keys are cached after RoPE, so moving them changes no score. On
   CPU the jnp path then gathers only the chosen pages: its cost falls with the budget.

Reuse (`config.reuse_steps` > 1; Recycled Attention, arXiv 2411.05787, and TokenSelect's
selection cache): the runner keeps each request's choice, per layer, as a mask over its page-table
slots ([W] bool, positions, not page ids: a stale mask can only pick among the request's own
pages), passes it back in (`SelectionReuse`), and at a step that does not `refresh` the layer
skips steps 1-3 (a program of its own: `refresh` is static) and reads the kept pages, the sink and window pages, and every page that became
new since the choice (`since`). The mask each step used is returned, to be kept for the next.

Sliding-window models are refused (the compacted positions no longer say which keys are in the
window). With a mesh each device scores its own heads and the votes are summed over the tensor
axis (`axis_name`), so every device chooses the same pages.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import SparseAttentionConfig
from jaxserve.kernels.metadata import AttentionMetadata

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectionReuse:
    """A layer's kept choice of pages, per request of a decode step (runner/selection.py)."""

    chosen: jax.Array  # [R, W] bool page-table slots each request read at its last choice
    since: jax.Array  # [R] int32 pages each request had then: later ones are always read
    # choose afresh this step (the kept masks are then ignored). Static: a program that chooses
    # and one that reuses, not one lax.cond (measured on XLA:CPU, 8k context, batch 1: the
    # reusing branch of a cond took 3-6 ms against 0.6-1.0 ms as a program of its own).
    refresh: bool = dataclasses.field(metadata=dict(static=True), default=True)


SCORE_CHUNK_PAGES = 64  # pages scored per step of the scoring loop (it runs as far as needed)


def init_summaries(num_layers: int, num_pages: int, num_kv_heads: int, head_dim: int):
    """Per layer a summary buffer [P, 2, K, E] float32 (min, max), empty (min > max)."""
    one = jnp.stack([jnp.full((num_pages, num_kv_heads, head_dim), jnp.inf, jnp.float32),
                     jnp.full((num_pages, num_kv_heads, head_dim), -jnp.inf, jnp.float32)], axis=1)
    return tuple(one for _ in range(num_layers))


def write_summaries(summaries, k_news, slot_mapping, *, page_size: int):
    """Fold this step's keys (per layer [T, K, E]) into their pages' summaries [P, 2, K, E].

    Requests fill their pages in order from offset 0 (a prefix-cache hit ends at a page boundary
    and the page of a request's last token is never shared), so a key written at offset 0 starts
    its page afresh: the page's summary is reset first, which also forgets whatever the page held
    for an earlier owner. Scatters only (set, then min and max with duplicates combined), no
    gather: run with `summaries` donated they are done in place."""
    page, off = slot_mapping // page_size, slot_mapping % page_size
    out = []
    for summ, k_new in zip(summaries, k_news, strict=True):
        num_pages, _, kh, e = summ.shape
        k = k_new.astype(jnp.float32)  # [T, K, E]
        empty = jnp.stack([jnp.full((kh, e), jnp.inf), jnp.full((kh, e), -jnp.inf)])  # [2, K, E]
        summ = summ.at[jnp.where(off == 0, page, num_pages)].set(empty, mode="drop")
        out.append(summ.at[page, 0].min(k).at[page, 1].max(k))
    return tuple(out)


def ref_page_summaries(k_cache, lengths_of_pages):
    """Oracle: summaries [P, 2, K, E] straight from a cache [P, S, K, E] whose page p holds
    lengths_of_pages[p] valid keys (pages with none stay empty)."""
    from jaxserve.kernels.storage import from_storage

    k = from_storage(jnp.asarray(k_cache)).astype(jnp.float32)
    valid = jnp.arange(k.shape[1])[None, :] < jnp.asarray(lengths_of_pages)[:, None]  # [P, S]
    v = valid[:, :, None, None]
    return jnp.stack([jnp.min(jnp.where(v, k, jnp.inf), axis=1),
                      jnp.max(jnp.where(v, k, -jnp.inf), axis=1)], axis=1)


def ref_page_votes(qs, summaries, table, num_pages, *, sm_scale: float, axis_name=None):
    """Per request the soft vote of its pages, [R, W] float32 (-inf where a page is unused).

    qs [R, K, G, E] each request's query; summaries [P, 2, K, E]; table [R, W] page ids;
    num_pages [R] pages in use. axis_name: the mesh axis the heads are split over (votes are
    summed over it)."""
    bounds = ref_page_bounds(qs, summaries, table, num_pages)
    return _vote(bounds, num_pages, sm_scale=sm_scale, axis_name=axis_name)


def ref_page_bounds(qs, summaries, table, num_pages):
    """The Quest bound of every query head for every page, [R, K, G, W] float32, computed only
    for the chunks of pages the longest request uses (the rest: 0, masked by the vote)."""
    r, w = table.shape
    cp = min(SCORE_CHUNK_PAGES, w)
    num_chunks = -(-w // cp)
    table = jnp.pad(table, ((0, 0), (0, num_chunks * cp - w)))
    qf = qs.astype(jnp.float32)
    q_pos, q_neg = jnp.maximum(qf, 0), jnp.minimum(qf, 0)

    def chunk(i, bounds):  # bounds [R, K, G, W']
        pages = jax.lax.dynamic_slice_in_dim(table, i * cp, cp, axis=1)  # [R, cp]
        s = summaries[pages]  # [R, cp, 2, K, E]
        # sum_e max(q kmin, q kmax) = max(q, 0) . kmax + min(q, 0) . kmin: two matmuls
        b = (jnp.einsum("RKGE,RCKE->RKGC", q_pos, s[:, :, 1])
             + jnp.einsum("RKGE,RCKE->RKGC", q_neg, s[:, :, 0]))  # [R, K, G, cp]
        return jax.lax.dynamic_update_slice_in_dim(bounds, b, i * cp, axis=3)

    kh, g = qs.shape[1], qs.shape[2]
    needed = (jnp.max(num_pages) + cp - 1) // cp
    return jax.lax.fori_loop(0, jnp.minimum(needed, num_chunks), chunk,
                             jnp.zeros((r, kh, g, num_chunks * cp), jnp.float32))[..., :w]


def _vote(bounds, num_pages, *, sm_scale: float, axis_name=None):
    """bounds [R, K, G, W] -> votes [R, W]: softmax over a request's pages per head, summed over
    the heads (and over the devices holding the other heads)."""
    w = bounds.shape[-1]
    used = jnp.arange(w)[None, :] < num_pages[:, None]  # [R, W]
    # A page with no keys yet (the current token's, whose summary is written after this step)
    # has an empty or stale summary: a non-finite bound votes nothing (it is kept anyway).
    logits = jnp.where(used[:, None, None] & jnp.isfinite(bounds), bounds * sm_scale, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    votes = jnp.sum(p, axis=(1, 2))  # [R, W]
    if axis_name is not None:
        votes = jax.lax.psum(votes, axis_name)
    return jnp.where(used, votes, -jnp.inf)


def budget_pages(config: SparseAttentionConfig, num_pages, page_size: int):
    """Pages each request may read [R] (int32), given its pages in use [R]: the budget, at least
    the sink and window pages; every page when the context is short or fits the budget."""
    sink, window = -(-config.sink_tokens // page_size), -(-config.window_tokens // page_size)
    if config.budget_tokens is not None:
        budget = jnp.full_like(num_pages, -(-config.budget_tokens // page_size))
    else:
        budget = jnp.ceil(num_pages * config.budget_fraction).astype(num_pages.dtype)
    budget = jnp.maximum(budget, sink + window)
    dense = num_pages * page_size < config.min_context
    return jnp.where(dense, num_pages, jnp.minimum(budget, num_pages))


def select_pages(qs, summaries, md: AttentionMetadata, *, config: SparseAttentionConfig,
                 sm_scale: float, page_size: int, axis_name=None, votes_fn=None, dense=None,
                 reuse: SelectionReuse | None = None, dense_rows=None):
    """The decode-only step's metadata with each request's page table compacted to its chosen
    pages and its KV length shrunk to match (see the module doc), and the chosen page-table
    slots [R, W] bool. qs [R, K, G, E] the requests' queries. votes_fn: the scoring
    implementation (default `ref_page_votes`). dense: a traced bool, true for a layer that keeps
    every page (`config.dense_layers`). reuse: the kept choice, read instead of choosing unless
    `reuse.refresh`. dense_rows: [R] bool, requests that keep every page (the prefill chunks of
    a step that mixes them with decodes: prefill stays dense); they are not scored."""
    votes_fn = ref_page_votes if votes_fn is None else votes_fn
    table, kv_len = md.page_table, md.kv_lens  # [R, W], [R]
    w = table.shape[1]
    num_pages = (kv_len + page_size - 1) // page_size  # [R], the current token's page included
    idx = jnp.arange(w)[None, :]
    used = idx < num_pages[:, None]  # [R, W]
    sink, window = -(-config.sink_tokens // page_size), -(-config.window_tokens // page_size)
    always = (idx < sink) | (idx >= num_pages[:, None] - window)

    def choose():
        scored = num_pages if dense_rows is None else jnp.where(dense_rows, 0, num_pages)
        votes = votes_fn(qs, summaries, table, scored, sm_scale=sm_scale, axis_name=axis_name)
        score = jnp.where(used, jnp.where(always, jnp.inf, votes), -jnp.inf)
        keep = budget_pages(config, num_pages, page_size)  # [R]
        if dense is not None:
            keep = jnp.where(dense, num_pages, keep)
        if dense_rows is not None:
            keep = jnp.where(dense_rows, num_pages, keep)
        # the keep-th best score of each request is its threshold (ties past it are kept too)
        best = -jnp.sort(-score, axis=1)  # [R, W] descending
        threshold = jnp.take_along_axis(best, jnp.maximum(keep - 1, 0)[:, None], axis=1)  # [R, 1]
        return (score >= threshold) & used

    if reuse is None or reuse.refresh:
        chosen = choose()
    else:
        chosen = (reuse.chosen | always | (idx >= reuse.since[:, None])) & used
    dest = jnp.where(chosen, jnp.cumsum(chosen, axis=1) - 1, w)  # ascending order kept
    rows = jnp.broadcast_to(jnp.arange(table.shape[0])[:, None], table.shape)
    compact = jnp.zeros_like(table).at[rows, dest].set(table, mode="drop")
    count = jnp.sum(chosen, axis=1).astype(kv_len.dtype)
    new_len = jnp.where(kv_len > 0, (count - 1) * page_size + (kv_len - 1) % page_size + 1, 0)
    return dataclasses.replace(md, page_table=compact, kv_lens=new_len), chosen


def request_queries(q, md: AttentionMetadata):
    """Each request's first (for a decode: its one) query token, q [T, H, E] -> [R, H, E]
    (padding rows read token 0; their KV length is 0)."""
    tok = jnp.clip(md.query_start[:-1], 0, q.shape[0] - 1)
    return q[tok]
