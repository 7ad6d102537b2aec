"""Inputs a careless or hostile user passes: empty axes, garbage in hidden positions, wrong
``lse``, feature maps that write in place (#9 items 6, 8, 10, 11)."""

from __future__ import annotations

import numpy as np
import pytest

import xattn
from xattn import _masking
from xattn.testing import (
    assert_close,
    reference_attention,
    reference_attention_backward,
)

# --- empty inputs (item 8) --------------------------------------------------------------------

EMPTY = {
    "B=0": ((0, 2, 5, 4), (0, 2, 5, 4)),
    "Hq=0": ((1, 0, 5, 4), (1, 1, 5, 4)),
    "S=0": ((1, 2, 0, 4), (1, 2, 0, 4)),
    "Sq=0": ((1, 2, 0, 4), (1, 2, 5, 4)),
    "Sk=0": ((1, 2, 5, 4), (1, 2, 0, 4)),
    "2-D Sq=0": ((0, 4), (7, 4)),
}
EMPTY_OPTS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (2, 1)},
    "causal window": {"causal": True, "window": (2, None)},
    "mask alibi": {"mask": True, "alibi_slopes": True},
}


def _empty_case(shapes, opts, dtype=np.float32):
    qs, ks = shapes
    rng = np.random.default_rng(0)
    q = rng.standard_normal(qs).astype(dtype)
    k = rng.standard_normal(ks).astype(dtype)
    v = rng.standard_normal((*ks[:-1], 3)).astype(dtype)
    opts = dict(opts)
    hq = qs[-3] if len(qs) > 2 else 1
    if opts.pop("mask", False):
        opts["mask"] = np.ones((qs[-2], ks[-2]), bool)
    if opts.pop("alibi_slopes", False):
        opts["alibi_slopes"] = np.full(hq, 0.5, np.float32)
    return q, k, v, opts


@pytest.mark.parametrize("opts", list(EMPTY_OPTS.values()), ids=list(EMPTY_OPTS))
@pytest.mark.parametrize("shapes", list(EMPTY.values()), ids=list(EMPTY))
def test_empty_flash_forward_and_backward(backend, shapes, opts):
    q, k, v, opts = _empty_case(shapes, opts)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend=backend, **opts)
    ref_out, ref_lse, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref_out, xp=np, dtype=np.float32, name="out")
    assert_close(lse, ref_lse, xp=np, dtype=np.float32, name="lse")
    dout = np.ones_like(out)
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=backend, **opts)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, refs, (q, k, v), strict=True):
        assert g.shape == x.shape
        assert_close(g, r, xp=np, dtype=np.float32, name=name)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("shapes", list(EMPTY.values()), ids=list(EMPTY))
def test_empty_standard(shapes, dtype):
    q, k, v, opts = _empty_case(shapes, {"causal": True, "window": (3, 0)}, dtype)
    out, lse, w = xattn.standard_attention(q, k, v, return_lse=True, return_weights=True,
                                           **opts)
    ref_out, ref_lse, ref_w = reference_attention(q, k, v, **opts)
    assert out.dtype == dtype and w.dtype == dtype
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    for name, a, r in (("out", out, ref_out), ("lse", lse, ref_lse), ("w", w, ref_w)):
        assert a.shape == r.shape, name
        np.testing.assert_allclose(a.astype(np.float64), r, atol=2e-3, err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shapes", list(EMPTY.values()), ids=list(EMPTY))
def test_empty_linear_and_performer(shapes, causal):
    q, k, v, _ = _empty_case(shapes, {})
    for out in (
        xattn.linear_attention(q, k, v, causal=causal),
        xattn.linear_attention(q, k, v, causal=causal, feature_map=lambda x: x * x),
        xattn.performer_attention(q, k, v, causal=causal, seed=0),
    ):
        assert out.shape == (*q.shape[:-1], 3) and out.dtype == np.float32
        # A query that sees no key returns 0, as in flash_attention.
        assert not out.any()
    dout = np.ones((*q.shape[:-1], 3), np.float32)
    grads = xattn.linear_attention_backward(dout, q, k, v, causal=causal)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == np.float32 and not g.any()


# --- lse of the backward pass (item 10) ---------------------------------------------------------


@pytest.mark.parametrize("dtype,bad", [(np.float32, np.float16), (np.float32, np.float64),
                                       (np.float64, np.float32), (np.float16, np.float16)])
def test_backward_checks_lse_dtype(dtype, bad):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 40, 8)).astype(dtype) for _ in range(3))
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"lse: expected dtype float(32|64).*got " + np.dtype(
            bad).name):
        xattn.flash_attention_backward(np.ones_like(out), q, k, v, out, lse.astype(bad))


def test_backward_checks_lse_shape():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 40, 8)).astype(np.float32) for _ in range(3))
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"lse: expected shape \(2, 40\), got \(2, 40, 1\)"):
        xattn.flash_attention_backward(np.ones_like(out), q, k, v, out, lse[..., None])


# --- feature maps may write in place (item 11) ------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_in_place_feature_map_leaves_inputs_alone(causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 300, 8)).astype(np.float32) for _ in range(3))
    saved = [x.copy() for x in (q, k, v)]

    def square_in_place(x):
        np.multiply(x, x, out=x)
        return x

    out = xattn.linear_attention(q, k, v, causal=causal, feature_map=square_in_place)
    for x, s in zip((q, k, v), saved, strict=True):
        np.testing.assert_array_equal(x, s)
    ref = xattn.linear_attention(q, k, v, causal=causal, feature_map=lambda x: x * x)
    np.testing.assert_array_equal(out, ref)


# --- standard_attention's memory (item 7) -------------------------------------------------------


@pytest.mark.parametrize("opts", [
    {"causal": True},
    {"window": (300, 20), "alibi_slopes": np.array([0.5, 0.25], np.float32)},
    {"causal": True, "mask": np.tri(1500, 1500, 5, dtype=bool),
     "bias": np.full((1, 1500), 0.5, np.float32)},
], ids=["causal", "window alibi", "causal mask bias"])
def test_standard_peak_memory_is_what_it_counts(opts):
    """The traced peak of a first call (nothing cached) stays within the bytes that
    max_score_bytes is compared with: no int64 index grids, no full-size mod temporaries."""
    import tracemalloc

    from xattn.standard import _working_bytes

    rng = np.random.default_rng(1)
    s = 1500
    q, k, v = (rng.standard_normal((2, s, 16)).astype(np.float32) for _ in range(3))
    need = _working_bytes(xattn._array.validate_attention(q, k, v, **opts), False, 0)
    inputs = 4 * q.nbytes  # q, k, v-sized arrays (the output, the heads' views)
    _masking._VISIBILITY_CACHE.clear()
    tracemalloc.start()
    try:
        out = xattn.standard_attention(q, k, v, max_score_bytes=need, **opts)
        _, peak = tracemalloc.get_traced_memory()
        del out
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= need + inputs, (peak, need)
    assert retained < 2**20  # no (Sq, Sk) mask stays behind in a cache


def test_visibility_cache_is_bounded_by_bytes():
    rng = np.random.default_rng(2)
    for s in range(900, 1000, 7):  # distinct geometries, each (s, s) mask under the cap
        q = rng.standard_normal((s, 4)).astype(np.float32)
        xattn.standard_attention(q, q, q, causal=True)
        xattn.flash_attention(q, q, q, window=(5, 5), backend="numpy")
    cache = _masking._VISIBILITY_CACHE
    assert 0 < cache.nbytes <= _masking.VISIBILITY_CACHE_BYTES


# --- garbage in hidden positions (item 6) -------------------------------------------------------


def _grads(backend, dout, q, k, v, **opts):
    if backend == "standard":
        return None
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend=backend, **opts)
    return xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=backend, **opts)


def _forward(backend, q, k, v, **opts):
    if backend == "standard":
        return xattn.standard_attention(q, k, v, return_lse=True, **opts)
    return xattn.flash_attention(q, k, v, return_lse=True, backend=backend, **opts)


def _assert_same_nan_and_close(got, want, name, tol=2e-5):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, name
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN pattern")
    fin = ~np.isnan(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=tol, rtol=tol, err_msg=name)


@pytest.fixture(params=["numba", "numpy", "standard"])
def any_impl(request):
    """Each CPU flash backend, and standard_attention (forward only)."""
    if request.param == "numba":
        pytest.importorskip("numba")
        pytest.importorskip("threadpoolctl")
    return request.param


@pytest.mark.parametrize("rule", ["mask", "causal"])
def test_nan_value_of_a_hidden_key(any_impl, rule):
    """The issue's case: v[650] = NaN. Hidden from every row by a mask: no NaN anywhere.
    Under causal: NaN exactly in the 50 rows that see key 650, on every backend."""
    rng = np.random.default_rng(6)
    s = 700
    q, k, v = (rng.standard_normal((1, s, 16)).astype(np.float32) for _ in range(3))
    v[0, 650] = np.nan
    if rule == "mask":
        opts = {"mask": np.ones((s, s), bool)}
        opts["mask"][:, 650] = False
        nan_rows = 0
    else:
        opts = {"causal": True}
        nan_rows = 50
    out, lse = _forward(any_impl, q, k, v, **opts)
    assert int(np.isnan(out).any(-1).sum()) == nan_rows
    assert not np.isnan(lse).any()
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    _assert_same_nan_and_close(out, ref, "out")
    _assert_same_nan_and_close(lse, ref_lse, "lse")
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = _grads(any_impl, dout, q, k, v, **opts)
    if grads is not None:
        refs = reference_attention_backward(dout, q, k, v, **opts)
        for name, g, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
            _assert_same_nan_and_close(g, r, name, tol=1e-4)


def _padded_problem(rng, *, hq=4, hkv=2, sq=300, sk=340, d=16, pad_q=20, pad_k=30):
    """Left-padded keys and right-padded queries, the padding filled with NaN and inf."""
    q = rng.standard_normal((2, hq, sq, d)).astype(np.float32)
    k = rng.standard_normal((2, hkv, sk, d)).astype(np.float32)
    v = rng.standard_normal((2, hkv, sk, d)).astype(np.float32)
    dout = rng.standard_normal((2, hq, sq, d)).astype(np.float32)
    mask = np.ones((2, 1, sq, sk), bool)
    mask[..., :pad_k] = False
    mask[..., sq - pad_q:, :] = False
    k[..., :pad_k, :] = np.inf
    v[..., :pad_k:2, :] = np.nan
    v[..., 1:pad_k:2, :] = -np.inf
    q[..., sq - pad_q:, :] = np.nan
    dout[..., sq - pad_q:, :] = np.inf
    bias = rng.standard_normal((1, hq, 1, sk)).astype(np.float32)
    bias[..., :pad_k] = np.nan
    return q, k, v, dout, mask, bias


@pytest.mark.parametrize("extra", [
    {}, {"causal": True}, {"window": (40, 7)}, {"softcap": 5.0, "alibi_slopes": "alibi"},
    {"block_mask": "banded"},
], ids=["plain", "causal", "window", "softcap alibi", "block mask"])
def test_garbage_padding_leaks_nowhere(any_impl, extra):
    """Padded keys (k inf, v NaN/-inf, bias NaN) and padded queries (q NaN, dout inf): every
    result is finite and matches the oracle, padded rows give 0 and lse -inf, and the padded
    keys' gradients are 0."""
    rng = np.random.default_rng(7)
    q, k, v, dout, mask, bias = _padded_problem(rng)
    opts = dict(extra, mask=mask, bias=bias)
    if opts.get("alibi_slopes") == "alibi":
        opts["alibi_slopes"] = xattn.alibi_slopes(4)
    if opts.get("block_mask") == "banded":
        if any_impl == "standard":
            pytest.skip("standard_attention takes no block_mask")
        opts["block_mask"] = xattn.BlockMask.from_dense(np.tri(300, 340, 100, dtype=bool),
                                                        block_size=64)
    ref_opts = dict(opts)
    if "block_mask" in ref_opts:
        ref_opts["mask"] = mask & ref_opts.pop("block_mask").to_dense()
    out, lse = _forward(any_impl, q, k, v, **opts)
    ref, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
    assert_close(out, ref, xp=np, dtype=np.float32, name="out")
    assert_close(lse, ref_lse, xp=np, dtype=np.float32, name="lse")
    assert not out[..., -20:, :].any() and np.isneginf(lse[..., -20:]).all()
    grads = _grads(any_impl, dout, q, k, v, **opts)
    if grads is None:
        return
    refs = reference_attention_backward(dout, q, k, v, **ref_opts)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
        assert_close(g, r, xp=np, dtype=np.float32, atol=1e-4, rtol=1e-4, name=name)
    assert not grads[1][..., :30, :].any() and not grads[2][..., :30, :].any()
    assert not grads[0][..., -20:, :].any()


def test_visible_nan_spreads_identically(any_impl):
    """A NaN in a visible key's value: exactly the rows that see it turn NaN (only the
    columns where the value is NaN), on every backend."""
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((2, 260, 8)).astype(np.float32) for _ in range(3))
    v[1, 100, 3] = np.nan
    opts = {"window": (30, 0)}
    out, _ = _forward(any_impl, q, k, v, **opts)
    ref, _, _ = reference_attention(q, k, v, **opts)
    _assert_same_nan_and_close(out, ref, "out")
    assert np.isnan(out).sum() == 31  # rows 100..130 of head 1, column 3


# --- property: random shapes (zero-sized too), options, garbage where hidden ---------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SETTINGS = dict(deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
_GARBAGE = np.array([np.nan, np.inf, -np.inf], np.float32)


@st.composite
def hostile_problems(draw):
    """Shapes with zero-sized axes, every option, GQA, and NaN/inf written into the keys no
    query sees, the queries that see no key, and the bias entries of hidden pairs."""
    hkv = draw(st.sampled_from([0, 1, 2])) if draw(st.booleans()) else 1
    hkv = max(hkv, 1)
    hq = hkv * draw(st.sampled_from([0, 1, 2, 4]))
    batch = draw(st.sampled_from([(), (0,), (1,), (2,)]))
    sq = draw(st.integers(0, 140))
    sk = draw(st.integers(0, 140))
    d = draw(st.sampled_from([1, 8]))
    dv = draw(st.sampled_from([d, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        opts["window"] = (draw(st.one_of(st.none(), st.integers(0, 30))),
                          draw(st.one_of(st.none(), st.integers(0, 30))))
    mask = rng.random((sq, sk)) < draw(st.floats(0.3, 1.0))
    pad_k, pad_q = draw(st.integers(0, 20)), draw(st.integers(0, 10))
    mask[:, :pad_k] = False  # left-padded keys
    mask[sq - min(pad_q, sq):, :] = False  # right-padded queries
    opts["mask"] = mask
    bias = None
    if draw(st.booleans()):
        bias = rng.standard_normal((hq, 1, sk)).astype(np.float32)
    if draw(st.booleans()):
        opts["alibi_slopes"] = rng.uniform(0, 1, hq).astype(np.float32)
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 30.0))
    q = rng.standard_normal((*batch, hq, sq, d)).astype(np.float32)
    k = rng.standard_normal((*batch, hkv, sk, d)).astype(np.float32)
    v = rng.standard_normal((*batch, hkv, sk, dv)).astype(np.float32)
    dout = rng.standard_normal((*batch, hq, sq, dv)).astype(np.float32)
    # Which pairs the rules hide: the same for every head here (mask is (Sq, Sk)).
    vis = mask.copy()
    rule = _masking.tile_visibility(np, 0, sq, 0, sk, sq=sq, sk=sk,
                                    causal=opts.get("causal", False),
                                    window=xattn._array.normalize_window(opts.get("window")))
    if rule is not None:
        vis &= rule
    hidden_keys = ~vis.any(axis=0)
    hidden_rows = ~vis.any(axis=1)
    if draw(st.booleans()):
        def garbage(shape):
            return rng.choice(_GARBAGE, size=shape)

        k[..., hidden_keys, :] = garbage(k[..., hidden_keys, :].shape)
        v[..., hidden_keys, :] = garbage(v[..., hidden_keys, :].shape)
        q[..., hidden_rows, :] = garbage(q[..., hidden_rows, :].shape)
        dout[..., hidden_rows, :] = garbage(dout[..., hidden_rows, :].shape)
        if bias is not None:
            bias[..., hidden_keys] = np.nan
    if bias is not None:
        opts["bias"] = bias
    return q, k, v, dout, opts


def _check_against_oracle(impl, problem):
    q, k, v, dout, opts = problem
    out, lse = _forward(impl, q, k, v, **opts)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref, xp=np, dtype=np.float32, atol=5e-5, rtol=5e-5, name="out")
    assert_close(lse, ref_lse, xp=np, dtype=np.float32, atol=5e-5, rtol=5e-5, name="lse")
    grads = _grads(impl, dout, q, k, v, **opts)
    if grads is None:
        return
    refs = reference_attention_backward(dout, q, k, v, **opts)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
        assert_close(g, r, xp=np, dtype=np.float32, atol=2e-4, rtol=2e-4, name=name)


@settings(max_examples=int(__import__("os").environ.get("HOSTILE_EXAMPLES", 40)), **_SETTINGS)
@given(problem=hostile_problems())
def test_hostile_problems_match_the_oracle(any_impl, problem):
    _check_against_oracle(any_impl, problem)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_dbias_ignores_garbage_in_hidden_keys(backend):
    # return_dbias goes through the exact (non-finite) tile path too: a NaN value and an inf
    # key behind the mask must leave every gradient, dbias included, equal to clean inputs.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 70, 16)) for _ in range(3))
    bias = rng.standard_normal((1, 1, 70, 70))
    mask = np.ones((70, 70), bool)
    mask[:, 40:42] = False
    clean_k, clean_v = k.copy(), v.copy()
    v[0, 0, 40] = np.nan
    k[0, 1, 41] = np.inf

    def grads(k, v):
        out, lse = xattn.flash_attention(q, k, v, mask=mask, bias=bias, softcap=3.0,
                                         return_lse=True, backend=backend)
        return xattn.flash_attention_backward(np.ones_like(out), q, k, v, out, lse, mask=mask,
                                              bias=bias, softcap=3.0, return_dbias=True,
                                              backend=backend)

    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads(k, v),
                               grads(clean_k, clean_v), strict=True):
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_visible_nan_query_row_leaves_hidden_keys_gradients_alone(backend):
    # A NaN query row has a NaN lse; its hidden pairs used to give exp(-inf - NaN) = NaN
    # weights, so every key's dv turned NaN. Only the keys that row sees may.
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 1, 40, 8)) for _ in range(3))
    q[0, 0, 5] = np.nan
    out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    grads = xattn.flash_attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True,
                                           backend=backend)
    refs = reference_attention_backward(np.ones_like(out), q, k, v, causal=True)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg=name)
        finite = ~np.isnan(r)
        np.testing.assert_allclose(g[finite], r[finite], rtol=1e-10, atol=1e-10, err_msg=name)
