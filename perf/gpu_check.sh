#!/usr/bin/env bash
# One command for a GPU machine: environment, GPU test tier, a quick tuning table, every perf suite
# (--quick) with that table installed, plots.
#
#   bash perf/gpu_check.sh [OUTDIR]        # from anywhere; it runs from the repository root
#
# Needs only what the GPU machine has: python with torch + triton (+ pytest; matplotlib for the plots).
# Nothing is installed; the repository is put on PYTHONPATH. Steps:
#   env            nvidia-smi summary and versions (python -m perf.harness env)
#   gpu-tests      python -m pytest tests -n 8 -q, with TRITON_INTERPRET unset and
#                  SPARSE_TRITON_GPU_TESTS=1: the whole test suite on CUDA, compiled, plus the gpu-marked
#                  tests (bf16, every config, CUDA graphs)
#   tune           python -m autotune.regenerate --quick --budget-s ... --out OUTDIR/tuned/<slug>.json
#                  (resuming from sparse_triton/tuning/tuned/<slug>.json when the checkout ships one)
#   install-table  that table -> sparse_triton/tuning/tuned/<slug>.json in this working copy, so the perf
#                  suites below run with it (the working copy is changed; do not commit it blindly)
#   perf:<name>    python -m perf.suites.<name> --quick --budget-s ..., for every perf/suites/*.py
#   plot           python perf/plot.py perf/results/<gpu-slug>
#   copy           perf/results/<gpu-slug>/ -> OUTDIR/results/ (when OUTDIR is given)
# OUTDIR (default: a new temporary directory) gets logs/ as the steps run, tuned/<slug>.json, user-cache/
# (SPARSE_TRITON_CACHE_DIR for the whole run: what the suites tuned on first use; the user's own cache is
# never read, so a run depends only on the checkout) and results/<gpu-slug>/.
# Every step runs under `timeout` and the whole run stays inside GPU_CHECK_BUDGET_S (default 540 s); a
# failing step does not stop the next one, but the exit status is non-zero if any step failed. The last
# lines printed are one summary line per step.
#
# Knobs (environment): PYTHON, GPU_CHECK_BUDGET_S, GPU_CHECK_TESTS_TIMEOUT_S, GPU_CHECK_TUNE_TIMEOUT_S,
# GPU_CHECK_PERF_MIN_S, GPU_CHECK_SUITE_TIMEOUT_S, GPU_CHECK_PLOT_TIMEOUT_S, SPARSE_TRITON_GIT_COMMIT
# (recorded as the commit when there is no .git).

set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUTDIR=${1:-}
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
ENV_TIMEOUT_S=60
TESTS_TIMEOUT_S=${GPU_CHECK_TESTS_TIMEOUT_S:-300}
TUNE_TIMEOUT_S=${GPU_CHECK_TUNE_TIMEOUT_S:-150}
PERF_MIN_S=${GPU_CHECK_PERF_MIN_S:-150}   # kept back for the perf suites while the tuning step runs
SUITE_TIMEOUT_S=${GPU_CHECK_SUITE_TIMEOUT_S:-260}
PLOT_TIMEOUT_S=${GPU_CHECK_PLOT_TIMEOUT_S:-60}
RESERVE_S=45          # kept back for plot + copy while earlier steps run
SUITE_MARGIN_S=35     # a suite's --budget-s is its timeout minus this (start-up, last case, final write)
TUNE_MARGIN_S=25      # the tuning step's --budget-s is its timeout minus this (start-up, last key)

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export SPARSE_TRITON_GPU_TESTS=1
unset TRITON_INTERPRET

START=$(date +%s)
if [[ -n $OUTDIR ]]; then
    mkdir -p "$OUTDIR" || exit 2
    OUTROOT=$(cd "$OUTDIR" && pwd)
else
    OUTROOT=$(mktemp -d "${TMPDIR:-/tmp}/sparse_triton_gpu_check.XXXXXX") || exit 2
fi
LOGDIR=$OUTROOT/logs
mkdir -p "$LOGDIR" "$OUTROOT/tuned" "$OUTROOT/user-cache" || exit 2
# A fresh user cache: the suites see the shipped table (and what they tune on first use), nothing older.
export SPARSE_TRITON_CACHE_DIR=$OUTROOT/user-cache

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

# --- (c) a quick tuning table for this GPU, installed into the working copy for the suites ----------
# Resume from the table the checkout ships (its keys are kept, not re-timed), unless that table came from
# --quick runs only: then it is a leftover of an earlier gpu_check, possibly of other code, and is redone.
TSLUG=$("$PY" -c 'import torch; from sparse_triton.tuning import gpu_slug
print(gpu_slug(torch.cuda.get_device_name()))' 2>/dev/null) || TSLUG=""
if [[ -z $TSLUG ]]; then
    STEPS=$((STEPS + 2)); FAILED=$((FAILED + 2))
    record tune FAIL 0 "no CUDA device name (torch.cuda.get_device_name failed)"
    record install-table FAIL 0 "no table"
else
    TABLE="$OUTROOT/tuned/$TSLUG.json"
    SHIPPED="sparse_triton/tuning/tuned/$TSLUG.json"
    RESUME=()
    if [[ -f $SHIPPED ]] && "$PY" -c 'import json, sys
meta = json.load(open(sys.argv[1])).get("meta") or {}
sys.exit(1 if (meta.get("campaign") or {}).get("quick") else 0)' "$SHIPPED" 2>/dev/null; then
        RESUME=(--resume "$SHIPPED")
    fi
    t=$(step_timeout "$TUNE_TIMEOUT_S" $(( RESERVE_S + PERF_MIN_S )))
    TUNE_BUDGET_S=$(( t > TUNE_MARGIN_S ? t - TUNE_MARGIN_S : 1 ))
    run_step tune "$t" "$PY" -m autotune.regenerate --quick --budget-s "$TUNE_BUDGET_S" --out "$TABLE" \
        ${RESUME[@]+"${RESUME[@]}"}
    # A table cut short by the budget or a timeout is still valid: it is rewritten atomically per key.
    STEPS=$((STEPS + 1))
    if [[ -s $TABLE ]] && mkdir -p "$(dirname "$SHIPPED")" && cp "$TABLE" "$SHIPPED"; then
        keys=$("$PY" -c 'import json, sys
print(sum(len(v) for v in json.load(open(sys.argv[1]))["entries"].values()))' "$TABLE" 2>/dev/null) || keys="?"
        record install-table OK 0 "$keys keys: $TABLE -> $SHIPPED"
    else
        FAILED=$((FAILED + 1))
        record install-table FAIL 0 "no table at $TABLE; the suites tune on first use"
    fi
fi

# --- (d) perf suites, --quick; the time left is shared among the suites not yet run -----------------
# Every perf/suites/<name>.py but _*.py: act_sparse, attention, nm_linear (alphabetical). A suite tunes the keys
# the table lacks on first use, inside its share (outside its timings; act_sparse's ops may have no table keys).
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

# --- (e) plots -------------------------------------------------------------------------------------
if [[ ! -d $RESULTS ]]; then
    STEPS=$((STEPS + 1)); FAILED=$((FAILED + 1))
    record plot FAIL 0 "no results in $RESULTS"
elif ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    STEPS=$((STEPS + 1))
    record plot SKIPPED 0 "matplotlib not installed; run perf/plot.py on the copied JSON elsewhere"
else
    run_step plot "$(step_timeout "$PLOT_TIMEOUT_S" 5)" "$PY" perf/plot.py "$RESULTS"
fi

# --- (f) copy results (logs, the table and the user cache are already under OUTDIR) ----------------
if [[ -n $OUTDIR ]]; then
    STEPS=$((STEPS + 1))
    if [[ -d $RESULTS ]] && mkdir -p "$OUTROOT/results" && cp -r "$RESULTS" "$OUTROOT/results/"; then
        record copy OK 0 "$RESULTS -> $OUTROOT/results/$SLUG, logs in $LOGDIR"
    else
        FAILED=$((FAILED + 1))
        record copy FAIL 0 "could not copy $RESULTS to $OUTROOT/results/"
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
