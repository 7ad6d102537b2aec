"""flash_attention (forward) against the float64 oracle, once per CPU backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BF16, random_array

import xattn
from xattn._backends.numpy_.tiled import BLOCK_K, BLOCK_Q
from xattn.testing import assert_close, naive_attention, reference_attention


def check(flash, q, k, v, *, dtype=None, **options):
    """Run the backend and compare out and lse with the oracle under the dtype's tolerance."""
    out, lse = flash(q, k, v, return_lse=True, **options)
    ref, ref_lse, _ = reference_attention(q, k, v, **options)
    dtype = np.dtype(q.dtype) if dtype is None else dtype
    if dtype.itemsize == 2:
        naive = naive_attention(q, k, v, **options)
        assert_close(out, ref, xp=np, dtype=dtype, naive=naive, name="out")
        # lse is accumulated in float32 from inputs that are exact in float32.
        assert_close(lse, ref_lse, xp=np, dtype=np.float32, name="lse")
    else:
        assert_close(out, ref, xp=np, dtype=dtype, name="out")
        assert_close(lse, ref_lse, xp=np, dtype=dtype, name="lse")
    return out, lse


# --- every option and the combinations that interact --------------------------------------


@pytest.mark.parametrize("sq,sk", [(150, 600), (600, 150), (BLOCK_Q + 3, 2 * BLOCK_K + 5)])
def test_options_float32(flash, make_qkv, make_options, option_name, sq, sk):
    batch, hq, hkv = (2,), 4, 2
    q, k, v = make_qkv((*batch, hq, sq, 32), (*batch, hkv, sk, 32), dtype=np.float32)
    opts = make_options(option_name, batch, hq, sq, sk, np.float32)
    check(flash, q, k, v, **opts)


def test_options_float64(flash, make_qkv, make_options, option_name):
    batch, hq, hkv, sq, sk = (1,), 4, 1, 140, 530
    q, k, v = make_qkv((*batch, hq, sq, 24), (*batch, hkv, sk, 24), dv=16)
    opts = make_options(option_name, batch, hq, sq, sk)
    check(flash, q, k, v, **opts)


@pytest.mark.parametrize("causal", [False, True])
def test_auto_backend(make_qkv, causal):
    q, k, v = make_qkv((2, 3, 70, 16), (2, 3, 90, 16), dtype=np.float32)
    out = xattn.flash_attention(q, k, v, causal=causal)
    ref, _, _ = reference_attention(q, k, v, causal=causal)
    assert_close(out, ref, xp=np, dtype=np.float32)


# --- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["plain", "causal+window", "alibi", "mask+bias+softcap"])
def test_dtypes(flash, make_qkv, make_options, dtype, case):
    batch, hq, hkv, sq, sk = (2,), 4, 2, 130, 200
    q, k, v = make_qkv((*batch, hq, sq, 64), (*batch, hkv, sk, 64), dtype=dtype)
    opts = make_options(case, batch, hq, sq, sk, dtype)
    out, lse = check(flash, q, k, v, **opts)
    expected_lse = np.float64 if dtype == np.float64 else np.float32
    assert lse.dtype == expected_lse


@pytest.mark.skipif(BF16 is None, reason="ml_dtypes missing")
def test_bfloat16_large_logits(flash, rng):
    # Large scores stress the running max; bf16 has float32's range but 8 mantissa bits.
    q = random_array(rng, (2, 100, 32), BF16, scale=4.0)
    k = random_array(rng, (2, 300, 32), BF16, scale=4.0)
    v = random_array(rng, (2, 300, 32), BF16)
    check(flash, q, k, v, causal=True)


# --- awkward shapes -------------------------------------------------------------------------

AWKWARD_LENGTHS = [
    (1, 1),
    (1, 700),
    (700, 1),
    (BLOCK_Q - 1, BLOCK_K - 1),
    (BLOCK_Q, BLOCK_K),
    (BLOCK_Q + 1, BLOCK_K + 1),
    (2 * BLOCK_Q, 2 * BLOCK_K),
    (3 * BLOCK_Q + 17, BLOCK_K + 300),  # Sq < Sk, several tiles each way
    (2 * BLOCK_Q + 40, 100),  # Sq > Sk: causal leaves the first rows empty
]


@pytest.mark.parametrize("sq,sk", AWKWARD_LENGTHS, ids=lambda x: str(x))
@pytest.mark.parametrize("case", ["plain", "causal", "causal+window", "window_0_0"])
def test_lengths(flash, make_qkv, make_options, sq, sk, case):
    q, k, v = make_qkv((2, sq, 16), (2, sk, 16), dtype=np.float32)
    check(flash, q, k, v, **make_options(case, (), 2, sq, sk, np.float32))


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (8, 2), (8, 1), (3, 1), (6, 3)])
@pytest.mark.parametrize("case", ["causal", "alibi", "mask_full"])
def test_gqa(flash, make_qkv, make_options, hq, hkv, case):
    batch, sq, sk = (2,), 70, 150
    q, k, v = make_qkv((*batch, hq, sq, 16), (*batch, hkv, sk, 16), dv=8, dtype=np.float32)
    check(flash, q, k, v, **make_options(case, batch, hq, sq, sk, np.float32))


def test_gqa_head_mapping(flash, make_qkv):
    # Query head h must use kv head h // (Hq // Hkv): compare head by head against MHA runs.
    q, k, v = make_qkv((1, 6, 20, 8), (1, 2, 30, 8), dtype=np.float32)
    out = flash(q, k, v)
    for h in range(6):
        g = h // 3
        ref, _, _ = reference_attention(q[:, h], k[:, g], v[:, g])
        assert_close(out[:, h], ref, dtype=np.float32, name=f"head {h}")


@pytest.mark.parametrize(
    "q_shape,k_shape",
    [
        ((33, 16), (47, 16)),  # 2-D: one head, no head axis
        ((2 * BLOCK_Q + 9, 16), (BLOCK_K + 40, 16)),  # 2-D over several tiles
        ((5, 20, 16), (5, 30, 16)),  # 3-D: heads only
        ((2, 3, 4, 20, 16), (2, 3, 2, 30, 16)),  # 5-D: two batch dims, GQA
        ((1, 1, 1, 1, 1, 8), (1, 1, 1, 1, 9, 8)),  # 6-D, S = 1
    ],
    ids=["2d", "2d_tiles", "3d", "5d", "6d"],
)
@pytest.mark.parametrize("case", ["plain", "causal", "mask_bcast", "alibi"])
def test_ranks(flash, make_qkv, make_options, q_shape, k_shape, case):
    q, k, v = make_qkv(q_shape, k_shape, dtype=np.float32)
    batch = q_shape[:-3]
    hq = q_shape[-3] if len(q_shape) > 2 else 1
    opts = make_options(case, batch, hq, q_shape[-2], k_shape[-2], np.float32)
    out, lse = check(flash, q, k, v, **opts)
    assert out.shape == q_shape and lse.shape == q_shape[:-1]


@pytest.mark.parametrize("d", [16, 40, 64, 80, 128, 256])
def test_head_dims(flash, make_qkv, d):
    q, k, v = make_qkv((2, 2, 100, d), (2, 1, 150, d), dtype=np.float32)
    check(flash, q, k, v, causal=True)


@pytest.mark.parametrize("d,dv", [(64, 16), (16, 64), (40, 80), (8, 1)])
def test_value_dim_differs(flash, make_qkv, d, dv):
    q, k, v = make_qkv((2, 60, d), (2, 90, d), dv=dv, dtype=np.float32)
    out, _ = check(flash, q, k, v, window=(10, 10))
    assert out.shape == (2, 60, dv)


def _layouts(rng, kind):
    """q, k, v as non-contiguous views of the requested kind, shapes (2, 4, 60, 32)."""
    if kind == "bshd":  # (batch, seq, heads, dim) storage, the layout of most checkpoints
        return tuple(
            random_array(rng, (2, 60, 4, 32), np.float32).transpose(0, 2, 1, 3) for _ in range(3)
        )
    if kind == "strided":  # every other position and channel of bigger arrays
        return tuple(random_array(rng, (2, 4, 120, 64), np.float32)[:, :, ::2, ::2]
                     for _ in range(3))
    if kind == "reversed":
        return tuple(random_array(rng, (2, 4, 60, 32), np.float32)[:, ::-1, ::-1] for _ in range(3))
    if kind == "fortran":
        return tuple(np.asfortranarray(random_array(rng, (2, 4, 60, 32), np.float32))
                     for _ in range(3))
    if kind == "broadcast_kv":  # zero strides: one key/value row shared by all batch elements
        q = random_array(rng, (2, 4, 60, 32), np.float32)
        k, v = (np.broadcast_to(random_array(rng, (1, 4, 60, 32), np.float32), (2, 4, 60, 32))
                for _ in range(2))
        return q, k, v
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bshd", "strided", "reversed", "fortran", "broadcast_kv"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(flash, rng, kind, causal):
    q, k, v = _layouts(rng, kind)
    assert not (q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous)
    before = [x.copy() for x in (q, k, v)]
    check(flash, q, k, v, causal=causal)
    for x, x0 in zip((q, k, v), before, strict=True):
        np.testing.assert_array_equal(x, x0)  # inputs are never written


# --- rows with no visible key ---------------------------------------------------------------


@pytest.mark.filterwarnings("error")  # no divide-by-zero / invalid-value warnings either
@pytest.mark.parametrize(
    "case",
    ["mask_rows", "causal_sq_gt_sk", "window_outside", "bias_neg_inf_row", "all_masked",
     "empty_keys"],
)
def test_fully_masked_rows(flash, rng, dtype, case):
    hq, sq, sk, d = 2, 150, 70, 16
    if case == "empty_keys":
        sk = 0
    q = random_array(rng, (hq, sq, d), dtype)
    k = random_array(rng, (hq, sk, d), dtype)
    v = random_array(rng, (hq, sk, d), dtype)
    empty = np.zeros((hq, sq), bool)
    opts = {}
    if case == "mask_rows":
        mask = rng.random((hq, sq, sk)) < 0.5
        mask[:, ::7] = False
        empty[:, ::7] = True
        opts = dict(mask=mask)
    elif case == "causal_sq_gt_sk":
        opts = dict(causal=True)
        empty[:, : sq - sk] = True
    elif case == "window_outside":
        # window=(0, 0) lets row i see only key i + Sk - Sq, which is < 0 for early rows.
        opts = dict(window=(0, 0))
        empty[:, : sq - sk] = True
    elif case == "bias_neg_inf_row":
        bias = np.zeros((sq, sk), dtype)
        bias[3] = -np.inf
        empty[:, 3] = True
        opts = dict(bias=bias, softcap=5.0)
    else:
        if case == "all_masked":
            opts = dict(mask=np.zeros((sq, sk), bool))
        empty[:] = True
    out, lse = check(flash, q, k, v, **opts)
    assert not np.isnan(out.astype(np.float64)).any()
    assert np.all(out[empty].astype(np.float64) == 0.0)
    assert np.all(np.isneginf(lse[empty]))
    assert np.all(np.isfinite(lse[~empty]))


# --- outputs --------------------------------------------------------------------------------


def test_return_lse_flag(flash, make_qkv):
    q, k, v = make_qkv((2, 20, 8), (2, 30, 8), dtype=np.float32)
    out = flash(q, k, v)
    out2, lse = flash(q, k, v, return_lse=True)
    assert isinstance(out, np.ndarray) and out.shape == (2, 20, 8)
    np.testing.assert_array_equal(out, out2)
    assert lse.shape == (2, 20)


def test_matches_standard_attention(flash, make_qkv, rng):
    q, k, v = make_qkv((3, 2, 90, 32), (3, 1, 90, 32), dtype=np.float32)
    mask = rng.random((90, 90)) < 0.9
    opts = dict(causal=True, softcap=4.0, mask=mask, alibi_slopes=xattn.alibi_slopes(2))
    out, lse = flash(q, k, v, return_lse=True, **opts)
    out_s, lse_s = xattn.standard_attention(q, k, v, return_lse=True, **opts)
    np.testing.assert_allclose(out, out_s, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, lse_s, rtol=2e-5, atol=2e-5)


def test_alibi_slopes_equal_alibi_bias(flash, make_qkv):
    # The in-kernel ALiBi and the dense alibi_bias passed as bias= are the same function.
    q, k, v = make_qkv((4, 50, 16), (4, 80, 16), dtype=np.float64)
    slopes = xattn.alibi_slopes(4, dtype=np.float64)
    a = flash(q, k, v, alibi_slopes=slopes, causal=True)
    b = flash(q, k, v, bias=xattn.alibi_bias(slopes, 50, 80), causal=True)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_deterministic(flash, make_qkv):
    q, k, v = make_qkv((2, 2, 200, 32), (2, 2, 700, 32), dtype=np.float32)
    a = flash(q, k, v, causal=True)
    b = flash(q, k, v, causal=True)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence(flash, make_qkv, causal):
    q, k, v = make_qkv((1, 2, 2100, 64), (1, 1, 2100, 64), dtype=np.float32)
    check(flash, q, k, v, causal=causal, window=(700, None) if causal else None)


def test_gqa_never_repeats_kv(flash, rng):
    # MQA with 32 query heads: a repeated copy of k and v would be 32x their 4 MiB.
    import tracemalloc

    q = random_array(rng, (1, 32, 64, 64), np.float32)
    k = random_array(rng, (1, 1, 8192, 64), np.float32)
    v = random_array(rng, (1, 1, 8192, 64), np.float32)
    flash(q, k, v)  # warm up (JIT, thread pool) outside the measurement
    tracemalloc.start()
    try:
        flash(q, k, v, causal=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    repeated = 2 * 32 * k.nbytes
    assert peak < repeated / 4, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_flags_must_be_bools(make_qkv, bad):
    """allow_tf32 and deterministic reject non-booleans, as causal does."""
    q, k, v = make_qkv((2, 8, 16), (2, 8, 16))
    with pytest.raises(TypeError, match="allow_tf32: expected a bool"):
        xattn.flash_attention(q, k, v, allow_tf32=bad)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match="deterministic: expected a bool"):
        xattn.flash_attention_backward(np.ones_like(out), q, k, v, out, lse, deterministic=bad)


def test_cpu_calls_are_planned_every_time():
    """Only CuPy calls reuse a planned problem (xattn/flash.py: _signature): the CPU table's
    choice follows which packages import, and planning is small beside a CPU call."""
    from xattn import flash as flash_mod

    q = np.ones((2, 8, 16), np.float32)
    before = dict(flash_mod._PLANNED)
    xattn.flash_attention(q, q, q, causal=True)
    assert flash_mod._PLANNED == before
