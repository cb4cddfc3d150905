"""Request bodies of the OpenAI API (completions, chat completions) and vLLM's extras, as
pydantic models, and their translation to `SamplingParams`.

Field names and defaults follow OpenAI's API reference; vLLM's extra sampling fields (top_k,
min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens,
include_stop_str_in_output) are accepted as extra body fields, as vLLM does. Unknown fields are
ignored (as OpenAI and vLLM do); fields we cannot honour (logit_bias, tools, response_format,
suffix) are refused with a 400 naming them instead of being silently dropped. Every string must
be valid Unicode (`check_text`), chat_template_kwargs are limited to CHAT_TEMPLATE_KWARGS, and
one request may not ask for more sequences (prompts x n) than the queue holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxserve.errors import ConfigError
from jaxserve.sampling import MAX_LOGPROBS, SamplingParams


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Caps on what one request may ask for (each refused with a 400 naming the field)."""

    max_n: int = 16  # completions per prompt
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_stop: int = 16  # stop sequences
    max_stop_length: int = 256  # characters per stop sequence
    max_tokens: int | None = None  # None = the context length
    max_logprobs: int = MAX_LOGPROBS
    max_request_bytes: int = 1 << 20  # body size (413 beyond)
    max_waiting_requests: int = 256  # queued sequences (503 beyond; 400 for one request beyond)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f.name, f"must be an integer >= 1, got {value!r}")


class RequestError(ValueError):
    """A request the server refuses: HTTP status, OpenAI error type, the field at fault."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


# chat_template_kwargs a client may set: switches that chat templates read. Nothing that could
# override what the server renders (bos_token, messages, tools, add_generation_prompt, ...).
CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort"})
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
MAX_NESTING = 32  # lists and objects inside one field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def check_text(self):
        """Every string of the body, keys included, must be valid Unicode: JSON can carry a lone
        surrogate ("\\ud800"), which no tokenizer or UTF-8 encoder takes. And no value nests
        deeper than MAX_NESTING (templates and copies of messages recurse)."""
        for name in type(self).model_fields:
            problem = _check_value(getattr(self, name))
            if problem:
                raise RequestError(f"{name} {problem}", param=name)


def _check_value(value) -> str | None:
    """What is wrong with a field's value (invalid Unicode, nesting too deep), or None."""
    stack = [(value, 0)]  # iterative: a deeply nested body must not exhaust the Python stack
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "holds invalid Unicode (a lone surrogate)"
            continue
        if isinstance(value, BaseModel):
            value = value.__dict__
        if isinstance(value, (dict, list)):
            if depth >= MAX_NESTING:
                return f"nests lists and objects deeper than {MAX_NESTING} levels"
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
    return None


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the client whose service scheduling_policy="fair" accounts
    logit_bias: dict[str, float] | None = None
    priority: int = 0  # vLLM's: lower runs first under scheduling_policy="priority"
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def _check(self, limits: ServerLimits, max_tokens: int | None, logprobs: int | None):
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", param="logit_bias")
        if not 1 <= self.n <= limits.max_n:
            raise RequestError(f"n must be between 1 and {limits.max_n}, got {self.n}", param="n")
        cap = limits.max_tokens
        if max_tokens is not None and cap is not None and max_tokens > cap:
            raise RequestError(f"max_tokens must be <= {cap}, got {max_tokens}", param="max_tokens")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > limits.max_stop:
            raise RequestError(f"at most {limits.max_stop} stop sequences are allowed, got "
                               f"{len(stops)}", param="stop")
        if any(len(s) > limits.max_stop_length for s in stops):
            raise RequestError(f"stop sequences must be at most {limits.max_stop_length} characters",
                               param="stop")
        if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
            raise RequestError(f"logprobs must be between 0 and {limits.max_logprobs}, got "
                               f"{logprobs}", param="logprobs")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > 256:
            raise RequestError("at most 256 stop_token_ids are allowed", param="stop_token_ids")
        if self.n * self.num_prompts > limits.max_waiting_requests:
            raise RequestError(f"this request asks for {self.n * self.num_prompts} sequences "
                               f"(prompts x n); at most {limits.max_waiting_requests} may wait",
                               param="n")

    @property
    def num_prompts(self) -> int:
        return 1

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  prompt_logprobs: int | None = None) -> SamplingParams:
        given = lambda v, default: default if v is None else v  # noqa: E731
        from jaxserve.sampling import SamplingParamsError

        try:
            return SamplingParams(
                n=self.n, temperature=given(self.temperature, 1.0), top_p=given(self.top_p, 1.0),
                top_k=given(self.top_k, 0), min_p=given(self.min_p, 0.0),
                presence_penalty=given(self.presence_penalty, 0.0),
                frequency_penalty=given(self.frequency_penalty, 0.0),
                repetition_penalty=given(self.repetition_penalty, 1.0), seed=self.seed,
                stop=self.stop or None, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except SamplingParamsError as e:
            field = str(e).split(" ", 1)[0]
            raise RequestError(str(e), param=field if field in type(self).model_fields else None) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [p]
        return list(p)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts())

    def sampling_params(self, limits: ServerLimits) -> SamplingParams:
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise RequestError("best_of other than n is not supported", param="best_of")
        self._check(limits, self.max_tokens, self.logprobs)
        prompts = self.prompts()
        if not prompts:
            raise RequestError("prompt must not be empty", param="prompt")
        if len(prompts) > limits.max_prompts:
            raise RequestError(f"at most {limits.max_prompts} prompts per request, got "
                               f"{len(prompts)}", param="prompt")
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        return self._sampling(max_tokens, self.logprobs,
                              self.logprobs if self.echo and self.logprobs is not None else None)


class ChatCompletionRequest(_SamplingBody):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling_params(self, limits: ServerLimits) -> SamplingParams:
        if self.tools:
            raise RequestError("tool calling is not supported", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise RequestError("response_format other than text is not supported",
                               param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        for key, value in (self.chat_template_kwargs or {}).items():
            if key not in CHAT_TEMPLATE_KWARGS:
                raise RequestError(f"chat_template_kwargs may set only "
                                   f"{', '.join(sorted(CHAT_TEMPLATE_KWARGS))}; got {key!r}",
                                   param="chat_template_kwargs")
            if not isinstance(value, (bool, int, float, str)) and value is not None:
                raise RequestError(f"chat_template_kwargs[{key!r}] must be a boolean, number or "
                                   "string", param="chat_template_kwargs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        top = (self.top_logprobs or 0) if self.logprobs else None
        if top is not None and not 0 <= top <= limits.max_logprobs:
            raise RequestError(f"top_logprobs must be between 0 and {limits.max_logprobs}, got "
                               f"{top}", param="top_logprobs")
        try:
            self._check(limits, max_tokens, None)
            return self._sampling(max_tokens, top)
        except RequestError as e:  # name the field the client sent
            if e.param == "max_tokens" and self.max_completion_tokens is not None:
                e.param, e.message = "max_completion_tokens", e.message.replace(
                    "max_tokens", "max_completion_tokens")
            raise


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


FinishReason = Literal["stop", "length", "abort", "error"]
