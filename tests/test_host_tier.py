"""The host prefix tier (sched/host_tier.py): prefix pages the device evicts go to host memory
and come back on a later hit. The scheduler against the fake runner of test_scheduler.py (exact
tokens, a fake device cache and host memory), then the engine on the tiny model."""

from jaxserve.sampling import SamplingParams
from jaxserve.sched import HostPool, Request, Scheduler
from jaxserve.sched.host_tier import HostTier
from tests.test_scheduler import (
    assert_all_pages_free,
    config,
    reference,
    run,
    runner_for,
)

TURN_1 = list(range(100, 124))  # 6 pages of 4 tokens


def serve(sched, rid, prompt, max_tokens, log=None):
    sched.add_request(Request(rid, prompt, max_tokens=max_tokens))
    finished, _ = run(sched, log=log)
    return finished[rid].output_token_ids


def evict_everything(sched, log=None, start=500):
    """A request of fresh tokens that needs every device page: the cached ones are evicted."""
    pm = sched.page_manager
    filler = list(range(start, start + (pm.num_usable_pages - 1) * 4))
    serve(sched, f"filler-{start}", filler, 4, log)
    assert pm.find_cached_prefix(Request("x", TURN_1, max_tokens=1).page_hashes(4, 6)) == []


def second_turn(first_output):
    return TURN_1 + first_output + [7, 8, 9, 10, 11]


def test_a_later_turn_copies_evicted_prefix_pages_back_instead_of_recomputing():
    sched = Scheduler(config(num_pages=20, num_host_pages=32))
    out_1 = serve(sched, "turn-1", TURN_1, 6)
    evict_everything(sched)
    tier = sched.host_tier
    assert tier.num_offloaded_pages >= 6 and tier.num_pages == tier.num_offloaded_pages
    prompt = second_turn(out_1)
    log = []
    assert serve(sched, "turn-2", prompt, 6, log) == reference(prompt, 6)
    # Turn 1 left 7 full pages (prompt + outputs but the last token); they all come back.
    [swap] = [s for out in log for s in out.swap_in]
    assert swap.request_id == "turn-2" and len(swap.device_page_ids) == 7 == tier.num_hit_pages
    first = next(e for out in log for e in out.scheduled if e.request_id == "turn-2")
    assert first.start_position == 7 * 4  # the hit tokens were not recomputed
    assert_all_pages_free(sched)


def test_a_page_goes_to_host_once():
    """Evicted again after it came back, a page whose copy is still in the tier is not copied:
    a chat's earlier turns go to host memory once."""
    sched = Scheduler(config(num_pages=20, num_host_pages=64))
    out_1 = serve(sched, "turn-1", TURN_1, 6)
    evict_everything(sched)
    prompt = second_turn(out_1)
    turn_1_pages = dict(sched.host_tier._lru)  # hash -> host page: turn 1's 7 pages
    assert len(turn_1_pages) == 7
    serve(sched, "turn-2", prompt, 6)
    log = []
    evict_everything(sched, log, start=2000)
    copied = [h for out in log for s in out.swap_out for h in s.host_page_ids]
    assert copied and not set(copied) & set(turn_1_pages.values())
    assert all(sched.host_tier._lru[h] == p for h, p in turn_1_pages.items())
    log = []
    assert serve(sched, "turn-3", prompt, 6, log) == reference(prompt, 6)
    # Every full page of the prompt (the last token is always computed): (35 - 1) // 4.
    assert sum(len(s.device_page_ids) for out in log for s in out.swap_in) == 8


def test_the_tier_is_bounded_and_forgets_least_recently_used_pages_first():
    sched = Scheduler(config(num_pages=20, num_host_pages=8))
    serve(sched, "turn-1", TURN_1, 6)
    evict_everything(sched)
    tier = sched.host_tier
    assert tier.num_pages == 7  # turn 1's pages
    evict_everything(sched, start=2000)  # the first filler's 18 pages: the newest 8 are kept
    assert tier.num_pages == 8 == sched.host_pool.num_pages
    # They pushed turn 1's out: no hit, recomputed, still exact.
    log = []
    assert serve(sched, "again", TURN_1 + [1], 3, log) == reference(TURN_1 + [1], 3)
    assert tier.num_hit_pages == 0 and not any(out.swap_in for out in log)


def test_swapped_requests_take_the_tiers_pages_first():
    """A host pool full of tier pages still swaps a preempted request: the tier gives way."""
    pool = HostPool(6)
    tier = HostTier(pool)
    device, host = tier.offload([(p, bytes([p])) for p in range(1, 7)])
    assert device == [1, 2, 3, 4, 5, 6] and host == [0, 1, 2, 3, 4, 5] and pool.num_free_pages == 0
    assert tier.reserve(4) and pool.num_free_pages == 4 and tier.num_pages == 2
    assert tier.find([bytes([5]), bytes([6])]) == [4, 5]  # the most recent survived
    assert not tier.reserve(7) and tier.num_pages == 2  # cannot: nothing given up
    # Offloads keep the most recently evicted pages when the pool cannot hold them all.
    pool.allocate(4)
    device, host = tier.offload([(p, bytes([p])) for p in range(10, 14)])
    assert device == [12, 13] and tier.num_pages == 2

    sched = Scheduler(config(num_pages=10, page_size=2, preemption_mode="swap", num_host_pages=8,
                             max_num_batched_tokens=64))
    serve(sched, "warm", list(range(200, 216)), 2)  # 8 cached pages...
    serve(sched, "evict", list(range(300, 316)), 2)  # ...evicted to the tier, which is full
    assert sched.host_tier.num_pages == 8 and sched.host_pool.num_free_pages == 0
    sched.add_request(Request("a", [1, 2, 3], max_tokens=7))
    sched.add_request(Request("b", [4, 5, 6], max_tokens=7))
    finished, _ = run(sched)
    assert sched.num_preemptions["swap"] > 0 and sched.num_preemptions["recompute"] == 0
    assert finished["b"].output_token_ids == reference([4, 5, 6], 7)
    assert_all_pages_free(sched)


def test_offloads_of_a_step_that_never_ran_are_forgotten():
    sched = Scheduler(config(num_pages=20, num_host_pages=32))
    out_1 = serve(sched, "turn-1", TURN_1, 6)
    sched.add_request(Request("filler", list(range(500, 500 + 18 * 4)), max_tokens=4))
    runner = runner_for(sched)
    while True:
        out = sched.schedule()
        if any(s.request_id is None for s in out.swap_out):
            break
        sched.update(out, runner.execute(out))
    sched.recompute_all(out)  # the copies to host were never made
    runner.kv.clear()
    assert sched.host_tier.num_pages == 0
    run(sched)
    prompt = second_turn(out_1)
    assert serve(sched, "turn-2", prompt, 6) == reference(prompt, 6)
    assert_all_pages_free(sched)


# ---- the engine ---------------------------------------------------------------------------------


def test_engine_multi_turn_hits_host_pages_bit_for_bit(make_tiny_engine, backend_compiles):
    """A second turn whose first turn's pages were evicted from the device copies them back from
    host memory, bit for bit, compiles nothing, and answers as an engine without any cache."""
    from tests.test_engine import prompts, run_to_end
    from tests.test_scheduling import check_swapped_pages, prometheus_text

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # 19 pages of 8 tokens
    engine = make_tiny_engine(num_kv_pages=20, record_steps=True, host_prefix_cache=True)
    checked = check_swapped_pages(engine.runner)
    compiles = backend_compiles()

    def turn(rid, prompt):
        engine.add_request(rid, prompt, greedy)
        return list(run_to_end(engine)[rid].outputs[0].token_ids)

    first = prompts(1, seed=3, lo=60, hi=61)[0]
    out_1 = turn("turn-1", first)
    for i, p in enumerate(prompts(2, seed=4, lo=60, hi=61)):
        engine.add_request(f"filler-{i}", p, greedy)
    run_to_end(engine)
    second = first + out_1 + [11, 12, 13, 14, 15]
    out_2 = turn("turn-2", second)
    tier = engine.scheduler.host_tier
    assert tier.num_hit_pages > 0 and "turn-2" in checked
    assert backend_compiles() == compiles
    records = engine.step_records
    assert sum(r.swapped_in for r in records) == tier.num_hit_pages
    assert records[-1].pages_host == tier.num_pages > 0

    fresh = make_tiny_engine(enable_prefix_caching=False)
    fresh.add_request("turn-2", second, greedy)
    assert list(run_to_end(fresh)["turn-2"].outputs[0].token_ids) == out_2
    text = prometheus_text(engine)
    assert f'jaxserve:host_prefix_cache_hit_pages_total{{model_name="m"}} {tier.num_hit_pages}.0' \
        in text


def test_runner_copies_more_pages_than_one_program_holds_and_reads_across_blobs(
        make_tiny_engine):
    """An offload larger than the largest swap program goes out in pieces; a swap-in whose host
    pages lie in several blobs, in any order, puts each page where it is asked."""
    import numpy as np

    from jaxserve.sched import SchedulerOutput, Swap
    from tests.test_engine import prompts, run

    engine = make_tiny_engine(host_prefix_cache=True)
    run(engine, prompts(8, seed=5, lo=100, hi=120), SamplingParams(max_tokens=4))  # fill pages
    runner, swapper = engine.runner, engine.runner.swapper
    top = swapper.sizes[-1]
    n = top + 8
    before = [np.asarray(x) for layer in runner.kv for x in layer]
    assert all(np.abs(x[1:n + 1]).sum() > 0 for x in before)

    def apply(**swaps):
        runner._swap(SchedulerOutput((), (), 0, **swaps))

    apply(swap_out=(Swap(None, tuple(range(1, n + 1)), tuple(range(n))),))
    assert swapper.stats["out_copies"] == 2  # two blobs, no summaries
    dest = tuple(range(127, 127 - n, -1))  # page 127 gets host page n-1, ...
    apply(swap_in=(Swap("x", dest, tuple(reversed(range(n)))),))
    after = [np.asarray(x) for layer in runner.kv for x in layer]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a[list(dest)], b[list(range(n, 0, -1))])
    apply(host_free=tuple(range(n)))
    assert swapper.host == {}
