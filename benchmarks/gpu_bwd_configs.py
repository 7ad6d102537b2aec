"""Sweep the CuPy backward kernel's tile configurations and dq modes on the GPU machine.

    python3 benchmarks/gpu_bwd_configs.py [--d 64,128] [--budget 150]

For fp16, S=4096, B*S=16384, Hq*D=2048, causal and not: every candidate configuration of the
main kernel (atomic dq and separate-pass dq) and of the deterministic dq kernel, checked against
the default configuration's gradients (max |diff| relative to max |ref|) before it is timed.
TFLOP/s count the backward as 2.5x the forward's 4 B Hq S^2 D (half for causal). The modules
are compiled first in parallel worker processes (CuPy's on-disk cache then serves the timing
process). Prints one table; the winners go into flash_bwd.CONFIGS / DQ_CONFIGS by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# (DC, warps, query rows per step, dq slice) of the main kernel; (warps, keys) of the dq kernel.
MAIN = {
    64: [(64, 4, 64, 64), (64, 4, 32, 64), (64, 8, 32, 64), (64, 8, 64, 64), (64, 4, 128, 64),
         (64, 2, 64, 64), (64, 4, 64, 32)],
    128: [(128, 4, 32, 64), (128, 4, 64, 64), (128, 8, 32, 64), (128, 2, 64, 64),
          (64, 4, 64, 64), (128, 4, 32, 128), (128, 4, 32, 32), (128, 4, 16, 64)],
}
DQ = {64: [(4, 64), (4, 128), (8, 64), (2, 64), (4, 32)],
      128: [(4, 64), (4, 32), (8, 64), (2, 64), (4, 128)]}


def _inputs(cp, d, s, causal, seed=0):
    import xattn
    from xattn._array import validate_attention

    b, h = 16384 // s, 2048 // d
    rng = np.random.default_rng(seed)
    q, k, v, do = (cp.asarray(rng.standard_normal((b, h, s, d), dtype=np.float32)
                              .astype(np.float16)) for _ in range(4))
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cupy")
    prob = validate_attention(q, k, v, causal=causal)
    return prob, (do, q, k, v, out, lse)


def _compile(job):
    """Worker: run one configuration once on a tiny problem (fills CuPy's kernel cache)."""
    import cupy as cp

    from xattn._backends.cupy_ import flash_bwd as kb

    d, cfg, dq_cfg, det = job
    try:
        prob, a = _inputs(cp, d, 256, False)
        kb.backward(prob, *a, config=cfg, dq_config=dq_cfg, deterministic=det)
        cp.cuda.Device().synchronize()
        return job, None
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return job, f"{type(exc).__name__}: {str(exc)[:80]}"


def _ms(cp, fn, reps=10):
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--budget", type=float, default=150.0)
    args = ap.parse_args()
    t0 = time.time()
    import cupy as cp

    from xattn._backends.cupy_ import flash_bwd as kb

    dims = [int(x) for x in args.d.split(",")]
    jobs = []
    for d in dims:
        jobs += [(d, cfg, kb.DQ_CONFIGS[d], False) for cfg in MAIN[d]]
        jobs += [(d, kb.CONFIGS[d], dq, True) for dq in DQ[d]]
        jobs += [(d, cfg, kb.DQ_CONFIGS[d], True) for cfg in MAIN[d] if cfg != kb.CONFIGS[d]]
    errors = {}
    with ProcessPoolExecutor(max_workers=min(12, os.cpu_count() or 4)) as ex:
        for job, err in ex.map(_compile, jobs):
            if err:
                errors[job] = err
    print(f"compiled {len(jobs)} configurations in {time.time() - t0:.0f} s", flush=True)

    rows = []
    for d in dims:
        for causal in (False, True):
            prob, a = _inputs(cp, d, 4096, causal, seed=1)
            ref = [x.astype(cp.float32) for x in kb.backward(prob, *a)]
            scale = [float(cp.abs(r).max()) for r in ref]
            fl = 2.5 * 4 * 4 * (2048 // d) * 4096 ** 2 * d * (0.5 if causal else 1.0)
            for job in jobs:
                if job[0] != d:
                    continue
                _, cfg, dq_cfg, det = job
                name = f"D={d} {'causal' if causal else 'full'} main={cfg} " + \
                    (f"dq={dq_cfg} separate" if det else "dq atomic")
                if time.time() - t0 > args.budget:
                    rows.append((name, "skipped (budget)"))
                    continue
                if job in errors:
                    rows.append((name, "ERROR " + errors[job]))
                    continue
                try:
                    def run(cfg=cfg, dq_cfg=dq_cfg, det=det, prob=prob, a=a):
                        return kb.backward(prob, *a, config=cfg, dq_config=dq_cfg,
                                           deterministic=det)

                    got = run()
                    err = max(float(cp.abs(g.astype(cp.float32) - r).max()) / s
                              for g, r, s in zip(got, ref, scale, strict=True))
                    if not err < 2e-2:
                        rows.append((name, f"WRONG rel err {err:.1e}"))
                        continue
                    ms = _ms(cp, run)
                    rows.append((name, f"{fl / ms / 1e9:7.1f} TFLOP/s  {ms:7.3f} ms  "
                                       f"err {err:.1e}"))
                except Exception as exc:  # noqa: BLE001
                    rows.append((name, f"ERROR {type(exc).__name__}: {str(exc)[:80]}"))
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"\nbackward configurations, {dev}, fp16 S=4096 B*S=16384 Hq*D=2048 "
          f"(defaults: {kb.CONFIGS} / {kb.DQ_CONFIGS}); {time.time() - t0:.0f} s")
    for name, res in rows:
        print(f"{name:<62} {res}")


if __name__ == "__main__":
    main()
