#!/usr/bin/env bash
# The README's compute-optimal demo on the embedded default (no GPU, no Hub; about 3 minutes on 2
# CPU cores): a sweep of best-of-N and DVTS at n=8 and beam search at n=4 and 8 on 8 problems, then
# `ttc optimal` over it, then a compute_optimal run of the table it chose at n=8. Everything goes to
# a fresh tracking store in a temporary directory (printed), so it never mixes with other runs.
#   scripts/compute_optimal_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R="$PWD/recipes/SmolLM2-135M-Instruct"
WORK="${WORK:-$(mktemp -d)}"
echo "tracking store and artifacts: $WORK"
cd "$WORK"
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
COMMON="num_samples=8 max_tokens=48 system_prompt= experiment_name=co-demo"
STEPS="beam_width=2 num_iterations=3"
ttc run "$R/best_of_n.yaml" --overrides "$COMMON n=8" --no-progress
ttc run "$R/dvts.yaml" --overrides "$COMMON n=8 $STEPS" --no-progress
for n in 4 8; do ttc run "$R/beam_search.yaml" --overrides "$COMMON n=$n $STEPS" --no-progress; done
ttc optimal --experiment co-demo --output "$WORK/co-demo.png" | tee "$WORK/optimal.txt"
TABLE=$(grep -o 'table=[^ ]*' "$WORK/optimal.txt" | head -1 | cut -d= -f2)
ttc run "$R/compute_optimal.yaml" --overrides "$COMMON n=8 probe_n=2 optimal_table=$TABLE" --no-progress
ttc optimal --experiment co-demo --budget flops | tee "$WORK/optimal_flops.txt"
