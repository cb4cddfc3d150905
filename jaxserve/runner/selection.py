"""Sparse attention's kept page choices (`SparseAttentionConfig.reuse_steps`): the host side.

On device the runner holds, per layer, a mask [M + 1, W] bool: row m the page-table slots the
request in row m chose at its last choice (kernels/sparse.py; row M takes padding rows). Every
decode step passes each batch row's row m (`slots`), the pages it had when it chose (`since`) and
whether this step chooses afresh (`refresh`), and the step's chosen masks are written back
(`write_selections`, the masks donated).

Warmup compiles both programs of each decode bucket, the one that chooses and the one that
reuses (`SelectionCache.dummy`). `SelectionCache` is the bookkeeping, host only: which row each request holds and whether its
mask is still good. A step refreshes (every request chooses afresh) when any request in it has
no good mask: it is new here, its row was given to another request, its pages changed since it
chose (recomputed after a preemption, swapped back in: any other page table), the Request
object is another one under the same id, or it chose reuse_steps or more tokens ago. One
scalar for the whole step, so that a step that reuses skips the scoring for every request (it
runs the reusing program): after a refresh all requests run in phase. The masks hold page-table positions,
never page ids, so a mask read in error could only choose among the request's own pages; the
checks above make sure none is read in error.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class _Kept:
    request: object  # the sched Request whose choice row `slot` holds
    slot: int
    position: int  # its end position when it chose
    pages: tuple[int, ...]  # its page table then


@dataclasses.dataclass(frozen=True)
class SelectionInputs:
    """A decode step's part of the kept choices, host numpy (broadcast with StepInputs)."""

    slots: np.ndarray  # [R] int32 row of each batch row's kept mask (M: padding)
    since: np.ndarray  # [R] int32 pages each request had when it chose
    refresh: bool  # every request chooses afresh (static: the programs that choose and that
    #                reuse are two, compiled in warmup)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.slots, self.since


class SelectionCache:
    def __init__(self, num_slots: int, reuse_steps: int, page_size: int):
        self.num_slots, self.reuse_steps, self.page_size = num_slots, reuse_steps, page_size
        self.kept: dict[str, _Kept] = {}

    def clear(self) -> None:
        """Forget every kept choice (the device masks were lost, or the configuration changed)."""
        self.kept.clear()

    def inputs(self, scheduled, num_rows: int) -> SelectionInputs:
        """The inputs of a decode-only step of `scheduled` padded to `num_rows`, and the
        bookkeeping of the choices it keeps."""
        ids = {s.request_id for s in scheduled}
        refresh = False
        for s in scheduled:
            k = self.kept.get(s.request_id)
            if (k is None or k.request is not s.request or s.page_ids[:len(k.pages)] != k.pages
                    or s.end_position - k.position >= self.reuse_steps):
                refresh = True
                break
        if refresh:  # rows of requests not in this step go first when rows run out
            free = sorted(set(range(self.num_slots)) - {k.slot for k in self.kept.values()})
            stale = [rid for rid in self.kept if rid not in ids]
            for s in scheduled:
                k = self.kept.get(s.request_id)
                if k is None:
                    if not free:
                        free.append(self.kept.pop(stale.pop()).slot)
                    k = self.kept[s.request_id] = _Kept(s.request, free.pop(0), 0, ())
                num_pages = -(-s.end_position // self.page_size)
                k.request, k.position, k.pages = s.request, s.end_position, s.page_ids[:num_pages]
        slots = np.full(num_rows, self.num_slots, np.int32)
        since = np.zeros(num_rows, np.int32)
        for i, s in enumerate(scheduled):
            k = self.kept[s.request_id]
            slots[i], since[i] = k.slot, len(k.pages)
        return SelectionInputs(slots, since, refresh)

    def dummy(self, num_rows: int, refresh: bool = True) -> SelectionInputs:
        """Inputs of a warmup or check step: padding rows only."""
        return SelectionInputs(np.full(num_rows, self.num_slots, np.int32),
                               np.zeros(num_rows, np.int32), refresh)


def init_masks(num_layers: int, num_slots: int, width: int):
    """Per layer the kept masks [M + 1, W] bool, nothing kept (row M: padding rows)."""
    return tuple(jnp.zeros((num_slots + 1, width), bool) for _ in range(num_layers))


def write_masks(masks, chosen, slots):
    """A decode step's chosen masks (per layer [R, W]) into the rows `slots` [R] of the kept
    ones (donated: in place)."""
    return tuple(m.at[slots].set(c) for m, c in zip(masks, chosen, strict=True))
