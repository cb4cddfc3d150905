"""Run vLLM offline on one job and print its rows: started by peers.run_vllm under vLLM's own
interpreter (it cannot import jaxserve). The job is JSON on stdin:

    {"mode": "offline", "model": HF_FOLDER, "dtype": "float32", "prompts": [[ids...], ...],
     "batches": [1, 32], "repeats": [3, 1], "new_tokens": 128, "max_model_len": 512}
        -> one row per batch: end-to-end output tok/s of the first `batch` prompts (the best
           of that batch's repeats)
    {"mode": "decode_steps", "model": ..., "dtype": ..., "prompts": [...], "steps": 64,
     "warm_tokens": 4, "repeats": 1, "max_model_len": 512}
        -> one row: decode steps/s and tok/s with every prompt decoding at once, from the time of
           warm_tokens + steps new tokens less that of warm_tokens (prefill and first steps apart)

Greedy, EOS ignored. Rows go to stdout as one line `VLLM_ROWS [json]`; vLLM logs to stderr.
"""

import json
import sys
import time


def best_time(llm, prompts, params, repeats):
    llm.generate(prompts, params, use_tqdm=False)  # untimed: the first run of a shape
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return min(times)  # least disturbed run: the machine is shared


def main():
    job = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job.get("max_model_len", 512),
              max_num_seqs=max(256, len(job["prompts"])), seed=0)
    init = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": list(p)} for p in job["prompts"]]
    greedy = lambda n: SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    rows = []
    if job["mode"] == "offline":
        n = job["new_tokens"]
        for b, repeats in zip(job["batches"], job["repeats"]):
            t = best_time(llm, prompts[:b], greedy(n), repeats)
            rows.append(dict(engine="vllm", dtype=job["dtype"], batch=b, prefill=None, decode=None,
                             e2e=b * n / t, warmup=init))
    elif job["mode"] == "decode_steps":
        warm, steps = job["warm_tokens"], job["steps"]
        short = best_time(llm, prompts, greedy(warm), job["repeats"])
        full = best_time(llm, prompts, greedy(warm + steps), job["repeats"])
        secs = max(full - short, 1e-9)
        rows.append(dict(engine="vllm", dtype=job["dtype"], requests=len(prompts), steps=steps,
                         steps_per_s=steps / secs, tok_per_s=steps * len(prompts) / secs, init=init))
    else:
        raise SystemExit(f"unknown mode {job['mode']!r}")
    print("VLLM_ROWS " + json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
