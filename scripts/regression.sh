#!/usr/bin/env bash
# The bounded regression suite (CI runs it as `tox -e regression`): every run configuration in
# results/baselines/suite/*.yaml on the embedded default model (`harness run --config`, one store), compared
# sample by sample with the committed baseline. Exit 1 names what regressed.
#   scripts/regression.sh          run the suite and compare with results/baselines/default-ci.json
#   scripts/regression.sh --save   run the suite and rewrite that baseline (commit it with the change that moved it)
# REGRESSION_OUTPUT sets the run's folder (default: a fresh temporary folder, so nothing is reused).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${REGRESSION_OUTPUT:-$(mktemp -d)/suite}
BASELINE=results/baselines/default-ci.json
mkdir -p "$(dirname "$OUT")"
for config in results/baselines/suite/*.yaml; do
    name=$(basename "$config" .yaml)
    start=$SECONDS
    python -m qvlm_harness run --config "$config" --output "$OUT" --no-progress > "$OUT.$name.md"
    echo "suite $name: $((SECONDS - start)) s, tables in $OUT.$name.md"
done
echo "store $OUT/harness.db"
if [[ "${1:-}" == "--save" ]]; then
    python -m qvlm_harness compare --output "$OUT" --save-baseline "$BASELINE"
else
    python -m qvlm_harness compare --output "$OUT" --baseline "$BASELINE" --json "$OUT/compare.json"
fi
