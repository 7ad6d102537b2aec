"""flash_attention's host plan per call signature (xattn/flash.py: _signature, _PLANNED): a
repeated CuPy call reuses the validated problem and the table's choice, and nothing that
decides them is missed (needs CuPy and a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GPU_ONLY, cupy_array

import xattn
from xattn import flash as flash_mod

cp = pytest.importorskip("cupy")
pytestmark = GPU_ONLY


def _qkv(seed=0, dtype="float16", sq=100, sk=130, d=64):
    rng = np.random.default_rng(seed)
    return tuple(cupy_array(rng.standard_normal((2, h, s, d)), dtype)
                 for h, s in ((4, sq), (2, sk), (2, sk)))


def _impls(op):
    return {plan[2].__name__ for key, plan in flash_mod._PLANNED.items() if key[0] == op}


def test_a_repeated_call_is_planned_once_and_gives_the_same_bits(monkeypatch):
    monkeypatch.setattr(flash_mod, "_PLANNED", {})
    q, k, v = _qkv()
    first = xattn.flash_attention(q, k, v, causal=True, window=(40, None))
    assert len(flash_mod._PLANNED) == 1
    again = xattn.flash_attention(q, k, v, causal=True, window=(40, None))
    assert len(flash_mod._PLANNED) == 1
    assert bool(cp.all(first == again))
    # Another value of an option, another signature.
    xattn.flash_attention(q, k, v, causal=True, window=(41, None))
    assert len(flash_mod._PLANNED) == 2


def test_the_switch_and_the_dtype_are_part_of_the_signature(monkeypatch):
    monkeypatch.setattr(flash_mod, "_PLANNED", {})
    monkeypatch.delenv("XATTN_DISABLE", raising=False)
    q, k, v = _qkv(1)
    xattn.flash_attention(q, k, v, backend="cupy")
    monkeypatch.setenv("XATTN_DISABLE", "cupy")
    with pytest.raises(NotImplementedError, match="XATTN_DISABLE"):
        xattn.flash_attention(q, k, v, backend="cupy")
    out = xattn.flash_attention(q, k, v)  # auto: the generic path now
    assert len(_impls("forward")) == 2
    monkeypatch.delenv("XATTN_DISABLE")
    ref = xattn.flash_attention(q, k, v)
    assert float(cp.abs(out.astype(cp.float32) - ref.astype(cp.float32)).max()) < 2e-2
    with pytest.raises(TypeError, match="share one dtype"):
        xattn.flash_attention(q, k.astype(cp.float32), v)


def test_array_options_and_block_masks_are_checked_every_time(monkeypatch):
    monkeypatch.setattr(flash_mod, "_PLANNED", {})
    q, k, v = _qkv(2)
    slopes = cp.ones(4, dtype=cp.float32)
    xattn.flash_attention(q, k, v, alibi_slopes=slopes)
    xattn.flash_attention(q, k, v, scale=np.float32(0.1))
    assert flash_mod._PLANNED == {}
    with pytest.raises(ValueError, match="alibi_slopes"):
        xattn.flash_attention(q, k, v, alibi_slopes=cp.ones(3, dtype=cp.float32))


def test_the_backward_reuses_its_plan(monkeypatch):
    monkeypatch.setattr(flash_mod, "_PLANNED", {})
    q, k, v = _qkv(3)
    out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
    dout = cp.ones_like(out)
    first = xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    again = xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True,
                                           return_dbias=True)
    assert again[3] is None
    planned = xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    assert len(_impls("backward")) == 1
    for a, b in zip(first, planned, strict=True):
        assert bool(cp.all(a == b))
    with pytest.raises(TypeError, match="lse"):
        xattn.flash_attention_backward(dout, q, k, v, out, lse.astype(cp.float16), causal=True)
