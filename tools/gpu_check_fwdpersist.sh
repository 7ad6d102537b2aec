#!/usr/bin/env bash
# GPU check of the `fwdpersist` branch (issue 11: persistent scheduling of the Hopper forward,
# mode 43 = 11 + bit 5). Needs a compute capability 9.0 card.
#
#   bash tools/gpu_check_fwdpersist.sh tests   # GPU tests of mode 43 (< 90 s)
#   bash tools/gpu_check_fwdpersist.sh bench   # tools/gpu_fwdpersist_bench.py (< 90 s), table last
#   bash tools/gpu_check_fwdpersist.sh san     # compute-sanitizer memcheck + racecheck (< 60 s)
#   bash tools/gpu_check_fwdpersist.sh all     # the three in that order
#
# Every mode first compiles the sm_90a cubins of the mode-43 entries in parallel processes
# (disk cache $XATTN_CACHE_DIR, shared by the pytest workers). Run from the repository root on
# the device's python3; logs under $OUT/fwdpersist/.
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
OUT=${OUT:-$PWD/gpu_out}
LOG="$OUT/fwdpersist"
mkdir -p "$LOG"
export XATTN_CACHE_DIR=${XATTN_CACHE_DIR:-$LOG/cubins}
PY=${PYTHON:-python3}
MODE=${1:-all}

precompile() {
    echo "== precompile sm_90a entries ($(date -u +%H:%M:%S))"
    timeout 80 $PY - <<'PYEOF' 2>&1 | tee "$LOG/precompile.log" | tail -n 5
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

todo = [i for i in instances.shipped() if i.source == "flash_fwd_sm90.cu"
        and ("_o43" in i.name or i.name.endswith(("g3_o11", "g2_o11")))]
items = [(i.name, i.defines) for i in todo]
t0 = time.time()
with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as ex:
    for line in ex.map(one, items):
        print(line)
print(f"{len(items)} entries in {time.time() - t0:.1f} s")
PYEOF
}

run_tests() {
    echo "== tests ($(date -u +%H:%M:%S))"
    XDIST=""
    if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 12"; fi
    timeout 85 $PY -m pytest -m gpu -q -x -p no:cacheprovider $XDIST -rs --tb=short \
        tests/gpu/test_gpu_flash_sm90.py tests/gpu/test_gpu_sm90_mods.py -k persistent \
        > "$LOG/tests.log" 2>&1
    TEST_RC=$?
    grep -E "FAILED|ERROR|Error|error" "$LOG/tests.log" | head -n 30
    tail -n 3 "$LOG/tests.log"
    echo "tests rc=$TEST_RC"
    return $TEST_RC
}

run_bench() {
    echo "== bench ($(date -u +%H:%M:%S))"
    timeout 88 $PY tools/gpu_fwdpersist_bench.py --budget 78 --repeats 20 \
        > "$LOG/bench.log" 2>&1
    BENCH_RC=$?
    tail -n 30 "$LOG/bench.log"
    echo "bench rc=$BENCH_RC"
    return $BENCH_RC
}

run_san() {
    echo "== compute-sanitizer ($(date -u +%H:%M:%S))"
    cat > "$LOG/san_workload.py" <<'PYEOF'
# One tiny launch of each mode-43 entry kind, on 2 "SMs" so that every block walks several
# tiles (long, short and empty causal rows): plain D=64 (3 consumers) and D=128, _mods
# (ALiBi, D=128), _bm (a block mask with an empty block row, D=64), _mods_bm (D=128).
import os

os.environ["XATTN_POISON"] = "1"  # outputs NaN before each launch: the check below means it
import cupy as cp
import numpy as np
import xattn
from xattn._array import validate_attention
from xattn._backends.cupy_ import flash_sm90 as k90

k90._params.sm_count = lambda: 2
rng = np.random.default_rng(0)

def qkv(d, sq, sk):
    return [cp.asarray(rng.standard_normal((1, 2, s, d)), dtype=cp.float16)
            for s in (sq, sk, sk)]

def run(q, k, v, cfg, **opts):
    prob = validate_attention(q, k, v, **opts)
    out, lse = k90.forward(prob, q, k, v, config=cfg)
    cp.cuda.Device().synchronize()
    assert not bool(cp.isnan(out).any()), cfg

run(*qkv(64, 500, 300), (64, 3, 43), causal=True)
run(*qkv(128, 400, 260), (128, 2, 43), causal=True)
slopes = cp.asarray(xattn.alibi_slopes(2), dtype=cp.float32)
run(*qkv(128, 400, 260), (64, 2, 43), causal=True, alibi_slopes=slopes)
dense = rng.random((400, 260)) < 0.5
dense[128:256] = False
q, k, v = qkv(64, 400, 260)
run(q, k, v, (128, 2, 43), block_mask=xattn.BlockMask.from_dense(dense, block_size=128))
q, k, v = qkv(128, 400, 260)
run(q, k, v, (64, 2, 43), alibi_slopes=slopes,
    block_mask=xattn.BlockMask.from_dense(dense, block_size=(128, 64)))
print("workload done")
PYEOF
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
echo "== fwdpersist $MODE rc=$RC (logs in $LOG)"
exit $RC
