"""jaxserve.viz draws what the records and outputs say (read back from the axes after
rendering to PNG with Agg), and models.probe's attention matches the engine's numbers."""

import io
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from jaxserve import LLM, SamplingParams, viz  # noqa: E402
from jaxserve.models.probe import dense_forward  # noqa: E402
from jaxserve.outputs import RequestMetrics  # noqa: E402
from jaxserve.records import StepRecord  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # what Jupyter shows, without pyplot
    return buf.getvalue()


def _records():
    rows = [  # decode, prefill tokens, stage, running, waiting, swapped, dev, host, preempted, out, in
        (0, 32, None, 1, 2, 0, 2, 0, (), 0, 0),
        (1, 16, (0, 3), 2, 1, 0, 4, 0, (), 0, 0),
        (2, 16, (1, 3), 2, 1, 0, 4, 0, ("r2",), 3, 0),
        (3, 0, None, 2, 1, 1, 1, 3, (), 0, 0),
        (2, 0, None, 3, 0, 0, 5, 0, (), 0, 3),
    ]
    return [StepRecord(i, 10.0 + i, 0.01 * (i + 1), d, int(p > 0), d, p, st, run, wait, sw, dev,
                       host, pre, out, back)
            for i, (d, p, st, run, wait, sw, dev, host, pre, out, back) in enumerate(rows)]


def test_timeline_panels_hold_the_records():
    recs = _records()
    fig = viz.timeline(recs, title="test")
    _png(fig)
    batch, reqs, pages, times = fig.axes
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in batch.containers}
    assert bars["decode tokens"] == [0, 1, 2, 3, 2]
    assert bars["prefill tokens"] == [32, 0, 0, 0, 0]  # layered stages are drawn apart, hatched
    # a stage of 3 is worth a third of its 16 tokens through every layer
    assert bars["layered prefill stage (tokens / stages)"] == pytest.approx([0, 16 / 3, 16 / 3, 0, 0])
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in reqs.lines}
    assert lines["running"] == [1, 2, 2, 2, 3] and lines["swapped"] == [0, 0, 0, 1, 0]
    (marks,) = reqs.collections  # preemptions: one marker at step 2
    assert marks.get_offsets().tolist() == [[2, 1]]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in pages.lines}
    assert lines["on device"] == [2, 4, 4, 1, 5] and lines["in host memory"] == [0, 0, 0, 3, 0]
    swaps = {c.get_label(): [p.get_height() for p in c.patches] for c in pages.containers}
    assert swaps["swapped out"] == [0, 0, 3, 0, 0] and swaps["swapped in (down)"] == [0, 0, 0, 0, -3]
    assert [round(p.get_height(), 6) for p in times.patches] == [10, 20, 30, 40, 50]
    with pytest.raises(ValueError, match="record_steps=True"):
        viz.timeline([])


class _Out:  # what latency() reads of a RequestOutput
    def __init__(self, arrival, times):
        self.metrics = RequestMetrics(arrival, first_token_time=times[0], token_times=list(times))


def test_latency_draws_ttft_and_tbt_distributions():
    a = [_Out(0.0, [0.5, 0.6, 0.8]), _Out(1.0, [1.1, 1.2])]
    b = [_Out(0.0, [0.2, 0.25])]
    fig = viz.latency({"a": a, "b": b})
    _png(fig)
    ttft, tbt = fig.axes
    (la, lb) = ttft.lines
    assert np.allclose(la.get_xdata(), [100, 500]) and np.allclose(la.get_ydata(), [0.5, 1.0])
    assert la.get_label() == "a (p50 300 ms)" and np.allclose(lb.get_xdata(), [200])
    assert np.allclose(tbt.lines[0].get_xdata(), [100, 100, 200])  # a's gaps, sorted
    assert np.allclose(tbt.lines[1].get_xdata(), [50])


def test_attention_heatmap_shows_each_head():
    w = np.tril(np.ones((3, 4, 4)))
    w /= w.sum(-1, keepdims=True)
    fig = viz.attention_heatmap(w, ["a", " b", "\n", "c"], heads=[0, 2])
    _png(fig)
    assert [ax.get_title() for ax in fig.axes] == ["head 0", "head 2"]
    assert np.allclose(fig.axes[1].images[0].get_array(), w[2])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", " b", "\\n", "c"]
    with pytest.raises(ValueError, match="T = 2 tokens"):
        viz.attention_heatmap(w, ["a", "b"])


def test_dense_forward_matches_engine_prompt_logprobs(make_tiny_engine):
    """The probe's logits give the engine's prompt log-probs; its weights are causal
    distributions."""
    llm = LLM.from_engine(make_tiny_engine())
    ids = [101, 2042, 339, 17, 5000, 44, 9]
    out = llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logits, attn = dense_forward(llm.model, ids)
    assert logits.shape == (7, 49152) and attn.shape == (2, 4, 7, 7)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for i in range(1, len(ids)):
        engine_lp = out.prompt_logprobs[i][ids[i]].logprob
        assert math.isclose(logp[i - 1, ids[i]], engine_lp, abs_tol=2e-4), i
    assert np.allclose(attn.sum(-1), 1, atol=1e-5) and np.all(np.triu(attn, 1) == 0)


def test_logprobs_bars_per_position():
    from jaxserve.outputs import CompletionOutput, Logprob

    positions = [{5: Logprob(math.log(0.7), 1, " Paris"), 6: Logprob(math.log(0.2), 2, " Lyon")},
                 {7: Logprob(math.log(0.5), 1, "."), 8: Logprob(math.log(0.4), 2, "\n")}]
    done = CompletionOutput(0, " Paris\n", [5, 8], None, positions)
    fig = viz.logprobs(done)
    _png(fig)
    first, second = fig.axes
    assert [round(p.get_width(), 6) for p in first.patches] == [0.7, 0.2]
    assert [t.get_text() for t in second.get_yticklabels()] == [".", "\\n"]
    assert second.get_title() == "1: '\\n'"  # the sampled token, rank 2 here
    assert second.patches[1].get_facecolor() != second.patches[0].get_facecolor()  # highlighted
    with pytest.raises(ValueError, match="logprobs=k"):
        viz.logprobs(CompletionOutput(0, "x", [1], None, None))


def test_array_sharding_draws_each_devices_block():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    x = jax.device_put(np.zeros((64, 12, 5), np.float32), NamedSharding(mesh, P(None, "tensor")))
    fig = viz.array_sharding(x, names=("D", "K", "C"))
    _png(fig)
    ax = fig.axes[0]
    assert sorted((p.get_x(), p.get_width(), p.get_height()) for p in ax.patches) == \
        [(0, 3, 64), (3, 3, 64), (6, 3, 64), (9, 3, 64)]  # K split in 4, replicated over "data"
    assert sorted(t.get_text() for t in ax.texts) == ["dev 0,4", "dev 1,5", "dev 2,6", "dev 3,7"]
    assert ax.get_xlabel() == "K (12)" and ax.get_ylabel() == "D (64)"


def test_sparse_selection_is_the_engines_choice_from_the_keys_before(tiny_model):
    """Pages chosen per decode position: sink and window always, the budget's count, nothing
    past the position, and the voted pages are those a numpy Quest bound + vote ranks best."""
    from jaxserve.config import SparseAttentionConfig
    from jaxserve.models.probe import _layers, sparse_selection

    rng = np.random.default_rng(0)
    ids = rng.integers(100, 20000, size=200).tolist()
    config = SparseAttentionConfig(budget_tokens=64, sink_tokens=16, window_tokens=16, min_context=0)
    positions = [100, 150, 199]
    chosen = sparse_selection(tiny_model, ids, config, layer=1, positions=positions, page_size=16)
    assert chosen.shape == (3, 13)
    q, k = [(q, k) for q, k, _, _ in _layers(tiny_model, np.asarray(ids))][1]
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)  # [T, H, E], [T, K, E]
    for row, p in zip(chosen, positions):
        last = p // 16  # the page of the token being decoded
        assert row[0] and row[last] and not row[last + 1:].any() and row.sum() == 4
        # oracle: per head the Quest bound of each page from the keys before p (the current
        # page holds a few), a softmax over the pages, summed over the heads
        qs = q[p].reshape(2, 2, 16)  # [K, G, E]
        pages = [k[pg * 16:min((pg + 1) * 16, p)] for pg in range(last + 1)]  # [<=S, K, E] each
        bounds = np.stack([np.maximum(qs * keys.min(0)[:, None], qs * keys.max(0)[:, None]).sum(-1)
                           for keys in pages], axis=-1) * 16 ** -0.5  # [K, G, pages]
        soft = np.exp(bounds - bounds.max(-1, keepdims=True))
        votes = (soft / soft.sum(-1, keepdims=True)).sum((0, 1))
        best = 1 + np.argsort(-votes[1:last])[:2]  # two voted pages besides sink 0 and window `last`
        assert set(np.flatnonzero(row)) == {0, last, *best.tolist()}


def test_page_selection_draws_read_skipped_and_unwritten_pages():
    chosen = np.array([[1, 0, 1, 0], [1, 1, 0, 1]], bool)  # 2 positions over 4 pages
    fig = viz.page_selection(chosen, [40, 50], page_size=16)
    _png(fig)
    image = fig.axes[0].images[0].get_array()
    # rows are pages; at position 40 page 3 is not written yet, at 50 (page 3) it is, and read
    assert image.tolist() == [[2, 2], [1, 2], [2, 1], [0, 2]]
    assert fig.axes[0].get_title() == "pages read: 71% of those held"  # 5 of 7
    with pytest.raises(ValueError, match="N = 3 positions"):
        viz.page_selection(chosen, [1, 2, 3])
