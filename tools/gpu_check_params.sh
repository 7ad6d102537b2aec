#!/usr/bin/env bash
# GPU check of the `params` branch (issue #10's parameter block): the CuPy launchers read the
# mask, bias and ALiBi slopes from the problem (_params.option_args(xp, prob)), and
# flash_bwd.cu's two kernels share bwd_products / bwd_p_ds / bwd_pack_a (PTX: the main
# kernels unchanged, the dq kernels two independent address adds in another order).
# Runs the GPU tests (every table entry x option set, forward and backward, block masks, sm90,
# TF32) through .ci/gpu_run.sh, without the benchmark; summary and logs in $OUT. About 3 min;
# XATTN_STAGES=env,sanitize,tests adds compute-sanitizer (a few minutes more).
cd "$(dirname "$0")/.." || exit 1
export XATTN_STAGES=${XATTN_STAGES:-env,tests}
export XATTN_SKIP_BENCH=1
export XATTN_TEST_SECONDS=${XATTN_TEST_SECONDS:-170}
export XATTN_RUN_SECONDS=${XATTN_RUN_SECONDS:-200}
exec bash .ci/gpu_run.sh
