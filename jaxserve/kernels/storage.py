"""How arrays that are gathered from or scattered into are stored, per backend.

XLA:CPU has no bfloat16 gather or scatter: a program that gathers rows from a bf16 buffer, or
scatters rows into one, converts the *whole* buffer to float32 and back (measured on SmolLM2's
KV cache, 30 layers: the cache write took 319 ms in bf16 against 0.17 ms in float32, its HLO 180
converts and 60 copies). The same 16 bits stored as `uint16` gather and scatter natively, and
`lax.bitcast_convert_type` between the two is free, so on CPU a bf16 KV cache is kept as
`uint16` and only the rows a program touches are reinterpreted. GPU and TPU gather and scatter
bf16 natively (their Pallas kernels read the bf16 cache directly), so there it stays bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = jnp.dtype(jnp.uint16)  # the storage of bfloat16 where the backend cannot index bf16


def storage_dtype(dtype, platform: str) -> jnp.dtype:
    """The dtype a cache of logical `dtype` is kept in on `platform` ("cpu", "gpu", "tpu")."""
    dtype = jnp.dtype(dtype)
    return BITS if dtype == jnp.bfloat16 and platform == "cpu" else dtype


def to_storage(x: jax.Array, storage: jnp.dtype) -> jax.Array:
    """Values (any float dtype) as stored in a buffer of dtype `storage`."""
    if jnp.dtype(storage) == BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BITS)
    return x.astype(storage)


def from_storage(x: jax.Array) -> jax.Array:
    """Stored values back as numbers (uint16 bits -> bfloat16; other dtypes unchanged)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BITS else x


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids] along axis 0. A bf16 table is indexed through its bits, on every backend (the
    bitcast is free), so that XLA:CPU does not convert the whole table (an embedding of
    49152 x 576) to float32 for a lookup of a few rows."""
    if table.dtype == jnp.bfloat16:
        return from_storage(jnp.take(jax.lax.bitcast_convert_type(table, BITS), ids, axis=0))
    return jnp.take(table, ids, axis=0)
