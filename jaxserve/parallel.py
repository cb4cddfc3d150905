"""Mesh construction and the one table from logical axes to mesh axes.

Tensor parallelism over a `jax.sharding.Mesh` with a "tensor" axis (Megatron-style, as vLLM
does it): attention heads and MLP width are split across devices, column-parallel on the way
in (qkv, gate_up split on their output axis) and row-parallel on the way out (o, down split
on their input axis, XLA adds the all-reduce); the vocabulary is split for the embedding
(masked local lookup + all-reduce, inserted by XLA) and for the head, so logits come out split
on V. The KV cache `[P, S, K, E]` is split on K. Attention runs under `shard_map` (see
`kernels.ragged_paged_attention(mesh=...)`), each device on its own heads and cache shard.

Every parameter declares its logical axes once, as Flax sharding metadata on its `nnx.Param`
(models/llama.py); `RULES` are the Flax logical axis rules that map them to mesh axes
(`nnx.logical_axis_rules` + `nnx.get_partition_spec`), and a dimension that does not divide by the mesh axis is replicated instead (say an MLP
width of 1000 at tp 16), since JAX needs even shards.

KV heads that do not divide (K % tp != 0, e.g. 2 KV heads at tp 8, or SmolLM2's 3 at tp 2 if
its 9 query heads allowed it) are replicated as vLLM does: each device holds the KV heads its
query heads need. Concretely the KV heads are split into r "virtual" KV heads each serving G/r
of the original G query heads, with r the smallest divisor of G such that K*r divides by tp
(r = G always works when H divides by tp). The qkv kernel `[D, K, G+2, E]` becomes `[D, K*r, G/r+2, E]`
with the key and value columns copied r times, which keeps the query-head order (h = k*G + g)
and so leaves wo and the attention code unchanged; the cache is `[P, S, K*r, E]`, split on K*r.
Query heads that do not divide by tp are refused at start-up with the sizes that work.

Data parallelism is not built: an engine's batch is one ragged token axis that every device
computes in full. A user mesh may carry other axes; everything is replicated over them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.errors import JaxserveError
from jaxserve.kernels import TENSOR  # the mesh axis of tensor parallelism, "tensor"

# logical axis -> mesh axis (None: replicated): Flax logical axis rules, the one sharding table of
# jaxserve. The modules declare their parameters' logical axes (`out_sharding` metadata).
RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", TENSOR),  # embedding rows and head columns
    ("heads", TENSOR),  # o input (row-parallel)
    ("kv_heads", TENSOR),  # qkv output, its bias, the KV cache (column-parallel)
    ("mlp", TENSOR),  # gate_up output (column-parallel), down input (row-parallel)
    ("embed", None),  # the model width stays whole: hidden states are replicated
    ("head_dim", None),
)
KV_CACHE_AXES = (None, None, "kv_heads", "head_dim")  # [P, S, K, E]


class ShardingError(JaxserveError, ValueError):
    """A mesh that cannot serve this model (sizes that do not divide, missing axis, devices)."""


def tensor_parallel_sizes(config: ModelConfig, max_size: int | None = None) -> list[int]:
    """The tensor-parallel sizes this model can run at: the divisors of its query heads."""
    h = config.num_heads
    return [n for n in range(1, h + 1) if h % n == 0 and (max_size is None or n <= max_size)]


def make_mesh(tensor_parallel_size: int = 1, devices=None) -> Mesh:
    """A 1-D mesh ("tensor",) over the first `tensor_parallel_size` devices (all processes')."""
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= tensor_parallel_size <= len(devices):
        raise ShardingError(f"tensor_parallel_size={tensor_parallel_size} needs that many devices; "
                            f"{len(devices)} are visible ({devices[0].platform}). On CPU, set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts")
    chosen = devices[:tensor_parallel_size]
    if jax.process_count() > 1 and len(chosen) != len(devices):
        raise ShardingError(f"with {jax.process_count()} processes the mesh must span all "
                            f"{len(devices)} devices; got tensor_parallel_size={tensor_parallel_size}")
    return Mesh(np.array(chosen), (TENSOR,), axis_types=(AxisType.Auto,))


def tensor_size(mesh: Mesh) -> int:
    return dict(mesh.shape).get(TENSOR, 1)


def check_mesh(config: ModelConfig, mesh: Mesh) -> None:
    """Raise ShardingError, naming the sizes that work, if the model cannot run on `mesh`."""
    if TENSOR not in mesh.axis_names:
        raise ShardingError(f"the mesh needs a {TENSOR!r} axis; it has {mesh.axis_names}")
    if any(t != AxisType.Auto for t in mesh.axis_types):
        raise ShardingError(f"the mesh axes must be AxisType.Auto (GSPMD); got {mesh.axis_types}")
    tp = tensor_size(mesh)
    if config.num_heads % tp:
        raise ShardingError(
            f"tensor_parallel_size={tp} does not divide the model's {config.num_heads} query heads; "
            f"sizes that work: {tensor_parallel_sizes(config, max_size=jax.device_count())}")


def kv_head_replicas(config: ModelConfig, tp: int) -> int:
    """r: each KV head is split into r virtual KV heads (1 when K divides by tp)."""
    g = config.group_size
    return next(r for r in range(1, g + 1) if g % r == 0 and (config.num_kv_heads * r) % tp == 0)


def sharded_model_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config the sharded model runs: K*r KV heads of G/r query heads each (same H)."""
    r = kv_head_replicas(config, tp)
    return config if r == 1 else dataclasses.replace(config, num_kv_heads=config.num_kv_heads * r)


def expand_kv_heads(w: jax.Array, config: ModelConfig, r: int) -> jax.Array:
    """The qkv kernel [D, K, G+2, E] (or its bias [K, G+2, E]) -> [D, K*r, G/r+2, E]."""
    if r == 1:
        return w
    g = config.group_size
    *lead, k, _, e = w.shape
    q = w[..., :g, :].reshape(*lead, k, r, g // r, e)
    kv = jnp.broadcast_to(w[..., None, g:, :], (*lead, k, r, 2, e))
    return jnp.concatenate([q, kv], axis=-2).reshape(*lead, k * r, g // r + 2, e)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of an array with these logical axes under RULES (Flax's logical-to-mesh
    resolution), with any dimension that does not divide by its mesh axis replicated."""
    with nnx.logical_axis_rules(RULES):
        spec = nnx.get_partition_spec(nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32),
                                                out_sharding=axes, eager_sharding=False))
    return _divisible(spec.get_value(), shape, mesh)


def _divisible(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    sizes = dict(mesh.shape)
    out = [None if axis is None or sizes.get(axis, 1) == 1 or dim % sizes[axis] else axis
           for axis, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape)]
    return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding of every parameter in `state` (a model's, abstract or not), from each
    Variable's logical axes (`out_sharding` metadata) and RULES."""
    with nnx.logical_axis_rules(RULES):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda v, x: v.replace(NamedSharding(mesh, _divisible(
        v.get_value(), x.shape, mesh))), specs, state,
        is_leaf=lambda x: isinstance(x, nnx.Variable))


def kv_sharding(config: ModelConfig, mesh: Mesh) -> NamedSharding:
    """Sharding of each layer's K and V cache [P, S, K, E] (config: the sharded one)."""
    return NamedSharding(mesh, spec_for(KV_CACHE_AXES, (1, 1, config.num_kv_heads,
                                                        config.head_dim), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(x, sharding: NamedSharding) -> jax.Array:
    """Put `x` (numpy, a one-device array, or an array already on the mesh) at `sharding`. From
    the host every process builds only its own shards (works across processes)."""
    if isinstance(x, jax.Array) and x.sharding.device_set == sharding.device_set:
        return jax.device_put(x, sharding)  # on the mesh already: a no-op or a reshard
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model, mesh: Mesh):
    """(the model laid out and placed for `mesh`, the config it runs): each parameter put at
    the sharding its logical axes give; KV heads that do not divide by the tensor axis expanded
    into virtual heads first (a new model of the sharded config). `model` is left as it was."""
    from jaxserve.models.llama import abstract_model

    config = model.config
    check_mesh(config, mesh)
    tp = tensor_size(mesh)
    r = kv_head_replicas(config, tp)
    run_config = sharded_model_config(config, tp)
    # a model of the runner's own: the same arrays where nothing moves (r == 1), else new ones
    target = nnx.clone(model) if r == 1 else abstract_model(run_config, model.dtype)
    shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(target), mesh)))
    values = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        x = var.get_value()
        if path[-2] == "qkv":  # ("layers", i, "attn", "qkv", "kernel" | "bias")
            x = expand_kv_heads(x, config, r)
        values[path] = place(x, shardings[path].get_value())
    from jaxserve.models.params import fill

    fill(target, values)
    return target, run_config


def sharded_greedy(logits, banned, mesh: Mesh):
    """Greedy tokens and their log-probs from vocab-split logits without gathering them.

    logits f32[B, V] split on V; banned i32[B, k] (-1 = none) cannot be chosen. Each device
    takes its shard's max and first argmax; the token is the smallest index holding the global
    max (jnp.argmax's tie rule). The log-prob is of the raw logits: a max and a sum all-reduced.
    Only [B]-sized values cross devices."""

    def local(lg, ban):  # lg [B, V/tp]
        width = lg.shape[1]
        offset = jax.lax.axis_index(TENSOR) * width
        rows = jnp.arange(lg.shape[0])[:, None]
        col = jnp.where((ban >= offset) & (ban < offset + width), ban - offset, width)
        masked = lg.at[jnp.broadcast_to(rows, ban.shape), col].set(-jnp.inf, mode="drop")
        local_max = masked.max(axis=-1)  # [B]
        best = jax.lax.pmax(local_max, TENSOR)
        index = jnp.argmax(masked, axis=-1).astype(jnp.int32) + offset
        token = jax.lax.pmin(jnp.where(local_max == best, index, jnp.iinfo(jnp.int32).max), TENSOR)
        raw_max = jax.lax.pmax(lg.max(axis=-1), TENSOR)
        log_norm = raw_max + jnp.log(jax.lax.psum(jnp.exp(lg - raw_max[:, None]).sum(-1), TENSOR))
        mine = (token >= offset) & (token < offset + width)
        chosen = jnp.take_along_axis(lg, jnp.clip(token - offset, 0, width - 1)[:, None], 1)[:, 0]
        chosen = jax.lax.psum(jnp.where(mine, chosen, 0.0), TENSOR)
        return token, chosen - log_norm

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, TENSOR), P()), out_specs=(P(), P()),
                         check_vma=False)(logits, banned)


def describe_sharding(engine) -> str:
    """A text table of how the engine's parameters and KV cache lie on its mesh: per array its
    shape, PartitionSpec, per-device shard shape and bytes per device (layers shown once)."""
    runner = engine.runner
    rows = [("array", "shape", "spec", "shard", "bytes/device")]

    def add(name, x):
        shard = x.addressable_shards[0].data.shape
        rows.append((name, str(tuple(x.shape)), str(tuple(x.sharding.spec)), str(tuple(shard)),
                     _human(math.prod(shard) * x.dtype.itemsize)))

    flat = [(path, var.get_value()) for path, var in nnx.to_flat_state(nnx.state(runner.model))]
    for path, x in flat:
        if path[0] != "layers":
            add("/".join(map(str, path)), x)
        elif path[1] == 0:
            add("/".join(["layers/*", *map(str, path[2:])]), x)
    add("kv[*].k, kv[*].v", runner.kv[0][0])
    arrays = [x for _, x in flat] + jax.tree_util.tree_leaves(runner.kv)
    total = sum(s.data.nbytes for x in arrays for s in x.addressable_shards
                if s.device == x.addressable_shards[0].device)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    mesh = runner.mesh
    head = (f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} "
            f"devices; {runner.config.num_kv_heads} KV heads on the mesh "
            f"({engine.model_config.num_kv_heads} in the checkpoint)")
    return "\n".join([head, *lines, f"params + KV cache on one device: {_human(total)} "
                      f"({len(runner.model.layers)} layers)"])


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
