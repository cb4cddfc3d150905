"""Decode attention on CPU as a C++ kernel called through the XLA FFI (`jax.ffi`).

XLA:CPU gathers element by element, redoing the index arithmetic for every element, so the jnp
path's page gathers alone ran 3-12x above the copy-bandwidth floor (docs/performance.md).
`cpu_paged_decode.cc` reads each page in place, in the cache's own [P, S, K, E] layout, once,
with an online softmax per (request, KV head) spread over XLA's intra-op thread pool. It serves
decode-only steps (`md.decode_only`); prefill chunks and mixed steps keep the jnp path.

The source is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) against
the FFI headers jaxlib ships, `-O3 -march=native`, into `~/.cache/jaxserve/kernels` (or
`$JAXSERVE_KERNEL_CACHE`), keyed by the source, jaxlib's version, the compiler and the
processor, so each machine builds it once (a few seconds). Where that fails (no compiler),
`available()` is false, one warning says why, and the jnp path runs instead.
`JAXSERVE_CPU_KERNEL=0` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxserve.kernels.metadata import AttentionMetadata
from jaxserve.kernels.storage import BITS

TARGET = "jaxserve_paged_decode"
SOURCE = pathlib.Path(__file__).with_name("cpu_paged_decode.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd")


def _cpu_model() -> str:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def _cache_dir() -> pathlib.Path:
    path = os.environ.get("JAXSERVE_KERNEL_CACHE")
    return pathlib.Path(path) if path else pathlib.Path.home() / ".cache" / "jaxserve" / "kernels"


def build(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """The kernel's shared library, compiled if this machine has no copy yet. Raises
    RuntimeError (with the compiler's message) when it cannot be built."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set $CXX)")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, cxx, *FLAGS,
                                    _cpu_model()]).encode()).hexdigest()[:16]
    cache_dir = cache_dir or _cache_dir()
    lib = cache_dir / f"paged_decode_{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    include = jax.ffi.include_dir()
    # build beside the target and rename: processes building at once (test workers) never see
    # a half-written library
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".so", delete=False) as tmp:
        pass
    cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp.name]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp.name)
        raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    os.replace(tmp.name, lib)
    return lib


_LOCK = threading.Lock()


@functools.cache
def _load_once() -> str | None:
    if os.environ.get("JAXSERVE_CPU_KERNEL", "1") == "0":
        return "turned off by JAXSERVE_CPU_KERNEL=0"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as err:
        return str(err)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxservePagedDecode), platform="cpu")
    return None


def _load() -> str | None:
    """Build, load and register the kernel once per process (programs traced from several
    threads wait for the first); None if it is available, else why not."""
    with _LOCK:
        return _load_once()


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (None when it can); builds it on first call."""
    return _load()


@functools.cache
def _warn(reason: str) -> None:
    warnings.warn(f"the CPU decode-attention kernel is not available ({reason}); using the jnp "
                  f"path", stacklevel=4)


def available() -> bool:
    """True when decode attention can run the kernel here (warns once when it cannot)."""
    reason = unavailable_reason()
    if reason is not None and "JAXSERVE_CPU_KERNEL=0" not in reason:
        _warn(reason)
    return reason is None


def supports(k_cache) -> bool:
    """Whether the kernel reads this cache's dtype (float32, or bfloat16 kept as bits)."""
    return jnp.dtype(k_cache.dtype) in (jnp.dtype(jnp.float32), BITS)


def paged_decode(q, k_cache, v_cache, k_new, v_new, md: AttentionMetadata, *, sm_scale: float,
                 sliding_window: int | None = None, soft_cap: float | None = None):
    """Decode-only attention (`md.decode_only`), the same function as the jnp path's
    `_decode_attention`: q [T, H, E], caches [P, S, K, E] (read only), this step's k_new /
    v_new [T, K, E] -> out [T, H, E]."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the CPU decode kernel is not available: {reason}")
    md = jax.tree_util.tree_map(jnp.asarray, md)
    t, h, e = q.shape
    valid = md.block_len > 0  # [N]: padding blocks attend to nothing and write nowhere
    tok = jnp.where(valid, md.block_start, 0)
    cached = jnp.where(valid, md.kv_lens[md.block_request] - 1, 0)
    f32 = lambda x: x[tok].astype(jnp.float32)
    n = tok.shape[0]
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, h, e), jnp.float32),
                           vmap_method="sequential")(
        f32(q), k_cache, v_cache, f32(k_new), f32(v_new),
        md.page_table[md.block_request].astype(jnp.int32), cached.astype(jnp.int32),
        md.positions[tok].astype(jnp.int32),
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        window=np.int64(sliding_window or 0))
    dest = jnp.where(valid, tok, t)
    return jnp.zeros((t, h, e), q.dtype).at[dest].set(out.astype(q.dtype), mode="drop")
