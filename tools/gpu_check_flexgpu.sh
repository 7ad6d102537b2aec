#!/usr/bin/env bash
# GPU check of the `flexgpu` branch (issue #13, GPU part): flex_attention's score_mod/mask_mod
# translated to CUDA C and compiled into the mma.sync forward (backend="cupy").
#   1. tests/gpu/test_gpu_flex_tc.py: against the float64 oracle and the CPU flex kernel
#      (ALiBi, T5 table, softcap, documents, causal, window; fp16/bf16; D 64/128; GQA);
#   2. benchmarks/gpu_flex.py: S=16384, D=64, 16 heads, causal mask_mod + ALiBi score_mod,
#      fp16, xattn backend="cupy" beside torch.compile(flex_attention) in the same run.
# Run from the repository root with PYTHONPATH=$PWD; logs under $OUT (default ./gpu_out).
# About 1.5-2 minutes (NVRTC compiles one module per tested function pair, torch compiles).
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

echo "== environment"
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import sys
print("python", sys.version.split()[0])
for name in ("numpy", "cupy", "torch", "numba"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "unavailable:", type(exc).__name__, exc)
try:
    import cupy
    dev = cupy.cuda.Device()
    print("device", cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode(),
          "cc", dev.compute_capability)
except Exception as exc:  # noqa: BLE001
    print("cupy device: unavailable:", exc)
EOF

echo "== tests (tests/gpu/test_gpu_flex_tc.py)"
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
timeout 300 $PY -m pytest -m gpu tests/gpu/test_gpu_flex_tc.py -q -x -p no:cacheprovider \
    $XDIST -rs --tb=long > "$OUT/tests.log" 2>&1
TEST_RC=$?
tail -n 60 "$OUT/tests.log"

echo "== benchmark (benchmarks/gpu_flex.py --dtype float16 --seq 16384)"
timeout 240 $PY benchmarks/gpu_flex.py --dtype float16 --seq 16384 --repeats 10 \
    --json "$OUT/flex_fp16.json" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
cat "$OUT/bench.log" | tail -n 40

echo
echo "== summary (logs in $OUT)"
echo "tests rc=$TEST_RC: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
echo "benchmark rc=$BENCH_RC:"
grep -A3 -E '^flex attention' "$OUT/bench.log" || tail -n 5 "$OUT/bench.log"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
