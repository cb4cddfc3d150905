"""Cold start: `LLM()` on the default model with an empty XLA cache, and what warmup compiles.

Each run is its own process (a process compiles a program once), with the XLA cache off
(JAXSERVE_XLA_CACHE set empty). Prints the start's parts and each kind of program: how many,
and the seconds their compiles took (summed over the compile threads, so more than the wall).

    python benchmarks/warmup.py [--dtypes float32,bfloat16] [--max-num-seqs 64 ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time


def one(dtype: str, max_num_seqs: int, max_num_batched_tokens: int, layers_per_program: int | None) -> dict:
    """In this process: start LLM() cold and return its timings."""
    t0 = time.perf_counter()
    from jaxserve import LLM

    t1 = time.perf_counter()
    llm = LLM(dtype=dtype, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, progress=False,
              **({} if layers_per_program is None else dict(layers_per_program=layers_per_program)))
    t2 = time.perf_counter()
    kinds = collections.defaultdict(lambda: [0, 0.0])
    for key, seconds in llm.engine.runner.programs.compile_seconds.items():
        kinds[key[0]][0] += 1
        kinds[key[0]][1] += seconds
    return dict(imports=t1 - t0, llm=t2 - t1, warmup=llm.engine.warmup_seconds,
                kinds=dict(kinds))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=64)  # LLM()'s defaults
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--layers-per-program", type=int, default=None, help="default: EngineConfig's")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.max_num_seqs, a.max_num_batched_tokens, a.layers_per_program)))
        return
    rows = []
    for dtype in a.dtypes.split(","):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", dtype, "--max-num-seqs",
                              str(a.max_num_seqs), "--max-num-batched-tokens",
                              str(a.max_num_batched_tokens)] + ([] if a.layers_per_program is None else [
                                  "--layers-per-program", str(a.layers_per_program)]), check=True, capture_output=True,
                             text=True, env={**os.environ, "JAXSERVE_XLA_CACHE": ""})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["process"] = time.perf_counter() - t0
        rows.append((dtype, r))
    print(f"cold LLM(max_num_seqs={a.max_num_seqs}, max_num_batched_tokens="
          f"{a.max_num_batched_tokens}, layers_per_program={a.layers_per_program or 'default'}), "
          f"empty XLA cache, {os.cpu_count()} CPUs\n")
    print("| dtype | process s | imports s | LLM() s | warmup s | programs | compile work s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, r in rows:
        n = sum(k[0] for k in r["kinds"].values())
        work = sum(k[1] for k in r["kinds"].values())
        print(f"| {dtype} | {r['process']:.1f} | {r['imports']:.1f} | {r['llm']:.1f} | "
              f"{r['warmup']:.1f} | {n} | {work:.1f} |")
    print("\n| dtype | program | count | compile s |\n|---|---|---|---|")
    for dtype, r in rows:
        for name, (n, s) in sorted(r["kinds"].items(), key=lambda kv: -kv[1][1]):
            print(f"| {dtype} | {name} | {n} | {s:.1f} |")


if __name__ == "__main__":
    main()
