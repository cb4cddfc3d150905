"""Frozen, hashable configuration: `ModelConfig` from a Hugging Face `config.json` dict.

One explicit converter (`ModelConfig.from_hf`) turns the HF dict into the fields the model
functions read; GGUF metadata is first rebuilt into the same HF dict by the GGUF reader, so
there is exactly one place where architectures are recognised.

Dimension alphabet used across jaxserve (shape comments and einsum strings):
  T tokens (flat ragged batch)   R requests        B rows that get logits
  D model width   F MLP width    H query heads     K kv heads    G = H // K
  E head dim      V vocabulary   L layers          P pages       S page size
"""

from __future__ import annotations

import dataclasses
import math

from jaxserve.errors import CheckpointError, ConfigError, UnsupportedArchitectureError

# architectures -> (model_type, has q/k/v bias, has per-head q/k RMSNorm)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False),  # Llama 2/3/3.1/3.2, SmolLM2
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling. `llama3` follows Meta's Llama 3.1 recipe; `linear` divides positions."""

    rope_type: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K
    head_dim: int  # E
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    o_bias: bool = False  # Llama with attention_bias=True also biases o_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over E on each q and k head
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` positions
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def group_size(self) -> int:  # G: query heads per kv head
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Convert a Hugging Face `config.json` dict. Unknown architectures are an error; a
        missing or mistyped key is a CheckpointError naming `source` and the key."""
        try:
            return cls._from_hf(hf)
        except KeyError as e:  # a required key is missing
            raise CheckpointError(source, f"missing the required key {e.args[0]!r}") from None
        except TypeError as e:  # e.g. "hidden_size": null
            raise CheckpointError(source, f"a value has the wrong type: {e}") from None

    @classmethod
    def _from_hf(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type = {t: a for a, (t, _, _) in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(hf.get("model_type"))
        if arch is None:
            name = ", ".join(archs) or hf.get("model_type") or "<none given>"
            raise UnsupportedArchitectureError(
                f"unsupported architecture {name!r}; jaxserve supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        _, qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("mlp_bias"):
            raise UnsupportedArchitectureError("mlp_bias=True is not supported")
        attention_bias = bool(hf.get("attention_bias", False))
        if arch == "LlamaForCausalLM":
            qkv_bias = attention_bias
        elif arch == "Qwen3ForCausalLM":
            qkv_bias = attention_bias  # Qwen3 has a flag too, default False
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
        window = None
        if arch == "MistralForCausalLM":
            window = hf.get("sliding_window")
        elif hf.get("use_sliding_window"):
            raise UnsupportedArchitectureError(
                f"{arch} with use_sliding_window=True (per-layer windows) is not supported")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
                             or 10000.0),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and arch == "LlamaForCausalLM",
            qk_norm=qk_norm,
            sliding_window=int(window) if window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_scaling(hf: dict) -> RopeScaling | None:
    # transformers 4.x writes `rope_scaling`, 5.x writes `rope_parameters` (which also holds theta).
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling("llama3", float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)),
                           float(rs.get("high_freq_factor", 4.0)),
                           int(rs.get("original_max_position_embeddings", 8192)))
    if kind == "linear":
        return RopeScaling("linear", float(rs["factor"]))
    raise UnsupportedArchitectureError(f"rope scaling type {kind!r} is not supported "
                                       "(supported: default, linear, llama3)")


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies [E/2] as float64 numpy, with the configured scaling applied.

    llama3 scaling (Llama 3.1 paper / Meta's reference code): wavelengths longer than
    original_max / low_freq_factor are divided by `factor`, shorter than original_max /
    high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    import numpy as np

    e = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    old = rs.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * inv / rs.factor + smooth * inv
    return np.where(wavelen > low_wavelen, inv / rs.factor, np.where(wavelen < high_wavelen, inv, mid))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine options, with vLLM's names where vLLM has the option."""

    model: str | None = None  # HF folder or .gguf file; None = the default model (SmolLM2-135M-Instruct)
    # "float32" | "bfloat16" | "auto": weights, activations and KV cache. "auto": bfloat16 where
    # the hardware multiplies it natively (GPU, TPU, a CPU with AVX512_BF16), else float32
    # (resolve_dtype; the CLI's default).
    dtype: str = "float32"
    max_model_len: int | None = None  # prompt + output tokens; None = min(model's limit, 2048)
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens computed per step (decode and prefill together)
    page_size: int = 16  # KV slots per page
    num_kv_pages: int | None = None  # KV cache size in pages (page 0 reserved); or by bytes:
    kv_cache_memory: int = 1 << 30  # bytes of K and V across layers, used when num_kv_pages is None
    enable_prefix_caching: bool = True
    decode_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # padded batch sizes of decode steps
    # Layers per compiled program (the nearest divisor of L is used), the same program for every
    # group. 15 on the default model (2 programs a step): batch-32 bf16 decode steps 35.2 / 37.0
    # ms against 37.5 / 38.9 with 10 and 39.4 / 35.5 with 30, batch 1 9.8-10.4 ms against
    # 11.3-12.8 (medians of 60 steps, two rounds, Zen 5, 2026-12-03); before, 5 ran 44.3-45.2 ms
    # at batch 32. Cold warmup 16.9 s against 14.0 with 5 (`benchmarks/warmup.py --dtypes
    # bfloat16 --layers-per-program N`). Results do not depend on it: bf16 programs round
    # every op on CPU (runner/programs.py), float32 ones need nothing.
    layers_per_program: int = 15
    # bf16 on one CPU device with AVX512_BF16: the programs take a copy of the projection
    # weights (and a tied head's table) packed for jaxserve's matmul kernel (kernels/
    # cpu_matmul.py `pack`), which holds the weights twice in memory. False: one copy, and the
    # kernel interleaves them on every call (1.3-1.8x slower projections; benchmarks/matmuls.py).
    # Skipped, with a warning, where two copies would take more than half the machine's memory.
    cpu_packed_weights: bool = True
    seed: int = 0  # seeds the draws of unseeded requests
    # Sharding (parallel.py). A user's jax.sharding.Mesh may be passed to Engine / LLM as `mesh=`.
    tensor_parallel_size: int = 1  # devices the heads, MLP width, vocabulary and KV heads split over
    # Several processes (hosts) serving one model (multihost.py); jax.distributed.initialize args.
    coordinator_address: str | None = None  # "host:port" of process 0; None: one process
    num_processes: int = 1
    process_id: int = 0
    # Scheduling (sched/): what the engine keeps for benchmarks and notebooks.
    record_steps: bool = False  # keep a StepRecord per step in Engine.step_records (records.py)
    # Sparse decode attention (kernels/sparse.py); None: every decode reads all its pages.
    sparse_attention: SparseAttentionConfig | None = None
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority" (lower first) | "fair" (VTC per client)
    preemption_mode: str = "recompute"  # "recompute" | "swap" (KV to host memory) | "auto"
    swap_space: int = 1 << 30  # bytes of host memory for swapped-out KV and the host prefix tier
    # Prefix-cached pages the device evicts are kept in swap_space and copied back on a later hit
    # (multi-turn chats) instead of recomputed (sched/host_tier.py). One process only.
    host_prefix_cache: bool = True
    # "chunked": prompt chunks share the decodes' batch; "layered": the prefill batch goes through
    # one group of layers per step while decodes go through all (runner/layered.py).
    prefill_policy: str = "chunked"
    # layered: ((at most tokens, stages), ...) ascending; None: the table measured for this
    # machine (runner/layered.py MEASURED_STAGES). Stages become divisors of the layer count.
    prefill_stages: tuple[tuple[int, int], ...] | None = None
    # Schedule and dispatch step n+1 before waiting for step n (vLLM's async scheduling): the
    # host's work overlaps the device's, stop checks lag a step, outputs are the same. Steps
    # run in order while a request uses penalties (they read the tokens on the host), and
    # always with layered prefill or several processes.
    async_scheduling: bool = True

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ConfigError("dtype", f"must be 'float32', 'bfloat16' or 'auto', got {self.dtype!r}")
        for name in ("tensor_parallel_size", "num_processes", "max_num_seqs",
                     "max_num_batched_tokens", "page_size", "kv_cache_memory"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError("process_id", f"must be in [0, num_processes={self.num_processes}), "
                                            f"got {self.process_id}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ConfigError("coordinator_address", "is needed when num_processes > 1 "
                                                      "('host:port' of process 0)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len", f"must be >= 2, got {self.max_model_len}")
        if self.num_kv_pages is not None and self.num_kv_pages < 2:
            raise ConfigError("num_kv_pages", f"must be >= 2 (page 0 is reserved), got "
                                              f"{self.num_kv_pages}")
        if self.scheduling_policy not in ("fcfs", "priority", "fair"):
            raise ConfigError("scheduling_policy", f"must be 'fcfs', 'priority' or 'fair', got "
                                                   f"{self.scheduling_policy!r}")
        if self.preemption_mode not in ("recompute", "swap", "auto"):
            raise ConfigError("preemption_mode", f"must be 'recompute', 'swap' or 'auto', got "
                                                 f"{self.preemption_mode!r}")
        if isinstance(self.swap_space, bool) or not isinstance(self.swap_space, int) \
                or self.swap_space < 0:
            raise ConfigError("swap_space", f"must be an integer >= 0 (bytes), got "
                                            f"{self.swap_space!r}")
        if self.preemption_mode != "recompute" and self.num_processes > 1:
            raise ConfigError("preemption_mode", "swap and auto run on one process only; use "
                                                 "'recompute' with num_processes > 1")
        if self.prefill_policy not in ("chunked", "layered"):
            raise ConfigError("prefill_policy", f"must be 'chunked' or 'layered', got "
                                                f"{self.prefill_policy!r}")
        if self.prefill_policy == "layered" and self.num_processes > 1:
            raise ConfigError("prefill_policy", "layered prefill runs on one process only; use "
                                                "'chunked' with num_processes > 1")
        if self.prefill_stages is not None and (
                not self.prefill_stages or any(len(row) != 2 or row[1] < 1 for row in self.prefill_stages)
                or [t for t, _ in self.prefill_stages] != sorted(t for t, _ in self.prefill_stages)):
            raise ConfigError("prefill_stages", f"must be (max tokens, stages >= 1) rows in "
                                                f"ascending order, got {self.prefill_stages}")
        if not self.decode_buckets or any(b < 1 for b in self.decode_buckets):
            raise ConfigError("decode_buckets", f"must be integers >= 1, got {self.decode_buckets}")

    @property
    def uses_host_kv(self) -> bool:
        """Whether swap_space bytes of host memory hold KV: swapped-out requests (swap / auto
        preemption) or the host prefix tier (prefix caching on), on one process."""
        return self.swap_space > 0 and self.num_processes == 1 and (
            self.preemption_mode != "recompute"
            or (self.enable_prefix_caching and self.host_prefix_cache))


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Sparse decode attention (kernels/sparse.py): in decode-only steps each request reads only
    a budget of its KV pages, chosen per layer by the Quest bound voted across heads, plus its
    first (sink) and most recent (window) pages. Prefill and mixed steps stay dense.

    The budget is `budget_tokens` keys per request or `budget_fraction` of each request's context
    (one of the two; default a fraction of 1/4, the README's quality table says why), never
    less than the sink and window pages."""

    budget_fraction: float | None = None  # share of a request's pages read; default 0.25
    budget_tokens: int | None = None  # or: keys read per request (rounded up to pages)
    sink_tokens: int = 16  # the first tokens, always read (attention sinks); rounded up to pages
    window_tokens: int = 64  # the most recent tokens, always read; rounded up to pages, >= 1
    min_context: int = 1024  # requests with a shorter context (tokens) attend densely
    # The first layers attend densely: their attention is spread, not sparse (Quest leaves the
    # first two layers dense).
    dense_layers: int = 2
    # Choose the pages at one decode step and reuse that choice for the next reuse_steps - 1
    # (Recycled Attention, arXiv 2411.05787; TokenSelect's selection cache): the steps between
    # skip the scoring, and still read every page that became new since (the window). 1: choose
    # at every step.
    reuse_steps: int = 1

    def __post_init__(self):
        if self.budget_fraction is not None and self.budget_tokens is not None:
            raise ConfigError("sparse_attention", "takes budget_fraction or budget_tokens, not both")
        if self.budget_fraction is None and self.budget_tokens is None:
            object.__setattr__(self, "budget_fraction", 0.25)
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ConfigError("sparse_attention.budget_fraction",
                              f"must be in (0, 1], got {self.budget_fraction!r}")
        for name, low in (("budget_tokens", 1), ("sink_tokens", 0), ("window_tokens", 1),
                          ("min_context", 0), ("dense_layers", 0), ("reuse_steps", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise ConfigError(f"sparse_attention.{name}",
                                  f"must be an integer >= {low}, got {value!r}")

    def describe(self) -> str:
        budget = (f"{self.budget_tokens} tokens" if self.budget_tokens is not None
                  else f"1/{1 / self.budget_fraction:g} of the context")
        return (f"sparse decode attention: {budget}, sink {self.sink_tokens}, window "
                f"{self.window_tokens}, from {self.min_context} tokens, first "
                f"{self.dense_layers} layers dense"
                + (f", pages chosen every {self.reuse_steps} steps" if self.reuse_steps > 1 else ""))


def resolve_dtype(dtype: str) -> str:
    """`EngineConfig.dtype` with "auto" made concrete for this machine: bfloat16 on GPU and TPU,
    and on a CPU whose C++ kernels use its bf16 dot instructions (AVX512_BF16: there bf16 is the
    faster dtype, 1.3-1.6x float32's tokens/s on Zen 5, docs/performance.md); float32 on other
    CPUs (without them, bf16 math is emulated and its only gain is bandwidth)."""
    if dtype != "auto":
        return dtype
    import jax

    if jax.default_backend() in ("gpu", "tpu"):
        return "bfloat16"
    from jaxserve.kernels import cpu_library

    return "bfloat16" if cpu_library.available() and cpu_library.has_bf16_dot() else "float32"
