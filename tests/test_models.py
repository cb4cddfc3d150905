"""Model numerics against Hugging Face transformers on tiny random-weight checkpoints of every
supported architecture: prefill (in chunks) and decode steps through the paged cache, float32."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
import transformers

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError, UnsupportedArchitectureError
from jaxserve.models.loader import load_checkpoint
from tests.paged_driver import PagedDriver

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama2-mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama3-gqa-scaled": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama-bias": (transformers.LlamaConfig, dict(attention_bias=True)),
    "smollm2-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, num_attention_heads=8,
                                                    num_key_value_heads=8 // 4 * 1)),
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=6, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
}


def make_hf_model(kind, tmp_path):
    cls, extra = ARCHS[kind]
    cfg = cls(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms and biases too, so a mis-loaded one shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name or "bias" in name else 0.02))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", list(ARCHS))
def test_matches_transformers(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path)
    ckpt = load_checkpoint(tmp_path)
    rng = np.random.default_rng(1)
    a = rng.integers(0, BASE["vocab_size"], 19).tolist()  # 11 prompt + 8 decode
    b = rng.integers(0, BASE["vocab_size"], 9).tolist()  # 6 prompt + 3 decode
    with torch.no_grad():
        ref_a = hf(torch.tensor([a])).logits[0].numpy()
        ref_b = hf(torch.tensor([b])).logits[0].numpy()

    drv = PagedDriver(ckpt.model)
    got_a, got_b = [], []
    out = drv.step({0: a[:7]})  # first prefill chunk
    got_a.append(out[0])
    out = drv.step({0: a[7:11], 1: b[:6]})  # second chunk of a beside b's whole prompt
    got_a.append(out[0]), got_b.append(out[1])
    for i in range(8):  # decode steps, b finishing early
        chunks = {0: a[11 + i: 12 + i]}
        if i < 3:
            chunks[1] = b[6 + i: 7 + i]
        out = drv.step(chunks, query_block=1 if i % 2 else 4)
        got_a.append(out[0])
        if i < 3:
            got_b.append(out[1])
    for got, ref in ((np.concatenate(got_a), ref_a), (np.concatenate(got_b), ref_b)):
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, f"{kind}: max |diff| / max |logit| = {rel:.2e}"


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_checkpoint(tmp_path)


def test_config_conversion_reads_variants():
    c = ModelConfig.from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    assert c.qkv_bias and not c.qk_norm and c.head_dim == 16 and c.group_size == 2
    c = ModelConfig.from_hf({**BASE, "model_type": "qwen3", "head_dim": 32})
    assert c.qk_norm and c.head_dim == 32 and c.architecture == "Qwen3ForCausalLM"


def test_missing_and_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope")
    make_hf_model("qwen2", tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_checkpoint(tmp_path)
    st.write_bytes(b"\xff" * 8 + data[8:])  # absurd header length
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_checkpoint(tmp_path)
    st.write_bytes(data)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' has shape \(96, 64\), the config "
                                              r"implies \(100, 64\)"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(tmp_path)


def test_sharded_safetensors_folder(tmp_path):
    hf = make_hf_model("llama3-gqa-scaled", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    one, sharded = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "sharded")
    assert one.config == sharded.config
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(one.model)),
                    jax.tree_util.tree_leaves(nnx.state(sharded.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "sharded" / sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))[-1]).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load_checkpoint(tmp_path / "sharded")


def test_checkpoint_errors_name_the_file_and_key(tmp_path):
    """A config.json missing a key names the file's path and the key; an index whose shards lie
    outside the folder is refused before anything is opened."""
    make_hf_model("llama2-mha", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                      if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'config.json'}.*hidden_size"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_checkpoint(tmp_path)
