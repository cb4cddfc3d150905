"""Sparse decode attention in the engine, on the tiny random model: a budget covering every
context gives exactly dense's tokens and log-probs; the summaries the cache write keeps equal
those of the cache after prefill chunks, decodes, prefix-cache hits and page reuse; nothing
compiles after warmup with sparse on; tensor parallel gives the single-device tokens; teacher
forcing scores the given tokens as sampling would."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxserve.config import SparseAttentionConfig
from jaxserve.errors import ConfigError
from jaxserve.kernels.sparse import ref_page_summaries
from jaxserve.sampling import SamplingParams

PROMPTS = [list(range(1000, 1000 + n)) for n in (150, 90, 40, 200)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
SPARSE = SparseAttentionConfig(budget_tokens=48, sink_tokens=8, window_tokens=16, min_context=64,
                               dense_layers=1)  # of the tiny model's two


def run(engine, prompts, params=GREEDY):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0]
    return [outs[str(i)] for i in range(len(prompts))]


class CompileCounter:
    """Backend compiles, counted with jax.monitoring while `counting` is on."""

    def __init__(self):
        self.count, self.counting = 0, False
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, event, duration, **kwargs):
        if self.counting and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


@pytest.fixture(scope="module")
def dense_outputs(make_tiny_engine):
    return run(make_tiny_engine(), PROMPTS)


def test_full_budget_equals_dense_exactly(make_tiny_engine, dense_outputs):
    full = SparseAttentionConfig(budget_fraction=1.0, min_context=0, sink_tokens=0)
    outs = run(make_tiny_engine(sparse_attention=full), PROMPTS)
    for o, d in zip(outs, dense_outputs):
        assert o.token_ids == d.token_ids
        assert [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)] == \
               [lp[t].logprob for lp, t in zip(d.logprobs, d.token_ids)]


def test_sparse_runs_without_compiles_and_keeps_summaries(make_tiny_engine, dense_outputs):
    counter = CompileCounter()
    engine = make_tiny_engine(sparse_attention=SPARSE)
    counter.counting = True
    # twice: the second run's prompts hit the prefix cache; pages are freed and reused
    plain = dataclasses.replace(GREEDY, logprobs=None)  # log-probs: a sampler variant to compile
    outs = run(engine, PROMPTS, plain) + run(engine, [p + [7, 8, 9] for p in PROMPTS], plain)
    counter.counting = False
    assert counter.count == 0, "a warmed-up engine compiled with sparse attention on"
    # sparse attention did leave pages out, and changed something, but not everything
    assert any(o.token_ids != d.token_ids for o, d in zip(outs, dense_outputs))
    assert sum(o.token_ids[0] == d.token_ids[0] for o, d in zip(outs, dense_outputs)) >= 3
    # running requests' pages: summaries equal those of the cache contents
    engine.add_request("live", PROMPTS[0] + [5] * 30, dataclasses.replace(GREEDY, max_tokens=40))
    for _ in range(12):
        engine.step()
    request = engine.scheduler.get_request("live")
    s = engine.config.page_size
    cached = request.num_computed_tokens
    lengths = np.zeros(engine.runner.num_pages, np.int64)
    for j, page in enumerate(request.page_ids):
        lengths[page] = max(0, min(s, cached - j * s))
    pages = [p for p in request.page_ids if lengths[p] > 0]
    for layer in range(len(engine.runner.kv)):
        want = np.asarray(ref_page_summaries(engine.runner.kv[layer][0], lengths))[pages]
        np.testing.assert_array_equal(np.asarray(engine.runner.summaries[layer])[pages], want)


def test_tensor_parallel_chooses_the_same_pages(make_tiny_engine, tiny_model, smol_tokenizer):
    from jaxserve.engine import Engine
    from jaxserve.parallel import make_mesh
    from tests.conftest import TINY_ENGINE

    one = run(make_tiny_engine(sparse_attention=SPARSE), PROMPTS[:2])
    config = dataclasses.replace(TINY_ENGINE, sparse_attention=SPARSE, tensor_parallel_size=2)
    two = run(Engine.from_components(config, tiny_model, smol_tokenizer, mesh=make_mesh(2)),
              PROMPTS[:2])
    assert [o.token_ids for o in one] == [o.token_ids for o in two]


def test_teacher_forcing_scores_like_sampling(make_tiny_engine, dense_outputs):
    engine = make_tiny_engine()
    forced = {str(i): d.token_ids for i, d in enumerate(dense_outputs[:2])}
    for rid, p in zip(forced, PROMPTS[:2]):
        engine.add_request(rid, p, dataclasses.replace(GREEDY, logprobs=None))
    done = {rid: 0 for rid in forced}
    ce = {rid: [] for rid in forced}
    while engine.has_unfinished_requests():
        nxt = {rid: forced[rid][done[rid]] for rid in forced if done[rid] < len(forced[rid])}
        for rid, loss in engine.step_forced(nxt).items():
            ce[rid].append(loss)
            done[rid] += 1
    for rid, d in zip(forced, dense_outputs):
        want = [-lp[t].logprob for lp, t in zip(d.logprobs, d.token_ids)]
        np.testing.assert_allclose(ce[rid], want, rtol=1e-4, atol=1e-4)


def test_switching_needs_summaries(make_tiny_engine):
    engine = make_tiny_engine()
    with pytest.raises(ConfigError, match="started with"):
        engine.set_sparse_attention(SPARSE)
    engine.set_sparse_attention(None)


REUSE = dataclasses.replace(SPARSE, reuse_steps=4)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_reused_full_budget_equals_dense_through_preemption(make_tiny_engine, dense_outputs,
                                                            preemption_mode):
    """Kept choices covering every page give dense's tokens and log-probs exactly, with the KV
    pages too few for all requests at once (they are preempted, then recomputed or swapped back
    in, under page tables other than the ones they chose with). A stale mask would miss pages:
    errors far above the 1e-6 that batch composition moves log-probs by."""
    full = SparseAttentionConfig(budget_fraction=1.0, min_context=0, sink_tokens=0, reuse_steps=3)
    engine = make_tiny_engine(sparse_attention=full, num_kv_pages=40,
                              preemption_mode=preemption_mode)
    outs = run(engine, PROMPTS)
    assert engine.scheduler.num_preemptions[preemption_mode] > 0
    for o, d in zip(outs, dense_outputs):  # log-probs move ~1e-6 with batch composition
        assert o.token_ids == d.token_ids
        np.testing.assert_allclose([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)],
                                   [lp[t].logprob for lp, t in zip(d.logprobs, d.token_ids)],
                                   atol=1e-4)


def test_reuse_compiles_nothing_and_keeps_masks_of_own_pages(make_tiny_engine, dense_outputs):
    counter = CompileCounter()
    engine = make_tiny_engine(sparse_attention=REUSE)
    counter.counting = True
    plain = dataclasses.replace(GREEDY, logprobs=None)
    outs = run(engine, PROMPTS, plain) + run(engine, [p + [7, 8, 9] for p in PROMPTS], plain)
    engine.add_request("live", PROMPTS[0] + [5] * 30, dataclasses.replace(GREEDY, max_tokens=40))
    refreshes = []
    for _ in range(14):
        engine.step()
        kept = engine.runner.selection_cache.kept.get("live")
        if kept is not None:
            refreshes.append(kept.position)
    counter.counting = False
    assert counter.count == 0, "a warmed-up engine compiled with sparse attention reusing choices"
    assert any(o.token_ids != d.token_ids for o, d in zip(outs, dense_outputs))
    # chosen once every 4 decode steps
    assert len(set(refreshes)) >= 3 and np.all(np.diff(sorted(set(refreshes))) == 4)
    # the live request's kept mask: its used page-table slots only, sink, window, under budget
    kept = engine.runner.selection_cache.kept["live"]
    s = engine.config.page_size
    num_pages = len(kept.pages)
    masks = [np.asarray(m)[kept.slot] for m in engine.runner.selections]
    assert masks[0][:num_pages].all()  # the dense first layer
    sink, window = -(-REUSE.sink_tokens // s), -(-REUSE.window_tokens // s)
    for m in masks[1:]:
        assert not m[num_pages:].any() and m[:sink].all() and m[num_pages - window:num_pages].all()
        assert m.sum() <= -(-REUSE.budget_tokens // s)
