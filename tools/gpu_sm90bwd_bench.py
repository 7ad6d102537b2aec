"""Time the experimental wgmma backward (``cupy.sm90_bwd``) against the mma.sync backward
(``cupy.sm80``) and torch's SDPA backward (default backend: cuDNN / flash) in one process.

Usage: ``python3 tools/gpu_sm90bwd_bench.py [--budget SECONDS] [--s 4096] [--b 4] [--h 16]``
on a compute capability 9.0 GPU. Rows: fp16, S = Sq = Sk, D = 64 and 128, causal and not.
Each xattn row first checks its gradients against cupy.sm80's (max |diff| / max |sm80|): a row
over 2e-2 prints FAIL instead of a time. TFLOP/s as /work/shared/PERF.md counts them: backward
= 2.5 x the forward's 4 B H S^2 D, half of it causal; times are the backward alone (delta,
kernel and dq conversion for xattn; ``torch.autograd.grad`` of a recorded forward for torch),
median of CUDA-event timings. Progress on stderr; a markdown table last on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from gpu_bench_common import log as _log
from gpu_bench_common import median_ms as _median_ms
from gpu_bench_common import randn as _randn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _row(cp, xattn, torch, b, h, s, d, causal, reps):
    """(sm90_bwd, sm80, torch): TFLOP/s, or a string saying why there is no time."""
    rng = np.random.default_rng([d, causal])
    q, k, v, dout = (_randn(cp, rng, "float16", b, h, s, d) for _ in range(4))
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    flops = 2.5 * 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)

    def tf(ms):
        return flops / (ms * 1e-3) / 1e12

    def run(name):
        return xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=causal,
                                              backend=name)

    ref = run("cupy.sm80")
    _log(f"D={d} causal={causal}: sm80 ...")
    sm80 = tf(_median_ms(cp, lambda: run("cupy.sm80"), reps))
    _log(f"D={d} causal={causal}: sm90_bwd ...")
    try:
        got = run("cupy.sm90_bwd")
        err = max(float(cp.abs(x.astype(cp.float32) - y.astype(cp.float32)).max()) /
                  max(1.0, float(cp.abs(y.astype(cp.float32)).max()))
                  for x, y in zip(got, ref, strict=True))
        if not np.isfinite(err) or err > 2e-2:
            sm90 = f"FAIL (rel diff {err:.3g})"
        else:
            sm90 = tf(_median_ms(cp, lambda: run("cupy.sm90_bwd"), reps))
            _log(f"  sm90_bwd vs sm80: max rel diff {err:.3g}")
    except Exception as exc:  # noqa: BLE001 - a row says what broke
        sm90 = f"ERROR {type(exc).__name__}: {str(exc)[:80]}"
    if torch is None:
        return sm90, sm80, "n/a"
    import torch.nn.functional as F

    _log(f"D={d} causal={causal}: torch ...")
    tq, tk, tv = (torch.from_dlpack(x).requires_grad_(True) for x in (q, k, v))
    to = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    tdo = torch.from_dlpack(dout)
    torch.cuda.synchronize()
    ms = _median_ms(cp, lambda: torch.autograd.grad(to, (tq, tk, tv), tdo, retain_graph=True),
                    reps)
    torch.cuda.synchronize()
    return sm90, sm80, tf(ms)


def sanitizer_workload():
    """One tiny backward per sm_90a entry (fp16 / bf16, D 64 / 128, causal, GQA, Sq != Sk) for
    compute-sanitizer."""
    import cupy as cp

    import xattn

    rng = np.random.default_rng(0)
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128):
            q, k, v, do = (_randn(cp, rng, dtype, 1, h, sl, d)
                           for h, sl in ((4, 100), (2, 150), (2, 150), (4, 100)))
            out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
            g = xattn.flash_attention_backward(do, q, k, v, out, lse, causal=True,
                                               backend="cupy.sm90_bwd")
            cp.cuda.Device().synchronize()
            print(f"{dtype} D={d}: finite={all(bool(cp.isfinite(x).all()) for x in g)}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=75.0, help="seconds; later rows skipped")
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    args = ap.parse_args(argv)
    if args.san:
        return sanitizer_workload()
    t_start = time.time()

    import cupy as cp

    import xattn

    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - torch is optional on the device
        torch = None
        _log(f"torch unavailable: {exc}")

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    rows = []
    b, h, s = args.b, args.h, args.s
    for d in (128, 64):
        for causal in (False, True):
            if time.time() - t_start > args.budget:
                rows.append((d, causal, "skipped (budget)", "-", "-"))
                continue
            rows.append((d, causal, *_row(cp, xattn, torch, b, h, s, d, causal, args.reps)))
            _log(f"  {rows[-1]}")
            cp.get_default_memory_pool().free_all_blocks()

    def fmt(x):
        return f"{x:.0f}" if isinstance(x, float) else str(x)

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"

    print(f"\n### backward fp16, B={b} H={h} S={s}, TFLOP/s ({dev}; 2.5x fwd FLOPs, causal "
          "halved)\n")
    print("| D | causal | sm90_bwd (wgmma) | sm80 (mma.sync) | torch SDPA | sm90/sm80 | "
          "sm90/torch |")
    print("|---|---|---|---|---|---|---|")
    for d, causal, a, c, t in rows:
        print(f"| {d} | {causal} | {fmt(a)} | {fmt(c)} | {fmt(t)} | {ratio(a, c)} | "
              f"{ratio(a, t)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
