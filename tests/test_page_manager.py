"""PageManager: allocation, reference counts, the chained-hash prefix cache and its LRU."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxserve.sched import NULL_PAGE, OutOfPagesError, PageManager, PageManagerError, hash_page


def chain(pages_of_tokens):
    """Chained hashes of consecutive full pages, as a request computes them."""
    hashes, parent = [], None
    for tokens in pages_of_tokens:
        parent = hash_page(parent, tokens)
        hashes.append(parent)
    return hashes


def test_allocate_free_and_counts():
    pm = PageManager(num_pages=5, page_size=4)
    assert pm.num_usable_pages == pm.num_free_pages == 4
    pages = pm.allocate(3)
    assert pages == [1, 2, 3] and pm.num_free_pages == 1 and pm.num_used_pages == 3
    assert all(pm.ref_count(p) == 1 for p in pages)
    pm.free(pages)
    assert pm.num_free_pages == 4 and all(pm.ref_count(p) == 0 for p in pages)
    pm.verify()


def test_page_zero_is_never_handed_out():
    pm = PageManager(num_pages=4, page_size=2)
    for _ in range(3):  # reuse cycles must not bring page 0 into circulation either
        pages = pm.allocate(3)
        assert NULL_PAGE not in pages and sorted(pages) == [1, 2, 3]
        pm.free(pages)
    with pytest.raises(PageManagerError, match="not in 1..3"):
        pm.free([0])


def test_out_of_pages_is_all_or_nothing():
    pm = PageManager(num_pages=4, page_size=2)
    pm.allocate(2)
    with pytest.raises(OutOfPagesError, match="asked for 2 pages but only 1 of 3 are free"):
        pm.allocate(2)
    assert pm.num_free_pages == 1
    pm.verify()


def test_double_free_raises_and_changes_nothing():
    pm = PageManager(num_pages=4, page_size=2)
    a, b = pm.allocate(2)
    pm.free([a])
    with pytest.raises(PageManagerError, match=f"double free of page {a}"):
        pm.free([b, a])  # b is valid, but nothing may be half-applied
    assert pm.ref_count(b) == 1
    with pytest.raises(PageManagerError, match="double free"):
        pm.free([b, b])
    assert pm.ref_count(b) == 1
    pm.verify()


def test_shared_page_is_freed_only_at_refcount_zero():
    pm = PageManager(num_pages=4, page_size=2)
    (page,) = pm.allocate(1)
    (h,) = chain([[5, 6]])
    assert pm.register(page, h)
    assert pm.find_cached_prefix([h]) == [page]
    pm.share([page])
    assert pm.ref_count(page) == 2
    pm.free([page])
    assert pm.ref_count(page) == 1 and pm.num_free_pages == 2
    pm.free([page])
    assert pm.ref_count(page) == 0 and pm.num_free_pages == 3
    assert pm.find_cached_prefix([h]) == [page]  # still findable while free
    pm.share([page])  # revive it from the cached-free LRU
    assert pm.ref_count(page) == 1 and pm.num_free_pages == 2
    pm.verify()


def test_sharing_an_uncached_free_page_raises():
    pm = PageManager(num_pages=4, page_size=2)
    with pytest.raises(PageManagerError, match="free and not cached"):
        pm.share([1])


def test_prefix_hits_follow_the_hash_chain():
    pm = PageManager(num_pages=8, page_size=2)
    pages = pm.allocate(3)
    hashes = chain([[1, 2], [3, 4], [5, 6]])
    for page, h in zip(pages, hashes):
        pm.register(page, h)
    assert pm.find_cached_prefix(chain([[1, 2], [3, 4], [9, 9]])) == pages[:2]
    # The same page tokens under a different parent are a different prefix: no hit.
    assert pm.find_cached_prefix(chain([[0, 0], [3, 4]])) == []
    assert pm.find_cached_prefix(chain([[3, 4]])) == []
    # A miss breaks the chain even if a later page would match by hash.
    assert pm.find_cached_prefix([hashes[0], b"x" * 32, hashes[2]]) == pages[:1]


def test_register_rules():
    pm = PageManager(num_pages=4, page_size=2)
    a, b = pm.allocate(2)
    (h,) = chain([[1, 2]])
    assert pm.register(a, h)
    assert not pm.register(a, h)  # idempotent
    assert not pm.register(b, h)  # duplicate content: the first copy stays the findable one
    assert pm.find_cached_prefix([h]) == [a]
    with pytest.raises(PageManagerError, match="another hash"):
        pm.register(a, chain([[7, 7]])[0])
    pm.free([b])
    with pytest.raises(PageManagerError, match="free page"):
        pm.register(b, h)
    pm.verify()


def test_prefix_caching_disabled_never_hits():
    pm = PageManager(num_pages=4, page_size=2, enable_prefix_caching=False)
    (a,) = pm.allocate(1)
    (h,) = chain([[1, 2]])
    assert not pm.register(a, h)
    assert pm.find_cached_prefix([h]) == []


def test_uncached_pages_are_used_before_cached_ones_and_lru_order():
    pm = PageManager(num_pages=6, page_size=1)
    pages = pm.allocate(5)
    hashes = chain([[t] for t in range(3)])
    for page, h in zip(pages[:3], hashes):
        pm.register(page, h)
    # Free request-style: table order, so its tail is evicted first. Then an uncached page.
    pm.free(pages[:3])
    pm.free([pages[4]])
    assert pm.num_free_pages == 4
    # The uncached page goes first: every cached prefix survives.
    assert pm.allocate(1) == [pages[4]]
    assert pm.find_cached_prefix(hashes) == pages[:3]
    # Then cached pages, least recently freed first: the chain's tail, then its middle.
    assert pm.allocate(1) == [pages[2]]
    assert pm.find_cached_prefix(hashes) == pages[:2]
    assert pm.allocate(1) == [pages[1]]
    assert pm.find_cached_prefix(hashes) == pages[:1]
    pm.verify()


def test_lru_is_by_time_of_free_across_tables():
    pm = PageManager(num_pages=3, page_size=1)
    a, b = pm.allocate(2)
    ha, hb = hash_page(None, [1]), hash_page(None, [2])
    pm.register(a, ha)
    pm.register(b, hb)
    pm.free([b])
    pm.free([a])
    assert pm.allocate(1) == [b]  # freed longer ago
    assert pm.find_cached_prefix([ha]) == [a] and pm.find_cached_prefix([hb]) == []
    pm.share([a])
    pm.free([a])  # freeing again refreshes its place in the LRU
    pm.verify()


def test_hash_is_collision_resistant_and_order_sensitive():
    assert hash_page(None, [1, 2]) != hash_page(None, [2, 1])
    assert hash_page(None, [1, 2]) == hash_page(None, [1, 2])
    assert len(hash_page(None, [1])) == 32
    assert hash_page(hash_page(None, [1]), [2]) != hash_page(hash_page(None, [3]), [2])
    assert hash_page(None, [2**40]) != hash_page(None, [0])  # large ids are not truncated


# ---- property-based: random operations against a model of the owners -------------------------

NUM_PAGES, PAGE_SIZE = 9, 2
# Token content of pages comes from a tiny alphabet so that prefixes repeat and the cache hits.
page_tokens = st.lists(st.integers(0, 1), min_size=PAGE_SIZE, max_size=PAGE_SIZE)


class PageManagerMachine(RuleBasedStateMachine):
    """Owners stand for requests: each holds a page table and the token content behind it."""

    def __init__(self):
        super().__init__()
        self.pm = PageManager(NUM_PAGES, PAGE_SIZE)
        self.owners: list[dict] = []  # {"pages": [...], "hashes": [...], "registered": n}
        self.cached: dict[int, bytes] = {}  # model of the prefix cache: page -> hash it holds

    def _allocate(self, n):
        pages = self.pm.allocate(n)
        for page in pages:
            self.cached.pop(page, None)  # a reused cached page is evicted
        return pages

    @rule(content=st.lists(page_tokens, min_size=1, max_size=4))
    def allocate(self, content):
        n = len(content)
        if n > self.pm.num_free_pages:
            with pytest.raises(OutOfPagesError):
                self.pm.allocate(n)
            return
        self.owners.append({"pages": self._allocate(n), "hashes": chain(content), "registered": 0})

    @rule(content=st.lists(page_tokens, min_size=1, max_size=4), extra=st.integers(0, 2))
    def share_prefix(self, content, extra):
        """Admit like the scheduler: share the cached prefix, allocate the rest."""
        hashes = chain(content)
        hits = self.pm.find_cached_prefix(hashes)
        revived = sum(self.pm.ref_count(p) == 0 for p in hits)
        missing = len(content) - len(hits)
        if missing + revived > self.pm.num_free_pages:
            return
        self.pm.share(hits)
        pages = hits + self._allocate(missing)
        self.owners.append({"pages": pages, "hashes": hashes, "registered": len(hits)})

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def register_next(self, data):
        owner = data.draw(st.sampled_from(self.owners))
        i = owner["registered"]
        if i < len(owner["pages"]):
            page, page_hash = owner["pages"][i], owner["hashes"][i]
            was_new = page_hash not in self.cached.values() and page not in self.cached
            assert self.pm.register(page, page_hash) == was_new
            if was_new:
                self.cached[page] = page_hash
            owner["registered"] += 1

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free_owner(self, data):
        owner = self.owners.pop(data.draw(st.integers(0, len(self.owners) - 1)))
        self.pm.free(owner["pages"])

    @invariant()
    def accounting(self):
        pm = self.pm
        pm.verify()
        assert pm.num_free_pages + pm.num_used_pages == pm.num_usable_pages == NUM_PAGES - 1
        owned: dict[int, int] = {}
        for owner in self.owners:
            # Within one table a page appears once; across tables only through sharing.
            assert len(set(owner["pages"])) == len(owner["pages"])
            for page in owner["pages"]:
                assert page != NULL_PAGE
                owned[page] = owned.get(page, 0) + 1
        for page in range(1, NUM_PAGES):
            assert pm.ref_count(page) == owned.get(page, 0)
        assert pm.num_used_pages == len(owned)

    @invariant()
    def cache_matches_model(self):
        # Exactly the registered, not yet evicted pages are findable, each under its own hash.
        assert self.pm.num_cached_pages == len(self.cached)
        for page, page_hash in self.cached.items():
            assert self.pm.find_cached_prefix([page_hash]) == [page]

    def teardown(self):
        for owner in self.owners:
            self.pm.free(owner["pages"])
        assert self.pm.num_free_pages == NUM_PAGES - 1
        assert all(self.pm.ref_count(p) == 0 for p in range(NUM_PAGES))
        self.pm.verify()


PageManagerMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None
)
TestPageManagerMachine = PageManagerMachine.TestCase


def test_forget_cached_keeps_counts_and_drops_every_hit():
    pm = PageManager(num_pages=8, page_size=2)
    pages = pm.allocate(3)
    hashes = chain([[1, 2], [3, 4], [5, 6]])
    for page, h in zip(pages, hashes):
        pm.register(page, h)
    pm.free(pages[1:])  # two cached free pages, one cached page in use
    used, free = pm.num_used_pages, pm.num_free_pages
    pm.forget_cached()
    pm.verify()
    assert (pm.num_used_pages, pm.num_free_pages, pm.num_cached_pages) == (used, free, 0)
    assert pm.find_cached_prefix(hashes) == []
    pm.free(pages[:1])
    assert pm.num_free_pages == pm.num_usable_pages
    assert len(set(pm.allocate(7))) == 7  # every page handed out once
    pm.verify()
