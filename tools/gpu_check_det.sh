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
NAME=det
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_det_bench.py

run_tests() {
    gpu_step kernels 35 "$LOG/precompile.log" $PY $BENCH --precompile
    # Two runs, so that a failure of the wgmma dq kernel's own tests cannot hide the default
    # route's results (-x).
    gpu_pytest route 32 -x $(xdist 8) tests/gpu/test_gpu_sm90_bwd.py \
        -k "(det and not wgmma) or auto_takes"
    gpu_pytest wgmma-dq 20 -x $(xdist 8) tests/gpu/test_gpu_sm90_bwd.py -k det_wgmma
}
run_bench() {
    gpu_step kernels 25 "$LOG/precompile.log" $PY $BENCH --precompile
    TAIL=12 gpu_bench 60 $PY $BENCH --budget 42
}
run_san() {
    gpu_step kernels 15 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_san 10 17 $PY $BENCH --san
}
gpu_main "$@"
