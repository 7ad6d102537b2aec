#!/usr/bin/env bash
# GPU check of the `dedupe` branch (a refactor: every kernel entry's PTX is unchanged, checked
# with tools/ptx_diff.py, so only the Python launchers it touched need running on a GPU):
# flex_tc.cached_function (the flex forward's and backward's module cache, also the sm_90a
# cubin path), flash_bwd.grad_buffers / run_delta / run_dq_convert / unpad (used by
# flash_bwd.py, flash_bwd_sm90.py and flex_tc_bwd.py).
#   bash tools/gpu_check_dedupe.sh tests  # their GPU tests (< 90 s)
#   bash tools/gpu_check_dedupe.sh bench  # nothing to measure (no kernel changed)
#   bash tools/gpu_check_dedupe.sh san    # nothing new to sanitize (no kernel changed)
# No argument: all three. Run from the repository root; logs under $OUT/dedupe/.
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$PWD/gpu_out}
LOG="$OUT/dedupe"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
MODE=${1:-all}
RC=0

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
    echo "== dedupe tests (log: $LOG/tests.log)"
    XDIST=""
    if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
    timeout 90 $PY -m pytest -m gpu tests/gpu/test_gpu_flash_bwd.py tests/gpu/test_gpu_sm90_bwd.py \
        tests/gpu/test_gpu_flex_tc_bwd.py tests/gpu/test_gpu_flex_tc.py -q -x \
        -p no:cacheprovider $XDIST -rs --tb=short > "$LOG/tests.log" 2>&1
    T=$?
    grep -E "^(FAILED|ERROR)|Error|error" "$LOG/tests.log" | head -30
    tail -n 8 "$LOG/tests.log"
    echo "dedupe tests rc=$T (124 = cut by the 90 s cap)"
    RC=$(( RC || T ))
fi

if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
    echo "== dedupe bench: none (identical PTX for every entry: tools/ptx_diff.py)"
fi

if [ "$MODE" = san ] || [ "$MODE" = all ]; then
    echo "== dedupe san: none (no new or changed kernel)"
fi

echo
echo "| check | rc |"
echo "| --- | --- |"
echo "| dedupe $MODE | $RC |"
exit $RC
