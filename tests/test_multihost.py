"""Two processes on loopback (jax.distributed, gloo CPU collectives, 4 devices each) serve the
tiny model at tensor parallel 8 and produce what one process produces."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.engine import Engine
from jaxserve.sampling import SamplingParams
from tests.test_parallel import ENGINE, PROMPTS, generate, tiny

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(smol_tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").write_text(smol_tokenizer._backend.to_str())
    address = f"127.0.0.1:{free_port()}"
    worker = Path(__file__).with_name("multihost_worker.py")
    env = dict(os.environ, PYTHONPATH=str(worker.parent.parent), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(worker), address, str(i), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"two-process run exceeded {TIMEOUT_S} s:\n" + "\n----\n".join(logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(logs)
    result = json.loads(next(line for line in logs[0].splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert "WORKER ran" in logs[1]

    one = Engine.from_components(ENGINE, tiny(2), smol_tokenizer)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True)
    assert result["greedy"] == {r: o.token_ids for r, o in generate(one, PROMPTS, greedy).items()}
    assert result["sampled"] == {r: o.token_ids for r, o in generate(one, PROMPTS[:2], sampled).items()}
