"""Host time of an engine step, by part, where device time is negligible.

A 2-layer random model with SmolLM2's real tokenizer and vocabulary (49152) serves N requests
decoding at once (default 64); each engine step is timed by part: schedule, prepare (the batch
as host numpy), dispatch (the step's programs enqueued), wait (for the device's results: on a
model this small mostly the head and sampler), postprocess (append, stop checks, detokenize,
outputs). Synchronous steps add them up; with async scheduling the host's parts of step n+1
run while step n is on the device, and "wait" is what is left of the device's time.

    python benchmarks/host.py [--requests 64] [--steps 64]
    python benchmarks/host.py --peer vllm --async-scheduling both   # the same tiny HF folder in both

With --peer vllm both engines load one random-weight HF folder (peers.tiny_folder: TINY's shape
with 2 heads of 32, SmolLM2's tokenizer) and decode the same 16-token prompts; vLLM's steps/s is
the time of 4 + steps new tokens less that of 4 (prefill and first steps apart, as here).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.config import EngineConfig, ModelConfig  # noqa: E402
from jaxserve.engine import Engine  # noqa: E402
from jaxserve.models.llama import init_model  # noqa: E402
from jaxserve.sampling import SamplingParams  # noqa: E402

import peers  # noqa: E402  (benchmarks/peers.py: this script's folder is on sys.path)

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048,
            tie_word_embeddings=True)


def make_engine(num_requests: int, folder: str | None, **options) -> Engine:
    """The engine on `folder` (an HF folder), else on an in-memory random TINY model with the
    default model's tokenizer."""
    config = EngineConfig(model=folder, max_model_len=512, max_num_seqs=num_requests,
                          max_num_batched_tokens=512, decode_buckets=(num_requests,),
                          num_kv_pages=4096, page_size=16, **options)
    if folder is not None:
        return Engine(config, progress=False)
    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.tokenizer import Tokenizer

    meta = load_checkpoint(default_model_path(), dtype=jnp.float32).gguf_metadata
    model = init_model(ModelConfig.from_hf(TINY), jax.random.PRNGKey(0), jnp.float32, scale=0.5)
    return Engine.from_components(config, model, Tokenizer.from_gguf_metadata(meta), progress=False)


def measure(engine: Engine, prompts: list[list[int]], sp: SamplingParams, steps: int):
    """(seconds by part, total seconds) of `steps` engine steps with every prompt decoding."""
    parts = collections.defaultdict(float)
    runner, sched = engine.runner, engine.scheduler

    def timed(obj, name, part):
        fn = getattr(obj, name)

        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                parts[part] += time.perf_counter() - t0
        setattr(obj, name, wrapper)

    timed(sched, "schedule", "schedule")
    timed(runner, "prepare", "prepare")
    timed(runner, "dispatch", "dispatch")  # prepare included
    timed(runner, "collect", "wait")
    timed(engine, "_postprocess", "postprocess")
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, sp)
    while any(r.num_output_tokens < 4 for r in sched.running) or sched.num_waiting:
        engine.step()  # prefill and first decodes: not measured
    parts.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return parts, time.perf_counter() - t0


def print_parts(parts, total: float, steps: int):
    rows = [("schedule", parts["schedule"]), ("prepare", parts["prepare"]),
            ("dispatch", parts["dispatch"] - parts["prepare"]), ("wait (device)", parts["wait"]),
            ("postprocess", parts["postprocess"]),
            ("other", total - parts["schedule"] - parts["dispatch"] - parts["wait"] - parts["postprocess"])]
    print("| part | ms/step | share |\n|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs / steps * 1e3:.2f} | {secs / total:.0%} |")
    print(f"| total | {total / steps * 1e3:.2f} | |", flush=True)


def async_modes(choice: str | None) -> list[dict]:
    """EngineConfig options per row: async_scheduling on / off where this tree has the field."""
    if choice is None:
        return [{}]
    if "async_scheduling" not in EngineConfig.__dataclass_fields__:
        print(f"--async-scheduling {choice}: this tree's EngineConfig has no async_scheduling; "
              "measuring the synchronous engine only", file=sys.stderr)
        return [{}]
    return [dict(async_scheduling=m) for m in {"on": [True], "off": [False], "both": [False, True]}[choice]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64, help="decode steps measured")
    ap.add_argument("--params", choices=("greedy", "sampled"), default="greedy")
    ap.add_argument("--model", default=None, help="an HF folder (default: an in-memory random tiny "
                    "model; with --peer, the tiny HF folder peers.tiny_folder writes)")
    ap.add_argument("--async-scheduling", choices=("on", "off", "both"), default=None,
                    help="rows with EngineConfig.async_scheduling on, off or both (default: the engine's own)")
    ap.add_argument("--peer", choices=("vllm",), default=None,
                    help="also run vLLM's CPU build on the same folder, prompts and steps (greedy)")
    ap.add_argument("--vllm-python", default=peers.default_vllm_python())
    a = ap.parse_args()
    folder = a.model or (str(peers.tiny_folder()) if a.peer else None)
    sp = SamplingParams(temperature=0 if a.params == "greedy" else 0.8, top_p=1.0 if a.params == "greedy"
                        else 0.9, max_tokens=a.steps + 8, ignore_eos=True)
    prompts = np.random.default_rng(0).integers(100, 30000, (a.requests, 16)).tolist()
    summary = []
    for options in async_modes(a.async_scheduling):
        parts, total = measure(make_engine(a.requests, folder, **options), prompts, sp, a.steps)
        has_field = "async_scheduling" in EngineConfig.__dataclass_fields__
        mode = {True: "async", False: "sync"}.get(options.get("async_scheduling"),
                                                  "default" if has_field else "sync")
        print(f"jaxserve ({mode}) {a.requests} requests decoding, {a.params}, {a.steps} steps: "
              f"{a.steps / total:.1f} steps/s, {a.steps * a.requests / total:.0f} tok/s")
        print_parts(parts, total, a.steps)
        summary.append((f"jaxserve, {mode}", a.steps / total, a.steps * a.requests / total))
    if a.peer == "vllm":
        job = dict(mode="decode_steps", model=folder, dtype="float32", prompts=prompts, steps=a.steps,
                   warm_tokens=4, repeats=1, max_model_len=512)
        for r in peers.run_vllm(a.vllm_python, job):
            print(f"vllm {a.requests} requests decoding, greedy, {a.steps} steps: {r['steps_per_s']:.1f} "
                  f"steps/s, {r['tok_per_s']:.0f} tok/s (start-up {r['init']:.0f} s)")
            summary.append(("vllm", r["steps_per_s"], r["tok_per_s"]))
    print(f"\nmodel {folder or 'in-memory tiny'}, {a.requests} requests, {a.params}, {a.steps} steps")
    print("| engine | steps/s | tok/s |\n|---|---|---|")
    for name, sps, tps in summary:
        print(f"| {name} | {sps:.1f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
