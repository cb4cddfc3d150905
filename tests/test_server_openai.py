"""`jaxserve serve` on the default model, driven by the official `openai` client, as a user of
vLLM would drive it; ends with SIGTERM under load (the process drains and exits)."""

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server_util import process_server

pytestmark = pytest.mark.slow

KEY = "sk-test"
# float32, not the CLI's `--dtype auto`: greedy answers are compared across tensor-parallel
# layouts and with fixed text, and in bfloat16 the default model's first chat token is a
# near-tie that summation order alone flips ("The" against "L", 0.1 apart in log-prob)
SERVE_ARGS = ("--api-key", KEY, "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
              "--max-model-len", "512", "--shutdown-timeout", "3", "--log-level", "warning",
              "--dtype", "float32")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(default_model_path):
    with process_server(*SERVE_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0, timeout=300)


def n_tokens(url, **body) -> int:
    return httpx.post(f"{url}/tokenize", json=body).json()["count"]


def test_models(client):
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]


def test_completion_and_usage(client, served):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                  max_tokens=8, temperature=0, logprobs=3)
    c = r.choices[0]
    assert c.text.strip().startswith("Paris")
    assert len(c.logprobs.tokens) == r.usage.completion_tokens == 8
    assert "".join(c.logprobs.tokens) == c.text
    for value, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert value == pytest.approx(max(top.values())) and len(top) == 3
    assert r.usage.prompt_tokens == n_tokens(served[0], prompt="The capital of France is")
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_and_streamed_chat_agree(client, served):
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                           max_tokens=40, temperature=0)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == n_tokens(served[0], messages=QUESTION)
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                            max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert deltas == text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
        whole.choices[0].finish_reason


def test_n_seed_and_extra_sampling_fields(client):
    kw = dict(model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=12, temperature=1.0,
              n=2, seed=7, logprobs=True,
              extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # n seeded samples differ
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)


def test_chat_logprobs_and_stop(client):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                       max_tokens=30, temperature=0, logprobs=True, top_logprobs=3,
                                       stop=["."])
    c = r.choices[0]
    assert c.finish_reason == "stop" and "." not in c.message.content
    content = c.logprobs.content
    assert "".join(t.token for t in content).startswith(c.message.content)
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


def test_errors_through_the_client(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="word " * 600, max_tokens=4)
    assert "512" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_tensor_parallel_server_answers_like_one_device(client):
    """`jaxserve serve --tensor-parallel-size 3` (SmolLM2's 9 query / 3 KV heads over 3 of the
    suite's 8 CPU devices) gives the one-device server's greedy answers."""
    import openai

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    want = [client.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=16,
                                      temperature=0).choices[0].text for p in prompts]
    with process_server(*SERVE_ARGS, "--tensor-parallel-size", "3") as (url, _):
        tp = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        got = [tp.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=16,
                                     temperature=0).choices[0].text for p in prompts]
        chat = tp.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                          max_tokens=20, temperature=0)
    assert got == want
    assert "Paris" in chat.choices[0].message.content


def test_sigterm_drains_and_exits(served):
    """Last in this module: it stops the server. Streams running at SIGTERM end (aborted after
    --shutdown-timeout 3) with finish_reason "abort" and [DONE]; new requests get 503; the
    process exits."""
    url, proc = served
    results, started = {}, [threading.Event() for _ in range(3)]

    def stream(i):
        body = {"prompt": f"Count to a thousand: {i}", "max_tokens": 480, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
            results[i] = []
            for line in r.iter_lines():
                if line:
                    results[i].append(line)
                    started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert all(e.wait(120) for e in started)  # all three are generating
    proc.send_signal(signal.SIGTERM)
    for _ in range(6000):  # until the drain has begun (a hang guard, not a speed check)
        if httpx.get(f"{url}/health", timeout=10).status_code != 200:
            break
        time.sleep(0.05)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert proc.wait(timeout=300) == 0  # the streams were aborted after --shutdown-timeout 3
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    for lines in results.values():
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"
    assert len(results) == 3
