"""Test helpers: tiny Hugging Face models written as GGUF the way llama.cpp's converter writes them.

`tiny_model(kind)` builds a small random-weight model from a transformers config;
`write_gguf(path, model, weight_type)` writes it with llama.cpp's tensor names, metadata keys and
llama Q/K row permutation, 2-D weights in `weight_type` and 1-D tensors in F32 (as llama.cpp does);
`quantize` / `dequantize` round-trip every weight type, including the K-quants (Q4_K, Q6_K) that
the gguf package can dequantize but not quantize: their encoders are written here from the ggml
block layouts (simple min/max scaling, not llama.cpp's error-minimising search).
"""

import dataclasses
import math

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

QK_K = 256  # K-quant super-block size

# HF dims chosen so every in-feature is a multiple of 256, the K-quant block size.
_BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
             rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
KINDS = {
    # kind: (transformers config class, GGUF architecture, general.name, config overrides)
    "llama": ("LlamaConfig", "llama", "Tiny Llama", dict(tie_word_embeddings=True)),
    "llama_bias": ("LlamaConfig", "llama", "Tiny Llama",
                   dict(tie_word_embeddings=False, attention_bias=True)),
    "mistral": ("MistralConfig", "llama", "Tiny Mistral",
                dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "qwen2", "Tiny Qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "qwen3", "Tiny Qwen3",
              dict(tie_word_embeddings=True, head_dim=128, rope_theta=1e6)),
}

# HF -> GGUF tensor names, as llama.cpp's gguf.TensorNameMap maps them.
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


@dataclasses.dataclass
class TinyModel:
    kind: str
    arch: str  # GGUF general.architecture
    name: str  # GGUF general.name
    config: object  # the transformers config
    tensors: dict[str, np.ndarray]  # HF name -> float32, HF orientation


def tiny_model(kind: str, seed: int = 0, **overrides) -> TinyModel:
    import transformers
    config_class, arch, name, kind_overrides = KINDS[kind]
    config = getattr(transformers, config_class)(**{**_BASE, **kind_overrides, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        # Random everywhere, norms near 1, so a swapped or misplaced tensor shows.
        x = rng.standard_normal(tuple(value.shape)).astype(np.float32)
        tensors[key] = 1 + 0.1 * x if "norm" in key else 0.05 * x
    return TinyModel(kind, arch, name, config, tensors)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER[module]}.{kind}"


def llama_cpp_permute(x: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's two rotary halves become interleaved pairs."""
    head_rows = x.shape[0] // num_heads
    return x.reshape(num_heads, 2, head_rows // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_gguf(path, model: TinyModel, weight_type: Q = Q.F32, *, extra_metadata=None,
               drop_metadata=(), extra_tensors=None, skip=(), llama3_rope=None) -> None:
    """Write `model` as llama.cpp would.

    `extra_metadata` adds keys, `drop_metadata` removes them; `extra_tensors` maps a name to
    (float array, type) or (raw uint8 bytes, type); `skip` drops tensors by GGUF name;
    `llama3_rope` is a rope_freqs tensor.
    """
    c = model.config
    w = gguf.GGUFWriter(str(path), model.arch)
    w.add_name(model.name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = head_dim_of(c)
    if getattr(c, "head_dim", None) is not None:  # llama.cpp writes it when config.json has it
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if model.arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim)
    w.add_file_type(0)
    # A stand-in byte-level BPE tokenizer, enough to check the metadata decoding.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges(["<t3> <t4>", "<t5> <t6>"])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    for key, value in (extra_metadata or {}).items():
        _add_value(w, key, value)
    for key in drop_metadata:
        del w.kv_data[0][key]

    if llama3_rope is not None:
        w.add_tensor("rope_freqs.weight", llama3_rope)
    for hf_name, x in model.tensors.items():
        name = gguf_name(hf_name)
        if name in skip:
            continue
        if model.arch == "llama" and ".attn_q." in name:
            x = llama_cpp_permute(x, c.num_attention_heads)
        elif model.arch == "llama" and ".attn_k." in name:
            x = llama_cpp_permute(x, c.num_key_value_heads)
        if x.ndim == 1:
            w.add_tensor(name, x.astype(np.float32))
        else:
            w.add_tensor(name, quantize(x, weight_type), raw_dtype=weight_type)
    for name, (x, qtype) in (extra_tensors or {}).items():
        w.add_tensor(name, x if x.dtype == np.uint8 else quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_value(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def llama3_rope_freqs(scaling: dict, head_dim: int, rope_theta: float) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for HF rope_type "llama3"."""
    factors = []
    context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * rope_theta ** (i / head_dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# --- quantization -----------------------------------------------------------------------------

def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Encode float32 `x` (rows along the last axis) as `qtype`'s raw bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x.view(np.uint8)
    if qtype == Q.F16:
        return x.astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        return _blocks_to_rows(_quantize_q4_k(x.reshape(-1, QK_K)), x.shape)
    if qtype == Q.Q6_K:
        return _blocks_to_rows(_quantize_q6_k(x.reshape(-1, QK_K)), x.shape)
    return gguf.quants.quantize(x, qtype)


def dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return raw.view(np.float32).copy()
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw, qtype)


def _blocks_to_rows(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return blocks.reshape(*shape[:-1], -1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32, x = d*sc*q - dmin*m, q 4-bit, sc and m 6-bit. 144 bytes/256."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)  # [n, 8]
    scale = (sub.max(-1) - lo) / 15
    d = np.maximum(scale.max(-1), 1e-30) / 63  # [n]
    dmin = np.maximum((-lo).max(-1), 1e-30) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint((sub + (dmin[:, None] * m)[..., None]) / step), 0, 15).astype(np.uint8)
    # Scales: bytes 0-3 hold sc[0:4] plus sc[4:8]'s top 2 bits, bytes 4-7 the same for m,
    # bytes 8-11 the low 4 bits of sc[4:8] | m[4:8] << 4.
    packed = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4], axis=-1)
    # qs: 4 groups of 32 bytes, low nibbles sub-block 2g, high nibbles sub-block 2g+1.
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=-1)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16, x = d*sc*(q-32), q 6-bit, sc int8. 210 bytes per 256 values."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31  # [n, 16]
    d = np.maximum(scale.max(-1), 1e-30) / 127
    d = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / d[:, None]), 1, 127).astype(np.int8)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint(sub / step) + 32, 0, 63).astype(np.uint8).reshape(n, 8, 32)
    # Value row r (of 8 rows of 32): low nibble in ql half r//4, nibble (r%4)//2, bytes (r%2)*32..;
    # high 2 bits in qh[(r//4)*32 + c], bits 2*(r%4).
    low = (q & 0xF).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | low[:, :, 1] << 4).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6)
    return np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=-1)
