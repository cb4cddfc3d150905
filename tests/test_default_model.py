"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers
loading the same file: teacher-forced log-probs, and greedy chat continuations through the engine."""

import numpy as np
import pytest
import torch
import transformers

from jaxserve.config import EngineConfig
from jaxserve.engine import Engine
from jaxserve.sampling import SamplingParams
from tests.paged_driver import PagedDriver, log_norm

pytestmark = pytest.mark.slow

TEXT = """JAX is a Python library for accelerator-oriented array computation and program
transformation, designed for high-performance numerical computing and large-scale machine learning.
It can automatically differentiate native Python and NumPy functions, through loops, branches,
recursion and closures, and it can take derivatives of derivatives of derivatives. It supports
reverse-mode differentiation (backpropagation) as well as forward-mode differentiation, and the two
can be composed arbitrarily to any order. What is new is that JAX uses XLA to compile and run your
NumPy programs on GPUs and TPUs. Compilation happens under the hood by default, with library calls
getting just-in-time compiled and executed. But JAX also lets you just-in-time compile your own
Python functions into XLA-optimized kernels using a one-function API. Compilation and automatic
differentiation can be composed arbitrarily, so you can express sophisticated algorithms and get
maximal performance without leaving Python. Serving a language model means running its forward pass
over and over: a long prompt first, then one token at a time for many users at once, keeping the
keys and values of every earlier token in a cache that grows page by page. 日本語も少し。 🙂"""

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Explain what a KV cache is in one sentence."}],
]


@pytest.fixture(scope="module")
def hf_model(default_model_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32)
    return model.eval()


def test_teacher_forced_logprobs_match_hf(smol_checkpoint, smol_tokenizer, hf_model):
    ids = smol_tokenizer.encode(TEXT)
    assert 250 <= len(ids) <= 512
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1).numpy()
    drv = PagedDriver(smol_checkpoint.model, page_size=16, num_pages=64)
    logits = np.concatenate([drv.step({0: ids[:200]}, query_block=16)[0],
                             drv.step({0: ids[200:]}, query_block=16)[0]])  # two chunks
    ours = logits - log_norm(logits)
    assert np.abs(ours - ref).max() <= 2e-3


# Greedy replies equal HF's token for token at least this far (float32 against transformers'
# float32 on the same dequantized weights: a divergence needs a near-tie, which is rare early).
MIN_AGREEING_TOKENS = 16


def check_logprobs_close(ours, theirs, k=5, min_agreeing=MIN_AGREEING_TOKENS):
    """vLLM's criterion: equal token for token, or, at the first divergence, each side's token
    is in the other's top-k (after which the sequences are not compared); and no divergence
    before `min_agreeing` tokens."""
    for pos, ((a, a_top), (b, b_top)) in enumerate(zip(ours, theirs)):
        if a != b:
            assert a in b_top[:k] and b in a_top[:k], f"diverged at {pos}: {a} vs {b}"
            assert pos >= min_agreeing, f"diverged at {pos}, before {min_agreeing}: {a} vs {b}"
            return pos
    return None


def test_engine_greedy_matches_hf_and_batch_equals_alone(smol_checkpoint, smol_tokenizer, hf_model):
    config = EngineConfig(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
                          decode_buckets=(1, 4), num_kv_pages=128)
    engine = Engine.from_components(config, smol_checkpoint.model,
                                    smol_tokenizer)
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=5)
    prompts = [smol_tokenizer.encode_chat(c) for c in CHATS]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    batch = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                batch[out.request_id] = out.outputs[0]
    for i, p in enumerate(prompts):
        engine.add_request("alone", p, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                alone = out.outputs[0]
        assert alone.token_ids == batch[str(i)].token_ids
        ours = [(t, sorted(lp, key=lambda x: lp[x].rank or 99)) for t, lp in
                zip(batch[str(i)].token_ids, batch[str(i)].logprobs)]
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True,
                                    pad_token_id=2)
        hf_tokens = gen.sequences[0, len(p):].tolist()
        theirs = [(t, torch.topk(s[0], 5).indices.tolist()) for t, s in zip(hf_tokens, gen.scores)]
        check_logprobs_close(ours, theirs)
    assert "Paris" in batch["0"].text
