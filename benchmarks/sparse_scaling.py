"""Sparse attention on the CPU: does a sliding window cost O(S * w), and how do Longformer and
BigBird compare with dense flash attention at the same length?

Usage (fp32, H=4, D=64, B=1 by default; prints one table, medians of ``--repeats`` runs)::

    python benchmarks/sparse_scaling.py                      # everything
    python benchmarks/sparse_scaling.py --only window --sizes 16384 65536 262144
    python benchmarks/sparse_scaling.py --only patterns --seq 16384 --repeats 3
    python benchmarks/sparse_scaling.py --only table --table-sizes 4096 16384   # docs table

Rows:
* ``window flash``: ``flash_attention(window=(w, w))`` (the tile plan skips invisible tiles);
* ``window blockmask``: ``block_sparse_attention`` under ``BlockMask.sliding_window``;
* ``longformer``: ``longformer_attention(window=2w, global_tokens=...)``;
* ``bigbird``: ``bigbird_attention`` (block 64, band 3, 1+1 global, 3 random blocks);
* ``dense flash``: ``flash_attention`` without a mask, the anchor.

``--only table`` times one row per method of the seed's comparison table (docs/sparse.rst):
standard, Longformer, BigBird, flash, linear (elu + 1) and GQA (flash with one kv head),
at each ``--table-sizes`` length (standard only while its score matrix stays below 2 GiB).

Useful GFLOP/s counts only the visible (query, key) pairs: ``4 * H * visible_pairs * D``
(PERF.md). ``peak MiB`` is the largest extra memory the call allocated (tracemalloc, in a
separate untimed run). ``backend`` is the implementation ``backend="auto"`` picked.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

import xattn
from xattn import _backends
from xattn._array import validate_attention


def qkv(seq, heads, dim, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, heads, seq, dim), dtype=np.float32) for _ in range(3)]


def auto_backend(q, k, v, block_mask=None, **options):
    prob = validate_attention(q, k, v, block_mask=block_mask, **options)
    for name, why in _backends.available_backends(np, prob, {}, "forward").items():
        if why is None:
            return name
    return "?"


def measure(cases, repeats):
    """``{name: (median seconds, peak MiB)}``: the cases run round-robin, so a burst of load
    from other jobs on the shared machine hits all of them alike."""
    for fn in cases.values():
        fn()  # warm-up: plans, caches, JIT
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, fn in cases.items():
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out[name] = (statistics.median(times[name]), peak / 2**20)
    return out


def row(name, seq, pairs, seconds, peak, backend, heads, dim, fields):
    gflops = 4 * heads * pairs * dim / seconds / 1e9
    fields.append((name, seq, pairs / seq, seconds, gflops, peak, backend))
    print(f"{name:18s} {seq:>7d} {pairs / seq:>9.1f} {seconds:>9.3f} {gflops:>8.1f} "
          f"{peak:>9.1f}  {backend}", flush=True)


def window_pairs(seq, w):
    # Keys j with |i - j| <= w for every query i, clipped to the sequence.
    i = np.arange(seq)
    return int((np.minimum(i + w, seq - 1) - np.maximum(i - w, 0) + 1).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["window", "patterns", "table"], default=None)
    ap.add_argument("--table-sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--seq", type=int, default=16384, help="length for the pattern rows")
    ap.add_argument("--half-window", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--globals", type=int, default=16, help="Longformer global tokens")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense anchor")
    args = ap.parse_args()
    h, d, w = args.heads, args.dim, args.half_window
    print(f"fp32, B=1, H={h}, D={d}, window +-{w}; median of {args.repeats}")
    if args.only == "table":
        table(args)
        return
    print(f"{'variant':18s} {'S':>7s} {'keys/q':>9s} {'time s':>9s} {'GFLOP/s':>8s} "
          f"{'peak MiB':>9s}  backend")
    fields = []
    if args.only in (None, "window"):
        inputs = {seq: qkv(seq, h, d) for seq in args.sizes}
        masks = {seq: xattn.BlockMask.sliding_window(seq, window=(w, w)) for seq in args.sizes}
        cases = {}
        for seq, (q, k, v) in inputs.items():
            cases[("window flash", seq)] = (
                lambda q=q, k=k, v=v: xattn.flash_attention(q, k, v, window=(w, w)))
            cases[("window blockmask", seq)] = (
                lambda q=q, k=k, v=v, bm=masks[seq]: xattn.block_sparse_attention(q, k, v, bm))
        res = measure(cases, args.repeats)
        for (name, seq), (t, peak) in sorted(res.items(), key=lambda x: (x[0][1], x[0][0])):
            pairs = window_pairs(seq, w)
            assert masks[seq].visible_pairs == pairs
            q, k, v = inputs[seq]
            backend = (auto_backend(q, k, v, window=(w, w)) if name == "window flash"
                       else auto_backend(q, k, v, block_mask=masks[seq]))
            row(name, seq, pairs, t, peak, backend, h, d, fields)
        sizes = sorted(args.sizes)
        for name in ("window flash", "window blockmask"):
            for a, b in zip(sizes, sizes[1:], strict=False):
                ratio = res[(name, b)][0] / res[(name, a)][0]
                print(f"{name}: t({b})/t({a}) = {ratio:.2f} (linear: {b / a:.1f})")
        del inputs, cases
    if args.only in (None, "patterns"):
        seq = args.seq
        q, k, v = qkv(seq, h, d)
        # Global tokens at the start (a CLS token and a question, as in HF question answering).
        glob = np.arange(args.globals)
        lf = xattn.BlockMask.longformer(seq, window=2 * w, global_tokens=glob)
        bb = xattn.BlockMask.bigbird(seq, seed=0)
        cases = {
            "longformer": lambda: xattn.longformer_attention(q, k, v, window=2 * w,
                                                             global_tokens=glob),
            "bigbird": lambda: xattn.bigbird_attention(q, k, v, seed=0),
        }
        if not args.no_dense:
            cases["dense flash"] = lambda: xattn.flash_attention(q, k, v)
        res = measure(cases, args.repeats)
        row("longformer", seq, lf.visible_pairs, *res["longformer"],
            auto_backend(q, k, v, block_mask=lf), h, d, fields)
        row("bigbird", seq, bb.visible_pairs, *res["bigbird"],
            auto_backend(q, k, v, block_mask=bb), h, d, fields)
        if not args.no_dense:
            row("dense flash", seq, seq * seq, *res["dense flash"], auto_backend(q, k, v),
                h, d, fields)


def table_calls(q, k, v, glob, w):
    return {
        "Standard MHA": lambda: xattn.standard_attention(q, k, v),
        "Longformer": lambda: xattn.longformer_attention(q, k, v, window=2 * w,
                                                         global_tokens=glob),
        "BigBird": lambda: xattn.bigbird_attention(q, k, v, seed=0),
        "Flash Attention": lambda: xattn.flash_attention(q, k, v),
        "Linear Attention": lambda: xattn.linear_attention(q, k, v),
        "MQA / GQA": lambda: xattn.flash_attention(q, k[:, :1], v[:, :1]),
    }


def table(args):
    h, d, w = args.heads, args.dim, args.half_window
    rows = {}
    for seq in args.table_sizes:
        q, k, v = qkv(seq, h, d)
        calls = table_calls(q, k, v, np.arange(args.globals), w)
        if h * seq * seq * 4 > 2 * 2**30:  # standard attention's score matrix
            del calls["Standard MHA"]
        res = measure(calls, args.repeats)
        for name in table_calls(q, k, v, None, w):
            rows.setdefault(name, {})[seq] = res.get(name)
            if name in res:
                t, peak = res[name]
                print(f"{name:18s} {seq:>7d} {t:>9.3f} s {peak:>9.1f} MiB", flush=True)
    print("\n| method | " + " | ".join(f"S={s} time, peak" for s in args.table_sizes) + " |")
    for name, per in rows.items():
        cells = ["--" if per[s] is None else f"{per[s][0]:.3g} s, {per[s][1]:.0f} MiB"
                 for s in args.table_sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
