#!/usr/bin/env bash
# Everything written on 2026-12-05 after the device was withdrawn, checked in one or two device
# calls (each part fits one call; order = what the switches wait on). Needs a compute
# capability 9.0 GPU. Logs under $OUT/pending/ (or a temp dir).
#   bash tools/gpu_check_pending.sh tests   (< 10 min)
#       - tests/gpu/test_gpu_host_plan.py: flash_attention's host plan per call signature
#       - tests/gpu/test_gpu_flash_sm90.py, whole: every built configuration, so the one-consumer
#         ones (NWG = 1: instances.SM90_SHORT) and D = 192 / 256 (SM90_WIDE_ON) among them
#       - bash tools/gpu_check_det.sh tests: deterministic=True on the wgmma backward
#         (SM90_BWD_DETERMINISTIC_ON, SM90_BWD_DQ_WGMMA)
#       - bash tools/gpu_check_tf32wg.sh tests: 3xTF32 float32 on wgmma (TF32X3_SM90_ON)
#   bash tools/gpu_check_pending.sh bench   (< 10 min)
#       - python3 tools/gpu_fwd_short.py: host cost with and without the plan; the NWG = 1
#         configurations against the default per shape (SM90_SHORT's thresholds)
#       - bash tools/gpu_check_d256.sh bench; bash tools/gpu_check_det.sh bench;
#         bash tools/gpu_check_tf32wg.sh bench
#       - benchmarks/gpu_decode.py --sweep: the decode launcher's block count at B 16 / 64
#         (one block per SM slot against pairs x splits, with the batched merge)
#   bash tools/gpu_check_pending.sh san     (< 5 min): d256, det, tf32wg and the NWG = 1 entries
# Then turn on the switches whose tests passed and whose figures beat what they replace
# (xattn/_backends/cupy_/instances.py), move SM90_SHORT's configurations to SM90_SHIPPED, and
# run the whole suite in two calls: bash tools/gpu_suite.sh 1, then bash tools/gpu_suite.sh 2.
NAME=pending
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
what="${1:-tests}"
XDIST=$(xdist 8)

step() {  # step NAME SECONDS COMMAND...: gpu_step with the log named after the step
    local name=$1 cap=$2
    shift 2
    TAIL=14 gpu_step "$name" "$cap" "$LOG/$name.log" "$@"
}

case "$what" in
tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    step host_plan 60 $PY -m pytest -m gpu -q -p no:cacheprovider -rs \
        tests/gpu/test_gpu_host_plan.py
    step flash_sm90 240 $PY -m pytest -m gpu -q -p no:cacheprovider $XDIST -rs --tb=short \
        tests/gpu/test_gpu_flash_sm90.py
    step det 150 bash tools/gpu_check_det.sh tests
    step tf32wg 100 bash tools/gpu_check_tf32wg.sh tests
    ;;
bench)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    step fwd_short 180 $PY tools/gpu_fwd_short.py --budget 150
    step d256 100 bash tools/gpu_check_d256.sh bench
    step det_bench 100 bash tools/gpu_check_det.sh bench
    step tf32wg_bench 100 bash tools/gpu_check_tf32wg.sh bench
    step decode_sweep 90 $PY benchmarks/gpu_decode.py --batch 16 64 --ctx 32768 131072 \
        --page-size 0 --no-auto --no-host --rounds 3 --max-reps 40 \
        --sweep 132,264,396,528,128,256,384,512
    ;;
san)
    step d256_san 70 bash tools/gpu_check_d256.sh san
    step det_san 70 bash tools/gpu_check_det.sh san
    step tf32wg_san 70 bash tools/gpu_check_tf32wg.sh san
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    if [ -n "$SAN" ]; then
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
