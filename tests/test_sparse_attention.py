"""Sparse decode attention (kernels/sparse.py) against numpy oracles: the page summaries the cache
write keeps, the pages chosen (Quest bound, TokenSelect soft vote, sinks, window, budget), and
attention over them, with NaN in every page that was not chosen; a budget covering the whole
context gives exactly the dense output; the Pallas kernels run the compacted batch in interpret
mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import kernels
from jaxserve.config import SparseAttentionConfig
from jaxserve.errors import ConfigError
from jaxserve.kernels import build_metadata, ragged_paged_attention, sparse, write_kv
from jaxserve.kernels.ragged_paged_attention import ref_dense_attention

S, KH, G, E = 4, 2, 3, 16  # page size, kv heads, query heads per kv head, head dim
SCALE = E ** -0.5


def decode_batch(rng, kv_lens, *, num_pages=160, pad=2, head_dim=E):
    """A decode-only batch: per request its keys/values [kv, K, E], the cache holding all but
    the last (NaN elsewhere), shuffled pages, and the new token's K/V."""
    perm = rng.permutation(np.arange(1, num_pages))
    tables, used = [], 0
    for kv in kv_lens:
        n = -(-kv // S)
        tables.append(perm[used:used + n].tolist())
        used += n
    r = len(kv_lens)
    md = build_metadata(query_lens=[1] * r, kv_lens=kv_lens, page_tables=tables, page_size=S,
                        num_tokens=r + pad, num_requests=r + pad,
                        num_pages_per_request=max(len(t) for t in tables) + 3,
                        num_blocks=r + pad, query_block=1)
    k_cache = np.full((num_pages, S, KH, head_dim), np.nan, np.float32)
    v_cache = k_cache.copy()
    k_new = np.zeros((r + pad, KH, head_dim), np.float32)
    v_new = np.zeros_like(k_new)
    keys, values = [], []
    for i, kv in enumerate(kv_lens):
        # keys with a few strong directions, so that pages differ in what they answer to
        k = rng.standard_normal((kv, KH, head_dim)).astype(np.float32) * rng.uniform(0.2, 3, (kv, 1, 1))
        v = rng.standard_normal((kv, KH, head_dim)).astype(np.float32)
        for pos in range(kv - 1):
            k_cache[tables[i][pos // S], pos % S], v_cache[tables[i][pos // S], pos % S] = k[pos], v[pos]
        k_new[i], v_new[i] = k[-1], v[-1]
        keys.append(k), values.append(v)
    q = rng.standard_normal((r + pad, KH * G, head_dim)).astype(np.float32)
    return md, q, k_cache, v_cache, k_new, v_new, keys, values, tables


def summaries_of(k_cache, tables, kv_lens):
    """Summaries of the cached keys (the current token's page holds kv-1 % S of them)."""
    lengths = np.zeros(k_cache.shape[0], np.int64)
    for table, kv in zip(tables, kv_lens):
        for j, page in enumerate(table):
            lengths[page] = max(0, min(S, kv - 1 - j * S))
    return sparse.ref_page_summaries(np.nan_to_num(k_cache), lengths)


def oracle_chosen(q_r, keys, kv, cfg: SparseAttentionConfig):
    """The logical pages a request reads, from its raw keys: the Quest bound of every page with
    cached keys per query head, softmax over pages per head, summed; sinks and window forced."""
    n = -(-kv // S)
    sink, window = -(-cfg.sink_tokens // S), -(-cfg.window_tokens // S)
    if cfg.budget_tokens is not None:
        budget = -(-cfg.budget_tokens // S)
    else:
        budget = int(np.ceil(n * cfg.budget_fraction))
    budget = max(budget, sink + window)
    if n * S < cfg.min_context or budget >= n:
        return list(range(n))
    votes = np.zeros(n)
    bounds = np.full((KH * G, n), -np.inf)
    for j in range(n):
        page_keys = keys[j * S:min(kv - 1, (j + 1) * S)]  # cached keys of page j
        if len(page_keys) == 0:
            continue
        lo, hi = page_keys.min(axis=0), page_keys.max(axis=0)  # [K, E]
        for h in range(KH * G):
            bounds[h, j] = np.maximum(q_r[h] * lo[h // G], q_r[h] * hi[h // G]).sum()
    for h in range(KH * G):
        z = bounds[h] * q_r.shape[-1] ** -0.5
        p = np.exp(z - z[np.isfinite(z)].max())
        votes += p / p.sum()
    forced = [j for j in range(n) if j < sink or j >= n - window]
    rest = sorted((j for j in range(n) if j not in forced), key=lambda j: -votes[j])
    return sorted(forced + rest[:budget - len(forced)])


def attend_oracle(q_r, keys, values, kv, pages):
    positions = [p for j in pages for p in range(j * S, min(kv, (j + 1) * S))]
    out = ref_dense_attention(q_r[None], keys[positions], values[positions],
                              np.array([len(positions) - 1]), len(positions),
                              sm_scale=q_r.shape[-1] ** -0.5)
    return np.asarray(out)[0]


CONFIGS = [
    SparseAttentionConfig(budget_fraction=0.25, sink_tokens=4, window_tokens=4, min_context=0),
    SparseAttentionConfig(budget_tokens=24, sink_tokens=8, window_tokens=6, min_context=0),
    SparseAttentionConfig(budget_fraction=0.125, sink_tokens=0, window_tokens=1, min_context=100),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_chooses_oracle_pages_and_never_reads_others(cfg):
    rng = np.random.default_rng(CONFIGS.index(cfg))
    kv_lens = [93, 60, 121, 9, 88]  # 88: the current token starts a page (no cached key there)
    md, q, kc, vc, kn, vn, keys, values, tables = decode_batch(rng, kv_lens)
    summ = summaries_of(kc, tables, kv_lens)
    chosen = [oracle_chosen(q[i], keys[i], kv, cfg) for i, kv in enumerate(kv_lens)]
    assert any(len(c) < -(-kv // S) for c, kv in zip(chosen, kv_lens)), "nothing was left out"
    poisoned_k, poisoned_v = kc.copy(), vc.copy()
    for table, pages in zip(tables, chosen):  # NaN in every page not chosen
        for j, page in enumerate(table):
            if j not in pages:
                poisoned_k[page], poisoned_v[page] = np.nan, np.nan
    f = jax.jit(lambda *a: ragged_paged_attention(*a, md, sm_scale=SCALE, summaries=summ, sparse=cfg))
    out = np.asarray(f(q, poisoned_k, poisoned_v, kn, vn))
    for i, kv in enumerate(kv_lens):
        np.testing.assert_allclose(out[i], attend_oracle(q[i], keys[i], values[i], kv, chosen[i]),
                                   atol=1e-5, rtol=1e-5)
    assert np.all(out[len(kv_lens):] == 0)


@pytest.mark.parametrize("cfg", [SparseAttentionConfig(budget_fraction=1.0, min_context=0),
                                 SparseAttentionConfig(budget_tokens=512, sink_tokens=0),
                                 SparseAttentionConfig(budget_fraction=0.1, min_context=10 ** 6)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_budget_covering_the_context_equals_dense_exactly(cfg, dtype):
    rng = np.random.default_rng(3)
    kv_lens = [93, 60, 121, 9, 88]
    md, q, kc, vc, kn, vn, _, _, tables = decode_batch(rng, kv_lens)
    summ = summaries_of(kc, tables, kv_lens)
    args = [jnp.asarray(x, dtype) for x in (q, kc, vc, kn, vn)]
    dense = jax.jit(lambda *a: ragged_paged_attention(*a, md, sm_scale=SCALE))(*args)
    sparse_out = jax.jit(lambda *a: ragged_paged_attention(
        *a, md, sm_scale=SCALE, summaries=summ, sparse=cfg))(*args)
    np.testing.assert_array_equal(np.asarray(sparse_out, np.float32), np.asarray(dense, np.float32))


def test_reuse_reads_the_kept_pages_and_every_newer_one():
    """A step that does not refresh reads exactly the kept pages, the sink and window pages and
    the pages past `since` (NaN everywhere else), without scoring; one that refreshes chooses
    as if nothing were kept."""
    rng = np.random.default_rng(7)
    kv_lens = [93, 60, 121]
    cfg = SparseAttentionConfig(budget_tokens=16, sink_tokens=4, window_tokens=4, min_context=0)
    md, q, kc, vc, kn, vn, keys, values, tables = decode_batch(rng, kv_lens)
    summ = summaries_of(kc, tables, kv_lens)
    r, w = md.page_table.shape
    kept = rng.random((r, w)) < 0.2
    since = np.array([20, 10, 29, 0, 0], np.int32)  # pages each request had when it chose
    f = jax.jit(lambda refresh, kept, *a: ragged_paged_attention(
        *a, md, sm_scale=SCALE, summaries=summ, sparse=cfg,
        reuse=sparse.SelectionReuse(kept, jnp.asarray(since), refresh)), static_argnums=0)
    fresh = jax.jit(lambda *a: ragged_paged_attention(*a, md, sm_scale=SCALE, summaries=summ,
                                                      sparse=cfg))(q, kc, vc, kn, vn)
    out, chosen = f(True, kept, q, kc, vc, kn, vn)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fresh))
    chosen = np.asarray(chosen)
    for i, kv in enumerate(kv_lens):
        assert sorted(np.flatnonzero(chosen[i])) == oracle_chosen(q[i], keys[i], kv, cfg)
    assert not chosen[len(kv_lens):].any()
    # the kept masks: poison every page outside kept | sink | window | newer
    poisoned_k, poisoned_v = kc.copy(), vc.copy()
    want = []
    for i, (table, kv) in enumerate(zip(tables, kv_lens)):
        n = -(-kv // S)
        pages = [j for j in range(n) if kept[i, j] or j < 1 or j >= n - 1 or j >= since[i]]
        want.append(pages)
        for j, page in enumerate(table):
            if j not in pages:
                poisoned_k[page], poisoned_v[page] = np.nan, np.nan
    out, chosen = f(False, kept, q, poisoned_k, poisoned_v, kn, vn)
    for i, kv in enumerate(kv_lens):
        assert sorted(np.flatnonzero(np.asarray(chosen)[i])) == want[i]
        np.testing.assert_allclose(np.asarray(out)[i], attend_oracle(q[i], keys[i], values[i], kv,
                                                                     want[i]), atol=1e-5, rtol=1e-5)


def test_dense_layer_flag_reads_every_page():
    rng = np.random.default_rng(12)
    kv_lens = [93, 60]
    md, q, kc, vc, kn, vn, _, _, tables = decode_batch(rng, kv_lens)
    summ = summaries_of(kc, tables, kv_lens)
    cfg = SparseAttentionConfig(budget_tokens=8, min_context=0)
    args = [jnp.asarray(x) for x in (q, kc, vc, kn, vn)]
    f = jax.jit(lambda dense, *a: ragged_paged_attention(
        *a, md, sm_scale=SCALE, summaries=summ, sparse=cfg, dense_layer=dense))
    dense = jax.jit(lambda *a: ragged_paged_attention(*a, md, sm_scale=SCALE))(*args)
    np.testing.assert_array_equal(np.asarray(f(jnp.bool_(True), *args)), np.asarray(dense))
    assert not np.array_equal(np.asarray(f(jnp.bool_(False), *args)), np.asarray(dense))


def test_mixed_step_decodes_sparse_prefill_dense():
    """A step mixing decodes with a prefill chunk: the decodes read their chosen pages (NaN in
    every other page of theirs), the chunk reads every page, as dense attention does."""
    rng = np.random.default_rng(4)
    cfg = SparseAttentionConfig(budget_tokens=16, sink_tokens=4, window_tokens=4, min_context=0)
    kv_lens, q_lens = [93, 60, 121], [1, 12, 1]  # the middle request prefills 12 tokens
    perm = rng.permutation(np.arange(1, 100))
    tables = [perm[:24].tolist(), perm[24:39].tolist(), perm[39:70].tolist()]
    t = sum(q_lens) + 3
    md = build_metadata(query_lens=q_lens, kv_lens=kv_lens, page_tables=tables, page_size=S,
                        num_tokens=t, num_requests=5, num_pages_per_request=34, num_blocks=9,
                        query_block=4)
    kc = np.full((100, S, KH, E), np.nan, np.float32)
    vc = kc.copy()
    kn, vn = np.zeros((t, KH, E), np.float32), np.zeros((t, KH, E), np.float32)
    keys = [rng.standard_normal((kv, KH, E)).astype(np.float32) * rng.uniform(0.2, 3, (kv, 1, 1))
            for kv in kv_lens]
    values = [rng.standard_normal((kv, KH, E)).astype(np.float32) for kv in kv_lens]
    start = 0
    for table, kv, ql, k, v in zip(tables, kv_lens, q_lens, keys, values):
        for pos in range(kv - ql):
            kc[table[pos // S], pos % S], vc[table[pos // S], pos % S] = k[pos], v[pos]
        kn[start:start + ql], vn[start:start + ql] = k[kv - ql:], v[kv - ql:]
        start += ql
    q = rng.standard_normal((t, KH * G, E)).astype(np.float32)
    lengths = np.zeros(100, np.int64)
    for table, kv, ql in zip(tables, kv_lens, q_lens):
        for j, page in enumerate(table):
            lengths[page] = max(0, min(S, kv - ql - j * S))
    summ = sparse.ref_page_summaries(np.nan_to_num(kc), lengths)
    dense = ragged_paged_attention(*(jnp.asarray(np.nan_to_num(x)) for x in (q, kc, vc)),
                                   jnp.asarray(kn), jnp.asarray(vn), md, sm_scale=SCALE)
    decodes = {0: 0, 2: 13}  # request -> its token on T
    chosen = {r: oracle_chosen(q[tok], keys[r], kv_lens[r], cfg) for r, tok in decodes.items()}
    assert all(len(c) < -(-kv_lens[r] // S) for r, c in chosen.items()), "nothing was left out"
    for r, pages in chosen.items():
        for j, page in enumerate(tables[r]):
            if j not in pages:
                kc[page], vc[page] = np.nan, np.nan
    out = np.asarray(jax.jit(lambda *a: ragged_paged_attention(
        *a, md, sm_scale=SCALE, summaries=summ, sparse=cfg))(q, kc, vc, kn, vn))
    for r, tok in decodes.items():
        np.testing.assert_allclose(out[tok], attend_oracle(q[tok], keys[r], values[r], kv_lens[r],
                                                           chosen[r]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[1:13], np.asarray(dense)[1:13], atol=1e-5, rtol=1e-5)
    assert np.all(out[14:] == 0)


def test_write_summaries_tracks_pages_through_reuse():
    """Prefill chunks, decodes, a page freed and handed to another request (stale summary and
    keys), and padding tokens: after every step the summaries equal those of the cache."""
    rng = np.random.default_rng(5)
    num_pages = 12
    kc = np.zeros((num_pages, S, KH, E), np.float32)
    summ = sparse.init_summaries(1, num_pages, KH, E)
    cache = ((jnp.asarray(kc), jnp.asarray(kc)),)
    lengths = np.zeros(num_pages, np.int64)
    write = jax.jit(lambda c, s, new, slots: (write_kv(c, new, slots),
                                              sparse.write_summaries(s, [new[0][0]], slots, page_size=S)),
                    donate_argnums=(0, 1))
    # (request pages, first position, tokens this step); request A uses pages 3, 7, 1,
    # then B reuses page 7 and 1 after A is freed; a chunk starts mid-page.
    steps = [([3, 7, 1], 0, 6), ([3, 7, 1], 6, 1), ([3, 7, 1], 7, 3), ([5, 7, 1], 0, 2),
             ([5, 7, 1], 2, 5), ([5, 7, 1], 7, 1)]
    for pages, start, n in steps:
        if start == 0:  # a new owner: its pages' old lengths no longer count
            lengths[pages] = 0
        md = build_metadata(query_lens=[n], kv_lens=[start + n], page_tables=[pages], page_size=S,
                            num_tokens=n + 3, num_requests=2, num_pages_per_request=3,
                            num_blocks=n + 4, query_block=1 if n == 1 else 4)
        new = rng.standard_normal((n + 3, KH, E)).astype(np.float32) * 3
        new[n:] = rng.standard_normal((3, KH, E)) * 100  # padding rows land in page 0
        cache, summ = write(cache, summ, ((jnp.asarray(new), jnp.asarray(new)),), md.slot_mapping)
        for pos in range(start, start + n):
            lengths[pages[pos // S]] = max(lengths[pages[pos // S]], pos % S + 1)
        want = np.asarray(sparse.ref_page_summaries(cache[0][0], lengths))
        got = np.asarray(summ[0])
        used = [p for p in range(1, num_pages) if lengths[p] > 0]
        np.testing.assert_array_equal(got[used], want[used])
        assert np.all(got[[p for p in range(1, num_pages) if p not in (3, 5, 7, 1)], 0] == np.inf)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_pallas_kernels_run_the_compacted_batch(impl):
    """The compacted page table through each Pallas kernel (interpret mode), NaN in every page
    not chosen, against the oracle over the chosen pages."""
    cfg = SparseAttentionConfig(budget_fraction=0.25, sink_tokens=4, window_tokens=8, min_context=0)
    rng = np.random.default_rng(6)
    kv_lens, e = [93, 70, 33], 64  # a head dim both kernels tile
    md, q, kc, vc, kn, vn, keys, values, tables = decode_batch(rng, kv_lens, head_dim=e)
    summ = summaries_of(kc, tables, kv_lens)
    chosen = [oracle_chosen(q[i], keys[i], kv, cfg) for i, kv in enumerate(kv_lens)]
    for table, pages in zip(tables, chosen):
        for j, page in enumerate(table):
            if j not in pages:
                kc[page], vc[page] = np.nan, np.nan
    md = jax.tree_util.tree_map(jnp.asarray, md)
    qs = sparse.request_queries(jnp.asarray(q), md).reshape(-1, KH, G, e)
    compact, _ = sparse.select_pages(qs, summ, md, config=cfg, sm_scale=e ** -0.5, page_size=S)
    module = kernels.kernel_module(impl)
    assert module.unsupported_reason(q.shape, kc.shape, q.dtype, kc.dtype) is None
    out = np.asarray(module.ragged_paged_attention(q, kc, vc, kn, vn, compact, sm_scale=e ** -0.5,
                                                   interpret=True))
    for i, kv in enumerate(kv_lens):
        np.testing.assert_allclose(out[i], attend_oracle(q[i], keys[i], values[i], kv, chosen[i]),
                                   atol=1e-5, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="not both"):
        SparseAttentionConfig(budget_fraction=0.5, budget_tokens=64)
    with pytest.raises(ConfigError, match="budget_fraction"):
        SparseAttentionConfig(budget_fraction=0.0)
    with pytest.raises(ConfigError, match="window_tokens"):
        SparseAttentionConfig(window_tokens=0)
    assert SparseAttentionConfig().budget_fraction == 0.25
    md, q, kc, vc, kn, vn, *_ = decode_batch(np.random.default_rng(0), [20])
    with pytest.raises(ValueError, match="sliding-window"):
        ragged_paged_attention(q, kc, vc, kn, vn, md, sm_scale=SCALE, sliding_window=8,
                               summaries=(), sparse=SparseAttentionConfig())


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_scoring_kernel_matches_reference(impl):
    """The Pallas bound kernels (interpret mode) against the jnp reference, with NaN in the
    summaries of every page no request uses (page 0 included) and garbage past each table."""
    import importlib

    scores = importlib.import_module(f"jaxserve.kernels.{impl}_sparse_scores")
    rng = np.random.default_rng(8)
    e, num_pages = 64, 90
    kv_lens = [93, 150, 9, 0]  # the last row is padding
    n_pages = np.array([-(-kv // S) for kv in kv_lens], np.int32)
    width = 48
    perm = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((len(kv_lens), width), np.int32)
    used = 0
    for r, n in enumerate(n_pages):
        table[r, :n] = perm[used:used + n]
        table[r, n:] = rng.integers(0, num_pages, width - n)  # garbage past the pages
        used += n
    summ = np.full((num_pages, 2, KH, e), np.nan, np.float32)
    lo = rng.standard_normal((used, KH, e)).astype(np.float32)
    summ[perm[:used], 0], summ[perm[:used], 1] = lo, lo + rng.uniform(0, 2, (used, KH, e))
    qs = jnp.asarray(rng.standard_normal((len(kv_lens), KH, G, e)), jnp.float32)
    args = (qs, jnp.asarray(summ), jnp.asarray(table), jnp.asarray(n_pages))
    want = np.asarray(sparse.ref_page_bounds(*args))
    assert scores.unsupported_reason(qs.shape, summ.shape, width) is None
    got = np.asarray(scores.page_bounds(*args, chunk_pages=16, interpret=True))
    for r, n in enumerate(n_pages):
        np.testing.assert_allclose(got[r, ..., :n], want[r, ..., :n], rtol=1e-5, atol=1e-4)
    votes = np.asarray(scores.page_votes(*args, sm_scale=0.2, interpret=True))
    ref_votes = np.asarray(sparse.ref_page_votes(*args, sm_scale=0.2))
    np.testing.assert_allclose(votes, ref_votes, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(votes[r, :n]).all() and np.isneginf(votes[r, n:]).all()
               for r, n in enumerate(n_pages))


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_dispatch_with_kernels_in_interpret_mode(impl):
    """impl="gpu" / "tpu": the scoring kernel and the attention kernel, both in interpret mode,
    give the reference path's output (same pages chosen)."""
    cfg = SparseAttentionConfig(budget_fraction=0.25, sink_tokens=4, window_tokens=8, min_context=0)
    rng = np.random.default_rng(9)
    kv_lens, e = [93, 70], 64
    md, q, kc, vc, kn, vn, keys, values, tables = decode_batch(rng, kv_lens, head_dim=e)
    summ = summaries_of(kc, tables, kv_lens)
    args = [jnp.asarray(x) for x in (q, np.nan_to_num(kc), np.nan_to_num(vc), kn, vn)]
    opts = dict(sm_scale=e ** -0.5, summaries=summ, sparse=cfg)
    want = ragged_paged_attention(*args, md, **opts)
    got = ragged_paged_attention(*args, md, impl=impl, interpret=True, **opts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_tpu_scoring_kernel_lowers_to_mosaic():
    """The non-interpret path (strided loads, DMAs per page) lowers at a production shape: 8 kv
    heads, 4 query heads each, head dim 128, two chunks of 128 pages."""
    from jaxserve.kernels import tpu_sparse_scores

    qs = jnp.zeros((3, 8, 4, 128), jnp.float32)
    summ = jnp.zeros((600, 2, 8, 128), jnp.float32)
    table, n = jnp.zeros((3, 256), jnp.int32), jnp.array([5, 200, 0], jnp.int32)
    f = jax.jit(lambda *a: tpu_sparse_scores.page_bounds(*a))
    text = f.trace(qs, summ, table, n).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
