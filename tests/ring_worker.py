"""Run under ``mpiexec -n P``: ring attention against single-process flash attention.

``python ring_worker.py MODE [DIR]`` writes its report lines to ``DIR/rank<r>.txt`` too.
``python ring_worker.py equal``: every case of ``CASES`` on every rank; each rank prints one
``RESULT <json>`` line per case with the largest errors, and exits 1 if one exceeds the
tolerance. ``python ring_worker.py mismatch|raise|invalid|absent``: a rank misbehaves; every
rank must raise, and prints ``RAISED <type> <message>`` (exit 0) or ``NO ERROR`` (exit 1).
"""

from __future__ import annotations

import json
import sys

import numpy as np

import xattn
from xattn.distributed import ring_attention, ring_attention_backward, shard, unshard

TOL = {"float64": 1e-10, "float32": 2e-5}
S_PER_RANK = 24  # small: the point is the masking at chunk borders, not the speed

# (name, layout, options, (Hq, Hkv), D, Dv); options "dtype" (default float64) and "no_heads"
# (2-D (seq, head_dim) inputs) shape the inputs themselves.
CASES = [
    ("full", "contiguous", {}, (2, 2), 8, 8),
    ("causal", "contiguous", {"causal": True}, (2, 2), 8, 8),
    ("zigzag", "zigzag", {}, (2, 2), 8, 8),
    ("zigzag causal", "zigzag", {"causal": True}, (2, 2), 8, 8),
    ("window", "contiguous", {"window": (7, 17)}, (2, 2), 8, 8),
    ("causal window", "contiguous", {"causal": True, "window": (30, None)}, (2, 2), 8, 8),
    ("zigzag window", "zigzag", {"window": (5, 13)}, (2, 2), 8, 8),
    ("zigzag causal window", "zigzag", {"causal": True, "window": (9, 0)}, (2, 2), 8, 8),
    ("gqa causal", "contiguous", {"causal": True}, (4, 2), 8, 8),
    ("mqa zigzag causal", "zigzag", {"causal": True}, (4, 1), 8, 6),
    ("alibi softcap scale", "contiguous",
     {"alibi": True, "softcap": 3.0, "scale": 0.3}, (2, 2), 8, 8),
    ("zigzag causal window alibi gqa", "zigzag",
     {"causal": True, "window": (11, 4), "alibi": True}, (4, 2), 8, 8),
    ("window alibi", "contiguous", {"window": (20, 3), "alibi": True}, (2, 1), 8, 8),
    ("2-d zigzag causal alibi", "zigzag", {"causal": True, "alibi": True, "no_heads": True},
     (1, 1), 8, 8),
    ("float32 zigzag causal window gqa", "zigzag",
     {"causal": True, "window": (15, 0), "dtype": "float32"}, (4, 2), 16, 16),
]


REPORT = []


def report(line):
    """One line for the test: into this rank's file (the ranks' stdout interleave)."""
    REPORT.append(line)
    print(line, flush=True)


def _inputs(size, hq, hkv, d, dv, seed=0, dtype="float64", no_heads=False):
    rng = np.random.default_rng(seed)
    s = S_PER_RANK * size
    lead_q, lead_kv = ((), ()) if no_heads else ((2, hq), (2, hkv))
    q = rng.standard_normal((*lead_q, s, d))
    k = rng.standard_normal((*lead_kv, s, d))
    v = rng.standard_normal((*lead_kv, s, dv))
    dout = rng.standard_normal((*lead_q, s, dv))
    return tuple(x.astype(dtype) for x in (q, k, v, dout))


def equal(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    failed = False
    for name, layout, opts, (hq, hkv), d, dv in CASES:
        opts = dict(opts)
        dtype, no_heads = opts.pop("dtype", "float64"), opts.pop("no_heads", False)
        if opts.pop("alibi", False):
            opts["alibi_slopes"] = xattn.alibi_slopes(hq, dtype=np.float64)
        q, k, v, dout = _inputs(size, hq, hkv, d, dv, dtype=dtype, no_heads=no_heads)
        ref, ref_lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
        rq, rk, rv = xattn.flash_attention_backward(dout, q, k, v, ref, ref_lse, **opts)
        loc = [shard(x, comm, layout=layout) for x in (q, k, v, dout)]
        out, lse = ring_attention(*loc[:3], comm, layout=layout, return_lse=True, **opts)
        dq, dk, dv_ = ring_attention_backward(loc[3], *loc[:3], out, lse, comm, layout=layout,
                                              **opts)
        errs = {
            "out": _err(out, shard(ref, comm, layout=layout)),
            "lse": _err(lse, shard(ref_lse, comm, layout=layout, axis=-1)),
            "dq": _err(dq, shard(rq, comm, layout=layout)),
            "dk": _err(dk, shard(rk, comm, layout=layout)),
            "dv": _err(dv_, shard(rv, comm, layout=layout)),
            "unshard": _err(unshard(out, comm, layout=layout), ref),
        }
        ok = (all(e <= TOL[dtype] for e in errs.values()) and out.dtype == q.dtype
              and (dq.dtype, dk.dtype, dv_.dtype) == (q.dtype,) * 3)
        failed |= not ok
        report("RESULT " + json.dumps({"rank": rank, "case": name, "dtype": dtype, "ok": ok,
                                       **errs}))
    return 1 if failed else 0


def _err(a, b):
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


HALF_CASES = [
    ("causal", "contiguous", {"causal": True}, (2, 2)),
    ("zigzag causal window gqa alibi", "zigzag",
     {"causal": True, "window": (40, 0), "alibi": True}, (4, 2)),
]


def half(comm, xp_name):
    """float16 ring attention against the float64 oracle, at twice the error of a naive
    float16 implementation (flash-attn's criterion), on NumPy or (``cupy``) on the GPU."""
    from xattn.testing import (
        assert_close,
        naive_attention,
        naive_attention_backward,
        reference_attention,
        reference_attention_backward,
    )

    if xp_name == "cupy":
        import cupy as xp

        xp.cuda.Device(0).use()  # the ranks share one GPU
    else:
        xp = np
    rank, size = comm.Get_rank(), comm.Get_size()
    failed = False
    for name, layout, opts, (hq, hkv) in HALF_CASES:
        opts = dict(opts)
        if opts.pop("alibi", False):
            opts["alibi_slopes"] = xattn.alibi_slopes(hq, dtype=np.float32)
        q, k, v, dout = _inputs(size * 4, hq, hkv, 32, 32, dtype="float16")
        ref, _, _ = reference_attention(q, k, v, **opts)
        naive = naive_attention(q, k, v, **opts)
        grads = reference_attention_backward(dout, q, k, v, **opts)
        naive_grads = naive_attention_backward(dout, q, k, v, naive.astype(np.float16), **opts)
        dev_opts = {key: (xp.asarray(val) if isinstance(val, np.ndarray) else val)
                    for key, val in opts.items()}
        loc = [xp.asarray(shard(x, comm, layout=layout)) for x in (q, k, v, dout)]
        out, lse = ring_attention(*loc[:3], comm, layout=layout, return_lse=True, **dev_opts)
        got = ring_attention_backward(loc[3], *loc[:3], out, lse, comm, layout=layout,
                                      **dev_opts)
        errors = []
        checks = [("out", out, ref, naive)] + [
            (gname, g, r, n) for gname, g, r, n in zip(("dq", "dk", "dv"), got, grads,
                                                        naive_grads, strict=True)]
        for what, actual, reference, naive_ref in checks:
            try:
                assert_close(actual, shard(reference, comm, layout=layout), xp=xp,
                             dtype=np.float16, naive=shard(naive_ref, comm, layout=layout),
                             name=what)
            except AssertionError as exc:
                errors.append(str(exc))
        failed |= bool(errors)
        report("RESULT " + json.dumps({"rank": rank, "case": name, "dtype": "float16",
                                       "ok": not errors, "errors": errors}))
    return 1 if failed else 0


def misbehave(comm, how):
    rank, size = comm.Get_rank(), comm.Get_size()
    q, k, v, _ = _inputs(size, 2, 2, 8, 8)
    loc = [shard(x, comm) for x in (q, k, v)]
    opts = {"causal": True}
    if how == "mismatch" and rank == size - 1:
        opts = {"causal": False}
    if how == "invalid" and rank == size - 1:
        loc[1] = loc[1][..., :4]  # k head_dim differs from q's: rejected by validation
    if how == "raise" and rank == size - 1:
        import xattn.distributed as dist

        calls = []

        def failing(*args, **kwargs):  # this rank's second block fails mid-ring
            calls.append(1)
            if len(calls) == 2:
                raise FloatingPointError("staged failure in a block computation")
            return xattn.flash_attention(*args, **kwargs)

        dist.flash_attention = failing
    if how == "absent" and rank == size - 1:
        report("RAISED nothing: this rank stays out of the call")
        return 0
    try:
        ring_attention(*loc, comm, timeout=3 if how == "absent" else 30, **opts)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report(f"RAISED {type(exc).__name__} {exc}")
        return 0
    report("NO ERROR")
    return 1


if __name__ == "__main__":
    from mpi4py import MPI  # here, not above: pytest's doctest collection imports this file

    mode = sys.argv[1]
    world = MPI.COMM_WORLD
    if mode == "equal":
        rc = equal(world)
    elif mode.startswith("half"):  # half or half-cupy
        rc = half(world, mode.partition("-")[2] or "numpy")
    else:
        rc = misbehave(world, mode)
    if len(sys.argv) > 2:
        with open(f"{sys.argv[2]}/rank{world.Get_rank()}.txt", "w") as f:
            f.write("\n".join(REPORT) + "\n")
    sys.exit(rc)
