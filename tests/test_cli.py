"""CLI configuration errors: one line naming the flag, exit status 2, no traceback, before any
model is loaded."""

import pytest

from jaxserve.cli import main


@pytest.mark.parametrize("argv,message", [
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs must be an integer >= 1, got 0"),
    (["serve", "--num-processes", "2"],
     "--coordinator-address is needed when --num-processes > 1"),
    (["serve", "--max-n", "0"], "--max-n must be an integer >= 1, got 0"),
    (["serve", "--max-waiting-requests", "-3"], "--max-waiting-requests must be an integer >= 1"),
    (["generate", "hi", "--max-model-len", "1"], "--max-model-len must be >= 2, got 1"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens must be an integer >= 1"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["chat", "--tensor-parallel-size", "0"], "--tensor-parallel-size must be an integer >= 1"),
    (["serve", "--sparse-budget", "1/8x"], "--sparse-budget must be a fraction (0.125, 1/8) or"),
    (["serve", "--sparse-budget", "1.5"], "--sparse-budget must be in (0, 1], got 1.5"),
    (["generate", "hi", "--sparse-budget", "64", "--sparse-window-tokens", "0"],
     "--sparse-window-tokens must be an integer >= 1, got 0"),
    (["eval", "--budgets", "1/4,zero"], "--sparse-budget must be a fraction"),
])
def test_configuration_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxserve: error: "), err
    assert message in err, err


class FakeLLM:
    """What `jaxserve chat` uses of LLM, with replies computed by hand."""

    def __init__(self, tokenizer, max_model_len, interrupt_after=None):
        from types import SimpleNamespace

        self.engine = SimpleNamespace(max_model_len=max_model_len)
        self.tokenizer, self.interrupt_after = tokenizer, interrupt_after
        self.seen, self.closed = [], 0

    def get_tokenizer(self):
        return self.tokenizer

    def stream(self, messages, params):
        import signal

        self.seen.append([m["content"] for m in messages])
        try:
            for k in range(5):
                yield f"r{k} "
                if k == self.interrupt_after:
                    signal.raise_signal(signal.SIGINT)  # Ctrl-C while the reply streams
        finally:
            self.closed += 1


def chat(monkeypatch, capsys, llm, lines, *extra):
    import jaxserve.cli as cli

    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(cli, "_llm", lambda a: llm)
    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--max-tokens", "16", *extra]) == 0
    return capsys.readouterr()


def test_chat_drops_the_oldest_turns_to_fit(monkeypatch, capsys, smol_tokenizer):
    llm = FakeLLM(smol_tokenizer, max_model_len=64)
    words = "one two three four five six seven eight nine ten"
    out = chat(monkeypatch, capsys, llm, [words, words + " again", "short", "x " * 200, "bye"],
               "--system", "Be brief")
    assert llm.seen[0] == ["Be brief", words]
    assert llm.seen[2][0] == "Be brief" and llm.seen[2][-1] == "short"
    assert words not in llm.seen[2]  # the oldest turns went, the system prompt stayed
    assert "dropped the oldest" in out.err and "too long for the context" in out.err
    assert llm.seen[-1][-1] == "bye"  # the session went on after the message that did not fit
    for messages in llm.seen:
        history = [{"role": "system", "content": messages[0]}] + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": c}
            for i, c in enumerate(messages[1:])]
        assert len(smol_tokenizer.encode_chat(history)) + 16 <= 64


def test_chat_ctrl_c_stops_the_reply_only(monkeypatch, capsys, smol_tokenizer):
    llm = FakeLLM(smol_tokenizer, max_model_len=512, interrupt_after=1)
    out = chat(monkeypatch, capsys, llm, ["hi", "more"])
    assert "Traceback" not in out.err and "[stopped]" in out.err
    # Ctrl-C after r1: the delta in flight (r2) is shown, nothing after it
    assert out.out.count("r0 r1 r2 \n") == 2 and "r3" not in out.out
    assert llm.seen[1] == ["hi", "r0 r1 r2 ", "more"] and llm.closed == 2
