#!/usr/bin/env bash
# GPU check of the `fwdtmamods` branch (issue 11): the Hopper forward's _mods / _bm / _mods_bm /
# flex entries in mode 75 (K/V ring filled by the copy engine; ws_produce_walk_tma for the
# block mask's CSR walk). Needs a compute capability 9.0 GPU. Logs under $OUT/fwdtmamods/.
#   bash tools/gpu_check_fwdtmamods.sh tests  cubins of both families (parallel processes),
#                                             then tests/gpu/test_gpu_sm90_mods.py: the mode-75
#                                             tests (-k tma: oracle + bitwise = mode 11) and the
#                                             file's tests of the launcher's default and explicit
#                                             configurations (< 100 s)
#   bash tools/gpu_check_fwdtmamods.sh bench  mode 11 vs 75 vs anchor, fp16: ALiBi causal and
#                                             softcap D=128 S=4096, flex causal+ALiBi S=16384
#                                             D=64, window +-256 block mask S=65536 D=64 H=16;
#                                             each checked first; table last (< 115 s)
#   bash tools/gpu_check_fwdtmamods.sh san    compute-sanitizer memcheck, then racecheck, on one
#                                             tiny launch of each mode-75 entry kind (< 90 s)
# Without an argument: all three in that order. The cubins go to the usual disk cache
# ($XATTN_CACHE_DIR or ~/.cache/xattn), shared by the three.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/fwdtmamods"
mkdir -p "$LOG"
what="${1:-all}"

precompile() {
    echo "== fwdtmamods: cubins ($(date -u +%H:%M:%S), log: $LOG/precompile.log)"
    timeout 60 python3 tools/gpu_fwdtmamods_bench.py --precompile > "$LOG/precompile.log" 2>&1
    echo "precompile exit status: $? ($(tail -c 300 "$LOG/precompile.log" | tr '\n' ' '))"
}

run_tests() {
    precompile
    echo "== fwdtmamods: pytest tests/gpu/test_gpu_sm90_mods.py ($(date -u +%H:%M:%S), log: $LOG/pytest.log)"
    XDIST=""
    if python3 -c "import xdist" 2>/dev/null; then XDIST="-n 12"; fi
    # A wrong byte count on a full barrier would hang a kernel: the timeout ends the process.
    timeout 90 python3 -m pytest -m gpu -q -x -p no:cacheprovider $XDIST -rs --tb=short \
        tests/gpu/test_gpu_sm90_mods.py -k "tma or explicit_configs or routing or flex_runs" \
        > "$LOG/pytest.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|Error|error:" "$LOG/pytest.log" | cut -c1-400 | head -24
    tail -n 3 "$LOG/pytest.log"
    echo "pytest exit status: $rc (124 = cut at 90 s)"
}

run_bench() {
    # The benchmark builds the four cubins it launches itself (in parallel processes).
    echo "== fwdtmamods: benchmark ($(date -u +%H:%M:%S), log: $LOG/bench.log)"
    timeout 110 python3 tools/gpu_fwdtmamods_bench.py --budget 85 > "$LOG/bench.md" \
        2> "$LOG/bench.log"
    rc=$?
    tail -n 16 "$LOG/bench.log"
    echo "bench exit status: $rc (124 = cut at 110 s)"
    cat "$LOG/bench.md"
}

run_san() {
    precompile
    echo "== fwdtmamods: compute-sanitizer ($(date -u +%H:%M:%S), logs: $LOG/memcheck.log, $LOG/racecheck.log)"
    # The flex modules are built outside the sanitizer (disk cache) by a plain run first.
    timeout 30 python3 tools/gpu_fwdtmamods_bench.py --san > "$LOG/san_warm.log" 2>&1
    echo "warm-up exit status: $? ($(tail -c 300 "$LOG/san_warm.log" | tr '\n' ' '))"
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer not found"
        return 1
    fi
    for tool in memcheck racecheck; do
        timeout 40 compute-sanitizer --tool "$tool" --print-limit 20 \
            python3 tools/gpu_fwdtmamods_bench.py --san > "$LOG/$tool.log" 2>&1
        echo "$tool exit status: $?"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|finite=|workload done" "$LOG/$tool.log" \
            | head -12
    done
}

case "$what" in
    tests) run_tests ;;
    bench) run_bench ;;
    san) run_san ;;
    all) run_tests; run_san; run_bench ;;
    *) echo "usage: $0 [tests|bench|san]"; exit 2 ;;
esac
