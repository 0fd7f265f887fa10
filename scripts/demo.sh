#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, build the embedded default model once (cached), then compare
# fp16 and round-to-nearest at W8A8 and W4A4 on the embedded ScienceQA sample set.
# Extra arguments are passed to `harness run` (e.g. ./scripts/demo.sh --limit 100).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
harness run --methods fp16,rtn --tasks sqa --bits w8a8,w4a4 "$@"
