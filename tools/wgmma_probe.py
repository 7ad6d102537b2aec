"""Probe the wgmma layouts of the sm_90a flash kernel, then (``--bench``) time the kernel.

Usage: ``python3 tools/wgmma_probe.py [--bench] [--swapped] [--bwd]`` on a compute capability
9.0 GPU. ``--bwd`` runs only the probes of the Hopper backward (``tools/wgmma_probe_bwd.cu``:
the five products of ``flash_bwd_sm90.cu`` through its own helpers, integer matrices).

1. Probes (``tools/wgmma_probe.cu``, compiled only when this runs): one warpgroup runs the
   exact wgmma sequences of ``flash_fwd_sm90.cu`` on small integer-valued matrices (exact in
   float32) and the result is
   compared with numpy: ``ss`` = S = Q K^T (A and B from shared memory, K-major, 4 k-steps),
   ``rs`` = O += P V (A from registers, B MN-major with imm-trans-b, 2 k-steps), ``rsk`` = A
   from registers with a K-major B (tells a register-A fault from an MN-major-B fault), and the
   128-byte-swizzle layouts of modes 2 / 3: ``sss`` (S = Q K^T, K = 128: two panels) and
   ``rss`` (O += P V, 64 keys, N = 128 spans two panels); float16 and bfloat16, N = 64, 128;
   ``ring``: the mbarrier K/V stage ring of the warp-specialised modes (bytes only, no wgmma).
   PASS/FAIL per probe, on failure a map of the wrong 8x8 output blocks. ``--swapped`` also
   runs the no-swizzle probes with LBO / SBO swapped (expected to FAIL; the MN-major one can
   fault with an illegal address, which ends the process -- hence opt-in).
2. The flash kernel on small shapes against the float64 oracle (max error, where), for the
   default configuration of every mode.
3. ``--bench``: fp16 S=4096 B=4, D=128 (Hq=16) and D=64 (Hq=32), causal and not: every built
   sm_90a configuration (checked against the mma.sync output first: FAIL instead of a time when
   it differs), the mma.sync kernel, torch SDPA default (cuDNN) and its flash backend; one table
   of TFLOP/s (FLOPs 4 B Hq S^2 D, half for causal), progress lines on stderr.

Exit status 0 when every probe with the kernel's layout and every flash check passed.
"""

from __future__ import annotations

import argparse
import os
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


# (kind, K of the product, A from registers, B MN-major, swizzled): see wgmma_probe.cu.
PROBES = (("ss", 64, False, False, False), ("rsk", 64, True, False, False),
          ("rs", 32, True, True, False), ("sss", 128, False, False, True),
          ("rss", 64, True, True, True))


def _probe_layout(kind, n, kk):
    """(LBO, SBO) of the kernel layout for one probe."""
    if kind in ("ss", "rsk"):
        return (128, 16 * 64)  # LBO: next column block; SBO: next 8-row block
    if kind == "rs":
        return (16 * n, 128)  # LBO: next key block; SBO: next 8 output columns
    if kind == "sss":
        return (16, 1024)  # LBO unused; SBO: next 8 rows (8 x 128 bytes)
    return (128 * kk, 1024)  # rss: LBO = next 64-column panel of V; SBO: next 8 keys


def _probe_source():
    """``tools/wgmma_probe.cu`` with its include of the sm_90a kernel inlined (that file's own
    includes are inlined by the package's loader)."""
    from xattn._backends.cupy_ import _compile

    text = (Path(__file__).with_name("wgmma_probe.cu")).read_text()
    return text.replace('#include "flash_fwd_sm90.cu"', _compile.source("flash_fwd_sm90.cu"))


def run_probes(cp, k90, swapped=False):
    from xattn._backends.cupy_ import _compile

    src = _probe_source()
    t0 = time.perf_counter()
    mod = _compile.load_module(_compile.cubin_path(src))
    print(f"probe module compiled in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    ok_all = True
    for tn, dtype in (("f16", np.dtype(np.float16)), ("bf16", _bf16())):
        for n in (64, 128):
            for kind, kk, _a_regs, mn_major, swz in PROBES:
                if mn_major:  # C = A B with B (K x N) row-major
                    a = rng.integers(-2, 3, (64, kk)).astype(np.float64)
                    b = rng.integers(-2, 3, (kk, n)).astype(np.float64)
                    ref = a @ b
                else:  # C = A B^T with B (N x K)
                    a = rng.integers(-2, 3, (64, kk)).astype(np.float64)
                    b = rng.integers(-2, 3, (n, kk)).astype(np.float64)
                    ref = a @ b.T
                mine = _probe_layout(kind, n, kk)
                fn = mod.get_function(f"probe_{kind}_{tn}_n{n}")
                smem = 0
                if swz:  # dynamic shared memory, 1 KiB for the 1024-byte alignment
                    smem = (b.size + (a.size if kind == "sss" else 0)) * 2 + 1024
                    if smem > 48 * 1024:
                        _compile._allow_smem(fn, smem)
                da = cp.asarray(a.astype(dtype)).view(cp.uint16)
                db = cp.asarray(b.astype(dtype)).view(cp.uint16)
                res = {}
                # The swapped offsets are a diagnostic only (opt-in: a wrong MN-major layout
                # can fault, which ends the process).
                layouts = [("kernel layout", mine)]
                if swapped and not swz:
                    layouts.append(("swapped", mine[::-1]))
                for label, (lbo, sbo) in layouts:
                    c = cp.full((64, n), np.nan, dtype=cp.float32)
                    try:
                        fn((1,), (128,), (da, db, c, np.uint32(lbo), np.uint32(sbo)),
                           shared_mem=smem)
                        cp.cuda.runtime.deviceSynchronize()
                        res[label] = cp.asnumpy(c)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        res[label] = exc
                for label, c in res.items():
                    name = f"probe {kind} {tn} m64n{n}k16 x{kk // 16} " \
                           f"{'swizzle128' if swz else 'no-swizzle'} ({label}: LBO/SBO " \
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
    return run_ring_probe(cp, k90, mod) and ok_all


def run_bwd_probes(cp):
    """The five products of the Hopper backward (``tools/wgmma_probe_bwd.cu``: the helpers of
    ``flash_bwd_sm90.cu`` on integer matrices, exact in float32): c1 = K Q^T (S^T, dP^T),
    c2 = X Q (dV, dK: A from registers, B MN-major), c3 = X^T K (dQ: dS staged in shared
    memory, B MN-major with imm-trans-b); float16 and bfloat16, D = 64 and 128."""
    from xattn._backends.cupy_ import _compile

    text = Path(__file__).with_name("wgmma_probe_bwd.cu").read_text()
    src = text.replace('#include "flash_bwd_sm90.cu"', _compile.source("flash_bwd_sm90.cu"))
    t0 = time.perf_counter()
    mod = _compile.load_module(_compile.cubin_path(src))
    print(f"bwd probe module compiled in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(2)
    ok_all = True
    for tn, dtype in (("f16", np.dtype(np.float16)), ("bf16", _bf16())):
        for d in (64, 128):
            kk = rng.integers(-2, 3, (128, d)).astype(np.float64)
            qq = rng.integers(-2, 3, (64, d)).astype(np.float64)
            xx = rng.integers(-2, 3, (128, 64)).astype(np.float64)
            refs = {"c1 = K Q^T (S^T / dP^T)": kk @ qq.T, "c2 = X Q (dV / dK)": xx @ qq,
                    "c3 = X^T K (dQ)": xx.T @ kk}
            fn = mod.get_function(f"probe_bwd_{tn}_d{d}")
            smem = (128 * d + 64 * d + 64 * 128) * 2 + 1024
            if smem > 48 * 1024:
                _compile._allow_smem(fn, smem)
            outs = [cp.full((128, 64), np.nan, dtype=cp.float32),
                    cp.full((128, d), np.nan, dtype=cp.float32),
                    cp.zeros((64, d), dtype=cp.float32)]
            try:
                fn((1,), (256,), (cp.asarray(kk.astype(dtype)).view(cp.uint16),
                                  cp.asarray(qq.astype(dtype)).view(cp.uint16),
                                  cp.asarray(xx.astype(np.float32)), *outs), shared_mem=smem)
                cp.cuda.runtime.deviceSynchronize()
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"FAIL probe bwd {tn} D={d}: launch error {exc}")
                ok_all = False
                continue
            for (label, ref), c in zip(refs.items(), outs, strict=True):
                got = cp.asnumpy(c)
                good = np.array_equal(got, ref)
                print(f"{'PASS' if good else 'FAIL'} probe bwd {tn} D={d} {label}")
                if not good:
                    ok_all = False
                    print("\n".join(block_map(got, ref)))
    return ok_all


def run_ring_probe(cp, k90, mod):
    from xattn._backends.cupy_ import _compile
    """The mbarrier K/V ring of the warp-specialised modes (bit 3): ``probe_ring_d<D>`` copies
    nkb blocks of 128 rows through the producer of flash_fwd_sm90.cu and reads every stage back
    through the 128-byte swizzle; the output must equal K and V with rows >= limit zeroed."""
    ok_all = True
    rng = np.random.default_rng(3)
    for d in (64, 128):
        for nkb, limit in ((1, 128), (2, 200), (7, 7 * 128), (8, 7 * 128 + 45)):
            rows = nkb * 128
            k = rng.integers(1, 60000, (rows, d), dtype=np.uint16)
            v = rng.integers(1, 60000, (rows, d), dtype=np.uint16)
            want = np.stack([k.reshape(nkb, 128, d), v.reshape(nkb, 128, d)], axis=1)
            want = want.copy()
            r = np.arange(rows).reshape(nkb, 128)
            want[np.broadcast_to((r >= limit)[:, None, :, None], want.shape)] = 0
            out = cp.full((nkb, 2, 128, d), 0xFFFF, dtype=cp.uint16)
            fn = mod.get_function(f"probe_ring_d{d}")
            smem = 2 * 3 * 128 * d * 2 + 1024
            _compile._allow_smem(fn, smem)
            name = f"probe ring (mbarrier K/V stages, swizzle128) D={d} blocks={nkb} " \
                   f"rows<{limit}"
            try:
                fn((1,), (256,), (cp.asarray(k), cp.asarray(v), out, np.int32(nkb),
                                  np.int32(limit)), shared_mem=smem)
                cp.cuda.runtime.deviceSynchronize()
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"FAIL {name}: launch error {exc}")
                ok_all = False
                continue
            got = cp.asnumpy(out)
            good = np.array_equal(got, want)
            print(f"{'PASS' if good else 'FAIL'} {name}")
            if not good:
                ok_all = False
                bad = got != want
                blk, kv, row, col = np.nonzero(bad)
                print(f"    {int(bad.sum())} of {bad.size} elements wrong; blocks "
                      f"{sorted(set(blk.tolist()))[:16]} (K=0/V=1: {sorted(set(kv.tolist()))}); "
                      f"rows {sorted(set(row.tolist()))[:24]}; 16-byte chunks "
                      f"{sorted(set((col // 8).tolist()))}; untouched (0xFFFF) "
                      f"{int((got == 0xFFFF).sum())}")
    return ok_all


def _inputs(cp, rng, dtype, b, hq, hkv, sq, sk, d):
    def mk(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dtype))
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)


MODES = (0, 1, 2, 3, 11, 27)


def mode_config(k90, d, mode):
    """The configuration of a mode: the default (BN, warpgroups) with that mode when built, else
    the first built one."""
    bn, nwg, _ = k90.CONFIGS[d]
    if (d, bn, nwg, mode) in k90.BUILT:
        return (bn, nwg, mode)
    return next(c[1:] for c in sorted(k90.BUILT) if c[0] == d and c[3] == mode)


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
             for cfg in sorted({mode_config(k90, c[1], mode) for mode in MODES})]
    # Compile every module the checks need at once (threads) instead of one by one.
    keys = sorted({(c[1], *c[-1]) for c in cases})
    for tn in ("f16", "bf16"):
        k90.precompile(tn, keys)
    for dt, d, causal, sq, sk, hq, hkv, window, cfg in cases:
        dtype = _bf16() if dt == "bfloat16" else np.dtype(dt)
        q, k, v = _inputs(cp, rng, dtype, 2, hq, hkv, sq, sk, d)
        prob = validate_attention(q, k, v, causal=causal, window=window)
        label = f"flash sm90 {cfg} {dt} D={d} causal={causal} Sq={sq} Sk={sk} Hq={hq} " \
                f"Hkv={hkv} window={window}"
        try:
            os.environ["XATTN_POISON"] = "1"
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
    os.environ.pop("XATTN_POISON", None)
    return ok_all


def _time_cupy(cp, f, reps=15, warmup=2):
    for _ in range(warmup):
        f()
    e = [cp.cuda.Event() for _ in range(reps + 1)]
    e[0].record()
    for i in range(reps):
        f()
        e[i + 1].record()
    e[-1].synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(e[i], e[i + 1]) for i in range(reps)]))


def _time_torch(torch, f, reps=15, warmup=2):
    for _ in range(warmup):
        f()
    e = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    e[0].record()
    for i in range(reps):
        f()
        e[i + 1].record()
    e[-1].synchronize()
    return float(np.median([e[i].elapsed_time(e[i + 1]) for i in range(reps)]))


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def bench(cp, k90):
    """One row per kernel, one column per case (TFLOP/s); progress goes to stderr as it is
    measured, so a crash in one configuration still leaves the numbers before it."""
    try:
        import torch

        have_torch = torch.cuda.is_available()
    except ImportError:
        torch, have_torch = None, False
    t0 = time.perf_counter()
    # Old modes first: a fault in a new variant cannot hide the numbers of the old ones.
    order = sorted(k90.BUILT, key=lambda c: (c[3], c))
    k90.precompile("f16", order)
    _log(f"bench: {len(order)} sm90 configurations compiled in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(2)
    cases = [(d, hq, causal) for d, hq in ((128, 16), (64, 32)) for causal in (False, True)]
    table: dict = {}  # row name -> {case index: text}
    for ci, (d, hq, causal) in enumerate(cases):
        q, k, v = _inputs(cp, rng, np.float16, 4, hq, hq, 4096, 4096, d)
        for name, val in _bench_case(cp, k90, torch if have_torch else None, q, k, v, causal,
                                     [c for c in order if c[0] == d]):
            table.setdefault(name, {})[ci] = val
        del q, k, v
    heads = [f"D={d} {'causal' if c else 'full'}" for d, _, c in cases]
    card = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"\nfp16 S=4096 B=4 (Hq=16 at D=128, Hq=32 at D=64), TFLOP/s = 4 B Hq S^2 D / t "
          f"(half causal), median of 15; {card}")
    print(f"{'kernel':28s}" + "".join(f"{h:>15s}" for h in heads))
    for name, vals in table.items():
        print(f"{name:28s}" + "".join(f"{vals.get(i, '-'):>15s}" for i in range(len(cases))))
    print(f"(sm90 rows: BN, warpgroups, mode; mode bit 0 = P V overlap, bit 1 = 128B swizzle, "
          f"bit 3 = producer warpgroup + mbarrier ring, bit 4 = consumer ping-pong; "
          f"FAIL = differs from mma.sync; bench {time.perf_counter() - t0:.1f} s)")


def _bench_case(cp, k90, torch, q, k, v, causal, configs):
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash as ck

    b, hq, s, d = q.shape
    prob = validate_attention(q, k, v, causal=causal)
    flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
    case = f"D={d} {'causal' if causal else 'full'}"
    rows = []

    def add(name, ms):
        rows.append((name, f"{flops / ms / 1e9:.1f}"))
        _log(f"  {case:12s} {name:28s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")

    def sm80():
        return ck.forward(prob, q, k, v)  # the cupy.sm80 entry's launcher, never sm90

    ref_out = sm80()[0].astype(cp.float32)
    add("mma.sync (sm80)", _time_cupy(cp, sm80))
    for c in configs:
        cfg = c[1:]
        name = f"sm90 {cfg[0]},{cfg[1]},{cfg[2]}"

        def sm90(cfg=cfg):
            return k90.forward(prob, q, k, v, config=cfg)

        try:
            out = sm90()[0].astype(cp.float32)
            diff = float(cp.nan_to_num(cp.abs(out - ref_out), nan=np.inf).max())
        except Exception as exc:  # noqa: BLE001 - compile / launch error: report and go on
            rows.append((name, "ERROR"))
            _log(f"  {case:12s} {name:28s} ERROR {type(exc).__name__}: {str(exc)[:300]}")
            continue
        if not diff < 2e-2:
            rows.append((name, "FAIL"))
            _log(f"  {case:12s} {name:28s} FAIL: max |diff vs mma.sync| {diff:.3g}")
            continue
        add(name, _time_cupy(cp, sm90))
    if torch is not None:
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        cp.cuda.runtime.deviceSynchronize()

        def sdpa():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        add("torch default (cuDNN)", _time_torch(torch, sdpa))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def fa2():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return sdpa()

            add("torch flash (FA2)", _time_torch(torch, fa2))
        except Exception as exc:  # noqa: BLE001
            _log(f"  torch flash backend: {exc}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="time the kernel after the checks")
    ap.add_argument("--force-bench", action="store_true",
                    help="time even when a probe or check failed")
    ap.add_argument("--swapped", action="store_true",
                    help="also run the no-swizzle probes with LBO / SBO swapped (diagnostic; "
                         "the MN-major one may fault and end the process)")
    ap.add_argument("--bwd", action="store_true",
                    help="only the probes of the Hopper backward (tools/wgmma_probe_bwd.cu)")
    args = ap.parse_args(argv)
    import cupy as cp

    from xattn._backends.cupy_ import flash_sm90 as k90

    cc = int(cp.cuda.Device().compute_capability)
    print(f"device 0: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, cc {cc}")
    if cc != 90:
        print("the sm_90a kernel needs compute capability 9.0: nothing to probe")
        return 2
    t0 = time.perf_counter()
    if args.bwd:
        ok = run_bwd_probes(cp)
        print(f"bwd probes {'PASSED' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)")
        return 0 if ok else 1
    ok = run_probes(cp, k90, swapped=args.swapped)
    ok = run_flash_checks(cp, k90) and ok
    print(f"checks {'PASSED' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)")
    if args.bench and (ok or args.force_bench):
        bench(cp, k90)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
