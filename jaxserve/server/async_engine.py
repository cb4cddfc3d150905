"""AsyncEngine: one thread drives `Engine.step()` for every HTTP request (continuous batching
across requests); coroutines talk to it through an inbox and one `Stream` per submission, which
holds at most the newest unread output of each request.

    engine = AsyncEngine(Engine(...), metrics)
    engine.start()
    with await engine.submit([(prompt_ids, params), ...]) as stream:   # one HTTP request
        async for out in stream: ...                                     # RequestOutputs

Only the engine thread touches the `Engine`: adds and aborts are posted to its inbox and applied
between steps, so the HTTP event loop never waits for a step and the engine needs no locks. A
submission is admitted all or nothing (a bad prompt aborts the ones added before it), and a
stream closed before its requests finish (client gone, handler cancelled) aborts them, freeing
their KV pages at the next step boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence

from jaxserve.engine import Engine
from jaxserve.errors import JaxserveError
from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.sampling import SamplingParams

log = logging.getLogger("jaxserve.server")


class EngineUnavailableError(JaxserveError, RuntimeError):
    """The server cannot take the request now: the queue is full, it is shutting down, or the
    engine loop has died."""


@dataclasses.dataclass
class _Tracked:  # one engine request, seen from the engine thread
    loop: asyncio.AbstractEventLoop
    out: Stream
    num_prompt_tokens: int
    n: int
    num_tokens: int = 0  # output tokens seen so far (all n completions)
    last_token_time: float | None = None
    last: RequestOutput | None = None


class Stream:
    """The outputs of one submission, in engine order, until each of its requests finished.
    Closing it (or leaving its `with`) aborts the requests that have not finished.

    Outputs are cumulative, so a request's unread output is replaced by its newer one: a reader
    slower than the engine holds at most one output per request (as vLLM's output collectors),
    never the whole history of a long stream."""

    def __init__(self, ids: list[str]):
        self.ids, self._abort = ids, None
        self._index = {rid: i for i, rid in enumerate(ids)}
        self.finished: set[str] = set()
        # Unread items in arrival order: request id -> its newest output; None -> a failure.
        self._unread: dict[str | None, RequestOutput | BaseException] = {}
        self._ready = asyncio.Event()

    def _offer(self, item: RequestOutput | BaseException):
        """On the submitter's event loop (the engine thread posts it with call_soon_threadsafe)."""
        key = item.request_id if isinstance(item, RequestOutput) else None
        self._unread[key] = item  # replaces an older unread output, keeping its place in order
        self._ready.set()

    @property
    def num_unread(self) -> int:
        return len(self._unread)

    def close(self):
        left = [rid for rid in self.ids if rid not in self.finished]
        if left and self._abort is not None:
            self._abort(left)
        self._abort = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc):
        self.close()

    def index_of(self, request_id: str) -> int:
        """Which of the submitted prompts an output belongs to."""
        return self._index[request_id]

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while len(self.finished) < len(self.ids):
            while not self._unread:
                self._ready.clear()
                await self._ready.wait()
            item = self._unread.pop(next(iter(self._unread)))
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.finished.add(item.request_id)
            yield item


class AsyncEngine:
    def __init__(self, engine: Engine, metrics=None, *, max_waiting_requests: int = 256,
                 keepalive_seconds: float = 60.0):
        self.engine = engine
        # Served from several processes, an idle loop pings the workers this often (multihost).
        self.keepalive_seconds = keepalive_seconds
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._ids = itertools.count()
        self._pending = 0  # sequences posted but not yet admitted (counted for the queue cap)
        self._pending_lock = threading.Lock()
        self._stopping = False
        self.draining = False  # no new requests: shutting down
        self.error: BaseException | None = None  # why the engine loop died
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self):
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self, timeout: float = 10.0):
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Stop admission, let running requests finish for up to `timeout` seconds, then abort
        the rest (their streams end with finish_reason "abort"). True if all finished in time."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.num_unfinished and time.monotonic() < deadline and self.alive:
            time.sleep(0.05)
        clean = not self.num_unfinished
        if not clean:
            done = concurrent.futures.Future()
            self._post(("abort_all", done))
            with contextlib.suppress(concurrent.futures.TimeoutError):
                done.result(timeout=10)
        return clean

    # -- state read by /metrics and /health (plain reads of ints, safe from any thread) ----------

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished_requests + self._pending

    @property
    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self._pending

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of usable KV pages held by requests (cached prefixes not held count as free)."""
        pm = self.engine.scheduler.page_manager
        return pm.num_used_pages / max(1, pm.num_usable_pages)

    # -- requests -------------------------------------------------------------------------------

    async def submit(self, prompts: Sequence[tuple[list[int], SamplingParams]], *,
                     priority: int = 0, client_id: str | None = None) -> Stream:
        """Admit prompts (token ids, params) as one unit; their outputs come from the returned
        Stream, which aborts what has not finished when closed. Raises EngineUnavailableError
        (server busy, shutting down, loop dead) or the engine's ValueError (a prompt that can
        never run)."""
        if self.draining:
            raise EngineUnavailableError("the server is shutting down")
        if not self.alive:
            raise EngineUnavailableError(f"the engine loop is not running ({self.error!r})")
        num_seqs = sum(params.n for _, params in prompts)  # the queue holds sequences
        if self.num_waiting + num_seqs > self.max_waiting_requests:
            raise EngineUnavailableError(
                f"the request queue is full ({self.max_waiting_requests} waiting); retry later")
        loop = asyncio.get_running_loop()
        ids = [f"r{next(self._ids)}" for _ in prompts]
        stream = Stream(ids)
        admitted = concurrent.futures.Future()
        self._count_pending(num_seqs)
        # admitted stays last: _fail_inbox answers it
        self._post(("add", ids, list(prompts), time.time(), loop, stream, priority, client_id,
                    admitted))
        if self.error is not None:  # the loop died after the check above: nobody will admit it
            self._fail_inbox()
        try:
            await asyncio.wrap_future(admitted)  # raises what add_request raised
        except asyncio.CancelledError:  # the client left before admission
            self._post(("abort", ids))
            raise
        stream._abort = lambda left: self._post(("abort", left))
        return stream

    def _count_pending(self, delta: int):
        with self._pending_lock:
            self._pending += delta

    def _post(self, item):
        self._inbox.put(item)
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self):
        from jaxserve import multihost

        last_step = time.monotonic()
        try:
            while not self._stopping:
                self._apply_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    if time.monotonic() - last_step > self.keepalive_seconds:
                        multihost.keepalive()  # a no-op for one process
                        last_step = time.monotonic()
                    continue
                last_step = time.monotonic()
                preempted = self.engine.num_preemptions
                outputs = self.engine.step()
                if self.metrics is not None:
                    self.metrics.preemptions.inc(self.engine.num_preemptions - preempted)
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - a dead loop must fail every stream, not hang it
            log.exception("the engine loop died")
            self.error = e
            for t in self._tracked.values():
                self._push(t, EngineUnavailableError(f"the engine loop died: {e!r}"))
            self._tracked.clear()
            self._fail_inbox()

    def _fail_inbox(self):
        """After the loop died: refuse the submissions still waiting for admission."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                self._count_pending(-sum(params.n for _, params in item[2]))
                item[-1].set_exception(EngineUnavailableError(
                    f"the engine loop is not running ({self.error!r})"))
            elif item[0] == "abort_all":
                item[1].set_result(None)

    def _apply_inbox(self):
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "add":
                self._add(*item[1:])
            elif kind == "abort":
                for rid in item[1]:
                    self._abort(rid)
            elif kind == "abort_all":
                for rid in list(self._tracked):
                    t = self._abort(rid)
                    self._push(t, _aborted(rid, t.n, t.last))
                item[1].set_result(None)

    def _abort(self, rid: str) -> _Tracked | None:
        self.engine.abort(rid)
        t = self._tracked.pop(rid, None)
        if t is not None and self.metrics is not None:
            unfinished = t.n if t.last is None else sum(not c.finish_reason for c in t.last.outputs)
            self.metrics.count_abort(unfinished)
        return t

    def _add(self, ids, prompts, arrival, loop, stream, priority, client_id, admitted):
        added = []
        try:
            for rid, (prompt_ids, params) in zip(ids, prompts):
                self.engine.add_request(rid, prompt_ids, params, arrival_time=arrival,
                                        priority=priority, client_id=client_id)
                added.append(rid)
                self._tracked[rid] = _Tracked(loop, stream, len(prompt_ids), params.n)
        except Exception as e:  # noqa: BLE001 - handed to the submitter
            for rid in added:
                self.engine.abort(rid)
                self._tracked.pop(rid, None)
            admitted.set_exception(e)
        else:
            admitted.set_result(None)
        finally:
            self._count_pending(-sum(params.n for _, params in prompts))

    def _deliver(self, out: RequestOutput):
        t = self._tracked.get(out.request_id)
        if t is None:  # aborted meanwhile
            return
        now = time.time()
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if self.metrics is not None:
            self.metrics.observe_step(out, t, num_tokens, now)
        t.num_tokens, t.last = num_tokens, out
        if num_tokens:
            t.last_token_time = now
        if out.finished:
            del self._tracked[out.request_id]
        self._push(t, out)

    @staticmethod
    def _push(t: _Tracked, item):
        with contextlib.suppress(RuntimeError):  # the submitter's loop is closed: nobody listens
            t.loop.call_soon_threadsafe(t.out._offer, item)


def _aborted(request_id: str, n: int, last: RequestOutput | None) -> RequestOutput:
    """The final output of a request aborted by the server: what it had, finish_reason "abort"."""
    if last is None:
        return RequestOutput(request_id, None, [], None, [
            CompletionOutput(k, "", [], None, None, "abort") for k in range(n)], True,
            RequestMetrics(time.time()))
    outs = [c if c.finish_reason else dataclasses.replace(c, finish_reason="abort")
            for c in last.outputs]
    return dataclasses.replace(last, outputs=outs, finished=True)
