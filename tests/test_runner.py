"""The runner's compiled programs: the KV cache is never copied, buckets cover every batch."""

import re

import jax
import pytest

from jaxserve.runner import Bucket


@pytest.fixture(scope="module")
def runner(make_tiny_engine):
    return make_tiny_engine().runner


def cache_copies(hlo: str, cache_shape) -> list[str]:
    shape = "f32[" + ",".join(map(str, cache_shape)) + "]"
    return [line for line in hlo.splitlines()
            if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} copy\(", line)]


def test_no_program_copies_the_cache(runner):
    cache_shape = runner.kv[0][0].shape
    for b in runner.all_buckets():
        ids, md, li = runner._dummy_batch(b)
        g = runner.layers_per_program
        lp, lkv = runner.params["layers"][:g], runner.kv[:g]
        hidden = jax.numpy.zeros((b.num_tokens, runner.config.hidden_size))
        layers_hlo = runner._layers.lower(lp, lkv, hidden, md).compile().as_text()
        assert not cache_copies(layers_hlo, cache_shape), b
        _, new_kv, _ = runner._forward(b, ids, md, li)
        write_hlo = runner._write.lower(runner.kv, new_kv, md.slot_mapping).compile().as_text()
        assert not cache_copies(write_hlo, cache_shape), b
        # the write is in place: its outputs alias the donated cache
        assert "input_output_alias" in write_hlo or "may-alias" in write_hlo


def test_buckets_cover_every_batch(runner):
    e = runner.engine
    for n_req in range(1, e.max_num_seqs + 1):
        assert runner.bucket_for(n_req, n_req, True) == Bucket(
            min(b for b in runner.decode_buckets if b >= n_req), min(b for b in runner.decode_buckets
                                                                      if b >= n_req), 1)
        for n_tok in range(n_req, e.max_num_batched_tokens + 1):
            b = runner.bucket_for(n_tok, n_req, False)
            assert b.num_tokens >= n_tok and b.num_requests >= n_req
            # room for any split into query blocks: sum(ceil(q / Qb)) <= R + T / Qb
            assert b.num_blocks >= n_req + n_tok // b.query_block
    assert runner.num_compilations > 0
