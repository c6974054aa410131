#!/usr/bin/env bash
# Run the model-based write test (tests/test_write_model.py) again and again with new seeds
# until the time is up; prints the seed of every failure (rerun one with
# FUSEFS_MODEL_SEED=N FUSEFS_MODEL_SHRINK=1 to get the smallest failing sequence).
#   scripts/soak-writes.sh [MINUTES] [EXAMPLES_PER_RUN] [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-60}
examples=${2:-10}
steps=${3:-40}
end=$(( $(date +%s) + minutes * 60 ))
runs=0; failures=0; seed=${FUSEFS_MODEL_SEED:-$RANDOM$RANDOM}
log=$(mktemp -d)/soak
while [ "$(date +%s)" -lt "$end" ]; do
    seed=$(( seed + 1 ))
    runs=$(( runs + 1 ))
    if FUSEFS_MODEL_SEED=$seed FUSEFS_MODEL_EXAMPLES=$examples FUSEFS_MODEL_STEPS=$steps \
            .venv/bin/python -m pytest -q -x -p no:cacheprovider tests/test_write_model.py \
            > "$log.$seed" 2>&1; then
        rm -f "$log.$seed"
        echo "seed $seed: passed ($examples examples x $steps steps)"
    else
        failures=$(( failures + 1 ))
        echo "seed $seed: FAILED (output: $log.$seed)"
    fi
done
echo "$runs runs, $failures failed, $(( runs * examples * steps )) steps at most"
[ "$failures" -eq 0 ]
