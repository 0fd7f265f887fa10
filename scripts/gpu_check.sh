#!/usr/bin/env bash
# scripts/gpu_check.sh OUTDIR: the whole GPU check, for the few minutes a GPU machine is available.
#
# Steps, each timed; OUTDIR/summary.json and OUTDIR/summary.md list per step ok/failed/skipped, seconds and what
# failed (the tail of its log, OUTDIR/logs/<step>.log); the failures are printed at the end and the exit code is
# non-zero when anything failed:
#   gpu        nvidia-smi lists a GPU ($GPU_CHECK_NVIDIA_SMI names the binary). None: the script says so and exits
#              0 before any other step (nothing is installed, nothing is run).
#   setup      scripts/setup.sh (the README's setup: .venv, torch==2.13.0 from constraints.txt) plus the bnb
#              extra; then, if .venv's torch is a CPU build (version +cpu, torch.version.cuda None: what an index
#              serving the CPU wheel installs), the same pinned version is reinstalled as a CUDA build:
#              `pip --isolated` (the machine's pip configuration, which may point at the CPU wheel, is ignored)
#              from $TORCH_INDEX_URL (default PyPI, whose Linux x86_64 torch==2.13.0 is the CUDA build and pulls
#              the nvidia-* runtime wheels, ~3 GB). A driver older than that CUDA needs e.g.
#              TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (nvidia-smi prints the driver's CUDA). The
#              constraint `torch==2.13.0` admits both builds, so a later setup.sh keeps the CUDA one.
#   torch      torch.cuda.is_available() in .venv, the device's name and compute capability.
#   model      the embedded default model built once into ~/.cache/qvlm-harness (`harness models build-default`).
#   tests      the `cuda` tests (`pytest -m cuda`: packed-vs-fake per packed method, integer GEMMs vs an int32
#              reference, every method's device placement, bitsandbytes NF4, bf16 vs fp32).
#   run-<m>    one `harness run` per method at w4a16,w8a8,w4a4 (fp32,bf16 together: fixed precision) on the
#              default model, --limit 64 --device cuda --execution packed, ScienceQA by option log-likelihood,
#              8 calibration samples, the regression suite's search budgets; one store, OUTDIR/runs/harness.db.
#   bench      `harness bench --device cuda` (fp32, bf16, rtn at w8a8 and w4a16; batch 1 and 8; 3 rounds).
#
# Sizing (one modern GPU, e.g. A100/L4; the model is ~160M parameters, a prompt ~150 tokens with a 112-px image):
#   runs:  64 samples x 26 cells (9 quantizing methods x 3 bits, minus the 4-bit-only ones' W8A8, + fp32, bf16)
#          x ~15 ms per loglik sample (one batched forward and host-side encoding) ~= 25 s of evaluation;
#          searches at the suite's budgets (awq n_grid 5, qvlm iters 2, aespa 10 steps on q/k/v; GPTQ's column loop
#          on the host) ~= 5 s per cell on a GPU ~= 120 s; process start + model load ~8 s x 10 runs
#          ~= 80 s. About 230 s; capped at 75 s per run, and the runs stop where only bench's 60 s are left.
#   tests: 68 tiny-model cases at ~1 s ~= 70 s (cap 150 s).  bench: 4 variants x 2 batch sizes x 4 generations x
#          16 tokens x ~15 ms ~= 8 s + loads and quantization (cap 90 s).  model build ~30 s (cap 120 s).
#   So ~6 minutes with a ready .venv; a fresh one adds the downloads (setup cap 240 s). GPU_CHECK_BUDGET_S
#   (default 470 s) bounds the whole script: a step starts only within it and is cut at what remains, and steps
#   that no longer fit are marked failed ("time budget exhausted"); rerun then: setup is idempotent.
# GPU_CHECK_DRY_RUN=1 runs the plumbing only: every step after `gpu` logs the command it would run, none runs.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [[ $# -ne 1 ]]; then
    echo "usage: scripts/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT/logs" || { echo "error: cannot create $OUT; pass a writable folder" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
BENCH_RESERVE_S=60
NVIDIA_SMI=${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}
export TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
STEPS="$OUT/steps.tsv"
: > "$STEPS"
START=$SECONDS

# record NAME STATUS SECONDS DETAIL
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-600)" >> "$STEPS"; }

write_summary() {
    python3 - "$STEPS" "$OUT" "$1" <<'PY'
import json, sys
from pathlib import Path
steps_file, out, verdict = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
steps = []
for line in Path(steps_file).read_text().splitlines():
    name, status, seconds, detail = (line.split("\t") + ["", "", ""])[:4]
    steps.append({"step": name, "status": status, "seconds": float(seconds or 0), "detail": detail})
failed = [s for s in steps if s["status"] == "failed"]
summary = {"verdict": verdict, "failed": [s["step"] for s in failed], "steps": steps,
           "seconds": round(sum(s["seconds"] for s in steps), 1)}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
rows = ["| step | status | seconds | what failed / notes |", "|---|---|---|---|"]
rows += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['detail'].replace('|', '/')} |" for s in steps]
(out / "summary.md").write_text(f"# GPU check: {verdict}\n\n" + "\n".join(rows) + "\n")
PY
}

# step NAME CAP_SECONDS CMD...: run CMD with the smaller of CAP and the budget left, log to logs/NAME.log
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left <= 5)); then
        record "$name" failed 0 "not run: time budget exhausted (GPU_CHECK_BUDGET_S=$BUDGET)"
        echo "gpu_check: $name not run (time budget exhausted)"
        return 1
    fi
    ((cap > left)) && cap=$left
    local log="$OUT/logs/$name.log" t0=$SECONDS
    echo "gpu_check: $name (at most ${cap}s) ..."
    if [[ -n "${GPU_CHECK_DRY_RUN:-}" ]]; then  # the plumbing only (tests/test_gpu_check.py): log what would run
        printf '%s ' "$@" > "$log"
        echo >> "$log"
    else
        timeout --signal=INT --kill-after=15 "$cap" "$@" > "$log" 2>&1
    fi
    local rc=$? took=$((SECONDS - t0))
    if ((rc == 0)); then
        record "$name" ok "$took" ""
        echo "gpu_check: $name ok (${took}s)"
        return 0
    fi
    local why
    if ((rc == 124)); then why="timed out after ${cap}s"; else why="exit $rc"; fi
    why="$why: $(grep -v '^\s*$' "$log" | tail -n 3 | tr '\n' ' ')"
    record "$name" failed "$took" "$why"
    echo "gpu_check: $name FAILED (${took}s): $why"
    return 1
}

# -- gpu: is there one at all? -----------------------------------------------------------------------------------
if ! gpus=$("$NVIDIA_SMI" -L 2>/dev/null) || ! grep -q "GPU" <<< "$gpus"; then
    record gpu absent 0 "no GPU present ($NVIDIA_SMI lists none); nothing else was run"
    write_summary "no GPU"
    echo "gpu_check: no GPU present ($NVIDIA_SMI lists no device): nothing to check on this machine; run it on one" \
         "with a CUDA GPU. Summary in $OUT/summary.md"
    exit 0
fi
record gpu ok 0 "$(head -n 1 <<< "$gpus")"
echo "gpu_check: $(head -n 1 <<< "$gpus")"

# -- setup ----------------------------------------------------------------------------------------------------------
setup() {
    set -e
    ./scripts/setup.sh
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[bnb]"
    local build
    build=$(.venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda)")
    echo "torch in .venv: $build"
    if [[ "$build" == *" None" ]]; then
        local version=${build%% *}
        version=${version%%+*}
        echo "CPU build of torch $version: reinstalling the same version as a CUDA build from $TORCH_INDEX_URL"
        .venv/bin/python -m pip uninstall --quiet -y torch
        .venv/bin/python -m pip --isolated install --quiet "torch==$version" --index-url "$TORCH_INDEX_URL"
        .venv/bin/python -c "import torch; print('torch now', torch.__version__, 'CUDA', torch.version.cuda)"
    fi
}
ok=true
step setup 240 bash -c "$(declare -f setup); setup" || ok=false
PY=$REPO/.venv/bin/python
HARNESS=$REPO/.venv/bin/harness
if $ok; then
    step torch 60 "$PY" -c "
import torch
assert torch.cuda.is_available(), f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU: driver too old for this CUDA build? set TORCH_INDEX_URL (see the script header)'
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
" || ok=false
fi

if $ok; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    step model 120 "$HARNESS" models build-default
    step tests 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
    RUN_ARGS=(--model default --tasks sqa --bits w4a16,w8a8,w4a4 --limit 64 --device cuda --execution packed
              --scoring loglik --calib-samples 8 --batch-size 16 --output "$OUT/runs" --no-progress
              --method-option awq.n_grid=5 --method-option awq.clip_tokens=128
              --method-option qvlm.iters=2 --method-option qvlm.ve_steps=2
              --method-option aespa.num_iters=10 --method-option aespa.clip_steps=10
              --method-option aespa.round_layers=qkv)
    runs_end=$((BUDGET - BENCH_RESERVE_S))  # the runs may use the budget up to what bench needs
    for methods in fp32,bf16 rtn awq gptq qlora zeroquant-v2 smoothquant qvlm qvlm-official aespa; do
        cap=$((runs_end - (SECONDS - START)))
        ((cap > 75)) && cap=75
        if ((cap <= 5)); then
            record "run-$methods" failed 0 "not run: the budget left is bench's (GPU_CHECK_BUDGET_S=$BUDGET)"
            continue
        fi
        step "run-$methods" "$cap" "$HARNESS" run --methods "$methods" "${RUN_ARGS[@]}"
    done
    step bench 90 "$HARNESS" bench --device cuda --model default --methods fp32,bf16,rtn --bits w8a8,w4a16 \
        --batch-sizes 1,8 --rounds 3 --new-tokens 16 --no-rss --output "$OUT/bench"
fi

failed=$(awk -F'\t' '$2 == "failed" {print $1}' "$STEPS" | tr '\n' ' ')
if [[ -n "$failed" ]]; then
    write_summary "failed: $failed"
    echo
    echo "gpu_check: FAILED steps: $failed"
    awk -F'\t' '$2 == "failed" {printf "  %s: %s\n", $1, $4}' "$STEPS"
    echo "summary: $OUT/summary.md, logs in $OUT/logs/"
    exit 1
fi
write_summary "ok"
echo "gpu_check: every step ok in $((SECONDS - START)) s; summary: $OUT/summary.md"
