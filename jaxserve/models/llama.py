"""The Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as Flax NNX modules.

    LlamaModel
      embed      Embed            [V, D]
      layers     nnx.List[DecoderLayer]
        attn_norm  RMSNorm        [D]
        attn       Attention
          qkv        nnx.Einsum   [D, K, G+2, E] (+ bias [K, G+2, E], Qwen2)
          q_norm, k_norm RMSNorm  [E] (Qwen3)
          o          nnx.Einsum   [H, E, D] (+ bias [D])
        mlp_norm   RMSNorm        [D]
        mlp        MLP
          gate_up    nnx.Einsum   [D, 2, F]
          down       nnx.Einsum   [F, D]
      head       LMHead
        norm       RMSNorm        [D]
        lm_head    nnx.Einsum     [D, V] (absent when the embedding is tied)

Each parameter declares its logical axes once, as Flax sharding metadata (`out_sharding`);
parallel.py maps them onto a mesh with Flax's logical axis rules. wqkv keeps, for KV head k, its
G query heads, then its key, then its value, so one matmul makes q, k and v and the K axis splits
cleanly over devices.

A forward pass is `embed`, the decoder layers over any contiguous group (the runner runs a few
layers per compiled program, the same program for every group), then `head` on the rows that
need logits:

    hidden = model.embed(token_ids)                                  # [T, D]
    hidden, new_kv = run_layers(model.layers, kv, hidden, md)       # any group of layers
    logits = model.head(hidden, logits_indices, model.embed)        # [B, V] float32
    kv = kernels.write_kv(kv, new_kv, md.slot_mapping)   # a program of its own, kv donated

The KV cache stays outside the modules: `kv` is a tuple with one `(k_cache, v_cache)` pair per
layer, each `[P, S, K, E]`; separate buffers per layer let XLA update each in place (one stacked
`[L, ...]` array was copied whole at every layer on CPU). The layers only read it; they return
this step's K/V (`new_kv`, per layer `[T, K, E]` each), written by `write_kv`.

Every layer has the same graph definition: configuration lives in static attributes equal for
all layers (the config), never per-layer Python values, so `nnx.split` of any layer gives the
same graphdef and one compiled program serves every group.

bfloat16: every projection computes with `preferred_element_type=float32` and casts back (XLA
has no bf16 x bf16 -> bf16 dot on CPU and converted whole weights to float32 on every call);
the embedding lookup goes through the table's bits (kernels/storage.py).

On one CPU device the runner points its model's projections at `project_cpu` (use_cpu_matmul):
decode's few-row projections then run jaxserve's C++ matmul (kernels/cpu_matmul.py), where
XLA:CPU's dot ran them 1.1-13x slower. In bf16 its programs take `packed_weights` copies:
uint32 kernels (cpu_matmul.pack) that `project_cpu` sends to the packed matmul, and with which
MLP computes SiLU(gate) * up in the matmul's epilogue (cpu_matmul.swiglu).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes
from jax.sharding import Mesh

from jaxserve import kernels
from jaxserve.config import ModelConfig, SparseAttentionConfig, rope_inv_freq
from jaxserve.kernels import AttentionMetadata, cpu_matmul
from jaxserve.kernels.storage import take_rows

KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (k, v), each [P, S, K, E]
NewKV = tuple[tuple[jax.Array, jax.Array], ...]  # per layer run (k, v), each [T, K, E]

_normal = nnx.initializers.normal(0.02)


def _axes(*names: str | None) -> dict:
    """Param metadata: logical axis names, resolved onto a mesh by parallel.py (not at init)."""
    return {"out_sharding": names, "eager_sharding": False}


def project(spec: str, x, w, **kwargs):
    """jnp.einsum for projections, accumulating in float32 (`preferred_element_type`).

    A bf16 input of one row is computed as two: XLA:CPU rewrites a one-row dot into a
    matrix-vector product that converts the whole bf16 weight to float32 first (seen in the
    compiled HLO of decode at batch 1), while a two-row dot stays one bf16 x bf16 -> f32 dot."""
    if x.dtype == jnp.bfloat16 and x.shape[0] == 1:
        return jnp.einsum(spec, jnp.concatenate([x, x]), w, **kwargs)[:1]
    return jnp.einsum(spec, x, w, **kwargs)


def project_cpu(spec: str, x, w, **kwargs):
    """`project` through the C++ matmul where it applies (kernels/cpu_matmul.py: the few rows of
    decode steps, float32 or bf16 weights), else XLA's dot. For programs that run on one CPU
    device only (see use_cpu_matmul)."""
    y = None
    if kwargs.get("preferred_element_type") == jnp.float32:
        y = cpu_matmul.einsum(spec, x, w)
    return project(spec, x, w, **kwargs) if y is None else y


def use_cpu_matmul(model: nnx.Module) -> None:
    """Route the projections of `model` (in place) through `project_cpu`. The runner does this
    to its own copy when its mesh is one CPU device: under a larger mesh the partitioner would
    gather each sharded weight whole for the call."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Einsum):
            node.einsum_op = project_cpu
        elif isinstance(node, LMHead):
            node.tied_op = project_cpu


TIED_HEAD = "BD,VD->BV"  # the tied head's projection: x . embedding^T


def packed_weights(module: nnx.Module) -> nnx.Module:
    """A copy of `module` whose bf16 projection weights are packed for the CPU matmul
    (cpu_matmul.pack: no per-call interleaving; 1.3-1.8x faster projections), sharing its other
    arrays; an Embed's table is packed as the tied head reads it, so the copy of an embedding
    serves the head only. The runner's programs take these copies where their projections run
    `project_cpu`; `module` keeps the checkpoint layout (the live model), so packing holds a
    second copy of those weights."""
    copy = nnx.clone(module)
    for _, node in nnx.iter_graph(copy):
        if isinstance(node, nnx.Einsum):
            spec, var = node.einsum_str, node.kernel
        elif isinstance(node, Embed):
            spec, var = TIED_HEAD, node.embedding
        else:
            continue
        if cpu_matmul.packable(spec, var[...]):
            var.set_value(cpu_matmul.pack(spec, var[...]))
    return copy


def _promote(args, /, *, dtype=None, inexact=True):
    """nnx.Einsum's dtype promotion, leaving a packed weight (uint32, cpu_matmul.pack) and its
    input as they are: promoting would turn the packed bits into numbers."""
    if args[1] is not None and args[1].dtype == jnp.uint32:
        return args
    return dtypes.promote_dtype(args, dtype=dtype, inexact=inexact)


def _einsum(spec: str, kernel_shape, kernel_axes, *, dtype, rngs, bias_shape=None,
            bias_axes=()) -> nnx.Einsum:
    """A projection that computes in float32 whatever the weight dtype (see the module doc)."""
    return nnx.Einsum(spec, kernel_shape, bias_shape, param_dtype=dtype, rngs=rngs,
                      kernel_init=_normal, bias_init=nnx.initializers.zeros_init(),
                      preferred_element_type=jnp.float32, einsum_op=project,
                      promote_dtype=_promote,
                      kernel_metadata=_axes(*kernel_axes), bias_metadata=_axes(*bias_axes))


class RMSNorm(nnx.Module):
    """RMSNorm as Hugging Face computes it: normalised in float32, cast back to the input dtype,
    then scaled (nnx.RMSNorm scales before the cast, which differs in bfloat16)."""

    def __init__(self, size: int, eps: float, axis_name: str, *, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype), **_axes(axis_name))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding [V, D]. Not nnx.Embed: its `jnp.take` of a bf16 table converts the whole
    table to float32 on XLA:CPU; `take_rows` gathers through the bits instead."""

    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs.params(), (vocab_size, dim), dtype),
                                   **_axes("vocab", "embed"))

    def __call__(self, token_ids):
        """token_ids [T] -> hidden [T, D]."""
        return take_rows(self.embedding[...], token_ids)


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


class Attention(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, h, k, g, e = c.hidden_size, c.num_heads, c.num_kv_heads, c.group_size, c.head_dim
        self.config = c
        self.qkv = _einsum("TD,DKCE->TKCE", (d, k, g + 2, e), ("embed", "kv_heads", None, "head_dim"),
                           bias_shape=(k, g + 2, e) if c.qkv_bias else None,
                           bias_axes=("kv_heads", None, "head_dim"), dtype=dtype, rngs=rngs)
        self.o = _einsum("THE,HED->TD", (h, e, d), ("heads", "head_dim", "embed"),
                         bias_shape=(d,) if c.o_bias else None, bias_axes=("embed",),
                         dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(e, c.rms_norm_eps, "head_dim", dtype=dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(e, c.rms_norm_eps, "head_dim", dtype=dtype) if c.qk_norm else None

    def __call__(self, x, k_cache, v_cache, md: AttentionMetadata, cos, sin, *,
                 mesh: Mesh | None = None, summary=None,
                 sparse: SparseAttentionConfig | None = None, dense_layer=None, reuse=None):
        """x [T, D] (already normed) -> (output [T, D], k_new [T, K, E], v_new [T, K, E]).
        With a mesh, heads are split over its tensor axis and attention runs per device.
        sparse: decode-only steps read the pages chosen from `summary` ([P, 2, K, E]), unless
        `dense_layer` (a traced bool) is true. reuse: the kept choice (kernels.sparse.
        SelectionReuse); the output is then (out, chosen [R, W] bool)."""
        c = self.config
        t, g = x.shape[0], c.group_size
        qkv = self.qkv(x).astype(x.dtype)  # [T, K, G+2, E]
        q = qkv[:, :, :g].reshape(t, -1, c.head_dim)  # [T, H, E]; head h = k * G + g (HF's repeat_kv)
        k_new, v_new = qkv[:, :, g], qkv[:, :, g + 1]  # [T, K, E]
        if self.q_norm is not None:
            q, k_new = self.q_norm(q), self.k_norm(k_new)
        q, k_new = apply_rope(q, cos, sin), apply_rope(k_new, cos, sin)
        out = kernels.ragged_paged_attention(
            q, k_cache, v_cache, k_new, v_new, md, sm_scale=c.head_dim ** -0.5,
            sliding_window=c.sliding_window, mesh=mesh, summaries=summary, sparse=sparse,
            dense_layer=dense_layer, reuse=reuse)  # [T, H, E]
        if reuse is not None:
            out, chosen = out
            return (self.o(out).astype(x.dtype), chosen), k_new, v_new
        return self.o(out).astype(x.dtype), k_new, v_new


class MLP(nnx.Module):
    """SwiGLU. gate and up are one [D, 2, F] weight (one matmul); an einsum, not a reshape to
    [D, 2F]: with F split over a mesh, that reshape made XLA all-gather the whole weight."""

    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = c.hidden_size, c.intermediate_size
        self.gate_up = _einsum("TD,DCF->TCF", (d, 2, f), ("embed", None, "mlp"), dtype=dtype, rngs=rngs)
        self.down = _einsum("TF,FD->TD", (f, d), ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        w = self.gate_up.kernel[...]
        if w.dtype == jnp.uint32 and w.shape[-1] % 16 == 0:
            # packed for the CPU matmul (packed_weights): SiLU(gate) * up in its epilogue,
            # rounded as below; no float32 [T, 2F] through memory
            return self.down(cpu_matmul.swiglu(x, w)).astype(x.dtype)
        gate_up = self.gate_up(x).astype(x.dtype)  # [T, 2, F]
        # SiLU in float32, rounded to the model's dtype once, as torch computes it for bf16.
        # jax.nn.silu on bf16 rounds after each of its five ops: 16.2 ms of a 256-token bf16
        # prefill step against 10.4 this way (jax.profiler trace), and further from HF's bf16
        # (teacher-forced log-probs of the default model: mean |diff| 0.077 against 0.073)
        gate = gate_up[:, 0].astype(jnp.float32)
        act = (gate * jax.nn.sigmoid(gate)).astype(x.dtype)
        return self.down(act * gate_up[:, 1]).astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "embed", dtype=dtype)
        self.attn = Attention(c, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "embed", dtype=dtype)
        self.mlp = MLP(c, dtype=dtype, rngs=rngs)

    def __call__(self, hidden, k_cache, v_cache, md: AttentionMetadata, cos, sin, *,
                 mesh: Mesh | None = None, summary=None,
                 sparse: SparseAttentionConfig | None = None, dense_layer=None, reuse=None):
        """hidden [T, D] -> (hidden [T, D], k_new [T, K, E], v_new [T, K, E]); with `reuse`
        (see Attention) hidden is (hidden, chosen)."""
        attn, k_new, v_new = self.attn(self.attn_norm(hidden), k_cache, v_cache, md, cos, sin,
                                       mesh=mesh, summary=summary, sparse=sparse,
                                       dense_layer=dense_layer, reuse=reuse)
        if reuse is not None:
            (attn, chosen), hidden = attn, hidden + attn[0]
            return (hidden + self.mlp(self.mlp_norm(hidden)), chosen), k_new, v_new
        hidden = hidden + attn
        return hidden + self.mlp(self.mlp_norm(hidden)), k_new, v_new


class LMHead(nnx.Module):
    """Final norm and the projection to logits; a tied head reads the embedding table."""

    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "embed", dtype=dtype)
        self.lm_head = None if c.tie_word_embeddings else _einsum(
            "BD,DV->BV", (c.hidden_size, c.vocab_size), ("embed", "vocab"), dtype=dtype, rngs=rngs)
        self.tied_op = project  # the tied projection's einsum (use_cpu_matmul swaps it)

    def __call__(self, hidden, logits_indices, embed: Embed):
        """hidden [T, D], logits_indices [B] -> logits [B, V] in float32."""
        x = self.norm(hidden[logits_indices])  # [B, D]
        if self.lm_head is None:
            return self.tied_op(TIED_HEAD, x, embed.embedding[...],
                                preferred_element_type=jnp.float32)
        return self.lm_head(x)


class LlamaModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.head = LMHead(config, dtype=dtype, rngs=rngs)

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed.embedding.dtype

    def __call__(self, kv: KVCache, token_ids, md: AttentionMetadata, logits_indices, *,
                 mesh: Mesh | None = None) -> tuple[jax.Array, NewKV]:
        """All layers: (logits [B, V] float32, new_kv). The cache itself is only read."""
        hidden, new_kv = run_layers(self.layers, kv, self.embed(token_ids), md, mesh=mesh)
        return self.head(hidden, logits_indices, self.embed), new_kv


def run_layers(layers: Sequence[DecoderLayer], kv: KVCache, hidden, md: AttentionMetadata, *,
               mesh: Mesh | None = None, summaries=None,
               sparse: SparseAttentionConfig | None = None,
               dense_layers=None, selections=None):
    """A contiguous group of layers with their caches: hidden [T, D] -> (hidden, new_kv), where
    new_kv holds these layers' K/V of this step's tokens, to be written by write_kv.
    summaries: these layers' key summaries (per layer [P, 2, K, E]) when `sparse` is set;
    dense_layers: [layers] bool, true for the layers that attend densely even so (traced, so
    one program serves every group). selections: sparse attention's kept choices
    (runner/selection.py: per layer [M, W] bool, slots [R], since [R], and refresh: a static
    bool); then the
    result is (hidden, new_kv, chosen per layer [R, W] bool)."""
    cos, sin = rope(md.positions, layers[0].attn.config)
    new_kv, chosen = [], []
    summaries = (None,) * len(layers) if summaries is None else summaries
    for i, (layer, (k_cache, v_cache), summary) in enumerate(zip(layers, kv, summaries, strict=True)):
        reuse = None
        if selections is not None:
            kept, slots, since, refresh = selections
            reuse = kernels.sparse.SelectionReuse(kept[i][slots], since, refresh)
        hidden, k_new, v_new = layer(hidden, k_cache, v_cache, md, cos, sin, mesh=mesh,
                                     summary=summary, sparse=sparse, reuse=reuse,
                                     dense_layer=None if dense_layers is None else dense_layers[i])
        if reuse is not None:
            hidden, mask = hidden
            chosen.append(mask)
        new_kv.append((k_new, v_new))
    if selections is not None:
        return hidden, tuple(new_kv), tuple(chosen)
    return hidden, tuple(new_kv)


def init_model(config: ModelConfig, key: jax.Array | int = 0, dtype=jnp.float32,
               scale: float = 0.02) -> LlamaModel:
    """A model with random weights (tests and benchmarks without a checkpoint): matrices
    normal(0, scale), norms one, biases zero."""
    model = LlamaModel(config, dtype=dtype, rngs=nnx.Rngs(key))
    if scale != 0.02:
        for _, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Param) and len(var.shape) > 1:
                var.set_value((var[...].astype(jnp.float32) * (scale / 0.02)).astype(var.dtype))
    return model


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> LlamaModel:
    """The model's structure with no weights allocated (jax.ShapeDtypeStruct leaves)."""
    return nnx.eval_shape(lambda: LlamaModel(config, dtype=dtype, rngs=nnx.Rngs(0)))


def init_kv_cache(c: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> KVCache:
    """Zeroed caches; `dtype` is the storage dtype (kernels.storage.storage_dtype)."""
    shape = (num_pages, page_size, c.num_kv_heads, c.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers))
