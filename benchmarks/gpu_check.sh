#!/usr/bin/env bash
# One GPU check, offline, within 10 minutes: install carried wheels, kernel correctness on CUDA, the kernel
# benchmark, the training throughput benchmark; prints a short table and leaves the results in $OUT.
#
#   bash benchmarks/gpu_check.sh fetch      # on a machine with network: wheels of benchmarks/wheels.txt -> .whl/
#   bash benchmarks/gpu_check.sh            # on the GPU machine (no network), from the repository root
#   CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # the same steps at small sizes on the CPU (Triton
#                                                   # interpreted, tiny model): checks the script, not the GPU
#
# Steps (each under `timeout`, all under GPU_CHECK_BUDGET seconds; a step that no longer fits is reported
# "not run (time)"):
#   install       pip install --no-index --no-deps --target $SITE $WHEELS/*.whl  (skipped if $WHEELS is empty)
#   imports       torch, triton, mvptr_ds.kernels import; on cuda, torch must see the GPU
#   imports_training  deepspeed, mvptr_ds.run import (needed by the throughput runs only)
#   kernel_tests  cuda: pytest -m gpu tests/kernels/test_kernels_gpu.py; cpu: a few interpreted parity tests
#   kernel_bench  python benchmarks/kernels.py --device $CHECK_DEVICE --out $RESULTS/kernels_<device>.json
#   throughput:*  python benchmarks/throughput.py --device cuda --model base --stage 2 --precision bf16
#                 --micro_batch MB [--baseline authors] --out <dir>, for each entry of THROUGHPUT_RUNS
#                 ("MB" or "MB:authors"), each into its own folder; "missing" if there is no benchmarks/throughput.py.
#                 A "MB:authors" run measures this project's step and the authors-style baseline in one process
#                 (both figures and their ratio), so the default runs are 32:authors 64:authors 128:authors.
#   authors_step  the authors' own code as the baseline: python $PEER/authors_step.py $PEER/mvp_pytorch
#                 $AUTHORS_STEP_ARGS, their pre-training step (forward + backward + AdamW) timed on the CPU with
#                 THREADS=${OMP_NUM_THREADS:-$(nproc)}, in its own process (it imports a vendored package named
#                 transformers; needs six, boto3, anytree). "skipped" when $PEER/authors_step.py is absent.
#
# Environment: CHECK_DEVICE (cuda), PYTHON (python3), WHEELS (.whl), SITE (/tmp/gpu_check_site),
# GPU_CHECK_BUDGET (570 s), OUT (results folder; default runs/gpu_check), THROUGHPUT_RUNS, THROUGHPUT_ARGS
# (extra arguments for every throughput run), KERNEL_BENCH_ARGS (extra arguments for kernels.py, e.g.
# "--only attention"), PEER (../shared/peer), AUTHORS_STEP_ARGS ("BATCH STEPS [HIDDEN LAYERS HEADS]";
# cuda: "8 3", base size; cpu: "2 1 128 4 4"), TARGET_PY (3.12, for fetch).
# Results: gpu_check.log (everything), summary.md (the table), kernels_<device>.json, throughput.tar.gz
# (the throughput benchmark's own output folder), authors_step.txt (the authors' median step time).
# Exit status 0 only if every step ran and passed.
# To report them: copy the result JSONs into benchmarks/results/runs/<date>_<commit>_<device>/ and name that
# folder in a note of benchmarks/notes/ (benchmarks/README.md), then python benchmarks/report.py --all.
#
# Through the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}

fetch() {
    mkdir -p "$WHEELS"
    local reqs ds
    reqs=$(sed 's/#.*//' benchmarks/wheels.txt | grep -v '^deepspeed' | tr -s ' \n' ' ')
    ds=$(sed 's/#.*//' benchmarks/wheels.txt | grep '^deepspeed' | tr -d ' ')
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${TARGET_PY:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" $reqs || return 1
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$WHEELS" "$ds" || return 1
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

case "${1:-}" in
    fetch) fetch; exit $? ;;
    "") ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected nothing, 'fetch' or --help)" >&2; exit 2 ;;
esac

DEV=${CHECK_DEVICE:-cuda}
if [[ "$DEV" != cuda && "$DEV" != cpu ]]; then
    echo "gpu_check.sh: CHECK_DEVICE must be cuda or cpu, got '$DEV'" >&2
    exit 2
fi
BUDGET=${GPU_CHECK_BUDGET:-570}
RESULTS=${OUT:-runs/gpu_check}
SITE=${SITE:-/tmp/gpu_check_site}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
STEPS="$WORK/steps.tsv"
: > "$LOG"
: > "$STEPS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export DS_ACCELERATOR="$DEV"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton"
if [[ "$DEV" == cpu ]]; then
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    THROUGHPUT_RUNS=${THROUGHPUT_RUNS:-"2:authors"}
    THROUGHPUT_BASE=(--device cpu --model tiny --stage 2 --precision fp32 --steps 2)
    AUTHORS_STEP_ARGS=${AUTHORS_STEP_ARGS:-"2 1 128 4 4"}
else
    THROUGHPUT_RUNS=${THROUGHPUT_RUNS:-"32:authors 64:authors 128:authors"}
    THROUGHPUT_BASE=(--device cuda --model base --stage 2 --precision bf16)
    AUTHORS_STEP_ARGS=${AUTHORS_STEP_ARGS:-"8 3"}
fi
PEER=${PEER:-../shared/peer}
read -r -a THROUGHPUT_EXTRA <<< "${THROUGHPUT_ARGS:-}"

# step NAME MAX_SECONDS COMMAND...: run under timeout, capped by what is left of the budget; record the result.
step() {
    local name=$1 max=$2 left status rc t0
    shift 2
    left=$((BUDGET - SECONDS))
    if (( left < 15 )); then
        printf '%s\tnot run (time)\t0\n' "$name" >> "$STEPS"
        return 1
    fi
    (( max > left )) && max=$left
    echo "=== $name (limit ${max}s): $*" | tee -a "$LOG"
    t0=$SECONDS
    timeout --kill-after=10 "$max" "$@" >> "$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timeout (${max}s)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$STEPS"
    echo "=== $name: $status in $((SECONDS - t0))s" | tee -a "$LOG"
    return $rc
}

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} )); then
    step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE:$PYTHONPATH"
else
    printf 'install\tskipped (no wheels in %s)\t0\n' "$WHEELS" >> "$STEPS"
fi

step imports 60 "$PY" - "$DEV" <<'EOF'
import sys
import torch, triton  # noqa: E401
import mvptr_ds.kernels  # noqa: F401
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("CHECK_DEVICE=cuda but torch sees no GPU")
    print(torch.cuda.get_device_name(), torch.version.cuda)
EOF
imports_ok=$?
# What the throughput runs need on top (the carried wheels); the kernel steps do not depend on it.
step imports_training 60 "$PY" -c "import deepspeed, mvptr_ds.run; print('deepspeed', deepspeed.__version__)"
training_ok=$?

if (( imports_ok == 0 )); then
    if [[ "$DEV" == cuda ]]; then
        step kernel_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_kernels_gpu.py
    else
        step kernel_tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_gpu.py tests/kernels/test_kernels.py \
            -k "gpu or fp32_matches_float64_reference or auto_is_fused"
    fi
    read -r -a bench_args <<< "${KERNEL_BENCH_ARGS:-}"
    bench_args+=(--device "$DEV" --out "$RESULTS/kernels_$DEV.json")
    [[ "$DEV" == cpu ]] && bench_args+=(--reps 1)
    step kernel_bench 180 "$PY" benchmarks/kernels.py "${bench_args[@]}"
else
    printf 'kernel_tests, kernel_bench\tnot run (imports failed)\t0\n' >> "$STEPS"
fi
for run in $THROUGHPUT_RUNS; do
    mb=${run%%:*}
    args=("${THROUGHPUT_BASE[@]}" --micro_batch "$mb" --out "$WORK/throughput/mb${run/:/_}"
          "${THROUGHPUT_EXTRA[@]}")
    [[ "$run" == *:authors ]] && args+=(--baseline authors)
    if [[ ! -f benchmarks/throughput.py ]]; then
        printf 'throughput:%s\tmissing (no benchmarks/throughput.py)\t0\n' "$run" >> "$STEPS"
    elif (( imports_ok != 0 || training_ok != 0 )); then
        printf 'throughput:%s\tnot run (imports failed)\t0\n' "$run" >> "$STEPS"
    else
        step "throughput:$run" 150 "$PY" benchmarks/throughput.py "${args[@]}"
    fi
done

# The authors' code itself (the MVPTR release beside this repository), timed by the peer's own script.
if [[ ! -f "$PEER/authors_step.py" ]]; then
    printf 'authors_step\tskipped (no %s)\t0\n' "$PEER/authors_step.py" >> "$STEPS"
    echo "=== authors_step: skipped, no $PEER/authors_step.py (the authors' code is not beside this repository)" \
        | tee -a "$LOG"
else
    read -r -a authors_args <<< "$AUTHORS_STEP_ARGS"
    if step authors_step 120 env THREADS="${OMP_NUM_THREADS:-$(nproc)}" "$PY" "$PEER/authors_step.py" \
        "$PEER/mvp_pytorch" "${authors_args[@]}"; then
        grep "^authors' step" "$LOG" | tail -n 1 | tee "$RESULTS/authors_step.txt"
    fi
fi

if [[ -d "$WORK/throughput" ]]; then
    tar czf "$RESULTS/throughput.tar.gz" -C "$WORK" throughput
fi
"$PY" benchmarks/gpu_check_summary.py --steps "$STEPS" --results "$RESULTS" --throughput "$WORK/throughput" \
    --device "$DEV" --seconds "$SECONDS" | tee "$RESULTS/summary.md"
# Exit 0 only if every step ran and passed (install may be skipped when nothing was carried).
awk -F'\t' '$2 != "ok" && $2 !~ /^skipped/ {bad = 1} END {exit bad}' "$STEPS"
status=$?
rm -rf "$WORK"
exit $status
