"""xattn.flash_attention on the CPU beside PyTorch's scaled_dot_product_attention, same run.

Usage (torch is a benchmark-only dependency: ``pip install torch==2.13.0``, never unpinned)::

    python benchmarks/cpu_flash_vs_torch.py                      # S = 1024, 4096; fwd + bwd
    python benchmarks/cpu_flash_vs_torch.py -S 4096 --repeats 7 --no-backward
    python benchmarks/cpu_flash_vs_torch.py --memory 16384       # peak extra memory only

Each row checks xattn's result against torch (and, for small S, the float64 reference)
before timing. xattn and torch are timed alternately, ``--repeats`` pairs after a warm-up;
the table shows the median time of each and the median of the per-pair ratios, which is
less sensitive to other processes loading the machine than a ratio of medians.
FLOPs (flash-attn convention): forward ``4 B H Sq Sk D`` (half when causal), backward 2.5x
forward; the backward time is that of the gradient alone (xattn's
``flash_attention_backward``; torch's autograd backward with the forward subtracted).
``--memory S`` measures, in a fresh subprocess, the peak memory that ``flash_attention``
allocates beyond its inputs and output: tracemalloc (NumPy allocations) and peak RSS
(everything, numba's buffers and thread stacks included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

try:
    import xattn
except ImportError:  # run from a clone without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import xattn


def _flops(b, h, s, d, causal, op):
    f = 4.0 * b * h * s * s * d / (2 if causal else 1)
    return f * (2.5 if op == "bwd" else 1.0)


def _inputs(b, h, s, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, h, s, d), dtype=np.float32) for _ in range(4))


def _pairs(fx, ft, repeats):
    """Alternate xattn/torch calls; returns (x times, torch times)."""
    fx()
    ft()
    tx, tt = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fx()
        t1 = time.perf_counter()
        ft()
        t2 = time.perf_counter()
        tx.append(t1 - t0)
        tt.append(t2 - t1)
    return tx, tt


def bench_row(torch, b, h, s, d, causal, backend, repeats, backward):
    import torch.nn.functional as F

    q, k, v, dout = _inputs(b, h, s, d)
    tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, dout))

    def x_fwd():
        return xattn.flash_attention(q, k, v, causal=causal, backend=backend, return_lse=True)

    def t_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    out, lse = x_fwd()
    ref = t_fwd().numpy()
    err = float(np.abs(out - ref).max())
    if err > 1e-4:
        raise SystemExit(f"S={s} causal={causal}: xattn differs from torch by {err:.3g}")
    rows = []
    tx, tt = _pairs(x_fwd, t_fwd, repeats)
    rows.append(("fwd", tx, tt, err))
    if backward:
        def x_bwd():
            return xattn.flash_attention_backward(
                dout, q, k, v, out, lse, causal=causal, backend=backend
            )

        def t_fwd_bwd():
            a, bb, c = (x.detach().requires_grad_() for x in (tq, tk, tv))
            o = F.scaled_dot_product_attention(a, bb, c, is_causal=causal)
            o.backward(tdo)
            return a.grad, bb.grad, c.grad

        grads = x_bwd()
        tgrads = t_fwd_bwd()
        scale = max(float(np.abs(g.numpy()).max()) for g in tgrads)
        gerr = max(
            float(np.abs(g - t.numpy()).max()) for g, t in zip(grads, tgrads, strict=True)
        ) / scale
        if gerr > 1e-4:
            raise SystemExit(f"S={s} causal={causal}: xattn gradients differ from torch "
                             f"by {gerr:.3g} (relative to the largest)")
        bx, bt = _pairs(x_bwd, t_fwd_bwd, repeats)
        # torch's time includes its forward: subtract the median forward of the same run.
        fwd_t = statistics.median(tt)
        rows.append(("bwd", bx, [t - fwd_t for t in bt], gerr))
    return rows


def _memory_child(s, h, d, causal, backend):
    """Runs in a fresh interpreter: prints a JSON line with the peak extra memory."""
    import resource
    import tracemalloc

    b = 1
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, s, d), dtype=np.float32) for _ in range(3))
    # Warm up on a small problem so numba's compilation does not count as the kernel's memory.
    xattn.flash_attention(q[..., :256, :], k[..., :256, :], v[..., :256, :], causal=causal,
                          backend=backend)
    out_bytes = q.nbytes
    peak_reset = _reset_peak_rss()
    rss0 = _status_kib("VmRSS") * 1024
    hwm0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    out = xattn.flash_attention(q, k, v, causal=causal, backend=backend)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # VmHWM: the resident high-water mark, reset just before the call where Linux allows it
    # (otherwise the process's earlier peak may hide part of the call's).
    hwm1 = _status_kib("VmHWM") * 1024
    del out
    print(json.dumps(dict(
        tracemalloc_extra=peak - out_bytes,
        rss_extra=hwm1 - rss0 - out_bytes,
        peak_reset=peak_reset, earlier_peak_above_start=max(hwm0 - rss0, 0), seconds=dt,
    )))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(s, h, d, causal, backend):
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", str(s), "--heads",
           str(h), "--head-dim", str(d), "--backend", backend, "--causal",
           "yes" if causal else "no"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"memory measurement failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-S", "--seq", type=int, nargs="+", default=[1024, 4096],
                   help="sequence lengths (Sq = Sk); default 1024 4096")
    p.add_argument("--heads", type=int, default=8, help="query = kv heads (default 8)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim D (default 64)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed xattn/torch pairs (default 5)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--backend", default="numba", help="xattn CPU backend (default numba)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the CPUs this process may use, like xattn)")
    p.add_argument("--memory", type=int, nargs="*", default=None, metavar="S",
                   help="only measure peak extra memory of flash_attention at these S "
                        "(default 16384 when given without values)")
    p.add_argument("--_memory-child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    if a._memory_child is not None:
        _memory_child(a._memory_child, a.heads, a.head_dim, a.causal == "yes", a.backend)
        return

    if a.memory is not None:
        for s in a.memory or [16384]:
            for causal in causals:
                r = measure_memory(s, a.heads, a.head_dim, causal, a.backend)
                print(f"memory S={s} H={a.heads} D={a.head_dim} causal={causal}: "
                      f"tracemalloc +{r['tracemalloc_extra'] / 2**20:.1f} MiB, "
                      f"peak RSS +{r['rss_extra'] / 2**20:.1f} MiB beyond inputs and output "
                      f"({r['seconds']:.2f} s"
                      + ("" if r["peak_reset"] else "; peak RSS could not be reset: a lower bound")
                      + ")")
        return

    try:
        import torch
    except ImportError:
        raise SystemExit("torch is the comparator: pip install torch==2.13.0") from None
    from xattn._backends.numpy_ import _pool

    nthreads = a.threads or _pool.num_threads()
    torch.set_num_threads(nthreads)
    print(f"# fp32 B={a.batch} H={a.heads} D={a.head_dim}; xattn backend={a.backend} "
          f"({_pool.num_threads()} threads), torch {torch.__version__} ({nthreads} threads); "
          f"median of {a.repeats} alternating pairs; load average {os.getloadavg()[0]:.2f}")
    header = (f"{'S':>6} {'causal':>6} {'op':>3} {'xattn ms':>9} {'torch ms':>9} "
              f"{'xattn GF/s':>10} {'torch GF/s':>10} {'ratio':>6} {'max err':>8}")
    print(header)
    for s in a.seq:
        for causal in causals:
            for op, tx, tt, err in bench_row(torch, a.batch, a.heads, s, a.head_dim, causal,
                                              a.backend, a.repeats, not a.no_backward):
                fl = _flops(a.batch, a.heads, s, a.head_dim, causal, op)
                mx, mt = statistics.median(tx), statistics.median(tt)
                ratio = statistics.median(t / x for x, t in zip(tx, tt, strict=True))
                print(f"{s:>6} {causal!s:>6} {op:>3} {mx * 1e3:>9.1f} {mt * 1e3:>9.1f} "
                      f"{fl / mx / 1e9:>10.1f} {fl / mt / 1e9:>10.1f} {ratio:>6.2f} "
                      f"{err:>8.1e}", flush=True)


if __name__ == "__main__":
    main()
