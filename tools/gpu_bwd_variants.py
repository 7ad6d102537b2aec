"""The Hopper backward (flash_bwd_sm90.cu) built with experimental compile-time switches, timed
beside the shipped build in one process: whether to turn a switch on.

Usage (on a compute capability 9.0 GPU with CuPy, torch and triton)::

    python3 tools/gpu_bwd_variants.py [--variants base,BWD_EDGE_ROWS=0] [--rounds 2]

A variant is ``base`` (the shipped build) or ``+``-joined ``NAME[=VALUE]`` switches of the
kernel file, ``XATTN90_`` left out (VALUE 1 when omitted):

- ``BWD_EDGE_ROWS=d``: edge tiles of head dims up to d masked by each key's interval of
  visible queries (the main kernel) and each query's interval of keys (the wgmma dq kernel)
  instead of the per-score rule, whose branches the interior tiles paid too (static SASS,
  ptxas 13.0, the D = 64 TMA window entry: the exponential pass of a tile 531 instructions
  long with the rule, 81 without). Shipped at 64 since the run below; 0 is the rule
  everywhere, 128 intervals everywhere.

Measured with it (H100, 2026-12-06, intervals against the rule, TFLOP/s): D = 64 window +-256
at S = 65536 164.7 / 145.5, S = 4096 causal 274.5 / 265.9; D = 128 S = 4096 causal 348.4 /
369.4, deterministic 294.8 / 306.1, S = 1024 causal 217.3 / 225.3.

Each variant builds the backward entries that the rows take (the launcher's instances patched
in this process only; every cubin is compiled first, in parallel), then the rows run through
``xattn.flash_attention_backward`` as a user calls it: issue 11's window row (fp16, S = 65536,
+-256, D = 64, 16 heads), causal and full rows at S = 4096, a causal row at S = 1024 and the
deterministic D = 128 row (the wgmma dq kernel). Timing: ``triton.testing.do_bench`` (L2
flushed, median), the variants interleaved ``--rounds`` times and the best round kept;
TFLOP/s at 2.5 x the forward's 4 B H D (visible pairs). Each cell also gives the largest
difference of dk from the first variant's (0: bit for bit). The table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
from gpu_fwd_variants import defines  # the same NAME[=VALUE] grammar

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (name, D, S, B, H, causal, window, deterministic)
CASES = (("window D=64 +-256", 64, 65536, 1, 16, False, (256, 256), False),
         ("D=64 S=4096 causal", 64, 4096, 4, 32, True, None, False),
         ("D=64 S=4096", 64, 4096, 4, 32, False, None, False),
         ("D=128 S=4096 causal", 128, 4096, 4, 16, True, None, False),
         ("D=128 S=4096 causal det", 128, 4096, 4, 16, True, None, True),
         ("D=128 S=1024 causal", 128, 1024, 16, 16, True, None, False))


_SHIPPED = {}


def use(variant):
    """Every sm90 backward entry loaded from now on is the variant's build."""
    from xattn._backends.cupy_ import _compile, instances

    if not _SHIPPED:
        _SHIPPED.update(bwd_sm90=instances.bwd_sm90, bwd_sm90_dq=instances.bwd_sm90_dq)
    extra = defines(variant)
    for name, make in _SHIPPED.items():
        setattr(instances, name, lambda *a, make=make, **kw: dataclasses.replace(
            make(*a, **kw), extra=make(*a, **kw).extra + extra))
    for key in [key for key in _compile._functions if key[1].startswith("flash_bwd_sm90")]:
        del _compile._functions[key]
    _compile._cubins.clear()


def _instances():
    from xattn._backends.cupy_ import instances

    out = []
    for d in (64, 128):
        cfg = instances.SM90_BWD_TMA_DEFAULT[d]
        out += [instances.bwd_sm90("f16", d, cfg), instances.bwd_sm90("f16", d, None),
                instances.bwd_sm90("f16", d, cfg, dq=False)]
    out += [instances.bwd_sm90("f16", 64, instances.SM90_BWD_TMA_DEFAULT[64] + "_win"),
            instances.bwd_sm90_dq("f16", 128)]
    return out


def _compile_one(variant):
    from xattn._backends.cupy_ import _compile

    use(variant)
    for inst in _instances():
        text = _compile.source(inst.source) + "".join(_compile._repository_file(f)
                                                      for f in inst.includes)
        _compile.cubin_path(text, inst.defines)


def precompile(variants):
    """Every variant's cubins into the disk cache, one process a variant (before CUDA
    starts)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=len(variants)) as ex:
        list(ex.map(_compile_one, variants))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base,BWD_EDGE_ROWS=0")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        defines(v)
    precompile(variants)

    import cupy as cp
    import torch
    from triton.testing import do_bench

    import xattn

    card = torch.cuda.get_device_name()
    print(card, flush=True)
    data = []
    for name, d, s, b, h, causal, window, det in CASES:
        rng = cp.random.default_rng(s + d)
        q, k, v, do = (rng.standard_normal((b, h, s, d), dtype=cp.float32).astype(cp.float16)
                       for _ in range(4))
        opts = {"causal": causal, "window": window}
        out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
        i = np.arange(s)
        if window is None:
            hi, lo = (i + 1 if causal else np.full(s, s)), np.zeros(s)
        else:
            lo, hi = np.maximum(0, i - window[0]), np.minimum(s, i + window[1] + 1)
        fl = 2.5 * 4.0 * b * h * d * float((hi - lo).sum())
        data.append((name, (do, q, k, v, out, lse), dict(opts, deterministic=det), fl))

    best = {(name, v): 0.0 for name, *_ in data for v in variants}
    diff, base = {}, {}
    for rnd in range(args.rounds):
        for v in variants:
            use(v)
            for name, ops, opts, fl in data:
                def run(ops=ops, opts=opts):
                    return xattn.flash_attention_backward(*ops, backend="cupy", **opts)

                if rnd == 0:
                    dk = run()[1].astype(cp.float32)
                    base.setdefault(name, dk)
                    diff[name, v] = float(cp.abs(dk - base[name]).max())
                ms = float(do_bench(run, warmup=10, rep=60, return_mode="median"))
                best[name, v] = max(best[name, v], fl / ms / 1e9)
                print(f"round {rnd} {v} {name}: {fl / ms / 1e9:.1f} TFLOP/s", flush=True)

    print(f"\n{card}: backward TFLOP/s (visible pairs, best of {args.rounds} rounds) by "
          f"variant; [max |dk - {variants[0]}'s dk|]")
    print("| case | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for name, *_rest in data:
        cells = " | ".join(f"{best[name, v]:.1f} [{diff[name, v]:.1e}]" for v in variants)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
