"""Look inside a forward pass: attention weights, and the pages sparse decode would choose.

    logits, attn = dense_forward(llm.model, token_ids)   # [T, V], [L, H, T, T]
    chosen = sparse_selection(llm.model, token_ids, SparseAttentionConfig(...), layer=12,
                              positions=range(1024, 1536, 8))   # [N, W] bool: pages read

The engine's attention never forms the [T, T] weights (the kernels keep an online softmax over
KV pages), so this runs the model's own modules (norms, projections, rope, MLP, head) with plain
causal softmax attention over one prompt and no KV cache. It is for analysis in notebooks and
tests, not serving: the same math as `kernels.ref_dense_attention`, with the weights kept.
The logits it returns match the engine's (checked against its prompt log-probs in the tests).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import SparseAttentionConfig
from jaxserve.models.llama import LlamaModel, apply_rope, rope


def _layers(model: LlamaModel, ids: jax.Array) -> Iterator[tuple]:
    """Run the layers one at a time over ids [T]: yields (q [T, H, E], k [T, K, E] after rope,
    weights [H, T, T] float32, hidden [T, D] after the layer); the head reads the last hidden."""
    c = model.config
    t, g = ids.shape[0], c.group_size
    positions = jnp.arange(t)
    cos, sin = rope(positions, c)
    # causal, and within the sliding window where the model has one
    visible = positions[None, :] <= positions[:, None]  # [T, T]: query row, key column
    if c.sliding_window is not None:
        visible &= positions[:, None] - positions[None, :] < c.sliding_window
    hidden = model.embed(ids)  # [T, D]
    for layer in model.layers:
        attn = layer.attn
        qkv = attn.qkv(layer.attn_norm(hidden)).astype(hidden.dtype)  # [T, K, G+2, E]
        q = qkv[:, :, :g].reshape(t, -1, c.head_dim)  # [T, H, E]; head h = k * G + g
        k, v = qkv[:, :, g], qkv[:, :, g + 1]  # [T, K, E]
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kh, vh = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)  # [T, H, E]
        scores = jnp.einsum("THE,SHE->HTS", q.astype(jnp.float32), kh.astype(jnp.float32))
        scores = jnp.where(visible[None], scores * c.head_dim ** -0.5, -jnp.inf)
        w = jax.nn.softmax(scores, axis=-1)  # [H, T, T]
        out = jnp.einsum("HTS,SHE->THE", w, vh.astype(jnp.float32)).astype(hidden.dtype)
        hidden = hidden + attn.o(out).astype(hidden.dtype)
        hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
        yield q, k, w, hidden


def dense_forward(model: LlamaModel, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """token_ids [T] -> (logits [T, V] float32, attention weights [L, H, T, T] float32): row i
    of a head's weights is the softmax over positions 0..i that position i attends to. Keeps
    L * H * T^2 floats: meant for short prompts."""
    ids = jnp.asarray(list(token_ids), jnp.int32)
    weights, hidden = [], None
    for _, _, w, hidden in _layers(model, ids):
        weights.append(np.asarray(w))
    logits = model.head(hidden, jnp.arange(ids.shape[0]), model.embed)  # [T, V]
    return np.asarray(logits, np.float32), np.stack(weights)


def sparse_selection(model: LlamaModel, token_ids: Sequence[int], config: SparseAttentionConfig,
                     *, layer: int, positions: Sequence[int], page_size: int = 16) -> np.ndarray:
    """The pages sparse decode attention reads at `layer` if the token at each of `positions`
    were being decoded after the ones before it (teacher forcing): [N, W] bool, row n over the
    W = ceil(T / page_size) pages of the prompt. The choice is the engine's own
    (`kernels.sparse.select_pages`) from the layer's queries and the min/max key summaries of
    each page, holding the keys before that position as the cache would."""
    from jaxserve.kernels.metadata import build_metadata
    from jaxserve.kernels.sparse import select_pages

    c = model.config
    ids = jnp.asarray(list(token_ids), jnp.int32)
    positions = [int(p) for p in positions]
    t, s = ids.shape[0], page_size
    if not positions or not all(0 <= p < t for p in positions):
        raise ValueError(f"positions must be in [0, {t}) (the prompt's tokens); got {positions[:4]}...")
    for i, (q, k, _, _) in enumerate(_layers(model, ids)):
        if i == layer:
            break
    else:
        raise ValueError(f"layer {layer} is not in the model's {c.num_layers} layers")
    w, n = -(-t // s), len(positions)
    pad = w * s - t
    kf = jnp.pad(k.astype(jnp.float32), ((0, pad), (0, 0), (0, 0)))  # [W*S, K, E]
    pos = np.asarray(positions)
    # request n's own copy of the pages: keys at positions before positions[n] only
    before = (jnp.arange(w * s)[None, :] < pos[:, None])[:, :, None, None]  # [N, W*S, 1, 1]
    kmin = jnp.where(before, kf[None], jnp.inf).reshape(n, w, s, *kf.shape[1:]).min(axis=2)
    kmax = jnp.where(before, kf[None], -jnp.inf).reshape(n, w, s, *kf.shape[1:]).max(axis=2)
    summaries = jnp.stack([kmin, kmax], axis=2).reshape(n * w, 2, *kf.shape[1:])  # [N*W, 2, K, E]
    tables = np.arange(n * w, dtype=np.int32).reshape(n, w)
    md = build_metadata(query_lens=[1] * n, kv_lens=pos + 1, page_tables=list(tables),
                        page_size=s, num_tokens=n, num_requests=n, num_pages_per_request=w,
                        num_blocks=n, query_block=1)
    qs = q[pos].reshape(n, c.num_kv_heads, c.group_size, c.head_dim)  # [N, K, G, E]
    md = jax.tree.map(jnp.asarray, md)
    out, _ = select_pages(qs, summaries, md, config=config, sm_scale=c.head_dim ** -0.5,
                         page_size=s)
    count = (np.asarray(out.kv_lens) - 1) // s + 1  # pages kept per row
    chosen = np.zeros((n, w), bool)
    for r in range(n):
        chosen[r, np.asarray(out.page_table[r, :count[r]]) - r * w] = True
    return chosen
