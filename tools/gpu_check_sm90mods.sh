#!/usr/bin/env bash
# GPU check of the `sm90mods` branch (issue 11: score mods and block_mask on the wgmma path;
# issue 13: flex_attention on wgmma on Hopper). Needs a compute capability 9.0 card.
#
#   bash tools/gpu_check_sm90mods.sh tests   # GPU tests (< 90 s)
#   bash tools/gpu_check_sm90mods.sh bench   # benchmarks/gpu_sm90_mods.py (< 90 s), table last
#   bash tools/gpu_check_sm90mods.sh san     # compute-sanitizer memcheck + racecheck (< 60 s)
#   bash tools/gpu_check_sm90mods.sh all     # the three in that order
#
# Every mode first compiles the sm_90a cubins of the new entries in parallel processes (disk
# cache $XATTN_CACHE_DIR, shared by the pytest workers). Run from the repository root on the
# device's python3; logs under $OUT/sm90mods/.
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
OUT=${OUT:-$PWD/gpu_out}
LOG="$OUT/sm90mods"
mkdir -p "$LOG"
export XATTN_CACHE_DIR=${XATTN_CACHE_DIR:-$LOG/cubins}
PY=${PYTHON:-python3}
MODE=${1:-all}

precompile() {
    echo "== precompile sm_90a entries ($(date -u +%H:%M:%S))"
    timeout 80 $PY - <<'EOF' 2>&1 | tee "$LOG/precompile.log" | tail -n 5
import os, time
from concurrent.futures import ProcessPoolExecutor
from xattn._backends.cupy_ import _compile, instances

def one(item):
    name, defines = item
    t = time.time()
    try:
        _compile.cubin_path(_compile.source("flash_fwd_sm90.cu"), defines)
        return f"{name}: {time.time() - t:.1f} s"
    except Exception as exc:  # reported, the tests raise it again
        return f"{name}: FAILED {str(exc)[-800:]}"

todo = [i for i in instances.shipped() if i.source == "flash_fwd_sm90.cu"]
todo.append(instances.sm90("f16", 64, (128, 2, 27), True, True))  # test_explicit_configs
todo += [i for i in instances.experimental() if i.name.endswith("_o27")]  # warp_specialised
items = [(i.name, i.defines) for i in todo]
t0 = time.time()
with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as ex:
    for line in ex.map(one, items):
        print(line)
print(f"{len(items)} entries in {time.time() - t0:.1f} s")
EOF
}

run_tests() {
    echo "== tests ($(date -u +%H:%M:%S))"
    XDIST=""
    if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 12"; fi
    timeout 85 $PY -m pytest -m gpu -q -x -p no:cacheprovider $XDIST -rs --tb=short \
        tests/gpu/test_gpu_sm90_mods.py tests/gpu/test_gpu_flex_tc.py \
        tests/gpu/test_gpu_flash_sm90.py::test_dispatch \
        tests/gpu/test_gpu_flash_sm90.py::test_supports_and_switch \
        tests/gpu/test_gpu_flash_sm90.py::test_forward_warp_specialised \
        "tests/gpu/test_gpu_entries.py::test_entry_against_the_oracle" \
        "tests/gpu/test_gpu_entries.py::test_entry_block_mask_against_the_oracle" \
        -k "sm90 or flex_tc" \
        > "$LOG/tests.log" 2>&1
    TEST_RC=$?
    grep -E "FAILED|ERROR|Error|error" "$LOG/tests.log" | head -n 30
    tail -n 3 "$LOG/tests.log"
    echo "tests rc=$TEST_RC"
    return $TEST_RC
}

run_bench() {
    echo "== bench ($(date -u +%H:%M:%S))"
    timeout 88 $PY benchmarks/gpu_sm90_mods.py --budget 75 --repeats 10 \
        --json "$LOG/bench.json" > "$LOG/bench.log" 2>&1
    BENCH_RC=$?
    cat "$LOG/bench.log" | tail -n 30
    echo "bench rc=$BENCH_RC"
    return $BENCH_RC
}

run_san() {
    echo "== compute-sanitizer ($(date -u +%H:%M:%S))"
    cat > "$LOG/san_workload.py" <<'EOF'
# One tiny launch of each new entry kind: _mods (D=64, 3 consumers), _bm (partial tile
# blocks), _mods_bm (D=128, 64-key tiles), flex _flex_bm (mask_mod + score_mod).
import cupy as cp
import numpy as np
import xattn

rng = np.random.default_rng(0)

def qkv(d, sq, sk, dtype=cp.float16):
    return [cp.asarray(rng.standard_normal((1, 2, s, d)), dtype=dtype) for s in (sq, sk, sk)]

q, k, v = qkv(64, 200, 260)
slopes = cp.asarray(xattn.alibi_slopes(2), dtype=cp.float32)
xattn.flash_attention(q, k, v, alibi_slopes=slopes, softcap=5.0, causal=True,
                      backend="cupy.sm90")
dense = rng.random((200, 260)) < 0.5
bm = xattn.BlockMask.from_dense(dense, block_size=128)
xattn.flash_attention(q, k, v, block_mask=bm, backend="cupy.sm90")
q, k, v = qkv(128, 200, 260)
bm = xattn.BlockMask.from_dense(dense, block_size=(128, 64))
xattn.flash_attention(q, k, v, block_mask=bm, alibi_slopes=slopes, backend="cupy.sm90")
q, k, v = qkv(64, 200, 260)
SL = xattn.alibi_slopes(2, dtype=np.float64)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SL[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal, backend="cupy")
cp.cuda.Device().synchronize()
print("workload done")
EOF
    timeout 50 $PY "$LOG/san_workload.py" > "$LOG/san_plain.log" 2>&1
    tail -n 2 "$LOG/san_plain.log"
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer not found"
        return 1
    fi
    SAN_RC=0
    for tool in memcheck racecheck; do
        timeout 55 compute-sanitizer --tool $tool --error-exitcode 3 --print-limit 20 \
            $PY "$LOG/san_workload.py" > "$LOG/san_$tool.log" 2>&1 &
    done
    wait
    for tool in memcheck racecheck; do
        echo "-- $tool: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san_$tool.log" \
            | tail -n 1)"
        grep -qE "(ERROR|RACECHECK) SUMMARY: 0 " "$LOG/san_$tool.log" || SAN_RC=1
    done
    return $SAN_RC
}

RC=0
case "$MODE" in
    tests) precompile; run_tests || RC=1 ;;
    bench) precompile; run_bench || RC=1 ;;
    san) precompile; run_san || RC=1 ;;
    all) precompile; run_tests || RC=1; run_bench || RC=1; run_san || RC=1 ;;
    *) echo "usage: $0 tests|bench|san|all"; exit 2 ;;
esac
echo "== sm90mods $MODE rc=$RC (logs in $LOG)"
exit $RC
