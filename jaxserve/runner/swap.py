"""The device side of swap preemption: a request's KV pages to host memory and back.

    out:  blob = gather[n](kv, summaries, page_ids)        # [L, 2, n, S, K, E] on device, one program
          host[rid] = device_put(blob, pinned_host)        # one asynchronous copy
    in:   blob = device_put(host.pop(rid), device)         # one copy
          kv, summaries = scatter[n](kv, summaries, page_ids, blob)     # both donated

With sparse attention the per-page key summaries ([P, 2, K, E] float32 per layer, written by the
cache write: kernels/sparse.py) travel with their pages as a second array [L, n, 2, K, E]: a
page's summary is a function of its keys, and a page swapped in without it would be skipped (or
chosen) by the sparse selection wrongly.

Every layer's pages of one request travel as ONE array, so a swap is one large copy whatever
the pages' places in the cache (FastSwitch, arXiv 2411.18424, swaps scattered 16-token pages
as many small copies and groups them into contiguous blocks to fix it; gathering on the device
first gets the same single copy). Page counts are padded to powers of two (padding gathers page
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.sched import SchedulerOutput

HOST_MEMORY_KIND = "pinned_host"


def _gather(kv, summaries, pages):
    blob = jnp.stack([jnp.stack([k[pages], v[pages]]) for k, v in kv])  # [L, 2, n, S, K, E]
    if summaries is None:
        return blob, None
    return blob, jnp.stack([s[pages] for s in summaries])  # [L, n, 2, K, E]


def _scatter(kv, summaries, pages, blob):
    kv_blob, summary_blob = blob
    kv = tuple((k.at[pages].set(kv_blob[i, 0]), v.at[pages].set(kv_blob[i, 1]))
               for i, (k, v) in enumerate(kv))
    if summaries is not None:
        summaries = tuple(s.at[pages].set(summary_blob[i]) for i, s in enumerate(summaries))
    return kv, summaries


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
        self.sizes = [1 << i for i in range(max(1, max_pages - 1).bit_length() + 1)]
        self._gather = jax.jit(_gather, out_shardings=self.device_sharding)
        self._scatter = jax.jit(_scatter, donate_argnums=(0, 1),
                                out_shardings=(kv_sharding, summary_sharding))
        self._replicated = NamedSharding(kv_sharding.mesh, P())
        # request id -> ([L, 2, n, S, K, E], [L, n, 2, K, E] or None) in host memory
        self.host: dict[str, tuple[jax.Array, jax.Array | None]] = {}
        self.stats = {"out_pages": 0, "in_pages": 0, "out_bytes": 0, "in_bytes": 0,
                      "out_copies": 0, "in_copies": 0, "out_seconds": 0.0, "in_seconds": 0.0}
        self._in_flight: list[tuple[str, float, jax.Array]] = []  # (way, dispatched at, copy)

    def _pages(self, page_ids) -> jax.Array:
        n = next(s for s in self.sizes if s >= len(page_ids))
        return jax.device_put(jnp.array(list(page_ids) + [0] * (n - len(page_ids)), jnp.int32),
                              self._replicated)

    def _out(self, kv, summaries, pages, program):
        args = (kv, summaries, pages)
        blob = program(("swap_out", pages.shape[0]), self._gather, *args)(*args)
        return tuple(None if x is None else jax.device_put(x, s)
                     for x, s in zip(blob, self.host_sharding))

    def _in(self, kv, summaries, pages, host_blob, program):
        blob = tuple(None if x is None else jax.device_put(x, s)
                     for x, s in zip(host_blob, self.device_sharding))
        args = (kv, summaries, pages, blob)
        kv, summaries = program(("swap_in", pages.shape[0]), self._scatter, *args)(*args)
        return kv, summaries, blob

    def apply(self, kv, summaries, out: SchedulerOutput, program) -> tuple:
        """Run `out`'s swaps on the cache and its page summaries (None without sparse
        attention): out, drops, in. Returns the new (kv, summaries). `program` is the runner's
        compile cache: program(key, jitted, *args) -> executable."""
        for swap in out.swap_out:
            pages = self._pages(swap.device_page_ids)
            self.host[swap.request_id] = self._out(kv, summaries, pages, program)
            self._count("out", len(swap.device_page_ids), self.host[swap.request_id])
        for rid in out.swap_drop:
            self.host.pop(rid, None)
        for swap in out.swap_in:
            pages = self._pages(swap.device_page_ids)
            kv, summaries, blob = self._in(kv, summaries, pages, self.host.pop(swap.request_id),
                                           program)
            self._count("in", len(swap.device_page_ids), blob)
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

    def warmup(self, kv, summaries, program) -> tuple:
        """Compile every swap size (it writes page 0 only); returns the new (kv, summaries)."""
        for n in self.sizes:
            pages = self._pages([0] * n)
            host_blob = self._out(kv, summaries, pages, program)
            kv, summaries, _ = self._in(kv, summaries, pages, host_blob, program)
        return kv, summaries

    def measure_seconds_per_page(self, kv, summaries, program) -> tuple[tuple, tuple, float]:
        """Seconds per page of a copy out and back (the largest size, waited for): what
        preemption_mode="auto" weighs against recomputing. Returns (kv, summaries, seconds)."""
        pages = self._pages([0] * self.sizes[-1])
        t0 = time.perf_counter()
        host_blob = jax.block_until_ready(self._out(kv, summaries, pages, program))
        kv, summaries, _ = jax.block_until_ready(self._in(kv, summaries, pages, host_blob,
                                                          program))
        return kv, summaries, (time.perf_counter() - t0) / self.sizes[-1]
