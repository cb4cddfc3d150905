"""Async scheduling: step n+1 is scheduled and dispatched before step n is collected, its pending
tokens fed on the device. Outputs must equal the synchronous engine's, token for token, under
every sampling option, preemption by recompute and by swap, stop strings and aborts; and the
scheduler alone, driven one step ahead by the fake runner, must produce the reference tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.test_engine import prompts
from tests.test_scheduler import assert_all_pages_free, config, fed, reference, runner_for

from jaxserve.kernels import cpu_matmul
from jaxserve.sampling import SamplingParams
from jaxserve.sched import Request, Scheduler


class Overlap:
    """Counts the steps dispatched while another was still in flight (wraps the runner)."""

    def __init__(self, engine):
        self.in_flight, self.overlapped, self.steps = 0, 0, 0
        dispatch, collect = engine.runner.dispatch, engine.runner.collect

        def counted_dispatch(*args):
            parts = dispatch(*args)
            self.overlapped += self.in_flight > 0
            self.in_flight += 1
            self.steps += 1
            return parts

        def counted_collect(parts):
            self.in_flight -= 1
            return collect(parts)

        engine.runner.dispatch, engine.runner.collect = counted_dispatch, counted_collect


def serve(engine, arrivals):
    """arrivals: {step: [(id, prompt, params)]}, added before that step() call; steps to the
    end. Returns ({id: final RequestOutput}, Overlap)."""
    overlap, done, step = Overlap(engine), {}, 0
    engine._rng = np.random.default_rng(engine.config.seed)  # unseeded draws as on a new engine
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for rid, prompt, params in arrivals.get(step, ()):
            engine.add_request(rid, prompt, params)
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        step += 1
    del engine.runner.dispatch, engine.runner.collect  # the runner's own methods again
    return done, overlap


def assert_same(got, want):
    """Everything a client sees of a finished request; log-probs within 1e-3 (a request's
    batch differs between the engines, and with it the float rounding of its logits)."""
    def logprobs(positions):  # ([(token, rank, text)], [log-prob])
        flat = [(t, lp.rank, lp.decoded_token, lp.logprob) for p in positions or () if p
                for t, lp in p.items()]
        return [f[:3] for f in flat], np.array([f[3] for f in flat])

    for a, b in [(got.outputs[k], want.outputs[k]) for k in range(len(want.outputs))] + [(got, want)]:
        if a is got:
            assert len(got.outputs) == len(want.outputs)
            x, y = logprobs(got.prompt_logprobs), logprobs(want.prompt_logprobs)
        else:
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == \
                (b.token_ids, b.text, b.finish_reason, b.stop_reason)
            x, y = logprobs(a.logprobs), logprobs(b.logprobs)
            assert (a.cumulative_logprob is None) == (b.cumulative_logprob is None)
        assert x[0] == y[0]
        np.testing.assert_allclose(x[1], y[1], atol=1e-3)


def workload(vocab, n=14, seed=0):
    """Requests arriving in bursts, drawn from every sampling option but penalties."""
    rng = np.random.default_rng(seed)
    pick = lambda *xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    arrivals = {}
    for i, p in enumerate(prompts(n, seed=seed, lo=2, hi=50)):
        params = SamplingParams(
            n=pick(1, 1, 2), temperature=pick(0.0, 0.8, 1.2), top_k=pick(0, 5, 100),
            top_p=pick(1.0, 0.9), min_p=pick(0.0, 0.05), seed=pick(None, int(rng.integers(1 << 30))),
            logprobs=pick(None, 2), prompt_logprobs=pick(None, None, 1), min_tokens=pick(0, 3),
            stop=pick(None, ["e", " a"]), stop_token_ids=pick(None, [int(t) for t in rng.integers(0, vocab, 12)]),
            max_tokens=int(rng.integers(3, 16)), ignore_eos=pick(True, False))
        arrivals.setdefault(int(rng.integers(0, 12)), []).append((f"r{i}", p, params))
    return arrivals


@pytest.fixture(scope="module")
def invariant_engine(make_tiny_engine):
    """Tiny engines whose logits for a token are the same bits whatever batch it is in, so the
    two engines, which batch differently (stop checks lag a step; preemptions fall elsewhere),
    must sample the same tokens: every projection on the C++ matmul (kernels/cpu_matmul.py:
    rows are batch-invariant; by default float32 on AVX-512 leaves 2+ rows to XLA, whose dot
    rounds differently at 1 row and at 64), the tied head at 2+ rows (decode buckets from 2:
    XLA's 1-row dot is the odd one), attention on the C++ kernel (every token the same
    sequence), steps of at most 32 tokens (a token's hidden state in the 64-token program
    differed from the 32-token one's by ~1e-4, though its matmuls, attention, norm and RoPE
    each gave the same bits alone: not yet located). A near-tie in top-p's acceptance test then
    cannot flip a token between them, as it did (r9 of the recompute case, a rank-1 token
    against a rank-33 one)."""
    saved = {width: dict(rows) for width, rows in cpu_matmul.MAX_ROWS.items()}
    for rows in cpu_matmul.MAX_ROWS.values():
        rows[jnp.dtype(jnp.float32)] = None
    yield lambda **kw: make_tiny_engine(decode_buckets=(2, 4, 8), max_num_batched_tokens=32, **kw)
    for width, rows in saved.items():
        cpu_matmul.MAX_ROWS[width] = rows


@pytest.fixture(scope="module")
def pair(invariant_engine):
    """(async engine, synchronous engine) on the tiny test config, shared by the tests here:
    each leaves them idle."""
    return invariant_engine(async_scheduling=True), invariant_engine(async_scheduling=False)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_kv_pages=16),  # preemption by recompute
    dict(num_kv_pages=16, preemption_mode="swap", host_prefix_cache=True),
], ids=["roomy", "recompute", "swap"])
def test_outputs_equal_the_synchronous_engine(invariant_engine, pair, backend_compiles, overrides):
    # outputs do not depend on the cache: a small one (preemptions) against the roomy one
    ahead, in_order = pair[0] if not overrides else invariant_engine(**overrides), pair[1]
    arrivals = workload(ahead.runner.config.vocab_size, seed=len(overrides))
    before = backend_compiles()
    got, overlap = serve(ahead, arrivals)
    assert backend_compiles() == before, "an overlapped step compiled after warmup"
    want, sync = serve(in_order, arrivals)
    assert got.keys() == want.keys() == {rid for burst in arrivals.values() for rid, _, _ in burst}
    for rid in want:
        assert_same(got[rid], want[rid])
    assert overlap.overlapped > overlap.steps // 2 and sync.overlapped == 0
    assert ahead.runner.feeds and not in_order.runner.feeds
    if overrides:
        assert ahead.num_preemptions > 0
    for engine in (ahead, in_order):
        assert engine.scheduler.page_manager.num_used_pages == 0
        assert engine.scheduler.host_pool.num_used_pages == (
            engine.scheduler.host_tier.num_pages if engine.scheduler.host_tier else 0)


def test_penalties_run_steps_in_order(pair):
    """A request with penalties needs its tokens on the host: while it runs, no step overlaps."""
    ahead, in_order = pair
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    penalized = SamplingParams(temperature=0.9, seed=3, repetition_penalty=1.3, presence_penalty=0.5,
                               max_tokens=6, ignore_eos=True)
    ps = prompts(3, seed=8)
    arrivals = {0: [("a", ps[0], plain)], 3: [("p", ps[1], penalized)], 4: [("b", ps[2], plain)]}
    got, overlap = serve(ahead, arrivals)
    want, _ = serve(in_order, arrivals)
    assert got.keys() == want.keys()
    for rid in want:
        assert_same(got[rid], want[rid])
    assert 0 < overlap.overlapped < overlap.steps - 6  # before and after, not beside "p"


def test_abort_while_a_step_is_in_flight(pair):
    engine, alone = pair
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ps = prompts(3, seed=9)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    assert engine.abort("1")
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert set(done) == {"0", "2"}
    want, _ = serve(alone, {0: [("0", ps[0], params), ("2", ps[2], params)]})
    assert all(done[r].outputs[0].token_ids == want[r].outputs[0].token_ids for r in done)
    assert engine.scheduler.page_manager.num_used_pages == 0


def test_an_id_reused_while_its_last_step_is_in_flight(pair):
    """A request that stops on a token has one more step in flight when it finishes; a new
    request taking its id must not receive that step's row."""
    engine, in_order = pair
    ps = prompts(2, seed=10)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = serve(in_order, {0: [("x", ps[0], greedy)]})[0]["x"]
    stop_at = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                             stop_token_ids=[first.outputs[0].token_ids[3]])
    done, _ = serve(engine, {0: [("x", ps[0], stop_at)]})
    assert len(done["x"].outputs[0].token_ids) <= 4 and engine._inflight is not None
    again, _ = serve(engine, {0: [("x", ps[1], greedy)]})
    want, _ = serve(in_order, {0: [("x", ps[1], greedy)]})
    assert_same(again["x"], want["x"])


def test_a_step_failing_at_collect_recovers_both_steps_in_flight(pair, monkeypatch):
    """The device fails step n after step n+1 was dispatched on the cache it consumed: both
    are undone, the cache rebuilt, every request recomputed; outputs as if nothing happened."""
    engine, in_order = pair
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=10, ignore_eos=True)
    arrivals = {0: [(str(i), p, params) for i, p in enumerate(prompts(3, seed=12))]}
    want, _ = serve(in_order, arrivals)
    real, calls = engine.runner.collect, []

    def failing(parts):
        calls.append(1)
        if len(calls) == 5:  # mid-decode, the next step already dispatched
            for x in jax.tree_util.tree_leaves(engine.runner.kv):
                x.delete()  # as a failed donated write leaves it
            raise RuntimeError("device hiccup")
        return real(parts)

    monkeypatch.setattr(engine.runner, "collect", failing)
    failed_before = engine.num_failed_steps
    got, overlap = serve(engine, arrivals)
    assert engine.num_failed_steps == failed_before + 1 and overlap.overlapped > 0
    for rid in want:
        assert_same(got[rid], want[rid])
    assert engine.scheduler.page_manager.num_used_pages == 0


# ---- the scheduler one step ahead, on the fake runner ------------------------------------------


def run_ahead(sched):
    """Drive the scheduler as an async engine does: schedule and run step n+1 (its pending
    tokens fed from step n's samples), then update step n. {id: finished request}."""
    sched.max_pending = 2
    runner, finished, last, steps = runner_for(sched), {}, None, 0
    while sched.has_unfinished_requests() or last is not None:
        step = None
        if sched.has_unfinished_requests():
            out = sched.schedule()
            step = (out, runner.execute(fed(out, last[1] if last is not None else {})))
        if last is not None:
            finished.update((r.request_id, r) for r in sched.update(*last))
        last, steps = step, steps + 1
        assert steps < 5000
    return finished


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_scheduler_one_step_ahead_gives_the_reference_tokens(mode):
    sched = Scheduler(config(num_pages=14, page_size=4, max_num_batched_tokens=16,
                             preemption_mode=mode, num_host_pages=64))
    rng = np.random.default_rng(4)
    shared = [int(t) for t in rng.integers(1, 900, 9)]
    want = {}
    for i in range(8):
        prompt = shared + [int(t) for t in rng.integers(1, 900, int(rng.integers(1, 12)))]
        eos = [int(t) for t in rng.integers(0, 997, 60)]
        sched.add_request(Request(f"r{i}", prompt, max_tokens=int(rng.integers(2, 18)),
                                  eos_token_ids=eos, min_tokens=2))
        want[f"r{i}"] = reference(prompt, sched.get_request(f"r{i}").max_tokens, eos, min_tokens=2)
    finished = run_ahead(sched)
    assert {rid: r.output_token_ids for rid, r in finished.items()} == want
    assert sum(sched.num_preemptions.values()) > 0
    assert any(len(want[r]) < finished[r].max_tokens for r in want)  # some stopped on eos
    assert_all_pages_free(sched)
