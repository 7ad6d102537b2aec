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


def test_disable_switch_reads_the_environment_as_it_is_now(monkeypatch):
    """The call key's cheap read of XATTN_DISABLE follows every change made through
    os.environ, and agrees with os.environ about whether and what is set."""
    import os

    from xattn.kvcache import _disable_switch

    def plain():
        value = os.environ.get("XATTN_DISABLE")
        return None if value is None else os.fsencode(value) if os.name == "posix" else value

    monkeypatch.delenv("XATTN_DISABLE", raising=False)
    assert _disable_switch() is None
    for value in ("numba", "numba,numpy", ""):
        monkeypatch.setenv("XATTN_DISABLE", value)
        assert _disable_switch() == plain()
    monkeypatch.delenv("XATTN_DISABLE")
    assert _disable_switch() is None
