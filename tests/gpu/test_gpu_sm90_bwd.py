"""The sm_90a (wgmma) backward, ``cupy.sm90_bwd``, against the float64 oracle
(needs CuPy and a compute capability 9.0 GPU).

dq, dk and dv must lie within the bound of the mma.sync backward's tests
(``test_gpu_flash_bwd._assert_grad``: 2x the float64 error of the naive same-dtype backward
plus the dtype's atol); failures name the case, the gradient, the worst element and the rows
and columns that are out, so a fragment or layout fault shows up as a pattern (rows modulo the
64-query step, keys modulo the 64-key warpgroup, columns past 64 = the second dQ panel).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import CC, cupy_array
from test_gpu_flash_bwd import _assert_grad, _inputs

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn.testing import naive_attention_backward, reference_attention_backward

cp = pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CC != 90, reason="needs a compute capability 9.0 (Hopper) GPU"),
]

ENTRY = "cupy.sm90_bwd"


def _check(case, q, k, v, **opts):
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 1)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    dout = cupy_array(rng.standard_normal(out.shape), np.dtype(q.dtype).name)
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=ENTRY, **opts)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        _assert_grad(case, name, g, r, n, q.dtype)
    return grads


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(77, 150), (130, 61), (64, 128)])
def test_sm90_backward(dtype, d, causal, sq, sk):
    # (130, 61) causal: the first 69 query rows see no key (lse = -inf, zero gradients);
    # (64, 128): exactly one query step and one key block.
    rng = np.random.default_rng([d, sq, sk, causal, 90])
    q, k, v = _inputs(rng, dtype, sq=sq, sk=sk, d=d)
    _check(f"{dtype} d={d} causal={causal} sq={sq} sk={sk}", q, k, v, causal=causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["gqa4", "mqa", "mha", "scale"])
def test_sm90_backward_heads_and_scale(d, case):
    hq, hkv, opts = {"gqa4": (8, 2, {}), "mqa": (4, 1, {"causal": True}),
                     "mha": (4, 4, {}), "scale": (4, 2, {"scale": 0.37, "causal": True})}[case]
    rng = np.random.default_rng([d, len(case), 91])
    q, k, v = _inputs(rng, "float16", hq=hq, hkv=hkv, sq=200, sk=333, d=d)
    _check(f"float16 d={d} {case}", q, k, v, **opts)


@pytest.mark.parametrize("d", [64, 128])
def test_sm90_backward_many_blocks(d):
    # Several key blocks and query steps (both Q/dO buffers, the causal query range per block),
    # lengths that are multiples of no tile.
    rng = np.random.default_rng([d, 92])
    q, k, v = _inputs(rng, "bfloat16", b=(1,), hq=4, hkv=2, sq=600, sk=700, d=d)
    _check(f"bfloat16 d={d} causal sq=600 sk=700", q, k, v, causal=True)


def test_sm90_backward_matches_the_mma_sync_backward():
    # The same gradients as cupy.sm80 up to rounding (both are float32-accumulated).
    rng = np.random.default_rng(93)
    q, k, v = _inputs(rng, "float16", b=(2,), hq=4, hkv=2, sq=256, sk=256, d=128)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, causal=True)
    dout = cupy_array(rng.standard_normal(out.shape), "float16")
    a = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=ENTRY, causal=True)
    b = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend="cupy.sm80",
                                       causal=True)
    for name, x, y in zip(("dq", "dk", "dv"), a, b, strict=True):
        xf, yf = (cp.asnumpy(t.astype(cp.float32)) for t in (x, y))
        scale = max(1.0, float(np.abs(yf).max()))
        err = float(np.abs(xf - yf).max())
        assert err <= 2e-2 * scale, f"{name}: max |sm90 - sm80| {err:.3g} (max |sm80| {scale:.3g})"


def test_auto_takes_the_sm90_backward_and_it_refuses_with_reasons():
    rng = np.random.default_rng(94)
    q, k, v = _inputs(rng, "float16", sq=40, sk=50, d=64)
    prob = validate_attention(q, k, v, causal=True)
    assert ENTRY not in _backends.OPT_IN
    assert _backends.explain(prob, {}, "auto", op="backward")["backend"] == ENTRY
    assert _backends.explain(prob, {}, ENTRY, op="backward")["backend"] == ENTRY
    refusals = {
        "window": (validate_attention(q, k, v, window=(8, 0)), {}, "window"),
        "softcap": (validate_attention(q, k, v, softcap=5.0), {}, "softcap"),
        "deterministic": (prob, {"deterministic": True}, "deterministic"),
    }
    for case, (p, opts, word) in refusals.items():
        why = _backends.explain(p, opts, ENTRY, op="backward")["reasons"][ENTRY]
        assert why is not None and word in why, (case, why)
    why = _backends.explain(prob, {}, ENTRY, op="forward")["reasons"][ENTRY]
    assert why is not None and "backward only" in why
    q96, k96, v96 = _inputs(rng, "float16", sq=40, sk=50, d=96)
    why = _backends.explain(validate_attention(q96, k96, v96), {}, ENTRY,
                            op="backward")["reasons"][ENTRY]
    assert why is not None and "head_dim 96" in why
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, window=(8, 0))
    with pytest.raises(NotImplementedError, match="window"):
        xattn.flash_attention_backward(out, q, k, v, out, lse, backend=ENTRY, window=(8, 0))


@pytest.mark.parametrize("sq,sk", [(0, 50), (40, 0), (0, 0)])
def test_sm90_backward_empty_lengths(sq, sk):
    # The launcher returns zeros without a launch (queries without keys, keys without queries).
    q = cp.ones((1, 4, sq, 64), cp.float16)
    k = cp.ones((1, 2, sk, 64), cp.float16)
    out = cp.zeros_like(q)
    lse = cp.full((1, 4, sq), -cp.inf, cp.float32)
    grads = xattn.flash_attention_backward(out, q, k, k, out, lse, backend=ENTRY)
    for x, like in zip(grads, (q, k, k), strict=True):
        assert x.shape == like.shape and x.dtype == like.dtype
        assert not bool(cp.any(x != 0))
