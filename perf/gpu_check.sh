#!/usr/bin/env bash
# One command for a GPU machine: environment, GPU test tier, every perf suite (--quick), plots.
#
#   bash perf/gpu_check.sh [OUTDIR]        # from anywhere; it runs from the repository root
#
# Needs only what the GPU machine has: python with torch + triton (+ pytest; matplotlib for the plots).
# Nothing is installed; the repository is put on PYTHONPATH. Steps:
#   env          nvidia-smi summary and versions (python -m perf.harness env)
#   gpu-tests    python -m pytest tests -n 8 -q, with TRITON_INTERPRET unset and
#                SPARSE_TRITON_GPU_TESTS=1: the whole test suite on CUDA, compiled, plus the gpu-marked
#                tests (bf16, every config, CUDA graphs)
#   perf:<name>  python -m perf.suites.<name> --quick --budget-s ..., for every perf/suites/*.py
#   plot         python perf/plot.py perf/results/<gpu-slug>
#   copy         perf/results/<gpu-slug>/ -> OUTDIR/results/, logs are in OUTDIR/logs/ (when OUTDIR given)
# Every step runs under `timeout` and the whole run stays inside GPU_CHECK_BUDGET_S (default 540 s); a
# failing step does not stop the next one, but the exit status is non-zero if any step failed. The last
# lines printed are one summary line per step.
#
# Knobs (environment): PYTHON, GPU_CHECK_BUDGET_S, GPU_CHECK_TESTS_TIMEOUT_S, GPU_CHECK_SUITE_TIMEOUT_S,
# GPU_CHECK_PLOT_TIMEOUT_S, SPARSE_TRITON_GIT_COMMIT (recorded as the commit when there is no .git).

set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUTDIR=${1:-}
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
ENV_TIMEOUT_S=60
TESTS_TIMEOUT_S=${GPU_CHECK_TESTS_TIMEOUT_S:-300}
SUITE_TIMEOUT_S=${GPU_CHECK_SUITE_TIMEOUT_S:-260}
PLOT_TIMEOUT_S=${GPU_CHECK_PLOT_TIMEOUT_S:-60}
RESERVE_S=45          # kept back for plot + copy while earlier steps run
SUITE_MARGIN_S=35     # a suite's --budget-s is its timeout minus this (start-up, last case, final write)

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export SPARSE_TRITON_GPU_TESTS=1
unset TRITON_INTERPRET

START=$(date +%s)
if [[ -n $OUTDIR ]]; then
    mkdir -p "$OUTDIR/logs" || exit 2
    LOGDIR=$(cd "$OUTDIR/logs" && pwd)
else
    LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/sparse_triton_gpu_check.XXXXXX") || exit 2
fi

SUMMARY=()
FAILED=0
STEPS=0

elapsed() { echo $(( $(date +%s) - START )); }

# step_timeout WANTED [RESERVE]: WANTED seconds, capped by what the budget has left after RESERVE.
step_timeout() {
    local want=$1 reserve=${2:-0} left
    left=$(( BUDGET_S - $(elapsed) - reserve ))
    (( left < want )) && want=$left
    echo "$want"
}

record() {  # record NAME STATUS SECONDS DETAIL
    SUMMARY+=("$(printf 'gpu_check: %-22s %-8s %4ss  %s' "$1" "$2" "$3" "$4")")
}

# run_step NAME TIMEOUT CMD...: run CMD under timeout, output to the terminal and LOGDIR/NAME.log.
run_step() {
    local name=$1 t=$2 t0 rc status detail
    shift 2
    STEPS=$((STEPS + 1))
    if (( t < 10 )); then
        record "$name" SKIPPED 0 "no time left in the ${BUDGET_S}s budget"
        FAILED=$((FAILED + 1))
        return
    fi
    echo
    echo "=== $name (timeout ${t}s, at $(elapsed)s): $*"
    t0=$(date +%s)
    timeout --kill-after=15 "$t" "$@" 2>&1 | tee "$LOGDIR/${name//[:\/]/_}.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=OK; detail="" ;;
        124|137) status=TIMEOUT; detail="killed after ${t}s" ;;
        *) status=FAIL; detail="exit $rc" ;;
    esac
    if [[ $name == gpu-tests && $rc == 5 ]]; then
        detail="exit 5: no tests collected"
    fi
    [[ $status == OK ]] || FAILED=$((FAILED + 1))
    record "$name" "$status" $(( $(date +%s) - t0 )) "$detail"
}

# --- (a) environment -------------------------------------------------------------------------------
ENV_SCRIPT='
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,utilization.gpu --format=csv
else
    echo "nvidia-smi: not found"
fi
'"$PY"' -m perf.harness env
'"$PY"' -c "import torch, sys; ok = torch.cuda.is_available(); print(\"torch.cuda.is_available():\", ok); sys.exit(0 if ok else 1)"
'
run_step env "$(step_timeout "$ENV_TIMEOUT_S" "$RESERVE_S")" bash -c "$ENV_SCRIPT"
SLUG=$("$PY" -m perf.harness slug 2>/dev/null) || SLUG=no-gpu
RESULTS="perf/results/$SLUG"

# --- (b) GPU test tier -----------------------------------------------------------------------------
run_step gpu-tests "$(step_timeout "$TESTS_TIMEOUT_S" "$RESERVE_S")" \
    "$PY" -m pytest tests -q -p no:cacheprovider -n 8

# --- (c) perf suites, --quick; the time left is shared among the suites not yet run -----------------
SUITES=()
for f in perf/suites/*.py; do
    s=$(basename "$f" .py)
    [[ $s == __init__ || $s == _* ]] && continue
    SUITES+=("$s")
done
for i in "${!SUITES[@]}"; do
    s=${SUITES[$i]}
    left=$(( ${#SUITES[@]} - i ))
    share=$(( (BUDGET_S - $(elapsed) - RESERVE_S) / left ))
    t=$(step_timeout "$SUITE_TIMEOUT_S" "$RESERVE_S")
    (( share < t )) && t=$share
    run_step "perf:$s" "$t" "$PY" -m "perf.suites.$s" --quick --budget-s $(( t > SUITE_MARGIN_S ? t - SUITE_MARGIN_S : 1 ))
done

# --- (d) plots -------------------------------------------------------------------------------------
if [[ ! -d $RESULTS ]]; then
    STEPS=$((STEPS + 1)); FAILED=$((FAILED + 1))
    record plot FAIL 0 "no results in $RESULTS"
elif ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    STEPS=$((STEPS + 1))
    record plot SKIPPED 0 "matplotlib not installed; run perf/plot.py on the copied JSON elsewhere"
else
    run_step plot "$(step_timeout "$PLOT_TIMEOUT_S" 5)" "$PY" perf/plot.py "$RESULTS"
fi

# --- (e) copy results and logs ---------------------------------------------------------------------
if [[ -n $OUTDIR ]]; then
    STEPS=$((STEPS + 1))
    if [[ -d $RESULTS ]] && mkdir -p "$OUTDIR/results" && cp -r "$RESULTS" "$OUTDIR/results/"; then
        record copy OK 0 "$RESULTS -> $OUTDIR/results/$SLUG, logs in $LOGDIR"
    else
        FAILED=$((FAILED + 1))
        record copy FAIL 0 "could not copy $RESULTS to $OUTDIR/results/"
    fi
fi

echo
echo "=== gpu_check summary: $(elapsed)s of ${BUDGET_S}s, GPU '$SLUG', results $RESULTS, logs $LOGDIR"
printf '%s\n' "${SUMMARY[@]}"
if (( FAILED > 0 )); then
    echo "gpu_check: FAIL ($FAILED of $STEPS steps did not pass)"
    exit 1
fi
echo "gpu_check: PASS ($STEPS steps)"
