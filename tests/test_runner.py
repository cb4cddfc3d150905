"""The runner's compiled programs: the KV cache is never copied, buckets cover every batch, in
bfloat16 no program converts a cache- or weight-shaped array, and bf16 results do not depend on
how the layers are grouped into programs."""

import re

import jax
import numpy as np
import pytest

from jaxserve.runner import Bucket


@pytest.fixture(scope="module")
def runner(make_tiny_engine):
    return make_tiny_engine().runner


def cache_copies(hlo: str, cache_shape, dtype="f32") -> list[str]:
    shape = dtype + "[" + ",".join(map(str, cache_shape)) + "]"
    return [line for line in hlo.splitlines()
            if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} copy\(", line)]


def test_no_program_copies_the_cache(runner):
    cache_shape = runner.kv[0][0].shape
    for b in runner.all_buckets():
        ids, md, li = runner._dummy_batch(b)
        g = runner.layers_per_program
        lp, lkv = tuple(runner._layer_leaves[:g]), runner.kv[:g]
        hidden = jax.numpy.zeros((b.num_tokens, runner.config.hidden_size))
        layers_hlo = runner._layers.lower(lp, lkv, hidden, md, None, None, None, sparse=None, refresh=None).compile().as_text()
        assert not cache_copies(layers_hlo, cache_shape), b
        _, new_kv, _ = runner._forward(b, ids, md, li)
        write_hlo = runner._write.lower(runner.kv, None, new_kv, md.slot_mapping).compile().as_text()
        assert not cache_copies(write_hlo, cache_shape), b
        # the write is in place: its outputs alias the donated cache
        assert "input_output_alias" in write_hlo or "may-alias" in write_hlo


def test_sparse_programs_copy_no_cache_or_summaries(make_tiny_engine):
    """With sparse attention the decode layers read the summaries and the write scatters into
    them too: still no copy of the cache or of the summaries, and the write stays in place."""
    from jaxserve.config import SparseAttentionConfig

    runner = make_tiny_engine(sparse_attention=SparseAttentionConfig(min_context=0)).runner
    cache_shape, summary_shape = runner.kv[0][0].shape, runner.summaries[0].shape
    g = runner.layers_per_program
    for b in runner.all_buckets()[:2]:  # decode buckets
        ids, md, li = runner._dummy_batch(b)
        args = (tuple(runner._layer_leaves[:g]), runner.kv[:g],
                jax.numpy.zeros((b.num_tokens, runner.config.hidden_size)), md, runner.summaries[:g],
                runner._put(np.zeros(g, bool)), None)
        hlo = runner._layers.lower(*args, sparse=runner.sparse_attention, refresh=None).compile().as_text()
        assert not cache_copies(hlo, cache_shape) and not cache_copies(hlo, summary_shape), b
        _, new_kv, _ = runner._forward(b, ids, md, li)
        hlo = runner._write.lower(runner.kv, runner.summaries, new_kv, md.slot_mapping).compile().as_text()
        assert not cache_copies(hlo, cache_shape) and not cache_copies(hlo, summary_shape), b
        assert "input_output_alias" in hlo or "may-alias" in hlo


def test_buckets_cover_every_batch(runner):
    e = runner.engine
    for n_req in range(1, e.max_num_seqs + 1):
        assert runner.bucket_for(n_req, n_req, True) == Bucket(
            min(b for b in runner.decode_buckets if b >= n_req), min(b for b in runner.decode_buckets
                                                                      if b >= n_req), 1)
        for n_tok in range(n_req, e.max_num_batched_tokens + 1):
            b = runner.bucket_for(n_tok, n_req, False)
            assert b.num_tokens >= n_tok and b.num_requests >= n_req
            # room for any split into query blocks: sum(ceil(q / Qb)) <= R + T / Qb
            assert b.num_blocks >= n_req + n_tok // b.query_block
    assert runner.num_compilations > 0


def converts_of(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """HLO lines that convert an array of one of `shapes` (to any dtype)."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* convert\(", line)
        if m and tuple(int(d) for d in m.group(1).split(",") if d) in shapes:
            out.append(line.strip())
    return out


def test_bfloat16_programs_convert_no_cache_or_weight(make_tiny_engine, tiny_model):
    """XLA:CPU converts a whole bf16 buffer to float32 to gather from it, scatter into it, or
    multiply it without preferred_element_type: none of that may be left in any program."""
    from flax import nnx

    from jaxserve.models.llama import init_model
    model = init_model(tiny_model.config, 0, jax.numpy.bfloat16, scale=0.5)
    runner = make_tiny_engine(model=model).runner
    assert runner.kv[0][0].dtype == jax.numpy.uint16  # bf16 bits: CPU scatters them natively
    weights = {tuple(v.shape) for _, v in nnx.to_flat_state(nnx.state(runner.model))
               if len(v.shape) > 1}
    cache_shape = tuple(runner.kv[0][0].shape)
    forbidden = weights | {cache_shape}
    g = runner.layers_per_program
    for b in runner.all_buckets():
        ids, md, li = runner._dummy_batch(b)
        group, lkv = tuple(runner._layer_leaves[:g]), runner.kv[:g]
        el, hl = runner._embed_leaves, runner._head_leaves
        hidden = jax.numpy.zeros((b.num_tokens, runner.config.hidden_size), jax.numpy.bfloat16)
        programs = {
            "embed": runner._embed.lower(el, ids),
            "layers": runner._layers.lower(group, lkv, hidden, md, None, None, None, sparse=None, refresh=None),
            "head": runner._head.lower(hl, el, hidden, li, rows=b.num_requests),
        }
        logits, new_kv, _ = runner._forward(b, ids, md, li)
        programs["write"] = runner._write.lower(runner.kv, None, new_kv, md.slot_mapping)
        for i, (t, ban, num_logprobs) in enumerate(runner.batch.sampler_variants(li.shape[0])):
            t, ban = runner._put((t, ban))
            programs[f"sampler {i}"] = runner._sample.lower(
                logits, t, ban, all_greedy=t.all_greedy, needs_penalties=t.needs_penalties,
                num_logprobs=num_logprobs)
        for name, lowered in programs.items():
            hlo = lowered.compile().as_text()
            assert not converts_of(hlo, forbidden), (b, name, converts_of(hlo, forbidden)[:3])
            assert not cache_copies(hlo, cache_shape, "u16"), (b, name)


def test_head_computes_only_the_request_rows(runner):
    """The head runs on a step's request rows alone (XLA:CPU's 8-row dot of the tied head cost
    3x a 1-row one), the logits padded to the sampler's rows with zeros; a batch-1 decode step
    pads nothing (its sampler takes one row)."""
    from jaxserve.runner.buckets import Bucket

    assert runner.buckets.sampler_rows(1) == 1
    b = Bucket(2, 2, 1)
    rng = np.random.default_rng(0)
    hidden = jax.numpy.asarray(rng.standard_normal((2, runner.config.hidden_size)), jax.numpy.float32)
    li = np.zeros(runner.buckets.sampler_rows(2), np.int32)
    li[1] = 1
    assert len(li) == 8
    logits = np.asarray(runner.logits(b, hidden, li))
    assert logits.shape == (8, runner.config.vocab_size)
    assert np.all(logits[2:] == 0)
    model = runner.model
    want = model.head(hidden, np.arange(2, dtype=np.int32), model.embed)
    np.testing.assert_allclose(logits[:2], np.asarray(want), rtol=1e-5, atol=1e-5)
    # (before, the padding rows were the logits of token 0: computed, not zero)


def test_bfloat16_results_do_not_depend_on_the_layer_grouping(make_tiny_engine, tiny_model):
    """On CPU every bf16 op rounds (Programs.compiler_options): with XLA's excess precision on,
    a 4-layer bf16 model's log-probs differed between one layer a program and four (by
    0.01-0.05)."""
    from jaxserve.config import ModelConfig
    from jaxserve.models.llama import init_model
    from jaxserve.sampling import SamplingParams

    config = ModelConfig(**{**vars(tiny_model.config), "num_layers": 4})
    model = init_model(config, jax.random.PRNGKey(0), jax.numpy.bfloat16, scale=0.5)
    runs = []
    for group in (1, 4):
        engine = make_tiny_engine(model, layers_per_program=group)
        engine.add_request("a", list(range(100, 140)),
                           SamplingParams(temperature=0, max_tokens=4, logprobs=2))
        while engine.has_unfinished_requests():
            done = [o for o in engine.step() if o.finished]
            if done:
                out = done[0].outputs[0]
        runs.append([(t, {k: v.logprob for k, v in lp.items()})
                     for t, lp in zip(out.token_ids, out.logprobs)])
    assert runs[0] == runs[1]
