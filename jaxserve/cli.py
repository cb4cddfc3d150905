"""`jaxserve generate | chat | serve | eval | bench | fetch`.

    jaxserve generate "Write a haiku about the sea."        # chat-formatted, streamed
    jaxserve generate --raw "The capital of France is"      # plain completion
    jaxserve chat                                           # interactive, multi-turn
    jaxserve serve --port 8000 --api-key KEY                # OpenAI-compatible server
    jaxserve eval --budgets 1/4,1/8                         # sparse attention vs dense
    jaxserve bench serve --base-url http://127.0.0.1:8000   # load-test a running server
    jaxserve fetch                                          # download the default model
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def _engine_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF folder, .gguf file, or orbax folder from "
                   "`jaxserve convert` (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 where the hardware multiplies it natively (GPU, TPU, "
                        "a CPU with AVX512_BF16), else float32")
    g.add_argument("--max-model-len", type=int, default=None)
    # One conversation at a time: few shape buckets to compile (5 with these defaults).
    g.add_argument("--max-num-seqs", type=int, default=1)
    g.add_argument("--max-num-batched-tokens", type=int, default=128)
    g.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="bytes for the KV cache")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices to shard the model over (must divide the query heads)")
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0, to serve from several processes (jax.distributed)")
    g.add_argument("--num-processes", type=int, default=1)
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "fair"],
                   help="priority: lower `priority` first; fair: VTC per client (OpenAI `user`)")
    g.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap", "auto"])
    g.add_argument("--swap-space", type=int, default=1 << 30,
                   help="bytes of host memory for swapped-out KV and the host prefix cache")
    g.add_argument("--no-host-prefix-cache", dest="host_prefix_cache", action="store_false",
                   help="forget prefix-cached KV the device evicts instead of keeping it in "
                        "host memory for later turns")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="run each step's schedule, device work and postprocess in order instead "
                        "of dispatching the next step before the last one's results are back")
    g.add_argument("--no-cpu-packed-weights", dest="cpu_packed_weights", action="store_false",
                   help="bf16 on a CPU with AVX512_BF16: keep one copy of the weights instead of "
                        "a second one packed for the matmul kernel (slower projections)")
    g.add_argument("--prefill-policy", default="chunked", choices=["chunked", "layered"],
                   help="layered: a prefill advances one group of layers per step while decodes "
                        "run every layer (arXiv 2510.08055)")
    sp = p.add_argument_group("sparse decode attention (off unless --sparse-budget is given)")
    sp.add_argument("--sparse-budget", default=None, help="keys each decode reads: a fraction "
                    "of its context (0.125 or 1/8) or a number of tokens (1024)")
    sp.add_argument("--sparse-sink-tokens", type=int, default=16, help="first tokens always read")
    sp.add_argument("--sparse-window-tokens", type=int, default=64,
                    help="most recent tokens always read")
    sp.add_argument("--sparse-min-context", type=int, default=1024,
                    help="shorter contexts attend densely")
    sp.add_argument("--sparse-dense-layers", type=int, default=2,
                    help="the first layers attend densely")
    sp.add_argument("--sparse-reuse-steps", type=int, default=1,
                    help="decode steps a choice of pages serves (1: choose at every step)")


def _sparse_config(a, budget: str | None = None):
    """The SparseAttentionConfig the flags ask for (None: dense); `budget` overrides the flag."""
    from jaxserve.config import SparseAttentionConfig
    from jaxserve.errors import ConfigError

    budget = budget if budget is not None else a.sparse_budget
    if budget is None:
        return None
    budget, _, reuse = budget.partition("@")  # eval's "1/8@4": reuse each choice 4 steps
    try:
        reuse_steps = int(reuse) if reuse else a.sparse_reuse_steps
        num, _, den = budget.partition("/")
        if den or "." in budget:
            size = dict(budget_fraction=float(num) / float(den or 1))
        else:
            size = dict(budget_tokens=int(budget))
    except ValueError:
        raise ConfigError("sparse_budget", f"must be a fraction (0.125, 1/8) or a token count, "
                                           f"got {budget!r}") from None
    try:
        return SparseAttentionConfig(**size, sink_tokens=a.sparse_sink_tokens,
                                     window_tokens=a.sparse_window_tokens,
                                     min_context=a.sparse_min_context,
                                     dense_layers=a.sparse_dense_layers, reuse_steps=reuse_steps)
    except ConfigError as e:  # name the flag: sparse_attention.sink_tokens -> sparse_sink_tokens
        name = e.field.rpartition(".")[2]
        raise ConfigError("sparse_budget" if name.startswith("budget") else f"sparse_{name}",
                          e.problem) from None


def _sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _sampling_params(a):
    from jaxserve.sampling import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                          seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


def _llm(a):
    from jaxserve.llm import LLM

    return LLM(a.model, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
               max_num_batched_tokens=a.max_num_batched_tokens, kv_cache_memory=a.kv_cache_memory,
               decode_buckets=(1, 2, 4, 8, 16, 32, 64), tensor_parallel_size=a.tensor_parallel_size,
               coordinator_address=a.coordinator_address, num_processes=a.num_processes,
               process_id=a.process_id, sparse_attention=_sparse_config(a),
               scheduling_policy=a.scheduling_policy, preemption_mode=a.preemption_mode,
               swap_space=a.swap_space, host_prefix_cache=a.host_prefix_cache,
               prefill_policy=a.prefill_policy, async_scheduling=a.async_scheduling,
               cpu_packed_weights=a.cpu_packed_weights)


def cmd_generate(a) -> int:
    params = _sampling_params(a)  # validate before loading anything
    llm = _llm(a)
    prompt = a.prompt if a.raw else [{"role": "user", "content": a.prompt}]
    for delta in llm.stream(prompt, params):
        print(delta, end="", flush=True)
    print()
    return 0


def cmd_chat(a) -> int:
    from jaxserve.errors import JaxserveError

    params = _sampling_params(a)
    llm = _llm(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    turns: list[dict] = []  # user and assistant messages after the system prompt
    print("jaxserve chat: type a message, /reset to start over, Ctrl-C to stop a reply, Ctrl-D "
          "to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/reset":
            turns = []
            continue
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line})
        turns = _fit_context(llm, system, turns, params.max_tokens)
        if not turns:
            continue
        reply = []
        # Each turn re-sends the conversation; its pages are found in the prefix cache, so only
        # the new message is computed.
        stream = llm.stream(system + turns, params)
        # Ctrl-C stops this reply only: it is noted, and acted on between deltas, never inside
        # an engine step (which would leave the step half-applied).
        stopped = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stopped.set())
        try:
            for delta in stream:
                print(delta, end="", flush=True)
                reply.append(delta)
                if stopped.is_set():
                    print(" [stopped]", end="", file=sys.stderr)
                    break
        except JaxserveError as e:
            print(f"\njaxserve: error: {e}", file=sys.stderr)
            turns.pop()
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
            stream.close()  # aborts the request if it has not finished
        print()
        turns.append({"role": "assistant", "content": "".join(reply)})


def _fit_context(llm, system: list[dict], turns: list[dict], max_tokens: int | None) -> list[dict]:
    """Drop the oldest turns (saying so) until the conversation leaves room for the reply
    (`max_tokens`, or a quarter of the context) in the model's context."""
    limit = llm.engine.max_model_len
    room = max_tokens if max_tokens is not None else limit // 4
    tokenizer = llm.get_tokenizer()
    dropped = 0
    while turns and len(tokenizer.encode_chat(system + turns)) + room > limit:
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # start at a user message
            turns = turns[1:]
        dropped += 1
    if not turns:
        print(f"jaxserve: this message is too long for the context ({limit} tokens with "
              f"{room} for the reply); send a shorter one", file=sys.stderr)
    elif dropped:
        print(f"(dropped the oldest {dropped} message(s) to fit the context of {limit} tokens)",
              file=sys.stderr)
    return turns


def cmd_serve(a) -> int:
    import logging
    import os

    from jaxserve import multihost
    from jaxserve.server import ServerLimits, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = ServerLimits(max_n=a.max_n, max_waiting_requests=a.max_waiting_requests,
                          max_request_bytes=a.max_request_bytes)  # checked before loading
    engine = _llm(a).engine
    if not multihost.is_leader():  # other processes compute the steps process 0 broadcasts
        steps = multihost.run_worker(engine)
        logging.getLogger("jaxserve").info("worker: process 0 stopped; ran %d steps", steps)
        return 0
    try:
        return serve(engine, host=a.host, port=a.port, model_name=a.served_model_name,
                     api_key=a.api_key or os.environ.get("JAXSERVE_API_KEY") or None,
                     limits=limits, shutdown_timeout=a.shutdown_timeout, log_level=a.log_level)
    finally:
        multihost.stop_workers(engine)


def cmd_eval(a) -> int:
    """Dense against each sparse budget on one engine: perplexity, passkey, agreement."""
    import dataclasses
    import json

    from jaxserve import eval as ev

    configs = [_sparse_config(a, b) for b in a.budgets.split(",")]  # validate before loading
    a.sparse_budget = a.budgets.split(",")[0]  # the engine keeps page summaries
    llm = _llm(a)
    results = ev.evaluate(llm.engine, configs, lengths=_ints(a.lengths),
                          depths=[float(d) for d in a.depths.split(",")],
                          ppl_window=a.ppl_window, ppl_forced=a.ppl_forced,
                          ppl_windows=a.ppl_windows, agreement_tokens=a.agreement_tokens)
    print(ev.table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(label=r.label, config=r.config and dataclasses.asdict(r.config),
                            perplexity=r.perplexity, agreement=r.agreement, seconds=r.seconds,
                            passkey={f"{n}@{d}": ok for (n, d), ok in r.passkey.items()})
                       for r in results], f, indent=1)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def cmd_bench_serve(a) -> int:
    from jaxserve.server.bench import main as bench_main

    return bench_main(a)


def cmd_fetch(a) -> int:
    from jaxserve.models.fetch import fetch

    print(fetch())
    return 0


def cmd_convert(a) -> int:
    from jaxserve.models.orbax import convert

    print(convert(a.src, a.dst, dtype=a.dtype))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxserve", description="JAX inference engine for LLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt (streamed)")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    _engine_args(g), _sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat (streamed)")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c), _sampling_args(c)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="required as 'Authorization: Bearer KEY' on "
                   "/v1/* (default: $JAXSERVE_API_KEY; none = open)")
    s.add_argument("--served-model-name", nargs="+", default=None, help="the model id "
                   "clients send; several names: the first is listed, all are accepted "
                   "(default: the model's name, e.g. SmolLM2-135M-Instruct for its GGUF file)")
    s.add_argument("--max-waiting-requests", type=int, default=256, help="queued sequences "
                   "beyond which requests get 503")
    s.add_argument("--max-request-bytes", type=int, default=1 << 20)
    s.add_argument("--max-n", type=int, default=16, help="largest n per request")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests "
                   "get to finish after SIGTERM before they are aborted")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _engine_args(s)
    # A server batches many requests: more sequences and a larger step than one chat needs.
    # 512 tokens a step: 32 requests of 128 tokens all at once served at 442-458 output tok/s
    # against 396-424 with 256 and 412 with 1024, TTFT p99 1.8-2.0 s against 2.4-2.7 (bf16,
    # packed weights, benchmarks/serving.py --engine-args, alternating, 2026-12-03).
    s.set_defaults(func=cmd_serve, max_num_seqs=32, max_num_batched_tokens=512,
                   kv_cache_memory=1 << 30)
    ev = sub.add_parser("eval", help="quality of sparse decode attention against dense: "
                        "perplexity, passkey retrieval, greedy agreement (jaxserve.eval)")
    ev.add_argument("--budgets", default="1/4,1/8,1/16", help="sparse budgets to compare "
                    "(BUDGET@N: each choice of pages reused for N steps)")
    ev.add_argument("--lengths", default="1024,2048,4096,8192", help="passkey prompt lengths")
    ev.add_argument("--depths", default="0.25,0.75", help="passkey depths (0 = start)")
    ev.add_argument("--ppl-windows", type=int, default=2, help="text windows for perplexity "
                    "(also the prompts of the greedy agreement)")
    ev.add_argument("--ppl-window", type=int, default=3072, help="tokens of each window (prompt)")
    ev.add_argument("--ppl-forced", type=int, default=64,
                    help="tokens scored after each window, one decode step each")
    ev.add_argument("--agreement-tokens", type=int, default=256, help="greedy tokens compared")
    ev.add_argument("--json", default=None, help="also write the results to this file")
    _engine_args(ev)
    ev.set_defaults(func=cmd_eval, max_model_len=8192, max_num_seqs=16,
                    max_num_batched_tokens=512, kv_cache_memory=3 << 30)
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from jaxserve.server.bench import add_arguments

    bs = b.add_parser("serve", help="load-test an OpenAI-compatible server (like vllm bench serve)")
    add_arguments(bs)
    bs.set_defaults(func=cmd_bench_serve)
    f = sub.add_parser("fetch", help="download the default model (if needed) and print its path")
    f.set_defaults(func=cmd_fetch)
    cv = sub.add_parser("convert", help="write an HF folder or .gguf file as an orbax checkpoint")
    cv.add_argument("src", help="HF folder or .gguf file (`jaxserve fetch` prints the default model's)")
    cv.add_argument("dst", help="new folder for the orbax checkpoint")
    cv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype the params are stored in")
    cv.set_defaults(func=cmd_convert)
    a = ap.parse_args(argv)
    from jaxserve.errors import JaxserveError

    try:
        return a.func(a)
    except JaxserveError as e:  # configuration and input errors: one line, naming the flag
        print(f"jaxserve: error: {_name_flags(str(e), vars(a))}", file=sys.stderr)
        return 2


def _name_flags(message: str, options: dict) -> str:
    """The message with each option's field name (`max_num_seqs`) written as its flag."""
    import re

    names = sorted((n for n in options if "_" in n), key=len, reverse=True)
    if not names:
        return message
    return re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b",
                  lambda m: "--" + m.group(1).replace("_", "-"), message)


if __name__ == "__main__":
    sys.exit(main())
