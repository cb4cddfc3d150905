"""Each parameter declared once: shape and logical axes, from which random init, sharding and
the checkpoint mapping are derived.

Layout (chosen for CPU matmul speed and clean tensor-parallel splits; see docs/architecture.md):
  embed       [V, D]
  layers[i]   one dict per layer, so each layer's K/V buffer and weights are separate arrays
    attn_norm [D]
    wqkv      [D, K, G+2, E]   for kv head k: its G query heads, then its key, then its value,
                               so one matmul makes q, k and v and the K axis splits cleanly
    bqkv      [K, G+2, E]      (qkv_bias)
    q_norm    [E], k_norm [E]  (qk_norm)
    wo        [H, E, D]
    bo        [D]              (o_bias)
    mlp_norm  [D]
    w_gate_up [D, 2, F]        gate and up projections in one matmul
    w_down    [F, D]
  final_norm  [D]
  lm_head     [D, V]           (absent when embeddings are tied)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, mapped to mesh axes by parallel.py
    init: str = "normal"  # "normal" | "ones" | "zeros"


def param_specs(c: ModelConfig) -> dict:
    d, f, h, k, g, e, v = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                           c.group_size, c.head_dim, c.vocab_size)
    layer = {
        "attn_norm": ParamSpec((d,), ("embed",), "ones"),
        "wqkv": ParamSpec((d, k, g + 2, e), ("embed", "kv_heads", None, "head_dim")),
        "wo": ParamSpec((h, e, d), ("heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((d,), ("embed",), "ones"),
        "w_gate_up": ParamSpec((d, 2, f), ("embed", None, "mlp")),
        "w_down": ParamSpec((f, d), ("mlp", "embed")),
    }
    if c.qkv_bias:
        layer["bqkv"] = ParamSpec((k, g + 2, e), ("kv_heads", None, "head_dim"), "zeros")
    if c.o_bias:
        layer["bo"] = ParamSpec((d,), ("embed",), "zeros")
    if c.qk_norm:
        layer["q_norm"] = ParamSpec((e,), ("head_dim",), "ones")
        layer["k_norm"] = ParamSpec((e,), ("head_dim",), "ones")
    specs = {
        "embed": ParamSpec((v, d), ("vocab", "embed")),
        "layers": tuple(dict(layer) for _ in range(c.num_layers)),
        "final_norm": ParamSpec((d,), ("embed",), "ones"),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"))
    return specs


def init_params(c: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters (tests and benchmarks without a checkpoint)."""
    specs = param_specs(c)
    leaves, tree = jax.tree_util.tree_flatten(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    keys = jax.random.split(key, len(leaves))

    def one(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree_util.tree_unflatten(tree, [one(s, k) for s, k in zip(leaves, keys)])


def hf_layer_tensors(c: ModelConfig, get, i: int) -> dict[str, np.ndarray]:
    """One layer's parameters from HF tensors. `get(name, shape)` returns the float array named
    `model.layers.{i}.<name>` after checking its shape; HF linear weights are [out, in]."""
    d, f, h, k, g, e = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                        c.group_size, c.head_dim)
    p = f"model.layers.{i}."
    wq = get(p + "self_attn.q_proj.weight", (h * e, d)).T.reshape(d, k, g, e)
    wk = get(p + "self_attn.k_proj.weight", (k * e, d)).T.reshape(d, k, 1, e)
    wv = get(p + "self_attn.v_proj.weight", (k * e, d)).T.reshape(d, k, 1, e)
    out = {
        "attn_norm": get(p + "input_layernorm.weight", (d,)),
        "wqkv": np.concatenate([wq, wk, wv], axis=2),
        "wo": get(p + "self_attn.o_proj.weight", (d, h * e)).T.reshape(h, e, d),
        "mlp_norm": get(p + "post_attention_layernorm.weight", (d,)),
        "w_gate_up": np.stack([get(p + "mlp.gate_proj.weight", (f, d)).T,
                               get(p + "mlp.up_proj.weight", (f, d)).T], axis=1),
        "w_down": get(p + "mlp.down_proj.weight", (d, f)).T,
    }
    if c.qkv_bias:
        out["bqkv"] = np.concatenate([
            get(p + "self_attn.q_proj.bias", (h * e,)).reshape(k, g, e),
            get(p + "self_attn.k_proj.bias", (k * e,)).reshape(k, 1, e),
            get(p + "self_attn.v_proj.bias", (k * e,)).reshape(k, 1, e)], axis=1)
    if c.o_bias:
        out["bo"] = get(p + "self_attn.o_proj.bias", (d,))
    if c.qk_norm:
        out["q_norm"] = get(p + "self_attn.q_norm.weight", (e,))
        out["k_norm"] = get(p + "self_attn.k_norm.weight", (e,))
    return out


def params_from_hf(c: ModelConfig, get, dtype=jnp.float32) -> dict:
    """The whole params pytree from HF-named tensors, converted layer by layer to `dtype` so
    that peak host memory stays near one layer in float32 beyond the result."""
    d, v = c.hidden_size, c.vocab_size

    def put(x):
        return jnp.asarray(np.ascontiguousarray(x), dtype=dtype)

    params = {
        "embed": put(get("model.embed_tokens.weight", (v, d))),
        "layers": tuple({n: put(a) for n, a in hf_layer_tensors(c, get, i).items()}
                        for i in range(c.num_layers)),
        "final_norm": put(get("model.norm.weight", (d,))),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = put(get("lm_head.weight", (v, d)).T)
    return params
