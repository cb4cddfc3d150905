"""What one schedule() call decides: the batch entries, preemptions and KV swaps. Host only."""

from __future__ import annotations

from dataclasses import dataclass

from jaxserve.sched.request import Request


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
class Swap:
    """KV pages moving between the device cache and host pages, in page-table order: one
    request's (swap preemption; host tier hits coming back), or prefix-cache pages the device
    evicts going to the host tier (request_id None)."""

    request_id: str | None
    device_page_ids: tuple[int, ...]  # out: the pages to copy (freed after the copy is issued);
    #                                   in: the freshly allocated pages to fill
    host_page_ids: tuple[int, ...]  # host pool ids (sched/host_pool.py), same length


@dataclass(frozen=True)
class PrefillStage:
    """One step of a layered prefill batch (sched/layered.py): its entries go through the
    `stage`-th of `num_stages` contiguous groups of layers. The entries are the same every
    stage of a batch, less the members preempted or aborted since its first stage (their
    rows must no longer write their freed pages); the last stage samples as a whole prefill
    chunk would."""

    batch_id: int  # which batch: stage 0 starts a new one
    stage: int  # 0 .. num_stages - 1
    num_stages: int
    entries: tuple[ScheduledRequest, ...]  # the live members, as scheduled at stage 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)


@dataclass(frozen=True)
class SchedulerOutput:
    # Batch order: decodes, then prefill continuations, then admissions.
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...]  # ids preempted this step (they hold no pages and are not scheduled)
    num_batched_tokens: int  # sum of num_new_tokens, <= max_num_batched_tokens
    # Device work before the batch runs. A host page may be read by `swap_in`, freed, and
    # written again by `swap_out` within one step, so the runner: (1) looks up the host copies
    # `swap_in` reads, (2) drops the copies of `host_free`, (3) copies out (they read the cache
    # before any page is reused), (4) copies in.
    swap_out: tuple[Swap, ...] = ()
    host_free: tuple[int, ...] = ()  # host pages whose copies nobody reads any more
    swap_in: tuple[Swap, ...] = ()
    # Layered prefill: the in-flight prefill batch's stage this step (None: none in flight).
    # `scheduled` then holds the decodes, which go through every layer.
    prefill_stage: PrefillStage | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.swap_out or self.host_free or self.swap_in
                    or self.prefill_stage)

    @property
    def completed(self) -> tuple[ScheduledRequest, ...]:
        """Entries whose tokens are computed through every layer when this step ends: the
        batch, and the prefill batch's entries at its last stage."""
        stage = self.prefill_stage
        return self.scheduled + (stage.entries if stage is not None and stage.is_last else ())


class StepBuilder:
    """The batch being built by one schedule() call."""

    def __init__(self, budget: int):
        self.budget = budget  # tokens left
        self.entries: dict[str, ScheduledRequest] = {}  # insertion order = batch order
        self.preempted: list[str] = []
        self.admitted: set[str] = set()  # ids admitted by this step (never its victims)
        self.swap_out: list[Swap] = []
        self.swap_in: list[Swap] = []
        self.decodes: dict[str, ScheduledRequest] | None = None  # layered: see start_prefill

    def start_prefill(self, budget: int) -> None:
        """Layered prefill: the entries so far (decodes) form the batch that runs every layer;
        those added from now on form the prefill batch, with a token budget of its own."""
        self.decodes, self.entries, self.budget = self.entries, {}, budget

    def merge_prefill(self) -> None:
        """Layered prefill of one stage: the prefill batch joins the decodes' batch (every
        layer, one step), as a chunked prefill would."""
        self.entries, self.decodes = {**self.decodes, **self.entries}, None

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
        """Take a request preempted later in this step back out of the batch (an older request
        needing its pages in pass 2, a policy that ranks a running one above another)."""
        if self.decodes is not None and self.decodes.pop(request.request_id, None) is not None:
            return  # a decode: the prefill batch's budget is its own
        entry = self.entries.pop(request.request_id, None)
        if entry is not None:
            self.budget += entry.num_new_tokens

    def build(self, host_free: tuple[int, ...], prefill_stage: PrefillStage | None = None,
              ) -> SchedulerOutput:
        scheduled = tuple((self.entries if self.decodes is None else self.decodes).values())
        return SchedulerOutput(
            scheduled=scheduled,
            preempted=tuple(self.preempted),
            num_batched_tokens=sum(e.num_new_tokens for e in scheduled),
            swap_out=tuple(self.swap_out),
            host_free=host_free,
            swap_in=tuple(self.swap_in),
            prefill_stage=prefill_stage,
        )
