"""Time the model forward on CPU for the default model's shape: a 128-token prefill and a
batch-32 decode step through the paged cache, float32 and bfloat16, compile time apart.

    python benchmarks/forward.py [--random] [--dtypes float32,bfloat16] [--batch 32] [--context 192]

With --random (or no checkpoint yet) it uses random weights of SmolLM2-135M's shape, which time
the same as the real ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.kernels import build_metadata, num_query_blocks, write_kv
from jaxserve.models import llama
from jaxserve.kernels.storage import storage_dtype

SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192)


def load(dtype, random_weights):
    if not random_weights:
        from jaxserve.models.fetch import default_model_path
        from jaxserve.models.loader import load_checkpoint

        ckpt = load_checkpoint(default_model_path(), dtype=dtype)
        return ckpt.model
    return llama.init_model(ModelConfig.from_hf(SMOLLM2_135M), 0, dtype)


def time_step(fwd, write, params, kv, ids, md, logits_indices, repeats):
    """(first call incl. compile, median step) seconds of forward + cache write."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        logits, new_kv = fwd(params, kv, ids, md, logits_indices)
        kv = write(kv, new_kv, md.slot_mapping)
        jax.block_until_ready((logits, kv))
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def run(dtype_name, batch, context, prompt, page_size, random_weights, repeats, extra_pages):
    dtype = jnp.dtype(dtype_name)
    model = load(dtype, random_weights)
    config, (graphdef, params) = model.config, nnx.split(model)  # split once: arrays cross jit
    cache_dtype = storage_dtype(dtype, jax.default_backend())
    pages_per_req = -(-max(context, prompt) // page_size)
    num_pages = batch * pages_per_req + 1 + extra_pages
    fwd = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    write = jax.jit(write_kv, donate_argnums=0)
    rows = []
    # Prefill: one request, `prompt` tokens, query blocks of 32.
    md = build_metadata(query_lens=[prompt], kv_lens=[prompt], page_tables=[list(range(1, pages_per_req + 1))],
                        page_size=page_size, num_tokens=prompt, num_requests=1,
                        num_pages_per_request=pages_per_req, num_blocks=num_query_blocks([prompt], 32),
                        query_block=32)
    kv = llama.init_kv_cache(config, num_pages, page_size, cache_dtype)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, prompt), jnp.int32)
    first, t = time_step(fwd, write, params, kv, ids, md, jnp.asarray([prompt - 1]), repeats)
    rows.append((f"prefill {prompt}", dtype_name, first - t, t * 1e3, prompt / t))
    # Decode: `batch` requests, one token each, at `context` cached tokens.
    tables = [list(range(1 + r * pages_per_req, 1 + (r + 1) * pages_per_req)) for r in range(batch)]
    md = build_metadata(query_lens=[1] * batch, kv_lens=[context] * batch, page_tables=tables,
                        page_size=page_size, num_tokens=batch, num_requests=batch,
                        num_pages_per_request=pages_per_req, num_blocks=batch, query_block=1)
    kv = llama.init_kv_cache(config, num_pages, page_size, cache_dtype)
    ids = jnp.zeros(batch, jnp.int32)
    first, t = time_step(fwd, write, params, kv, ids, md, jnp.arange(batch), repeats)
    rows.append((f"decode B={batch} ctx={context}", dtype_name, first - t, t * 1e3, batch / t))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra-pages", type=int, default=0,
                    help="unused cache pages: step time must not grow with them (no cache copies)")
    ap.add_argument("--random", action="store_true", help="random weights of the default model's shape")
    a = ap.parse_args()
    print(f"{'step':<24} {'dtype':<9} {'compile s':>9} {'step ms':>9} {'tok/s':>9}")
    for name in a.dtypes.split(","):
        for row in run(name, a.batch, a.context, a.prompt, a.page_size, a.random, a.repeats, a.extra_pages):
            print(f"{row[0]:<24} {row[1]:<9} {row[2]:>9.1f} {row[3]:>9.1f} {row[4]:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
