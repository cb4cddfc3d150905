"""Attention kernels behind one dispatch.

`ragged_paged_attention` is what the models call. It runs the Pallas kernel of the backend the
arrays live on (`tpu_ragged_paged_attention` on TPU, `gpu_ragged_paged_attention` on GPU) and
the pure-jnp reference (`ragged_paged_attention.ref_ragged_paged_attention`) elsewhere;
`impl=` overrides the choice and `interpret=True` runs a kernel in Pallas interpret mode (CPU
tests, benchmarks). Shapes a kernel cannot run (say, a head dim it cannot tile) fall back to the
reference with one warning per reason. All of them only read the cache: the new K/V are
written by `write_kv`, in a program of its own (see ragged_paged_attention.py for why).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import jax

from jaxserve.kernels.metadata import AttentionMetadata, build_metadata, num_query_blocks
from jaxserve.kernels.ragged_paged_attention import ref_ragged_paged_attention, write_kv

IMPLS = ("reference", "tpu", "gpu")
KERNELS = ("tpu", "gpu")  # each is jaxserve.kernels.<name>_ragged_paged_attention


def kernel_module(impl: str):
    """The kernel's module, imported on first use: a JAX without one Pallas backend (Triton is
    deprecated in 0.11) still imports jaxserve."""
    return importlib.import_module(f"jaxserve.kernels.{impl}_ragged_paged_attention")


def backend_of(x) -> str:
    """Platform ("cpu", "gpu", "tpu") of the devices a concrete array lives on; inside a trace,
    where arrays have no devices yet, the default backend (the one jit compiles for)."""
    try:
        return next(iter(x.devices())).platform
    except (AttributeError, jax.errors.ConcretizationTypeError):  # numpy array, tracer
        return jax.default_backend()


@functools.cache
def _warn_fallback(impl: str, reason: str) -> None:
    """Warn once per (kernel, reason): the cache remembers which were said."""
    warnings.warn(f"ragged_paged_attention: the {impl} kernel does not support {reason}; "
                  f"using the jnp reference", stacklevel=3)


def ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, impl: str | None = None,
                           interpret: bool = False):
    """q [T, H, E], caches [P, S, K, E] (read only), new K/V [T, K, E] -> out [T, H, E].

    impl: None picks by backend (TPU -> "tpu", GPU -> "gpu", else "reference"); an explicit
    kernel on another backend needs interpret=True (Pallas interpret mode, slow, for tests)."""
    if impl not in (None, *IMPLS):
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS} or None")
    backend = backend_of(q)
    if impl is None:
        impl = backend if backend in KERNELS else "reference"
    if impl in KERNELS and backend != impl and not interpret:
        raise ValueError(f"impl={impl!r} needs {impl.upper()} arrays, these are on {backend}; "
                         f"pass interpret=True to run it in Pallas interpret mode")
    if impl in KERNELS:
        kernel = kernel_module(impl)
        reason = kernel.unsupported_reason(q.shape, k_cache.shape, q.dtype, k_cache.dtype)
        if reason is None:
            return kernel.ragged_paged_attention(
                q, k_cache, v_cache, k_new, v_new, md, sm_scale=sm_scale,
                sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret)
        _warn_fallback(impl, reason)
    return ref_ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md, sm_scale=sm_scale,
                                      sliding_window=sliding_window, soft_cap=soft_cap)


__all__ = ["AttentionMetadata", "IMPLS", "KERNELS", "backend_of", "build_metadata", "kernel_module",
           "num_query_blocks", "ragged_paged_attention", "ref_ragged_paged_attention", "write_kv"]
