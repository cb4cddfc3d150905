"""The C++ kernels for XLA:CPU (`cpu_paged_attention.cc`, `cpu_matmul.cc`, sharing `cpu_simd.h`),
built into one shared library and registered as XLA FFI targets (`jax.ffi`).

The sources are compiled on first use with the system's C++ compiler (`$CXX`, else `c++`)
against the FFI headers jaxlib ships, `-O3 -march=native`, into `~/.cache/jaxserve/kernels` (or
`$JAXSERVE_KERNEL_CACHE`), keyed by the sources, jaxlib's version, the compiler and the
processor, so each machine builds them once (a few seconds). Where that fails (no compiler),
`available()` is false, one warning says why, and the XLA paths run instead.
`JAXSERVE_CPU_KERNEL=0` turns the kernels off.
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
import jaxlib

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / "cpu_paged_attention.cc", HERE / "cpu_matmul.cc")
HEADERS = (HERE / "cpu_simd.h",)
# FFI target name -> the handler symbol the library exports
TARGETS = {"jaxserve_paged_attention": "JaxservePagedAttention", "jaxserve_matmul": "JaxserveMatmul",
           "jaxserve_matmul_rows": "JaxserveMatmulRows", "jaxserve_matmul_packed": "JaxserveMatmulPacked",
           "jaxserve_matmul_packed_swiglu": "JaxserveMatmulPackedSwiglu"}
# -ffp-contract=fast: a * b + c as one FMA everywhere (cpu_matmul.cc's two regimes give the same
# bits only if both contract alike)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd",
         "-ffp-contract=fast")


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
    """The kernels' shared library, compiled if this machine has no copy yet. Raises
    RuntimeError (with the compiler's message) when it cannot be built."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set $CXX)")
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, jaxlib.__version__, cxx, *FLAGS,
                                    _cpu_model()]).encode()).hexdigest()[:16]
    cache_dir = cache_dir or _cache_dir()
    lib = cache_dir / f"jaxserve_cpu_{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    include = jax.ffi.include_dir()
    # build beside the target and rename: processes building at once (test workers) never see
    # a half-written library
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".so", delete=False) as tmp:
        pass
    cmd = [cxx, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp.name]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp.name)
        names = ", ".join(path.name for path in SOURCES)
        raise RuntimeError(f"compiling the CPU kernels ({names}) failed ({' '.join(cmd)}):\n"
                           f"{done.stderr[-2000:]}")
    os.replace(tmp.name, lib)
    return lib


_LOCK = threading.Lock()
_FEATURES: dict[str, bool] = {}  # what the loaded library was compiled with


@functools.cache
def _load_once() -> str | None:
    if os.environ.get("JAXSERVE_CPU_KERNEL", "1") == "0":
        return "turned off by JAXSERVE_CPU_KERNEL=0"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as err:
        return str(err)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    features = lib.JaxserveFeatures()
    _FEATURES.update(avx512=bool(features & 1), bf16_dot=bool(features & 2))
    return None


def _load() -> str | None:
    """Build, load and register the kernels once per process (programs traced from several
    threads wait for the first); None if they are available, else why not."""
    with _LOCK:
        return _load_once()


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None when they can); builds them on first call."""
    return _load()


def require(what: str) -> None:
    """Build and register the kernels if need be; RuntimeError naming `what` when they cannot run
    here (for callers that asked for a kernel explicitly)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the {what} is not available: {reason}")


@functools.cache
def _warn(reason: str) -> None:
    warnings.warn(f"jaxserve's C++ CPU kernels are not available ({reason}); using XLA's "
                  f"paths", stacklevel=4)


def has_avx512() -> bool:
    """Whether the kernels were built for AVX-512 (vectors of 16 floats), which moves where the
    CPU matmul beats XLA's dot (cpu_matmul.MAX_ROWS)."""
    return available() and _FEATURES.get("avx512", False)


def has_bf16_dot() -> bool:
    """Whether the kernels run bf16 x bf16 products on the CPU's bf16 dot-product instructions
    (AVX512_BF16; cpu_matmul.cc), which the tied head's kernel needs."""
    return available() and _FEATURES.get("bf16_dot", False)


def available() -> bool:
    """True when the kernels can run here (warns once when they cannot)."""
    reason = unavailable_reason()
    if reason is not None and "JAXSERVE_CPU_KERNEL=0" not in reason:
        _warn(reason)
    return reason is None


