"""flash_attention_backward against the oracle's analytic gradient and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BF16, random_array

from xattn._backends.numpy_.tiled import BLOCK_K, BLOCK_Q
from xattn.testing import assert_close, reference_attention_backward

EPS16 = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def grads(flash, flash_backward, q, k, v, dout, **options):
    out, lse = flash(q, k, v, return_lse=True, **options)
    return flash_backward(dout, q, k, v, out, lse, **options)


def check(flash, flash_backward, q, k, v, dout, **options):
    """Compare dq, dk, dv with the float64 analytic gradient; returns the three gradients."""
    got = grads(flash, flash_backward, q, k, v, dout, **options)
    ref = reference_attention_backward(dout, q, k, v, **options)
    dtype = np.dtype(q.dtype)
    for name, g, r, x in zip(("dq", "dk", "dv"), got, ref, (q, k, v), strict=True):
        assert g.shape == x.shape, name
        if dtype.itemsize == 2:
            # The output is rounded to 16 bits before delta = dout . out is formed, and each
            # gradient is rounded at the end: allow a few units of the 16-bit epsilon of the
            # gradient's scale.
            eps = EPS16["bfloat16" if dtype == BF16 else "float16"]
            scale = float(np.abs(r).max()) if r.size else 0.0
            assert_close(g, r, xp=np, dtype=dtype, atol=8 * eps * scale, rtol=4 * eps, name=name)
        elif dtype == np.float32:
            scale = float(np.abs(r).max()) if r.size else 0.0
            assert_close(g, r, xp=np, dtype=dtype, atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                         name=name)
        else:
            assert_close(g, r, xp=np, dtype=dtype, name=name)
    return got


@pytest.fixture
def make_dout(rng):
    def make(q, v, dtype=None):
        shape = (*q.shape[:-1], v.shape[-1])
        return random_array(rng, shape, q.dtype if dtype is None else dtype)

    return make


# --- options ----------------------------------------------------------------------------


def test_options_float64(flash, flash_backward, make_qkv, make_options, make_dout, option_name):
    batch, hq, hkv, sq, sk = (1,), 2, 1, BLOCK_Q + 12, BLOCK_K + 18
    q, k, v = make_qkv((*batch, hq, sq, 16), (*batch, hkv, sk, 16), dv=24)
    opts = make_options(option_name, batch, hq, sq, sk)
    check(flash, flash_backward, q, k, v, make_dout(q, v), **opts)


@pytest.mark.parametrize("sq,sk", [(90, 40), (40, 90)])
def test_options_float32(flash, flash_backward, make_qkv, make_options, make_dout, option_name,
                         sq, sk):
    batch, hq, hkv = (1,), 2, 1
    q, k, v = make_qkv((*batch, hq, sq, 32), (*batch, hkv, sk, 32), dtype=np.float32)
    opts = make_options(option_name, batch, hq, sq, sk, np.float32)
    check(flash, flash_backward, q, k, v, make_dout(q, v), **opts)


@pytest.mark.parametrize("case", ["plain", "causal+window", "alibi", "mask+bias+softcap"])
def test_dtypes(flash, flash_backward, make_qkv, make_options, make_dout, dtype, case):
    batch, hq, hkv, sq, sk = (2,), 4, 2, 70, 100
    q, k, v = make_qkv((*batch, hq, sq, 32), (*batch, hkv, sk, 32), dtype=dtype)
    opts = make_options(case, batch, hq, sq, sk, dtype)
    dq, dk, dv = check(flash, flash_backward, q, k, v, make_dout(q, v), **opts)
    assert dq.dtype == dk.dtype == dv.dtype == dtype


# --- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sq,sk",
    [(1, 1), (1, 300), (300, 1), (BLOCK_Q + 1, BLOCK_K + 1), (2 * BLOCK_Q + 5, 200)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(flash, flash_backward, make_qkv, make_dout, sq, sk, causal):
    q, k, v = make_qkv((2, sq, 16), (2, sk, 16))
    check(flash, flash_backward, q, k, v, make_dout(q, v), causal=causal)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (8, 2), (8, 1), (3, 1)])
@pytest.mark.parametrize("case", ["causal", "alibi"])
def test_gqa(flash, flash_backward, make_qkv, make_options, make_dout, hq, hkv, case):
    batch, sq, sk = (2,), 40, 60
    q, k, v = make_qkv((*batch, hq, sq, 16), (*batch, hkv, sk, 16), dv=8)
    opts = make_options(case, batch, hq, sq, sk)
    check(flash, flash_backward, q, k, v, make_dout(q, v), **opts)


@pytest.mark.parametrize(
    "q_shape,k_shape",
    [((33, 16), (47, 16)), ((2 * BLOCK_Q + 9, 16), (BLOCK_K + 40, 16)),
     ((2, 3, 4, 20, 16), (2, 3, 2, 30, 16))],
    ids=["2d", "2d_tiles", "5d"],
)
def test_ranks(flash, flash_backward, make_qkv, make_dout, q_shape, k_shape):
    q, k, v = make_qkv(q_shape, k_shape)
    check(flash, flash_backward, q, k, v, make_dout(q, v), causal=True)


@pytest.mark.parametrize("d", [16, 40, 64, 80, 128, 256])
def test_head_dims(flash, flash_backward, make_qkv, make_dout, d):
    q, k, v = make_qkv((2, 50, d), (2, 70, d), dtype=np.float32)
    check(flash, flash_backward, q, k, v, make_dout(q, v), causal=True)


def test_non_contiguous(flash, flash_backward, rng):
    def bshd():
        return random_array(rng, (2, 60, 4, 32)).transpose(0, 2, 1, 3)

    q, k, v, dout = bshd(), bshd()[:, :, ::2], bshd()[:, :, ::2], bshd()
    check(flash, flash_backward, q, k, v, dout, causal=True)


@pytest.mark.filterwarnings("error")
def test_fully_masked_rows(flash, flash_backward, make_qkv, make_dout, rng, dtype):
    q, k, v = make_qkv((2, 150, 16), (2, 70, 16), dtype=dtype)
    mask = rng.random((2, 150, 70)) < 0.5
    mask[:, 100:] = False
    dout = make_dout(q, v)
    # causal with Sq > Sk hides rows 0..79, the mask rows 100..149.
    dq, dk, dv = check(flash, flash_backward, q, k, v, dout, causal=True, mask=mask)
    for g in (dq, dk, dv):
        assert not np.isnan(g.astype(np.float64)).any()
    assert np.all(dq[:, :80] == 0) and np.all(dq[:, 100:] == 0)


def test_no_keys(flash, flash_backward, make_qkv, make_dout):
    q, k, v = make_qkv((2, 5, 8), (2, 0, 8))
    dq, dk, dv = grads(flash, flash_backward, q, k, v, make_dout(q, v))
    assert np.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


# --- finite differences of the kernel itself (float64) ------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(causal=True, window=(1, None)),
        dict(softcap=0.8, alibi_slopes=np.array([0.3, 0.1])),
        dict(bias=np.linspace(-1, 1, 20).reshape(4, 5), scale=0.6),
    ],
    ids=["plain", "causal+window", "softcap+alibi", "bias+scale"],
)
def test_finite_differences(flash, flash_backward, rng, options):
    q = random_array(rng, (2, 4, 3))
    k = random_array(rng, (1, 5, 3))
    v = random_array(rng, (1, 5, 2))
    dout = random_array(rng, (2, 4, 2))
    got = grads(flash, flash_backward, q, k, v, dout, **options)

    def loss(qq, kk, vv):
        return float((dout * flash(qq, kk, vv, **options)).sum())

    h = 1e-6
    args = [q, k, v]
    for which, (name, g) in enumerate(zip(("dq", "dk", "dv"), got, strict=True)):
        fd = np.zeros_like(args[which])
        for idx in np.ndindex(*args[which].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            fd[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.slow
def test_long_sequence(flash, flash_backward, make_qkv, make_dout):
    q, k, v = make_qkv((1, 2, 1500, 64), (1, 1, 1500, 64), dtype=np.float32)
    check(flash, flash_backward, q, k, v, make_dout(q, v), causal=True)


def test_deterministic_flag(backend, flash, flash_backward, make_qkv, make_dout):
    """deterministic=True: the oracle's gradient, and bit for bit the same in two calls (the
    CPU backends have no atomics, so it is also the default's result)."""
    import xattn

    q, k, v = make_qkv((1, 4, 70, 32), (1, 2, 90, 32), dtype=np.float32)
    dout = make_dout(q, v)
    default = check(flash, flash_backward, q, k, v, dout, causal=True)
    out, lse = flash(q, k, v, causal=True, return_lse=True)
    for _ in range(2):
        got = xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True,
                                             deterministic=True, backend=backend)
        for a, b in zip(got, default, strict=True):
            np.testing.assert_array_equal(a, b)
