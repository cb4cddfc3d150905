"""The FastAPI app: routes, OpenAI-shaped errors, API key, body-size cap and request ids.

    app = build_app(AsyncEngine(engine, metrics), model_name="SmolLM2-135M-Instruct")

Every error is `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes:
validation problems are 400 naming the field (FastAPI's 422 is remapped), an unknown model 404,
a missing or wrong API key 401, a body over the cap 413, a full queue or a server shutting down
503. `/health` answers 503 once the engine loop is dead or the server is draining.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
import uuid
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from jaxserve.engine import EngineDeadError
from jaxserve.server.async_engine import AsyncEngine, EngineUnavailableError
from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      RequestError, ServerLimits, TokenizeRequest)
from jaxserve.server.serving import OpenAIServing, error_body

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          503: "service_unavailable", 500: "server_error"}


def _error(status: int, message: str, param: str | None = None, code=None, type=None) -> JSONResponse:
    return JSONResponse(error_body(_utf8(message), type or _TYPES.get(status, "invalid_request_error"),
                                   _utf8(param), code), status_code=status)


def _utf8(text: str | None) -> str | None:
    """A message may quote the client's input: a lone surrogate in it must not make it a 500."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode()


def build_app(engine: AsyncEngine, *, model_name: str, limits: ServerLimits | None = None,
              api_key: str | None = None, aliases: Sequence[str] = ()) -> FastAPI:
    """aliases: further names clients may send as `model` (`/v1/models` lists `model_name`)."""
    limits = limits or ServerLimits(max_waiting_requests=engine.max_waiting_requests)
    if limits.max_tokens is None:
        limits = dataclasses.replace(limits, max_tokens=engine.engine.max_model_len)
    serving = OpenAIServing(engine, model_name, limits, aliases)
    app = FastAPI(title="jaxserve", version="0.1", summary="OpenAI-compatible LLM server on JAX")
    app.state.engine, app.state.serving = engine, serving
    if engine.metrics is not None:
        engine.metrics.async_engine = engine

    # -- errors ---------------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {err.get('msg', '')}")
        param = loc[0] if loc else None
        where = ".".join(loc)
        return _error(400, f"{where}: {err.get('msg', 'invalid value')}" if where
                      else str(err.get("msg", "invalid request body")), param)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(EngineUnavailableError)
    @app.exception_handler(EngineDeadError)
    async def _unavailable(request, exc):
        return _error(503, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    # -- OpenAI API -----------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "jaxserve",
            "root": model_name, "max_model_len": serving.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    # -- operations -----------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, f"the engine loop is not running ({engine.error!r})")
        if engine.draining:
            return _error(503, "the server is shutting down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if engine.metrics is None:
            return _error(404, "metrics are disabled")
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        body.check_text()
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give exactly one of prompt and messages", param="prompt")
        tok = serving.tokenizer
        try:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens,
                             parse_special=True) \
                if body.prompt is not None else \
                tok.encode_chat(body.messages, add_generation_prompt=body.add_generation_prompt)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e), param="messages") from None
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        body.check_text()
        serving.check_model(body.model)
        vocab = engine.engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                               param="tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return _Guard(app, api_key=api_key, max_request_bytes=limits.max_request_bytes)


class _Guard:
    """ASGI wrapper around the app: X-Request-Id on every response (the client's, if it sent a
    sane one), the API key on /v1/* (compared in constant time), and the body-size cap (the
    body is read here, up to the cap, and replayed to the app)."""

    def __init__(self, app: FastAPI, *, api_key: str | None, max_request_bytes: int):
        self.app, self.max_request_bytes = app, max_request_bytes
        self._key = f"Bearer {api_key}".encode() if api_key else None

    def __getattr__(self, name):  # state, openapi(), routes: the FastAPI app's
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.fullmatch(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            await send(message)

        if self._key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._key):
                return await _error(401, "invalid or missing API key (send 'Authorization: Bearer "
                                         "<key>')", code="invalid_api_key")(scope, receive, send_with_id)
        body, too_large = await self._read_body(headers, receive)
        if too_large:
            return await _error(413, f"the request body exceeds {self.max_request_bytes} bytes",
                                code="request_too_large")(scope, receive, send_with_id)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)

    async def _read_body(self, headers, receive) -> tuple[bytes, bool]:
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body was read
                return b"", False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_request_bytes:
                return b"", True
            if not message.get("more_body", False):
                return b"".join(chunks), False
