"""decode_attention written with array-namespace operations (NumPy or CuPy).

Serves every dtype and option on both devices; the fused CPU kernel (:mod:`.decode`) is
measured against it. Per sequence, the cache's visible keys are visited in chunks of
``CHUNK`` positions: the ``G`` query heads of each kv head and the ``T`` tokens form one
``(G, T)`` block, so each kv head's keys meet all its query heads in one batched matmul
(``(Hkv, G, T, D) @ (Hkv, 1, D, n)``) and k/v are never repeated per query head. Scores go
through :func:`xattn._masking.apply_score_mods`, the one definition of the rules, then an
online softmax. A paged cache's chunk is gathered from its pages (one copy per chunk).
"""

from __future__ import annotations

import math

import numpy as np

from ... import _masking
from .tiled import softmax_finish, softmax_step

# Keys per chunk. Scores are Hq * T * CHUNK floats (32 heads, T=16: 4 MiB in float32).
CHUNK = 2048


def supports(prob, opts, op):
    return None  # every dtype, every option, NumPy and CuPy


def key_bounds(length, prob):
    """``[lo, hi)``: the keys that any of the ``T`` queries of a sequence of ``length`` sees."""
    return _masking.key_range(0, prob.sq, sq=prob.sq, sk=length, causal=True,
                              window=prob.window)


def segments(lo, hi, length, prob):
    """``(k0, k1, full)`` key ranges covering ``[lo, hi)``: ``CHUNK``-sized ranges that every
    query sees (``full``), and at most two edges of fewer than ``T`` keys each (the window's
    start, the newest tokens) that some queries do not."""
    T = prob.sq
    first = length - T  # position of query 0
    left = None if prob.window is None else prob.window[0]
    a = min(max(0 if left is None else first + T - 1 - left, lo), hi)
    z = max(min(first + 1, hi), a)
    out = [(lo, a, False)] if a > lo else []
    out += [(c, min(c + CHUNK, z), True) for c in range(a, z, CHUNK)]
    if hi > z:
        out.append((z, hi, False))
    return out


def row_slopes(xp, alibi_slopes, prob):
    """ALiBi slopes as ``(batch, Hkv, G, 1, 1)`` in the compute dtype, or None."""
    if alibi_slopes is None:
        return None
    s = xp.broadcast_to(alibi_slopes.astype(prob.cdtype), (prob.batch, prob.hq))
    return s.reshape(prob.batch, prob.hkv, prob.group, 1, 1)


def decode(prob, q, cache, *, alibi_slopes=None):
    """Return ``(out, lse)`` of :func:`xattn.decode_attention`."""
    xp, cd = prob.xp, prob.cdtype
    B, Hkv, G, T, D, Dv = prob.batch, prob.hkv, prob.group, prob.sq, prob.d, prob.dv
    out = xp.zeros((B, Hkv, G, T, Dv), dtype=prob.dtype)
    lse = xp.full((B, Hkv, G, T), -math.inf, dtype=cd)
    qs = q.astype(cd).reshape(B, Hkv, G, T, D) * cd.type(prob.scale)
    slopes = row_slopes(xp, alibi_slopes, prob)
    lengths = cache.lengths
    for b in range(B):
        L = int(lengths[b])
        lo, hi = key_bounds(L, prob)
        if hi <= lo:
            continue  # no query of this sequence sees a key: rows stay 0, lse -inf
        m = xp.full((Hkv, G, T, 1), -math.inf, dtype=cd)
        denom = xp.zeros((Hkv, G, T, 1), dtype=cd)
        acc = xp.zeros((Hkv, G, T, Dv), dtype=cd)
        for c0, c1, full in segments(lo, hi, L, prob):
            kt, vt = cache._gather(b, c0, c1)
            kt = kt.astype(cd, copy=False)[:, None]  # (Hkv, 1, n, D)
            vt = vt.astype(cd, copy=False)[:, None]
            s = qs[b] @ xp.swapaxes(kt, -1, -2)  # (Hkv, G, T, n)
            _masking.apply_score_mods(
                xp, s, q0=0, k0=c0, sq=T, sk=L, causal=not full,
                window=None if full else prob.window, softcap=prob.softcap,
                slopes=None if slopes is None else slopes[b],
            )
            m_new, alpha, denom = softmax_step(xp, s, m, denom)
            vis = None if full else _masking.tile_visibility(
                xp, 0, T, c0, c1, sq=T, sk=L, causal=True, window=prob.window)
            if vis is None:
                pv = s @ vt
            else:
                # A few keys that some rows may not see: a product per (row, key), so that
                # a hidden key's inf or NaN values meet a `where`, not a zero weight.
                with np.errstate(invalid="ignore"):
                    prod = s[..., None] * vt[:, :, None]  # (Hkv, G, T, n, Dv)
                pv = xp.where(vis[..., None], prod, cd.type(0)).sum(axis=-2)
            acc = acc * alpha + pv
            m = m_new
        out[b], lse[b] = softmax_finish(xp, acc, denom, m, prob.dtype)
    return out.reshape(B, Hkv * G, T, Dv), lse.reshape(B, Hkv * G, T)
