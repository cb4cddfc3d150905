"""Layered prefill, the device side: the in-flight prefill batch between steps.

A step whose SchedulerOutput has a `PrefillStage` (sched/layered.py) runs, after the decodes'
batch (every layer, sampled as usual), one group of layers of the prefill batch:

    stage 0:      inputs = prepare(batch)                 host numpy, built once and kept
                  hidden = embed[T](token_ids)
    stage g:      hidden, new_kv = stage[T, s](layers g*s .. g*s+s-1, their caches, hidden, md)
                  kv[g*s : g*s+s] = write[T, s](those caches, new_kv)     caches donated
    last stage:   logits = head[T, R](hidden); sampled = sampler(logits)  as a prefill chunk

with s = L / G layers per stage. `hidden` ([T, D], T the batch's token bucket) stays on device
between steps and is donated into the next stage's program, so it is updated in place; each
stage writes its own layers' K/V, so a batch's K/V is complete when its last stage ran. A
batch of G = 1 usually joins the decodes' batch (sched/layered.py); one that does not fit the
budget beside them runs the ordinary all-layer programs as a batch of its own, in one step. A member that left the batch
(preempted, aborted) has its rows' cache slots pointed at the padding page 0 before the next
stage, so its freed pages, which another request may hold by now, are never written again.

Programs: one `stage` program and one group `write` per (prefill bucket, stage size s), all
compiled in warmup (`ModelRunner.warmup`), so serving compiles nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxserve.models import llama
from jaxserve.runner.batch import StepInputs, StepResult
from jaxserve.sched import PrefillStage, SchedulerOutput

# Stages G of a layered prefill batch by its prompt tokens: ((at most tokens, G), ...).
# The paper's table (arXiv 2510.08055, 16 stages): <=512 -> 1, <=1024 -> 2, <=2048 -> 4,
# <=4096 -> 8, else 16.
PAPER_STAGES = ((512, 1), (1024, 2), (2048, 4), (4096, 8), (1 << 62, 16))
# Measured on this machine (2 shared CPU cores, SmolLM2-135M float32; benchmarks/
# prefill_stages.py). The rule, the paper's: the smallest G in 1, 2, 4, 8, 16 whose stage,
# full(T) / G, costs at most one decode step (on a GPU a 512-token prefill step costs about
# what a decode step does, both reading every weight once: the paper's first row). Medians on
# a busy machine:
#
#   decode step, batch 8:  273 ms
#   prompt tokens T        128     256     512     1024     2048
#   full prefill (ms)     2104    4010    6154    15068    45823
#   full / decode          7.7    14.7    22.5     55.2    167.8
#
# ~16 ms a prompt token against 273 ms a decode step: a decode step costs what ~18 prompt
# tokens do here, against ~512 on a GPU. So the thresholds are the paper's divided by 32:
# G = T / 18 rounded up to a power of two, up to the paper's cap of 16 (for 30 layers:
# 1, 2, 5, 10, 15 stages). A batch of one stage joins the decodes' batch (sched/layered.py).
MEASURED_STAGES = ((16, 1), (32, 2), (64, 4), (128, 8), (1 << 62, 16))


def prefill_stages(num_layers: int, table=None) -> tuple[tuple[int, int], ...]:
    """`table` (default MEASURED_STAGES) with each G made a divisor of L: the group size is
    the divisor of L nearest to L / G, so that every stage of a batch runs one program. For
    SmolLM2's 30 layers the paper's 1/2/4/8/16 become 1/2/5/10/15 stages."""
    out = []
    for tokens, g in (MEASURED_STAGES if table is None else table):
        size = min((d for d in range(1, num_layers + 1) if num_layers % d == 0),
                   key=lambda d: (abs(d - num_layers / g), d))
        out.append((int(tokens), num_layers // size))
    return tuple(out)


@dataclasses.dataclass
class _Batch:
    batch_id: int
    inputs: StepInputs
    md: object  # AttentionMetadata, numpy: slot_mapping changed as members leave
    rows: dict[str, tuple[int, int]]  # live member -> (first row on T, rows)
    order: list[str]  # members at stage 0: logit row i is order[i]'s
    samples: set[str]  # members whose last stage samples a token
    prompt_rows: dict
    failed: dict[str, str]
    hidden: jax.Array | None = None


class LayeredPrefillRunner:
    """The ModelRunner's in-flight prefill batch (one at a time) and its stage programs."""

    def __init__(self, runner, layer_def, new_kv_sharding, stages: tuple[tuple[int, int], ...]):
        self.runner, self.stages = runner, stages
        self.sizes = self.sizes_for(runner.engine.max_num_batched_tokens)
        mesh = runner.mesh
        self._stage = jax.jit(lambda group, lkv, h, md: llama.run_layers(
            [layer_def.merge(leaves) for leaves in group], lkv, h, md, mesh=mesh),
            out_shardings=(runner._replicated, new_kv_sharding), donate_argnums=(2,))
        self.batch: _Batch | None = None

    def sizes_for(self, num_tokens: int) -> list[int]:
        """Layers per stage program of the batches a bucket of `num_tokens` tokens can hold
        (at most that many tokens: the table's rows that start at or below it)."""
        L, lower = self.runner.config.num_layers, 0
        sizes = set()
        for tokens, g in self.stages:
            if lower < num_tokens and g > 1:
                sizes.add(L // g)
            lower = tokens
        return sorted(sizes)

    def drop(self) -> None:
        """Forget the in-flight batch (its members left, or the cache was lost)."""
        self.batch = None

    def warmup(self, b, md, hidden) -> None:
        """Inside Programs.deferred: lower every stage size's programs of prefill bucket b."""
        for s in self.sizes_for(b.num_tokens):
            self._group(b, 0, s, hidden, md)

    def _group(self, b, first: int, s: int, hidden, md):
        r = self.runner
        group, lkv = tuple(r._layer_leaves[first:first + s]), r.kv[first:first + s]
        args = (group, lkv, hidden, md)
        hidden, new_kv = r._program(("stage", b, s), self._stage, *args)(*args)
        r._write_kv(b, new_kv, md.slot_mapping, first=first)
        return hidden

    def run(self, stage: PrefillStage, params_of) -> tuple | None:
        """Dispatch this step's stage. At the last stage: (entries, device results, prompt
        rows, failed) for the runner to collect, as for a chunked batch; None before."""
        r = self.runner
        if stage.stage == 0:
            self.batch = self._start(stage, params_of)
        batch = self.batch
        if batch is None or batch.batch_id != stage.batch_id:
            raise RuntimeError(f"stage {stage.stage} of prefill batch {stage.batch_id}, but "
                               f"the runner holds {batch and batch.batch_id}")
        live = {e.request_id for e in stage.entries}
        gone = [rid for rid in batch.rows if rid not in live]
        if gone:  # their pages are freed: their rows write the padding page from now on
            slots = batch.md.slot_mapping.copy()
            for rid in gone:
                start, n = batch.rows.pop(rid)
                slots[start:start + n] = 0
            batch.md = dataclasses.replace(batch.md, slot_mapping=slots)
        inputs, b = batch.inputs, batch.inputs.bucket
        ids, md, li = r._inputs((inputs.token_ids, batch.md, inputs.logits_indices))
        if stage.num_stages == 1:
            logits, new_kv, hidden = r._forward(b, ids, md, li)
            r._write_kv(b, new_kv, md.slot_mapping)
        else:
            if stage.stage == 0:
                el = r._embed_leaves
                batch.hidden = r._program(("embed", b.num_tokens), r._embed, el, ids)(el, ids)
            s = r.config.num_layers // stage.num_stages
            hidden = batch.hidden = self._group(b, stage.stage * s, s, batch.hidden, md)
            if not stage.is_last:
                return None
            logits = r.logits(b, hidden, li)
        self.batch = None
        tensors, ban = r._inputs((inputs.sampling, inputs.banned))
        res, _ = r._run_sampler(logits, tensors, ban, inputs.num_logprobs)
        prompt_out = None
        if inputs.prompt_targets is not None:
            prompt_out = r._prompt_logprobs_of(b, hidden, inputs.prompt_targets)
        keep = [i for i, rid in enumerate(batch.order) if rid in live and rid in batch.samples]
        prompt_rows = {rid: v for rid, v in batch.prompt_rows.items() if rid in live}
        return batch.order, keep, (res, prompt_out), prompt_rows, batch.failed

    def _start(self, stage: PrefillStage, params_of) -> _Batch:
        out = SchedulerOutput(scheduled=stage.entries, preempted=(),
                              num_batched_tokens=stage.num_tokens)
        inputs, prompt_rows, failed = self.runner.batch.prepare(out, params_of, prefill=True)
        rows, start = {}, 0
        for e in stage.entries:
            rows[e.request_id] = (start, e.num_new_tokens)
            start += e.num_new_tokens
        samples = {e.request_id for e in stage.entries if e.samples_token} - set(failed)
        return _Batch(stage.batch_id, inputs, inputs.md, rows, [e.request_id for e in stage.entries],
                      samples, prompt_rows, failed)


def concat_results(parts: list[StepResult]) -> StepResult:
    """One StepResult of the decodes' batch and a prefill batch's last stage. A part without
    top log-probs (its sampler variant computes none: no row asked) gets zeros there."""
    if not parts:  # a stage before the last, and no decodes
        return StepResult([], np.zeros(0, np.int32), np.zeros(0, np.float32), None, None, None)
    if len(parts) == 1:
        return parts[0]
    n = [len(p.request_ids) for p in parts]

    def cat(field, width=None):
        xs = [getattr(p, field) for p in parts]
        if all(x is None for x in xs):
            return None
        like = next(x for x in xs if x is not None)
        return np.concatenate([np.zeros((k, *like.shape[1:]), like.dtype) if x is None else x
                               for x, k in zip(xs, n)])

    prompt, failed = {}, {}
    for p in parts:
        prompt.update(p.prompt_logprobs)
        failed.update(p.failed)
    return StepResult([rid for p in parts for rid in p.request_ids], cat("token_ids"),
                      cat("logprobs"), cat("top_logprob_ids"), cat("top_logprobs"), cat("ranks"),
                      prompt, failed)
