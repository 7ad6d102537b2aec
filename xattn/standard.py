"""Standard (textbook) multi-head attention: the full score matrix in memory."""

from __future__ import annotations

import math

from . import _masking
from ._array import check_bool, check_int, dlpack_interop, validate_attention

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


@dlpack_interop
def standard_attention(
    q,
    k,
    v,
    /,
    *,
    causal=False,
    window=None,
    mask=None,
    bias=None,
    alibi_slopes=None,
    softcap=None,
    scale=None,
    return_lse=False,
    return_weights=False,
    max_score_bytes=None,
):
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
        Refuse problems whose score matrix is larger than this many bytes (default
        :data:`DEFAULT_MAX_SCORE_BYTES`, 4 GiB).

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
    prob = validate_attention(
        q,
        k,
        v,
        causal=causal,
        window=window,
        mask=mask,
        bias=bias,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        scale=scale,
    )
    return_lse = check_bool("return_lse", return_lse)
    return_weights = check_bool("return_weights", return_weights)
    xp = prob.xp
    limit = check_int("max_score_bytes", max_score_bytes, minimum=1,
                      default=DEFAULT_MAX_SCORE_BYTES)
    need = math.prod(prob.score_shape) * prob.cdtype.itemsize
    if need > limit:
        raise MemoryError(
            f"standard_attention would hold a {prob.score_shape} score matrix "
            f"({need / 2**30:.2f} GiB > max_score_bytes={limit / 2**30:.2f} GiB); "
            "use xattn.flash_attention (O(S) memory) or raise max_score_bytes"
        )

    cd = prob.cdtype
    qg = heads_view(q.astype(cd, copy=False), prob, prob.group)
    kg = heads_view(k.astype(cd, copy=False), prob, 1)
    vg = heads_view(v.astype(cd, copy=False), prob, 1)
    s = qg @ xp.swapaxes(kg, -1, -2)
    s *= cd.type(prob.scale)
    s = s.reshape(prob.score_shape)

    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(cd)[..., None, None]
        if not prob.heads_axis:
            slopes = slopes.reshape(1, 1)
    _masking.apply_score_mods(
        xp,
        s,
        q0=0,
        k0=0,
        sq=prob.sq,
        sk=prob.sk,
        causal=prob.causal,
        window=prob.window,
        softcap=prob.softcap,
        bias=None if bias is None else bias.astype(cd, copy=False),
        slopes=slopes,
        mask=mask,
    )
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
    out = heads_view(s, prob, prob.group) @ vg
    out = out.reshape(prob.out_shape).astype(prob.dtype, copy=False)

    result = [out]
    if return_lse:
        safe = xp.where(empty, cd.type(1), denom)
        lse = xp.where(empty, cd.type(-math.inf), xp.log(safe) + m)[..., 0]
        result.append(lse)
    if return_weights:
        result.append(s.astype(prob.dtype, copy=False))
    return result[0] if len(result) == 1 else tuple(result)
