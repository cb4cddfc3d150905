"""The model's projections on CPU at decode sizes, as a C++ kernel through the XLA FFI.

XLA:CPU's dot runs few-row projections well below the machine: at 1-4 rows it reads bf16
weights at a few GB/s (it converts them whole), and on AVX2 its 32-row dots ran 2.4-2.8x the
time of one large matmul at the same FLOP rate (benchmarks/matmuls.py; docs/performance.md).
`cpu_matmul.cc` computes x [M, K] . w [K, N] -> [M, N] float32 in the model's own weight layout,
streaming w for M <= 4 and with packed register tiles above (8 x 48 under AVX-512, 4 x 24 on
AVX2), bf16 x bf16 on VDPBF16PS where the CPU has AVX512_BF16; and x [M, K] . w [N, K]^T for a
tied head's table (bf16 on VDPBF16PS only).

Packed weights (bf16 with AVX512_BF16): `pack` lays a weight out once as the kernel reads it,
(k, k + 1) pairs interleaved in strips of 16 columns, and `einsum` on a packed weight runs
`jaxserve_matmul_packed`: no permutes or per-call panels, each output one register chain over
K (rows batch-invariant). The runner's programs take packed copies of the projections and of a
tied head's table (llama.packed_weights; EngineConfig.cpu_packed_weights). Over 30 layers of
the default model's shapes (`benchmarks/matmuls.py`, rows "kernel" and "packed", 2 Zen 5
cores, 2026-12-03, a shared machine with 25% steal): the four projections at 1 row 8.3 -> 3.8-4.6
ms (weights read at 45-64 GB/s), at 32 rows 21.2 -> 14.6, at 256 rows 109 -> 88.

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
TARGET_PACKED = "jaxserve_matmul_packed"
TARGET_SWIGLU = "jaxserve_matmul_packed_swiglu"
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


def packable(spec: str, w) -> bool:
    """Whether `pack` applies to the weight `w` of the projection `spec`: bf16, an even last
    contracted axis, output columns a multiple of 16, on a CPU with the bf16 dot instructions."""
    form = _contraction(spec)
    if form is None or w.dtype != jnp.bfloat16 or w.ndim != form[0] + form[1]:
        return False
    c, _, transposed = form
    contracted = w.shape[w.ndim - c:] if transposed else w.shape[:c]
    n = math.prod(w.shape[:w.ndim - c] if transposed else w.shape[c:])
    return contracted[-1] % 2 == 0 and n % 16 == 0 and cpu_library.has_bf16_dot()


def pack(spec: str, w):
    """The weight `w` of projection `spec` (x [T, *C] . w -> [T, *N]; see `packable`) as the
    packed kernel reads it: uint32 pairs of bfloat16, (k, k + 1) of the flattened contraction
    interleaved, in strips of 16 output columns, [N / 16, K / 2, 16] in memory. Its shape is
    w's with the last contracted axis halved, so the module's shape logic (Einsum's bias
    broadcast, the einsum's output axes) holds; only `einsum` reads it. A one-off transpose."""
    c, _, transposed = _contraction(spec)
    if transposed:
        kept, contracted = w.shape[:w.ndim - c], w.shape[w.ndim - c:]
        w2 = w.reshape(math.prod(kept), -1).T
    else:
        contracted, kept = w.shape[:c], w.shape[c:]
        w2 = w.reshape(-1, math.prod(kept))
    k, n = w2.shape
    pairs = w2.reshape(k // 2, 2, n // 16, 16).transpose(2, 0, 3, 1)  # [N/16, K/2, 16, 2]
    packed = jax.lax.bitcast_convert_type(pairs, jnp.uint32)  # (k, k + 1): low, high half
    halved = (*contracted[:-1], contracted[-1] // 2)
    return packed.reshape(*kept, *halved) if transposed else packed.reshape(*halved, *kept)


def matmul_packed(x, wp):
    """x [M, K] bfloat16 . wp (`pack`ed, [N / 16, K / 2, 16]) -> [M, N] float32."""
    return jax.ffi.ffi_call(TARGET_PACKED, jax.ShapeDtypeStruct(
        (x.shape[0], wp.shape[0] * 16), jnp.float32))(x, wp)


def swiglu(x, wp):
    """silu(gate) * up in bfloat16 [M, F], gate and up the two halves of x [M, K] bfloat16 .
    wp, wp a `pack`ed [K, 2, F] ("TD,DCF->TCF"): the MLP's first half in one call, rounding
    where llama.MLP's jnp path rounds (cpu_matmul.cc TileSwiglu)."""
    k = x.shape[-1]
    w = wp.reshape(-1, k // 2, 16)
    return jax.ffi.ffi_call(TARGET_SWIGLU, jax.ShapeDtypeStruct(
        (x.shape[0], w.shape[0] * 8), jnp.bfloat16))(x, w)


def _einsum_packed(spec: str, x, wp):
    c, _, transposed = _contraction(spec)
    if x.dtype != jnp.bfloat16:
        raise TypeError(f"a packed weight multiplies bfloat16 inputs, got {x.dtype}")
    kept = wp.shape[:wp.ndim - c] if transposed else wp.shape[c:]
    n = math.prod(kept)
    y = matmul_packed(x.reshape(x.shape[0], -1), wp.reshape(n // 16, -1, 16))
    return y.reshape(x.shape[0], *kept)


def einsum(spec: str, x, w):
    """The projection `spec` through the kernel, float32, or None where it does not apply (a
    `pack`ed w always applies)."""
    if w.dtype == jnp.uint32:
        cpu_library.require("packed CPU matmul")
        return _einsum_packed(spec, x, w)
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
