"""The Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as pure functions.

A forward pass is `embed`, then `layers` over any contiguous group of layers (the runner may
advance a prefill a few layers at a time), then `head` on the rows that need logits:

    hidden = embed(params, token_ids)                                     # [T, D]
    hidden, new_kv = layers(params, kv, hidden, md, config=c, first_layer=0, num_layers=c.num_layers)
    logits = head(params, hidden, logits_indices, config=c)               # [B, V] float32
    kv = kernels.write_kv(kv, new_kv, md.slot_mapping)   # a program of its own, kv donated

`kv` is a tuple with one `(k_cache, v_cache)` pair per layer, each `[P, S, K, E]`: separate
buffers per layer let XLA update each in place (one stacked `[L, ...]` array was copied whole
at every layer on CPU). The layers only read the cache; they return this step's K/V
(`new_kv`, per layer `[T, K, E]` each), which the caller writes into the cache in a separate
program (see kernels/ragged_paged_attention.py for the measurement behind the split).
Variants differ only by config flags: q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3),
sliding window (Mistral), rope scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxserve import kernels
from jaxserve.config import ModelConfig, rope_inv_freq
from jaxserve.kernels import AttentionMetadata

KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (k, v), each [P, S, K, E]
NewKV = tuple[tuple[jax.Array, jax.Array], ...]  # per layer run (k, v), each [T, K, E]


def rms_norm(x, w, eps):
    """RMSNorm computed in float32 and cast back, as Hugging Face does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def rope(positions, c: ModelConfig):
    """cos, sin [T, E/2] for the rotate-half convention of HF checkpoints."""
    inv_freq = jnp.asarray(rope_inv_freq(c).astype(np.float32))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, E/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [T, N, E] rotated by position: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def embed(params, token_ids):
    """token_ids [T] -> hidden [T, D]."""
    return params["embed"][token_ids]


def attention_block(p, x, k_cache, v_cache, md: AttentionMetadata, cos, sin, c: ModelConfig,
                    mesh: Mesh | None = None):
    """x [T, D] (already normed) -> (attention output [T, D], k_new [T, K, E], v_new [T, K, E]).
    With a mesh, heads are split over its tensor axis and attention runs per device."""
    t, d = x.shape
    k, g, e = c.num_kv_heads, c.group_size, c.head_dim
    qkv = jnp.dot(x, p["wqkv"].reshape(d, -1)).reshape(t, k, g + 2, e)  # [T, K, G+2, E]
    if c.qkv_bias:
        qkv = qkv + p["bqkv"]
    q = qkv[:, :, :g].reshape(t, k * g, e)  # [T, H, E]; head h = k * G + g as in HF's repeat_kv
    k_new, v_new = qkv[:, :, g], qkv[:, :, g + 1]  # [T, K, E]
    if c.qk_norm:
        q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
        k_new = rms_norm(k_new, p["k_norm"], c.rms_norm_eps)
    q, k_new = apply_rope(q, cos, sin), apply_rope(k_new, cos, sin)
    out = kernels.ragged_paged_attention(
        q, k_cache, v_cache, k_new, v_new, md, sm_scale=e ** -0.5, sliding_window=c.sliding_window,
        mesh=mesh)
    out = jnp.dot(out.reshape(t, -1), p["wo"].reshape(-1, d))  # [T, D]
    if c.o_bias:
        out = out + p["bo"]
    return out, k_new, v_new


def mlp_block(p, x):
    """SwiGLU: x [T, D] -> [T, D]."""
    # An einsum, not a reshape to [D, 2F]: with F split over a mesh, that reshape made XLA
    # all-gather the whole weight in every layer of every step.
    gate_up = jnp.einsum("TD,DCF->TCF", x, p["w_gate_up"])  # [T, 2, F]
    return jnp.dot(jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], p["w_down"])


def layers(params, kv: KVCache, hidden, md: AttentionMetadata, *, config: ModelConfig,
           first_layer: int, num_layers: int, mesh: Mesh | None = None) -> tuple[jax.Array, NewKV]:
    """Run layers [first_layer, first_layer + num_layers): hidden [T, D] -> (hidden, new_kv)
    where new_kv holds those layers' K/V of this step's tokens, to be written by write_kv.
    mesh: attention runs under shard_map over its tensor axis (params placed by parallel.py)."""
    c = config
    cos, sin = rope(md.positions, c)
    new_kv = []
    for i in range(first_layer, first_layer + num_layers):
        p = params["layers"][i]
        attn, k_new, v_new = attention_block(
            p, rms_norm(hidden, p["attn_norm"], c.rms_norm_eps), *kv[i], md, cos, sin, c, mesh)
        new_kv.append((k_new, v_new))
        hidden = hidden + attn
        hidden = hidden + mlp_block(p, rms_norm(hidden, p["mlp_norm"], c.rms_norm_eps))
    return hidden, tuple(new_kv)


def head(params, hidden, logits_indices, *, config: ModelConfig):
    """hidden [T, D], logits_indices [B] -> logits [B, V] in float32."""
    x = rms_norm(hidden[logits_indices], params["final_norm"], config.rms_norm_eps)  # [B, D]
    if config.tie_word_embeddings:
        return jnp.einsum("BD,VD->BV", x, params["embed"], preferred_element_type=jnp.float32)
    return jnp.dot(x, params["lm_head"], preferred_element_type=jnp.float32)


def forward(params, kv: KVCache, token_ids, md: AttentionMetadata, logits_indices, *,
            config: ModelConfig) -> tuple[jax.Array, NewKV]:
    """All layers: (logits [B, V] float32, new_kv). The cache itself is only read."""
    hidden, new_kv = layers(params, kv, embed(params, token_ids), md, config=config,
                            first_layer=0, num_layers=config.num_layers)
    return head(params, hidden, logits_indices, config=config), new_kv


def init_kv_cache(c: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> KVCache:
    shape = (num_pages, page_size, c.num_kv_heads, c.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers))
