"""Peers for the benchmarks: vLLM's CPU build run in its own interpreter, the HF folders it loads,
and the machine's copy bandwidth (the batch-1 decode limit).

vLLM cannot share jaxserve's environment (its torch and dependencies are pinned differently), so
it runs `vllm_worker.py` under its own Python (`--vllm-python`, e.g. the venv
../shared/peers/peers.sh builds): a job goes in as JSON on stdin, rows come back as one JSON line
on stdout. The worker takes token ids, never text, so both engines see the same prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
VLLM_PYTHON_ENV = "JAXSERVE_VLLM_PYTHON"
# Both cores bound to vLLM's worker: its best setting on this 2-core machine (../shared/peers/README).
VLLM_ENV = dict(VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1",
                VLLM_CPU_NUM_OF_RESERVED_CPU="0")
ROW_PREFIX = "VLLM_ROWS "

# host.py's tiny model (the real 49152-token vocabulary around a 2-layer, hidden-64 body) with
# 2 heads of 32 (1 KV head) instead of 4 of 16: vLLM's CPU attention takes head sizes from 32 up.
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def cache_dir() -> pathlib.Path:
    """Where the benchmarks keep the HF folders they write ($XDG_CACHE_HOME/jaxserve/bench)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "jaxserve" / "bench"


def default_vllm_python() -> str | None:
    """$JAXSERVE_VLLM_PYTHON, else ../peers/vllmvenv/bin/python beside the checkout when it exists."""
    env = os.environ.get(VLLM_PYTHON_ENV)
    if env:
        return env
    path = REPO.parent / "peers" / "vllmvenv" / "bin" / "python"
    return str(path) if path.exists() else None


def run_vllm(python: str | None, job: dict, timeout: float = 3600) -> list[dict]:
    """Run one vllm_worker.py job under `python`; its rows (an empty list, said on stderr, if
    there is no interpreter or the worker failed)."""
    if not python:
        print(f"vllm: no interpreter (pass --vllm-python or set ${VLLM_PYTHON_ENV}); skipped",
              file=sys.stderr)
        return []
    env = {**os.environ, **VLLM_ENV}
    env.pop("PYTHONPATH", None)  # the project's paths must not shadow the venv's packages
    # -P: not this folder on sys.path, where kernels.py would shadow the `kernels` package vLLM imports
    proc = subprocess.run([python, "-P", str(HERE / "vllm_worker.py")], input=json.dumps(job), text=True,
                          stdout=subprocess.PIPE, env=env, timeout=timeout)  # stderr: vLLM's logs
    rows = []
    for line in proc.stdout.splitlines():  # vLLM logs to stdout too: pass those lines on
        if line.startswith(ROW_PREFIX):
            rows.append(json.loads(line[len(ROW_PREFIX):]))
        else:
            print(line, file=sys.stderr)
    if proc.returncode != 0 or not rows:
        print(f"vllm: worker exited {proc.returncode} with no rows; skipped", file=sys.stderr)
        return []
    return rows[-1]


@contextlib.contextmanager
def vllm_server(python: str, model: str, *args: str, start_timeout: float = 900):
    """The base URL of vLLM's OpenAI server (`-m vllm.entrypoints.openai.api_server`: the `vllm`
    command fails on the CPU package's metadata) on `model`, stopped on exit; its log goes to
    a temporary file, whose tail is raised if it does not come up."""
    import socket
    import tempfile

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **VLLM_ENV}
    env.pop("PYTHONPATH", None)
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm_server_", suffix=".log", delete=False)
    proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not come up (log {log.name}):\n"
                                   f"{open(log.name).read()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of one numpy copy of `mib` MiB, counting the read and the write (best of repeats)."""
    src = np.ones(mib * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def _done(folder: pathlib.Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _save_tokenizer(folder: pathlib.Path) -> None:
    """SmolLM2's tokenizer files, as transformers rebuilds them from the default GGUF."""
    from transformers import AutoTokenizer

    from jaxserve.models.fetch import default_model_path

    gguf = default_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))


def dense_default_folder(folder: pathlib.Path | None = None) -> pathlib.Path:
    """The default model's GGUF dequantized into a float32 HF safetensors folder (written once),
    as ../shared/peers/prepare.py does: what vLLM loads for the same weights jaxserve runs."""
    folder = folder or cache_dir() / "SmolLM2-135M-Instruct-hf"
    if _done(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve.models.fetch import default_model_path

    gguf = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers keeps a GGUF quantizer although the weights are floats now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return _save(model, folder)


def _save(model, folder: pathlib.Path) -> pathlib.Path:
    """Write `model` and SmolLM2's tokenizer as an HF folder, whole or not at all."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a run cut short before
    model.save_pretrained(str(tmp), safe_serialization=True)
    _save_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def tiny_folder(folder: pathlib.Path | None = None, seed: int = 0) -> pathlib.Path:
    """A random-weight tiny Llama (TINY) with SmolLM2's tokenizer as an HF folder both jaxserve
    and vLLM load (written once): host-side benchmarks where device time is negligible."""
    folder = folder or cache_dir() / f"tiny-llama-h2x32-seed{seed}"
    if _done(folder):
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM(config).to(torch.float32)
    return _save(model, folder)
