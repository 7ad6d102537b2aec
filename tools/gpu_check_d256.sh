#!/usr/bin/env bash
# GPU check of the Hopper wgmma forward at head dims 256 and 192 (flash_fwd_sm90.cu:
# flash_fwd_sm90_ws_kv, mode 75 with separate K and V rings, P V by m64n256k16 / m64n192k16;
# issue 11).
# Needs a compute capability 9.0 GPU. Logs under $OUT/d256/ (or a temp dir).
#   bash tools/gpu_check_d256.sh tests   builds the D = 192 / 256 cubins once, then their
#                                        tests in tests/gpu/test_gpu_flash_sm90.py (-k "wide or
#                                        192 or 256 or empty_keys or fit": causal / not,
#                                        window, GQA / MQA, Sq != Sk, odd lengths, lse, fp16 /
#                                        bf16, sequence ends under the tensor maps, the
#                                        dispatch) (< 90 s)
#   bash tools/gpu_check_d256.sh bench   fp16 / bf16 D=256 S=4096 causal and not, fp16 D=192
#                                        (and D=128 as an anchor): cupy.sm90 vs cupy.sm80 vs
#                                        torch SDPA default, each checked against torch first;
#                                        table
#                                        last (< 90 s)
#   bash tools/gpu_check_d256.sh san     compute-sanitizer memcheck, then racecheck, on tiny
#                                        D = 256 and 192 forwards (< 60 s)
# Without an argument: all three in that order.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/d256"
mkdir -p "$LOG"
what="${1:-all}"

precompile() {
    timeout 60 python3 tools/gpu_d256_bench.py --precompile > "$LOG/precompile.log" 2>&1
    echo "precompile exit status: $? ($(tr '\n' ' ' < "$LOG/precompile.log" | tail -c 300))"
}

run_tests() {
    echo "== d256: cubins (log: $LOG/precompile.log)"
    precompile
    echo "== d256: pytest tests/gpu/test_gpu_flash_sm90.py tests/gpu/test_gpu_flash.py" \
        "-k '(wide or 192 or 256 or empty_keys or fit) and not fp32' (log: $LOG/pytest.log)"
    # A wrong byte count or parity on a ring barrier would hang a kernel: the timeout ends it.
    # test_gpu_flash.py's D = 256 rows reach the kernel through backend="cupy" (the table).
    timeout 80 python3 -m pytest -m gpu -q -x -p no:cacheprovider -n 4 \
        tests/gpu/test_gpu_flash_sm90.py tests/gpu/test_gpu_flash.py \
        -k "(wide or 192 or 256 or empty_keys or fit) and not fp32" > "$LOG/pytest.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|Error|error:" "$LOG/pytest.log" | cut -c1-400 | head -24
    tail -n 3 "$LOG/pytest.log"
    echo "pytest exit status: $rc (124 = cut at 80 s)"
}

run_bench() {
    echo "== d256: benchmark (log: $LOG/bench.log)"
    timeout 88 python3 tools/gpu_d256_bench.py --budget 65 > "$LOG/bench.md" 2> "$LOG/bench.log"
    rc=$?
    tail -n 20 "$LOG/bench.log"
    echo "bench exit status: $rc (124 = cut at 88 s)"
    cat "$LOG/bench.md"
}

run_san() {
    echo "== d256: compute-sanitizer (logs: $LOG/memcheck.log, $LOG/racecheck.log)"
    # The cubins are built outside the sanitizer (disk cache).
    precompile
    timeout 12 python3 tools/gpu_d256_bench.py --san > "$LOG/san_warm.log" 2>&1
    echo "warm-up exit status: $? ($(tr '\n' ' ' < "$LOG/san_warm.log" | tail -c 300))"
    for tool in memcheck racecheck; do
        timeout 22 compute-sanitizer --tool "$tool" --print-limit 20 \
            python3 tools/gpu_d256_bench.py --san > "$LOG/$tool.log" 2>&1
        echo "$tool exit status: $?"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|finite=" "$LOG/$tool.log" | head -12
    done
}

case "$what" in
    tests) run_tests ;;
    bench) run_bench ;;
    san) run_san ;;
    all) run_tests; run_san; run_bench ;;
    *) echo "usage: $0 [tests|bench|san]"; exit 2 ;;
esac
