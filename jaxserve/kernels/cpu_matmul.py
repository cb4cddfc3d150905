"""The model's projections on CPU at decode sizes, as a C++ kernel through the XLA FFI.

XLA:CPU's dot runs few-row projections well below the machine: at 1-4 rows it reads bf16
weights at a few GB/s (it converts them whole), and on AVX2 its 32-row dots ran 2.4-2.8x the
time of one large matmul at the same FLOP rate (benchmarks/matmuls.py; docs/performance.md).
`cpu_matmul.cc` computes x [M, K] . w [K, N] -> [M, N] float32 in the model's own weight layout,
streaming w for M <= 4 and with packed register tiles above (8 x 48 under AVX-512, 4 x 24 on
AVX2), bf16 x bf16 on VDPBF16PS where the CPU has AVX512_BF16; and x [M, K] . w [N, K]^T for a
tied head's table (bf16 on VDPBF16PS only).

`einsum(spec, x, w)` takes the einsums llama.py's projections use (x's trailing axes contract
with w's leading ones, as in "TD,DKCE->TKCE", or with its trailing ones, as the tied head's
"BD,VD->BV") and returns None for anything else, or for more rows than MAX_ROWS, where XLA's
dot is faster (measured per dtype and vector width). A row's result is the same bits whatever
the number of rows and the threads (cpu_matmul.cc), so a request's projections do not depend
on the batch it shares while the kernel computes them.

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
# 30 layers of distinct weights), by the vectors it was built for:
# - AVX2 (2 Zen 3 cores, 2026-12-02): float32 even at 1 row (within noise), 1.4-2.5x faster at
#   4, 1.0-1.5x at 32, even at 64-128, 0.77-0.87x at 512 (prefill chunks keep XLA's dot);
#   bfloat16 faster at every size measured: 5-14x at 1 row (XLA converts whole bf16 weights
#   there), 1.1-2.5x at 4-32, 1.1-1.6x at 128 and 512.
# - AVX-512 with AVX512_BF16 (2 Zen 5 cores, 2026-12-02): float32 1.1-1.4x faster at 1 row but
#   0.55-0.85x at 4 and 0.7-0.9x at 32 (XLA's float32 dot uses the same 16-float FMAs, and
#   overlaps the weight reads better); bfloat16 (VDPBF16PS on both sides) 10-20x faster at 1
#   row, even at 4, 1.0-1.3x at 32, even at 128 and 512 (0.8-1.3x).
MAX_ROWS = {
    "avx2": {jnp.dtype(jnp.float32): 32, jnp.dtype(jnp.bfloat16): None},
    "avx512": {jnp.dtype(jnp.float32): 1, jnp.dtype(jnp.bfloat16): None},
}


def max_rows(dtype) -> int | None:
    """MAX_ROWS of `dtype` weights for the vectors the kernels were built for (builds them)."""
    return MAX_ROWS["avx512" if cpu_library.has_avx512() else "avx2"].get(jnp.dtype(dtype), 0)


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
    """Whether `einsum` computes this projection (shape, dtype and size, for the vectors the
    kernels were built for; not whether they built, nor the bf16 dot instructions a transposed
    w needs: see einsum)."""
    form = _contraction(spec)
    if form is None or x.ndim != form[0] + 1 or w.ndim != form[0] + form[1]:
        return False
    c, _, transposed = form
    if transposed:  # bf16 only, any rows: VDPBF16PS
        return x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16
    n = math.prod(w.shape[c:])
    if w.dtype not in (jnp.float32, jnp.bfloat16) or x.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    limit = max_rows(w.dtype)
    return n % LANES == 0 and (limit is None or x.shape[0] <= limit)


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
    if not cpu_library.available() or not supports(spec, x, w):
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
