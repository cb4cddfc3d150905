"""The device side of KV in host memory: swapped-out requests' pages and the host prefix tier.

    out:  blob = gather[n](kv, summaries, page_ids)        # [L, 2, n, S, K, E] on device, one program
          blob = device_put(blob, pinned_host)             # one asynchronous copy
          host[host_page_ids[i]] = (blob, i)
    in:   blob = device_put(host blob, device)             # one copy per blob read
          kv, summaries = scatter[n](kv, summaries, dest, blob)   # both donated; dest[i]: page or 0

The scheduler names host pages (sched/host_pool.py); a host page is one slot of the blob it was
copied out with, and a blob lives while any of its pages is mapped. A swap-in reads whole blobs:
a swapped request's pages come back in one copy; host prefix tier hits (sched/host_tier.py) come
back one copy per blob they were offloaded in, the blob's other slots scattered into page 0.

With sparse attention the per-page key summaries ([P, 2, K, E] float32 per layer, written by the
cache write: kernels/sparse.py) travel with their pages as a second array [L, n, 2, K, E]: a
page's summary is a function of its keys, and a page swapped in without it would be skipped (or
chosen) by the sparse selection wrongly.

Every layer's pages of one request travel as ONE array, so a swap is one large copy whatever
the pages' places in the cache (FastSwitch, arXiv 2411.18424, swaps scattered 16-token pages
as many small copies and groups them into contiguous blocks to fix it; gathering on the device
first gets the same single copy). Page counts are padded to powers of four (padding gathers page
0 and scatters into page 0, the padding page) so a few programs serve every swap; `warmup`
compiles them. The stored arrays are copied as they are: the bf16-as-uint16 bits of the CPU
cache (kernels/storage.py) go out and come back bit for bit.

Nothing waits: the copy to host is dispatched and the step goes on; a later scatter depends on
its blob, and the gather of a swap-out is ordered before the donation of the cache it reads, so
a page freed by a swap-out can be reused by the same step.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.sched import SchedulerOutput

HOST_MEMORY_KIND = "pinned_host"
MAX_PAGES_PER_COPY = 64


def _gather(kv, summaries, pages):
    blob = jnp.stack([jnp.stack([k[pages], v[pages]]) for k, v in kv])  # [L, 2, n, S, K, E]
    if summaries is None:
        return blob, None
    return blob, jnp.stack([s[pages] for s in summaries])  # [L, n, 2, K, E]


def _scatter_layer(k, v, summary, pages, blob, layer):
    """One layer's pages from the blob (layer: a runtime index). One program per swap size
    serves every layer: a program scattering all L layers at once compiled 3-10x slower
    (2.3-8.6 s against 0.5-1.2 s per size, 30 layers, measured here)."""
    kv_blob, summary_blob = blob
    kv_layer = jax.lax.dynamic_index_in_dim(kv_blob, layer, keepdims=False)  # [2, n, S, K, E]
    k, v = k.at[pages].set(kv_layer[0]), v.at[pages].set(kv_layer[1])
    if summary is not None:
        summary = summary.at[pages].set(
            jax.lax.dynamic_index_in_dim(summary_blob, layer, keepdims=False))
    return k, v, summary


class KVSwapper:
    """Host copies of swapped-out requests' KV, by request id; `apply` runs a step's swaps."""

    def __init__(self, kv_sharding: NamedSharding, max_pages: int,
                 summary_sharding: NamedSharding | None = None):
        mesh = kv_sharding.mesh
        blob = NamedSharding(mesh, P(None, None, *kv_sharding.spec))  # [L, 2] + [P, S, K, E]
        summary_blob = None if summary_sharding is None else NamedSharding(
            mesh, P(None, None, *summary_sharding.spec[1:]))  # [L, n] + [2, K, E]
        self.device_sharding = (blob, summary_blob)
        self.host_sharding = tuple(None if x is None else x.with_memory_kind(HOST_MEMORY_KIND)
                                   for x in self.device_sharding)
        # Copies of up to 64 pages (1024 tokens of 16; 47 MB of float32 KV on the default
        # model) in programs of power-of-four sizes (1, 4, 16, 64); a larger swap goes as
        # several copies. Every engine compiles them (2 per size) for its cache's page count:
        # with power-of-two sizes a tiny test engine's start took 11.5 s against 2.6 s without
        # them, so fewer sizes, at up to 4x the bytes of a small copy.
        max_pages = min(max_pages, MAX_PAGES_PER_COPY)
        self.sizes = [1]
        while self.sizes[-1] < max_pages:
            self.sizes.append(self.sizes[-1] * 4)
        self._gather = jax.jit(_gather, out_shardings=self.device_sharding)
        self._scatter = jax.jit(_scatter_layer, donate_argnums=(0, 1, 2),
                                out_shardings=(kv_sharding, kv_sharding, summary_sharding))
        self._replicated = NamedSharding(kv_sharding.mesh, P())
        # host page -> ((blob [L, 2, n, S, K, E], summaries [L, n, 2, K, E] or None), slot)
        self.host: dict[int, tuple[tuple[jax.Array, jax.Array | None], int]] = {}
        self.stats = {"out_pages": 0, "in_pages": 0, "out_bytes": 0, "in_bytes": 0,
                      "out_copies": 0, "in_copies": 0, "out_seconds": 0.0, "in_seconds": 0.0}
        self._in_flight: list[tuple[str, float, jax.Array]] = []  # (way, dispatched at, copy)

    def _pages(self, page_ids) -> jax.Array:
        """Page ids padded with page 0 to the next compiled size."""
        n = next(s for s in self.sizes if s >= len(page_ids))
        return jax.device_put(np.array(list(page_ids) + [0] * (n - len(page_ids)), np.int32),
                              self._replicated)  # numpy: jnp.array would compile a convert

    def _out(self, kv, summaries, pages, program):
        args = (kv, summaries, pages)
        blob = program(("swap_out", pages.shape[0]), self._gather, *args)(*args)
        return tuple(None if x is None else jax.device_put(x, s)
                     for x, s in zip(blob, self.host_sharding))

    def _in(self, kv, summaries, pages, host_blob, program):
        blob = tuple(None if x is None else jax.device_put(x, s)
                     for x, s in zip(host_blob, self.device_sharding))
        new_kv, new_summaries = [], []
        for layer, (k, v) in enumerate(kv):
            args = (k, v, None if summaries is None else summaries[layer], pages, blob,
                    np.int32(layer))
            k, v, summary = program(("swap_in", pages.shape[0]), self._scatter, *args)(*args)
            new_kv.append((k, v))
            new_summaries.append(summary)
        return tuple(new_kv), None if summaries is None else tuple(new_summaries), blob

    def apply(self, kv, summaries, out: SchedulerOutput, program) -> tuple:
        """Run `out`'s copies on the cache and its page summaries (None without sparse
        attention), in the order sched/step.py gives: look up what the copies in read, drop
        `host_free`, copy out, copy in. Returns the new (kv, summaries). `program` is the
        runner's compile cache: program(key, jitted, *args) -> executable."""
        reads = [[self.host[h] for h in swap.host_page_ids] for swap in out.swap_in]
        for h in out.host_free:
            self.host.pop(h, None)
        top = self.sizes[-1]  # a larger copy out (many evicted prefix pages) goes in pieces
        for swap in out.swap_out:
            for at in range(0, len(swap.device_page_ids), top):
                device, host = swap.device_page_ids[at:at + top], swap.host_page_ids[at:at + top]
                blob = self._out(kv, summaries, self._pages(device), program)
                self.host.update((h, (blob, i)) for i, h in enumerate(host))
                self._count("out", len(device), blob)
        for swap, slots in zip(out.swap_in, reads):
            by_blob: dict[int, tuple[tuple, list[int]]] = {}  # id(blob) -> (blob, dest pages)
            for page, (blob, slot) in zip(swap.device_page_ids, slots):
                _, dest = by_blob.setdefault(id(blob), (blob, [0] * blob[0].shape[2]))
                dest[slot] = page
            for host_blob, dest in by_blob.values():
                kv, summaries, blob = self._in(kv, summaries, self._pages(dest), host_blob,
                                               program)
                self._count("in", sum(p != 0 for p in dest), blob)
        return kv, summaries

    def _count(self, way: str, num_pages: int, copies: tuple) -> None:
        copies = [x for x in copies if x is not None]
        self.stats[f"{way}_pages"] += num_pages
        self.stats[f"{way}_copies"] += len(copies)  # 1, or 2 with page summaries
        self.stats[f"{way}_bytes"] += sum(x.nbytes for x in copies)  # padded to 2^k pages
        self._in_flight.extend((way, time.perf_counter(), x) for x in copies)

    def settle(self) -> None:
        """Add the copies found complete to the seconds counted (dispatch to found ready: an
        upper bound, polled at the end of each step, which never waits for a copy out)."""
        now, pending = time.perf_counter(), []
        for way, t0, copy in self._in_flight:
            if copy.is_deleted() or copy.is_ready():
                self.stats[f"{way}_seconds"] += now - t0
            else:
                pending.append((way, t0, copy))
        self._in_flight = pending

    def warmup(self, kv, summaries, program) -> None:
        """Meet every swap size's programs without running them: inside the runner's
        `Programs.deferred` they are lowered here and compile with the step programs."""
        (k, v), summary = kv[0], None if summaries is None else summaries[0]
        for n in self.sizes:
            pages = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=self._replicated)
            program(("swap_out", n), self._gather, kv, summaries, pages)
            blob = tuple(None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                         for x, s in zip(jax.eval_shape(_gather, kv, summaries, pages),
                                         self.device_sharding))
            program(("swap_in", n), self._scatter, k, v, summary, pages, blob, np.int32(0))

    def measure_seconds_per_page(self, kv, summaries, program) -> tuple[tuple, tuple, float]:
        """Seconds per page of a copy out and back (the largest size, waited for): what
        preemption_mode="auto" weighs against recomputing. Returns (kv, summaries, seconds)."""
        pages = self._pages([0] * self.sizes[-1])
        t0 = time.perf_counter()
        host_blob = jax.block_until_ready(self._out(kv, summaries, pages, program))
        kv, summaries, _ = jax.block_until_ready(self._in(kv, summaries, pages, host_blob,
                                                          program))
        return kv, summaries, (time.perf_counter() - t0) / self.sizes[-1]
