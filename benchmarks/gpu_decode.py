"""xattn.decode_attention on one GPU beside torch SDPA and the card's copy bandwidth, one run.

Usage (on a machine with CuPy and torch)::

    python3 benchmarks/gpu_decode.py                      # B in 1,16,64 x ctx in 4k,32k,128k
    python3 benchmarks/gpu_decode.py --batch 16 --ctx 32768 --tokens 4 --json out.json

One decode step of ``T`` new tokens (Hq=32, Hkv=8, D=128, fp16 by default, the Llama-3-8B
attention shape): ``q`` is ``(B, Hq, T, D)`` against a cache holding ``ctx`` tokens per
sequence. Timed, alternately and with CUDA events, after a warm-up:

* ``cupy.decode``: the split-KV kernel (``decode_attention(..., backend="cupy.decode")``),
  on a contiguous cache and on a paged one (``--page-size``, default 256) holding the same
  tokens;
* ``auto``: ``decode_attention`` as a user calls it (whatever ``backend="auto"`` picks);
* torch ``scaled_dot_product_attention(q, K[:, :, :ctx], V[:, :, :ctx], enable_gqa=True)``
  on the same device memory (DLPack views, no copy), under torch's default backend choice;
* ``copy``: ``cupy.copyto`` of a 2 GiB buffer, bytes read plus written: the card's streaming
  ceiling measured in the same run.

``--sweep 1,2,4,...`` also times the kernel at forced block counts (the launcher's ``splits=``),
the table to retune :func:`xattn._backends.cupy_.decode.num_splits` from. ``--configs`` times
every ``(warps, stages)`` instance of ``DECODE_EXTRA`` (``xattn/_backends/cupy_/instances.py``)
beside the default, through the launcher, to retune ``DECODE`` from; ``--configs 8x2,4x3``
times only those (``4x0r``: the register path, 4 warps, prefetch distance 0).

The host rows (``--host``, on by default): 200 back-to-back calls at B=1, ctx=4096 on one
cache, wall time with a final synchronize and the time to issue them (the host's share),
``decode_attention`` beside torch's SDPA on the same memory; and 200 decode steps of one
``append`` then one ``decode_attention`` (a new launch plan each step).

Throughput is bytes of K and V read per second (``B * Hkv * ctx * (D + Dv) * itemsize``).
Caches smaller than 256 MiB are rotated among several copies, so that repeated calls do not
measure the L2 (50 MiB on an H100). Each result is checked against torch before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

try:
    import xattn
except ImportError:  # run from a clone without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import xattn

ROTATE_BYTES = 256 << 20


def _fill(cache, ctx, seed, chunk=4096):
    import cupy as cp

    rs = cp.random.RandomState(seed)
    shape = (cache.batch, cache.kv_heads)
    for start in range(0, ctx, chunk):
        n = min(chunk, ctx - start)
        k = rs.standard_normal((*shape, n, cache.head_dim), dtype=cp.float32)
        v = rs.standard_normal((*shape, n, cache.head_dim_v), dtype=cp.float32)
        cache.append(k.astype(cache.dtype), v.astype(cache.dtype))
        del k, v


def _time(fn, reps, rounds=5):
    """Median seconds per call over ``rounds`` rounds of ``reps`` calls (CUDA events)."""
    import cupy as cp

    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(rounds):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for i in range(reps):
            fn(i)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps)
    return float(np.median(times))


def copy_bandwidth():
    import cupy as cp

    n = 1 << 30  # 2 GiB of float16
    src = cp.ones(n, dtype=cp.float16)
    dst = cp.empty_like(src)
    t = _time(lambda i=0: cp.copyto(dst, src), reps=10)
    return 2 * n * 2 / t


def row(batch, ctx, args, torch):
    import cupy as cp

    dt = np.dtype(args.dtype)
    hq, hkv, d, T = args.hq, args.hkv, args.head_dim, args.tokens
    kv_bytes = batch * hkv * ctx * 2 * d * dt.itemsize
    sets = int(min(8, max(1, -(-ROTATE_BYTES // kv_bytes))))
    rs = cp.random.RandomState(1)
    res = {"batch": batch, "ctx": ctx, "T": T, "sets": sets, "kv_bytes": kv_bytes}

    def make(page_size):
        caches = []
        for s in range(sets):
            if page_size:
                pages = batch * -(-(ctx + T) // page_size)
                c = xattn.KVCache(batch, hkv, ctx + T, d, dtype=dt, xp=cp,
                                  page_size=page_size, num_pages=pages)
            else:
                c = xattn.KVCache(batch, hkv, ctx + T, d, dtype=dt, xp=cp)
            _fill(c, ctx, seed=10 + s)
            caches.append(c)
        return caches

    qs = [rs.standard_normal((batch, hq, T, d), dtype=cp.float32).astype(dt)
          for _ in range(sets)]
    caches = make(0)
    # torch reads the very same memory: the contiguous cache's first ctx positions.
    tq = [torch.from_dlpack(q) for q in qs]
    tk = [torch.from_dlpack(c.k_cache)[:, :, :ctx] for c in caches]
    tv = [torch.from_dlpack(c.v_cache)[:, :, :ctx] for c in caches]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def t_torch(i=0):
        j = i % sets
        if T == 1:
            return sdpa(tq[j], tk[j], tv[j], enable_gqa=True)
        return _torch_causal(sdpa, tq[j], tk[j], tv[j], torch)

    def t_x(backend, cs):
        return lambda i=0: xattn.decode_attention(qs[i % sets], cs[i % sets], backend=backend)

    ref = cp.from_dlpack(t_torch(0)).astype(cp.float32)
    for name in ("cupy.decode", "auto"):
        got = t_x(name, caches)(0).astype(cp.float32)
        res[f"err {name}"] = float(cp.abs(got - ref).max())
    reps = max(3, min(args.max_reps, int(2e9 // kv_bytes)))
    res["torch"] = _time(t_torch, reps, args.rounds)
    res["cupy.decode"] = _time(t_x("cupy.decode", caches), reps, args.rounds)
    res["auto"] = (_time(t_x("auto", caches), reps, args.rounds) if not args.no_auto
                   else float("nan"))
    if args.sweep or args.configs:
        from xattn._backends.cupy_ import decode as kernel
        from xattn._backends.cupy_ import instances
        from xattn.kvcache import _validate_decode

        probs = [_validate_decode(q, c, None, None, None, None)
                 for q, c in zip(qs, caches, strict=True)]
    if args.sweep:
        # The kernel at forced split counts (the heuristic's choice is the cupy.decode column).
        res["sweep"] = {
            s: _time(lambda i=0, s=s: kernel.decode(probs[i % sets], qs[i % sets],
                                                    caches[i % sets], splits=s), reps,
                     args.rounds)
            for s in args.sweep}
    if args.configs:
        # Every (warps, stages) candidate through the launcher, the default first.
        res["configs"], res["err configs"] = {}, {}
        every = (instances.DECODE[d], *instances.DECODE_EXTRA.get(d, ()))
        for cfg in every if args.configs == "all" else _parse_configs(args.configs):
            def call(i=0, cfg=cfg):
                return kernel.decode(probs[i % sets], qs[i % sets], caches[i % sets],
                                     config=cfg)[0]
            res["err configs"][str(cfg)] = float(
                cp.abs(call(0).astype(cp.float32) - ref).max())
            res["configs"][str(cfg)] = _time(call, reps, args.rounds)
    tk.clear(), tv.clear(), caches.clear()
    cp.get_default_memory_pool().free_all_blocks()
    if args.page_size:
        paged = make(args.page_size)
        got = t_x("cupy.decode", paged)(0).astype(cp.float32)
        res["err paged"] = float(cp.abs(got - ref).max())
        res["paged"] = _time(t_x("cupy.decode", paged), reps, args.rounds)
        paged.clear()
        cp.get_default_memory_pool().free_all_blocks()
    return res


def host_rows(args, torch, calls=200, ctx=4096):
    """Microseconds per call of back-to-back calls at B=1 (the host bounds them): wall time
    with a final synchronize, and the time to issue them; torch on the same memory."""
    import time

    import cupy as cp

    dt = np.dtype(args.dtype)
    hq, hkv, d = args.hq, args.hkv, args.head_dim
    cache = xattn.KVCache(1, hkv, ctx + calls + 16, d, dtype=dt, xp=cp)
    _fill(cache, ctx, seed=3)
    q = cp.random.RandomState(4).standard_normal((1, hq, 1, d), dtype=cp.float32).astype(dt)
    tq, tk, tv = (torch.from_dlpack(q), torch.from_dlpack(cache.k_cache)[:, :, :ctx],
                  torch.from_dlpack(cache.v_cache)[:, :, :ctx])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    k1 = cp.zeros((1, hkv, 1, d), dtype=dt)

    def loop(fn):
        for _ in range(3):
            fn()
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        cp.cuda.Device().synchronize()
        t2 = time.perf_counter()
        return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6

    def step():  # one generation step: the new token's key/value, then attention
        cache.append(k1, k1)
        return xattn.decode_attention(q, cache)

    from xattn._backends.cupy_ import decode as kernel
    from xattn.kvcache import _validate_decode

    prob = _validate_decode(q, cache, None, None, None, None)
    out = {"decode_attention": loop(lambda: xattn.decode_attention(q, cache))}
    # Whether those calls launched through the prebuilt argument block (cuLaunchKernel).
    fast = [p.args is not None for p in cache._launch_plans().values()]
    out.update({"the launcher alone (need_lse=False)":
                loop(lambda: kernel.decode(prob, q, cache, need_lse=False)),
                "torch SDPA": loop(lambda: sdpa(tq, tk, tv, enable_gqa=True))})
    # The cache grows by one token a step (3 warm-up + calls steps fit its capacity).
    out["append + decode_attention"] = loop(step)
    return out, bool(fast) and all(fast)


def _parse_configs(text):
    """``"8x2,4x3,4x0r"`` -> ``[(8, 2), (4, 3), (4, 0, "r")]`` (a trailing ``r``: the
    register path, warps x prefetch distance)."""
    out = []
    for item in filter(None, text.split(",")):
        kind = ("r",) if item.endswith("r") else ()
        out.append((*(int(x) for x in item.rstrip("r").split("x")), *kind))
    return out


def _torch_causal(sdpa, q, k, v, torch):
    # Bottom-right causal for T > 1: query t sees keys [0, ctx - T + t].
    T, S = q.shape[-2], k.shape[-2]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return sdpa(q, k, v, attn_mask=mask, enable_gqa=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--ctx", type=int, nargs="*", default=[4096, 32768, 131072])
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("-D", "--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--page-size", type=int, default=256, help="0: no paged rows")
    p.add_argument("--no-auto", action="store_true")
    p.add_argument("--sweep", type=lambda t: [int(x) for x in t.split(",")], default=None,
                   help="comma-separated split counts to time the kernel at, e.g. 1,2,4,8,16,32")
    p.add_argument("--configs", nargs="?", const="all", default=None,
                   help="also time every (warps, stages) instance of DECODE_EXTRA, or those "
                        "listed (e.g. 8x2,4x3)")
    p.add_argument("--no-host", action="store_true", help="skip the host-overhead rows")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (median taken)")
    p.add_argument("--max-reps", type=int, default=200, help="most calls per timing round")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import cupy as cp
    import torch

    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy = copy_bandwidth()
    rows = []
    for b in args.batch:
        for ctx in args.ctx:
            try:
                rows.append(row(b, ctx, args, torch))
            except Exception as exc:  # noqa: BLE001 - one failing row must not hide the rest
                rows.append({"batch": b, "ctx": ctx, "error": f"{type(exc).__name__}: {exc}"})
            cp.get_default_memory_pool().free_all_blocks()
            print(json.dumps(rows[-1]), flush=True)
    host, fast = None, None
    if not args.no_host:
        try:
            host, fast = host_rows(args, torch)
        except Exception as exc:  # noqa: BLE001 - the table below still prints
            host = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"host": host, "fast_launch": fast}), flush=True)
    doc = {"device": name, "torch": torch.__version__, "cupy": cp.__version__,
           "copy_bytes_per_s": copy, "args": vars(args), "rows": rows, "host": host,
           "fast_launch": fast}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.sweep:
        print("\nSplit sweep (TB/s of K/V read at each forced split count; * = best):\n")
        print("| B | ctx | " + " | ".join(str(s) for s in args.sweep) + " | heuristic |")
        print("|---|---|" + "---|" * (len(args.sweep) + 1))
        for r in rows:
            if "sweep" not in r:
                continue
            bw = {s: r["kv_bytes"] / t / 1e12 for s, t in r["sweep"].items()}
            best = max(bw, key=bw.get)
            cells = " | ".join(f"{bw[s]:.2f}{'*' if s == best else ''}" for s in args.sweep)
            print(f"| {r['batch']} | {r['ctx']} | {cells} | "
                  f"{r['kv_bytes'] / r['cupy.decode'] / 1e12:.2f} |")
    if args.configs:
        cfgs = next((list(r["configs"]) for r in rows if "configs" in r), [])
        print("\n(warps, stages) instances through the launcher (TB/s of K/V read; * = best; "
              "the first is the default):\n")
        print("| B | ctx | " + " | ".join(cfgs) + " | max err |")
        print("|---|---|" + "---|" * (len(cfgs) + 1))
        for r in rows:
            if "configs" not in r:
                continue
            bw = {c: r["kv_bytes"] / t / 1e12 for c, t in r["configs"].items()}
            best = max(bw, key=bw.get)
            cells = " | ".join(f"{bw[c]:.2f}{'*' if c == best else ''}" for c in cfgs)
            print(f"| {r['batch']} | {r['ctx']} | {cells} | "
                  f"{max(r['err configs'].values()):.1e} |")
    if host and "error" not in host:
        print("\nHost: 200 back-to-back calls, B=1, ctx=4096, one token (microseconds per "
              f"call; decode_attention launched through the argument block: {fast}):\n")
        print("| call | issue (host) | wall, synchronized |")
        print("|---|---|---|")
        for k, (issue, wall) in host.items():
            print(f"| {k} | {issue:.1f} | {wall:.1f} |")
    elif host:
        print(f"\nHost rows: ERROR {host['error'][:200]}")
    print(f"\n**{name}**, torch {torch.__version__}, cupy {cp.__version__}; Hq={args.hq} "
          f"Hkv={args.hkv} D={args.head_dim} T={args.tokens} {args.dtype}; copy "
          f"{copy / 1e12:.2f} TB/s (read + write). Cells: TB/s of K/V read (x/torch, x/copy).\n")
    print("| B | ctx | cupy.decode | paged | auto | torch SDPA | decode/torch | decode/copy "
          "| paged/contig | err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['ctx']} | ERROR {r['error'][:80]} |")
            continue
        bw = {k: r["kv_bytes"] / r[k] / 1e12 for k in ("cupy.decode", "auto", "torch")
              if k in r}
        pg = r["kv_bytes"] / r["paged"] / 1e12 if "paged" in r else float("nan")
        print(f"| {r['batch']} | {r['ctx']} | {bw['cupy.decode']:.2f} | {pg:.2f} | "
              f"{bw['auto']:.2f} | {bw['torch']:.2f} | {r['torch'] / r['cupy.decode']:.2f} | "
              f"{bw['cupy.decode'] * 1e12 / copy:.2f} | "
              f"{r['cupy.decode'] / r.get('paged', float('nan')):.2f} | "
              f"{max(r['err cupy.decode'], r.get('err paged', 0)):.1e} |")


if __name__ == "__main__":
    main()
