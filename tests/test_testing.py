"""The oracle itself: xattn.testing against scalar loops written from DESIGN.md, its gradient
against central differences, and assert_close's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BF16, random_array

from xattn.testing import (
    assert_close,
    naive_attention,
    reference_attention,
    reference_attention_backward,
    to_numpy,
    tolerance,
)


def loop_attention(q, k, v, *, causal=False, window=None, mask=None, bias=None,
                   alibi_slopes=None, softcap=None, scale=None):
    """DESIGN.md's definition, one score at a time, for (Hq, Sq, D) / (Hkv, Sk, D) inputs."""
    hq, sq, d = q.shape
    hkv, sk, dv = v.shape
    off = sk - sq
    scale = 1 / math.sqrt(d) if scale is None else scale
    mask = None if mask is None else np.broadcast_to(mask, (hq, sq, sk))
    bias = None if bias is None else np.broadcast_to(bias, (hq, sq, sk))
    out = np.zeros((hq, sq, dv))
    lse = np.full((hq, sq), -math.inf)
    for h in range(hq):
        g = h // (hq // hkv)
        for i in range(sq):
            scores = {}
            for j in range(sk):
                if causal and j > i + off:
                    continue
                if window is not None:
                    left, right = window
                    if left is not None and j < i + off - left:
                        continue
                    if right is not None and j > i + off + right:
                        continue
                if mask is not None and not mask[h, i, j]:
                    continue
                s = scale * sum(float(q[h, i, c]) * float(k[g, j, c]) for c in range(d))
                if softcap is not None:
                    s = softcap * math.tanh(s / softcap)
                if bias is not None:
                    s += float(bias[h, i, j])
                if alibi_slopes is not None:
                    s -= float(alibi_slopes[h]) * abs(i + off - j)
                scores[j] = s
            finite = {j: s for j, s in scores.items() if s != -math.inf}
            if not finite:
                continue
            m = max(finite.values())
            total = sum(math.exp(s - m) for s in finite.values())
            lse[h, i] = m + math.log(total)
            for j, s in finite.items():
                out[h, i] += math.exp(s - lse[h, i]) * v[g, j].astype(np.float64)
    return out, lse


LOOP_CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(1, 2)),
    "causal+window": dict(causal=True, window=(2, None)),
    "mask": dict(mask=np.array([[1, 0, 1, 1, 0, 1, 1]] * 4 + [[0] * 7] + [[1] * 7] * 2, bool)),
    "bias": dict(bias=np.linspace(-2, 2, 49).reshape(7, 7)),
    "bias_neg_inf": dict(bias=np.where(np.eye(7, 7, 2) > 0, -np.inf, 0.5)),
    "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
    "softcap": dict(softcap=0.7, scale=2.0),
    "everything": dict(causal=True, window=(3, None), softcap=1.1,
                       bias=np.linspace(-1, 1, 7), alibi_slopes=np.array([0.3, 0.2, 0.1, 0.4]),
                       mask=np.array([[1, 1, 0, 1, 1, 1, 1]], bool)),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
@pytest.mark.parametrize("sq,sk", [(5, 7), (7, 5), (1, 7), (5, 1)])
def test_reference_matches_loops(rng, case, sq, sk):
    opts = dict(LOOP_CASES[case])
    for key in ("mask", "bias"):
        if key in opts:  # cut the (7, 7) patterns (or one row for all queries) to this shape
            a = opts[key]
            opts[key] = a[:sq, :sk] if a.shape[:1] == (7,) and a.ndim == 2 else a[..., :sk]
    q = random_array(rng, (4, sq, 3), scale=2.0)
    k = random_array(rng, (2, sk, 3), scale=2.0)
    v = random_array(rng, (2, sk, 2))
    out, lse, w = reference_attention(q, k, v, **opts)
    want_out, want_lse = loop_attention(q, k, v, **opts)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=1e-12)
    sums = w.sum(-1)
    np.testing.assert_allclose(sums[fin], 1.0, rtol=1e-12)
    assert np.all(sums[~fin] == 0) and np.all(out[~fin] == 0)


def test_reference_docstring_alignment():
    q, k = np.ones((2, 4)), np.ones((3, 4))
    v = np.arange(6.0).reshape(3, 2)
    _, lse, w = reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(w, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(lse, [2.0 + np.log(2), 2.0 + np.log(3)])  # q.k / sqrt(4) = 2


def test_reference_two_dims_and_batch(rng):
    q, k, v = (random_array(rng, s) for s in ((3, 2, 4, 6, 5), (3, 2, 2, 8, 5), (3, 2, 2, 8, 4)))
    out, lse, w = reference_attention(q, k, v, causal=True)
    assert out.shape == (3, 2, 4, 6, 4) and lse.shape == (3, 2, 4, 6) and w.shape[-1] == 8
    o2, _, _ = reference_attention(q[1, 0, 3], k[1, 0, 1], v[1, 0, 1], causal=True)
    np.testing.assert_allclose(out[1, 0, 3], o2, rtol=1e-14)


# --- the oracle's gradient against central differences ------------------------------------

FD_CASES = {
    "plain": {},
    "causal+window": dict(causal=True, window=(1, None)),
    "mask": dict(mask=np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], bool)),
    "bias+scale": dict(bias=np.arange(12.0).reshape(3, 4) / 6 - 1, scale=0.8),
    "alibi": dict(alibi_slopes=np.array([0.5, 0.1])),
    "softcap": dict(softcap=0.6, scale=1.5),
    "everything": dict(causal=True, softcap=0.9, alibi_slopes=np.array([0.2, 0.4]),
                       bias=np.array([0.1, -0.3, 0.2, 0.0])),
}


def central_differences(f, args, which, h=1e-6):
    x = args[which]
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[which][idx] += h
        minus[which][idx] -= h
        g[idx] = (f(*plus) - f(*minus)) / (2 * h)
    return g


@pytest.mark.parametrize("case", list(FD_CASES))
@pytest.mark.parametrize("hkv", [1, 2], ids=["mqa", "mha"])
def test_reference_gradient_finite_differences(rng, case, hkv):
    opts = FD_CASES[case]
    q = random_array(rng, (2, 3, 3))
    k = random_array(rng, (hkv, 4, 3))
    v = random_array(rng, (hkv, 4, 2))
    dout = random_array(rng, (2, 3, 2))

    def loss(qq, kk, vv):
        return float((dout * reference_attention(qq, kk, vv, **opts)[0]).sum())

    grads = reference_attention_backward(dout, q, k, v, **opts)
    for which, (name, g) in enumerate(zip(("dq", "dk", "dv"), grads, strict=True)):
        fd = central_differences(loss, [q, k, v], which)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8, err_msg=name)
        assert g.shape == (q, k, v)[which].shape


def test_reference_gradient_two_dims(rng):
    q, k, v, dout = (random_array(rng, s) for s in ((3, 4), (5, 4), (5, 2), (3, 2)))

    def loss(qq, kk, vv):
        return float((dout * reference_attention(qq, kk, vv, causal=True)[0]).sum())

    grads = reference_attention_backward(dout, q, k, v, causal=True)
    for which, g in enumerate(grads):
        np.testing.assert_allclose(g, central_differences(loss, [q, k, v], which),
                                   rtol=1e-6, atol=1e-8)


# --- naive_attention and tolerances ----------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_naive_attention_error_is_rounding_sized(rng, dtype_name):
    if dtype_name == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    dt = BF16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    q, k, v = (random_array(rng, (2, 40, 32), dt) for _ in range(3))
    ref, _, _ = reference_attention(q, k, v, causal=True)
    naive = naive_attention(q, k, v, causal=True)
    err = np.abs(naive - ref).max()
    eps = 2.0**-11 if dtype_name == "float16" else 2.0**-8
    assert eps / 8 < err < 16 * eps  # really rounded, yet only by a few units


def test_naive_attention_float64_is_close_to_reference(rng):
    q, k, v = (random_array(rng, (2, 10, 8)) for _ in range(3))
    np.testing.assert_allclose(naive_attention(q, k, v), reference_attention(q, k, v)[0],
                               rtol=1e-5, atol=1e-6)  # sums in float32


def test_tolerance_table():
    assert tolerance(np.float64) < tolerance(np.float32) < tolerance(np.float16)
    if BF16 is not None:
        assert tolerance(BF16) > tolerance(np.float16)


def test_to_numpy():
    x = np.arange(3, dtype=np.float16)
    assert to_numpy(x).dtype == np.float64 and to_numpy(None) is None
    assert to_numpy(x, bool).dtype == bool


# --- assert_close fails when it should -----------------------------------------------------


class TestAssertClose:
    ref = np.array([[1.0, -np.inf], [0.5, 2.0]])

    def test_passes(self):
        a = (self.ref + 1e-6).astype(np.float32)
        assert_close(a, self.ref, xp=np, dtype=np.float32)

    def test_namespace(self):
        with pytest.raises(AssertionError, match="expected a cupy array"):
            assert_close(self.ref, self.ref, xp=type("cupy", (), {"__name__": "cupy"}))

    def test_dtype(self):
        with pytest.raises(AssertionError, match="expected dtype float32, got float64"):
            assert_close(self.ref, self.ref, dtype=np.float32)

    def test_shape(self):
        with pytest.raises(AssertionError, match=r"expected shape \(2, 2\), got \(4,\)"):
            assert_close(self.ref.ravel(), self.ref)

    def test_nan(self):
        a = self.ref.copy()
        a[1, 1] = np.nan
        with pytest.raises(AssertionError, match="NaN"):
            assert_close(a, self.ref)

    def test_non_finite_pattern(self):
        a = self.ref.copy()
        a[0, 1] = 0.0  # the reference's -inf (an empty row's lse) must stay -inf
        with pytest.raises(AssertionError, match="non-finite entries differ"):
            assert_close(a, self.ref)
        b = self.ref.copy()
        b[0, 1] = np.inf
        with pytest.raises(AssertionError, match="non-finite entries differ"):
            assert_close(b, self.ref)

    def test_value(self):
        a = self.ref.astype(np.float32)
        a[1, 0] += 1e-3
        with pytest.raises(AssertionError, match="max error 0.001"):
            assert_close(a, self.ref)
        assert_close(a, self.ref, atol=2e-3)  # explicit tolerances override the table

    def test_naive_rule(self):
        naive = self.ref + np.array([[0.0, 0.0], [1e-2, 0.0]])
        ok = (self.ref + np.array([[0.0, 0.0], [0.0, 2e-2]])).astype(np.float16)
        assert_close(ok, self.ref, naive=naive)  # 2e-2 <= 2 * 1e-2 + atol
        bad = (self.ref + np.array([[0.0, 0.0], [0.0, 2.6e-2]])).astype(np.float16)
        with pytest.raises(AssertionError, match="2x the naive"):
            assert_close(bad, self.ref, naive=naive)


def test_naive_attention_backward_is_the_gradient_in_the_input_precision():
    from xattn.testing import naive_attention_backward, reference_attention_backward

    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 33, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 40, 16)).astype(np.float32) for _ in range(2))
    out, _, _ = reference_attention(q, k, v, causal=True, softcap=4.0)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    naive = naive_attention_backward(dout, q, k, v, out, causal=True, softcap=4.0)
    ref = reference_attention_backward(dout, q, k, v, causal=True, softcap=4.0)
    for n, r in zip(naive, ref, strict=True):
        assert n.dtype == np.float32 and n.shape == r.shape
        np.testing.assert_allclose(n, r, atol=2e-4, rtol=1e-4)
    # float16: the same gradient, off by the 16-bit roundings only.
    q16, k16, v16, do16 = (x.astype(np.float16) for x in (q, k, v, dout))
    naive16 = naive_attention_backward(do16, q16, k16, v16, out, causal=True, softcap=4.0)
    for n, r in zip(naive16, ref, strict=True):
        err = float(np.abs(n - r).max())
        assert 1e-4 < err < 0.1 * max(1.0, float(np.abs(r).max()))
