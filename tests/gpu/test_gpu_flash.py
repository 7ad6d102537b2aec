"""The CuPy RawKernel flash attention against the float64 oracle (needs CuPy and a GPU)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import GPU_ONLY, cupy_array

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn.testing import assert_close, naive_attention, reference_attention

cp = pytest.importorskip("cupy")
pytestmark = GPU_ONLY


@pytest.fixture(autouse=True)
def mma_sync_kernel(monkeypatch):
    """The Hopper kernel is switched off here so that these tests cover the mma.sync kernel
    (the one sm_80/sm_89 cards run) on every card; test_gpu_flash_sm90.py covers the other."""
    monkeypatch.setenv("XATTN_DISABLE", "cupy.sm90")


def _inputs(rng, dtype, *, b=(2,), hq=4, hkv=2, sq=77, sk=150, d=64, amp=1.0):
    q = cupy_array(amp * rng.standard_normal((*b, hq, sq, d)), dtype)
    k = cupy_array(amp * rng.standard_normal((*b, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((*b, hkv, sk, d)), dtype)
    return q, k, v


def _check(q, k, v, **opts):
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend="cupy", **opts)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    naive = naive_attention(q, k, v, **opts)
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive, name="out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3, name="lse")
    return out, lse


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(77, 150), (130, 61), (64, 64)])
def test_forward_dtypes_head_dims(dtype, d, causal, sq, sk):
    rng = np.random.default_rng([d, sq, sk, causal])
    q, k, v = _inputs(rng, dtype, sq=sq, sk=sk, d=d)
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "case",
    [
        "window",
        "window_right0",
        "causal_window",
        "alibi",
        "alibi_batched",
        "softcap",
        "bias_shared",
        "bias_full",
        "mask",
        "mask_empty_rows",
        "scale",
        "mqa",
        "all",
    ],
)
def test_forward_options(dtype, d, case):
    rng = np.random.default_rng([zlib.crc32(case.encode()), d])
    hq, hkv, sq, sk = 4, 2, 100, 173
    if case == "mqa":
        hkv = 1
    q, k, v = _inputs(rng, dtype, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d,
                      amp=3.0 if case in ("softcap", "all") else 1.0)
    opts = {}
    if case == "window":
        opts["window"] = (20, 7)
    elif case == "window_right0":
        opts["window"] = (None, 0)
    elif case == "causal_window":
        opts.update(causal=True, window=(33, None))
    elif case == "alibi":
        opts["alibi_slopes"] = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
    elif case == "alibi_batched":
        opts["alibi_slopes"] = cp.asarray(rng.uniform(0.01, 0.5, (2, hq)), dtype=cp.float32)
    elif case == "softcap":
        opts["softcap"] = 5.0
    elif case == "bias_shared":
        opts["bias"] = cp.asarray(rng.standard_normal((sq, sk)), dtype=cp.float32)
    elif case == "bias_full":
        opts["bias"] = cp.asarray(rng.standard_normal((2, hq, sq, sk)), dtype=cp.float16)
    elif case == "mask":
        opts["mask"] = cp.asarray(rng.random((2, 1, sq, sk)) < 0.7)
    elif case == "mask_empty_rows":
        m = rng.random((sq, sk)) < 0.5
        m[::7] = False  # fully masked rows: out 0, lse -inf
        opts["mask"] = cp.asarray(m)
    elif case == "scale":
        opts["scale"] = 0.3
    elif case == "all":
        opts.update(causal=True, window=(64, 3), softcap=10.0,
                    alibi_slopes=cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32),
                    bias=cp.asarray(rng.standard_normal((hq, 1, sk)), dtype=cp.float32),
                    mask=cp.asarray(rng.random((sq, sk)) < 0.9))
    out, lse = _check(q, k, v, **opts)
    if case == "mask_empty_rows":
        assert bool(cp.all(out[..., ::7, :] == 0))
        assert bool(cp.all(cp.isneginf(lse[..., ::7])))


@pytest.mark.parametrize("d", [40, 80, 200])
def test_padded_head_dims(d):
    rng = np.random.default_rng(d)
    q, k, v = _inputs(rng, "float16", sq=50, sk=90, d=d)
    _check(q, k, v, causal=True)


def test_two_dim_and_multi_batch_inputs():
    rng = np.random.default_rng(5)
    q, k, v = (cupy_array(rng.standard_normal((70, 64)), "float16") for _ in range(3))
    _check(q, k, v, causal=True)
    q, k, v = _inputs(rng, "float16", b=(2, 3), hq=2, hkv=1, sq=40, sk=40)
    _check(q, k, v, bias=cp.asarray(rng.standard_normal((3, 1, 40, 40)), dtype=cp.float32))


def test_long_sequence_many_blocks():
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, "float16", b=(1,), hq=2, hkv=2, sq=1000, sk=1500, d=128)
    _check(q, k, v, causal=True)


def test_deterministic():
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, "bfloat16", sq=300, sk=300, d=128)
    a = xattn.flash_attention(q, k, v, causal=True, backend="cupy")
    b = xattn.flash_attention(q, k, v, causal=True, backend="cupy")
    assert bool(cp.all(a.view(cp.uint16) == b.view(cp.uint16)))


def test_auto_picks_the_kernel():
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, "float16")
    prob = validate_attention(q, k, v, causal=True)
    assert _backends.select_entry(prob, {}, "auto").name == "cupy.sm80"
    assert _backends.select(prob, {}, "auto").__name__.endswith("cupy_.flash")


def test_refusals_raise_when_forced_and_fall_back_on_auto(monkeypatch):
    # float32 refusals need the float32 kernels off (each passes its own tests when on).
    monkeypatch.setenv("XATTN_DISABLE", "cupy.sm90,cupy.simt,cupy.tf32x3")
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, "float32", sq=33, sk=47, d=32)
    with pytest.raises(NotImplementedError, match="float32"):
        xattn.flash_attention(q, k, v, backend="cupy")
    out = xattn.flash_attention(q, k, v, causal=True)  # auto: the generic backend
    ref, _, _ = reference_attention(q, k, v, causal=True)
    assert_close(out, ref, xp=cp)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="backward"):
        xattn.flash_attention_backward(cp.ones_like(out), q, k, v, out, lse, backend="cupy")
    qd, kd, vd = _inputs(rng, "float16", sq=8, sk=8, d=288)
    with pytest.raises(NotImplementedError, match="head_dim"):
        xattn.flash_attention(qd, kd, vd, backend="cupy")


@pytest.mark.parametrize("d", [32, 64, 96, 128, 256, 80])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(77, 150), (130, 61)])
def test_fp32_simt_kernel(d, causal, sq, sk):
    rng = np.random.default_rng([d, sq, sk, causal, 32])
    q, k, v = _inputs(rng, "float32", sq=sq, sk=sk, d=d)
    # Named, so that the test keeps meaning the SIMT kernel whatever auto's float32 order.
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True,
                                     backend="cupy.simt")
    ref, ref_lse, _ = reference_attention(q, k, v, causal=causal)
    assert_close(out, ref, xp=cp, dtype=np.float32, name="out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, name="lse")


@pytest.mark.parametrize("case", ["all", "mask_empty_rows", "mqa_window"])
def test_fp32_simt_kernel_options(case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    hq, sq, sk = 4, 100, 173
    q, k, v = _inputs(rng, "float32", hq=hq, hkv=1 if case == "mqa_window" else 2, sq=sq,
                      sk=sk, d=64, amp=3.0)
    if case == "all":
        opts = dict(causal=True, window=(64, 3), softcap=10.0,
                    alibi_slopes=cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32),
                    bias=cp.asarray(rng.standard_normal((hq, 1, sk)), dtype=cp.float32),
                    mask=cp.asarray(rng.random((sq, sk)) < 0.9))
    elif case == "mask_empty_rows":
        m = rng.random((sq, sk)) < 0.5
        m[::7] = False
        opts = dict(mask=cp.asarray(m))
    else:
        opts = dict(window=(20, 7))
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend="cupy.simt", **opts)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref, xp=cp, dtype=np.float32, atol=1e-4, rtol=1e-4, name="out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=1e-4, rtol=1e-4, name="lse")
