"""Latency under load, per scheduling option, on the default model: seeded Poisson arrivals of
long and short prompts, TTFT and TBT p50/p99, throughput, preemptions and swaps, and the
per-client service of a flooding client against a calm one.

    PYTHONPATH=. python benchmarks/latency.py    # a few minutes on a 2-core CPU
    python benchmarks/latency.py --long-len 2048 --long-len-max 4096 --max-tokens 256  # the issue's mix
    python benchmarks/latency.py --plot timeline.png   # step timeline of the swap storm (jaxserve.viz)

Scenarios (one engine each, same model, same seeded load):
  chunked        fcfs, recompute, a cache that holds the whole load (the baseline)
  layered        the same with prefill_policy="layered": a prefill batch goes through one group
                 of layers per step (G from runner/layered.py's measured table) while the
                 decodes run every layer. chunked and layered run alternately, --prefill-rounds
                 times each (medians): the shared machine's load drifts between runs
  storm/recompute, storm/swap   the cache sized to a quarter of the load's KV: preemption storm
  flood/fcfs, flood/fair        client "flood" queues --flood requests at t=0, client "calm" sends
                                Poisson arrivals; calm's TTFT and both clients' service
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    client: str


def make_load(a, rng) -> list[Arrival]:
    t, out = 0.0, []
    for i in range(a.num_requests):
        t += rng.exponential(1.0 / a.rate)
        long = rng.random() < a.long_share
        n = int(rng.integers(a.long_len, a.long_len_max + 1)) if long else \
            int(rng.integers(a.short_len // 2, a.short_len + 1))
        out.append(Arrival(t, rng.integers(100, 40000, n).tolist(),
                           int(rng.integers(a.max_tokens // 2, a.max_tokens + 1)), "calm"))
    return out


def flood_load(a, rng) -> list[Arrival]:
    calm = [dataclasses.replace(x, prompt=x.prompt[:a.short_len]) for x in make_load(a, rng)]
    flood = [Arrival(0.0, rng.integers(100, 40000, a.short_len).tolist(), a.max_tokens, "flood")
             for _ in range(a.flood)]
    return sorted(flood + calm, key=lambda x: x.at)


def drive(engine, load: list[Arrival]) -> tuple[dict, float]:
    """Feed arrivals in real time, step until done; ({id: (arrival, RequestOutput)}, seconds)."""
    from jaxserve.sampling import SamplingParams

    pending, done, start = list(enumerate(load)), {}, time.time()
    while pending or engine.has_unfinished_requests():
        now = time.time() - start
        while pending and pending[0][1].at <= now:
            i, x = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=x.max_tokens, ignore_eos=True)
            engine.add_request(str(i), x.prompt, params, arrival_time=start + x.at,
                               client_id=x.client)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][1].at - now))
            continue
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (load[int(out.request_id)], out)
    return done, time.time() - start


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(name: str, engine, done: dict, seconds: float) -> dict:
    ttft = [o.metrics.time_to_first_token for _, o in done.values()]
    tbt = [g for _, o in done.values() for g in o.metrics.time_between_tokens]
    tokens = sum(len(o.outputs[0].token_ids) for _, o in done.values())
    swapper = engine.runner.swapper
    row = dict(scenario=name, ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99), tbt_p50=pct(tbt, 50),
               tbt_p99=pct(tbt, 99), tok_s=tokens / seconds, preempted=engine.num_preemptions,
               swaps=0 if swapper is None else swapper.stats["out_copies"],
               swap_mb=0.0 if swapper is None else swapper.stats["out_bytes"] / 2**20)
    clients = {x.client for x, _ in done.values()}
    if len(clients) > 1:  # service while both were backlogged: until calm's last request ended
        end = max(o.metrics.finished_time for x, o in done.values() if x.client == "calm")
        served = {c: sum(sum(t <= end for t in o.metrics.token_times)
                         for x, o in done.values() if x.client == c) for c in clients}
        calm_ttft = [o.metrics.time_to_first_token for x, o in done.values() if x.client == "calm"]
        row.update(calm_ttft_p99=pct(calm_ttft, 99),
                   calm_share=served["calm"] / max(1, sum(served.values())))
    return row


def prefill_rounds(a, scenarios, ckpt, tokenizer, records) -> list[dict]:
    """chunked and layered, alternating over `--prefill-rounds` rounds (A B, B A, ...), each
    metric the median of its rounds: on a machine shared with other jobs the load drifts over
    minutes, and two runs one after the other compare the machine as much as the policies.
    Round r's load is drawn with seed + r (the same for both policies; new prompts, so the
    prefix cache does not serve a round from the one before)."""
    from jaxserve.engine import Engine

    engines = {name: Engine.from_components(scenarios[name][0], ckpt.model, tokenizer)
               for name in ("chunked", "layered")}
    got = {name: [] for name in engines}
    for r in range(a.prefill_rounds):
        load = make_load(a, np.random.default_rng(a.seed + r))
        for name in (("chunked", "layered") if r % 2 == 0 else ("layered", "chunked")):
            engine = engines[name]
            engine.step_records.clear()
            done, seconds = drive(engine, load)
            got[name].append(summarize(name, engine, done, seconds))
            records[name] = list(engine.step_records)
            print(f"{name} round {r + 1}: {seconds:.1f} s", flush=True)
    rows = []
    for name, runs in got.items():
        row = {k: (float(np.median([x[k] for x in runs])) if isinstance(v, float) else v)
               for k, v in runs[0].items()}
        row["scenario"] = f"{name} (median of {len(runs)})"
        rows.append(row)
    return rows


def print_table(rows: list[dict]):
    cols = ["scenario", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99", "tok_s", "preempted",
            "swaps", "swap_mb", "calm_ttft_p99", "calm_share"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells)
              + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=12)
    p.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    p.add_argument("--long-share", type=float, default=0.25)
    p.add_argument("--long-len", type=int, default=256)
    p.add_argument("--long-len-max", type=int, default=384)
    p.add_argument("--short-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--flood", type=int, default=16, help="requests the flooding client queues")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios",
                   default="chunked,layered,storm/recompute,storm/swap,flood/fcfs,flood/fair")
    p.add_argument("--plot", default=None, help="save the swap storm's step timeline here")
    p.add_argument("--prefill-rounds", type=int, default=3,
                   help="rounds of chunked and layered, alternating (medians reported)")
    a = p.parse_args()

    import jax.numpy as jnp

    from jaxserve.config import EngineConfig
    from jaxserve.engine import Engine
    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.tokenizer import Tokenizer

    ckpt = load_checkpoint(default_model_path(), dtype=jnp.float32)
    tokenizer = Tokenizer.from_gguf_metadata(ckpt.gguf_metadata)
    load = make_load(a, np.random.default_rng(a.seed))
    page = 16
    max_len = a.long_len_max + a.max_tokens
    need = sum(-(-(len(x.prompt) + x.max_tokens) // page) for x in load)
    storm_pages = max(need // 4, -(-max_len // page) + 1) + 1
    base = EngineConfig(max_model_len=max(512, max_len), max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens, page_size=page,
                        decode_buckets=(1, 2, 4, 8), num_kv_pages=need + 64,
                        record_steps=True)
    scenarios = {
        "chunked": (base, load),
        "layered": (dataclasses.replace(base, prefill_policy="layered"), load),
        "storm/recompute": (dataclasses.replace(base, num_kv_pages=storm_pages), load),
        "storm/swap": (dataclasses.replace(base, num_kv_pages=storm_pages,
                                           preemption_mode="swap"), load),
        "flood/fcfs": (base, None),
        "flood/fair": (dataclasses.replace(base, scheduling_policy="fair"), None),
    }
    rows, records = [], {}
    print(f"load: {len(load)} requests, {need} KV pages in all; storm cache {storm_pages} pages")
    names = a.scenarios.split(",")
    if {"chunked", "layered"} <= set(names) and a.prefill_rounds > 1:
        rows += prefill_rounds(a, scenarios, ckpt, tokenizer, records)
        names = [n for n in names if n not in ("chunked", "layered")]
    for name in names:
        config, work = scenarios[name]
        work = work if work is not None else flood_load(a, np.random.default_rng(a.seed))
        engine = Engine.from_components(config, ckpt.model, tokenizer)
        if name.startswith("flood/fair"):
            engine.scheduler.policy.interval, engine.scheduler.policy.margin = 4, 64.0
        done, seconds = drive(engine, work)
        rows.append(summarize(name, engine, done, seconds))
        records[name] = engine.step_records
        print(f"{name}: {seconds:.1f} s", flush=True)
    print_table(rows)
    if a.plot:
        try:
            from jaxserve import viz
        except ImportError:
            print("jaxserve.viz is not available: no plot")
            return
        name = "storm/swap" if "storm/swap" in records else next(iter(records))
        viz.timeline(records[name], title=f"{name}").savefig(a.plot, dpi=120)
        print(f"wrote {a.plot} ({name})")


if __name__ == "__main__":
    main()
