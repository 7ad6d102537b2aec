"""Time the Hopper wgmma forward at head dims 256 and 192 (flash_fwd_sm90.cu's
flash_fwd_sm90_ws_kv: mode 75 with separate K and V rings) against the mma.sync kernel it
replaces as the default (``backend="cupy.sm80"``; D = 192 pads to 256 there) and torch's SDPA
default (cuDNN on Hopper) in one process.

Usage: ``python3 tools/gpu_d256_bench.py [--budget SECONDS]`` on a compute capability 9.0 GPU;
``--precompile`` only builds the D = 192 / 256 cubins (fp16 and bf16: the GPU tests then load
them from the disk cache); ``--san`` runs the sanitizer workload (tiny forwards of every
entry of the split-ring kernel, D = 128's 176-key tile included).

Rows as benchmarks/gpu_flash.py shapes them: B * S = 16384 and Hq * D = 2048 (B = 4, H = 8),
fp16 and bf16, D = 256, S = 4096, causal and not; fp16 D = 192 (H = 10, Hq*D = 1920) causal
and not; then fp16 D = 128 S = 4096 (the wgmma kernel's measured head dim, a sanity anchor for
the card). At D = 256 the experimental 80-key tile (``config=(80, 2, 75)``,
instances.SM90_WIDE_EXPERIMENTAL) is timed beside the default (64, 2, 75): column "n80". Each
xattn output is first checked
against torch's (max |diff|; a row over the tolerance prints FAIL instead of a time). TFLOP/s
as /work/shared/PERF.md counts them (4 B H S^2 D, half of it causal), timed with
``triton.testing.do_bench`` (median) when importable, else the median of CUDA-event timings.
Progress on stderr; a markdown table last on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from gpu_bench_common import bench_ms as _bench_ms
from gpu_bench_common import log as _log
from gpu_bench_common import to_cupy as _to_cupy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = {"float16": 2e-2, "bfloat16": 6e-2}


def precompile():
    from xattn._backends.cupy_ import flash_sm90 as k90
    from xattn._backends.cupy_ import instances

    t0 = time.perf_counter()
    keys = [(d, *k90.CONFIGS[d]) for d in (192, 256)] + list(instances.SM90_WIDE_EXPERIMENTAL)
    for tn in ("f16", "bf16"):
        k90.precompile(tn, keys)
    _log(f"precompile: {len(keys) * 2} cubins in {time.perf_counter() - t0:.1f} s")
    return 0


def _row(cp, torch, xattn, k90, validate_attention, dtype, d, s, causal):
    """{column: TFLOP/s or a string saying why there is none} for one shape."""
    import torch.nn.functional as F

    b, h = 16384 // s, max(1, 2048 // d)
    tdt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(d * 7 + s + causal)
    tq, tk, tv = (torch.randn(b, h, s, d, device="cuda", dtype=tdt, generator=gen)
                  for _ in range(3))
    q, k, v = (_to_cupy(cp, torch, x) for x in (tq, tk, tv))
    flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)

    def tf(ms):
        return flops / (ms * 1e-3) / 1e12

    ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).float()
    res = {}
    for col in ("cupy.sm90", "cupy.sm80"):
        try:
            def call(col=col):
                return xattn.flash_attention(q, k, v, causal=causal, backend=col)

            out = call()
            got = torch.from_dlpack(cp.ascontiguousarray(out.astype(cp.float32)))
            err = float((got - ref).abs().max())
            if not np.isfinite(err) or err > TOL[dtype]:
                res[col] = f"FAIL (max diff {err:.3g})"
                _log(f"  {col}: {res[col]}")
                continue
            res[col] = tf(_bench_ms(cp, call))
            _log(f"  {col}: max diff vs torch {err:.2e}, {res[col]:.1f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001 - a row says what broke
            res[col] = f"ERROR {type(exc).__name__}: {str(exc)[:100]}"
            _log(f"  {col}: {res[col]}")
    if d == 256:
        prob = validate_attention(q, k, v, causal=causal)
        try:
            def n80():
                return k90.forward(prob, q, k, v, config=(80, 2, 75))[0]

            got = torch.from_dlpack(cp.ascontiguousarray(n80().astype(cp.float32)))
            err = float((got - ref).abs().max())
            if not np.isfinite(err) or err > TOL[dtype]:
                res["n80"] = f"FAIL (max diff {err:.3g})"
            else:
                res["n80"] = tf(_bench_ms(cp, n80))
            _log(f"  config (80, 2, 75): max diff vs torch {err:.2e}, {res['n80']}")
        except Exception as exc:  # noqa: BLE001 - a row says what broke
            res["n80"] = f"ERROR {type(exc).__name__}: {str(exc)[:100]}"
            _log(f"  n80: {res['n80']}")
    res["torch"] = tf(_bench_ms(cp, lambda: F.scaled_dot_product_attention(
        tq, tk, tv, is_causal=causal)))
    _log(f"  torch SDPA default: {res['torch']:.1f} TFLOP/s")
    return res


def sanitizer_workload():
    """Tiny forwards of every flash_fwd_sm90_ws_kv entry -- D = 256 and 192, the experimental
    80-key tile, D = 128's 176-key tile (instances.SM90_LONG) -- GQA, causal, several heads, Sq
    and Sk off the tile sizes, more key blocks (3 to 8) than ring stages (2 + 2); then a window
    whose first key block is not block 0."""
    import cupy as cp

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    rng = np.random.default_rng(0)
    for dtype, d, cfg in (("float16", 256, k90.CONFIGS[256]), ("bfloat16", 256, k90.CONFIGS[256]),
                          ("bfloat16", 192, k90.CONFIGS[192]), ("float16", 256, (80, 2, 75)),
                          ("float16", 128, (176, 2, 75)), ("bfloat16", 128, (176, 2, 75))):
        shapes = ((2, 4, 77, d), (2, 2, 450, d), (2, 2, 450, d))
        host = [rng.standard_normal(sh, dtype=np.float32) for sh in shapes]
        if dtype == "bfloat16":
            import ml_dtypes

            q, k, v = (cp.asarray(x.astype(ml_dtypes.bfloat16)) for x in host)
        else:
            q, k, v = (cp.asarray(x.astype(np.float16)) for x in host)
        for opts in ({"causal": True}, {"window": (60, 10)}):
            prob = validate_attention(q, k, v, **opts)
            out, lse = k90.forward(prob, q, k, v, config=cfg)
            cp.cuda.Device().synchronize()
            ok = bool(cp.isfinite(out.astype(cp.float32)).all()) and bool(
                cp.isfinite(lse).all())
            print(f"{dtype} D={d} {cfg} {opts}: finite={ok}", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=70.0, help="seconds; later rows skipped")
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    ap.add_argument("--precompile", action="store_true", help="build the cubins only")
    args = ap.parse_args(argv)
    # The entries under test are behind their switch until this check has passed on a GPU.
    from xattn._backends.cupy_ import instances

    instances.SM90_WIDE_ON = True
    if args.san:
        return sanitizer_workload()
    if args.precompile:
        return precompile()
    t_start = time.time()

    import cupy as cp
    import torch

    import xattn
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    precompile()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    specs = [(dt, 256, 4096, c) for dt in ("float16", "bfloat16") for c in (False, True)]
    specs += [("float16", 192, 4096, c) for c in (False, True)]
    specs += [("float16", 128, 4096, False)]
    rows = []
    for dt, d, s, causal in specs:
        if time.time() - t_start > args.budget:
            rows.append((dt, d, s, causal, {}))
            continue
        _log(f"{dt} D={d} S={s} causal={causal}")
        try:
            r = _row(cp, torch, xattn, k90, validate_attention, dt, d, s, causal)
        except Exception as exc:  # noqa: BLE001 - the row says what broke, the rest run
            r = {"cupy.sm90": f"ERROR {type(exc).__name__}: {str(exc)[:100]}"}
            _log(f"  {r['cupy.sm90']}")
        rows.append((dt, d, s, causal, r))
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()

    def fmt(x):
        return f"{x:.0f}" if isinstance(x, float) else ("skipped" if x is None else str(x))

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"

    print(f"\n### Hopper forward at D = 256 / 192: wgmma (cupy.sm90) vs mma.sync (cupy.sm80) vs "
          f"torch SDPA default, TFLOP/s ({dev}; B*S = 16384, Hq*D = 2048; causal halved)\n")
    print("| dtype | D | S | causal | sm90 | sm80 | torch | sm90/torch | sm90/sm80 | n80 "
          "| n80/torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dt, d, s, causal, r in rows:
        a, m, t = r.get("cupy.sm90"), r.get("cupy.sm80"), r.get("torch")
        n = r.get("n80", "-")
        print(f"| {dt} | {d} | {s} | {causal} | {fmt(a)} | {fmt(m)} | {fmt(t)} | "
              f"{ratio(a, t)} | {ratio(a, m)} | {fmt(n)} | {ratio(n, t)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
