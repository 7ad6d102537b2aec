#!/usr/bin/env bash
# GPU check of the `flex32` branch (issue #13, fp32): flex_attention on float32 CuPy arrays runs
# the user's score_mod/mask_mod inside the 3xTF32 tensor-core forward (flash_fwd_tf32.cu).
#
#   bash tools/gpu_check_flex32.sh tests   tests/gpu/test_gpu_flex_tc32.py (float64 oracle, CPU
#                                          flex kernel, TF32 when allowed; < 90 s)
#   bash tools/gpu_check_flex32.sh bench   benchmarks/gpu_flex.py --dtype float32 --seq 16384:
#                                          xattn 3xTF32 beside torch.compile(flex_attention) in
#                                          fp32 (torch's default precision, TF32 not enabled),
#                                          plus plain TF32 and the old numba_cuda route at
#                                          S=2048; markdown table last (< 90 s)
#   bash tools/gpu_check_flex32.sh san     compute-sanitizer memcheck, then racecheck, on one
#                                          tiny workload per new entry (3xTF32 flex / flex_bm,
#                                          TF32 flex_bm; < 60 s)
#   bash tools/gpu_check_flex32.sh         all three
#
# Run from anywhere on the GPU machine; logs under $OUT/flex32 (default ./gpu_out/flex32).
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$PWD/gpu_out}
LOG="$OUT/flex32"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
MODE=${1:-all}
rc=0

run_tests() {
    echo "== flex32 tests (log: $LOG/tests.log)"
    local xdist=""
    if $PY -c "import xdist" 2>/dev/null; then xdist="-n 8"; fi
    timeout 90 $PY -m pytest -m gpu -q -x -p no:cacheprovider $xdist -rs --tb=short \
        tests/gpu/test_gpu_flex_tc32.py \
        "tests/gpu/test_gpu_flex_tc.py::test_forced_cupy_refuses_float64" \
        > "$LOG/tests.log" 2>&1
    local r=$?
    grep -E "^(FAILED|ERROR|SKIPPED)" "$LOG/tests.log" | head -30
    tail -n 3 "$LOG/tests.log"
    echo "flex32 tests exit status: $r (124 = cut by the 90 s cap)"
    [ $r -eq 0 ] || rc=1
}

run_bench() {
    echo "== flex32 bench (log: $LOG/bench.log)"
    timeout 90 $PY benchmarks/gpu_flex.py --dtype float32 --seq 16384 --repeats 5 \
        --numba-seq 2048 --allow-tf32 --json "$LOG/bench.json" > "$LOG/bench.log" 2>&1
    local r=$?
    tail -n 25 "$LOG/bench.log"
    echo "flex32 bench exit status: $r (124 = cut by the 90 s cap)"
    [ $r -eq 0 ] || rc=1
    $PY - "$LOG/bench.json" <<'EOF'
import json, sys
try:
    res = json.load(open(sys.argv[1]))
except Exception as exc:  # noqa: BLE001
    print(f"(no table: {exc})")
    sys.exit(0)
print(f"\n### flex fp32, causal mask_mod + ALiBi score_mod, H={res['heads']} D={res['head_dim']}, "
      f"{res['card']}; torch: compiled FlexAttention fp32, float32 matmul "
      f"{res.get('torch_fp32_matmul')} (not changed by the benchmark)\n")
print("| S | xattn route | ms | TFLOP/s | against | ms | TFLOP/s | xattn/against | max err |")
print("|---|---|---|---|---|---|---|---|---|")
rows = [{"seq": r["seq"], "route": "cupy 3xTF32", "xattn_ms": r["xattn_ms"],
         "xattn_tflops": r["xattn_tflops"], "against": "torch", "against_ms": r["torch_ms"],
         "against_tflops": r["torch_tflops"], "max_err": r["max_err"]} for r in res["rows"]]
for r in rows + res.get("extra", []):
    if "error" in r:
        print(f"| {r['seq']} | {r['route']} | unavailable: {r['error'][:80]} | | | | | | |")
        continue
    print(f"| {r['seq']} | {r['route']} | {r['xattn_ms']:.2f} | {r['xattn_tflops']:.2f} | "
          f"{r['against']} | {r['against_ms']:.2f} | {r['against_tflops']:.2f} | "
          f"{r['xattn_tflops'] / r['against_tflops']:.2f} | {r['max_err']:.1e} |")
EOF
}

run_san() {
    echo "== flex32 compute-sanitizer (logs: $LOG/san_*.log)"
    local san
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    if [ -z "$san" ]; then echo "compute-sanitizer not found"; rc=1; return; fi
    cat > "$LOG/san_workload.py" <<'EOF'
# One tiny call per new entry: 3xTF32 flex_bm (ALiBi + causal mask_mod, GQA, lengths off the
# tiles), 3xTF32 flex (score_mod only), TF32 flex_bm (document mask_mod, T5-like table).
import cupy as cp
import numpy as np

import xattn

rng = np.random.default_rng(0)
q = cp.asarray(rng.standard_normal((1, 4, 100, 64)).astype(np.float32))
k = cp.asarray(rng.standard_normal((1, 2, 130, 64)).astype(np.float32))
v = cp.asarray(rng.standard_normal((1, 2, 130, 64)).astype(np.float32))
slopes = xattn.alibi_slopes(4)
doc = cp.asarray((np.arange(130) // 40).astype(np.int32))
table = cp.asarray(rng.standard_normal((4, 9)).astype(np.float32))


def alibi(score, b, h, q_idx, kv_idx):
    return score - slopes[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def rel(score, b, h, q_idx, kv_idx, table):
    return score + table[h, min(abs(q_idx - kv_idx), 8)]


def documents(b, h, q_idx, kv_idx):
    return doc[q_idx] == doc[kv_idx]


outs = [xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal, backend="cupy"),
        xattn.flex_attention(q, k, v, score_mod=alibi, backend="cupy"),
        xattn.flex_attention(q, k, v, score_mod=rel, mask_mod=documents, score_mod_args=(table,),
                             allow_tf32=True, backend="cupy")]
cp.cuda.Device().synchronize()
print("workload ok:", [float(cp.abs(o).max()) for o in outs])
EOF
    # Compile (NVRTC, CuPy's disk cache) outside the sanitizer first.
    timeout 30 $PY "$LOG/san_workload.py" > "$LOG/san_warm.log" 2>&1 || {
        tail -n 20 "$LOG/san_warm.log"; rc=1; return; }
    for tool in memcheck racecheck; do
        timeout 25 "$san" --tool $tool $PY "$LOG/san_workload.py" > "$LOG/san_$tool.log" 2>&1
        local r=$?
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|workload ok" "$LOG/san_$tool.log" \
            || tail -n 10 "$LOG/san_$tool.log"
        echo "compute-sanitizer $tool exit status: $r"
        [ $r -eq 0 ] || rc=1
    done
}

case "$MODE" in
    tests) run_tests ;;
    bench) run_bench ;;
    san) run_san ;;
    all) run_tests; run_san; run_bench ;;
    *) echo "usage: $0 [tests|bench|san]"; exit 2 ;;
esac
exit $rc
