"""Serving benchmark: a bounded load generator for any OpenAI-compatible server, reporting what
`vllm bench serve` reports (request and token throughput; mean, median and p99 of TTFT, TPOT,
ITL and end-to-end latency).

    jaxserve bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4

Prompts are seeded random token ids of exactly --input-len tokens sent to /v1/completions
(`prompt` as a token-id list), each asking for exactly --output-len tokens (`ignore_eos`, as
vLLM's random dataset does), streamed with usage. Arrivals are a seeded Poisson process at
--request-rate (inf = all at once), optionally capped at --max-concurrency in flight. The first
--warmup requests run before the clock starts and are not counted.

Definitions (as vLLM's): TTFT = send to first streamed token; TPOT = (e2e - TTFT) / (output
tokens - 1) per request; ITL = gaps between consecutive token-carrying chunks; E2E = send to
last chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import time


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate, requests/s (inf: all at t=0)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request limit, seconds")
    p.add_argument("--token-id-range", default="100,10000",
                   help="prompt token ids are drawn from [lo, hi)")
    p.add_argument("--json-out", default=None, help="write the results here as JSON")


@dataclasses.dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    prompt_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def make_prompts(n: int, input_len: int, seed: int, lo: int = 100, hi: int = 10000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(n)]


async def _one(client, url: str, body: dict, timeout: float) -> RequestResult:
    t0 = time.perf_counter()
    last, ttft, itl, usage = t0, None, [], None
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=chunk["error"].get("message", "error"))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if any(c.get("text") for c in chunk.get("choices", ())):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    else:
                        itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    if usage is None or ttft is None:
        return RequestResult(False, error="stream ended without tokens or usage")
    return RequestResult(True, usage["completion_tokens"], usage["prompt_tokens"], ttft,
                         last - t0, itl)


async def run_load(base_url: str, model: str | None, prompts: list[list[int]], output_len: int, *,
                   request_rate: float = float("inf"), max_concurrency: int | None = None,
                   warmup_prompts: list[list[int]] = (), seed: int = 0, api_key: str | None = None,
                   timeout: float = 600.0) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts))
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:
        if model is None:
            r = await client.get("/v1/models")
            if r.status_code != 200:
                raise RuntimeError(f"GET {base_url}/v1/models: HTTP {r.status_code}: {r.text[:200]}")
            model = r.json()["data"][0]["id"]

        def body(p):
            return {"model": model, "prompt": p, "max_tokens": output_len, "min_tokens": output_len,
                    "ignore_eos": True, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}

        for p in warmup_prompts:  # compiles nothing new, but warms caches and connections
            await _one(client, "/v1/completions", body(p), timeout)
        sem = asyncio.Semaphore(max_concurrency or len(prompts))
        rng = random.Random(seed)

        async def limited(p):
            async with sem:
                return await _one(client, "/v1/completions", body(p), timeout)

        tasks, t0 = [], time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(results, duration, model)


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    s = sorted(xs)
    pct = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    return {"mean": sum(s) / len(s) * 1e3, "median": pct(0.5) * 1e3, "p99": pct(0.99) * 1e3}


def summarize(results: list[RequestResult], duration: float, model: str) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "model": model, "successful": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]), "e2e_ms": _stats([r.e2e for r in ok]),
    }


def format_table(res: dict, title: str = "Serving benchmark") -> str:
    lines = [f"{'=' * 20} {title} {'=' * 20}",
             f"{'Successful requests:':<40}{res['successful']:>12}",
             f"{'Failed requests:':<40}{res['failed']:>12}",
             f"{'Benchmark duration (s):':<40}{res['duration_s']:>12.2f}",
             f"{'Request throughput (req/s):':<40}{res['request_throughput']:>12.2f}",
             f"{'Output token throughput (tok/s):':<40}{res['output_throughput']:>12.2f}",
             f"{'Total token throughput (tok/s):':<40}{res['total_token_throughput']:>12.2f}"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name} (ms):':<40}{res[key][stat]:>12.2f}")
    for e in res["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def main(a) -> int:
    lo, hi = (int(x) for x in a.token_id_range.split(","))
    prompts = make_prompts(a.num_prompts + a.warmup, a.input_len, a.seed, lo, hi)
    res = asyncio.run(run_load(a.base_url, a.model, prompts[a.warmup:], a.output_len,
                               request_rate=a.request_rate, max_concurrency=a.max_concurrency,
                               warmup_prompts=prompts[:a.warmup], seed=a.seed,
                               api_key=a.api_key, timeout=a.timeout))
    print(format_table(res))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["failed"] == 0 else 1
