"""Time the Hopper forward's score-mod, block-mask and flex entries in mode 75 (K/V by the copy
engine) against their mode-11 twins (K/V by cp.async) and the anchors of
benchmarks/gpu_sm90_mods.py, in one process.

Usage: ``python3 tools/gpu_fwdtmamods_bench.py [--budget SECONDS] [--repeats N]`` on a compute
capability 9.0 GPU; ``--precompile`` only builds the sm_90a cubins of both families (parallel
processes, into the disk cache that the tests and the benchmark then read); ``--san`` runs the
sanitizer workload (one tiny launch of each new entry kind).

Rows (fp16; the shapes of benchmarks/gpu_sm90_mods.py, whose input, anchor and timing functions
are imported, not copied):

- ALiBi causal, B=4 H=16 S=4096 D=128 (``_mods``), anchor torch SDPA with the ALiBi bias;
- softcap 30, same shape (``_mods``), anchor SDPA without softcap (a ceiling);
- window +-256 as ``BlockMask.sliding_window(block_size=128)``, S=65536 D=64 H=16 (``_bm``),
  useful FLOPs, anchor compiled FlexAttention with the band as its block mask (issue 11's bar,
  before the flex row: rows that would start past ``--budget`` are skipped);
- flex_attention causal mask_mod + ALiBi score_mod, S=16384 D=64 H=16 (``_flex_bm``), anchor
  compiled FlexAttention (the launcher's tables set to one family, then the other).

Each mode's output is checked before it is timed (max |diff| < 2e-2 against the mma.sync
kernel for the flash_attention rows, against the compiled FlexAttention's output for the flex
and window rows) and the two modes' outputs compared bit for bit. CUDA-event medians of the
whole call. Progress on stderr, a markdown table last on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
from gpu_bench_common import log as _log

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

TOL = 2e-2
MODES = (11, 75)


def _sm90_instances():
    """The sm_90a _mods / _bm / _mods_bm entries of both families (tests and benchmark)."""
    from xattn._backends.cupy_ import instances

    out = [i for i in (*instances.shipped(), *instances.experimental())
           if i.source == "flash_fwd_sm90.cu" and i.name.endswith(("_mods", "_bm"))]
    out = [i for i in out if "_o11_" in i.name or "_o75_" in i.name]
    # test_gpu_sm90_mods.py's test_explicit_configs also runs this ping-pong entry.
    return [*out, instances.sm90("f16", 64, (128, 2, 27), True, True)]


def _compile_one(item):
    name, defines = item
    from xattn._backends.cupy_ import _compile

    t = time.time()
    try:
        _compile.cubin_path(_compile.source("flash_fwd_sm90.cu"), defines)
        return f"{name}: {time.time() - t:.1f} s"
    except Exception as exc:  # noqa: BLE001 - reported; the tests raise it again
        return f"{name}: FAILED {str(exc)[-600:]}"


def _bench_instances():
    """The entries the benchmark's rows launch (flex builds its own modules)."""
    from xattn._backends.cupy_ import instances

    return [instances.sm90("f16", d, (*cfg, mode), mods, sparse)
            for d, cfg, mods, sparse in ((128, (64, 2), True, False), (64, (128, 2), False, True))
            for mode in MODES]


def precompile(only_bench=False):
    import os
    from concurrent.futures import ProcessPoolExecutor

    items = [(i.name, i.defines) for i in (_bench_instances() if only_bench
                                           else _sm90_instances())]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as ex:
        lines = list(ex.map(_compile_one, items))
    for line in lines:
        if "FAILED" in line:
            print(line, flush=True)
    print(f"precompile: {len(items)} cubins in {time.time() - t0:.1f} s, "
          f"{sum('FAILED' in x for x in lines)} failed", flush=True)
    return 1 if any("FAILED" in x for x in lines) else 0


@contextlib.contextmanager
def family(mode):
    """The launcher's _mods / _bm tables (what flex_attention reads too) set to mode 11's or
    to their mode-75 twins for the duration."""
    from xattn._backends.cupy_ import flash_sm90 as k90
    from xattn._backends.cupy_ import instances

    tables = {11: (instances.SM90_MODS, instances.SM90_BM, instances.SM90_BM_MODS),
              75: (instances.SM90_MODS_TMA, instances.SM90_BM_TMA, instances.SM90_BM_MODS_TMA)}
    names = ("MODS_CONFIGS", "BM_CONFIGS", "BM_MODS_CONFIGS")
    old = [getattr(k90, n) for n in names]
    try:
        for n, t in zip(names, tables[mode], strict=True):
            setattr(k90, n, t)
        yield
    finally:
        for n, t in zip(names, old, strict=True):
            setattr(k90, n, t)


def sanitizer_workload():
    """One tiny launch of each mode-75 entry kind: _mods (D=64, 3 consumers; D=128), _bm
    (128- and 64-key tiles, partial and empty blocks), _mods_bm, flex _flex and _flex_bm;
    Sq and Sk off the tile sizes, GQA, more key tiles than ring stages."""
    import cupy as cp

    import xattn
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    rng = np.random.default_rng(0)

    def qkv(d, sq, sk):
        return [cp.asarray(rng.standard_normal(sh), dtype=cp.float16)
                for sh in ((1, 4, sq, d), (1, 2, sk, d), (1, 2, sk, d))]

    slopes = cp.asarray(xattn.alibi_slopes(4), dtype=cp.float32)
    dense = rng.random((200, 450)) < 0.5
    dense[:, 128:256] = False
    launches = [
        (64, {"alibi_slopes": slopes, "softcap": 5.0, "causal": True}, None, (64, 3, 75)),
        (128, {"bias": cp.asarray(rng.standard_normal((4, 200, 450)), dtype=cp.float32)},
         None, (64, 2, 75)),
        (64, {}, xattn.BlockMask.from_dense(dense, block_size=128), (128, 2, 75)),
        (128, {}, xattn.BlockMask.from_dense(dense, block_size=(128, 64)), (64, 2, 75)),
        (128, {"alibi_slopes": slopes}, xattn.BlockMask.from_dense(dense, block_size=128),
         (64, 2, 75)),
    ]
    for d, opts, bm, cfg in launches:
        q, k, v = qkv(d, 200, 450)
        prob = validate_attention(q, k, v, block_mask=bm, **opts)
        out, lse = k90.forward(prob, q, k, v, config=cfg)
        cp.cuda.Device().synchronize()
        kind = ("bm" if bm is not None else "") + ("+mods" if prob.has_score_mods else "")
        print(f"D={d} {cfg} {kind}: "
              f"finite={bool(cp.isfinite(out.astype(cp.float32)).all())}", flush=True)
    sl = xattn.alibi_slopes(4, dtype=np.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - sl[h] * abs(q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    q, k, v = qkv(64, 200, 450)
    with family(75):
        for mmod in (causal, None):
            out = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=mmod, backend="cupy")
            cp.cuda.Device().synchronize()
            print(f"flex mask_mod={mmod is not None}: "
                  f"finite={bool(cp.isfinite(out.astype(cp.float32)).all())}", flush=True)
    print("workload done", flush=True)
    return 0


def _same_bits(a, b):
    import cupy as cp

    return bool(cp.all(a.view(cp.uint16) == b.view(cp.uint16)))


def _modes_row(base, name, flops, run_mode, reference, anchor_name, anchor, repeats):
    """{"row", "modes": {mode: TFLOP/s or why none}, "anchor": ..., "bitwise", "check"}:
    ``run_mode(mode)`` returns the output of one mode, ``reference()`` the array each is
    checked against, ``anchor`` the anchor's callable (None: not timed)."""
    row = {"row": name, "modes": {}, "anchor_name": anchor_name, "anchor": None,
           "bitwise": "-", "check": []}
    try:
        ref = reference()
    except Exception as exc:  # noqa: BLE001 - no reference: nothing is timed
        row["check"].append(f"reference ERROR {type(exc).__name__}: {str(exc)[:120]}")
        row["modes"] = {m: "not checked" for m in MODES}
        _log(f"  {row['check'][-1]}")
        return row
    outs = {}
    for mode in MODES:
        try:
            out = run_mode(mode)
            err = base.maxdiff(out, ref)
            row["check"].append(f"{mode}: {err:.1e}")
            if not np.isfinite(err) or err > TOL:
                row["modes"][mode] = f"FAIL ({err:.2g})"
                continue
            outs[mode] = out
            ms = base.timed(lambda mode=mode: run_mode(mode), repeats)
            row["modes"][mode] = flops / ms / 1e9
            _log(f"  mode {mode}: max diff {err:.1e}, {row['modes'][mode]:.1f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001 - the row says what broke
            row["modes"][mode] = f"ERROR {type(exc).__name__}: {str(exc)[:120]}"
            _log(f"  mode {mode}: {row['modes'][mode]}")
    if len(outs) == 2:
        row["bitwise"] = _same_bits(outs[11], outs[75])
    if anchor is not None:
        row["anchor"] = flops / base.timed(anchor, repeats) / 1e9
        _log(f"  {anchor_name}: {row['anchor']:.1f} TFLOP/s")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=80.0, help="seconds; later rows skipped")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    ap.add_argument("--precompile", action="store_true", help="build the cubins only")
    args = ap.parse_args(argv)
    if args.san:
        return sanitizer_workload()
    if args.precompile:
        return precompile()
    precompile(only_bench=True)
    t0 = time.time()

    import cupy as cp
    import gpu_sm90_mods as base
    import torch

    import xattn
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90
    from xattn._backends.cupy_ import flex_tc

    card = torch.cuda.get_device_name()
    _log(f"card: {card}")
    rows = []

    def left():
        return args.budget - (time.time() - t0)

    # score mods: B=4 H=16 S=4096 D=128
    B, H, S, D = 4, 16, 4096, 128
    (qt, kt, vt), (q, k, v) = base.inputs((B, H, S, D), 0)
    slopes = xattn.alibi_slopes(H, dtype=np.float32)
    for name, opts, causal in (("alibi causal", {"alibi_slopes": cp.asarray(slopes)}, True),
                               ("softcap 30", {"softcap": 30.0}, False)):
        _log(f"== fp16 D=128 S=4096 {name}")
        prob = validate_attention(q, k, v, causal=causal, **opts)
        cfg = k90.launch_config(prob)[:2]
        if causal:
            anchor_name, anchor = "SDPA+bias", base.sdpa_alibi_causal(qt, kt, vt, slopes)
        else:
            anchor_name, anchor = "SDPA (no softcap)", base.sdpa_plain(qt, kt, vt)

        # Checked against the mma.sync kernel, as benchmarks/gpu_sm90_mods.py checks it (SDPA
        # has no softcap, and its fp16 ALiBi bias rounds far from the diagonal).
        def reference(opts=opts, causal=causal):
            return xattn.flash_attention(q, k, v, causal=causal, backend="cupy.sm80", **opts)
        flops = 4.0 * B * H * S * S * D / (2 if causal else 1)
        rows.append(_modes_row(
            base, f"{name} D=128 S=4096 (_mods {cfg})", flops,
            lambda mode, prob=prob, cfg=cfg: k90.forward(prob, q, k, v, config=(*cfg, mode))[0],
            reference, anchor_name, anchor, args.repeats))
    del qt, kt, vt, q, k, v
    cp.get_default_memory_pool().free_all_blocks()

    # window +-256 as a block mask, S=65536 D=64 H=16 (useful FLOPs)
    if left() > 25:
        _log("== window +-256 block mask S=65536 D=64 H=16")
        H, S, D, W = 16, 65536, 64, 256
        (qt, kt, vt), (q, k, v) = base.inputs((1, H, S, D), 2)
        bmx = xattn.BlockMask.sliding_window(S, window=(W, W), block_size=128)
        prob = validate_attention(q, k, v, block_mask=bmx)
        cfg = k90.launch_config(prob)[:2]
        anchor = base.torch_flex_band(qt, kt, vt, W)
        rows.append(_modes_row(
            base, f"window +-256 S=65536 D=64 (_bm {cfg}, useful)",
            base.window_flops(H, S, D, W),
            lambda mode: k90.forward(prob, q, k, v, config=(*cfg, mode))[0], anchor,
            "torch flex", anchor, args.repeats))
        del qt, kt, vt, q, k, v
        cp.get_default_memory_pool().free_all_blocks()
    else:
        rows.append({"row": "window +-256 S=65536 D=64", "modes": {},
                     "anchor_name": "torch flex", "anchor": None, "bitwise": "-",
                     "check": ["skipped (budget)"]})

    # flex: causal mask_mod + ALiBi score_mod, S=16384 D=64 H=16
    if left() > 30:
        _log("== flex fp16 S=16384 D=64 H=16 causal+ALiBi")
        H, S, D = 16, 16384, 64
        slopes_np = xattn.alibi_slopes(H, dtype=np.float32)
        alibi, causal = base.flex_alibi_causal(slopes_np)
        (qt, kt, vt), (q, k, v) = base.inputs((1, H, S, D), 1)
        anchor = base.torch_flex_alibi_causal(qt, kt, vt, slopes_np)

        def run_flex(mode):
            with family(mode):
                return xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal,
                                            backend="cupy")

        with family(75):
            entry = flex_tc.kernel_for("f16", D, True, True, 90)[0].name
        rows.append(_modes_row(base, f"flex S=16384 D=64 causal+ALiBi ({entry})",
                               4.0 * H * S * S * D / 2, run_flex, anchor, "torch flex",
                               anchor, args.repeats))
        del qt, kt, vt, q, k, v
        cp.get_default_memory_pool().free_all_blocks()
    else:
        rows.append({"row": "flex S=16384 D=64 causal+ALiBi", "modes": {},
                     "anchor_name": "torch flex", "anchor": None, "bitwise": "-",
                     "check": ["skipped (budget)"]})

    def fmt(x):
        return f"{x:.1f}" if isinstance(x, float) else ("-" if x is None else str(x))

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"

    print(f"\n### Hopper forward with score mods / block masks / flex: mode 75 (TMA) vs mode 11 "
          f"(cp.async) vs anchor, TFLOP/s ({card}, fp16; {time.time() - t0:.0f} s)\n")
    print("| row | mode 11 | mode 75 | anchor | 75/11 | 75/anchor | 11/anchor | 75 == 11 | "
          "max diff (mode: vs anchor / mma.sync) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, t, c = r["modes"].get(11), r["modes"].get(75), r["anchor"]
        print(f"| {r['row']} | {fmt(a)} | {fmt(t)} | {r['anchor_name']} {fmt(c)} | "
              f"{ratio(t, a)} | {ratio(t, c)} | {ratio(a, c)} | {r['bitwise']} | "
              f"{'; '.join(r['check'])} |")
    bad = any(isinstance(x, str) for r in rows for x in r["modes"].values())
    return 1 if bad or any(r["bitwise"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
