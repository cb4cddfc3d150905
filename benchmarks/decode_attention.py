"""Decode attention on CPU: the jnp path against variants of it, and against its bandwidth floor.

    python benchmarks/decode_attention.py [--batches 1,8,32,64] [--contexts 256,1024]
        [--dtypes float32,bfloat16] [--repeats 7] [--variants all] [--chunks=-2048,64]

One layer of the default model's shape (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64,
pages of 16), B decode requests with `context` cached tokens each on shuffled pages, a page
table as wide as the runner's (max_model_len 2048), NaN in every slot not cached. A bf16 cache
is stored as its uint16 bits, as on CPU (kernels/storage.py). Every variant is checked against
the landed path on the same inputs, then all are timed interleaved in one process (rounds in
rotated order: the machine is shared): "ms" is the least time of the rounds, "paired" the median
over rounds of landed's time / the row's time in the same round (robust to load that drifts
between rounds; > 1: the row is faster), "cpu ms" the least process CPU time (all threads). Every call starts
with cold caches (see flush). The floor is the KV bytes the step must read over the copy
bandwidth (numpy, read + write, as decode_profile.py counts it), the best measured between
rounds.

Rows by default: `landed` (kernels.ragged_paged_attention as the model calls it: the C++
kernel of kernels/cpu_paged_attention.cc where it builds), `jnp path` (the pure-jnp decode path,
ref_ragged_paged_attention: chunks of DECODE_STEP_TOKENS / B positions, at most 256), and
`gather only` (the jnp path's chunk loop gathering each chunk's K and V pages and summing
them: the limit of any formulation that gathers pages before its products). `--variants all` adds the alternatives tried, each at every
--chunks value (-T: T positions of all requests together per step, the chunk T / B, at most 256):
  landed products  the landed formulation at that chunk size
  (a) mulreduce    no dots: scores and PV as multiply + reduce, the gather fused into them
                   (XLA:CPU 0.10 miscompiles it at B=1: jitted it differs from the same code
                   run op by op, which matches the landed path; the check prints WRONG)
  (b) keys as rows both products with the keys (values) as the rows: [N, K, C, E] operands
  (e) E-rows       the same, gathered straight into [N, K, C, E] from the landed layout as rows
                   of E, the indices computed before the loop
  (f) PKSE layout  the same from a [P, K, S, E] cache (a transposed copy), rows of S*E
What they measured is in docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import kernels
from jaxserve.kernels import build_metadata
from jaxserve.kernels.storage import BITS, from_storage, to_storage

# the package re-exports a function of the module's name, so fetch the module itself
rpa = importlib.import_module("jaxserve.kernels.ragged_paged_attention")

H, K, E, S, MAX_LEN = 9, 3, 64, 16, 2048
G = H // K
F32 = jnp.float32


def _setup(md, q, chunk_tokens):
    """What every variant needs: the query of each block, its cached length, its page table
    padded to whole chunks, and how many chunks the loop runs."""
    n = md.block_start.shape[0]
    valid_block = md.block_len > 0
    tok = jnp.where(valid_block, md.block_start, 0)
    qs = q[tok].reshape(n, K, G, E)
    cached = md.kv_lens[md.block_request] - 1
    if chunk_tokens < 0:  # -T: T positions of all blocks together per step of the loop
        chunk_tokens = min(256, max(S, -chunk_tokens // n))
    cp = max(1, min(chunk_tokens // S, md.page_table.shape[1]))
    num_chunks = -(-md.page_table.shape[1] // cp)
    table = jnp.pad(md.page_table, ((0, 0), (0, num_chunks * cp - md.page_table.shape[1])))
    table = table[md.block_request]
    needed = (jnp.max(jnp.where(valid_block, cached, 0)) + cp * S - 1) // (cp * S)
    return n, valid_block, tok, qs, cached, cp, table, jnp.minimum(needed, num_chunks)


def _own(qs, k_new, v_new, tok, sm_scale, n):
    """The online softmax's start: each token attending to itself."""
    own = jnp.einsum("NKGE,NKE->NKG", qs, k_new[tok], preferred_element_type=F32) * sm_scale
    return own, jnp.ones_like(own), jnp.broadcast_to(v_new[tok].astype(F32)[:, :, None], (n, K, G, E))


def _finish(q, out, valid_block, tok):
    t = q.shape[0]
    dest = jnp.where(valid_block, tok, t)
    return jnp.zeros((t, H, E), q.dtype).at[dest].set(out.reshape(-1, H, E).astype(q.dtype), mode="drop")


def online(q, k_cache, v_cache, k_new, v_new, md, *, sm_scale, chunk_tokens, scores_pv):
    """The landed loop (state m, l [N, K, G], acc [N, K, G, E]) with the chunk's pages gathered
    as [N, C, K, E]; `scores_pv(qs, ks, vs)` returns the scores, the axis of C in them, and a
    function of the probabilities giving PV [N, K, G, E]."""
    n, valid_block, tok, qs, cached, cp, table, steps = _setup(md, q, chunk_tokens)
    c = cp * S

    def chunk(i, carry):
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(table, i * cp, cp, axis=1)
        valid = (i * c + jnp.arange(c))[None, :] < cached[:, None]  # [N, C]
        ks = from_storage(k_cache[pages]).reshape(n, c, K, E)
        vs = jnp.where(valid[:, :, None, None], from_storage(v_cache[pages]).reshape(n, c, K, E), 0)
        scores, axis, pv = scores_pv(qs, ks, vs)
        vmask = valid[:, :, None, None] if axis == 1 else valid[:, None, None, :]
        scores = jnp.where(vmask, scores * sm_scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=axis))
        probs = jnp.exp(scores - jnp.expand_dims(m_new, axis))
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(probs, axis=axis)
        return m_new, l, acc * corr[..., None] + pv(probs)

    _, l, acc = jax.lax.fori_loop(0, steps, chunk, _own(qs, k_new, v_new, tok, sm_scale, n))
    return _finish(q, acc / l[..., None], valid_block, tok)


def landed_sp(qs, ks, vs):  # the landed products
    scores = jnp.einsum("NKGE,NCKE->NKGC", qs.astype(ks.dtype), ks, preferred_element_type=F32)
    return (scores, 3, lambda p: jnp.einsum("NKGC,NCKE->NKGE", p.astype(vs.dtype), vs,
                                            preferred_element_type=F32))


def mulreduce_sp(qs, ks, vs):  # (a)
    scores = jnp.sum(ks.astype(F32)[:, :, :, None, :] * qs.astype(F32)[:, None], axis=-1)  # [N, C, K, G]
    return scores, 1, lambda p: jnp.sum(p[..., None] * vs.astype(F32)[:, :, :, None, :], axis=1)


def rows_sp(qs, ks, vs):  # (b)
    kt, vt = ks.transpose(0, 2, 1, 3), vs.transpose(0, 2, 1, 3)  # [N, K, C, E]
    scores = jnp.einsum("NKCE,NKGE->NKCG", kt, qs.astype(ks.dtype), preferred_element_type=F32)
    return (scores.transpose(0, 2, 1, 3), 1,
            lambda p: jnp.einsum("NKCE,NKCG->NKGE", vt, p.transpose(0, 2, 1, 3).astype(vs.dtype),
                                 preferred_element_type=F32))


def gather_only(q, k_cache, v_cache, k_new, v_new, md, *, sm_scale, chunk_tokens):
    n, valid_block, tok, qs, cached, cp, table, steps = _setup(md, q, chunk_tokens)
    flat = lambda c: c.reshape(c.shape[0], -1)

    def chunk(i, acc):
        pages = jax.lax.dynamic_slice_in_dim(table, i * cp, cp, axis=1)
        ks, vs = flat(k_cache)[pages], flat(v_cache)[pages]
        total = lambda x: jnp.sum(from_storage(x).astype(F32).reshape(n, -1, K, E), axis=1)
        return acc + total(ks) + total(vs)

    acc = jax.lax.fori_loop(0, steps, chunk, jnp.zeros((n, K, E), F32))
    return _finish(q, jnp.repeat(acc, G, axis=1), valid_block, tok)


def idx_erows(pages):  # [..., cp] -> [..., K, cp*S]: rows of the view [P*S*K, E]
    i = pages[..., None, :, None] * (S * K) + jnp.arange(S) * K + jnp.arange(K)[:, None, None]
    return i.reshape(*pages.shape[:-1], K, -1)


def idx_pkse(pages):  # [..., cp] -> [..., K, cp]: rows of the view [P*K, S*E] of [P, K, S, E]
    return pages[..., None, :] * K + jnp.arange(K)[:, None]


def nkce(q, k_cache, v_cache, k_new, v_new, md, *, sm_scale, chunk_tokens, index, row):
    """(e), (f): keys and values gathered straight into [N, K, C, E] as rows of `row` elements,
    every chunk's indices computed before the loop (XLA:CPU fuses index arithmetic into the
    gather's per-element loop); both products with the keys (values) as the rows."""
    n, valid_block, tok, qs, cached, cp, table, steps = _setup(md, q, chunk_tokens)
    c = cp * S
    idx = index(table.reshape(n, -1, cp).transpose(1, 0, 2))  # [chunks, N, K, rows]
    idx = idx.reshape(idx.shape[0], -1, 1)  # [chunks, M, 1]
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                        start_index_map=(0,))
    take = lambda cache, i: from_storage(jax.lax.gather(
        cache.reshape(-1, row), i, dn, (1, row), mode="promise_in_bounds")).reshape(n, K, c, E)

    def chunk(i, carry):
        m, l, acc = carry
        valid = ((i * c + jnp.arange(c))[None, :] < cached[:, None])[:, None, :, None]  # [N, 1, C, 1]
        ks, vs = take(k_cache, idx[i]), jnp.where(valid, take(v_cache, idx[i]), 0)
        scores = jnp.einsum("NKCE,NKGE->NKCG", ks, qs, preferred_element_type=F32) * sm_scale
        scores = jnp.where(valid, scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=2))
        probs = jnp.exp(scores - m_new[:, :, None])
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(probs, axis=2)
        pv = jnp.einsum("NKCG,NKCE->NKGE", probs.astype(vs.dtype), vs, preferred_element_type=F32)
        return m_new, l, acc * corr[..., None] + pv

    _, l, acc = jax.lax.fori_loop(0, steps, chunk, _own(qs, k_new, v_new, tok, sm_scale, n))
    return _finish(q, acc / l[..., None], valid_block, tok)


LAYOUTS = {"(f)": lambda x: x.transpose(0, 2, 1, 3)}  # variants reading a [P, K, S, E] cache


def variants(chunks, everything: bool):
    v = {"landed": kernels.ragged_paged_attention,
         "jnp path": rpa.ref_ragged_paged_attention,
         "gather only": functools.partial(gather_only, chunk_tokens=-rpa.DECODE_STEP_TOKENS)}
    if everything:
        for c in chunks:
            sfx = f" c{c}" if c > 0 else f" /{-c}"
            v["landed products" + sfx] = functools.partial(online, chunk_tokens=c, scores_pv=landed_sp)
            v["(a) mulreduce" + sfx] = functools.partial(online, chunk_tokens=c, scores_pv=mulreduce_sp)
            v["(b) keys as rows" + sfx] = functools.partial(online, chunk_tokens=c, scores_pv=rows_sp)
            v["(e) E-rows" + sfx] = functools.partial(nkce, chunk_tokens=c, index=idx_erows, row=E)
            v["(f) PKSE layout" + sfx] = functools.partial(nkce, chunk_tokens=c, index=idx_pkse, row=S * E)
    return v


def copy_bandwidth(repeats=5) -> float:
    x = np.ones(64 * 2**20, np.float32)
    y = np.empty_like(x)
    best = min(_once(lambda: np.copyto(y, x)) for _ in range(repeats))
    return 2 * x.nbytes / best


_SWEEP = np.ones(2 * 64 * 2**20 // 4, np.float32), np.empty(2 * 64 * 2**20 // 4, np.float32)


def flush():
    """Evict the caches (a copy of 2 x 128 MiB), as the other 29 layers of a step do: a layer's
    KV pages (12.6 MB at batch 32 and 256 tokens, float32) would otherwise stay in the last-level
    cache from one timed call to the next, which no step of the model sees."""
    np.copyto(_SWEEP[1], _SWEEP[0])


def _once(fn, clock=time.perf_counter):
    t0 = clock()
    jax.block_until_ready(fn())
    return clock() - t0


def case(batch, context, dtype, rng):
    pages = -(-(context + 1) // S)
    num_pages = 1 + batch * pages
    perm = rng.permutation(np.arange(1, num_pages))
    tables = [perm[i * pages:(i + 1) * pages] for i in range(batch)]
    md = build_metadata(query_lens=[1] * batch, kv_lens=[context + 1] * batch, page_tables=tables,
                        page_size=S, num_tokens=batch, num_requests=batch,
                        num_pages_per_request=MAX_LEN // S, num_blocks=batch, query_block=1)
    assert md.decode_only
    kc = np.full((num_pages, S, K, E), np.nan, np.float32)
    vc = kc.copy()
    for tb in tables:
        for pos in range(context):
            kc[tb[pos // S], pos % S] = rng.standard_normal((K, E))
            vc[tb[pos // S], pos % S] = rng.standard_normal((K, E))
    dt = jnp.dtype(dtype)
    store = BITS if dt == jnp.bfloat16 else dt
    kc, vc = (to_storage(jnp.asarray(x), store) for x in (kc, vc))
    q = jnp.asarray(rng.standard_normal((batch, H, E)), dt)
    kn = jnp.asarray(rng.standard_normal((batch, K, E)), dt)
    vn = jnp.asarray(rng.standard_normal((batch, K, E)), dt)
    md = jax.tree_util.tree_map(jnp.asarray, md)
    kv_bytes = batch * context * K * E * 2 * dt.itemsize
    return (q, kc, vc, kn, vn, md), kv_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--chunks", default="-2048,64", help="chunk sizes of the alternatives "
                    "(-T: T positions of all requests together per step, the chunk T / B)")
    ap.add_argument("--variants", default="", help="'all', or comma-separated name prefixes of "
                    "the alternatives to add (default: none)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    vs = variants([int(c) for c in a.chunks.split(",")], bool(a.variants))
    if a.variants and a.variants != "all":
        keep = [p.strip() for p in a.variants.split(",")]
        vs = {n: f for i, (n, f) in enumerate(vs.items()) if i < 3 or any(n.startswith(p) for p in keep)}
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; one layer, {H} q heads, {K} kv heads, E={E}, "
          f"pages of {S}, table {MAX_LEN // S} pages; min of {a.repeats} interleaved rounds")
    print("(the floor uses the best copy bandwidth measured so far; paired: median of landed / row)")
    print(f"{'dtype':<9}{'B':>3}{'ctx':>6} {'variant':<24}{'ms':>8}{'floor':>7}{'x floor':>8}"
          f"{'paired':>8}{'cpu ms':>8}")
    rng = np.random.default_rng(0)
    for dtype in a.dtypes.split(","):
        for context in (int(c) for c in a.contexts.split(",")):
            for batch in (int(b) for b in a.batches.split(",")):
                args, kv_bytes = case(batch, context, dtype, rng)
                q, kc, vc, kn, vn, md = args
                other = {p: (q, f(kc), f(vc), kn, vn, md) for p, f in LAYOUTS.items()}
                fns, inputs = {}, {}
                for name, f in vs.items():
                    fns[name] = jax.jit(functools.partial(f, sm_scale=E ** -0.5))
                    inputs[name] = other.get(name[:3], args)
                want = np.asarray(fns["landed"](*inputs["landed"]), np.float32)
                tol = 2e-2 if dtype == "bfloat16" else 1e-4
                for name in fns:
                    got = np.asarray(fns[name](*inputs[name]), np.float32)
                    if name != "gather only" and not np.allclose(got, want, atol=tol, rtol=tol):
                        print(f"  {name}: WRONG, max diff {np.nanmax(np.abs(got - want))}")
                wall = {name: [] for name in fns}
                cpu = {name: float("inf") for name in fns}
                names = list(fns)
                for r in range(a.repeats):
                    for name in names[r % len(names):] + names[:r % len(names)]:  # rotated
                        f = fns[name]
                        flush()
                        wall[name].append(_once(lambda: f(*inputs[name])))
                        flush()
                        cpu[name] = min(cpu[name], _once(lambda: f(*inputs[name]), time.process_time))
                    bw = max(bw, copy_bandwidth(1))  # the least disturbed copy of the run so far
                floor = kv_bytes / bw
                for name in fns:
                    best = min(wall[name])
                    paired = np.median(np.array(wall["landed"]) / np.array(wall[name]))
                    print(f"{dtype:<9}{batch:>3}{context:>6} {name:<24}{best * 1e3:8.2f}"
                          f"{floor * 1e3:7.2f}{best / floor:8.1f}{paired:8.2f}{cpu[name] * 1e3:8.2f}",
                          flush=True)


if __name__ == "__main__":
    main()
