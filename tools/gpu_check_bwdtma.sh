#!/usr/bin/env bash
# GPU check of the Hopper backward's experimental TMA entries (flash_bwd_sm90.cu _tma / _tma2:
# Q / dO per step and K / V once by the copy engine from tensor maps; issue 11). Needs a
# compute capability 9.0 GPU. Logs under $OUT/bwdtma/ (or a temp dir).
#   bash tools/gpu_check_bwdtma.sh tests   builds the plain / tma / tma2 cubins once, then the
#                                          TMA tests of tests/gpu/test_gpu_sm90_bwd.py (-k tma:
#                                          float64 oracle, dk / dv bitwise equal to the plain
#                                          entry's, NaN behind every operand's end, GQA / MQA,
#                                          Sq / Sk off the tiles, rows without keys, repeats,
#                                          refusals) (< 90 s)
#   bash tools/gpu_check_bwdtma.sh bench   fp16 B=4 H=16 S=4096, D 128 / 64, causal and not:
#                                          plain vs tma vs tma2 vs torch SDPA's backward, each
#                                          checked first; table last (< 90 s)
#   bash tools/gpu_check_bwdtma.sh san     compute-sanitizer memcheck, then racecheck, on one
#                                          tiny backward per TMA entry (< 60 s)
# Without an argument: all three in that order.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/bwdtma"
mkdir -p "$LOG"
what="${1:-all}"

precompile() {
    timeout 60 python3 tools/gpu_bwdtma_bench.py --precompile > "$LOG/precompile.log" 2>&1
    echo "precompile exit status: $? ($(tr '\n' ' ' < "$LOG/precompile.log" | tail -c 300))"
}

run_tests() {
    echo "== bwdtma: cubins (log: $LOG/precompile.log)"
    precompile
    echo "== bwdtma: pytest tests/gpu/test_gpu_sm90_bwd.py -k tma (log: $LOG/pytest.log)"
    # A byte count that the copies never deliver would hang a kernel on its full barrier: the
    # timeout ends the process (and with it the context).
    timeout 75 python3 -m pytest -m gpu -q -x -p no:cacheprovider -n 4 \
        tests/gpu/test_gpu_sm90_bwd.py -k tma > "$LOG/pytest.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|Error|error:" "$LOG/pytest.log" | cut -c1-400 | head -24
    tail -n 3 "$LOG/pytest.log"
    echo "pytest exit status: $rc (124 = cut at 75 s)"
}

run_bench() {
    echo "== bwdtma: benchmark (log: $LOG/bench.log)"
    timeout 88 python3 tools/gpu_bwdtma_bench.py --budget 60 > "$LOG/bench.md" \
        2> "$LOG/bench.log"
    rc=$?
    tail -n 16 "$LOG/bench.log"
    echo "bench exit status: $rc (124 = cut at 88 s)"
    cat "$LOG/bench.md"
}

run_san() {
    echo "== bwdtma: compute-sanitizer (logs: $LOG/memcheck.log, $LOG/racecheck.log)"
    # The cubins are built outside the sanitizer (disk cache); a warm-up run outside it too.
    precompile
    timeout 20 python3 tools/gpu_bwdtma_bench.py --san > "$LOG/san_warm.log" 2>&1
    echo "warm-up exit status: $? ($(tr '\n' ' ' < "$LOG/san_warm.log" | tail -c 300))"
    for tool in memcheck racecheck; do
        timeout 35 compute-sanitizer --tool "$tool" --print-limit 20 \
            python3 tools/gpu_bwdtma_bench.py --san > "$LOG/$tool.log" 2>&1
        echo "$tool exit status: $?"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|finite=False" "$LOG/$tool.log" | head -8
    done
}

case "$what" in
    tests) run_tests ;;
    bench) run_bench ;;
    san) run_san ;;
    all) run_tests; run_san; run_bench ;;
    *) echo "usage: $0 [tests|bench|san]"; exit 2 ;;
esac
