"""The decode step's projections against the machine's matmul rate, and the alternatives.

    python benchmarks/matmuls.py [--batches 1,32,256] [--dtypes float32,bfloat16] [--nproc 1,2]

Every projection of the default model's shape (qkv 576 -> 960, o 576 -> 576, gate_up 576 ->
2 x 1536, down 1536 -> 576) over 30 layers of distinct random weights, so that the weights come
from memory as in a step (one layer's weights stay in cache from call to call; thirty do not),
at M rows (the batch of a decode step, or a prefill's tokens). Its rate is set against the rate
of one 2048^2 matmul in the same dtype (bf16 x bf16 -> f32, as the model runs it); issue 11
asks for every projection at batch 32 within 1.5x of it. Rows:

  x.W              x [M, K] . W [K, N] -> [M, N]: the model's form (llama.project)
  kernel           the same through jaxserve's C++ matmul (kernels/cpu_matmul.py), which the
                   runner uses up to its MAX_ROWS
  packed           the kernel on weights packed once (cpu_matmul.pack: bf16 with AVX512_BF16),
                   as the runner's programs take them
  W-first          W stored [N, K] (as HF stores it), computed as W . x^T -> [N, M] and left
                   in that orientation
  x.W^T            W stored [N, K], computed as x . W^T -> [M, N] (token-major, HF's layout)
  int8             int8 x int8 -> int32 dots (x quantized per row, W per output channel),
                   scales applied after: the rate of YNN's s8 dots (no accuracy here)
  MLP x.W / weights-first / feature-major
                   a whole SwiGLU MLP with its residual add, 30 layers: as the model runs
                   it; weights-first (W [N, K], W . x turned to [M, N] behind an
                   optimization barrier, `weights_first`); and with the residual stream kept
                   [D, M] throughout (gate_up as W . x, down as W . a, no transposes)

`--nproc 1,2` reruns the x.W rows in child processes with PJRT_NPROC set (XLA:CPU's intra-op
threads). Results and the conclusions drawn: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from timing import timed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from jaxserve.kernels import cpu_library, cpu_matmul  # noqa: E402

LAYERS, D, F = 30, 576, 1536
PROJECTIONS = {"qkv": (D, 960), "o": (D, D), "gate_up": (D, 2 * F), "down": (F, D)}
F32 = dict(preferred_element_type=jnp.float32)


def dot_general(a, b, contract_a: int, contract_b: int, **kw):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), **kw)


def weights_first(x, w):
    """x [M, K] . W [N, K]^T computed as W . x -> [N, M], turned to [M, N] behind an
    optimization barrier (without it XLA folds the transpose into the dot, the x . W form)."""
    return lax.optimization_barrier(dot_general(w, x, 1, 1, **F32)).T


def peak(dtype, repeats: int) -> float:
    a = jnp.ones((2048, 2048), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a, **F32))
    return 2 * 2048 ** 3 / timed(lambda: mm(a), repeats)


def weights(rng, k: int, n: int, dtype, transposed: bool = False) -> list[jax.Array]:
    out = []
    for _ in range(LAYERS):
        w = rng.standard_normal((n, k) if transposed else (k, n), np.float32) * 0.02
        out.append(jnp.asarray(w, dtype))
    return out


def projection_rows(m: int, dtype, repeats: int, variants: set[str]) -> list[tuple]:
    """(name, variant, seconds, flops) of each projection over 30 layers."""
    rng = np.random.default_rng(0)
    rows = []
    for name, (k, n) in PROJECTIONS.items():
        flops = 2 * m * k * n * LAYERS
        x = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
        if "x.W" in variants:
            ws = weights(rng, k, n, dtype)
            f = jax.jit(lambda x, ws: [jnp.dot(x, w, **F32) for w in ws])
            rows.append((name, "x.W", timed(lambda: f(x, ws), repeats), flops))
            if "kernel" in variants and cpu_library.available():
                g = jax.jit(lambda x, ws: [cpu_matmul.matmul(x, w) for w in ws])
                rows.append((name, "kernel", timed(lambda: g(x, ws), repeats), flops))
                spec = "TD,DF->TF"
                if all(cpu_matmul.packable(spec, w) for w in ws):
                    packed = [cpu_matmul.pack(spec, w) for w in ws]
                    g = jax.jit(lambda x, ws: [cpu_matmul.einsum(spec, x, w) for w in ws])
                    rows.append((name, "packed", timed(lambda: g(x, packed), repeats), flops))
        if "w-first" in variants:
            ws = weights(rng, k, n, dtype, transposed=True)
            f = jax.jit(lambda x, ws: [dot_general(w, x, 1, 1, **F32) for w in ws])
            rows.append((name, "W-first", try_timed(lambda: f(x, ws), repeats), flops))
            f = jax.jit(lambda x, ws: [dot_general(x, w, 1, 1, **F32) for w in ws])
            rows.append((name, "x.W^T", try_timed(lambda: f(x, ws), repeats), flops))
        if "int8" in variants and dtype == jnp.float32:
            ws = [jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8) for _ in range(LAYERS)]
            scales = [jnp.full((n,), 0.01, jnp.float32) for _ in range(LAYERS)]

            def int8(x, ws, scales):
                sx = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127
                xq = jnp.round(x / sx).astype(jnp.int8)
                return [dot_general(xq, w, 1, 0, preferred_element_type=jnp.int32)
                        .astype(jnp.float32) * sx * s for w, s in zip(ws, scales)]

            f = jax.jit(int8)
            rows.append((name, "int8", timed(lambda: f(x.astype(jnp.float32), ws, scales),
                                             repeats), flops))
    return rows


def mlp_rows(m: int, dtype, repeats: int) -> list[tuple]:
    rng = np.random.default_rng(1)
    gate_up = [rng.standard_normal((D, 2, F), np.float32) * 0.02 for _ in range(LAYERS)]
    down = [rng.standard_normal((F, D), np.float32) * 0.02 for _ in range(LAYERS)]
    before = ([jnp.asarray(w, dtype) for w in gate_up], [jnp.asarray(w, dtype) for w in down])
    first = ([jnp.asarray(w.reshape(D, 2 * F).T, dtype) for w in gate_up],  # [2F, D]
             [jnp.asarray(w.T, dtype) for w in down])  # [D, F]

    def mlp_before(x, ws):
        for g, d in zip(*ws):
            h = jnp.einsum("TD,DCF->TCF", x, g, **F32).astype(x.dtype)
            x = x + jnp.einsum("TF,FD->TD", jax.nn.silu(h[:, 0]) * h[:, 1], d, **F32).astype(x.dtype)
        return x

    def mlp_weights_first(x, ws):
        for g, d in zip(*ws):
            h = weights_first(x, g).astype(x.dtype)  # [M, 2F]
            x = x + weights_first(jax.nn.silu(h[:, :F]) * h[:, F:], d).astype(x.dtype)
        return x

    def mlp_feature_major(xt, ws):  # xt: [D, M]
        for g, d in zip(*ws):
            h = dot_general(g, xt, 1, 0, **F32).astype(xt.dtype)  # [2F, M]
            xt = xt + dot_general(d, jax.nn.silu(h[:F]) * h[F:], 1, 0, **F32).astype(xt.dtype)
        return xt

    x = jnp.asarray(rng.standard_normal((m, D), np.float32) * 0.1, dtype)
    fb, fm, ff = jax.jit(mlp_before), jax.jit(mlp_weights_first), jax.jit(mlp_feature_major)
    flops = 2 * m * 3 * D * F * LAYERS
    want = fb(x, before).astype(jnp.float32)
    rows = [("MLP", "x.W", timed(lambda: fb(x, before), repeats), flops)]
    for variant, fn in (("weights-first", lambda: fm(x, first)),
                        ("feature-major", lambda: ff(x.T, first).T)):
        t = try_timed(fn, repeats)
        if isinstance(t, float):  # the same numbers, or the comparison means nothing
            diff = float(jnp.max(jnp.abs(fn().astype(jnp.float32) - want)))
            assert diff < (1e-4 if dtype == jnp.float32 else 0.1), (variant, diff)
        rows.append(("MLP", variant, t, flops))
    return rows


def try_timed(fn, repeats: int):
    """Seconds, or the first line of why XLA:CPU cannot run it (some bf16 dot forms fall to a
    thunk without bf16 x bf16 -> f32)."""
    try:
        return timed(fn, repeats)
    except Exception as e:  # noqa: BLE001  (a benchmark row, not a code path)
        return str(e).splitlines()[0][-90:]


def run(batches, dtypes, repeats, variants) -> list[dict]:
    out = []
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        rate = peak(dtype, repeats)
        for m in batches:
            rows = projection_rows(m, dtype, repeats, variants)
            if "mlp" in variants:
                rows += mlp_rows(m, dtype, repeats)
            for name, variant, t, flops in rows:
                out.append(dict(dtype=dtype_name, m=m, name=name, variant=variant, t=t,
                                flops=flops, peak=rate))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--nproc", default="", help="also run the x.W rows with PJRT_NPROC=each")
    ap.add_argument("--variants", default="x.W,kernel,w-first,int8,mlp", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    results = run(batches, a.dtypes.split(","), a.repeats, set(a.variants.split(",")))
    if a.json:
        print(json.dumps(results))
        return
    for nproc in filter(None, a.nproc.split(",")):
        child = subprocess.run([sys.executable, __file__, "--json", "--variants", "x.W",
                                "--batches", a.batches, "--dtypes", a.dtypes, "--repeats",
                                str(a.repeats)], env={**os.environ, "PJRT_NPROC": nproc},
                               check=True, capture_output=True, text=True)
        for r in json.loads(child.stdout.strip().splitlines()[-1]):
            results.append({**r, "variant": f"x.W, PJRT_NPROC={nproc}"})
    print(f"{os.cpu_count()} CPUs; 'x peak': the 2048^2 matmul's rate over the row's "
          "(<= 1.5 is issue 11's target at batch 32)\n")
    print("| dtype | M | projection x30 | variant | ms | GFLOP/s | x peak |")
    print("|---|---|---|---|---|---|---|")
    order = {v: i for i, v in enumerate(["x.W", "kernel", "W-first", "x.W^T", "int8", "weights-first",
                                         "feature-major"])}
    results.sort(key=lambda r: (r["dtype"], r["m"], r["name"], order.get(r["variant"], 9),
                                r["variant"]))
    for r in results:
        if isinstance(r["t"], str):
            print(f"| {r['dtype']} | {r['m']} | {r['name']} | {r['variant']} | fails: {r['t']} | | |")
            continue
        rate = r["flops"] / r["t"]
        print(f"| {r['dtype']} | {r['m']} | {r['name']} | {r['variant']} | {r['t'] * 1e3:.1f} | "
              f"{rate / 1e9:.0f} | {r['peak'] / rate:.2f} |")
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        print(f"peak {dtype}: {next(r['peak'] for r in results if r['dtype'] == dtype) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
