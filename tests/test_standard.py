"""standard_attention against the float64 oracle, its weights, and its memory limit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array

import xattn
from xattn.standard import DEFAULT_MAX_SCORE_BYTES
from xattn.testing import assert_close, naive_attention, reference_attention


def check(q, k, v, **options):
    out, lse, w = xattn.standard_attention(q, k, v, return_lse=True, return_weights=True,
                                           **options)
    ref, ref_lse, ref_w = reference_attention(q, k, v, **options)
    dtype = np.dtype(q.dtype)
    if dtype.itemsize == 2:
        assert_close(out, ref, xp=np, dtype=dtype, naive=naive_attention(q, k, v, **options),
                     name="out")
        assert_close(lse, ref_lse, xp=np, dtype=np.float32, name="lse")
        # Weights are float32 probabilities rounded once to 16 bits.
        assert_close(w, ref_w, xp=np, dtype=dtype, name="weights")
    else:
        assert_close(out, ref, xp=np, dtype=dtype, name="out")
        assert_close(lse, ref_lse, xp=np, dtype=dtype, name="lse")
        assert_close(w, ref_w, xp=np, dtype=dtype, name="weights")
    return out, lse, w


@pytest.mark.parametrize("sq,sk", [(40, 90), (90, 40)])
def test_options(make_qkv, make_options, option_name, sq, sk):
    batch, hq, hkv = (2,), 4, 2
    q, k, v = make_qkv((*batch, hq, sq, 16), (*batch, hkv, sk, 16), dv=8)
    check(q, k, v, **make_options(option_name, batch, hq, sq, sk))


@pytest.mark.parametrize("case", ["plain", "causal+window", "alibi", "mask+bias+softcap"])
def test_dtypes(make_qkv, make_options, dtype, case):
    batch, hq, hkv, sq, sk = (2,), 4, 1, 50, 70
    q, k, v = make_qkv((*batch, hq, sq, 64), (*batch, hkv, sk, 64), dtype=dtype)
    out, lse, w = check(q, k, v, **make_options(case, batch, hq, sq, sk, dtype))
    assert out.dtype == w.dtype == dtype
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)


@pytest.mark.parametrize(
    "q_shape,k_shape",
    [((1, 8), (1, 8)), ((7, 16), (12, 16)), ((8, 1, 9, 16), (8, 1, 1, 16)),
     ((2, 3, 8, 5, 40), (2, 3, 2, 6, 40)), ((2, 4, 6, 256), (2, 1, 6, 256))],
    ids=["s1", "2d", "mqa_sk1", "5d_gqa", "d256_mqa"],
)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(make_qkv, q_shape, k_shape, causal):
    q, k, v = make_qkv(q_shape, k_shape, dtype=np.float32)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_gqa(make_qkv, hq, hkv):
    q, k, v = make_qkv((2, hq, 9, 8), (2, hkv, 11, 8))
    check(q, k, v, causal=True, alibi_slopes=xattn.alibi_slopes(hq, dtype=np.float64))


def test_non_contiguous(rng):
    q, k, v = (random_array(rng, (2, 30, 4, 16)).transpose(0, 2, 1, 3) for _ in range(3))
    check(q, k[:, ::2], v[:, ::2], causal=True)


def test_return_flags(make_qkv):
    q, k, v = make_qkv((2, 5, 4), (2, 6, 4))
    out = xattn.standard_attention(q, k, v)
    out_l, lse = xattn.standard_attention(q, k, v, return_lse=True)
    out_w, w = xattn.standard_attention(q, k, v, return_weights=True)
    out_lw, lse2, w2 = xattn.standard_attention(q, k, v, return_lse=True, return_weights=True)
    assert isinstance(out, np.ndarray)
    for o in (out_l, out_w, out_lw):
        np.testing.assert_array_equal(o, out)
    assert lse.shape == (2, 5) and w.shape == (2, 5, 6)
    np.testing.assert_array_equal(lse, lse2)
    np.testing.assert_array_equal(w, w2)


@pytest.mark.filterwarnings("error")
def test_fully_masked_rows(make_qkv, rng, dtype):
    q, k, v = make_qkv((2, 12, 8), (2, 5, 8), dtype=dtype)
    mask = rng.random((12, 5)) < 0.6
    mask[:, 0] = True  # every causal row sees key 0 ...
    mask[-1] = False  # ... except the last one, which the mask empties
    out, lse, w = check(q, k, v, causal=True, mask=mask)
    # causal with Sq - Sk = 7 empties rows 0..6.
    empty = np.zeros(12, bool)
    empty[:7] = empty[-1] = True
    assert np.all(out[:, empty].astype(np.float64) == 0)
    assert np.all(np.isneginf(lse[:, empty])) and np.all(np.isfinite(lse[:, ~empty]))
    sums = w.astype(np.float64).sum(-1)
    np.testing.assert_allclose(sums[:, empty], 0.0)
    np.testing.assert_allclose(sums[:, ~empty], 1.0, rtol=2e-2 if dtype.itemsize == 2 else 1e-6)


@pytest.mark.filterwarnings("error")
def test_no_keys(make_qkv):
    q, k, v = make_qkv((3, 4, 8), (3, 0, 8), dv=5)
    out, lse, w = check(q, k, v)
    assert out.shape == (3, 4, 5) and np.all(out == 0) and np.all(np.isneginf(lse))
    assert w.shape == (3, 4, 0)


def test_weights_reproduce_output(make_qkv):
    q, k, v = make_qkv((2, 2, 10, 8), (2, 1, 13, 8))
    out, w = xattn.standard_attention(q, k, v, window=(3, 3), return_weights=True)
    np.testing.assert_allclose(out, w @ np.repeat(v, 2, axis=1), rtol=1e-12, atol=1e-12)
    assert np.all(w[:, :, 0, 7:] == 0)  # row 0 sits at key 3: keys 0..6 only


# --- memory limit ------------------------------------------------------------------------


def test_memory_limit_refuses_with_hint(make_qkv):
    q, k, v = make_qkv((2, 3, 40, 8), (2, 3, 50, 8), dtype=np.float32)
    need = 2 * 3 * 40 * 50 * 4  # float32 scores
    with pytest.raises(MemoryError, match=r"flash_attention") as info:
        xattn.standard_attention(q, k, v, max_score_bytes=need - 1)
    assert "max_score_bytes" in str(info.value) and "(2, 3, 40, 50)" in str(info.value)
    xattn.standard_attention(q, k, v, max_score_bytes=need)  # exactly at the limit is fine
    # Score mods add their (row-blocked) temporaries, 1/16 of the scores, to the count.
    with pytest.raises(MemoryError):
        xattn.standard_attention(q, k, v, causal=True, max_score_bytes=need)
    xattn.standard_attention(q, k, v, causal=True, max_score_bytes=need + need // 16)


def test_memory_limit_default_needs_no_allocation():
    # A 1M x 1M problem is refused before anything the size of the scores is allocated.
    q = np.broadcast_to(np.float32(0), (1, 1_000_000, 8))  # zero-stride views: no memory
    assert 4 * 10**12 > DEFAULT_MAX_SCORE_BYTES
    with pytest.raises(MemoryError, match="flash_attention"):
        xattn.standard_attention(q, q, q)


def test_memory_limit_float64_counts_eight_bytes(make_qkv):
    q, k, v = make_qkv((10, 8), (10, 8))
    with pytest.raises(MemoryError):
        xattn.standard_attention(q, k, v, max_score_bytes=10 * 10 * 8 - 1)
    xattn.standard_attention(q, k, v, max_score_bytes=10 * 10 * 8)
