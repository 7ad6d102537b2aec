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
NAME=d256
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_d256_bench.py

run_tests() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    # test_gpu_flash.py's D = 256 rows reach the kernel through backend="cupy" (the table).
    gpu_pytest wide 80 -x $(xdist 4) tests/gpu/test_gpu_flash_sm90.py tests/gpu/test_gpu_flash.py \
        -k "(wide or 192 or 256 or empty_keys or fit) and not fp32"
}
run_bench() { TAIL=20 gpu_bench 88 $PY $BENCH --budget 65; }
run_san() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_san 12 22 $PY $BENCH --san
}
gpu_main "$@"
