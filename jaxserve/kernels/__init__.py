"""Attention kernels behind one dispatch.

`ragged_paged_attention` is what the models call. Today it runs the pure-jnp reference
(`ragged_paged_attention.ref_ragged_paged_attention`) on every backend; Pallas kernels for GPU
and TPU plug in here, chosen by the backend the arrays live on, with `impl=` as the override.
"""

from __future__ import annotations

from jaxserve.kernels.metadata import AttentionMetadata, build_metadata, num_query_blocks
from jaxserve.kernels.ragged_paged_attention import ref_ragged_paged_attention, write_kv

IMPLS = ("reference",)


def ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, impl: str | None = None):
    """q [T, H, E], caches [P, S, K, E] (read only), new K/V [T, K, E] -> out [T, H, E].
    The new K/V are written afterwards by `write_kv`, in a program of its own (see the
    reference's module docstring for why)."""
    if impl not in (None, *IMPLS):
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    return ref_ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md, sm_scale=sm_scale,
                                      sliding_window=sliding_window, soft_cap=soft_cap)


__all__ = ["AttentionMetadata", "build_metadata", "num_query_blocks", "ragged_paged_attention",
           "ref_ragged_paged_attention", "write_kv"]
