#!/usr/bin/env bash
# GPU check of the `fwdtmamods` branch (issue 11): the Hopper forward's _mods / _bm / _mods_bm /
# flex entries in mode 75 (K/V ring filled by the copy engine; ws_produce_walk_tma for the
# block mask's CSR walk). Needs a compute capability 9.0 GPU. Logs under $OUT/fwdtmamods/.
#   bash tools/gpu_check_fwdtmamods.sh tests  cubins of both families (parallel processes),
#                                             then tests/gpu/test_gpu_sm90_mods.py: the mode-75
#                                             tests (-k tma: oracle + bitwise = mode 11) and the
#                                             file's tests of the launcher's default and explicit
#                                             configurations (< 100 s)
#   bash tools/gpu_check_fwdtmamods.sh bench  mode 11 vs 75 vs anchor, fp16: ALiBi causal and
#                                             softcap D=128 S=4096, flex causal+ALiBi S=16384
#                                             D=64, window +-256 block mask S=65536 D=64 H=16;
#                                             each checked first; table last (< 115 s)
#   bash tools/gpu_check_fwdtmamods.sh san    compute-sanitizer memcheck, then racecheck, on one
#                                             tiny launch of each mode-75 entry kind (< 90 s)
# Without an argument: all three in that order. The cubins go to the usual disk cache
# ($XATTN_CACHE_DIR or ~/.cache/xattn), shared by the three.
NAME=fwdtmamods
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
BENCH=tools/gpu_fwdtmamods_bench.py

run_tests() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    gpu_pytest mods 90 -x $(xdist 12) tests/gpu/test_gpu_sm90_mods.py \
        -k "tma or explicit_configs or routing or flex_runs"
}
# The benchmark builds the four cubins it launches itself (in parallel processes).
run_bench() { TAIL=16 gpu_bench 110 $PY $BENCH --budget 85; }
run_san() {
    gpu_step cubins 60 "$LOG/precompile.log" $PY $BENCH --precompile
    # The flex modules are built outside the sanitizer (disk cache) by the warm-up run.
    gpu_san 30 40 $PY $BENCH --san
}
gpu_main "$@"
