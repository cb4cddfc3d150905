"""The C++ decode-attention kernel (kernels/cpu_paged_decode.cc, through the XLA FFI): against
the jnp path at the default model's head shape, what the dispatch picks, and how it fails."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import kernels
from jaxserve.kernels import build_metadata, cpu_paged_decode
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
    return hlo.count(cpu_paged_decode.TARGET)


def test_dispatch_runs_the_kernel_for_decode_steps_only():
    rng = np.random.default_rng(1)
    md, args = decode_batch(rng, [5, 40])
    assert _custom_calls(md, args) == 1  # the default on CPU
    assert _custom_calls(md, args, impl="reference") == 0
    mixed = build_metadata(query_lens=[1, 3], kv_lens=[5, 40], page_tables=[[1], [2, 3, 4]],
                           page_size=16, num_tokens=4, num_requests=2, num_pages_per_request=4,
                           num_blocks=4, query_block=1)
    assert not mixed.decode_only
    assert _custom_calls(mixed, args) == 0
    assert _custom_calls(mixed, args, impl="cpu") == 0  # "cpu" runs prefill in the reference
    with pytest.raises(ValueError, match="bfloat16 stored as uint16 bits"):
        bf16 = [x.astype(jnp.bfloat16) for x in args]
        kernels.ragged_paged_attention(*bf16, md, sm_scale=0.125, impl="cpu")


def test_turned_off_by_the_environment():
    """JAXSERVE_CPU_KERNEL=0: the jnp path, no warning."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from jaxserve.kernels import cpu_paged_decode as k\n"
            "assert not k.available(), k.unavailable_reason()\n"
            "print(k.unavailable_reason())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "JAXSERVE_CPU_KERNEL": "0"})
    assert done.returncode == 0, done.stderr
    assert "JAXSERVE_CPU_KERNEL=0" in done.stdout


def test_build_failures_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_paged_decode.build(tmp_path)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match="compiling cpu_paged_decode.cc failed"):
        cpu_paged_decode.build(tmp_path)
    assert not list(tmp_path.iterdir()), "a failed build leaves no library behind"
