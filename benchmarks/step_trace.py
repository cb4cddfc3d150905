"""Where an engine step's time goes, op by op, from a `jax.profiler` trace of the real step.

    python benchmarks/step_trace.py [--batch 32] [--dtype bfloat16] [--steps 30]
    python benchmarks/step_trace.py --prefill 256          # steps of 256 prompt tokens

`decode_profile.py` times each part as a program of its own; this traces the engine's own steps
(synchronous, the default model, B requests of 128 prompt tokens decoding, or with --prefill T
8 prompts of 128 tokens prefilled T tokens a step) and adds up the XLA:CPU thunks of every
program by what they are: each C++ kernel call is named from the compiled programs' HLO (its
FFI target and weight shape: qkv, o, gate_up (with SiLU x up where the weights are packed), down, head, attention), every other thunk by its
fusion kind. "ms/step" is a thunk's time on the thread that ran it, so parts that run at once on
the two threads add up to more than the step; helpers a kernel wakes on the pool are not
counted apart (a kernel's time is the caller's wait for all of it).
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import shutil
import tempfile
import time

import jax


def kernel_labels(runner) -> dict[str, str]:
    """ffi_call name -> what it computes, over every compiled program (where a name means two
    things in two programs, both are kept: 'qkv|head')."""
    c = runner.config
    d, e, f = c.hidden_size, c.head_dim, c.intermediate_size
    by_shape = {(d, (c.num_heads + 2 * c.num_kv_heads) * e): "qkv", (c.num_heads * e, d): "o",
                (d, 2 * f): "gate_up", (f, d): "down"}
    labels = collections.defaultdict(set)
    for exe in runner.programs.compiled.values():
        for line in exe.as_text().splitlines():
            m = re.search(r"%(ffi_call[.\d]*) = .*custom_call_target=\"(\w+)\", "
                          r"operand_layout_constraints=\{(.*?)\}, api_version", line)
            if not m:
                continue
            name, target, operands = m.groups()
            if target == "jaxserve_paged_attention":
                labels[name].add("attention")
            elif target == "jaxserve_matmul_rows":
                labels[name].add("head")
            elif target == "jaxserve_matmul_packed_swiglu":  # SiLU(gate) * up included
                labels[name].add("gate_up")
            elif target == "jaxserve_matmul_packed":  # w [N / 16, K / 2, 16]
                s, p, _ = map(int, re.findall(r"\[(\d+),(\d+),(\d+)\]", operands)[-1])
                w = (2 * p, 16 * s)
                labels[name].add("head" if w == (d, c.vocab_size) else by_shape.get(w, f"matmul {w}"))
            else:
                shapes = re.findall(r"\[(\d+),(\d+)\]", operands)
                w = tuple(map(int, shapes[-1])) if shapes else None
                labels[name].add(by_shape.get(w, f"matmul {w}"))
    return {name: "|".join(sorted(v)) for name, v in labels.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0, help="trace prefill steps of this many tokens")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()

    from jaxserve import LLM, SamplingParams

    budget = a.prefill or 512
    llm = LLM(dtype=a.dtype, max_num_seqs=32, max_num_batched_tokens=budget, progress=False,
              async_scheduling=False)
    engine = llm.engine
    n = 8 if a.prefill else a.batch
    params = SamplingParams(temperature=0, max_tokens=1 if a.prefill else 1024, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"w{i}", list(range(1000 + 7 * i, 1128 + 7 * i)), params)
    while engine.has_unfinished_requests() and (a.prefill or engine.scheduler.num_waiting):
        engine.step()  # warm: every program of these shapes has run once
    if a.prefill:
        for i in range(n):
            engine.add_request(f"p{i}", list(range(5000 + 7 * i, 5128 + 7 * i)), params)
    else:
        for _ in range(5):
            engine.step()
    folder = tempfile.mkdtemp()
    steps = 0
    jax.profiler.start_trace(folder)
    t0 = time.perf_counter()
    while steps < a.steps and engine.has_unfinished_requests():
        engine.step()
        steps += 1
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    for i in range(n):
        engine.abort(f"w{i}")

    labels = kernel_labels(engine.runner)
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    parts = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                name = ev.name
                if name.startswith(("ThunkExecutor", "end:", "ThreadpoolListener", "SlinkyThreadPool")):
                    continue
                parts[labels.get(name, re.sub(r"\.\d+$", "", name))] += ev.duration_ns
    shutil.rmtree(folder, ignore_errors=True)
    what = f"prefill steps of {a.prefill} tokens (8 prompts of 128)" if a.prefill else \
        f"decode steps of {a.batch} requests (128-token prompts)"
    print(f"{a.dtype}, {what}: {steps} steps traced, {1e3 * wall / steps:.2f} ms a step "
          "(tracing included)\n")
    print("| part | ms/step | share of the thunks |\n|---|---|---|")
    total = sum(parts.values())
    for name, ns in parts.most_common(16):
        print(f"| {name} | {ns / steps / 1e6:.2f} | {ns / total:.0%} |")
    rest = total - sum(ns for _, ns in parts.most_common(16))
    print(f"| (the rest) | {rest / steps / 1e6:.2f} | {rest / total:.0%} |")


if __name__ == "__main__":
    main()
