"""Layered prefill, the scheduler's side (arXiv 2510.08055, "From Tokens to Layers"). Host only.

With `prefill_policy="layered"` a step is two batches:

    decodes        every running decode, through all L layers (sampled this step)
    prefill batch  the in-flight prefill batch, through ONE contiguous group of L / G layers

so a prefill completes after G steps and reads each layer's weights once, while decodes keep
their pace (chunked prefill instead runs every chunk through all layers in the decodes' step).
A batch is formed only when none is in flight: the running requests' remaining prompt chunks,
then admissions, under a token budget of its own (`max_num_batched_tokens`; a longer prompt is
chunked and each chunk goes through the G groups in turn). G comes from the batch's tokens
(`SchedulerConfig.prefill_stages`, measured: runner/layered.py); a batch of one stage that fits
the budget beside the decodes joins their batch instead (one mixed batch, as chunked prefill
runs it: two batches would read every weight twice in that step). The batch's pages are
allocated when it forms; its `num_computed_tokens` advance only after its last stage, when it
samples.

A member preempted or aborted mid-batch leaves it at once (its pages are freed; the later
stages' `PrefillStage.entries` no longer list it, so the runner stops writing its rows). Its
half-computed chunk is lost: a preempted member restarts that chunk's prefill, whether it was
recomputed (everything) or swapped (the chunks completed before this batch come back from host
memory; the swap copies only pages of computed tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxserve.sched.request import Request, RequestStatus
from jaxserve.sched.step import PrefillStage, ScheduledRequest, StepBuilder


@dataclass
class InFlightPrefill:
    batch_id: int
    num_stages: int
    stage: int  # the stage scheduled last
    entries: dict[str, ScheduledRequest]  # live members, by id


class LayeredPrefill:
    """The Scheduler's layered-prefill methods (a mixin: they share its queues and pages)."""

    _inflight: InFlightPrefill | None = None
    _num_prefill_batches: int = 0
    num_prefill_stages_run: int = 0  # stages scheduled since start (a Prometheus counter)

    def _in_prefill(self, request: Request) -> bool:
        return self._inflight is not None and request.request_id in self._inflight.entries

    def _schedule_prefill_stage(self, step: StepBuilder) -> PrefillStage | None:
        """The prefill batch's next stage; a new batch if none is in flight (after the decodes
        were scheduled in `step`)."""
        f = self._inflight
        if f is not None:
            f.stage += 1
        else:
            step.start_prefill(self.config.max_num_batched_tokens)
            for request in list(self._running):  # prompt chunks of running requests first
                if request.status is RequestStatus.RUNNING and request.num_tokens_to_compute > 1 \
                        and request.request_id not in step.decodes:
                    self._schedule_running(request, step)
            if not step.preempted:
                self._admit_waiting(step)
            if not step.entries:
                return None
            tokens = sum(e.num_new_tokens for e in step.entries.values())
            num_stages = self.config.num_prefill_stages(tokens)
            if num_stages == 1 and tokens + len(step.decodes) <= self.config.max_num_batched_tokens:
                step.merge_prefill()  # one stage: a mixed batch with the decodes, as chunked
                return None
            self._num_prefill_batches += 1
            f = self._inflight = InFlightPrefill(self._num_prefill_batches, num_stages, 0,
                                                 dict(step.entries))
        self.num_prefill_stages_run += 1
        return PrefillStage(f.batch_id, f.stage, f.num_stages, tuple(f.entries.values()))

    def _leave_prefill(self, request: Request) -> None:
        """A member preempted or finished mid-batch: the batch goes on without it."""
        f = self._inflight
        if f is not None and f.entries.pop(request.request_id, None) is not None and not f.entries:
            self._inflight = None

    def _prefill_stage_done(self, stage: PrefillStage | None) -> None:
        """After update() of a step: a batch whose last stage ran is no longer in flight."""
        f = self._inflight
        if stage is not None and stage.is_last and f is not None and f.batch_id == stage.batch_id:
            self._inflight = None
