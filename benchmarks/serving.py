"""Serving benchmark: `jaxserve serve` on the default model under a seeded load over loopback,
against the same engine driven offline (`LLM.generate`, no HTTP) on the same prompts in the same
run, and optionally against any other OpenAI-compatible server (`--peer-url`, e.g. `vllm serve`).

    python benchmarks/serving.py                                   # ~3 min here
    python benchmarks/serving.py --request-rates inf,1 --num-prompts 32
    python benchmarks/serving.py --peer-url http://127.0.0.1:8001  # also load a running peer
    python benchmarks/serving.py --default-flags --request-rates inf --peer vllm --no-offline
        # `jaxserve serve` as a user starts it, then vLLM's OpenAI server (bf16), one at a time

Each load: --num-prompts prompts of --input-len random token ids, --output-len tokens each (EOS
ignored, greedy), streamed; arrivals Poisson at each rate (inf = all at once); warmup requests
excluded. The offline row runs the same prompts through `LLM.generate` with the same engine
options after the server has stopped; "vs offline" is the served output throughput over the
offline one (the cost of HTTP, SSE and the engine thread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout

import peers  # noqa: E402  (benchmarks/peers.py: this script's folder is on sys.path)
from jaxserve.server.bench import format_table, make_prompts, run_load  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--request-rates", default="inf,2", help="comma-separated requests/s")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--default-flags", action="store_true",
                    help="start `jaxserve serve` with its default engine flags (the offline row keeps the three above)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-url", default=None, help="another OpenAI-compatible server to load")
    ap.add_argument("--peer", choices=("vllm",), default=None,
                    help="start vLLM's OpenAI server (after jaxserve's has stopped) and load it too")
    ap.add_argument("--vllm-python", default=peers.default_vllm_python())
    ap.add_argument("--vllm-model", default=None,
                    help="HF folder for vLLM (default: the default model's GGUF dequantized, peers.py)")
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument("--engine-args", default="", help="more `jaxserve serve` flags, after the others "
                    "(the last of a flag wins), e.g. '--max-num-batched-tokens 1024 --no-async-scheduling'")
    ap.add_argument("--no-offline", dest="offline", action="store_false", help="skip the offline row")
    a = ap.parse_args()
    rates = [float(r) for r in a.request_rates.split(",")]
    prompts = make_prompts(a.num_prompts * len(rates) + 2, a.input_len, a.seed)
    warm, prompts = prompts[:2], prompts[2:]
    engine_args = [] if a.default_flags else [
        "--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens", str(a.max_num_batched_tokens),
        "--dtype", a.dtype, "--max-model-len", "1024", "--max-waiting-requests", "4096"]
    rows = []

    def load(url, name):
        for k, rate in enumerate(rates):
            batch = prompts[k * a.num_prompts:(k + 1) * a.num_prompts]
            res = asyncio.run(run_load(url, None, batch, a.output_len, request_rate=rate,
                                       warmup_prompts=warm, seed=a.seed))
            print(format_table(res, f"{name}, rate {rate}"), flush=True)
            rows.append((name, rate, res))

    from server_util import process_server

    t0 = time.perf_counter()
    engine_args += shlex.split(a.engine_args)
    with process_server(*engine_args, "--log-level", "warning") as (url, proc):
        print(f"jaxserve server up in {time.perf_counter() - t0:.1f} s (load + warmup)", flush=True)
        load(url, "jaxserve serve" + (" (default flags)" if a.default_flags else "")
             + (f" {a.engine_args}" if a.engine_args else ""))
        proc.send_signal(subprocess.signal.SIGTERM)
        proc.wait(60)
    if a.peer == "vllm":
        model = a.vllm_model or str(peers.dense_default_folder())
        t0 = time.perf_counter()
        with peers.vllm_server(a.vllm_python, model, "--dtype", a.vllm_dtype, "--max-model-len", "2048") as url:
            print(f"vLLM server up in {time.perf_counter() - t0:.1f} s", flush=True)
            load(url, f"vLLM api_server ({a.vllm_dtype})")
    if a.peer_url:
        load(a.peer_url, f"peer {a.peer_url}")

    offline = None
    if a.offline:
        offline = bench_offline(a, prompts[:a.num_prompts], warm)
        print(f"\noffline LLM.generate, same engine options, {a.num_prompts} prompts: "
              f"{offline:.1f} output tok/s")
    print(f"\n{a.num_prompts} requests of {a.input_len} random tokens, {a.output_len} out (EOS ignored)")
    print("\n| engine | rate (req/s) | ok/failed | output tok/s | vs offline | TTFT mean/p99 ms "
          "| TPOT mean ms | ITL p99 ms | E2E mean ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rate, r in rows:
        vs = f"{r['output_throughput'] / offline:.2f}" if offline else "-"
        print(f"| {name} | {rate} | {r['successful']}/{r['failed']} | {r['output_throughput']:.1f} "
              f"| {vs} | {r['ttft_ms']['mean']:.0f}/{r['ttft_ms']['p99']:.0f} | {r['tpot_ms']['mean']:.0f} "
              f"| {r['itl_ms']['p99']:.0f} | {r['e2e_ms']['mean']:.0f} |")
    if offline:
        print(f"| offline LLM.generate | inf | {a.num_prompts}/0 | {offline:.1f} | 1.00 | | | | |")
    jax_rows = {rate: r for name, rate, r in rows if name.startswith("jaxserve")}
    for name, rate, r in rows:
        if not name.startswith("jaxserve") and rate in jax_rows:
            print(f"jaxserve / {name} at rate {rate}: output tok/s "
                  f"{jax_rows[rate]['output_throughput'] / r['output_throughput']:.2f}x")
    return 0


def bench_offline(a, prompts, warm) -> float:
    from jaxserve import LLM, SamplingParams

    llm = LLM(dtype=a.dtype, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
              max_model_len=1024, decode_buckets=(1, 2, 4, 8, 16, 32, 64), progress=False)
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    llm.generate(warm, params, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
