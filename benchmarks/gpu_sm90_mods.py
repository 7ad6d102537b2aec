"""The Hopper (wgmma) forward with score modifications and block masks, beside its anchors.

Usage (on a Hopper card with CuPy and torch)::

    python3 benchmarks/gpu_sm90_mods.py [--rows mods,flex,window] [--repeats 10]
                                        [--budget 80] [--json FILE]

Rows, each checked before it is timed (CUDA events, median of ``--repeats`` after a warm-up),
anchors in the same process on the same card:

- ``mods``: ``flash_attention`` fp16, B=4, H=16, S=4096, D=128 with ALiBi (causal) and with
  softcap (not causal) on ``cupy.sm90`` (the ``_mods`` entry) beside the mma.sync route it
  replaces (``backend="cupy.sm80"``) and torch SDPA (ALiBi as an additive fp16 bias, causal in
  it; softcap has no SDPA form: SDPA without it, a ceiling). Checked: sm90 against sm80.
- ``flex`` (issue 13's bar): ``flex_attention`` fp16, S=16384, D=64, 16 heads, causal mask_mod +
  ALiBi score_mod: the wgmma kernel (what ``backend="cupy"`` runs on cc 9.0) beside the same
  functions compiled into the mma.sync kernel (flex_tc's choice forced to cc 8.0) and
  ``torch.compile(flex_attention)``. Checked against torch's output.
- ``window`` (issue 11's bar): S=65536, window +-256, D=64, 16 heads, fp16, useful FLOPs (the
  visible pairs only): ``flash_attention(window=...)`` (the plain wgmma entry) and
  ``block_mask=BlockMask.sliding_window(..., block_size=128)`` (the ``_bm`` entry) beside
  compiled FlexAttention with the same band as its block mask. Checked against torch.

FLOPs: ``4 B H Sq Sk D``, half for causal, the visible pairs for the window. The table
(markdown, card named) is printed last; ``--json`` writes the rows. torch.compile takes tens
of seconds per function: rows that would start past ``--budget`` seconds are skipped. The
inputs, anchors and timing are module functions: tools/gpu_fwdtmamods_bench.py imports them
(mode 11 against mode 75 of the same rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def timed(fn, repeats=10):
    """Median milliseconds of ``fn()`` (CUDA events, after three warm-up calls)."""
    import cupy as cp
    import torch

    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def maxdiff(a, b):
    """max |a - b| in float32 of two CuPy arrays or torch tensors."""
    import cupy as cp
    import torch

    a = cp.from_dlpack(a) if isinstance(a, torch.Tensor) else a
    b = cp.from_dlpack(b.contiguous()) if isinstance(b, torch.Tensor) else b
    return float(cp.max(cp.abs(a.astype(cp.float32) - b.astype(cp.float32))))


def inputs(shape, seed):
    """Three fp16 torch tensors of ``shape`` and their zero-copy CuPy views."""
    import cupy as cp
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    ts = [torch.randn(*shape, device="cuda", dtype=torch.float16, generator=g)
          for _ in range(3)]
    return ts, [cp.from_dlpack(x) for x in ts]


def sdpa_alibi_causal(qt, kt, vt, slopes):
    """torch SDPA with ALiBi as an additive fp16 bias, causal folded into it: a callable."""
    import torch

    S = qt.shape[-2]
    i = torch.arange(S, device="cuda")
    rel = (i[None, :] - i[:, None]).abs().float()
    bias = (-torch.from_numpy(slopes).cuda()[:, None, None] * rel[None])
    bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf")).to(torch.float16)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias)
    return sdpa


def sdpa_plain(qt, kt, vt):
    """torch SDPA without options (softcap has no SDPA form: a ceiling)."""
    import torch

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    return sdpa


def flex_alibi_causal(slopes_np):
    """``(score_mod, mask_mod)`` for xattn.flex_attention: ALiBi with captured slopes, causal."""
    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes_np[h] * abs(q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx
    return alibi, causal


def torch_flex_alibi_causal(qt, kt, vt, slopes_np):
    """compiled FlexAttention with the same ALiBi score_mod and causal block mask: a callable."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    H, S = qt.shape[1], qt.shape[2]
    slopes_t = torch.from_numpy(slopes_np).cuda()

    def t_alibi(score, b, h, q_idx, kv_idx):
        return score - slopes_t[h] * (q_idx - kv_idx).abs()

    def t_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    compiled = torch.compile(flex_attention)
    bm = create_block_mask(t_causal, 1, H, S, S, device="cuda")
    return lambda: compiled(qt, kt, vt, score_mod=t_alibi, block_mask=bm)


def window_flops(H, S, D, W):
    """Useful FLOPs of a +-W band over S queries and keys (4 D per visible pair and head)."""
    pairs = sum(min(S, i + W + 1) - max(0, i - W) for i in range(S))
    return 4.0 * H * D * pairs


def torch_flex_band(qt, kt, vt, W):
    """compiled FlexAttention with the +-W band as its block mask: a callable (no grad)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = qt.shape[-2]

    def band(b, h, qi, kj):
        return (kj - qi <= W) & (qi - kj <= W)

    bmt = create_block_mask(band, None, None, S, S, device="cuda")
    fa = torch.compile(flex_attention)

    def run():
        with torch.no_grad():
            return fa(qt, kt, vt, block_mask=bmt)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="mods,flex,window")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=80.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()

    import cupy as cp
    import numpy as np
    import torch

    import xattn

    card = torch.cuda.get_device_name()
    print(f"card: {card}, cc {cp.cuda.Device().compute_capability}", flush=True)
    rows = []

    def timed_(fn):
        return timed(fn, args.repeats)

    def add(name, fl, ms, anchors, note):
        row = {"row": name, "xattn_ms": ms, "xattn": fl / ms / 1e9,
               "anchors": {k: (v, fl / v / 1e9) for k, v in anchors.items() if v},
               "note": note}
        rows.append(row)
        parts = ", ".join(f"{k} {t:.1f}" for k, (_, t) in row["anchors"].items())
        print(f"  {name}: xattn {row['xattn']:.1f} TFLOP/s ({ms:.3f} ms); {parts}; {note}",
              flush=True)

    def left():
        return args.budget - (time.time() - t0)

    wanted = set(args.rows.split(","))

    if "mods" in wanted:
        print("== mods: flash_attention fp16 B=4 H=16 S=4096 D=128", flush=True)
        B, H, S, D = 4, 16, 4096, 128
        (qt, kt, vt), (q, k, v) = inputs((B, H, S, D), 0)
        slopes = xattn.alibi_slopes(H, dtype=np.float32)
        for name, opts, causal in (("alibi causal", {"alibi_slopes": cp.asarray(slopes)}, True),
                                   ("softcap 30", {"softcap": 30.0}, False)):
            fl = 4.0 * B * H * S * S * D / (2 if causal else 1)

            def run(backend, opts=opts, causal=causal):
                return xattn.flash_attention(q, k, v, causal=causal, backend=backend, **opts)

            o90, o80 = run("cupy.sm90"), run("cupy.sm80")
            err = maxdiff(o90, o80)
            ms90 = timed_(lambda run=run: run("cupy.sm90"))
            ms80 = timed_(lambda run=run: run("cupy.sm80"))
            note = f"sm90 vs sm80 max diff {err:.1e}"
            if "alibi_slopes" in opts:
                sdpa = sdpa_alibi_causal(qt, kt, vt, slopes)
                note += f", vs SDPA {maxdiff(o90, sdpa()):.1e}"
                sdpa_name = "SDPA+bias"
            else:
                sdpa = sdpa_plain(qt, kt, vt)
                sdpa_name = "SDPA (no softcap)"
            ok = err < 2e-2
            mst = timed_(sdpa)
            add(f"fp16 D=128 S=4096 {name}", fl, ms90, {"cupy.sm80": ms80, sdpa_name: mst},
                note + ("" if ok else " CHECK FAILED"))
        del qt, kt, vt, q, k, v

    if "flex" in wanted and left() > 30:
        print("== flex: fp16 S=16384 D=64 H=16, causal mask_mod + ALiBi score_mod", flush=True)
        from xattn._backends.cupy_ import flex_tc

        H, S, D = 16, 16384, 64
        slopes_np = xattn.alibi_slopes(H, dtype=np.float32)
        alibi, causal = flex_alibi_causal(slopes_np)
        (qt, kt, vt), (q, k, v) = inputs((1, H, S, D), 1)
        fl = 4.0 * H * S * S * D / 2

        def run():
            return xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal,
                                        backend="cupy")

        out = run()
        ms90 = timed_(run)
        chosen = flex_tc.kernel_for("f16", D, True, True, 90)[0].name
        orig = flex_tc.kernel_for
        flex_tc.kernel_for = lambda tn, dp, mods, sparse, cc: orig(tn, dp, mods, sparse, 80)
        try:
            out80 = run()
            ms80 = timed_(run)
        finally:
            flex_tc.kernel_for = orig
        note = f"{chosen}; vs mma.sync {maxdiff(out, out80):.1e}"
        anchors = {"flex mma.sync": ms80}
        if left() > 25:
            torch_run = torch_flex_alibi_causal(qt, kt, vt, slopes_np)
            err = maxdiff(out, torch_run())
            note += f", vs torch {err:.1e}" + ("" if err < 2e-2 else " CHECK FAILED")
            anchors["torch flex"] = timed_(torch_run)
        else:
            note += ", torch flex skipped (budget)"
        add("flex fp16 S=16384 D=64 H=16 causal+ALiBi", fl, ms90, anchors, note)
        del qt, kt, vt, q, k, v

    if "window" in wanted and left() > 15:
        print("== window: fp16 S=65536 +-256 D=64 H=16", flush=True)
        H, S, D, W = 16, 65536, 64, 256
        (qt, kt, vt), (q, k, v) = inputs((1, H, S, D), 2)
        fl = window_flops(H, S, D, W)
        bmx = xattn.BlockMask.sliding_window(S, window=(W, W), block_size=128)

        def win():
            return xattn.flash_attention(q, k, v, window=(W, W), backend="cupy.sm90")

        def sparse():
            return xattn.flash_attention(q, k, v, block_mask=bmx, backend="cupy.sm90")

        ow, ob = win(), sparse()
        note = f"window vs block_mask {maxdiff(ow, ob):.1e}"
        msw, msb = timed_(win), timed_(sparse)
        anchors = {"xattn block_mask (_bm)": msb}
        if left() > 10:
            torch_run = torch_flex_band(qt, kt, vt, W)
            err = maxdiff(ow, torch_run())
            note += f", vs torch {err:.1e}" + ("" if err < 2e-2 else " CHECK FAILED")
            anchors["torch flex"] = timed_(torch_run)
        else:
            note += ", torch flex skipped (budget)"
        add("window fp16 S=65536 +-256 D=64 H=16 (useful)", fl, msw, anchors, note)

    print(f"\n## sm90 mods / block masks, card: {card} ({time.time() - t0:.0f} s)\n")
    print("| row | xattn cupy.sm90 TFLOP/s | anchors TFLOP/s (xattn / anchor) | check |")
    print("|---|---|---|---|")
    for r in rows:
        anchors = "; ".join(f"{k} {t:.1f} ({r['xattn'] / t:.2f}x)"
                            for k, (_, t) in r["anchors"].items())
        print(f"| {r['row']} | {r['xattn']:.1f} | {anchors} | {r['note']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "rows": rows}, f, indent=1)
    return 0 if all("FAILED" not in r["note"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
