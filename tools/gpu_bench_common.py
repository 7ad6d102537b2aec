"""Helpers the tools/gpu_*_bench.py scripts share: progress on stderr, timings (CUDA events,
or triton's do_bench with the L2 flushed), random CuPy inputs and zero-copy CuPy views of torch
tensors. Imported by name from the scripts' own folder (``python3 tools/NAME.py`` puts it on
``sys.path``); nothing here imports CuPy or torch at import time."""

from __future__ import annotations

import sys

import numpy as np


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def median_ms(cp, f, reps, warmup=2):
    """Median of ``reps`` CUDA-event timings of ``f()`` in milliseconds, after ``warmup``
    calls (host work of each call included: the events bracket one call)."""
    for _ in range(warmup):
        f()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def bench_ms(cp, f, reps=20):
    """``triton.testing.do_bench`` (L2 flushed between repeats, median) where triton is
    installed, else :func:`median_ms`."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return median_ms(cp, f, reps, warmup=3)
    return float(do_bench(f, warmup=25, rep=100, return_mode="median"))


def randn(cp, rng, dtype, *shape):
    return cp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def to_cupy(cp, torch, t):
    """Zero-copy CuPy view of a torch CUDA tensor (bfloat16 through an int16 view where this
    CuPy imports no bfloat16 DLPack), as benchmarks/gpu_flash.py does."""
    if t.dtype == torch.bfloat16:
        try:
            return cp.from_dlpack(t)
        except Exception:  # noqa: BLE001 - CuPy without bfloat16 DLPack import
            import ml_dtypes

            return cp.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    return cp.from_dlpack(t)
