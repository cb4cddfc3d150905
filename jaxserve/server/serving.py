"""The OpenAI completions and chat completions endpoints over the AsyncEngine: prompts to token
ids, engine outputs to OpenAI's JSON (whole responses, or SSE chunks when `stream` is set).

Choices are indexed `prompt_index * n + k`, as OpenAI does for a list of prompts. `usage` counts
each prompt's tokens once (whatever n is) and every generated token of every choice. Streams
send each choice's text as it grows; a stream that fails after it started ends with an error
chunk and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from jaxserve.engine import InvalidSamplingError
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling import SamplingParams, SamplingParamsError
from jaxserve.server.async_engine import AsyncEngine, EngineUnavailableError
from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest, RequestError,
                                      ServerLimits)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class SSEResponse(StreamingResponse):
    """Server-sent events; the body generator is closed (aborting its requests) however the
    response ends, a client disconnect included."""

    def __init__(self, chunks: AsyncIterator[str], on_close):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()  # also when the body never started


async def until_disconnected(http: Request):
    while (await http.receive())["type"] != "http.disconnect":
        pass


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, limits: ServerLimits,
                 aliases: Sequence[str] = ()):
        self.engine, self.model_name = engine, model_name
        self.names = {model_name, *aliases}  # what clients may send as `model`
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.limits = limits

    def check_model(self, model: str | None):
        if model is not None and model not in self.names:
            raise RequestError(f"the model `{model}` does not exist; this server serves "
                               f"`{self.model_name}`", param="model", status=404,
                               code="model_not_found")

    # -- /v1/completions ------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, http: Request):
        body.check_text()
        self.check_model(body.model)
        params = body.sampling_params(self.limits)
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):  # special-token text is parsed, as vLLM and HF do
                ids = self.tokenizer.encode(p, add_special_tokens=True, parse_special=True)
                prompts.append((p, ids))
            else:
                prompts.append((None, list(p)))
        fmt = _CompletionFormat(self, body, prompts)
        return await self._respond(body, http, [(ids, self._room(body, params, ids))
                                                for _, ids in prompts], fmt)

    def _room(self, body: CompletionRequest, params: SamplingParams, ids) -> SamplingParams:
        """Without max_tokens, OpenAI's 16, cut to what the context leaves (as vLLM does)."""
        room = self.max_model_len - len(ids)
        if body.max_tokens is not None or not 1 <= room < params.max_tokens:
            return params
        try:
            return dataclasses.replace(params, max_tokens=room)
        except SamplingParamsError as e:  # min_tokens above what is left
            raise RequestError(str(e), param="min_tokens") from None

    # -- /v1/chat/completions -------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, http: Request):
        body.check_text()
        self.check_model(body.model)
        params = body.sampling_params(self.limits)
        try:
            ids = self.tokenizer.encode_chat(body.messages,
                                             add_generation_prompt=body.add_generation_prompt,
                                             **(body.chat_template_kwargs or {}))
        except (ValueError, TypeError) as e:
            raise RequestError(str(e), param="messages") from None
        return await self._respond(body, http, [(ids, params)], _ChatFormat(self, body, len(ids)))

    # -- both -----------------------------------------------------------------------------------

    async def _respond(self, body, http: Request, prompts, fmt):
        try:
            stream = await self.engine.submit(prompts, priority=body.priority, client_id=body.user)
        except InvalidSamplingError as e:  # stop_token_ids outside the vocabulary
            raise RequestError(str(e), param="stop_token_ids") from None
        except ValueError as e:  # the engine refused a prompt (too long, out of vocabulary)
            raise RequestError(str(e), param="messages" if isinstance(body, ChatCompletionRequest)
                               else "prompt") from None
        if body.stream:
            return SSEResponse(self._sse(stream, fmt, body.n), on_close=stream.close)
        with stream:
            finals = await _first_of(self._collect(stream, body.n), until_disconnected(http))
        if finals is None:
            return Response(status_code=499)  # client gone: nobody reads this
        return fmt.response(finals)

    async def _collect(self, stream, n: int) -> dict[int, tuple[CompletionOutput, RequestOutput]]:
        finals = {}
        async for out in stream:
            if out.finished:
                for c in out.outputs:
                    finals[stream.index_of(out.request_id) * n + c.index] = (c, out)
        return finals

    async def _sse(self, stream, fmt, n: int):
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars, tokens) sent
        done: set[int] = set()  # choices whose finish_reason went out
        try:
            async for out in stream:
                for c in out.outputs:
                    i = stream.index_of(out.request_id) * n + c.index
                    if i in done:
                        continue
                    if i not in sent:
                        sent[i] = (0, 0)
                        first = fmt.first_chunk(i)
                        if first is not None:
                            yield _sse(first)
                    chars, tokens = sent[i]
                    if len(c.text) > chars or c.finish_reason or (
                            fmt.wants_token_chunks and len(c.token_ids) > tokens):
                        yield _sse(fmt.chunk(i, c, chars, tokens, out))
                        sent[i] = (len(c.text), len(c.token_ids))
                    if c.finish_reason:
                        done.add(i)
            if fmt.include_usage:
                yield _sse(fmt.usage_chunk())
        except Exception as e:  # noqa: BLE001 - in-band: the status line is already sent
            unavailable = isinstance(e, EngineUnavailableError)
            yield _sse(error_body(str(e) or type(e).__name__,
                                  "service_unavailable" if unavailable else "server_error",
                                  code=503 if unavailable else 500))
        finally:
            stream.close()
        yield "data: [DONE]\n\n"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _first_of(work, watch):
    """Run `work` until it ends or `watch` does (client disconnect): work's result, or None."""
    w, d = asyncio.ensure_future(work), asyncio.ensure_future(watch)
    try:
        done, _ = await asyncio.wait({w, d}, return_when=asyncio.FIRST_COMPLETED)
        return w.result() if w in done else None
    finally:
        for t in (w, d):
            t.cancel()


class _Format:
    """What both endpoints share: ids, usage bookkeeping, finish reasons."""

    object = chunk_object = ""
    wants_token_chunks = False  # send a chunk for new tokens even when the text did not grow

    def __init__(self, serving: OpenAIServing, body, num_prompt_tokens: int):
        self.serving, self.body = serving, body
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.num_prompt_tokens = num_prompt_tokens
        self.include_usage = body.include_usage
        self.completion_tokens: dict[int, int] = {}

    def usage(self) -> dict:
        out = sum(self.completion_tokens.values())
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": out,
                "total_tokens": self.num_prompt_tokens + out}

    def envelope(self, choices: list, obj: str | None = None) -> dict:
        env = {"id": self.id, "object": obj or self.object, "created": self.created,
               "model": self.serving.model_name, "choices": choices}
        if self.include_usage:
            env["usage"] = None
        return env

    def usage_chunk(self) -> dict:
        env = self.envelope([], self.chunk_object)
        env["usage"] = self.usage()
        return env

    def count(self, i: int, c: CompletionOutput):
        self.completion_tokens[i] = len(c.token_ids)

    def first_chunk(self, i: int) -> dict | None:
        return None


class _CompletionFormat(_Format):
    prefix, object = "cmpl", "text_completion"
    chunk_object = object

    def __init__(self, serving, body: CompletionRequest, prompts):
        super().__init__(serving, body, sum(len(ids) for _, ids in prompts))
        self.wants_token_chunks = body.logprobs is not None
        self.prompts = prompts
        self.echo = [""] * len(prompts)  # per prompt, filled once the engine accepted the ids

    def _echo_text(self, prompt: int) -> str:
        if self.body.echo and not self.echo[prompt]:
            text, ids = self.prompts[prompt]
            self.echo[prompt] = text if text is not None else self.serving.tokenizer.decode(
                ids, skip_special_tokens=False)
        return self.echo[prompt]

    def _logprobs(self, c: CompletionOutput, start: int, offset: int, prompt: int | None,
                  out: RequestOutput):
        """OpenAI's legacy shape for tokens [start:], text offsets counted from `offset`; with
        `prompt` (echo), prompt number `prompt`'s tokens first."""
        k = self.body.logprobs
        positions = list(zip(c.token_ids[start:], (c.logprobs or [])[start:]))
        if prompt is not None and out.prompt_logprobs is not None:
            positions = list(zip(out.prompt_token_ids, out.prompt_logprobs)) + positions
            offset = 0
        res = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lps in positions:
            if lps is None:  # the first prompt token: no log-prob, and its text to decode
                s = self.serving.tokenizer.decode([token], skip_special_tokens=False)
                value, top = None, None
            else:
                s, value = lps[token].decoded_token, lps[token].logprob
                best = sorted(lps.values(), key=lambda lp: lp.rank or 1 << 30)[:k]
                top = {lp.decoded_token: lp.logprob for lp in best} | {s: value}
            res["tokens"].append(s)
            res["text_offset"].append(offset)
            res["token_logprobs"].append(value)
            res["top_logprobs"].append(top)
            offset += len(s)
        return res

    def _choice(self, i: int, c: CompletionOutput, chars: int, tokens: int, out):
        """Choice i from character `chars` and token `tokens` of its output on (0: all of it,
        with the prompt in front when echo is set)."""
        prompt = i // self.body.n
        echo = self._echo_text(prompt)
        prefix = echo if chars == tokens == 0 else ""
        self.count(i, c)
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = self._logprobs(c, tokens, len(echo) + chars, prompt if prefix else None, out)
        return {"index": i, "text": prefix + c.text[chars:], "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def response(self, finals) -> dict:
        choices = [self._choice(i, c, 0, 0, out) for i, (c, out) in sorted(finals.items())]
        env = self.envelope(choices)
        env["usage"] = self.usage()
        return env

    def chunk(self, i, c, chars, tokens, out) -> dict:
        return self.envelope([self._choice(i, c, chars, tokens, out)])


class _ChatFormat(_Format):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, serving, body: ChatCompletionRequest, num_prompt_tokens: int):
        super().__init__(serving, body, num_prompt_tokens)
        self.wants_token_chunks = body.logprobs

    def _logprobs(self, c: CompletionOutput, start: int):
        if not self.body.logprobs:
            return None
        k = self.body.top_logprobs or 0
        content = []
        for token, lps in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            top = sorted((lp for lp in lps.values() if lp.rank is not None and lp.rank <= k),
                         key=lambda lp: lp.rank)
            content.append({**_chat_logprob(lps[token]),
                            "top_logprobs": [_chat_logprob(lp) for lp in top]})
        return {"content": content}

    def response(self, finals) -> dict:
        choices = []
        for i, (c, _) in sorted(finals.items()):
            self.count(i, c)
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": self._logprobs(c, 0), "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        env = self.envelope(choices)
        env["usage"] = self.usage()
        return env

    def first_chunk(self, i: int) -> dict:
        return self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}], self.chunk_object)

    def chunk(self, i, c, chars, tokens, out) -> dict:
        self.count(i, c)
        d = {"content": c.text[chars:]} if len(c.text) > chars else {}
        return self.envelope([{"index": i, "delta": d, "logprobs": self._logprobs(c, tokens),
                               "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}],
                             self.chunk_object)


def _chat_logprob(lp) -> dict:
    return {"token": lp.decoded_token, "logprob": lp.logprob,
            "bytes": list(lp.decoded_token.encode())}
