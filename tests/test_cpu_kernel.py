"""The C++ CPU kernels (through the XLA FFI): ragged paged attention
(kernels/cpu_paged_attention.cc) against the jnp path at the default model's head shape, on
decode, prefill and mixed steps, and the matmul (kernels/cpu_matmul.cc)
against numpy in float64; what the dispatch picks, and how they fail."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve import kernels
from jaxserve.kernels import build_metadata, cpu_library, cpu_matmul, cpu_paged_attention
from jaxserve.kernels.ragged_paged_attention import ref_ragged_paged_attention
from jaxserve.kernels.storage import BITS, to_storage


def decode_batch(rng, lens, *, page_size=16, kv_heads=3, group=3, head_dim=64, dtype=jnp.float32,
                 pad_requests=2):
    """Decode requests with `lens` tokens each (the last one new) on shuffled pages, NaN in every
    slot not cached, padding requests and tokens in the bucket."""
    pages = [-(-n // page_size) for n in lens]
    num_pages = 1 + sum(pages) + 3
    perm = rng.permutation(np.arange(1, num_pages))
    tables = [perm[sum(pages[:i]):sum(pages[:i + 1])].tolist() for i in range(len(lens))]
    b = len(lens) + pad_requests
    md = build_metadata(query_lens=[1] * len(lens), kv_lens=lens, page_tables=tables,
                        page_size=page_size, num_tokens=b, num_requests=b,
                        num_pages_per_request=max(pages) + 1, num_blocks=b, query_block=1)
    assert md.decode_only
    shape = (num_pages, page_size, kv_heads, head_dim)
    kc, vc = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    for table, n in zip(tables, lens):
        for pos in range(n - 1):
            kc[table[pos // page_size], pos % page_size] = rng.standard_normal((kv_heads, head_dim))
            vc[table[pos // page_size], pos % page_size] = rng.standard_normal((kv_heads, head_dim))
    store = BITS if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32
    h = kv_heads * group
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    return md, (arr(b, h, head_dim), to_storage(jnp.asarray(kc), store),
                to_storage(jnp.asarray(vc), store), arr(b, kv_heads, head_dim),
                arr(b, kv_heads, head_dim))


@pytest.mark.parametrize("dtype,window,soft_cap", [
    (jnp.float32, None, None), (jnp.float32, 40, None), (jnp.float32, None, 30.0),
    (jnp.bfloat16, None, None), (jnp.bfloat16, 21, 30.0)])
def test_kernel_matches_jnp_path(dtype, window, soft_cap):
    """SmolLM2's heads (9 query, 3 KV, 64 wide), pages of 16: contexts of one token (nothing
    cached), inside one page, across many, ending mid-page, with padding requests."""
    md, args = decode_batch(np.random.default_rng(0), [1, 2, 16, 17, 200, 333, 64], dtype=dtype)
    run = lambda impl: np.asarray(jax.jit(lambda *a: kernels.ragged_paged_attention(
        *a, md, sm_scale=0.125, sliding_window=window, soft_cap=soft_cap, impl=impl))(*args),
        np.float32)
    want, got = run("reference"), run("cpu")
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-6  # the jnp path rounds probabilities to bf16
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    assert np.all(got[7:] == 0), "padding tokens write nothing"


@pytest.mark.parametrize("kv_heads,group,head_dim,page_size", [
    (2, 4, 128, 16),  # the unrolled head dim 128
    (1, 5, 40, 8),  # head dim 40 (5 vectors: the loops' tails), a group of 4 + 1
    (4, 1, 16, 32),  # no GQA, small heads, large pages
    (2, 8, 64, 16),  # Llama-3-8B's group of 8
])
def test_kernel_matches_jnp_path_other_shapes(kv_heads, group, head_dim, page_size):
    md, args = decode_batch(np.random.default_rng(2), [3, 90, 129, 31], kv_heads=kv_heads,
                            group=group, head_dim=head_dim, page_size=page_size)
    run = lambda impl: np.asarray(jax.jit(lambda *a: kernels.ragged_paged_attention(
        *a, md, sm_scale=head_dim ** -0.5, impl=impl))(*args))
    np.testing.assert_allclose(run("cpu"), run("reference"), atol=2e-6, rtol=2e-6)


def _custom_calls(md, args, **kw) -> int:
    hlo = jax.jit(lambda *a: kernels.ragged_paged_attention(*a, md, sm_scale=0.125, **kw)).lower(
        *args).as_text()
    return hlo.count(cpu_paged_attention.TARGET)


def ragged_batch(rng, query_lens, kv_lens, *, query_block=16, page_size=16, kv_heads=3, group=3,
                 head_dim=64, dtype=jnp.float32, pad_tokens=5, pad_requests=1, keys=None):
    """Requests computing `query_lens` new tokens each with `kv_lens` positions after the step,
    on shuffled pages, NaN in every slot not cached before the step, padding tokens, blocks and
    requests in the bucket. keys: (K, V) [R, max kv_len, K, E] to use, else random."""
    pages = [-(-n // page_size) for n in kv_lens]
    num_pages = 1 + sum(pages) + 3
    perm = rng.permutation(np.arange(1, num_pages))
    tables = [perm[sum(pages[:i]):sum(pages[:i + 1])].tolist() for i in range(len(kv_lens))]
    t, r = sum(query_lens) + pad_tokens, len(kv_lens) + pad_requests
    md = build_metadata(query_lens=query_lens, kv_lens=kv_lens, page_tables=tables,
                        page_size=page_size, num_tokens=t, num_requests=r,
                        num_pages_per_request=max(pages) + 1,
                        num_blocks=sum(-(-q // query_block) for q in query_lens) + 2,
                        query_block=query_block)
    if keys is None:
        shape = (len(kv_lens), max(kv_lens), kv_heads, head_dim)
        keys = rng.standard_normal(shape), rng.standard_normal(shape)
    shape = (num_pages, page_size, kv_heads, head_dim)
    kc, vc = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    kn, vn = np.zeros((t, kv_heads, head_dim), np.float32), np.zeros((t, kv_heads, head_dim), np.float32)
    tok = 0
    for i, (table, q, n) in enumerate(zip(tables, query_lens, kv_lens)):
        for pos in range(n):
            if pos < n - q:
                kc[table[pos // page_size], pos % page_size] = keys[0][i, pos]
                vc[table[pos // page_size], pos % page_size] = keys[1][i, pos]
            else:
                kn[tok], vn[tok] = keys[0][i, pos], keys[1][i, pos]
                tok += 1
    store = BITS if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32
    cache = lambda x: to_storage(jnp.asarray(x, dtype).astype(jnp.float32), store)
    q = jnp.asarray(rng.standard_normal((t, kv_heads * group, head_dim)), dtype)
    return md, (q, cache(kc), cache(vc), jnp.asarray(kn, dtype), jnp.asarray(vn, dtype))


def attend(md, args, impl, **kw):
    return np.asarray(jax.jit(lambda *a: kernels.ragged_paged_attention(
        *a, md, sm_scale=0.125, impl=impl, **kw))(*args), np.float32)


@pytest.mark.parametrize("dtype,window,soft_cap,query_block", [
    (jnp.float32, None, None, 16), (jnp.float32, 40, None, 16), (jnp.float32, None, 30.0, 4),
    (jnp.bfloat16, None, None, 16), (jnp.bfloat16, 21, 30.0, 16)])
def test_kernel_matches_jnp_path_on_prefill_and_mixed_steps(dtype, window, soft_cap, query_block):
    """Whole prompts, chunks after a cached prefix (starting mid-page and on a page boundary),
    decodes beside them, one-token chunks; query blocks of 16 and 4 (several per chunk)."""
    query_lens = [37, 1, 20, 1, 16, 3, 1]
    kv_lens = [37, 50, 120, 17, 48, 3, 333]
    md, args = ragged_batch(np.random.default_rng(3), query_lens, kv_lens, dtype=dtype,
                            query_block=query_block)
    assert not md.decode_only
    want = attend(md, args, "reference", sliding_window=window, soft_cap=soft_cap)
    got = attend(md, args, "cpu", sliding_window=window, soft_cap=soft_cap)
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-6
    used = sum(query_lens)
    np.testing.assert_allclose(got[:used], want[:used], atol=tol, rtol=tol)
    assert np.all(got[used:] == 0), "padding tokens write nothing"


def test_a_tokens_result_does_not_depend_on_its_step():
    """The same prompt in one chunk, in two chunks (the first chunk's K/V cached) and as the
    decode of its last token, alone or beside other requests: the same bits, token by token
    (the synchronous and overlapped engines batch differently and must agree)."""
    rng = np.random.default_rng(4)
    n, others = 45, [30, 7]
    shape = (3, 64, 3, 64)
    keys = rng.standard_normal(shape), rng.standard_normal(shape)
    q_all = rng.standard_normal((n, 9, 64)).astype(np.float32)

    def run(query_lens, kv_lens, first):  # outputs of request 0's tokens first..kv_lens[0]-1
        md, args = ragged_batch(np.random.default_rng(5), query_lens, kv_lens, keys=keys)
        q = np.asarray(args[0]).copy()
        q[:query_lens[0]] = q_all[first:kv_lens[0]]
        return attend(md, (jnp.asarray(q), *args[1:]), "cpu")[:query_lens[0]]

    whole = run([n], [n], 0)
    np.testing.assert_array_equal(run([n - 20], [n - 20], 0), whole[:n - 20])
    np.testing.assert_array_equal(run([20, *others], [n, *others], n - 20), whole[n - 20:])
    np.testing.assert_array_equal(run([13, 1, 5], [n, 40, 5], n - 13), whole[n - 13:])
    np.testing.assert_array_equal(run([1], [n], n - 1), whole[n - 1:])  # a decode-only step
    np.testing.assert_array_equal(run([1, 1], [n, 9], n - 1), whole[n - 1:])


def test_dispatch_runs_the_kernel_on_cpu():
    rng = np.random.default_rng(1)
    md, args = decode_batch(rng, [5, 40])
    assert _custom_calls(md, args) == 1  # the default on CPU
    assert _custom_calls(md, args, impl="reference") == 0
    mixed = build_metadata(query_lens=[1, 3], kv_lens=[5, 40], page_tables=[[1], [2, 3, 4]],
                           page_size=16, num_tokens=4, num_requests=2, num_pages_per_request=4,
                           num_blocks=4, query_block=1)
    assert not mixed.decode_only
    assert _custom_calls(mixed, args) == 1  # prefill and mixed steps too
    assert _custom_calls(mixed, args, impl="reference") == 0
    with pytest.raises(ValueError, match="bfloat16 stored as uint16 bits"):
        bf16 = [x.astype(jnp.bfloat16) for x in args]
        kernels.ragged_paged_attention(*bf16, md, sm_scale=0.125, impl="cpu")


def test_turned_off_by_the_environment():
    """JAXSERVE_CPU_KERNEL=0: the jnp path, no warning."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from jaxserve.kernels import cpu_library as k\n"
            "assert not k.available(), k.unavailable_reason()\n"
            "print(k.unavailable_reason())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "JAXSERVE_CPU_KERNEL": "0"})
    assert done.returncode == 0, done.stderr
    assert "JAXSERVE_CPU_KERNEL=0" in done.stdout


def test_build_failures_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_library.build(tmp_path)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match=r"compiling the CPU kernels \(cpu_paged_attention.cc, "
                                           r"cpu_matmul.cc\) failed"):
        cpu_library.build(tmp_path)
    assert not list(tmp_path.iterdir()), "a failed build leaves no library behind"


# ---- the matmul (kernels/cpu_matmul.cc) ----

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n", [
    (1, 576, 960), (2, 37, 16), (3, 1, 48), (4, 130, 208),  # streamed: K split per worker
    (5, 576, 576), (7, 300, 64), (9, 96, 80), (32, 1536, 576), (33, 64, 1040),  # tiled
    (64, 129, 32)])
def test_matmul_matches_numpy(dtype, m, k, n):
    """Both regimes, with every tail: rows not a multiple of the tile's (4, or 8 under
    AVX-512), columns not a multiple of the strip's (24 or 48: tails of 8 to 40), depths past
    one panel and odd ones."""
    rng = np.random.default_rng(m * 1000 + n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = jax.jit(cpu_matmul.matmul)(x, w)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_matmul_einsums_and_what_it_declines():
    """The model's projection einsums go through the kernel; anything else, or more rows than
    MAX_ROWS (for the vectors it was built for), is declined (None) for XLA's dot."""
    rng = np.random.default_rng(3)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # bf16: any rows
    cases = [("TD,DKCE->TKCE", arr(3, 64), arr(64, 3, 5, 16)),
             ("THE,HED->TD", arr(5, 4, 16), arr(4, 16, 64)),
             ("TD,DCF->TCF", arr(2, 64), arr(64, 2, 40)),
             ("TF,FD->TD", arr(1, 96), arr(96, 64))]
    for spec, x, w in cases:
        hlo = jax.jit(lambda x, w: cpu_matmul.einsum(spec, x, w)).lower(x, w).as_text()
        assert hlo.count(cpu_matmul.TARGET) == 1, spec
        want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
        np.testing.assert_allclose(np.asarray(cpu_matmul.einsum(spec, x, w)), want, atol=1e-4,
                                   rtol=1e-5)
    f32 = lambda a: a.astype(jnp.float32)
    assert cpu_matmul.einsum("BD,VD->BV", f32(arr(1, 64)), f32(arr(16, 64))) is None  # f32 [N, K]
    assert cpu_matmul.einsum("TD,DF->TF", arr(1, 64), arr(64, 12)) is None  # N % 16
    limit = cpu_matmul.max_rows(jnp.float32)
    assert cpu_matmul.einsum("TD,DF->TF", f32(arr(limit, 64)), f32(arr(64, 16))) is not None
    assert cpu_matmul.einsum("TD,DF->TF", f32(arr(limit + 1, 64)), f32(arr(64, 16))) is None
    assert cpu_matmul.max_rows(jnp.bfloat16) is None
    assert cpu_matmul.einsum("TD,DF->TF", arr(512, 64), arr(64, 16)) is not None


@pytest.mark.parametrize("m,k,n", [(1, 576, 4096), (3, 100, 7), (32, 576, 1000), (33, 70, 130)])
def test_matmul_of_a_transposed_bf16_weight(m, k, n):
    """A tied head, x [M, K] . table [N, K]^T in bf16: on the bf16 dot instructions where the
    CPU has them (against numpy, every tail of the 4 x 4 tile and of K's 32-wide steps, and
    each row the same bits alone); declined for XLA's dot where it does not."""
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), jnp.bfloat16)
    head = jax.jit(lambda x, w: cpu_matmul.einsum("BD,VD->BV", x, w))
    if not cpu_library.has_bf16_dot():
        assert cpu_matmul.einsum("BD,VD->BV", x, w) is None
        return
    got = np.asarray(head(x, w))
    np.testing.assert_allclose(got, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T,
                               atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(head(x[:1], w))[0], got[0])
    assert cpu_matmul.einsum("BD,VD->BV", x.astype(jnp.float32), w) is None  # bf16 x only


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_rows_do_not_depend_on_the_batch(dtype):
    """A row's result is the same bits alone, streamed with 3 others, or tiled among 31 or 63
    others: both regimes sum the same chunks of K in the same order."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((64, 600)), dtype)
    w = jnp.asarray(rng.standard_normal((600, 208)) / 25, dtype)
    mm = jax.jit(cpu_matmul.matmul)
    alone = np.asarray(mm(x[:1], w))[0]
    for m in (2, 4, 5, 32, 64):
        np.testing.assert_array_equal(np.asarray(mm(x[:m], w))[0], alone, err_msg=f"M={m}")


PACK_SPECS = [("TD,DKCE->TKCE", (64, 3, 5, 16)), ("THE,HED->TD", (9, 16, 64)),
              ("TD,DCF->TCF", (576, 2, 208)), ("TF,FD->TD", (130, 48)), ("BD,VD->BV", (1040, 64))]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 33, 256])
@pytest.mark.parametrize("spec,shape", PACK_SPECS)
def test_packed_matmul_matches_numpy(spec, shape, m):
    """Packed weights (cpu_matmul.pack) through einsum, each projection form of the model and
    the tied head: against numpy in float64 at the few-row tiles (up to 4 rows: 4 strips a
    pass) and the 8 x 3 ones, with strip tails (13 and 65 strips of 16 columns) and an odd
    number of pairs (K = 130). Without the bf16 dot instructions nothing is packed."""
    rng = np.random.default_rng(m + sum(shape))
    w = jnp.asarray(rng.standard_normal(shape) / 8, jnp.bfloat16)
    c = 1 if spec.startswith("TD") or spec.startswith("TF") or spec.startswith("BD") else 2
    x = jnp.asarray(rng.standard_normal((m, *(shape[-c:] if spec == "BD,VD->BV" else shape[:c]))),
                    jnp.bfloat16)
    if not cpu_library.has_bf16_dot():
        assert not cpu_matmul.packable(spec, w)
        return
    assert cpu_matmul.packable(spec, w)
    wp = cpu_matmul.pack(spec, w)
    assert wp.dtype == jnp.uint32 and wp.size * 2 == w.size
    got = jax.jit(lambda x, wp: cpu_matmul.einsum(spec, x, wp))(x, wp)
    want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_packed_matmul_rows_do_not_depend_on_the_batch():
    """Each y[m, n] is one chain over K in order, whatever the tile: a row is the same bits
    alone, with 3 others (few-row tiles) or among 31 or 255 (8-row tiles, a row tail)."""
    if not cpu_library.has_bf16_dot():
        pytest.skip("needs AVX512_BF16 (asserted unpackable in test_packed_matmul_matches_numpy)")
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((256, 600)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((600, 208)) / 25, jnp.bfloat16)
    wp = cpu_matmul.pack("TD,DF->TF", w)
    mm = jax.jit(lambda x: cpu_matmul.einsum("TD,DF->TF", x, wp))
    alone = np.asarray(mm(x[:1]))[0]
    for m in (2, 4, 5, 32, 255):
        np.testing.assert_array_equal(np.asarray(mm(x[:m]))[0], alone, err_msg=f"M={m}")


@pytest.mark.parametrize("m", [1, 3, 6, 7, 13, 256])
def test_packed_swiglu_rounds_as_the_model_does(m):
    """silu(gate) * up in the packed gate_up matmul's epilogue (cpu_matmul.swiglu) against the
    model's jnp path over the same matmul (llama.MLP: gate_up rounded to bf16, SiLU in float32
    rounded once, the product rounded): equal but for e^x's last bits (within one bf16 step,
    almost all equal); row tails of the 6-row tile and a strip tail (13 strips of gate); each
    row the same bits alone."""
    if not cpu_library.has_bf16_dot():
        pytest.skip("needs AVX512_BF16 (asserted unpackable in test_packed_matmul_matches_numpy)")
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, 576)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((576, 2, 208)) / 12, jnp.bfloat16)
    wp = cpu_matmul.pack("TD,DCF->TCF", w)
    got = np.asarray(jax.jit(cpu_matmul.swiglu)(x, wp), np.float32)
    gate_up = cpu_matmul.einsum("TD,DCF->TCF", x, wp).astype(jnp.bfloat16)
    gate = gate_up[:, 0].astype(jnp.float32)
    want = np.asarray((gate * jax.nn.sigmoid(gate)).astype(jnp.bfloat16) * gate_up[:, 1], np.float32)
    assert got.shape == (m, 208)
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-30)
    assert (got == want).mean() > 0.99
    np.testing.assert_array_equal(np.asarray(cpu_matmul.swiglu(x[-1:], wp), np.float32)[0], got[-1])


def test_what_packing_declines():
    """float32, an odd last contracted axis, or output columns not a multiple of 16."""
    arr = lambda *s: jnp.zeros(s, jnp.bfloat16)
    assert not cpu_matmul.packable("TD,DF->TF", arr(64, 32).astype(jnp.float32))
    assert not cpu_matmul.packable("THE,HED->TD", arr(4, 15, 64))
    assert not cpu_matmul.packable("TD,DF->TF", arr(64, 24))
    assert not cpu_matmul.packable("TD,DF->FT", arr(64, 64))  # not a projection form


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": True, "o_bias": True},
                                     {"tie_word_embeddings": False}])
def test_runner_packs_bf16_weights_for_its_programs(make_tiny_engine, tiny_model, variant):
    """On one CPU device in bf16 the programs take packed copies of the projections and of the
    tied head's table (or the untied head's); the live model keeps the checkpoint layout;
    log-probs equal the unpacked runner's to bf16 rounding (with biases, Qwen2's, added after
    the packed matmul as after any), and an edited weight is packed again by sync_weights."""
    import dataclasses

    from jaxserve.models.llama import init_model
    from jaxserve.sampling import SamplingParams

    config = dataclasses.replace(tiny_model.config, **variant)
    model = init_model(config, jax.random.PRNGKey(1), jnp.bfloat16, scale=0.5)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "bias":  # zeros from init: make them count
            var.set_value(jax.random.normal(jax.random.PRNGKey(len(path)), var.shape, var.dtype))
    runs, engines = [], []
    for packed in (True, False):
        engine = make_tiny_engine(model, cpu_packed_weights=packed)
        engine.add_request("a", list(range(100, 140)), SamplingParams(
            temperature=0, max_tokens=1, logprobs=5, prompt_logprobs=1))
        while engine.has_unfinished_requests():
            done = [o for o in engine.step() if o.finished]
        runs.append((done[0].prompt_logprobs[1:], done[0].outputs[0].logprobs[0]))
        engines.append(engine)
    (prompt_a, first_a), (prompt_b, first_b) = runs
    assert first_a.keys() == first_b.keys()
    np.testing.assert_allclose([v.logprob for v in first_a.values()],
                               [v.logprob for v in first_b.values()], atol=0.03)
    np.testing.assert_allclose([next(iter(lp.values())).logprob for lp in prompt_a],
                               [next(iter(lp.values())).logprob for lp in prompt_b], atol=0.03)
    runner = engines[0].runner
    dtypes = lambda leaves: [x.dtype for x in leaves]
    if not cpu_library.has_bf16_dot():
        assert jnp.uint32 not in dtypes(runner._layer_leaves[0])
        return
    assert dtypes(runner._layer_leaves[0]).count(jnp.uint32) == 4  # qkv, o, gate_up, down
    tied = config.tie_word_embeddings
    assert dtypes(runner._head_embed_leaves) == [jnp.uint32 if tied else jnp.bfloat16]
    assert (jnp.uint32 in dtypes(runner._head_leaves)) != tied  # an untied head's own weight
    assert dtypes(runner._embed_leaves) == [jnp.bfloat16]
    assert all(x.dtype != jnp.uint32 for x in jax.tree.leaves(nnx.state(runner.model)))
    assert jnp.uint32 not in dtypes(engines[1].runner._layer_leaves[0])
    down = runner.model.layers[1].mlp.down.kernel
    down.set_value(down[...] * 2)
    runner.sync_weights()
    want = cpu_matmul.pack("TF,FD->TD", down[...])
    assert any(x.shape == want.shape and bool((x == want).all()) for x in runner._layer_leaves[1])


def test_runner_keeps_one_copy_where_two_would_not_fit(make_tiny_engine, tiny_model,
                                                        monkeypatch, caplog):
    """On a machine whose memory two copies of the weights would fill past half, the runner
    runs the live model's own weights (unpacked) and says why."""
    import os

    from jaxserve.models.llama import init_model

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 16}  # 64 KB of memory
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    model = init_model(tiny_model.config, jax.random.PRNGKey(1), jnp.bfloat16, scale=0.5)
    with caplog.at_level("WARNING", logger="jaxserve"):
        engine = make_tiny_engine(model)
    assert all(x.dtype != jnp.uint32 for x in engine.runner._layer_leaves[0])
    assert ("not packing the weights" in caplog.text) == cpu_library.has_bf16_dot()


def test_runner_uses_the_matmul_on_one_cpu_device_only(tiny_model):
    """The runner routes its own copy's projections through the kernel on a one-device CPU
    mesh, never under a larger mesh (the partitioner would gather whole weights for it); the
    model it was given keeps XLA's dot."""
    from jaxserve.config import EngineConfig
    from jaxserve.models import llama
    from jaxserve.parallel import make_mesh
    from jaxserve.runner import ModelRunner

    ops = lambda model: {node.einsum_op if isinstance(node, nnx.Einsum) else node.tied_op
                         for _, node in nnx.iter_graph(model)
                         if isinstance(node, (nnx.Einsum, llama.LMHead))}
    engine = EngineConfig(max_model_len=64, max_num_seqs=2, page_size=8)
    one = ModelRunner(tiny_model, engine, num_pages=16)
    assert ops(one.model) == {llama.project_cpu}
    assert ops(tiny_model) == {llama.project}
    two = ModelRunner(tiny_model, engine, num_pages=16, mesh=make_mesh(2))
    assert ops(two.model) == {llama.project}
