"""Flex attention forward on the CPU: user score/mask functions compiled with numba.njit.

Jobs of (batch*head, query block) are split over a thread pool (the kernel releases the GIL;
``parallel=True`` would cost seconds more compile time for every pair of user functions);
inside a job the query tile meets each
key tile with one BLAS matmul, then a compiled loop applies ``mask_mod``/``score_mod`` per element
and folds the tile into an online softmax. BLAS is kept to one thread while the jobs run
(threadpoolctl) because a multi-threaded BLAS inside parallel jobs oversubscribes the cores.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import lru_cache

import numpy as np

# Query rows and keys per tile: 64 x 256 scores (64 KiB in float32) stay in L2.
BLOCK_Q = 64
BLOCK_K = 256


@lru_cache(maxsize=64)
def build_kernel(score_mod, mask_mod):
    """Compile (once per pair of user functions) the CPU forward kernel."""
    import numba

    smod = numba.njit(inline="always")(score_mod)
    mmod = numba.njit(inline="always")(mask_mod)

    @numba.njit(nogil=True)
    def kernel(q, k, v, out, lse, scale, hq, hkv, job0, job1):
        sq = q.shape[1]
        sk, dv = k.shape[1], v.shape[2]
        group = hq // hkv
        nqb = (sq + BLOCK_Q - 1) // BLOCK_Q
        for job in range(job0, job1):
            bh = job // nqb
            q0 = (job - bh * nqb) * BLOCK_Q
            q1 = min(q0 + BLOCK_Q, sq)
            b = bh // hq
            h = bh - b * hq
            bkv = b * hkv + h // group
            qt = np.ascontiguousarray(q[bh, q0:q1]) * scale
            m = np.full(q1 - q0, -np.inf, dtype=q.dtype)
            denom = np.zeros(q1 - q0, dtype=q.dtype)
            acc = np.zeros((q1 - q0, dv), dtype=q.dtype)
            for k0 in range(0, sk, BLOCK_K):
                k1 = min(k0 + BLOCK_K, sk)
                s = qt @ np.ascontiguousarray(k[bkv, k0:k1]).T
                for r in range(q1 - q0):
                    i = q0 + r
                    row_max = -np.inf
                    for c in range(k1 - k0):
                        j = k0 + c
                        if mmod(b, h, i, j):
                            s[r, c] = smod(s[r, c], b, h, i, j)
                        else:
                            s[r, c] = -np.inf
                        row_max = max(row_max, s[r, c])
                    m_new = max(m[r], row_max)
                    if m_new == -np.inf:
                        s[r, :] = 0.0
                        continue
                    alpha = math.exp(m[r] - m_new)
                    total = 0.0
                    for c in range(k1 - k0):
                        p = math.exp(s[r, c] - m_new)
                        s[r, c] = p
                        total += p
                    denom[r] = denom[r] * alpha + total
                    acc[r] *= alpha
                    m[r] = m_new
                acc += s @ np.ascontiguousarray(v[bkv, k0:k1])
            for r in range(q1 - q0):
                if denom[r] > 0:
                    out[bh, q0 + r] = acc[r] / denom[r]
                    lse[bh, q0 + r] = m[r] + math.log(denom[r])
                else:
                    out[bh, q0 + r] = 0.0
                    lse[bh, q0 + r] = -np.inf

    return kernel


def launch(q3, k3, v3, out3, lse2, *, scale, hq, hkv, score_mod, mask_mod):
    """Run on ``(B*H, S, D)`` float32/float64 NumPy arrays, writing ``out3`` and ``lse2``."""
    kernel = build_kernel(score_mod, mask_mod)
    njobs = q3.shape[0] * -(-q3.shape[1] // BLOCK_Q)
    workers = max(1, min(os.cpu_count() or 1, njobs))
    # Contiguous job ranges, a few per worker so that uneven rows still balance.
    cuts = np.linspace(0, njobs, 4 * workers + 1).astype(int)
    args = (q3, k3, v3, out3, lse2, q3.dtype.type(scale), hq, hkv)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it BLAS keeps its own threads: slower, still correct
        threadpool_limits = None
    limiter = threadpool_limits(limits=1, user_api="blas") if threadpool_limits else nullcontext()
    with limiter, ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda c: kernel(*args, cuts[c], cuts[c + 1]), range(len(cuts) - 1)))
