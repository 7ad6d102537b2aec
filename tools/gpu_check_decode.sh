#!/usr/bin/env bash
# GPU check of the split-KV decode kernel (issue 12): xattn/kernels/decode_splitkv.cu through
# xattn/_backends/cupy_/decode.py.
#
#   bash tools/gpu_check_decode.sh tests   # GPU tests vs the float64 oracle (< 90 s)
#   bash tools/gpu_check_decode.sh bench   # 9-row table + paged + copy + torch + host rows
#   bash tools/gpu_check_decode.sh san     # compute-sanitizer memcheck, then racecheck
#   bash tools/gpu_check_decode.sh         # all three
#
# Run from anywhere on the GPU machine (python3 with CuPy and torch); logs under
# $OUT/decode/ (or a temporary directory). Each stage prints progress, then a short summary.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/decode"
mkdir -p "$LOG"
stage="${1:-all}"

precompile() {
    echo "== decode precompile: every module into CuPy's disk cache (log: $LOG/precompile.log)"
    timeout 45 python3 tools/decode_precompile.py 18 > "$LOG/precompile.log" 2>&1
    echo "precompile exit status: $? ($(grep -c ' ok$' "$LOG/precompile.log") modules ok)"
    grep -A12 FAILED "$LOG/precompile.log" | head -40
}

run_tests() {
    precompile
    echo "== decode tests (log: $LOG/tests.log)"
    local xdist=""
    python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
    # shellcheck disable=SC2086
    timeout 58 python3 -m pytest -m gpu $xdist -q -x -p no:cacheprovider \
        tests/test_decode_gpu.py tests/test_decode_host_cache.py > "$LOG/tests.log" 2>&1
    local rc=$?
    grep -E "^(FAILED|ERROR)" "$LOG/tests.log" | head -30
    tail -n 3 "$LOG/tests.log"
    echo "decode tests exit status: $rc (124 = cut by the 58 s cap)"
    # A skip could hide a path that did not run: say how many and why.
    grep -E "^SKIPPED" "$LOG/tests.log" | head -5
}

run_bench() {
    [ -f "$LOG/precompile.log" ] || precompile
    echo "== decode benchmark (log: $LOG/bench.log, json: $LOG/bench.json)"
    timeout 85 python3 benchmarks/gpu_decode.py --configs 8x0r,8x2,4x0r --rounds 3 --max-reps 60 \
        --json "$LOG/bench.json" > "$LOG/bench.log" 2>&1
    local rc=$?
    echo "decode benchmark exit status: $rc (124 = cut by the 85 s cap)"
    # Everything after the per-row JSON lines: the config and host tables, the main table last.
    grep -v '^{' "$LOG/bench.log" | tail -n 60
}

run_san() {
    [ -f "$LOG/precompile.log" ] || precompile
    echo "== compute-sanitizer (logs: $LOG/memcheck.log, $LOG/racecheck.log)"
    local san
    san="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    if [ ! -x "$san" ]; then
        echo "compute-sanitizer not found"
        return
    fi
    cat > "$LOG/san_workload.py" <<'PY'
# One tiny workload of the decode kernel: the default instance and one extra (warps, stages)
# of each head dim, one split and several (the in-kernel merge), contiguous and paged with a
# page size that tiles straddle, a window. The pool allocator is off so that memcheck sees
# each array's own bounds.
import cupy as cp
import numpy as np

import xattn
from xattn._backends.cupy_ import decode as kernel
from xattn._backends.cupy_ import instances
from xattn.kvcache import _validate_decode

cp.cuda.set_allocator(None)
rs = np.random.default_rng(0)
for d, ps, lens in ((64, None, [150, 37]), (64, 7, [150, 37]), (128, None, [150, 37]),
                    (128, 7, [150, 37]), (64, None, [150, 150]), (128, 7, [150, 150])):
    # Ragged lengths (the blocks scan them), then equal ones (found by division).
    cache = xattn.KVCache(2, 2, 160, d, dtype=np.float16, xp=cp, page_size=ps)
    kv = cp.asarray(rs.standard_normal((2, 2, 150, d)).astype(np.float16))
    cache.append(kv, kv, lengths=lens)
    q = cp.asarray(rs.standard_normal((2, 8, 2, d)).astype(np.float16))
    for window in (None, (40, None)):
        prob = _validate_decode(q, cache, window, None, None, None)
        # The default, the first candidate, and every register-path candidate.
        extra = instances.DECODE_EXTRA[d]
        for cfg in (instances.DECODE[d], extra[0], *(c for c in extra[1:] if len(c) == 3)):
            # 3 blocks twice: the in-kernel merge, then its ticket counters reused; 40:
            # runs that span pairs and sequences.
            for splits in (1, 3, 3, 40):
                out, lse = kernel.decode(prob, q, cache, splits=splits, config=cfg)
                cp.cuda.Device().synchronize()
                assert bool(cp.isfinite(out).all()), (d, ps, lens, window, cfg, splits)
print("workload done")
PY
    timeout 60 "$san" --tool memcheck --leak-check no python3 "$LOG/san_workload.py" \
        > "$LOG/memcheck.log" 2>&1
    echo "memcheck exit status: $?"
    grep -E "ERROR SUMMARY|workload done|Error|error" "$LOG/memcheck.log" | tail -n 5
    timeout 60 "$san" --tool racecheck python3 "$LOG/san_workload.py" \
        > "$LOG/racecheck.log" 2>&1
    echo "racecheck exit status: $?"
    grep -E "RACECHECK SUMMARY|workload done|Error|error" "$LOG/racecheck.log" | tail -n 5
}

case "$stage" in
    tests) run_tests ;;
    bench) run_bench ;;
    san) run_san ;;
    all) run_tests; run_san; run_bench ;;
    *) echo "usage: $0 [tests|bench|san]"; exit 2 ;;
esac
