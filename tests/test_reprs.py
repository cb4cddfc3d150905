"""Notebook views: a RequestOutput shaded by token log-prob, the LLM's summary, the KV cache's
page tables; and the per-token times behind TBT. Tiny random model behind the real tokenizer."""

import html
import math
import re

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.reprs import token_shade


@pytest.fixture(scope="module")
def llm(make_tiny_engine):
    return LLM.from_engine(make_tiny_engine())


def _spans(h):
    """(title, background, text) of each token span."""
    return [(html.unescape(t), bg, html.unescape(x)) for t, bg, x in
            re.findall(r"<span title='([^']*)' style='background:([^']*)'>([^<]*)</span>", h)]


def test_output_html_shades_each_token_by_its_probability(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    out = llm.generate("Hello there", params, use_tqdm=False)[0]
    o = out.outputs[0]
    spans = _spans(out._repr_html_())
    assert len(spans) == len(o.token_ids) == 6
    assert "".join(text for _, _, text in spans) == o.text  # the token pieces make the text
    for (title, bg, _), token, position in zip(spans, o.token_ids, o.logprobs):
        lp = position[token].logprob
        assert bg == token_shade(lp)
        assert title.startswith(f"p={math.exp(lp):.3f}")
        assert title.count("\n#") == len(position) - 1  # the alternatives, by rank
    assert token_shade(0.0) == "rgba(255,127,14,0.00)" and token_shade(math.log(0.25)) == \
        "rgba(255,127,14,0.75)"


def test_output_html_without_logprobs_is_the_escaped_text(llm):
    out = llm.generate("a < b", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0]
    h = out._repr_html_()
    assert "a &lt; b" in h and html.escape(out.outputs[0].text) in h and "<span" not in h
    assert f"({len(out.prompt_token_ids)} prompt tokens, first token after" in h


def test_token_times_give_time_between_tokens(llm):
    out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=2),
                       use_tqdm=False)[0]
    m = out.metrics
    assert len(m.token_times) == 5  # the first completion's tokens only
    assert m.token_times[0] == m.first_token_time and m.token_times == sorted(m.token_times)
    assert m.time_between_tokens == [b - a for a, b in zip(m.token_times, m.token_times[1:])]


def test_llm_html_summarizes_model_mesh_and_cache(llm):
    h = llm._repr_html_()
    assert "LlamaForCausalLM: 2 layers, D=64, H=4, K=2, E=16, V=49152" in h
    assert "128 pages x 8 slots" in h and "tensor=1 on 1 x cpu" in h
    assert "0 running, 0 waiting" in h


def test_kv_state_shows_each_page_table_and_shared_prefix(llm):
    engine = llm.engine
    prompt = list(range(100, 120))  # 20 tokens: 2 full pages of 8, then 4 slots of a third
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", prompt, greedy)
    engine.step()  # a: prefilled; its 2 full pages enter the prefix cache
    engine.add_request("b", prompt + [7], greedy)
    engine.add_request("c", [5, 6, 7], greedy)
    engine.step()
    state = llm.kv_state()
    by_id = {r.request_id: r for r in state.requests}
    for rid in "abc":
        assert by_id[rid].page_ids == tuple(engine.scheduler.get_request(rid).page_ids)
    a, b = by_id["a"], by_id["b"]
    assert a.page_ids[:2] == b.page_ids[:2] and b.num_cached_tokens == 16  # prefix cache hit
    assert [state.ref_counts[p] for p in a.page_ids] == [2, 2, 1]
    assert state.num_shared_pages == 2
    assert state.num_used_pages == len(set(a.page_ids + b.page_ids + by_id["c"].page_ids))
    h = state._repr_html_()
    cells = re.findall(r"<span title='page (\d+): positions[^']*held by (\d+)'", h)
    assert cells[:3] == [(str(p), str(state.ref_counts[p])) for p in a.page_ids]
    pool = re.findall(r"<i style='background:([^']*)'(?: title='page (\d+): (\d+) holders')?></i>", h)
    assert len(pool) == state.num_pages  # the pool grid: page 0 black, held pages titled
    assert pool[0][0] == "#000" and [int(p) for _, p, _ in pool if p] == \
        [p for p in range(1, state.num_pages) if state.ref_counts[p]]
    assert f"a [running] {a.num_computed_tokens} tokens (0 from the prefix cache): pages " \
           f"{list(a.page_ids)}" in str(state)
    while engine.has_unfinished_requests():
        engine.step()
    done = llm.kv_state()
    assert done.requests == () and done.num_used_pages == 0


def test_kv_state_shows_host_pages_of_a_swapped_request():
    from jaxserve.kv_state import KVState, RequestPages

    state = KVState(4, 16, (0, 1, 0, 0), (RequestPages("a", "running", (1,), 10, 0),
                                          RequestPages("s", "swapped", (), 40, 0, (7, 8, 9))))
    assert "  s [swapped] 40 tokens (0 from the prefix cache): pages [], host pages [7, 8, 9]" \
        in str(state)
    assert re.findall(r"<span title='host page (\d+)'[^>]*>h\d+</span>", state._repr_html_()) == \
        ["7", "8", "9"]
