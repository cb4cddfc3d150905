"""Running a real jaxserve HTTP server for tests: uvicorn in a thread (over an in-process engine)
or `jaxserve serve` as a subprocess, both on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def thread_server(engine, **make_app_kw):
    """(base_url, AsyncEngine) of a uvicorn server in this process, stopped on exit."""
    import uvicorn

    from jaxserve.server import make_app

    app, async_engine = make_app(engine, **make_app_kw)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", async_engine
    finally:
        server.should_exit = True
        thread.join(15)
        async_engine.stop()


@contextlib.contextmanager
def process_server(*args: str, start_timeout: float = 900, env: dict | None = None):
    """(base_url, Popen) of `jaxserve serve ARGS` on a free port; killed on exit if still up."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jaxserve serve exited with {proc.returncode}:\n{''.join(log)[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"jaxserve serve did not come up:\n{''.join(log)[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        proc.log = log
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
