"""Multi-turn conversations on a device cache too small to keep them all: the host prefix tier
(sched/host_tier.py) against forgetting evicted prefix pages, on the default model.

    PYTHONPATH=. python benchmarks/multiturn.py          # about two minutes on a 2-core CPU

`--conversations` chats take turns round-robin: each turn sends the whole history plus
`--user-tokens` new tokens and generates `--max-tokens` (greedy). The device cache holds about
`--cache-conversations` of them, so by a chat's next turn its earlier pages were evicted: without
the tier its history is recomputed; with it, its pages come back from host memory. Both engines
get the same turns in the same order and must answer with the same tokens. Printed per mode:
mean and p90 TTFT of turns after the first, prompt tokens computed, pages copied back from host,
and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def run(engine, turns: list[tuple[int, list[int]]], a) -> dict:
    """Serve the turns in order (each turn of a round together); returns the row."""
    from jaxserve.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    history: dict[int, list[int]] = {}
    ttft, answers, t0 = [], [], time.perf_counter()
    for round_ in range(a.turns):
        for chat, user in turns[round_ * a.conversations:(round_ + 1) * a.conversations]:
            prompt = history.get(chat, []) + user
            history[chat] = prompt
            engine.add_request(f"{round_}-{chat}", prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        for rid, out in sorted(done.items()):
            chat = int(rid.split("-")[1])
            history[chat] = history[chat] + list(out.outputs[0].token_ids)
            answers.append(list(out.outputs[0].token_ids))
            if round_:
                ttft.append(out.metrics.time_to_first_token)
    records = engine.step_records
    tier = engine.scheduler.host_tier
    return dict(ttft_mean=float(np.mean(ttft)), ttft_p90=float(np.percentile(ttft, 90)),
                prefill_tokens=sum(r.prefill_tokens for r in records),
                host_hit_pages=0 if tier is None else tier.num_hit_pages,
                seconds=time.perf_counter() - t0, answers=answers)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--user-tokens", type=int, default=384)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cache-conversations", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import jax.numpy as jnp

    from jaxserve.config import EngineConfig
    from jaxserve.engine import Engine
    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.tokenizer import Tokenizer

    ckpt = load_checkpoint(default_model_path(), dtype=jnp.float32)
    tokenizer = Tokenizer.from_gguf_metadata(ckpt.gguf_metadata)
    rng = np.random.default_rng(a.seed)
    turns = [(c, rng.integers(100, 40000, a.user_tokens).tolist())
             for _ in range(a.turns) for c in range(a.conversations)]
    page, chat_len = 16, a.turns * (a.user_tokens + a.max_tokens)
    pages = int(a.cache_conversations * chat_len / page) + 1
    base = EngineConfig(max_model_len=chat_len + page, num_kv_pages=pages, record_steps=True,
                        max_num_seqs=a.conversations)
    print(f"{a.conversations} chats x {a.turns} turns of {a.user_tokens} + {a.max_tokens} "
          f"tokens; device cache {pages} pages of {page} ({a.cache_conversations} chats)")
    rows = {}
    for name, tier in (("forget evicted pages", False), ("host prefix tier", True)):
        engine = Engine.from_components(dataclasses.replace(base, host_prefix_cache=tier),
                                        ckpt.model, tokenizer)
        rows[name] = run(engine, turns, a)
        del engine
    first, second = rows.values()
    assert first["answers"] == second["answers"], "the tier changed an answer"
    print("| mode | TTFT mean (s) | TTFT p90 (s) | prompt tokens computed | pages from host | "
          "wall (s) |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ttft_mean']:.3f} | {r['ttft_p90']:.3f} | {r['prefill_tokens']} | "
              f"{r['host_hit_pages']} | {r['seconds']:.1f} |")
    print(f"TTFT ratio (forget / tier): {first['ttft_mean'] / second['ttft_mean']:.2f}x; "
          f"answers equal: yes")


if __name__ == "__main__":
    main()
