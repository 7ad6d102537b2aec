"""The one definition of visibility and score modification.

Every code path in xattn -- the float64 reference in :mod:`xattn.testing`,
:func:`xattn.standard_attention`, and each tiled kernel -- applies these rules through the
functions below (the CUDA kernels implement the same formulas and are tested against them).

Positions are aligned bottom-right: with ``offset = Sk - Sq`` query ``i`` sits at key position
``i + offset``. For Sq=3, Sk=5 and ``causal=True`` (x = visible)::

          k: 0 1 2 3 4
    q 0:     x x x . .
    q 1:     x x x x .
    q 2:     x x x x x

Query ``i`` may see key ``j`` iff every active rule holds:

* ``causal``: ``j <= i + offset``
* ``window=(left, right)``: ``i + offset - left <= j <= i + offset + right`` (None = unbounded)
* ``mask``: ``mask[..., i, j]`` is True (PyTorch SDPA convention)

Scores are modified in flash-attn's order: ``s = scale * q.k``; ``softcap``:
``s = c * tanh(s / c)``; then the additive terms ``bias`` and ALiBi
``-slope_h * |i + offset - j|``; then the masks (invisible scores become ``-inf``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = [
    "apply_score_mods",
    "empty_backward",
    "empty_forward",
    "key_range",
    "no_pairs",
    "tile_is_full",
    "tile_visibility",
]


def no_pairs(prob) -> bool:
    """True when a problem has no (query, key) pair at all: a zero-sized batch, head or
    sequence axis. Such calls return zeros of the right shapes (``lse`` -inf), as NumPy
    reductions over empty axes do, without running a kernel."""
    return prob.hq == 0 or prob.sq == 0 or prob.sk == 0 or 0 in prob.batch


def empty_forward(prob):
    """``(out, lse)`` of a :func:`no_pairs` problem: every row sees no key (0 and -inf)."""
    xp = prob.xp
    out = xp.zeros(prob.out_shape, dtype=prob.dtype)
    return out, xp.full(prob.lse_shape, -math.inf, dtype=prob.cdtype)


def empty_backward(prob):
    """``(dq, dk, dv)`` of a :func:`no_pairs` problem: zeros (no pair carries a gradient)."""
    xp = prob.xp
    lead = (*prob.batch,) if prob.heads_axis else None

    def zeros(h, s, d):
        return xp.zeros((s, d) if lead is None else (*lead, h, s, d), dtype=prob.dtype)

    return (zeros(prob.hq, prob.sq, prob.d), zeros(prob.hkv, prob.sk, prob.d),
            zeros(prob.hkv, prob.sk, prob.dv))


def key_range(q0: int, q1: int, *, sq: int, sk: int, causal: bool, window) -> tuple[int, int]:
    """Half-open range of keys that any query in ``[q0, q1)`` may see under causal/window.

    The range is a superset (it ignores ``mask``); an empty range comes back as ``(k, k)``.
    """
    off = sk - sq
    lo, hi = 0, sk
    if causal:
        hi = min(hi, q1 - 1 + off + 1)
    if window is not None:
        left, right = window
        if left is not None:
            lo = max(lo, q0 + off - left)
        if right is not None:
            hi = min(hi, q1 - 1 + off + right + 1)
    lo = max(lo, 0)
    hi = min(max(hi, lo), sk)
    return lo, hi


def tile_is_full(q0, q1, k0, k1, *, sq, sk, causal, window) -> bool:
    """True when every (query, key) pair of the tile passes the causal/window rules."""
    off = sk - sq
    if causal and k1 - 1 > q0 + off:
        return False
    if window is not None:
        left, right = window
        if left is not None and k0 < q1 - 1 + off - left:
            return False
        if right is not None and k1 - 1 > q0 + off + right:
            return False
    return True


def tile_visibility(xp, q0, q1, k0, k1, *, sq, sk, causal, window):
    """Boolean ``(q1-q0, k1-k0)`` array of the causal/window rules, or None if all visible."""
    if not causal and window is None:
        return None
    if tile_is_full(q0, q1, k0, k1, sq=sq, sk=sk, causal=causal, window=window):
        return None
    if xp is np:
        # The same tile geometry recurs for every head and batch element; cache it.
        return _numpy_tile_visibility(q0, q1, k0, k1, sk - sq, causal, window)
    return _visibility(xp, q0, q1, k0, k1, sk - sq, causal, window)


@lru_cache(maxsize=512)
def _numpy_tile_visibility(q0, q1, k0, k1, off, causal, window):
    vis = _visibility(np, q0, q1, k0, k1, off, causal, window)
    vis.flags.writeable = False
    return vis


def _visibility(xp, q0, q1, k0, k1, off, causal, window):
    # diff[i, j] = key position j minus query position i + off.
    diff = xp.arange(k0, k1)[None, :] - (xp.arange(q0, q1)[:, None] + off)
    vis = xp.ones(diff.shape, dtype=bool)
    if causal:
        vis &= diff <= 0
    if window is not None:
        left, right = window
        if left is not None:
            vis &= diff >= -left
        if right is not None:
            vis &= diff <= right
    return vis


def alibi_distance(xp, q0, q1, k0, k1, *, sq, sk, dtype):
    """``|i + offset - j|`` for the tile, as ``dtype``."""
    off = sk - sq
    return xp.abs(
        xp.arange(k0, k1, dtype=dtype)[None, :] - (xp.arange(q0, q1, dtype=dtype)[:, None] + off)
    )


def apply_score_mods(
    xp,
    s,
    *,
    q0: int,
    k0: int,
    sq: int,
    sk: int,
    causal: bool,
    window,
    softcap=None,
    bias=None,
    slopes=None,
    mask=None,
    tanh_out=None,
):
    """Turn raw scaled scores ``s`` (``(..., tq, tk)``, modified in place) into final scores.

    ``bias`` and ``mask`` are the tile's slices (broadcastable to ``s``); ``slopes`` is the ALiBi
    slope per leading position of ``s``, broadcastable to ``s.shape[:-2] + (1, 1)``. When
    ``tanh_out`` is given, ``tanh(s / softcap)`` is stored there for the backward pass.
    Returns ``s``.
    """
    tq, tk = s.shape[-2], s.shape[-1]
    q1, k1 = q0 + tq, k0 + tk
    if softcap is not None:
        s /= softcap
        xp.tanh(s, out=s)
        if tanh_out is not None:
            tanh_out[...] = s
        s *= softcap
    if bias is not None:
        s += bias
    if slopes is not None:
        dist = alibi_distance(xp, q0, q1, k0, k1, sq=sq, sk=sk, dtype=s.dtype)
        s -= slopes * dist
    vis = tile_visibility(xp, q0, q1, k0, k1, sq=sq, sk=sk, causal=causal, window=window)
    if vis is not None:
        xp.copyto(s, -math.inf, where=~vis)
    if mask is not None:
        xp.copyto(s, -math.inf, where=~mask)
    return s


@lru_cache(maxsize=128)
def tile_plan(sq: int, sk: int, bq: int, bk: int, causal: bool, window) -> tuple:
    """The key tiles each query block must visit under causal/window.

    Returns one tuple per query block ``[q0, q0 + bq)``: ``(q0, q1, tiles)`` with ``tiles`` a tuple
    of ``(k0, k1, full)``; key tiles are aligned to multiples of ``bk`` and cut to the visible
    key range, and ``full`` says the causal/window element test can be skipped. Tiles wholly
    outside the rules never appear, so their cost is zero. Depends only on shapes and options,
    so it is cached (einops-style recipes).
    """
    plan = []
    for q0 in range(0, sq, bq):
        q1 = min(q0 + bq, sq)
        lo, hi = key_range(q0, q1, sq=sq, sk=sk, causal=causal, window=window)
        tiles = []
        k0 = (lo // bk) * bk
        while k0 < hi:
            a, b = max(k0, lo), min(k0 + bk, hi)
            full = tile_is_full(q0, q1, a, b, sq=sq, sk=sk, causal=causal, window=window)
            tiles.append((a, b, full))
            k0 += bk
        plan.append((q0, q1, tuple(tiles)))
    return tuple(plan)
