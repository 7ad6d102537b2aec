"""The Hopper forward's one-consumer configurations (NWG = 1, two or three blocks an SM) against
the default per shape, and the host cost of a ``flash_attention`` call, in one process.

Usage (on a compute capability 9.0 GPU with CuPy, torch and triton)::

    python3 tools/gpu_fwd_short.py            # host cost, then the sweep; table last
    python3 tools/gpu_fwd_short.py --host     # the host cost only
    python3 tools/gpu_fwd_short.py --san      # one tiny forward per NWG = 1 entry
    python3 tools/gpu_fwd_short.py --profile  # issue 11's window row once per configuration
                                              # (mode 203, 235 and the two-consumer 75), for
                                              # ncu
    python3 tools/gpu_fwd_short.py --twins    # the sweep with each candidate's built
                                              # twins: Q by the copy engine (mode 203),
                                              # persistent (235)

The sweep: fp16, B*S = 16384 and Hq*D = 2048 (the rows of benchmarks/gpu_flash.py), S in
1024 / 2048 / 4096, causal or not, and sliding windows; every candidate of
``instances.SM90_SHORT`` and the default, called through ``flash_sm90.forward(config=...)``
after a check against the default's output, timed with ``triton.testing.do_bench`` (L2
flushed, median); torch SDPA's default in the same process. TFLOP/s count the visible pairs.
What it decides: the thresholds of ``instances.SM90_SHORT`` and whether ``SM90_SHORT_ON`` may
be turned on (tests/gpu/test_gpu_flash_sm90.py runs every built configuration first).

The host cost: microseconds to issue a call of a tiny problem (the GPU then waits on the
host), with the plan of ``xattn/flash.py`` reused and with it switched off (``_signature``
returning None), forward and backward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (D, window side, S); +-1024 at D = 64 since its window entry holds three blocks an SM
# (2026-12-06), which may move SM90_SHORT's threshold past +-512.
WINDOWS = ((64, 128, 16384), (64, 256, 65536), (64, 512, 16384), (64, 1024, 16384),
           (128, 256, 16384), (128, 512, 16384))


def host_cost(calls=300):
    import cupy as cp

    import xattn
    from xattn import flash as flash_mod

    q = cp.random.standard_normal((1, 1, 128, 128), dtype=cp.float32).astype(cp.float16)
    out, lse = xattn.flash_attention(q, q, q, causal=True, return_lse=True)
    rows = {}

    def per_call(fn, n):
        for _ in range(10):
            fn()
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        cp.cuda.Device().synchronize()
        return (t1 - t0) / n * 1e6

    real = flash_mod._signature
    for planned in (True, False):
        flash_mod._signature = real if planned else (lambda *a, **k: None)
        try:
            tag = "plan reused" if planned else "planned every call"
            rows[f"flash_attention, {tag}"] = per_call(
                lambda: xattn.flash_attention(q, q, q, causal=True, backend="cupy"), calls)
            rows[f"flash_attention_backward, {tag}"] = per_call(
                lambda: xattn.flash_attention_backward(out, q, q, q, out, lse, causal=True),
                calls // 3)
        finally:
            flash_mod._signature = real
    for name, us in rows.items():
        print(f"host: {name}: {us:.1f} us a call", flush=True)
    return rows


def sweep_row(s, d, causal=False, window=None, b=None, h=None, twins=False):
    import cupy as cp
    import torch
    from triton.testing import do_bench

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90
    from xattn._backends.cupy_ import instances

    b = b or max(1, 16384 // s)
    h = h or 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(s + d)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, generator=gen)
               for _ in range(3))
    qc, kc, vc = (cp.from_dlpack(x) for x in (q, k, v))
    i = np.arange(s)
    if window is None:
        hi = i + 1 if causal else np.full(s, s)
        lo = np.zeros(s)
    else:
        lo = np.maximum(0, i - window[0])
        hi = np.minimum(s, i + window[1] + 1)
    fl = 4.0 * b * h * d * float((hi - lo).sum())
    prob = validate_attention(qc, kc, vc, causal=causal, window=window)
    default = instances.SM90[d]
    ref, _ = k90.forward(prob, qc, kc, vc, config=default)
    row = {"case": f"D={d} S={s} {'causal' if causal else 'full'}"
                   + (f" +-{window[0]}" if window else ""), "span": k90.mean_span(prob)}
    _, cfg_win, cfg_rest = instances.SM90_SHORT[d]
    cands = sorted({default, cfg_win, cfg_rest})
    if twins:  # the built twins (mode 203: Q by the copy engine; 235: persistent)
        cands += sorted({(bn, nwg, tw) for bn, nwg, _ in cands for tw in (203, 235)
                         if (d, bn, nwg, tw) in k90.BUILT} - set(cands))
    for cfg in cands:
        def run(cfg=cfg):
            return k90.forward(prob, qc, kc, vc, config=cfg)

        try:
            o, _ = run()
            err = float(cp.abs(o.astype(cp.float32) - ref.astype(cp.float32)).max())
            ms = float(do_bench(run, warmup=25, rep=100, return_mode="median"))
            row[str(cfg)] = fl / ms / 1e9
            row["err " + str(cfg)] = err
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"  {row['case']} {cfg}: FAILED {exc!r:.300}", flush=True)
    if window is None:
        with torch.no_grad():
            ms = float(do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal), warmup=25, rep=100, return_mode="median"))
        row["torch"] = fl / ms / 1e9
    print({key: (round(val, 4) if isinstance(val, float) else val) for key, val in row.items()},
          flush=True)
    return row


def sanitizer_workload():
    import cupy as cp

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    rng = np.random.default_rng(0)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    for d, *cfg in sorted(c for c in k90.BUILT if c[2] == 1):
        # The persistent entries (mode bit 5) also on more tiles than blocks (each block walks
        # several, the rings' phases carry over).
        rows = (150, 128 * sms + 70) if cfg[2] & 32 else (150,)
        for sq in rows:
            q = cp.asarray(rng.standard_normal((1, 2, sq, d)), dtype=cp.float16)
            k = cp.asarray(rng.standard_normal((1, 1, 170, d)), dtype=cp.float16)
            prob = validate_attention(q, k, k, causal=True)
            k90.forward(prob, q, k, k, config=tuple(cfg))
            cp.cuda.Device().synchronize()
            print(f"san workload D={d} config={tuple(cfg)} Sq={sq} ok", flush=True)


def profile_workload(configs=((64, 1, 203), (64, 1, 235), (64, 3, 75))):
    """Issue 11's window row (fp16, S = 65536, +-256, D = 64, 16 heads), one launch per
    configuration, for Nsight Compute (``ncu -k regex:flash_fwd_sm90``): the kernels are
    compiled before their launch (NVRTC is host work), so each profiled launch is the timed
    one."""
    import cupy as cp

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90 as k90

    rng = np.random.default_rng(0)
    q, k, v = (cp.asarray(rng.standard_normal((1, 16, 65536, 64)), dtype=cp.float16)
               for _ in range(3))
    prob = validate_attention(q, k, v, window=(256, 256))
    for cfg in configs:
        k90.forward(prob, q, k, v, config=cfg)
        cp.cuda.Device().synchronize()
        print(f"profile workload config={cfg} ok", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", action="store_true", help="the host cost only")
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    ap.add_argument("--profile", action="store_true",
                    help="the window row once per configuration, for ncu")
    ap.add_argument("--twins", action="store_true", help="also the mode-203 / 235 twins")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; later rows skipped")
    args = ap.parse_args(argv)
    if args.san:
        return sanitizer_workload()
    if args.profile:
        return profile_workload()
    t0 = time.time()
    host_cost()
    if args.host:
        return None
    specs = [(s, d, c, None) for s in (1024, 2048, 4096) for d in (64, 128) for c in (0, 1)]
    specs += [(s, d, False, (w, w)) for d, w, s in WINDOWS]
    rows = []
    for s, d, causal, window in specs:
        if time.time() - t0 > args.budget:
            print(f"budget: rows from D={d} S={s} on skipped", flush=True)
            break
        kw = {"b": 1, "h": 32} if window and s == 65536 else {}
        rows.append(sweep_row(s, d, bool(causal), window, twins=args.twins, **kw))
    cols = sorted({c for r in rows for c in r if c.startswith("(")})
    print("\n| case | mean keys | torch | " + " | ".join(cols) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for r in rows:
        vals = " | ".join(f"{r[c]:.1f}" if c in r else "" for c in cols)
        torch_ = f"{r['torch']:.1f}" if "torch" in r else ""
        print(f"| {r['case']} | {r['span']:.0f} | {torch_} | {vals} |")
    return None


if __name__ == "__main__":
    main()
