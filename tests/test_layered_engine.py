"""Layered prefill through the engine, on a tiny 4-layer random model behind the real tokenizer:
outputs equal chunked prefill's, nothing compiles after warmup, preemption and aborts of a
half-prefilled request leave no page behind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.models.llama import init_model
from jaxserve.sampling import SamplingParams
from tests.conftest import TINY
from tests.test_scheduling import prometheus_text

# 1 stage up to 16 tokens, 2 up to 48, else 4 (one layer a step); budget 64: longer prompts
# are chunked and each chunk layered.
STAGES = ((16, 1), (48, 2), (1 << 30, 4))
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def four_layers():
    return init_model(ModelConfig.from_hf({**TINY, "num_hidden_layers": 4}),
                      jax.random.PRNGKey(1), jnp.float32, scale=0.5)


# Engines are shared by the tests of this module (a warmup compiles ~40 programs): pages of 4
# tokens, and each run leaves every page free (asserted).
@pytest.fixture(scope="module")
def chunked(make_tiny_engine, four_layers):
    return make_tiny_engine(four_layers, page_size=4, num_kv_pages=256)


@pytest.fixture(scope="module")
def layered(make_tiny_engine, four_layers):
    return make_tiny_engine(four_layers, page_size=4, num_kv_pages=256, prefill_policy="layered",
                            prefill_stages=STAGES, record_steps=True)


def prompts(seed=0, lengths=(5, 30, 150, 12, 70, 1, 45)):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 49152, n)] for n in lengths]


def params(i):
    """Greedy, and among them a seeded sample, top log-probs and prompt log-probs: every
    sampler variant and the prompt log-prob program run at a prefill batch's last stage."""
    if i == 1:
        return SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True)
    if i == 3:
        return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    if i == 4:
        return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    return GREEDY


def run_arrivals(engine, ps, every=3, abort=None, max_tokens=None):
    """Add one prompt every `every` steps (so they arrive among running decodes); abort
    `abort` = (request id, step) if given. Returns {id: final RequestOutput}."""
    out, step, pending = {}, 0, list(enumerate(ps))
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params(i) if max_tokens is None else
                               SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        if abort is not None and step == abort[1]:
            engine.abort(abort[0])
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o
        step += 1
    return out


def tokens(outs):
    return {rid: [c.token_ids for c in o.outputs] for rid, o in outs.items()}


def test_layered_outputs_equal_chunked(chunked, layered):
    ps, engine = prompts(), layered
    engine.step_records.clear()
    stages_before = engine.scheduler.num_prefill_stages_run
    chunked, layered = run_arrivals(chunked, ps), run_arrivals(engine, ps)
    assert tokens(layered) == tokens(chunked)
    for rid in ("3", "4"):  # log-probs and prompt log-probs from the last stage's programs
        a, b = layered[rid], chunked[rid]
        if rid == "3":
            assert [sorted(d) for d in a.outputs[0].logprobs] == [sorted(d) for d in b.outputs[0].logprobs]
        else:
            assert [None if d is None else sorted(d) for d in a.prompt_logprobs] == \
                [None if d is None else sorted(d) for d in b.prompt_logprobs]
            np.testing.assert_allclose(
                [d[t].logprob for d, t in zip(a.prompt_logprobs[1:], ps[4][1:])],
                [d[t].logprob for d, t in zip(b.prompt_logprobs[1:], ps[4][1:])], rtol=1e-4, atol=1e-5)
    stages = {r.prefill_stage for r in engine.step_records if r.prefill_stage}
    assert {(0, 4), (3, 4), (0, 2), (1, 2)} <= stages  # 150 tokens: chunks of 64 layered
    assert not any(g == 1 for _, g in stages)  # one-stage batches joined the decodes' batch
    assert engine.scheduler.num_prefill_stages_run - stages_before == sum(
        r.prefill_stage is not None for r in engine.step_records)
    assert f'jaxserve:layered_prefill_stages_total{{model_name="m"}} ' \
           f'{engine.scheduler.num_prefill_stages_run}.0' in prometheus_text(engine)
    # decodes ran in steps whose prefill batch was mid-flight
    assert any(r.num_decode and r.prefill_stage and r.prefill_stage[0] > 0 for r in engine.step_records)
    assert engine.scheduler.num_free_pages == engine.runner.num_pages - 1


def test_no_compiles_after_warmup_with_layered_prefill(layered, backend_compiles):
    """Every (prefill bucket, stage size) program and group cache write is compiled in warmup:
    a load over every stage count, chunked long prompts and aborts mid-batch compiles nothing
    (jax.monitoring backend-compile events)."""
    engine = layered
    assert engine.runner.layered.sizes == [1, 2]
    before, programs = backend_compiles(), engine.runner.num_compilations
    ps = prompts(1, lengths=(3, 17, 64, 200, 8, 40, 100, 2, 33))
    run_arrivals(engine, ps, every=2, abort=("6", 19))
    assert engine.runner.num_compilations == programs
    assert backend_compiles() == before, "a step compiled after warmup"
    assert engine.scheduler.num_free_pages == engine.runner.num_pages - 1


def spy_on_leaving(engine, monkeypatch=None):
    """[(request id, status)] of members that leave a prefill batch in flight, as they leave."""
    sched, left = engine.scheduler, []
    leave = sched._leave_prefill

    def spy(request):
        if sched._in_prefill(request):
            left.append((request.request_id, request.status.value))
        leave(request)

    if monkeypatch is None:
        sched._leave_prefill = spy
    else:
        monkeypatch.setattr(sched, "_leave_prefill", spy)
    return left


def run_half_prefilled_preemption(engine):
    """Three 8-token prompts decode 40 tokens each; a 120-token prompt (chunks of 64 and 56, 4
    stages each) arrives at step 9. With pages of 4 tokens and 44 usable pages, the decodes run
    out of pages while the prompt's second chunk is in flight: it is preempted mid-batch (the
    same schedule as tests/test_layered_scheduler.py's fake runner finds)."""
    long_prompt, shorts = prompts(2, lengths=(8, 8, 8, 120))[3], prompts(2, lengths=(8, 8, 8))
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(shorts):
        engine.add_request(str(i), p, sp)
    out, step = {}, 0
    while step <= 9 or engine.has_unfinished_requests():
        if step == 9:
            engine.add_request("long", long_prompt, sp)
        out.update({o.request_id: o for o in engine.step() if o.finished})
        step += 1
    return tokens(out)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempting_a_half_prefilled_request_keeps_outputs_and_pages(make_tiny_engine,
                                                                     four_layers, chunked, mode):
    """The half-prefilled prompt restarts its chunk (recompute: the whole prompt; swap: its
    first chunk comes back from host memory). Outputs equal chunked prefill's without
    preemption; every page, on device and on host, is free at the end."""
    reference = run_half_prefilled_preemption(chunked)
    engine = make_tiny_engine(four_layers, prefill_policy="layered", prefill_stages=STAGES,
                              page_size=4, num_kv_pages=45, preemption_mode=mode)
    left = spy_on_leaving(engine)
    assert run_half_prefilled_preemption(engine) == reference
    assert ("long", "running") in left, left  # preempted while its batch was in flight
    assert engine.scheduler.num_preemptions[mode] > 0
    assert engine.scheduler.num_free_pages == engine.runner.num_pages - 1
    tier = engine.scheduler.host_tier  # what host memory still holds: evicted prefix pages
    assert engine.scheduler.host_pool.num_used_pages == (0 if tier is None else tier.num_pages)


def test_aborting_mid_prefill_frees_its_pages(chunked, layered, monkeypatch):
    ps = prompts(3, lengths=(10, 60, 12))
    reference = tokens(run_arrivals(chunked, ps, every=2))
    engine = layered
    left = spy_on_leaving(engine, monkeypatch)
    out = tokens(run_arrivals(engine, ps, every=2, abort=("1", 3)))  # 60 tokens: 4 stages from step 2
    assert left == [("1", "running")]
    assert out == {rid: t for rid, t in reference.items() if rid != "1"}
    assert engine.scheduler.num_free_pages == engine.runner.num_pages - 1
