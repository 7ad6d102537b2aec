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
NAME=fwdtma
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_fwdtma_bench.py

run_tests() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_pytest tma 75 -x $(xdist 4) tests/gpu/test_gpu_flash_sm90.py -k "tma or 75"
}
run_bench() { gpu_bench 88 $PY $BENCH --budget 65; }
run_san() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_san 20 35 $PY $BENCH --san
}
gpu_main "$@"
