"""Hypothesis properties of exact attention, and random-shape fuzzing against the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_masking import check_plan

import xattn
from xattn.testing import assert_close, reference_attention, reference_attention_backward

# The fixtures used inside @given (backend name, closures) hold no per-example state.
SETTINGS = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

windows = st.one_of(
    st.none(),
    st.tuples(st.one_of(st.none(), st.integers(0, 40)), st.one_of(st.none(), st.integers(0, 40))),
)


@st.composite
def problems(draw, max_len=300):
    """Random shapes and options: GQA groups, unequal lengths, every rule."""
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    batch = draw(st.sampled_from([(), (2,)]))
    sq = draw(st.integers(1, max_len))
    sk = draw(st.integers(1, max_len))
    d = draw(st.sampled_from([1, 8, 24]))
    dv = draw(st.sampled_from([d, 4]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = True
    w = draw(windows)
    if w is not None:
        opts["window"] = w
    if draw(st.booleans()):
        opts["mask"] = rng.random((sq, sk)) < draw(st.floats(0.0, 1.0))
    if draw(st.booleans()):
        opts["bias"] = rng.standard_normal((hq, 1, sk)).astype(np.float32)
    if draw(st.booleans()):
        opts["alibi_slopes"] = xattn.alibi_slopes(hq)
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 30.0))
    q = rng.standard_normal((*batch, hq, sq, d)).astype(np.float32)
    k = rng.standard_normal((*batch, hkv, sk, d)).astype(np.float32)
    v = rng.standard_normal((*batch, hkv, sk, dv)).astype(np.float32)
    return q, k, v, opts


@settings(max_examples=40, **SETTINGS)
@given(problems())
def test_flash_random_problems(flash, problem):
    q, k, v, opts = problem
    out, lse = flash(q, k, v, return_lse=True, **opts)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref, xp=np, dtype=np.float32, name="out")
    assert_close(lse, ref_lse, xp=np, dtype=np.float32, name="lse")


@settings(max_examples=20, **SETTINGS)
@given(problems(max_len=200))
def test_flash_backward_random_problems(flash, flash_backward, problem):
    q, k, v, opts = problem
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    dout = np.random.default_rng(q.size).standard_normal(q.shape[:-1] + v.shape[-1:])
    out, lse = flash(q, k, v, return_lse=True, **opts)
    got = flash_backward(dout, q, k, v, out, lse, **opts)
    want = reference_attention_backward(dout, q, k, v, **opts)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, xp=np, dtype=np.float64, atol=1e-9, rtol=1e-9, name=name)


@settings(max_examples=40, **SETTINGS)
@given(problems(max_len=60))
def test_standard_weights_rows_sum_to_one_or_zero(problem):
    q, k, v, opts = problem
    out, lse, w = xattn.standard_attention(q, k, v, return_lse=True, return_weights=True, **opts)
    sums = w.astype(np.float64).sum(-1)
    empty = np.isneginf(lse)
    np.testing.assert_allclose(sums[~empty], 1.0, rtol=1e-5)
    assert np.all(sums[empty] == 0) and np.all(out[empty] == 0)
    assert np.all(w >= 0)


@settings(max_examples=15, **SETTINGS)
@given(problems(max_len=700), st.data())
def test_permuting_keys_and_values_together(flash, problem, data):
    # Without position-dependent rules, attention is a function of the set of (key, value)
    # pairs: a permutation of the key axis (with the matching mask/bias columns) changes nothing.
    q, k, v, opts = problem
    for key in ("causal", "window", "alibi_slopes"):
        opts.pop(key, None)
    sk = k.shape[-2]
    perm = np.array(data.draw(st.permutations(range(sk))), dtype=np.intp)
    popts = dict(opts)
    if "mask" in opts:
        popts["mask"] = opts["mask"][..., perm]
    if "bias" in opts:
        popts["bias"] = opts["bias"][..., perm]
    a, la = flash(q, k, v, return_lse=True, **opts)
    b, lb = flash(q, k[..., perm, :], v[..., perm, :], return_lse=True, **popts)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(la, lb, rtol=2e-5, atol=2e-5)


@settings(max_examples=30, **SETTINGS)
@given(problems(max_len=700), st.data())
def test_causal_future_keys_do_not_leak(flash, problem, data):
    q, k, v, opts = problem
    opts["causal"] = True
    sq, sk = q.shape[-2], k.shape[-2]
    off = sk - sq
    cut = data.draw(st.integers(0, sk - 1), label="first changed key")
    rng = np.random.default_rng(cut)
    k2, v2 = k.copy(), v.copy()
    k2[..., cut:, :] = 10 * rng.standard_normal(k2[..., cut:, :].shape)
    v2[..., cut:, :] = 10 * rng.standard_normal(v2[..., cut:, :].shape)
    past = max(0, min(sq, cut - off))  # rows i with i + off < cut see none of the changes
    assume(past > 0)
    a, la = flash(q, k, v, return_lse=True, **opts)
    b, lb = flash(q, k2, v2, return_lse=True, **opts)
    np.testing.assert_allclose(a[..., :past, :], b[..., :past, :], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(la[..., :past], lb[..., :past], rtol=1e-6, atol=1e-6)


@settings(max_examples=25, **SETTINGS)
@given(problems(max_len=200), st.floats(-20, 20))
def test_row_constant_bias_shifts_lse_only(flash, problem, c):
    # softmax is shift-invariant: adding c to every score of a row leaves the output and adds c
    # to lse (a finite bias, after softcap, is exactly such a shift).
    q, k, v, opts = problem
    sq = q.shape[-2]
    bias0 = opts.pop("bias", np.zeros((1, 1), np.float32))
    row_c = np.full((sq, 1), c, np.float32)
    a, la = flash(q, k, v, return_lse=True, bias=bias0, **opts)
    b, lb = flash(q, k, v, return_lse=True, bias=bias0 + row_c, **opts)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    fin = np.isfinite(la)
    assert np.array_equal(fin, np.isfinite(lb))
    np.testing.assert_allclose(lb[fin] - la[fin], np.float32(c), atol=1e-4 * (1 + abs(c)))


@settings(max_examples=200, **SETTINGS)
@given(
    st.integers(0, 90),
    st.integers(0, 90),
    st.sampled_from([1, 3, 16, 128]),
    st.sampled_from([1, 5, 16, 512]),
    st.booleans(),
    windows,
)
def test_tile_plan_property(sq, sk, bq, bk, causal, window):
    check_plan(sq, sk, bq, bk, causal, window)


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(problems(max_len=1200))
def test_flash_random_problems_long(flash, problem):
    q, k, v, opts = problem
    out = flash(q, k, v, **opts)
    ref, _, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref, xp=np, dtype=np.float32)
