"""``deterministic=True`` on the Hopper backward: its new route (``cupy.sm90_bwd``: dK/dV on the
wgmma kernel's ``_nodq`` entry, dq by ``flash_bwd.cu``'s deterministic dq kernel) against the
old one (``cupy.sm80``: the mma.sync dK/dV kernel and the same dq kernel), the
non-deterministic wgmma backward and torch's SDPA backward, in one process.

Usage: ``python3 tools/gpu_det_bench.py [--budget SECONDS] [--reps N] [--causal]`` on a
compute capability 9.0 GPU; ``--precompile`` only builds the kernels the GPU tests and the
rows need (the sm_90a cubins in threads, the mma.sync modules in processes: both land in disk
caches that later processes read); ``--san`` runs the sanitizer workload (one tiny
deterministic backward per ``_nodq`` entry).

Rows: fp16 and bf16, D 128 and 64, S = Sq = Sk = 4096, B = 16384 / S, H = 2048 / D (the shapes
of benchmarks/gpu_flash.py, whose "-det" row is fp16 D=128), not causal (``--causal`` adds the
causal rows). Each row first checks: the new route's dq equals the old route's bit for bit
(the same dq kernel on the same inputs), its dk / dv equal the non-deterministic wgmma
backward's bit for bit, a second run equals the first bit for bit, and its gradients lie
within 2e-2 (relative to max |torch|) of torch's; a failed check prints FAIL instead of a
time. Times: the whole backward (delta, main kernel, dq kernel or conversion, host work;
torch: ``torch.autograd.grad`` of a recorded forward), ``triton.testing.do_bench`` median when
triton imports, else the median of CUDA-event timings; the new route's two kernels are also
timed alone (dK/dV ms, dq ms). TFLOP/s as /work/shared/PERF.md counts them: 2.5 x the
forward's 4 B H S^2 D, half of it causal. Progress on stderr; a markdown table last on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from gpu_bench_common import log as _log

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENTRY = "cupy.sm90_bwd"


# --- precompile ------------------------------------------------------------------------------

def _mma_sync_instances():
    """The flash_bwd.cu modules the GPU tests and the rows load: the delta kernels, every dq
    kernel of D 64 / 128 (dense and for 128-blocks masks, with and without score mods) and the
    mma.sync dK/dV-only kernels that the tests' and rows' cupy.sm80 comparisons run."""
    from xattn._backends.cupy_ import flash_bwd, instances

    out = [instances.bwd_aux(tn) for tn in instances.TYPES]
    for tn in instances.TYPES:
        for d in (64, 128):
            for mods in (False, True):
                out.append(instances.bwd_dq(tn, d, flash_bwd.DQ_CONFIGS[d], mods))
                bm_main, bm_dq = flash_bwd.block_mask_configs(d, (128, 128))
                out.append(instances.bwd_dq(tn, d, bm_dq, mods, True))
            out.append(instances.bwd(tn, d, flash_bwd.CONFIGS[d], False, False))
    bm128 = flash_bwd.block_mask_configs(128, (128, 128))[0]
    bm64 = flash_bwd.block_mask_configs(64, (128, 128))[0]
    out += [instances.bwd("bf16", 64, flash_bwd.CONFIGS[64], True, False),
            instances.bwd("f16", 128, bm128, False, False, True),
            instances.bwd("f16", 64, bm64, True, False, True)]
    return out


def _sm90_instances():
    """The sm_90a cubins the GPU tests and the rows load: each backward entry they run with
    its _nodq twin (the plain module too: it holds the dq conversion), and the forwards that
    their forward calls take (the default entries; score mods at D = 64; 128-block masks)."""
    from xattn._backends.cupy_ import flash_sm90, instances

    used = [(tn, d, var) for tn in instances.TYPES
            for d, var in ((64, "tma"), (128, "tma2"), (64, "win"), (64, "mods"))]
    used += [("f16", 64, "bm"), ("f16", 128, "bm"), ("f16", 64, "mods_bm")]
    out = [instances.bwd_sm90(tn, d, var, dq=dq) for tn, d, var in used for dq in (True, False)]
    out += [instances.bwd_sm90(tn, d) for tn in instances.TYPES for d in (64, 128)]
    # Built on request only: the other TMA entry's twin at D = 64 (a test runs it).
    out.append(instances.bwd_sm90("f16", 64, "tma2", dq=False))
    out += [instances.bwd_sm90_dq(tn, d) for tn in instances.TYPES for d in (64, 128)]
    out += [instances.sm90(tn, d, flash_sm90.CONFIGS[d]) for tn in instances.TYPES
            for d in (64, 128)]
    out += [instances.sm90(tn, 64, flash_sm90.MODS_CONFIGS[64], True) for tn in instances.TYPES]
    for d, mods in ((64, False), (128, False), (64, True)):
        cfg = flash_sm90.block_mask_config(d, (128, 128), mods)
        out.append(instances.sm90("f16", d, cfg, mods, True))
    return out


def _build_one(item):
    source, name, defines = item
    from xattn._backends.cupy_._compile import compiled_function

    t0 = time.time()
    try:
        compiled_function(source, name, defines, 0)
        return f"{name}: {time.time() - t0:.1f} s"
    except Exception as exc:  # noqa: BLE001 - reported; the caller's launch raises again
        return f"{name}: FAILED {type(exc).__name__}: {str(exc)[:200]}"


def precompile(workers=None):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from xattn._backends.cupy_ import _compile

    workers = workers or os.cpu_count() or 8
    t0 = time.time()
    insts = _sm90_instances()
    for src in sorted({i.source for i in insts}):
        _compile.precompile(src, [(i.name, i.defines, i.includes) for i in insts
                                  if i.source == src], workers)
    _log(f"precompile: {len(insts)} sm_90a cubins in {time.time() - t0:.1f} s")
    t1 = time.time()
    todo = [(i.source, i.name, i.defines) for i in _mma_sync_instances()]
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                             mp_context=mp.get_context("spawn")) as ex:
        for line in ex.map(_build_one, todo):
            if "FAILED" in line:
                _log(line)
    _log(f"precompile: {len(todo)} mma.sync modules in {time.time() - t1:.1f} s")
    return 0


# --- inputs and timing -----------------------------------------------------------------------

class Bench:
    def __init__(self, reps):
        import cupy as cp
        import torch

        import xattn

        self.cp, self.torch, self.xattn, self.reps = cp, torch, xattn, reps
        try:
            from triton.testing import do_bench

            self.do_bench = do_bench
        except Exception:  # noqa: BLE001 - CUDA events instead
            self.do_bench = None
        try:
            import ml_dtypes

            self.bf16 = ml_dtypes.bfloat16
        except ImportError:
            self.bf16 = None

    def ms(self, fn):
        if self.do_bench is not None:
            return float(self.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        cp = self.cp
        for _ in range(2):
            fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(self.reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
        return float(np.median(times))

    def to_cupy(self, t):
        """Zero-copy CuPy view of a torch CUDA tensor (bfloat16 through an int16 view)."""
        cp, torch = self.cp, self.torch
        if t.dtype == torch.bfloat16:
            try:
                return cp.from_dlpack(t)
            except Exception:  # noqa: BLE001 - CuPy without bfloat16 DLPack import
                return cp.from_dlpack(t.view(torch.int16)).view(self.bf16)
        return cp.from_dlpack(t)

    def rel(self, x, y):
        cp = self.cp
        y = cp.asarray(y).astype(cp.float32)
        return float(cp.abs(x.astype(cp.float32) - y).max()) / max(1e-6, float(cp.abs(y).max()))

    def to_torch32(self, x):
        return self.torch.from_dlpack(self.cp.ascontiguousarray(x.astype(self.cp.float32)))


def _equal_bits(cp, a, b):
    return all(bool((x.view(cp.uint16) == y.view(cp.uint16)).all())
               for x, y in zip(a, b, strict=True))


def _parts(bench, prob, do, q, k, v, out, lse):
    """The new route's two kernels as separate callables (dK/dV, dq), on the row's inputs
    (contiguous (B, H, S, D), plain problem): the same launches as flash_bwd_sm90._backward."""
    cp = bench.cp
    from xattn._backends.cupy_ import _params, flash_bwd, instances
    from xattn._backends.cupy_ import flash_bwd_sm90 as k90b
    from xattn._backends.cupy_._compile import compiled_function

    tn, d = _params.type_name(prob.dtype), prob.d
    b, hq, hkv, sq, sk = int(np.prod(prob.batch)), prob.hq, prob.hkv, prob.sq, prob.sk
    dq4, dk4, dv4 = cp.empty_like(q), cp.empty_like(k), cp.empty_like(v)
    delta = cp.empty((b, hq, sq), dtype=cp.float32)
    flash_bwd.run_delta(tn, out, do, delta, d)
    config = k90b.check_config(prob, None, True)
    main = k90b.get_kernel(tn, d, config, dq=False)
    i32, f32 = np.int32, np.float32
    args = (*k90b.tma_maps(q, k, v, do), q, k, v, do, lse, delta, np.uint64(0), dk4, dv4,
            i32(hq), i32(prob.group), i32(sq), i32(sk), f32(prob.scale), i32(prob.causal))
    smem = k90b.smem_bytes(d, config, False)
    opt, bm = _params.option_args(cp, prob), _params.block_mask_args(cp, prob, csc=True)
    dq_cfg = k90b.dq_config(prob)

    def dkdv():
        main(grid=k90b.grid(b, hkv, sk), block=(k90b.THREADS,), args=args, shared_mem=smem)

    def dq():
        flash_bwd.run_dq(tn, prob, d, dq_cfg, (q, k, v, do, lse, delta, dq4, dk4, dv4), opt,
                         bm)

    inst = instances.bwd_sm90_dq(tn, d)
    wdq = compiled_function(inst.source, inst.name, inst.defines, k90b.dq_smem_bytes(d),
                            arch=inst.arch)

    def dq_wgmma():
        wdq(grid=((sq + k90b.DQ_ROWS - 1) // k90b.DQ_ROWS, hq, b), block=(k90b.THREADS,),
            args=(q, k, v, do, lse, delta, dq4, i32(hq), i32(prob.group), i32(sq), i32(sk),
                  f32(prob.scale), i32(prob.causal)),
            shared_mem=k90b.dq_smem_bytes(d))

    return dkdv, dq, dq_wgmma


def _row(bench, dt, d, s, causal):
    """{column: TFLOP/s or ms, or a string saying why there is none}."""
    cp, torch, xattn = bench.cp, bench.torch, bench.xattn
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_bwd_sm90 as k90b

    b, h = 16384 // s, 2048 // d
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    gen = torch.Generator(device="cuda").manual_seed(7 * s + d)
    tq, tk, tv, tdo = (torch.randn(b, h, s, d, device="cuda", dtype=tdt, generator=gen)
                       for _ in range(4))
    q, k, v, do = (bench.to_cupy(t) for t in (tq, tk, tv, tdo))
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                              causal=causal)
    flops = 2.5 * 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    res = {"names": " + ".join(k90b.kernel_names(prob, True)[1:])}

    def tf(ms):
        return flops / (ms * 1e-3) / 1e12

    def run(backend, det):
        return xattn.flash_attention_backward(do, q, k, v, out, lse, causal=causal,
                                              deterministic=det, backend=backend)

    def run_w():
        return k90b.backward(prob, do, q, k, v, out, lse, deterministic=True, dq_kernel="wgmma")

    _log(f"{dt} D={d} S={s} causal={causal}: checks ...")
    new, again = run(ENTRY, True), run(ENTRY, True)
    old, nondet = run("cupy.sm80", True), run(ENTRY, False)
    try:
        w, w2 = run_w(), run_w()
        eps = 2.0 ** -10 if dt == "fp16" else 2.0 ** -7
        wdiff = bench.rel(w[0], new[0])
        wok = (_equal_bits(cp, w, w2) and _equal_bits(cp, w[1:], new[1:])
               and np.isfinite(wdiff) and wdiff <= 2 * eps)
        res["wgmma_check"] = f"repeat/dkdv equal, dq rel diff vs mma dq {wdiff:.2g}"
        if not wok:
            res["wgmma"] = f"FAIL ({res['wgmma_check']}; repeat {_equal_bits(cp, w, w2)})"
        del w, w2
    except Exception as exc:  # noqa: BLE001 - the column says what broke
        res["wgmma"] = f"ERROR {type(exc).__name__}: {str(exc)[:80]}"
    _log(f"  wgmma dq: {res.get('wgmma_check', res.get('wgmma'))}")
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (tq, tk, tv))
    o_t = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)

    def grad_t():
        return torch.autograd.grad(o_t, (qg, kg, vg), tdo, retain_graph=True)

    gt = grad_t()
    torch.cuda.synchronize()
    checks = {"repeat": _equal_bits(cp, new, again),
              "dq == old dq": _equal_bits(cp, new[:1], old[:1]),
              "dk/dv == non-det": _equal_bits(cp, new[1:], nondet[1:])}
    err = max(bench.rel(x, cp.from_dlpack(g.detach().float().contiguous()))
              for x, g in zip(new, gt, strict=True))
    checks["vs torch"] = bool(np.isfinite(err) and err <= 2e-2)
    res["err"] = err
    _log(f"  checks {checks}, max rel diff vs torch {err:.3g}")
    bad = [name for name, ok in checks.items() if not ok]
    del again, old, nondet
    if bad:
        res["new"] = f"FAIL ({', '.join(bad)})"
    for col, fn in (("new", lambda: run(ENTRY, True)), ("wgmma", run_w),
                    ("old", lambda: run("cupy.sm80", True)),
                    ("nondet", lambda: run(ENTRY, False)), ("torch", grad_t)):
        if col in res:
            continue
        try:
            res[col] = tf(bench.ms(fn))
        except Exception as exc:  # noqa: BLE001 - a row says what broke
            res[col] = f"ERROR {type(exc).__name__}: {str(exc)[:80]}"
        _log(f"  {col}: {res[col]}")
    try:
        dkdv, dq, dq_w = _parts(bench, prob, do, q, k, v, out, lse)
        res["dkdv_ms"], res["dq_ms"] = bench.ms(dkdv), bench.ms(dq)
        res["dqw_ms"] = bench.ms(dq_w)
        _log(f"  dK/dV kernel {res['dkdv_ms']:.3f} ms, dq kernel {res['dq_ms']:.3f} ms, "
             f"wgmma dq kernel {res['dqw_ms']:.3f} ms")
    except Exception as exc:  # noqa: BLE001
        res["dkdv_ms"] = res["dq_ms"] = f"ERROR {type(exc).__name__}: {str(exc)[:60]}"
    del new, gt
    return res


def sanitizer_workload():
    """One tiny deterministic backward per _nodq entry kind (fp16: the TMA entries at D 64 /
    128, causal, GQA, Sq != Sk off the tiles, several query steps per key block; win, mods,
    bm, mods_bm), and the dq kernel after each."""
    import cupy as cp

    import xattn

    rng = np.random.default_rng(0)

    def arr(*shape):
        return cp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(cp.float16)

    cases = [("tma", 64, {}), ("tma2", 128, {}), ("win", 64, {"window": (40, 3)}),
             ("mods", 64, {"softcap": 5.0}),
             ("bm", 128, {"block_mask": xattn.BlockMask.causal(200, 150, block_size=128)}),
             ("mods_bm", 64, {"block_mask": xattn.BlockMask.causal(200, 150, block_size=128),
                              "softcap": 5.0})]
    for name, d, opts in cases:
        q, do = arr(1, 4, 200, d), arr(1, 4, 200, d)
        k, v = arr(1, 2, 150, d), arr(1, 2, 150, d)
        causal = "block_mask" not in opts
        out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True, **opts)
        g = xattn.flash_attention_backward(do, q, k, v, out, lse, causal=causal,
                                           deterministic=True, backend=ENTRY, **opts)
        cp.cuda.Device().synchronize()
        print(f"{name} D={d}: finite={all(bool(cp.isfinite(x).all()) for x in g)}", flush=True)
    # The wgmma dq kernel (plain requests), D 64 and 128.
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_bwd_sm90 as k90b

    for d in (64, 128):
        q, do = arr(1, 4, 200, d), arr(1, 4, 200, d)
        k, v = arr(1, 2, 150, d), arr(1, 2, 150, d)
        out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
        prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                                  causal=True)
        g = k90b.backward(prob, do, q, k, v, out, lse, deterministic=True, dq_kernel="wgmma")
        cp.cuda.Device().synchronize()
        print(f"wgmma dq D={d}: finite={all(bool(cp.isfinite(x).all()) for x in g)}",
              flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=70.0, help="seconds; later rows skipped")
    ap.add_argument("--s", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--causal", action="store_true", help="also the causal rows")
    ap.add_argument("--san", action="store_true", help="the sanitizer workload only")
    ap.add_argument("--precompile", action="store_true", help="build the kernels only")
    args = ap.parse_args(argv)
    # The route under test is behind its switch until this check has passed on a GPU.
    from xattn._backends.cupy_ import instances

    instances.SM90_BWD_DETERMINISTIC_ON = True
    if args.precompile:
        return precompile()
    if args.san:
        return sanitizer_workload()
    t_start = time.time()
    bench = Bench(args.reps)
    cp = bench.cp
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    specs = [(dt, d, False) for dt in ("fp16", "bf16") for d in (128, 64)]
    if args.causal:
        specs += [(dt, d, True) for dt in ("fp16", "bf16") for d in (128, 64)]
    rows = []
    for dt, d, causal in specs:
        if time.time() - t_start > args.budget:
            rows.append((dt, d, causal, {"new": "skipped (budget)"}))
            continue
        try:
            rows.append((dt, d, causal, _row(bench, dt, d, args.s, causal)))
        except Exception as exc:  # noqa: BLE001 - the row says what broke, the next one runs
            rows.append((dt, d, causal, {"new": f"ERROR {type(exc).__name__}: "
                                                f"{str(exc)[:100]}"}))
        bench.torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()

    def fmt(x, nd=0):
        return f"{x:.{nd}f}" if isinstance(x, float) else str(x)

    def ratio(x, y):
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"

    print(f"\n### deterministic=True backward, S={args.s}, B*S=16384, H*D=2048, TFLOP/s "
          f"({dev}; 2.5x fwd FLOPs, causal halved; whole backward; "
          f"{'do_bench' if bench.do_bench else 'CUDA events'})\n")
    print("new = cupy.sm90_bwd (wgmma dK/dV _nodq + mma.sync dq kernel: the default), "
          "+wgmma dq = the same with dq_kernel='wgmma', old = cupy.sm80 (mma.sync dK/dV + the "
          "mma.sync dq kernel), non-det = cupy.sm90_bwd default; kernel times alone in ms\n")
    print("| dtype | D | causal | new | +wgmma dq | old | non-det | torch | new/torch | "
          "+wgmma/torch | old/torch | new/old | dK/dV ms | dq ms | wgmma dq ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dt, d, causal, r in rows:
        n, w, o, nd, t = (r.get(c, "-") for c in ("new", "wgmma", "old", "nondet", "torch"))
        print(f"| {dt} | {d} | {causal} | {fmt(n)} | {fmt(w)} | {fmt(o)} | {fmt(nd)} | "
              f"{fmt(t)} | {ratio(n, t)} | {ratio(w, t)} | {ratio(o, t)} | {ratio(n, o)} | "
              f"{fmt(r.get('dkdv_ms', '-'), 3)} | {fmt(r.get('dq_ms', '-'), 3)} | "
              f"{fmt(r.get('dqw_ms', '-'), 3)} |")
    checks = [f"{dt} D={d}: {r['wgmma_check']}" for dt, d, _, r in rows if "wgmma_check" in r]
    if checks:
        print("\nwgmma dq checks: " + "; ".join(checks))
    names = [r["names"] for *_, r in rows if "names" in r]
    if names:
        print(f"\nkernels of the new route (first row): {names[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
