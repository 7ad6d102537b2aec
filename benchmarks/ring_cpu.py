"""Ring attention on the CPU over MPI: time per rank and communication overlap at P = 1, 2, 4.

Run from the repository root (needs the ``mpi`` extra)::

    python3 benchmarks/ring_cpu.py                 # S = 16384, H = 4, D = 64, float32
    python3 benchmarks/ring_cpu.py --seq 4096 --repeats 2

The launcher starts ``mpiexec -n P`` on this file for each P. Every rank runs one BLAS/numba
thread. Per configuration and rank it reports, as medians over the repeats:

* ``total``: one ``ring_attention`` call (forward), including the cross-rank check;
* ``compute``: the time in the per-block ``flash_attention`` calls;
* ``waiting``: the time blocked in the transport waiting for a transfer (exposed
  communication, plus waiting for a slower rank);
* ``comm alone``: the same block transfers with no computation (a ring of P - 1 steps);
* ``hidden``: ``1 - waiting / comm alone`` (clipped to [0, 1]): the share of the transfer
  time that the computation covered.

The anchor, in the same run: one process, one thread, ``flash_attention`` on the whole
sequence (``P = 1`` row of each layout). What 2 cores cannot show: with P = 4 the four ranks
time-share two cores, so "total" measures the machine, not the algorithm's scaling; the
transfers go through shared memory, never a network, so the overlap says nothing about
InfiniBand or NVLink.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def worker(args):
    from mpi4py import MPI

    import xattn
    import xattn.distributed as dist
    from xattn import _transport

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    clock = {"compute": 0.0, "wait": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[name] += time.perf_counter() - t0
        return wrapper

    # Measurement hooks (private names on purpose: this is the library's own benchmark).
    dist.flash_attention = timed("compute", xattn.flash_attention)
    _transport._MpiTransport.wait = timed("wait", _transport._MpiTransport.wait)

    rng = np.random.default_rng(0)
    shape = (args.heads, args.seq, args.dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    rows = []
    for label, layout, causal in (("full", "contiguous", False),
                                  ("causal", "contiguous", True),
                                  ("causal", "zigzag", True)):
        loc = [dist.shard(x, comm, layout=layout) for x in (q, k, v)]
        dist.ring_attention(*loc, comm, layout=layout, causal=causal)  # warm-up, compile
        tot, cmp_, wai = [], [], []
        for _ in range(args.repeats):
            clock.update(compute=0.0, wait=0.0)
            comm.Barrier()
            t0 = time.perf_counter()
            dist.ring_attention(*loc, comm, layout=layout, causal=causal)
            tot.append(time.perf_counter() - t0)
            cmp_.append(clock["compute"])
            wai.append(clock["wait"])
        alone = _comm_alone(comm, loc[1], loc[2], args.repeats) if size > 1 else 0.0
        anchor = None
        if size == 1:
            xattn.flash_attention(q, k, v, causal=causal)
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                xattn.flash_attention(q, k, v, causal=causal)
                ts.append(time.perf_counter() - t0)
            anchor = float(np.median(ts))
        rows.append(dict(label=label, layout=layout, P=size, rank=rank,
                         total=float(np.median(tot)), compute=float(np.median(cmp_)),
                         wait=float(np.median(wai)), alone=alone, anchor=anchor))
    everything = comm.gather(rows, root=0)
    if rank == 0:
        print("JSON " + json.dumps([r for part in everything for r in part]), flush=True)


def _comm_alone(comm, k, v, repeats):
    """The ring's block transfers with nothing to compute: P - 1 steps of send/receive."""
    from xattn._transport import transport_for

    t = transport_for(comm, 60.0)
    r, p = t.rank, t.size
    meta = [(k.shape, k.dtype, 10, np), (v.shape, v.dtype, 11, np)]
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        held = (k, v)
        for _step in range(p - 1):
            h = t.post([(x, (r + 1) % p, m[2]) for x, m in zip(held, meta, strict=True)],
                       [(s, d, (r - 1) % p, tag, xp) for s, d, tag, xp in meta])
            held = tuple(t.wait(h))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def launch(args):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = "mpiexec"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", PYTHONPATH=ROOT)
    rows = []
    for p in args.ranks:
        cmd = [mpiexec, "-n", str(p), sys.executable, os.path.abspath(__file__), "--worker",
               "--seq", str(args.seq), "--heads", str(args.heads), "--dim", str(args.dim),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        rows += json.loads(next(ln for ln in out.splitlines() if ln.startswith("JSON "))[5:])
    print(f"S={args.seq} H={args.heads} D={args.dim} float32, one thread per rank, "
          f"{os.cpu_count()} cores; medians of {args.repeats}; seconds")
    print(f"{'case':<20}{'P':>3}{'rank':>5}{'total':>8}{'compute':>9}{'waiting':>9}"
          f"{'comm alone':>12}{'hidden':>8}{'anchor/total':>14}")
    anchors = {(r["label"], r["layout"]): r["anchor"] for r in rows if r["P"] == 1}
    for r in rows:
        hidden = "" if r["P"] == 1 or r["alone"] <= 0 else \
            f"{min(1.0, max(0.0, 1 - r['wait'] / r['alone'])):.0%}"
        ratio = anchors[(r["label"], r["layout"])] / r["total"]
        print(f"{r['label'] + ' ' + r['layout']:<20}{r['P']:>3}{r['rank']:>5}{r['total']:>8.3f}"
              f"{r['compute']:>9.3f}{r['wait']:>9.3f}{r['alone']:>12.4f}{hidden:>8}"
              f"{ratio:>14.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
