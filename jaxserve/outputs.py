"""What the engine returns, with vLLM's names and shapes (`RequestOutput`, `CompletionOutput`,
`Logprob`), plus timing metrics."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# Per position: {token_id: Logprob} holding the top-k and the chosen (or prompt) token.
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    # time.time() at each output token of the first completion (index 0): TBT = np.diff of it.
    token_times: list[float] = dataclasses.field(default_factory=list, repr=False)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_between_tokens(self) -> list[float]:
        """Seconds between consecutive output tokens of the first completion."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, "
                f"token_ids=[{len(self.token_ids)} ids], finish_reason={self.finish_reason!r}, "
                f"stop_reason={self.stop_reason!r})")


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"prompt_token_ids=[{len(self.prompt_token_ids)} ids], outputs={self.outputs!r}, "
                f"finished={self.finished})")

    def _repr_html_(self) -> str:  # notebooks: prompt, completions shaded by token log-prob
        from jaxserve.reprs import request_output_html

        return request_output_html(self)
