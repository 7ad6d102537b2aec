#!/usr/bin/env bash
# Runs on the GPU machine (repository root): environment report, SASS check of the forward
# kernel, the GPU tests, then the benchmark. Exit status: non-zero if tests or checks failed.
# Usage: bash benchmarks/gpu_run.sh [benchmark options, e.g. --quick --configs --flex]
# Environment: XATTN_SKIP_BENCH=1 skips the benchmark; XATTN_TESTS=path narrows the tests.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/xattn_gpu_out}
export OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv,noheader || true
python3 - <<'PY'
import cupy, numpy, ml_dtypes
print("cupy", cupy.__version__, "numpy", numpy.__version__)
try:
    a = cupy.asarray(numpy.arange(4, dtype=ml_dtypes.bfloat16))
    print("cupy bfloat16 arrays:", a.dtype, a.get())
except Exception as exc:
    print("cupy bfloat16 arrays: NOT supported:", exc)
PY

# SASS: the mma.sync path must show HMMA (tensor cores), LDSM (ldmatrix), LDGSTS (cp.async).
if command -v nvcc >/dev/null && command -v cuobjdump >/dev/null; then
    nvcc -std=c++17 -cubin -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
        -DXATTN_TN=f16 -DXATTN_D=128 -DXATTN_NW=4 -DXATTN_MT=1 -DXATTN_BN=64 \
        -DXATTN_MN=plain -DXATTN_MODS=false xattn/kernels/flash_fwd.cu -o "$OUT/fwd.cubin" \
        2>&1 | grep -E "registers|spill" || true
    cuobjdump --dump-sass "$OUT/fwd.cubin" > "$OUT/fwd_sass.txt" 2>&1
    for op in HMMA LDSM LDGSTS MUFU.EX2 LDL STL; do
        printf '  SASS %-9s %s\n' "$op" "$(grep -c "$op" "$OUT/fwd_sass.txt")"
    done
    rm -f "$OUT/fwd.cubin"
fi

# compute-sanitizer (memcheck, racecheck) over the kernels on small shapes.
if command -v compute-sanitizer >/dev/null; then
    cat > /tmp/xattn_sanitize.py <<'PY'
import cupy as cp, numpy as np, xattn
rng = np.random.default_rng(0)
def arr(shape):
    return cp.asarray(rng.standard_normal(shape), dtype=cp.float16)
for d, opts in [(64, dict(causal=True)), (128, dict(window=(5, 9))), (128, dict(causal=True)),
                (64, dict(softcap=5.0, mask=cp.asarray(rng.random((70, 90)) < 0.5))),
                (256, dict(causal=True)), (40, {})]:
    q, k, v = arr((1, 4, 70, d)), arr((1, 2, 90, d)), arr((1, 2, 90, d))
    xattn.flash_attention(q, k, v, backend="cupy", **opts)
cp.cuda.Device().synchronize()
print("sanitizer workload done")
PY
    for tool in memcheck racecheck; do
        timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 \
            python3 /tmp/xattn_sanitize.py > "$OUT/sanitize_$tool.log" 2>&1
        rc=$?
        echo "  compute-sanitizer $tool: rc=$rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' \
            "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
        [ $rc -eq 0 ] || status=1
    done
fi

xdist=""
python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout 300 python3 -m pytest -m gpu ${XATTN_TESTS:-tests} -q -p no:cacheprovider $xdist 2>&1 \
    | tee "$OUT/pytest.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -z "${XATTN_SKIP_BENCH:-}" ]; then
    timeout 420 python3 benchmarks/gpu_flash.py "$@" || status=1
fi
exit $status
