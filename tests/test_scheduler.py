"""Scheduler driven end to end by a fake runner whose answers are computable by hand.

The fake runner keeps a fake KV cache, {(page, slot): (token, position)}: it writes every scheduled
token through the page table and, when a step samples, reads the whole context back through the
page table. Its next token is a weighted sum of that context, so a wrong page table, a shared page
overwritten, a stale page or a lost token all change the tokens the tests assert exactly.
"""

import dataclasses
import math
import weakref

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from jaxserve.sched import (
    NULL_PAGE,
    PENDING_TOKEN,
    DuplicateRequestError,
    FinishReason,
    Request,
    RequestStatus,
    RequestTooLongError,
    Scheduler,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerError,
    UnknownRequestError,
)

VOCAB = 997


def next_token(context):
    """The fake model: sum of (position + 1) * token over the whole context, mod 997."""
    return sum((i + 1) * t for i, t in enumerate(context)) % VOCAB


def reference(prompt, max_tokens, eos=(), min_tokens=0):
    """What any correct schedule must produce for a request, computed without a scheduler."""
    context, out = list(prompt), []
    while len(out) < max_tokens:
        out.append(next_token(context))
        context.append(out[-1])
        if len(out) >= min_tokens and out[-1] in eos:
            break
    return out


class FakeRunner:
    """Also a fake host memory: swap_out copies pages' slots to `host[host_page]`, swap_in
    writes them into the new pages, in the order step.py gives (look up the copies swap_in
    reads, drop host_free, copy out, copy in); a swap of the wrong pages, or a read of a page
    (device or host) after it was freed and reused, changes the tokens."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv: dict[tuple[int, int], tuple[int, int]] = {}
        self.host: dict[int, dict[int, tuple[int, int]]] = {}  # host page -> its slots
        self.swap_counts = [0, 0]  # pages out, in

    def swap(self, out):
        size = self.sched.config.page_size
        reads = [[self.host[h] for h in s.host_page_ids] for s in out.swap_in]
        for h in out.host_free:
            self.host.pop(h, None)
        for s in out.swap_out:
            assert len(s.host_page_ids) == len(s.device_page_ids)
            for p, h in zip(s.device_page_ids, s.host_page_ids):
                self.host[h] = {i: self.kv[(p, i)] for i in range(size) if (p, i) in self.kv}
            self.swap_counts[0] += len(s.device_page_ids)
        for s, pages in zip(out.swap_in, reads):
            assert len(pages) == len(s.device_page_ids) == len(s.host_page_ids)
            for p, slots in zip(s.device_page_ids, pages):
                assert self.sched.page_manager.ref_count(p) == 1  # fresh, its own
                for i in range(size):
                    self.kv.pop((p, i), None)
                self.kv.update({(p, i): v for i, v in slots.items()})
            self.swap_counts[1] += len(s.device_page_ids)

    def execute(self, out):
        self.swap(out)
        size = self.sched.config.page_size
        written: set[int] = set()  # pages written by earlier entries of this step
        for e in out.scheduled:
            assert len(e.page_ids) == math.ceil(e.end_position / size)
            assert NULL_PAGE not in e.page_ids
            assert len(e.token_ids) == e.num_new_tokens >= 1
            targets = set(e.page_ids[e.start_position // size :])
            # Pages written belong to this request alone: never a shared prefix page.
            assert not targets & written
            assert all(self.sched.page_manager.ref_count(p) == 1 for p in targets)
            written |= targets
            for i, token in enumerate(e.token_ids):
                pos = e.start_position + i
                self.kv[(e.page_ids[pos // size], pos % size)] = (token, pos)
        sampled = {}
        for e in out.scheduled:
            if e.samples_token:
                context = []
                for pos in range(e.end_position):
                    token, stored_pos = self.kv[(e.page_ids[pos // size], pos % size)]
                    assert stored_pos == pos
                    context.append(token)
                sampled[e.request_id] = [next_token(context)]
        return sampled


_runners: "weakref.WeakKeyDictionary[Scheduler, FakeRunner]" = weakref.WeakKeyDictionary()


def runner_for(sched):
    """The one fake device of a scheduler: its KV must persist across steps, as a real one does."""
    return _runners.setdefault(sched, FakeRunner(sched))


def fed(out, last_sampled):
    """`out` with its pending tokens (async scheduling) replaced by the samples of the step
    before, {id: [token]}, as the runner feeds them on the device."""
    entries = tuple(dataclasses.replace(e, token_ids=tuple(
        last_sampled[e.request_id][0] if t == PENDING_TOKEN else t for t in e.token_ids))
        for e in out.scheduled)
    return dataclasses.replace(out, scheduled=entries)


def check_step(sched, out, before):
    """Budget, cap, batch order. `before`: {id: tokens to compute} of running requests pre-step."""
    cfg = sched.config
    assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert len({e.request_id for e in out.scheduled}) == len(out.scheduled)
    assert not set(out.preempted) & {e.request_id for e in out.scheduled}
    # Decodes of requests already running come before every prefill chunk and admission.
    is_decode = [before.get(e.request_id) == 1 for e in out.scheduled]
    assert is_decode == sorted(is_decode, reverse=True)
    if sched.has_unfinished_requests():  # (one step ahead, the pending last tokens may be all)
        assert out.scheduled or any(r.num_output_tokens == r.max_tokens for r in sched.running), \
            "an empty step with unfinished requests would be a livelock"


def run(sched, max_steps=10_000, log=None):
    """Drive to completion; returns {id: finished request} and the number of steps."""
    runner, finished, steps = runner_for(sched), {}, 0
    while sched.has_unfinished_requests():
        before = {r.request_id: r.num_tokens_to_compute for r in sched.running}
        out = sched.schedule()
        check_step(sched, out, before)
        if log is not None:
            log.append(out)
        for request in sched.update(out, runner.execute(out)):
            finished[request.request_id] = request
        steps += 1
        assert steps < max_steps
    return finished, steps


def config(**kw):
    base = dict(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                max_model_len=128)  # fmt: skip
    return SchedulerConfig(**{**base, **kw})


def assert_all_pages_free(sched):
    pm = sched.page_manager
    pm.verify()
    tier = 0 if sched.host_tier is None else sched.host_tier.num_pages  # evictable copies
    assert sched.host_pool.num_free_pages == sched.host_pool.num_pages - tier
    assert pm.num_free_pages == pm.num_usable_pages
    assert all(pm.ref_count(p) == 0 for p in range(pm.num_pages))


# ---- exact tokens -------------------------------------------------------------------------------


def test_tokens_computed_by_hand():
    sched = Scheduler(config())
    sched.add_request(Request("a", [1, 2, 3], max_tokens=4))
    finished, _ = run(sched)
    # 1*1+2*2+3*3 = 14; +4*14 = 70; +5*70 = 420; +6*420 = 2940 = 946 (mod 997)
    assert finished["a"].output_token_ids == [14, 70, 420, 946]
    assert finished["a"].finish_reason is FinishReason.LENGTH
    assert_all_pages_free(sched)


@pytest.mark.parametrize(
    "kw, tokens, reason",
    [
        (dict(eos_token_ids=[70]), [14, 70], FinishReason.STOP),
        (dict(eos_token_ids=[70], min_tokens=3), [14, 70, 420, 946], FinishReason.LENGTH),
        (dict(eos_token_ids=[14], min_tokens=1), [14], FinishReason.STOP),
        (dict(eos_token_ids=[70], ignore_eos=True), [14, 70, 420, 946], FinishReason.LENGTH),
        (dict(eos_token_ids=[70], ignore_eos=True, stop_token_ids=[420]), [14, 70, 420],
         FinishReason.STOP),
    ],
)  # fmt: skip
def test_stop_conditions(kw, tokens, reason):
    sched = Scheduler(config())
    sched.add_request(Request("a", [1, 2, 3], max_tokens=4, **kw))
    finished, _ = run(sched)
    assert finished["a"].output_token_ids == tokens and finished["a"].finish_reason is reason
    assert_all_pages_free(sched)


# ---- batching -----------------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt():
    sched = Scheduler(config(max_num_batched_tokens=32))
    prompt = list(range(100))
    sched.add_request(Request("a", prompt, max_tokens=3))
    log = []
    finished, _ = run(sched, log=log)
    steps = [(o.scheduled[0].start_position, o.num_batched_tokens, o.scheduled[0].samples_token)
             for o in log]  # fmt: skip
    assert steps == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True),
                     (100, 1, True), (101, 1, True)]  # fmt: skip
    assert log[1].scheduled[0].token_ids == tuple(range(32, 64))
    assert finished["a"].output_token_ids == reference(prompt, 3)


def test_without_chunked_prefill_prompts_are_whole_and_wait_their_turn():
    sched = Scheduler(config(enable_chunked_prefill=False, max_num_batched_tokens=128))
    sched.add_request(Request("a", list(range(100)), max_tokens=2))
    sched.add_request(Request("b", list(range(40)), max_tokens=2))
    out = sched.schedule()
    assert [(e.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 100)]
    sched.update(out, runner_for(sched).execute(out))
    finished, _ = run(sched)
    assert finished["b"].output_token_ids == reference(range(40), 2)
    with pytest.raises(SchedulerConfigError, match=r"max_num_batched_tokens \(64\).*\(128\)"):
        config(enable_chunked_prefill=False, max_num_batched_tokens=64)


def test_decodes_and_prefill_chunks_share_a_step():
    sched = Scheduler(config(max_num_batched_tokens=10))
    sched.add_request(Request("a", [5, 6], max_tokens=5))
    runner = runner_for(sched)
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    sched.add_request(Request("b", list(range(20)), max_tokens=2))
    out = sched.schedule()
    # a's decode first, then b's prompt chunked to the 9 tokens left.
    assert [(e.request_id, e.start_position, e.num_new_tokens) for e in out.scheduled] == [
        ("a", 2, 1), ("b", 0, 9)]  # fmt: skip
    sched.update(out, runner.execute(out))
    finished, _ = run(sched)
    assert finished["a"].output_token_ids == reference([5, 6], 5)
    assert finished["b"].output_token_ids == reference(range(20), 2)


def test_budget_cap_and_order_hold_under_load():
    sched = Scheduler(config(max_num_seqs=3, max_num_batched_tokens=12, num_pages=40))
    prompts = {f"r{i}": [(7 * i + j) % 50 for j in range(3 + 5 * i)] for i in range(8)}
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, max_tokens=6))
    finished, _ = run(sched)  # run() checks budget, cap and order every step
    for rid, prompt in prompts.items():
        assert finished[rid].output_token_ids == reference(prompt, 6)
    assert_all_pages_free(sched)


# ---- preemption ---------------------------------------------------------------------------------


def workload():
    return {f"r{i}": ([(3 * i + j) % 31 for j in range(5 + 7 * i)], 12 + 3 * i) for i in range(6)}


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_tiny_cache_preempts_and_outputs_do_not_change(prefix_caching, chunked):
    def outputs(num_pages):
        sched = Scheduler(config(num_pages=num_pages, max_num_batched_tokens=128,
                                 enable_prefix_caching=prefix_caching,
                                 enable_chunked_prefill=chunked))  # fmt: skip
        for rid, (prompt, max_tokens) in workload().items():
            sched.add_request(Request(rid, prompt, max_tokens=max_tokens))
        finished, _ = run(sched)
        assert_all_pages_free(sched)
        preemptions = sum(r.num_preemptions for r in finished.values())
        return {rid: r.output_token_ids for rid, r in finished.items()}, preemptions

    # The longest request needs ceil((40 + 27 - 1) / 4) = 17 pages: 18 pages fit it alone.
    big, big_preemptions = outputs(num_pages=200)
    small, small_preemptions = outputs(num_pages=18)
    assert big_preemptions == 0 and small_preemptions > 0
    assert small == big == {rid: reference(p, m) for rid, (p, m) in workload().items()}


def test_the_newest_is_preempted_to_the_front_and_recomputes_its_outputs():
    # 5 usable pages of 2 tokens. a and b decode until they need a 6th page between them;
    # d (3 pages) waits behind them all along.
    sched = Scheduler(config(num_pages=6, page_size=2, enable_prefix_caching=False))
    sched.add_request(Request("a", [1, 2, 3], max_tokens=7))
    sched.add_request(Request("b", [4, 5, 6], max_tokens=7))
    sched.add_request(Request("c", [7], max_tokens=1))
    sched.add_request(Request("d", [8] * 6, max_tokens=1))
    runner, finished = runner_for(sched), {}
    while True:
        out = sched.schedule()
        if out.preempted:
            break
        finished.update((r.request_id, r) for r in sched.update(out, runner.execute(out)))
    assert out.preempted == ("b",)  # the newest running one, never a
    assert [r.request_id for r in sched.waiting] == ["b", "d"]  # b goes to the FRONT
    b = sched.waiting[0]
    assert b.status is RequestStatus.PREEMPTED
    assert b.page_ids == [] and b.num_computed_tokens == 0 and b.num_output_tokens > 0
    assert [e.request_id for e in out.scheduled] == ["a"]
    sched.update(out, runner.execute(out))
    num_known = b.num_tokens
    log = []
    finished.update(run(sched, log=log)[0])
    # b's recompute prefill covers its prompt and the outputs it had, and samples the next token.
    recompute = next(e for o in log for e in o.scheduled if e.request_id == "b")
    assert recompute.start_position == 0 and recompute.samples_token
    assert recompute.token_ids == tuple([4, 5, 6] + reference([4, 5, 6], 7)[: num_known - 3])
    for rid, prompt, max_tokens in [("a", [1, 2, 3], 7), ("b", [4, 5, 6], 7), ("c", [7], 1),
                                    ("d", [8] * 6, 1)]:  # fmt: skip
        assert finished[rid].output_token_ids == reference(prompt, max_tokens)
    assert_all_pages_free(sched)


def test_an_older_request_takes_pages_back_from_a_decode_scheduled_earlier_in_the_step():
    # Only reachable when a step appends several tokens (e.g. speculative decoding): then an older
    # request has more than one token to compute and is scheduled after the newer decodes.
    sched = Scheduler(config(num_pages=5, page_size=2, enable_prefix_caching=False))
    sched.add_request(Request("a", [1, 2, 3], max_tokens=4))  # 3 + 4 - 1 = 6 tokens: 3 pages
    sched.add_request(Request("b", [4, 5], max_tokens=3))
    runner = runner_for(sched)  # executes each step; the test picks the tokens
    out = sched.schedule()  # a: 2 pages, b: 1 page, 1 free
    runner.execute(out)
    sched.update(out, {"a": [7, 8], "b": [9]})  # a now has 2 tokens to compute, b 1
    out = sched.schedule()
    # b's decode takes the last page first; a (older) then preempts b and b leaves the batch.
    assert [(e.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 2)]
    assert out.preempted == ("b",) and out.num_batched_tokens == 2
    assert sched.get_request("b").page_ids == []
    runner.execute(out)
    sched.update(out, {"a": [1]})
    finished, _ = run(sched)
    assert finished["a"].output_token_ids[:3] == [7, 8, 1] and set(finished) == {"a", "b"}
    assert_all_pages_free(sched)


# ---- abort ---------------------------------------------------------------------------------------


def step(sched, runner):
    out = sched.schedule()
    return out, sched.update(out, runner.execute(out))


@pytest.mark.parametrize("state", ["waiting", "mid_prefill", "decode", "preempted"])
def test_abort_frees_pages_at_once_in_every_state(state):
    sched = Scheduler(config(num_pages=6, page_size=2, max_num_batched_tokens=4))
    runner = runner_for(sched)
    sched.add_request(Request("a", [1, 2, 3], max_tokens=7))
    sched.add_request(Request("x", [1, 2, 3, 4, 5, 6, 7], max_tokens=1))
    target = {"waiting": "x", "mid_prefill": "x", "decode": "a", "preempted": "x"}[state]
    request = sched.get_request(target)

    def reached():
        running = request.status is RequestStatus.RUNNING
        return {
            "waiting": request.status is RequestStatus.WAITING,
            "mid_prefill": running and request.num_tokens_to_compute > 1,
            "decode": running and request.num_tokens_to_compute == 1,
            "preempted": request.status is RequestStatus.PREEMPTED,
        }[state]

    while not reached():
        step(sched, runner)
        assert request.status is not RequestStatus.FINISHED
    assert sched.abort(target)
    assert request.status is RequestStatus.FINISHED and request.finish_reason is FinishReason.ABORT
    assert request.page_ids == [] and sched.get_request(target) is None
    held = {p for r in sched.running for p in r.page_ids}
    assert sched.page_manager.num_used_pages == len(held)  # nothing of the aborted request is held
    assert not sched.abort(target)  # already finished: a no-op
    finished, _ = run(sched)
    assert set(finished) == {"a", "x"} - {target}
    assert_all_pages_free(sched)


def test_abort_while_the_step_runs_skips_it_in_update():
    sched = Scheduler(config())
    runner = runner_for(sched)
    sched.add_request(Request("a", [1, 2, 3], max_tokens=4))
    sched.add_request(Request("b", [1, 2], max_tokens=4))
    out = sched.schedule()
    sampled = runner.execute(out)
    sched.abort("a")
    assert [r.request_id for r in sched.update(out, sampled)] == []
    assert sched.get_request("b").num_output_tokens == 1
    finished, _ = run(sched)
    assert finished["b"].output_token_ids == reference([1, 2], 4)
    assert_all_pages_free(sched)


def test_finish_request_and_unknown_ids():
    sched = Scheduler(config())
    sched.add_request(Request("a", [1, 2, 3], max_tokens=4))
    step(sched, runner_for(sched))
    request = sched.finish_request("a", FinishReason.STOP)  # e.g. a stop string matched
    assert request.finish_reason is FinishReason.STOP and request.output_token_ids == [14]
    assert not sched.has_unfinished_requests()
    assert_all_pages_free(sched)
    with pytest.raises(UnknownRequestError, match="'a'"):
        sched.finish_request("a", FinishReason.STOP)


# ---- admission errors and protocol --------------------------------------------------------------


def test_too_long_requests_are_rejected_with_the_numbers_and_leave_nothing():
    sched = Scheduler(config(num_pages=5, page_size=4, max_model_len=64))
    too_long = r"prompt \(60 tokens\) \+ max_tokens \(5\) = 65 tokens exceeds max_model_len \(64\)"
    with pytest.raises(RequestTooLongError, match=too_long):
        sched.add_request(Request("a", [1] * 60, max_tokens=5))
    # 10 + 8 - 1 = 17 tokens of KV need 5 pages of 4; only 4 are usable.
    too_big = "needs up to 5 KV pages of 4 tokens, but the cache has only 4 usable pages"
    with pytest.raises(RequestTooLongError, match=too_big):
        sched.add_request(Request("a", [1] * 10, max_tokens=8))
    assert isinstance(RequestTooLongError("x"), ValueError)
    assert not sched.has_unfinished_requests() and sched.num_waiting == 0
    sched.add_request(Request("a", [1] * 10, max_tokens=7))  # exactly 16 tokens of KV: fits
    finished, _ = run(sched)
    assert finished["a"].output_token_ids == reference([1] * 10, 7)


def test_duplicate_ids_and_bad_requests():
    sched = Scheduler(config())
    sched.add_request(Request("a", [1], max_tokens=1))
    with pytest.raises(DuplicateRequestError):
        sched.add_request(Request("a", [2], max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        Request("b", [], max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        Request("b", [1], max_tokens=0)
    with pytest.raises(ValueError, match="min_tokens"):
        Request("b", [1], max_tokens=2, min_tokens=3)


def test_update_protocol_is_enforced():
    sched = Scheduler(config())
    sched.add_request(Request("a", [1, 2], max_tokens=2))
    out = sched.schedule()
    with pytest.raises(SchedulerError, match="awaiting update"):
        sched.schedule()
    with pytest.raises(SchedulerError, match="no sampled token for request 'a'"):
        sched.update(out, {})
    sched.update(out, {"a": [9]})  # the failed update changed nothing
    with pytest.raises(SchedulerError, match="oldest schedule"):
        sched.update(out, {"a": [9]})


# ---- prefix caching ------------------------------------------------------------------------------


def computed_tokens(log, rid):
    return sum(e.num_new_tokens for o in log for e in o.scheduled if e.request_id == rid)


def test_prefix_hit_skips_shared_pages_and_keeps_outputs():
    shared = list(range(10, 30))  # 20 tokens: 5 full pages of 4
    sched = Scheduler(config())
    sched.add_request(Request("a", shared + [1, 2], max_tokens=3))
    run(sched)
    sched.add_request(Request("b", shared + [3], max_tokens=3))
    log = []
    finished, _ = run(sched, log=log)
    b = finished["b"]
    assert b.num_cached_tokens == 20
    assert computed_tokens(log, "b") == len(b.prompt_token_ids) - 20 + 3 - 1
    assert b.output_token_ids == reference(shared + [3], 3)
    # Same prompt as a: all but the last page may hit, so one token is left to compute.
    sched.add_request(Request("c", shared, max_tokens=2))
    finished, _ = run(sched, log=log)
    assert finished["c"].num_cached_tokens == 16
    assert finished["c"].output_token_ids == reference(shared, 2)


def test_generated_tokens_are_cached_too():
    sched = Scheduler(config())
    sched.add_request(Request("a", [1, 2, 3], max_tokens=6))  # 3 + 6 tokens, 8 with KV
    finished, _ = run(sched)
    continued = [1, 2, 3] + finished["a"].output_token_ids[:5]  # a multi-turn follow-up
    sched.add_request(Request("b", continued + [4], max_tokens=2))
    finished, _ = run(sched)
    assert finished["b"].num_cached_tokens == 8
    assert finished["b"].output_token_ids == reference(continued + [4], 2)


def test_identical_prompts_share_pages_once_the_first_is_computed():
    prompt = list(range(12))  # 3 full pages
    sched = Scheduler(config(max_num_batched_tokens=12))  # the first prompt fills step 1
    runner = runner_for(sched)
    sched.add_request(Request("a", prompt, max_tokens=4))
    sched.add_request(Request("b", prompt, max_tokens=4))
    step(sched, runner)
    out, _ = step(sched, runner)
    a, b = sched.get_request("a"), sched.get_request("b")
    assert b.num_cached_tokens == 8 and b.page_ids[:2] == a.page_ids[:2]
    assert [sched.page_manager.ref_count(p) for p in a.page_ids[:2]] == [2, 2]
    assert [(e.request_id, e.start_position, e.num_new_tokens) for e in out.scheduled] == [
        ("a", 12, 1), ("b", 8, 4)]  # fmt: skip
    finished, _ = run(sched)
    assert finished["a"].output_token_ids == finished["b"].output_token_ids == reference(prompt, 4)
    assert_all_pages_free(sched)


# ---- property-based: random arrivals, aborts and steps ------------------------------------------

PREFIXES = [[], [3, 1, 4, 1, 5, 9, 2, 6], [3, 1, 4, 1, 5, 9, 2, 7, 1, 8], [2, 7, 1, 8]]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        page_size=st.sampled_from([1, 2, 4]),
        num_pages=st.integers(6, 24),
        max_num_seqs=st.integers(1, 5),
        budget=st.integers(1, 24),
        chunked=st.booleans(),
        prefix_caching=st.sampled_from([True, True, False]),  # hits need caching on
        policy=st.sampled_from(["fcfs", "priority", "fair"]),
        mode=st.sampled_from(["recompute", "swap", "auto"]),
        host_pages=st.integers(0, 24),  # small pools fill up: swaps fall back to recompute
        host_tier=st.booleans(),  # evicted prefix pages to the host pool, hits copied back
        ahead=st.booleans(),  # async scheduling: step n+1 scheduled and run before update(n)
    )
    def setup(self, page_size, num_pages, max_num_seqs, budget, chunked, prefix_caching, policy,
              mode, host_pages, host_tier, ahead):
        max_model_len = 30
        if not chunked:
            budget = max(budget, max_model_len)
        self.sched = Scheduler(SchedulerConfig(
            num_pages=num_pages, page_size=page_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget, max_model_len=max_model_len,
            enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked,
            scheduling_policy=policy, preemption_mode=mode, num_host_pages=host_pages,
            host_prefix_cache=host_tier, swap_seconds_per_page=1.0, recompute_seconds_per_token=0.3))  # fmt: skip
        if policy == "fair":  # re-rank often with a small margin: many preemptions
            self.sched.policy.interval, self.sched.policy.margin = 2, 4.0
        self.runner = runner_for(self.sched)
        self.sched.max_pending = 2 if ahead else 1
        self.last = None  # ahead: (the step run but not updated, its samples)
        self.expected: dict[str, list[int]] = {}
        self.finished: dict[str, Request] = {}
        self.total_tokens = 0  # of accepted requests, for the no-livelock bound
        self.next_id = 0

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 9), max_size=8),
          max_tokens=st.integers(1, 12), priority=st.integers(-2, 2),
          client=st.sampled_from(["x", "y", None]))  # fmt: skip
    def add(self, prefix, tail, max_tokens, priority, client):
        prompt = (prefix + tail) or [0]
        rid = f"r{self.next_id}"
        self.next_id += 1
        sched, size = self.sched, self.sched.config.page_size
        fits = (len(prompt) + max_tokens <= sched.config.max_model_len
                and math.ceil((len(prompt) + max_tokens - 1) / size)
                <= sched.page_manager.num_usable_pages)  # fmt: skip
        request = Request(rid, prompt, max_tokens=max_tokens, priority=priority, client_id=client)
        if not fits:
            with pytest.raises(RequestTooLongError):
                sched.add_request(request)
            assert sched.get_request(rid) is None
            return
        sched.add_request(request)
        self.expected[rid] = reference(prompt, max_tokens)
        self.total_tokens += len(prompt) + max_tokens

    @rule(abort_in_flight=st.booleans(), data=st.data())
    def step(self, abort_in_flight, data):
        sched = self.sched
        before = {r.request_id: r.num_tokens_to_compute for r in sched.running}
        out = sched.schedule()
        check_step(sched, out, before)
        sampled = self.runner.execute(fed(out, self.last[1] if self.last else {}))
        if abort_in_flight and out.scheduled:  # the client leaves while the device runs
            sched.abort(data.draw(st.sampled_from(out.scheduled)).request_id)
        if sched.max_pending == 2:  # ahead: update the step before, keep this one in flight
            out, sampled, self.last = *(self.last or (None, None)), (out, sampled)
        for request in sched.update(out, sampled) if out is not None else ():
            self.finished[request.request_id] = request

    @precondition(lambda self: self.sched.has_unfinished_requests())
    @rule(data=st.data(), reason=st.sampled_from([FinishReason.ABORT, FinishReason.STOP]))
    def finish_any(self, data, reason):
        request = data.draw(st.sampled_from(self.sched.running + self.sched.waiting))
        self.sched.finish_request(request.request_id, reason)
        self.finished[request.request_id] = request

    @invariant()
    def state_is_consistent(self):
        if not hasattr(self, "sched"):
            return
        sched, pm = self.sched, self.sched.page_manager
        size = sched.config.page_size
        pm.verify()
        assert pm.num_free_pages + pm.num_used_pages == pm.num_usable_pages
        owners: dict[int, int] = {}
        for request in sched.running:
            assert request.status is RequestStatus.RUNNING
            # The page table covers exactly the computed tokens (between steps).
            assert len(request.page_ids) == math.ceil(request.num_computed_tokens / size)
            assert len(set(request.page_ids)) == len(request.page_ids)
            for page in request.page_ids:
                owners[page] = owners.get(page, 0) + 1
        for page in range(pm.num_pages):
            assert pm.ref_count(page) == owners.get(page, 0)  # shared only through refcounts
        host_owned = []
        for request in sched.waiting:
            assert request.page_ids == []
            if request.status is RequestStatus.SWAPPED:  # KV in host pages, computed kept
                assert len(request.host_page_ids) == math.ceil(request.num_computed_tokens / size) > 0
                host_owned += request.host_page_ids
            else:
                assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
                assert request.num_computed_tokens == 0 and request.host_page_ids == []
        tier = sched.host_tier
        tier_pages = [] if tier is None else list(tier._lru.values())
        if tier is not None:
            tier.verify()
        assert len(set(host_owned + tier_pages)) == len(host_owned) + len(tier_pages) \
            == sched.host_pool.num_used_pages  # fmt: skip
        assert len(sched.running) <= sched.config.max_num_seqs
        for rid, request in self.finished.items():
            assert request.output_token_ids == self.expected[rid][: request.num_output_tokens]

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        if self.last is not None:  # the step in flight, then in order
            for request in self.sched.update(*self.last):
                self.finished[request.request_id] = request
        # No livelock: every request fits the cache alone, so all finish in bounded steps.
        finished, steps = run(self.sched, max_steps=10 * self.total_tokens + 10)
        for rid, request in finished.items():
            assert request.output_token_ids == self.expected[rid]
        assert_all_pages_free(self.sched)
        out = self.sched.schedule()  # carries the drops of requests aborted while swapped
        self.runner.execute(out)
        self.sched.update(out, {})
        # No host copy outlives its request; what is left is the host prefix tier's.
        tier = self.sched.host_tier
        assert set(self.runner.host) == (set() if tier is None else set(tier._lru.values()))
        assert self.sched.host_pool.num_used_pages == (0 if tier is None else tier.num_pages)


SchedulerMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None
)
TestSchedulerMachine = SchedulerMachine.TestCase


def test_recompute_all_after_the_cache_was_lost():
    """A failed step lost the KV cache: every running request recomputes (nothing read from the
    lost cache, prefix cache included), the waiting order is kept, and outputs are exact."""
    sched = Scheduler(config(max_num_batched_tokens=16))
    shared = list(range(1, 13))
    prompts = {"a": shared + [20, 21], "b": shared + [30], "c": list(range(40, 70)), "d": [5, 6]}
    for rid, p in prompts.items():
        sched.add_request(Request(rid, p, max_tokens=10))
    runner = runner_for(sched)
    for _ in range(4):
        out = sched.schedule()
        sched.update(out, runner.execute(out))
    running_before = [r.request_id for r in sched.running]
    waiting_before = [r.request_id for r in sched.waiting]
    assert running_before and sched.page_manager.num_cached_pages
    out = sched.schedule()
    sched.recompute_all(out)
    runner.kv.clear()  # what the cache held is gone
    assert [r.request_id for r in sched.waiting] == running_before + waiting_before
    assert all(r.num_computed_tokens == 0 for r in sched.waiting)
    assert sched.page_manager.num_cached_pages == 0
    assert_all_pages_free(sched)
    with pytest.raises(SchedulerError):
        sched.recompute_all(out)  # only the latest schedule(), once
    finished, _ = run(sched)
    for rid, p in prompts.items():
        assert finished[rid].output_token_ids == reference(p, 10)
    assert_all_pages_free(sched)
