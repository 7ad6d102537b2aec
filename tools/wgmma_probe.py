"""Probe the wgmma layouts of the sm_90a flash kernel, then (``--bench``) time the kernel.

Usage: ``python3 tools/wgmma_probe.py [--bench]`` on a compute capability 9.0 GPU with CuPy.

1. Probes (``xattn/kernels/wgmma_probe.cu``): one warpgroup runs the exact wgmma sequences of
   ``flash_fwd_sm90.cu`` on small integer-valued matrices (exact in float32) and the result is
   compared with numpy: ``ss`` = S = Q K^T (A and B from shared memory, K-major, 4 k-steps),
   ``rs`` = O += P V (A from registers, B MN-major with imm-trans-b, 2 k-steps), for float16 and
   bfloat16 and N = 64, 128; ``rsk`` = A from registers with a K-major B (tells a register-A
   fault from an MN-major-B fault). Each probe runs with the kernel's descriptor offsets (LBO, SBO)
   and with the two swapped; PASS/FAIL per probe, and on failure a map of the wrong 8x8 output
   blocks and which reference block each wrong block holds (a layout bug shows as a pattern).
2. The flash kernel on small shapes against the float64 oracle (max error, where).
3. ``--bench``: fp16 S=4096 D=128 (B=4, Hq=16) and D=64 (B=4, Hq=32), causal and not: the
   sm_90a kernel (each built configuration), the mma.sync kernel and torch SDPA (default =
   cuDNN on Hopper, and its flash backend) when torch with CUDA is importable; TFLOP/s with
   FLOPs 4 B Hq S^2 D (half for causal), CUDA events, median of 20 after warmup.

Exit status 0 when every probe with the kernel's layout and every flash check passed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def block_map(c, ref, blk=8):
    """Lines describing where ``c`` differs from ``ref`` in blocks of blk x blk."""
    rows, cols = ref.shape
    nr, nc = rows // blk, cols // blk
    lines = []
    bad = ~np.isclose(c, ref) | np.isnan(c)
    lines.append(f"    wrong elements: {int(bad.sum())} of {bad.size}; max |err| "
                 f"{float(np.nanmax(np.abs(c - ref))) if not np.isnan(c).all() else 'all NaN'}")
    lines.append("    8x8 blocks (rows down, cols across): . right, X wrong, N NaN")
    for i in range(nr):
        row = ""
        for j in range(nc):
            cb = c[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]
            bb = bad[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]
            row += "N" if np.isnan(cb).any() else ("X" if bb.any() else ".")
        lines.append(f"    r{i * blk:3d} {row}")
    # For wrong blocks: which reference block (if any) they hold, and the wrong rows / cols.
    found = 0
    for i in range(nr):
        for j in range(nc):
            bb = bad[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]
            if not bb.any():
                continue
            cb = c[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]
            match = [(i2, j2) for i2 in range(nr) for j2 in range(nc)
                     if np.array_equal(cb, ref[i2 * blk:(i2 + 1) * blk, j2 * blk:(j2 + 1) * blk])]
            wr = np.nonzero(bb.any(axis=1))[0].tolist()
            wc = np.nonzero(bb.any(axis=0))[0].tolist()
            where = f"= ref block rows {match[0][0] * blk}, cols {match[0][1] * blk}" if match \
                else "matches no reference block"
            lines.append(f"    block rows {i * blk}-{i * blk + blk - 1} cols {j * blk}-"
                         f"{j * blk + blk - 1}: {where}; wrong local rows {wr} cols {wc}")
            found += 1
            if found >= 12:
                lines.append("    ...")
                return lines
    return lines


def run_probes(cp, k90):
    src = k90._source("wgmma_probe.cu")
    t0 = time.perf_counter()
    mod = k90.load_module(k90.compile_cubin(src))
    print(f"probe module compiled in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    ok_all = True
    for tn, dtype in (("f16", np.dtype(np.float16)), ("bf16", _bf16())):
        for n in (64, 128):
            for kind in ("ss", "rsk", "rs"):
                if kind in ("ss", "rsk"):
                    a = rng.integers(-2, 3, (64, 64)).astype(np.float64)
                    b = rng.integers(-2, 3, (n, 64)).astype(np.float64)
                    ref = a @ b.T
                    mine = (128, 16 * 64)  # LBO: next column block; SBO: next 8-row block
                    # rsk: the same product with A from registers (imm-trans-b 0)
                else:
                    a = rng.integers(-2, 3, (64, 32)).astype(np.float64)
                    b = rng.integers(-2, 3, (32, n)).astype(np.float64)
                    ref = a @ b
                    mine = (16 * n, 128)  # LBO: next key block; SBO: next 8 output columns
                fn = mod.get_function(f"probe_{kind}_{tn}_n{n}")
                da = cp.asarray(a.astype(dtype)).view(cp.uint16)
                db = cp.asarray(b.astype(dtype)).view(cp.uint16)
                res = {}
                for label, (lbo, sbo) in (("kernel layout", mine), ("swapped", mine[::-1])):
                    c = cp.full((64, n), np.nan, dtype=cp.float32)
                    try:
                        fn((1,), (128,), (da, db, c, np.uint32(lbo), np.uint32(sbo)))
                        cp.cuda.runtime.deviceSynchronize()
                        res[label] = cp.asnumpy(c)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        res[label] = exc
                for label, c in res.items():
                    name = f"probe {kind} {tn} m64n{n}k16 ({label}: LBO/SBO " \
                           f"{mine if label == 'kernel layout' else mine[::-1]})"
                    if isinstance(c, Exception):
                        print(f"FAIL {name}: launch error {c}")
                        if label == "kernel layout":
                            ok_all = False
                        continue
                    good = np.array_equal(c, ref)
                    print(f"{'PASS' if good else 'FAIL'} {name}")
                    if not good and label == "kernel layout":
                        ok_all = False
                        print("\n".join(block_map(c, ref)))
    return ok_all


def _inputs(cp, rng, dtype, b, hq, hkv, sq, sk, d):
    def mk(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dtype))
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)


def run_flash_checks(cp, k90):
    from xattn._array import validate_attention
    from xattn.testing import reference_attention

    rng = np.random.default_rng(1)
    ok_all = True
    cases = [  # (dtype, d, causal, sq, sk, hq, hkv, window)
        ("float16", 64, False, 64, 128, 2, 2, None),
        ("float16", 128, False, 64, 128, 2, 2, None),
        ("float16", 64, False, 77, 150, 4, 2, None),
        ("float16", 128, True, 130, 61, 4, 1, None),
        ("bfloat16", 128, True, 200, 333, 4, 2, None),
        ("bfloat16", 64, False, 100, 173, 4, 2, (20, 7)),
        ("float16", 128, True, 515, 1000, 2, 1, None),  # many key blocks: buffers turn over
        ("float16", 64, False, 300, 777, 2, 2, None),
    ]
    cases = [(*c, cfg) for c in cases
             for cfg in (k90.CONFIGS[c[1]],
                         next(b[1:] for b in sorted(k90.BUILT) if b[0] == c[1] and b[3]))]
    for dt, d, causal, sq, sk, hq, hkv, window, cfg in cases:
        dtype = _bf16() if dt == "bfloat16" else np.dtype(dt)
        q, k, v = _inputs(cp, rng, dtype, 2, hq, hkv, sq, sk, d)
        prob = validate_attention(q, k, v, causal=causal, window=window)
        label = f"flash sm90 {cfg} {dt} D={d} causal={causal} Sq={sq} Sk={sk} Hq={hq} " \
                f"Hkv={hkv} window={window}"
        try:
            k90.POISON = True
            out, lse = k90.forward(prob, q, k, v, config=cfg)
            cp.cuda.runtime.deviceSynchronize()
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL {label}: {type(exc).__name__}: {exc}")
            ok_all = False
            continue
        ref, ref_lse, _ = reference_attention(q, k, v, causal=causal, window=window)
        o = cp.asnumpy(out.astype(cp.float32)).astype(np.float64)
        err = np.abs(o - ref)
        lerr = np.abs(cp.asnumpy(lse) - ref_lse)
        lerr = np.where(np.isinf(ref_lse) & (cp.asnumpy(lse) == ref_lse), 0.0, lerr)
        nan = int(np.isnan(o).sum())
        tol = 2e-2 if dt == "bfloat16" else 4e-3
        good = nan == 0 and float(np.nanmax(err)) < tol and float(np.nanmax(lerr)) < 2e-3
        print(f"{'PASS' if good else 'FAIL'} {label}: max|out err| {np.nanmax(err):.3g} "
              f"max|lse err| {np.nanmax(lerr):.3g} NaN {nan}")
        if not good:
            ok_all = False
            i = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
            print(f"    worst at (b, h, row, col) = {tuple(int(x) for x in i)}")
            bad_rows = np.nonzero((np.isnan(err) | (err > tol)).any(axis=-1).any(axis=(0, 1)))[0]
            more = " ..." if bad_rows.size > 40 else ""
            print(f"    rows with errors: {bad_rows[:40].tolist()}{more}"
                  f" ({bad_rows.size} of {sq}); row % 64 of those: "
                  f"{sorted(set((bad_rows % 64).tolist()))[:32]}")
            bad_cols = np.nonzero((np.isnan(err) | (err > tol)).any(axis=(0, 1, 2)))[0]
            print(f"    cols with errors: {bad_cols[:64].tolist()}")
    k90.POISON = False
    return ok_all


def _time_cupy(cp, f, reps=20, warmup=3):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        f()
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    return float(np.median(times))


def bench(cp, k90):
    try:
        import torch

        have_torch = torch.cuda.is_available()
    except ImportError:
        torch, have_torch = None, False
    rng = np.random.default_rng(2)
    print(f"\ncard: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{'case':34s} {'kernel':22s} {'ms':>8s} {'TFLOP/s':>8s}")
    for d, hq in ((128, 16), (64, 32)):
        q, k, v = _inputs(cp, rng, np.float16, 4, hq, hq, 4096, 4096, d)
        for causal in (False, True):
            _bench_case(cp, k90, torch if have_torch else None, q, k, v, causal)


def _bench_case(cp, k90, torch, q, k, v, causal):
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash as ck

    b, hq, s, d = q.shape
    prob = validate_attention(q, k, v, causal=causal)
    flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
    case = f"fp16 D={d} S={s} B={b} Hq={hq} {'causal' if causal else 'full'}"
    enabled = k90.ENABLE_SM90
    k90.ENABLE_SM90 = False  # the mma.sync row must not be routed to the sm_90a kernel

    def sm80():
        return ck.forward(prob, q, k, v)

    try:
        ref_out, _ = sm80()
        rows = [("mma.sync (sm80)", _time_cupy(cp, sm80), "")]
    finally:
        k90.ENABLE_SM90 = enabled
    for cfg in sorted(c[1:] for c in k90.BUILT if c[0] == d):
        def sm90(cfg=cfg):
            return k90.forward(prob, q, k, v, config=cfg)

        try:
            out, _ = sm90()
            diff = float(cp.abs(out.astype(cp.float32) - ref_out.astype(cp.float32)).max())
            rows.append((f"sm90 BN={cfg[0]} WG={cfg[1]} ov={cfg[2]}", _time_cupy(cp, sm90),
                         f"  |diff vs sm80| {diff:.2g}"))
        except Exception as exc:  # noqa: BLE001
            print(f"{case:34s} sm90 {cfg}: {type(exc).__name__}: {exc}")
    if torch is not None:
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        cp.cuda.runtime.deviceSynchronize()

        def sdpa():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        rows.append(("torch default", _time_torch(torch, sdpa), ""))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def fa2():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return sdpa()

            rows.append(("torch flash (FA2)", _time_torch(torch, fa2), ""))
        except Exception as exc:  # noqa: BLE001
            print(f"  torch flash backend: {exc}")
    for name, ms, extra in rows:
        print(f"{case:34s} {name:22s} {ms:8.3f} {flops / ms / 1e9:8.1f}{extra}")


def _time_torch(torch, f, reps=20, warmup=3):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        f()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="time the kernel after the checks")
    ap.add_argument("--force-bench", action="store_true",
                    help="time even when a probe or check failed")
    args = ap.parse_args(argv)
    import cupy as cp

    from xattn._backends.cupy_ import flash_sm90 as k90

    cc = int(cp.cuda.Device().compute_capability)
    print(f"device 0: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, cc {cc}")
    if cc != 90:
        print("the sm_90a kernel needs compute capability 9.0: nothing to probe")
        return 2
    t0 = time.perf_counter()
    ok = run_probes(cp, k90)
    ok = run_flash_checks(cp, k90) and ok
    print(f"checks {'PASSED' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)")
    if args.bench and (ok or args.force_bench):
        bench(cp, k90)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
