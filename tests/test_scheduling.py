"""Scheduling seen from the engine (tiny random model): per-step records, policies, swap
preemption. The scheduler alone is tested against a fake runner in test_scheduler.py."""

import numpy as np
import pytest

from jaxserve.records import StepRecord
from jaxserve.sampling import SamplingParams

from tests.test_engine import prompts, run


def test_step_records_account_for_every_token(make_tiny_engine):
    ps = prompts(8, seed=1, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for pages, preempts in ((128, False), (14, True)):
        engine = make_tiny_engine(num_kv_pages=pages, record_steps=True)
        run(engine, ps, params)
        records = engine.step_records
        assert all(isinstance(r, StepRecord) for r in records)
        assert [r.step for r in records] == list(range(len(records)))
        assert all(b.start >= a.start + a.duration for a, b in zip(records, records[1:]))
        assert sum(len(r.preempted) for r in records) == engine.num_preemptions
        assert (engine.num_preemptions > 0) == preempts
        assert all(r.pages_device <= pages - 1 for r in records)
        last = records[-1]
        assert (last.num_running, last.num_waiting, last.pages_device) == (0, 0, 0)
        if not preempts:  # every output after the first is one decode; prompts prefill once
            assert sum(r.decode_tokens for r in records) == 8 * 39
            assert sum(r.prefill_tokens for r in records) == sum(map(len, ps))
            assert sum(r.num_decode for r in records) == 8 * 39


def test_step_records_off_by_default(make_tiny_engine):
    engine = make_tiny_engine()
    run(engine, prompts(1), SamplingParams(max_tokens=2))
    assert engine.step_records is None
