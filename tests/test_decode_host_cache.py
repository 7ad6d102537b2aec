"""decode_attention's host-side caches: the validated problem per call signature and the
launch plans per cache state. Reused only when provably the same call; every bad call still
raises its own error."""

from __future__ import annotations

import numpy as np
import pytest

import xattn

F32 = np.float32


def _cache(rng, page_size=None):
    cache = xattn.KVCache(2, 2, 64, 8, dtype=F32, page_size=page_size)
    k, v = (rng.standard_normal((2, 2, 20, 8)).astype(F32) for _ in range(2))
    cache.append(k, v, lengths=[20, 7])
    return cache


def _reference(q, cache, **opts):
    out = []
    for b in range(cache.batch):
        K, V = cache.sequence(b)
        out.append(xattn.flash_attention(q[b], K, V, causal=True, **opts))
    return np.stack(out)


def test_repeated_calls_validate_bad_input_every_time(rng):
    cache = _cache(rng)
    q = rng.standard_normal((2, 4, 1, 8)).astype(F32)
    for _ in range(2):  # the second call takes the cached problem
        got = xattn.decode_attention(q, cache, window=(5, None), scale=0.5)
        np.testing.assert_allclose(got, _reference(q, cache, window=(5, None), scale=0.5),
                                   atol=1e-5)
    with pytest.raises(TypeError, match="window"):
        xattn.decode_attention(q, cache, window=(True, None), scale=0.5)
    with pytest.raises(TypeError, match="scale"):
        xattn.decode_attention(q, cache, window=(5, None), scale=True)
    with pytest.raises(ValueError, match="scale"):
        xattn.decode_attention(q, cache, window=(5, None), scale=float("nan"))
    with pytest.raises(TypeError, match="dtype"):
        xattn.decode_attention(q.astype(np.float64), cache, window=(5, None), scale=0.5)
    with pytest.raises(ValueError, match="head_dim"):
        xattn.decode_attention(q[..., :4], cache, window=(5, None), scale=0.5)
    with pytest.raises(TypeError, match="return_lse"):
        xattn.decode_attention(q, cache, window=(5, None), scale=0.5, return_lse=1)
    # Values the key does not take (NumPy scalars, lists) go through full validation.
    got = xattn.decode_attention(q, cache, window=[5, None], scale=np.float64(0.5))
    np.testing.assert_allclose(got, _reference(q, cache, window=(5, None), scale=0.5),
                               atol=1e-5)


def test_the_environment_switch_is_read_at_every_call(rng, monkeypatch):
    cache = _cache(rng)
    q = rng.standard_normal((2, 4, 1, 8)).astype(F32)
    xattn.decode_attention(q, cache)
    monkeypatch.setenv("XATTN_DISABLE", "numba,numpy")
    with pytest.raises(NotImplementedError, match="no cpu backend"):
        xattn.decode_attention(q, cache)


@pytest.mark.parametrize("page_size", [None, 4])
def test_launch_plans_are_dropped_at_every_change(rng, page_size):
    cache = _cache(rng, page_size)
    plans = cache._launch_plans()
    plans["x"] = 1
    assert cache._launch_plans() == {"x": 1}  # unchanged cache: kept
    k = rng.standard_normal((2, 2, 1, 8)).astype(F32)
    cache.append(k, k)
    assert cache._launch_plans() == {}
    cache._launch_plans()["y"] = 2
    cache.reset(1)
    assert cache._launch_plans() == {}
    q = rng.standard_normal((2, 4, 1, 8)).astype(F32)
    K, V = cache.sequence(0)
    np.testing.assert_allclose(xattn.decode_attention(q, cache)[0],
                               xattn.flash_attention(q[0], K, V, causal=True), atol=1e-5)
