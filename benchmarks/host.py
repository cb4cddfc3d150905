"""Host time of an engine step, by part, where device time is negligible.

A 2-layer random model with SmolLM2's real tokenizer and vocabulary (49152) serves N requests
decoding at once (default 64); each engine step is timed by part: schedule, prepare (the batch
as host numpy), device (dispatch + wait, on a model this small mostly the sampler and head),
postprocess (append, stop checks, detokenize, outputs). What is left for an accelerator to hide
is everything but "device".

    python benchmarks/host.py [--requests 64] [--steps 64]
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

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048,
            tie_word_embeddings=True)


def tiny_engine(num_requests: int) -> Engine:
    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.tokenizer import Tokenizer

    meta = load_checkpoint(default_model_path(), dtype=jnp.float32).gguf_metadata
    model = init_model(ModelConfig.from_hf(TINY), jax.random.PRNGKey(0), jnp.float32, scale=0.5)
    config = EngineConfig(max_model_len=512, max_num_seqs=num_requests, max_num_batched_tokens=512,
                          decode_buckets=(num_requests,), num_kv_pages=4096, page_size=16)
    return Engine.from_components(config, model, Tokenizer.from_gguf_metadata(meta), progress=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64, help="decode steps measured")
    ap.add_argument("--params", choices=("greedy", "sampled"), default="greedy")
    a = ap.parse_args()
    engine = tiny_engine(a.requests)
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
    timed(runner, "execute", "execute")
    timed(engine, "_postprocess", "postprocess")
    sp = SamplingParams(temperature=0 if a.params == "greedy" else 0.8, top_p=1.0 if a.params == "greedy"
                        else 0.9, max_tokens=a.steps + 8, ignore_eos=True)
    rng = np.random.default_rng(0)
    for i in range(a.requests):
        engine.add_request(str(i), rng.integers(100, 30000, 16).tolist(), sp)
    while any(r.num_output_tokens < 4 for r in sched.running) or sched.num_waiting:
        engine.step()  # prefill and first decodes: not measured
    parts.clear()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
    total = time.perf_counter() - t0
    device = parts["execute"] - parts["prepare"]
    rows = [("schedule", parts["schedule"]), ("prepare", parts["prepare"]), ("device (dispatch+wait)", device),
            ("postprocess", parts["postprocess"]),
            ("other", total - parts["schedule"] - parts["execute"] - parts["postprocess"])]
    print(f"{a.requests} requests decoding, {a.params}, {a.steps} steps: {a.steps / total:.1f} steps/s, "
          f"{a.steps * a.requests / total:.0f} tok/s")
    print(f"| part | ms/step | share |\n|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs / a.steps * 1e3:.2f} | {secs / total:.0%} |")
    print(f"| total | {total / a.steps * 1e3:.2f} | |")


if __name__ == "__main__":
    main()
