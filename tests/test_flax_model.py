"""The Flax NNX model: one graph definition for every layer, sharding from its metadata, the
live model behind `LLM.model`, its notebook rendering, and refused old orbax checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.models.llama import LlamaModel, abstract_model, init_model
from jaxserve.models.orbax import MARKER, restore
from jaxserve.parallel import make_mesh, state_shardings
from tests.conftest import TINY
from tests.test_models import ARCHS, BASE


@pytest.mark.parametrize("kind", list(ARCHS))
def test_every_layer_has_one_graph_definition(kind):
    cls, extra = ARCHS[kind]
    config = ModelConfig.from_hf(cls(**{**BASE, **extra}).to_dict())
    model = abstract_model(config)
    graphdefs = [nnx.split(layer)[0] for layer in model.layers]
    assert all(g == graphdefs[0] for g in graphdefs) and len(graphdefs) == config.num_layers
    names = {"/".join(map(str, p[2:])) for p, _ in nnx.to_flat_state(nnx.state(model))
             if p[:2] == ("layers", 0)}
    assert ("attn/qkv/bias" in names) == config.qkv_bias
    assert ("attn/q_norm/weight" in names) == config.qk_norm
    assert ("attn/o/bias" in names) == config.o_bias
    assert (model.head.lm_head is None) == config.tie_word_embeddings


def test_abstract_model_allocates_nothing():
    model = abstract_model(ModelConfig.from_hf(TINY), jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16
                          for x in leaves)


def test_shardings_come_from_flax_metadata():
    """Logical axes on each nnx.Param, resolved by the logical axis rules; a dimension that does
    not divide by the mesh axis is replicated."""
    config = ModelConfig.from_hf(dict(TINY, num_attention_heads=8, num_key_value_heads=2,
                                      intermediate_size=102, tie_word_embeddings=False))
    state = nnx.state(abstract_model(config))
    assert state["layers"][0]["mlp"]["gate_up"]["kernel"].get_metadata("out_sharding") == (
        "embed", None, "mlp")
    specs = {"/".join(map(str, p)): v.get_value().spec
             for p, v in nnx.to_flat_state(state_shardings(state, make_mesh(4)))}
    assert specs["embed/embedding"] == P("tensor", None)
    assert specs["head/lm_head/kernel"] == P(None, "tensor")
    assert specs["layers/1/attn/qkv/kernel"] == P(None, None, None, None)  # 2 KV heads, tp 4
    assert specs["layers/1/attn/o/kernel"] == P("tensor", None, None)
    assert specs["layers/1/mlp/down/kernel"] == P(None, None)  # F = 102: does not divide by 4
    assert specs["layers/1/attn_norm/weight"] == P(None)


def test_live_model_edits_reach_the_engine(make_tiny_engine):
    """llm.model is the model the engine runs: zeroing every layer's MLP output changes the
    greedy tokens; putting the weights back gives the original tokens again."""
    llm = LLM.from_engine(make_tiny_engine())
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = llm.generate("Hello there", greedy, use_tqdm=False)[0].outputs[0].token_ids
    saved = [layer.mlp.down.kernel[...] for layer in llm.model.layers]
    for layer in llm.model.layers:
        layer.mlp.down.kernel[...] = jnp.zeros_like(layer.mlp.down.kernel[...])
    ablated = llm.generate("Hello there", greedy, use_tqdm=False)[0].outputs[0].token_ids
    for layer, w in zip(llm.model.layers, saved):
        layer.mlp.down.kernel.set_value(np.asarray(w))  # host numpy: placed again on sync
    after = llm.generate("Hello there", greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert ablated != before and after == before
    kernel = llm.model.layers[1].attn.o.kernel
    kernel.set_value(kernel[...].astype(jnp.bfloat16))  # not what the programs were compiled for
    with pytest.raises(ValueError, match=r"layers/1/attn/o/kernel is now bfloat16\[4, 16, 64\]; "
                                         r"the compiled programs take float32\[4, 16, 64\]"):
        llm.generate("Hello there", greedy, use_tqdm=False)
    kernel.set_value(kernel[...].astype(jnp.float32))
    assert llm.generate("Hello there", greedy, use_tqdm=False)[0].outputs[0].token_ids == before


def test_model_renders_with_dtypes_and_shardings(make_tiny_engine):
    """The treescope rendering (what nnx.display shows in a notebook) names every module, each
    parameter's dtype and shape, its logical axes and where it lies on the mesh."""
    engine = make_tiny_engine(tensor_parallel_size=2)
    assert isinstance(engine.model, LlamaModel)
    text = treescope.render_to_text(engine.model)
    for part in ("LlamaModel(", "DecoderLayer(", "Attention(", "MLP(", "Param(", "float32(49152, 64)",
                 "out_sharding=('vocab', 'embed')", "mesh_axes=P('tensor', None)",
                 "out_sharding=('embed', None, 'mlp')", "mesh_axes=P(None, None, 'tensor')"):
        assert part in text, part


def test_format_1_orbax_checkpoint_says_to_convert_again(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps(dict(format=1, dtype="float32", source="/m.gguf")))
    with pytest.raises(CheckpointError, match=r"re-run `jaxserve convert` on its source \(/m.gguf\)"):
        restore(tmp_path, make_mesh(1))


def test_random_init_scale():
    model = init_model(ModelConfig.from_hf(TINY), 0, scale=0.5)
    w = np.asarray(model.layers[0].mlp.down.kernel[...])
    assert 0.45 < w.std() < 0.55
    assert np.all(np.asarray(model.layers[0].attn_norm.weight[...]) == 1)
