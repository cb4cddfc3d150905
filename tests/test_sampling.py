"""SamplingParams validation and the on-device sampler against numpy references.

Sampling tests draw many tokens in one call (one row per seed), so they are deterministic: the
statistical bounds are checked on fixed seeds and cannot flake.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.errors import JaxserveError
from jaxserve.sampler import apply_penalties, sample
from jaxserve.sampling import (
    MAX_LOGPROBS,
    SamplingParams,
    SamplingParamsError,
    SamplingTensors,
)

_sample = jax.jit(sample, static_argnames=("all_greedy", "needs_penalties", "num_logprobs"))


def run(logits, params, *, positions=None, outputs=None, prompts=None, pad_to=None, num_logprobs=0,
        rng=None):
    """Sample one token per row of `logits` ([R, V] numpy) for the R requests `params`."""
    num, vocab = len(params), logits.shape[1]
    pad_to = pad_to or num
    t = SamplingTensors.from_params(
        params, positions or [0] * num, outputs or [[]] * num, prompts or [[]] * num, vocab, pad_to,
        rng=rng)
    # top log-probs as a request asking for them would
    t = dataclasses.replace(t, want_logprobs=np.bool_(num_logprobs > 0 or t.want_logprobs))
    padded = np.zeros((pad_to, vocab), np.float32)
    padded[:num] = logits
    out = _sample(jnp.asarray(padded), t, all_greedy=t.all_greedy, needs_penalties=t.needs_penalties,
                  num_logprobs=num_logprobs)
    return jax.tree.map(lambda x: np.asarray(x)[:num], out)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_distribution(logits, p: SamplingParams):
    """vLLM's order: temperature, min_p, top_k, then top_p over the renormalized remainder."""
    z = logits.astype(np.float64) / p.temperature
    probs = softmax(z)
    keep = probs >= p.min_p * probs.max()
    if p.top_k > 0:
        keep &= z >= np.sort(z)[::-1][min(p.top_k, len(z)) - 1]
    q = np.where(keep, probs, 0.0)
    q /= q.sum()
    if p.top_p < 1:
        order = np.argsort(-q, kind="stable")
        exclusive = np.cumsum(q[order]) - q[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[exclusive < p.top_p]] = True
        q = np.where(nucleus, q, 0.0)
        q /= q.sum()
    return q


def draw_many(logits, params, num=4096):
    """Tokens sampled for `num` requests that share logits and params but not seeds."""
    batch = [dataclasses.replace(params, seed=s) for s in range(num)]
    return run(np.tile(logits, (num, 1)), batch).token_ids


def assert_follows(tokens, expected):
    """Support equals expected's support and frequencies are within 5 standard deviations."""
    counts = np.bincount(tokens, minlength=len(expected)) / len(tokens)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))
    sigma = np.sqrt(expected * (1 - expected) / len(tokens))
    assert np.all(np.abs(counts - expected) <= 5 * sigma + 1e-3), (counts, expected)


# ------------------------------------------------------------------------------------------------
# SamplingParams
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("n", 0, ">= 1"), ("n", 1.5, ">= 1"), ("n", True, ">= 1"),
    ("temperature", -1, ">= 0"), ("temperature", float("nan"), ">= 0"), ("temperature", "hot", ">= 0"),
    ("top_p", 0.0, r"in \(0, 1\]"), ("top_p", 1.5, r"in \(0, 1\]"),
    ("top_k", -2, "-1 or 0"), ("top_k", 2.0, "-1 or 0"),
    ("min_p", -0.1, r"in \[0, 1\]"), ("min_p", 1.1, r"in \[0, 1\]"),
    ("presence_penalty", 2.5, r"in \[-2, 2\]"), ("frequency_penalty", -3, r"in \[-2, 2\]"),
    ("repetition_penalty", 0, "> 0"), ("repetition_penalty", float("inf"), "> 0"),
    ("seed", 2**64, r"an integer in \[-2\*\*63, 2\*\*64\)"), ("seed", 1.0, "an integer"),
    ("stop", "", "non-empty"), ("stop", ["a", ""], "non-empty"), ("stop", [1], "non-empty"),
    ("stop_token_ids", [-1], ">= 0"), ("stop_token_ids", 5, "list of integers"),
    ("ignore_eos", 1, "true or false"), ("skip_special_tokens", None, "true or false"),
    ("include_stop_str_in_output", "yes", "true or false"),
    ("max_tokens", 0, ">= 1 or None"), ("min_tokens", -1, ">= 0"), ("min_tokens", 17, "<= max_tokens"),
    ("logprobs", MAX_LOGPROBS + 1, r"in \[0, 20\]"), ("prompt_logprobs", -1, r"in \[0, 20\]"),
])
def test_invalid_parameters_name_the_parameter(field, value, allowed):
    with pytest.raises(SamplingParamsError, match=rf"^{field} must be .*{allowed}.*got") as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, JaxserveError)


def test_message_example():
    with pytest.raises(SamplingParamsError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)


def test_normalization_and_repr():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.seed is None
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert repr(p) == "SamplingParams()"
    assert repr(SamplingParams(temperature=0.7, stop="x", max_tokens=5)) == \
        "SamplingParams(temperature=0.7, stop=['x'], max_tokens=5)"
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
    with pytest.raises(SamplingParamsError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)


def test_from_params_packs_small_arrays():
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5, top_p=0.9),
              SamplingParams(repetition_penalty=1.2, seed=7), SamplingParams(top_k=10**6)]
    t = SamplingTensors.from_params(params, [3, 0, 1, 2], [[1, 2, 3], [4], [5, 5], []],
                                    [[9] * 40, [8], [7, 6], [1]], vocab_size=100, pad_to=8)
    assert t.is_greedy.tolist() == [True, False, False, False, True, True, True, True]
    assert t.top_k.tolist() == [0, 5, 0, 0, 0, 0, 0, 0]  # top_k >= vocab is off
    assert (t.all_greedy, t.needs_penalties, bool(t.want_logprobs)) == (False, True, False)
    # Only the penalized row's tokens travel, padded with V to a power-of-two length.
    assert t.output_token_ids.shape == (8, 16) and t.prompt_token_ids.shape == (8, 16)
    assert t.output_token_ids[2, :3].tolist() == [5, 5, 100] and (t.output_token_ids[[0, 1, 3]] == 100).all()
    assert t.key_data[2].tolist() == list(np.asarray(jax.random.PRNGKey(7)))
    assert t.output_positions.tolist() == [3, 0, 1, 2, 0, 0, 0, 0]
    plain = SamplingTensors.from_params([SamplingParams(temperature=0)] * 2, [0, 0], [[1], [2]], [[3], [4]], 100, 4)
    assert plain.all_greedy and not plain.needs_penalties and plain.output_token_ids.shape == (4, 0)
    fixed = SamplingTensors.from_params(params, [3, 0, 1, 2], [[1, 2, 3], [4], [5, 5], []],
                                        [[9] * 40, [8], [7, 6], [1]], 100, 8, token_width=64)
    assert fixed.output_token_ids.shape == fixed.prompt_token_ids.shape == (8, 64)
    with pytest.raises(ValueError, match="token_width"):
        SamplingTensors.from_params(params, [0] * 4, [[]] * 4, [[9] * 40] * 4, 100, 8, token_width=32)
    with pytest.raises(ValueError, match="pad_to"):
        SamplingTensors.from_params(params, [0] * 4, [[]] * 4, [[]] * 4, 100, 2)
    with pytest.raises(ValueError, match="one entry per request"):
        SamplingTensors.from_params(params, [0] * 3, [[]] * 4, [[]] * 4, 100, 8)


# ------------------------------------------------------------------------------------------------
# The sampler
# ------------------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 1000)).astype(np.float32) * 4
    logits[2, 300:302] = 50.0  # a tie: the first index wins, as np.argmax
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0, top_p=0.1),
              SamplingParams(top_k=1, temperature=3.0), SamplingParams(temperature=1e-6), SamplingParams(temperature=0)]
    out = run(logits, params, pad_to=8)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    # Greedy rows inside a sampled batch are still argmax.
    mixed = run(logits, params[:5] + [SamplingParams(temperature=1.0, seed=1)])
    assert mixed.token_ids[:5].tolist() == logits[:5].argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [10, 600])
@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.5),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.7),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=1.5, top_k=6, top_p=0.8, min_p=0.05),
], ids=repr)
def test_distribution_matches_reference(params, vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal(vocab).astype(np.float32) * (1.0 if vocab == 10 else 3.0)
    if vocab == 600:  # put likely tokens in different 256-token blocks, and the last partial one
        logits[[5, 300, 599, 520]] += 6.0
    expected = reference_distribution(logits, params)
    tokens = draw_many(logits, params)
    assert_follows(tokens, expected)
    if params.top_k or params.top_p < 1 or params.min_p:
        assert (expected == 0).sum() > 0  # the filters did remove tokens


def test_top_p_keeps_nucleus_on_flat_distributions():
    # Many nearly equally likely tokens: the rejection rounds must still find the nucleus exactly.
    logits = np.zeros(300, np.float32)
    logits[:50] = 2.0 + np.linspace(0, 0.01, 50)[::-1]
    params = SamplingParams(top_p=0.5)
    expected = reference_distribution(logits, params)
    assert 30 < (expected > 0).sum() < 50
    tokens = draw_many(logits, params, num=2048)
    assert_follows(tokens, expected)


def test_top_p_and_top_k_keep_ties_at_the_cutoff():
    # Thresholds, not sort positions: tokens tied with the last kept one are all kept.
    logits = np.array([3.0, 1.0, 1.0, 1.0, 0.0, 0.0], np.float32)
    for params in (SamplingParams(top_k=2), SamplingParams(top_p=0.9)):
        tokens = draw_many(logits, params, num=1024)
        assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_key_is_fold_in_of_seed_and_position():
    """A request without filters draws u ~ U(fold_in(fold_in(PRNGKey(seed), position), 0)) and
    takes the inverse CDF of softmax(logits / temperature)."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 40)).astype(np.float32)
    seeds, positions = [0, 1, 12345, 2**32 - 1, 2**40 + 3], [0, 7, 3, 100, 1]
    params = [SamplingParams(temperature=0.8, seed=s) for s in seeds]
    out = run(logits, params, positions=positions)
    for row, (seed, position) in enumerate(zip(seeds, positions)):
        key = jax.random.wrap_key_data(jnp.array([seed >> 32, seed & 0xFFFFFFFF], jnp.uint32))
        if seed < 2**32:
            assert (jax.random.key_data(key) == jax.random.PRNGKey(seed)).all()
        u = float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, position), 0)))
        cdf = np.cumsum(softmax(logits[row].astype(np.float64) / 0.8))
        assert out.token_ids[row] == np.searchsorted(cdf, u * cdf[-1], side="right")


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=42),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=42),
    SamplingParams(temperature=1.2, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.5, seed=42),
], ids=repr)
def test_seeded_request_is_batch_invariant(params):
    rng = np.random.default_rng(2)
    vocab = 1000
    row_logits = rng.standard_normal((8, vocab)).astype(np.float32) * 2
    history, prompt = [1, 2, 3, 3], [4, 5]
    tokens_by_batch = []
    for batch_size, slot, pad_to in [(1, 0, 1), (5, 3, 8), (7, 6, 16)]:
        others = [SamplingParams(temperature=t, top_p=p) for t, p in zip(rng.uniform(0.1, 2, batch_size),
                                                                              rng.uniform(0.1, 1, batch_size))]
        tokens = []
        for position in range(8):
            batch = list(others)
            batch[slot] = params
            logits = rng.standard_normal((batch_size, vocab)).astype(np.float32) * 5
            logits[slot] = row_logits[position]
            outputs = [list(rng.integers(0, vocab, 5)) for _ in range(batch_size)]
            outputs[slot] = history
            prompts = [list(rng.integers(0, vocab, 5)) for _ in range(batch_size)]
            prompts[slot] = prompt
            positions = list(rng.integers(0, 50, batch_size))
            positions[slot] = position
            out = run(logits, batch, positions=positions, outputs=outputs, prompts=prompts, pad_to=pad_to)
            tokens.append(int(out.token_ids[slot]))
        tokens_by_batch.append(tokens)
    assert tokens_by_batch[0] == tokens_by_batch[1] == tokens_by_batch[2]
    # A different seed gives a different sequence.
    other = dataclasses.replace(params, seed=43)
    other_tokens = [int(run(row_logits[i:i + 1], [other], positions=[i], outputs=[history],
                            prompts=[prompt]).token_ids[0]) for i in range(8)]
    assert other_tokens != tokens_by_batch[0]


def test_unseeded_requests_use_the_given_rng():
    logits = np.zeros((64, 50), np.float32)
    params = [SamplingParams()] * 64
    a = run(logits, params, rng=np.random.default_rng(5)).token_ids
    b = run(logits, params, rng=np.random.default_rng(5)).token_ids
    c = run(logits, params).token_ids
    assert (a == b).all() and not (a == c).all() and len(set(a.tolist())) > 20


def reference_penalties(logits, output_ids, prompt_ids, p: SamplingParams):
    """vLLM's apply_penalties, in numpy."""
    vocab = logits.shape[-1]
    counts = np.bincount(np.asarray(output_ids, int), minlength=vocab).astype(np.float32)
    seen = (counts > 0) | np.isin(np.arange(vocab), prompt_ids)
    penalty = np.where(seen, p.repetition_penalty, 1.0).astype(np.float32)
    logits = np.where(logits > 0, logits / penalty, logits * penalty)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(3)
    vocab = 300
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(presence_penalty=0.7),
              SamplingParams(frequency_penalty=-0.4), SamplingParams(),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=1.5)]
    logits = rng.standard_normal((len(params), vocab)).astype(np.float32) * 3
    outputs = [list(rng.integers(0, 20, n)) for n in (0, 7, 30, 5, 40)]
    prompts = [list(rng.integers(10, 40, n)) for n in (25, 3, 0, 9, 17)]
    t = SamplingTensors.from_params(params, [len(o) for o in outputs], outputs, prompts, vocab, 8)
    padded = np.zeros((8, vocab), np.float32)
    padded[:5] = logits
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(padded), t))
    for i, p in enumerate(params):
        np.testing.assert_allclose(got[i], reference_penalties(logits[i], outputs[i], prompts[i], p),
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[5:], 0.0)
    # Greedy decoding follows the penalized logits; logprobs stay those of the raw logits.
    greedy = [dataclasses.replace(p, temperature=0, logprobs=0) for p in params]
    out = run(logits, greedy, outputs=outputs, prompts=prompts, pad_to=8)
    expected = [reference_penalties(logits[i], outputs[i], prompts[i], p).argmax() for i, p in enumerate(params)]
    assert out.token_ids.tolist() == expected
    raw = np.log(softmax(logits.astype(np.float64)))
    np.testing.assert_allclose(out.logprobs, raw[np.arange(5), expected], rtol=1e-5, atol=1e-5)
    # A step where no row asks for log-probs computes none (zeros), and samples the same.
    unasked = run(logits, [dataclasses.replace(p, logprobs=None) for p in greedy],
                  outputs=outputs, prompts=prompts, pad_to=8)
    assert unasked.token_ids.tolist() == expected
    np.testing.assert_array_equal(unasked.logprobs, 0.0)


@pytest.mark.parametrize("num_logprobs", [0, 1, 5])
def test_logprobs_top_logprobs_and_ranks(num_logprobs):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 500)).astype(np.float32) * 3
    params = [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(temperature=2.0, seed=2),
              SamplingParams(top_k=3, seed=3), SamplingParams(top_p=0.5, seed=4), SamplingParams(temperature=0)]
    params = [dataclasses.replace(p, logprobs=num_logprobs) for p in params]
    out = run(logits, params, num_logprobs=num_logprobs, pad_to=8)
    log_probs = np.log(softmax(logits.astype(np.float64)))
    rows = np.arange(6)
    np.testing.assert_allclose(out.logprobs, log_probs[rows, out.token_ids], rtol=1e-5, atol=1e-5)
    if num_logprobs == 0:
        assert out.top_logprob_ids is None and out.top_logprobs is None and out.ranks is None
        return
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :num_logprobs]
    assert out.top_logprob_ids.tolist() == order.tolist()
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(log_probs, order, 1), rtol=1e-5, atol=1e-5)
    expected_ranks = 1 + (logits > logits[rows, out.token_ids][:, None]).sum(-1)
    assert out.ranks.tolist() == expected_ranks.tolist()
    assert out.ranks[0] == out.ranks[5] == 1


def test_real_vocabulary_size():
    """B=64, V=49152 with every feature on: runs, and tokens stay inside each row's support."""
    rng = np.random.default_rng(5)
    vocab = 49152
    logits = rng.standard_normal((64, vocab)).astype(np.float32) * 4
    params = [SamplingParams(top_k=1 + i % 40, top_p=0.5 + (i % 5) / 10, min_p=0.01 * (i % 3),
                             presence_penalty=0.1 * (i % 2), seed=i) for i in range(64)]
    outputs = [list(rng.integers(0, vocab, 20)) for _ in range(64)]
    out = run(logits, params, outputs=outputs, num_logprobs=3)
    for i, p in enumerate(params):
        z = reference_penalties(logits[i], outputs[i], [], p)
        assert reference_distribution(z, p)[out.token_ids[i]] > 0
    assert math.isfinite(float(out.logprobs.sum()))


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_values_beyond_float32_are_refused(field):
    with pytest.raises(SamplingParamsError, match=rf"^{field} must be .*float32"):
        SamplingParams(**{field: 1e39})


def test_top_k_threshold_is_exact_for_every_k():
    """The k-th largest value per row, k runtime data: small k through lax.top_k, large k by
    bisection, ties and negative values included, k=0 off (-inf)."""
    from jaxserve.sampler import _top_k_threshold

    rng = np.random.default_rng(9)
    z = rng.standard_normal((6, 3000)).astype(np.float32)
    z[1, :500] = 0.25  # ties at the cutoff
    z[2] = -np.abs(z[2])  # all negative
    ks = np.array([0, 1, 64, 65, 1000, 2999], np.int32)
    got = np.asarray(jax.jit(_top_k_threshold)(jnp.asarray(z), jnp.asarray(ks)))
    for row, k in enumerate(ks):
        want = -np.inf if k == 0 else np.sort(z[row])[::-1][k - 1]
        assert got[row] == want, (row, k)
