"""The one definition of visibility and score modification, against DESIGN.md's rules.

``visible`` below is DESIGN.md's rule transcribed element by element; xattn._masking must
agree with it everywhere, and tile_plan must visit exactly the tiles that hold visible pairs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from xattn import _masking


def visible(i, j, sq, sk, causal, window):
    off = sk - sq
    if causal and not j <= i + off:
        return False
    if window is not None:
        left, right = window
        if left is not None and not i + off - left <= j:
            return False
        if right is not None and not j <= i + off + right:
            return False
    return True


def brute(sq, sk, causal, window):
    return np.array(
        [[visible(i, j, sq, sk, causal, window) for j in range(sk)] for i in range(sq)], bool
    ).reshape(sq, sk)


WINDOWS = [None, (0, 0), (3, None), (None, 2), (2, 5), (0, None), (None, 0), (40, 40)]
LENGTHS = [(1, 1), (5, 5), (3, 8), (8, 3), (13, 29), (29, 13), (1, 9), (9, 1), (6, 0)]
RULES = [(c, w) for c in (False, True) for w in WINDOWS]


def test_docstring_picture():
    vis = _masking.tile_visibility(np, 0, 3, 0, 5, sq=3, sk=5, causal=True, window=None)
    expected = ["xxx..", "xxxx.", "xxxxx"]
    assert ["".join("x" if b else "." for b in row) for row in vis] == expected


@pytest.mark.parametrize("sq,sk", LENGTHS)
@pytest.mark.parametrize("causal,window", RULES)
def test_tile_visibility_whole_matrix(sq, sk, causal, window):
    ref = brute(sq, sk, causal, window)
    vis = _masking.tile_visibility(np, 0, sq, 0, sk, sq=sq, sk=sk, causal=causal, window=window)
    if vis is None:
        assert ref.all()
    else:
        np.testing.assert_array_equal(vis, ref)


@pytest.mark.parametrize("causal,window", RULES)
def test_tile_visibility_sub_tiles(causal, window):
    sq, sk = 17, 23
    ref = brute(sq, sk, causal, window)
    for q0, q1, k0, k1 in [(0, 5, 0, 7), (5, 17, 7, 23), (3, 4, 10, 11), (10, 17, 0, 9)]:
        vis = _masking.tile_visibility(np, q0, q1, k0, k1, sq=sq, sk=sk, causal=causal,
                                       window=window)
        want = ref[q0:q1, k0:k1]
        if vis is None:
            assert want.all()
        else:
            np.testing.assert_array_equal(vis, want)


@pytest.mark.parametrize("sq,sk", LENGTHS)
@pytest.mark.parametrize("causal,window", RULES)
def test_key_range_is_tight(sq, sk, causal, window):
    ref = brute(sq, sk, causal, window)
    for q0 in range(sq):
        for q1 in range(q0 + 1, min(sq, q0 + 6) + 1):
            lo, hi = _masking.key_range(q0, q1, sq=sq, sk=sk, causal=causal, window=window)
            cols = np.flatnonzero(ref[q0:q1].any(axis=0))
            if cols.size:
                assert (lo, hi) == (cols[0], cols[-1] + 1)
            else:
                assert lo == hi


@pytest.mark.parametrize("sq,sk", [(13, 29), (29, 13), (8, 8)])
@pytest.mark.parametrize("causal,window", RULES)
def test_tile_is_full_exact(sq, sk, causal, window):
    ref = brute(sq, sk, causal, window)
    for q0, q1 in itertools.combinations(range(0, sq + 1, 3), 2):
        for k0, k1 in itertools.combinations(range(0, sk + 1, 4), 2):
            full = _masking.tile_is_full(q0, q1, k0, k1, sq=sq, sk=sk, causal=causal,
                                         window=window)
            assert full == bool(ref[q0:q1, k0:k1].all()), (q0, q1, k0, k1)


def check_plan(sq, sk, bq, bk, causal, window):
    ref = brute(sq, sk, causal, window)
    plan = _masking.tile_plan(sq, sk, bq, bk, causal, window)
    assert [(q0, q1) for q0, q1, _ in plan] == [
        (q0, min(q0 + bq, sq)) for q0 in range(0, sq, bq)
    ]
    for q0, q1, tiles in plan:
        covered = np.zeros(sk, bool)
        for k0, k1, full in tiles:
            assert 0 <= k0 < k1 <= sk
            assert k0 // bk == (k1 - 1) // bk, "a tile crosses a key-block boundary"
            assert not covered[k0:k1].any(), "tiles overlap"
            covered[k0:k1] = True
            block = ref[q0:q1, k0:k1]
            assert block.any(), "a tile with no visible pair is visited"
            assert full == bool(block.all())
        # Every visible pair of the query block lies in a visited tile.
        assert not (ref[q0:q1] & ~covered).any()
        ks = [t[0] for t in tiles]
        assert ks == sorted(ks)


@pytest.mark.parametrize("sq,sk", LENGTHS + [(40, 100), (100, 40), (64, 64)])
@pytest.mark.parametrize("bq,bk", [(1, 1), (4, 8), (16, 16), (128, 512)])
@pytest.mark.parametrize("causal,window", RULES)
def test_tile_plan(sq, sk, bq, bk, causal, window):
    check_plan(sq, sk, bq, bk, causal, window)


def test_tile_plan_skips_work():
    # A causal sliding window of width 64 over 4096 keys visits O(S * window) tiles.
    plan = _masking.tile_plan(4096, 4096, 128, 128, True, (64, None))
    assert max(len(t) for _, _, t in plan) == 2
    assert sum(len(t) for _, _, t in plan) <= 2 * 32
    causal = _masking.tile_plan(1024, 1024, 128, 128, True, None)
    assert sum(len(t) for _, _, t in causal) == 8 * 9 // 2
    assert sum(full for _, _, t in causal for *_, full in t) == 8 * 7 // 2


def test_alibi_distance():
    d = _masking.alibi_distance(np, 0, 3, 0, 5, sq=3, sk=5, dtype=np.float64)
    np.testing.assert_array_equal(d, [[2, 1, 0, 1, 2], [3, 2, 1, 0, 1], [4, 3, 2, 1, 0]])
    sub = _masking.alibi_distance(np, 1, 3, 2, 4, sq=3, sk=5, dtype=np.float32)
    np.testing.assert_array_equal(sub, d[1:3, 2:4])
    assert sub.dtype == np.float32


@pytest.mark.parametrize("q0,k0", [(0, 0), (2, 3)])
def test_apply_score_mods_order(q0, k0):
    # DESIGN: scale * q.k, then softcap, then bias and ALiBi, then the masks.
    rng = np.random.default_rng(5)
    sq, sk, h, c = 6, 9, 2, 1.3
    raw = 3 * rng.standard_normal((h, sq, sk))
    bias = rng.standard_normal((h, sq, sk))
    slopes = np.array([0.25, 0.75])
    mask = rng.random((h, sq, sk)) < 0.7
    window = (2, 1)
    expected = np.empty_like(raw)
    for hh, i, j in np.ndindex(h, sq, sk):
        s = c * math.tanh(raw[hh, i, j] / c) + bias[hh, i, j]
        s -= slopes[hh] * abs(i + sk - sq - j)
        if not (mask[hh, i, j] and visible(i, j, sq, sk, True, window)):
            s = -math.inf
        expected[hh, i, j] = s
    rows, cols = slice(q0, sq), slice(k0, sk)
    s = raw[:, rows, cols].copy()
    t = np.empty_like(s)
    got = _masking.apply_score_mods(
        np, s, q0=q0, k0=k0, sq=sq, sk=sk, causal=True, window=window, softcap=c,
        bias=bias[:, rows, cols], slopes=slopes[:, None, None], mask=mask[:, rows, cols],
        tanh_out=t,
    )
    assert got is s  # modified in place
    np.testing.assert_allclose(got, expected[:, rows, cols], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(t, np.tanh(raw[:, rows, cols] / c), rtol=1e-14)


def test_apply_score_mods_noop():
    s = np.arange(12.0).reshape(3, 4)
    out = _masking.apply_score_mods(np, s.copy(), q0=0, k0=0, sq=3, sk=4, causal=False,
                                    window=None)
    np.testing.assert_array_equal(out, s)
