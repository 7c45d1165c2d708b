#!/usr/bin/env bash
# The throughput/memory benchmark (issue 5) with the venv's Python; options go to `python -m disttrain.bench`.
#   scripts/bench.sh                              default preset: MLP 784-1024-1024-10, global batch 512
#   scripts/bench.sh --preset small --json runs/bench-small.json
#   scripts/bench.sh --systems disttrain-zero1,numpy --ranks 2 --profile runs/profile
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m disttrain.bench "$@"
