#!/usr/bin/env bash
# What waits for a device (written 2026-12-05 without one), each part one device call. Needs a
# compute capability 9.0 GPU. Logs under $OUT/pending/ (or a temp dir).
#   bash tools/gpu_check_pending.sh tests   (< 6 min)
#       - tests/gpu/test_gpu_flash_sm90.py, whole: every built configuration, so the mode-203
#         entries (Q by the copy engine) and the persistent mode-235 ones
#         (instances.SM90_EXPERIMENTAL) among them, against the oracle, at sequence ends with
#         NaN past the allocations, bit for bit against their mode-11 / mode-75 twins (235 on
#         problems of several tiles a block too)
#       - tests/gpu/test_gpu_sm90_bwd.py -k "tma_window or refusals": the TMA backward's window
#         twins (config= on a window request; instances.SM90_BWD_WIN_TMA_ON) against the oracle
#   bash tools/gpu_check_pending.sh bench   (< 5 min)
#       - python3 tools/gpu_fwd_short.py --twins: the SM90_SHORT candidates and the default per
#         shape, each beside its mode-203 and mode-235 twins, torch SDPA in the same process
#       - python3 tools/gpu_bwdtma_bench.py --window: the window twins against the default
#         route on issue 11's window row (and D = 128 at S = 16384)
#       - benchmarks/gpu_decode.py --sweep: the decode launcher's block count at B 16 / 64
#         (one block per SM slot against pairs x splits, with the batched merge)
#   bash tools/gpu_check_pending.sh san     (< 4 min): memcheck and racecheck on the TMA
#         backward entries and their window twins, and on the NWG = 1 forward entries, the
#         mode-203 / 235 ones among them
# Then the whole suite in two calls (bash tools/gpu_suite.sh 1, then 2). A forward twin that
# passed and beat its mode-75 entry replaces it in SM90_SHIPPED / SM90_SHORT / CONFIGS; the
# window twins that passed and beat the default route turn SM90_BWD_WIN_TMA_ON on.
NAME=pending
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
what="${1:-tests}"
XDIST=$(xdist 12)
export PYTHONPATH="$PWD/tools:$PYTHONPATH" XATTN_FAILS_FILE="$LOG/failures.txt"

step() {  # step NAME SECONDS COMMAND...: gpu_step with the log named after the step
    local name=$1 cap=$2
    shift 2
    TAIL=14 gpu_step "$name" "$cap" "$LOG/$name.log" "$@"
}

case "$what" in
tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    step flash_sm90 280 $PY -m pytest -m gpu -q -p no:cacheprovider $XDIST -rs --tb=short \
        -p pytest_failures_now tests/gpu/test_gpu_flash_sm90.py
    step bwd_window 60 $PY -m pytest -m gpu -q -p no:cacheprovider $XDIST -rs --tb=short \
        -p pytest_failures_now tests/gpu/test_gpu_sm90_bwd.py -k "tma_window or refusals"
    ;;
bench)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    step fwd_short 170 $PY tools/gpu_fwd_short.py --twins --budget 140
    step bwd_window 70 $PY tools/gpu_bwdtma_bench.py --window --budget 50 --reps 5
    step decode_sweep 90 $PY benchmarks/gpu_decode.py --batch 16 64 --ctx 32768 131072 \
        --page-size 0 --no-auto --no-host --rounds 3 --max-reps 40 \
        --sweep 132,264,396,528,128,256,384,512
    ;;
san)
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    step bwdtma_san 90 bash tools/gpu_check_bwdtma.sh san
    if [ -n "$SAN" ]; then
        timeout 60 $PY tools/gpu_fwd_short.py --san > "$LOG/short_warm.log" 2>&1
        for tool in memcheck racecheck; do
            step "short_$tool" 50 "$SAN" --tool "$tool" $PY tools/gpu_fwd_short.py --san
            grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/short_$tool.log"
        done
    else
        echo "compute-sanitizer not found"
        RC=1
    fi
    ;;
*)
    echo "usage: bash tools/gpu_check_pending.sh tests|bench|san"
    exit 2
    ;;
esac
exit $RC
