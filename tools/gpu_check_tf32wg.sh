#!/usr/bin/env bash
# GPU check of the `tf32wg` branch (issue 11, "fp32 at fp32 accuracy on tensor cores"): the
# 3xTF32 forward on Hopper's wgmma, flash_fwd_tf32x3_sm90.cu, entry cupy.tf32x3_sm90 -- written
# without a GPU and switched off (instances.TF32X3_SM90_ON) until this passes. Needs a compute
# capability 9.0 GPU. Logs under $OUT/tf32wg/ (or a temp dir).
#   bash tools/gpu_check_tf32wg.sh tests  tests/gpu/test_gpu_flash_tf32x3_sm90.py: the kernel's
#                                         forward against float64 at 1e-5 of max |out| (every
#                                         option, odd lengths, GQA, empty rows, S = 4096), plain
#                                         TF32 missing that bound, agreement with cupy.tf32x3,
#                                         the route with the switch on (< 90 s)
#   bash tools/gpu_check_tf32wg.sh bench  fp32 D = 64 S = 4096 (B = 4, H = 32), causal and not:
#                                         the new kernel (default and the experimental _ov
#                                         schedule) vs cupy.tf32x3 vs torch SDPA fp32 (TF32
#                                         off), each checked against float64 first; markdown
#                                         table last (< 90 s)
#   bash tools/gpu_check_tf32wg.sh san    compute-sanitizer memcheck, then racecheck, on four
#                                         tiny launches of each schedule (< 60 s)
# Without an argument: all three in that order. A kernel that hangs (an mbarrier phase that
# never completes) is ended by the timeouts.
NAME=tf32wg
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_tf32wg_bench.py

run_tests() {
    # The sm_90a cubins are built once (NVRTC, disk cache) before the workers start.
    gpu_step compile 30 "$LOG/compile.log" $PY -c "from xattn._backends.cupy_ import \
flash_tf32x3_sm90 as m; m.get_kernel(64); m.get_kernel(64, 64, True); print('compiled')"
    # Two runs, so that a failure of the experimental overlapped schedule (-x) cannot hide the
    # default schedule's results.
    gpu_pytest default 35 -x $(xdist 4) tests/gpu/test_gpu_flash_tf32x3_sm90.py \
        -k "not overlap and not schedules"
    gpu_pytest overlap 25 -x $(xdist 4) tests/gpu/test_gpu_flash_tf32x3_sm90.py \
        -k "overlap or schedules"
}
run_bench() {
    TAIL=8 gpu_step bench 85 "$LOG/bench.log" $PY $BENCH --reps 30 --out "$LOG/bench.md"
    if [ -f "$LOG/bench.md" ]; then cat "$LOG/bench.md"; fi
}
run_san() { gpu_san 15 20 $PY $BENCH --san; }
gpu_main "$@"
