"""FCFS continuous-batching scheduler with chunked prefill and recompute preemption. Host only.

One engine step reads:

    out = scheduler.schedule()                  # which requests run, which tokens, which pages
    sampled = runner.execute(out)               # {request_id: [token]} for entries that sample
    finished = scheduler.update(out, sampled)   # append tokens, stop checks, free finished pages

`schedule()` fills a token budget (`max_num_batched_tokens`) under a request cap (`max_num_seqs`)
in three passes, so decode and prefill tokens of many requests share one ragged batch:
  1. decodes of running requests (one token each), oldest first;
  2. prefill continuations of running requests, oldest first, chunked to the budget left;
  3. admissions from the waiting queue in FCFS order; a prefix-cache hit skips the shared full
     pages, and the last admitted prompt is chunked to the budget left. No admissions in a step that
     preempted: the pages just taken back are for the requests already running.
When a running request needs pages and none are free, the NEWEST running request is preempted by
recompute: its pages are freed and it waits at the front of the queue to recompute prompt + outputs
(cheaply, from the prefix cache, if its pages were not evicted meanwhile). The oldest running
request is never preempted by another one, and `add_request` only accepts requests that fit the
cache alone, so every request finishes and no request ever fails for lack of pages.
"""

from collections import deque
from dataclasses import dataclass

from jaxserve.errors import JaxserveError
from jaxserve.sched.page_manager import PageManager
from jaxserve.sched.request import FinishReason, InvalidRequestError, Request, RequestStatus


class SchedulerConfigError(JaxserveError, ValueError):
    """A SchedulerConfig field is out of range or inconsistent with another."""


class RequestTooLongError(JaxserveError, ValueError):
    """The request can never run: longer than max_model_len, or more pages than the whole cache."""


class DuplicateRequestError(JaxserveError, ValueError):
    """A request with this id is already waiting or running."""


class UnknownRequestError(JaxserveError, LookupError):
    """No unfinished request has this id."""


class SchedulerError(JaxserveError, RuntimeError):
    """The scheduler was driven out of protocol (update without schedule, missing tokens)."""


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int  # KV cache pages, page 0 (reserved for padding) included
    page_size: int = 16  # token slots per page (S)
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # tokens computed per step, decode and prefill together
    max_model_len: int = 2048  # prompt + max_tokens of any request
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        minimums = {"num_pages": 2, "page_size": 1, "max_num_seqs": 1,
                    "max_num_batched_tokens": 1, "max_model_len": 1}  # fmt: skip
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value < minimum:
                raise SchedulerConfigError(f"{name} must be >= {minimum}, got {value}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # A recompute prefill covers up to max_model_len - 1 tokens and must fit one step.
            raise SchedulerConfigError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )

    @property
    def max_pages_per_request(self) -> int:
        """Page-table width P the runner needs: pages of one max_model_len sequence."""
        return -(-self.max_model_len // self.page_size)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute positions [start_position, end_position)."""

    request: Request
    start_position: int  # = num_computed_tokens before the step
    num_new_tokens: int  # 1 for a decode, the chunk length for a prefill
    token_ids: tuple[int, ...]  # [num_new_tokens] tokens to feed, prompt or earlier outputs
    page_ids: tuple[int, ...]  # page table covering positions [0, end_position)
    samples_token: bool  # the step reaches the last known token, so the device samples one

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end_position(self) -> int:
        return self.start_position + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    # Batch order: decodes, then prefill continuations, then admissions.
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...]  # ids preempted this step (they hold no pages and are not scheduled)
    num_batched_tokens: int  # sum of num_new_tokens, <= max_num_batched_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _Step:
    """The batch being built by one schedule() call."""

    def __init__(self, budget: int):
        self.budget = budget  # tokens left
        self.entries: dict[str, ScheduledRequest] = {}  # insertion order = batch order
        self.preempted: list[str] = []

    def add(self, request: Request, num_new_tokens: int) -> None:
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new_tokens
        self.entries[request.request_id] = ScheduledRequest(
            request=request,
            start_position=start,
            num_new_tokens=num_new_tokens,
            token_ids=tuple(request.token_ids(start, end)),
            page_ids=tuple(request.page_ids),  # a snapshot: the live table grows next steps
            samples_token=end == request.num_tokens,
        )
        self.budget -= num_new_tokens

    def drop(self, request: Request) -> None:
        """Take a request preempted later in this step back out of the batch.

        Under FCFS with one token per step only the newest running request can be mid-prefill, so
        this happens only when a step appended several tokens (an older request then continues
        in pass 2 and may preempt a newer decode scheduled in pass 1) or under other policies.
        """
        entry = self.entries.pop(request.request_id, None)
        if entry is not None:
            self.budget += entry.num_new_tokens

    def build(self) -> SchedulerOutput:
        scheduled = tuple(self.entries.values())
        return SchedulerOutput(
            scheduled=scheduled,
            preempted=tuple(self.preempted),
            num_batched_tokens=sum(e.num_new_tokens for e in scheduled),
        )


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.page_manager = PageManager(
            config.num_pages, config.page_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self._requests: dict[str, Request] = {}  # every unfinished request, by id
        self._waiting: deque[Request] = deque()  # FCFS; preempted requests are put at the front
        self._running: list[Request] = []  # admission order: oldest first, preemption victims last
        self._pending: SchedulerOutput | None = None  # last schedule() output, awaiting update()

    # ---- queries ------------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return self.page_manager.num_free_pages

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    # ---- requests in and out ------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request; reject it now if it could never run (nothing is changed then)."""
        rid = request.request_id
        if rid in self._requests:
            raise DuplicateRequestError(f"request id {rid!r} is already waiting or running")
        if request.status is not RequestStatus.WAITING or request.output_token_ids:
            raise InvalidRequestError(f"request {rid!r} was already scheduled once; add a new one")
        total = request.num_prompt_tokens + request.max_tokens
        if total > self.config.max_model_len:
            raise RequestTooLongError(
                f"request {rid!r}: prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.max_tokens}) = {total} tokens exceeds max_model_len "
                f"({self.config.max_model_len})"
            )
        # The last sampled token is never fed back, so at most total - 1 tokens hold KV.
        pages = self.page_manager.pages_needed(total - 1)
        if pages > self.page_manager.num_usable_pages:
            raise RequestTooLongError(
                f"request {rid!r}: prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.max_tokens}) needs up to {pages} KV pages of {self.config.page_size} "
                f"tokens, but the cache has only {self.page_manager.num_usable_pages} usable pages"
            )
        self._requests[rid] = request
        self._waiting.append(request)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request:
        """End an unfinished request in any state (e.g. the engine matched a stop string)."""
        request = self._requests.get(request_id)
        if request is None:
            raise UnknownRequestError(f"no unfinished request has id {request_id!r}")
        self._finish(request, reason)
        return request

    def abort(self, request_id: str) -> bool:
        """Abort a request and free its pages at once; False if it had already finished."""
        if request_id not in self._requests:
            return False  # a client may cancel after the last token: not an error
        self._finish(self._requests[request_id], FinishReason.ABORT)
        return True

    # ---- the step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's batch; allocates the pages it writes. See the module docstring."""
        if self._pending is not None:
            raise SchedulerError("schedule() called twice without update() of the first output")
        step = _Step(self.config.max_num_batched_tokens)
        # Iterate over copies: preemption removes requests from _running as we go.
        for request in list(self._running):
            if request.status is RequestStatus.RUNNING and request.num_tokens_to_compute == 1:
                self._schedule_running(request, step)
        for request in list(self._running):
            if request.status is RequestStatus.RUNNING and request.num_tokens_to_compute > 1:
                self._schedule_running(request, step)
        if not step.preempted:
            self._admit_waiting(step)
        self._pending = step.build()
        return self._pending

    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Apply a finished device step: advance computed tokens, append sampled ones, check stops.

        `sampled` maps each id whose entry has samples_token to its new token(s); other ids are
        ignored. Requests finished or aborted since schedule() are skipped (their pages are gone).
        Returns the requests that finished in this update, with their pages already freed.
        """
        if output is not self._pending:
            raise SchedulerError("update() takes the output of the latest schedule(), once")
        live = [e for e in output.scheduled if e.request.status is RequestStatus.RUNNING]
        for entry in live:  # validate everything before changing anything
            if entry.samples_token and not sampled.get(entry.request_id):
                raise SchedulerError(f"no sampled token for request {entry.request_id!r}")
        self._pending = None
        finished = []
        for entry in live:
            request = entry.request
            request.num_computed_tokens += entry.num_new_tokens
            self._register_computed_pages(request)
            if not entry.samples_token:
                continue
            for token in sampled[entry.request_id]:
                request.output_token_ids.append(int(token))
                reason = request.check_stop()
                if reason is not None:
                    self._finish(request, reason)
                    finished.append(request)
                    break
        return finished

    def recompute_all(self, output: SchedulerOutput) -> None:
        """Undo a step that never ran (`output`, the latest schedule()) after the KV cache was
        lost: every running request is preempted to recompute, in its admission order ahead of
        the waiting ones, and the prefix cache is emptied (its pages' contents are gone)."""
        if output is not self._pending:
            raise SchedulerError("recompute_all() takes the output of the latest schedule()")
        self._pending = None
        for request in reversed(self._running):  # oldest ends up first in the queue
            self._free_pages(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            request.num_preemptions += 1
            self._waiting.appendleft(request)
        self._running.clear()
        self.page_manager.forget_cached()

    # ---- internals ----------------------------------------------------------------------------

    def _schedule_running(self, request: Request, step: _Step) -> None:
        """Schedule the next tokens of a running request, preempting newer ones for pages."""
        num_new = min(request.num_tokens_to_compute, step.budget)
        if num_new == 0:
            return  # budget spent; it keeps its pages and runs next step
        if not self._make_room(request, request.num_computed_tokens + num_new, step):
            # Nothing newer left to preempt. A prefill may still take a shorter chunk that fits
            # its last page's free slots plus the free pages; a decode cannot shrink.
            size = self.config.page_size
            fit = (len(request.page_ids) + self.num_free_pages) * size
            num_new = min(num_new, fit - request.num_computed_tokens)
            if num_new <= 0:
                self._preempt(request, step)
                return
        end = request.num_computed_tokens + num_new
        missing = self.page_manager.pages_needed(end) - len(request.page_ids)
        request.page_ids.extend(self.page_manager.allocate(missing))
        step.add(request, num_new)

    def _make_room(self, request: Request, num_tokens: int, step: _Step) -> bool:
        """Preempt the newest running requests until `request` can hold `num_tokens` tokens.

        False when only `request` itself is left to preempt. Victims are always newer than
        `request`, so older requests keep their progress (the no-livelock argument).
        """
        missing = self.page_manager.pages_needed(num_tokens) - len(request.page_ids)
        while missing > self.num_free_pages:
            victim = self._running[-1]
            if victim is request:
                return False
            self._preempt(victim, step)
        return True

    def _admit_waiting(self, step: _Step) -> None:
        """Admit waiting requests in FCFS order while budget, request cap and pages allow."""
        size = self.config.page_size
        pm = self.page_manager
        while self._waiting and step.budget > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[0]
            hits: list[int] = []
            if self.config.enable_prefix_caching and request.use_prefix_cache:
                # Full pages only, and at least one token left to compute so the step samples.
                num_full = (request.num_tokens - 1) // size
                hits = pm.find_cached_prefix(request.page_hashes(size, num_full))
            num_cached = len(hits) * size
            num_new = min(request.num_tokens - num_cached, step.budget)
            if num_new < request.num_tokens - num_cached and not self.config.enable_chunked_prefill:
                break  # FCFS: the head waits for a step with room for its whole prompt
            missing = pm.pages_needed(num_cached + num_new) - len(hits)
            # Hits that sit in the cached-free LRU leave the free pool when shared.
            if missing + sum(pm.ref_count(p) == 0 for p in hits) > pm.num_free_pages:
                break  # admission never preempts: running requests come first
            self._waiting.popleft()
            pm.share(hits)  # before allocate(), which could otherwise evict the hit pages
            request.page_ids = hits + pm.allocate(missing)
            request.num_computed_tokens = request.num_cached_tokens = num_cached
            request.num_registered_pages = len(hits)
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            step.add(request, num_new)

    def _register_computed_pages(self, request: Request) -> None:
        """Offer the request's newly completed full pages (prompt or output) to the prefix cache."""
        if not self.config.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.config.page_size
        if num_full <= request.num_registered_pages:
            return
        hashes = request.page_hashes(self.config.page_size, num_full)
        for i in range(request.num_registered_pages, num_full):
            self.page_manager.register(request.page_ids[i], hashes[i])
        request.num_registered_pages = num_full

    def _preempt(self, request: Request, step: _Step) -> None:
        """Recompute preemption: free every page, keep the tokens, queue at the front."""
        self._running.remove(request)
        self._free_pages(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._waiting.appendleft(request)
        step.drop(request)
        step.preempted.append(request.request_id)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
            self._free_pages(request)
        else:
            self._waiting.remove(request)  # waiting or preempted: holds no pages
        del self._requests[request.request_id]
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _free_pages(self, request: Request) -> None:
        self.page_manager.free(request.page_ids)
        request.page_ids = []
        request.num_registered_pages = 0
