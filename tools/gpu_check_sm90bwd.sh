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
NAME=sm90bwd
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_sm90bwd_bench.py

run_tests() {
    TAIL=16 gpu_step "wgmma probes of the backward's products" 30 "$LOG/probe.log" \
        $PY tools/wgmma_probe.py --bwd
    gpu_pytest sm90_bwd 60 --maxfail=12 $(xdist 4) tests/gpu/test_gpu_sm90_bwd.py
}
run_bench() { TAIL=12 gpu_bench 88 $PY $BENCH --budget 70; }
# The workload also runs the forward and flash_bwd.cu's delta / dq-convert kernels (all tiny).
run_san() { gpu_san 20 35 $PY $BENCH --san; }
gpu_main "$@"
