#!/usr/bin/env bash
# GPU check of the `flexbwd` branch (issue #13, the backward on tensor cores):
# flex_attention_backward's score_mod (with its derivative) and mask_mod translated to CUDA C
# and compiled into the mma.sync backward (xattn/kernels/flash_bwd.cu, hook XATTN_USER_MODS;
# launcher xattn/_backends/cupy_/flex_tc_bwd.py).
#   bash tools/gpu_check_flexbwd.sh tests  # tests/gpu/test_gpu_flex_tc_bwd.py (< 90 s)
#   bash tools/gpu_check_flexbwd.sh bench  # fp16 S=16384 D=64 H=16 causal + ALiBi backward
#                                          # beside torch.compile(flex_attention)'s (< 90 s)
#   bash tools/gpu_check_flexbwd.sh san    # compute-sanitizer memcheck + racecheck, tiny
#                                          # workload of each new kernel (< 60 s)
# No argument: all three. Run from the repository root; logs under $OUT/flexbwd/.
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$PWD/gpu_out}
LOG="$OUT/flexbwd"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
MODE=${1:-all}
RC=0

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
    echo "== flexbwd tests (log: $LOG/tests.log)"
    XDIST=""
    if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
    timeout 90 $PY -m pytest -m gpu tests/gpu/test_gpu_flex_tc_bwd.py -q -x -p no:cacheprovider \
        $XDIST -rs --tb=short > "$LOG/tests.log" 2>&1
    T=$?
    grep -E "^(FAILED|ERROR)|Error|error" "$LOG/tests.log" | head -30
    tail -n 8 "$LOG/tests.log"
    echo "flexbwd tests rc=$T (124 = cut by the 90 s cap)"
    RC=$(( RC || T ))
fi

if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
    echo "== flexbwd bench (log: $LOG/bench.log)"
    timeout 90 $PY benchmarks/gpu_flex.py --backward --dtype float16 --seq 16384 --repeats 10 \
        --json "$LOG/bench_bwd_fp16.json" > "$LOG/bench.log" 2>&1
    T=$?
    tail -n 25 "$LOG/bench.log"
    echo "flexbwd bench rc=$T (124 = cut by the 90 s cap)"
    RC=$(( RC || T ))
fi

if [ "$MODE" = san ] || [ "$MODE" = all ]; then
    echo "== flexbwd compute-sanitizer (logs: $LOG/san_*.log)"
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    cat > "$LOG/san_workload.py" <<'PYEOF'
# Tiny workload of each new kernel: the block-sparse backward with the block classification
# (GQA, lengths that are not tile multiples, captured CuPy table + document mask) and the dense
# one (softcap).
import math

import cupy as cp
import numpy as np

import xattn

rng = np.random.default_rng(0)
table = cp.asarray(rng.standard_normal((4, 16)).astype(np.float32))
doc = cp.asarray(np.repeat(np.arange(4, dtype=np.int32), 40)[None].repeat(2, 0))


def tab(score, b, h, q_idx, kv_idx):
    return score + table[h, min(abs(kv_idx - q_idx), 15)]


def softcap(score, b, h, q_idx, kv_idx):
    return 5.0 * math.tanh(score / 5.0)


def docs(b, h, q_idx, kv_idx):
    return doc[b, q_idx] == doc[b, kv_idx]


for smod, mmod in ((tab, docs), (softcap, None)):
    q, k, v, do = (cp.asarray(rng.standard_normal((2, h, s, 64)).astype(np.float16))
                   for h, s in ((4, 150), (2, 140), (2, 140), (4, 150)))
    out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod, return_lse=True,
                                    backend="cupy")
    g = xattn.flex_attention_backward(do, q, k, v, out, lse, score_mod=smod, mask_mod=mmod,
                                      backend="cupy")
    cp.cuda.Device().synchronize()
    print(smod.__name__, mmod.__name__ if mmod else None, "finite:",
          all(bool(cp.isfinite(x).all()) for x in g[:3]))
PYEOF
    if [ -z "$SAN" ]; then
        echo "compute-sanitizer not found"
        RC=1
    else
        # Once without the sanitizer: NVRTC's output lands in CuPy's disk cache.
        timeout 40 $PY "$LOG/san_workload.py" > "$LOG/san_warm.log" 2>&1
        echo "warm-up rc=$? $(grep -c 'finite: True' "$LOG/san_warm.log")/2 finite"
        for tool in memcheck racecheck; do
            timeout 40 "$SAN" --tool "$tool" $PY "$LOG/san_workload.py" \
                > "$LOG/san_$tool.log" 2>&1
            T=$?
            grep -E "finite:|ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san_$tool.log"
            echo "flexbwd san $tool rc=$T"
            RC=$(( RC || T ))
        done
    fi
fi

if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
    echo
    echo "== flexbwd table"
    grep -A3 -E '^flex attention backward' "$LOG/bench.log" || tail -n 5 "$LOG/bench.log"
fi
exit $RC
