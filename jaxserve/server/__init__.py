"""OpenAI-compatible HTTP server: `jaxserve serve`, or from Python:

    from jaxserve.server import serve
    serve(Engine(EngineConfig(max_num_seqs=32)), port=8000, api_key="secret")

One engine thread drives every request (async_engine.py); FastAPI handles HTTP (app.py,
serving.py, protocol.py); metrics.py exports Prometheus metrics. SIGTERM or SIGINT drains: new
requests get 503, running ones get `shutdown_timeout` seconds to finish, the rest are aborted
(finish_reason "abort"), then the process exits. A second SIGINT exits at once.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from jaxserve.server.app import build_app
from jaxserve.server.async_engine import AsyncEngine, EngineUnavailableError
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.protocol import ServerLimits

log = logging.getLogger("jaxserve.server")


# A GGUF file's quantization tag, e.g. the ".Q4_1" of "SmolLM2-135M-Instruct.Q4_1.gguf".
_QUANT_TAG = re.compile(r"[.\-_](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def default_model_names(engine) -> list[str]:
    """The model's name, then aliases clients may also send: for a GGUF file the name without
    its quantization tag ("SmolLM2-135M-Instruct"), the file stem as an alias; for a folder its
    name."""
    model = engine.config.model
    if model is None:
        return ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1"]
    p = Path(model)
    if p.suffix != ".gguf":
        return [p.name]
    name = _QUANT_TAG.sub("", p.stem) or p.stem
    return [name] if name == p.stem else [name, p.stem]


def make_app(engine, *, model_name: str | Sequence[str] | None = None, api_key: str | None = None,
             limits: ServerLimits | None = None):
    """(asgi app, AsyncEngine) over an Engine; the engine loop is started. model_name: the name
    `/v1/models` lists, or a list of names (the first listed, all accepted), as vLLM's
    --served-model-name; default: default_model_names."""
    names = default_model_names(engine) if not model_name else (
        [model_name] if isinstance(model_name, str) else list(model_name))
    name = names[0]
    limits = limits or ServerLimits()
    async_engine = AsyncEngine(engine, ServerMetrics(name),
                               max_waiting_requests=limits.max_waiting_requests,
                               keepalive_seconds=float(os.environ.get("JAXSERVE_KEEPALIVE_S", 60)))
    async_engine.start()
    return build_app(async_engine, model_name=name, limits=limits, api_key=api_key,
                     aliases=names[1:]), async_engine


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | Sequence[str] | None = None,
          api_key: str | None = None, limits: ServerLimits | None = None,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> int:
    app, async_engine = make_app(engine, model_name=model_name, api_key=api_key, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    server = _DrainingServer(config, async_engine, shutdown_timeout)
    server.run()
    async_engine.stop()
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains the engine before exiting."""

    def __init__(self, config, async_engine: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.async_engine, self.shutdown_timeout = async_engine, shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame):
        if self._draining:  # a second signal: stop now
            self.force_exit = sig == signal.SIGINT
            self.should_exit = True
            return
        self._draining = True
        log.info("signal %s: draining (up to %.0f s), new requests get 503", sig,
                 self.shutdown_timeout)
        threading.Thread(target=self._drain, name="jaxserve-drain", daemon=True).start()

    def _drain(self):
        clean = self.async_engine.drain(self.shutdown_timeout)
        log.info("drained %s", "cleanly" if clean else "after aborting unfinished requests")
        self.should_exit = True


__all__ = ["AsyncEngine", "EngineUnavailableError", "ServerLimits", "ServerMetrics", "build_app",
           "make_app", "serve"]
