#!/usr/bin/env bash
# GPU check of the 3xTF32 float32 backward (flash_bwd_tf32x3.cu, cupy.tf32x3's backward; its
# switch instances.TF32X3_BWD_ON is on since this passed on an H100, 2026-12-06). Needs a
# compute capability 8.0+ GPU. Logs under $OUT/tf32x3bwd/ (or a temp dir).
#   bash tools/gpu_check_tf32x3bwd.sh tests  tests/gpu/test_gpu_flash_bwd_tf32x3.py: dq / dk / dv
#                                            against float64 at 1e-5 of max |ref| (D 64 / 128,
#                                            causal, window, GQA, ragged lengths, empty rows,
#                                            score mods, every built configuration, S = 2048),
#                                            the route with the switch on
#   bash tools/gpu_check_tf32x3bwd.sh bench  fp32 D = 64 / 128, S = 4096, causal and not: the
#                                            new backward (each configuration) vs cupy.simt vs
#                                            torch SDPA fp32, errors against float64; markdown
#                                            table last
#   bash tools/gpu_check_tf32x3bwd.sh san    compute-sanitizer memcheck, then racecheck, on four
#                                            tiny launches
# Without an argument: all three in that order.
NAME=tf32x3bwd
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_tf32x3bwd_bench.py

run_tests() {
    # The entries are built once (NVRTC, CuPy's disk cache) before the workers start.
    gpu_step compile 120 "$LOG/compile.log" $PY -c "from xattn._backends.cupy_ import \
flash_bwd_tf32x3 as m
for d in m.HEAD_DIMS:
    for cfg in m.built(d):
        for mods in (False, True):
            m.get_kernel(d, cfg, mods)
print('compiled')"
    gpu_pytest bwd 300 -x $(xdist 4) tests/gpu/test_gpu_flash_bwd_tf32x3.py
}
run_bench() {
    TAIL=12 gpu_step bench 300 "$LOG/bench.log" $PY $BENCH --reps 20 --out "$LOG/bench.md"
    if [ -f "$LOG/bench.md" ]; then cat "$LOG/bench.md"; fi
}
run_san() { gpu_san 60 120 $PY $BENCH --san; }
gpu_main "$@"
