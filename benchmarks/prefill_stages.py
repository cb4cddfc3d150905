"""Measure the layered-prefill stage table (runner/layered.py MEASURED_STAGES) on this machine.

For prompt batches of T tokens, the time of one prefill through all L layers, full(T), and of
one decode step of the decode batch, decode(R). A stage of a batch in G stages costs about
full(T) / G (it runs L / G of the layers), and every step with a stage in flight runs the
decodes too, so a decode's gap between tokens is about decode(R) + full(T) / G, and the batch's
first token comes after about full(T) + G * decode(R). The table picks, per T, the smallest G
in 1, 2, 4, 8, 16 with full(T) / G <= target, target = `--decode-steps` decode steps (default
one: the paper's table is this rule on a GPU, where a 512-token prefill step costs about what
a decode step does, both reading every weight once).

    PYTHONPATH=. python benchmarks/prefill_stages.py              # ~2 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def median_seconds(fn, repeats: int) -> float:
    fn()  # compile (first use) and warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="128,256,512,1024,2048")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-steps", type=float, default=1.0,
                   help="a stage may cost this many decode steps")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxserve.config import EngineConfig
    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.runner import ModelRunner
    from jaxserve.runner.buckets import Bucket

    tokens = [int(t) for t in a.tokens.split(",")]
    model = load_checkpoint(default_model_path(), dtype=jnp.float32).model
    config = EngineConfig(max_model_len=max(tokens) + 64, max_num_batched_tokens=max(tokens),
                          max_num_seqs=a.decode_batch, decode_buckets=(a.decode_batch,),
                          num_kv_pages=256)
    runner = ModelRunner(model, config, config.num_kv_pages)  # programs compile on first use

    def step(b: Bucket):
        def run():
            ids, md, li = runner._dummy_batch(b)
            logits, new_kv, _ = runner._forward(b, ids, md, li)
            runner._write_kv(b, new_kv, md.slot_mapping)
            jax.block_until_ready((logits, runner.kv))
        return run

    decode = median_seconds(step(runner.bucket_for(a.decode_batch, a.decode_batch, True)),
                            3 * a.repeats)
    target = a.decode_steps * decode
    print(f"decode step at batch {a.decode_batch}: {decode * 1e3:.1f} ms; stage target "
          f"{target * 1e3:.1f} ms ({a.decode_steps:g} decode steps)")
    print("| prompt tokens | full prefill (ms) | ms per token | G | stage (ms) |")
    print("|---|---|---|---|---|")
    for t in tokens:
        full = median_seconds(step(runner.bucket_for(t, 1, False)), a.repeats)
        g = next((g for g in (1, 2, 4, 8, 16) if full / g <= target), 16)
        print(f"| {t} | {full * 1e3:.0f} | {full / t * 1e3:.2f} | {g} | {full / g * 1e3:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
