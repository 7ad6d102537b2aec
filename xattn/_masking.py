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

Hidden pairs never contribute. A pair ``(i, j)`` is *hidden* when a rule above hides it or its
final score is ``-inf`` (a ``-inf`` bias, the additive form of a mask). Its terms are exactly
zero in every product, forward and backward, whatever the values involved: NaN or inf in a
padded key's ``k``/``v``, in a query's ``q``/``dout`` or in a bias entry leak into nothing
(a plain ``P @ V`` would give ``0 * NaN = NaN``). Visible pairs follow IEEE arithmetic, so a
NaN in a visible key's value makes exactly the rows that see it NaN, on every backend.
The kernels compute their products on cleaned copies (non-finite rows set to 0, see
:func:`nonfinite_rows`) and add the exact terms of the visible pairs that involve those rows
with :func:`add_visible_terms`; inputs without non-finite values take the plain path.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict

import numpy as np

__all__ = [
    "add_visible_terms",
    "apply_score_mods",
    "empty_backward",
    "empty_forward",
    "key_range",
    "no_pairs",
    "nonfinite_rows",
    "score_operands",
    "tile_is_full",
    "tile_mods",
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


def quiet(fn):
    """Run ``fn`` with NumPy's 'invalid' and 'overflow' warnings off.

    NaN and inf in hidden positions are expected input (padding), and the products that meet
    them are dropped by the rule above; a warning per call would be noise. (NumPy's error
    state is per thread: the pool's jobs are wrapped too.)
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def nonfinite_rows(xp, x, dtype=None):
    """Boolean ``(..., S)``: the rows of ``x`` ``(..., S, D)`` that hold a NaN or an infinity.

    One pass that sums each row (NaN and inf survive a sum), as a matrix-vector product
    where BLAS takes the dtype (5-10x faster than ``sum``; no boolean copy of ``x``). A row
    whose finite values overflow the sum is reported too, which only sends it through the
    exact path of :func:`add_visible_terms`.
    """
    if x.shape[-1] == 0:
        return xp.zeros(x.shape[:-1], dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        if x.dtype in (np.float32, np.float64):
            sums = x @ xp.ones(x.shape[-1], dtype=x.dtype)
        else:
            sums = x.sum(axis=-1, dtype=dtype)
        return ~xp.isfinite(sums)


def clean_rows(xp, x, rows):
    """A copy of 2-D ``x`` with the rows ``rows`` (indices) set to 0, in ``x``'s dtype."""
    y = x.copy()
    y[rows] = 0
    return y


# Elements of the (rows, keys, width) temporary of add_visible_terms.
_TERMS_ELEMS = 1 << 20


def add_visible_terms(xp, out, a, b, idx, vis):
    """``out += sum_n where(vis[:, n], a[:, idx[n], None] * b[idx[n]], 0)``, in place.

    The terms of ``a @ b`` for the inner indices ``idx`` (those whose row of ``b`` is not
    finite; the caller multiplied by a copy of ``b`` with these rows set to 0), kept only
    for the visible pairs ``vis`` (``(R, len(idx))`` bool): a hidden pair adds exactly 0,
    a visible one its IEEE product. ``out`` is ``(R, W)``, ``a`` ``(R, N)``, ``b`` ``(N, W)``.
    """
    keep = xp.flatnonzero(vis.any(axis=0))  # indices no row sees need no term at all
    if keep.size == 0:
        return out
    idx, vis = idx[keep], vis[:, keep]
    rows, width = out.shape
    step = max(1, _TERMS_ELEMS // max(1, rows * width))
    for c0 in range(0, idx.size, step):
        cols = idx[c0:c0 + step]
        terms = a[:, cols, None] * b[cols][None, :, :]
        xp.copyto(terms, 0, where=~vis[:, c0:c0 + step, None])
        out += terms.sum(axis=1)
    return out


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


def tile_visibility(xp, q0, q1, k0, k1, *, sq, sk, causal, window, cache=True):
    """Boolean ``(q1-q0, k1-k0)`` array of the causal/window rules, or None if all visible.

    NumPy masks are cached (read-only) unless ``cache=False`` (one-off geometries).
    """
    if not causal and window is None:
        return None
    if tile_is_full(q0, q1, k0, k1, sq=sq, sk=sk, causal=causal, window=window):
        return None
    if xp is np and cache:
        # The same tile geometry recurs for every head and batch element; cache it (up to
        # VISIBILITY_CACHE_BYTES of masks: a whole (Sq, Sk) mask is rebuilt, not kept).
        key = (q0, q1, k0, k1, sk - sq, causal, window)
        vis = _VISIBILITY_CACHE.get(key)
        if vis is None:
            vis = _visibility(np, q0, q1, k0, k1, sk - sq, causal, window)
            vis.flags.writeable = False
            _VISIBILITY_CACHE.put(key, vis, vis.nbytes)
        return vis
    return _visibility(xp, q0, q1, k0, k1, sk - sq, causal, window)


class ByteLRU:
    """A least-recently-used cache bounded by the bytes of its values (thread-safe).

    A value larger than ``max_bytes // 8`` is never stored: it would evict most others and
    hold memory that a call's own temporaries already cost once.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value, nbytes: int):
        if nbytes > self.max_bytes // 8:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, (_, n) = self._items.popitem(last=False)
                self.nbytes -= n

    def clear(self):
        with self._lock:
            self._items.clear()
            self.nbytes = 0


def value_nbytes(value, _seen=None) -> int:
    """Bytes a cached value holds, estimated: arrays by ``nbytes``, containers and objects'
    attributes walked (each object once), any other leaf (an int, a flag) counted as 64."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, (tuple, list, frozenset, set)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    elif isinstance(getattr(value, "__dict__", None), dict):
        items = vars(value).values()
    else:
        return 64
    return 64 + sum(value_nbytes(v, seen) for v in items)


def cached_by_bytes(max_bytes: int):
    """``functools.lru_cache`` for positional, hashable arguments, bounded by the bytes of
    the values kept (:func:`value_nbytes`) instead of their count: a few large block masks
    or plans must not stay alive beside many small ones."""

    def decorate(fn):
        cache = ByteLRU(max_bytes)

        @functools.wraps(fn)
        def cached(*args):
            hit = cache.get(args)
            if hit is None:
                hit = fn(*args)
                cache.put(args, hit, value_nbytes(hit))
            return hit

        cached.cache_clear = cache.clear
        cached.cache = cache
        return cached

    return decorate


#: Bytes of tile masks kept by :func:`tile_visibility` (the tiles of the CPU backends are
#: 64-128 KiB each, so hundreds of distinct geometries fit).
VISIBILITY_CACHE_BYTES = 32 * 2**20
_VISIBILITY_CACHE = ByteLRU(VISIBILITY_CACHE_BYTES)


def _visibility(xp, q0, q1, k0, k1, off, causal, window):
    """Boolean ``(q1-q0, k1-k0)``: row ``i`` sees keys ``lo_i <= j <= hi_i``.

    Built from per-row bounds by two comparisons, so the only ``(rows, keys)`` arrays are
    booleans (no integer index grid).
    """
    pos = xp.arange(q0, q1) + off  # each query's key position
    keys = xp.arange(k0, k1)[None, :]
    vis = None
    if causal:
        vis = keys <= pos[:, None]
    if window is not None:
        left, right = window
        if left is not None:
            part = keys >= (pos - left)[:, None]
            vis = part if vis is None else xp.logical_and(vis, part, out=vis)
        if right is not None:
            part = keys <= (pos + right)[:, None]
            vis = part if vis is None else xp.logical_and(vis, part, out=vis)
    if vis is None:
        vis = xp.ones((q1 - q0, k1 - k0), dtype=bool)
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
    cache_masks=True,
):
    """Turn raw scaled scores ``s`` (``(..., tq, tk)``, modified in place) into final scores.

    ``bias`` and ``mask`` are the tile's slices (broadcastable to ``s``); ``slopes`` is the ALiBi
    slope per leading position of ``s``, broadcastable to ``s.shape[:-2] + (1, 1)``. When
    ``tanh_out`` is given, ``tanh(s / softcap)`` is stored there for the backward pass.
    ``cache_masks=False`` builds the causal/window mask without keeping it. Returns ``s``.
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
    vis = tile_visibility(xp, q0, q1, k0, k1, sq=sq, sk=sk, causal=causal, window=window,
                          cache=cache_masks)
    if vis is not None:
        xp.copyto(s, -math.inf, where=~vis)
    if mask is not None:
        xp.copyto(s, -math.inf, where=~mask)
    return s


def score_operands(xp, prob, shape=None, *, cast=True):
    """The problem's operands with one axis per axis of ``shape`` (default: its score shape;
    size 1 where an operand broadcasts, never broadcast in memory): apply_score_mods's
    ``mask``, ``bias`` and ``slopes`` (``(..., 1, 1)``), None where absent. ``cast``: float
    operands in the compute dtype now (one copy of each, reused by every tile); otherwise
    :func:`tile_mods` casts each tile (standard_attention, whose memory bound counts no
    whole copy). Every caller takes its tiles with :func:`tile_mods`, so an operand added here
    reaches every path."""
    ops = prob.operands()
    if ops["mask"] is None and ops["bias"] is None and ops["alibi_slopes"] is None:
        return {"mask": None, "bias": None, "slopes": None}
    shape = tuple(prob.score_shape if shape is None else shape)
    if cast:
        ops = {n: x if x is None or x.dtype == np.bool_ else x.astype(prob.cdtype, copy=False)
               for n, x in ops.items()}
    slopes = ops["alibi_slopes"]
    if slopes is not None:  # one slope per (batch, head): constant over a head's scores
        lead = len(shape) - 2
        slopes = (slopes.reshape(1, 1) if slopes.ndim > lead  # 2-D inputs: one head
                  else slopes.reshape((1,) * (lead - slopes.ndim) + slopes.shape + (1, 1)))
    named = {"mask": ops["mask"], "bias": ops["bias"], "slopes": slopes}
    return {n: None if x is None else x.reshape((1,) * (len(shape) - x.ndim) + x.shape)
            for n, x in named.items()}


def tile_mods(prob, operands, index, q0, k0, full=False):
    """apply_score_mods's keywords for one tile of ``prob``: the tile ``index`` (one int or
    slice per axis) of each :func:`score_operands` array, its first query ``q0`` and key
    ``k0``; ``full`` says the causal/window element test can be skipped (the tile is wholly
    visible). Axes where an operand broadcasts stay size 1, and float operands are cast to
    the compute dtype tile by tile (a 16-bit bias is never copied whole, nor broadcast)."""
    kw = dict(q0=q0, k0=k0, sq=prob.sq, sk=prob.sk, causal=prob.causal and not full,
              window=None if full else prob.window, softcap=prob.softcap)
    for name, x in operands.items():
        if x is not None:
            x = x[tuple(i if n != 1 else 0 if isinstance(i, int) else slice(None)
                        for n, i in zip(x.shape, index, strict=True))]
            if x.dtype != np.bool_:
                x = x.astype(prob.cdtype, copy=False)
        kw[name] = x
    return kw


# Plans kept by tile_plan, in (estimated) bytes: a plan of a 1M-long non-causal problem has
# 8M tiles, which must not stay alive beside a hundred others.
PLAN_CACHE_BYTES = 64 * 2**20
_PLAN_CACHE = ByteLRU(PLAN_CACHE_BYTES)
_PLAN_TILE_BYTES = 120  # a (k0, k1, full) tuple and its ints, roughly


def tile_plan(sq: int, sk: int, bq: int, bk: int, causal: bool, window) -> tuple:
    """The key tiles each query block must visit under causal/window.

    Returns one tuple per query block ``[q0, q0 + bq)``: ``(q0, q1, tiles)`` with ``tiles`` a tuple
    of ``(k0, k1, full)``; key tiles are aligned to multiples of ``bk`` and cut to the visible
    key range, and ``full`` says the causal/window element test can be skipped. Tiles wholly
    outside the rules never appear, so their cost is zero. Depends only on shapes and options,
    so it is cached (einops-style recipes), up to :data:`PLAN_CACHE_BYTES`.
    """
    key = (sq, sk, bq, bk, causal, window)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _tile_plan(*key)
        size = _PLAN_TILE_BYTES * (len(plan) + sum(len(t) for _, _, t in plan))
        _PLAN_CACHE.put(key, plan, size)
    return plan


def _tile_plan(sq, sk, bq, bk, causal, window):
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
