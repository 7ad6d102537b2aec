"""Linear attention and the Performer against the float64 formulas of issue 4.

The oracle here is the quadratic form written out in float64 on the host: ``W = phi(Q) phi(K)^T``
(GQA heads expanded with ``np.repeat``, the bottom-right causal mask applied to ``W``), then
``W V / (W 1 + eps)``. It is the definition, with no chunks, no state and no stabiliser.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BF16, random_array
from hypothesis import given, settings
from hypothesis import strategies as st

import xattn
import xattn.linear as lin
from xattn.testing import assert_close, reference_attention, to_numpy

# --- float64 oracles ----------------------------------------------------------------------------


def _elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _relu(x):
    return np.maximum(x, 0.0)


PHI = {"elu": _elu1, "relu": _relu}


def _expand(x, hq):
    return x if x.ndim == 2 else np.repeat(x, hq // x.shape[-3], axis=-3)


def linear_ref(q, k, v, phi, *, causal=False, eps=1e-6):
    """``W V / (W 1 + eps)`` with ``W = phi(Q) phi(K)^T`` (masked), in float64."""
    q, k, v = (to_numpy(x) for x in (q, k, v))
    hq = q.shape[-3] if q.ndim > 2 else 1
    k, v = _expand(k, hq), _expand(v, hq)
    w = phi(q) @ np.swapaxes(phi(k), -1, -2)
    sq, sk = w.shape[-2:]
    if causal:
        w = w * (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq)
    den = w.sum(axis=-1, keepdims=True) + eps
    return (w @ v) / np.where(den > 0, den, 1.0)


def performer_ref(q, k, v, projection, *, causal=False):
    """The Performer's estimate with unstabilised float64 features."""

    def phi(x):
        return lin._performer_features(x, to_numpy(projection))

    return linear_ref(q, k, v, phi, causal=causal, eps=0.0)


# Shapes: (q shape, k shape, Dv). GQA, MQA, Sq != Sk both ways, 2-D, batch dims, Dv != D.
SHAPES = {
    "mha": ((2, 3, 70, 16), (2, 3, 70, 16), 16),
    "gqa": ((1, 4, 90, 8), (1, 2, 90, 8), 5),
    "mqa_sq<sk": ((3, 40, 12), (1, 130, 12), 12),
    "sq>sk": ((2, 2, 150, 8), (2, 1, 61, 8), 7),
    "2d": ((77, 8), (77, 8), 3),
    "batch2": ((2, 2, 2, 33, 4), (2, 2, 1, 33, 4), 6),
}


def make(rng, name, dtype=np.float64, scale=1.0):
    qs, ks, dv = SHAPES[name]
    return (
        random_array(rng, qs, dtype, scale),
        random_array(rng, ks, dtype, scale),
        random_array(rng, (*ks[:-1], dv), dtype, scale),
    )


# --- linear_attention: the formulas ---------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_linear_formula_float64(rng, shape, causal, feature_map):
    q, k, v = make(rng, shape)
    out = xattn.linear_attention(q, k, v, feature_map=feature_map, causal=causal)
    ref = linear_ref(q, k, v, PHI[feature_map], causal=causal)
    assert_close(out, ref, xp=np, dtype=np.float64)


@pytest.mark.parametrize("chunk", [1, 7, 64, 150])
@pytest.mark.parametrize("shape", ["mha", "gqa", "sq>sk", "mqa_sq<sk"])
def test_causal_chunk_sizes(rng, chunk, shape):
    q, k, v = make(rng, shape)
    out = xattn.linear_attention(q, k, v, causal=True, chunk_size=chunk)
    assert_close(out, linear_ref(q, k, v, _elu1, causal=True), xp=np, dtype=np.float64)


@pytest.mark.parametrize("block_elems", [1, 900, 5000])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_many_blocks_and_a_tail(rng, monkeypatch, block_elems, causal):
    # Tiny blocks: many blocks of chunks, a partial last block and a chunk tail.
    monkeypatch.setitem(lin._BLOCK_ELEMS, "cpu", block_elems)
    q, k, v = make(rng, "gqa")
    out = xattn.linear_attention(q, k, v, causal=causal, chunk_size=7)
    assert_close(out, linear_ref(q, k, v, _elu1, causal=causal), xp=np, dtype=np.float64)


@pytest.mark.parametrize("threads", ["2", "3"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("shape", ["2d", "mqa_square"])
def test_sequence_split(rng, monkeypatch, threads, chunk, shape):
    # One head on several threads: the causal scan runs in sequence parts, corrected after.
    monkeypatch.setenv("XATTN_NUM_THREADS", threads)
    monkeypatch.setattr(lin, "_SPLIT_MIN_ROWS", 10)
    monkeypatch.setitem(lin._BLOCK_ELEMS, "cpu", 3000)
    if shape == "2d":
        q, k, v = make(rng, "2d")
    else:
        q, k = rng.standard_normal((1, 3, 95, 8)), rng.standard_normal((1, 1, 95, 8))
        v = rng.standard_normal((1, 1, 95, 5))
    assert lin._sequence_parts(np, _prob(q, k, v), 1, chunk) is not None
    for eps in (1e-6, 0.0):
        out = xattn.linear_attention(q, k, v, causal=True, chunk_size=chunk, eps=eps)
        ref = linear_ref(q, k, v, _elu1, causal=True, eps=eps)
        assert_close(out, ref, xp=np, dtype=np.float64)
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    out16 = xattn.linear_attention(q16, k16, v16, causal=True)
    ref16 = linear_ref(q16, k16, v16, _elu1, causal=True)
    assert_close(out16, ref16, xp=np, dtype=np.float16, atol=2e-3, rtol=2e-3)


def _prob(q, k, v):
    from xattn._array import validate_attention

    return validate_attention(q, k, v, causal=True)


def test_eps_and_empty_rows(rng):
    q, k, v = make(rng, "sq>sk")
    out = xattn.linear_attention(q, k, v, causal=True, eps=0.0, feature_map="relu")
    ref = linear_ref(q, k, v, _relu, causal=True, eps=0.0)
    assert_close(out, ref, xp=np, dtype=np.float64)
    # queries before Sq - Sk see no key: exactly zero, not NaN
    assert not np.any(out[..., : q.shape[-2] - k.shape[-2], :])
    out1 = xattn.linear_attention(q, k, v, eps=0.5)
    assert_close(out1, linear_ref(q, k, v, _elu1, eps=0.5), xp=np, dtype=np.float64)


def test_callable_feature_map(rng):
    # A feature map with more features than head_dim (F = 2 D).
    def phi(x):
        return np.concatenate([np.exp(x - 2.0), x * x], axis=-1)

    q, k, v = make(rng, "gqa")
    for causal in (False, True):
        out = xattn.linear_attention(q, k, v, feature_map=phi, causal=causal, chunk_size=16)
        assert_close(out, linear_ref(q, k, v, phi, causal=causal), xp=np, dtype=np.float64)


def test_non_contiguous_inputs(rng):
    q, k, v = make(rng, "mha")
    qt = np.ascontiguousarray(np.swapaxes(q, -1, -2)).swapaxes(-1, -2)
    kt = k[:, ::-1][:, ::-1]
    vt = np.asfortranarray(v)
    out = xattn.linear_attention(qt, kt, vt, causal=True, chunk_size=9)
    assert_close(out, linear_ref(q, k, v, _elu1, causal=True), xp=np, dtype=np.float64)


DTYPES_16 = [
    pytest.param(np.dtype(np.float16), id="float16"),
    pytest.param(BF16, id="bfloat16", marks=() if BF16 is not None else pytest.mark.skip()),
    pytest.param(np.dtype(np.float32), id="float32"),
]


@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision(rng, dtype, causal):
    # Computed in float32: the error is the output rounding plus float32 sums.
    q, k, v = make(rng, "gqa", dtype)
    out = xattn.linear_attention(q, k, v, causal=causal)
    ref = linear_ref(q, k, v, _elu1, causal=causal)
    tol = {2: 2 * float(np.finfo(np.float16).eps), 4: 2e-5}[dtype.itemsize]
    if BF16 is not None and dtype == BF16:
        tol = 2 * 2.0**-8
    assert_close(out, ref, xp=np, dtype=dtype, atol=tol, rtol=tol)


# --- backward -----------------------------------------------------------------------------------


def _fd_grads(fn, arrays, dout, h=1e-6):
    """Central finite differences of ``sum(dout * fn(*arrays))`` for every input element."""
    grads = []
    for i, x in enumerate(arrays):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xs = list(arrays)
            xp_, xm_ = x.copy(), x.copy()
            xp_[idx] += h
            xm_[idx] -= h
            xs[i] = xp_
            fp = (dout * fn(*xs)).sum()
            xs[i] = xm_
            g[idx] = (fp - (dout * fn(*xs)).sum()) / (2 * h)
        grads.append(g)
    return grads


BACKWARD_SHAPES = {
    "gqa": ((1, 4, 11, 3), (1, 2, 11, 3), 2),
    "sq<sk": ((2, 6, 3), (1, 13, 3), 4),
    "sq>sk": ((12, 3), (5, 3), 2),
}


@pytest.mark.parametrize("shape", list(BACKWARD_SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_backward_finite_differences(rng, shape, causal, feature_map):
    qs, ks, dv = BACKWARD_SHAPES[shape]
    q, k = rng.standard_normal(qs), rng.standard_normal(ks)
    v = rng.standard_normal((*ks[:-1], dv))
    dout = rng.standard_normal((*qs[:-1], dv))
    opts = dict(feature_map=feature_map, causal=causal, chunk_size=4)
    dq, dk, dv_ = xattn.linear_attention_backward(dout, q, k, v, **opts)
    fd = _fd_grads(lambda a, b, c: xattn.linear_attention(a, b, c, **opts), (q, k, v), dout)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv_), fd, strict=True):
        assert_close(got, want, xp=np, dtype=np.float64, atol=1e-7, rtol=1e-6, name=name)


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_backward_low_precision(rng, dtype):
    q, k, v = make(rng, "gqa", dtype)
    dout = random_array(rng, (*q.shape[:-1], v.shape[-1]), dtype)
    got = xattn.linear_attention_backward(dout, q, k, v, causal=True)
    want = xattn.linear_attention_backward(*(to_numpy(x) for x in (dout, q, k, v)), causal=True)
    tol = 2e-5 if dtype.itemsize == 4 else 2e-2
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, (q, k, v), strict=True):
        assert g.shape == x.shape
        scale = np.abs(w).max()
        assert_close(g, w, xp=np, dtype=dtype, atol=tol * scale, rtol=tol, name=name)


def test_backward_many_blocks(rng, monkeypatch):
    monkeypatch.setitem(lin._BLOCK_ELEMS, "cpu", 700)
    q, k, v = make(rng, "mqa_sq<sk")
    dout = rng.standard_normal((*q.shape[:-1], v.shape[-1]))
    got = xattn.linear_attention_backward(dout, q, k, v, causal=True, chunk_size=5)
    monkeypatch.setitem(lin._BLOCK_ELEMS, "cpu", 1 << 21)
    want = xattn.linear_attention_backward(dout, q, k, v, causal=True, chunk_size=200)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, xp=np, dtype=np.float64)


# --- Performer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["mha", "gqa", "mqa_sq<sk", "sq>sk", "2d"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_formula_float64(rng, shape, causal):
    q, k, v = make(rng, shape)
    d = q.shape[-1]
    w = xattn.performer_projection(3 * d + 1, d, seed=int(rng.integers(1 << 30)))
    out = xattn.performer_attention(q, k, v, causal=causal, projection=w)
    ref = performer_ref(q, k, v, w, causal=causal)
    assert_close(out, ref, xp=np, dtype=np.float64, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_many_chunks(rng, monkeypatch, group, causal):
    # Small chunks, blocks and prefix groups: every level of the causal scan is exercised.
    monkeypatch.setitem(lin._BLOCK_ELEMS, "cpu", 20000)
    monkeypatch.setattr(lin, "_PREFIX_GROUP", group)
    monkeypatch.setattr(lin, "DEFAULT_CHUNK", 4)
    q, k, v = make(rng, "gqa", scale=2.0)
    w = xattn.performer_projection(20, 8, seed=4)
    out = xattn.performer_attention(q, k, v, causal=causal, projection=w)
    ref = performer_ref(q, k, v, w, causal=causal)
    assert_close(out, ref, xp=np, dtype=np.float64, atol=1e-9, rtol=1e-9)


def test_performer_large_logits_float32(rng):
    # |q|, |k| ~ 3 sqrt(D): unstabilised features would overflow float32 (exp(> 88)).
    q, k, v = make(rng, "gqa", np.float32, scale=3.0)
    w = xattn.performer_projection(64, 8, seed=3)
    for causal in (False, True):
        out = xattn.performer_attention(q, k, v, causal=causal, projection=w)
        ref = performer_ref(q, k, v, w, causal=causal)
        assert np.isfinite(out).all()
        assert_close(out, ref, xp=np, dtype=np.float32, atol=1e-4, rtol=1e-4)


def test_performer_seed_and_projection(rng):
    q, k, v = make(rng, "gqa")
    a = xattn.performer_attention(q, k, v, num_features=20, seed=5)
    b = xattn.performer_attention(q, k, v, projection=xattn.performer_projection(20, 8, seed=5))
    np.testing.assert_array_equal(a, b)
    c = xattn.performer_attention(q, k, v, num_features=20, seed=6)
    assert not np.allclose(a, c)
    default = xattn.performer_attention(q, k, v, seed=5)
    m = lin.default_num_features(8)
    assert m == round(8 * math.log(8))
    np.testing.assert_array_equal(
        default, xattn.performer_attention(q, k, v, num_features=m, seed=5)
    )


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_projection_distribution(orthogonal):
    d, m = 8, 20
    w = xattn.performer_projection(m, d, orthogonal=orthogonal, seed=0)
    assert w.shape == (m, d) and w.dtype == np.float64
    if orthogonal:
        for b0 in range(0, m, d):
            blk = w[b0 : b0 + d]
            g = blk @ blk.T
            np.testing.assert_allclose(g - np.diag(np.diag(g)), 0, atol=1e-12)
    # Rows are marginally N(0, I): squared norms average to d (chi^2 with d dof).
    norms = np.concatenate(
        [
            (xattn.performer_projection(m, d, orthogonal=orthogonal, seed=s) ** 2).sum(1)
            for s in range(200)
        ]
    )
    assert abs(norms.mean() - d) < 4 * math.sqrt(2 * d / norms.size)


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_performer_kernel_unbiased(rng, orthogonal):
    # E[phi(q).phi(k)] = exp(q.k / sqrt(d)) over the draws of the projection. One projection of
    # n blocks of d rows holds n independent draws of a d-feature estimator (the blocks are
    # independent); the tolerance is 4 standard errors estimated from those n draws.
    # |q|, |k| ~ 1.5 with q.k > 0: large enough that a wrong row-norm law shows as bias.
    d, n = 6, 6000
    u = rng.standard_normal(d)
    q = 1.5 * u / np.linalg.norm(u)
    k = q + 0.3 * rng.standard_normal(d) / math.sqrt(d)
    want = math.exp(q @ k / math.sqrt(d))

    def draws(w):
        prod = lin._performer_features(q, w) * lin._performer_features(k, w) * (n * d)
        return prod.reshape(n, d).mean(axis=1)

    w = xattn.performer_projection(n * d, d, orthogonal=orthogonal, seed=11)
    est = draws(w)
    se = est.std(ddof=1) / math.sqrt(n)
    assert abs(est.mean() - want) < 4 * se, (est.mean(), want, se)
    # The test has power: rows of fixed length sqrt(d) (a common bug) are biased beyond it.
    bad = draws(w / np.linalg.norm(w, axis=1, keepdims=True) * math.sqrt(d))
    assert abs(bad.mean() - want) > 5 * se, (bad.mean(), want, se)


def test_performer_error_falls_with_features(rng):
    # Averaged over seeds, the relative error against exact softmax attention falls roughly
    # like m^(-1/2) once m is large enough: 16 -> 1024 features (8x in theory) must cut it by
    # more than 4x. Moderate logits (|q.k| / sqrt(D) ~ 0.25) keep the estimator's variance
    # in the regime where that rate shows at these m.
    q, k = (0.5 * rng.standard_normal((2, 128, 16)) for _ in range(2))
    v = rng.standard_normal((2, 128, 16))
    exact, _, _ = reference_attention(q, k, v)
    errs = []
    for m in (16, 64, 256, 1024):
        e = [
            np.linalg.norm(xattn.performer_attention(q, k, v, num_features=m, seed=s) - exact)
            / np.linalg.norm(exact)
            for s in range(6)
        ]
        errs.append(float(np.mean(e)))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < errs[0] / 4, errs


# --- causality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "performer"])
@pytest.mark.parametrize("t", [0, 37, 64, 80])
def test_causal_prefix_independence(rng, kind, t):
    # Replace keys/values after t by huge ones. A stabiliser built from a maximum over all keys
    # would shift (and underflow) the earlier keys' features; outputs < t must not move at all.
    q, k, v = make(rng, "gqa", np.float32)
    w = xattn.performer_projection(24, 8, seed=1)
    k2, v2 = k.copy(), v.copy()
    k2[..., t + 1 :, :] = 40.0 * rng.standard_normal(k2[..., t + 1 :, :].shape)
    v2[..., t + 1 :, :] = 1e4

    def f(kk, vv):
        if kind == "linear":
            return xattn.linear_attention(q, kk, vv, causal=True, chunk_size=16)
        return xattn.performer_attention(q, kk, vv, causal=True, projection=w)

    a, b = f(k, v), f(k2, v2)
    np.testing.assert_array_equal(a[..., : t + 1, :], b[..., : t + 1, :])
    assert not np.allclose(a[..., t + 1 :, :], b[..., t + 1 :, :])


@settings(max_examples=25, deadline=None)
@given(
    sq=st.integers(1, 40),
    sk=st.integers(1, 40),
    chunk=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_permutations_property(sq, sk, chunk, seed):
    # Non-causal: permuting keys and values together changes nothing; permuting queries
    # permutes the output rows. Causal: the last query sees every key, so it is invariant too.
    r = np.random.default_rng(seed)
    q, k = r.standard_normal((2, sq, 4)), r.standard_normal((1, sk, 4))
    v = r.standard_normal((1, sk, 3))
    pk, pq = r.permutation(sk), r.permutation(sq)
    out = xattn.linear_attention(q, k, v, chunk_size=chunk)
    np.testing.assert_allclose(
        xattn.linear_attention(q[:, pq], k[:, pk], v[:, pk], chunk_size=chunk), out[:, pq],
        rtol=1e-12, atol=1e-12,
    )
    c = xattn.linear_attention(q, k, v, causal=True, chunk_size=chunk)
    cp_ = xattn.linear_attention(q, k[:, pk], v[:, pk], causal=True, chunk_size=chunk)
    np.testing.assert_allclose(cp_[:, -1], c[:, -1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c[:, -1], out[:, -1], rtol=1e-12, atol=1e-12)


# --- long fp16 sequences ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_fp16_long_sequence_finite(rng, kind):
    # S = 65536 fp16: sums of features reach ~1e5-1e6, beyond fp16's 65504; values of scale 2
    # make elu features large too. Accumulation in float32 keeps everything finite, and the
    # result equals the float32 computation on the same (exactly representable) inputs.
    s, d = 65536, 64
    q, k, v = (random_array(rng, (1, s, d), np.float16, 2.0) for _ in range(3))
    if kind == "linear":

        def f(*x):
            return xattn.linear_attention(*x, causal=True)
    else:
        w = xattn.performer_projection(64, d, seed=0)

        def f(*x):
            return xattn.performer_attention(*x, causal=True, projection=w)

    out = f(q, k, v)
    assert out.dtype == np.float16
    assert np.isfinite(out).all()
    ref = f(*(x.astype(np.float32) for x in (q, k, v)))
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=4e-3, rtol=2e-3)


# --- bad inputs ---------------------------------------------------------------------------------


def _qkv(rng):
    return make(rng, "gqa", np.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(eps=-1e-3), ValueError, "eps: expected a number >= 0"),
        (dict(eps=float("nan")), ValueError, "eps: expected a finite number"),
        (dict(feature_map="softmax"), ValueError, "feature_map: expected one of"),
        (dict(feature_map=lambda x: x), ValueError, "feature_map: features must be non-neg"),
        (dict(feature_map=lambda x: np.abs(x)[..., :-1, :]), ValueError, "expected features of"),
        (dict(feature_map=lambda x: list(x)), TypeError, "feature_map: must return an array"),
        (dict(feature_map=lambda x: (x > 0)), TypeError, "floating features"),
        (dict(chunk_size=0), ValueError, "chunk_size: expected a positive int"),
        (dict(chunk_size=2.5), TypeError, "chunk_size: expected a positive int"),
        (dict(causal="yes"), TypeError, "causal: expected a bool"),
    ],
)
def test_linear_bad_options(rng, kwargs, exc, match):
    q, k, v = _qkv(rng)
    with pytest.raises(exc, match=match):
        xattn.linear_attention(q, k, v, **kwargs)


def test_feature_map_width_must_agree(rng):
    q, k, v = _qkv(rng)
    calls = []

    def phi(x):
        calls.append(1)
        return np.abs(np.concatenate([x] * len(calls), axis=-1))

    with pytest.raises(ValueError, match="q and k need the same number of features"):
        xattn.linear_attention(q, k, v, feature_map=phi)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 4, 9, 8), (1, 2, 9, 6), (1, 2, 9, 5)), r"k: expected head_dim 8"),
        (((1, 4, 9, 8), (1, 3, 9, 8), (1, 3, 9, 5)), r"multiple of k/v heads"),
        (((1, 4, 9, 8), (1, 2, 9, 8), (1, 2, 7, 5)), r"v: expected sequence length 9"),
        (((2, 4, 9, 8), (1, 2, 9, 8), (1, 2, 9, 5)), r"identical leading"),
    ],
)
@pytest.mark.parametrize("fn", ["linear", "performer"])
def test_mismatched_shapes(rng, shapes, match, fn):
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    f = xattn.linear_attention if fn == "linear" else xattn.performer_attention
    with pytest.raises(ValueError, match=match):
        f(q, k, v)


def test_mixed_dtypes_and_types(rng):
    q, k, v = _qkv(rng)
    with pytest.raises(TypeError, match="share one dtype"):
        xattn.linear_attention(q, k.astype(np.float64), v)
    with pytest.raises(TypeError, match="v: expected a numpy.ndarray"):
        xattn.performer_attention(q, k, v.tolist())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_features=0), ValueError, r"num_features: expected a positive int \(>= 1\)"),
        (dict(num_features=-3), ValueError, "num_features"),
        (dict(num_features=2.0), TypeError, "num_features: expected a positive int"),
        (dict(projection=np.ones((5, 7))), ValueError, r"projection: expected shape"),
        (dict(projection=np.ones((5, 8)), num_features=6), ValueError, "does not match"),
        (dict(projection=np.ones((5, 8), dtype=np.int64)), TypeError, "floating dtype"),
        (dict(orthogonal=1), TypeError, "orthogonal: expected a bool"),
    ],
)
def test_performer_bad_options(rng, kwargs, exc, match):
    q, k, v = _qkv(rng)
    with pytest.raises(exc, match=match):
        xattn.performer_attention(q, k, v, **kwargs)


def test_projection_bad_args():
    with pytest.raises(ValueError, match="num_features"):
        xattn.performer_projection(0, 4)
    with pytest.raises(ValueError, match="head_dim"):
        xattn.performer_projection(4, 0)
    with pytest.raises(TypeError, match="xp: expected the numpy or cupy module"):
        xattn.performer_projection(4, 4, xp=math)


def test_backward_bad_inputs(rng):
    q, k, v = _qkv(rng)
    dout = np.ones((*q.shape[:-1], v.shape[-1]), np.float32)
    with pytest.raises(ValueError, match="dout: expected shape"):
        xattn.linear_attention_backward(dout[..., :-1], q, k, v)
    with pytest.raises(ValueError, match="supports 'elu' and 'relu' only"):
        xattn.linear_attention_backward(dout, q, k, v, feature_map=np.abs)
    with pytest.raises(ValueError, match="eps"):
        xattn.linear_attention_backward(dout, q, k, v, eps=-1.0)


# --- CuPy ---------------------------------------------------------------------------------------


@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # noqa: BLE001 - any driver/runtime failure means no GPU here
        pytest.skip(f"no usable CUDA device: {exc}")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["gqa", "sq>sk", "mqa_sq<sk"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=lambda d: d.__name__)
def test_cupy_linear_and_performer(rng, cp, shape, causal, dtype):
    q, k, v = make(rng, shape, dtype)
    qc, kc, vc = (cp.asarray(x) for x in (q, k, v))
    tol = {8: 1e-10, 4: 3e-5, 2: 2e-3}[np.dtype(dtype).itemsize]
    out = xattn.linear_attention(qc, kc, vc, causal=causal, chunk_size=16)
    ref = linear_ref(q, k, v, _elu1, causal=causal)
    assert_close(out, ref, xp=cp, dtype=dtype, atol=tol, rtol=tol)
    w = xattn.performer_projection(40, q.shape[-1], seed=2, xp=cp)
    outp = xattn.performer_attention(qc, kc, vc, causal=causal, projection=w)
    refp = performer_ref(q, k, v, w, causal=causal)
    assert_close(outp, refp, xp=cp, dtype=dtype, atol=10 * tol, rtol=10 * tol)


@pytest.mark.gpu
def test_cupy_backward_and_prefix(rng, cp):
    q, k, v = make(rng, "gqa")
    dout = rng.standard_normal((*q.shape[:-1], v.shape[-1]))
    got = xattn.linear_attention_backward(*(cp.asarray(x) for x in (dout, q, k, v)), causal=True)
    want = xattn.linear_attention_backward(dout, q, k, v, causal=True)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, xp=cp, dtype=np.float64)
    qc, kc, vc = (cp.asarray(x.astype(np.float32)) for x in (q, k, v))
    w = xattn.performer_projection(24, 8, seed=1, xp=cp)
    k2, v2 = kc.copy(), vc.copy()
    k2[..., 41:, :] = 40.0
    v2[..., 41:, :] = 1e4
    a = xattn.performer_attention(qc, kc, vc, causal=True, projection=w)
    b = xattn.performer_attention(qc, k2, v2, causal=True, projection=w)
    cp.testing.assert_array_equal(a[..., :41, :], b[..., :41, :])
    with pytest.raises(TypeError, match="mix NumPy and CuPy"):
        xattn.performer_attention(qc, kc, vc, projection=xattn.performer_projection(8, 8))


@pytest.mark.parametrize("nb", [1, 5, 64, 65, 200])
def test_two_level_prefix(rng, nb):
    # The GPU's exclusive prefix sum of chunk states (two levels of triangular matmuls).
    kv = rng.standard_normal((2, 1, 1, nb, 3, 4))
    state = rng.standard_normal((2, 1, 1, 3, 4))
    prefix, total = lin._exclusive_prefix(np, kv, state)
    cum = np.cumsum(kv, axis=3)
    want = np.concatenate([np.zeros_like(kv[..., :1, :, :]), cum[..., :-1, :, :]], axis=3)
    np.testing.assert_allclose(prefix, want + state[..., None, :, :], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total, state + cum[..., -1, :, :], rtol=1e-12, atol=1e-12)
