#!/usr/bin/env bash
# GPU check of the `bwd90mods` branch (issues 11 and 13): the Hopper wgmma backward's option
# entries (flash_bwd_sm90.cu: window, score mods, block masks; launcher flash_bwd_sm90.py) and
# flex_attention_backward on it (flex_tc_bwd.py). Needs a compute capability 9.0 GPU.
#   bash tools/gpu_check_bwd90mods.sh tests  # the sm_90a cubins built in parallel (disk
#                                            # cache), then tests/gpu/test_gpu_sm90_bwd.py and
#                                            # the flex routing tests (< 90 s)
#   bash tools/gpu_check_bwd90mods.sh bench  # option rows fp16 B=4 H=16 S=4096 D=64/128:
#                                            # sm90_bwd vs sm80 vs torch SDPA; then the flex
#                                            # backward row (S=16384) beside compiled Flex
#   bash tools/gpu_check_bwd90mods.sh san    # compute-sanitizer memcheck + racecheck, one tiny
#                                            # backward per option entry and flex entry (< 60 s)
# No argument: all three. Logs under $OUT/bwd90mods/ (or a temp dir).
NAME=bwd90mods
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_bwd90mods_bench.py

run_tests() {
    gpu_step "sm_90a cubins" 40 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_pytest options 50 --maxfail=20 $(xdist 8) tests/gpu/test_gpu_sm90_bwd.py \
        tests/gpu/test_gpu_flex_tc_bwd.py -k "sm90 or kernel_by_compute_capability or auto_picks"
}
run_san() { gpu_san 25 20 $PY $BENCH --san; }
run_bench() {
    TAIL=6 gpu_bench 45 $PY $BENCH --budget 30
    TAIL=5 gpu_step "flex backward row" 45 "$LOG/bench_flex.log" $PY benchmarks/gpu_flex.py \
        --backward --dtype float16 --seq 16384 --repeats 10 --json "$LOG/bench_flex_bwd_fp16.json"
    grep -A3 -E '^flex attention backward' "$LOG/bench_flex.log"
}
gpu_main "$@"
