"""StepRecord's text and HTML views, and the table of a run (no engine needed)."""

import subprocess
import sys

from jaxserve.records import StepRecord, StepRecords, records_html


def _record(step, **kw):
    fields = dict(step=step, start=float(step), duration=0.0125, num_decode=3, num_prefill=1,
                  decode_tokens=3, prefill_tokens=16, prefill_stage=None, num_running=4,
                  num_waiting=2, num_swapped=0, pages_device=10, pages_host=0, preempted=(),
                  swapped_out=0, swapped_in=0)
    return StepRecord(**{**fields, **kw})


def test_text_says_what_the_step_did():
    r = _record(7, prefill_stage=(1, 4), preempted=("a", "b"), swapped_out=5)
    s = str(r)
    assert s.startswith("step 7: 12.5 ms, decode 3 (3 tok), prefill 1 (16 tok) stage 2/4")
    assert "preempted=['a', 'b']" in s and "swap out/in=5/0" in s
    assert "swap out" not in str(_record(1)) and "preempted" not in str(_record(1))


def test_html_of_one_record_is_a_field_table():
    h = _record(3, pages_device=42, preempted=("x<y",))._repr_html_()
    assert "<th style='text-align:left'>pages dev</th><td>42</td>" in h
    assert "x&lt;y" in h  # request ids are escaped


def test_table_of_a_run_elides_the_middle_and_marks_preemptions():
    records = [_record(i, preempted=("r1",) if i == 2 else ()) for i in range(100)]
    h = records_html(records, max_rows=10)
    assert h.count("<tr") == 1 + 10 + 1  # header, 5 first + 5 last, the elision row
    assert "... 90 steps ..." in h
    assert h.count("background:#fde2c8") == 1  # step 2 preempted
    assert "<td>99</td>" in h and "<td>50</td>" not in h
    text = repr(StepRecords(records))
    assert text.startswith("StepRecords(100 steps)\n  step 0: ") and "\n  ... 94 steps ...\n  step 97:" in text
    run = StepRecords(records[:3])
    assert run._repr_html_().startswith("<div>3 steps</div>") and str(run).count("\n") == 2


def test_import_jaxserve_stays_light():
    code = ("import sys, jaxserve, jaxserve.records; "
            "print(sorted(m for m in ('jax', 'matplotlib', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
