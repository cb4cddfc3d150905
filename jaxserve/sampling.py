"""Sampling parameters: validated, with vLLM's names and defaults, and packed per step.

Host: `SamplingParams` per request. Each step the runner packs the batch with
`SamplingTensors.from_params(...)` into a few per-row arrays (and, only when some request uses
penalties, its token ids as padded [B, N] arrays), plus two static flags that select a compiled
variant (`all_greedy`, `needs_penalties`). Everything else is runtime data, so the engine
compiles three sampler variants per row count in warmup and nothing while serving. The device
side, `sampler.sample`, takes the packed tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np

from jaxserve.errors import JaxserveError

Array = jax.Array | np.ndarray  # numpy on the host after from_params, jax.Array once on device

MAX_LOGPROBS = 20  # as OpenAI's API (and vLLM's default max_logprobs)
MAX_STOP_TOKEN_IDS = 256  # banned under min_tokens through a fixed-width array (runner/batch.py)
_GREEDY_TEMPERATURE = 1e-5  # below this, temperature means greedy (vLLM's _SAMPLING_EPS)
_MIN_BUCKET = 16  # smallest padded length for token-id lists and the top-k candidate count


class SamplingParamsError(JaxserveError, ValueError):
    """A sampling parameter outside its allowed range; the message names it and the range."""


def _check_int(name: str, value, *, low: int, allow_none: bool = False, rule: str | None = None):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise SamplingParamsError(f"{name} must be {rule or f'an integer >= {low}'}"
                                  f"{' or None' if allow_none else ''}, got {value!r}")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_float(name: str, value, ok, rule: str):
    # The sampler runs in float32: a value beyond its range would become inf there.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or not ok(value):
        raise SamplingParamsError(f"{name} must be {rule}, got {value!r}")
    if abs(value) > _FLOAT32_MAX:
        raise SamplingParamsError(f"{name} must be {rule} and at most {_FLOAT32_MAX:.4g} "
                                  f"(float32), got {value!r}")


@dataclasses.dataclass(frozen=True, repr=False)
class SamplingParams:
    """How to sample one request's output (vLLM's names, meanings and defaults).

    temperature 0 (or top_k 1) is greedy. top_k 0 or -1 is off (stored as 0). stop is normalized to
    a list of strings and stop_token_ids to a list of ints. Change a field with dataclasses.replace,
    which validates again.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        _check_int("n", self.n, low=1)
        _check_float("temperature", self.temperature, lambda v: v >= 0, ">= 0")
        _check_float("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _check_int("top_k", self.top_k, low=-1, rule="-1 or 0 (off) or an integer >= 1")
        _check_float("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2]")
        _check_float("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not -2**63 <= self.seed < 2**64):
            raise SamplingParamsError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise SamplingParamsError(f"stop must be a non-empty string or a list of non-empty strings, "
                                      f"got {self.stop!r}")
        stop_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(stop_ids, (list, tuple)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in stop_ids):
            raise SamplingParamsError(f"stop_token_ids must be a list of integers >= 0, "
                                      f"got {self.stop_token_ids!r}")
        if len(set(stop_ids)) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} distinct "
                                      f"ids, got {len(set(stop_ids))}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("max_tokens", self.max_tokens, low=1, allow_none=True)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                                      f"got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise SamplingParamsError(f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        object.__setattr__(self, "stop", list(stop))
        object.__setattr__(self, "stop_token_ids", [int(i) for i in stop_ids])
        object.__setattr__(self, "top_k", 0 if self.top_k == -1 else int(self.top_k))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != ([] if f.name in ("stop", "stop_token_ids") else f.default)]
        return f"SamplingParams({', '.join(changed)})"


def _bucket(n: int) -> int:
    """0 for 0, else the next power of two >= max(n, _MIN_BUCKET)."""
    return 0 if n == 0 else max(_MIN_BUCKET, 1 << (n - 1).bit_length())


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """One step's sampling parameters for a padded batch of B rows (pad rows are greedy)."""

    temperature: Array  # f32[B], 1 on greedy rows
    is_greedy: Array  # bool[B]
    top_k: Array  # i32[B], 0 = off
    top_p: Array  # f32[B]
    min_p: Array  # f32[B]
    presence_penalty: Array  # f32[B]
    frequency_penalty: Array  # f32[B]
    repetition_penalty: Array  # f32[B]
    key_data: Array  # u32[B, 2], threefry key data of PRNGKey(seed)
    output_positions: Array  # i32[B], index in the output of the token being sampled
    output_token_ids: Array  # i32[B, N] tokens generated so far, padded with V; N = 0 without penalties
    prompt_token_ids: Array  # i32[B, M] prompts of rows with repetition_penalty != 1, padded with V
    want_logprobs: Array  # bool[]: some row asked for log-probs (logprobs >= 0; computed only then)
    # Static flags (part of the compile key). Everything else (top-k, top-p, min-p, seeds,
    # whether log-probs are wanted) is runtime data, so that serving compiles nothing new.
    all_greedy: bool = _static(default=True)
    needs_penalties: bool = _static(default=False)

    @classmethod
    def from_params(cls, params_list: Sequence[SamplingParams], output_positions: Sequence[int],
                    output_token_ids: Sequence[Sequence[int]], prompt_token_ids: Sequence[Sequence[int]],
                    vocab_size: int, pad_to: int, *, rng: np.random.Generator | None = None,
                    token_width: int | None = None) -> SamplingTensors:
        """Pack R requests into B = pad_to rows. Unseeded requests get a seed drawn from `rng`
        (default: fresh OS entropy). token_width: the fixed width of the token-id arrays the
        penalties need (the engine passes max_model_len, so that their shape never changes);
        None: the next power of two that holds them."""
        num = len(params_list)
        if not len(output_positions) == len(output_token_ids) == len(prompt_token_ids) == num:
            raise ValueError("params_list, output_positions, output_token_ids and prompt_token_ids "
                             f"must have one entry per request, got lengths {len(params_list)}, "
                             f"{len(output_positions)}, {len(output_token_ids)}, {len(prompt_token_ids)}")
        if pad_to < num:
            raise ValueError(f"pad_to ({pad_to}) must be >= the number of requests ({num})")
        rows = np.zeros(pad_to, np.float32)
        temperature, top_p, repetition = rows + 1, rows + 1, rows + 1
        min_p, presence, frequency = rows.copy(), rows.copy(), rows.copy()
        is_greedy = np.ones(pad_to, bool)
        top_k = np.zeros(pad_to, np.int32)
        key_data = np.zeros((pad_to, 2), np.uint32)
        positions = np.zeros(pad_to, np.int32)
        positions[:num] = output_positions
        penalized, repeated = [], []
        for i, p in enumerate(params_list):
            if not p.is_greedy:
                is_greedy[i] = False
                temperature[i], top_p[i], min_p[i] = p.temperature, p.top_p, p.min_p
                top_k[i] = p.top_k if p.top_k < vocab_size else 0
            presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
            repetition[i] = p.repetition_penalty
            if p.uses_penalties:
                penalized.append(i)
                if p.repetition_penalty != 1:
                    repeated.append(i)
            if p.seed is None:
                rng = rng or np.random.default_rng()
                seed = int(rng.integers(0, 2**64, dtype=np.uint64))
            else:
                seed = int(p.seed) % 2**64
            key_data[i] = (seed >> 32, seed & 0xFFFFFFFF)  # what PRNGKey(seed) holds

        def padded(ids: Sequence[Sequence[int]], which: list[int]) -> np.ndarray:
            longest = max((len(ids[i]) for i in which), default=0)
            if token_width is not None and longest > token_width:
                raise ValueError(f"{longest} token ids do not fit token_width={token_width}")
            width = 0 if not penalized else token_width or _bucket(longest)
            out = np.full((pad_to, width), vocab_size, np.int32)
            for i in which:
                out[i, :len(ids[i])] = ids[i]
            return out

        return cls(
            temperature=temperature, is_greedy=is_greedy, top_k=top_k, top_p=top_p, min_p=min_p,
            presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
            key_data=key_data, output_positions=positions,
            output_token_ids=padded(output_token_ids, penalized),
            prompt_token_ids=padded(prompt_token_ids, repeated),
            want_logprobs=np.bool_(any(p.logprobs is not None for p in params_list)),
            all_greedy=bool(is_greedy.all()), needs_penalties=bool(penalized))
