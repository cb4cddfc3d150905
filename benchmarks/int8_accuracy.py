"""How far int8 projections (W8A8, as YNN's s8 dots would run them) move the default model,
against float32 and beside bfloat16, measured before building them as an option.

    python benchmarks/int8_accuracy.py [--windows 4] [--tokens 256]

Every projection (qkv, o, gate_up, down; not the embedding or the tied head) computed as int8
inputs times int8 weights: the input quantized per row and the weight per output channel,
absmax to 127 (round to nearest), the products summed exactly and scaled back -- simulated
here in float32 (quantize, dequantize, then the float32 einsum: the same numbers up to float32
rounding of the sums). Teacher-forced over windows of a license text (prompt log-probs), each
variant against float32: the mean |difference| of the text's token log-probs, the share of
positions whose most likely token agrees, and each variant's perplexity.

Speed is measured in benchmarks/matmuls.py and docs/performance.md (int8 through XLA lost to
the packed bf16 weights at 1-32 rows), so int8 is not an engine option.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import jax.numpy as jnp  # noqa: E402

import throughput  # noqa: E402  (this folder is on sys.path)


def fake_int8(einsum):
    """`einsum(spec, x, w, **kw)` with x and w quantized to int8 and back (see the doc)."""
    def run(spec, x, w, **kw):
        c = len(spec.split(",")[0]) - 1  # x [T, *C] . w [*C, *N]: C contracted
        xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
        sx = jnp.max(jnp.abs(xf), axis=tuple(range(1, 1 + c)), keepdims=True) / 127
        sw = jnp.max(jnp.abs(wf), axis=tuple(range(c)), keepdims=True) / 127
        sx, sw = jnp.where(sx > 0, sx, 1.0), jnp.where(sw > 0, sw, 1.0)
        xq, wq = jnp.round(xf / sx) * sx, jnp.round(wf / sw) * sw
        return einsum(spec, xq.astype(x.dtype), wq.astype(w.dtype), **kw)
    return run


def text_logprobs(llm, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(log-prob of each prompt token after the first, the most likely token there)."""
    from jaxserve import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                        use_tqdm=False)
    lp, top = [], []
    for p, o in zip(prompts, outs):
        for tok, pos in zip(p[1:], o.prompt_logprobs[1:]):
            lp.append(pos[tok].logprob)
            top.append(min(pos, key=lambda t: pos[t].rank))
    return np.array(lp), np.array(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    from jaxserve import LLM
    from jaxserve.models import llama

    def engine(dtype):
        return LLM(dtype=dtype, max_num_seqs=a.windows, max_model_len=a.tokens + 16, progress=False)

    ref = engine("float32")
    throughput.PROMPT_LEN = a.tokens  # windows of this many tokens
    prompts = throughput.make_prompts(ref.get_tokenizer(), a.windows)
    rows = {"float32": text_logprobs(ref, prompts)}
    del ref
    rows["bfloat16"] = text_logprobs(engine("bfloat16"), prompts)
    # int8: every projection's einsum quantized (the model's and, on one CPU device, the runner's)
    llama.project, llama.project_cpu = fake_int8(llama.project), fake_int8(llama.project)
    rows["int8 W8A8 (float32 otherwise)"] = text_logprobs(engine("float32"), prompts)
    lp32, top32 = rows["float32"]
    n = len(lp32)
    print(f"default model, {a.windows} windows of {a.tokens} tokens ({n} teacher-forced positions)\n")
    print("| variant | mean abs diff of token log-prob vs float32 | top-1 agrees with float32 | perplexity |")
    print("|---|---|---|---|")
    for name, (lp, top) in rows.items():
        print(f"| {name} | {np.mean(np.abs(lp - lp32)):.4f} | {np.mean(top == top32):.1%} | "
              f"{math.exp(-np.mean(lp)):.3f} |")


if __name__ == "__main__":
    main()
