"""Attention kernels behind one dispatch.

`ragged_paged_attention` is what the models call. It runs the Pallas kernel of the backend the
arrays live on (`tpu_ragged_paged_attention` on TPU, `gpu_ragged_paged_attention` on GPU); on
CPU, the C++ kernel of `cpu_paged_attention` (through the XLA FFI) where it builds, else the
pure-jnp reference
(`ragged_paged_attention.ref_ragged_paged_attention`); `impl=` overrides the choice and
`interpret=True` runs a kernel in Pallas interpret mode (CPU tests, benchmarks). Shapes a kernel
cannot run (say, a head dim it cannot tile) fall back to the reference with one warning per
reason. All of them only read the cache: the new K/V are
written by `write_kv`, in a program of its own (see ragged_paged_attention.py for why).

Sharded over a mesh (`mesh=`, tensor parallelism, see parallel.py): both run under `shard_map`,
each device on its own query heads and its own KV heads' cache shard, with the metadata
replicated; a kernel then sees an ordinary smaller problem (H/tp heads, K/tp KV heads), so the
Pallas kernels need no sharding logic of their own.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxserve.config import SparseAttentionConfig
from jaxserve.kernels import cpu_library
from jaxserve.kernels import cpu_paged_attention as _cpu
from jaxserve.kernels import sparse as _sparse
from jaxserve.kernels.metadata import AttentionMetadata, build_metadata, num_query_blocks
from jaxserve.kernels.ragged_paged_attention import ref_ragged_paged_attention
from jaxserve.kernels.ragged_paged_attention import write_kv as _write_kv

TENSOR = "tensor"  # the mesh axis split over heads (parallel.TENSOR)
_HEADS = P(None, TENSOR, None)  # q, out [T, H, E]; k_new, v_new [T, K, E]
_CACHE = P(None, None, TENSOR, None)  # caches [P, S, K, E]
_SUMMARY = P(None, None, TENSOR, None)  # key summaries [P, 2, K, E] (kernels/sparse.py)


def _is_sharded(mesh: Mesh | None) -> bool:
    return mesh is not None and dict(mesh.shape).get(TENSOR, 1) > 1


def write_kv(kv, new_kv, slot_mapping, *, mesh: Mesh | None = None):
    """Scatter new K/V [T, K, E] per layer into the caches [P, S, K, E] at slots [T] (see
    ragged_paged_attention.write_kv); with a mesh, each device writes its own KV heads."""
    if not _is_sharded(mesh):
        return _write_kv(kv, new_kv, slot_mapping)
    return jax.shard_map(_write_kv, mesh=mesh, in_specs=(_CACHE, _HEADS, P()), out_specs=_CACHE,
                         check_vma=False)(kv, new_kv, slot_mapping)


def write_summaries(summaries, k_news, slot_mapping, *, page_size: int, mesh: Mesh | None = None):
    """Fold this step's keys (per layer [T, K, E]) into the page summaries (per layer
    [P, 2, K, E], see sparse.py); with a mesh, each device its own KV heads."""
    write = functools.partial(_sparse.write_summaries, page_size=page_size)
    if not _is_sharded(mesh):
        return write(summaries, k_news, slot_mapping)
    return jax.shard_map(write, mesh=mesh, in_specs=(_SUMMARY, _HEADS, P()), out_specs=_SUMMARY,
                         check_vma=False)(summaries, k_news, slot_mapping)

IMPLS = ("reference", "cpu", "tpu", "gpu")  # "cpu": the C++ kernel (cpu_paged_attention.py)
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
                           interpret: bool = False, mesh: Mesh | None = None,
                           summaries=None, sparse: SparseAttentionConfig | None = None,
                           dense_layer=None, reuse: _sparse.SelectionReuse | None = None):
    """q [T, H, E], caches [P, S, K, E] (read only), new K/V [T, K, E] -> out [T, H, E].

    impl: None picks by backend (TPU -> "tpu", GPU -> "gpu", CPU -> "cpu" where its kernel
    builds, else "reference"); an explicit Pallas kernel on another backend needs
    interpret=True (Pallas interpret mode, slow, for tests). "cpu" runs the C++ kernel
    (cpu_paged_attention.py), decode and prefill alike.
    mesh: heads and KV heads split over its "tensor" axis; each device runs the chosen
    implementation on its shard (K divides by the axis size: parallel.py makes sure of it).
    sparse, summaries: decodes read only the pages chosen from the key summaries (per layer
    [P, 2, K, E], sparse.py); prefill chunks read every page. dense_layer: a
    traced bool, true where this layer keeps every page (one program serves all layers).
    reuse: this layer's kept choice of pages (sparse.SelectionReuse, decode-only steps): then
    the result is (out, chosen [R, W] bool), the page-table slots this step read."""
    if sparse is not None and sliding_window is not None:
        raise ValueError("sparse attention does not support sliding-window attention")
    if reuse is not None and not (sparse is not None and md.decode_only):  # kept: decode steps
        raise ValueError("reuse= is for the decode-only steps of sparse attention")
    if _is_sharded(mesh):
        def local(q, k_cache, v_cache, k_new, v_new, md, summaries, dense_layer, reuse):
            chosen = None
            if sparse is not None:
                md, chosen = _sparse_metadata(q, k_cache, summaries, md, sparse, sm_scale, impl,
                                              interpret, dense_layer, reuse, axis_name=TENSOR)
            out = ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md, sm_scale=sm_scale,
                                         sliding_window=sliding_window, soft_cap=soft_cap,
                                         impl=impl, interpret=interpret)
            return out if reuse is None else (out, chosen)

        specs = (_HEADS, _CACHE, _CACHE, _HEADS, _HEADS, P(), _SUMMARY if sparse else P(), P(), P())
        out_specs = _HEADS if reuse is None else (_HEADS, P())  # every device chose the same
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs,
                             check_vma=False)(q, k_cache, v_cache, k_new, v_new, md,
                                              summaries if sparse else None, dense_layer, reuse)
    if sparse is not None:
        md, chosen = _sparse_metadata(q, k_cache, summaries, md, sparse, sm_scale, impl, interpret,
                                      dense_layer, reuse)
        if reuse is not None:
            out = ragged_paged_attention(q, k_cache, v_cache, k_new, v_new, md, sm_scale=sm_scale,
                                         soft_cap=soft_cap, impl=impl, interpret=interpret)
            return out, chosen
    if impl not in (None, *IMPLS):
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS} or None")
    backend = backend_of(q)
    if impl is None:
        impl = backend if backend in KERNELS else "reference"
        if backend == "cpu" and _cpu.supports(k_cache) and cpu_library.available():
            impl = "cpu"
    if impl == "cpu":
        if backend != "cpu":
            raise ValueError(f"impl='cpu' needs CPU arrays, these are on {backend}")
        if not _cpu.supports(k_cache):
            raise ValueError(f"impl='cpu' reads float32 caches or bfloat16 stored as uint16 bits "
                             f"(kernels/storage.py), not {k_cache.dtype}")
        return _cpu.paged_attention(q, k_cache, v_cache, k_new, v_new, md, sm_scale=sm_scale,
                                    sliding_window=sliding_window, soft_cap=soft_cap)
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


def _sparse_metadata(q, k_cache, summaries, md, sparse, sm_scale, impl, interpret, dense_layer,
                     reuse=None, axis_name=None):
    """The decode step's metadata compacted to the pages sparse attention reads (sparse.py),
    and the page-table slots chosen [R, W] bool.
    The page scores come from the Pallas kernel of the backend on GPU and TPU
    (gpu_sparse_scores.py, tpu_sparse_scores.py), from the jnp reference elsewhere or for shapes
    a kernel does not tile."""
    if summaries is None:
        raise ValueError("sparse attention needs the key summaries of the layer's cache")
    md = jax.tree_util.tree_map(jax.numpy.asarray, md)
    kh = k_cache.shape[2]
    qs = _sparse.request_queries(q, md)
    qs = qs.reshape(qs.shape[0], kh, qs.shape[1] // kh, qs.shape[2])  # [R, K, G, E]
    votes_fn = None  # the jnp reference
    kind = impl or backend_of(q)
    if kind in KERNELS and (interpret or backend_of(q) == kind):
        scores = importlib.import_module(f"jaxserve.kernels.{kind}_sparse_scores")
        if scores.unsupported_reason(qs.shape, summaries.shape, md.page_table.shape[1]) is None:
            votes_fn = functools.partial(scores.page_votes, interpret=interpret)
    dense_rows = None
    if not md.decode_only:  # a step mixing decodes with prefill chunks: the chunks stay dense
        dense_rows = md.query_start[1:] - md.query_start[:-1] != 1
    return _sparse.select_pages(qs, summaries, md, config=sparse, sm_scale=sm_scale,
                                page_size=k_cache.shape[1], axis_name=axis_name, votes_fn=votes_fn,
                                dense=dense_layer, reuse=reuse, dense_rows=dense_rows)


__all__ = ["AttentionMetadata", "IMPLS", "KERNELS", "backend_of", "build_metadata", "kernel_module",
           "num_query_blocks", "ragged_paged_attention", "ref_ragged_paged_attention", "write_kv", "write_summaries"]
