"""What the engine keeps of each request between steps, and the texts of log-probs.

A request (`RequestState`) has n sequences (`SequenceState`), each with its tokens, its text
(incrementally detokenized, stop strings applied) and, when asked for, its log-probs: a dict per
position in vLLM's shape, each alternative's text decoded after the tokens before it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxserve.runner import StepResult
from jaxserve.sampling import SamplingParams
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

CONTEXT_TOKENS = 4  # tokens decoded before a log-prob token, so that it keeps its leading space


@dataclasses.dataclass
class SequenceState:
    """One of a request's n completions, as the engine builds it."""

    seq_id: str
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # The chosen tokens' log-prob texts: deltas that concatenate to the text (no stop strings).
    logprob_detok: IncrementalDetokenizer | None = None

    def output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, list(self.token_ids),
                                self.cumulative_logprob if self.params.logprobs is not None else None,
                                self.logprobs, self.finish_reason, self.stop_reason)


@dataclasses.dataclass
class RequestState:
    """One user request: its prompt, its sequences, its metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[SequenceState]
    metrics: RequestMetrics
    prompt_logprobs: list | None = None  # [None, {token: Logprob}, ...] when asked for
    prompt_texts: list[str] | None = None  # each prompt token's text, in context (prompt_logprobs)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             self.prompt_logprobs, [s.output() for s in self.seqs], self.finished,
                             self.metrics)


def position_logprobs(tokenizer: Tokenizer, k: int, token: int, r: StepResult, i: int,
                      context: list[int], text: str) -> dict[int, Logprob]:
    """The log-prob dict of row i of a step's result (the sampled token and the top k)."""
    top = (None, None) if r.top_logprob_ids is None else (r.top_logprob_ids[i], r.top_logprobs[i])
    return logprob_dict(tokenizer, k, token, r.logprobs[i], None if r.ranks is None else r.ranks[i],
                        *top, context, text)


def logprob_dict(tokenizer: Tokenizer, k, token, logprob, rank, top_ids, top_lps,
                 context: list[int], text: str) -> dict[int, Logprob]:
    """vLLM's shape for one position: the top-k and the chosen (or prompt) token. `text` is
    the chosen token's text; the others are decoded after `context` (the tokens before),
    so a SentencePiece token keeps its leading space."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    base = decode(context) if context else ""

    def in_context(t: int) -> str:
        full = decode([*context, t])
        return full[len(base):] if full.startswith(base) else decode([t])

    out = {}
    if k and top_ids is not None:
        for r, (tid, lp) in enumerate(zip(top_ids[:k], top_lps[:k]), 1):
            tid = int(tid)
            out[tid] = Logprob(float(lp), r, text if tid == token else in_context(tid))
    if token not in out:
        out[token] = Logprob(float(logprob), None if rank is None else int(rank), text)
    return out


def context_before(prompt_token_ids: list[int], token_ids: list[int]) -> list[int]:
    """Up to CONTEXT_TOKENS tokens before the last of `token_ids` (the prompt's end first)."""
    n = len(token_ids)
    context = token_ids[max(0, n - 1 - CONTEXT_TOKENS):n - 1]
    if len(context) < CONTEXT_TOKENS:
        p = prompt_token_ids
        context = p[max(0, len(p) - CONTEXT_TOKENS + len(context)):] + context
    return context


def token_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's text such that they concatenate to the decoded ids (a character split
    over tokens goes with its last one)."""
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    texts = [detok.add([t]) for t in ids]
    texts[-1] += detok.flush()
    return texts


def sequence_seeds(params: SamplingParams, rng: np.random.Generator) -> list[int]:
    """One seed per completion. Unseeded requests draw theirs from `rng` (the engine's, seeded
    by `EngineConfig.seed`, so a run of requests is reproducible); completion k > 0 of a seeded
    request gets a seed mixed from (seed, k): n samples that differ, any seed in the allowed
    range, no overflow."""
    if params.seed is None:
        return [int(x) for x in rng.integers(0, 2**64, size=params.n, dtype=np.uint64)]
    base = int(params.seed) % 2**64
    return [params.seed] + [
        int(np.random.SeedSequence([base, k]).generate_state(1, np.uint64)[0])
        for k in range(1, params.n)]
