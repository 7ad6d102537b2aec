"""The CuPy RawKernel flash attention backward against the float64 oracle (needs CuPy and a GPU).

Every failure message names the case, the gradient, the max error, where it occurs
(batch..., head, row, column) and the bound, so that a broken fragment layout or index shows
up as a pattern (e.g. only rows past a tile boundary, only odd columns, only dq).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import GPU_ONLY, cupy_array

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn._backends.cupy_ import _params, instances
from xattn.testing import (
    naive_attention_backward,
    reference_attention_backward,
    to_numpy,
    tolerance,
)

cp = pytest.importorskip("cupy")
pytestmark = GPU_ONLY




def _inputs(rng, dtype, *, b=(2,), hq=4, hkv=2, sq=77, sk=150, d=64, dv=None, amp=1.0):
    dv = d if dv is None else dv
    q = cupy_array(amp * rng.standard_normal((*b, hq, sq, d)), dtype)
    k = cupy_array(amp * rng.standard_normal((*b, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((*b, hkv, sk, dv)), dtype)
    return q, k, v


def _assert_grad(case, name, got, ref, naive, dtype):
    """``got`` within 2x the naive error of the float64 ``ref`` plus atol, NaN-free, typed."""
    a = to_numpy(got)
    assert isinstance(got, cp.ndarray), f"[{case}] {name}: not a CuPy array ({type(got)})"
    assert np.dtype(got.dtype) == np.dtype(dtype), \
        f"[{case}] {name}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    assert a.shape == ref.shape, f"[{case}] {name}: shape {a.shape}, expected {ref.shape}"
    bad = np.argwhere(~np.isfinite(a))
    assert bad.size == 0, (f"[{case}] {name}: {len(bad)} non-finite entries (unwritten/poisoned?)"
                           f", first at {bad[:5].tolist()}")
    atol = tolerance(dtype)[0] * max(1.0, float(np.abs(ref).max(initial=0.0)))
    naive_err = float(np.abs(naive - ref).max(initial=0.0))
    err = np.abs(a - ref)
    bound = 2.0 * naive_err + atol
    worst = float(err.max(initial=0.0))
    if worst > bound:
        idx = np.unravel_index(int(np.argmax(err)), err.shape)
        nbad = int((err > bound).sum())
        rows = sorted({int(i[-2]) for i in np.argwhere(err > bound)})[:12]
        cols = sorted({int(i[-1]) for i in np.argwhere(err > bound)})[:12]
        raise AssertionError(
            f"[{case}] {name}: max error {worst:.3g} > bound {bound:.3g} (2 x naive "
            f"{naive_err:.3g} + atol {atol:.3g}); worst at {tuple(int(i) for i in idx)}: got "
            f"{a[idx]!r}, expected {ref[idx]!r}; {nbad}/{err.size} entries out, rows {rows}, "
            f"cols {cols}; max |ref| {float(np.abs(ref).max()):.3g}"
        )


def _check(case, q, k, v, *, deterministic=False, backend="cupy", **opts):
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 1)
    # The forward from whichever GPU backend serves it (the kernel refuses Dv != D).
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    dout = cupy_array(rng.standard_normal(out.shape), np.dtype(q.dtype).name)
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=backend,
                                           deterministic=deterministic, **opts)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        _assert_grad(case, name, g, r, n, q.dtype)
    return grads, (dout, out, lse)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(77, 150), (130, 61)])
def test_backward_dtypes_head_dims(dtype, d, causal, sq, sk):
    rng = np.random.default_rng([d, sq, sk, causal, 2])
    q, k, v = _inputs(rng, dtype, sq=sq, sk=sk, d=d)
    _check(f"{dtype} d={d} causal={causal} sq={sq} sk={sk}", q, k, v, causal=causal)


_OPTION_CASES = [
    "window", "window_right0", "causal_window", "window_far", "alibi", "alibi_batched",
    "softcap", "bias_shared", "bias_full", "mask", "mask_empty_rows", "scale", "mha", "gqa4",
    "mqa", "all",
]


def _option_case(rng, case, dtype, d):
    hq, hkv, sq, sk = 4, 2, 100, 173
    if case == "mqa":
        hkv = 1
    elif case == "mha":
        hkv = 4
    elif case == "gqa4":
        hq, hkv = 8, 2
    elif case == "window_far":
        sq = 20  # queries at key positions 153..172: most keys are seen by nobody
    q, k, v = _inputs(rng, dtype, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d,
                      amp=3.0 if case in ("softcap", "all") else 1.0)
    opts = {}
    if case == "window":
        opts["window"] = (20, 7)
    elif case == "window_right0":
        opts["window"] = (None, 0)
    elif case == "causal_window":
        opts.update(causal=True, window=(33, None))
    elif case == "window_far":
        opts["window"] = (5, 0)
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
        m[::7] = False  # fully masked rows: lse -inf, zero gradients
        opts["mask"] = cp.asarray(m)
    elif case == "scale":
        opts["scale"] = 0.3
    elif case == "all":
        opts.update(causal=True, window=(64, 3), softcap=10.0,
                    alibi_slopes=cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32),
                    bias=cp.asarray(rng.standard_normal((hq, 1, sk)), dtype=cp.float32),
                    mask=cp.asarray(rng.random((sq, sk)) < 0.9))
    return (q, k, v), opts


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", _OPTION_CASES)
def test_backward_options(dtype, case):
    rng = np.random.default_rng([zlib.crc32(case.encode()), 64])
    (q, k, v), opts = _option_case(rng, case, dtype, 64)
    (dq, dk, dv), _ = _check(f"{dtype} d=64 {case}", q, k, v, **opts)
    if case == "mask_empty_rows":
        assert bool(cp.all(dq[..., ::7, :] == 0)), "dq of fully masked rows is not exactly 0"
    if case == "window_far":
        assert bool(cp.all(dk[..., :140, :] == 0)) and bool(cp.all(dv[..., :140, :] == 0)), \
            "dk/dv of keys that no query sees are not exactly 0"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [128, 256])
def test_backward_all_options_large_head_dims(dtype, d):
    rng = np.random.default_rng([d, 77])
    (q, k, v), opts = _option_case(rng, "all", dtype, d)
    _check(f"{dtype} d={d} all", q, k, v, **opts)


@pytest.mark.parametrize("d,dv", [(40, 40), (80, 80), (200, 200), (64, 32), (32, 64), (100, 128)])
def test_backward_padded_head_dims_and_dv(d, dv):
    rng = np.random.default_rng([d, dv])
    q, k, v = _inputs(rng, "float16", sq=50, sk=90, d=d, dv=dv)
    _check(f"float16 d={d} dv={dv}", q, k, v, causal=True)


def test_backward_two_dim_and_multi_batch_inputs():
    rng = np.random.default_rng(5)
    q, k, v = (cupy_array(rng.standard_normal((70, 64)), "float16") for _ in range(3))
    _check("2-D causal", q, k, v, causal=True)
    q, k, v = _inputs(rng, "float16", b=(2, 3), hq=2, hkv=1, sq=40, sk=40)
    _check("batch (2, 3) bias", q, k, v,
           bias=cp.asarray(rng.standard_normal((3, 1, 40, 40)), dtype=cp.float32))


def test_backward_long_sequence_many_blocks():
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, "float16", b=(1,), hq=4, hkv=2, sq=600, sk=700, d=128)
    _check("float16 d=128 causal sq=600 sk=700", q, k, v, causal=True)


@pytest.mark.parametrize(
    "dtype,d,case",
    [("float16", 64, "causal"), ("bfloat16", 128, "plain"), ("float16", 256, "window"),
     ("bfloat16", 64, "all"), ("float16", 32, "mask_empty_rows")],
)
def test_backward_deterministic(dtype, d, case):
    rng = np.random.default_rng([d, zlib.crc32(case.encode())])
    if case in ("all", "mask_empty_rows"):
        (q, k, v), opts = _option_case(rng, case, dtype, d)
    else:
        q, k, v = _inputs(rng, dtype, sq=200, sk=230, d=d)
        opts = {"causal": True} if case == "causal" else {}
        if case == "window":
            opts["window"] = (40, 10)
    name = f"{dtype} d={d} {case} deterministic"
    grads, (dout, out, lse) = _check(name, q, k, v, deterministic=True, **opts)
    again = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend="cupy",
                                           deterministic=True, **opts)
    for label, a, b in zip(("dq", "dk", "dv"), grads, again, strict=True):
        diff = int(cp.count_nonzero(a.view(cp.uint16) != b.view(cp.uint16)))
        assert diff == 0, f"[{name}] {label}: {diff} elements differ between two runs"


def test_auto_picks_the_backward_kernel():
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, "float16")
    prob = validate_attention(q, k, v, causal=True)
    # Hopper: the wgmma backward for the head dims it has; the rest stay on mma.sync.
    hopper = _params.compute_capability() == 90 and prob.d in (64, 128)
    assert _backends.select_entry(prob, {}, "auto", op="backward").name == (
        "cupy.sm90_bwd" if hopper else "cupy.sm80")
    # deterministic=True: the wgmma backward's dK/dV-only twin and a dq kernel on Hopper
    # (instances.SM90_BWD_DETERMINISTIC_ON), mma.sync elsewhere.
    det_hopper = hopper and instances.SM90_BWD_DETERMINISTIC_ON
    assert _backends.select_entry(prob, {"deterministic": True}, "auto",
                                  op="backward").name == (
        "cupy.sm90_bwd" if det_hopper else "cupy.sm80")


def test_backward_refusals_raise_when_forced_and_fall_back_on_auto(monkeypatch):
    monkeypatch.setenv("XATTN_DISABLE", "cupy.simt,cupy.tf32x3")  # no float32 cupy backward
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, "float32", sq=33, sk=47, d=32)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    dout = cp.ones_like(out)
    with pytest.raises(NotImplementedError, match="float32"):
        xattn.flash_attention_backward(dout, q, k, v, out, lse, backend="cupy")
    qd, kd, vd = _inputs(rng, "float16", sq=8, sk=8, d=288)
    outd, lsed = xattn.flash_attention(qd, kd, vd, return_lse=True)
    with pytest.raises(NotImplementedError, match="head_dim"):
        xattn.flash_attention_backward(cp.ones_like(outd), qd, kd, vd, outd, lsed,
                                       backend="cupy")
    # The switch: a disabled kernel is refused with its reason, and auto still answers.
    q, k, v = _inputs(rng, "float16", sq=33, sk=47, d=32)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, causal=True)
    dout = cp.asarray(rng.standard_normal(out.shape).astype(np.float16))
    monkeypatch.setenv("XATTN_DISABLE", "cupy.sm80")
    with pytest.raises(NotImplementedError, match="XATTN_DISABLE"):
        xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True,
                                       backend="cupy.sm80")
    assert _backends.explain(validate_attention(q, k, v, causal=True), {},
                             op="backward")["backend"] == "generic"
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    refs = reference_attention_backward(dout, q, k, v, causal=True)
    naive = naive_attention_backward(dout, q, k, v, out, causal=True)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        _assert_grad("auto fallback", name, g, r, n, q.dtype)


@pytest.mark.parametrize(
    "d,causal,sq,sk",
    [(32, False, 77, 150), (64, True, 77, 150), (96, True, 130, 61), (128, False, 130, 61),
     (128, True, 77, 150), (256, True, 77, 150), (256, False, 130, 61), (80, True, 130, 61)],
)
def test_fp32_simt_backward(d, causal, sq, sk):
    rng = np.random.default_rng([d, sq, sk, causal, 32])
    q, k, v = _inputs(rng, "float32", sq=sq, sk=sk, d=d)
    # Named: float32 gradients go to cupy.tf32x3 by default (its own tests cover it).
    _check(f"float32 simt d={d} causal={causal} sq={sq} sk={sk}", q, k, v, causal=causal,
           backend="cupy.simt")


@pytest.mark.parametrize("case", ["all", "mask_empty_rows", "window_far"])
def test_fp32_simt_backward_options(case):
    rng = np.random.default_rng([zlib.crc32(case.encode()), 32])
    (q, k, v), opts = _option_case(rng, case, "float32", 64)
    (dq, dk, dv), _ = _check(f"float32 simt d=64 {case}", q, k, v, backend="cupy.simt", **opts)
    if case == "mask_empty_rows":
        assert bool(cp.all(dq[..., ::7, :] == 0)), "dq of fully masked rows is not exactly 0"
    if case == "window_far":
        assert bool(cp.all(dk[..., :140, :] == 0)) and bool(cp.all(dv[..., :140, :] == 0)), \
            "dk/dv of keys that no query sees are not exactly 0"


def test_fp32_simt_backward_refuses_deterministic():
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, "float32", sq=20, sk=30, d=32)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="deterministic"):
        xattn.flash_attention_backward(cp.ones_like(out), q, k, v, out, lse, backend="cupy",
                                       deterministic=True)
