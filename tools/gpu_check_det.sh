#!/usr/bin/env bash
# GPU check of the `det` branch (issue 11, "the deterministic mode is kept"): deterministic=True
# on the Hopper backward runs dK/dV on the wgmma kernel's _nodq entries (flash_bwd_sm90.cu,
# DQ = false) and dq on flash_bwd.cu's deterministic dq kernel. Needs a compute capability 9.0
# GPU. Logs under $OUT/det/ (or a temp dir).
#   bash tools/gpu_check_det.sh tests   the kernels built in parallel (disk caches), then the
#                                       -k det tests of tests/gpu/test_gpu_sm90_bwd.py: float64
#                                       oracle, dq / dk / dv bitwise equal across runs, dk / dv
#                                       bitwise equal to the non-deterministic wgmma entry's, dq
#                                       to cupy.sm80's deterministic dq, the route, GQA / MQA,
#                                       Sq != Sk, rows without keys, windows, score mods, block
#                                       masks, fp16 / bf16, D 64 / 128; the wgmma dq kernel
#                                       (dq_kernel="wgmma": oracle, repeats) (< 90 s)
#   bash tools/gpu_check_det.sh bench   deterministic backward, fp16 / bf16, D 128 / 64,
#                                       S = 4096: new route (and with the wgmma dq kernel) vs
#                                       old (cupy.sm80) vs the non-deterministic wgmma backward
#                                       vs torch SDPA, each checked first; kernel times alone;
#                                       markdown table last (< 90 s)
#   bash tools/gpu_check_det.sh san     compute-sanitizer memcheck, then racecheck, on one tiny
#                                       deterministic backward per _nodq entry kind and the
#                                       wgmma dq kernel at D 64 / 128 (< 60 s)
# Without an argument: all three in that order.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/det"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
what="${1:-all}"
RC=0

precompile() {
    echo "== det: kernels (log: $LOG/precompile.log)"
    timeout "$1" $PY tools/gpu_det_bench.py --precompile > "$LOG/precompile.log" 2>&1
    T=$?
    echo "precompile rc=$T (124 = cut at $1 s: the rest compiles on first use)"
    tail -n 2 "$LOG/precompile.log"
}

run_tests() {
    precompile 35
    XDIST=""
    if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
    # Two runs, so that a failure of the opt-in wgmma dq kernel cannot hide the default route's
    # results (-x). A byte count that the copies never deliver would hang a kernel on its full
    # barrier: the timeout ends the process (and with it the context).
    for part in "route:(det and not wgmma) or auto_takes:32" "wgmma-dq:det_wgmma:20"; do
        name=${part%%:*}; rest=${part#*:}; sel=${rest%:*}; cap=${rest##*:}
        echo "== det: pytest tests/gpu/test_gpu_sm90_bwd.py -k '$sel' (log: $LOG/pytest_$name.log)"
        timeout "$cap" $PY -m pytest -m gpu -q -x -p no:cacheprovider $XDIST -rs --tb=short \
            tests/gpu/test_gpu_sm90_bwd.py -k "$sel" > "$LOG/pytest_$name.log" 2>&1
        T=$?
        grep -E "^(FAILED|ERROR)|Error|error:" "$LOG/pytest_$name.log" | cut -c1-400 | head -16
        tail -n 3 "$LOG/pytest_$name.log"
        echo "det tests ($name) rc=$T (124 = cut at $cap s: run again, the kernels are cached)"
        RC=$(( RC || T ))
    done
}

run_bench() {
    precompile 25
    echo "== det: benchmark (log: $LOG/bench.log, table: $LOG/bench.md)"
    timeout 60 $PY tools/gpu_det_bench.py --budget 42 > "$LOG/bench.md" 2> "$LOG/bench.log"
    T=$?
    tail -n 12 "$LOG/bench.log"
    echo "det bench rc=$T (124 = cut at 60 s)"
    cat "$LOG/bench.md"
    RC=$(( RC || T ))
}

run_san() {
    echo "== det: compute-sanitizer (logs: $LOG/san_*.log)"
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    if [ -z "$SAN" ]; then
        echo "compute-sanitizer not found"
        RC=1
        return
    fi
    # Once without the sanitizer: the cubins and NVRTC modules land in the disk caches.
    precompile 15
    timeout 10 $PY tools/gpu_det_bench.py --san > "$LOG/san_warm.log" 2>&1
    echo "warm-up rc=$? $(grep -c 'finite=True' "$LOG/san_warm.log")/8 finite"
    for tool in memcheck racecheck; do
        timeout 17 "$SAN" --tool "$tool" --print-limit 20 $PY tools/gpu_det_bench.py --san \
            > "$LOG/san_$tool.log" 2>&1
        T=$?
        grep -E "finite=False|ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san_$tool.log" | head -8
        echo "det san $tool rc=$T (124 = cut at 17 s)"
        RC=$(( RC || T ))
    done
}

case "$what" in
    tests) run_tests ;;
    bench) run_bench ;;
    san) run_san ;;
    all) run_tests; run_san; run_bench ;;
    *) echo "usage: $0 [tests|bench|san]"; exit 2 ;;
esac
exit $RC
