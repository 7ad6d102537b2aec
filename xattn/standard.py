"""Standard (textbook) multi-head attention: the full score matrix in memory."""

from __future__ import annotations

import math

from . import _masking
from ._array import check_bool, check_int, dlpack_interop, score_options, validate_attention

__all__ = ["DEFAULT_MAX_SCORE_BYTES", "standard_attention"]

#: Largest score matrix (in bytes, summed over batch and heads) that
#: :func:`standard_attention` builds unless ``max_score_bytes=`` says otherwise. Beyond it the
#: O(S^2) memory is almost never what the caller wants; ``flash_attention`` needs O(S).
DEFAULT_MAX_SCORE_BYTES = 4 * 2**30


def heads_view(x, prob, heads):
    """View ``(..., H, S, D)`` as ``(..., Hkv, heads, S, D)`` (group axis; no copy).

    ``heads`` is the group size for q (one kv head's query heads) or 1 for k/v, so matmul
    broadcasting pairs every query head with its kv head without repeating k or v.
    """
    if not prob.heads_axis:
        return x.reshape(1, 1, *x.shape)
    return x.reshape(*prob.batch, prob.hkv, heads, *x.shape[-2:])


# Score-mod temporaries (per block of rows) are kept under this fraction of the score matrix.
_MOD_FRACTION = 16


def _working_bytes(prob, return_weights, n_bad):
    """Bytes of the ``(Sq, Sk)``-sized arrays a call holds at once: the score matrix, the
    weights in the input dtype (when asked for and not the compute dtype), the visibility of
    the non-finite keys, and the score-mod temporaries (at most 1/_MOD_FRACTION of it)."""
    rows = math.prod(prob.score_shape[:-1])
    score = rows * prob.sk * prob.cdtype.itemsize
    need = score + rows * n_bad
    if prob.causal or prob.window is not None or prob.has_score_mods:
        need += score // _MOD_FRACTION
    if return_weights and prob.dtype != prob.cdtype:
        need += rows * prob.sk * prob.dtype.itemsize
    return need


def _mod_rows(prob, need):
    """Query rows per block of score mods: ALiBi's ``(..., rows, Sk)`` distance product and
    the masks' booleans stay within 1/_MOD_FRACTION of the score matrix (or 1 MiB)."""
    per_row = max(1, math.prod(prob.score_shape[:-2]) * prob.sk * prob.cdtype.itemsize)
    budget = max(2**20, need // (2 * _MOD_FRACTION))
    return max(1, budget // per_row)


def _visible_output(xp, prob, s, vg, bad, vis):
    """``weights @ v`` where the keys ``bad`` hold NaN/inf: their terms only where visible."""
    v_fin = vg.copy()
    v_fin[..., bad, :] = 0
    out = heads_view(s, prob, prob.group) @ v_fin
    g, sq, sk = prob.group, prob.sq, prob.sk
    lead = out.shape[:-3]  # (*batch, Hkv)
    out_h = out.reshape(-1, g * sq, out.shape[-1])
    s_h = s.reshape(-1, g * sq, sk)
    vis_h = vis.reshape(-1, g * sq, vis.shape[-1])
    v_h = vg.reshape(-1, sk, vg.shape[-1])
    for i in range(out_h.shape[0]):
        _masking.add_visible_terms(xp, out_h[i], s_h[i], v_h[i], bad, vis_h[i])
    return out_h.reshape(*lead, g, sq, out.shape[-1])


@dlpack_interop
@_masking.quiet
@score_options(before="return_lse")
def standard_attention(q, k, v, /, *, return_lse=False, return_weights=False,
                       max_score_bytes=None, **score):
    """Textbook attention ``softmax(scale * q k^T + mods) v`` with the full score matrix.

    O(Sq * Sk) memory: this is the implementation that can return the attention weights, and the
    one to read to see what every other function in xattn computes. For long sequences use
    :func:`xattn.flash_attention`, which computes the same function in O(S) memory.

    Parameters
    ----------
    q : array, shape ``(..., Hq, Sq, D)`` or ``(Sq, D)``
        Queries (NumPy or CuPy; float16, bfloat16, float32 or float64).
    k : array, shape ``(..., Hkv, Sk, D)``
        Keys; ``Hq % Hkv == 0`` (GQA/MQA: query head ``h`` uses kv head ``h // (Hq // Hkv)``).
    v : array, shape ``(..., Hkv, Sk, Dv)``
        Values.
    causal : bool
        Bottom-right causal mask: query ``i`` sees keys ``j <= i + Sk - Sq``.
    window : (int or None, int or None), optional
        Sliding window ``(left, right)`` around key position ``i + Sk - Sq``.
    mask : bool array broadcastable to ``(..., Hq, Sq, Sk)``, optional
        True where a query may attend to a key.
    bias : float array broadcastable to ``(..., Hq, Sq, Sk)``, optional
        Added to the scores after softcap.
    alibi_slopes : float array, shape ``(Hq,)`` or ``(..., Hq)``, optional
        ALiBi: adds ``-slope_h * |i + Sk - Sq - j|``.
    softcap : float, optional
        Scores become ``softcap * tanh(scores / softcap)`` before the additive terms.
    scale : float, optional
        Score scale, default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the natural-log log-sum-exp of each row's final scores, shape
        ``(..., Hq, Sq)``, float32 (float64 for float64 inputs); ``-inf`` for empty rows.
    return_weights : bool
        Also return the attention weights ``(..., Hq, Sq, Sk)`` in the input dtype.
    max_score_bytes : int, optional
        Refuse problems whose ``(Sq, Sk)``-sized arrays would take more than this many bytes
        (default :data:`DEFAULT_MAX_SCORE_BYTES`, 4 GiB): the score matrix in the compute
        dtype, plus, when they apply, the weights returned in a 16-bit input dtype, the
        temporaries of the score modifications (built by blocks of rows, at most 1/16 of the
        scores) and one boolean per score for each key holding NaN/inf.

    Returns
    -------
    out : array, shape ``(..., Hq, Sq, Dv)``, the input dtype
        A row with no visible key gives zeros.
    lse : array, only with ``return_lse``
    weights : array, only with ``return_weights`` (after ``lse`` when both are asked)

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 16, 32), dtype=np.float32)   # (batch, heads, seq, dim)
    >>> k = rng.standard_normal((2, 2, 16, 32), dtype=np.float32)   # GQA: 2 kv heads
    >>> v = rng.standard_normal((2, 2, 16, 32), dtype=np.float32)
    >>> out, w = xattn.standard_attention(q, k, v, causal=True, return_weights=True)
    >>> out.shape, w.shape
    ((2, 8, 16, 32), (2, 8, 16, 16))
    >>> bool(np.allclose(w.sum(-1), 1)), float(w[0, 0, 0, 1])   # causal: row 0 sees key 0
    (True, 0.0)
    """
    prob = validate_attention(q, k, v, **score)
    return_lse = check_bool("return_lse", return_lse)
    return_weights = check_bool("return_weights", return_weights)
    xp, cd = prob.xp, prob.cdtype
    limit = check_int("max_score_bytes", max_score_bytes, minimum=1,
                      default=DEFAULT_MAX_SCORE_BYTES)
    qg = heads_view(q.astype(cd, copy=False), prob, prob.group)
    kg = heads_view(k.astype(cd, copy=False), prob, 1)
    vg = heads_view(v.astype(cd, copy=False), prob, 1)
    # Keys with NaN/inf values: hidden pairs must not carry them (see xattn._masking).
    bad = None
    if not _masking.no_pairs(prob):
        flags = _masking.nonfinite_rows(xp, vg, cd).reshape(-1, prob.sk).any(axis=0)
        bad = xp.flatnonzero(flags) if bool(flags.any()) else None
    need = _working_bytes(prob, return_weights, 0 if bad is None else int(bad.size))
    if need > limit:
        raise MemoryError(
            f"standard_attention would hold a {prob.score_shape} score matrix "
            f"({need / 2**30:.2f} GiB with its temporaries > max_score_bytes="
            f"{limit / 2**30:.2f} GiB); use xattn.flash_attention (O(S) memory) or raise "
            "max_score_bytes"
        )

    s = qg @ xp.swapaxes(kg, -1, -2)
    s *= cd.type(prob.scale)
    s = s.reshape(prob.score_shape)

    operands = _masking.score_operands(xp, prob, cast=False)  # cast by blocks of rows
    lead = (slice(None),) * (len(prob.score_shape) - 2)
    modified = prob.causal or prob.window is not None or prob.has_score_mods
    vis = None
    # Score mods by blocks of rows: their temporaries (ALiBi distances, masks) stay a small
    # fraction of the score matrix instead of as large again.
    step = _mod_rows(prob, need)
    for q0 in range(0, prob.sq, step):
        q1 = min(q0 + step, prob.sq)
        rows = s[..., q0:q1, :]
        if modified:
            _masking.apply_score_mods(
                xp,
                rows,
                **_masking.tile_mods(prob, operands, lead + (slice(q0, q1), slice(None)), q0, 0),
                cache_masks=False,  # one mask per block of rows: rebuilt, never kept
            )
        if bad is not None:
            if vis is None:
                vis = xp.empty((*prob.score_shape[:-1], int(bad.size)), dtype=bool)
            vis[..., q0:q1, :] = rows[..., bad] != -math.inf
    if prob.sk:
        m = s.max(axis=-1, keepdims=True)
    else:  # no keys at all: every row is empty (a max over nothing has no identity)
        m = xp.full((*prob.score_shape[:-1], 1), -math.inf, dtype=cd)
    m = xp.where(xp.isfinite(m), m, cd.type(0))
    s -= m
    xp.exp(s, out=s)
    denom = s.sum(axis=-1, keepdims=True)
    empty = denom == 0
    s /= xp.where(empty, cd.type(1), denom)
    if bad is None:
        out = heads_view(s, prob, prob.group) @ vg
    else:
        out = _visible_output(xp, prob, s, vg, bad, vis)
    out = out.reshape(prob.out_shape).astype(prob.dtype, copy=False)

    result = [out]
    if return_lse:
        safe = xp.where(empty, cd.type(1), denom)
        lse = xp.where(empty, cd.type(-math.inf), xp.log(safe) + m)[..., 0]
        result.append(lse)
    if return_weights:
        result.append(s.astype(prob.dtype, copy=False))
    return result[0] if len(result) == 1 else tuple(result)
