"""The engine end to end on a tiny random model behind the real tokenizer: preemption, compile
counts, seeded sampling, stop conditions, bad input."""

import numpy as np
import pytest

from jaxserve.engine import InvalidPromptError
from jaxserve.llm import LLM
from jaxserve.sampling import SamplingParams, SamplingParamsError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def run(engine, prompts, params):
    """Add every prompt, step to the end; {request id: RequestOutput}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def prompts(n, seed=0, lo=3, hi=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 40000, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def engine(make_tiny_engine):
    return make_tiny_engine()


def test_batch_equals_alone(engine):
    ps = prompts(6)
    together = run(engine, ps, GREEDY)
    for i, p in enumerate(ps):
        alone = run(engine, [p], GREEDY)["0"]
        assert alone.outputs[0].token_ids == together[str(i)].outputs[0].token_ids


def test_preemption_keeps_outputs(engine, make_tiny_engine):
    ps = prompts(8, seed=1, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    big = run(engine, ps, params)
    # 9 usable pages of 8 slots: one request (<= 100 tokens) fits alone, eight never fit together.
    small_engine = make_tiny_engine(num_kv_pages=14)
    small = run(small_engine, ps, params)
    assert small_engine.num_preemptions > 0
    for rid, out in big.items():
        assert small[rid].outputs[0].token_ids == out.outputs[0].token_ids
        assert small[rid].outputs[0].finish_reason == "length"
    assert small_engine.scheduler.num_free_pages == 13  # nothing leaked


def test_no_compiles_after_warmup(engine):
    before = engine.runner.num_compilations
    rng = np.random.default_rng(2)
    ps = prompts(20, seed=3, lo=1, hi=120)
    pending = list(enumerate(ps))
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.5:  # arrivals mid-run
            i, p = pending.pop()
            engine.add_request(f"r{i}", p, GREEDY if i % 3 else
                               SamplingParams(n=2, temperature=1.0, max_tokens=10))
        if step % 7 == 3 and engine.has_unfinished_requests():  # aborts
            engine.abort(next(iter(engine._groups)))
        if step == 5:
            engine.add_request("seeded", ps[0], seeded)
        engine.step()
        step += 1
    assert engine.runner.num_compilations == before
    assert engine.scheduler.num_free_pages == engine.runner.num_pages - 1


def test_seeded_sampling_is_batch_invariant(engine):
    p = prompts(1, seed=4)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = run(engine, [p], sp)["0"].outputs[0].token_ids
    crowd = run(engine, prompts(5, seed=5) + [p], [GREEDY] * 5 + [sp])["5"].outputs[0].token_ids
    assert alone == crowd
    other = run(engine, [p], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                            ignore_eos=True))["0"].outputs[0].token_ids
    assert other != alone
    n2 = run(engine, [p], SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=16,
                                         ignore_eos=True))["0"]
    assert len(n2.outputs) == 2 and n2.outputs[0].token_ids != n2.outputs[1].token_ids


def test_stop_conditions(engine):
    p = prompts(1, seed=6)[0]
    base = run(engine, [p], GREEDY)["0"].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    # stop string: cut before it (or after, if asked), stop_reason is the string
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
    cut = base.text.index(stop)
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                          ignore_eos=True))["0"].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (base.text[:cut], "stop", stop)
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=24, stop=stop, ignore_eos=True,
                                          include_stop_str_in_output=True))["0"].outputs[0]
    assert out.text == base.text[:cut + len(stop)]
    # stop token id: the output ends with it
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok],
                                          ignore_eos=True))["0"].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", tok)
    # min_tokens: the stop token cannot be sampled before min_tokens outputs
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[base.token_ids[0]],
                                          min_tokens=4, ignore_eos=True))["0"].outputs[0]
    assert len(out.token_ids) >= 4 and base.token_ids[0] not in out.token_ids[:3]
    # eos ends a request unless ignore_eos
    saved = engine.eos_token_ids
    try:
        engine.eos_token_ids = frozenset({tok})
        out = run(engine, [p], SamplingParams(temperature=0, max_tokens=24))["0"].outputs[0]
        assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
        assert out.stop_reason is None
        out = run(engine, [p], GREEDY)["0"].outputs[0]
        assert out.token_ids == base.token_ids
    finally:
        engine.eos_token_ids = saved
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))["0"].outputs[0]
    assert out.token_ids == base.token_ids[:3] and out.finish_reason == "length"


def test_logprobs_are_log_softmax(engine, tiny_model):
    from tests.paged_driver import PagedDriver, log_norm

    p = prompts(1, seed=7)[0]
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                          ignore_eos=True))["0"].outputs[0]
    drv = PagedDriver(tiny_model, page_size=8, num_pages=64)
    logits = drv.step({0: p + out.token_ids[:-1]})[0][len(p) - 1:]
    logp = logits - log_norm(logits)
    tol = 1e-5 * np.abs(logits).max()  # float32 rounding, relative to the logits' scale
    total = 0.0
    for pos, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok in lps and len(lps) in (3, 4)
        top = np.argsort(-logp[pos])[:3]
        assert [t for t, lp in lps.items() if lp.rank <= 3] == top.tolist()
        for t, lp in lps.items():
            assert abs(lp.logprob - logp[pos, t]) < tol
        total += lps[tok].logprob
    assert abs(out.cumulative_logprob - total) < 1e-3


def test_bad_input_leaves_no_state(engine):
    free = engine.scheduler.num_free_pages
    with pytest.raises(InvalidPromptError, match="exceeds the maximum context length of 256"):
        engine.add_request("long", list(range(1, 250)), SamplingParams(max_tokens=16))
    with pytest.raises(InvalidPromptError, match="outside the vocabulary"):
        engine.add_request("bad", [1, 2, 10**6], SamplingParams())
    with pytest.raises(InvalidPromptError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(SamplingParamsError, match="temperature"):
        engine.add_request("t", [1, 2], SamplingParams(temperature=-1))
    llm = LLM.from_engine(engine)
    with pytest.raises(InvalidPromptError):  # all or nothing: the good prompt is withdrawn too
        llm.generate([[5, 6, 7], list(range(1, 300))], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_free_pages == free


def test_llm_api(engine):
    llm = LLM.from_engine(engine)
    outs = llm.generate(["Hello there", [5, 6, 7], {"prompt": "Hi"}], GREEDY, use_tqdm=False)
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    chat = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False)[0]
    streamed = "".join(llm.stream([{"role": "user", "content": "Hi"}], GREEDY))
    assert streamed == chat.outputs[0].text
    gen = llm.stream("Hello", GREEDY)
    next(gen)
    gen.close()  # closing early aborts the request and frees its pages
    assert not engine.has_unfinished_requests()
    assert "LLM(Engine(LlamaForCausalLM" in repr(llm)


def test_prompt_logprobs_are_log_softmax(engine, tiny_model):
    from tests.paged_driver import PagedDriver, log_norm

    p = prompts(1, seed=8, lo=70, hi=90)[0]  # longer than one 64-token step: two chunks
    engine.add_request("warm", p, GREEDY)  # its pages are cached; prompt log-probs must not use them
    while engine.has_unfinished_requests():
        engine.step()
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2,
                                          ignore_eos=True))["0"]
    drv = PagedDriver(tiny_model, page_size=8, num_pages=64)
    logits = drv.step({0: p})[0]
    logp = logits - log_norm(logits)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    tol = 1e-5 * np.abs(logits).max()
    for pos in range(1, len(p)):
        lps = out.prompt_logprobs[pos]
        assert p[pos] in lps and len(lps) in (2, 3)
        assert [t for t, lp in lps.items() if lp.rank is not None and lp.rank <= 2] == \
            np.argsort(-logp[pos - 1])[:2].tolist()
        for t, lp in lps.items():
            assert abs(lp.logprob - logp[pos - 1, t]) < tol
