"""Look inside a forward pass: the attention weights of every layer and head on one prompt.

    logits, attn = dense_forward(llm.model, token_ids)   # [T, V], [L, H, T, T]

The engine's attention never forms the [T, T] weights (the kernels keep an online softmax over
KV pages), so this runs the model's own modules (norms, projections, rope, MLP, head) with plain
causal softmax attention over one short prompt and no KV cache. It is for analysis in notebooks
and tests, not serving: the same math as `kernels.ref_dense_attention`, with the weights kept.
The logits it returns match the engine's (checked against its prompt log-probs in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.llama import LlamaModel, apply_rope, rope


def dense_forward(model: LlamaModel, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """token_ids [T] -> (logits [T, V] float32, attention weights [L, H, T, T] float32): row i
    of a head's weights is the softmax over positions 0..i that position i attends to."""
    c = model.config
    ids = jnp.asarray(list(token_ids), jnp.int32)
    t, g = ids.shape[0], c.group_size
    positions = jnp.arange(t)
    cos, sin = rope(positions, c)
    # causal, and within the sliding window where the model has one
    visible = positions[None, :] <= positions[:, None]  # [T, T]: query row, key column
    if c.sliding_window is not None:
        visible &= positions[:, None] - positions[None, :] < c.sliding_window
    hidden = model.embed(ids)  # [T, D]
    weights = []
    for layer in model.layers:
        attn = layer.attn
        qkv = attn.qkv(layer.attn_norm(hidden)).astype(hidden.dtype)  # [T, K, G+2, E]
        q = qkv[:, :, :g].reshape(t, -1, c.head_dim)  # [T, H, E]; head h = k * G + g
        k, v = qkv[:, :, g], qkv[:, :, g + 1]  # [T, K, E]
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)  # [T, H, E]
        scores = jnp.einsum("THE,SHE->HTS", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = jnp.where(visible[None], scores * c.head_dim ** -0.5, -jnp.inf)
        w = jax.nn.softmax(scores, axis=-1)  # [H, T, T]
        out = jnp.einsum("HTS,SHE->THE", w, v.astype(jnp.float32)).astype(hidden.dtype)
        hidden = hidden + attn.o(out).astype(hidden.dtype)
        hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
        weights.append(w)
    logits = model.head(hidden, jnp.arange(t), model.embed)  # [T, V]
    return np.asarray(logits, np.float32), np.asarray(jnp.stack(weights), np.float32)
