"""xattn.decode_attention on the CPU beside torch SDPA and np.copyto, all in one run.

Usage (torch is a benchmark-only dependency: ``pip install torch==2.13.0``, never unpinned)::

    python benchmarks/cpu_decode.py                       # ctx 131072, GQA 32/8, D 128, fp32
    python benchmarks/cpu_decode.py --ctx 32768 --batch 4 --tokens 4 --page-size 256

One decode step: ``q`` is ``(batch, Hq, T, D)`` for the ``T`` newest tokens of a cache holding
``ctx`` tokens per sequence. Three things are timed alternately, ``--repeats`` rounds after a
warm-up: xattn's ``decode_attention`` (contiguous cache, and paged with ``--page-size``),
torch's ``scaled_dot_product_attention(..., enable_gqa=True)`` on the same K/V memory (no
copy), and ``np.copyto`` of the K array, the machine's streaming anchor. Throughput is bytes
of K and V read per second for attention and bytes read plus written for the copy; the
ratios are medians of the per-round ratios, which are less sensitive to other processes
loading the machine than a ratio of medians. xattn's output is checked against torch's
before anything is timed.
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


def _fill(cache, rng, ctx, chunk=8192):
    """Append ``ctx`` random tokens to every sequence, ``chunk`` at a time."""
    shape = (cache.batch, cache.kv_heads)
    for start in range(0, ctx, chunk):
        n = min(chunk, ctx - start)
        k = rng.standard_normal((*shape, n, cache.head_dim), dtype=np.float32)
        v = rng.standard_normal((*shape, n, cache.head_dim_v), dtype=np.float32)
        cache.append(k.astype(cache.dtype, copy=False), v.astype(cache.dtype, copy=False))


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=int, default=131072)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("-D", "--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=1, help="T, new query tokens per sequence")
    p.add_argument("--page-size", type=int, default=0, help="also time a paged cache")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = p.parse_args(argv)

    import torch

    B, Hq, Hkv, D, T, ctx = args.batch, args.hq, args.hkv, args.head_dim, args.tokens, args.ctx
    rng = np.random.default_rng(0)
    if args.dtype == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(args.dtype)
    cache = xattn.KVCache(B, Hkv, ctx, D, dtype=dtype)
    _fill(cache, rng, ctx)
    caches = {"xattn contiguous": cache}
    if args.page_size:
        paged = xattn.KVCache(B, Hkv, ctx, D, dtype=dtype, page_size=args.page_size)
        # Same contents, pages handed out in order: the layout differs, not the values.
        paged.append(cache.k_cache, cache.v_cache)
        caches[f"xattn paged ({args.page_size})"] = paged
    q = rng.standard_normal((B, Hq, T, D), dtype=np.float32).astype(dtype)
    tdtype = {"float32": torch.float32, "float16": torch.float16,
              "bfloat16": torch.bfloat16}[args.dtype]
    # torch.from_numpy knows no bfloat16: share the bits through an int16 view.
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(tdtype)
                  if args.dtype == "bfloat16" else torch.from_numpy(x)
                  for x in (q, cache.k_cache, cache.v_cache))
    # T new tokens at the bottom right of ctx keys: torch's is_causal aligns top-left, so the
    # causal rule goes in as a boolean mask (all True when T = 1).
    mask = torch.from_numpy(np.arange(ctx)[None, :] <= np.arange(ctx - T, ctx)[:, None])

    def run_torch():
        return torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=None if T == 1 else mask, enable_gqa=True)

    ref = run_torch().float().numpy()
    for name, c in caches.items():
        out = xattn.decode_attention(q, c).astype(np.float32)
        err = float(np.abs(out - ref).max())
        if err > (1e-4 if args.dtype == "float32" else 2e-2):
            raise SystemExit(f"{name}: max difference from torch {err:.3g}")
        print(f"{name}: max |xattn - torch| = {err:.2e}")
    dst = np.empty_like(cache.k_cache)

    runners = {name: (lambda c=c: xattn.decode_attention(q, c)) for name, c in caches.items()}
    runners["torch SDPA (enable_gqa)"] = run_torch
    runners["np.copyto(K)"] = lambda: np.copyto(dst, cache.k_cache)
    kv_bytes = cache.k_cache.nbytes + cache.v_cache.nbytes
    moved = {name: kv_bytes for name in runners}
    moved["np.copyto(K)"] = 2 * cache.k_cache.nbytes  # read + write

    for fn in runners.values():  # warm-up (and numba compilation)
        fn()
    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(_time(fn))

    def rate(name, i):
        return moved[name] / times[name][i] / 1e9

    print(f"\ndecode, B={B} Hq={Hq} Hkv={Hkv} D={D} T={T} ctx={ctx} {args.dtype}, "
          f"{xattn._backends.numpy_.decode._pool.num_threads()} threads, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{args.repeats} rounds")
    print(f"{'':28s}{'median ms':>10s}{'GB/s':>8s}{'vs torch':>10s}{'vs copyto':>11s}")
    for name in runners:
        med = statistics.median(times[name])
        vs_t = statistics.median(rate(name, i) / rate("torch SDPA (enable_gqa)", i)
                                 for i in range(args.repeats))
        vs_c = statistics.median(rate(name, i) / rate("np.copyto(K)", i)
                                 for i in range(args.repeats))
        print(f"{name:28s}{1e3 * med:10.2f}{moved[name] / med / 1e9:8.2f}{vs_t:10.2f}x"
              f"{vs_c:10.2f}x")
    print("GB/s: bytes of K and V read per second (np.copyto: bytes read + written).")


if __name__ == "__main__":
    main()
