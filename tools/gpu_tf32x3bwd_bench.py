"""Benchmark of the 3xTF32 float32 backward (``flash_bwd_tf32x3.cu``) on an A100 / H100 / H200.

fp32, D = 64 and 128, S = 4096, B * S = 16384, Hq * D = 2048, causal and not: the new backward
(``flash_tf32x3.backward``, whatever ``instances.TF32X3_BWD_ON`` says, every built
configuration that fits the card), the strict SIMT backward (``cupy.simt``) and torch's float32
backward (``scaled_dot_product_attention`` on float32, default backend, TF32 off), all in this
process. TFLOP/s = 2.5 * 4 B H S^2 D (half of it causal), the flash-attn count. Before timing,
each xattn backward is checked on a smaller problem (B = 1, H = 2, S = 1024) against the
float64 oracle: the max over dq / dk / dv of max |error| / max |reference| (the bar is 1e-5).
Prints a markdown table last; ``--out FILE`` also writes it.

Usage: ``python3 tools/gpu_tf32x3bwd_bench.py [--reps 20] [--out FILE]``; ``--san``: a few tiny
launches (the compute-sanitizer workload), each line ``finite=... err=...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench_common import log, median_ms  # noqa: E402

S = 4096
TOKENS = 16384
WIDTH = 2048


def _problem(cp, rng, b, h, s, d, causal):
    """q, k, v, dout, out, lse, prob on the device (out / lse from the 3xTF32 forward)."""
    import xattn
    from xattn._array import validate_attention

    q, k, v, do = (cp.asarray(rng.standard_normal((b, h, s, d), dtype=np.float32))
                   for _ in range(4))
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True,
                                     backend="cupy.tf32x3")
    return q, k, v, do, out, lse, validate_attention(q, k, v, causal=causal)


def max_rel_error(cp, d, causal, config=None, simt=False):
    """max over dq, dk, dv of max |error| / max |reference| against float64 (B=1, H=2, S=1024)."""
    from xattn._backends.cupy_ import flash_simt, flash_tf32x3
    from xattn.testing import reference_attention, reference_attention_backward

    rng = np.random.default_rng(d + causal)
    q, k, v, do = (rng.standard_normal((1, 2, 1024, d)).astype(np.float32) for _ in range(4))
    out, lse, _ = reference_attention(q, k, v, causal=causal)
    g = [cp.asarray(x) for x in (q, k, v, do, out.astype(np.float32), lse.astype(np.float32))]
    from xattn._array import validate_attention

    prob = validate_attention(g[0], g[1], g[2], causal=causal)
    if simt:
        got = flash_simt.backward(prob, g[3], g[0], g[1], g[2], g[4], g[5])
    else:
        got = flash_tf32x3.backward(prob, g[3], g[0], g[1], g[2], g[4], g[5], config=config)
    ref = reference_attention_backward(do, q, k, v, causal=causal)
    errs = []
    for a, r in zip(got, ref, strict=True):
        a = cp.asnumpy(a).astype(np.float64)
        if not np.isfinite(a).all():
            return float("nan")
        errs.append(float(np.abs(a - r).max() / np.abs(r).max()))
    return max(errs)


def sanitizer_workload(cp):
    from xattn._backends.cupy_ import flash_tf32x3

    rng = np.random.default_rng(0)
    for d, s, causal in ((64, 40, False), (64, 33, True), (128, 70, True), (128, 17, False)):
        q, k, v, do, out, lse, prob = _problem(cp, rng, 1, 2, s, d, causal)
        dq, dk, dv = flash_tf32x3.backward(prob, do, q, k, v, out, lse)
        cp.cuda.Device().synchronize()
        fin = all(bool(cp.isfinite(x).all()) for x in (dq, dk, dv))
        print(f"d={d} s={s} causal={causal} finite={fin} "
              f"err={max_rel_error(cp, d, causal):.3g}", flush=True)


def bench_case(cp, torch, d, causal, reps, have):
    """Rows ``(D, causal, kernel, TFLOP/s, max rel error)`` of one head dim and mask."""
    from xattn._backends.cupy_ import flash_bwd_tf32x3 as x3b
    from xattn._backends.cupy_ import flash_simt, flash_tf32x3

    h, b = WIDTH // d, TOKENS // S
    flops = 2.5 * 4 * b * h * S * S * d / (2 if causal else 1)
    q, k, v, do, out, lse, prob = _problem(cp, np.random.default_rng(d), b, h, S, d, causal)
    rows = []
    for cfg in x3b.built(d):
        if x3b.smem_bytes(d, cfg) > have:
            continue
        err = max_rel_error(cp, d, causal, cfg)
        log(f"d={d} causal={causal} tf32x3 {cfg}: err {err:.3g}")
        ms = median_ms(cp, lambda cfg=cfg: flash_tf32x3.backward(
            prob, do, q, k, v, out, lse, config=cfg), reps)
        rows.append((d, causal, f"tf32x3 {cfg}", flops / ms / 1e9, err))
    err = max_rel_error(cp, d, causal, simt=True)
    ms = median_ms(cp, lambda: flash_simt.backward(prob, do, q, k, v, out, lse),
                   max(3, reps // 4))
    rows.append((d, causal, "cupy.simt", flops / ms / 1e9, err))
    if torch is not None:
        tq, tk, tv = (torch.from_dlpack(x).clone().requires_grad_(True) for x in (q, k, v))
        tdo = torch.from_dlpack(do)
        to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        ms = median_ms(cp, lambda: torch.autograd.grad(to, (tq, tk, tv), tdo,
                                                       retain_graph=True), reps)
        rows.append((d, causal, "torch sdpa fp32", flops / ms / 1e9, float("nan")))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("--san", action="store_true")
    args = ap.parse_args()
    import cupy as cp

    if args.san:
        sanitizer_workload(cp)
        return
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except ImportError:
        torch = None
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    have = int(dev.attributes["MaxSharedMemoryPerBlockOptin"])
    rows = []
    for d in (64, 128):
        for causal in (False, True):
            rows += bench_case(cp, torch, d, causal, args.reps, have)
            cp.get_default_memory_pool().free_all_blocks()
    lines = [f"fp32 backward, S={S}, B*S={TOKENS}, Hq*D={WIDTH}, {name}", "",
             "| D | causal | kernel | TFLOP/s | max rel err (S=1024) |",
             "|---|---|---|---|---|"]
    lines += [f"| {d} | {c} | {k} | {t:.1f} | {e:.2g} |" for d, c, k, t, e in rows]
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
