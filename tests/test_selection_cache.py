"""The host bookkeeping of sparse attention's kept page choices (runner/selection.py): when a
step reuses them and when every request chooses afresh, which mask row each request reads."""

import dataclasses

import numpy as np

from jaxserve.runner.selection import SelectionCache

PAGE = 4


@dataclasses.dataclass(frozen=True)
class Entry:  # the fields of sched.ScheduledRequest the cache reads
    request: object
    end_position: int
    page_ids: tuple

    @property
    def request_id(self):
        return self.request.request_id


@dataclasses.dataclass(eq=False)
class Req:
    request_id: str


def entry(req, pos, first_page=1):
    n = -(-pos // PAGE)
    return Entry(req, pos, tuple(range(first_page, first_page + n)))


def test_reuses_for_n_steps_then_refreshes_everyone():
    cache = SelectionCache(num_slots=4, reuse_steps=3, page_size=PAGE)
    a, b = Req("a"), Req("b")
    got = [cache.inputs([entry(a, 30 + i), entry(b, 50 + i, 100)], 4) for i in range(7)]
    assert [bool(x.refresh) for x in got] == [True, False, False, True, False, False, True]
    assert got[0].slots.tolist()[:2] != [4, 4] and got[0].slots[2:].tolist() == [4, 4]  # padding
    assert all(x.slots.tolist() == got[0].slots.tolist() for x in got)
    # since: pages at the last choice (30 -> 8 pages, 50 -> 13), until the next refresh
    assert [x.since[:2].tolist() for x in got[:4]] == [[8, 13]] * 3 + [[9, 14]]


def test_a_new_request_refreshes_the_step_and_gets_a_free_row():
    cache = SelectionCache(num_slots=2, reuse_steps=10, page_size=PAGE)
    a, b, c = Req("a"), Req("b"), Req("c")
    first = cache.inputs([entry(a, 30), entry(b, 40, 100)], 2)
    assert not cache.inputs([entry(a, 31), entry(b, 41, 100)], 2).refresh
    # b finished; c takes b's row (the only one left) and everyone chooses afresh
    got = cache.inputs([entry(a, 32), entry(c, 20, 200)], 2)
    assert got.refresh and got.slots.tolist() == first.slots.tolist()
    assert not cache.inputs([entry(a, 33), entry(c, 21, 200)], 2).refresh


def test_preemption_swap_or_another_request_under_the_same_id_refreshes():
    cache = SelectionCache(num_slots=4, reuse_steps=10, page_size=PAGE)
    a = Req("a")
    cache.inputs([entry(a, 30)], 1)
    assert not cache.inputs([entry(a, 31)], 1).refresh
    # recomputed or swapped back in: other pages under the same positions
    assert cache.inputs([entry(a, 32, first_page=50)], 1).refresh
    assert not cache.inputs([entry(a, 33, first_page=50)], 1).refresh
    # aborted, and a new request with the same id
    assert cache.inputs([entry(Req("a"), 34, first_page=50)], 1).refresh
    # the cache was cleared (a failed step): choose afresh
    cache.clear()
    assert cache.inputs([entry(a, 35, first_page=50)], 1).refresh


def test_rows_never_shared_by_two_requests_of_a_step():
    cache = SelectionCache(num_slots=3, reuse_steps=2, page_size=PAGE)
    reqs = [Req(str(i)) for i in range(8)]
    rng = np.random.default_rng(0)
    for step in range(40):
        batch = rng.choice(8, size=rng.integers(1, 4), replace=False)
        got = cache.inputs([entry(reqs[i], 20 + step) for i in batch], 3)
        rows = got.slots[:len(batch)].tolist()
        assert len(set(rows)) == len(rows) and all(0 <= r < 3 for r in rows)


def test_step_inputs_carry_the_selection_across_processes():
    from jaxserve.multihost import pack, unpack
    from jaxserve.runner.batch import BatchBuilder, StepInputs
    from jaxserve.runner.buckets import Buckets
    from tests.conftest import TINY_ENGINE

    buckets = Buckets(TINY_ENGINE)
    builder = BatchBuilder(buckets, page_size=8, max_pages_per_request=32, vocab_size=100,
                           max_model_len=256)
    b = buckets.for_step(2, 2, True)
    ids, md, li = builder.dummy(b)
    t, ban, n = builder.sampler_variants(len(li))[0]
    cache = SelectionCache(num_slots=8, reuse_steps=4, page_size=8)
    sel = cache.inputs([entry(Req("a"), 30), entry(Req("b"), 9, 20)], b.num_requests)
    got = unpack(pack(StepInputs(b, ids, md, li, t, ban, n, None, sel)))
    for x, y in zip(got.selection.arrays(), sel.arrays(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert got.selection.refresh is True
    assert unpack(pack(StepInputs(b, ids, md, li, t, ban, n, None))).selection is None
