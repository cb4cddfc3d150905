"""The device check (benchmarks/device_check.py) is run only on machines with an accelerator,
which the suite never sees: its --tiny mode runs here so that it does not rot unnoticed (an
engine change that broke it was found only by hand)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_runs_tiny():
    out = subprocess.run([sys.executable, "benchmarks/device_check.py", "--tiny"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("copy", "matmul", "decode B=1", "decode B=8", "prefill T=64", "swap out / in"):
        assert any(line.startswith(row) for line in out.stdout.splitlines()), (row, out.stdout)


@pytest.mark.slow
def test_step_trace_names_the_kernels():
    """benchmarks/step_trace.py names each C++ kernel call of the traced steps from the HLO
    (its target and weight shape): every projection and the attention get a row."""
    out = subprocess.run([sys.executable, "benchmarks/step_trace.py", "--batch", "4", "--steps", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"qkv", "o", "gate_up", "down", "attention"} <= rows, out.stdout
