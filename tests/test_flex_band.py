"""flex_attention's band path against the float64 oracle (docs/dev/perf_flex.rst).

Chunks of the CPU forward that meet partial blocks, and whose rows see clearly fewer keys than
the BLAS tiles would visit, compute each row's scores over its own visible range with the
register-blocked kernels of ``_flex_micro`` (value width a multiple of one vector: 64 here,
48 once). The masks below are boolean tables read by one ``mask_mod`` (a captured array is a
kernel parameter, so every table shares one compilation): windows whose widths are and are not
multiples of the 32-key blocks, Sq != Sk, causal + window, windows with holes and with empty
key blocks (gaps inside a row's range), documents, per-head widths, empty rows and non-finite
values in hidden and visible keys.
"""

import numpy as np
import pytest

import xattn
from xattn.testing import assert_close, reference_attention, reference_attention_backward

pytest.importorskip("numba")

from xattn._backends.numpy_ import flex_njit  # noqa: E402  (after the numba check)

TABLE = np.ones((1, 1, 1), bool)  # (heads, Sq, Sk); replaced by each test
SLOPES = xattn.alibi_slopes(4, dtype=np.float64)


def table(b, h, q_idx, kv_idx):
    return TABLE[h, q_idx, kv_idx]


def table_all_heads(b, h, q_idx, kv_idx):
    return TABLE[0, q_idx, kv_idx]


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def _grid(sq, sk):
    return np.arange(sq)[:, None], np.arange(sk)[None, :]


def _masks():
    i, j = _grid(300, 300)
    docs = np.repeat(np.arange(6), [37, 120, 5, 90, 30, 18])
    rows = np.abs(i - j) <= 60
    rows[100:121] = False  # rows that see nothing
    i2, j2 = _grid(300, 520)
    return {
        "window 64": (np.abs(i - j) <= 64),
        "window 50": (np.abs(i - j) <= 50),
        "window Sq!=Sk": (np.abs(i2 + 100 - j2) <= 77),
        "causal+window": (j <= i) & (i - j <= 90),
        "window with holes": (np.abs(i - j) <= 80) & (j % 7 != 3),
        "window, empty key blocks": (np.abs(i - j) <= 70) & ((j // 32) % 4 != 1),
        "documents": docs[i] == docs[j],
        "empty rows": rows,
    }


def _set(mask):
    global TABLE
    TABLE = np.ascontiguousarray(mask if mask.ndim == 3 else mask[None])


def _inputs(rng, sq, sk, dtype, hq=4, hkv=2, d=40, dv=64):
    q = rng.standard_normal((2, hq, sq, d)).astype(dtype)
    k = rng.standard_normal((2, hkv, sk, d)).astype(dtype)
    v = rng.standard_normal((2, hkv, sk, dv)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("name", list(_masks()))
def test_band_masks_match_the_oracle(name):
    mask = _masks()[name]
    _set(mask)
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, *mask.shape, np.float32)
    out, lse = xattn.flex_attention(q, k, v, mask_mod=table_all_heads, return_lse=True)
    assert flex_njit.last_forward["band_chunks"] > 0
    ref_out, ref_lse, _ = reference_attention(q, k, v, mask=mask)
    assert_close(out, ref_out, xp=np, dtype=np.float32)
    assert_close(lse, ref_lse, xp=np)


@pytest.mark.slow  # a float64 compilation
def test_band_per_head_widths_gqa_float64():
    i, j = _grid(260, 260)
    mask = np.stack([np.abs(i - j) <= 20 + 30 * h for h in range(4)])
    _set(mask)
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, 260, 260, np.float64, d=64)
    out, lse = xattn.flex_attention(q, k, v, mask_mod=table, return_lse=True)
    assert flex_njit.last_forward["band_chunks"] > 0
    ref_out, ref_lse, _ = reference_attention(q, k, v, mask=mask)
    assert_close(out, ref_out, xp=np, dtype=np.float64)
    assert_close(lse, ref_lse, xp=np)


def test_band_with_score_mod_and_without_gqa():
    i, j = _grid(333, 333)
    mask = (j <= i + 40) & (i - j <= 70)
    _set(mask)
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, 333, 333, np.float32, hq=4, hkv=4)
    out = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] > 0
    ref_out, _, _ = reference_attention(q, k, v, mask=mask, alibi_slopes=SLOPES)
    assert_close(out, ref_out, xp=np, dtype=np.float32)


def test_band_path_off_and_not_taken(monkeypatch):
    # Same results without it; never taken without partial blocks (no mask, every key
    # visible) or where the value width does not fit its kernel.
    mask = _masks()["window 50"]
    _set(mask)
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, *mask.shape, np.float32)
    band = xattn.flex_attention(q, k, v, mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] > 0
    monkeypatch.setattr(flex_njit, "BAND_PATH", False)
    blas = xattn.flex_attention(q, k, v, mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] == 0
    assert_close(band, blas, xp=np, dtype=np.float32)
    monkeypatch.setattr(flex_njit, "BAND_PATH", True)
    xattn.flex_attention(q, k, v)
    assert flex_njit.last_forward["band_chunks"] == 0
    _set(np.ones_like(mask))
    xattn.flex_attention(q, k, v, mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] == 0
    _set(mask)
    out = xattn.flex_attention(q, k, v[..., :36], mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] == 0
    assert_close(out, reference_attention(q, k, v[..., :36], mask=mask)[0], xp=np,
                 dtype=np.float32)
    # 48 value columns: whole vectors, but not whole blocks of the wide P @ V kernel.
    out = xattn.flex_attention(q, k, v[..., :48], mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] > 0
    assert_close(out, reference_attention(q, k, v[..., :48], mask=mask)[0], xp=np,
                 dtype=np.float32)


def test_band_non_finite_keys_and_values():
    # A NaN value and an infinite key reach only the rows that see them (docs/numerics.rst):
    # the other rows equal the oracle on clean inputs, and the rows that see them match the
    # BLAS tiles' results, NaN for NaN.
    mask = _masks()["window 50"]
    _set(mask)
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, *mask.shape, np.float32)
    clean_out, _, _ = reference_attention(q, k, v, mask=mask)
    v[:, :, 120] = np.nan
    k[:, :, 200] = np.inf
    out = xattn.flex_attention(q, k, v, mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] > 0
    touched = mask[:, 120] | mask[:, 200]
    assert_close(out[:, :, ~touched], clean_out[:, :, ~touched], xp=np, dtype=np.float32)
    flex_njit.BAND_PATH = False
    try:
        blas = xattn.flex_attention(q, k, v, mask_mod=table_all_heads)
    finally:
        flex_njit.BAND_PATH = True
    np.testing.assert_array_equal(np.isnan(out), np.isnan(blas))
    assert np.isnan(out[:, :, mask[:, 120]]).all()
    np.testing.assert_allclose(out, blas, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a float64 forward and backward compilation
def test_band_forward_gives_the_backward_its_lse():
    # The backward recomputes from the band forward's lse: gradients against the oracle.
    mask = _masks()["causal+window"]
    _set(mask)
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, *mask.shape, np.float64, d=64)
    dout = rng.standard_normal((*q.shape[:-1], 64))
    out, lse = xattn.flex_attention(q, k, v, mask_mod=table_all_heads, return_lse=True)
    assert flex_njit.last_forward["band_chunks"] > 0
    dq, dk, dv, _ = xattn.flex_attention_backward(dout, q, k, v, out, lse,
                                                  mask_mod=table_all_heads)
    for got, want in zip((dq, dk, dv), reference_attention_backward(dout, q, k, v, mask=mask),
                         strict=True):
        assert_close(got, want, xp=np, dtype=np.float64)


@pytest.mark.slow  # a compilation with other vector widths
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_band_path_with_32_byte_vectors(monkeypatch, dtype):
    # CPUs without AVX-512 get 32-byte vectors (fewer registers than the blocks need: slower,
    # still right); forced here whatever this CPU has.
    from collections import OrderedDict

    from xattn._backends.numpy_ import _flex_micro

    monkeypatch.setattr(_flex_micro, "VEC_BYTES", 32)
    monkeypatch.setattr(flex_njit, "_modules", OrderedDict())
    mask = _masks()["window with holes"]
    _set(mask)
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, *mask.shape, dtype, d=40, dv=40)  # 40: whole 32-byte vectors
    out = xattn.flex_attention(q, k, v, mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] > 0
    assert_close(out, reference_attention(q, k, v, mask=mask)[0], xp=np, dtype=dtype)


def test_forward_scratch_kept_between_calls():
    # Each thread keeps its forward scratch from call to call (flex_njit._scratch): a call
    # after others that grew it (a GQA group of 8: twice the stacked rows) and that met
    # non-finite values gives the same bits as before them.
    mask = _masks()["window 50"]
    _set(mask)
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, *mask.shape, np.float32)
    first = xattn.flex_attention(q, k, v, mask_mod=table_all_heads)
    assert flex_njit.last_forward["band_chunks"] > 0
    q16 = rng.standard_normal((2, 16, *q.shape[2:])).astype(np.float32)
    wide = xattn.flex_attention(q16, k, v, mask_mod=table_all_heads)
    assert_close(wide, reference_attention(q16, k, v, mask=mask)[0], xp=np, dtype=np.float32)
    bad = v.copy()
    bad[:, :, 7] = np.nan
    xattn.flex_attention(q, k, bad, mask_mod=table_all_heads)
    np.testing.assert_array_equal(xattn.flex_attention(q, k, v, mask_mod=table_all_heads),
                                  first)
    assert_close(first, reference_attention(q, k, v, mask=mask)[0], xp=np, dtype=np.float32)


@pytest.mark.parametrize("mask_name", ["window 64", "causal+window"])
def test_forward_jobs_cover_every_group_once(mask_name):
    # The forward's jobs, their tail cut in halves (flex_njit._tail_split): every query group
    # of every (batch, kv head) exactly once, longest first before the tail.
    mask = _masks()[mask_name]
    _set(mask)
    mmod = flex_njit.cg.capture(table_all_heads, "mask_mod", 4)
    mod = flex_njit.forward_module(None, mmod, (), False)
    plan = flex_njit.block_plan(mod, mmod, (), False, batch=2, hq=3, hkv=3, sq=mask.shape[0],
                                sk=mask.shape[1], bq=flex_njit.block_q(1),
                                bk=flex_njit.BLOCK_K)
    jobs, _ = flex_njit._jobs(plan, 2, 3, flex_njit._FWD_JOBS_PER_THREAD, runs=True)
    order = flex_njit._tail_split(plan, jobs)
    groups = len(flex_njit._csr(plan, 0, 0)[0])
    seen = sorted((b, g, int(n)) for _, _, b, g, qbs in order for n in qbs)
    assert seen == [(b, g, n) for b in range(2) for g in range(3) for n in range(groups)]
    assert len(order) >= len(jobs)
    head = [c for c, *_ in order[: len(jobs) - 2 * flex_njit._pool.num_threads()]]
    assert head == sorted(head, reverse=True)
