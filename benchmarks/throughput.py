"""Offline throughput on the default model: jaxserve against HF transformers and vLLM in one run.

The work of ../shared/peers (and of vLLM's offline benchmark): distinct prompts of exactly 128
tokens (windows of a license text), 128 new tokens each, greedy, EOS ignored; batch sizes 1, 8,
32 and 64; float32 and bfloat16. Reports prefill tok/s, decode tok/s, end-to-end output tok/s,
warmup time, and the ratio of jaxserve to each peer on the same prompts: HF transformers
`generate` (torch on the same 2 cores) and vLLM's CPU build, run in its own interpreter
(`--vllm-python`; see peers.py) on the GGUF dequantized into an HF folder. Batch 1 keeps the
least disturbed of 3 runs of every engine (`--batch1-repeats`). Then the machine's copy
bandwidth (the better of a copy before and one after the engines ran) and, per dtype, the
batch-1 limit it sets (weight bytes / bandwidth) and jaxserve's fraction of it.

    python benchmarks/throughput.py                         # everything (~15 min here)
    python benchmarks/throughput.py --batches 1,32 --dtypes float32 --peers hf
    python benchmarks/throughput.py --peers hf,vllm --batches 1,32 --vllm-python VENV/bin/python
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's jaxserve

import peers  # noqa: E402  (benchmarks/peers.py: this script's folder is on sys.path)

PROMPT_LEN, NEW_TOKENS = 128, 128
TEXT_FILE = "/usr/share/common-licenses/GPL-3"


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    """n distinct windows of PROMPT_LEN tokens of a license text (any long text would do)."""
    try:
        text = open(TEXT_FILE).read()
    except OSError:
        text = " ".join(f"Clause {i}: the licensee may copy, modify and share this work." for i in range(4000))
    ids = tokenizer.encode(text)
    stride = max(1, (len(ids) - PROMPT_LEN) // max(1, n))
    return [ids[b * stride: b * stride + PROMPT_LEN] for b in range(n)]


def bench_jaxserve(dtype: str, batches: list[int], repeats: int, batch1_repeats: int = 1):
    from jaxserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(dtype=dtype, max_num_seqs=max(batches), max_num_batched_tokens=512,
              decode_buckets=tuple(sorted(set(batches))), progress=False)
    warmup = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = make_prompts(llm.get_tokenizer(), max(batches))
    rows = []
    for b in batches:
        runs = []
        for _ in range(runs_at(b, repeats, batch1_repeats) + 1):  # the first also settles the allocator
            start, wall = time.perf_counter(), time.time()
            outs = llm.generate(prompts[:b], params, use_tqdm=False)
            end = time.perf_counter()
            first = max(o.metrics.first_token_time for o in outs) - wall  # every prompt prefilled
            assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
            runs.append((end - start, first))
        total, first = min(runs[1:])  # least disturbed run; the machine is shared
        prefill = b * PROMPT_LEN / first
        decode = b * (NEW_TOKENS - 1) / max(total - first, 1e-9)
        rows.append(dict(engine="jaxserve", dtype=dtype, batch=b, prefill=prefill, decode=decode,
                         e2e=b * NEW_TOKENS / total, warmup=warmup))
    return rows, weight_bytes(llm.model)


def runs_at(batch: int, repeats: int, batch1_repeats: int) -> int:
    """Timed runs of a batch, the least disturbed kept, for every engine alike: batch 1's runs
    last ~1 s, where one disturbance of this shared machine moved a single run by 10-30%."""
    return max(repeats, batch1_repeats) if batch == 1 else repeats


def weight_bytes(model) -> int:
    """Bytes of the parameters a decode step reads (the tied embedding counted once)."""
    import jax
    from flax import nnx

    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def bench_hf(dtype: str, batches: list[int], repeats: int, batch1_repeats: int = 1):
    import torch
    import transformers

    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.tokenizer import Tokenizer

    torch.set_num_threads(os.cpu_count())
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    tok = Tokenizer.from_gguf_metadata(load_checkpoint(path).gguf_metadata)
    prompts = np.array(make_prompts(tok, max(batches)), np.int64)
    rows = []
    for b in batches:
        x = torch.from_numpy(prompts[:b])

        def run():
            with torch.inference_mode():
                return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)

        run()
        times = []
        for _ in range(runs_at(b, repeats, batch1_repeats)):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        rows.append(dict(engine="hf", dtype=dtype, batch=b, prefill=None, decode=None,
                         e2e=b * NEW_TOKENS / min(times), warmup=None))
    return rows


def bench_vllm(dtype: str, batches: list[int], repeats: int, python: str | None,
               batch1_repeats: int = 1):
    """vLLM's CPU build on the same prompt ids, in its own interpreter, from the default model's
    GGUF dequantized into an HF folder (the same weights jaxserve runs)."""
    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.tokenizer import Tokenizer

    if not python:
        return peers.run_vllm(None, {})
    tok = Tokenizer.from_gguf_metadata(load_checkpoint(default_model_path()).gguf_metadata)
    job = dict(mode="offline", model=str(peers.dense_default_folder()), dtype=dtype,
               prompts=make_prompts(tok, max(batches)), batches=batches,
               repeats=[runs_at(b, repeats, batch1_repeats) for b in batches],
               new_tokens=NEW_TOKENS, max_model_len=512)
    return peers.run_vllm(python, job)


def print_limits(rows, bandwidth: float, weight_bytes: dict):
    """Batch-1 decode reads every weight once a token: weight bytes / copy bandwidth bounds it."""
    print(f"copy bandwidth (numpy, 512 MiB, read + write, the better of the two): {bandwidth / 1e9:.1f} GB/s")
    print(f"{'dtype':<9} {'weight MB':>9} {'batch-1 limit tok/s':>19} {'jaxserve out / limit':>20} "
          f"{'decode / limit':>14}")
    for dtype, nbytes in weight_bytes.items():
        limit = bandwidth / nbytes
        ours = [r for r in rows if r["engine"] == "jaxserve" and r["dtype"] == dtype and r["batch"] == 1]
        out = f"{ours[0]['e2e'] / limit:20.2f}" if ours else f"{'-':>20}"
        dec = f"{ours[0]['decode'] / limit:14.2f}" if ours else f"{'-':>14}"
        print(f"{dtype:<9} {nbytes / 1e6:9.0f} {limit:19.1f} {out} {dec}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--peers", default="hf,vllm", help="comma list of hf, vllm; empty for none")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch1-repeats", type=int, default=3, help="timed runs at batch 1, every "
                    "engine (the copy bandwidth is the best of 5 copies)")
    ap.add_argument("--vllm-python", default=peers.default_vllm_python(),
                    help=f"the interpreter of an environment with vLLM (default: ${peers.VLLM_PYTHON_ENV}, "
                         "else ../peers/vllmvenv/bin/python beside the checkout)")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    bandwidth = peers.copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows, nbytes = [], {}
    for dtype in a.dtypes.split(","):
        ours, nbytes[dtype] = bench_jaxserve(dtype, batches, a.repeats, a.batch1_repeats)
        rows += ours
        for peer in filter(None, a.peers.split(",")):
            if peer == "hf":
                rows += bench_hf(dtype, batches, a.repeats, a.batch1_repeats)
            elif peer == "vllm":
                rows += bench_vllm(dtype, batches, a.repeats, a.vllm_python, a.batch1_repeats)
            else:
                raise SystemExit(f"unknown peer {peer!r}: hf or vllm")
        print(*rows, sep="\n", flush=True)  # partial results, in case a long run is cut short
    ours = {(r["dtype"], r["batch"]): r["e2e"] for r in rows if r["engine"] == "jaxserve"}
    fmt = lambda v, spec: format("-", f">{spec.split('.')[0]}") if v is None else format(v, spec)
    print(f"\n{'engine':<9} {'dtype':<9} {'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} "
          f"{'out tok/s':>9} {'warmup s':>8} {'jaxserve / this':>15}")
    for r in rows:
        ratio = ours.get((r["dtype"], r["batch"]), 0) / r["e2e"] if r["engine"] != "jaxserve" else None
        print(f"{r['engine']:<9} {r['dtype']:<9} {r['batch']:>5} {fmt(r['prefill'], '13.0f')} "
              f"{fmt(r['decode'], '12.0f')} {r['e2e']:>9.1f} {fmt(r['warmup'], '8.1f')} "
              f"{fmt(ratio, '15.2f')}")
    # the limit from the better of the copies before and after the engines ran: a disturbed
    # moment at either end would otherwise lower the limit and flatter the fraction
    after = peers.copy_bandwidth()
    print(f"\ncopy bandwidth before / after the engines: {bandwidth / 1e9:.1f} / {after / 1e9:.1f} GB/s")
    print_limits(rows, max(bandwidth, after), nbytes)


if __name__ == "__main__":
    main()
