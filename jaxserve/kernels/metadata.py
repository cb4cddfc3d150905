"""`AttentionMetadata`: the flat ragged batch one compiled step sees.

Tokens of all scheduled requests (decode tokens and prefill chunks alike) travel on one flat
token axis T, request after request, as in vLLM V1 and ragged paged attention. The host builds
this with numpy (`build_metadata`), padded to a shape bucket; padding tokens write their K/V
into page 0, which the page manager never hands out, and belong to no request.

The jnp reference attention walks the batch in *query blocks*: each block holds up to
`query_block` consecutive tokens of one request, so a decode token is a block of one and a
long prefill chunk is several blocks. With `query_block = 1` (decode-only buckets) the work is
exactly one query against its own request's pages; larger blocks amortise the page gather
over several prefill tokens.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax

import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array  # [T] int32 position of each token in its request
    slot_mapping: jax.Array  # [T] int32 flat KV slot (page * S + offset) each token writes
    query_start: jax.Array  # [R+1] int32 first token of each request on T; padding rows repeat the end
    kv_lens: jax.Array  # [R] int32 tokens in the cache for each request after this step (0 = padding)
    page_table: jax.Array  # [R, P] int32 pages of each request, in order; unused entries 0
    block_request: jax.Array  # [N] int32 request of each query block
    block_start: jax.Array  # [N] int32 first token of each query block on T
    block_len: jax.Array  # [N] int32 valid tokens in each block (0 = padding block)
    query_block: int = dataclasses.field(metadata=dict(static=True), default=1)  # tokens per block
    # every request has exactly one new token (a decode-only step): the jnp path then attends to
    # the cache and the token itself without gathering this step's K/V per cache position
    decode_only: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def num_query_blocks(query_lens, query_block: int) -> int:
    """How many query blocks a batch of requests with these query lengths needs."""
    return int(sum(-(-int(q) // query_block) for q in query_lens))


def build_metadata(*, query_lens, kv_lens, page_tables, page_size: int, num_tokens: int,
                   num_requests: int, num_pages_per_request: int, num_blocks: int,
                   query_block: int) -> AttentionMetadata:
    """Lay out a ragged batch on host (numpy), padded to the given bucket sizes.

    query_lens[r]: new tokens of request r this step; kv_lens[r]: its cached tokens after the
    step (so its new tokens sit at positions kv_len - query_len ... kv_len - 1);
    page_tables[r]: its page ids, enough to cover kv_lens[r].
    """
    q = np.asarray(query_lens, np.int64)
    kv = np.asarray(kv_lens, np.int64)
    r_used = len(q)
    if r_used > num_requests or q.sum() > num_tokens:
        raise ValueError(f"batch of {r_used} requests / {q.sum()} tokens exceeds bucket "
                         f"{num_requests} / {num_tokens}")
    # Vectorized over requests and tokens (a Python loop per request cost ~1.5 ms a step at 64
    # requests: benchmarks/host.py). Each array below is a ragged batch flattened in order.
    needed = -(-kv // page_size)  # pages covering each request's tokens
    have = np.fromiter(map(len, page_tables), np.int64, r_used)
    bad = np.flatnonzero((have < needed) | (needed > num_pages_per_request))
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"request {r}: {kv[r]} tokens need {needed[r]} pages; table has "
                         f"{have[r]}, bucket allows {num_pages_per_request}")
    table = np.zeros((num_requests, num_pages_per_request), np.int32)
    table[:r_used][np.arange(num_pages_per_request) < needed[:, None]] = np.fromiter(
        itertools.chain.from_iterable(p[:n] for p, n in zip(page_tables, needed.tolist())),
        np.int32, int(needed.sum()))
    query_start = np.full(num_requests + 1, q.sum(), np.int32)
    query_start[: r_used + 1] = np.concatenate([[0], np.cumsum(q)])
    n = int(q.sum())
    of = np.repeat(np.arange(r_used), q)  # the request of each token
    pos = kv[of] - q[of] + np.arange(n) - query_start[of]
    positions = np.zeros(num_tokens, np.int32)
    slots = np.zeros(num_tokens, np.int32)  # padding writes slot 0 of the reserved page 0
    positions[:n] = pos
    slots[:n] = table[of, pos // page_size] * page_size + pos % page_size
    kv_out = np.zeros(num_requests, np.int32)
    kv_out[:r_used] = kv
    blocks = -(-q // query_block)  # query blocks of each request
    if blocks.sum() > num_blocks:
        raise ValueError(f"batch needs more than the bucket's {num_blocks} query blocks")
    used = int(blocks.sum())
    block_request = np.zeros(num_blocks, np.int32)
    block_start = np.zeros(num_blocks, np.int32)
    block_len = np.zeros(num_blocks, np.int32)
    block_request[:used] = np.repeat(np.arange(r_used), blocks)
    off = (np.arange(used) - np.repeat(np.cumsum(blocks) - blocks, blocks)) * query_block
    block_start[:used] = query_start[block_request[:used]] + off
    block_len[:used] = np.minimum(query_block, q[block_request[:used]] - off)
    decode_only = query_block == 1 and r_used > 0 and bool(np.all(q[:r_used] == 1))
    return AttentionMetadata(positions, slots, query_start, kv_out, table, block_request,
                             block_start, block_len, query_block, decode_only)
