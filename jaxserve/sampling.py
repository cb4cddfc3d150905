"""Sampling parameters (validated, vLLM's names and defaults) and the on-device sampler.

Host: `SamplingParams` per request. Each step the runner packs the batch with
`SamplingTensors.from_params(...)` into a few per-row arrays (and, only when some request uses
penalties, its token ids as padded [B, N] arrays), plus two static flags that select a compiled
variant (`all_greedy`, `needs_penalties`). Everything else is runtime data, so the engine
compiles three sampler variants per row count in warmup and nothing while serving: top-k, top-p,
logprobs each sit under a `lax.cond` on whether any row uses them (XLA runs only the branch taken).

Device: `sample(logits, tensors, ...)` runs inside the compiled step, pure jnp:
  penalties -> temperature -> min_p -> top_k -> top_p -> draw; greedy rows take the argmax.
No full sort of the vocabulary (a [64, 49152] sort costs ~1 s on CPU):
  - top_k: each row's k-th largest logit, a threshold: from one `lax.top_k` of 64 when k <= 64,
    else by bisection over the values' uint32 order keys (32 compare-and-count passes); k is data;
  - the draw is inverse-CDF sampling in two levels: the mass of 256-token blocks, a cumulative sum
    over blocks, then over the chosen block. One uniform number per row, no [B, V] cumsum.
    (Gumbel-max needs B*V random numbers: ~90 ms on this CPU; this needs B.)
  - ties at a top_k / top_p cutoff are all kept (thresholds, not sort positions).
  - top_p by rejection (after FlashInfer's "Sorting-Free GPU Kernels for LLM Sampling",
    flashinfer.ai blog, 2025): draw a token from the distribution restricted to logits above a
    pivot; it is in the nucleus iff the mass of strictly larger tokens is < top_p; if not, it and
    everything below it is out, so it becomes the pivot and we draw again. Accepted draws follow
    the renormalized nucleus distribution exactly; one pass over [B, V] per round, ~2-3 rounds.
Randomness: a request's key is fold_in(PRNGKey(seed), output_position) (round r of top_p rejection
folds in r too), so a seeded request samples the same tokens in any batch slot or batch.
Logprobs are those of the raw model distribution (log_softmax of the logits before any processing),
as vLLM returns by default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.errors import JaxserveError

Array = jax.Array | np.ndarray  # numpy on the host after from_params, jax.Array once on device

MAX_LOGPROBS = 20  # as OpenAI's API (and vLLM's default max_logprobs)
MAX_STOP_TOKEN_IDS = 256  # banned under min_tokens through a fixed-width array (runner/batch.py)
_GREEDY_TEMPERATURE = 1e-5  # below this, temperature means greedy (vLLM's _SAMPLING_EPS)
_BLOCK = 256  # inverse-CDF block size
_MIN_BUCKET = 16  # smallest padded length for token-id lists and the top-k candidate count
_TOP_K_FAST = 64  # top-k up to this from one lax.top_k; larger k by bisection
_MAX_TOP_P_ROUNDS = 32  # rejection rounds before a row falls back to its most likely token


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
    want_logprobs: Array  # bool[]: some row asked for top log-probs (computed only then)
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
            want_logprobs=np.bool_(any(p.logprobs for p in params_list)),
            all_greedy=bool(is_greedy.all()), needs_penalties=bool(penalized))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B], log_softmax(raw logits) at token_ids
    top_logprob_ids: jax.Array | None = None  # i32[B, k], k = num_logprobs > 0
    top_logprobs: jax.Array | None = None  # f32[B, k]
    ranks: jax.Array | None = None  # i32[B], 1 + number of tokens more likely than the chosen one


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """vLLM's penalties: repetition over prompt+output tokens (positive logits divided, others
    multiplied), then frequency * count and presence * [count > 0] over output tokens subtracted."""
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    counts = jnp.zeros((num_rows, vocab), jnp.int32).at[rows, t.output_token_ids].add(
        1, mode="drop")  # [B, V]; padding (id V) is dropped
    in_output = counts > 0
    seen = in_output.at[rows, t.prompt_token_ids].set(True, mode="drop")  # [B, V]
    penalty = jnp.where(seen, t.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return (logits - t.frequency_penalty[:, None] * counts
            - t.presence_penalty[:, None] * in_output)


def _blocked(x: jax.Array, fill: float) -> jax.Array:
    """[B, V] -> [B, V / _BLOCK, _BLOCK] (the blocks of the two-level searches), last one padded."""
    num_rows, vocab = x.shape
    num_blocks = -(-vocab // _BLOCK)
    if num_blocks * _BLOCK != vocab:
        x = jnp.pad(x, ((0, 0), (0, num_blocks * _BLOCK - vocab)), constant_values=fill)
    return x.reshape(num_rows, num_blocks, _BLOCK)


def _gather_block(x: jax.Array, block: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, block[:, None, None], axis=1)[:, 0]  # [B, blocks, _BLOCK] -> [B, _BLOCK]


def _argmax(z: jax.Array, block_max: jax.Array) -> jax.Array:
    """First index of the maximum of z: [B, blocks, _BLOCK], given block_max = z.max(-1).

    The first block holding the maximum, then the first position in it: the same as jnp.argmax,
    whose variadic reduction is ~4x slower than a max on XLA's CPU backend."""
    block = jnp.argmax(block_max, axis=-1)
    return (block * _BLOCK + jnp.argmax(_gather_block(z, block), axis=-1)).astype(jnp.int32)


def _draw(mass: jax.Array, weights: jax.Array, z: jax.Array, pivot: jax.Array,
          u: jax.Array) -> jax.Array:
    """Inverse-CDF draw of a token with probability proportional to weights where z > pivot.

    weights, z: [B, blocks, _BLOCK]; mass: f32[B, blocks], each block's weight above the pivot;
    pivot: f32[B]; u: f32[B] uniform in [0, 1). Two levels, so that no [B, V] cumulative sum is
    needed (XLA's CPU cumsum of [64, 49152] alone costs ~40 ms). Returns i32[B] token ids.
    """
    cum = jnp.cumsum(mass, axis=-1)  # [B, blocks]
    total = cum[:, -1]
    target = jnp.minimum(u * total, jnp.nextafter(total, 0.0))  # < total despite rounding
    block = jnp.sum(cum <= target[:, None], axis=-1)  # first block whose cumulative mass > target
    before = jnp.take_along_axis(cum, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0]
    before = jnp.where(block > 0, before, 0.0)
    inside = jnp.where(_gather_block(z, block) > pivot[:, None], _gather_block(weights, block), 0.0)
    index = jnp.sum(jnp.cumsum(inside, axis=-1) <= (target - before)[:, None], axis=-1)
    last_positive = _BLOCK - 1 - jnp.argmax(inside[:, ::-1] > 0, axis=-1)  # if rounding overshot
    return (block * _BLOCK + jnp.minimum(index, last_positive)).astype(jnp.int32)


def _sample_random(z: jax.Array, block_max: jax.Array, greedy: jax.Array,
                   t: SamplingTensors) -> jax.Array:
    """Draw from softmax(z / temperature) after min_p, top_k and top_p; i32[B].

    z: f32[B, blocks, _BLOCK] (penalized logits, padding -inf); block_max: f32[B, blocks];
    greedy: i32[B], the argmax (always in the support: the fallback of top_p rejection)."""
    num_rows = z.shape[0]
    temperature = t.temperature[:, None, None]
    weights = jnp.exp((z - block_max.max(axis=-1)[:, None, None]) / temperature)  # max 1
    keep = weights >= t.min_p[:, None, None]  # p / p_max >= min_p (min_p 0 keeps all)
    keep &= z >= _top_k_threshold(z, t.top_k)[:, None, None]
    weights = jnp.where(keep, weights, 0.0)
    # Materialize once: otherwise XLA fuses exp() into every consumer and recomputes it per round.
    weights = jax.lax.optimization_barrier(weights)
    mass = weights.sum(axis=-1)  # [B, blocks]
    pivot = jnp.full(num_rows, -jnp.inf, z.dtype)
    keys = jax.vmap(lambda data, position: jax.random.fold_in(
        jax.random.wrap_key_data(data, impl="threefry2x32"), position))(t.key_data, t.output_positions)

    def uniform(draw):
        return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, draw)))(keys)  # f32[B]

    budget = t.top_p * mass.sum(axis=-1)  # nucleus mass, renormalized after top_k / min_p
    no_top_p = t.top_p >= 1

    def round_(state):
        # One pass over [B, V] per round: the masses above the candidate are both the acceptance
        # test and, if it is rejected, the block masses of the next round's draw.
        step, tokens, done, pivot, mass = state
        candidate = _draw(mass, weights, z, pivot, uniform(step))
        z_candidate = jnp.take_along_axis(z.reshape(num_rows, -1), candidate[:, None], 1)  # [B, 1]
        mass_above = jnp.where(z > z_candidate[:, :, None], weights, 0.0).sum(axis=-1)  # [B, blocks]
        accept = ~done & ((mass_above.sum(axis=-1) < budget) | no_top_p)
        reject = ~done & ~accept
        return (step + 1, jnp.where(accept, candidate, tokens), done | accept,
                jnp.where(reject, z_candidate[:, 0], pivot), jnp.where(reject[:, None], mass_above, mass))

    def nucleus():
        state = (jnp.int32(0), greedy, jnp.zeros(num_rows, bool), pivot, mass)
        return jax.lax.while_loop(lambda s: (s[0] < _MAX_TOP_P_ROUNDS) & ~jnp.all(s[2]),
                                  round_, state)[1]

    # Without top-p every row accepts the first draw: skip the loop's acceptance pass.
    return jax.lax.cond(jnp.any(~no_top_p & ~t.is_greedy), nucleus,
                        lambda: _draw(mass, weights, z, pivot, uniform(0)))


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values x (-0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_order_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _top_k_threshold(z: jax.Array, k: jax.Array) -> jax.Array:
    """f32[B]: each row's k-th largest value of z ([B, ...]); -inf where k is 0 (off).

    k <= _TOP_K_FAST (the usual top-k) from one lax.top_k of that static size; larger k by
    bisection (_kth_largest: exact, but 32 passes over the row, measured ~15x slower than
    lax.top_k(64) at 64 x 49152). Each under a lax.cond: steps without such rows skip it."""
    num_rows = z.shape[0]
    none = lambda: jnp.full(num_rows, -jnp.inf, z.dtype)  # noqa: E731
    small, large = (k > 0) & (k <= _TOP_K_FAST), k > _TOP_K_FAST

    def fast():
        values, _ = jax.lax.top_k(z.reshape(num_rows, -1), _TOP_K_FAST)  # [B, K]
        return jnp.take_along_axis(values, jnp.clip(k - 1, 0, _TOP_K_FAST - 1)[:, None], 1)[:, 0]

    kth = jnp.where(small, jax.lax.cond(jnp.any(small), fast, none), -jnp.inf)
    return jnp.where(large, jax.lax.cond(jnp.any(large), lambda: _kth_largest(
        z, jnp.where(large, k, 0)), none), kth)


def _kth_largest(z: jax.Array, k: jax.Array) -> jax.Array:
    """f32[B]: the k-th largest value of each row of z ([B, ...]); -inf where k is 0.

    A bisection over the values' uint32 order keys, 32 rounds of one compare-and-count pass
    each, so that k is runtime data (lax.top_k needs a static k, and a bucket of k per compile)."""
    keys = _order_key(z.reshape(z.shape[0], -1))
    lo = jnp.zeros(z.shape[0], jnp.uint32)  # invariant: count(keys >= lo) >= k
    hi = jnp.full(z.shape[0], 0xFFFFFFFF, jnp.uint32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # upper middle, no overflow
        ok = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.where(k > 0, _from_order_key(lo), -jnp.inf)


def token_logprobs(logits: jax.Array, token_ids: jax.Array, num_logprobs: int):
    """(chosen log-prob [B], top ids [B, k], top log-probs [B, k], ranks [B]) of raw logits."""
    log_norm = jax.nn.logsumexp(logits, axis=-1)  # [B]
    chosen = jnp.take_along_axis(logits, token_ids[:, None], 1)[:, 0]  # [B]
    if num_logprobs == 0:
        return chosen - log_norm, None, None, None
    top_values, top_ids = jax.lax.top_k(logits, num_logprobs)  # [B, k]
    ranks = 1 + jnp.sum(logits > chosen[:, None], axis=-1, dtype=jnp.int32)
    return chosen - log_norm, top_ids.astype(jnp.int32), top_values - log_norm[:, None], ranks


def maybe_token_logprobs(logits: jax.Array, token_ids: jax.Array, num_logprobs: int,
                         want: jax.Array):
    """token_logprobs, with the top log-probs and ranks computed only when `want` (a runtime
    bool) holds; zeros otherwise. One program serves steps with and without log-probs."""
    if num_logprobs == 0:
        return token_logprobs(logits, token_ids, 0)
    chosen, *_ = token_logprobs(logits, token_ids, 0)
    num_rows = logits.shape[0]
    empty = (jnp.zeros((num_rows, num_logprobs), jnp.int32),
             jnp.zeros((num_rows, num_logprobs), jnp.float32), jnp.zeros(num_rows, jnp.int32))
    top = jax.lax.cond(want, lambda: token_logprobs(logits, token_ids, num_logprobs)[1:],
                       lambda: empty)
    return chosen, *top


def sample(logits: jax.Array, t: SamplingTensors, *, all_greedy: bool, needs_penalties: bool,
           num_logprobs: int) -> SamplerOutput:
    """One token per row of `logits` (f32[B, V]). The keyword flags are static: pass
    `t.all_greedy` and `t.needs_penalties`; num_logprobs is how many top log-probs a row can get
    (they are computed only in steps where `t.want_logprobs`)."""
    logits = logits.astype(jnp.float32)
    z = _blocked(apply_penalties(logits, t) if needs_penalties else logits, -jnp.inf)
    block_max = z.max(axis=-1)  # [B, blocks]
    token_ids = _argmax(z, block_max)
    if not all_greedy:
        token_ids = jnp.where(t.is_greedy, token_ids, _sample_random(z, block_max, token_ids, t))
    return SamplerOutput(token_ids, *maybe_token_logprobs(logits, token_ids, num_logprobs,
                                                          t.want_logprobs))
