"""The Hopper forward (flash_fwd_sm90.cu) built with experimental compile-time switches, timed
beside the shipped build in one process: which switch to turn on.

Usage (on a compute capability 9.0 GPU with CuPy, torch and triton)::

    python3 tools/gpu_fwd_variants.py [--variants base,LAZY=8,...] [--rounds 2]
                                      [--no-flex]

A variant is ``base`` (the shipped build) or ``+``-joined ``NAME[=VALUE]`` switches of the
kernel file, ``XATTN90_`` left out (VALUE 1 when omitted):

- ``LAZY=t``: a row's running max moves only when a tile raises it by more than 2^t, so most
  tiles skip rescaling the output accumulator;
- ``NWG1_BLOCKS=2``: two thread blocks an SM for the one-consumer D = 64 entry with 64-key tiles
  (the window row's), instead of the shipped three (the kernel names the entries it applies
  to). The occupancy each build gets is printed.

Each variant builds the same entries with those defines (the launcher's instance is patched in
this process only; every cubin is compiled first, in parallel) and runs issue 11's window row
(fp16, S = 65536, +-256, D = 64, 16 heads; the shipped configuration and the persistent one),
the causal rows at S = 1024 (the short-span configurations) and the D = 64 / 128 rows at
S = 4096 (and FlashAttention-3's 176-key tile beside the D = 128 default, non-causal), compiled
FlexAttention on the window row and torch's SDPA default on the rows without a window.
Timing: ``triton.testing.do_bench`` (L2 flushed, median), the variants interleaved
``--rounds`` times and the best round kept, so that a clock drift does not favour the variant
timed first; TFLOP/s of visible pairs. Accuracy:
the largest difference from the first variant's output and the error against float64 on the
first 256 queries of head (0, 0). The table is printed last.

Measured with it (H100, 2026-12-06): the FMA-pipe exponential (a polynomial for 2 or 3 of
every 8 exponentials) lost 3-10 % on every row and was removed; ``LAZY=8`` moved the rows by
-2 % to +3 %; the edge tiles masked by each row's key interval (+8 % on the window row) and three
blocks an SM (+17 %; +21-23 % together) were turned on (docs/dev/perf_gpu.rst).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (name, D, S, B, H, causal, window, config: None = the launcher's choice)
CASES = (("window D=64 +-256", 64, 65536, 1, 16, False, (256, 256), None),
         ("window D=64 +-256 persistent", 64, 65536, 1, 16, False, (256, 256), (64, 1, 235)),
         ("D=64 S=1024 causal", 64, 1024, 16, 32, True, None, None),
         ("D=128 S=1024 causal", 128, 1024, 16, 16, True, None, None),
         ("D=64 S=4096", 64, 4096, 4, 32, False, None, None),
         ("D=64 S=4096 causal", 64, 4096, 4, 32, True, None, None),
         ("D=128 S=4096", 128, 4096, 4, 16, False, None, None),
         ("D=128 S=4096 causal", 128, 4096, 4, 16, True, None, None),
         # FlashAttention-3's non-causal hdim-128 tile (176 keys, split K / V rings; built
         # experimentally, instances.SM90_WIDE_EXPERIMENTAL) beside the default's 128.
         ("D=128 S=4096 n176", 128, 4096, 4, 16, False, None, (176, 2, 75)),
         ("D=128 S=4096 o203", 128, 4096, 4, 16, False, None, (128, 2, 203)),
         ("D=128 S=4096 o75", 128, 4096, 4, 16, False, None, (128, 2, 75)),
         ("D=128 S=4096 causal o203", 128, 4096, 4, 16, True, None, (128, 2, 203)),
         ("D=128 S=4096 causal o75", 128, 4096, 4, 16, True, None, (128, 2, 75)),
         ("D=128 S=1024", 128, 1024, 16, 16, False, None, None),
         ("D=128 S=1024 n176", 128, 1024, 16, 16, False, None, (176, 2, 75)),
         ("D=128 S=1024 o203", 128, 1024, 16, 16, False, None, (128, 2, 203)),
         ("D=128 S=1024 o75", 128, 1024, 16, 16, False, None, (128, 2, 75)))


def defines(variant):
    """``(define, value)`` pairs of a variant name."""
    if variant == "base":
        return ()
    out = []
    for part in variant.split("+"):
        name, _, value = part.partition("=")
        if not name.isidentifier():
            raise ValueError(f"variant part {part!r}: NAME or NAME=VALUE")
        out.append((f"XATTN90_{name}", int(value or 1)))
    return tuple(out)


def instance(variant, *args):
    from xattn._backends.cupy_ import instances

    inst = instances.sm90(*args)
    return dataclasses.replace(inst, extra=inst.extra + defines(variant))


def use(variant):
    """Every sm90 forward entry loaded from now on is the variant's build."""
    from xattn._backends.cupy_ import _compile, flash_sm90

    flash_sm90._instance = lambda *args: instance(variant, *args)
    for key in [key for key in _compile._functions if key[1].startswith("flash_fwd_sm90")]:
        del _compile._functions[key]
    _compile._cubins.clear()


def _compile_one(item):
    from xattn._backends.cupy_ import _compile

    variant, args = item
    inst = instance(variant, *args)
    text = _compile.source(inst.source) + "".join(_compile._repository_file(f)
                                                  for f in inst.includes)
    return _compile.cubin_path(text, inst.defines)


def configs():
    """The (D, config) of every case, from the launcher's rules (NumPy stand-ins: no GPU)."""
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    out = set()
    for _name, d, s, _b, _h, causal, window, cfg in CASES:
        x = np.empty((1, 1, s, d), np.float16)
        out.add((d, k90.launch_config(validate_attention(x, x, x, causal=causal,
                                                         window=window), cfg)))
    return sorted(out)


def precompile(variants):
    """Every (variant, entry) cubin into the disk cache at once, in processes (before CUDA
    starts)."""
    from concurrent.futures import ProcessPoolExecutor

    todo = [(v, ("f16", d, tuple(c))) for d, c in configs() for v in variants]
    with ProcessPoolExecutor(max_workers=min(16, len(todo))) as ex:
        list(ex.map(_compile_one, todo))


def oracle_err(out, q, k, v, causal, window, rows=256):
    import cupy as cp

    qd = cp.asnumpy(q[0, 0, :rows]).astype(np.float64)
    kd = cp.asnumpy(k[0, 0]).astype(np.float64)
    vd = cp.asnumpy(v[0, 0]).astype(np.float64)
    s = qd @ kd.T / np.sqrt(q.shape[-1])
    i = np.arange(rows)[:, None] + (k.shape[2] - q.shape[2])
    j = np.arange(k.shape[2])[None, :]
    vis = np.ones_like(s, dtype=bool)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= (j >= i - window[0]) & (j <= i + window[1])
    s = np.where(vis, s, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    ref = (p / p.sum(axis=1, keepdims=True)) @ vd
    return float(np.abs(cp.asnumpy(out[0, 0, :rows]).astype(np.float64) - ref).max())


def flex_tflops(tq, window, fl):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    w = window[0]

    def mask_mod(b, hh, qi, kj):
        return (qi - kj <= w) & (kj - qi <= w)

    s = tq[0].shape[2]
    bm = create_block_mask(mask_mod, None, None, s, s, device="cuda")
    fa = torch.compile(flex_attention)
    with torch.no_grad():
        fa(*tq, block_mask=bm)
        ms = float(do_bench(lambda: fa(*tq, block_mask=bm), warmup=25, rep=100,
                            return_mode="median"))
    return fl / ms / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base,LAZY=8,NWG1_BLOCKS=2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--only", default="", help="the cases whose name contains this")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if args.only in c[0]]
    if not cases:
        ap.error(f"--only {args.only!r}: no case name contains it")
    variants = args.variants.split(",")
    for v in variants:
        defines(v)
    precompile(variants)

    import cupy as cp
    import torch
    from triton.testing import do_bench

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    card = torch.cuda.get_device_name()
    print(card, flush=True)
    data = []
    for name, d, s, b, h, causal, window, cfg in cases:
        gen = torch.Generator(device="cuda").manual_seed(s + d)
        tq = [torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, generator=gen)
              for _ in range(3)]
        qc, kc, vc = (cp.from_dlpack(x) for x in tq)
        i = np.arange(s)
        if window is None:
            hi, lo = (i + 1 if causal else np.full(s, s)), np.zeros(s)
        else:
            lo, hi = np.maximum(0, i - window[0]), np.minimum(s, i + window[1] + 1)
        fl = 4.0 * b * h * d * float((hi - lo).sum())
        prob = validate_attention(qc, kc, vc, causal=causal, window=window)
        data.append((name, tq, (qc, kc, vc), prob, fl, causal, window,
                     k90.launch_config(prob, cfg)))

    best = {(name, v): 0.0 for name, *_ in data for v in variants}
    acc = {}
    base = {}
    for rnd in range(args.rounds):
        for v in variants:
            use(v)
            # Odd rounds take the rows in reverse: a row timed just after a light one (the
            # clocks still high) is not favoured every round.
            for name, _tq, (qc, kc, vc), prob, fl, causal, window, cfg in (
                    data if rnd % 2 == 0 else data[::-1]):
                def run(prob=prob, qc=qc, kc=kc, vc=vc, cfg=cfg):
                    return k90.forward(prob, qc, kc, vc, config=cfg)

                if rnd == 0:
                    out, _ = run()
                    fn = k90.get_kernel("f16", prob.d, cfg)
                    try:
                        occ = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                            fn.kernel.ptr, k90.threads(cfg), k90.smem_bytes(prob.d, cfg))
                    except Exception as exc:  # noqa: BLE001 - a report, not a check
                        occ = f"unknown ({exc!r:.80})"
                    print(f"{v} {name} cfg={cfg}: {occ} blocks an SM", flush=True)
                    if v == variants[0]:
                        base[name] = out.astype(cp.float32)
                    acc[name, v] = (float(cp.abs(out.astype(cp.float32) - base[name]).max()),
                                    oracle_err(out, qc, kc, vc, causal, window))
                ms = float(do_bench(run, warmup=25, rep=100, return_mode="median"))
                best[name, v] = max(best[name, v], fl / ms / 1e9)
                print(f"round {rnd} {v} {name} cfg={cfg}: {fl / ms / 1e9:.1f} TFLOP/s", flush=True)

    sdpa = {}  # torch's default (cuDNN on Hopper) on the rows without a window
    for name, tq, _ops, _prob, fl, causal, window, _cfg in data:
        if window is None:
            with torch.no_grad():
                ms = float(do_bench(lambda tq=tq, causal=causal: torch.nn.functional.
                                    scaled_dot_product_attention(*tq, is_causal=causal),
                                    warmup=25, rep=100, return_mode="median"))
            sdpa[name] = fl / ms / 1e9
    flex = None
    if not args.no_flex and data[0][6] is not None:
        name, tq, _ops, _prob, fl, _causal, window, _cfg = data[0]
        flex = flex_tflops(tq, window, fl)
        print(f"flex {name}: {flex:.1f} TFLOP/s", flush=True)

    print(f"\n{card}: TFLOP/s (visible pairs, best of {args.rounds} rounds) by variant; [max diff "
          f"from {variants[0]} / error vs float64, head 0]")
    print("| case | config | " + " | ".join(variants) + " | flex | torch |")
    print("|---" * (len(variants) + 4) + "|")
    for name, *_rest, cfg in data:
        cells = " | ".join(f"{best[name, v]:.1f} [{acc[name, v][0]:.1e} / {acc[name, v][1]:.1e}]"
                           for v in variants)
        fx = f"{flex:.1f}" if flex is not None and name == data[0][0] else ""
        ts = f"{sdpa[name]:.1f}" if name in sdpa else ""
        print(f"| {name} | {cfg} | {cells} | {fx} | {ts} |")


if __name__ == "__main__":
    main()
