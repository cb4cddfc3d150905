"""jaxserve.eval on the tiny random model: teacher-forced perplexity through decode steps equals
the one from the prompt log-probs of a prefill; passkey prompts are built as described; the
agreement measure by hand."""

import math

import numpy as np

from jaxserve import eval as ev
from jaxserve.sampling import SamplingParams


def test_forced_perplexity_equals_prefill_logprobs(make_tiny_engine):
    engine = make_tiny_engine()
    ids = ev.haystack_ids(engine.tokenizer, 2 * (40 + 12))
    ppl = ev.perplexity(engine, ids, window=40, forced=12, num_windows=2)
    # the same tokens scored by one prefill each, with prompt log-probs
    losses = []
    for w in range(2):
        text = list(ids[w * 52:(w + 1) * 52])
        engine.add_request(f"p{w}", text, SamplingParams(max_tokens=1, prompt_logprobs=0))
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    lps = o.prompt_logprobs
        losses += [-lps[i][text[i]].logprob for i in range(40, 52)]
    assert math.isclose(ppl, math.exp(np.mean(losses)), rel_tol=1e-4)


def test_passkey_prompt(smol_tokenizer):
    tok = smol_tokenizer
    hay = ev.haystack_ids(tok, 3000)
    for length, depth in [(1024, 0.25), (2048, 0.75), (1500, 0.0)]:
        ids = ev.passkey_prompt(tok, hay, length, depth, 68417)
        text = tok.decode(ids)
        assert len(ids) == length
        assert text.endswith(ev.PASSKEY_QUESTION)
        assert text.count("The secret pass key is 68417. Remember it.") == 1
        at = text.index("\nThe secret pass key is 68417")
        assert abs(at / len(text) - depth) < 0.1


def test_agreement_by_hand():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    other = [[1, 2, 9, 4], [5, 6, 7, 8]]
    assert ev.agreement(ref, other) == (7 / 8, 6 / 8)
