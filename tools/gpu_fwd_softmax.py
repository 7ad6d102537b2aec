"""Two changes to the Hopper forward's softmax, timed against the shipped one: part of the
exponentials on the FMA pipe, and lazy rescaling.

At head dim 64 the special-function unit's 16 exponentials per clock per SM take as long as
the tensor cores' two products of the same scores (256 flops per score at 4096 flops per
clock), so the forward cannot pass about half the tensor-core peak unless it overlaps them
perfectly. ``XATTN90_EX2_FMA = k`` (flash_fwd_sm90.cu) computes k of every 8 chunks of a score
tile's exponentials with ``ex2_fma`` (common.cuh: a degree-3 polynomial and an exponent add, on
the FMA and integer pipes) instead of ``ex2.approx``. ``XATTN90_LAZY = t`` moves a row's
running max only when a tile raises it by more than 2^t, so that most tiles skip rescaling the
output accumulator (a short window's few tiles per block pay that rescale on nearly every tile
otherwise).

Usage (on a compute capability 9.0 GPU with CuPy, torch and triton)::

    python3 tools/gpu_fwd_softmax.py [--variants base,lazy8,fma2,fma3,lazy8+fma2] [--no-flex]

A variant is ``base`` or ``+``-joined ``lazyT`` / ``fmaK``. Each builds the same entries with
those defines (the launcher's instance is patched in this process only) and runs issue 11's
window row (fp16, S = 65536, +-256, D = 64, 16 heads, the shipped configuration), the D = 64 /
128 rows at S = 4096 (non-causal and causal, B = 4, 2048 / D heads) and compiled FlexAttention
on the window row, timed with ``triton.testing.do_bench`` (L2 flushed, median); TFLOP/s of
visible pairs. Accuracy: the largest difference from the first variant's output, and the error
against float64 on the first 256 queries of head
(0, 0). The table is printed last.
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
         ("D=64 S=4096", 64, 4096, 4, 32, False, None, None),
         ("D=64 S=4096 causal", 64, 4096, 4, 32, True, None, None),
         ("D=128 S=4096", 128, 4096, 4, 16, False, None, None),
         ("D=128 S=4096 causal", 128, 4096, 4, 16, True, None, None))


def defines(variant):
    """``(define, value)`` pairs of a variant name."""
    out = []
    for part in variant.split("+"):
        if part.startswith("lazy"):
            out.append(("XATTN90_LAZY", int(part[4:])))
        elif part.startswith("fma"):
            out.append(("XATTN90_EX2_FMA", int(part[3:])))
        elif part != "base":
            raise ValueError(f"unknown variant part {part!r}")
    return tuple(out)


def use(variant):
    """Every sm90 forward instance built from now on carries the variant's defines."""
    from xattn._backends.cupy_ import _compile, flash_sm90, instances

    def patched(*args):
        inst = instances.sm90(*args)
        return dataclasses.replace(inst, extra=inst.extra + defines(variant))

    flash_sm90._instance = patched
    for key in [key for key in _compile._functions if key[1].startswith("flash_fwd_sm90")]:
        del _compile._functions[key]
    _compile._cubins.clear()


def _compile_one(item):
    from xattn._backends.cupy_ import _compile, instances

    tn, d, cfg, variant = item
    inst = instances.sm90(tn, d, cfg)
    inst = dataclasses.replace(inst, extra=inst.extra + defines(variant))
    text = _compile.source(inst.source) + "".join(_compile._repository_file(f)
                                                  for f in inst.includes)
    return _compile.cubin_path(text, inst.defines)


def precompile(variants):
    """Every (entry, variant) cubin into the disk cache at once, in processes (before CUDA
    starts)."""
    from concurrent.futures import ProcessPoolExecutor

    from xattn._backends.cupy_ import flash_sm90 as k90
    from xattn._backends.cupy_ import instances

    cfgs = {(64, instances.SM90_SHORT[64][1]), (64, k90.CONFIGS[64]), (128, k90.CONFIGS[128]),
            (64, (64, 1, 235))}
    todo = [("f16", d, tuple(c), v) for d, c in sorted(cfgs) for v in variants]
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base,lazy8,fma2,fma3,lazy8+fma2")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args(argv)
    ks = args.variants.split(",")
    for v in ks:
        defines(v)
    precompile(ks)

    import cupy as cp
    import torch
    from triton.testing import do_bench

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    print(torch.cuda.get_device_name(), flush=True)
    data = []
    for name, d, s, b, h, causal, window, cfg in CASES:
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
        data.append((name, tq, qc, kc, vc, prob, fl, causal, window, cfg))

    rows = {name: {} for name, *_ in data}
    base = {}
    for kk in ks:
        use(kk)
        for name, _tq, qc, kc, vc, prob, fl, causal, window, forced in data:
            cfg = k90.launch_config(prob, forced)

            def run(prob=prob, qc=qc, kc=kc, vc=vc, cfg=cfg):
                return k90.forward(prob, qc, kc, vc, config=cfg)

            out, _ = run()
            if kk == ks[0]:
                base[name] = out.astype(cp.float32)
            diff = float(cp.abs(out.astype(cp.float32) - base[name]).max())
            err = oracle_err(out, qc, kc, vc, causal, window)
            ms = float(do_bench(run, warmup=25, rep=100, return_mode="median"))
            rows[name][kk] = (fl / ms / 1e9, diff, err)
            print(f"{kk} {name} cfg={cfg}: {fl / ms / 1e9:.1f} TFLOP/s, diff from {ks[0]} "
                  f"{diff:.2e}, err vs float64 {err:.2e}", flush=True)

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        name, tq, *_rest, fl, _c, window, _cfg = data[0]
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
        flex = fl / ms / 1e9
        print(f"flex {name}: {flex:.1f} TFLOP/s", flush=True)

    print(f"\n{torch.cuda.get_device_name()}: TFLOP/s (visible pairs) by variant; [max diff "
          f"from {ks[0]} / error vs float64, head 0]")
    print("| case | " + " | ".join(ks) + " | flex |")
    print("|---" * (len(ks) + 2) + "|")
    for name, by_k in rows.items():
        cells = " | ".join(f"{by_k[kk][0]:.1f} [{by_k[kk][1]:.1e} / {by_k[kk][2]:.1e}]"
                           for kk in ks)
        fx = f"{flex:.1f}" if flex is not None and name == data[0][0] else ""
        print(f"| {name} | {cells} | {fx} |")


if __name__ == "__main__":
    main()
