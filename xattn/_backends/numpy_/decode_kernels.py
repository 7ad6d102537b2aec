"""Numba kernel of the CPU decode attention: one split of one kv head's keys, in one call.

Decoding reads the whole cache for a handful of query rows, so it is bound by memory, not
arithmetic: each key and value row must come from memory once and serve every query row that
needs it while it is in cache. One call handles the ``R = G * T`` query rows of one kv head
(``G`` query heads sharing it, ``T`` new tokens) over a range of key positions, in chunks of
``CHUNK`` keys that never cross a page::

    for each chunk of keys (within one page of the block table):
        s = q @ k_chunk.T            (R, n) scores, BLAS; the chunk is read from memory once
        score mods (softcap, ALiBi, causal/window edges) only where the chunk needs them
        online softmax per row       running max m, sum l, rescale acc (base-2 polynomial exp)
        acc += s @ v_chunk           BLAS; at the causal/window edges a loop that skips the
                                     keys a row may not see (their values may be inf or NaN)

The products go to BLAS through numba's ``np.dot`` even for a few rows. Measured against
hand-written loops (four query rows per key row, vectorised by LLVM), same run, 2 threads,
GQA 32/8 at 131072 keys: 17.2 against 16.4 GB/s at 4 rows, 1.4 against 1.2 GB/s at 16 rows
(a busy machine); a prefetch hint for the next chunk changed nothing. 16-bit caches arrive
as their bits and each chunk is converted to float32 scratch first (:func:`_chunk`).

The caller splits the key range over the thread pool and merges the splits' ``(acc, m, l)``
(flash-decoding, :func:`merge_splits`). Compiled lazily on first use (``cache=True`` keeps
the machine code on disk); importing this module imports numba.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS behind numba's np.dot)
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._fused_kernels import _FASTMATH, _exp2_tile, _row_max

_JIT = dict(nogil=True, fastmath=_FASTMATH, cache=True)

# Keys per chunk: the chunk's K and V (64 KiB each at D=128, float32) stay in L2 and the
# R x CHUNK scores in L1 between the passes. 64, 128 and 256 measured within noise of each
# other at R = 4; 512 was slower.
CHUNK = 128


@intrinsic
def _f16_to_f32(typingctx, bits):
    """float16 bits -> float32: LLVM's ``fpext half`` (exact; F16C's vcvtph2ps once
    vectorised)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bfloat16 bits -> float32 (the upper half of a float32), in 32-bit integer IR: numba's
    own integer arithmetic would widen to 64 bits and halve the vector width."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


def _chunk(src, off, n, buf, bf16):
    """Stub for :func:`numba.extending.overload`: rows ``off .. off + n`` of ``src`` as a
    C-contiguous float array: a view of a float32/float64 pool, or 16-bit values (uint16
    bits; ``bf16`` says which format) converted into ``buf``."""
    raise NotImplementedError  # only called from compiled code


@overload(_chunk, jit_options=_JIT)
def _chunk_impl(src, off, n, buf, bf16):
    if src.dtype != types.uint16:
        def view(src, off, n, buf, bf16):
            return src[off:off + n]

        return view

    def convert(src, off, n, buf, bf16):
        out = buf[:n]
        # One flat loop over the contiguous rows: it vectorises, the 2-D one did not.
        a = src[off:off + n].reshape(-1)
        b = out.reshape(-1)
        if bf16:
            for i in range(a.shape[0]):
                b[i] = _bf16_to_f32(a[i])
        else:
            for i in range(a.shape[0]):
                b[i] = _f16_to_f32(a[i])
        return out

    return convert


@njit(**_JIT)
def _visible(j, pos, left):
    return j <= pos and (left < 0 or j >= pos - left)


@njit(**_JIT)
def decode_split(q, kpool, vpool, pages, page_size, g, lo, hi, first, T, left, slopes,
                 softcap, acc, m, l, sbuf, pv, kbuf, vbuf, bf16):
    """Attention state of one kv head's query rows over keys ``[lo, hi)``, updated in place.

    q : (R, D) scaled queries of kv head ``g``; row ``r`` is query token ``r % T`` of one of
        the group's heads, at position ``first + r % T``.
    kpool, vpool : (P, Hkv, page_size, D) and (..., Dv) storage in the compute dtype, or 16-bit
        values as uint16 bits (float16, or bfloat16 when ``bf16``), converted chunk by chunk
        into ``kbuf``/``vbuf`` (CHUNK, D)/(CHUNK, Dv) float32 scratch; ``pages`` (int32) maps
        this sequence's logical page ``p`` to its pool page (a contiguous cache: one page per
        sequence).
    left : the window's left extent, ``-1`` for none (the causal rule always holds).
    slopes : (R,) ALiBi slope per row, or an empty array; softcap : ``0`` for none.
    acc, m, l : (R, Dv), (R,), (R,) unnormalised output, running max, running sum.
    sbuf : flat scratch of ``R * CHUNK``; pv : (R, Dv) scratch.
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
        kc = _chunk(kpool[page, g], off, n, kbuf, bf16)
        s = sbuf[: R * n].reshape((R, n))
        np.dot(q, kc.T, s)
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
            row = s[r]
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
        vc = _chunk(vpool[page, g], off, n, vbuf, bf16)
        if full:
            np.dot(s, vc, pv)
            for r in range(R):
                for d in range(Dv):
                    acc[r, d] += pv[r, d]
        else:
            # A hidden key contributes nothing, even when its values are NaN or inf.
            for j in range(n):
                vj = vc[j]
                for r in range(R):
                    if _visible(c0 + j, first + r % T, left):
                        p = s[r, j]
                        for d in range(Dv):
                            acc[r, d] += p * vj[d]
        c0 += n


@njit(**_JIT)
def decode_tasks(tasks, qs, kpool, vpool, table, page_size, lengths, T, left, slopes, softcap,
                 acc, m, l, bf16):
    """Run :func:`decode_split` for each row ``(b, g, slot, lo, hi)`` of ``tasks`` (int64).

    One call per pool job keeps the interpreter out of the loop over (sequence, kv head,
    split) tasks. ``qs`` is ``(B, Hkv, R, D)``; ``slopes`` ``(B, Hkv, R or 0)``; the states
    ``acc``, ``m``, ``l`` are ``(B, Hkv, splits, R[, Dv])`` and each task owns one slot.
    """
    R = qs.shape[2]
    sbuf = np.empty(R * CHUNK, dtype=acc.dtype)
    pv = np.empty((R, vpool.shape[3]), dtype=acc.dtype)
    kbuf = np.empty((CHUNK, kpool.shape[3]), dtype=acc.dtype)
    vbuf = np.empty((CHUNK, vpool.shape[3]), dtype=acc.dtype)
    for i in range(tasks.shape[0]):
        b = tasks[i, 0]
        g = tasks[i, 1]
        slot = tasks[i, 2]
        decode_split(qs[b, g], kpool, vpool, table[b], page_size, g, tasks[i, 3], tasks[i, 4],
                     lengths[b] - T, T, left, slopes[b, g], softcap, acc[b, g, slot],
                     m[b, g, slot], l[b, g, slot], sbuf, pv, kbuf, vbuf, bf16)


@njit(**_JIT)
def merge_splits(acc, m, l, out, lse):
    """Merge the splits of each row by their maxima and normalise (flash-decoding's lse merge).

    acc, m, l : (N, S, R, Dv), (N, S, R), (N, S, R) split states; out : (N, R, Dv) and
    lse : (N, R) written. A row that saw no key gets 0 and ``lse = -inf``.
    """
    N, S, R, Dv = acc.shape
    for i in range(N):
        for r in range(R):
            top = -np.inf
            for s in range(S):
                if m[i, s, r] > top or m[i, s, r] != m[i, s, r]:
                    top = m[i, s, r]
            if top == -np.inf:
                for d in range(Dv):
                    out[i, r, d] = 0
                lse[i, r] = -np.inf
                continue
            total = l[i, s, r] * 0
            for d in range(Dv):
                out[i, r, d] = 0
            for s in range(S):
                w = math.exp(m[i, s, r] - top)  # 0 for a split that saw nothing
                total += w * l[i, s, r]
                for d in range(Dv):
                    out[i, r, d] += w * acc[i, s, r, d]
            inv = 1 / total
            for d in range(Dv):
                out[i, r, d] *= inv
            lse[i, r] = top + math.log(total)
