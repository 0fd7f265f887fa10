#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, build the embedded default model once (cached), then compare
# the bf16 baseline with round-to-nearest at W8A8 and W4A4 on the embedded ScienceQA test set (600 questions).
# bf16 is the CPU's fast float path (fp16 has no fast CPU kernels; use it on a GPU); the quantized rows run on the
# packed integer kernels, so their latency and memory are real.
# Extra arguments are passed to `harness run` (e.g. ./scripts/demo.sh --limit 100).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
harness run --methods bf16,rtn --tasks sqa --bits w8a8,w4a4 --execution packed --batch-size 16 "$@"
