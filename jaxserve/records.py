"""Per-step records: what one engine step did, for notebooks, plots (`jaxserve.viz`) and tests.

With `EngineConfig(record_steps=True)` the engine appends one `StepRecord` per step to
`engine.step_records` (also `llm.step_records`). A record is plain host data (no jax), so a run's
records can be kept, compared and plotted after the engine is gone.

    records = llm.step_records
    records[3]                      # a small table in Jupyter, one line elsewhere
    StepRecords(records)            # the whole run as one table (first and last rows)
"""

from __future__ import annotations

import dataclasses
import html


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int  # engine step index from 0
    start: float  # time.perf_counter() at the step's start
    duration: float  # seconds from its schedule() to its outputs (async: spans the next dispatch)
    num_decode: int  # requests that decoded one token
    num_prefill: int  # requests with a prefill chunk or layered-prefill stage this step
    decode_tokens: int
    prefill_tokens: int
    prefill_stage: tuple[int, int] | None  # (group index, groups) of an in-flight layered prefill
    num_running: int
    num_waiting: int
    num_swapped: int  # requests whose KV is in host memory
    pages_device: int  # KV pages in use on device
    pages_host: int  # KV pages held in host memory (swapped requests + host prefix tier)
    preempted: tuple[str, ...]  # request ids preempted this step
    swapped_out: int  # pages copied device -> host this step
    swapped_in: int  # pages copied host -> device this step

    @classmethod
    def of(cls, step: int, scheduled, scheduler, start: float) -> StepRecord:
        """What step `step` (a SchedulerOutput) did, read from the scheduler once it finished."""
        import time

        decode = [s for s in scheduled.scheduled
                  if s.num_new_tokens == 1 and s.start_position >= s.request.num_prompt_tokens]
        stage = scheduled.prefill_stage
        return cls(
            step=step, start=start, duration=time.perf_counter() - start,
            num_decode=len(decode), num_prefill=len(scheduled.scheduled) - len(decode) + (
                0 if stage is None else len(stage.entries)),
            decode_tokens=len(decode), prefill_tokens=scheduled.num_batched_tokens - len(decode) + (
                0 if stage is None else stage.num_tokens),
            prefill_stage=None if stage is None else (stage.stage, stage.num_stages),
            num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
            num_swapped=scheduler.num_swapped,
            pages_device=scheduler.page_manager.num_used_pages,
            pages_host=scheduler.host_pool.num_used_pages,
            preempted=tuple(scheduled.preempted),
            swapped_out=sum(len(s.device_page_ids) for s in scheduled.swap_out),
            swapped_in=sum(len(s.device_page_ids) for s in scheduled.swap_in))

    def __str__(self) -> str:
        stage = "" if self.prefill_stage is None else \
            f" stage {self.prefill_stage[0] + 1}/{self.prefill_stage[1]}"
        extra = ""
        if self.preempted:
            extra += f" preempted={list(self.preempted)}"
        if self.swapped_out or self.swapped_in:
            extra += f" swap out/in={self.swapped_out}/{self.swapped_in}"
        return (f"step {self.step}: {self.duration * 1e3:.1f} ms, decode {self.num_decode} "
                f"({self.decode_tokens} tok), prefill {self.num_prefill} ({self.prefill_tokens} tok)"
                f"{stage}; running {self.num_running}, waiting {self.num_waiting}, swapped "
                f"{self.num_swapped}; pages device {self.pages_device}, host {self.pages_host}{extra}")

    def _repr_html_(self) -> str:  # one record: a two-column table of its fields
        rows = "".join(f"<tr><th style='text-align:left'>{name}</th><td>{html.escape(value)}</td></tr>"
                       for name, value in _cells(self).items())
        return f"<table>{rows}</table>"


_COLUMNS = ("step", "ms", "decode", "prefill", "stage", "running", "waiting", "swapped",
            "pages dev", "pages host", "preempted", "swap out", "swap in")


def _cells(r: StepRecord) -> dict[str, str]:
    stage = "" if r.prefill_stage is None else f"{r.prefill_stage[0] + 1}/{r.prefill_stage[1]}"
    values = (r.step, f"{r.duration * 1e3:.1f}", f"{r.num_decode} ({r.decode_tokens} tok)",
              f"{r.num_prefill} ({r.prefill_tokens} tok)", stage, r.num_running, r.num_waiting,
              r.num_swapped, r.pages_device, r.pages_host, ", ".join(r.preempted),
              r.swapped_out, r.swapped_in)
    return {c: str(v) for c, v in zip(_COLUMNS, values)}


def records_html(records: list[StepRecord], *, max_rows: int = 40) -> str:
    """A list of records as one HTML table, a row per step; past `max_rows`, the first and last
    half are shown with a row saying how many were left out. Steps that preempted or swapped
    are highlighted."""
    records = list(records)
    head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
    if len(records) > max_rows:
        half = max_rows // 2
        shown: list[StepRecord | int] = [*records[:half], len(records) - 2 * half, *records[-half:]]
    else:
        shown = records
    rows = []
    for r in shown:
        if isinstance(r, int):
            rows.append(f"<tr><td colspan='{len(_COLUMNS)}' style='text-align:center'>"
                        f"... {r} steps ...</td></tr>")
            continue
        style = " style='background:#fde2c8'" if r.preempted or r.swapped_out or r.swapped_in else ""
        cells = "".join(f"<td>{html.escape(v)}</td>" for v in _cells(r).values())
        rows.append(f"<tr{style}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


class StepRecords(list):
    """A list of `StepRecord`s that renders as one table in Jupyter and as lines elsewhere."""

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self)

    def __repr__(self) -> str:  # the first and last steps, not 16 fields of every one
        lines = [str(r) for r in (self if len(self) <= 6 else [*self[:3], *self[-3:]])]
        if len(self) > 6:
            lines.insert(3, f"... {len(self) - 6} steps ...")
        return f"StepRecords({len(self)} steps)" + "".join(f"\n  {line}" for line in lines)

    def _repr_html_(self) -> str:
        return f"<div>{len(self)} steps</div>" + records_html(self)
