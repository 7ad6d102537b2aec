"""The opt-in TF32 float32 kernel (``allow_tf32=True``) against the float64 oracle.

GPU tests (marked ``gpu``, skipped without CuPy and a device) hold the kernel to two bounds:

* the *TF32 naive* rule: the error may be at most twice that of exact attention computed from
  the inputs rounded to TF32 (and the softmax weights rounded to TF32, as the kernel feeds them
  to the tensor cores), plus a float32-sized ``atol``. This is the 16-bit rule of
  :func:`xattn.testing.assert_close` with TF32 rounding emulated in NumPy;
* the a-priori bound derived in docs/numerics.rst ("TF32"), evaluated per row.

Every failure message names the case, the max error, where it occurs (batch, head, row, column),
the value and the reference there, and the bound, so that a broken fragment layout shows up as
a pattern (only rows past 16, only odd columns, only some head dims). Outputs are poisoned with
NaN before each launch: an element the kernel never wrote fails as NaN.

The CPU test checks that ``allow_tf32`` changes nothing on NumPy arrays.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import FLOAT32_OPTION_CASES, expand_kv, float32_option_case, rna_tf32, tf32_naive

import xattn
from xattn._array import validate_attention
from xattn.testing import reference_attention, to_numpy

try:
    import cupy as cp

    _NGPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no cupy, no driver or no device: GPU tests skip
    cp, _NGPU = None, 0



@pytest.fixture(autouse=True)
def _no_tf32x3_sm90(monkeypatch):
    """These tests cover the mma.sync float32 entries' routes on every card: the Hopper 3xTF32
    entry (test_gpu_flash_tf32x3_sm90.py) is switched off here."""
    from xattn._backends.cupy_ import instances

    monkeypatch.setattr(instances, "TF32X3_SM90_ON", False)


def gpu(test):
    """Mark a test ``gpu`` and skip it where CuPy or a CUDA device is missing."""
    return pytest.mark.gpu(pytest.mark.skipif(_NGPU == 0, reason="needs CuPy and a CUDA "
                                              "device")(test))


# TF32 keeps 10 explicit mantissa bits: round to nearest has relative error <= 2**-11.
U = 2.0**-11
ATOL = 2e-5  # float32-sized floor under the naive-TF32 bound


@pytest.fixture
def kernels(monkeypatch):
    """The two CuPy backend modules, with NaN poisoning of every output switched on."""
    if _NGPU == 0:
        pytest.skip("needs CuPy and a CUDA device")
    from xattn._backends.cupy_ import flash as ck
    from xattn._backends.cupy_ import flash_tf32 as kt

    monkeypatch.setenv("XATTN_POISON", "1")
    return ck, kt


def apriori_bound(q, k, v, *, scale=None, **opts):
    """Per-row bounds ``(out_bound (.., Sq, 1), lse_bound (.., Sq))`` of docs/numerics.rst.

    ``Delta_i = (2u + u^2 + gamma) * scale * max_j sum_d |q_id k_jd|`` bounds the score error;
    ``|out err| <= (rho + u (1 + rho)) * max_j |v_j|`` with ``rho = e^(2 Delta)(1+u)/(1-u) - 1``
    and ``|lse err| <= Delta + 2u``; ``gamma`` and the last terms cover float32 sums.
    The maxima run over all keys (a superset of the visible ones: still a bound). Softcap is
    1-Lipschitz and bias / ALiBi / masks are exact, so the same bound holds with them.
    """
    qn, kn, vn = (to_numpy(x) for x in (q, k, v))
    hq = qn.shape[-3] if qn.ndim > 2 else 1
    kn, vn = expand_kv(kn, hq), expand_kv(vn, hq)
    d, sk = qn.shape[-1], kn.shape[-2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    gamma = (d + 2) * 2.0**-24
    dot = np.abs(qn) @ np.swapaxes(np.abs(kn), -1, -2)  # sum_d |q_id k_jd|
    delta = (2 * U + U * U + gamma) * abs(scale) * dot.max(axis=-1, initial=0.0)
    rho = np.exp(2 * delta) * (1 + U) / (1 - U) - 1
    vmax = np.abs(vn).max(axis=(-2, -1), initial=0.0)[..., None, None]
    out_bound = (rho + U * (1 + rho))[..., None] * vmax + (sk + d) * 2.0**-24 * vmax
    lse_bound = delta + 2 * U
    return out_bound, lse_bound


def _where(shape, flat):
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def check_tf32(case, out, lse, q, k, v, **opts):
    """Compare a TF32 result with the float64 oracle under both bounds; message on failure."""
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    nv_out, nv_lse = tf32_naive(q, k, v, **opts)
    ob, lb = apriori_bound(q, k, v, **opts)
    lb = lb + 2e-6 * (1 + np.abs(np.where(np.isfinite(ref_lse), ref_lse, 0)))  # float32 lse
    a, al = to_numpy(out), to_numpy(lse)
    for name, got, want, naive, apriori in (("out", a, ref, nv_out, ob),
                                            ("lse", al, ref_lse, nv_lse, lb)):
        if got.shape != want.shape:
            raise AssertionError(f"[{case}] {name}: shape {got.shape}, expected {want.shape}")
        nan = np.isnan(got)
        if nan.any():
            first = [_where(got.shape, i) for i in np.flatnonzero(nan)[:5]]
            raise AssertionError(f"[{case}] {name}: {int(nan.sum())} NaN (unwritten or computed) "
                                 f"of {got.size}, first at {first}")
        fin = np.isfinite(want)
        if not np.array_equal(fin, np.isfinite(got)) or not np.array_equal(got[~fin],
                                                                            want[~fin]):
            bad = np.flatnonzero((fin != np.isfinite(got)).ravel())[:5]
            raise AssertionError(f"[{case}] {name}: non-finite entries differ from the "
                                 f"reference, first at {[_where(got.shape, i) for i in bad]}")
        err = np.where(fin, np.abs(got - np.where(fin, want, 0)), 0.0)
        naive_err = np.where(fin, np.abs(naive - np.where(fin, want, 0)), 0.0)
        bound = 2.0 * float(naive_err.max(initial=0.0)) + ATOL
        worst = int(np.argmax(err))
        where = _where(err.shape, worst)
        msg = (f"[{case}] {name}: max error {err.flat[worst]:.3g} at {where} (got "
               f"{float(got.flat[worst]):.7g}, expected {float(want.flat[worst]):.7g})")
        if err.flat[worst] > bound:
            raise AssertionError(f"{msg} exceeds 2x the TF32-naive error + atol ({bound:.3g})")
        apriori = np.broadcast_to(apriori, err.shape)
        if (err > apriori).any():
            i = int(np.argmax(err - apriori))
            raise AssertionError(f"{msg}; the a-priori bound fails at {_where(err.shape, i)}: "
                                 f"error {err.flat[i]:.3g} > {apriori.flat[i]:.3g}")
    return float(np.abs(a - ref).max(initial=0.0))


def _inputs(rng, *, b=(2,), hq=4, hkv=2, sq=77, sk=150, d=64, amp=1.0):
    q = cp.asarray((amp * rng.standard_normal((*b, hq, sq, d))).astype(np.float32))
    k = cp.asarray((amp * rng.standard_normal((*b, hkv, sk, d))).astype(np.float32))
    v = cp.asarray(rng.standard_normal((*b, hkv, sk, d)).astype(np.float32))
    return q, k, v


def _run(q, k, v, **opts):
    return xattn.flash_attention(q, k, v, return_lse=True, allow_tf32=True, backend="cupy",
                                 **opts)


# ---------------------------------------------------------------------------------------------
# CPU: allow_tf32 is a GPU-only permission.


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_allow_tf32_changes_nothing_on_numpy(backend, dtype):
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 3, 37, 16)).astype(dtype) for _ in range(3))
    opts = dict(causal=True, softcap=2.0, return_lse=True, backend=backend)
    out, lse = xattn.flash_attention(q, k, v, allow_tf32=True, **opts)
    out0, lse0 = xattn.flash_attention(q, k, v, allow_tf32=False, **opts)
    assert out.dtype == out0.dtype == dtype
    np.testing.assert_array_equal(out, out0)
    np.testing.assert_array_equal(lse, lse0)


def test_tf32_rounding_emulation():
    # The NumPy model of cvt.rna.tf32.f32 the GPU tests rely on: nearest, ties away from zero.
    one_ulp = 2.0**-10
    x = np.array([1.0, 1 + one_ulp / 2, -(1 + one_ulp / 2), 1 + one_ulp / 2 - 2.0**-23,
                  3.0e38, np.inf, -np.inf], dtype=np.float32)
    got = rna_tf32(x)
    want = np.array([1.0, 1 + one_ulp, -(1 + one_ulp), 1.0, 3.0e38, np.inf, -np.inf])
    np.testing.assert_allclose(got[:4], want[:4], rtol=0, atol=0)
    assert abs(got[4] / 3.0e38 - 1) <= U and np.array_equal(got[5:], want[5:])
    assert np.all(got.view(np.uint32)[:5] & 0x1FFF == 0)


# ---------------------------------------------------------------------------------------------
# GPU


@gpu
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256, 80])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(77, 150), (130, 61), (64, 64), (1, 33)])
def test_tf32_head_dims_lengths(kernels, d, causal, sq, sk):
    rng = np.random.default_rng([d, sq, sk, causal, 1932])
    q, k, v = _inputs(rng, sq=sq, sk=sk, d=d)
    out, lse = _run(q, k, v, causal=causal)
    assert out.dtype == cp.float32 and lse.dtype == cp.float32
    check_tf32(f"d={d} causal={causal} sq={sq} sk={sk}", out, lse, q, k, v, causal=causal)


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", FLOAT32_OPTION_CASES)
def test_tf32_options(kernels, d, case):
    rng = np.random.default_rng([zlib.crc32(case.encode()), d])
    hq, hkv, sq, sk = 4, 2, 100, 173
    if case == "mqa":
        hkv = 1
    elif case == "gqa4":
        hq, hkv = 8, 2
    q, k, v = _inputs(rng, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d,
                      amp=3.0 if case in ("softcap", "all") else 1.0)
    opts = float32_option_case(case, rng, hq, sq, sk)
    out, lse = _run(q, k, v, **opts)
    check_tf32(f"{case} d={d}", out, lse, q, k, v, **opts)
    if case == "mask_empty_rows":
        assert bool(cp.all(out[..., ::7, :] == 0)), "fully masked rows must give 0"
        assert bool(cp.all(cp.isneginf(lse[..., ::7]))), "fully masked rows must give lse -inf"


@gpu
def test_strict_by_default_tf32_when_allowed(kernels):
    """Same inputs: the default stays strict float32 (~1e-6), allow_tf32 gives TF32 (~1e-3)."""
    rng = np.random.default_rng(2026)
    q, k, v = _inputs(rng, b=(2,), hq=4, hkv=4, sq=256, sk=256, d=64)
    ref, _, _ = reference_attention(q, k, v)
    strict = xattn.flash_attention(q, k, v, backend="cupy")  # 3xTF32: float32 accuracy
    err_strict = float(np.abs(to_numpy(strict) - ref).max())
    out, lse = _run(q, k, v)
    err_tf32 = check_tf32("strict-vs-tf32", out, lse, q, k, v)
    msg = f"max error: strict {err_strict:.3g}, allow_tf32 {err_tf32:.3g}"
    assert err_strict < 1e-5, f"the default must be strict float32; {msg}"
    # TF32 inputs carry ~5e-4 relative rounding: an error this small means TF32 did not run.
    assert err_tf32 > 3e-5 and err_tf32 > 10 * err_strict, f"TF32 kernel did not run? {msg}"


@gpu
def test_switch_off_gives_the_float32_accurate_kernel(kernels, monkeypatch):
    _, kt = kernels
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, sq=90, sk=120, d=64)
    monkeypatch.setenv("XATTN_DISABLE", "cupy.tf32")
    off = xattn.flash_attention(q, k, v, causal=True, allow_tf32=True, backend="cupy")
    accurate = xattn.flash_attention(q, k, v, causal=True, backend="cupy")
    assert bool(cp.all(off == accurate)), "cupy.tf32 off must give float32's own kernel"
    prob = validate_attention(q, k, v)
    assert kt.supports(prob, {}, "forward") is not None  # no allow_tf32: not TF32's request
    from xattn import _backends

    # With cupy.tf32 switched off, float32 goes to the next entry: 3xTF32 (float32 accuracy on
    # tensor cores), and with that one off too, to the strict SIMT kernel.
    assert _backends.explain(prob, {"allow_tf32": True})["backend"] == "cupy.tf32x3"
    monkeypatch.setenv("XATTN_DISABLE", "cupy.tf32,cupy.tf32x3")
    assert _backends.explain(prob, {"allow_tf32": True})["backend"] == "cupy.simt"


@gpu
@pytest.mark.parametrize("d,config", [(32, (4, 2, 64)), (64, (4, 1, 64)), (64, (4, 2, 32)),
                                      (64, (8, 1, 64)), (96, (4, 1, 32)), (128, (4, 1, 32)),
                                      (128, (8, 1, 32)), (128, (4, 2, 16)), (256, (4, 1, 16))])
@pytest.mark.parametrize("causal", [False, True])
def test_tf32_every_compiled_config(kernels, d, config, causal):
    # Every configuration built by the CI compile check, so that a tuning switch is safe.
    _, kt = kernels
    rng = np.random.default_rng([d, *config, causal])
    q, k, v = _inputs(rng, sq=150, sk=97, d=d)
    prob = validate_attention(q, k, v, causal=causal)
    out, lse = kt.forward(prob, q, k, v, config=config)
    check_tf32(f"d={d} config={config} causal={causal}", out, lse, q, k, v, causal=causal)


@gpu
def test_tf32_two_dim_multi_batch_and_strided_inputs(kernels):
    rng = np.random.default_rng(5)
    q, k, v = (cp.asarray(rng.standard_normal((70, 64)).astype(np.float32)) for _ in range(3))
    out, lse = _run(q, k, v, causal=True)
    check_tf32("2-D", out, lse, q, k, v, causal=True)
    q, k, v = _inputs(rng, b=(2, 3), hq=2, hkv=1, sq=40, sk=40)
    bias = cp.asarray(rng.standard_normal((3, 1, 40, 40)), dtype=cp.float32)
    out, lse = _run(q, k, v, bias=bias)
    check_tf32("batch (2, 3) + bias", out, lse, q, k, v, bias=bias)
    big = cp.asarray(rng.standard_normal((2, 4, 60, 128)).astype(np.float32))
    q, k, v = big[..., :64], big[..., 64:], big[..., ::2]  # non-contiguous views
    out, lse = _run(q, k, v)
    check_tf32("strided views", out, lse, q, k, v)


@gpu
def test_tf32_long_sequence_many_blocks(kernels):
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, b=(1,), hq=2, hkv=2, sq=1000, sk=1500, d=128)
    out, lse = _run(q, k, v, causal=True)
    check_tf32("long causal d=128", out, lse, q, k, v, causal=True)


@gpu
def test_tf32_deterministic_and_auto(kernels):
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, sq=300, sk=300, d=128)
    a = xattn.flash_attention(q, k, v, causal=True, allow_tf32=True)  # backend="auto"
    b = xattn.flash_attention(q, k, v, causal=True, allow_tf32=True, backend="cupy")
    assert bool(cp.all(a == b)), "auto must pick the same kernel, and the kernel is deterministic"


@gpu
def test_tf32_refusals_fall_back(kernels):
    _, kt = kernels
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, sq=20, sk=20, d=288)
    permit = {"allow_tf32": True}
    assert "head_dim" in kt.supports(validate_attention(q, k, v), permit, "forward")
    q16, k16, v16 = (x.astype(cp.float16) for x in _inputs(rng, sq=20, sk=20, d=64))
    assert "float32" in kt.supports(validate_attention(q16, k16, v16), permit, "forward")
    # allow_tf32 on float16 is ignored: same bits as without it.
    a = xattn.flash_attention(q16, k16, v16, allow_tf32=True, backend="cupy")
    b = xattn.flash_attention(q16, k16, v16, backend="cupy")
    assert bool(cp.all(a.view(cp.uint16) == b.view(cp.uint16)))
