"""xattn flash attention on CuPy beside torch SDPA on the same card, in the same run.

Usage (on a CUDA machine with CuPy, torch and triton)::

    python3 benchmarks/gpu_flash.py [--quick] [--flex] [--configs] [--no-fp32]

Checks correctness first (every timed case against a float64 reference on one head, and against
torch), then times with ``triton.testing.do_bench`` (CUDA events, L2 flushed between repeats,
median): xattn (``backend="auto"``: the RawKernel for 16-bit inputs), torch
``scaled_dot_product_attention`` default (cuDNN on Hopper) and its FLASH_ATTENTION backend;
fp16/bf16, D in {64, 128}, S in {1024, 4096, 16384} with B*S = 16384 and Hq*D = 2048, causal
and not; fp32 (SIMT kernel) beside torch's mem-efficient backend; a sliding window
S=65536 +-256 (beside FlexAttention compiled with ``--flex``). ``--configs`` also times
alternative tile configurations of the kernel. Prints a table last; writes JSON and a log
under ``$OUT`` if set.
FLOPs: ``4 B Hq Sq Sk D`` (half for causal), useful pairs only for the window.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import xattn  # noqa: E402
from xattn._array import validate_attention  # noqa: E402
from xattn._backends.cupy_ import flash as ck  # noqa: E402
from xattn.testing import reference_attention  # noqa: E402

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

LOG = []


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def to_cupy(t):
    """Zero-copy CuPy view of a torch CUDA tensor (bfloat16 through an int16 view)."""
    if t.dtype == torch.bfloat16:
        try:
            return cp.from_dlpack(t)
        except Exception:  # noqa: BLE001 - CuPy without bfloat16 DLPack import
            return cp.from_dlpack(t.view(torch.int16)).view(BF16)
    return cp.from_dlpack(t)


def flops(b, h, sq, sk, d, causal):
    f = 4.0 * b * h * sq * sk * d
    return f / 2 if causal else f


def bench_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def check_one_head(name, out_x, out_t, q, k, v, *, causal=False, window=None, rows=1024):
    """Max |error| of xattn and torch against float64 on head (0, 0), first ``rows`` queries.

    The rows are the first ones of a square problem, so causal/window become an explicit mask
    (``j <= i``, ``|i - j| <= w``) on the sliced reference.
    """
    s = q.shape[-2]
    r = min(rows, s)
    qh = q[0, 0, :r].float().cpu().numpy().astype(np.float64)
    kh, vh = (x[0, 0].float().cpu().numpy().astype(np.float64) for x in (k, v))
    i = np.arange(r)[:, None]
    j = np.arange(s)[None, :]
    mask = np.ones((r, s), dtype=bool)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= (j >= i - window[0]) & (j <= i + window[1])
    ref, _, _ = reference_attention(qh, kh, vh, mask=mask)
    ex = float(np.abs(cp.asnumpy(out_x[0, 0, :r].astype(cp.float32)) - ref).max())
    if out_t is not None:
        et = float(np.abs(out_t[0, 0, :r].float().cpu().numpy() - ref).max())
        ok = bool(np.isfinite(ex) and ex <= 2 * max(et, 1e-3) + 2e-3)
    else:
        et = float("nan")
        ok = bool(np.isfinite(ex) and ex < 3e-2)
    say(f"  check {name}: max|err| xattn {ex:.2e}, torch {et:.2e} -> {'ok' if ok else 'FAIL'}")
    return ok, ex, et


def case(dt_name, d, s, causal, results, configs=False):
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
    b, h = 16384 // s, 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(s + d)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=tdt, generator=gen)
               for _ in range(3))
    qc, kc, vc = to_cupy(q), to_cupy(k), to_cupy(v)
    name = f"{dt_name} D={d} S={s} B={b} H={h} {'causal' if causal else 'full'}"
    out_x = xattn.flash_attention(qc, kc, vc, causal=causal)
    with torch.no_grad():
        out_t = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ok, ex, et = check_one_head(name, out_x, out_t, q, k, v, causal=causal)
    fl = flops(b, h, s, s, d, causal)
    row = {"case": name, "dtype": dt_name, "D": d, "S": s, "B": b, "H": h, "causal": causal,
           "ok": bool(ok), "err_xattn": ex, "err_torch": et}
    prob = validate_attention(qc, kc, vc, causal=causal)
    row["xattn_backend"] = "cupy" if ck.supports(prob, {}, "forward") is None else "generic"
    if not ok:
        say(f"  {name}: correctness FAILED, not timed")
        results.append(row)
        return
    ms = bench_ms(lambda: xattn.flash_attention(qc, kc, vc, causal=causal))
    row["xattn_ms"] = ms
    row["xattn_tflops"] = fl / ms / 1e9
    with torch.no_grad():
        if dt_name == "fp32":
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                ms_t = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            row["torch_efficient_tflops"] = fl / ms_t / 1e9
        else:
            ms_t = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            row["torch_default_tflops"] = fl / ms_t / 1e9
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ms_f = bench_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                row["torch_flash_tflops"] = fl / ms_f / 1e9
            except RuntimeError as exc:
                say(f"  torch flash backend unavailable: {exc}")
    if configs and dt_name != "fp32":
        row["configs"] = {}
        prob = validate_attention(qc, kc, vc, causal=causal)
        for cfg in CANDIDATES.get(d, ()):
            try:
                o, _ = ck.forward(prob, qc, kc, vc, config=cfg)
                err = float(cp.abs(o.astype(cp.float32) - out_x.astype(cp.float32)).max())
                msc = bench_ms(lambda cfg=cfg: ck.forward(prob, qc, kc, vc, config=cfg))
                row["configs"][str(cfg)] = {"tflops": fl / msc / 1e9, "maxdiff": err}
                say(f"    config {cfg}: {fl / msc / 1e9:.1f} TFLOP/s (maxdiff {err:.1e})")
            except Exception as exc:  # noqa: BLE001 - report and go on
                say(f"    config {cfg}: failed: {exc}")
    ref = row.get("torch_default_tflops", row.get("torch_efficient_tflops", float("nan")))
    say(f"  {name}: xattn {row['xattn_tflops']:.1f} TFLOP/s ({row['xattn_backend']}), "
        f"torch {ref:.1f} -> ratio {row['xattn_tflops'] / ref:.2f}")
    results.append(row)


CANDIDATES = {64: [(4, 1, 64), (4, 2, 64), (8, 2, 64)],
              128: [(4, 1, 64), (4, 2, 32), (8, 2, 32), (4, 2, 64)]}


def window_case(results, flex=False, s=65536, w=256, d=64, h=32, dt=torch.float16):
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=dt, generator=gen)
               for _ in range(3))
    qc, kc, vc = to_cupy(q), to_cupy(k), to_cupy(v)
    name = f"fp16 D={d} S={s} H={h} window +-{w}"
    out_x = xattn.flash_attention(qc, kc, vc, window=(w, w))
    ok, ex, _ = check_one_head(name, out_x, None, q, k, v, window=(w, w))
    pairs = sum(min(s, i + w + 1) - max(0, i - w) for i in range(s))
    fl = 4.0 * h * d * pairs
    row = {"case": name, "ok": bool(ok), "err_xattn": ex}
    ms = bench_ms(lambda: xattn.flash_attention(qc, kc, vc, window=(w, w)))
    row["xattn_tflops"] = fl / ms / 1e9
    row["xattn_ms"] = ms
    say(f"  {name}: xattn {ms:.3f} ms = {fl / ms / 1e9:.1f} useful TFLOP/s")
    if flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def mask_mod(b, hh, qi, kj):
                return (kj - qi <= w) & (qi - kj <= w)

            bm = create_block_mask(mask_mod, None, None, s, s, device="cuda")
            fa = torch.compile(flex_attention)
            with torch.no_grad():
                fa(q, k, v, block_mask=bm)
                msf = bench_ms(lambda: fa(q, k, v, block_mask=bm))
            row["flex_tflops"] = fl / msf / 1e9
            say(f"  flex: {msf:.3f} ms = {fl / msf / 1e9:.1f} useful TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            say(f"  flex unavailable: {exc}")
    results.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="S=4096 only")
    ap.add_argument("--flex", action="store_true", help="time FlexAttention (compiles)")
    ap.add_argument("--configs", action="store_true", help="time alternative tile configs")
    ap.add_argument("--no-fp32", action="store_true",
                    help="skip fp32 (the SIMT kernel, switched on for this run)")
    ap.add_argument("--bar-and-fp32", action="store_true",
                    help="only the bar row (fp16 D=128 S=4096) and the fp32 rows")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    say(f"card: {card}; cupy {cp.__version__}, torch {torch.__version__}, "
        f"cc {cp.cuda.Device().compute_capability}")
    t0 = time.time()
    results = []
    seqs = (4096,) if args.quick else (1024, 4096, 16384)
    if args.bar_and_fp32:
        case("fp16", 128, 4096, False, results)
        ck.ENABLE_FP32_KERNEL = True
        case("fp32", 64, 4096, False, results)
        case("fp32", 128, 4096, True, results)
    for dt in () if args.bar_and_fp32 else ("fp16", "bf16"):
        for d in (64, 128):
            for s in seqs:
                for causal in (False, True):
                    case(dt, d, s, causal, results,
                         configs=args.configs and s == 4096 and dt == "fp16")
    if not args.bar_and_fp32:
        window_case(results, flex=args.flex)
    if not (args.quick or args.no_fp32 or args.bar_and_fp32):
        # Last: the float32 SIMT kernel is new; a fault there cannot cost the other rows.
        ck.ENABLE_FP32_KERNEL = True
        case("fp32", 64, 4096, False, results)
        case("fp32", 128, 4096, True, results)
    say(f"total {time.time() - t0:.0f} s")

    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_flash.json").write_text(json.dumps({"card": card, "rows": results},
                                                          indent=1))
        Path(out, "gpu_flash.log").write_text("\n".join(LOG))

    print(f"\n{card}: forward TFLOP/s (B*S=16384, Hq*D=2048)")
    print(f"{'case':<38} {'xattn':>7} {'torch':>7} {'flash':>7} {'x/torch':>7} {'x/flash':>7}")
    for r in results:
        x = r.get("xattn_tflops", math.nan)
        t = r.get("torch_default_tflops", r.get("torch_efficient_tflops",
                                                r.get("flex_tflops", math.nan)))
        f = r.get("torch_flash_tflops", math.nan)
        flag = "" if r.get("ok") else "  FAILED CHECK"
        print(f"{r['case'][:38]:<38} {x:7.1f} {t:7.1f} {f:7.1f} {x / t:7.2f} {x / f:7.2f}{flag}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
