"""The engine end to end on a tiny random model behind the real tokenizer: preemption, compile
counts, seeded sampling, stop conditions, bad input."""

import numpy as np
import pytest

import jax

from jaxserve.engine import EngineDeadError, InvalidPromptError, InvalidSamplingError
from jaxserve.llm import LLM
from jaxserve.sampling import SamplingParams, SamplingParamsError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def run(engine, prompts, params):
    """Add every prompt, step to the end; {request id: RequestOutput}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    return run_to_end(engine)


def run_to_end(engine) -> dict:
    """Step until nothing is left; {request id: final RequestOutput}."""
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


def mixed_params(rng, vocab: int, stop_ids: list[int]) -> SamplingParams:
    """One request's sampling options drawn from everything a client can ask for."""
    pick = lambda *xs: xs[int(rng.integers(len(xs)))]
    return SamplingParams(
        n=pick(1, 1, 2), temperature=pick(0.0, 0.7, 1.0, 1.5), top_k=pick(0, 1, 3, 50, 1000, vocab - 1),
        top_p=pick(1.0, 0.9, 0.5), min_p=pick(0.0, 0.05), seed=pick(None, int(rng.integers(1 << 30))),
        presence_penalty=pick(0.0, 0.0, 0.5), frequency_penalty=pick(0.0, 0.0, -0.3),
        repetition_penalty=pick(1.0, 1.0, 1.2), logprobs=pick(None, None, 0, 3, 20),
        prompt_logprobs=pick(None, None, None, 2), min_tokens=pick(0, 0, 4),
        stop_token_ids=pick(None, stop_ids), max_tokens=int(rng.integers(2, 14)))


def test_no_compiles_after_warmup(make_tiny_engine, backend_compiles):
    """A workload mixing every sampling option, arrivals, aborts and every bucket (decode and
    prefill, every sampler row count) compiles nothing after warmup: counted by jax.monitoring
    backend-compile events, which see every compile in the process, not only the runner's."""
    engine = make_tiny_engine(max_num_seqs=16, decode_buckets=(1, 4, 16), num_kv_pages=400)
    assert engine.runner.buckets.sampler == [1, 8, 16]
    before, programs = backend_compiles(), engine.runner.num_compilations
    rng = np.random.default_rng(2)
    ps = prompts(40, seed=3, lo=1, hi=120)
    pending = list(enumerate(ps))
    vocab = engine.runner.config.vocab_size
    step = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(min(len(pending), int(rng.integers(0, 6)))):  # bursts: every batch size
            i, p = pending.pop()
            engine.add_request(f"r{i}", p, GREEDY if i % 4 == 0 else
                               mixed_params(rng, vocab, [int(t) for t in rng.integers(0, vocab, 5)]))
        if step % 9 == 4 and engine.has_unfinished_requests():  # aborts
            engine.abort(next(iter(engine._groups)))
        engine.step()
        step += 1
    assert engine.runner.num_compilations == programs
    assert backend_compiles() == before, "a step compiled after warmup"
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
    assert len(out.token_ids) >= 4 and base.token_ids[0] not in out.token_ids[:4]
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


def test_stop_string_on_the_last_allowed_token_is_stop(engine):
    p = prompts(1, seed=6)[0]
    base = run(engine, [p], GREEDY)["0"].outputs[0]
    end = base.text[-3:]  # completed by the 24th (last allowed) token
    assert end not in base.text[:-3]
    out = run(engine, [p], SamplingParams(temperature=0, max_tokens=24, stop=[end],
                                          ignore_eos=True))["0"].outputs[0]
    assert len(out.token_ids) == 24
    assert (out.text, out.finish_reason, out.stop_reason) == (base.text[:-3], "stop", end)


def test_token_ids_checked_at_submission(engine):
    free = engine.scheduler.num_free_pages
    for bad in (2**31, 10**30, engine.model_config.vocab_size):
        with pytest.raises(InvalidSamplingError, match="stop_token_ids"):
            engine.add_request("x", [1, 2], SamplingParams(stop_token_ids=[bad], min_tokens=2))
    assert not engine.has_unfinished_requests() and engine.scheduler.num_free_pages == free


def test_one_request_failing_to_build_fails_alone(engine):
    """A request whose part of the step cannot be built (here: a ban id past int32 slipped in
    after submission) finishes with "error"; the requests sharing its steps finish as alone."""
    ps = prompts(3, seed=9)
    alone = [run(engine, [p], GREEDY)["0"].outputs[0] for p in ps]
    engine.add_request("bad", ps[0], SamplingParams(temperature=0, max_tokens=8, min_tokens=4,
                                                    stop_token_ids=[5]))
    engine.scheduler.get_request("bad").stop_token_ids = frozenset({2**40})
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, GREEDY)
    done = run_to_end(engine)
    assert done["bad"].outputs[0].finish_reason == "error"
    for i in range(3):
        assert done[str(i)].outputs[0].token_ids == alone[i].token_ids
        assert done[str(i)].outputs[0].finish_reason == "length"
    assert engine.num_failed_steps == 0
    assert engine.scheduler.page_manager.num_used_pages == 0
    engine.scheduler.page_manager.verify()


def test_failed_step_recovers_by_recompute(engine, monkeypatch):
    """A step that fails after consuming the donated KV cache: the cache is rebuilt, the device
    checked, and every request recomputed: outputs as if nothing happened."""
    ps = prompts(3, seed=10)
    alone = [run(engine, [p], GREEDY)["0"].outputs[0].token_ids for p in ps]
    real, calls = engine.runner.run, []

    def flaky(inputs):
        calls.append(1)
        if len(calls) == 6:  # mid-decode
            for x in jax.tree_util.tree_leaves(engine.runner.kv):
                x.delete()  # as a failed donated write leaves it
            raise RuntimeError("device hiccup")
        return real(inputs)

    monkeypatch.setattr(engine.runner, "run", flaky)
    failed_before = engine.num_failed_steps
    done = run(engine, ps, GREEDY)
    assert engine.num_failed_steps == failed_before + 1
    assert [done[str(i)].outputs[0].token_ids for i in range(3)] == alone
    assert all(done[str(i)].outputs[0].finish_reason == "length" for i in range(3))
    assert engine.scheduler.page_manager.num_used_pages == 0


def test_request_in_two_failed_steps_is_an_error(engine, monkeypatch):
    p = prompts(1, seed=11)[0]
    real = engine.runner.dispatch

    def poisoned(out, params_of):
        if any(s.request_id == "bad" for s in out.scheduled):
            raise RuntimeError("this request breaks every step")
        return real(out, params_of)

    monkeypatch.setattr(engine.runner, "dispatch", poisoned)
    engine.add_request("bad", p, GREEDY)
    done = run_to_end(engine)
    assert done["bad"].outputs[0].finish_reason == "error"
    assert engine.scheduler.page_manager.num_used_pages == 0 and engine.dead is None
    monkeypatch.undo()
    assert run(engine, [p], GREEDY)["0"].outputs[0].finish_reason == "length"


def test_unrecoverable_runner_kills_the_engine(make_tiny_engine, monkeypatch):
    engine = make_tiny_engine()

    def broken(*args):
        raise RuntimeError("device lost")

    engine.add_request("a", [1, 2, 3], GREEDY)
    monkeypatch.setattr(engine.runner, "_forward", broken)
    with pytest.raises(EngineDeadError, match="device lost"):
        engine.step()
    with pytest.raises(EngineDeadError):
        engine.add_request("b", [1, 2, 3], GREEDY)


def test_engine_seed_reproduces_unseeded_runs(make_tiny_engine, engine):
    sampled = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, n=2)
    ps = prompts(2, seed=12)
    first = run(make_tiny_engine(seed=3), ps, sampled)
    again = run(make_tiny_engine(seed=3), ps, sampled)
    other = run(make_tiny_engine(seed=4), ps, sampled)
    ids = lambda done: [c.token_ids for i in range(2) for c in done[str(i)].outputs]  # noqa: E731
    assert ids(first) == ids(again) and ids(first) != ids(other)
    assert ids(first)[0] != ids(first)[1]  # the n completions differ


def test_seeds_near_the_top_of_the_range_with_n(engine):
    p = prompts(1, seed=13)[0]
    top = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, n=3, seed=2**64 - 1)
    out = run(engine, [p], top)["0"].outputs
    assert len({tuple(c.token_ids) for c in out}) == 3
    one = run(engine, [p], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True,
                                          seed=2**64 - 1))["0"].outputs[0]
    assert one.token_ids == out[0].token_ids  # completion 0 keeps the request's seed


def test_raw_prompts_parse_special_tokens(engine):
    tok = engine.tokenizer
    text = "<|im_start|>user\nHi<|im_end|>"
    engine.add_request("s", text, SamplingParams(max_tokens=1))
    ids = engine._groups["s"].prompt_token_ids
    engine.abort("s")
    assert ids == tok.encode(text, add_special_tokens=True, parse_special=True)
    assert tok.encode("<|im_start|>", parse_special=True) == [tok.encode_chat(
        [{"role": "user", "content": "x"}])[0]]


def test_logprob_texts_concatenate_to_the_text_on_sentencepiece():
    """A SentencePiece vocabulary (leading "▁" spaces, byte fallback): the chosen tokens'
    log-prob texts concatenate to the output text, and echoed prompt tokens to the prompt."""
    import dataclasses

    import jax.numpy as jnp

    from jaxserve.config import ModelConfig
    from jaxserve.engine import Engine
    from jaxserve.models.llama import init_model
    from jaxserve.tokenizer import Tokenizer
    from tests.conftest import TINY, TINY_ENGINE
    from tests.test_tokenizer import tiny_sentencepiece_meta

    tok = Tokenizer.from_gguf_metadata(tiny_sentencepiece_meta())
    config = ModelConfig.from_hf({**TINY, "vocab_size": tok.vocab_size})
    model = init_model(config, jax.random.PRNGKey(1), jnp.float32, scale=0.5)
    engine = Engine.from_components(dataclasses.replace(
        TINY_ENGINE, decode_buckets=(1, 2), max_num_seqs=2), model, tok)
    prompt = "hello world hey ü"
    for seed in range(3):
        done = run(engine, [prompt], SamplingParams(temperature=1.0, seed=seed, max_tokens=24,
                                                    logprobs=2, prompt_logprobs=1,
                                                    ignore_eos=True))["0"]
        out = done.outputs[0]
        chosen = [lps[t].decoded_token for t, lps in zip(out.token_ids, out.logprobs)]
        assert "".join(chosen) == out.text
        ids = done.prompt_token_ids
        texts = [tok.decode(ids[:1], skip_special_tokens=False)] + [
            lps[t].decoded_token for t, lps in zip(ids[1:], done.prompt_logprobs[1:])]
        assert "".join(texts) == tok.decode(ids, skip_special_tokens=False)
    assert any(t.startswith(" ") for t in texts)  # "▁world" keeps its space


def test_a_step_budget_above_max_model_len(make_tiny_engine, engine):
    """Token buckets up to max_num_batched_tokens (several requests' prompts) above what one
    request may hold: warmup's dummy batches must fit one request's page table."""
    small = make_tiny_engine(max_model_len=64, max_num_batched_tokens=256, page_size=16,
                             num_kv_pages=64)
    ps = prompts(5, seed=13, lo=40, hi=58)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got, want = run(small, ps, params), run(engine, ps, params)
    assert {r: o.outputs[0].token_ids for r, o in got.items()} == \
        {r: o.outputs[0].token_ids for r, o in want.items()}
