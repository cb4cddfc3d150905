"""Decode step time with sparse attention against dense, at 2k, 4k and 8k tokens of context,
batch 1 and 8, in one run: the attention of one layer alone (what sparse attention changes) and
the whole decode step (30 layers, head), on the default model's shape.

    python benchmarks/sparse.py [--contexts 2048,4096,8192] [--batches 1,8]
                                [--budgets 0.25,0.125,0.0625] [--reuse 0.25@4,0.125@4]
                                [--repeats 3] [--dtype float32]

A reusing configuration (BUDGET@N, `SparseAttentionConfig.reuse_steps`) chooses its pages at one
step in N and reads the kept ones at the others: its rows are the mean step, (one step that
chooses + N - 1 that reuse) / N, each timed on its own.

The cache holds random keys and values (step time does not depend on them); the page summaries
are those of the cache, as the cache write keeps them. Requests have distinct pages (shared pages
would flatter dense attention's memory traffic). Random weights of SmolLM2-135M's shape time as
the real ones. Output: a markdown table of milliseconds and speedups over dense.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from forward import SMOLLM2_135M
from timing import timed
from jaxserve.config import ModelConfig, SparseAttentionConfig
from jaxserve.kernels import build_metadata, ragged_paged_attention
from jaxserve.kernels.sparse import SelectionReuse, ref_page_summaries
from jaxserve.kernels.storage import storage_dtype, to_storage
from jaxserve.models import llama

PAGE = 16


def _batch(config, batch, context, max_len, dtype, rng):
    """Metadata of `batch` decodes at `context` tokens, the caches (one layer's arrays, used by
    every layer: timing does not depend on the values) and their summaries."""
    kh, e = config.num_kv_heads, config.head_dim
    width = max_len // PAGE
    used = -(-context // PAGE)
    num_pages = 1 + batch * used
    tables = [list(range(1 + r * used, 1 + (r + 1) * used)) for r in range(batch)]
    md = build_metadata(query_lens=[1] * batch, kv_lens=[context] * batch, page_tables=tables,
                        page_size=PAGE, num_tokens=batch, num_requests=batch,
                        num_pages_per_request=width, num_blocks=batch, query_block=1)
    store = storage_dtype(dtype, jax.default_backend())
    k = jnp.asarray(rng.standard_normal((num_pages, PAGE, kh, e), np.float32))
    v = jnp.asarray(rng.standard_normal((num_pages, PAGE, kh, e), np.float32))
    summ = ref_page_summaries(k.astype(dtype), np.full(num_pages, PAGE))
    return jax.device_put(md), to_storage(k, store), to_storage(v, store), summ


def attention_ms(config, md, kc, vc, summ, sparse, dtype, repeats, rng):
    b, h, kh, e = md.page_table.shape[0], config.num_heads, config.num_kv_heads, config.head_dim
    q = jnp.asarray(rng.standard_normal((b, h, e)), dtype)
    kn = jnp.asarray(rng.standard_normal((b, kh, e)), dtype)
    if sparse is not None and sparse.reuse_steps > 1:
        f = jax.jit(functools.partial(ragged_paged_attention, sm_scale=e ** -0.5, sparse=sparse))
        kept = _kept(md, sparse.budget_fraction)
        ms = [timed(lambda: f(q, kc, vc, kn, kn, md, summaries=summ, reuse=SelectionReuse(
            kept, _num_pages(md), refresh)), repeats) * 1e3 for refresh in (True, False)]
        return (ms[0] + (sparse.reuse_steps - 1) * ms[1]) / sparse.reuse_steps
    f = jax.jit(functools.partial(ragged_paged_attention, sm_scale=e ** -0.5, sparse=sparse))
    return timed(lambda: f(q, kc, vc, kn, kn, md, summaries=summ), repeats) * 1e3


def _num_pages(md):
    return (md.kv_lens + PAGE - 1) // PAGE


def _kept(md, fraction):
    """A kept choice of a reusing step: the first pages of each request, as many as a choice
    reads (which pages does not change the step's cost)."""
    w = md.page_table.shape[1]
    return jnp.arange(w)[None, :] < jnp.ceil(_num_pages(md)[:, None] * fraction)


def step_ms(model, md, kc, vc, summ, sparse, repeats):
    """Embedding, every layer (each reading the same cache arrays), head: one decode step."""
    graphdef, state = nnx.split(model)
    n = model.config.num_layers

    reuse = sparse is not None and sparse.reuse_steps > 1

    @functools.partial(jax.jit, static_argnames="refresh")
    def step(state, kc, vc, summ, ids, md, refresh):
        m = nnx.merge(graphdef, state)
        dense = None if sparse is None else jnp.arange(n) < sparse.dense_layers
        sel = None
        if reuse:  # every layer's kept choice in rows 0..B-1
            r = md.page_table.shape[0]
            sel = ((_kept(md, sparse.budget_fraction),) * n, jnp.arange(r), _num_pages(md), refresh)
        out = llama.run_layers(m.layers, ((kc, vc),) * n, m.embed(ids), md, summaries=(summ,) * n,
                               sparse=sparse, dense_layers=dense, selections=sel)
        return m.head(out[0], jnp.arange(ids.shape[0]), m.embed)

    ids = jnp.zeros(md.page_table.shape[0], jnp.int32)
    if not reuse:
        return timed(lambda: step(state, kc, vc, summ, ids, md, refresh=True), repeats) * 1e3
    ms = [timed(lambda: step(state, kc, vc, summ, ids, md, refresh=refresh), repeats) * 1e3
          for refresh in (True, False)]
    return (ms[0] + (sparse.reuse_steps - 1) * ms[1]) / sparse.reuse_steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budgets", default="0.25,0.125,0.0625")
    ap.add_argument("--reuse", default="0.25@4,0.125@4", help="BUDGET@N configurations reusing "
                    "each choice of pages for N steps ('' for none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-step", action="store_true", help="time the attention only")
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype)
    config = ModelConfig.from_hf(SMOLLM2_135M)
    model = llama.init_model(config, 0, dtype)
    contexts = [int(x) for x in a.contexts.split(",")]
    configs = [None] + [SparseAttentionConfig(budget_fraction=float(f)) for f in a.budgets.split(",")]
    configs += [SparseAttentionConfig(budget_fraction=float(f), reuse_steps=int(n))
                for f, n in (x.split("@") for x in a.reuse.split(",") if x)]
    label = lambda c: "dense" if c is None else f"1/{1 / c.budget_fraction:g}" + (
        f", reuse {c.reuse_steps}" if c.reuse_steps > 1 else "")
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(x) for x in a.batches.split(",")):
        for context in contexts:
            md, kc, vc, summ = _batch(config, batch, context, max(contexts), dtype, rng)
            for c in configs:
                attn = attention_ms(config, md, kc, vc, summ, c, dtype, a.repeats, rng)
                step = None if a.no_step else step_ms(model, md, kc, vc, summ, c, a.repeats)
                rows.append((batch, context, label(c), attn, step))
                print(f"B={batch} ctx={context} {label(c)}: attention {attn:.2f} ms"
                      + ("" if step is None else f", step {step:.1f} ms"), flush=True)
            del md, kc, vc, summ
    print("\n| batch | context | attention | attention ms (speedup) | decode step ms (speedup) |")
    print("|---|---|---|---|---|")
    dense = {(b, n): (at, st) for b, n, lab, at, st in rows if lab == "dense"}
    for b, n, lab, at, st in rows:
        da, ds = dense[(b, n)]
        step = "-" if st is None else f"{st:.1f} ({ds / st:.2f}x)"
        print(f"| {b} | {n} | {lab} | {at:.2f} ({da / at:.2f}x) | {step} |")


if __name__ == "__main__":
    main()
