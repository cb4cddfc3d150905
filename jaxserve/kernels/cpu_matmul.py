"""The model's projections on CPU at decode sizes, as a C++ kernel through the XLA FFI.

XLA:CPU's dot runs few-row projections well below the machine: at 32 rows the x . W form took
2.4-2.8x the time of one large matmul at the same FLOP rate, and at 1-4 rows it read bf16 weights
at a few GB/s (benchmarks/matmuls.py; docs/performance.md). `cpu_matmul.cc` computes
x [M, K] . w [K, N] -> [M, N] float32 in the model's own weight layout, streaming w for M <= 4
and with packed 4 x 24 register tiles above.

`einsum(spec, x, w)` takes the einsums llama.py's projections use (x's trailing axes contract
with w's leading ones, as in "TD,DKCE->TKCE") and returns None for anything else, or for more
rows than MAX_ROWS, where XLA's dot is faster (measured per dtype, see MAX_ROWS). A row's result
is the same bits whatever the number of rows and the threads (cpu_matmul.cc), so a request's
projections do not depend on the batch it shares while the kernel computes them.

It runs only where the caller knows the program is single-device CPU (llama.use_cpu_matmul):
under a multi-device mesh the partitioner would have to gather each weight for the call.
How it is built and loaded: cpu_library.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxserve.kernels import cpu_library

TARGET = "jaxserve_matmul"
TARGET_ROWS = "jaxserve_matmul_rows"
LANES = 16  # N must be a multiple of the widest vector (AVX-512's 16 floats; AVX2 needs 8)

# Rows up to which the kernel runs (None: any), where it beats XLA's dot (`benchmarks/matmuls.py`,
# 30 layers of distinct weights, 2 Zen 3 cores, 2026-12-02): float32 even at 1 row (within
# noise), 1.4-2.5x faster at 4, 1.0-1.5x at 32, even at 64-128, 0.77-0.87x at 512 (prefill
# chunks keep XLA's dot); bfloat16 faster at every size measured: 5-14x at 1 row (XLA converts
# whole bf16 weights there), 1.1-2.5x at 4-32, 1.1-1.6x at 128 and 512.
MAX_ROWS = {jnp.dtype(jnp.float32): 32, jnp.dtype(jnp.bfloat16): None}


def _contraction(spec: str) -> tuple[int, int, bool] | None:
    """(axes contracted, axes kept, whether w is [*N, *C]) when `spec` is x [T, *C] . w [*C, *N]
    -> [T, *N] (the projections) or x [T, *C] . w [*N, *C] -> [T, *N] (a tied head's table)."""
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    c = len(xs) - 1
    if c < 1 or len(set(xs + ws)) != len(xs) + len(ws) - c:
        return None
    if ws[:c] == xs[1:] and out == xs[0] + ws[c:]:
        return c, len(ws) - c, False
    if ws[-c:] == xs[1:] and out == xs[0] + ws[:-c]:
        return c, len(ws) - c, True
    return None


def supports(spec: str, x, w) -> bool:
    """Whether `einsum` computes this projection (shape, dtype and size; not availability, nor
    the bf16 dot instructions a transposed w needs: see einsum)."""
    form = _contraction(spec)
    if form is None or x.ndim != form[0] + 1 or w.ndim != form[0] + form[1]:
        return False
    c, _, transposed = form
    if transposed:  # bf16 only, any rows: VDPBF16PS
        return x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16
    n = math.prod(w.shape[c:])
    dtype = jnp.dtype(w.dtype)
    if dtype not in MAX_ROWS or x.dtype not in (jnp.float32, jnp.bfloat16) or n % LANES:
        return False
    return MAX_ROWS[dtype] is None or x.shape[0] <= MAX_ROWS[dtype]


def matmul(x, w):
    """x [M, K] . w [K, N] -> [M, N] float32; w float32 or bfloat16, x any float (bfloat16 x
    with bfloat16 w runs on the bf16 dot-product instructions where the CPU has them)."""
    cpu_library.require("CPU matmul kernel")
    if x.dtype != jnp.bfloat16:
        x = x.astype(jnp.float32)
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))(
        x, w)


def matmul_rows(x, w):
    """x [M, K] . w [N, K]^T -> [M, N] float32, both bfloat16 (a tied head: the embedding table
    as it is stored). Needs the bf16 dot instructions (cpu_library.has_bf16_dot)."""
    if not cpu_library.has_bf16_dot():
        raise RuntimeError("the CPU matmul of a transposed bf16 weight needs AVX512_BF16: "
                           + (cpu_library.unavailable_reason() or "this CPU lacks it"))
    return jax.ffi.ffi_call(TARGET_ROWS,
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(x, w)


def einsum(spec: str, x, w):
    """The projection `spec` through the kernel, float32, or None where it does not apply."""
    if not supports(spec, x, w) or not cpu_library.available():
        return None
    c, _, transposed = _contraction(spec)
    if transposed:
        if not cpu_library.has_bf16_dot():
            return None
        k, n = math.prod(w.shape[w.ndim - c:]), math.prod(w.shape[:w.ndim - c])
        y = matmul_rows(x.reshape(x.shape[0], k), w.reshape(n, k))
        return y.reshape(x.shape[0], *w.shape[:w.ndim - c])
    k, n = math.prod(w.shape[:c]), math.prod(w.shape[c:])
    y = matmul(x.reshape(x.shape[0], k), w.reshape(k, n))
    return y.reshape(x.shape[0], *w.shape[c:])
