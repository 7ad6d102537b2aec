#!/usr/bin/env bash
# GPU check of the `bwd90mods` branch (issues 11 and 13): the Hopper wgmma backward's option
# entries (flash_bwd_sm90.cu: window, score mods, block masks; launcher flash_bwd_sm90.py) and
# flex_attention_backward on it (flex_tc_bwd.py). Needs a compute capability 9.0 GPU.
#   bash tools/gpu_check_bwd90mods.sh tests  # the sm_90a cubins built in parallel (disk
#                                            # cache), then tests/gpu/test_gpu_sm90_bwd.py and
#                                            # the flex routing tests (< 90 s)
#   bash tools/gpu_check_bwd90mods.sh bench  # option rows fp16 B=4 H=16 S=4096 D=64/128:
#                                            # sm90_bwd vs sm80 vs torch SDPA; then the flex
#                                            # backward row (S=16384) beside compiled Flex
#   bash tools/gpu_check_bwd90mods.sh san    # compute-sanitizer memcheck + racecheck, one tiny
#                                            # backward per option entry and flex entry (< 60 s)
# No argument: all three. Run from the repository root; logs under $OUT/bwd90mods/.
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$PWD/gpu_out}
LOG="$OUT/bwd90mods"
mkdir -p "$LOG"
PY=${PYTHON:-python3}
MODE=${1:-all}
RC=0

precompile() {
    echo "== bwd90mods: sm_90a cubins (log: $LOG/precompile.log)"
    timeout 40 $PY tools/gpu_bwd90mods_bench.py --precompile > "$LOG/precompile.log" 2>&1
    echo "precompile rc=$? $(tail -n 1 "$LOG/precompile.log")"
}

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
    precompile
    echo "== bwd90mods tests (log: $LOG/tests.log)"
    XDIST=""
    if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
    timeout 50 $PY -m pytest -m gpu tests/gpu/test_gpu_sm90_bwd.py \
        tests/gpu/test_gpu_flex_tc_bwd.py -k "sm90 or kernel_by_compute_capability or auto_picks" \
        -q -p no:cacheprovider $XDIST -rs --tb=short --maxfail=20 > "$LOG/tests.log" 2>&1
    T=$?
    grep -E "^(FAILED|ERROR)" "$LOG/tests.log" | cut -c1-400 | head -30
    tail -n 4 "$LOG/tests.log"
    echo "bwd90mods tests rc=$T (124 = cut by the 50 s cap: run again, the cubins are cached)"
    RC=$(( RC || T ))
fi

if [ "$MODE" = san ] || [ "$MODE" = all ]; then
    echo "== bwd90mods compute-sanitizer (logs: $LOG/san_*.log)"
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
          | head -n 1)
    if [ -z "$SAN" ]; then
        echo "compute-sanitizer not found"
        RC=1
    else
        # Once without the sanitizer: the cubins and NVRTC modules land in the disk caches.
        timeout 25 $PY tools/gpu_bwd90mods_bench.py --san > "$LOG/san_warm.log" 2>&1
        echo "warm-up rc=$? $(grep -c 'finite=True' "$LOG/san_warm.log")/7 finite"
        for tool in memcheck racecheck; do
            timeout 20 "$SAN" --tool "$tool" --print-limit 20 $PY tools/gpu_bwd90mods_bench.py \
                --san > "$LOG/san_$tool.log" 2>&1
            T=$?
            grep -E "finite=|ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san_$tool.log" | head -12
            echo "bwd90mods san $tool rc=$T"
            RC=$(( RC || T ))
        done
    fi
fi

if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
    echo "== bwd90mods bench: option rows (log: $LOG/bench.log)"
    timeout 45 $PY tools/gpu_bwd90mods_bench.py --budget 30 > "$LOG/bench.md" \
        2> "$LOG/bench.log"
    T=$?
    tail -n 6 "$LOG/bench.log"
    echo "options bench rc=$T (124 = cut by the 45 s cap)"
    RC=$(( RC || T ))
    echo "== bwd90mods bench: flex backward row (log: $LOG/bench_flex.log)"
    timeout 45 $PY benchmarks/gpu_flex.py --backward --dtype float16 --seq 16384 --repeats 10 \
        --json "$LOG/bench_flex_bwd_fp16.json" > "$LOG/bench_flex.log" 2>&1
    T=$?
    echo "flex bench rc=$T (124 = cut by the 45 s cap)"
    RC=$(( RC || T ))
    echo
    cat "$LOG/bench.md"
    echo
    grep -A3 -E '^flex attention backward' "$LOG/bench_flex.log" || tail -n 5 "$LOG/bench_flex.log"
fi
exit $RC
