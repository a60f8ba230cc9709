#!/usr/bin/env bash
# One command for a GPU window: bench/gpu_check.py (install, device tests, benchmarks, memory check).
#   bash bench/gpu_check.sh            # on a machine with one CUDA GPU, about 8 minutes
#   bash bench/gpu_check.sh --smoke    # tiny sizes on the CPU
# Arguments go to bench/gpu_check.py (--help lists them); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
