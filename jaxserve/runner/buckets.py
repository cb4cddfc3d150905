"""Shape buckets: every compiled program is keyed by the padded shape of a step.

  decode-only steps: T = R = N (one query block per request), from `decode_buckets`;
  steps with prefill: T a power of two from 16 to max_num_batched_tokens, R = min(T, max_num_seqs)
  in the largest bucket and T/4 below it, query blocks of 16 tokens, N = R + T / 16 blocks
  (enough for any split of T tokens over R).

The page-table width is fixed at max_model_len / page_size: the attention loops only over the
pages the longest request needs, so context length is no bucket dimension.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxserve.config import EngineConfig, ModelConfig

PREFILL_QUERY_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Bucket:
    num_tokens: int  # T
    num_requests: int  # R
    query_block: int  # tokens per attention query block

    @property
    def num_blocks(self) -> int:  # N
        return self.num_tokens if self.query_block == 1 else (
            self.num_requests + self.num_tokens // self.query_block)


class Buckets:
    """The buckets an engine configuration compiles, and the one each step runs in."""

    def __init__(self, engine: EngineConfig):
        self.max_num_seqs = engine.max_num_seqs
        self.decode = sorted({min(b, engine.max_num_seqs) for b in engine.decode_buckets}
                             | {engine.max_num_seqs})
        self.tokens = powers_of_two(min(16, engine.max_num_batched_tokens),
                                    engine.max_num_batched_tokens)

    def sampler_rows(self, num_requests: int) -> int:
        """Rows of the logits and the sampler: 1, then powers of 8 up to max_num_seqs, so that
        three sampler variants per row count, compiled in warmup, serve every bucket. The head
        itself computes only the bucket's request rows and pads with zero rows (runner: 8 rows
        of the tied head took 15.4 ms against 5.3 for 1 on this CPU, so a batch-1 step paid
        10 ms). A batch-1 decode step pads nothing: its head and sampler run on one row
        (bf16 b1 decode steps 8.89 against 9.17 ms with 8 rows, medians of 8 alternating
        rounds of 60 steps, Zen 5, 2026-12-03), for three more sampler programs in warmup."""
        return next(r for r in self.sampler if r >= num_requests)

    @property
    def sampler(self) -> list[int]:
        rows, r = [1], 8
        while r < self.max_num_seqs:
            rows.append(r)
            r *= 8
        return rows + [self.max_num_seqs] if self.max_num_seqs > 1 else rows

    def prefill(self, t: int) -> Bucket:
        # Up to T/4 requests (all of them in the largest bucket): every padding request costs a
        # padding query block (measured: a 128-token prefill padded to 64 requests spent most of
        # its attention on them).
        r = t if t == self.tokens[-1] else max(1, t // 4)
        return Bucket(t, min(r, self.max_num_seqs), PREFILL_QUERY_BLOCK)

    @property
    def largest(self) -> Bucket:
        return self.prefill(self.tokens[-1])

    def for_step(self, num_tokens: int, num_requests: int, decode_only: bool) -> Bucket:
        if decode_only:
            r = next(b for b in self.decode if b >= num_requests)
            return Bucket(r, r, 1)
        for t in self.tokens:
            b = self.prefill(t)
            if t >= num_tokens and b.num_requests >= num_requests:
                return b
        raise ValueError(f"no bucket holds {num_tokens} tokens of {num_requests} requests")

    def all(self) -> list[Bucket]:
        return [Bucket(r, r, 1) for r in self.decode] + [self.prefill(t) for t in self.tokens]


def powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


def group_size(num_layers: int, target: int) -> int:
    """The divisor of num_layers nearest to target, so every group runs the same program."""
    return min((d for d in range(1, num_layers + 1) if num_layers % d == 0),
               key=lambda d: (abs(d - target), -d))


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype, *, summaries: bool = False) -> int:
    """Bytes of one KV page: K and V of every layer, and the float32 key summaries of sparse
    attention when kept (1/S of the keys' size in float32)."""
    per_page = 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * \
        jnp.dtype(dtype).itemsize
    if summaries:
        per_page += 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    return per_page


def pages_for_bytes(config: ModelConfig, page_size: int, dtype, num_bytes: int, *,
                    summaries: bool = False) -> int:
    """How many KV pages fit in `num_bytes` (see kv_bytes_per_page)."""
    return max(2, num_bytes // kv_bytes_per_page(config, page_size, dtype, summaries=summaries))
