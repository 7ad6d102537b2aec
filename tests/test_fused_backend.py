"""The fused CPU backend (numba kernels on a thread pool) against the float64 oracle.

The generic flash tests already run on this backend through the ``backend`` fixture; the
cases here target what is specific to it: tile edges (small tiles make every code path run on
small inputs), GQA head stacking and head chunks, the thread pool (results must not depend on
the number of threads), the split backward with private dk/dv partials, caller-supplied plans
with element rules, the vectorised exp2/max kernels and NaN propagation.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("threadpoolctl")

from conftest import ALL_DTYPES, random_array  # noqa: E402

import xattn  # noqa: E402
from xattn import _masking  # noqa: E402
from xattn._array import bfloat16_dtype, validate_attention  # noqa: E402
from xattn._backends.numpy_ import _fused_kernels, _pool, fused, tiled  # noqa: E402
from xattn.testing import (  # noqa: E402
    assert_close,
    naive_attention,
    reference_attention,
    reference_attention_backward,
)


@pytest.fixture(params=["default-tiles", "small-tiles"])
def tiles(request, monkeypatch):
    """Run with the production tile sizes, and with tiny ones so that short sequences cross
    many tile edges (row blocks of 24 rows, key tiles of 40 keys)."""
    if request.param == "small-tiles":
        monkeypatch.setattr(fused, "BLOCK_ROWS", 24)
        monkeypatch.setattr(fused, "BLOCK_K", 40)
        monkeypatch.setattr(fused, "MIN_BLOCK_Q", 3)
    return request.param


def _run(q, k, v, **options):
    return xattn.flash_attention(q, k, v, backend="numba", return_lse=True, **options)


def _check_forward(q, k, v, out, lse, **options):
    ref_out, ref_lse, _ = reference_attention(q, k, v, **options)
    naive = naive_attention(q, k, v, **options) if q.dtype.itemsize == 2 else None
    assert_close(out, ref_out, xp=np, dtype=q.dtype, naive=naive, name="out")
    lse_dtype = np.float64 if q.dtype == np.float64 else np.float32
    assert_close(lse, ref_lse, xp=np, dtype=lse_dtype, name="lse")


# --- forward -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sq", "sk"), [(1, 1), (1, 97), (97, 1), (61, 61), (50, 123), (123, 50)]
)
def test_forward_options(option_name, tiles, sq, sk, make_qkv, make_options):
    batch, hq, hkv = (2,), 4, 2
    q, k, v = make_qkv((*batch, hq, sq, 16), (*batch, hkv, sk, 16), dtype=np.float32)
    options = make_options(option_name, batch, hq, sq, sk, np.float32)
    out, lse = _run(q, k, v, **options)
    _check_forward(q, k, v, out, lse, **options)


@pytest.mark.parametrize("hkv", [8, 4, 2, 1])  # GQA ratios 1, 2, 4, 8 (1 kv head = MQA)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_gqa(hkv, causal, tiles, make_qkv):
    q, k, v = make_qkv((1, 8, 45, 32), (1, hkv, 77, 32), dtype=np.float32)
    out, lse = _run(q, k, v, causal=causal, alibi_slopes=xattn.alibi_slopes(8))
    _check_forward(q, k, v, out, lse, causal=causal, alibi_slopes=xattn.alibi_slopes(8))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("opts", ["plain", "causal+window", "mask+bias+softcap"])
def test_forward_dtypes(dtype, opts, tiles, make_qkv, make_options):
    q, k, v = make_qkv((2, 3, 70, 40), (2, 3, 90, 40), dv=24, dtype=dtype)
    options = make_options(opts, (2,), 3, 70, 90, dtype)
    out, lse = _run(q, k, v, **options)
    _check_forward(q, k, v, out, lse, **options)


@pytest.mark.parametrize("d", [16, 40, 64, 80, 128, 256])
def test_forward_head_dims(d, make_qkv):
    q, k, v = make_qkv((2, 600, d), (2, 700, d), dtype=np.float32)
    out, lse = _run(q, k, v, causal=True)
    _check_forward(q, k, v, out, lse, causal=True)


def test_forward_2d_and_5d(tiles, make_qkv):
    q, k, v = make_qkv((33, 16), (51, 16), dtype=np.float64)
    out, lse = _run(q, k, v, window=(5, 9))
    assert out.shape == (33, 16) and lse.shape == (33,)
    _check_forward(q, k, v, out, lse, window=(5, 9))
    q, k, v = make_qkv((2, 2, 4, 29, 16), (2, 2, 2, 31, 16), dtype=np.float32)
    out, lse = _run(q, k, v, causal=True)
    _check_forward(q, k, v, out, lse, causal=True)


def test_forward_non_contiguous(tiles, rng):
    base = random_array(rng, (2, 90, 6, 32), np.float32)
    q = base.transpose(0, 2, 1, 3)[:, ::2]  # (2, 3, 90, 32), strided
    k = base.transpose(0, 2, 1, 3)[:, 1::2, ::-1]  # reversed sequence, negative strides
    v = np.asfortranarray(random_array(rng, (2, 3, 90, 32), np.float32))
    out, lse = _run(q, k, v, causal=True)
    _check_forward(q, k, v, out, lse, causal=True)


def test_fully_masked_rows_give_zero_and_neg_inf(tiles, make_qkv, rng):
    q, k, v = make_qkv((2, 3, 50, 16), (2, 3, 60, 16), dtype=np.float32)
    mask = rng.random((50, 60)) < 0.5
    mask[[0, 7, 49]] = False
    out, lse = _run(q, k, v, mask=mask)
    assert np.all(out[:, :, [0, 7, 49]] == 0)
    assert np.all(np.isneginf(lse[:, :, [0, 7, 49]]))
    _check_forward(q, k, v, out, lse, mask=mask)
    # A window that hides every key from the first queries (Sq > Sk, right-aligned).
    out, lse = _run(q[:, :, :, :], k[:, :, :20], v[:, :, :20], causal=True, window=(3, 0))
    _check_forward(q, k[:, :, :20], v[:, :, :20], out, lse, causal=True, window=(3, 0))
    assert np.all(out[:, :, :30] == 0) and np.all(np.isneginf(lse[:, :, :30]))


def test_large_scores_do_not_overflow(make_qkv):
    # Scores of several hundred: the online max must keep exp2 in range.
    q, k, v = make_qkv((2, 130, 32), (2, 700, 32), dtype=np.float32, scale=6.0)
    out, lse = _run(q, k, v)
    # float32 scores of that size carry ~1e-5 absolute rounding from the matmul alone (the
    # unit-scale tolerance table does not apply): bound the error by the generic backend's.
    ref, ref_lse, _ = reference_attention(q, k, v)
    generic = xattn.flash_attention(q, k, v, backend="numpy")
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 1.5 * np.abs(generic - ref).max() + 1e-6
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)


def test_nan_propagates_like_the_tiled_backend(make_qkv):
    q, k, v = make_qkv((2, 40, 16), (2, 600, 16), dtype=np.float32)
    k[1, 555, 3] = np.nan
    out, lse = _run(q, k, v, causal=True)
    ref, ref_lse = xattn.flash_attention(q, k, v, causal=True, backend="numpy", return_lse=True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    assert np.isnan(out[1]).any() and not np.isnan(out[0]).any()


@pytest.mark.parametrize("causal", [False, True])
def test_results_do_not_depend_on_thread_count(causal, tiles, make_qkv, monkeypatch):
    q, k, v = make_qkv((2, 4, 150, 32), (2, 2, 170, 32), dtype=np.float32)
    monkeypatch.setenv("XATTN_NUM_THREADS", "1")
    one = _run(q, k, v, causal=causal)
    monkeypatch.setenv("XATTN_NUM_THREADS", "3")
    three = _run(q, k, v, causal=causal)
    # Each (head, query block) job is computed the same way whichever thread runs it.
    for a, b in zip(one, three, strict=True):
        np.testing.assert_array_equal(a, b)


# --- caller-supplied plans (BlockMask tiles) -----------------------------------------------


@pytest.mark.parametrize("hkv", [4, 1])
def test_plan_and_element_rule_match_tiled(hkv, make_qkv, rng):
    """Arbitrary tile sizes (blocks of 48 x 80, not the backend's) and a per-tile element rule:
    the fused backend must give what the generic tiled backend gives for the same plan."""
    sq, sk = 150, 230
    q, k, v = make_qkv((1, 4, sq, 16), (1, hkv, sk, 16), dtype=np.float64)
    prob = validate_attention(q, k, v, causal=True)
    base = _masking.tile_plan(sq, sk, 48, 80, True, None)
    # Drop some tiles, keep the others' `full` flags, and mark a few extra as partial.
    plan = tuple(
        (q0, q1, tuple((k0, k1, full and (k0 // 80) % 2 == 0)
                       for k0, k1, full in tiles if (q0 // 48 + k0 // 80) % 3 != 1))
        for q0, q1, tiles in base
    )
    keep = rng.random((sq, sk)) < 0.7

    def rule(q0, q1, k0, k1):
        return keep[q0:q1, k0:k1]

    got = fused.forward(prob, q, k, v, plan=plan, element_rule=rule)
    want = tiled.forward(prob, q, k, v, plan=plan, element_rule=rule)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    dout = random_array(rng, q.shape)
    got = fused.backward(prob, dout, q, k, v, *want, plan=plan, element_rule=rule)
    ref = tiled.backward(prob, dout, q, k, v, *want, plan=plan, element_rule=rule)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


# --- backward ------------------------------------------------------------------------------


def _check_backward(q, k, v, options, rng, name_dtype=None):
    out, lse = _run(q, k, v, **options)
    dout = random_array(rng, out.shape, q.dtype)
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend="numba", **options)
    refs = reference_attention_backward(dout, q, k, v, **options)
    atol = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 5e-5}.get(np.dtype(q.dtype))
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, refs, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        if atol is None:  # 16-bit: relative to the gradient's scale
            scale = float(np.abs(r).max()) or 1.0
            tol = 3e-2 if x.dtype == bfloat16_dtype() else 5e-3
            err = float(np.abs(g.astype(np.float64) - r).max())
            assert err <= tol * scale, f"{name}: error {err:.3g} > {tol * scale:.3g}"
        else:
            assert_close(g, r, xp=np, dtype=q.dtype, atol=atol, rtol=atol, name=name)


@pytest.mark.parametrize(("sq", "sk"), [(1, 1), (61, 61), (50, 123), (123, 50)])
def test_backward_options(option_name, tiles, sq, sk, make_qkv, make_options, rng):
    q, k, v = make_qkv((2, 4, sq, 16), (2, 2, sk, 16), dtype=np.float64)
    options = make_options(option_name, (2,), 4, sq, sk, np.float64)
    _check_backward(q, k, v, options, rng)


@pytest.mark.parametrize("hkv", [8, 4, 2, 1])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_backward_gqa_and_split(hkv, batch, tiles, make_qkv, rng):
    # B * Hkv < 2 * threads takes the split path: query blocks shared out over several jobs,
    # each with private dk/dv partials added under a lock.
    q, k, v = make_qkv((*batch, 8, 70, 16), (*batch, hkv, 90, 16), dtype=np.float32)
    _check_backward(q, k, v, dict(causal=True, softcap=5.0), rng)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_backward_dtypes(dtype, tiles, make_qkv, rng):
    q, k, v = make_qkv((2, 2, 45, 32), (2, 1, 66, 32), dtype=dtype)
    _check_backward(q, k, v, dict(causal=True, window=(20, None)), rng)


def test_backward_2d(tiles, make_qkv, rng):
    q, k, v = make_qkv((40, 16), (57, 16), dtype=np.float64)
    _check_backward(q, k, v, dict(window=(11, 4)), rng)


# --- kernels and plumbing ------------------------------------------------------------------


def test_exp2_kernel_accuracy():
    x = np.linspace(-87.0, 0.0, 200_001).astype(np.float32)
    p = x.reshape(1, -1).copy()
    _fused_kernels.probs_from_lse(p, np.zeros(1, np.float32))
    want = np.exp(x.astype(np.float64))
    # Base-2 range reduction costs about |x| * log2(e) ulp of the argument; 1e-6 relative
    # over this range, with exactly 0 (not a subnormal) below 2**-126.
    ok = want > 2.0**-126
    rel = np.abs(p[0, ok] - want[ok]) / want[ok]
    assert rel.max() < 1e-5
    assert np.all(p[0, ~ok] < 2.0**-125)
    edge = np.array([[-np.inf, -1e30, 0.0, -0.0, np.nan]], np.float32)
    _fused_kernels.probs_from_lse(edge, np.zeros(1, np.float32))
    assert edge[0, :2].tolist() == [0.0, 0.0] and edge[0, 2:4].tolist() == [1.0, 1.0]
    assert np.isnan(edge[0, 4])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 512])
def test_online_softmax_tile_row_max(n, rng):
    s = random_array(rng, (6, n), np.float32, scale=30.0)
    s[1] = -np.inf  # fully masked row
    s[2, : n // 2] = -np.inf
    s[3] = -s[3] ** 2 - 1.0  # all negative: the int-key max must order negatives right
    s[4] = -0.0
    s[5, n - 1] = np.nan
    want = s.max(axis=1)
    m = np.full(6, -np.inf, np.float32)
    m[4] = -5.0
    l = np.zeros(6, np.float32)
    acc = np.zeros((6, 3), np.float32)
    _fused_kernels.online_softmax_tile(s, m, l, acc)
    np.testing.assert_array_equal(m[:4], want[:4])
    assert m[4] == 0 and np.isnan(m[5]) and np.isnan(l[5])
    assert l[1] == 0 and np.all(s[1] == 0)
    # s now holds the exponentials, l their row sums.
    np.testing.assert_allclose(l[[0, 2, 3]], s[[0, 2, 3]].sum(axis=1, dtype=np.float64),
                               rtol=1e-5)


def test_supports_reasons():
    q = np.zeros((2, 8, 4), np.float32)
    prob = validate_attention(q, q, q)
    assert fused.supports(prob, {}, "forward") is None
    assert fused.supports(prob, {}, "backward") is None
    assert "option" in fused.supports(prob, {"dropout": 0.1}, "forward")


def test_auto_prefers_fused(make_qkv):
    from xattn._backends import select

    q, k, v = make_qkv((2, 8, 4), (2, 8, 4), dtype=np.float32)
    assert select(validate_attention(q, k, v), {}) is fused


def test_bad_thread_count(monkeypatch):
    monkeypatch.setenv("XATTN_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="XATTN_NUM_THREADS"):
        _pool.num_threads()
    monkeypatch.setenv("XATTN_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="XATTN_NUM_THREADS"):
        _pool.num_threads()


def test_job_errors_propagate():
    def boom(job):
        if job == 3:
            raise RuntimeError("job 3 failed")

    with pytest.raises(RuntimeError, match="job 3 failed"):
        _pool.run_jobs(boom, range(6))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_pool_works_in_a_forked_child(make_qkv):
    import multiprocessing as mp

    q, k, v = make_qkv((4, 64, 16), (4, 64, 16), dtype=np.float32)
    want = _run(q, k, v)[0]  # the parent's pool exists before the fork
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_forward_out, (q, k, v)).get(timeout=60)
    np.testing.assert_array_equal(got, want)


def _forward_out(q, k, v):
    return xattn.flash_attention(q, k, v, backend="numba")
