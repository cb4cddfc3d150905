"""The on-device sampler: `sample(logits, tensors, ...)` runs inside the compiled step, pure jnp,
on the per-row arrays `sampling.SamplingTensors` packs on the host:
  penalties -> temperature -> min_p -> top_k -> top_p -> draw; greedy rows take the argmax.
Top-k, top-p and logprobs each sit under a `lax.cond` on whether any row uses them (XLA runs
only the branch taken), so they are runtime data, not compiled variants.
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

import jax
import jax.numpy as jnp

from jaxserve.sampling import SamplingTensors

_BLOCK = 256  # inverse-CDF block size
_TOP_K_FAST = 64  # top-k up to this from one lax.top_k; larger k by bisection
_MAX_TOP_P_ROUNDS = 32  # rejection rounds before a row falls back to its most likely token


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
    """token_logprobs when `want` (a runtime bool: some row asked for log-probs) holds; zeros
    otherwise. One program serves steps with and without log-probs, and steps without pay
    nothing: the log-normaliser alone (an exp of every logit) was 3.5 ms of a 55 ms batch-32
    decode step of the default model in bf16 (benchmarks/decode_profile.py, "sampler")."""
    compute = lambda: token_logprobs(logits, token_ids, num_logprobs)
    skip = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(compute))
    return jax.lax.cond(want, compute, skip)


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
