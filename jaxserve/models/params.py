"""Hugging Face tensors -> the Flax model's state, and a model filled from them.

The model's parameters are declared once, in the modules of llama.py (shape, dtype, logical
axes); this file only says which HF tensor each state path is made from:

  embed/embedding                      model.embed_tokens.weight                [V, D]
  layers/i/attn_norm/weight            input_layernorm.weight                   [D]
  layers/i/attn/qkv/kernel             q_proj, k_proj, v_proj weights           [D, K, G+2, E]
  layers/i/attn/qkv/bias               their biases (Qwen2)                     [K, G+2, E]
  layers/i/attn/{q,k}_norm/weight      self_attn.{q,k}_norm.weight (Qwen3)      [E]
  layers/i/attn/o/kernel (and bias)    o_proj                                   [H, E, D]
  layers/i/mlp_norm/weight             post_attention_layernorm.weight          [D]
  layers/i/mlp/gate_up/kernel          gate_proj, up_proj weights (stacked)     [D, 2, F]
  layers/i/mlp/down/kernel             down_proj.weight                         [F, D]
  head/norm/weight                     model.norm.weight                        [D]
  head/lm_head/kernel                  lm_head.weight (untied only)             [D, V]

HF linear weights are [out, in]; every tensor's shape is checked against the config by `get`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxserve.config import ModelConfig
from jaxserve.models.llama import LlamaModel, abstract_model

Path = tuple  # a state path, e.g. ("layers", 3, "attn", "qkv", "kernel")
GetTensor = Callable[[str, tuple[int, ...]], np.ndarray]  # (HF name, expected shape) -> float32


def hf_layer_tensors(c: ModelConfig, get: GetTensor, i: int) -> dict[Path, np.ndarray]:
    """Layer i's parameters by state path (relative to the layer), from HF tensors."""
    d, f, h, k, g, e = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                        c.group_size, c.head_dim)
    p = f"model.layers.{i}."
    wq = get(p + "self_attn.q_proj.weight", (h * e, d)).T.reshape(d, k, g, e)
    wk = get(p + "self_attn.k_proj.weight", (k * e, d)).T.reshape(d, k, 1, e)
    wv = get(p + "self_attn.v_proj.weight", (k * e, d)).T.reshape(d, k, 1, e)
    out = {
        ("attn_norm", "weight"): get(p + "input_layernorm.weight", (d,)),
        ("attn", "qkv", "kernel"): np.concatenate([wq, wk, wv], axis=2),
        ("attn", "o", "kernel"): get(p + "self_attn.o_proj.weight", (d, h * e)).T.reshape(h, e, d),
        ("mlp_norm", "weight"): get(p + "post_attention_layernorm.weight", (d,)),
        ("mlp", "gate_up", "kernel"): np.stack([get(p + "mlp.gate_proj.weight", (f, d)).T,
                                                get(p + "mlp.up_proj.weight", (f, d)).T], axis=1),
        ("mlp", "down", "kernel"): get(p + "mlp.down_proj.weight", (d, f)).T,
    }
    if c.qkv_bias:
        out["attn", "qkv", "bias"] = np.concatenate([
            get(p + "self_attn.q_proj.bias", (h * e,)).reshape(k, g, e),
            get(p + "self_attn.k_proj.bias", (k * e,)).reshape(k, 1, e),
            get(p + "self_attn.v_proj.bias", (k * e,)).reshape(k, 1, e)], axis=1)
    if c.o_bias:
        out["attn", "o", "bias"] = get(p + "self_attn.o_proj.bias", (d,))
    if c.qk_norm:
        out["attn", "q_norm", "weight"] = get(p + "self_attn.q_norm.weight", (e,))
        out["attn", "k_norm", "weight"] = get(p + "self_attn.k_norm.weight", (e,))
    return out


def hf_tensors(c: ModelConfig, get: GetTensor) -> Iterator[tuple[Path, np.ndarray]]:
    """Every state path with its array, a layer at a time (so that a caller placing each on
    device holds about one layer in float32 on the host at once)."""
    d, v = c.hidden_size, c.vocab_size
    yield ("embed", "embedding"), get("model.embed_tokens.weight", (v, d))
    for i in range(c.num_layers):
        for path, x in hf_layer_tensors(c, get, i).items():
            yield ("layers", i, *path), x
    yield ("head", "norm", "weight"), get("model.norm.weight", (d,))
    if not c.tie_word_embeddings:
        yield ("head", "lm_head", "kernel"), get("lm_head.weight", (v, d)).T


def model_from_hf(c: ModelConfig, get: GetTensor, dtype=jnp.float32,
                  mesh: Mesh | None = None) -> LlamaModel:
    """The model with its weights from HF-named tensors, each converted to `dtype` and placed
    straight into its sharding on `mesh` (default: the first device); the model is created
    abstractly first, so no random weights are ever allocated."""
    from jaxserve import parallel

    mesh = parallel.make_mesh(1) if mesh is None else mesh
    model = abstract_model(c, dtype)
    shardings = parallel.state_shardings(nnx.state(model), mesh)
    flat = dict(nnx.to_flat_state(shardings))
    values = {}
    for path, x in hf_tensors(c, get):
        # converted by jnp.asarray (numpy's own float32 -> bfloat16 took twice as long)
        x = jnp.asarray(np.ascontiguousarray(x), dtype=dtype)
        values[path] = parallel.place(x, flat[path].get_value())
    missing = set(flat) - set(values)
    assert not missing, f"no checkpoint mapping for {sorted(missing)}"
    fill(model, values)
    return model


def fill(model: nnx.Module, values: dict[Path, jax.Array]) -> None:
    """Set the model's parameters from arrays by state path (every path must be given). Each
    Variable also records where its array lies on the mesh (`mesh_axes` metadata, beside the
    logical `out_sharding`), so that the model's rendering (treescope, `nnx.display`) shows it."""
    for path, var in nnx.to_flat_state(nnx.state(model)):  # the model's own Variables
        x = values[path]
        var.set_value(x)
        if isinstance(getattr(x, "sharding", None), NamedSharding):
            var.set_metadata(mesh_axes=x.sharding.spec)
