"""The 3xTF32 float32 backward (flash_bwd_tf32x3.cu) against the float64 oracle.

GPU tests (marked ``gpu``, skipped without CuPy and a device). Every gradient is held to
``max |error| <= REL * max |reference|`` with ``REL = 1e-5`` (the strict SIMT backward's
accuracy; plain TF32 gives about ``1e-3``), per gradient, with the worst element named (batch,
head, row, column: a broken fragment layout shows up as a pattern). The kernel runs through
``flash_tf32x3.backward`` (whatever ``instances.TF32X3_BWD_ON`` says), fed by the float64
oracle's ``out`` and ``lse`` rounded to float32, so that only the backward's error is measured.
Outputs are poisoned with NaN before each launch (tests/gpu/conftest.py): an element the kernel
never writes fails as NaN.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from xattn._array import validate_attention
from xattn.testing import reference_attention, reference_attention_backward

try:
    import cupy as cp

    _NGPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no cupy, no driver or no device: GPU tests skip
    cp, _NGPU = None, 0

REL = 1e-5


def gpu(test):
    """Mark a test ``gpu`` and skip it where CuPy or a CUDA device is missing."""
    return pytest.mark.gpu(pytest.mark.skipif(_NGPU == 0, reason="needs CuPy and a CUDA "
                                              "device")(test))


def _inputs(rng, *, b=2, hq=4, hkv=2, sq=77, sk=150, d=64, dv=None):
    dv = d if dv is None else dv
    f = np.float32
    q = rng.standard_normal((b, hq, sq, d)).astype(f)
    k = rng.standard_normal((b, hkv, sk, d)).astype(f)
    v = rng.standard_normal((b, hkv, sk, dv)).astype(f)
    do = rng.standard_normal((b, hq, sq, dv)).astype(f)
    return q, k, v, do


def _run(q, k, v, do, config=None, **opts):
    """``(dq, dk, dv)`` of the kernel and of the float64 oracle (NumPy arrays)."""
    from xattn._backends.cupy_ import flash_tf32x3

    out, lse, _ = reference_attention(q, k, v, **opts)
    out = np.nan_to_num(out).astype(np.float32)
    lse = lse.astype(np.float32)
    g = [cp.asarray(x) for x in (q, k, v, do, out, lse)]
    copies = [x.copy() for x in g]
    # Array options (bias, mask, ALiBi slopes) go to the device; the oracle keeps NumPy's.
    kopts = {n: cp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in opts.items()}
    prob = validate_attention(g[0], g[1], g[2], **kopts)
    got = flash_tf32x3.backward(prob, g[3], g[0], g[1], g[2], g[4], g[5], config=config)
    for x, c in zip(g, copies, strict=True):  # inputs are not modified
        assert bool(cp.array_equal(x, c, equal_nan=True))
    ref = reference_attention_backward(do, q, k, v, **opts)
    return [cp.asnumpy(x) for x in got], ref


def _check(case, got, ref, rel=REL):
    for name, a, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == np.float32, (case, name, a.shape, a.dtype)
        assert np.isfinite(a).all(), f"[{case}] {name}: non-finite entries"
        err = np.abs(a - r)
        worst = int(np.argmax(err))
        # A gradient that is 0 in exact arithmetic (one visible key: dS = p (dP - delta) with
        # p = 1 and dP = delta) comes out as float32 rounding of dP - delta: the bound's floor
        # is the inputs' unit scale.
        bound = rel * max(float(np.abs(r).max(initial=0.0)), 1.0)
        where = tuple(int(i) for i in np.unravel_index(worst, err.shape))
        assert err.flat[worst] <= bound, (
            f"[{case}] {name}: max error {err.flat[worst]:.3g} at {where} (got "
            f"{float(a.flat[worst]):.8g}, expected {float(r.flat[worst]):.8g}) exceeds "
            f"{rel:g} * max(max|ref|, 1) = {bound:.3g}")


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(40, 9)),
    "causal_window": dict(causal=True, window=(33, None)),
    "scale": dict(scale=0.3),
}


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_float64(d, case):
    rng = np.random.default_rng(zlib.crc32(f"{d} {case}".encode()))
    q, k, v, do = _inputs(rng, d=d)
    _check(f"d={d} {case}", *_run(q, k, v, do, **CASES[case]))


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq, sk", [(1, 1), (16, 16), (17, 33), (200, 64), (64, 200),
                                    (129, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_lengths(d, sq, sk, causal):
    """Sequence ends inside a tile, Sq != Sk both ways (causal: rows before the first key see
    nothing and get zero gradients)."""
    rng = np.random.default_rng(sq * 1000 + sk + d)
    q, k, v, do = _inputs(rng, b=1, hq=2, hkv=1, sq=sq, sk=sk, d=d)
    _check(f"d={d} sq={sq} sk={sk} causal={causal}", *_run(q, k, v, do, causal=causal))


@gpu
@pytest.mark.parametrize("hq, hkv", [(8, 1), (6, 2), (4, 4)])
def test_gqa_sums_the_group(hq, hkv):
    rng = np.random.default_rng(hq * 10 + hkv)
    q, k, v, do = _inputs(rng, hq=hq, hkv=hkv, sq=90, sk=130)
    _check(f"hq={hq} hkv={hkv}", *_run(q, k, v, do, causal=True))


@gpu
def test_rows_that_see_no_key_get_zero_gradients():
    """A window that leaves the first queries without keys (Sq > Sk, causal): their dq is
    exactly zero, and keys no query sees get dk = dv = 0."""
    rng = np.random.default_rng(7)
    q, k, v, do = _inputs(rng, b=1, hq=2, hkv=2, sq=120, sk=50)
    (dq, dk, dv), ref = _run(q, k, v, do, causal=True, window=(10, 0))
    _check("empty rows", (dq, dk, dv), ref)
    assert not dq[:, :, :70].any()
    seen = np.abs(ref[1]).sum(axis=-1) > 0
    assert not dk[~seen].any() and not dv[~seen].any()


@gpu
@pytest.mark.parametrize("d", [32, 48, 96])
def test_padded_head_dims(d):
    rng = np.random.default_rng(d)
    q, k, v, do = _inputs(rng, d=d, sq=70, sk=90)
    _check(f"d={d}", *_run(q, k, v, do, causal=True))


@gpu
def test_dv_differs_from_d():
    rng = np.random.default_rng(3)
    q, k, v, do = _inputs(rng, d=64, dv=128, sq=50, sk=80)
    _check("d=64 dv=128", *_run(q, k, v, do))


@gpu
@pytest.mark.parametrize("mod", ["softcap", "alibi", "bias", "mask"])
def test_score_mods(mod):
    rng = np.random.default_rng(11)
    q, k, v, do = _inputs(rng, sq=65, sk=97)
    opts = {"softcap": dict(softcap=3.0),
            "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32)),
            "bias": dict(bias=rng.standard_normal((4, 65, 97)).astype(np.float32)),
            "mask": dict(mask=rng.random((65, 97)) > 0.3)}[mod]
    _check(mod, *_run(q, k, v, do, **opts))


@gpu
@pytest.mark.parametrize("d", [64, 128])
def test_every_built_configuration(d):
    from xattn._backends.cupy_ import flash_bwd_tf32x3 as m

    rng = np.random.default_rng(d + 5)
    q, k, v, do = _inputs(rng, d=d, sq=100, sk=140)
    have = int(cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])
    for cfg in m.built(d):
        if m.smem_bytes(d, cfg) > have:
            continue
        _check(f"d={d} {cfg}", *_run(q, k, v, do, config=cfg, causal=True))


@gpu
def test_long_sequence_keeps_float32_accuracy():
    """S = 2048: the dV / dK sums over many query blocks (the truncation bias the per-block
    sums avoid would show here)."""
    rng = np.random.default_rng(1)
    q, k, v, do = _inputs(rng, b=1, hq=2, hkv=1, sq=2048, sk=2048)
    _check("S=2048", *_run(q, k, v, do))


@gpu
def test_through_the_public_api_with_the_switch_on(monkeypatch):
    import xattn
    from xattn import _backends
    from xattn._backends.cupy_ import instances

    monkeypatch.setattr(instances, "TF32X3_BWD_ON", True)
    rng = np.random.default_rng(2)
    q, k, v, do = (cp.asarray(x) for x in _inputs(rng, sq=60, sk=60))
    out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
    prob = validate_attention(q, k, v, causal=True)
    assert _backends.explain(prob, {}, op="backward")["backend"] == "cupy.tf32x3"
    got = xattn.flash_attention_backward(do, q, k, v, out, lse, causal=True)
    ref = xattn.flash_attention_backward(do, q, k, v, out, lse, causal=True,
                                         backend="cupy.simt")
    for a, r in zip(got, ref, strict=True):
        assert float(cp.abs(a - r).max()) <= 1e-5 * float(cp.abs(r).max())
