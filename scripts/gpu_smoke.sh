#!/usr/bin/env bash
# GPU smoke test: best-of-N, beam search and DVTS on 10 MATH-500 problems with Llama-3.2-1B-Instruct
# and the RLHFlow PRM; prints accuracy, tokens/s and wall time per strategy. Without network or
# weights it falls back to random-weight models of the same architectures (throughput only).
#   scripts/gpu_smoke.sh                      # on a GPU machine (vLLM where installed)
#   scripts/gpu_smoke.sh --random-weights     # force the random-weights mode
#   scripts/gpu_smoke.sh --random-weights --tiny --device cpu --problems 2   # check the path on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
exec "$PYTHON" scripts/gpu_smoke.py "$@"
