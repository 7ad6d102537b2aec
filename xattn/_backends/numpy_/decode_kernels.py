"""Numba kernel of the CPU decode attention: one split of one kv head's keys, in one call.

Decoding reads the whole cache for a handful of query rows, so it is bound by memory, not
arithmetic: each key and value row must be read from memory once and used by every query
row that needs it while it sits in L1. One call handles the ``R = G * T`` query rows of one
kv head (``G`` query heads sharing it, ``T`` new tokens) over a range of key positions, in
chunks of ``CHUNK`` keys that never cross a page::

    for each chunk of keys (within one page of the block table):
        s[r, j] = q[r] . k[j]        key row j loaded once, dotted with 4 query rows at a time
        score mods (softcap, ALiBi, causal/window edges) only where the chunk needs them
        online softmax per row       running max m, sum l, rescale acc (base-2 polynomial exp)
        acc[r] += s[r, j] * v[j]     value row j loaded once for all rows

No BLAS: with 1-16 rows per kv head a GEMM call per chunk costs more than it computes, and a
call per page would dominate small pages. The caller splits the key range over the thread
pool and merges the splits' ``(acc, m, l)`` (flash-decoding). Compiled lazily on first use
(``cache=True`` keeps the machine code on disk); importing this module imports numba.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._fused_kernels import _FASTMATH, _exp2_tile, _row_max

_JIT = dict(nogil=True, fastmath=_FASTMATH, cache=True)

# Keys per chunk: R * CHUNK scores (4 rows: 2 KiB in float32) stay in L1 between the score,
# softmax and value passes. 64, 128 and 256 measured within noise of each other at R = 4.
CHUNK = 128
# Query rows dotted with one key row in one pass: the key row is loaded once per block.
ROW_BLOCK = 4


@njit(**_JIT)
def _scores(q, kc, off, n, s, zero):
    """``s[r, j] = q[r] . kc[off + j]`` for ``j < n``."""
    R, D = q.shape
    for j in range(n):
        kj = kc[off + j]
        r = 0
        while r + ROW_BLOCK <= R:
            t0 = zero
            t1 = zero
            t2 = zero
            t3 = zero
            for d in range(D):
                x = kj[d]
                t0 += q[r, d] * x
                t1 += q[r + 1, d] * x
                t2 += q[r + 2, d] * x
                t3 += q[r + 3, d] * x
            s[r, j] = t0
            s[r + 1, j] = t1
            s[r + 2, j] = t2
            s[r + 3, j] = t3
            r += ROW_BLOCK
        while r < R:
            t0 = zero
            for d in range(D):
                t0 += q[r, d] * kj[d]
            s[r, j] = t0
            r += 1


@njit(**_JIT)
def _visible(j, pos, left):
    return j <= pos and (left < 0 or j >= pos - left)


@njit(**_JIT)
def decode_split(q, kpool, vpool, pages, page_size, g, lo, hi, first, T, left, slopes,
                 softcap, acc, m, l, s, zero):
    """Attention state of one kv head's query rows over keys ``[lo, hi)``, updated in place.

    q : (R, D) scaled queries of kv head ``g``; row ``r`` is query token ``r % T`` of one of
        the group's heads, at position ``first + r % T``.
    kpool, vpool : (P, Hkv, page_size, D) and (..., Dv) storage; ``pages`` (int32) maps this
        sequence's logical page ``p`` to its pool page (a contiguous cache: one page per
        sequence).
    left : the window's left extent, ``-1`` for none (the causal rule always holds).
    slopes : (R,) ALiBi slope per row, or an empty array; softcap : ``0`` for none.
    acc, m, l : (R, Dv), (R,), (R,) unnormalised output, running max, running sum.
    s : (R, >= CHUNK) scratch; zero : 0 in the compute dtype (it types the dot products).
    """
    R = q.shape[0]
    Dv = vpool.shape[3]
    has_alibi = slopes.shape[0] > 0
    # A chunk is visible to every row when it starts at or after the last row's window
    # start and ends at or before the first row's position.
    start_all = first + T - 1 - left if left >= 0 else 0
    c0 = lo
    while c0 < hi:
        page = pages[c0 // page_size]
        off = c0 % page_size
        n = min(CHUNK, hi - c0, page_size - off)
        kc = kpool[page, g]
        vc = vpool[page, g]
        _scores(q, kc, off, n, s, zero)
        full = c0 >= start_all and c0 + n - 1 <= first
        if not full or has_alibi or softcap > 0:
            for r in range(R):
                pos = first + r % T
                for j in range(n):
                    x = s[r, j]
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    if has_alibi:
                        x -= slopes[r] * abs(pos - (c0 + j))
                    if not _visible(c0 + j, pos, left):
                        x = -np.inf
                    s[r, j] = x
        for r in range(R):
            row = s[r, :n]
            m_old = m[r]
            m_new = _row_max(row, m_old)
            if m_new == -np.inf:  # nothing visible to this row yet
                for j in range(n):
                    row[j] = 0
                continue
            if m_new != m_old:
                alpha = math.exp(m_old - m_new)  # 0 when m_old = -inf (acc, l are 0 then)
                l[r] *= alpha
                for d in range(Dv):
                    acc[r, d] *= alpha
                m[r] = m_new
            l[r] += _exp2_tile(row, m_new)
        if full:
            for j in range(n):
                vj = vc[off + j]
                for r in range(R):
                    p = s[r, j]
                    for d in range(Dv):
                        acc[r, d] += p * vj[d]
        else:
            # A hidden key contributes nothing, even when its values are NaN or inf.
            for j in range(n):
                vj = vc[off + j]
                for r in range(R):
                    if _visible(c0 + j, first + r % T, left):
                        p = s[r, j]
                        for d in range(Dv):
                            acc[r, d] += p * vj[d]
        c0 += n
