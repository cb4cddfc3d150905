#!/usr/bin/env bash
# One command for a machine with one accelerator (GPU or TPU; no network needed, jaxserve's own
# dependencies installed): the attention kernel benchmark, then the engine's decode/prefill steps
# on a random-weight Llama-3-8B-shaped model against the device's measured bandwidth and FLOP/s,
# and the host<->device swap bandwidth. Under 8 minutes on an H200. On a CPU: --tiny.
#   bash benchmarks/device_check.sh [--tiny]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
tiny=()
if [[ "${1:-}" == "--tiny" ]]; then tiny=(--tiny); fi
echo "== attention kernels (benchmarks/kernels.py)"
timeout 240 python benchmarks/kernels.py "${tiny[@]}"
echo "== engine steps, limits, swap (benchmarks/device_check.py)"
timeout 300 python benchmarks/device_check.py "${tiny[@]}"
