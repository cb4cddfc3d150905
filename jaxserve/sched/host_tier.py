"""The host prefix tier: prefix-cached KV pages kept in host memory after the device evicts them.

A full page registered in the device prefix cache (page_manager.py) is evicted when `allocate`
needs a free page. With a host pool, the scheduler first copies the page to a host page, under
the same chained hash (`offload`). A later request whose prompt continues past its device-cached
prefix finds the next pages here (`find`) and copies them back into fresh device pages instead of
recomputing them: FastSwitch's KV reuse across the turns of a conversation (arXiv 2411.18424),
the write-back-on-eviction of SGLang's hierarchical cache. A page whose hash is already here is
not copied again, so each page of a long chat goes to host memory once.

The tier's pages are the evictable part of the host pool, least recently used first: a swapped-out
request (which must keep its pages) or a newer offload takes them back (`reserve`).

Only a continuation of the device prefix is looked up: the device frees a request's page table
tail first (page_manager.py), so it keeps the start of a chain and the tail is what lands here.

Host only, no jax: the copies are `Swap`s in the step's output and runner/swap.py makes them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from jaxserve.sched.host_pool import HostPool


class HostTier:
    def __init__(self, pool: HostPool):
        self.pool = pool
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # hash -> host page, oldest first
        self.num_hit_pages = 0  # pages found here and copied back, since start
        self.num_offloaded_pages = 0  # pages copied here, since start

    @property
    def num_pages(self) -> int:
        return len(self._lru)

    def find(self, page_hashes: Iterable[bytes]) -> list[int]:
        """Host pages holding the longest run of `page_hashes` (a chain continuing a device
        prefix); they become the most recently used. Counts nothing: see `count_hits`."""
        pages = []
        for page_hash in page_hashes:
            page = self._lru.get(page_hash)
            if page is None:
                break
            self._lru.move_to_end(page_hash)
            pages.append(page)
        return pages

    def count_hits(self, num_pages: int) -> None:
        self.num_hit_pages += num_pages

    def reserve(self, num_pages: int) -> bool:
        """Evict least recently used pages until `num_pages` pool pages are free. False, with
        nothing evicted, when even the whole tier would not make room (swapped requests hold
        the rest)."""
        if num_pages > self.pool.num_free_pages + len(self._lru):
            return False
        while self.pool.num_free_pages < num_pages:
            _, page = self._lru.popitem(last=False)
            self.pool.free([page])
        return True

    def offload(self, evicted: Sequence[tuple[int, bytes]]) -> tuple[list[int], list[int]]:
        """Take host pages for device pages evicted from the prefix cache, (page, hash) in
        eviction order. Returns (device pages, host pages) to copy, in one run of host ids where
        the pool allows. Pages already here are only marked used; when the pool cannot hold all,
        the most recently evicted are kept."""
        new: dict[bytes, int] = {}
        for page, page_hash in evicted:
            if page_hash in self._lru:
                self._lru.move_to_end(page_hash)
            else:
                new[page_hash] = page
        room = min(len(new), self.pool.num_free_pages + len(self._lru))
        if not room:
            return [], []
        self.reserve(room)
        kept = list(new.items())[len(new) - room:]
        host = self.pool.allocate(room)
        for (page_hash, _), host_page in zip(kept, host):
            self._lru[page_hash] = host_page
        self.num_offloaded_pages += room
        return [page for _, page in kept], host

    def discard(self, host_pages: Iterable[int]) -> None:
        """Forget these pages (their copies were never made) and free them in the pool."""
        drop = set(host_pages)
        for page_hash in [h for h, p in self._lru.items() if p in drop]:
            self.pool.free([self._lru.pop(page_hash)])

    def verify(self) -> None:
        """Raise AssertionError if the tier disagrees with its pool (for tests)."""
        pages = list(self._lru.values())
        assert len(set(pages)) == len(pages), "a host page holds two hashes"
        assert not any(self.pool._is_free(p) for p in pages), "a tier page is free in the pool"
