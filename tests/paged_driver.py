"""A minimal test driver: runs token sequences through the model and a paged KV cache, step by
step, with shuffled pages and NaN in every unused page, returning the logits of every position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.kernels import build_metadata, num_query_blocks, write_kv
from jaxserve.models import llama


class PagedDriver:
    def __init__(self, model: llama.LlamaModel, *, page_size=4, num_pages=64, seed=0):
        config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.config, self.page_size = config, page_size
        kv = llama.init_kv_cache(config, num_pages, page_size, model.dtype)
        self.kv = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), kv)
        self.free = list(np.random.default_rng(seed).permutation(np.arange(1, num_pages)))
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        graphdef = self.graphdef
        self.fwd = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
        self.write = jax.jit(write_kv, donate_argnums=(0,))

    def step(self, chunks: dict[int, list[int]], *, query_block=4, num_tokens=None):
        """chunks: request id -> new token ids. Returns request id -> logits [len, V] (numpy)."""
        rids = list(chunks)
        qlens = [len(chunks[r]) for r in rids]
        kv_lens = []
        for r in rids:
            self.pages.setdefault(r, [])
            n = self.lens.get(r, 0) + len(chunks[r])
            while len(self.pages[r]) * self.page_size < n:
                self.pages[r].append(self.free.pop())
            self.lens[r] = n
            kv_lens.append(n)
        t = num_tokens or sum(qlens) + 3  # some padding tokens too
        max_pages = max(len(self.pages[r]) for r in rids) + 1
        md = build_metadata(query_lens=qlens, kv_lens=kv_lens, page_tables=[self.pages[r] for r in rids],
                            page_size=self.page_size, num_tokens=t, num_requests=len(rids) + 1,
                            num_pages_per_request=max_pages,
                            num_blocks=num_query_blocks(qlens, query_block) + 1, query_block=query_block)
        ids = np.zeros(t, np.int32)
        ids[: sum(qlens)] = np.concatenate([chunks[r] for r in rids])
        logits, new_kv = self.fwd(self.state, self.kv, jnp.asarray(ids), md, jnp.arange(sum(qlens)))
        self.kv = self.write(self.kv, new_kv, md.slot_mapping)
        logits = np.asarray(logits)
        out, start = {}, 0
        for r, q in zip(rids, qlens):
            out[r] = logits[start:start + q]
            start += q
        return out


def log_norm(logits):
    """log(sum(exp(logits))) over the last axis in float64 (a float32 np.logaddexp.reduce over a
    49152-entry vocabulary drifts by ~4e-3, more than the tolerances it would be used to check)."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
