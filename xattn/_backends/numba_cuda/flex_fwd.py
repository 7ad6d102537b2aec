"""Flex attention forward on the GPU with Numba CUDA: user score/mask functions in the tile loop.

One thread owns one query row (SIMT, no tensor cores): it keeps its query and its output
accumulator in registers/local memory and walks the keys tile by tile, with the block staging
each key/value tile in shared memory once for all its rows. The user's ``score_mod`` and
``mask_mod`` are compiled as device functions and inlined into the loop, FlexAttention-style.

Also runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on NumPy arrays, which is
how the CPU CI checks it on tiny shapes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ._compat import cuda

# Query rows per block (one per thread): 64 threads keep two warps busy per block while the
# per-thread local arrays below stay affordable.
BLOCK_Q = 64
# Keys staged per step; 32 x MAX_D x 4 B x 2 (k and v) = 32 KiB of shared memory at D = 128.
BLOCK_K = 32
# Largest head dims of the per-thread arrays (compile-time sizes in Numba CUDA).
MAX_D = 128


@lru_cache(maxsize=64)
def build_kernel(score_mod, mask_mod, dtype_name):
    """Compile (once per pair of user functions and dtype) the forward kernel."""
    from numba import float32, float64

    ntype = {"float32": float32, "float64": float64}[dtype_name]
    smod = cuda.jit(device=True)(score_mod)
    mmod = cuda.jit(device=True)(mask_mod)
    neg_inf = -math.inf

    @cuda.jit
    def kernel(q, k, v, out, lse, scale, hq, hkv):
        # q (B*Hq, Sq, D), k (B*Hkv, Sk, D), v (B*Hkv, Sk, Dv), out (B*Hq, Sq, Dv), lse (B*Hq, Sq)
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * BLOCK_Q + tid
        bh = cuda.blockIdx.y
        b = bh // hq
        h = bh - b * hq
        bkv = b * hkv + h // (hq // hkv)
        sq, d = q.shape[1], q.shape[2]
        sk, dv = k.shape[1], v.shape[2]
        active = i < sq

        ks = cuda.shared.array((BLOCK_K, MAX_D), ntype)
        vs = cuda.shared.array((BLOCK_K, MAX_D), ntype)
        qreg = cuda.local.array(MAX_D, ntype)
        acc = cuda.local.array(MAX_D, ntype)
        sc = cuda.local.array(BLOCK_K, ntype)
        m = neg_inf
        denom = 0.0
        for c in range(dv):
            acc[c] = 0.0
        if active:
            for c in range(d):
                qreg[c] = q[bh, i, c] * scale

        for k0 in range(0, sk, BLOCK_K):
            tk = min(BLOCK_K, sk - k0)
            # Stage the key/value tile cooperatively (strided by the block, coalesced along D).
            for idx in range(tid, tk * d, BLOCK_Q):
                r = idx // d
                ks[r, idx - r * d] = k[bkv, k0 + r, idx - r * d]
            for idx in range(tid, tk * dv, BLOCK_Q):
                r = idx // dv
                vs[r, idx - r * dv] = v[bkv, k0 + r, idx - r * dv]
            # The tile must be complete before any row reads it.
            cuda.syncthreads()
            if active:
                # Scores of this row against the tile, user functions applied, then one
                # online-softmax rescale per tile instead of one per key.
                m_tile = neg_inf
                for r in range(tk):
                    j = k0 + r
                    s = neg_inf
                    if mmod(b, h, i, j):
                        s = 0.0
                        for c in range(d):
                            s += qreg[c] * ks[r, c]
                        s = smod(s, b, h, i, j)
                    sc[r] = s
                    m_tile = max(m_tile, s)
                m_new = max(m, m_tile)
                if m_new != neg_inf:
                    alpha = math.exp(m - m_new)
                    denom *= alpha
                    for c in range(dv):
                        acc[c] *= alpha
                    for r in range(tk):
                        p = math.exp(sc[r] - m_new)
                        denom += p
                        for c in range(dv):
                            acc[c] += p * vs[r, c]
                    m = m_new
            # Every row is done with the tile before the next iteration overwrites it.
            cuda.syncthreads()

        if active:
            if denom > 0.0:
                for c in range(dv):
                    out[bh, i, c] = acc[c] / denom
                lse[bh, i] = m + math.log(denom)
            else:
                for c in range(dv):
                    out[bh, i, c] = 0.0
                lse[bh, i] = neg_inf

    return kernel


def launch(q3, k3, v3, out3, lse2, *, scale, hq, hkv, score_mod, mask_mod, stream_ptr=None):
    """Run the kernel on ``(B*H, S, D)`` device (or, under the simulator, host) arrays.

    ``stream_ptr`` is the CuPy stream to launch on, so the kernel orders with the caller's work.
    """
    d, dv = q3.shape[2], v3.shape[2]
    if d > MAX_D or dv > MAX_D:
        raise NotImplementedError(f"head dims up to {MAX_D}, got D={d}, Dv={dv}")
    kernel = build_kernel(score_mod, mask_mod, np.dtype(q3.dtype).name)
    grid = (max(1, -(-q3.shape[1] // BLOCK_Q)), q3.shape[0])
    if q3.shape[1] == 0 or q3.shape[0] == 0:
        return
    if stream_ptr is None:
        kernel[grid, BLOCK_Q](q3, k3, v3, out3, lse2, q3.dtype.type(scale), hq, hkv)
    else:
        stream = cuda.external_stream(stream_ptr)
        kernel[grid, BLOCK_Q, stream](q3, k3, v3, out3, lse2, q3.dtype.type(scale), hq, hkv)
