#!/usr/bin/env bash
# GPU check of the 3xTF32 float32 forward (cupy.tf32x3, issue 11): the GPU tests that cover it
# (every kernel-table entry x every option set; the TF32 and 3xTF32 files; the float32 routing
# tests whose expectations moved with it), then the float32 benchmark rows (3xTF32 beside the
# SIMT kernel and torch, with errors vs float64, and every compiled 3xTF32 tile configuration),
# and the TF32 rows. Run from anywhere on the GPU machine; logs go to $OUT (or a temp dir).
# About 3 minutes: pytest is capped at 80 s, the benchmark at a 70 s budget (rows not started
# by then are listed as skipped; the 3xTF32 rows run first). The table is
# printed last.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
export OUT
mkdir -p "$OUT"

echo "== pytest (log: $OUT/pytest_tf32x3.log)"
timeout 80 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
    tests/gpu/test_gpu_entries.py tests/gpu/test_gpu_flash_tf32.py \
    tests/gpu/test_gpu_flash_tf32x3.py \
    "tests/gpu/test_gpu_flash.py::test_refusals_raise_when_forced_and_fall_back_on_auto" \
    "tests/gpu/test_gpu_flash.py::test_fp32_simt_kernel" \
    "tests/gpu/test_gpu_flash.py::test_fp32_simt_kernel_options" \
    "tests/gpu/test_gpu_flash_bwd.py::test_backward_refusals_raise_when_forced_and_fall_back_on_auto" \
    > "$OUT/pytest_tf32x3.log" 2>&1
rc_tests=$?
grep -E "^(FAILED|ERROR)" "$OUT/pytest_tf32x3.log" | head -40
tail -n 3 "$OUT/pytest_tf32x3.log"
echo "pytest exit status: $rc_tests (124 = cut by the 80 s cap)"

echo "== benchmark (fp32 = 3xTF32 rows, then tf32 rows)"
python3 benchmarks/gpu_flash.py --only fp32,tf32 --tf32 --quick --configs --budget 70 \
    > "$OUT/gpu_flash_tf32x3.log" 2>&1
rc_bench=$?
grep -E "tf32x3 config|ERROR" "$OUT/gpu_flash_tf32x3.log" | head -20
echo "pytest exit $rc_tests, benchmark exit $rc_bench; logs in $OUT"
echo
# The table last (the benchmark also wrote it to $OUT/gpu_flash_table.md).
if [ -f "$OUT/gpu_flash_table.md" ]; then
    cat "$OUT/gpu_flash_table.md"
else
    tail -n 30 "$OUT/gpu_flash_tf32x3.log"
fi
