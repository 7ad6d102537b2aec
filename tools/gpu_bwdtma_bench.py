"""Time the Hopper backward's experimental TMA entries (``flash_bwd_sm90.backward(...,
config="tma" | "tma2")``: Q / dO per step and K / V once by the copy engine, 3 or 2 Q/dO
buffers) against its plain entry (cp.async by every thread) and torch's SDPA backward
(default backend) in one process.

Usage: ``python3 tools/gpu_bwdtma_bench.py [--budget SECONDS] [--reps N]`` on a compute
capability 9.0 GPU; ``--precompile`` only builds the cubins (plain, tma, tma2; fp16 and bf16;
D 64 and 128: the GPU tests and the benchmark then load them from the disk cache); ``--san``
runs the sanitizer workload (one tiny backward per TMA entry, and per window twin); ``--window``
times the window twins (``config=`` on a window request: ``_tma_win`` / ``_tma2_win``, written
2026-12-05) against the default route (the cp.async ``win`` entry at D = 64, ``cupy.sm80`` at
D = 128) on issue 11's window row (fp16, S = 65536, +-256, D = 64, H = 16; and D = 128 at
S = 16384), useful FLOPs (the visible pairs), each checked against the default first.

Rows: fp16, B=4, H=16, S = Sq = Sk = 4096, D 128 and 64, causal and not. Each row first checks
every entry: the TMA entries' dk / dv against the plain entry's bit for bit and dq within 1e-2
of it (relative to max |dq|), the plain entry against torch's gradients (max |diff| / max |torch|
<= 2e-2); a failed check prints FAIL instead of a time. Times are the whole backward (xattn:
delta, the main kernel, the dq conversion and the host work of the call, tensor-map encodes
included; torch: ``torch.autograd.grad`` of a recorded forward), median of CUDA-event timings
(tools/gpu_sm90bwd_bench.py's helpers). TFLOP/s as /work/shared/PERF.md counts them: 2.5 x the
forward's 4 B H S^2 D, half of it causal. Progress on stderr; a markdown table last on stdout.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


ENTRIES = ("plain", "tma", "tma2")  # "plain": the cp.async entry


def precompile():
    from xattn._backends.cupy_ import _compile, flash_sm90, instances

    t0 = time.perf_counter()
    insts = [instances.bwd_sm90(tn, d, None if var == "plain" else var) for var in ENTRIES
             for d in (64, 128) for tn in ("f16", "bf16")]
    _compile.precompile("flash_bwd_sm90.cu", [(i.name, i.defines, i.includes) for i in insts])
    # The forwards that the tests and rows run first (auto's: the sm_90a default configs).
    for tn in ("f16", "bf16"):
        flash_sm90.precompile(tn, [(d, *flash_sm90.CONFIGS[d]) for d in (64, 128)])
    _log(f"precompile: {len(insts) + 4} cubins in {time.perf_counter() - t0:.1f} s")
    return 0


def _problem(cp, xattn, dtype, b, hq, hkv, sq, sk, d, causal, seed=0):
    from xattn._array import validate_attention

    rng = np.random.default_rng([d, causal, seed])
    q, do = (_randn(cp, rng, dtype, b, hq, sq, d) for _ in range(2))
    k, v = (_randn(cp, rng, dtype, b, hkv, sk, d) for _ in range(2))
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                              causal=causal)
    return prob, (do, q, k, v, out, lse)


def _rel(cp, x, y):
    return float(cp.abs(x.astype(cp.float32) - y.astype(cp.float32)).max()) / max(
        1e-6, float(cp.abs(y.astype(cp.float32)).max()))


def _row(cp, xattn, torch, b, h, s, d, causal, reps):
    """{column: TFLOP/s, or a string saying why there is no time}."""
    from xattn._backends.cupy_ import flash_bwd_sm90 as k90b

    prob, args = _problem(cp, xattn, "float16", b, h, h, s, s, d, causal)
    flops = 2.5 * 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    res = {}

    def tf(ms):
        return flops / (ms * 1e-3) / 1e12

    def run(config):
        return k90b.backward(prob, *args, config=config)

    plain = run("plain")
    for config in ENTRIES:
        col = config
        _log(f"D={d} causal={causal}: {col} ...")
        try:
            if config != "plain":
                got = run(config)
                same = all(bool((x == y).all()) for x, y in zip(got[1:], plain[1:],
                                                                   strict=True))
                err = _rel(cp, got[0], plain[0])
                if not same or not np.isfinite(err) or err > 1e-2:
                    res[col] = f"FAIL (dk/dv equal: {same}, dq rel diff {err:.3g})"
                    continue
            res[col] = tf(_median_ms(cp, lambda c=config: run(c), reps))
        except Exception as exc:  # noqa: BLE001 - a row says what broke
            res[col] = f"ERROR {type(exc).__name__}: {str(exc)[:80]}"
        _log(f"  {col}: {res[col]}")
    if torch is None:
        res["torch"] = "n/a"
        return res
    import torch.nn.functional as F

    do, q, k, v = args[:4]
    _log(f"D={d} causal={causal}: torch ...")
    tq, tk, tv = (torch.from_dlpack(x).requires_grad_(True) for x in (q, k, v))
    to = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    tdo = torch.from_dlpack(do)
    grads = torch.autograd.grad(to, (tq, tk, tv), tdo, retain_graph=True)
    torch.cuda.synchronize()
    err = max(_rel(cp, x, cp.from_dlpack(g.detach())) for x, g in zip(plain, grads,
                                                                       strict=True))
    _log(f"  plain vs torch: max rel diff {err:.3g}")
    if not np.isfinite(err) or err > 2e-2:
        res["plain"] = f"FAIL vs torch (rel diff {err:.3g})"
    res["torch"] = tf(_median_ms(
        cp, lambda: torch.autograd.grad(to, (tq, tk, tv), tdo, retain_graph=True), reps))
    torch.cuda.synchronize()
    return res


def _window_row(cp, d, s, h, w, reps):
    """One row of :func:`window_rows`: {column: useful TFLOP/s, or why there is none}."""
    import xattn
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_bwd_sm90 as k90b
    from xattn._backends.cupy_ import instances

    rng = np.random.default_rng([d, s])
    q, do, k, v = (_randn(cp, rng, "float16", 1, h, s, d) for _ in range(4))
    opts = {"window": (w, w)}
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)), **opts)
    pairs = sum(min(s, i + w + 1) - max(0, i - w) for i in range(s))
    flops = 2.5 * 4.0 * h * d * pairs

    def default():
        return xattn.flash_attention_backward(do, q, k, v, out, lse, backend="cupy", **opts)

    def twin(config):
        return k90b.backward(prob, do, q, k, v, out, lse, config=config)

    ref = default()
    row = {"case": f"D={d} S={s} +-{w} H={h}",
           "default": flops / _median_ms(cp, default, reps) / 1e9}
    on = instances.SM90_BWD_WIN_TMA_ON
    instances.SM90_BWD_WIN_TMA_ON = True  # D = 128 windows served by the twins
    try:
        for config in ENTRIES[1:]:
            err = max(_rel(cp, x, y) for x, y in zip(twin(config), ref, strict=True))
            row[config] = (f"FAIL (rel diff {err:.3g})" if not np.isfinite(err) or err > 1e-2
                           else flops / _median_ms(cp, lambda c=config: twin(c), reps) / 1e9)
            _log(f"{row['case']} {config}: {row[config]}")
    finally:
        instances.SM90_BWD_WIN_TMA_ON = on
    return row


def window_rows(reps, budget):
    """The window twins against the default route (see the module's docstring)."""
    import cupy as cp

    t0, rows = time.time(), []
    for d, s in ((64, 65536), (128, 16384)):
        if time.time() - t0 > budget:
            break
        rows.append(_window_row(cp, d, s, 16, 256, reps))
        cp.get_default_memory_pool().free_all_blocks()
    print("\n### Window backward: the TMA window twins against the default route "
          "(fp16, useful TFLOP/s)\n")
    print("| case | default route | tma_win | tma2_win |")
    print("|---|---|---|---|")
    for r in rows:
        cells = (r.get(c, "-") for c in ("default", *ENTRIES[1:]))
        print(f"| {r['case']} | " + " | ".join(
            f"{x:.1f}" if isinstance(x, float) else str(x) for x in cells) + " |")
    return 0


def sanitizer_workload():
    """One tiny backward per TMA entry (fp16 / bf16, D 64 / 128, causal, GQA, Sq != Sk off the
    tiles, several query steps per key block) for compute-sanitizer."""
    import cupy as cp

    import xattn
    from xattn._backends.cupy_ import flash_bwd_sm90 as k90b

    for config in ENTRIES[1:]:
        for dtype in ("float16", "bfloat16"):
            for d in (64, 128):
                prob, args = _problem(cp, xattn, dtype, 1, 4, 2, 200, 150, d, True)
                g = k90b.backward(prob, *args, config=config)
                cp.cuda.Device().synchronize()
                print(f"{config} {dtype} D={d}: "
                      f"finite={all(bool(cp.isfinite(x).all()) for x in g)}", flush=True)
    # The window twins (D = 64: no switch needed with config=).
    from xattn._array import validate_attention

    rng = np.random.default_rng(3)
    q, do = (_randn(cp, rng, "float16", 1, 4, 200, 64) for _ in range(2))
    k, v = (_randn(cp, rng, "float16", 1, 2, 150, 64) for _ in range(2))
    out, lse = xattn.flash_attention(q, k, v, window=(40, 20), return_lse=True)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                              window=(40, 20))
    for config in ENTRIES[1:]:
        for det in (False, True):
            g = k90b.backward(prob, do, q, k, v, out, lse, config=config, deterministic=det)
            cp.cuda.Device().synchronize()
            print(f"{config}_win det={det}: "
                  f"finite={all(bool(cp.isfinite(x).all()) for x in g)}", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=70.0, help="seconds; later rows skipped")
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    ap.add_argument("--precompile", action="store_true", help="build the cubins only")
    ap.add_argument("--window", action="store_true", help="the window twins' rows only")
    args = ap.parse_args(argv)
    if args.precompile:
        return precompile()
    if args.san:
        return sanitizer_workload()
    if args.window:
        return window_rows(args.reps, args.budget)
    t_start = time.time()

    import cupy as cp

    import xattn

    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - torch is optional on the device
        torch = None
        _log(f"torch unavailable: {exc}")

    precompile()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    cols = ("plain", "tma", "tma2", "torch")
    rows = []
    b, h, s = args.b, args.h, args.s
    for d in (128, 64):
        for causal in (False, True):
            if time.time() - t_start > args.budget:
                rows.append((d, causal, dict.fromkeys(cols, "skipped (budget)")))
                continue
            rows.append((d, causal, _row(cp, xattn, torch, b, h, s, d, causal, args.reps)))
            cp.get_default_memory_pool().free_all_blocks()

    def fmt(x):
        return f"{x:.0f}" if isinstance(x, float) else str(x)

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"

    print(f"\n### Hopper backward, TMA entries: fp16, B={b} H={h} S={s}, TFLOP/s ({dev}; 2.5x "
          "fwd FLOPs, causal halved; whole backward)\n")
    print("| D | causal | plain | tma (3 buf) | tma2 (2 buf) | torch SDPA | plain/torch | "
          "tma/torch | tma2/torch | tma/plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d, causal, r in rows:
        p, t, t2, tt = (r.get(c, "-") for c in cols)
        print(f"| {d} | {causal} | {fmt(p)} | {fmt(t)} | {fmt(t2)} | {fmt(tt)} | "
              f"{ratio(p, tt)} | {ratio(t, tt)} | {ratio(t2, tt)} | {ratio(t, p)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
