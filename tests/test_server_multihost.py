"""`jaxserve serve` over two processes (jax.distributed on loopback, 2 CPU devices each, tensor
parallel 4): process 0 serves HTTP and schedules, process 1 runs the broadcast steps; answers
equal one process's, and SIGTERM to process 0 stops both."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from jaxserve.config import EngineConfig
from jaxserve.engine import Engine
from jaxserve.sampling import SamplingParams
from tests.server_util import free_port, process_server
from tests.test_orbax import hf_folder  # noqa: F401 - the tiny 8-head HF checkpoint fixture

ENGINE_ARGS = ("--dtype", "float32", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
               "--max-model-len", "128", "--kv-cache-memory", str(4 << 20), "--log-level", "warning")
PROMPTS = ["Hello there, my friend", "The sea is", "One two three four five six seven"]


def test_two_process_server_equals_one_process(hf_folder):  # noqa: F811
    coordinator = f"127.0.0.1:{free_port()}"
    # Keepalives every 0.2 s, so that idle gaps put many between the steps: they must keep the
    # two processes' collectives in step (gloo fails a collective left waiting for 30 minutes).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAXSERVE_KEEPALIVE_S="0.2")
    common = ("--model", str(hf_folder), "--tensor-parallel-size", "4", "--num-processes", "2",
              "--coordinator-address", coordinator, *ENGINE_ARGS)
    worker = subprocess.Popen([sys.executable, "-m", "jaxserve.cli", "serve", "--process-id", "1",
                               *common], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        with process_server("--process-id", "0", *common, env=env, start_timeout=300) as (url, leader):
            got = []
            for p in PROMPTS:
                time.sleep(1.5)  # idle: keepalives go out
                got.append(httpx.post(f"{url}/v1/completions", timeout=120, json={
                    "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
                    ["choices"][0]["text"])
            leader.send_signal(signal.SIGTERM)
            assert leader.wait(60) == 0, "".join(leader.log)
        log = worker.communicate(timeout=60)[0]
        assert worker.returncode == 0, log
        assert int(re.search(r"ran (\d+) steps", log).group(1)) > 0, log  # it computed the steps
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)

    one = Engine(EngineConfig(model=str(hf_folder), max_num_seqs=4, max_num_batched_tokens=32,
                              max_model_len=128, kv_cache_memory=4 << 20), progress=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        one.add_request(str(i), p, params)
    want = {}
    while one.has_unfinished_requests():
        want.update({o.request_id: o.outputs[0].text for o in one.step() if o.finished})
    assert got == [want[str(i)] for i in range(len(PROMPTS))]
