"""Read a GGUF checkpoint (llama.cpp's format) as a Hugging Face config dict and float32 tensors.

`read_gguf(path) -> GGUFCheckpoint(hf_config, tensors, metadata)` in four steps:
  1. `_gguf_header.read_header` parses and bounds-checks the header: metadata and tensor table;
  2. `_hf_config` rebuilds a config.json-style dict from the `{arch}.*` metadata;
  3. `_plan_tensors` maps every GGUF tensor name to its HF name and checks its shape against that
     config, all before any tensor data is read;
  4. each tensor is dequantized to float32 with `gguf.quants.dequantize`. GGUF lists dimensions
     innermost first, so numpy order (the reverse) is already HF's [out, in]. llama.cpp's converter
     interleaves the two rotary halves of every head's Q/K rows for the llama architecture (ggml's
     rope pairs adjacent elements, HF's rotates halves); that permutation is undone here. Qwen2 and
     Qwen3 are converted unpermuted (their rope is ggml's NEOX mode, which rotates halves too).
The tokenizer and chat template stay in `metadata` (tokenizer.ggml.*, tokenizer.chat_template).
"""

import dataclasses
import math
import os
import pathlib
from typing import BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from jaxserve.errors import CheckpointError, UnsupportedArchitectureError
from jaxserve.models._gguf_header import GGUFHeader, TensorInfo, read_header

# general.architecture -> (HF `architectures` entry, HF model_type)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.{i}.<suffix> -> model.layers.{i}.<HF suffix>
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_DENSE_LAYER = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                "ffn_down.weight")
_ATTENTION_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")
_ARCH_LAYER_EXTRAS = {
    "llama": (),
    "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),  # Qwen2 always has q/k/v biases
    "qwen3": ("attn_q_norm.weight", "attn_k_norm.weight"),
}
# llama.cpp writes Llama 3 rope scaling as this tensor of per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"

# Types read with a plain numpy view; the rest go through gguf.quants.dequantize.
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2",
    GGMLQuantizationType.F64: "<f8", GGMLQuantizationType.I8: "i1",
    GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
}


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFCheckpoint:
    hf_config: dict[str, object]  # config.json-style: architectures, model_type, hidden_size, ...
    tensors: dict[str, np.ndarray]  # HF name -> float32 array in HF orientation
    metadata: dict[str, object]  # every GGUF key/value, decoded to plain Python


def read_gguf(path: str | os.PathLike, check_config=None) -> GGUFCheckpoint:
    """Read the GGUF file at `path`; CheckpointError if it is missing, corrupt or inconsistent.
    check_config(hf_config), if given, runs before any weight is read (say, a mesh check)."""
    path = pathlib.Path(path)
    header = read_header(path)
    with open(path, "rb") as f:
        rope_freqs = header.tensors.get(_ROPE_FREQS)
        if rope_freqs is not None:
            rope_freqs = _load(f, path, rope_freqs)
        hf_config = _hf_config(path, header, rope_freqs)
        if check_config is not None:
            check_config(hf_config)
        plan = _plan_tensors(path, header, hf_config)
        permute_qk = header.metadata["general.architecture"] == "llama"
        tensors = {}
        for gguf_name, hf_name in plan.items():
            x = _load(f, path, header.tensors[gguf_name])
            if permute_qk and ".attn_q." in gguf_name:
                x = _unpermute_rows(x, hf_config["num_attention_heads"])
            elif permute_qk and ".attn_k." in gguf_name:
                x = _unpermute_rows(x, hf_config["num_key_value_heads"])
            tensors[hf_name] = x
    return GGUFCheckpoint(hf_config, tensors, header.metadata)


def _unpermute_rows(x: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (j, 2) interleaved -> (2, j) halves."""
    # x: [heads * E, D] or [heads * E]; viewed as [heads, E/2, 2, ...] -> [heads, 2, E/2, ...]
    return x.reshape(num_heads, -1, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _load(f: BinaryIO, path: pathlib.Path, info: TensorInfo) -> np.ndarray:
    """Read one tensor's bytes and dequantize them to a float32 array of `info.shape`."""
    buf = bytearray(info.num_bytes)  # writable, so the float32 case needs no copy
    f.seek(info.offset)
    if f.readinto(buf) != info.num_bytes:
        raise CheckpointError(path, f"truncated file: tensor {info.name!r} could not be read")
    raw = np.frombuffer(buf, np.uint8)
    if info.ggml_type in _PLAIN_DTYPES:
        x = raw.view(_PLAIN_DTYPES[info.ggml_type])
        return x.astype(np.float32, copy=False).reshape(info.shape)
    block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
    try:
        x = dequantize(raw.reshape(*info.shape[:-1], info.shape[-1] // block_size * type_size),
                       info.ggml_type)
    except NotImplementedError:
        raise CheckpointError(path, f"tensor {info.name!r} has type {info.ggml_type.name}, which "
                                    f"the gguf package cannot dequantize") from None
    return x.astype(np.float32, copy=False).reshape(info.shape)


def _hf_config(path: pathlib.Path, header: GGUFHeader, rope_freqs: np.ndarray | None) -> dict:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported; jaxserve reads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def integer(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(path, f"metadata {arch}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(path, f"metadata {arch}.{key} is {value!r}, expected a positive "
                                        f"integer")
        return value

    def number(key: str, default: float | None = None) -> float:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(path, f"metadata {arch}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise CheckpointError(path, f"metadata {arch}.{key} is {value!r}, expected a positive "
                                        f"number")
        return float(value)

    hidden, heads = integer("embedding_length"), integer("attention.head_count")
    kv_heads = integer("attention.head_count_kv", heads)
    if hidden % heads and f"{arch}.attention.key_length" not in meta:
        raise CheckpointError(path, f"{arch}.embedding_length {hidden} is not a multiple of "
                                    f"{arch}.attention.head_count {heads}, and no key_length "
                                    f"is given")
    head_dim = integer("attention.key_length", hidden // heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        if integer(key, head_dim) != head_dim:
            raise CheckpointError(path, f"metadata {arch}.{key} is {meta[f'{arch}.{key}']}, but "
                                        f"{arch} needs it equal to the head dim {head_dim}")
    if heads % kv_heads or head_dim % 2:
        raise CheckpointError(path, f"{heads} attention heads, {kv_heads} kv heads and head dim "
                                    f"{head_dim}: heads must be a multiple of kv heads and the "
                                    f"head dim even")
    tokens = meta.get("tokenizer.ggml.tokens")
    embed = header.tensors.get("token_embd.weight")
    vocab = (len(tokens) if isinstance(tokens, list) else embed.shape[0] if embed else None)

    # llama.cpp converts Mistral models as "llama" and runs them as llama (no sliding window), so
    # they read back as LlamaForCausalLM: the same computation, with no guessing from general.name.
    architecture, model_type = _ARCHITECTURES[arch]
    rope_theta = number("rope.freq_base", 10000.0)
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": integer("vocab_size", vocab),
        "hidden_size": hidden,
        "intermediate_size": integer("feed_forward_length"),
        "num_hidden_layers": integer("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "max_position_embeddings": integer("context_length"),
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    if arch in ("llama", "qwen3"):
        config["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
    rope_scaling = _rope_scaling(path, meta, arch, rope_freqs, head_dim, rope_theta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(meta.get(f"tokenizer.ggml.{key}"), int):
            config[key] = meta[f"tokenizer.ggml.{key}"]
    return config


def _rope_scaling(path: pathlib.Path, meta: dict, arch: str, rope_freqs: np.ndarray | None,
                  head_dim: int, rope_theta: float) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original_context = meta.get(f"{arch}.rope.scaling.original_context_length")
    if rope_freqs is not None:
        if kind != "none":
            raise CheckpointError(path, f"both a {_ROPE_FREQS} tensor and rope scaling type "
                                        f"{kind!r}: the two rope scalings cannot be combined")
        return _llama3_scaling(path, rope_freqs, head_dim, rope_theta, original_context or 8192)
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise CheckpointError(path, f"rope scaling type {kind!r} is not supported; jaxserve reads "
                                    f"none, linear, yarn, and llama3 (a {_ROPE_FREQS} tensor)")
    if not isinstance(factor, int | float) or factor <= 0:
        raise CheckpointError(path, f"{arch}.rope.scaling.factor is {factor!r}, expected a "
                                    f"positive number for {kind} rope scaling")
    scaling = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn" and original_context is not None:
        scaling["original_max_position_embeddings"] = original_context
    for key in ("beta_fast", "beta_slow"):
        if kind == "yarn" and f"{arch}.rope.scaling.yarn_{key}" in meta:
            scaling[key] = meta[f"{arch}.rope.scaling.yarn_{key}"]
    return scaling


def _llama3_scaling(path: pathlib.Path, rope_freqs: np.ndarray, head_dim: int, rope_theta: float,
                    original_context: int) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency divisors (shape [E/2]).

    Divisors are 1 at short wavelengths, `factor` at long ones and a smooth blend between, the
    blend linear in context / wavelength. The divisors fix only context/low_freq_factor and
    context/high_freq_factor, so the context is taken as given and the two factors fitted.
    """
    if rope_freqs.shape != (head_dim // 2,):
        raise CheckpointError(path, f"{_ROPE_FREQS} has shape {list(rope_freqs.shape)}, expected "
                                    f"[{head_dim // 2}] (half the head dim)")
    factor = float(rope_freqs.max())
    if np.allclose(rope_freqs, 1.0):
        return None
    wavelength = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    blended = (rope_freqs > 1 + 1e-6) & (rope_freqs < factor * (1 - 1e-6))
    low, high = 1.0, 4.0  # Llama 3.1's values, kept when too few blended frequencies to fit
    if blended.sum() >= 2:
        smooth = (1 / rope_freqs[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(original_context / wavelength[blended], smooth, 1)
        low, high = float(f"{-intercept / slope:.6g}"), float(f"{(1 - intercept) / slope:.6g}")
    scaling = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": original_context}
    if not np.allclose(llama3_divisors(scaling, wavelength), rope_freqs, rtol=1e-3):
        raise CheckpointError(path, f"{_ROPE_FREQS} does not follow Llama 3 rope scaling, the only "
                                    f"rope_freqs form jaxserve reads")
    return scaling


def llama3_divisors(scaling: dict, wavelength: np.ndarray) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling (what llama.cpp stores as rope_freqs)."""
    context, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (context / wavelength - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < context / high, 1.0,
                    np.where(wavelength > context / low, factor, blend))


def _plan_tensors(path: pathlib.Path, header: GGUFHeader, config: dict) -> dict[str, str]:
    """GGUF name -> HF name for every tensor, after checking names and shapes against `config`."""
    arch = header.metadata["general.architecture"]
    D, V, F = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    H, K, E = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {
        "token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D),
        "attn_norm.weight": (D,), "ffn_norm.weight": (D,),
        "attn_q.weight": (H * E, D), "attn_k.weight": (K * E, D), "attn_v.weight": (K * E, D),
        "attn_output.weight": (D, H * E),
        "attn_q.bias": (H * E,), "attn_k.bias": (K * E,), "attn_v.bias": (K * E,),
        "attn_output.bias": (D,),
        "attn_q_norm.weight": (E,), "attn_k_norm.weight": (E,),
        "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D), "ffn_down.weight": (D, F),
    }
    layer_suffixes = _DENSE_LAYER + _ARCH_LAYER_EXTRAS[arch]
    if config.get("attention_bias"):
        layer_suffixes += _ATTENTION_BIASES
    expected = {"token_embd.weight": _GLOBAL_NAMES["token_embd.weight"],
                "output_norm.weight": _GLOBAL_NAMES["output_norm.weight"]}
    if not config["tie_word_embeddings"]:
        expected["output.weight"] = _GLOBAL_NAMES["output.weight"]
    for i in range(config["num_hidden_layers"]):
        expected.update({f"blk.{i}.{s}": f"model.layers.{i}.{_LAYER_NAMES[s]}"
                         for s in layer_suffixes})

    for name, info in header.tensors.items():
        if name == _ROPE_FREQS:
            continue
        if name not in expected:
            raise CheckpointError(
                path, f"unexpected tensor {name!r} for a {arch} model with "
                      f"{config['num_hidden_layers']} layers; expected token_embd, output_norm, "
                      f"output, {_ROPE_FREQS} and blk.N.{{{', '.join(layer_suffixes)}}}")
        want = shapes[name.split(".", 2)[2] if name.startswith("blk.") else name]
        if info.shape != want:
            raise CheckpointError(
                path, f"tensor {name!r} has shape {list(info.shape)}, but the file's metadata "
                      f"(vocab {V}, hidden {D}, ffn {F}, heads {H}, kv heads {K}, head dim {E}) "
                      f"implies {list(want)}")
    missing = [name for name in expected if name not in header.tensors]
    if missing:
        raise CheckpointError(path, f"{len(missing)} tensors missing, e.g. "
                                    f"{', '.join(missing[:4])}")
    return expected
