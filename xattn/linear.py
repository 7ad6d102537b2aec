"""Linear attention: kernel feature maps instead of softmax, no ``S x S`` matrix ever.

Softmax attention weights ``exp(q.k)`` are replaced by a dot product of non-negative features
``phi(q).phi(k)``, so that the keys and values can be summed first::

    out_i = phi(q_i)^T S / (phi(q_i)^T z + eps),   S = sum_j phi(k_j) v_j^T,   z = sum_j phi(k_j)

costing O(S * F * Dv) instead of O(S^2 * D). Two families live here:

- :func:`linear_attention` with a deterministic feature map (``elu(x) + 1`` of Katharopoulos et
  al. 2020, ``relu``, or your own), and its gradient :func:`linear_attention_backward`;
- :func:`performer_attention`, the FAVOR+ positive random features of Choromanski et al. 2021,
  an unbiased estimate of ``exp(q.k / sqrt(D))``, so an approximation of softmax attention;
  :func:`performer_projection` draws its random projection.

The causal form is computed by chunks (the "chunked prefix sum" of Katharopoulos et al. and of
later linear-attention kernels): inside a chunk of ``C`` positions the masked quadratic form
``tril(phi(Q) phi(K)^T) V``; across chunks a running state ``(S, z)`` of shape ``(F, Dv + 1)``.
A block of chunks is processed at once with batched matmuls and an exclusive prefix sum over
the block's chunk states only, so memory stays O(block * F * Dv), independent of the sequence
length, while time is O(S * (C + F) * Dv). The denominator ``z`` rides along as one extra column
of ones appended to ``V``, so numerator and denominator come out of the same matmuls.

Everything is written with array-namespace operations (matmul, cumsum, exp, where), so NumPy and
CuPy inputs run the same code on their own device.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._array import (
    array_namespace,
    check_bool,
    check_positive_int,
    check_same_shape,
    check_scalar,
    check_seed,
    dlpack_interop,
    supported_dtype,
    validate_attention,
)

__all__ = [
    "linear_attention",
    "linear_attention_backward",
    "performer_attention",
    "performer_projection",
]

# Positions per chunk of the causal scan. The intra-chunk quadratic form costs 2*C*(F+Dv)
# flops per position and the inter-chunk state 4*F*Dv; C = 64 keeps the two comparable for
# head dims around 64 and makes the batched (C x C) matmuls large enough for BLAS/cuBLAS.
DEFAULT_CHUNK = 64
# Elements of one block's temporaries (rows x (C + F + 2 (Dv + 1)) per head): a block of
# chunks is handled by one set of batched matmuls. Small on the CPU (stays in cache, bounded
# traced memory), large on the GPU (fewer launches: causal S = 2^20, D = 64 on an H200 took
# 29 / 16 / 8.3 / 6.5 ms with 2^23 / 2^24 / 2^25 / 2^26; about 1 GiB of device temporaries).
_BLOCK_ELEMS = {"cpu": 1 << 21, "gpu": 1 << 26}
_FEATURE_MAPS = ("elu", "relu")


# --- feature maps -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cupy_elu1_kernel():
    import cupy

    # One pass instead of four generic ones: measured 1.30 -> ~0.15 ms per 2^26 float32 on an
    # H200, where the elementwise passes were a fifth of the causal S = 2^20 forward.
    return cupy.ElementwiseKernel("T x", "T y", "y = x > 0 ? x + (T)1 : exp(x)", "xattn_elu1")


def _elu1(xp, x):
    if xp is not np:
        return _cupy_elu1_kernel()(x)
    # elu(x) + 1 = x + 1 for x > 0, exp(x) for x <= 0 = exp(m) + x - m with m = min(x, 0):
    # written without a branch, and with two temporaries instead of three.
    m = xp.minimum(x, 0)
    y = x - m
    y += xp.exp(m, out=m)
    return y


def _elu1_grad(xp, x):
    return xp.exp(xp.minimum(x, 0))


def _relu(xp, x):
    return xp.maximum(x, 0)


def _relu_grad(xp, x):
    return (x > 0).astype(x.dtype)


_BUILTIN = {"elu": (_elu1, _elu1_grad), "relu": (_relu, _relu_grad)}


def _checked_callable(xp, fn, cdtype):
    """Wrap a user feature map: check namespace, shape and sign of what it returns."""
    width = {}

    def apply(x, name):
        # The map gets an array of its own (a block of rows, never a view of the caller's
        # q or k), so a map that works in place cannot change the caller's arrays.
        y = fn(x if x.flags.owndata else x.copy())
        try:
            array_namespace(x, y, names=(name, f"feature_map({name})"))
        except TypeError as exc:
            raise TypeError(f"feature_map: must return an array like its input; {exc}") from None
        lead = tuple(x.shape[:-1])
        if y.ndim != x.ndim or tuple(y.shape[:-1]) != lead or y.shape[-1] < 1:
            raise ValueError(
                f"feature_map: expected features of shape {(*lead, 'F')} for {name} rows "
                f"of shape {tuple(x.shape)}, got shape {tuple(y.shape)}"
            )
        if width.setdefault("F", y.shape[-1]) != y.shape[-1]:
            raise ValueError(
                f"feature_map: returned {y.shape[-1]} features for {name} but {width['F']} "
                "before; q and k need the same number of features"
            )
        if not supported_dtype(y.dtype):
            raise TypeError(f"feature_map: expected floating features, got dtype {y.dtype}")
        y = y.astype(cdtype, copy=False)
        if y.size:
            lo = float(y.min())
            if not lo >= 0:  # also catches NaN
                raise ValueError(
                    f"feature_map: features must be non-negative (the normaliser "
                    f"phi(q).sum(phi(k)) must stay positive), got min {lo} for {name}"
                )
        return y

    return apply


def _feature_map(xp, feature_map, cdtype):
    """(phi(x, name), phi'(x) or None) for the option ``feature_map``."""
    if callable(feature_map):
        return _checked_callable(xp, feature_map, cdtype), None
    if isinstance(feature_map, str) and feature_map in _BUILTIN:
        fwd, grad = _BUILTIN[feature_map]
        return (lambda x, name: fwd(xp, x)), (lambda x: grad(xp, x))
    raise ValueError(
        f"feature_map: expected one of {_FEATURE_MAPS} or a callable, got {feature_map!r}"
    )


# --- option checks ----------------------------------------------------------------------------


def _check_eps(eps):
    eps = check_scalar("eps", eps, positive=False, allow_none=False)
    if eps < 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    return eps




# --- layout -----------------------------------------------------------------------------------


def _grouped(x, prob, heads):
    """View ``(..., H, S, D)`` as ``(N, 1, heads, S, D)`` with ``N = batch * Hkv``.

    GQA groups without copying k/v: the ``heads`` query heads of one kv head share its row.
    """
    if not prob.heads_axis:
        return x.reshape(1, 1, 1, *x.shape)
    n = math.prod(prob.batch) * prob.hkv
    return x.reshape(n, 1, heads, *x.shape[-2:])


def _head_jobs(xp, n):
    """Slices of the ``N`` (batch * kv-head) axis: independent jobs for the CPU threads."""
    if n == 0:
        return []
    if xp is not np or n == 1:
        return [slice(0, n)]
    from ._backends.numpy_._pool import num_threads

    parts = min(n, num_threads())
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _run_jobs(xp, fn, jobs):
    """Run the jobs: on the CPU on xattn's thread pool, with BLAS held at one thread.

    The scans are made of many small batched matmuls; multi-threaded BLAS gains little on them
    and, on a busy machine, its spinning threads made them up to 100x slower (measured).
    """
    if xp is np:
        try:
            import threadpoolctl  # noqa: F401 - the pool needs it to limit BLAS threads
        except ImportError:
            pass
        else:
            from ._backends.numpy_._pool import run_jobs

            run_jobs(fn, jobs)
            return
    for job in jobs:
        fn(job)


def _swap(x):
    return x.swapaxes(-1, -2)


def _sum_groups(x):
    """Sum a (B, H, G, ...) product over its group axis (query heads sharing one kv head)."""
    return x if x.shape[2] == 1 else x.sum(axis=2, keepdims=True)


def _block_rows(xp, heads, chunk, width):
    dev = "gpu" if xp.__name__ == "cupy" else "cpu"
    rows = _BLOCK_ELEMS[dev] // max(1, heads * (chunk + width))
    return max(chunk, rows // chunk * chunk)


# --- the scan engine ----------------------------------------------------------------------------
#
# Rows are produced on demand by "sources", so the feature maps run one block at a time and no
# full-length feature array is ever held:
#   a(s0, s1)  -> (B, H, Ga, n, F)      the side that reads the state (queries, forward)
#   b(s0, s1)  -> ((B, H, Gb, n, F), L) the side that writes it (keys, forward); L is None, or
#                                        per-row log-scales (B, H, 1, n): row j of b really is
#                                        b_j * exp(L_j) (the Performer's stabilised key features)
#   w(s0, s1)  -> (B, H, Gb, n, E)      the values written with b (v with a column of ones)
# Row i of a sees row j of b iff j <= i + off. The result y_i = sum_{visible j} (a_i.b_j) w_j
# (summed over b's groups when a has one) goes to put(s0, s1, y). With log-scales, every y_i is
# multiplied by exp(-M_i), M_i the running maximum of L over the rows i sees; a ratio of two
# columns of y (numerator / denominator) is unaffected.


def _accumulate(xp, b, w, s0, s1, state, ref, rows):
    """Add sum_{j in [s0, s1)} b_j w_j^T to ``state`` (kept relative to ``exp(ref)``)."""
    for r0 in range(s0, s1, rows):
        r1 = min(s1, r0 + rows)
        bb, lb = b(r0, r1)
        ww = w(r0, r1)
        if lb is not None:
            new = xp.maximum(ref, lb.max(axis=-1))
            ww = ww * xp.exp(lb - new[..., None])[..., None]
            state = state * xp.exp(ref - new)[..., None, None]
            ref = new
        state = state + _sum_groups(_swap(bb) @ ww)
    return state, ref


# Chunk states per group of the two-level prefix sum on the GPU.
_PREFIX_GROUP = 64


def _exclusive_prefix(xp, kv, state):
    """``state + sum(kv[c'] for c' < c)`` for every chunk ``c`` of axis 3, and the total.

    Two levels of triangular matmuls (inside groups of 64 chunk states, then across groups):
    CuPy's cumsum over a leading axis took 6 ms for 16384 states of 64 x 65 on an H200, about
    half of the whole causal forward; these matmuls take a few percent of it.
    """
    lead, nb, fe = kv.shape[:3], kv.shape[3], kv.shape[4] * kv.shape[5]
    g = min(_PREFIX_GROUP, nb)
    n1 = -(-nb // g)
    flat = kv.reshape(*lead, nb, fe)
    if n1 * g != nb:
        flat = xp.concatenate([flat, xp.zeros((*lead, n1 * g - nb, fe), flat.dtype)], axis=3)
    x = flat.reshape(*lead, n1, g, fe)
    within = xp.tri(g, k=-1, dtype=x.dtype) @ x
    totals = x.sum(axis=-2)  # (..., n1, fe)
    before = xp.tri(n1, k=-1, dtype=x.dtype) @ totals
    flat_state = state.reshape(*lead, 1, fe)
    within += (before + flat_state)[..., :, None, :]
    prefix = within.reshape(*lead, n1 * g, fe)[..., :nb, :].reshape(kv.shape)
    return prefix, state + totals.sum(axis=-2).reshape(state.shape)


def _weighted_prefix(xp, kv, end, before, state, ref):
    """The Performer's prefix of chunk states, each carried on its own exponential scale.

    ``kv[c]`` is relative to ``exp(end[c])``, ``state`` to ``exp(ref)``; the result for chunk
    ``c`` is ``state + sum(kv[c'] for c' < c)`` relative to ``exp(before[c])``, where
    ``before`` is non-decreasing and ``end[c'] <= before[c]`` for ``c' < c``: every weight
    ``exp(end[c'] - before[c])`` is at most 1. Two levels (inside groups of 64 chunks, then
    across groups) keep the work linear in the number of chunks.
    """
    lead, nb = kv.shape[:3], kv.shape[3]
    fe = kv.shape[4] * kv.shape[5]
    neg = -math.inf
    g = min(_PREFIX_GROUP, nb)
    n1 = -(-nb // g)
    flat = kv.reshape(*lead, nb, fe)
    if n1 * g != nb:
        pad = n1 * g - nb
        flat = xp.concatenate([flat, xp.zeros((*lead, pad, fe), flat.dtype)], axis=3)
        end = xp.concatenate([end, xp.full((*lead, pad), neg, end.dtype)], axis=3)
        last = xp.broadcast_to(before[..., -1:], (*lead, pad))
        before = xp.concatenate([before, last], axis=3)
    x = flat.reshape(*lead, n1, g, fe)
    e, bf = end.reshape(*lead, n1, g), before.reshape(*lead, n1, g)
    # inside each group, relative to each chunk's own reference
    tri = xp.tri(g, k=-1, dtype=bool)
    prefix = xp.exp(xp.where(tri, e[..., None, :] - bf[..., :, None], neg)) @ x
    # each group's total, relative to its last (largest) end
    eg = e.max(axis=-1)
    totals = (xp.exp(e - eg[..., None])[..., None, :] @ x)[..., 0, :]
    # the groups before, relative to the group's first reference, then to each chunk's
    rg = bf[..., 0]
    tri1 = xp.tri(n1, k=-1, dtype=bool)
    cross = xp.exp(xp.where(tri1, eg[..., None, :] - rg[..., :, None], neg)) @ totals
    prefix += cross[..., :, None, :] * xp.exp(rg[..., None] - bf)[..., None]
    prefix += state.reshape(*lead, 1, 1, fe) * xp.exp(ref[..., None, None] - bf)[..., None]
    return prefix.reshape(*lead, n1 * g, fe)[..., :nb, :].reshape(kv.shape)


def _chunk_block(xp, A, Bk, L, W, state, ref):
    """One block of ``nb`` chunks of ``C`` aligned rows: returns y, the new state and ref.

    A (B,H,Ga,nb,C,F), Bk (B,H,Gb,nb,C,F), W (B,H,Gb,nb,C,E), L None or (B,H,1,nb,C)
    (log-scales come with keys only, so Gb == 1 then).
    """
    nb, c = A.shape[-3], A.shape[-2]
    a_shared = A.shape[2] == 1  # one row of a for all of b's groups: sum over the groups
    if L is None:
        # inside each chunk: the masked quadratic form
        s = A @ _swap(Bk)
        s *= xp.tri(c, dtype=s.dtype)
        y = s @ W
        if a_shared:
            y = _sum_groups(y)
        # across chunks: exclusive prefix sum of the chunk states, on top of the running state
        kv = _sum_groups(_swap(Bk) @ W)  # (B, H, 1, nb, F, E)
        if xp is np:
            # NumPy's cumsum over a leading axis runs ~4x slower than adding whole rows.
            prefix = xp.empty_like(kv)
            state = state.copy()
            for i in range(nb):
                prefix[..., i, :, :] = state
                state += kv[..., i, :, :]
        else:
            prefix, state = _exclusive_prefix(xp, kv, state)
        y += A @ prefix
        return y, state, ref

    # Stabilised keys: b_j really is Bk_j * exp(L_j). Query i uses M_i = max(L_j, j <= i) (and
    # the state's reference) as its common scale: it never depends on a later key, and every
    # exponent below is <= 0, so nothing overflows.
    neg = -math.inf
    tri_c = xp.tri(c, dtype=bool)
    tri_nb = xp.tri(nb, k=-1, dtype=bool)  # chunk c' strictly before chunk c
    lm = xp.where(tri_c, L[..., None, :], neg).max(axis=-1)  # prefix max inside each chunk
    m = lm[..., -1]  # (B, H, 1, nb) chunk maxima
    before = xp.maximum(xp.where(tri_nb, m[..., None, :], neg).max(axis=-1), ref[..., None])
    mi = xp.maximum(lm, before[..., None])  # (B, H, 1, nb, C)
    end = xp.maximum(before, m)  # reference of each chunk's own state
    e = xp.exp(xp.where(tri_c, L[..., None, :] - mi[..., :, None], neg))
    s = (A @ _swap(Bk)) * e
    y = s @ W
    kv = _swap(Bk) @ (W * xp.exp(L - end[..., None])[..., None])  # (B, H, 1, nb, F, E)
    prefix = _weighted_prefix(xp, kv, end, before, state, ref)
    y += (A @ prefix) * xp.exp(before[..., None] - mi)[..., None]
    last = xp.exp(before[..., -1] - end[..., -1])[..., None, None]
    return y, prefix[..., -1, :, :] * last + kv[..., -1, :, :], end[..., -1]


def _scan(xp, a, b, w, put, *, sa, sb, off, causal, state, ref, chunk, rows):
    """Drive the sources: non-causal sums, or the causal scan with bottom-right offset.

    Returns the final state and its reference: the sum over all rows of b.
    """
    if not causal:
        state, ref = _accumulate(xp, b, w, 0, sb, state, ref, rows)
        for s0 in range(0, sa, rows):
            s1 = min(sa, s0 + rows)
            put(s0, s1, a(s0, s1) @ state)
        return state, ref
    # Rows of a before -off see no row of b; rows of b before off are seen by every row of a.
    a0 = min(sa, max(0, -off))
    b0 = min(sb, max(0, off))
    state, ref = _accumulate(xp, b, w, 0, b0, state, ref, rows)
    if a0 > 0:
        put(0, a0, None)
    n = min(sa - a0, sb - b0)
    if ref is not None and b0 == 0 and n > 0:
        # The first visible row is a causally safe finite reference for the empty state.
        ref = xp.maximum(ref, b(0, 1)[1][..., 0])
    s = 0
    while s < n:
        c = chunk if n - s >= chunk else n - s
        nb = max(1, min(rows, n - s) // c)
        t = s + nb * c
        A = a(a0 + s, a0 + t)
        Bk, L = b(b0 + s, b0 + t)
        W = w(b0 + s, b0 + t)
        if L is not None:
            L = L.reshape(*L.shape[:3], nb, c)
        y, state, ref = _chunk_block(
            xp, _split(A, nb, c), _split(Bk, nb, c), L, _split(W, nb, c), state, ref
        )
        put(a0 + s, a0 + t, y.reshape(*y.shape[:3], t - s, y.shape[-1]))
        s = t
    # Rows of a past the end of b see all of it.
    for s0 in range(a0 + n, sa, rows):
        s1 = min(sa, s0 + rows)
        put(s0, s1, a(s0, s1) @ state)
    return state, ref


def _split(x, nb, c):
    return x.reshape(*x.shape[:3], nb, c, x.shape[-1])


def _reversed(src, length, pair=False):
    """A source reading rows in reverse order (for the suffix sums of the backward pass)."""

    def get(s0, s1):
        x = src(length - s1, length - s0)
        if pair:
            return x[0][..., ::-1, :], None
        return x[..., ::-1, :]

    return get


def _slicer(x, pair=False):
    if pair:
        return lambda s0, s1: (x[..., s0:s1, :], None)
    return lambda s0, s1: x[..., s0:s1, :]


def _with_ones(xp, x):
    ones = xp.ones((*x.shape[:-1], 1), dtype=x.dtype)
    return xp.concatenate([x, ones], axis=-1)


def _zeros_state(xp, n, f, e, cdtype):
    return xp.zeros((n, 1, 1, f, e), dtype=cdtype)


# --- linear attention ---------------------------------------------------------------------------


def _validate_linear(q, k, v, causal, eps, chunk_size, feature_map, extra=()):
    prob = validate_attention(q, k, v, causal=causal, extra=extra)
    eps = _check_eps(eps)
    chunk = check_positive_int("chunk_size", chunk_size, allow_none=True)
    phi, dphi = _feature_map(prob.xp, feature_map, prob.cdtype)
    return prob, eps, chunk or DEFAULT_CHUNK, phi, dphi


@dlpack_interop
def linear_attention(
    q, k, v, /, *, feature_map="elu", causal=False, eps=1e-6, chunk_size=None
):
    """Linear attention with a non-negative feature map: O(S) memory and time, no softmax.

    Computes ``out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)`` with
    ``S_i = sum_j phi(k_j) v_j^T`` and ``z_i = sum_j phi(k_j)`` over all keys, or, with
    ``causal=True``, over the keys ``j <= i + Sk - Sq`` (bottom-right alignment, as everywhere
    in xattn). Unlike softmax attention there is no ``1/sqrt(D)`` scaling.

    The causal form runs by chunks of ``chunk_size`` positions: the masked quadratic form inside
    a chunk, a running ``(F, Dv + 1)`` state across chunks. Time O(S * (chunk + F) * Dv), extra
    memory O(F * Dv) per head besides the output; no ``S x S`` matrix and no per-position state.
    On the CPU, heads are spread over xattn's threads (``XATTN_NUM_THREADS``); a causal call
    with fewer heads than threads and ``Sq == Sk >= 65536`` is also split along the sequence,
    the parts scanned in parallel and then corrected by the states of the parts before them
    (one extra ``(Sq, Dv + 1)`` float32 buffer per head).

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, Sq, D)``, ``(..., Hkv, Sk, D)``, ``(..., Hkv, Sk, Dv)``
        NumPy or CuPy; float16, bfloat16, float32 or float64 (16-bit inputs are computed in
        float32). GQA/MQA when ``Hkv < Hq``: query head ``h`` uses kv head ``h // (Hq // Hkv)``.
    feature_map : {"elu", "relu"} or callable
        ``"elu"``: ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020); ``"relu"``:
        ``max(x, 0)``; a callable maps an array of rows ``(..., n, D)`` (float32, or float64 for
        float64 inputs, same namespace) to non-negative features ``(..., n, F)``, row by row
        (a row's features may depend only on that row, which causality requires). It is
        called on blocks of rows, the same ``F`` for queries and keys; each block is a fresh
        array (a copy, not a view of ``q`` or ``k``), which the map may overwrite.
    causal : bool
        Query ``i`` attends to keys ``j <= i + Sk - Sq`` only.
    eps : float
        Added to the normaliser, ``>= 0``. A row whose normaliser is exactly 0 (``relu``
        features with no overlap, or no visible key) returns 0.
    chunk_size : int, optional
        Positions per chunk of the causal scan (default 64). The result does not depend on it
        beyond rounding.

    Returns
    -------
    out : array ``(..., Hq, Sq, Dv)``, in the input dtype and namespace.

    See Also
    --------
    linear_attention_backward, performer_attention

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1000, 32), dtype=np.float32) for _ in range(3))
    >>> out = xattn.linear_attention(q, k, v, causal=True)
    >>> phi = lambda x: np.where(x > 0, x + 1, np.exp(x))          # elu(x) + 1
    >>> w = np.tril(phi(q[0]) @ phi(k[0]).T)                       # the quadratic form
    >>> ref = (w @ v[0]) / (w.sum(axis=-1, keepdims=True) + 1e-6)
    >>> out.shape, out.dtype.name, bool(np.allclose(out[0], ref, atol=1e-5))
    ((2, 1000, 32), 'float32', True)
    """
    prob, eps, chunk, phi, _ = _validate_linear(q, k, v, causal, eps, chunk_size, feature_map)
    return _linear_forward(prob, q, k, v, phi, eps, chunk)


def _linear_forward(prob, q, k, v, phi, eps, chunk):
    xp, cd, g = prob.xp, prob.cdtype, prob.group
    q5, k5, v5 = _grouped(q, prob, g), _grouped(k, prob, 1), _grouped(v, prob, 1)
    out5 = xp.empty((*q5.shape[:-1], prob.dv), dtype=prob.dtype)
    # The width of the features is known only after the map has run once.
    f = phi(k5[:1, :, :, :1].astype(cd), "k").shape[-1] if prob.sk else prob.d

    def sources(h, start=0):
        qh, kh, vh = q5[h], k5[h], v5[h]

        def a(s0, s1):
            return phi(qh[..., start + s0:start + s1, :].astype(cd, copy=False), "q")

        def b(s0, s1):
            return phi(kh[..., start + s0:start + s1, :].astype(cd, copy=False), "k"), None

        def w(s0, s1):
            return _with_ones(xp, vh[..., start + s0:start + s1, :].astype(cd, copy=False))

        return a, b, w

    jobs = _head_jobs(xp, q5.shape[0])
    parts = _sequence_parts(xp, prob, len(jobs), chunk)
    if parts is None:
        _run_jobs(xp, lambda h: _run_ratio(prob, *sources(h), out5[h], eps, chunk, f), jobs)
    else:
        _run_split(prob, sources, jobs, parts, out5, eps, chunk, f)
    return out5.reshape(prob.out_shape)


# Causal problems with fewer heads than CPU threads are also split along the sequence once it
# has at least this many positions per part (below it the split's overheads dominate).
_SPLIT_MIN_ROWS = 1 << 15


def _sequence_parts(xp, prob, njobs, chunk):
    """Chunk-aligned ``(start, stop)`` parts of a causal ``Sq == Sk`` sequence, or None."""
    if xp is not np or not prob.causal or prob.sq != prob.sk or njobs == 0:
        return None
    from ._backends.numpy_._pool import num_threads

    nparts = min(num_threads() // njobs, prob.sq // _SPLIT_MIN_ROWS)
    if nparts < 2:
        return None
    edges = [round(p * prob.sq / nparts / chunk) * chunk for p in range(nparts)] + [prob.sq]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _run_split(prob, sources, jobs, parts, out5, eps, chunk, f):
    """Causal scan of sequence parts in parallel, then each part corrected by the ones before.

    Part ``p`` scans its rows from a zero state, keeping the unnormalised ``[n, d]`` of its rows
    (parts after the first) and its total state; then ``phi(q_i)^T (states of parts < p)`` is
    added and the ratio taken. Costs about one more ``phi(Q) S`` product per row than the
    sequential scan and a ``(rows, Dv + 1)`` buffer, for using every core on one head.
    """
    xp, cd, dv = prob.xp, prob.cdtype, prob.dv
    tasks = [(i, p) for i in range(len(jobs)) for p in range(len(parts))]
    totals, buffers = {}, {}

    def scan_part(task):
        i, p = task
        h, (start, stop) = jobs[i], parts[p]
        a, b, w = sources(h, start)
        n = stop - start
        if p == 0:
            put = _ratio_writer(xp, out5[h], dv, eps)
        else:
            buf = buffers[task] = xp.empty((*out5[h].shape[:3], n, dv + 1), dtype=cd)

            def put(s0, s1, y):
                buf[..., s0:s1, :] = y

        totals[task], _ = _scan(
            xp, a, b, w, put, sa=n, sb=n, off=0, causal=True,
            state=_zeros_state(xp, out5[h].shape[0], f, dv + 1, cd), ref=None, chunk=chunk,
            rows=_block_rows(xp, _heads(out5[h]), chunk, f + 2 * (dv + 1)),
        )

    def correct_part(task):
        i, p = task
        h, (start, stop) = jobs[i], parts[p]
        a, _, _ = sources(h, start)
        before = sum(totals[(i, r)] for r in range(p))
        buf, write = buffers[task], _ratio_writer(xp, out5[h][..., start:stop, :], dv, eps)
        rows = _block_rows(xp, _heads(out5[h]), chunk, f + 2 * (dv + 1))
        for s0 in range(0, stop - start, rows):
            s1 = min(stop - start, s0 + rows)
            y = a(s0, s1) @ before
            y += buf[..., s0:s1, :]
            write(s0, s1, y)

    _run_jobs(xp, scan_part, tasks)
    _run_jobs(xp, correct_part, [t for t in tasks if t[1] > 0])


def _heads(out5):
    return out5.shape[0] * out5.shape[1] * out5.shape[2]


def _ratio_writer(xp, out5, dv, eps):
    """``put(s0, s1, y)`` writing ``y[:dv] / (y[dv] + eps)`` (or zeros for None) into out5."""
    # Divide straight into the output where the ufunc can cast (not into ml_dtypes' bfloat16).
    native_out = np.dtype(out5.dtype).kind == "f"

    def put(s0, s1, y):
        if y is None:
            out5[..., s0:s1, :] = 0
            return
        den = y[..., dv:] + eps
        if not eps > 0:
            # a zero normaliser means a zero numerator too (features are non-negative): 0
            den = xp.where(den > 0, den, 1)
        if native_out:
            xp.divide(y[..., :dv], den, out=out5[..., s0:s1, :])
        else:
            out5[..., s0:s1, :] = y[..., :dv] / den

    return put


def _run_ratio(prob, a, b, w, out5, eps, chunk, f, ref=None):
    """Run the scan with values ``[v, 1]`` and write numerator / denominator into ``out5``."""
    xp, dv = prob.xp, prob.dv
    rows = _block_rows(xp, _heads(out5), chunk, f + 2 * (dv + 1))
    _scan(
        xp, a, b, w, _ratio_writer(xp, out5, dv, eps), sa=prob.sq, sb=prob.sk,
        off=prob.offset, causal=prob.causal,
        state=_zeros_state(xp, out5.shape[0], f, dv + 1, prob.cdtype), ref=ref, chunk=chunk,
        rows=rows,
    )


@dlpack_interop
def linear_attention_backward(
    dout, q, k, v, /, *, feature_map="elu", causal=False, eps=1e-6, chunk_size=None
):
    """Gradient of :func:`linear_attention`: ``(dq, dk, dv)`` for the upstream ``dout``.

    With ``n_i = phi(q_i)^T S_i``, ``d_i = phi(q_i)^T z_i + eps`` and ``g_i = dout_i``, let
    ``u_i = [g_i / d_i, -(g_i . out_i) / d_i]``. Then ``dphi(q_i) = sum_j (u_i . [v_j, 1])
    phi(k_j)`` over the keys query ``i`` sees, ``dphi(k_j) = sum_i (u_i . [v_j, 1]) phi(q_i)``
    and ``dv_j = sum_i (phi(k_j) . phi(q_i)) g_i / d_i`` over the queries that see key ``j``:
    the same chunked scans as the forward pass, the key-side ones run backwards (suffix sums),
    so memory stays O(S) and no ``S x S`` matrix is formed.

    Parameters
    ----------
    dout : array ``(..., Hq, Sq, Dv)``
        Gradient of the loss with respect to the output.
    q, k, v : arrays
        The forward inputs.
    feature_map, causal, eps, chunk_size
        As in the forward call; ``feature_map`` must be ``"elu"`` or ``"relu"`` (the gradient
        of a user callable is unknown here). ``relu``'s derivative at 0 is taken as 0.

    Returns
    -------
    dq, dk, dv : arrays shaped and typed like ``q``, ``k``, ``v``
        GQA: the gradients of the query heads sharing a kv head are summed into dk/dv.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((50, 8)) for _ in range(3))
    >>> g = rng.standard_normal((50, 8))
    >>> dq, dk, dv = xattn.linear_attention_backward(g, q, k, v, causal=True)
    >>> h = 1e-6; q2 = q.copy(); q2[3, 2] += h                      # finite difference
    >>> fd = (g * (xattn.linear_attention(q2, k, v, causal=True)
    ...            - xattn.linear_attention(q, k, v, causal=True))).sum() / h
    >>> bool(abs(fd - dq[3, 2]) < 1e-5)
    True
    """
    prob, eps, chunk, phi, dphi = _validate_linear(
        q, k, v, causal, eps, chunk_size, feature_map, extra=(("dout", dout),)
    )
    if dphi is None:
        raise ValueError(
            "feature_map: linear_attention_backward supports 'elu' and 'relu' only, got a "
            "callable (its derivative is unknown)"
        )
    check_same_shape("dout", dout, prob.out_shape)
    xp, cd, g = prob.xp, prob.cdtype, prob.group
    q5, k5, v5 = _grouped(q, prob, g), _grouped(k, prob, 1), _grouped(v, prob, 1)
    g5 = _grouped(dout, prob, g)
    dq5, dk5, dv5 = (xp.empty(x.shape, dtype=prob.dtype) for x in (q5, k5, v5))

    def job(h):
        dq5[h], dk5[h], dv5[h] = _linear_backward_heads(
            prob, *(x[h].astype(cd, copy=False) for x in (g5, q5, k5, v5)),
            phi=phi, dphi=dphi, eps=eps, chunk=chunk,
        )

    _run_jobs(xp, job, _head_jobs(xp, q5.shape[0]))
    return dq5.reshape(q.shape), dk5.reshape(k.shape), dv5.reshape(v.shape)


def _linear_backward_heads(prob, g5, q5, k5, v5, *, phi, dphi, eps, chunk):
    """(dq, dk, dv) in the compute dtype for one slice of heads (arrays ``(n, 1, G, S, .)``)."""
    xp, cd, g, dv = prob.xp, prob.cdtype, prob.group, prob.dv
    fq, fk = phi(q5, "q"), phi(k5, "k")
    v1 = _with_ones(xp, v5)
    sq, sk, f = prob.sq, prob.sk, fq.shape[-1]
    rows = _block_rows(xp, q5.shape[0] * g, chunk, 2 * f + 2 * (dv + 1))

    def run(a, b, w, sa, sb, off, e, groups, reverse=False):
        res = xp.empty((q5.shape[0], 1, groups, sa, e), dtype=cd)

        def put(s0, s1, y):
            if y is None:
                res[..., s0:s1, :] = 0
            elif reverse:
                res[..., sa - s1:sa - s0, :] = y[..., ::-1, :]
            else:
                res[..., s0:s1, :] = y

        src_a, src_b, src_w = _slicer(a), _slicer(b, pair=True), _slicer(w)
        if reverse:
            src_a = _reversed(src_a, sa)
            src_b = _reversed(src_b, sb, pair=True)
            src_w = _reversed(src_w, sb)
        _scan(
            xp, src_a, src_b, src_w, put, sa=sa, sb=sb, off=off, causal=prob.causal,
            state=_zeros_state(xp, q5.shape[0], b.shape[-1], e, cd), ref=None, chunk=chunk,
            rows=rows,
        )
        return res

    # Forward again, numerator and normaliser: y = [n, d - eps].
    y = run(fq, fk, v1, sq, sk, prob.offset, dv + 1, g)
    den = y[..., dv:] + eps
    den = xp.where(den > 0, den, 1)
    out = y[..., :dv] / den
    u = xp.concatenate([g5 / den, -(g5 * out).sum(axis=-1, keepdims=True) / den], axis=-1)
    del y, out
    dfq = run(u, v1, fk, sq, sk, prob.offset, f, g)
    # Key side: key j (reversed order) sees query i (reversed) iff i <= j: offset 0.
    dfk = run(v1, u, fq, sk, sq, 0, f, 1, reverse=True)
    dv_ = run(fk, fq, u[..., :dv], sk, sq, 0, dv, 1, reverse=True)
    return dfq * dphi(q5), dfk * dphi(k5), dv_


# --- Performer (FAVOR+) ---------------------------------------------------------------------------


def default_num_features(head_dim):
    """``round(D ln D)`` features (at least 1), the Performer paper's recommendation."""
    return max(1, int(round(head_dim * math.log(head_dim))))


def performer_projection(num_features, head_dim, *, orthogonal=True, seed=None, xp=None):
    """Draw a FAVOR+ random projection ``W`` of shape ``(num_features, head_dim)``.

    Each row ``w_r`` is marginally a standard normal vector, so that the positive features
    ``exp(w_r . x - |x|^2 / 2)`` give an unbiased estimate of ``exp(x . y)``. With
    ``orthogonal=True`` rows come in blocks of ``head_dim`` mutually orthogonal directions (the
    Q factor of the QR decomposition of a Gaussian matrix, signs fixed so it is Haar
    distributed) whose lengths are drawn independently from the chi distribution with
    ``head_dim`` degrees of freedom; orthogonality lowers the estimator's variance. With
    ``orthogonal=False`` the rows are i.i.d. Gaussian.

    Parameters
    ----------
    num_features : int
        Number of random features ``m`` (>= 1).
    head_dim : int
        ``D`` of the queries and keys (>= 1).
    orthogonal : bool
        Orthogonal blocks (default) or i.i.d. rows.
    seed : None, int, numpy.random.Generator or SeedSequence
        Drawn on the host with :func:`numpy.random.default_rng`: the same seed gives the same
        projection on every device. Redraw by passing a new seed.
    xp : module, optional
        ``numpy`` (default) or ``cupy``: the namespace of the returned array.

    Returns
    -------
    projection : float64 array ``(num_features, head_dim)``

    Examples
    --------
    >>> import numpy as np, xattn
    >>> w = xattn.performer_projection(6, 4, seed=0)
    >>> w.shape
    (6, 4)
    >>> g = w[:4] @ w[:4].T                        # the first block is orthogonal
    >>> bool(np.allclose(g - np.diag(np.diag(g)), 0))
    True
    """
    m = check_positive_int("num_features", num_features)
    d = check_positive_int("head_dim", head_dim)
    orthogonal = check_bool("orthogonal", orthogonal)
    if xp is not None and getattr(xp, "__name__", None) not in ("numpy", "cupy"):
        raise TypeError(f"xp: expected the numpy or cupy module, got {xp!r}")
    rng = check_seed("seed", seed)
    if orthogonal:
        qm, r = np.linalg.qr(rng.standard_normal((-(-m // d), d, d)))
        # Fixing the signs of R's diagonal makes Q Haar distributed (Mezzadri 2007).
        qm = qm * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
        w = qm.swapaxes(-1, -2).reshape(-1, d)[:m]
        w = w * np.sqrt(rng.chisquare(d, size=m))[:, None]
    else:
        w = rng.standard_normal((m, d))
    if xp is not None and xp.__name__ == "cupy":
        return xp.asarray(w)
    return w


def _performer_log_features(x, projection, xp=np):
    """``W x' - |x'|^2 / 2`` with ``x' = x D^(-1/4)``: the log of the FAVOR+ features.

    ``exp`` of it times ``m^(-1/2)`` is the paper's ``phi(x)``; the constant cancels in the
    attention's normalisation and the stabilisers are applied by the callers.
    """
    d = x.shape[-1]
    x = x * (d ** -0.25)
    return x @ projection.T - 0.5 * (x * x).sum(axis=-1, keepdims=True)


def _performer_features(x, projection, xp=np):
    """The unstabilised FAVOR+ features ``m^(-1/2) exp(W x' - |x'|^2 / 2)`` (tests, docs)."""
    m = projection.shape[0]
    return xp.exp(_performer_log_features(x, projection, xp)) / math.sqrt(m)


@dlpack_interop
def performer_attention(
    q, k, v, /, *, num_features=None, causal=False, orthogonal=True, projection=None, seed=None
):
    """Performer (FAVOR+) attention: softmax attention approximated with random features.

    Positive random features ``phi(x) = m^(-1/2) exp(W x' - |x'|^2 / 2)`` on ``x' = x D^(-1/4)``
    satisfy ``E[phi(q) . phi(k)] = exp(q . k / sqrt(D))``, so
    ``phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j)`` estimates softmax attention
    with the default scale in O(S * m * Dv) time and memory linear in S (Choromanski et al.
    2021). ``causal=True`` gives the causal (bottom-right aligned) version by the chunked scan
    of :func:`linear_attention`.

    The exponentials are stabilised so float32 (and 16-bit inputs, computed in float32) never
    overflow: each query's features are divided by their own maximum, each key's by its own
    maximum ``exp(c_j)``, and the factor ``exp(c_j)`` is restored relative to ``M_i``, the
    largest ``c_j`` among the keys query ``i`` sees. Every factor cancels between numerator
    and normaliser, and with ``causal=True`` no later key can change an earlier output (a
    maximum over all keys would let it, through rounding and underflow).

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, Sq, D)``, ``(..., Hkv, Sk, D)``, ``(..., Hkv, Sk, Dv)``
        NumPy or CuPy; float16, bfloat16, float32 or float64. GQA/MQA when ``Hkv < Hq``.
    num_features : int, optional
        Number of random features ``m``; default ``round(D ln D)``. Ignored (but checked
        against it) when ``projection`` is given.
    causal : bool
        Query ``i`` attends to keys ``j <= i + Sk - Sq``.
    orthogonal : bool
        Orthogonal random features (default) or i.i.d. ones, see :func:`performer_projection`.
    projection : array ``(m, D)``, optional
        A projection from :func:`performer_projection` (same namespace as ``q``), reused
        across calls; redraw it by making a new one. Overrides ``orthogonal`` and ``seed``.
    seed : None, int or numpy.random.Generator
        Seed for a fresh projection when ``projection`` is None. ``None`` draws a new one on
        every call (the estimate is then random).

    Returns
    -------
    out : array ``(..., Hq, Sq, Dv)`` in the input dtype and namespace.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (0.5 * rng.standard_normal((200, 16)) for _ in range(3))
    >>> exact = xattn.standard_attention(q, k, v)
    >>> approx = xattn.performer_attention(q, k, v, num_features=1024, seed=0)
    >>> err = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    >>> bool(err < 0.1)
    True
    """
    prob = validate_attention(q, k, v, causal=causal)
    xp, cd, g, d = prob.xp, prob.cdtype, prob.group, prob.d
    m = check_positive_int("num_features", num_features, allow_none=True)
    if projection is None:
        w_proj = performer_projection(
            m or default_num_features(d), d, orthogonal=orthogonal, seed=seed, xp=xp
        )
    else:
        array_namespace(q, projection, names=("q", "projection"))
        if projection.ndim != 2 or projection.shape[1] != d or projection.shape[0] < 1:
            raise ValueError(
                f"projection: expected shape (num_features, {d}) for head_dim {d}, "
                f"got {tuple(projection.shape)}"
            )
        if m is not None and projection.shape[0] != m:
            raise ValueError(
                f"num_features: {m} does not match projection shape {tuple(projection.shape)}"
            )
        if not supported_dtype(projection.dtype):
            raise TypeError(f"projection: expected a floating dtype, got {projection.dtype}")
        w_proj = projection
    w_proj = w_proj.astype(cd, copy=False)
    q5, k5, v5 = _grouped(q, prob, g), _grouped(k, prob, 1), _grouped(v, prob, 1)
    out5 = xp.empty((*q5.shape[:-1], prob.dv), dtype=prob.dtype)

    def job(h):
        qh, kh, vh = q5[h], k5[h], v5[h]

        def a(s0, s1):
            lf = _performer_log_features(qh[..., s0:s1, :].astype(cd, copy=False), w_proj, xp)
            return xp.exp(lf - lf.max(axis=-1, keepdims=True))

        def b(s0, s1):
            lf = _performer_log_features(kh[..., s0:s1, :].astype(cd, copy=False), w_proj, xp)
            c = lf.max(axis=-1, keepdims=True)
            return xp.exp(lf - c), c[..., 0]

        def w(s0, s1):
            return _with_ones(xp, vh[..., s0:s1, :].astype(cd, copy=False))

        ref = xp.full((qh.shape[0], 1, 1), -math.inf, dtype=cd)
        _run_ratio(prob, a, b, w, out5[h], 0.0, DEFAULT_CHUNK, w_proj.shape[0], ref=ref)

    _run_jobs(xp, job, _head_jobs(xp, q5.shape[0]))
    return out5.reshape(prob.out_shape)
