# Shared pieces of the tools/gpu_check_*.sh scripts, sourced after they set NAME: the log folder
# ($OUT/$NAME, or a temp dir), capped steps that print their log's failure lines, tail and exit
# status (a kernel that hangs on a barrier ends with the cap), compute-sanitizer's two tools over
# a workload, and the tests | bench | san | all dispatch. Each script defines run_tests,
# run_bench and run_san with these, then calls gpu_main "$@"; its exit status is non-zero when a
# step failed or was cut.
# shellcheck shell=bash
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/$NAME"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
RC=0

# "-n N" when pytest-xdist is installed, else nothing.
xdist() {
    if $PY -c "import xdist" 2>/dev/null; then echo "-n $1"; fi
}

# gpu_step LABEL CAP LOGFILE COMMAND...: COMMAND with a cap, its output in LOGFILE.
gpu_step() {
    local label=$1 cap=$2 log=$3 rc
    shift 3
    echo "== $NAME: $label ($(date -u +%H:%M:%S), log: $log)"
    timeout "$cap" "$@" > "$log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|Error|error:" "$log" | cut -c1-400 | head -20
    tail -n "${TAIL:-3}" "$log"
    echo "$NAME $label rc=$rc (124 = cut at $cap s)"
    RC=$(( RC || rc ))
    return $rc
}

# gpu_pytest LABEL CAP PYTEST-ARGS...: pytest -m gpu (-x, -n, files and -k from the caller).
gpu_pytest() {
    local label=$1 cap=$2
    shift 2
    gpu_step "pytest $label" "$cap" "$LOG/pytest_$label.log" \
        $PY -m pytest -m gpu -q -p no:cacheprovider -rs --tb=short "$@"
}

# gpu_bench CAP COMMAND...: COMMAND prints the table on stdout ($LOG/bench.md), its progress on
# stderr ($LOG/bench.log); the table last.
gpu_bench() {
    local cap=$1 rc
    shift
    echo "== $NAME: benchmark ($(date -u +%H:%M:%S), log: $LOG/bench.log)"
    timeout "$cap" "$@" > "$LOG/bench.md" 2> "$LOG/bench.log"
    rc=$?
    tail -n "${TAIL:-14}" "$LOG/bench.log"
    echo "$NAME bench rc=$rc (124 = cut at $cap s)"
    cat "$LOG/bench.md"
    RC=$(( RC || rc ))
}

# gpu_san WARM-CAP CAP COMMAND...: COMMAND once without the sanitizer (the kernels land in the
# disk caches), then under memcheck and racecheck.
gpu_san() {
    local warm=$1 cap=$2 san tool rc
    shift 2
    echo "== $NAME: compute-sanitizer ($(date -u +%H:%M:%S), logs: $LOG/san_*.log)"
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    if [ -z "$san" ]; then
        echo "compute-sanitizer not found"
        RC=1
        return 1
    fi
    timeout "$warm" "$@" > "$LOG/san_warm.log" 2>&1
    echo "warm-up rc=$? ($(tr '\n' ' ' < "$LOG/san_warm.log" | tail -c 300))"
    for tool in memcheck racecheck; do
        timeout "$cap" "$san" --tool "$tool" --print-limit 20 "$@" > "$LOG/san_$tool.log" 2>&1
        rc=$?
        grep -E "finite=False|ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san_$tool.log" | head -8
        echo "$NAME san $tool rc=$rc (124 = cut at $cap s)"
        RC=$(( RC || rc ))
    done
}

gpu_main() {
    case "${1:-all}" in
        tests) run_tests ;;
        bench) run_bench ;;
        san) run_san ;;
        all) run_tests; run_san; run_bench ;;
        *) echo "usage: bash $0 [tests|bench|san]"; exit 2 ;;
    esac
    exit $RC
}
