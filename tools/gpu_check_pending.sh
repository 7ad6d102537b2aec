#!/usr/bin/env bash
# What waits for a device (updated 2026-12-06, fourth session), each part one device call.
# Needs a compute capability 9.0 GPU. Logs under $OUT/pending/ (or a temp dir).
# Waiting: the whole suite's part 2 after this session's changes (bash tools/gpu_suite.sh 2:
# part 1 passed with them, part 2 only before them), then `bench` on an H200 when one is lent.
#   bash tools/gpu_check_pending.sh switches (< 8 min): the Hopper kernels' compile-time
#       switches -- forward: XATTN90_LAZY (lazy rescaling, off), XATTN90_NWG1_BLOCKS (blocks
#       an SM for the window row's entry, 3); backward: XATTN90_BWD_EDGE_ROWS (the largest head
#       dim whose edge tiles are masked by intervals, 64) -- their tests
#       (tests/gpu/test_gpu_fwd_switches.py: the two-block build bit for bit against the
#       shipped one, LAZY against float64; the persistent mode, whose grid is the resident
#       blocks, against mode 75; tests/gpu/test_gpu_sm90_bwd_switches.py: builds at 0 and 128
#       bit for bit against the shipped one), then tools/gpu_fwd_variants.py and
#       tools/gpu_bwd_variants.py (each build beside the shipped one). Ran on an H100
#       (2026-12-06): BWD_EDGE_ROWS went to 64, LAZY stays off
#   bash tools/gpu_check_pending.sh short   (< 5 min): tools/gpu_fwd_short.py --twins, the
#       one-consumer configurations against the default on S = 1024-4096 and windows up to
#       +-1024 (instances.SM90_SHORT's thresholds and choices; ran on an H100, 2026-12-06:
#       D = 64 short spans without a window moved to (64, 1, 203))
#   bash tools/gpu_check_pending.sh wide    (< 7 min): D = 128's 176-key tile (SM90_LONG):
#       sanitizers, the persistent configurations' long test thrice, tools/gpu_fwd_variants.py
#   bash tools/gpu_check_pending.sh profile (< 3 min): Nsight Compute on issue 11's window row
#       (tools/gpu_fwd_short.py --profile: modes 203 / 235 and the two-consumer default), the
#       sections that say where the time goes (speed of light, warp states, occupancy,
#       scheduler, pipe utilisation and instruction mix), --clock-control none (H100,
#       2026-12-06: issue slots 45 % busy, no eligible warp 55 % of cycles, 2.4 warps a
#       scheduler; ALU the busiest pipe at 37 %)
#   bash tools/gpu_check_pending.sh bench   (< 5 min): the tables of issues 11 and 12 again
#       (benchmarks/gpu_flash.py --quick --only fwd,bwd,fp32,window; benchmarks/gpu_decode.py),
#       on an H200 when one is lent
#   bash tools/gpu_check_pending.sh san     (< 4 min): memcheck and racecheck on the TMA
#       backward entries with their window twins, the split-ring forward entries (D = 192 /
#       256, D = 128's 176-key tile) and every one-consumer forward entry
NAME=pending
# shellcheck source=tools/gpu_lib.sh
. "$(dirname "$0")/gpu_lib.sh"
what="${1:-switches}"
XDIST=$(xdist 12)
export PYTHONPATH="$PWD/tools:$PYTHONPATH" XATTN_FAILS_FILE="$LOG/failures.txt"

step() {  # step NAME SECONDS COMMAND...: gpu_step with the log named after the step
    local name=$1 cap=$2
    shift 2
    TAIL=${TAIL:-14} gpu_step "$name" "$cap" "$LOG/$name.log" "$@"
}

case "$what" in
switches)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    step switches_tests 240 $PY -m pytest -m gpu -q -p no:cacheprovider $XDIST -rs --tb=short \
        -p pytest_failures_now tests/gpu/test_gpu_fwd_switches.py \
        tests/gpu/test_gpu_flash_sm90.py::test_persistent_matches_mode_75_bitwise \
        tests/gpu/test_gpu_sm90_bwd_switches.py
    TAIL=16 step switches_bench 150 $PY tools/gpu_fwd_variants.py
    TAIL=12 step switches_bwd_bench 150 $PY tools/gpu_bwd_variants.py
    ;;
wide)
    # D = 128's 176-key tile (instances.SM90_LONG; flash_fwd_sm90_ws_kv): sanitizers on the
    # split-ring entries, the tile against the 128-key default and torch in alternating rounds;
    # the persistent configurations' long test three times over (one causal failure of
    # (64, 128, 1, 235) in one run of 2026-12-06 did not come back in the next).
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    NAME=pending_wide gpu_san 90 60 $PY tools/gpu_d256_bench.py --san
    # test_configs_long's ids number the built configurations in sorted order
    sel=$($PY -c "from xattn._backends.cupy_ import flash_sm90 as k
b = sorted((c[0], c[1:]) for c in k.BUILT)
print(' or '.join(f'config{i}-' for i, c in enumerate(b) if c[1][2] == 235))")
    for i in 1 2 3; do
        step "persist_$i" 60 $PY -m pytest -m gpu -q -p no:cacheprovider --tb=short \
            tests/gpu/test_gpu_flash_sm90.py -k "configs_long and ($sel)"
    done
    TAIL=16 step wide_bench 200 $PY tools/gpu_fwd_variants.py --variants base --only D=128 \
        --rounds 4 --no-flex
    ;;
profile)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
          2>/dev/null | head -n 1)
    timeout 60 $PY tools/gpu_fwd_short.py --profile > "$LOG/profile_warm.log" 2>&1
    if [ -n "$NCU" ]; then
        TAIL=120 step ncu_window 150 "$NCU" --clock-control none -k regex:flash_fwd_sm90 \
            --section SpeedOfLight --section WarpStateStats --section Occupancy \
            --section SchedulerStats --section LaunchStats \
            --section ComputeWorkloadAnalysis --section InstructionStats \
            $PY tools/gpu_fwd_short.py --profile
    else
        echo "ncu not found"
        RC=1
    fi
    ;;
short)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    TAIL=40 step short 280 $PY tools/gpu_fwd_short.py --twins --budget 230
    ;;
bench)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    step flash 300 $PY benchmarks/gpu_flash.py --quick --only fwd,bwd,fp32,window
    step decode 150 $PY benchmarks/gpu_decode.py --rounds 3 --max-reps 50 --no-host
    ;;
san)
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    step bwdtma_san 90 bash tools/gpu_check_bwdtma.sh san
    # The split-ring forward (flash_fwd_sm90_ws_kv): D = 192 / 256 and D = 128's 176-key tile.
    NAME=pending_wide gpu_san 90 60 $PY tools/gpu_d256_bench.py --san
    if [ -n "$SAN" ]; then
        timeout 60 $PY tools/gpu_fwd_short.py --san > "$LOG/short_warm.log" 2>&1
        for tool in memcheck racecheck; do
            step "short_$tool" 50 "$SAN" --tool "$tool" $PY tools/gpu_fwd_short.py --san
            grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/short_$tool.log"
        done
    else
        echo "compute-sanitizer not found"
        RC=1
    fi
    ;;
*)
    echo "usage: bash tools/gpu_check_pending.sh switches|short|profile|bench|san"
    exit 2
    ;;
esac
exit $RC
