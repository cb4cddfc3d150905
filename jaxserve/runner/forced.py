"""Teacher forcing (jaxserve.eval): a step whose "sampled" tokens are given, scored by their
cross-entropy under the step's logits instead of sampled."""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.runner.batch import StepResult
from jaxserve.sampling import SamplingParams
from jaxserve.sched import SchedulerOutput


def execute_forced(runner, out: SchedulerOutput, params_of: dict[str, SamplingParams],
                   next_tokens: dict[str, int]) -> tuple[StepResult, dict[str, float]]:
    """Forward and cache write as in `ModelRunner.run`, then the cross-entropy (optax) of each
    request's given token. Returns the StepResult with those tokens (log-prob = -CE) and
    {request id: CE}. One process only; steps run in order."""
    import optax

    sched = out.scheduled
    if out.prefill_stage is not None:
        raise ValueError("teacher forcing runs with prefill_policy='chunked'")
    runner._swap(out)
    if not sched:
        return StepResult([], np.zeros(0, np.int32), np.zeros(0, np.float32), None, None, None), {}
    inputs, _, failed = runner.prepare(out, params_of)
    if failed:
        raise ValueError(f"the step's inputs could not be built: {failed}")
    keep = [i for i, s in enumerate(sched) if s.samples_token]
    targets = np.zeros(len(inputs.logits_indices), np.int32)  # one per logit row
    targets[keep] = [next_tokens[sched[i].request_id] for i in keep]
    b = inputs.bucket
    ids, md, li, t = runner._put((inputs.token_ids, inputs.md, inputs.logits_indices, targets))
    logits, new_kv, _ = runner._forward(b, ids, md, li, inputs.selection)
    runner._write_kv(b, new_kv, md.slot_mapping)
    ce_program = jax.jit(optax.losses.softmax_cross_entropy_with_integer_labels,
                         out_shardings=runner._replicated)
    ce = np.asarray(runner._program(("cross_entropy", len(targets)), ce_program, logits, t)(
        logits, t))[keep]
    rids = [sched[i].request_id for i in keep]
    return StepResult(rids, targets[keep], -ce, None, None, None), dict(zip(rids, ce.tolist()))
