#!/usr/bin/env bash
# bench/gpu_paper.sh [--cpu-smoke] [--assets DIR] [--state DIR] [--out DIR] [--deadline-s S] [--max-steps N]
# Issue 36 item 5, prepared for a lent GPU machine: see bench/gpu_bench.py (the driver) and README "Devices".
# zsq runs from this checkout (PYTHONPATH=src, no pip install); the assets come from --assets or ZSQ_HOME
# (default gpu_assets/), the resumable state lives in gpu_state/, the summary goes to $OUT/gpu_paper.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_bench.py paper "$@"
