"""Orbax checkpoints: `jaxserve convert` an HF folder and a GGUF file, restore onto a mesh, and
get the source's params, tokenizer and logits back."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxserve.cli import main as cli
from jaxserve.engine import Engine
from jaxserve.errors import CheckpointError
from jaxserve.models.orbax import convert, restore
from jaxserve.parallel import make_mesh
from jaxserve.sampling import SamplingParams
from tests.test_parallel import ENGINE, PROMPTS, batch_logits, generate

HF = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64,
          intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
          num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024,
          tie_word_embeddings=False, eos_token_id=2)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama as an HF folder: config.json, safetensors, tokenizer files."""
    path = tmp_path_factory.mktemp("hf")
    d, f, v, e = 64, 128, 49152, 8
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (8 * e, d), p + "self_attn.k_proj.weight": (2 * e, d),
                       p + "self_attn.v_proj.weight": (2 * e, d), p + "self_attn.o_proj.weight": (d, 8 * e),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    save_file({k: (1 + 0.1 * rng.standard_normal(s) if "norm" in k else 0.3 * rng.standard_normal(s))
               .astype(np.float32) for k, s in shapes.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(HF))
    (path / "tokenizer.json").write_text(smol_tokenizer._backend.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=smol_tokenizer.chat_template)))
    return path


def test_hf_round_trip_sharded(hf_folder, tmp_path):
    dst = tmp_path / "orbax"
    assert cli(["convert", str(hf_folder), str(dst)]) == 0
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "params"} <= {
        p.name for p in dst.iterdir()}
    source = Engine(ENGINE, model=str(hf_folder), progress=False)
    restored = Engine(ENGINE, model=str(dst), progress=False)
    sharded = Engine(dataclasses.replace(ENGINE, tensor_parallel_size=4), model=str(dst),
                     progress=False)
    # Same params bit for bit, so the same logits bit for bit on one device; close at tp 4.
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
        nnx.state(source.model), nnx.state(restored.model))))
    ref = batch_logits(source)
    np.testing.assert_array_equal(batch_logits(restored), ref)
    np.testing.assert_allclose(batch_logits(sharded), ref, rtol=1e-4, atol=1e-4)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = {r: o.token_ids for r, o in generate(source, PROMPTS, greedy).items()}
    assert {r: o.token_ids for r, o in generate(sharded, PROMPTS, greedy).items()} == want
    # Restored straight into the shardings: lm_head split on V, w_down on F.
    lm_head = sharded.model.head.lm_head.kernel
    assert tuple(lm_head.sharding.spec) == (None, "tensor")
    assert {s.data.shape for s in lm_head.addressable_shards} == {(64, 49152 // 4)}
    # The tokenizer and its chat template came along.
    chat = [{"role": "user", "content": "Hi!"}]
    assert sharded.tokenizer.encode_chat(chat, add_generation_prompt=True) == \
        source.tokenizer.encode_chat(chat, add_generation_prompt=True)
    assert sharded.eos_token_ids == source.eos_token_ids


def test_convert_refuses_and_leaves_nothing(hf_folder, tmp_path):
    dst = tmp_path / "full"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="destination exists and is not empty"):
        convert(hf_folder, dst)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        convert(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gguf_round_trip(default_model_path, smol_checkpoint, smol_tokenizer, tmp_path):
    """The default model: params identical to the GGUF path's, tokenizer rebuilt from metadata,
    restored at tp 3 with each array on its shards."""
    dst = convert(default_model_path, tmp_path / "smol", dtype="float32")
    ckpt = restore(dst, make_mesh(3))
    wqkv = ckpt.model.layers[7].attn.qkv.kernel  # [D, K=3, G+2, E]: split on K
    assert {s.data.shape for s in wqkv.addressable_shards} == {(576, 1, 5, 64)}
    for got, want in zip(jax.tree_util.tree_leaves(nnx.state(ckpt.model)),
                         jax.tree_util.tree_leaves(nnx.state(smol_checkpoint.model))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    engine_tokenizer = type(smol_tokenizer).from_gguf_metadata(ckpt.gguf_metadata)
    chat = [{"role": "user", "content": "What is the capital of France? 日本語 🙂"}]
    assert engine_tokenizer.encode_chat(chat, add_generation_prompt=True) == \
        smol_tokenizer.encode_chat(chat, add_generation_prompt=True)
    assert ckpt.config == smol_checkpoint.config
