"""xattn flash attention on CuPy beside torch SDPA on the same card, in the same run.

Usage (on a CUDA machine with CuPy, torch and triton)::

    python3 benchmarks/gpu_flash.py [--quick] [--tf32] [--sm90] [--budget SECONDS]
                                    [--no-flex] [--configs] [--only JOB,...]
    python3 benchmarks/gpu_flash.py --table-from OUT/gpu_flash.json   # re-print the table

Every row is checked before it is timed, then timed with ``triton.testing.do_bench`` (CUDA
events, L2 flushed between repeats, median); xattn (``backend="cupy"``: the RawKernels, never a
silent fallback) and torch run in the same process on the same inputs (torch tensors shared with
CuPy through DLPack). Shapes: B*S = 16384 and Hq*D = 2048, fp16/bf16, D in {64, 128},
S in {1024, 4096, 16384}, causal and not; forward rows also at D = 256, S = 4096 (issue 11's
"every fwd row with S >= 4096, D 64/128/256"). Row sets (jobs, run in this order of priority):

- ``fwd``: forward beside torch SDPA's default (cuDNN on Hopper) and its FLASH_ATTENTION
  backend (FlashAttention-2); fp32 (``backend="cupy"``: the strict SIMT kernel) beside torch's
  mem-efficient backend.
  Checked against float64 on head (0, 0) (first 1024 queries) and against torch.
- ``bwd``: ``flash_attention_backward(..., backend="cupy")`` (and ``deterministic=True`` for
  fp16 D=128 S=4096) beside ``torch.autograd.grad(out, (q, k, v), dout)`` of SDPA run under each
  backend. Nothing is subtracted from either time: torch's backward time includes its own small
  preprocess (the ``rowsum(dout * out)`` pass), ours includes the delta preprocess kernel, the
  zeroing of the float32 dq accumulator and the dq conversion. Checked against torch's
  gradients on the same inputs (max abs error over all heads) and against a float64 oracle
  computed on the GPU for head (0, 0).
- ``sm90`` (``--sm90``): the Hopper wgmma forward (``backend="cupy.sm90"``) beside the
  mma.sync kernel (``backend="cupy.sm80"``) and torch.
- ``tf32`` (``--tf32``): float32 with ``allow_tf32=True`` beside the strict float32 kernel,
  torch's SDPA default and its math backend, both with TF32 matmuls allowed.
- ``fp32`` (``--only ...,fp32``): float32, D in {64, 128}, S=4096: the 3xTF32 kernel
  (``cupy.tf32x3``) beside the strict SIMT kernel (``cupy.simt``, note column) and torch's
  float32 SDPA default (mem-efficient, no TF32) and math backend; the errors of all three against
  float64 on head (0, 0) in the note; with ``--configs`` every compiled 3xTF32 tile
  configuration of the head dim is timed too.
- ``window``: sliding window S=65536 +-256, D=64, 16 heads (issue 11's row), fp16, forward and
  backward, beside FlexAttention (``torch.compile``-d; ``--no-flex`` leaves it out).
- ``fwd-rest``, ``bwd-rest``: S = 1024 and 16384 (not with ``--quick``).

FLOPs (flash-attn convention): forward ``4 B Hq Sq Sk D``, backward 2.5 times that
(``10 B Hq Sq Sk D``: the backward's four matmuls -- dV, dP, dQ, dK -- plus the recomputation of
S, each ``2 B Hq Sq Sk D``), half of either for causal with Sq == Sk; the window counts only the
visible (query, key) pairs.

Robustness: the rows run in a worker process; a row that raises reports its error in the table;
a worker that crashes, loses its CUDA context or hangs (no result within ``--row-timeout``
seconds) is killed and a fresh one continues with the next row. ``--budget`` (default 360 s)
bounds the whole run: rows not started in time are printed as skipped. The table (markdown, to
paste into docs/dev/perf_gpu.rst) is printed last; JSON, the table and the log go to ``$OUT``
when set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION_ORDER = ("fwd", "fp32", "tf32x3", "bwd", "sm90", "tf32", "window")
SECTION_LEGEND = {
    "fwd": "forward, backend='cupy' (note: the kernel-table entry that served it); default = "
           "torch SDPA "
           "default (cuDNN on Hopper), flash = its FLASH_ATTENTION backend (FA2)",
    "fp32": "float32 forward, backend='cupy' (note: the entry that served it); default = "
            "torch mem-efficient",
    "tf32x3": "float32 forward at float32 accuracy: xattn = cupy.tf32x3 (3xTF32); default = "
              "torch SDPA fp32 default (TF32 off), flash = torch math backend (TF32 off); "
              "note: strict SIMT kernel (cupy.simt) TFLOP/s and the max errors vs float64",
    "bwd": "backward (2.5x forward FLOPs, nothing subtracted); torch columns: autograd.grad "
           "of SDPA under that backend",
    "sm90": "Hopper wgmma forward (cupy.sm90); note: the mma.sync kernel (cupy.sm80) in the "
            "same run",
    "tf32": "float32 allow_tf32=True; default = torch SDPA default, flash = torch math "
            "backend, both with TF32 matmuls allowed; note: strict kernel, errors",
    "window": "sliding window S=65536 +-256, useful FLOPs only; flash column = FlexAttention "
              "(torch.compile)",
}


# --------------------------------------------------------------------------------------------
# The plan: which rows, in which order (shared by the orchestrator and its workers).

def _matrix(section, seqs, dtypes=("fp16", "bf16"), dims=(64, 128)):
    rows = []
    for dt in dtypes:
        for d in dims:
            for s in seqs:
                for causal in (False, True):
                    rows.append({"section": section, "dtype": dt, "D": d, "S": s,
                                 "causal": causal})
                    if (section == "bwd" and dt == "fp16" and d == 128 and s == 4096
                            and not causal):
                        rows.append({"section": section, "dtype": dt, "D": d, "S": s,
                                     "causal": False, "deterministic": True})
    return rows


def row_key(spec):
    if spec["section"] == "window":
        return f"window-{spec['pass']}"
    key = (f"{spec['section']}-{spec['dtype']}-D{spec['D']}-S{spec['S']}-"
           f"{'causal' if spec['causal'] else 'full'}")
    return key + ("-det" if spec.get("deterministic") else "")


def row_case(spec):
    if spec["section"] == "window":
        return f"window {spec['pass']} fp16 D=64 H=16 S=65536 +-256"
    c = "causal" if spec["causal"] else "full"
    det = " deterministic" if spec.get("deterministic") else ""
    what = {"fp32": "fwd", "sm90": "fwd sm90", "tf32": "fwd tf32",
            "tf32x3": "fwd tf32x3"}.get(spec["section"], spec["section"])
    return f"{what} {spec['dtype']} D={spec['D']} S={spec['S']} {c}{det}"


def plan(args):
    """``[(job, [row spec, ...]), ...]`` in the order they run."""
    rest = () if args.quick else (1024, 16384)
    jobs = [
        ("fwd", _matrix("fwd", (4096,)) + _matrix("fwd", (4096,), dims=(256,))
         + [{"section": "fp32", "dtype": "fp32", "D": 64, "S": 4096, "causal": False},
            {"section": "fp32", "dtype": "fp32", "D": 128, "S": 4096, "causal": True}]),
        ("bwd", _matrix("bwd", (4096,))
         + [{"section": "bwd", "dtype": "fp32", "D": 64, "S": 4096, "causal": False},
            {"section": "bwd", "dtype": "fp32", "D": 128, "S": 4096, "causal": True}]),
    ]
    if args.sm90:
        jobs.append(("sm90", _matrix("sm90", (4096,), dims=(64, 128, 256))))
    # Not in the default run: --only fp32 (the check of issue 11's fp32 row).
    if args.only and "fp32" in args.only.split(","):
        jobs.append(("fp32", _matrix("tf32x3", (4096,), dtypes=("fp32",))))
    if args.tf32:
        jobs.append(("tf32", _matrix("tf32", (4096,), dtypes=("fp32",))))
    jobs.append(("window", [{"section": "window", "pass": "fwd"},
                            {"section": "window", "pass": "bwd"}]))
    if rest:
        jobs.append(("fwd-rest", _matrix("fwd", rest)))
        jobs.append(("bwd-rest", _matrix("bwd", rest)))
    if args.only:
        wanted = set(args.only.split(","))
        jobs = [(j, rows) for j, rows in jobs if j in wanted]
    for _, rows in jobs:
        for spec in rows:
            spec["key"] = row_key(spec)
            spec["case"] = row_case(spec)
    return jobs


def _named(values):
    dq, dk, dv = values
    return {"dq": dq, "dk": dk, "dv": dv}


# --------------------------------------------------------------------------------------------
# The worker: runs rows and appends one JSON line per event to the parts file.

class Worker:
    def __init__(self, args):
        import cupy as cp
        import torch

        self.args = args
        self.cp, self.torch = cp, torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.F, self.SDPBackend, self.sdpa_kernel = F, SDPBackend, sdpa_kernel
        try:
            from triton.testing import do_bench

            self._do_bench = do_bench
        except ImportError:
            self._do_bench = None
        import numpy as np

        self.np = np
        try:
            import ml_dtypes

            self.bf16 = np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            self.bf16 = None
        sys.path.insert(0, str(ROOT))
        import xattn

        self.xattn = xattn
        self.parts = Path(args.parts)
        self.deadline = args.deadline

    # ---- plumbing
    def emit(self, obj):
        with self.parts.open("a") as f:
            f.write(json.dumps(obj) + "\n")

    def bench_ms(self, fn):
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=25, rep=100, return_mode="median"))
        cp = self.cp
        fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(20):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
        return float(sorted(times)[len(times) // 2])

    def alive(self):
        try:
            self.cp.cuda.runtime.deviceSynchronize()
            self.torch.cuda.synchronize()
            return float(self.cp.ones(4, dtype=self.cp.float32).sum()) == 4.0
        except Exception:  # noqa: BLE001 - a sticky CUDA error: the context is gone
            return False

    def to_cupy(self, t):
        """Zero-copy CuPy view of a torch CUDA tensor (bfloat16 through an int16 view)."""
        cp, torch = self.cp, self.torch
        if t.dtype == torch.bfloat16:
            try:
                return cp.from_dlpack(t)
            except Exception:  # noqa: BLE001 - CuPy without bfloat16 DLPack import
                return cp.from_dlpack(t.view(torch.int16)).view(self.bf16)
        return cp.from_dlpack(t)

    def to_torch32(self, x):
        return self.torch.from_dlpack(self.cp.ascontiguousarray(x.astype(self.cp.float32)))

    def inputs(self, dt, shape, seed, n=3):
        torch = self.torch
        tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(*shape, device="cuda", dtype=tdt, generator=gen) for _ in range(n)]

    def free(self):
        self.torch.cuda.empty_cache()
        self.cp.get_default_memory_pool().free_all_blocks()

    # ---- float64 oracle on the GPU for one head
    def oracle(self, q, k, v, dout=None, *, causal=False, window=None, rows=None, keys=None):
        """Float64 forward (and backward with ``dout``) of one head: 2-d torch tensors.

        ``rows``/``keys`` restrict to the first queries/keys (a sub-problem that is exact for
        the outputs it covers, see the callers). Causal is top-left = bottom-right here
        (square problems only).
        """
        torch = self.torch
        q, k, v = (x.double() for x in (q, k, v))
        if rows is not None:
            q = q[:rows]
            if dout is not None:
                dout = dout[:rows]
        if keys is not None:
            k, v = k[:keys], v[:keys]
        scale = 1.0 / math.sqrt(q.shape[-1])
        s = (q @ k.T) * scale
        i = torch.arange(q.shape[0], device=q.device)[:, None]
        j = torch.arange(k.shape[0], device=q.device)[None, :]
        vis = torch.ones_like(s, dtype=torch.bool)
        if causal:
            vis &= j <= i
        if window is not None:
            vis &= (j >= i - window[0]) & (j <= i + window[1])
        s = s.masked_fill(~vis, -math.inf)
        p = torch.softmax(s, dim=-1)
        del s
        out = p @ v
        if dout is None:
            return out
        do = dout.double()
        dv = p.T @ do
        dp = do @ v.T
        delta = (do * out).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        del dp
        return out, (scale * (ds @ k), scale * (ds.T @ q), dv)

    @staticmethod
    def maxerr(a, b):
        return float((a.double() - b.double()).abs().max())

    # ---- rows
    def run(self, spec):
        res = {"key": spec["key"], "section": spec["section"], "case": spec["case"],
               "note": ""}
        t0 = time.time()
        try:
            getattr(self, "row_" + spec["section"])(spec, res)
        except Exception as exc:  # noqa: BLE001 - report in the table, go on
            res["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
            print(f"  {spec['case']}: ERROR\n{traceback.format_exc()}", flush=True)
        res["seconds"] = round(time.time() - t0, 1)
        return res

    def say_row(self, res):
        parts = [f"{k} {res[k]:.1f}" for k in ("xattn", "default", "flash") if k in res]
        print(f"  {res['case']}: {', '.join(parts)} TFLOP/s; {res.get('note', '')}",
              flush=True)

    def _sdpa_backends(self, dt):
        B = self.SDPBackend
        if dt == "fp32":
            return [("default", B.EFFICIENT_ATTENTION)]
        return [("default", None), ("flash", B.FLASH_ATTENTION)]

    def _time_torch_fwd(self, res, q, k, v, causal, fl, dt):
        F, torch = self.F, self.torch
        with torch.no_grad():
            for col, backend in self._sdpa_backends(dt):
                try:
                    if backend is None:
                        ms = self.bench_ms(
                            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                    else:
                        with self.sdpa_kernel(backend):
                            ms = self.bench_ms(
                                lambda: F.scaled_dot_product_attention(q, k, v,
                                                                       is_causal=causal))
                    res[col] = fl / ms / 1e9
                except RuntimeError as exc:
                    res["note"] += f" torch {col}: {str(exc)[:60]};"

    def _check_fwd(self, res, out_x, q, k, v, causal, out_t=None, window=None, rows=1024):
        """Max |error| on head (0, 0), first ``rows`` queries, of xattn (and torch)."""
        o = self.oracle(q[0, 0], k[0, 0], v[0, 0], causal=causal, window=window, rows=rows)
        r = o.shape[0]
        ex = self.maxerr(self.to_torch32(out_x[0, 0, :r]), o)
        res["err_xattn"] = ex
        if out_t is not None:
            et = self.maxerr(out_t[0, 0, :r], o)
            res["err_torch"] = et
            ok = math.isfinite(ex) and ex <= 2 * max(et, 1e-3) + 2e-3
        else:
            ok = math.isfinite(ex) and ex < 3e-2
        res["ok"] = bool(ok)
        return ok

    def row_fwd(self, spec, res):
        dt, d, s, causal = spec["dtype"], spec["D"], spec["S"], spec["causal"]
        b, h = 16384 // s, 2048 // d
        q, k, v = self.inputs(dt, (b, h, s, d), s + d)
        qc, kc, vc = (self.to_cupy(x) for x in (q, k, v))
        xattn, F = self.xattn, self.F

        def run():
            return xattn.flash_attention(qc, kc, vc, causal=causal, backend="cupy")

        out_x = run()
        from xattn import _backends
        from xattn._array import validate_attention

        route = _backends.explain(validate_attention(qc, kc, vc, causal=causal), {}, "cupy")
        res["note"] += f" {route['backend']};"
        with self.torch.no_grad():
            out_t = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ok = self._check_fwd(res, out_x, q, k, v, causal, out_t)
        res["note"] += (f" err {res['err_xattn']:.1e} (torch {res['err_torch']:.1e})"
                        + ("" if ok else " CHECK FAILED") + ";")
        fl = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        res["xattn_ms"] = self.bench_ms(run)
        res["xattn"] = fl / res["xattn_ms"] / 1e9
        self._time_torch_fwd(res, q, k, v, causal, fl, dt)
        if self.args.configs and dt == "fp16":
            self._configs(res, qc, kc, vc, causal, out_x, fl)

    row_fp32 = row_fwd

    CANDIDATES = {64: [(4, 1, 64), (4, 2, 64), (8, 2, 64)],
                  128: [(4, 1, 64), (4, 2, 32), (8, 2, 32), (4, 2, 64)]}

    def _configs(self, res, qc, kc, vc, causal, out_x, fl):
        from xattn._array import validate_attention
        from xattn._backends.cupy_ import flash as ck

        prob = validate_attention(qc, kc, vc, causal=causal)
        res["configs"] = {}
        for cfg in self.CANDIDATES.get(qc.shape[-1], ()):
            try:
                o, _ = ck.forward(prob, qc, kc, vc, config=cfg)
                err = float(self.cp.abs(o.astype("f4") - out_x.astype("f4")).max())
                ms = self.bench_ms(lambda cfg=cfg: ck.forward(prob, qc, kc, vc, config=cfg))
                res["configs"][str(cfg)] = {"tflops": fl / ms / 1e9, "maxdiff": err}
                print(f"    config {cfg}: {fl / ms / 1e9:.1f} TFLOP/s (maxdiff {err:.1e})")
            except Exception as exc:  # noqa: BLE001 - report and go on
                res["configs"][str(cfg)] = {"error": str(exc)[:200]}
                print(f"    config {cfg}: failed: {exc}")

    def _torch_grads(self, q, k, v, dout, causal, backend):
        torch, F = self.torch, self.F
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        if backend is None:
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        else:
            with self.sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)

        def grad():
            return torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True)

        return o, grad

    def row_bwd(self, spec, res):
        dt, d, s, causal = spec["dtype"], spec["D"], spec["S"], spec["causal"]
        det = bool(spec.get("deterministic"))
        b, h = 16384 // s, 2048 // d
        q, k, v, dout = self.inputs(dt, (b, h, s, d), 7 * s + d, n=4)
        qc, kc, vc, doc = (self.to_cupy(x) for x in (q, k, v, dout))
        xattn = self.xattn
        out_x, lse_x = xattn.flash_attention(qc, kc, vc, causal=causal, return_lse=True,
                                             backend="cupy")

        def run():
            return xattn.flash_attention_backward(doc, qc, kc, vc, out_x, lse_x, causal=causal,
                                                  deterministic=det, backend="cupy")

        gx = run()
        self.cp.cuda.Device().synchronize()
        if det:  # the route of the -det row: the table entry and the kernels it launches
            from xattn import _backends
            from xattn._array import validate_attention
            from xattn._backends.cupy_ import flash_bwd_sm90

            prob = validate_attention(qc, kc, vc, extra=(("dout", doc), ("out", out_x),
                                                         ("lse", lse_x)), causal=causal)
            entry = _backends.explain(prob, {"deterministic": True}, "cupy",
                                      op="backward")["backend"]
            kernels = (" (" + " + ".join(flash_bwd_sm90.kernel_names(prob, True)[1:]) + ")"
                       if entry == "cupy.sm90_bwd" else "")
            res["note"] += f" {entry}{kernels};"
        # Against torch's default-backend gradients, every head.
        o_t, grad_t = self._torch_grads(q, k, v, dout, causal, None)
        gt = grad_t()
        res["grad_fn"] = o_t.grad_fn.name() if o_t.grad_fn is not None else "?"
        gx32 = [self.to_torch32(g) for g in gx]
        vs_torch = [self.maxerr(a, b_) for a, b_ in zip(gx32, gt, strict=True)]
        res["maxdiff_vs_torch"] = _named(vs_torch)
        # Against float64 on head (0, 0).
        _, ref = self.oracle(q[0, 0], k[0, 0], v[0, 0], dout[0, 0], causal=causal)
        ex = [self.maxerr(g[0, 0], r) for g, r in zip(gx32, ref, strict=True)]
        et = [self.maxerr(g[0, 0], r) for g, r in zip(gt, ref, strict=True)]
        mag = [float(r.abs().max()) for r in ref]
        del ref, gx32
        res["err_xattn"] = _named(ex)
        res["err_torch"] = _named(et)
        ok = all(math.isfinite(a) and a <= 2 * t + 2e-3 * m
                 for a, t, m in zip(ex, et, mag, strict=True))
        res["ok"] = bool(ok)
        worst = max(range(3), key=lambda i: ex[i] / max(mag[i], 1e-30))
        name = ("dq", "dk", "dv")[worst]
        res["note"] += (f" err {name} {ex[worst]:.1e} (torch {et[worst]:.1e})"
                        + ("" if ok else " CHECK FAILED") + ";")
        if d == 128 and s == 4096 and dt == "fp16":
            again = run()
            cp = self.cp
            same = all(bool(cp.array_equal(a.view(cp.uint16), b_.view(cp.uint16)))
                       for a, b_ in zip(gx, again, strict=True))
            res["bitwise_repeat"] = same
            res["note"] += f" repeat {'bitwise equal' if same else 'differs'};"
            del again
        fl = 10.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        res["xattn_ms"] = self.bench_ms(run)
        res["xattn"] = fl / res["xattn_ms"] / 1e9
        del gx, gt
        for col, backend in self._sdpa_backends(dt):
            try:
                o, grad = self._torch_grads(q, k, v, dout, causal, backend)
                res[col] = fl / self.bench_ms(grad) / 1e9
                res[f"grad_fn_{col}"] = o.grad_fn.name()
                del o, grad
            except RuntimeError as exc:
                res["note"] += f" torch {col}: {str(exc)[:60]};"

    def row_sm90(self, spec, res):
        from xattn import _backends
        from xattn._array import validate_attention
        from xattn._backends.cupy_ import flash_sm90 as mod

        dt, d, s, causal = spec["dtype"], spec["D"], spec["S"], spec["causal"]
        b, h = 16384 // s, 2048 // d
        q, k, v = self.inputs(dt, (b, h, s, d), s + d)
        qc, kc, vc = (self.to_cupy(x) for x in (q, k, v))
        prob = validate_attention(qc, kc, vc, causal=causal)
        xattn = self.xattn
        reason = _backends.explain(prob, {}, "cupy.sm90")["reasons"]["cupy.sm90"]
        if reason:
            raise NotImplementedError(f"cupy.sm90 refuses: {reason}")

        def fn():
            return xattn.flash_attention(qc, kc, vc, causal=causal, backend="cupy.sm90")

        def sm80():
            return xattn.flash_attention(qc, kc, vc, causal=causal, backend="cupy.sm80")

        out_x = fn()
        ok = self._check_fwd(res, out_x, q, k, v, causal)
        res["note"] += f" err {res['err_xattn']:.1e}" + ("" if ok else " CHECK FAILED") + ";"
        fl = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        res["xattn_ms"] = self.bench_ms(fn)
        res["xattn"] = fl / res["xattn_ms"] / 1e9
        if self.args.configs:
            res["configs"] = {}
            for cfg in sorted(c[1:] for c in mod.BUILT if c[0] == d):
                try:
                    o, _ = mod.forward(prob, qc, kc, vc, config=cfg)
                    diff = float(self.cp.abs(o.astype("f4") - out_x.astype("f4")).max())
                    ms = self.bench_ms(lambda cfg=cfg: mod.forward(prob, qc, kc, vc, config=cfg))
                    res["configs"][str(cfg)] = {"tflops": fl / ms / 1e9, "maxdiff": diff}
                    print(f"    sm90 config {cfg}: {fl / ms / 1e9:.1f} TFLOP/s "
                          f"(maxdiff {diff:.1e})")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    res["configs"][str(cfg)] = {"error": str(exc)[:200]}
        ms80 = self.bench_ms(sm80)
        res["sm80"] = fl / ms80 / 1e9
        res["note"] += f" mma.sync {res['sm80']:.1f};"
        self._time_torch_fwd(res, q, k, v, causal, fl, dt)

    def row_tf32(self, spec, res):
        torch, F, xattn = self.torch, self.F, self.xattn
        d, s, causal = spec["D"], spec["S"], spec["causal"]
        b, h = 16384 // s, 2048 // d
        q, k, v = self.inputs("fp32", (b, h, s, d), s + d + 1)
        qc, kc, vc = (self.to_cupy(x) for x in (q, k, v))

        def tf32():
            return xattn.flash_attention(qc, kc, vc, causal=causal, allow_tf32=True,
                                         backend="cupy.tf32")

        def strict():
            return xattn.flash_attention(qc, kc, vc, causal=causal, backend="cupy.simt")

        out_tf = tf32()
        self._check_fwd(res, out_tf, q, k, v, causal)
        e_tf = res["err_xattn"]
        o = self.oracle(q[0, 0], k[0, 0], v[0, 0], causal=causal, rows=1024)
        e_st = self.maxerr(self.to_torch32(strict()[0, 0, :1024]), o)
        res["err_strict"] = e_st
        # TF32 (10-bit mantissa) errors are ~1e-3; ~1e-6 means the strict kernel ran.
        res["ok"] = bool(math.isfinite(e_tf) and e_tf < 2e-2)
        used = "TF32 kernel ran" if e_tf > 20 * e_st else "looks like the STRICT kernel ran"
        res["note"] += f" err tf32 {e_tf:.1e} strict {e_st:.1e} ({used});"
        fl = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        res["xattn_ms"] = self.bench_ms(tf32)
        res["xattn"] = fl / res["xattn_ms"] / 1e9
        res["strict"] = fl / self.bench_ms(strict) / 1e9
        res["note"] += f" strict {res['strict']:.1f};"
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            with torch.no_grad():
                res["default"] = fl / self.bench_ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)) / 1e9
                try:
                    with self.sdpa_kernel(self.SDPBackend.MATH):
                        res["flash"] = fl / self.bench_ms(
                            lambda: F.scaled_dot_product_attention(q, k, v,
                                                                   is_causal=causal)) / 1e9
                except RuntimeError as exc:
                    res["note"] += f" torch math: {str(exc)[:60]};"
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    def row_tf32x3(self, spec, res):
        from xattn._array import validate_attention
        from xattn._backends.cupy_ import flash_tf32x3, instances

        torch, F, xattn = self.torch, self.F, self.xattn
        d, s, causal = spec["D"], spec["S"], spec["causal"]
        b, h = 16384 // s, 2048 // d
        q, k, v = self.inputs("fp32", (b, h, s, d), s + d + 3)
        qc, kc, vc = (self.to_cupy(x) for x in (q, k, v))

        def x3():
            return xattn.flash_attention(qc, kc, vc, causal=causal, backend="cupy.tf32x3")

        def strict():
            return xattn.flash_attention(qc, kc, vc, causal=causal, backend="cupy.simt")

        out_x3 = x3()
        o = self.oracle(q[0, 0], k[0, 0], v[0, 0], causal=causal, rows=1024)
        mag = float(o.abs().max())
        e_x3 = self.maxerr(self.to_torch32(out_x3[0, 0, :1024]), o)
        e_st = self.maxerr(self.to_torch32(strict()[0, 0, :1024]), o)
        fl = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        e_t = float("nan")
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's float32 at float32 accuracy
        try:
            with torch.no_grad():
                e_t = self.maxerr(F.scaled_dot_product_attention(
                    q[:1, :1], k[:1, :1], v[:1, :1], is_causal=causal)[0, 0, :1024], o)
                for col, backend in (("default", None), ("flash", self.SDPBackend.MATH)):
                    def sdpa():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                    try:
                        if backend is None:
                            res[col] = fl / self.bench_ms(sdpa) / 1e9
                        else:
                            with self.sdpa_kernel(backend):
                                res[col] = fl / self.bench_ms(sdpa) / 1e9
                    except RuntimeError as exc:
                        res["note"] += f" torch {col}: {str(exc)[:60]};"
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        res.update(err_xattn=e_x3, err_strict=e_st, err_torch=e_t, max_out=mag,
                   rel_err_xattn=e_x3 / mag)
        # Issue 11's bar: <= 1e-5 relative to max |out| against float64.
        res["ok"] = bool(math.isfinite(e_x3) and e_x3 <= 1e-5 * mag)
        res["note"] += (f" err x3 {e_x3:.1e} (rel {e_x3 / mag:.1e}) simt {e_st:.1e} torch "
                        f"{e_t:.1e}" + ("" if res["ok"] else " CHECK FAILED") + ";")
        res["xattn_ms"] = self.bench_ms(x3)
        res["xattn"] = fl / res["xattn_ms"] / 1e9
        res["strict"] = fl / self.bench_ms(strict) / 1e9
        res["note"] += f" simt {res['strict']:.1f};"
        if self.args.configs:
            prob = validate_attention(qc, kc, vc, causal=causal)
            res["configs"] = {}
            for cfg in (instances.TF32X3[d], *instances.TF32X3_EXTRA.get(d, ())):
                try:
                    def run(cfg=cfg):
                        return flash_tf32x3.forward(prob, qc, kc, vc, config=cfg)

                    diff = float(self.cp.abs(run()[0] - out_x3).max())
                    tf = fl / self.bench_ms(run) / 1e9
                    res["configs"][str(cfg)] = {"tflops": tf, "maxdiff": diff}
                    res["note"] += f" {cfg}: {tf:.1f};"
                    print(f"    tf32x3 config {cfg}: {tf:.1f} TFLOP/s (maxdiff {diff:.1e})")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    res["configs"][str(cfg)] = {"error": str(exc)[:200]}
                    res["note"] += f" {cfg}: failed;"

    def row_window(self, spec, res, s=65536, w=256, d=64, h=16):
        torch, xattn = self.torch, self.xattn
        backward = spec["pass"] == "bwd"
        q, k, v, dout = self.inputs("fp16", (1, h, s, d), 1, n=4)
        qc, kc, vc, doc = (self.to_cupy(x) for x in (q, k, v, dout))
        pairs = sum(min(s, i + w + 1) - max(0, i - w) for i in range(s))
        fl = 4.0 * h * d * pairs * (2.5 if backward else 1.0)
        win = (w, w)
        if not backward:
            def run():
                return xattn.flash_attention(qc, kc, vc, window=win, backend="cupy")

            out_x = run()
            self._check_fwd(res, out_x, q, k, v, False, window=win)
            res["note"] += f" err {res['err_xattn']:.1e};"
        else:
            out_x, lse_x = xattn.flash_attention(qc, kc, vc, window=win, return_lse=True,
                                                 backend="cupy")

            def run():
                return xattn.flash_attention_backward(doc, qc, kc, vc, out_x, lse_x,
                                                      window=win, backend="cupy")

            gx = [self.to_torch32(g) for g in run()]
            # Queries < 1024 see keys < 1024 + w only, and keys < 1024 - w are seen by
            # queries < 1024 only: the sub-problem gives exact dq[:1024], dk/dv[:1024 - w].
            r = 1024
            _, ref = self.oracle(q[0, 0], k[0, 0], v[0, 0], dout[0, 0], window=win, rows=r,
                                 keys=r + w)
            cut = (r, r - w, r - w)
            ex = [self.maxerr(g[0, 0, :c], rr[:c])
                  for g, rr, c in zip(gx, ref, cut, strict=True)]
            mag = [float(rr.abs().max()) for rr in ref]
            res["err_xattn"] = _named(ex)
            res["ok"] = bool(all(math.isfinite(e) and e <= 2e-2 * m + 1e-3
                                 for e, m in zip(ex, mag, strict=True)))
            res["note"] += (f" err dq/dk/dv {ex[0]:.0e}/{ex[1]:.0e}/{ex[2]:.0e}"
                            + ("" if res["ok"] else " CHECK FAILED") + ";")
            del gx, ref
        res["xattn_ms"] = self.bench_ms(run)
        res["xattn"] = fl / res["xattn_ms"] / 1e9
        res["note"] += f" {res['xattn_ms']:.3f} ms;"
        if self.args.no_flex:
            return
        # torch.compile of FlexAttention takes tens of seconds: only with time left.
        if time.time() + (120 if backward else 60) > self.deadline:
            res["note"] += " flex skipped (budget);"
            return
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def mask_mod(b, hh, qi, kj):
                return (kj - qi <= w) & (qi - kj <= w)

            bm = create_block_mask(mask_mod, None, None, s, s, device="cuda")
            fa = torch.compile(flex_attention)
            if not backward:
                with torch.no_grad():
                    fa(q, k, v, block_mask=bm)
                    msf = self.bench_ms(lambda: fa(q, k, v, block_mask=bm))
            else:
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                o = fa(qg, kg, vg, block_mask=bm)

                def grad():
                    return torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True)

                grad()
                msf = self.bench_ms(grad)
            res["flash"] = fl / msf / 1e9
            res["note"] += f" flex {msf:.3f} ms;"
        except Exception as exc:  # noqa: BLE001 - FlexAttention missing or failing
            res["note"] += f" flex unavailable: {type(exc).__name__}: {str(exc)[:80]};"

    # ---- main loop
    def main(self, rows):
        torch, cp = self.torch, self.cp
        self.emit({"env": {"card": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "cupy": cp.__version__,
                           "cc": str(cp.cuda.Device().compute_capability),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}})
        for spec in rows:
            if time.time() + 3 > self.deadline:
                self.emit({"key": spec["key"], "section": spec["section"],
                           "case": spec["case"], "skipped": "budget"})
                continue
            self.emit({"start": spec["key"], "t": time.time()})
            res = self.run(spec)
            self.emit(res)
            if "error" in res:
                print(f"  {spec['case']}: {res['error']}", flush=True)
            else:
                self.say_row(res)
            self.free()
            if "error" in res and not self.alive():
                print("  CUDA context lost: a fresh worker takes the remaining rows",
                      flush=True)
                return 3
        return 0


def worker_main(args):
    jobs = dict(plan(args))
    done = _done_keys(Path(args.parts))
    rows = [r for j in args.worker.split(",") for r in jobs.get(j, ()) if r["key"] not in done]
    return Worker(args).main(rows)


# --------------------------------------------------------------------------------------------
# The orchestrator: runs workers, watches for hangs, prints the table.

def _read_parts(path):
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


def _done_keys(path):
    return {e["key"] for e in _read_parts(path) if "key" in e}


def _append(path, obj):
    with path.open("a") as f:
        f.write(json.dumps(obj) + "\n")


def _row_timeout(args, key):
    return args.row_timeout * (3 if key.startswith("window") else 1)


def orchestrate(args):
    t_start = time.time()
    deadline = t_start + args.budget
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = out_dir / "gpu_flash_parts.jsonl"
    parts.unlink(missing_ok=True)
    jobs = plan(args)
    all_rows = [r for _, rows in jobs for r in rows]
    print(f"gpu_flash: {len(all_rows)} rows in jobs {[j for j, _ in jobs]}, budget "
          f"{args.budget:.0f} s", flush=True)
    job_names = [j for j, _ in jobs]
    launches = 0
    while True:
        done = _done_keys(parts)
        todo = [j for j, rows in jobs if any(r["key"] not in done for r in rows)]
        if not todo:
            break
        if time.time() + 5 > deadline or launches >= 12:
            why = "budget" if time.time() + 5 > deadline else "too many worker restarts"
            for r in all_rows:
                if r["key"] not in done:
                    _append(parts, {"key": r["key"], "section": r["section"],
                                    "case": r["case"], "skipped": why})
            break
        n_before = len(done)
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:],
               "--worker", ",".join(todo), "--parts", str(parts), "--deadline", str(deadline)]
        launches += 1
        proc = subprocess.Popen(cmd, start_new_session=True)
        killed = None
        while proc.poll() is None:
            time.sleep(0.5)
            events = _read_parts(parts)
            started = {e["start"]: e["t"] for e in events if "start" in e}
            finished = {e["key"] for e in events if "key" in e}
            running = [(k, t) for k, t in started.items() if k not in finished]
            now = time.time()
            for k, t in running:
                if now - t > _row_timeout(args, k):
                    killed = (k, f"killed: no result after {now - t:.0f} s (hung kernel?)")
            if killed is None and now > deadline + 30:
                killed = (running[0][0] if running else None, "killed: past the budget")
            if killed is not None:
                os.killpg(proc.pid, 9)
                proc.wait()
                break
        rc = proc.returncode
        events = _read_parts(parts)
        started = [e["start"] for e in events if "start" in e]
        finished = {e["key"] for e in events if "key" in e}
        lost = [k for k in started if k not in finished]
        spec = {r["key"]: r for r in all_rows}
        for k in lost:
            why = killed[1] if killed and killed[0] == k else f"worker died (exit {rc})"
            _append(parts, {"key": k, "section": spec[k]["section"], "case": spec[k]["case"],
                            "error": why})
        if len(finished) == n_before and not lost:
            # The worker finished no row (import error, no GPU...): do not loop on it.
            for r in all_rows:
                if r["key"] not in _done_keys(parts):
                    _append(parts, {"key": r["key"], "section": r["section"],
                                    "case": r["case"],
                                    "error": f"worker failed to start (exit {rc}); see log"})
            break
    events = _read_parts(parts)
    env = next((e["env"] for e in events if "env" in e), {"card": "unknown"})
    results = {}
    for e in events:
        if "key" in e:
            results[e["key"]] = e
    ordered = [results[r["key"]] for r in all_rows if r["key"] in results]
    doc = {"env": env, "args": vars(args), "jobs": job_names, "rows": ordered,
           "seconds": round(time.time() - t_start, 1)}
    (out_dir / "gpu_flash.json").write_text(json.dumps(doc, indent=1))
    table = format_table(doc)
    (out_dir / "gpu_flash_table.md").write_text(table + "\n")
    print(f"gpu_flash: {time.time() - t_start:.0f} s; results in {out_dir}", flush=True)
    print("\n" + table, flush=True)
    bad = [r for r in ordered if "error" in r or r.get("ok") is False]
    return 1 if bad else 0


def _fmt(x, nd=1):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def format_table(doc):
    env = doc.get("env", {})
    lines = [f"**{env.get('card', '?')}**, {env.get('date', '?')}, torch {env.get('torch', '?')}, "
             f"cupy {env.get('cupy', '?')}, cc {env.get('cc', '?')}. TFLOP/s: forward "
             "4 B Hq S^2 D, backward 2.5x, half for causal; B*S=16384, Hq*D=2048.", ""]
    rows = doc.get("rows", [])
    sections = [s for s in SECTION_ORDER if any(r.get("section") == s for r in rows)]
    for s in sections:
        lines.append(f"- {s}: {SECTION_LEGEND[s]}")
    lines += ["", "| case | xattn | torch default | torch flash (or Flex) | x/default | x/flash "
              "| note |", "|---|---|---|---|---|---|---|"]
    for s in sections:
        for r in rows:
            if r.get("section") != s:
                continue
            x, t, f = r.get("xattn"), r.get("default"), r.get("flash")
            rt = x / t if x and t else None
            rf = x / f if x and f else None
            if "skipped" in r:
                note = f"skipped ({r['skipped']})"
            elif "error" in r:
                note = "ERROR " + r["error"][:90]
            else:
                note = r.get("note", "").strip().rstrip(";")
            flag = "" if r.get("ok", True) else " **CHECK FAILED**"
            lines.append(f"| {r['case']}{flag} | {_fmt(x)} | {_fmt(t)} | {_fmt(f)} | "
                         f"{_fmt(rt, 2)} | {_fmt(rf, 2)} | {note.replace('|', '/')} |")
    n_err = sum("error" in r for r in rows)
    n_fail = sum(r.get("ok") is False for r in rows)
    n_skip = sum("skipped" in r for r in rows)
    lines.append("")
    lines.append(f"rows: {len(rows)}, errors {n_err}, failed checks {n_fail}, skipped {n_skip}; "
                 f"{doc.get('seconds', '?')} s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="S=4096 only")
    ap.add_argument("--tf32", action="store_true", help="float32 allow_tf32 rows")
    ap.add_argument("--sm90", action="store_true", help="Hopper wgmma forward rows")
    ap.add_argument("--budget", type=float, default=360.0,
                    help="seconds for the whole run; rows not started in time are skipped")
    ap.add_argument("--row-timeout", type=float, default=90.0,
                    help="seconds without a result before a row's worker is killed "
                         "(3x for the window rows, which compile FlexAttention)")
    ap.add_argument("--no-flex", action="store_true", help="leave FlexAttention out")
    ap.add_argument("--flex", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--configs", action="store_true",
                    help="time alternative tile configurations (fp16 forward and fp32 "
                         "3xTF32 rows)")
    ap.add_argument("--only", default="", help="comma-separated jobs: fwd,bwd,sm90,tf32,"
                                               "fp32,window,fwd-rest,bwd-rest")
    ap.add_argument("--table-from", default=None, help="print the table of a saved JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table_from:
        print(format_table(json.loads(Path(args.table_from).read_text())))
        return 0
    if args.worker:
        return worker_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
