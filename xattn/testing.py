"""Float64 reference oracles and tolerance helpers (public; xattn's own tests use them).

The reference is deliberately small and unoptimised: it expands GQA heads with ``np.repeat``,
forms the full score matrix in float64 on the host and applies the rules of
:mod:`xattn._masking`. Every kernel in xattn is compared against it.
"""

from __future__ import annotations

import numpy as np

from . import _masking
from ._array import _is_bfloat16, is_cupy, score_options, validate_attention

__all__ = [
    "assert_close",
    "naive_attention",
    "naive_attention_backward",
    "reference_attention",
    "reference_attention_backward",
    "tolerance",
    "to_numpy",
]


def to_numpy(x, dtype=np.float64):
    """Host copy of a NumPy or CuPy array as ``dtype`` (explicit: tests only)."""
    if x is None:
        return None
    if is_cupy(x):
        x = x.get()
    return np.asarray(x).astype(dtype)


def _expand_heads(x, hq):
    if x.ndim == 2:
        return x
    hkv = x.shape[-3]
    return np.repeat(x, hq // hkv, axis=-3)


def _scores(q, k, **options):
    """Final float64 scores ``(..., Hq, Sq, Sk)``, with softcap ``tanh`` of the raw ones (else
    None), and the scale. The options are validated as the public functions validate them,
    on float64 host copies."""
    host = {n: to_numpy(x, bool if n == "mask" else np.float64) if hasattr(x, "dtype") else x
            for n, x in options.items()}
    q, k = to_numpy(q), to_numpy(k)
    prob = validate_attention(q, k, k, **host)
    k = _expand_heads(k, prob.hq if prob.heads_axis else 1)
    with np.errstate(invalid="ignore", over="ignore"):  # garbage in hidden keys is fine
        s = (q @ np.swapaxes(k, -1, -2)) * prob.scale
    t = np.empty_like(s) if prob.softcap is not None else None
    whole = (slice(None),) * len(prob.score_shape)
    mods = _masking.tile_mods(prob, _masking.score_operands(np, prob), whole, 0, 0)
    s = _masking.apply_score_mods(np, s, **mods, tanh_out=t)
    return s, t, prob.scale


@score_options()
def reference_attention(q, k, v, **options):
    """Exact attention in float64 on the host.

    Returns ``(out, lse, weights)``: ``out`` is ``(..., Hq, Sq, Dv)``, ``lse`` ``(..., Hq, Sq)``
    (``-inf`` for rows with no visible key, whose output is 0) and ``weights``
    ``(..., Hq, Sq, Sk)``.

    Examples
    --------
    >>> import numpy as np
    >>> from xattn.testing import reference_attention
    >>> q = np.ones((2, 4)); k = np.ones((3, 4)); v = np.arange(6.0).reshape(3, 2)
    >>> out, lse, w = reference_attention(q, k, v, causal=True)
    >>> w[0].round(3).tolist()        # bottom-right: query 0 sits at key position 1
    [0.5, 0.5, 0.0]
    """
    s, _, _ = _scores(q, k, **options)
    v = _expand_heads(to_numpy(v), s.shape[-3] if s.ndim > 2 else 1)
    w, lse = _softmax(s)
    return _pair_matmul(w, v, s != -np.inf), lse, w


def _softmax(s):
    """Weights and lse of final scores; a row with no visible key gives 0 and -inf, a row
    with a NaN score NaN (never an empty row)."""
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)  # Sk = 0 allowed
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(denom == 0, 0.0, p / denom)
        lse = np.where(denom[..., 0] == 0, -np.inf, np.log(denom[..., 0]) + m[..., 0])
    return w, lse


def _pair_matmul(a, b, visible):
    """``sum_j a[..., i, j] * b[..., j, :]`` over the visible pairs ``(i, j)`` only.

    The rule of :mod:`xattn._masking`: a hidden pair adds exactly 0 whatever ``a`` and ``b``
    hold there (NaN in a padded key included); visible pairs follow IEEE arithmetic. Done
    as a matmul on finite values plus, for each index ``j`` whose row of ``b`` is not
    finite, its terms written out one by one.
    """
    a = np.where(visible, a, 0.0)
    bad = ~np.isfinite(b).all(axis=-1)
    bad_j = np.flatnonzero(bad.reshape(-1, bad.shape[-1]).any(axis=0)) if bad.size else ()
    if len(bad_j) == 0:
        return a @ b
    b_fin = b.copy()
    b_fin[..., bad_j, :] = 0.0
    out = a @ b_fin
    with np.errstate(invalid="ignore"):
        for j in bad_j:
            terms = a[..., :, j, None] * b[..., j, None, :]
            out += np.where(visible[..., :, j, None], terms, 0.0)
    return out


def reference_attention_backward(dout, q, k, v, **options):
    """Analytic float64 gradient ``(dq, dk, dv)`` of ``sum(dout * attention(q, k, v))``."""
    s, t, scale = _scores(q, k, **options)
    qn, kn, vn, don = (to_numpy(x) for x in (q, k, v, dout))
    hq = qn.shape[-3] if qn.ndim > 2 else 1
    ke, ve = _expand_heads(kn, hq), _expand_heads(vn, hq)
    w, _ = _softmax(s)
    vis = s != -np.inf
    vis_t = np.swapaxes(vis, -1, -2)
    dv = _pair_matmul(np.swapaxes(w, -1, -2), don, vis_t)
    with np.errstate(invalid="ignore"):
        dp = don @ np.swapaxes(ve, -1, -2)
        delta = np.where(vis, dp * w, 0.0).sum(axis=-1, keepdims=True)
        ds = w * (dp - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
    ds = np.where(vis, ds, 0.0)
    dq = scale * _pair_matmul(ds, ke, vis)
    dk = scale * _pair_matmul(np.swapaxes(ds, -1, -2), qn, vis_t)

    def fold(g):
        # Sum the gradients of the query heads that share one kv head.
        if qn.ndim == 2 or kn.shape[-3] == hq:
            return g
        hkv = kn.shape[-3]
        return g.reshape(*g.shape[:-3], hkv, hq // hkv, *g.shape[-2:]).sum(axis=-3)

    return dq, fold(dk), fold(dv)


def _rounder(dtype):
    """float32 values rounded through ``dtype``, as a naive implementation stores them."""
    dtype = np.dtype(dtype)

    def rnd(x):
        return np.asarray(x, np.float32).astype(dtype).astype(np.float32)

    return rnd


def _naive_weights(s, rnd):
    """Softmax weights of the float64 scores ``s`` with the scores and weights rounded by
    ``rnd`` (rows with no visible key: 0)."""
    s = rnd(s.astype(np.float32))
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return rnd(np.where(den > 0, p / den, 0.0))


def naive_attention(q, k, v, **options):
    """Textbook attention in the inputs' own precision (the baseline for 16-bit tolerances).

    Scores, softmax weights and the output are each rounded to the input dtype, as a naive
    implementation on 16-bit arrays would store them; the sums themselves run in float32.
    """
    rnd = _rounder(q.dtype)
    s, _, _ = _scores(q, k, **options)
    w = _naive_weights(s, rnd)
    ve = _expand_heads(to_numpy(v, np.float32), s.shape[-3] if s.ndim > 2 else 1)
    return rnd(w @ ve).astype(np.float64)


def naive_attention_backward(dout, q, k, v, out, **options):
    """The gradient ``(dq, dk, dv)`` as a naive same-precision implementation computes it.

    The baseline for 16-bit gradient tolerances: float32 sums, and every stored intermediate
    (scores, weights, ``dP``, ``dS`` and the results) rounded to the input dtype; ``out`` is the
    forward output whose ``rowsum(dout * out)`` the backward uses. Returns float32 arrays.
    """
    rnd = _rounder(q.dtype)
    s, t, scale = _scores(q, k, **options)
    p = _naive_weights(s, rnd)
    qn, kn, vn = (to_numpy(x, np.float32) for x in (q, k, v))
    don, on = to_numpy(dout, np.float32), to_numpy(out, np.float32)
    hq = qn.shape[-3] if qn.ndim > 2 else 1
    ke, ve = _expand_heads(kn, hq), _expand_heads(vn, hq)
    dv = np.swapaxes(p, -1, -2) @ don
    dp = rnd(don @ np.swapaxes(ve, -1, -2))
    ds = p * (dp - (don * on).sum(axis=-1, keepdims=True))
    if t is not None:
        ds = ds * (1.0 - t * t).astype(np.float32)
    ds = rnd(ds)
    dq = rnd(scale * ds @ ke)
    dk = scale * np.swapaxes(ds, -1, -2) @ qn

    def fold(g):
        # Sum the gradients of the query heads that share one kv head, then round once.
        if qn.ndim == 2 or kn.shape[-3] == hq:
            return rnd(g)
        hkv = kn.shape[-3]
        return rnd(g.reshape(*g.shape[:-3], hkv, hq // hkv, *g.shape[-2:]).sum(axis=-3))

    return dq, fold(dk), fold(dv)


# Absolute and relative tolerance per dtype, for results of unit-scale inputs.
_TOL = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-5, 2e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


def tolerance(dtype) -> tuple[float, float]:
    """``(atol, rtol)`` used by :func:`assert_close` for results computed from ``dtype``."""
    name = "bfloat16" if _is_bfloat16(dtype) else np.dtype(dtype).name
    return _TOL[name]


def assert_close(actual, reference, *, xp=None, dtype=None, naive=None, atol=None, rtol=None,
                 name="result"):
    """Assert ``actual`` matches a float64 ``reference``.

    Checks, in order: the namespace (``xp``: a silent host fallback fails), the dtype, the
    shape, matching non-finite entries (``-inf`` lse of empty rows), then the values. With
    ``naive`` (the same computation done naively in the same precision, see
    :func:`naive_attention`) the error may be at most twice the naive one plus ``atol``;
    otherwise the per-dtype table of :func:`tolerance` applies.
    """
    if xp is not None:
        actual_xp = "cupy" if is_cupy(actual) else type(actual).__module__.split(".")[0]
        if actual_xp != xp.__name__:
            raise AssertionError(f"{name}: expected a {xp.__name__} array, got {type(actual)}")
    if dtype is not None and np.dtype(actual.dtype) != np.dtype(dtype):
        raise AssertionError(f"{name}: expected dtype {np.dtype(dtype)}, got {actual.dtype}")
    a = to_numpy(actual)
    r = to_numpy(reference)
    if a.shape != r.shape:
        raise AssertionError(f"{name}: expected shape {r.shape}, got {a.shape}")
    if np.isnan(a).any():
        raise AssertionError(f"{name}: contains NaN at {np.argwhere(np.isnan(a))[:5].tolist()}")
    fin = np.isfinite(r)
    if not np.array_equal(fin, np.isfinite(a)) or not np.array_equal(a[~fin], r[~fin]):
        raise AssertionError(f"{name}: non-finite entries differ from the reference")
    d_atol, d_rtol = tolerance(actual.dtype if dtype is None else dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    err = np.abs(a[fin] - r[fin])
    max_err = float(err.max()) if err.size else 0.0
    if naive is not None:
        naive_err = np.abs(to_numpy(naive)[fin] - r[fin])
        bound = 2.0 * (float(naive_err.max()) if naive_err.size else 0.0) + atol
        if max_err > bound:
            raise AssertionError(
                f"{name}: max error {max_err:.3g} exceeds 2x the naive same-precision error "
                f"plus atol ({bound:.3g})"
            )
        return
    limit = atol + rtol * np.abs(r[fin])
    if err.size and (err > limit).any():
        i = int(np.argmax(err - limit))
        raise AssertionError(
            f"{name}: max error {max_err:.3g} (worst at flat index {i}: got "
            f"{a[fin][i]!r}, expected {r[fin][i]!r}; atol={atol:g}, rtol={rtol:g})"
        )
