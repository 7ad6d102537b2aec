"""Decode latency per token against context length, for MHA, GQA and MQA caches.

Llama-3-8B's attention shapes (32 layers, 32 query heads, D=128) with 32, 8 or 1 kv heads,
float32 on the CPU, batch 1, one new token: the time of one :func:`xattn.decode_attention`
call per context length, times 32 layers (one layer is measured; each layer reads its own
cache of the same size, so the per-token cost of attention is 32 such calls). Writes a CSV
and the plot shown on the docs' Inference page::

    python examples/decode_latency.py                  # docs/images/decode_latency.{csv,png}
    python examples/decode_latency.py --max-ctx 8192 --out /tmp/latency

Only attention is timed (no projections or MLP); the median of ``--repeats`` calls after a
warm-up. The machine's load shows in the figures: say what else was running when you quote
them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

try:
    import xattn
except ImportError:  # run from a clone without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import xattn

LAYERS, HQ, HEAD_DIM = 32, 32, 128
LAYOUTS = {"MHA (32 kv heads)": 32, "GQA (8 kv heads)": 8, "MQA (1 kv head)": 1}


def build(hkv, ctx, rng):
    cache = xattn.KVCache(1, hkv, ctx, HEAD_DIM, dtype=np.float32)
    step = 8192
    for start in range(0, ctx, step):
        n = min(step, ctx - start)
        k, v = (rng.standard_normal((1, hkv, n, HEAD_DIM), dtype=np.float32) for _ in range(2))
        cache.append(k, v)
    q = rng.standard_normal((1, HQ, 1, HEAD_DIM), dtype=np.float32)
    xattn.decode_attention(q, cache)  # warm-up (and compilation)
    return q, cache


def _time(q, cache):
    t0 = time.perf_counter()
    xattn.decode_attention(q, cache)
    return time.perf_counter() - t0


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-ctx", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(here, "..", "docs", "images", "decode_latency"))
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    ctxs = [c for c in (512, 2048, 8192, 32768, 131072) if c <= args.max_ctx]
    cases = [(name, hkv, ctx) for name, hkv in LAYOUTS.items() for ctx in ctxs]
    inputs = {case: build(case[1], case[2], rng) for case in cases}
    # Rounds over every case, so that a change in the machine's load hits them all alike.
    times = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            times[case].append(_time(*inputs[case]))
    rows = []
    for name, hkv, ctx in cases:
        t = statistics.median(times[(name, hkv, ctx)])
        per_token = LAYERS * t
        rows.append((name, hkv, ctx, 1e3 * per_token, 2 * hkv * ctx * HEAD_DIM * 4 / t / 1e9))
        print(f"{name:18s} ctx {ctx:7d}: {1e3 * per_token:9.2f} ms per token "
              f"(32 layers), K/V read at {rows[-1][4]:5.1f} GB/s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".csv", "w") as f:
        f.write("layout,kv_heads,ctx,ms_per_token_32_layers,kv_GBps\n")
        for r in rows:
            f.write(f"{r[0]},{r[1]},{r[2]},{r[3]:.4f},{r[4]:.2f}\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in LAYOUTS:
        pts = [(r[2], r[3]) for r in rows if r[0] == name]
        ax.loglog(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xticks(ctxs, [str(c) for c in ctxs])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("attention ms per token (32 layers)")
    ax.set_title("decode_attention, Hq=32, D=128, float32, CPU (2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=100)
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    main()
