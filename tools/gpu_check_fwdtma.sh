#!/usr/bin/env bash
# GPU check of the Hopper forward's TMA mode (mode 75 = 11 + bit 6: K/V by the copy engine
# from tensor maps; flash_fwd_sm90.cu, tma_sm90.cuh, xattn/_backends/cupy_/tma.py; issue 11).
# Needs a compute capability 9.0 GPU. Logs under $OUT/fwdtma/ (or a temp dir).
#   bash tools/gpu_check_fwdtma.sh tests   builds the mode 11 / 75 cubins once, then the mode-75
#                                          tests of tests/gpu/test_gpu_flash_sm90.py (-k "tma or
#                                          75": sequence ends, GQA, windows, lse, the ring's
#                                          turnover, bitwise equality with mode 11, unaligned
#                                          views refused, Sk = 0) (< 90 s)
#   bash tools/gpu_check_fwdtma.sh bench   fp16 / bf16, D 64 / 128, S=4096 causal and not, and
#                                          fp16 D=128 S=1024: mode 11 vs 75 vs torch SDPA
#                                          default, each checked against torch first; the host
#                                          cost of a tensor-map encode; table last (< 90 s)
#   bash tools/gpu_check_fwdtma.sh san     compute-sanitizer memcheck, then racecheck, on one
#                                          tiny mode-75 forward per entry (< 60 s)
# Without an argument: all three in that order.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/fwdtma"
mkdir -p "$LOG"
what="${1:-all}"

precompile() {
    timeout 60 python3 tools/gpu_fwdtma_bench.py --precompile > "$LOG/precompile.log" 2>&1
    echo "precompile exit status: $? ($(tr '\n' ' ' < "$LOG/precompile.log" | tail -c 300))"
}

run_tests() {
    echo "== fwdtma: cubins (log: $LOG/precompile.log)"
    precompile
    echo "== fwdtma: pytest tests/gpu/test_gpu_flash_sm90.py -k 'tma or 75' (log: $LOG/pytest.log)"
    # A wrong byte count on a full barrier would hang a kernel: the timeout ends the process.
    timeout 75 python3 -m pytest -m gpu -q -x -p no:cacheprovider -n 4 \
        tests/gpu/test_gpu_flash_sm90.py -k "tma or 75" > "$LOG/pytest.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|Error|error:" "$LOG/pytest.log" | cut -c1-400 | head -24
    tail -n 3 "$LOG/pytest.log"
    echo "pytest exit status: $rc (124 = cut at 75 s)"
}

run_bench() {
    echo "== fwdtma: benchmark (log: $LOG/bench.log)"
    timeout 88 python3 tools/gpu_fwdtma_bench.py --budget 65 > "$LOG/bench.md" \
        2> "$LOG/bench.log"
    rc=$?
    tail -n 14 "$LOG/bench.log"
    echo "bench exit status: $rc (124 = cut at 88 s)"
    cat "$LOG/bench.md"
}

run_san() {
    echo "== fwdtma: compute-sanitizer (logs: $LOG/memcheck.log, $LOG/racecheck.log)"
    # The cubins are built outside the sanitizer (disk cache).
    precompile
    timeout 20 python3 tools/gpu_fwdtma_bench.py --san > "$LOG/san_warm.log" 2>&1
    echo "warm-up exit status: $? ($(tr '\n' ' ' < "$LOG/san_warm.log" | tail -c 300))"
    for tool in memcheck racecheck; do
        timeout 35 compute-sanitizer --tool "$tool" --print-limit 20 \
            python3 tools/gpu_fwdtma_bench.py --san > "$LOG/$tool.log" 2>&1
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
