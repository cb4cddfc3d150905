"""Several processes (hosts) serving one model: process 0 schedules, every process computes.

    # the same script on every host, each with its own process_id
    llm = LLM(model, tensor_parallel_size=8, coordinator_address="10.0.0.1:8476",
              num_processes=2, process_id=int(os.environ["RANK"]))
    if multihost.is_leader():
        outputs = llm.generate(prompts)
        multihost.stop_workers(llm.engine)
    else:
        multihost.run_worker(llm.engine)   # returns when process 0 calls stop_workers

`initialize` starts `jax.distributed` from the engine options (on CPU with gloo collectives),
so `jax.devices()` lists every process's devices and the mesh spans them all. The scheduler,
tokenizer and outputs live on process 0 only. Each step, process 0's runner packs its
`StepInputs` (host numpy: tokens, attention metadata, sampling tensors, drawn seeds included)
into bytes and broadcasts them with `multihost_utils.broadcast_one_to_all` (a fixed-size
header, then the payload padded to a power of two, so only a few shapes ever compile); every
process then runs the same compiled programs on the same batch, as SPMD requires. The header
also says "stop" (`stop_workers`) or "keepalive" (sent by an idle server, see `keepalive`). The
payload is `np.savez` without pickle.
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.kernels import AttentionMetadata
from jaxserve.runner import Bucket, ModelRunner, StepInputs
from jaxserve.runner.selection import SelectionInputs
from jaxserve.sampling import SamplingTensors

_MIN_PAYLOAD = 4096  # bytes; payloads are padded to a power of two at least this


def initialize(config: EngineConfig) -> None:
    """jax.distributed.initialize from the engine options; nothing for one process."""
    if config.num_processes == 1 or jax.distributed.is_initialized():
        return
    # XLA:CPU has no cross-process collectives by default; gloo provides them (GPU and TPU
    # backends ignore this option).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(config.coordinator_address, num_processes=config.num_processes,
                               process_id=config.process_id)


def is_leader() -> bool:
    """True on the process that schedules (process 0, or the only one)."""
    return jax.process_index() == 0


def attach(runner: ModelRunner) -> None:
    """On process 0 of several, make the runner broadcast each step before running it."""
    if jax.process_count() > 1 and is_leader():
        runner.broadcast = _send


def run_worker(engine) -> int:
    """On processes other than 0: run the steps process 0 broadcasts until it stops them.
    Returns the number of steps run."""
    if is_leader():
        raise RuntimeError("run_worker is for processes other than 0; process 0 drives the engine")
    steps = 0
    while (inputs := _receive()) is not None:
        if inputs is not _KEEPALIVE:
            engine.runner.run(inputs)
            steps += 1
    return steps


def stop_workers(engine) -> None:
    """On process 0: tell the workers to return from run_worker."""
    if jax.process_count() > 1 and is_leader():
        _broadcast_bytes(b"", _STOP)


def keepalive() -> None:
    """On process 0, while idle: a message the workers skip. Gloo fails a collective that waits
    more than 30 minutes (measured: "Timed out waiting 1800000ms"), so a server with no traffic
    for that long would lose its workers without these."""
    if jax.process_count() > 1 and is_leader():
        _broadcast_bytes(b"", _KEEPALIVE_KIND)


_STEP, _STOP, _KEEPALIVE_KIND = 0, 1, 2  # message kinds, sent in the header
_KEEPALIVE = object()  # what _receive returns for a keepalive


def _send(inputs: StepInputs) -> None:
    _broadcast_bytes(pack(inputs), _STEP)


def _receive():
    """The next StepInputs, _KEEPALIVE, or None (stop)."""
    kind, payload = _broadcast_bytes(b"", _STEP)
    return None if kind == _STOP else _KEEPALIVE if kind == _KEEPALIVE_KIND else unpack(payload)


def _broadcast_bytes(payload: bytes, kind: int) -> tuple[int, bytes]:
    """Process 0's (kind, payload) on every process: a fixed-size header, then the payload
    padded to a power of two (so only a few shapes ever compile)."""
    from jax.experimental import multihost_utils

    header = multihost_utils.broadcast_one_to_all(np.array([len(payload), kind], np.int64))
    size, kind = int(header[0]), int(header[1])
    if kind != _STEP:
        return kind, b""
    padded = max(_MIN_PAYLOAD, 1 << (size - 1).bit_length())
    buf = np.zeros(padded, np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
    return kind, np.asarray(multihost_utils.broadcast_one_to_all(buf))[:size].tobytes()


def _fields(cls) -> tuple[list[str], list[str]]:
    """(array fields, static fields) of a registered dataclass."""
    fields = dataclasses.fields(cls)
    return ([f.name for f in fields if not f.metadata.get("static")],
            [f.name for f in fields if f.metadata.get("static")])


def pack(inputs: StepInputs) -> bytes:
    arrays = {"token_ids": inputs.token_ids, "logits_indices": inputs.logits_indices,
              "banned": inputs.banned}
    static = {"bucket": dataclasses.astuple(inputs.bucket), "num_logprobs": inputs.num_logprobs}
    for prefix, obj in (("md", inputs.md), ("sampling", inputs.sampling)):
        names, statics = _fields(type(obj))
        arrays.update({f"{prefix}.{n}": np.asarray(getattr(obj, n)) for n in names})
        static[prefix] = {n: getattr(obj, n) for n in statics}
    if inputs.prompt_targets is not None:
        arrays["prompt_targets"] = inputs.prompt_targets
    if inputs.selection is not None:  # sparse attention's kept choices (runner/selection.py)
        arrays.update({"selection.slots": inputs.selection.slots,
                       "selection.since": inputs.selection.since})
        static["selection_refresh"] = bool(inputs.selection.refresh)
    arrays["static"] = np.frombuffer(json.dumps(static).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(payload: bytes) -> StepInputs:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    static = json.loads(arrays.pop("static").tobytes())
    parts = {}
    for prefix, cls in (("md", AttentionMetadata), ("sampling", SamplingTensors)):
        names, _ = _fields(cls)
        parts[prefix] = cls(**{n: arrays[f"{prefix}.{n}"] for n in names}, **static[prefix])
    selection = None
    if "selection.slots" in arrays:
        selection = SelectionInputs(arrays["selection.slots"], arrays["selection.since"],
                                    static["selection_refresh"])
    return StepInputs(Bucket(*static["bucket"]), arrays["token_ids"], parts["md"],
                      arrays["logits_indices"], parts["sampling"], arrays["banned"],
                      static["num_logprobs"], arrays.get("prompt_targets"), selection)
