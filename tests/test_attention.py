"""The jnp ragged paged attention against naive dense attention, on random ragged batches with
shuffled pages and NaN in every unused page slot."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kernels import build_metadata, num_query_blocks, ragged_paged_attention, write_kv
from jaxserve.kernels.ragged_paged_attention import ref_dense_attention
from jaxserve.kernels.storage import from_storage, storage_dtype, to_storage

# the package re-exports a function of the module's name, so fetch the module itself
rpa = importlib.import_module("jaxserve.kernels.ragged_paged_attention")


def random_batch(rng, *, num_requests, page_size, num_pages, kv_heads, group, head_dim,
                 max_len=40, decode_only=False, query_block=4):
    q_lens, kv_lens = [], []
    for _ in range(num_requests):
        kv = int(rng.integers(1, max_len))
        q = 1 if decode_only or rng.random() < 0.4 else int(rng.integers(1, kv + 1))
        q_lens.append(q), kv_lens.append(kv)
    perm = rng.permutation(np.arange(1, num_pages))
    tables, used = [], 0
    for kv in kv_lens:
        n = -(-kv // page_size)
        tables.append(perm[used:used + n].tolist())
        used += n
    assert used < num_pages
    t = sum(q_lens) + 5
    md = build_metadata(query_lens=q_lens, kv_lens=kv_lens, page_tables=tables, page_size=page_size,
                        num_tokens=t, num_requests=num_requests + 2,
                        num_pages_per_request=max(len(p) for p in tables) + 2,
                        num_blocks=num_query_blocks(q_lens, query_block) + 3, query_block=query_block)
    h = kv_heads * group
    # Cache: history written at random, NaN everywhere else (unused pages and the future slots).
    k_cache = np.full((num_pages, page_size, kv_heads, head_dim), np.nan, np.float32)
    v_cache = k_cache.copy()
    k_hist, v_hist = [], []
    for r, (q, kv) in enumerate(zip(q_lens, kv_lens)):
        kh = rng.standard_normal((kv, kv_heads, head_dim)).astype(np.float32)
        vh = rng.standard_normal((kv, kv_heads, head_dim)).astype(np.float32)
        for pos in range(kv - q):  # cached before this step
            page = tables[r][pos // page_size]
            k_cache[page, pos % page_size], v_cache[page, pos % page_size] = kh[pos], vh[pos]
        k_hist.append(kh), v_hist.append(vh)
    qs = rng.standard_normal((t, h, head_dim)).astype(np.float32)
    k_new = np.zeros((t, kv_heads, head_dim), np.float32)
    v_new = np.zeros_like(k_new)
    for r, (q, kv) in enumerate(zip(q_lens, kv_lens)):
        s = md.query_start[r]
        k_new[s:s + q], v_new[s:s + q] = k_hist[r][kv - q:], v_hist[r][kv - q:]
    return md, qs, k_cache, v_cache, k_new, v_new, q_lens, kv_lens, k_hist, v_hist, tables


@pytest.mark.parametrize("seed,decode_only,window,dtype,group,query_block,chunk,impl", [
    (0, False, None, jnp.float32, 1, 4, 256, "reference"),
    (1, True, None, jnp.float32, 4, 1, 8, "reference"),  # several online-softmax chunks
    (1, True, None, jnp.float32, 4, 1, 8, "cpu"),  # the C++ decode kernel
    (2, False, 7, jnp.float32, 3, 8, 12, "reference"),  # chunks, window, blocks not page-aligned
    (3, False, None, jnp.bfloat16, 8, 4, 256, "reference"),
    (4, True, 5, jnp.bfloat16, 2, 1, 8, "reference"),  # decode: window over several chunks, bf16
    (4, True, 5, jnp.bfloat16, 2, 1, 8, "cpu"),  # the kernel on a bf16 cache stored as bits
])
def test_matches_dense(seed, decode_only, window, dtype, group, query_block, chunk, impl,
                       monkeypatch):
    monkeypatch.setattr(rpa, "CHUNK_TOKENS", chunk)
    rng = np.random.default_rng(seed)
    page_size, kvh, e = 4, 2, 16
    md, q, kc, vc, kn, vn, q_lens, kv_lens, kh, vh, tables = random_batch(
        rng, num_requests=6, page_size=page_size, num_pages=128, kv_heads=kvh, group=group,
        head_dim=e, decode_only=decode_only, query_block=query_block)
    assert md.decode_only == decode_only  # the decode path is the one under test
    cast = lambda x: jnp.asarray(x, dtype)
    store = lambda x: to_storage(cast(x), storage_dtype(dtype, "cpu"))  # as the runner keeps it
    f = jax.jit(lambda *a: ragged_paged_attention(*a, md, sm_scale=e ** -0.5, sliding_window=window,
                                                  impl=impl))
    out = np.asarray(f(cast(q), store(kc), store(vc), cast(kn), cast(vn)), np.float32)
    write = jax.jit(write_kv, donate_argnums=0)
    ((k_out, v_out),) = write(((store(kc), store(vc)),), ((cast(kn), cast(vn)),), md.slot_mapping)
    k_out, v_out = from_storage(k_out), from_storage(v_out)
    k_out, v_out = np.asarray(k_out, np.float32), np.asarray(v_out, np.float32)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for r, (ql, kv) in enumerate(zip(q_lens, kv_lens)):
        s = md.query_start[r]
        want = ref_dense_attention(cast(q[s:s + ql]), cast(kh[r]), cast(vh[r]), np.arange(kv - ql, kv),
                                   kv, sm_scale=e ** -0.5, sliding_window=window)
        np.testing.assert_allclose(out[s:s + ql], np.asarray(want), atol=tol, rtol=tol)
        for pos in range(kv):  # the new K/V landed in their slots
            page = tables[r][pos // page_size]
            np.testing.assert_allclose(k_out[page, pos % page_size], np.asarray(cast(kh[r][pos]), np.float32))
            np.testing.assert_allclose(v_out[page, pos % page_size], np.asarray(cast(vh[r][pos]), np.float32))
    t_used = sum(q_lens)
    assert np.all(out[t_used:] == 0), "padding tokens must produce zeros, not NaN"


@pytest.mark.parametrize("limit,window,soft_cap,impl", [
    ("chunk", None, 5.0, "reference"), ("budget", 6, None, "reference"),
    ("budget", None, 5.0, "reference"), (None, 6, None, "cpu"), (None, None, 5.0, "cpu")])
def test_decode_one_page_chunks(limit, window, soft_cap, impl, monkeypatch):
    """The jnp decode path with chunks of one page (many loop steps, a window starting
    mid-chunk), set by CHUNK_TOKENS or by the DECODE_STEP_TOKENS budget (8 positions over 9
    blocks: at least a page), and with a soft cap; and the C++ kernel (a window starting
    mid-page, a soft cap). Both still dense attention."""
    page_size, kvh, group, e = 4, 2, 3, 16
    if limit == "chunk":
        monkeypatch.setattr(rpa, "CHUNK_TOKENS", page_size)
    elif limit == "budget":
        monkeypatch.setattr(rpa, "DECODE_STEP_TOKENS", 8)
    rng = np.random.default_rng(11)
    md, q, kc, vc, kn, vn, q_lens, kv_lens, kh, vh, _ = random_batch(
        rng, num_requests=6, page_size=page_size, num_pages=160, kv_heads=kvh, group=group,
        head_dim=e, max_len=60, decode_only=True, query_block=1)
    assert md.decode_only
    out = np.asarray(jax.jit(lambda *a: ragged_paged_attention(
        *a, md, sm_scale=e ** -0.5, sliding_window=window, soft_cap=soft_cap,
        impl=impl))(q, kc, vc, kn, vn))
    for r, kv in enumerate(kv_lens):
        s = md.query_start[r]
        want = ref_dense_attention(q[s:s + 1], kh[r], vh[r], np.array([kv - 1]), kv,
                                   sm_scale=e ** -0.5, sliding_window=window, soft_cap=soft_cap)
        np.testing.assert_allclose(out[s:s + 1], np.asarray(want), atol=1e-5, rtol=1e-5)
    assert np.all(out[sum(q_lens):] == 0)


@pytest.mark.parametrize("decode_only,query_block", [(True, 1), (False, 4)])
def test_bf16_cache_stored_as_bits(decode_only, query_block):
    """A bf16 cache kept as its uint16 bits (CPU) reads and writes exactly as a bf16 cache, in
    the jnp path (the C++ kernel reads only the bits: test_matches_dense)."""
    from jaxserve.kernels.storage import BITS

    rng = np.random.default_rng(5)
    md, q, kc, vc, kn, vn, *_ = random_batch(
        rng, num_requests=5, page_size=4, num_pages=96, kv_heads=2, group=2, head_dim=16,
        decode_only=decode_only, query_block=query_block)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    f = jax.jit(lambda *a: ragged_paged_attention(*a, md, sm_scale=0.25, impl="reference"))
    want = f(bf(q), bf(kc), bf(vc), bf(kn), bf(vn))
    bits = to_storage(bf(kc), BITS), to_storage(bf(vc), BITS)
    assert bits[0].dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(f(bf(q), *bits, bf(kn), bf(vn)), np.float32),
                                  np.asarray(want, np.float32))
    write = jax.jit(write_kv, donate_argnums=0)
    ((k_bits, _),) = write((bits,), ((bf(kn), bf(vn)),), md.slot_mapping)
    ((k_bf, _),) = write(((bf(kc), bf(vc)),), ((bf(kn), bf(vn)),), md.slot_mapping)
    assert k_bits.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(from_storage(k_bits), np.float32), np.asarray(k_bf, np.float32))
