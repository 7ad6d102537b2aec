"""Time the Hopper wgmma backward's option entries (``cupy.sm90_bwd``: window, score mods,
block masks) against the mma.sync backward (``cupy.sm80``) and torch's SDPA backward where
torch has the option, in one process.

Usage: ``python3 tools/gpu_bwd90mods_bench.py [--budget SECONDS] [--s 4096] [--b 4] [--h 16]``
on a compute capability 9.0 GPU; ``--precompile`` only builds the sm_90a cubins of every
option entry (threads, disk cache); ``--san`` runs one tiny backward per option entry (and the
flex entries) for compute-sanitizer. Rows: fp16, Sq = Sk = S, causal with a window, softcap,
ALiBi, a bias, a boolean mask, a BlockMask of 128-blocks, at D = 64 and (what D = 128 has:
window, block mask) D = 128, beside the plain causal row of each head dim (the most telling
rows first: those past ``--budget`` seconds are skipped). Each row first
checks sm90_bwd's gradients against cupy.sm80's (max |diff| / max |sm80| <= 2e-2, else FAIL).
TFLOP/s count the visible (query, key) pairs (PERF.md: backward = 2.5 x 4 x pairs x D); times
are the backward alone (delta, kernel and dq conversion for xattn; ``torch.autograd.grad`` of a
recorded SDPA forward, whose attn_mask carries the bias / mask / causal -inf, for torch),
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
sys.path.insert(0, str(Path(__file__).resolve().parent))


WINDOW = (1024, 0)  # causal sliding window: each query sees itself and 1024 keys before


def precompile(workers=None):
    """Build the sm_90a cubins of every shipped Hopper entry (the backward's plain and option
    entries, the forward's that the tests' forward calls take) at once, one thread per core
    (disk cache: later processes, pytest workers included, load them)."""
    import os

    from xattn._backends.cupy_ import _compile, instances

    t0 = time.time()
    insts = [i for i in instances.shipped() if i.arch]
    for src in sorted({i.source for i in insts}):
        _compile.precompile(src, [(i.name, i.defines, i.includes) for i in insts
                                  if i.source == src], workers or os.cpu_count() or 8)
    _log(f"precompiled {len(insts)} sm_90a entries in {time.time() - t0:.1f} s")


def _pairs(s, causal, window=None):
    """Visible (query, key) pairs of an S x S problem (bottom-right = top-left here)."""
    i = np.arange(s)
    lo = np.zeros(s, np.int64) if window is None or window[0] is None else i - window[0]
    hi = i if causal else np.full(s, s - 1)
    if window is not None and window[1] is not None:
        hi = np.minimum(hi, i + window[1])
    return float(np.clip(np.minimum(hi, s - 1) - np.maximum(lo, 0) + 1, 0, None).sum())


def _rows():
    """(D, name, options), most telling first (a row past the budget is skipped): each head
    dim's plain causal row is the anchor of its option rows."""
    win, bm = ("causal+window", {"causal": True, "window": WINDOW}), \
        ("block_mask window 128", {"bm": True})
    return [(64, "causal", {"causal": True}), (64, "causal+alibi", {"causal": True, "alibi": True}),
            (64, *win), (64, *bm), (128, "causal", {"causal": True}), (128, *win), (128, *bm),
            (64, "causal+softcap", {"causal": True, "softcap": 30.0}),
            (64, "causal+bias", {"causal": True, "bias": True}),
            (64, "mask (bool)", {"mask": True})]


def _row(cp, xattn, torch, b, h, s, d, name, spec, reps):
    """(sm90_bwd, sm80, torch): TFLOP/s or a string saying why there is no time."""
    rng = np.random.default_rng([d, len(name)])
    q, k, v, dout = (_randn(cp, rng, "float16", b, h, s, d) for _ in range(4))
    opts = {}
    causal = spec.get("causal", False)
    if causal:
        opts["causal"] = True
    if "window" in spec:
        opts["window"] = spec["window"]
    if "softcap" in spec:
        opts["softcap"] = spec["softcap"]
    if spec.get("alibi"):
        opts["alibi_slopes"] = cp.asarray(xattn.alibi_slopes(h), dtype=cp.float32)
    if spec.get("bias"):
        opts["bias"] = cp.asarray(rng.standard_normal((s, s), dtype=np.float32))
    if spec.get("mask"):
        opts["mask"] = cp.asarray(rng.random((s, s)) < 0.5)
    pairs = _pairs(s, causal, spec.get("window"))
    if spec.get("bm"):
        bm = xattn.BlockMask.sliding_window(s, window=WINDOW, causal=True, block_size=128)
        opts["block_mask"] = bm
        pairs = _pairs(s, True, WINDOW)
    if spec.get("mask"):
        pairs = float(int(cp.count_nonzero(opts["mask"])))
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    flops = 2.5 * 4.0 * b * h * pairs * d

    def tf(ms):
        return flops / (ms * 1e-3) / 1e12

    def run(entry):
        return xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=entry, **opts)

    ref, got = run("cupy.sm80"), None
    sm80 = tf(_median_ms(cp, lambda: run("cupy.sm80"), reps))
    try:
        got = run("cupy.sm90_bwd")
        err = max(float(cp.abs(x.astype(cp.float32) - y.astype(cp.float32)).max()) /
                  max(1.0, float(cp.abs(y.astype(cp.float32)).max()))
                  for x, y in zip(got, ref, strict=True))
        if not np.isfinite(err) or err > 2e-2:
            sm90 = f"FAIL (rel diff {err:.3g})"
        else:
            sm90 = tf(_median_ms(cp, lambda: run("cupy.sm90_bwd"), reps))
            _log(f"  {name} D={d}: sm90_bwd vs sm80 max rel diff {err:.3g}")
    except Exception as exc:  # noqa: BLE001 - a row says what broke
        sm90 = f"ERROR {type(exc).__name__}: {str(exc)[:80]}"
    del got, ref
    if torch is None or not (spec.keys() <= {"causal", "bias", "mask"}):
        return sm90, sm80, "n/a"
    import torch.nn.functional as F

    tq, tk, tv = (torch.from_dlpack(x).requires_grad_(True) for x in (q, k, v))
    tdo = torch.from_dlpack(dout)
    kw = {}
    if "bias" in opts or "mask" in opts:
        # One float attn_mask: the bias (or 0 / -inf from the boolean mask) plus causal -inf.
        m = (torch.from_dlpack(opts["bias"]).to(torch.float16) if "bias" in opts else
             torch.zeros((s, s), dtype=torch.float16, device=tq.device))
        if "mask" in opts:
            keep = torch.from_dlpack(opts["mask"].view(cp.uint8)).bool()
            m = m.masked_fill(~keep, float("-inf"))
        if causal:
            m = m.masked_fill(torch.ones((s, s), dtype=torch.bool, device=m.device).triu(1),
                              float("-inf"))
        kw["attn_mask"] = m
    else:
        kw["is_causal"] = causal
    to = F.scaled_dot_product_attention(tq, tk, tv, **kw)
    torch.cuda.synchronize()
    ms = _median_ms(cp, lambda: torch.autograd.grad(to, (tq, tk, tv), tdo, retain_graph=True),
                    reps)
    torch.cuda.synchronize()
    return sm90, sm80, tf(ms)


def sanitizer_workload():
    """One tiny backward per option entry (fp16 and bf16 at D = 64, the D = 128 ones) and
    the flex entry flex_bm (ALiBi + causal mask_mod), for compute-sanitizer."""
    import cupy as cp

    import xattn

    rng = np.random.default_rng(0)
    slopes = cp.asarray(xattn.alibi_slopes(4), dtype=cp.float32)
    cases = [("float16", 64, {"window": (40, 3)}),
             ("bfloat16", 64, {"causal": True, "softcap": 5.0, "alibi_slopes": slopes,
                               "mask": cp.asarray(rng.random((200, 260)) < 0.8)}),
             ("float16", 64, {"bm": True}),
             ("float16", 64, {"bm": True, "bias": cp.asarray(
                 rng.standard_normal((4, 1, 260)), dtype=cp.float32)}),
             ("bfloat16", 128, {"window": (70, None), "causal": True}),
             ("float16", 128, {"bm": True})]
    for dtype, d, opts in cases:
        q, do = (_randn(cp, rng, dtype, 1, 4, 200, d) for _ in range(2))
        k, v = (_randn(cp, rng, dtype, 1, 2, 260, d) for _ in range(2))
        if opts.pop("bm", False):
            opts["block_mask"] = xattn.BlockMask.causal(200, 260, block_size=(64, 128))
        out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
        g = xattn.flash_attention_backward(do, q, k, v, out, lse, backend="cupy.sm90_bwd",
                                           **opts)
        cp.cuda.Device().synchronize()
        print(f"{dtype} D={d} {sorted(opts)}: finite="
              f"{all(bool(cp.isfinite(x).all()) for x in g)}")

    def alibi(score, b, h, q_idx, kv_idx):
        return score - 0.125 * (h + 1) * abs(q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    for smod, mmod in ((alibi, causal),):
        q, k, v, do = (_randn(cp, rng, "float16", 1, 4, 150, 64) for _ in range(4))
        out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod,
                                        return_lse=True, backend="cupy")
        g = xattn.flex_attention_backward(do, q, k, v, out, lse, score_mod=smod,
                                          mask_mod=mmod, backend="cupy")
        cp.cuda.Device().synchronize()
        print(f"flex {smod.__name__} {mmod.__name__ if mmod else None}: finite="
              f"{all(bool(cp.isfinite(x).all()) for x in g[:3])}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=60.0, help="seconds; later rows skipped")
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    ap.add_argument("--precompile", action="store_true", help="build the cubins only")
    args = ap.parse_args(argv)
    if args.precompile:
        precompile()
        return 0
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

    precompile()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    rows = []
    b, h, s = args.b, args.h, args.s
    for d, name, spec in _rows():
        if time.time() - t_start > args.budget:
            rows.append((d, name, "skipped (budget)", "-", "-"))
            continue
        _log(f"D={d} {name} ...")
        rows.append((d, name, *_row(cp, xattn, torch, b, h, s, d, name, spec, args.reps)))
        _log(f"  {rows[-1]}")
        cp.get_default_memory_pool().free_all_blocks()

    def fmt(x):
        return f"{x:.0f}" if isinstance(x, float) else str(x)

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"

    print(f"\n### backward options fp16, B={b} H={h} S={s}, TFLOP/s of visible pairs ({dev}; "
          f"window {WINDOW} causal; block mask = that window in 128-blocks)\n")
    print("| D | option | sm90_bwd (wgmma) | sm80 (mma.sync) | torch SDPA | sm90/sm80 | "
          "sm90/torch |")
    print("|---|---|---|---|---|---|---|")
    for d, name, a, c, t in rows:
        print(f"| {d} | {name} | {fmt(a)} | {fmt(c)} | {fmt(t)} | {ratio(a, c)} | "
              f"{ratio(a, t)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
