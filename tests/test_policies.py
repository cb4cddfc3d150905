"""Policies (fcfs / priority / fair) and swap preemption, driven by the fake runner of
test_scheduler.py (exact tokens, a fake KV cache and a fake host memory)."""

import pytest

from jaxserve.sched import (
    HostPool,
    PageManagerError,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfigError,
)
from tests.test_scheduler import (
    assert_all_pages_free,
    config,
    reference,
    run,
    runner_for,
    workload,
)


def outputs_and_log(**kw):
    """Request swaps alone: the host prefix tier (its own tests) is off unless asked for."""
    sched = Scheduler(config(max_num_batched_tokens=128, **{"host_prefix_cache": False, **kw}))
    for rid, (prompt, max_tokens) in workload().items():
        sched.add_request(Request(rid, prompt, max_tokens=max_tokens))
    log = []
    finished, _ = run(sched, log=log)
    assert_all_pages_free(sched)
    return sched, {rid: r.output_token_ids for rid, r in finished.items()}, log


@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair"])
def test_swap_preemption_keeps_outputs_and_never_recomputes(policy):
    want = {rid: reference(p, m) for rid, (p, m) in workload().items()}
    sched, got, log = outputs_and_log(num_pages=18, preemption_mode="swap", num_host_pages=64,
                                      scheduling_policy=policy)
    assert got == want
    runner = runner_for(sched)
    assert runner.swap_counts[0] == runner.swap_counts[1] > 0  # every page out came back
    # A swapped request resumes where it stopped: no entry starts over at position 0.
    starts = {}
    for out in log:
        for e in out.scheduled:
            if e.start_position == 0:
                assert e.request_id not in starts, f"{e.request_id} recomputed after a swap"
                starts[e.request_id] = True
        for s in out.swap_out:  # the pages listed are the ones the request held
            assert len(s.device_page_ids) == len(s.host_page_ids)
    assert sum(len(o.preempted) for o in log) == sum(len(o.swap_out) for o in log)


def test_full_host_pool_falls_back_to_recompute():
    want = {rid: reference(p, m) for rid, (p, m) in workload().items()}
    sched, got, log = outputs_and_log(num_pages=18, preemption_mode="swap", num_host_pages=10)
    assert got == want
    swaps = sum(len(o.swap_out) for o in log)
    assert 0 < swaps < sum(len(o.preempted) for o in log)  # some swapped, the rest recomputed
    assert all(len(s.host_page_ids) <= 10 for o in log for s in o.swap_out)


def test_auto_swaps_when_copying_is_cheaper_than_recomputing():
    def swaps(swap_cost, recompute_cost):
        _, got, log = outputs_and_log(num_pages=18, preemption_mode="auto", num_host_pages=64,
                                      swap_seconds_per_page=swap_cost,
                                      recompute_seconds_per_token=recompute_cost)
        return sum(len(o.swap_out) for o in log), sum(len(o.preempted) for o in log)

    assert swaps(1.0, 1.0)[0] == swaps(1.0, 1.0)[1] > 0  # a page holds 4 tokens: swap wins
    assert swaps(100.0, 1.0)[0] == 0 < swaps(100.0, 1.0)[1]  # copies dearer: recompute


def two_requests_that_swap():
    """A swapping scheduler (and its fake runner) whose two requests cannot both fit: "b" is
    swapped out a few steps in."""
    sched = Scheduler(config(num_pages=6, page_size=2, enable_prefix_caching=False,
                             preemption_mode="swap", num_host_pages=8))
    sched.add_request(Request("a", [1, 2, 3], max_tokens=7))
    sched.add_request(Request("b", [4, 5, 6], max_tokens=7))
    return sched, runner_for(sched)


def test_abort_while_swapped_frees_host_pages_and_drops_the_copy():
    sched, runner = two_requests_that_swap()
    while True:
        out = sched.schedule()
        sched.update(out, runner.execute(out))
        if out.preempted:
            break
    b = sched.get_request("b")
    assert b.status is RequestStatus.SWAPPED and b.num_computed_tokens > 0
    assert sched.num_swapped == 1 and sched.host_pool.num_used_pages == len(b.host_page_ids) > 0
    host_pages = b.host_page_ids
    assert set(runner.host) == set(host_pages)
    sched.abort("b")
    assert sched.host_pool.num_used_pages == 0 and sched.num_swapped == 0
    out = sched.schedule()
    assert out.host_free == tuple(host_pages)
    sched.update(out, runner.execute(out))
    assert runner.host == {}
    finished, _ = run(sched)
    assert finished["a"].output_token_ids == reference([1, 2, 3], 7)
    assert_all_pages_free(sched)


def test_recompute_all_turns_this_steps_swaps_into_recomputes():
    sched, runner = two_requests_that_swap()
    while True:
        out = sched.schedule()
        if out.swap_out:
            break
        sched.update(out, runner.execute(out))
    sched.recompute_all(out)  # the step (and its copy to host) never ran
    runner.kv.clear()
    b = sched.get_request("b")
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.host_pool.num_used_pages == 0
    finished, _ = run(sched)
    assert {r: f.output_token_ids for r, f in finished.items()} == {
        "a": reference([1, 2, 3], 7), "b": reference([4, 5, 6], 7)}
    assert_all_pages_free(sched)


def test_priority_admits_lower_values_first_and_preempts_for_them():
    sched = Scheduler(config(num_pages=10, page_size=2, max_num_seqs=2, max_num_batched_tokens=8,
                             scheduling_policy="priority", preemption_mode="swap",
                             num_host_pages=16))
    sched.add_request(Request("low", [1, 2, 3], max_tokens=6, priority=5))
    sched.add_request(Request("mid", [4, 5, 6], max_tokens=6, priority=1))
    runner = runner_for(sched)
    out = sched.schedule()
    assert [e.request_id for e in out.scheduled] == ["mid", "low"]
    sched.update(out, runner.execute(out))
    sched.add_request(Request("high", [7, 8], max_tokens=3, priority=-1))
    out = sched.schedule()  # two seats, both taken: "high" takes the worst one's
    assert out.preempted == ("low",) and [s.request_id for s in out.swap_out] == ["low"]
    assert [e.request_id for e in out.scheduled] == ["mid", "high"]
    sched.update(out, runner.execute(out))
    finished, _ = run(sched)
    assert {r: f.output_token_ids for r, f in finished.items()} == {
        "low": reference([1, 2, 3], 6), "mid": reference([4, 5, 6], 6),
        "high": reference([7, 8], 3)}
    order = sorted(finished.values(), key=lambda r: r.num_preemptions)
    assert order[-1].request_id == "low"
    assert_all_pages_free(sched)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_flooding_client_cannot_starve_another_under_fair(mode):
    """Client "flood" queues 60 requests, then client "calm" queues 10. Under fcfs "calm" waits
    behind the whole flood; under fair (VTC) the two backlogged clients' weighted service
    (prompt tokens + 2 x output tokens) stays within a bound while both wait."""
    prompt_len, max_tokens, seats = 8, 8, 4

    def served(policy):
        sched = Scheduler(config(num_pages=40, page_size=4, max_num_seqs=seats,
                                 max_num_batched_tokens=32, scheduling_policy=policy,
                                 preemption_mode=mode, num_host_pages=64))
        if policy == "fair":
            sched.policy.interval, sched.policy.margin = 4, 16.0
        for i in range(60):
            sched.add_request(Request(f"f{i}", [i % 7 + 1] * prompt_len, max_tokens=max_tokens,
                                      client_id="flood"))
        for i in range(10):
            sched.add_request(Request(f"c{i}", [i % 5 + 2] * prompt_len, max_tokens=max_tokens,
                                      client_id="calm"))
        runner, service, gaps = runner_for(sched), {"flood": 0, "calm": 0}, []
        while {r.client_id for r in sched.waiting} == {"flood", "calm"}:  # both backlogged
            out = sched.schedule()
            sampled = runner.execute(out)
            for e in out.scheduled:
                if e.start_position == 0:
                    service[e.request.client_id] += prompt_len
                if e.samples_token:
                    service[e.request.client_id] += 2
            for r in sched.update(out, sampled):
                assert r.output_token_ids == reference(r.prompt_token_ids, max_tokens)
            gaps.append(service["flood"] - service["calm"])
        run(sched)
        assert_all_pages_free(sched)
        return service, gaps

    (fcfs, _), (fair, gaps) = served("fcfs"), served("fair")
    assert fcfs["calm"] == 0  # it waited behind the whole flood
    assert fair["calm"] > 0 and len(gaps) > 20
    # VTC's bound (Sheng et al., Thm. 4.4): backlogged clients' service differs by at most a
    # few requests' worth (here: the seats' worth of whole requests, plus the re-rank margin).
    bound = seats * (prompt_len + 2 * max_tokens) + 16
    assert max(abs(g) for g in gaps) <= bound


def test_fair_lifts_a_returning_client_to_the_least_served():
    sched = Scheduler(config(scheduling_policy="fair"))
    sched.add_request(Request("a", [1] * 10, max_tokens=4, client_id="a"))
    run(sched)
    assert sched.policy.service("a") == 10 + 2 * 4  # prompt once, outputs twice (VTC weights)
    sched.add_request(Request("b1", [1] * 10, max_tokens=4, client_id="b"))
    assert sched.policy.service("b") == 0  # nobody active: no lift
    sched.add_request(Request("a2", [2] * 3, max_tokens=4, client_id="a"))
    assert sched.policy.service("a") == 18  # lifted to max(own, least active) = own


def test_policy_config_and_request_checks():
    with pytest.raises(SchedulerConfigError, match="scheduling_policy must be one of"):
        config(scheduling_policy="lifo")
    with pytest.raises(SchedulerConfigError, match="preemption_mode must be one of"):
        config(preemption_mode="drop")
    with pytest.raises(ValueError, match="priority must be an integer"):
        Request("a", [1], max_tokens=1, priority=1.5)


def test_host_pool_hands_out_contiguous_runs_and_refuses_double_free():
    pool = HostPool(8)
    a, b, c = pool.allocate(2), pool.allocate(3), pool.allocate(2)
    assert (a, b, c) == ([0, 1], [2, 3, 4], [5, 6])
    pool.free(a)
    pool.free(c)  # free: 0 1 5 6 7
    assert pool.allocate(3) == [5, 6, 7]  # the lowest run that fits, not 0 1 5
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(PageManagerError):
        pool.free([2, 2])
    with pytest.raises(PageManagerError):
        pool.allocate(1)
    pool.free(b)
    with pytest.raises(PageManagerError, match="double free"):
        pool.free([3])
