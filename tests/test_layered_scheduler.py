"""Layered prefill in the scheduler, against a fake runner with layers.

The fake KV cache here holds a (token, position) per page slot AND per layer. Decodes write
every layer; a prefill stage writes only its group's layers; sampling reads every layer of the
whole context and requires them to agree. So a batch that samples before all its stages ran, a
stage that writes the rows of a member preempted or aborted mid-batch (its freed page may now be
another request's), or a swap that carries half-written pages all change or break the tokens.
"""

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxserve.sched import (FinishReason, Request, RequestStatus, Scheduler, SchedulerConfig,
                            SchedulerConfigError)
from tests.test_scheduler import PREFIXES, assert_all_pages_free, next_token, reference

LAYERS = 4
STAGES = ((3, 1), (8, 2), (1 << 30, 4))  # tokens -> stages, as the engine's measured table


class LayeredFakeRunner:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv: dict[tuple[int, int, int], tuple[int, int]] = {}  # (page, slot, layer)
        self.host: dict[int, dict] = {}  # host page -> {(slot, layer): (token, position)}
        self.batch: dict[str, object] | None = None  # the in-flight batch at its stage 0
        self.batch_id = None
        self.stages_run = 0

    def _write(self, e, layers):
        size, pm = self.sched.config.page_size, self.sched.page_manager
        for p in set(e.page_ids[e.start_position // size:]):
            assert pm.ref_count(p) == 1 and p in e.request.page_ids  # its own, never freed
        for i, token in enumerate(e.token_ids):
            pos = e.start_position + i
            for layer in layers:
                self.kv[(e.page_ids[pos // size], pos % size, layer)] = (token, pos)

    def _sample(self, e):
        size, context = self.sched.config.page_size, []
        for pos in range(e.end_position):
            seen = {self.kv[(e.page_ids[pos // size], pos % size, layer)] for layer in range(LAYERS)}
            assert seen == {(seen and next(iter(seen))[0], pos)}, (pos, seen)
            context.append(next(iter(seen))[0])
        return [next_token(context)]

    def swap(self, out):  # the protocol of step.py, as test_scheduler.FakeRunner follows it
        size = self.sched.config.page_size
        reads = [[self.host[h] for h in s.host_page_ids] for s in out.swap_in]
        for h in out.host_free:
            self.host.pop(h, None)
        for s in out.swap_out:
            for p, h in zip(s.device_page_ids, s.host_page_ids, strict=True):
                self.host[h] = {(i, la): self.kv[(p, i, la)] for i in range(size)
                                for la in range(LAYERS) if (p, i, la) in self.kv}
        for s, pages in zip(out.swap_in, reads):
            for p, slots in zip(s.device_page_ids, pages, strict=True):
                for i in range(size):
                    for la in range(LAYERS):
                        self.kv.pop((p, i, la), None)
                self.kv.update({(p, i, la): v for (i, la), v in slots.items()})

    def execute(self, out):
        self.swap(out)
        sampled = {}
        for e in out.scheduled:  # decodes, or a prefill batch of one stage joined to them
            assert e.num_new_tokens == 1 or out.prefill_stage is None
            self._write(e, range(LAYERS))
        for e in out.scheduled:
            if e.samples_token:
                sampled[e.request_id] = self._sample(e)
        stage = out.prefill_stage
        if stage is None:
            self.batch = None
            return sampled
        if stage.stage == 0:
            self.batch, self.batch_id = {e.request_id: e for e in stage.entries}, stage.batch_id
            assert stage.num_tokens <= self.sched.config.max_num_batched_tokens
        assert stage.batch_id == self.batch_id
        for e in stage.entries:  # live members: the very entries of stage 0
            assert self.batch[e.request_id] is e
        assert not {e.request_id for e in stage.entries} & {e.request_id for e in out.scheduled}
        per = LAYERS // stage.num_stages
        for e in stage.entries:
            self._write(e, range(stage.stage * per, (stage.stage + 1) * per))
        self.stages_run += 1
        if stage.is_last:
            sampled.update({e.request_id: self._sample(e) for e in stage.entries if e.samples_token})
        return sampled


def make(**kw):
    base = dict(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=16,
                max_model_len=128, prefill_policy="layered", prefill_stages=STAGES)
    sched = Scheduler(SchedulerConfig(**{**base, **kw}))
    return sched, LayeredFakeRunner(sched)


def drive(sched, runner, max_steps=10_000):
    finished, log = {}, []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        log.append(out)
        for request in sched.update(out, runner.execute(out)):
            finished[request.request_id] = request
        assert len(log) < max_steps
    return finished, log


def test_a_prefill_takes_one_step_per_stage_while_decodes_go_on():
    sched, runner = make()
    sched.add_request(Request("a", [1, 2], max_tokens=12))
    sched.add_request(Request("b", list(range(1, 11)), max_tokens=3))  # 10 tokens: 4 stages
    finished, log = drive(sched, runner)
    assert {r: q.output_token_ids for r, q in finished.items()} == {
        "a": reference([1, 2], 12), "b": reference(list(range(1, 11)), 3)}
    # step 0: both admitted as one 12-token batch (4 stages); a samples after stage 3
    stages = [(o.prefill_stage.stage, o.prefill_stage.num_stages) if o.prefill_stage else None
              for o in log]
    assert stages[:4] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert all(not o.scheduled for o in log[:4])
    assert [e.request_id for e in log[4].scheduled] == ["a", "b"]  # both decode from step 4
    assert sched.num_prefill_stages_run == 4
    assert_all_pages_free(sched)


def test_a_long_prompt_is_chunked_and_each_chunk_layered():
    sched, runner = make(max_num_batched_tokens=8)
    prompt = list(range(3, 23))  # 20 tokens: chunks 8 + 8 + 4 of 2 stages each
    sched.add_request(Request("a", prompt, max_tokens=2))
    finished, log = drive(sched, runner)
    assert finished["a"].output_token_ids == reference(prompt, 2)
    stages = [(o.prefill_stage.stage, o.prefill_stage.num_stages, o.prefill_stage.num_tokens)
              for o in log if o.prefill_stage]
    assert stages == [(0, 2, 8), (1, 2, 8), (0, 2, 8), (1, 2, 8), (0, 2, 4), (1, 2, 4)]


def test_new_prefills_wait_until_none_is_in_flight():
    sched, runner = make()
    sched.add_request(Request("a", list(range(1, 11)), max_tokens=2))
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    sched.add_request(Request("b", [5, 6, 7], max_tokens=2))
    sched.add_request(Request("c", [5, 6, 7, 8, 9], max_tokens=2))
    seen = []
    while sched.get_request("c").status is RequestStatus.WAITING:
        out = sched.schedule()
        stage = out.prefill_stage
        seen.append((stage.stage, [e.request_id for e in stage.entries]))
        sched.update(out, runner.execute(out))
    # b and c are admitted only after a's batch ran its 4 stages, into a batch of their own
    assert seen == [(1, ["a"]), (2, ["a"]), (3, ["a"]), (0, ["b", "c"])]


def test_a_one_stage_batch_joins_the_decodes():
    sched, runner = make()
    sched.add_request(Request("a", [1, 2], max_tokens=5))
    out = sched.schedule()  # 2 tokens: one stage, in the ordinary batch
    assert out.prefill_stage is None and [e.num_new_tokens for e in out.scheduled] == [2]
    sched.update(out, runner.execute(out))
    sched.add_request(Request("b", [3, 4, 5], max_tokens=2))
    out = sched.schedule()
    assert out.prefill_stage is None and [e.num_new_tokens for e in out.scheduled] == [1, 3]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempting_a_half_prefilled_request_restarts_its_chunk(mode):
    """A decode needs a page while a 2-chunk prompt's second chunk is mid-batch: the prompt is
    preempted, leaves the batch, and later recomputes (or swaps back its first chunk and redoes
    the second); every output stays exact."""
    sched, runner = make(num_pages=8, page_size=2, max_num_batched_tokens=8, max_model_len=20,
                         preemption_mode=mode, num_host_pages=16)
    sched.add_request(Request("old", [1, 2, 3], max_tokens=9))
    long = list(range(2, 14))  # 12 tokens: chunks of 8 and 4
    finished, log = {}, []
    for step in range(200):
        if step == 2:
            sched.add_request(Request("new", long, max_tokens=2))
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        log.append(out)
        for request in sched.update(out, runner.execute(out)):
            finished[request.request_id] = request
    assert finished["old"].output_token_ids == reference([1, 2, 3], 9)
    assert finished["new"].output_token_ids == reference(long, 2)
    mid = [o for o in log if "new" in o.preempted]
    assert mid and finished["new"].num_preemptions >= 1
    if mode == "swap":
        assert any(s.request_id == "new" for o in log for s in o.swap_out)
    assert_all_pages_free(sched)


def test_bad_stage_tables_are_refused():
    with pytest.raises(SchedulerConfigError, match="prefill_policy"):
        SchedulerConfig(num_pages=8, prefill_policy="tokens")
    with pytest.raises(SchedulerConfigError, match="prefill_stages"):
        SchedulerConfig(num_pages=8, prefill_stages=((64, 2), (32, 4)))


class LayeredMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(6, 24),
                max_num_seqs=st.integers(1, 5), budget=st.integers(1, 16),
                policy=st.sampled_from(["fcfs", "priority", "fair"]),
                mode=st.sampled_from(["recompute", "swap"]), host_pages=st.integers(0, 24),
                prefix_caching=st.booleans())
    def setup(self, page_size, num_pages, max_num_seqs, budget, policy, mode, host_pages,
              prefix_caching):
        self.sched, self.runner = make(
            num_pages=num_pages, page_size=page_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget, max_model_len=30, scheduling_policy=policy,
            preemption_mode=mode, num_host_pages=host_pages, enable_prefix_caching=prefix_caching)
        if policy == "fair":
            self.sched.policy.interval, self.sched.policy.margin = 2, 4.0
        self.expected, self.finished, self.total, self.next_id = {}, {}, 0, 0

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 9), max_size=8),
          max_tokens=st.integers(1, 10), priority=st.integers(-2, 2),
          client=st.sampled_from(["x", "y"]))
    def add(self, prefix, tail, max_tokens, priority, client):
        prompt = (prefix + tail) or [0]
        sched, size = self.sched, self.sched.config.page_size
        if len(prompt) + max_tokens > 30 or \
                math.ceil((len(prompt) + max_tokens - 1) / size) > sched.page_manager.num_usable_pages:
            return
        rid = f"r{self.next_id}"
        self.next_id += 1
        sched.add_request(Request(rid, prompt, max_tokens=max_tokens, priority=priority,
                                  client_id=client))
        self.expected[rid] = reference(prompt, max_tokens)
        self.total += len(prompt) + max_tokens

    @rule(abort_in_flight=st.booleans(), data=st.data())
    def step(self, abort_in_flight, data):
        sched = self.sched
        out = sched.schedule()
        sampled = self.runner.execute(out)
        members = list(out.scheduled) + list(out.prefill_stage.entries if out.prefill_stage else ())
        if abort_in_flight and members:  # the client leaves while the device runs
            sched.abort(data.draw(st.sampled_from(members)).request_id)
        for request in sched.update(out, sampled):
            self.finished[request.request_id] = request

    @precondition(lambda self: self.sched.has_unfinished_requests())
    @rule(data=st.data(), reason=st.sampled_from([FinishReason.ABORT, FinishReason.STOP]))
    def finish_any(self, data, reason):  # e.g. aborted between two stages of its batch
        request = data.draw(st.sampled_from(self.sched.running + self.sched.waiting))
        self.sched.finish_request(request.request_id, reason)
        self.finished[request.request_id] = request

    @invariant()
    def state_is_consistent(self):
        if not hasattr(self, "sched"):
            return
        sched, pm = self.sched, self.sched.page_manager
        pm.verify()
        size, owners = sched.config.page_size, {}
        inflight = sched._inflight.entries if sched._inflight is not None else {}
        assert set(inflight) <= {r.request_id for r in sched.running}
        for request in sched.running:
            # Pages cover the computed tokens, or a member's whole chunk while it is in flight.
            end = inflight[request.request_id].end_position if request.request_id in inflight \
                else request.num_computed_tokens
            assert len(request.page_ids) == math.ceil(end / size)
            for page in request.page_ids:
                owners[page] = owners.get(page, 0) + 1
        for page in range(pm.num_pages):
            assert pm.ref_count(page) == owners.get(page, 0)
        host = [p for r in sched.waiting for p in r.host_page_ids]
        if sched.host_tier is not None:  # evicted prefix pages kept in host memory
            sched.host_tier.verify()
            host += list(sched.host_tier._lru.values())
        assert len(set(host)) == len(host) == sched.host_pool.num_used_pages
        for request in sched.waiting:
            assert request.page_ids == []
            if request.status is RequestStatus.SWAPPED:
                assert len(request.host_page_ids) == math.ceil(request.num_computed_tokens / size)
        for rid, request in self.finished.items():
            assert request.output_token_ids == self.expected[rid][: request.num_output_tokens]

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        finished, _ = drive(self.sched, self.runner, max_steps=10 * LAYERS * self.total + 10)
        for rid, request in finished.items():
            assert request.output_token_ids == self.expected[rid]
        assert_all_pages_free(self.sched)
        out = self.sched.schedule()  # carries the drops of requests aborted while swapped
        self.runner.execute(out)
        self.sched.update(out, {})
        tier = self.sched.host_tier  # no host copy outlives its request but the tier's
        assert set(self.runner.host) == (set() if tier is None else set(tier._lru.values()))
        assert self.sched._inflight is None


LayeredMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestLayeredMachine = LayeredMachine.TestCase
