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
NAME=bwdtma
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_bwdtma_bench.py

run_tests() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_pytest tma 75 -x $(xdist 4) tests/gpu/test_gpu_sm90_bwd.py -k tma
}
run_bench() { TAIL=16 gpu_bench 88 $PY $BENCH --budget 60; }
run_san() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_san 20 35 $PY $BENCH --san
}
gpu_main "$@"
