#!/usr/bin/env bash
# GPU check of the `tf32wg` branch (issue 11, "fp32 at fp32 accuracy on tensor cores"): the
# 3xTF32 forward on Hopper's wgmma, flash_fwd_tf32x3_sm90.cu, entry cupy.tf32x3_sm90 -- written
# without a GPU and switched off (instances.TF32X3_SM90_ON) until this passes. Needs a compute
# capability 9.0 GPU. Logs under $OUT/tf32wg/ (or a temp dir).
#   bash tools/gpu_check_tf32wg.sh tests  tests/gpu/test_gpu_flash_tf32x3_sm90.py: the kernel's
#                                         forward against float64 at 1e-5 of max |out| (every
#                                         option, odd lengths, GQA, empty rows, S = 4096), plain
#                                         TF32 missing that bound, agreement with cupy.tf32x3,
#                                         the route with the switch on (< 90 s)
#   bash tools/gpu_check_tf32wg.sh bench  fp32 D = 64 S = 4096 (B = 4, H = 32), causal and not:
#                                         the new kernel (default and the experimental _ov
#                                         schedule) vs cupy.tf32x3 vs torch SDPA fp32 (TF32
#                                         off), each checked against float64 first; markdown
#                                         table last (< 90 s)
#   bash tools/gpu_check_tf32wg.sh san    compute-sanitizer memcheck, then racecheck, on four
#                                         tiny launches of each schedule (< 60 s)
# Without an argument: all three in that order. A kernel that hangs (an mbarrier phase that
# never completes) is ended by the timeouts.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/tf32wg"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
what="${1:-all}"
RC=0

run_tests() {
    echo "== tf32wg: tests/gpu/test_gpu_flash_tf32x3_sm90.py"
    XDIST=""
    if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
    # The sm_90a cubin is built once (NVRTC, disk cache) before the workers start.
    timeout 30 $PY -c "from xattn._backends.cupy_ import flash_tf32x3_sm90 as m; \
m.get_kernel(64); m.get_kernel(64, 64, True); print('compiled')" > "$LOG/compile.log" 2>&1
    echo "compile rc=$? $(tail -n 1 "$LOG/compile.log")"
    # Two runs, so that a failure of the experimental overlapped schedule (-x) cannot hide the
    # default schedule's results.
    for part in "default:not overlap and not schedules:35" "overlap:overlap or schedules:25"; do
        name=${part%%:*}; rest=${part#*:}; sel=${rest%:*}; cap=${rest##*:}
        echo "== tf32wg: pytest -k '$sel' (log: $LOG/pytest_$name.log)"
        timeout "$cap" $PY -m pytest -m gpu -q -x -p no:cacheprovider $XDIST -rs --tb=short \
            tests/gpu/test_gpu_flash_tf32x3_sm90.py -k "$sel" > "$LOG/pytest_$name.log" 2>&1
        T=$?
        grep -E "^(FAILED|ERROR)|Error|error:|exceeds" "$LOG/pytest_$name.log" | cut -c1-400 \
            | head -20
        tail -n 3 "$LOG/pytest_$name.log"
        echo "tf32wg tests ($name) rc=$T (124 = cut at $cap s: run again, the kernels are cached)"
        RC=$(( RC || T ))
    done
}

run_bench() {
    echo "== tf32wg: benchmark (log: $LOG/bench.log, table: $LOG/bench.md)"
    timeout 85 $PY tools/gpu_tf32wg_bench.py --reps 30 --out "$LOG/bench.md" > "$LOG/bench.log" 2>&1
    T=$?
    grep -E "^causal=|device|unavailable" "$LOG/bench.log" | cut -c1-300
    echo "tf32wg bench rc=$T (124 = cut at 85 s)"
    if [ -f "$LOG/bench.md" ]; then cat "$LOG/bench.md"; else tail -n 8 "$LOG/bench.log"; fi
    RC=$(( RC || T ))
}

run_san() {
    echo "== tf32wg: compute-sanitizer (logs: $LOG/san_*.log)"
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    if [ -z "$SAN" ]; then
        echo "compute-sanitizer not found"
        RC=1
        return
    fi
    # Once without the sanitizer: the cubin lands in the disk cache.
    timeout 15 $PY tools/gpu_tf32wg_bench.py --san > "$LOG/san_warm.log" 2>&1
    echo "warm-up rc=$? $(grep -c 'finite=True' "$LOG/san_warm.log")/8 finite"
    head -n 10 "$LOG/san_warm.log"
    for tool in memcheck racecheck; do
        timeout 20 "$SAN" --tool "$tool" --print-limit 20 $PY tools/gpu_tf32wg_bench.py --san \
            > "$LOG/san_$tool.log" 2>&1
        T=$?
        grep -E "finite=False|ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san_$tool.log" | head -8
        echo "tf32wg san $tool rc=$T (124 = cut at 20 s)"
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
