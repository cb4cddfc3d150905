"""Host-memory KV pages: a bounded pool of host page ids. Host only, no jax.

Swap preemption copies a request's KV pages from the device cache to host memory (the runner's
`swap.py` does the copies; this module only counts). The pool has `num_pages` host pages
(`swap_space` bytes / bytes of one page across layers); a swap-out that does not fit falls back to
recompute. Ids are handed out as contiguous runs where the free list allows (lowest run that
fits, else the lowest free ids), so a host copy can be laid out as few large blocks.

The pool is shared by swapped-out requests and the host prefix tier (host_tier.py), whose pages
are evictable. Every id freed is also recorded (`take_freed`) so the step can tell the runner
which host copies nobody will read again.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from jaxserve.sched.page_manager import PageManagerError


class HostPool:
    def __init__(self, num_pages: int):
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages))  # sorted
        self._freed: list[int] = []  # freed since take_freed()

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """`num_pages` host page ids, one contiguous run if there is one; all or nothing."""
        if num_pages > len(self._free):
            raise PageManagerError(f"asked for {num_pages} host pages, {len(self._free)} are free")
        free, start = self._free, None
        for i in range(len(free) - num_pages + 1):
            if free[i + num_pages - 1] - free[i] == num_pages - 1:
                start = i
                break
        if start is None:
            start = 0  # no run long enough: the lowest ids
            taken = free[:num_pages]
        else:
            taken = free[start:start + num_pages]
        del free[start:start + num_pages]
        return taken

    def free(self, page_ids: Sequence[int]) -> None:
        ids = set(page_ids)
        if len(ids) != len(page_ids) or any(
                not 0 <= p < self.num_pages or self._is_free(p) for p in ids):
            raise PageManagerError(f"host pages {sorted(ids)} are not all in use (double free?)")
        for p in page_ids:
            bisect.insort(self._free, p)
        self._freed.extend(page_ids)

    @property
    def has_freed(self) -> bool:
        """Some id was freed since the last take_freed()."""
        return bool(self._freed)

    def take_freed(self) -> list[int]:
        """Ids freed since the last call (some may have been handed out again since)."""
        freed, self._freed = self._freed, []
        return freed

    def _is_free(self, page: int) -> bool:
        i = bisect.bisect_left(self._free, page)
        return i < len(self._free) and self._free[i] == page
