#!/usr/bin/env bash
# The bounded regression suite (CI runs it as `tox -e regression`): a few methods on the embedded default model,
# a seeded subset of each task, compared sample by sample with the committed baseline. Exit 1 names what regressed.
#   scripts/regression.sh          run the suite and compare with results/baselines/default-ci.json
#   scripts/regression.sh --save   run the suite and rewrite that baseline (commit it with the change that moved it)
# REGRESSION_OUTPUT sets the run's folder (default: a fresh temporary folder, so nothing is reused).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${REGRESSION_OUTPUT:-$(mktemp -d)/suite}
BASELINE=results/baselines/default-ci.json
mkdir -p "$(dirname "$OUT")"
python -m qvlm_harness run --model default --methods fp32,rtn --bits w8a8,w4a4 --tasks sqa,vqav2,hm \
    --limit 32 --seed 0 --threads 2 --output "$OUT" --no-progress > "$OUT.tables.md"
echo "suite run: tables in $OUT.tables.md, store $OUT/harness.db"
if [[ "${1:-}" == "--save" ]]; then
    python -m qvlm_harness compare --output "$OUT" --save-baseline "$BASELINE"
else
    python -m qvlm_harness compare --output "$OUT" --baseline "$BASELINE" --json "$OUT/compare.json"
fi
