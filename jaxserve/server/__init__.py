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
import signal
import threading

import uvicorn

from jaxserve.server.app import build_app
from jaxserve.server.async_engine import AsyncEngine, EngineUnavailableError
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.protocol import ServerLimits

log = logging.getLogger("jaxserve.server")


def default_model_name(engine) -> str:
    from pathlib import Path

    model = engine.config.model
    if model is None:
        return "SmolLM2-135M-Instruct"
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.name


def make_app(engine, *, model_name: str | None = None, api_key: str | None = None,
             limits: ServerLimits | None = None):
    """(asgi app, AsyncEngine) over an Engine; the engine loop is started."""
    name = model_name or default_model_name(engine)
    limits = limits or ServerLimits()
    async_engine = AsyncEngine(engine, ServerMetrics(name),
                               max_waiting_requests=limits.max_waiting_requests,
                               keepalive_seconds=float(os.environ.get("JAXSERVE_KEEPALIVE_S", 60)))
    async_engine.start()
    return build_app(async_engine, model_name=name, limits=limits, api_key=api_key), async_engine


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
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
