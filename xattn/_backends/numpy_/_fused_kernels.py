"""Numba kernels of the fused CPU flash attention: the element-wise stages around the matmuls.

Each kernel makes one pass over a score tile that BLAS has just written (``s = q k^T``) and
leaves it in cache for the next matmul. The online softmax runs in base 2 (Triton/flash-attn
style): ``exp(x - m) = 2**((x - m) * log2(e))``. LLVM cannot vectorise ``exp`` without
Intel's SVML (not shipped with pip's numba), so float32 tiles use :func:`_exp2_tile`, a
range reduction plus a degree-5 polynomial, with ``2**n`` built in the exponent bits by a
bitcast intrinsic, all in one vectorised loop; float64 tiles keep ``math.exp``. The row max
runs on order-preserving int32 keys so that it vectorises without 'nnan'/'ninf' fast-math.
Measurements of each version: docs/dev/perf_cpu.rst.

Compiled lazily on first use (``cache=True`` keeps the machine code on disk); importing this
module imports numba, so only :mod:`xattn._backends.numpy_.fused` imports it, inside functions.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS behind numba's np.dot)
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from . import _pool

# The pool must hold that BLAS at one thread too, not only NumPy's.
_pool.rescan_blas()

# No 'nnan'/'ninf': masked scores are -inf and must stay -inf. 'reassoc' lets LLVM vectorise
# the row sums; 'contract' fuses the polynomial into FMAs; 'afn' allows approximate math.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_JIT = dict(nogil=True, fastmath=_FASTMATH, cache=True)

_LOG2E = 1.4426950408889634
# Exponents are clamped here: floor(-127) + 127 = 0 is an all-zero exponent field, which
# (with p's mantissa dropped by the multiply) gives exactly 0 for every y < -126, masked -inf
# scores included, without a compare-and-blend per element. Weights below 2**-126 are under
# 1e-38 of the row maximum's.
_EXP2_MIN = -127.0
# 2**f on [0, 1) by a degree-5 polynomial, highest power first, with p(0) = 1 exactly (the
# row maximum gets weight 1): iteratively reweighted least squares on Chebyshev nodes, max
# relative error 8.8e-8 with float32 coefficients (under 1 ulp).
_P5, _P4, _P3, _P2, _P1, _P0 = (
    0.0018671570578590035,
    0.00901699997484684,
    0.05579989776015282,
    0.24016447365283966,
    0.6931512951850891,
    1.0,
)


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret an int32's bits as a float32 (a register rename once vectorised)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _max_key(typingctx, best, bits):
    """``max(best, key(bits))`` in int32, ``key`` mapping float32 bits to an ordered int.

    Negative floats get their magnitude bits flipped, so int order is float order (-inf and
    NaN included). Written in LLVM IR because numba widens int32 arithmetic to int64, which
    would halve the vector width of the reduction.
    """
    sig = types.int32(types.int32, types.int32)

    def codegen(context, builder, signature, args):
        best, i = args
        i32 = ir.IntType(32)
        flip = builder.and_(builder.ashr(i, ir.Constant(i32, 31)), ir.Constant(i32, 0x7FFFFFFF))
        key = builder.xor(i, flip)
        return builder.select(builder.icmp_signed(">", key, best), key, best)

    return sig, codegen


def _exp2_tile(row, shift):
    """Stub for :func:`numba.extending.overload`: ``row <- exp(row - shift)``, in place.

    Returns the row sum of the new values. ``shift`` is the row maximum or the lse: the
    difference is taken before the log2(e) scaling, so that it is exact for the scores near
    the maximum, the weights that matter.
    """
    raise NotImplementedError  # only called from compiled code


@overload(_exp2_tile, jit_options=_JIT)
def _exp2_tile_impl(row, shift):
    if row.dtype == types.float32:
        log2e = np.float32(_LOG2E)
        lo = np.float32(_EXP2_MIN)
        p5, p4, p3 = np.float32(_P5), np.float32(_P4), np.float32(_P3)
        p2, p1, p0 = np.float32(_P2), np.float32(_P1), np.float32(_P0)
        zero = np.float32(0.0)
        bias = np.int32(127)
        mant = np.int32(23)

        def impl(row, shift):
            shift = np.float32(shift)
            total = zero
            for c in range(row.shape[0]):
                y = (row[c] - shift) * log2e
                # A NaN score fails the compare and stays NaN.
                yc = lo if y < lo else y
                fl = np.floor(yc)
                f = yc - fl
                p = p5 * f + p4
                p = p * f + p3
                p = p * f + p2
                p = p * f + p1
                p = p * f + p0
                # 2**fl built in the exponent field: ((fl + 127) << 23) as float32 bits.
                e = p * _bits_to_f32((np.int32(fl) + bias) << mant)
                row[c] = e
                total += e
            return total

        return impl

    def impl64(row, shift):
        total = 0.0
        for c in range(row.shape[0]):
            e = math.exp(row[c] - shift)
            row[c] = e
            total += e
        return total

    return impl64


def _row_max(row, init):
    """Stub for :func:`numba.extending.overload`: ``max(init, *row)``, NaN if any is NaN."""
    raise NotImplementedError  # only called from compiled code


@overload(_row_max, jit_options=_JIT)
def _row_max_impl(row, init):
    if row.dtype == types.float32:
        # LLVM vectorises a float max reduction only under 'nnan'/'ninf', which -inf scores
        # forbid; an int32 max of order-preserving keys vectorises and keeps -inf and NaN.
        def impl(row, init):
            bits = row.view(np.int32)
            best = np.int32(-2147483648)
            for c in range(bits.shape[0]):
                best = _max_key(best, bits[c])
            # The key map is its own inverse.
            m = _bits_to_f32(_max_key(np.int32(-2147483648), best))
            return m if m > init or m != m else init

        return impl

    def impl64(row, init):
        m = init
        for c in range(row.shape[0]):
            x = row[c]
            if x > m or x != x:
                m = x
        return m

    return impl64


@njit(**_JIT)
def online_softmax_tile(s, m, l, acc):
    """One online-softmax step over a score tile, in place.

    s : (R, C) final scores of this key tile; overwritten with ``exp(s - m_new)``.
    m : (R,) running row maxima (-inf before the first visible key), updated.
    l : (R,) running row sums of the exponentials, rescaled and updated.
    acc : (R, Dv) unnormalised output, rescaled by ``exp(m_old - m_new)``; the caller then
        adds ``s @ v``.
    """
    R, C = s.shape
    for r in range(R):
        row = s[r]
        m_old = m[r]
        m_new = _row_max(row, m_old)
        if m_new == -np.inf:
            # Nothing visible in this row yet: its weights are 0, its state stays empty.
            for c in range(C):
                row[c] = 0
            continue
        if m_new != m_old:
            alpha = math.exp(m_old - m_new)  # 0 when m_old = -inf (acc and l are 0 then)
            l[r] *= alpha
            for c in range(acc.shape[1]):
                acc[r, c] *= alpha
            m[r] = m_new
        l[r] += _exp2_tile(row, m_new)


@njit(**_JIT)
def forward_tiles(q, k, v, bounds, m, l, acc, sbuf, pv):
    """Forward steps over key tiles that need no score mods, without returning to Python.

    q : (R, D) scaled queries; k, v : (Sk, D), (Sk, Dv) C-contiguous, of q's dtype.
    bounds : (T, 2) int64 key ranges ``[k0, k1)``, visited in order.
    m, l, acc : the online-softmax state of :func:`online_softmax_tile`, updated.
    sbuf : flat scratch of at least ``R * max(k1 - k0)``; pv : (R, Dv) scratch.
    One call per run of plain tiles keeps the Python interpreter (and the GIL) out of the
    loop: the matmuls go to BLAS through numba's ``np.dot``.
    """
    rows = q.shape[0]
    for t in range(bounds.shape[0]):
        k0 = bounds[t, 0]
        k1 = bounds[t, 1]
        s = sbuf[: rows * (k1 - k0)].reshape((rows, k1 - k0))
        np.dot(q, k[k0:k1].T, s)
        online_softmax_tile(s, m, l, acc)
        np.dot(s, v[k0:k1], pv)
        for r in range(rows):
            for c in range(acc.shape[1]):
                acc[r, c] += pv[r, c]


@njit(**_JIT)
def add_rows(acc, pv):
    """``acc += pv`` (both (R, Dv)); numba so the GIL stays released."""
    for r in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            acc[r, c] += pv[r, c]


@njit(**_JIT)
def finish_rows(acc, m, l, lse):
    """Normalise ``acc`` in place and write ``lse``; rows with no visible key give 0, -inf."""
    for r in range(acc.shape[0]):
        if l[r] == 0:
            for c in range(acc.shape[1]):
                acc[r, c] = 0
            lse[r] = -np.inf
        else:  # NaN sums (NaN inputs) fall here and stay NaN
            inv = 1.0 / l[r]
            for c in range(acc.shape[1]):
                acc[r, c] *= inv
            lse[r] = m[r] + math.log(l[r])


@njit(**_JIT)
def probs_from_lse(s, lse):
    """``s <- exp(s - lse)`` in place; ``lse`` must be +inf (not -inf) for empty rows."""
    for r in range(s.shape[0]):
        _exp2_tile(s[r], lse[r])


@njit(**_JIT)
def score_grad(p, dp, delta):
    """``dp <- p * (dp - delta)`` (the softmax backward), in place."""
    for r in range(p.shape[0]):
        d = delta[r]
        for c in range(p.shape[1]):
            dp[r, c] = p[r, c] * (dp[r, c] - d)


@njit(**_JIT)
def score_grad_softcap(p, dp, delta, t):
    """As :func:`score_grad`, times ``1 - tanh**2`` of the softcap (``t`` holds the tanh)."""
    for r in range(p.shape[0]):
        d = delta[r]
        for c in range(p.shape[1]):
            x = t[r, c]
            dp[r, c] = p[r, c] * (dp[r, c] - d) * (1 - x * x)


@njit(**_JIT)
def row_dots(a, b, out):
    """``out[r] = a[r] . b[r]`` accumulated in ``out``'s dtype (delta = dO . O)."""
    for r in range(a.shape[0]):
        total = 0.0
        for c in range(a.shape[1]):
            total += a[r, c] * b[r, c]
        out[r] = total
