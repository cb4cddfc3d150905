"""jaxserve in five calls, on the default model (SmolLM2-135M-Instruct, fetched on first use).

    python examples/quickstart.py
"""

from jaxserve import LLM, SamplingParams

# Small limits keep the warmup short: 8 requests at a time, 128-token steps.
llm = LLM(max_num_seqs=8, max_num_batched_tokens=128, decode_buckets=(1, 8))

# 1. Batched generation: outputs come back in prompt order.
greedy = SamplingParams(temperature=0, max_tokens=24)
for out in llm.generate(["The capital of France is", "def fibonacci(n):"], greedy):
    print(repr(out.prompt), "->", repr(out.outputs[0].text))

# 2. Streaming: text deltas as they are produced.
for delta in llm.stream("Once upon a time", SamplingParams(temperature=0.8, seed=0, max_tokens=32)):
    print(delta, end="", flush=True)
print()

# 3. Chat: the model's own chat template, rendered in a sandbox.
reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy)[0]
print("chat ->", reply.outputs[0].text)

# 4. Log-probs: per position, {token_id: Logprob(logprob, rank, decoded_token)} for the top 3
# and the chosen token.
out = llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=3, logprobs=3))[0]
for token_id, position in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
    print(position[token_id].decoded_token, {lp.decoded_token: round(lp.logprob, 2)
                                             for lp in position.values()})

# 5. Several samples per prompt, reproducible with a seed.
out = llm.generate("A haiku about JAX:", SamplingParams(n=2, temperature=1.0, seed=42, max_tokens=20))[0]
for completion in out.outputs:
    print(completion.index, repr(completion.text))
