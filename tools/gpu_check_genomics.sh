#!/usr/bin/env bash
# GPU check of issue #14 (ring attention over MPI and NCCL, the genomics pipeline), for the
# device machine (root, Open MPI's mpiexec, mpi4py, CuPy). From the repository root:
#
#     OUT=/some/dir bash tools/gpu_check_genomics.sh
#
# Steps, each under its own time limit so that the whole run stays under 3 minutes:
#   b) one GPU, 1,000,000 bp, 4 layers, float16: per-layer seconds (device synchronised),
#      target < 1 s per layer;
#   c) mpiexec -n 2 on the GPU (ranks share it; ring attention over MPI, host staging),
#      200,000 bp;
#   a) pytest -m gpu (4 xdist workers if available): tests/test_distributed.py (two MPI
#      ranks sharing the GPU, float16),
#      tests/test_distributed_nccl.py (NcclComm of one rank: ring forward/backward, transport),
#      tests/test_distributed_genomics.py (pipeline on the GPU against the CPU, under mpiexec).
# Logs, summaries and the attention-mass plots go under $OUT; a short table is printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Open MPI refuses to start as root without these (MPICH ignores them).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=${PYTHON:-python3}
START=$SECONDS
BUDGET=170  # seconds for all steps together

{
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader
  $PY - <<'EOF'
import cupy, numpy
print("cupy", cupy.__version__, "numpy", numpy.__version__)
try:
    from cupy.cuda import nccl
    print("nccl available:", getattr(nccl, "available", False),
          nccl.get_version() if getattr(nccl, "available", False) else "")
except Exception as exc:  # noqa: BLE001
    print("nccl: import failed:", exc)
try:
    import mpi4py
    from mpi4py import MPI
    print("mpi4py", mpi4py.__version__, MPI.Get_library_version().splitlines()[0])
except Exception as exc:  # noqa: BLE001
    print("mpi4py: import failed:", exc)
EOF
  command -v mpiexec
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

summary_line() {  # $1 = summary.json: per-layer seconds and the attention masses
  $PY - "$1" <<'EOF' 2>/dev/null || echo "no summary.json"
import json, sys
s = json.load(open(sys.argv[1]))
layers = ", ".join(f"{t:.3f}" for t in s["layer_s"])
print(f"{s['bases']:,} bp x {s['ranks']} rank(s), {s['dtype']} on {s['device']}: "
      f"layers [{layers}] s, max {max(s['layer_s']):.3f} s; warm-up {s['warmup_s']:.1f} s, "
      f"embedding {s['embed_s']:.3f} s; mass in repeats {s['mass_in_repeats']:.3f}, "
      f"elsewhere {s['mass_elsewhere']:.4f}")
EOF
}

# b) one GPU, 1,000,000 bp
t0=$SECONDS
timeout 75 $PY examples/genomics/pipeline.py --length 1000000 --device gpu --layers 4 \
  --no-progress --out "$OUT/genomics" > "$OUT/genomics.log" 2>&1
rc_b=$?
t_b=$((SECONDS - t0))
rm -f "$OUT/genomics/hidden.npy"  # 512 MB of float32 hidden states: not worth carrying back
tail -5 "$OUT/genomics.log"
line_b=$(summary_line "$OUT/genomics/summary.json")
echo "b) $line_b"

# c) two MPI ranks sharing the GPU, 200,000 bp
t0=$SECONDS
timeout 45 mpiexec -n 2 $PY examples/genomics/pipeline.py --length 200000 --device gpu --mpi \
  --layers 4 --no-progress --out "$OUT/genomics_mpi" > "$OUT/genomics_mpi.log" 2>&1
rc_c=$?
t_c=$((SECONDS - t0))
rm -f "$OUT/genomics_mpi/hidden.npy"
tail -5 "$OUT/genomics_mpi.log"
line_c=$(summary_line "$OUT/genomics_mpi/summary.json")
echo "c) $line_c"

# a) the GPU tests, in the time left (GENOMICS_SKIP_TESTS=1: not here, e.g. when the whole GPU
#    suite runs in the same call anyway)
rc_a=-; t_a=0; line_a="skipped (GENOMICS_SKIP_TESTS)"
if [ -z "${GENOMICS_SKIP_TESTS:-}" ]; then
left=$((BUDGET - (SECONDS - START)))
[ "$left" -lt 30 ] && left=30
xdist=""  # the tests are independent: spread them over 4 workers when pytest-xdist is there
$PY -c "import xdist" 2>/dev/null && xdist="-n 4"
t0=$SECONDS
timeout "$left" $PY -m pytest -m gpu -v -p no:cacheprovider $xdist \
  tests/test_distributed.py tests/test_distributed_nccl.py tests/test_distributed_genomics.py \
  --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
rc_a=$?
t_a=$((SECONDS - t0))
tail -40 "$OUT/pytest_gpu.log"
line_a=$(grep -E "^=+ .*(passed|failed|error|skipped|deselected|no tests ran)" \
  "$OUT/pytest_gpu.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
[ "$rc_a" -eq 124 ] && line_a="timed out after ${left} s: $line_a"
fi

echo
echo "== issue #14 on $(head -1 "$OUT/environment.txt") (total $((SECONDS - START)) s) =="
printf '%-34s %4s %5s  %s\n' "step" "rc" "s" "result"
printf '%-34s %4s %5s  %s\n' "a) pytest -m gpu (3 files)" "$rc_a" "$t_a" "$line_a"
printf '%-34s %4s %5s  %s\n' "b) pipeline 1M bp, 1 GPU" "$rc_b" "$t_b" "$line_b"
printf '%-34s %4s %5s  %s\n' "c) mpiexec -n 2, 200k bp, 1 GPU" "$rc_c" "$t_c" "$line_c"
echo "target (b): every layer < 1 s"
