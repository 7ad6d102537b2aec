#!/usr/bin/env bash
# GPU check of the experimental Hopper wgmma backward (cupy.sm90_bwd, flash_bwd_sm90.cu; issue
# 11). Needs a compute capability 9.0 GPU. Logs under $OUT/sm90bwd/ (or a temp dir).
#   bash tools/gpu_check_sm90bwd.sh tests   the wgmma probes of the kernel's five products
#                                           (tools/wgmma_probe.py --bwd), then
#                                           tests/gpu/test_gpu_sm90_bwd.py (< 90 s)
#   bash tools/gpu_check_sm90bwd.sh bench   fp16 S=4096 B=4 H=16, D 128 / 64, causal and not:
#                                           sm90_bwd vs cupy.sm80 vs torch SDPA backward,
#                                           table last (< 90 s)
#   bash tools/gpu_check_sm90bwd.sh san     compute-sanitizer memcheck, then racecheck, on one
#                                           tiny backward per entry (< 60 s)
# Without an argument: all three in that order.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/sm90bwd"
mkdir -p "$LOG"
what="${1:-all}"

run_tests() {
    echo "== sm90bwd: wgmma probes of the backward's products (log: $LOG/probe.log)"
    timeout 30 python3 tools/wgmma_probe.py --bwd > "$LOG/probe.log" 2>&1
    echo "probe exit status: $? (124 = cut at 30 s)"
    grep -E "^(FAIL|PASS)|PASSED|FAILED|Error" "$LOG/probe.log" | head -16
    echo "== sm90bwd: pytest tests/gpu/test_gpu_sm90_bwd.py (log: $LOG/pytest.log)"
    timeout 60 python3 -m pytest -m gpu -q --maxfail=12 -p no:cacheprovider -n 4 \
        tests/gpu/test_gpu_sm90_bwd.py > "$LOG/pytest.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)" "$LOG/pytest.log" | cut -c1-400 | head -24
    tail -n 3 "$LOG/pytest.log"
    echo "pytest exit status: $rc (124 = cut at 60 s)"
}

run_bench() {
    echo "== sm90bwd: benchmark (log: $LOG/bench.log)"
    timeout 88 python3 tools/gpu_sm90bwd_bench.py --budget 70 > "$LOG/bench.md" \
        2> "$LOG/bench.log"
    rc=$?
    tail -n 12 "$LOG/bench.log"
    echo "bench exit status: $rc (124 = cut at 88 s)"
    cat "$LOG/bench.md"
}

run_san() {
    echo "== sm90bwd: compute-sanitizer (logs: $LOG/memcheck.log, $LOG/racecheck.log)"
    # Compile the cubins outside the sanitizer (disk cache); the workload also runs the forward
    # and flash_bwd.cu's delta / dq-convert kernels (all tiny).
    timeout 20 python3 tools/gpu_sm90bwd_bench.py --san > "$LOG/san_warm.log" 2>&1
    echo "warm-up exit status: $? ($(tr '\n' ' ' < "$LOG/san_warm.log" | tail -c 200))"
    for tool in memcheck racecheck; do
        timeout 35 compute-sanitizer --tool "$tool" --print-limit 20 \
            python3 tools/gpu_sm90bwd_bench.py --san > "$LOG/$tool.log" 2>&1
        echo "$tool exit status: $?"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|finite=" "$LOG/$tool.log" | head -8
    done
}

case "$what" in
    tests) run_tests ;;
    bench) run_bench ;;
    san) run_san ;;
    all) run_tests; run_san; run_bench ;;
    *) echo "usage: $0 [tests|bench|san]"; exit 2 ;;
esac
