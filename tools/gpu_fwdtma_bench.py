"""Time the Hopper forward's TMA mode (75: K/V by the copy engine) against mode 11 (the
default, K/V by cp.async) and torch's SDPA default (cuDNN) in one process.

Usage: ``python3 tools/gpu_fwdtma_bench.py [--budget SECONDS] [--reps N]`` on a compute
capability 9.0 GPU; ``--precompile`` only builds the cubins (mode 11 and 75, fp16 and bf16,
D 64 and 128: the GPU tests and the benchmark then load them from the disk cache); ``--san``
runs the sanitizer workload (one tiny mode-75 forward per entry).

Rows as benchmarks/gpu_flash.py shapes them: B * S = 16384 and Hq * D = 2048; fp16 and bf16,
D 64 and 128, S = 4096, causal and not, then fp16 D=128 S=1024. Each kernel's output is first
checked against torch's (max |diff|; a row over the tolerance prints FAIL instead of a time).
TFLOP/s as /work/shared/PERF.md counts them (4 B H S^2 D, half of it causal), median of CUDA
event timings of the whole call (host work included). Also printed: the host time of one
tensor-map encode (cuTensorMapEncodeTiled), of a cached one, and of the launcher's two maps.
Progress on stderr; a markdown table last on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from gpu_bench_common import log as _log
from gpu_bench_common import median_ms as _median_ms
from gpu_bench_common import to_cupy as _to_cupy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {64: ((64, 3, 11), (64, 3, 75)), 128: ((128, 2, 11), (128, 2, 75))}
TOL = {"float16": 2e-2, "bfloat16": 6e-2}


def precompile():
    from xattn._backends.cupy_ import flash_sm90 as k90

    t0 = time.perf_counter()
    keys = [(d, *c) for d, cs in CONFIGS.items() for c in cs]
    for tn in ("f16", "bf16"):
        k90.precompile(tn, keys)
    _log(f"precompile: {len(keys) * 2} cubins in {time.perf_counter() - t0:.1f} s")
    return 0


def _row(cp, torch, k90, validate_attention, dtype, d, s, causal, reps):
    """{name: TFLOP/s or a string saying why there is none} for one shape."""
    import torch.nn.functional as F

    b, h = 16384 // s, 2048 // d
    tdt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(d * 7 + s + causal)
    tq, tk, tv = (torch.randn(b, h, s, d, device="cuda", dtype=tdt, generator=gen)
                  for _ in range(3))
    q, k, v = (_to_cupy(cp, torch, x) for x in (tq, tk, tv))
    prob = validate_attention(q, k, v, causal=causal)
    flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)

    def tf(ms):
        return flops / (ms * 1e-3) / 1e12

    ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).float()
    res = {}
    outs = {}
    for cfg in CONFIGS[d]:
        name = f"mode {cfg[2]}"
        try:
            out, _ = k90.forward(prob, q, k, v, config=cfg)
            got = torch.from_dlpack(cp.ascontiguousarray(out.astype(cp.float32)))
            err = float((got - ref).abs().max())
            outs[cfg[2]] = out
            if not np.isfinite(err) or err > TOL[dtype]:
                res[name] = f"FAIL (max diff {err:.3g})"
                continue
            res[name] = tf(_median_ms(cp, lambda cfg=cfg: k90.forward(prob, q, k, v,
                                                                      config=cfg), reps))
            _log(f"  {name}: max diff vs torch {err:.2e}, {res[name]:.1f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001 - a row says what broke
            res[name] = f"ERROR {type(exc).__name__}: {str(exc)[:100]}"
            _log(f"  {name}: {res[name]}")
    if 11 in outs and 75 in outs:
        res["75 == 11 bitwise"] = bool(cp.all(outs[11].view(cp.uint16) ==
                                              outs[75].view(cp.uint16)))
    res["torch"] = tf(_median_ms(cp, lambda: F.scaled_dot_product_attention(
        tq, tk, tv, is_causal=causal), reps))
    _log(f"  torch SDPA: {res['torch']:.1f} TFLOP/s")
    return res


def encode_times(cp):
    """Microseconds: one uncached encode, one cached look-up, the launcher's two maps."""
    from xattn._backends.cupy_ import flash_sm90 as k90
    from xattn._backends.cupy_ import tma

    x = cp.zeros((4, 16, 4096, 128), dtype=cp.float16)
    dims, strides, box = tma.bhsd_layout(x.shape, 2, 128)

    def per_call_us(f, n):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e6

    fresh = per_call_us(lambda: tma.encode_tiled(x.data.ptr, "f16", dims, strides, box,
                                                 cache=False), 500)
    cached = per_call_us(lambda: tma.encode_tiled(x.data.ptr, "f16", dims, strides, box), 2000)
    maps = per_call_us(lambda: k90._tma_maps(x, x, x, 128), 2000)
    return fresh, cached, maps


def sanitizer_workload():
    """One tiny mode-75 forward per entry (fp16 / bf16, D 64 / 128): GQA, causal, several
    heads, Sq and Sk off the tile sizes, more key blocks than ring stages."""
    import cupy as cp

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    rng = np.random.default_rng(0)
    for dtype in ("float16", "bfloat16"):
        for d, cfgs in CONFIGS.items():
            shapes = ((2, 4, 77, d), (2, 2, 450, d), (2, 2, 450, d))
            host = [rng.standard_normal(sh, dtype=np.float32) for sh in shapes]
            if dtype == "bfloat16":
                import ml_dtypes

                q, k, v = (cp.asarray(x.astype(ml_dtypes.bfloat16)) for x in host)
            else:
                q, k, v = (cp.asarray(x.astype(np.float16)) for x in host)
            prob = validate_attention(q, k, v, causal=True)
            out, lse = k90.forward(prob, q, k, v, config=cfgs[1])
            cp.cuda.Device().synchronize()
            ok = bool(cp.isfinite(out.astype(cp.float32)).all()) and bool(
                cp.isfinite(lse).all())
            print(f"{dtype} D={d} mode {cfgs[1][2]}: finite={ok}", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=75.0, help="seconds; later rows skipped")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    ap.add_argument("--precompile", action="store_true", help="build the cubins only")
    args = ap.parse_args(argv)
    if args.san:
        return sanitizer_workload()
    if args.precompile:
        return precompile()
    t_start = time.time()

    import cupy as cp
    import torch

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    precompile()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    specs = [(dt, d, 4096, c) for dt in ("float16", "bfloat16") for d in (128, 64)
             for c in (False, True)]
    specs += [("float16", 128, 1024, c) for c in (False, True)]
    rows = []
    for dt, d, s, causal in specs:
        if time.time() - t_start > args.budget:
            rows.append((dt, d, s, causal, {}))
            continue
        _log(f"{dt} D={d} S={s} causal={causal}")
        try:
            r = _row(cp, torch, k90, validate_attention, dt, d, s, causal, args.reps)
        except Exception as exc:  # noqa: BLE001 - the row says what broke, the rest run
            r = {"mode 11": f"ERROR {type(exc).__name__}: {str(exc)[:100]}"}
            _log(f"  {r['mode 11']}")
        rows.append((dt, d, s, causal, r))
        cp.get_default_memory_pool().free_all_blocks()
    fresh, cached, maps = encode_times(cp)

    def fmt(x):
        return f"{x:.0f}" if isinstance(x, float) else ("skipped" if x is None else str(x))

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"

    print(f"\n### Hopper forward, mode 75 (TMA) vs mode 11 (cp.async) vs torch SDPA default, "
          f"TFLOP/s ({dev}; B*S = 16384, Hq*D = 2048; causal halved)\n")
    print("| dtype | D | S | causal | mode 11 | mode 75 | torch | 75/11 | 75/torch | 11/torch "
          "| 75 == 11 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dt, d, s, causal, r in rows:
        a, t, c = r.get("mode 11"), r.get("mode 75"), r.get("torch")
        print(f"| {dt} | {d} | {s} | {causal} | {fmt(a)} | {fmt(t)} | {fmt(c)} | "
              f"{ratio(t, a)} | {ratio(t, c)} | {ratio(a, c)} | "
              f"{r.get('75 == 11 bitwise', '-')} |")
    print(f"\ntensor-map host cost: one encode {fresh:.1f} us, a cached one {cached:.2f} us, "
          f"the launcher's two maps (checks + cached encodes) {maps:.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
