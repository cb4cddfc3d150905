"""Tensor parallelism on 8 CPU devices (tests/conftest.py sets XLA_FLAGS): sharded engines
against the one-device engine, token for token and logit for logit, and the layout each array
actually has on the mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine
from jaxserve.models.llama import init_model
from jaxserve.parallel import ShardingError, describe_sharding, make_mesh
from jaxserve.sampling import SamplingParams
from tests.conftest import TINY

# Two shape buckets (decode 4, prefill 16), so that each of the 12 engines compiles in seconds.
ENGINE = EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16,
                      decode_buckets=(4,), num_kv_pages=64, page_size=8)
PROMPTS = ["Hello there", "The sea is", list(range(100, 141))]  # the last one: three prefill chunks


def tiny(num_kv_heads: int):
    config = ModelConfig.from_hf(dict(TINY, num_attention_heads=8, num_key_value_heads=num_kv_heads))
    return init_model(config, jax.random.PRNGKey(num_kv_heads), jnp.float32, scale=0.5)


@pytest.fixture(scope="module")
def engines(smol_tokenizer):
    """(kv heads, tp) -> engine over the tiny 8-head model with that many KV heads, built once."""
    built = {}

    def get(num_kv_heads: int, tp: int) -> Engine:
        if (num_kv_heads, tp) not in built:
            config = dataclasses.replace(ENGINE, tensor_parallel_size=tp)
            built[num_kv_heads, tp] = Engine.from_components(config, tiny(num_kv_heads),
                                                             smol_tokenizer)
        return built[num_kv_heads, tp]

    return get


def generate(engine: Engine, prompts, params: SamplingParams) -> dict:
    outs = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    return {rid: outs[rid] for rid in sorted(outs)}


def batch_logits(engine: Engine) -> np.ndarray:
    """Logits [R, V] of one ragged prefill batch (4 requests of 1, 3, 5 and 7 tokens)."""
    runner = engine.runner
    lens = [1, 3, 5, 7]
    b = runner.bucket_for(sum(lens), len(lens), False)
    md = runner._metadata(b, lens, lens, [[1 + 3 * i, 2 + 3 * i, 3 + 3 * i] for i in range(4)])
    ids = np.zeros(b.num_tokens, np.int32)
    ids[:sum(lens)] = np.arange(7, 7 + 97 * sum(lens), 97)
    li = np.zeros(b.num_requests, np.int32)
    li[:4] = np.cumsum(lens) - 1
    logits, _, _ = runner._forward(b, *runner._put((ids, md, li)))
    return np.asarray(logits)[:4]


def shard_pointers(x: jax.Array) -> list[int]:
    return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]


@pytest.mark.parametrize("num_kv_heads", [8, 4, 2])
def test_tensor_parallel_equals_one_device(engines, num_kv_heads):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True,
                             logprobs=2)
    ref = engines(num_kv_heads, 1)
    ref_greedy, ref_sampled = generate(ref, PROMPTS, greedy), generate(ref, PROMPTS[:2], sampled)
    ref_logits = batch_logits(ref)
    assert len({tuple(o.token_ids) for o in ref_greedy.values()}) == 3  # the model is not trivial
    for tp in (2, 4, 8):
        engine = engines(num_kv_heads, tp)
        compiled = engine.runner.num_compilations
        pointers = shard_pointers(engine.runner.kv[0][0])
        out = generate(engine, PROMPTS, greedy)
        assert {r: o.token_ids for r, o in out.items()} == {
            r: o.token_ids for r, o in ref_greedy.items()}, tp
        assert engine.runner.num_compilations == compiled, "a warmed-up greedy step compiled"
        # The donated cache was updated in place, shard by shard, and is still split on K.
        assert shard_pointers(engine.runner.kv[0][0]) == pointers
        assert tuple(engine.runner.kv[0][0].sharding.spec) == (None, None, "tensor", None)
        # No weight is gathered in the layers (only [T, D] all-reduces), and greedy sampling on
        # vocab-split logits gathers nothing but [R] values.
        for key, exe in engine.runner._compiled.items():
            if key[0] == "layers" or key[0] == "sampler" and key[-3:] == (True, False, 0):
                assert "all-gather" not in exe.as_text(), key
        np.testing.assert_allclose(batch_logits(engine), ref_logits, rtol=1e-4, atol=1e-4)
        # Sampling variants that gather the logits (top_p, top log-probs) agree as well.
        out = generate(engine, PROMPTS[:2], sampled)
        for rid, o in out.items():
            assert o.token_ids == ref_sampled[rid].token_ids, (tp, rid)
            for mine, theirs in zip(o.logprobs, ref_sampled[rid].logprobs):
                assert mine.keys() == theirs.keys()
                assert all(abs(mine[t].logprob - theirs[t].logprob) < 1e-4 for t in mine)


@pytest.mark.parametrize("num_kv_heads, tp", [(8, 8), (2, 4)])
def test_arrays_carry_the_expected_sharding(engines, num_kv_heads, tp):
    engine = engines(num_kv_heads, tp)
    c = engine.model_config
    d, f, h, e, v = c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim, c.vocab_size
    k = max(num_kv_heads, tp)  # KV heads on the mesh: 2 heads at tp 4 become 4 virtual heads
    g = h // k
    assert engine.runner.config.num_kv_heads == k
    t = "tensor"
    expected = {  # state path (layers: the rest of it): (global shape, spec, per-device shard)
        "embed/embedding": ((v, d), (t, None), (v // tp, d)),
        "head/norm/weight": ((d,), (None,), (d,)),
        "attn_norm/weight": ((d,), (None,), (d,)),
        "attn/qkv/kernel": ((d, k, g + 2, e), (None, t, None, None), (d, k // tp, g + 2, e)),
        "attn/o/kernel": ((h, e, d), (t, None, None), (h // tp, e, d)),
        "mlp_norm/weight": ((d,), (None,), (d,)),
        "mlp/gate_up/kernel": ((d, 2, f), (None, None, t), (d, 2, f // tp)),
        "mlp/down/kernel": ((f, d), (t, None), (f // tp, d)),
    }
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(engine.model))}
    arrays = {"/".join(p): x for p, x in flat.items() if p[0] != "layers"}
    assert arrays.keys() == {"embed/embedding", "head/norm/weight"}  # tied: no lm_head
    for i in range(engine.model.config.num_layers):
        layer = {"/".join(p[2:]): x for p, x in flat.items() if p[:2] == ("layers", i)}
        assert layer.keys() == {n for n in expected if n not in arrays}
        for name, x in {**arrays, **layer}.items():
            shape, spec, shard = expected[name]
            assert x.shape == shape, name
            assert tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)) == spec, name
            assert {s.data.shape for s in x.addressable_shards} == {shard}, name
            assert len(x.addressable_shards) == tp
    num_pages, page = engine.runner.num_pages, engine.config.page_size
    for kc, vc in engine.runner.kv:
        for x in (kc, vc):
            assert x.shape == (num_pages, page, k, e)
            assert tuple(x.sharding.spec) == (None, None, t, None)
            assert {s.data.shape for s in x.addressable_shards} == {(num_pages, page, k // tp, e)}
    table = describe_sharding(engine)
    assert f"({v // tp}, {d})" in table and f"({num_pages}, {page}, {k // tp}, {e})" in table


def test_query_heads_that_do_not_divide_are_refused(smol_tokenizer):
    with pytest.raises(ShardingError, match=r"does not divide the model's 8 query heads; "
                                            r"sizes that work: \[1, 2, 4, 8\]"):
        Engine.from_components(dataclasses.replace(ENGINE, tensor_parallel_size=3), tiny(2),
                               smol_tokenizer)
    with pytest.raises(ShardingError, match="needs that many devices; 8 are visible"):
        make_mesh(16)


@pytest.mark.slow
def test_default_model_tp3_equals_tp1(smol_checkpoint, smol_tokenizer):
    """SmolLM2-135M: 9 query heads, 3 KV heads. tp 3 splits both; tp 2 divides neither."""
    config = EngineConfig(max_model_len=256, max_num_seqs=2, max_num_batched_tokens=16,
                          decode_buckets=(2,), num_kv_pages=40, page_size=16)
    with pytest.raises(ShardingError, match=r"9 query heads; sizes that work: \[1, 3\]"):
        Engine.from_components(dataclasses.replace(config, tensor_parallel_size=2),
                               smol_checkpoint.model, smol_tokenizer)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}]]
    prompts = [smol_tokenizer.encode_chat(c, add_generation_prompt=True) for c in chats]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    outs = []
    for tp in (1, 3):
        engine = Engine.from_components(dataclasses.replace(config, tensor_parallel_size=tp),
                                        smol_checkpoint.model, smol_tokenizer)
        assert engine.runner.kv[0][0].addressable_shards[0].data.shape[2] == 3 // tp
        outs.append({r: o.token_ids for r, o in generate(engine, prompts, greedy).items()})
        del engine
    assert outs[1] == outs[0]
    assert "Paris" in smol_tokenizer.decode(outs[0]["0"])


def test_vocab_that_does_not_divide_and_prompt_logprobs(smol_tokenizer):
    """A vocabulary of 49155 (odd) at tp 2 stays whole on every device (embedding and head
    replicated); greedy outputs, logits and prompt log-probs equal one device's."""
    config = ModelConfig.from_hf(dict(TINY, vocab_size=49155, num_attention_heads=8,
                                      num_key_value_heads=2))
    model = init_model(config, jax.random.PRNGKey(7), jnp.float32, scale=0.5)
    one, two = (Engine.from_components(dataclasses.replace(ENGINE, tensor_parallel_size=tp), model,
                                       smol_tokenizer) for tp in (1, 2))
    assert two.model.embed.embedding.sharding.spec == jax.sharding.PartitionSpec(None, None)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=3)

    def run(engine):
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, params)
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
        return outs

    a, b = run(one), run(two)
    for rid in a:
        assert a[rid].outputs[0].token_ids == b[rid].outputs[0].token_ids
        pa, pb = a[rid].prompt_logprobs, b[rid].prompt_logprobs
        assert len(pa) == len(pb) == len(a[rid].prompt_token_ids) and pa[0] is pb[0] is None
        for x, y in zip(pa[1:], pb[1:]):
            assert x.keys() == y.keys()  # the same top-3 and prompt token at each position
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 and x[t].rank == y[t].rank for t in x)
    np.testing.assert_allclose(batch_logits(two), batch_logits(one), atol=1e-4, rtol=1e-4)


def test_a_mesh_the_model_cannot_use_is_refused_before_its_weights_are_read(default_model_path,
                                                                             monkeypatch):
    from jaxserve.models import gguf
    from jaxserve.models.loader import load_checkpoint

    reads, real = [], gguf._load
    monkeypatch.setattr(gguf, "_load", lambda f, path, info: reads.append(info) or real(f, path, info))
    with pytest.raises(ShardingError, match=r"9 query heads; sizes that work: \[1, 3\]"):
        load_checkpoint(default_model_path, mesh=make_mesh(2))
    assert len(reads) <= 1  # at most the rope frequencies, never a weight
