"""KV page manager: free list, reference counts and the prefix cache. Host only, no jax.

The device KV cache is `num_pages` pages of `page_size` token slots each. This module only does
the bookkeeping: which page ids are in use, by how many requests, and which full pages hold which
tokens.

- Page 0 is reserved and never handed out: the device writes padding tokens there.
- A page in use has a reference count >= 1 (one per request whose page table lists it). Pages
  reached through the prefix cache are shared, so one page may be listed by several requests.
- A FULL page whose KV has been computed can be *registered* under the hash of its tokens chained
  with the hash of the page before it (`hash_page`), so the hash names the whole prefix, not just
  one page of tokens.
  A later request whose prompt starts with the same pages finds them with `find_cached_prefix` and
  `share`s them instead of recomputing them.
- A page whose count drops to 0 is free. If it is registered it stays findable in an LRU of cached
  free pages until `allocate` needs it (least recently freed first; uncached free pages are used
  before any cached one), at which point its hash is forgotten. With `track_evictions`, each
  such eviction is recorded (`take_evicted`) so the scheduler can copy the page to the host
  prefix tier (host_tier.py) before the page is written again.

Every mutating method validates its whole argument before changing anything, so a raised error
leaves the manager as it was.
"""

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from jaxserve.errors import JaxserveError

NULL_PAGE = 0  # reserved padding target, never allocated
_ROOT_HASH = bytes(32)  # the parent of a sequence's first page


class PageManagerError(JaxserveError, RuntimeError):
    """The page manager was used wrongly (double free, sharing a free page, ...): a caller bug."""


class OutOfPagesError(PageManagerError):
    """`allocate` asked for more pages than are free. The scheduler checks first and preempts."""


def hash_page(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 of (parent page's hash, this page's token ids): names the whole prefix up to here.

    Chaining is what makes a hit safe: the KV of a page depends on every token before it, so equal
    tokens under a different parent must not match. SHA-256 (not Python's `hash`) so a collision,
    which would silently serve wrong KV, is out of reach.
    """
    tokens = array("q", token_ids)  # int64: exact for any vocabulary
    if sys.byteorder != "little":
        tokens.byteswap()  # keep hashes identical across hosts
    return hashlib.sha256((parent_hash or _ROOT_HASH) + tokens.tobytes()).digest()


class PageManager:
    """Allocates page ids 1..num_pages-1 and tracks sharing and cached content of each."""

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True,
                 track_evictions: bool = False):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        self._page_hash: list[bytes | None] = [None] * num_pages
        self._hash_to_page: dict[bytes, int] = {}
        # Uncached free pages, a stack popped from the end: reversed so that page 1 comes out first,
        # which keeps allocations deterministic and easy to read in tests.
        self._free_uncached: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))
        # Registered pages with count 0, least recently freed first (OrderedDict as an LRU queue).
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self.track_evictions = track_evictions
        self._evicted: list[tuple[int, bytes]] = []  # (page, hash) evicted since take_evicted()

    # ---- counts -------------------------------------------------------------------------------

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages `allocate` can hand out now, cached free pages included (they are evictable)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        """Registered pages, in use or free: what the prefix cache can currently hit."""
        return len(self._hash_to_page)

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def pages_needed(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self.page_size)

    # ---- allocate / share / free --------------------------------------------------------------

    def allocate(self, num_pages: int) -> list[int]:
        """Take `num_pages` free pages (count 1 each); all or nothing."""
        if num_pages > self.num_free_pages:
            raise OutOfPagesError(
                f"asked for {num_pages} pages but only {self.num_free_pages} of "
                f"{self.num_usable_pages} are free"
            )
        pages = []
        for _ in range(num_pages):
            if self._free_uncached:
                page = self._free_uncached.pop()
            else:
                page, _ = self._free_cached.popitem(last=False)  # evict least recently freed
                del self._hash_to_page[self._page_hash[page]]
                if self.track_evictions:
                    self._evicted.append((page, self._page_hash[page]))
                self._page_hash[page] = None
            self._ref_counts[page] = 1
            pages.append(page)
        return pages

    def share(self, page_ids: Sequence[int]) -> None:
        """Add one reference to each page found by `find_cached_prefix` (in use or cached free)."""
        for page in page_ids:
            self._check_page_id(page)
            if self._ref_counts[page] == 0 and page not in self._free_cached:
                raise PageManagerError(f"page {page} is free and not cached: nothing to share")
        for page in page_ids:
            if self._ref_counts[page] == 0:
                del self._free_cached[page]
            self._ref_counts[page] += 1

    def free(self, page_ids: Sequence[int]) -> None:
        """Drop one reference to each page of a request's page table (given in table order).

        The table is released tail first, so the request's last pages become the least recently
        freed and are evicted first: a cached page is only useful while the pages before it are.
        """
        drops: dict[int, int] = {}
        for page in page_ids:
            self._check_page_id(page)
            drops[page] = drops.get(page, 0) + 1
            if drops[page] > self._ref_counts[page]:
                raise PageManagerError(
                    f"double free of page {page}: reference count is {self._ref_counts[page]}"
                )
        for page in reversed(page_ids):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                if self._page_hash[page] is None:
                    self._free_uncached.append(page)
                else:
                    self._free_cached[page] = None

    # ---- prefix cache -------------------------------------------------------------------------

    def find_cached_prefix(self, page_hashes: Sequence[bytes]) -> list[int]:
        """Pages holding the longest cached prefix of a chain of page hashes. Changes nothing."""
        if not self.enable_prefix_caching:
            return []
        pages = []
        for page_hash in page_hashes:
            page = self._hash_to_page.get(page_hash)
            if page is None:
                break  # the chain is broken: later pages cannot be valid without this one
            pages.append(page)
        return pages

    def register(self, page_id: int, page_hash: bytes) -> bool:
        """Record that in-use full page `page_id` holds the prefix named `page_hash`.

        Returns False (and changes nothing) when caching is off, the page is already registered with
        this hash, or another page already holds this prefix: two requests that computed the same
        prefix at once keep one copy findable and the duplicate is freed as a plain page.
        """
        self._check_page_id(page_id)
        if self._ref_counts[page_id] == 0:
            raise PageManagerError(f"cannot register free page {page_id}")
        old = self._page_hash[page_id]
        if old is not None and old != page_hash:
            raise PageManagerError(f"page {page_id} is already registered under another hash")
        if not self.enable_prefix_caching or old is not None or page_hash in self._hash_to_page:
            return False
        self._page_hash[page_id] = page_hash
        self._hash_to_page[page_hash] = page_id
        return True

    def take_evicted(self) -> list[tuple[int, bytes]]:
        """The (page, hash) of cached pages evicted by `allocate` since the last call, in
        eviction order: their contents are intact until the device writes the pages again."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def forget_cached(self) -> None:
        """Drop the whole prefix cache (the KV contents were lost): every page becomes plain."""
        for page in self._hash_to_page.values():
            self._page_hash[page] = None
        self._hash_to_page.clear()
        self._evicted.clear()
        self._free_uncached.extend(reversed(self._free_cached))
        self._free_cached.clear()

    # ---- checks -------------------------------------------------------------------------------

    def _check_page_id(self, page: int) -> None:
        if not NULL_PAGE < page < self.num_pages:
            raise PageManagerError(f"page id {page} is not in 1..{self.num_pages - 1}")

    def verify(self) -> None:
        """Raise PageManagerError if the internal structures disagree (O(num_pages), for tests)."""
        uncached, cached = set(self._free_uncached), set(self._free_cached)
        problems = []
        if len(uncached) != len(self._free_uncached) or uncached & cached:
            problems.append("a page is listed twice in the free lists")
        if NULL_PAGE in uncached | cached or self._ref_counts[NULL_PAGE] != 0:
            problems.append("the reserved page 0 is in circulation")
        for page in range(1, self.num_pages):
            is_free = page in uncached or page in cached
            if is_free != (self._ref_counts[page] == 0):
                problems.append(f"page {page}: free-list membership disagrees with its count")
            if (page in cached) != (is_free and self._page_hash[page] is not None):
                problems.append(f"page {page}: cached-free membership disagrees with its hash")
            if self._ref_counts[page] < 0:
                problems.append(f"page {page}: negative reference count")
        for page_hash, page in self._hash_to_page.items():
            if self._page_hash[page] != page_hash:
                problems.append(f"hash index points at page {page}, which holds another hash")
        if sum(h is not None for h in self._page_hash) != len(self._hash_to_page):
            problems.append("a page holds a hash the index does not know")
        if problems:
            raise PageManagerError("; ".join(problems))
