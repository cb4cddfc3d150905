"""The GGUF reader against tiny models written the way llama.cpp writes them, against transformers'
own GGUF loading, on hand-made corrupt headers, and end to end on the real default model."""

import dataclasses
import functools
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests import gguf_util
from jaxserve.errors import CheckpointError, UnsupportedArchitectureError
from jaxserve.models._gguf_header import read_header
from jaxserve.models.gguf import llama3_divisors, read_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Bound on rms(read - original) / rms(original) per weight type (measured: about 2/3 of these);
# a misplaced permutation or orientation gives about 1.4.
RELATIVE_RMS_ERROR = {Q.F32: 0.0, Q.F16: 5e-4, Q.BF16: 4e-3, Q.Q8_0: 0.01, Q.Q6_K: 0.03,
                      Q.Q5_0: 0.06, Q.Q5_1: 0.06, Q.Q4_0: 0.13, Q.Q4_1: 0.12, Q.Q4_K: 0.12}


@functools.cache
def tiny(kind: str) -> gguf_util.TinyModel:
    return gguf_util.tiny_model(kind)


def write(tmp_path, kind="llama", weight_type=Q.F32, model=None, **kwargs):
    path = tmp_path / f"{kind}.{weight_type.name}.gguf"
    gguf_util.write_gguf(path, model or tiny(kind), weight_type, **kwargs)
    return path


# --- tiny models: tensors, config, metadata ----------------------------------------------------

# Every type on a permuted llama (weights and biases) and on an unpermuted qwen3 (head dim 128);
# the other kinds in F32 and Q4_K.
ROUND_TRIPS = [(kind, t) for kind in ("llama_bias", "qwen3") for t in RELATIVE_RMS_ERROR] + [
    (kind, t) for kind in ("llama", "mistral", "qwen2") for t in (Q.F32, Q.Q4_K)]


@pytest.mark.parametrize("kind, weight_type", ROUND_TRIPS,
                         ids=[f"{kind}-{t.name}" for kind, t in ROUND_TRIPS])
def test_recovers_hf_tensors(tmp_path, kind, weight_type):
    model = tiny(kind)
    ckpt = read_gguf(write(tmp_path, kind, weight_type))
    assert set(ckpt.tensors) == set(model.tensors)
    for name, original in model.tensors.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == original.shape, name
        # Exact: what the stored bytes decode to, in HF order (quantization blocks run along rows,
        # so the Q/K row permutation does not change them).
        stored_type = weight_type if original.ndim == 2 else Q.F32
        np.testing.assert_array_equal(
            got, gguf_util.dequantize(gguf_util.quantize(original, stored_type), stored_type),
            err_msg=name)
        # Close to the original, within the type's quantization error.
        error = np.sqrt(np.mean((got - original) ** 2) / np.mean(original ** 2))
        assert error <= RELATIVE_RMS_ERROR[stored_type], (name, error)


@pytest.mark.parametrize("kind", list(gguf_util.KINDS))
def test_hf_config_matches_source(tmp_path, kind):
    source = tiny(kind).config
    config = read_gguf(write(tmp_path, kind)).hf_config
    # Mistral GGUFs say "llama" and llama.cpp runs them as llama: they read back as Llama.
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(kind, "LlamaForCausalLM")
    assert config["architectures"] == [arch]
    assert config["model_type"] == gguf_util.KINDS[kind][1]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(source, key), key
    assert config["head_dim"] == gguf_util.head_dim_of(source)
    assert config["rope_theta"] == source.rope_parameters["rope_theta"]
    assert config.get("attention_bias", False) == getattr(source, "attention_bias", False)
    assert "rope_scaling" not in config


def _hf_model(config, tensors):
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config.tie_word_embeddings else [])
    return model


@pytest.mark.parametrize("kind", list(gguf_util.KINDS))
def test_forward_matches_source_model(tmp_path, kind):
    """A transformers model built from our hf_config and tensors computes the source's logits."""
    model = tiny(kind)
    ckpt = read_gguf(write(tmp_path, kind))
    ours = _hf_model(transformers.AutoConfig.for_model(**ckpt.hf_config), ckpt.tensors)
    source = _hf_model(model.config, model.tensors)
    tokens = torch.tensor([[3, 17, 200, 5, 99, 42, 7, 255, 0, 1]])
    with torch.no_grad():
        np.testing.assert_allclose(ours(tokens).logits.numpy(), source(tokens).logits.numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(gguf_util.KINDS))
def test_matches_transformers_gguf_loading(tmp_path, kind):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    path = write(tmp_path, kind, Q.Q8_0)
    ckpt = read_gguf(path)
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    # transformers reads no attention_bias from GGUF, so it drops Llama's attention biases.
    assert set(theirs) == {k for k in ckpt.tensors if not (kind == "llama_bias" and "bias" in k)}
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ckpt.tensors[name], tensor.numpy(), err_msg=name)


def test_metadata_decoded_to_plain_python(tmp_path):
    extra = {"test.scores": [0.5, -1.25], "test.nested": [[1, 2], [3]], "test.flag": True,
             "test.text": "héllo", "test.flags": [True, False]}
    meta = read_gguf(write(tmp_path, extra_metadata=extra)).metadata
    for key, value in extra.items():
        assert meta[key] == value and type(meta[key]) is type(value), key
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "Tiny Llama"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.tokens"] == [f"<t{i}>" for i in range(256)]
    assert meta["tokenizer.ggml.token_type"] == [1] * 256
    assert meta["tokenizer.ggml.merges"] == ["<t3> <t4>", "<t5> <t6>"]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # float32 read as its decimal


# --- rope scaling ------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high, context", [(1.0, 4.0, 8192), (2.0, 8.0, 4096)])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, low, high, context):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": context}
    model = gguf_util.tiny_model("llama", rope_theta=500000.0, rope_scaling=dict(scaling),
                                 max_position_embeddings=131072)
    freqs = gguf_util.llama3_rope_freqs(scaling, 64, 500000.0)
    config = read_gguf(write(tmp_path, model=model, llama3_rope=freqs)).hf_config
    got = config["rope_scaling"]
    wavelength = 2 * np.pi * 500000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(llama3_divisors(got, wavelength), freqs, rtol=1e-5)
    if context == 8192:  # the context llama.cpp does not record is assumed 8192
        assert got == pytest.approx(scaling)
    # transformers' rope from our config equals the source model's.
    ours = transformers.AutoConfig.for_model(**config)
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    np.testing.assert_allclose(init(ours, "cpu")[0].numpy(), init(model.config, "cpu")[0].numpy(),
                               rtol=1e-5)


def test_rope_scaling_from_metadata(tmp_path):
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    assert read_gguf(write(tmp_path, extra_metadata=linear)).hf_config["rope_scaling"] == {
        "rope_type": "linear", "factor": 2.0}
    yarn = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 32768}
    assert read_gguf(write(tmp_path, "qwen2", extra_metadata=yarn)).hf_config["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with pytest.raises(CheckpointError, match="rope scaling type 'longrope' is not supported"):
        read_gguf(write(tmp_path, extra_metadata={"llama.rope.scaling.type": "longrope"}))


# --- files that disagree with themselves -------------------------------------------------------

def test_unsupported_architecture(tmp_path):
    model = dataclasses.replace(tiny("llama"), arch="phi3")
    with pytest.raises(UnsupportedArchitectureError, match=r"'phi3'.*llama, qwen2, qwen3"):
        read_gguf(write(tmp_path, model=model))


def test_embedding_rows_disagree_with_vocab(tmp_path):
    path = write(tmp_path, "qwen2", extra_metadata={"qwen2.vocab_size": 300})
    with pytest.raises(CheckpointError, match=r"'token_embd.weight' has shape \[256, 256\].*"
                                              r"vocab 300.*implies \[300, 256\]") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_missing_and_unexpected_tensors_and_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="1 tensors missing, e.g. blk.1.ffn_up.weight"):
        read_gguf(write(tmp_path, skip=("blk.1.ffn_up.weight",)))
    experts = {"blk.0.ffn_gate_exps.weight": (np.zeros((4, 512, 256), np.float32), Q.F32)}
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.ffn_gate_exps.weight'"):
        read_gguf(write(tmp_path, extra_tensors=experts))
    with pytest.raises(CheckpointError, match="metadata llama.block_count is missing"):
        read_gguf(write(tmp_path, drop_metadata=("llama.block_count",)))


def test_type_gguf_cannot_dequantize(tmp_path):
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
    raw = np.zeros((256, 256 // block_size * type_size), np.uint8)
    path = write(tmp_path, skip=("token_embd.weight",),
                 extra_tensors={"token_embd.weight": (raw, Q.Q8_K)})
    with pytest.raises(CheckpointError, match="'token_embd.weight' has type Q8_K, which the gguf "
                                              "package cannot dequantize"):
        read_gguf(path)


# --- corrupt and truncated files ---------------------------------------------------------------

def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _header(*, version=3, tensor_count=0, kv_count=None, body=b"", magic=b"GGUF") -> bytes:
    kvs = [_string(b"general.architecture") + struct.pack("<I", 8) + _string(b"llama")]
    kv_count = len(kvs) if kv_count is None else kv_count
    return magic + struct.pack("<IQQ", version, tensor_count, kv_count) + b"".join(kvs) + body


def _tensor_info(name=b"t", dims=(32,), ggml_type=0, offset=0) -> bytes:
    return (_string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            + struct.pack("<IQ", ggml_type, offset))


HUGE = 2 ** 60
BAD_HEADERS = {
    "bad magic": (_header(magic=b"GGML"), "not a GGUF file: it starts with b'GGML'"),
    "empty": (b"", "not a GGUF file"),
    "version 1": (_header(version=1), "unsupported GGUF version 1; jaxserve reads versions 2, 3"),
    "big-endian": (_header(version=3 << 24), "big-endian"),
    "huge tensor count": (_header(tensor_count=HUGE), f"claims {HUGE} tensors.*cannot fit"),
    "huge kv count": (_header(kv_count=HUGE), f"{HUGE} metadata entries, which cannot fit"),
    "huge key length": (_header(kv_count=2, body=struct.pack("<Q", HUGE) + b"x" * 64),
                        f"metadata key #1 at byte 69 claims {HUGE} bytes, past the end"),
    "huge string value": (_header(kv_count=2, body=_string(b"k") + struct.pack("<IQ", 8, HUGE)),
                          f"value of 'k' at byte 82 claims {HUGE} bytes, past the end"),
    "huge array": (_header(kv_count=2, body=_string(b"k") + struct.pack("<IIQ", 9, 4, HUGE)),
                   f"array 'k' at byte 86 claims {HUGE} elements, past the end"),
    "huge array of strings": (
        _header(kv_count=2, body=_string(b"k") + struct.pack("<IIQ", 9, 8, HUGE // 8)),
        "array 'k' at byte 86 claims"),
    "unknown value type": (_header(kv_count=2, body=_string(b"k") + struct.pack("<I", 77)),
                           "metadata 'k' has unknown value type 77"),
    "duplicate key": (_header(kv_count=2, body=_string(b"general.architecture")
                              + struct.pack("<I", 8) + _string(b"qwen2")),
                      "metadata key 'general.architecture' appears twice"),
    "bad alignment": (_header(kv_count=2, body=_string(b"general.alignment")
                              + struct.pack("<II", 4, 3)), "general.alignment is 3"),
    "huge tensor name": (_header(tensor_count=1, body=struct.pack("<Q", HUGE) + b"x" * 64),
                         f"name of tensor #0 at byte 69 claims {HUGE} bytes"),
    "too many dims": (_header(tensor_count=1, body=_tensor_info(dims=(1,) * 9)),
                      "tensor 't' has 9 dimensions"),
    "unknown tensor type": (_header(tensor_count=1, body=_tensor_info(ggml_type=99)),
                            "tensor 't' has unknown ggml type 99"),
    "misaligned offset": (_header(tensor_count=1, body=_tensor_info(offset=4)),
                          "offset 4 is not a multiple of the alignment 32"),
    "partial block": (_header(tensor_count=1, body=_tensor_info(dims=(33,), ggml_type=8)),
                      "rows of 33 elements are not a whole number of Q8_0 blocks of 32"),
    "huge tensor": (_header(tensor_count=1, body=_tensor_info(dims=(2 ** 40, 2 ** 40))),
                    "truncated file: tensor 't' .* occupies bytes"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_corrupt_header_fails_fast(tmp_path, name):
    data, message = BAD_HEADERS[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message) as e:
            read_gguf(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20, f"allocated {peak} bytes"  # refused before any large allocation
    assert e.value.path == str(path)


def test_truncated_at_every_section(tmp_path):
    full = write(tmp_path, weight_type=Q.Q4_K).read_bytes()
    (tmp_path / "full.gguf").write_bytes(full)
    reader = gguf.GGUFReader(tmp_path / "full.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    cuts = {
        "in the magic": 2, "in the counts": 20,
        "in a metadata key": reader.fields["llama.block_count"].offset + 10,
        "in the token list": tokens.offset + 200,
        "in the tensor table": reader.tensors[3].field.offset + 5,
        "in the tensor data": reader.tensors[5].data_offset + 7,
        "one byte short": len(full) - 1,
    }
    for where, cut in cuts.items():
        path = tmp_path / "cut.gguf"
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match="truncated") as e:
            read_gguf(path)
        assert str(path) in str(e.value), where


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as e:
        read_gguf(tmp_path / "absent.gguf")
    assert e.value.path == str(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_gguf(tmp_path)


# --- the real default model --------------------------------------------------------------------

# Chat-templated "What is the capital of France?" and the greedy answer "The capital of France is
# Paris." in SmolLM2's tokenizer (from transformers' GGUF tokenizer for this file).
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
          407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
          520, 9531, 198]
ANSWER = [504, 3575, 282, 4649, 314, 7042, 30]


@pytest.mark.slow
def test_default_model():
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from jaxserve.models.fetch import default_model_path
    path = default_model_path()
    types = [info.ggml_type for info in read_header(path).tensors.values()]
    assert {t: types.count(t) for t in set(types)} == {Q.Q4_1: 210, Q.F32: 61, Q.Q8_0: 1}

    ckpt = read_gguf(path)
    assert ckpt.hf_config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2}
    assert len(ckpt.metadata["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in ckpt.metadata["tokenizer.chat_template"]

    model = _hf_model(transformers.AutoConfig.for_model(**ckpt.hf_config), ckpt.tensors)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(theirs) == set(ckpt.tensors)
    assert max(float(np.abs(ckpt.tensors[k] - v.numpy()).max()) for k, v in theirs.items()) == 0
    # The Q/K un-permutation is right only if the model still answers.
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=len(ANSWER), do_sample=False)
    assert out[0, len(PROMPT):].tolist() == ANSWER
