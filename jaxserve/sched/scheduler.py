"""Continuous-batching scheduler: chunked prefill, policies, recompute or swap preemption. Host only.

One engine step reads:

    out = scheduler.schedule()                  # which requests run, which tokens, which pages
    sampled = runner.execute(out)               # {request_id: [token]} for entries that sample
    finished = scheduler.update(out, sampled)   # sampled tokens in, stop checks, pages freed

schedule() already counts the step's tokens as computed and its sampled tokens as PENDING_TOKEN
(request.py), which update() replaces with the real ones. So the next step may be scheduled
before update() of this one (async scheduling, `max_pending=2`): its decodes feed the pending
tokens, which the runner takes from this step's results on the device. Stop checks then lag a
step (a request that stopped may have one more step in flight, whose tokens are dropped) and a
request whose last allowed token is pending is not scheduled.

`schedule()` fills a token budget (`max_num_batched_tokens`) under a request cap (`max_num_seqs`)
in three passes, so decode and prefill tokens of many requests share one ragged batch. Order is
the policy's rank (`policies.py`: fcfs = arrival order, priority, fair), best first:
  1. decodes of running requests (one token each);
  2. prefill continuations of running requests, chunked to the budget left;
  3. admissions from the waiting queue; a prefix-cache hit skips the shared full pages, a swapped
     request gets new pages and its KV copied back, and the last admitted prompt is chunked to the
     budget left. No admissions in a step that preempted: the pages just taken back are for the
     requests already running. A waiting request that does not fit may preempt the worst running
     one where the policy says so (priority: a smaller priority value; fair: less service).
When a running request needs pages and none are free, the WORST-ranked running request is
preempted (under fcfs the newest): by recompute (pages freed; its admission recomputes prompt +
outputs, cheaply from the prefix cache if its pages were not evicted meanwhile) or by swap (its
KV copied to host memory, `SchedulerOutput.swap_out`, and back at its admission, `swap_in`), as
`preemption_mode` says; a swap that does not fit the host pool recomputes. The best-ranked running
request is never preempted by another one, and `add_request` only accepts requests that fit the
cache alone, so every request finishes and no request ever fails for lack of pages.

With prefix caching and a host pool, prefix-cached pages evicted from the device are copied to
host memory (host_tier.py) and an admission whose prompt continues past its device-cached prefix
copies the next pages back from there (`swap_in` from tier pages) instead of recomputing them.

With `prefill_policy="layered"` passes 2 and 3 form a prefill batch of their own, which goes
through one group of layers per step while the decodes go through all of them (layered.py).
"""

from jaxserve.sched.config import (
    PREEMPTION_MODES,
    PREFILL_POLICIES,
    DuplicateRequestError,
    RequestTooLongError,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerError,
    UnknownRequestError,
)
from jaxserve.sched.host_pool import HostPool
from jaxserve.sched.host_tier import HostTier
from jaxserve.sched.layered import LayeredPrefill
from jaxserve.sched.page_manager import PageManager
from jaxserve.sched.policies import make_policy
from jaxserve.sched.request import (
    PENDING_TOKEN,
    FinishReason,
    InvalidRequestError,
    Request,
    RequestStatus,
)
from jaxserve.sched.step import ScheduledRequest, SchedulerOutput, StepBuilder, Swap

__all__ = ["PREEMPTION_MODES", "PREFILL_POLICIES", "DuplicateRequestError", "RequestTooLongError",
           "ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerConfigError", "SchedulerError",
           "SchedulerOutput", "Swap", "UnknownRequestError"]


class Scheduler(LayeredPrefill):
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.host_pool = HostPool(config.num_host_pages)
        # Evicted prefix-cache pages go to host memory when there is a pool to hold them.
        self.host_tier = HostTier(self.host_pool) if (
            config.enable_prefix_caching and config.host_prefix_cache and config.num_host_pages
        ) else None
        self.page_manager = PageManager(
            config.num_pages, config.page_size, enable_prefix_caching=config.enable_prefix_caching,
            track_evictions=self.host_tier is not None)
        self.policy = make_policy(config.scheduling_policy)
        self._requests: dict[str, Request] = {}  # every unfinished request, by id
        self._waiting: list[Request] = []  # waiting, preempted and swapped; sorted by rank
        self._running: list[Request] = []  # by rank at each schedule(): victims from the end
        # schedule() outputs awaiting update(), oldest first: 1 at most, or 2 with async scheduling
        self._pending: list[SchedulerOutput] = []
        self.max_pending = 1
        self._num_added = 0  # arrival sequence numbers
        self._host_free: list[int] = []  # host pages freed by a step that never ran, to tell
        self.num_preemptions = {"recompute": 0, "swap": 0}  # since start, by how

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

    @property
    def num_swapped(self) -> int:
        """Requests whose KV is in host memory."""
        return sum(r.status is RequestStatus.SWAPPED for r in self._waiting)

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
        """Waiting, preempted and swapped requests in the order they would be admitted."""
        return tuple(sorted(self._waiting, key=self.policy.key))

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
        self.policy.on_add(request, list(self._requests.values()))
        request.arrival_seq = self._num_added
        self._num_added += 1
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
        if len(self._pending) >= self.max_pending:
            raise SchedulerError(f"schedule() called again with {len(self._pending)} output(s) "
                                 f"awaiting update() (max_pending={self.max_pending})")
        self.policy.on_step()
        self._running.sort(key=self.policy.key)  # stable: fcfs keeps admission order
        step = StepBuilder(self.config.max_num_batched_tokens)
        # Iterate over copies: preemption removes requests from _running as we go.
        for request in list(self._running):
            if request.status is RequestStatus.RUNNING and request.num_tokens_to_compute == 1 \
                    and request.num_output_tokens < request.max_tokens \
                    and not self._in_prefill(request):  # (its last token may still be pending)
                self._schedule_running(request, step)
        stage = None
        if self.config.prefill_policy == "layered":  # prefill by layer groups (layered.py)
            stage = self._schedule_prefill_stage(step)
        else:
            for request in list(self._running):
                if request.status is RequestStatus.RUNNING and request.num_tokens_to_compute > 1:
                    self._schedule_running(request, step)
            if not step.preempted:
                self._admit_waiting(step)
        if self.host_tier is not None:  # copy evicted prefix pages out before they are written
            device, host = self.host_tier.offload(self.page_manager.take_evicted())
            if device:
                step.swap_out.append(Swap(None, tuple(device), tuple(host)))
        out = step.build(tuple(self._host_free + self.host_pool.take_freed()), stage)
        self._host_free.clear()
        for entry in out.scheduled:  # computed once the step runs; its samples are pending
            entry.request.num_computed_tokens = entry.end_position
            if entry.samples_token:
                entry.request.output_token_ids.append(PENDING_TOKEN)
            # Its full pages of known tokens are hits for later steps (after this one's writes:
            # the device runs steps in order; this step's own admissions were matched above).
            self._register_computed_pages(entry.request)
        self._pending.append(out)
        return out

    def has_host_pages_to_free(self) -> bool:
        """Host copies nobody will read (of requests aborted while swapped) that only the next
        step's output tells the runner to drop."""
        return bool(self._host_free) or self.host_pool.has_freed

    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Apply a finished device step: its sampled tokens replace the pending ones, stop checks.

        `sampled` maps each id whose entry has samples_token to its new token(s); other ids are
        ignored. Requests finished or aborted since schedule() are skipped (their pages are gone);
        those preempted since (by a later schedule()) still get their token. Returns the
        requests that finished in this update, with their pages already freed.
        """
        if not self._pending or output is not self._pending[0]:
            raise SchedulerError("update() takes the oldest schedule() output not updated, once")
        stage = output.prefill_stage
        staged = [e for e in (stage.entries if stage is not None and stage.is_last else ())
                  if e.request.status is RequestStatus.RUNNING]
        live = [e for e in output.scheduled if not e.request.is_finished] + staged
        for entry in live:  # validate everything before changing anything
            if entry.samples_token and not sampled.get(entry.request_id):
                raise SchedulerError(f"no sampled token for request {entry.request_id!r}")
        self._pending.pop(0)
        self._prefill_stage_done(stage)
        for entry in staged:  # a layered prefill batch is computed at its last stage
            entry.request.num_computed_tokens += entry.num_new_tokens
            if entry.samples_token:
                entry.request.output_token_ids.append(PENDING_TOKEN)
        finished = []
        for entry in live:
            request = entry.request
            if not entry.samples_token:
                if request.status is RequestStatus.RUNNING:
                    self._register_computed_pages(request)
                continue
            tokens = [int(t) for t in sampled[entry.request_id]]
            at = entry.end_position - request.num_prompt_tokens  # the pending token's index
            request.output_token_ids[at:at + 1] = tokens  # more than one: synchronous steps only
            if request.status is RequestStatus.RUNNING:  # every computed token is known now
                self._register_computed_pages(request)
            self.policy.on_output(request, len(tokens))
            for n in range(at + 1, at + 1 + len(tokens)):
                reason = request.check_stop(n)
                if reason is not None:
                    del request.output_token_ids[n:]  # tokens after the stop are not outputs
                    self._finish(request, reason)
                    finished.append(request)
                    break
        return finished

    def recompute_all(self, output: SchedulerOutput) -> None:
        """Undo a step that never ran (`output`, the latest schedule()) after the KV cache was
        lost: every running request is preempted to recompute (ranked among the waiting ones by
        the policy), and the prefix cache is emptied (its pages' contents are gone). Host copies
        made before this step stay valid; those this step would have made or used are dropped."""
        if not any(out is output for out in self._pending):
            raise SchedulerError("recompute_all() takes a schedule() output not updated, once")
        outputs, self._pending = self._pending, []  # none of them is applied (async: two)
        for swap in (swap for out in outputs for swap in out.swap_out):  # never copied: recompute
            if swap.request_id is None:  # an offload to the host tier
                self.host_tier.discard(swap.host_page_ids)
                continue
            request = self._requests.get(swap.request_id)
            if request is not None and request.status is RequestStatus.SWAPPED:
                self._free_host(request)
                request.num_computed_tokens = 0
                request.status = RequestStatus.PREEMPTED
        self._host_free.extend(h for out in outputs for h in out.host_free)  # never told
        for request in self._requests.values():  # pending tokens will never come
            _drop_pending(request)
        for request in self._running:
            self._free_pages(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            request.num_preemptions += 1
            self._waiting.append(request)
        self._running.clear()
        self._inflight = None
        self.page_manager.forget_cached()

    # ---- internals ----------------------------------------------------------------------------

    def _schedule_running(self, request: Request, step: StepBuilder) -> None:
        """Schedule the next tokens of a running request, preempting worse-ranked ones for pages."""
        num_new = min(request.num_tokens_to_compute, step.budget)
        if num_new == 0:
            return  # budget spent; it keeps its pages and runs next step
        if not self._make_room(request, request.num_computed_tokens + num_new, step):
            # Nothing worse left to preempt. A prefill may still take a shorter chunk that fits
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

    def _make_room(self, request: Request, num_tokens: int, step: StepBuilder) -> bool:
        """Preempt the worst-ranked running requests until `request` can hold `num_tokens` tokens.

        False when only `request` itself is left to preempt. Victims always rank after
        `request`, so better-ranked requests keep their progress (the no-livelock argument).
        """
        missing = self.page_manager.pages_needed(num_tokens) - len(request.page_ids)
        while missing > self.num_free_pages:
            victim = self._running[-1]
            if victim is request:
                return False
            self._preempt(victim, step)
        return True

    def _admit_waiting(self, step: StepBuilder) -> None:
        """Admit waiting requests in rank order while budget, request cap and pages allow."""
        self._waiting.sort(key=self.policy.key)
        while self._waiting and step.budget > 0:
            request = self._waiting[0]
            if request.request_id in step.preempted:
                break  # preempted by this very step: not back before the next one
            plan = self._admission(request, step.budget)
            if plan is None:
                break  # the head waits for a step with room for its whole prompt (no chunking)
            hits, host_hits, num_cached, num_new, missing = plan
            pm = self.page_manager
            # Hits that sit in the cached-free LRU leave the free pool when shared.
            short = missing + sum(pm.ref_count(p) == 0 for p in hits) > pm.num_free_pages
            if short or len(self._running) >= self.config.max_num_seqs:
                if self._preempt_for(request, step):
                    continue
                break  # admission preempts only where the policy ranks the head first
            self._waiting.pop(0)
            pm.share(hits)  # before allocate(), which could otherwise evict the hit pages
            new_pages = pm.allocate(missing)
            if request.status is RequestStatus.SWAPPED:  # its KV comes back from host memory
                n = len(request.host_page_ids)
                step.swap_in.append(Swap(request.request_id, tuple(new_pages[:n]),
                                         tuple(request.host_page_ids)))
                self._free_host(request)
            else:
                if host_hits:  # prefix pages back from the host tier, which keeps its copies
                    step.swap_in.append(Swap(request.request_id,
                                             tuple(new_pages[:len(host_hits)]), tuple(host_hits)))
                    self.host_tier.count_hits(len(host_hits))
                request.num_computed_tokens = request.num_cached_tokens = num_cached
                self.policy.on_admit(request)
            request.page_ids = hits + new_pages
            request.num_registered_pages = len(hits)
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            step.admitted.add(request.request_id)
            step.add(request, num_new)

    def _admission(self, request: Request, budget: int
                   ) -> tuple[list[int], list[int], int, int, int] | None:
        """(device prefix-cache hit pages, host tier hit pages, cached tokens, tokens to compute,
        device pages to allocate) of admitting `request` now, or None when it needs a whole
        prompt the budget cannot hold."""
        size, pm = self.config.page_size, self.page_manager
        hits, host_hits = [], []
        if request.status is RequestStatus.SWAPPED:
            num_cached = request.num_computed_tokens
            num_to_compute = request.num_tokens_to_compute
        else:
            if self.config.enable_prefix_caching and request.use_prefix_cache:
                # Full pages only, and at least one token left to compute so the step samples.
                num_full = (request.num_tokens - 1) // size
                hashes = request.page_hashes(size, num_full)
                hits = pm.find_cached_prefix(hashes)
                if self.host_tier is not None:
                    host_hits = self.host_tier.find(hashes[len(hits):])
            num_cached = (len(hits) + len(host_hits)) * size
            num_to_compute = request.num_tokens - num_cached
        num_new = min(num_to_compute, budget)
        if num_new < num_to_compute and not self.config.enable_chunked_prefill:
            return None
        missing = pm.pages_needed(num_cached + num_new) - len(hits)
        return hits, host_hits, num_cached, num_new, missing

    def _preempt_for(self, request: Request, step: StepBuilder) -> bool:
        """Preempt the worst running request for waiting `request` if the policy ranks it first."""
        candidates = [r for r in self._running if r.request_id not in step.admitted]
        if not candidates:
            return False
        victim = max(candidates, key=self.policy.key)
        if self.policy.key(victim) <= self.policy.key(request) or \
                not self.policy.preempts_for(request, victim):
            return False
        self._preempt(victim, step)
        return True

    def _register_computed_pages(self, request: Request) -> None:
        """Offer the request's newly completed full pages (prompt or output) to the prefix cache:
        pages computed, or computed by a step already scheduled, whose tokens are all known."""
        size = self.config.page_size
        if not self.config.enable_prefix_caching or \
                request.num_computed_tokens // size <= request.num_registered_pages:
            return  # (the common case, on every entry of every step: nothing new)
        ids, pending = request.output_token_ids, 0
        while pending < len(ids) and ids[-1 - pending] == PENDING_TOKEN:
            pending += 1
        num_full = min(request.num_computed_tokens, request.num_tokens - pending) // size
        if num_full <= request.num_registered_pages:
            return
        hashes = request.page_hashes(size, num_full)
        for i in range(request.num_registered_pages, num_full):
            self.page_manager.register(request.page_ids[i], hashes[i])
        request.num_registered_pages = num_full

    def _preempt(self, request: Request, step: StepBuilder) -> None:
        """Free every device page; by swap (KV copied to host first) or recompute (tokens kept)."""
        self._running.remove(request)
        self._leave_prefill(request)
        step.drop(request)
        step.preempted.append(request.request_id)
        request.num_preemptions += 1
        self._waiting.append(request)
        computed = request.page_ids[:self.page_manager.pages_needed(request.num_computed_tokens)]
        if computed and self._swaps(request, len(computed)):
            request.host_page_ids = self.host_pool.allocate(len(computed))
            step.swap_out.append(Swap(request.request_id, tuple(computed),
                                      tuple(request.host_page_ids)))
            request.status = RequestStatus.SWAPPED
        else:
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
        self.num_preemptions["swap" if request.host_page_ids else "recompute"] += 1
        self._free_pages(request)  # after the copy is listed: the runner reads them first

    def _swaps(self, request: Request, num_pages: int) -> bool:
        """Swap rather than recompute this victim? Never when the host pool cannot hold it (the
        host tier's pages give way first)."""
        c = self.config
        if c.preemption_mode == "recompute":
            return False
        if c.preemption_mode == "auto" and num_pages * c.swap_seconds_per_page > \
                request.num_computed_tokens * c.recompute_seconds_per_token:
            return False  # auto: the cheaper of copying its pages back and recomputing its tokens
        if self.host_tier is not None:
            return self.host_tier.reserve(num_pages)
        return num_pages <= self.host_pool.num_free_pages

    def _finish(self, request: Request, reason: FinishReason) -> None:
        _drop_pending(request)  # tokens of steps still in flight are dropped
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
            self._leave_prefill(request)
            self._free_pages(request)
        else:
            self._waiting.remove(request)  # waiting, preempted or swapped: holds no device pages
            if request.status is RequestStatus.SWAPPED:
                self._free_host(request)  # its host pages reach the runner's drop list
        del self._requests[request.request_id]
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _free_pages(self, request: Request) -> None:
        self.page_manager.free(request.page_ids)
        request.page_ids = []
        request.num_registered_pages = 0

    def _free_host(self, request: Request) -> None:
        self.host_pool.free(request.host_page_ids)
        request.host_page_ids = []


def _drop_pending(request: Request) -> None:
    """Forget the request's output tokens still pending on the device (always the last ones)."""
    ids = request.output_token_ids
    while ids and ids[-1] == PENDING_TOKEN:
        ids.pop()
