"""CPU scale check for causal linear attention (issue 4).

Causal ``linear_attention`` (elu + 1) at S = 1,048,576, H = 1, D = 64, float32: the target is
<= 15 s on the 2-core development CPU with <= 1.5 GiB traced by ``tracemalloc`` beyond the
inputs (NumPy reports its array buffers to tracemalloc, so the peak covers the output and every
temporary). The first positions are checked against the float64 quadratic form (a causal
prefix depends only on itself) before anything is timed.

Run from the repository root::

    python3 benchmarks/linear_scale.py              # the issue's problem
    python3 benchmarks/linear_scale.py --seq 65536  # quicker
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import xattn  # noqa: E402

GIB = 1 << 30


def check_prefix(q, k, v, n=2048):
    """Max abs error of the first ``n`` outputs against the float64 formula."""
    qs, ks, vs = (x[..., :n, :].astype(np.float64) for x in (q, k, v))

    def phi(x):
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))

    w = np.tril(phi(qs[0]) @ phi(ks[0]).T)
    ref = (w @ vs[0]) / (w.sum(axis=-1, keepdims=True) + 1e-6)
    out = xattn.linear_attention(q[..., :n, :], k[..., :n, :], v[..., :n, :], causal=True)
    return float(np.abs(out[0] - ref).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="timed runs (the best is reported)")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    shape = (args.heads, args.seq, args.dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    err = check_prefix(q, k, v)
    print(f"prefix check (first 2048 rows vs float64 formula): max abs err {err:.2e}")
    assert err < 1e-4, err

    times, peaks = [], []
    for _ in range(args.repeat):
        tracemalloc.start()
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        out = xattn.linear_attention(q, k, v, causal=True, chunk_size=args.chunk)
        times.append(time.perf_counter() - t0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert np.isfinite(out).all()
        del out

    inputs = 3 * q.nbytes
    t, peak = min(times), max(peaks)
    flops = args.heads * args.seq * (2 * 64 * 2 * args.dim + 4 * args.dim * (args.dim + 1))
    print(f"causal linear_attention (elu+1), H={args.heads} S={args.seq} D={args.dim} float32")
    print(f"  inputs            {inputs / GIB:.3f} GiB (allocated before tracing)")
    print(f"  time              {t:.2f} s (best of {len(times)}: "
          + ", ".join(f"{x:.2f}" for x in times) + ")")
    print(f"  traced peak       {peak / GIB:.3f} GiB (output {q.nbytes / GIB:.3f} GiB included)")
    print(f"  ~{flops / t / 1e9:.1f} GFLOP/s (chunk 64: 2*C*(D+Dv+1) + 4*D*(Dv+1) per position)")
    ok = t <= 15.0 and peak <= 1.5 * GIB
    print(f"  target <= 15 s and <= 1.5 GiB: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
