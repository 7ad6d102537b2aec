#!/usr/bin/env bash
# GPU check of the `bmparams` branch (issue #10: the block mask in the parameter block). The
# block mask is validated once into AttnProblem.block_mask; the CuPy launchers read it from the
# problem and take its device arrays from _params.block_mask_args (the per-(mask, device) cache
# of blockmask.py); no CUDA source changed. Runs the GPU tests that walk block masks (forward,
# backward, float32 SIMT, dispatch and refusals, the tf32x3 refusal, every table entry x option
# set), then times small and mid-size block-mask calls beside the dense ones in the same
# process (public API only, so the same snippet run on main gives the anchor). Under 2 min;
# logs in $OUT (or a temp dir), the table printed last.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
log="$OUT/pytest_bmparams.log"

echo "== pytest (log: $log)"
timeout 75 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider tests/gpu/test_gpu_blockmask.py \
    tests/gpu/test_gpu_blockmask_bwd.py tests/gpu/test_gpu_flash_tf32x3.py \
    tests/gpu/test_gpu_entries.py > "$log" 2>&1
rc_tests=$?
grep -E "^(FAILED|ERROR)" "$log" | head -40
tail -n 3 "$log"
echo "pytest exit status: $rc_tests (124 = cut by the 75 s cap)"

echo "== timing (log: $OUT/timing_bmparams.log)"
timeout 45 python3 - > "$OUT/timing_bmparams.log" 2>&1 <<'EOF'
import time

import cupy as cp
import numpy as np

import xattn
from xattn._array import validate_attention
from xattn._backends import explain


def route(q, k, v, bm):
    try:  # this branch: the mask travels in the problem
        return explain(validate_attention(q, k, v, block_mask=bm), {})["backend"]
    except TypeError:  # main before it: the mask was an option of the table
        return explain(validate_attention(q, k, v), {"block_mask": bm})["backend"]


def ms(fn, reps):
    fn()
    cp.cuda.Device().synchronize()
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        cp.cuda.Device().synchronize()
        best.append((time.perf_counter() - t0) / reps * 1e3)
    return min(best)


rng = np.random.default_rng(0)
rows = []
# D = 64 and 64 x 64 blocks: the kernels the tests above compiled (no NVRTC wait here).
for s, d, reps in ((256, 64, 200), (4096, 64, 10)):
    q, k, v = (cp.asarray(rng.standard_normal((2, 8, s, d)).astype(np.float16))
               for _ in range(3))
    bm = xattn.BlockMask.causal(s, block_size=64)
    name = route(q, k, v, bm)
    out, lse = xattn.flash_attention(q, k, v, block_mask=bm, return_lse=True)
    dout = cp.ones_like(out)
    dense = ms(lambda: xattn.flash_attention(q, k, v, causal=True, backend="cupy.sm80"), reps)
    sparse = ms(lambda: xattn.flash_attention(q, k, v, block_mask=bm), reps)
    dense_b = ms(lambda: xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True),
                 reps)
    sparse_b = ms(lambda: xattn.flash_attention_backward(dout, q, k, v, out, lse,
                                                         block_mask=bm), reps)
    rows.append((s, d, name, dense, sparse, dense_b, sparse_b))

print("| S | D | block-mask route | fwd causal ms | fwd block mask ms | ratio "
      "| bwd causal ms | bwd block mask ms | ratio |")
print("|---|---|---|---|---|---|---|---|---|")
for s, d, name, a, b, c, e in rows:
    print(f"| {s} | {d} | {name} | {a:.3f} | {b:.3f} | {b / a:.2f} | {c:.3f} | {e:.3f} "
          f"| {e / c:.2f} |")
EOF
rc_time=$?
echo "pytest exit $rc_tests, timing exit $rc_time; logs in $OUT"
echo
cat "$OUT/timing_bmparams.log"
