"""Benchmark of the 3xTF32 wgmma forward (``cupy.tf32x3_sm90``) on an H100 / H200 (issue 11).

fp32, D = 64, S = 4096, B * S = 16384, Hq * D = 2048 (B = 4, H = 32), causal and not: the new
kernel (its ``forward``, whatever its switch says), ``cupy.tf32x3`` (mma.sync 3xTF32) and torch
SDPA's float32 default with TF32 off (``torch.backends.cuda.matmul.allow_tf32 = False``, as
benchmarks/gpu_flash.py's tf32x3 rows), all in this process. Each xattn row is checked before
it is timed: max |error| against float64 over the last 512 rows of one head (they see every key
tile), relative to max |out| -- issue 11's bound is 1e-5. Times: CUDA events around one call
after a warm-up, median of ``--reps``. TFLOP/s by the flash-attn count (``4 B H S^2 D``, half of
it causal). Prints a markdown table last; ``--out FILE`` also writes it (JSON beside it).

Usage: ``python3 tools/gpu_tf32wg_bench.py [--reps 30] [--out $OUT/tf32wg/bench.md]``;
``--san``: one tiny launch per option kind instead (the compute-sanitizer workload), each line
``finite=... err=...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_ms(cp, fn, reps):
    fn()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    out = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(out))


def reference_rows(q, k, v, rows, causal):
    """float64 attention of the rows ``rows`` of head (0, 0) (bottom-right alignment)."""
    q64 = q[0, 0, rows].astype(np.float64)
    k64, v64 = k[0, 0].astype(np.float64), v[0, 0].astype(np.float64)
    s = q64 @ k64.T / math.sqrt(q.shape[-1])
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        i = np.arange(sq)[rows][:, None] + (sk - sq)
        s = np.where(np.arange(sk)[None, :] <= i, s, -np.inf)
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(axis=1, keepdims=True)) @ v64


def sanitizer_workload(cp):
    """One small launch per option kind (2 query blocks, 4 key tiles, GQA, lengths off the
    tiles): plain, causal, window, causal Sq > Sk (rows without keys), in both schedules."""
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_tf32x3_sm90 as x3w
    from xattn.testing import reference_attention

    rng = np.random.default_rng(1)
    for name, sq, sk, opts in (("plain", 130, 200, {}), ("causal", 130, 200, {"causal": True}),
                               ("window", 200, 200, {"window": (40, 10)}),
                               ("causal Sq>Sk", 200, 70, {"causal": True})):
        q = cp.asarray(rng.standard_normal((1, 4, sq, 64)).astype(np.float32))
        k = cp.asarray(rng.standard_normal((1, 2, sk, 64)).astype(np.float32))
        v = cp.asarray(rng.standard_normal((1, 2, sk, 64)).astype(np.float32))
        ref = reference_attention(q, k, v, **opts)[0]
        for config in (None, (64, 1)):
            out, lse = x3w.forward(validate_attention(q, k, v, **opts), q, k, v, config=config)
            cp.cuda.Device().synchronize()
            err = float(np.abs(cp.asnumpy(out) - ref).max())
            print(f"{name} config={config}: finite={bool(cp.isfinite(out).all())} "
                  f"err={err:.2e}", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--san", action="store_true", help="tiny launches for compute-sanitizer")
    args = ap.parse_args(argv)

    import cupy as cp

    if args.san:
        return sanitizer_workload(cp)

    import xattn
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_tf32x3_sm90 as x3w

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else str(dev)
    print(f"device: {dev}", flush=True)
    try:
        import torch
        import torch.nn.functional as F
    except Exception as exc:  # noqa: BLE001 - the table says so
        torch = F = None
        print(f"torch unavailable: {exc}", flush=True)

    d, s = 64, 4096
    b, h = 16384 // s, 2048 // d
    rng = np.random.default_rng(0)
    qn, kn, vn = (rng.standard_normal((b, h, s, d)).astype(np.float32) for _ in range(3))
    q, k, v = cp.asarray(qn), cp.asarray(kn), cp.asarray(vn)
    rows = slice(s - 512, s)
    tq = tk = tv = None
    if torch is not None:
        tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))
    table = []
    for causal in (False, True):
        fl = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        ref = reference_rows(qn, kn, vn, rows, causal)
        mag = float(np.abs(ref).max())
        prob = validate_attention(q, k, v, causal=causal)
        row = {"causal": causal}

        def new(prob=prob):
            return x3w.forward(prob, q, k, v)[0]

        def new_ov(prob=prob):
            return x3w.forward(prob, q, k, v, config=(64, 1))[0]

        def old(causal=causal):
            return xattn.flash_attention(q, k, v, causal=causal, backend="cupy.tf32x3")

        for name, fn in (("tf32x3_sm90", new), ("tf32x3_sm90_ov", new_ov), ("tf32x3", old)):
            t0 = time.time()
            try:
                out = fn()
                err = float(np.abs(cp.asnumpy(out[0, 0, rows]) - ref).max()) / mag
                ms = time_ms(cp, fn, args.reps)
                row[name] = {"tflops": fl / ms / 1e9, "ms": ms, "rel_err": err,
                             "ok": bool(err <= 1e-5)}
            except Exception as exc:  # noqa: BLE001 - report and go on
                row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"causal={causal} {name}: {row[name]} ({time.time() - t0:.1f} s)", flush=True)
        if torch is not None:
            old_tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                with torch.no_grad():
                    def sdpa(causal=causal):
                        return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                    out = sdpa()
                    err = float(np.abs(out[0, 0, rows].double().cpu().numpy() - ref).max()) / mag
                    torch.cuda.synchronize()
                    ms = time_ms(cp, sdpa, args.reps)
                    row["torch"] = {"tflops": fl / ms / 1e9, "ms": ms, "rel_err": err}
            except Exception as exc:  # noqa: BLE001
                row["torch"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old_tf32
            print(f"causal={causal} torch: {row['torch']}", flush=True)
        table.append(row)

    def cell(r, key):
        x = r.get(key)
        if x is None:
            return "-"
        if "error" in x:
            return "ERROR"
        return f"{x['tflops']:.1f} ({x['rel_err']:.1e}{'' if x.get('ok', True) else ' FAIL'})"

    def ratio(r, a, bkey):
        x, y = r.get(a), r.get(bkey)
        if not x or not y or "error" in x or "error" in y:
            return "-"
        return f"{x['tflops'] / y['tflops']:.2f}"

    lines = [f"3xTF32 forward, fp32 D=64 S=4096 B=4 H=32, {dev}: TFLOP/s (max rel. error vs "
             "float64, last 512 rows of head 0)", "",
             "| causal | tf32x3_sm90 (new) | new, _ov schedule | tf32x3 (mma.sync) | "
             "torch SDPA fp32 | new/torch | ov/torch | new/tf32x3 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['causal']} | {cell(r, 'tf32x3_sm90')} | "
                     f"{cell(r, 'tf32x3_sm90_ov')} | {cell(r, 'tf32x3')} | "
                     f"{cell(r, 'torch')} | {ratio(r, 'tf32x3_sm90', 'torch')} | "
                     f"{ratio(r, 'tf32x3_sm90_ov', 'torch')} | "
                     f"{ratio(r, 'tf32x3_sm90', 'tf32x3')} |")
    text = "\n".join(lines)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(table, indent=1))
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
