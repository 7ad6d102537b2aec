"""Shared fixtures: CPU backends, dtypes, seeded random inputs.

Every test that takes the ``backend`` fixture runs once per CPU backend in xattn's backend
table; a backend that cannot load here (e.g. numba missing) shows up as a skipped case with
the reason, never as a silent pass.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from xattn import _backends
from xattn._array import bfloat16_dtype
from xattn._backends import available_backends
from xattn.testing import reference_attention, to_numpy

BF16 = bfloat16_dtype()


def t5_bucket(rel):
    """A T5-style relative-position bucket (8 per direction, logarithmic beyond 4): the helper
    the flex tests' table ``score_mod`` calls, translated with it (CPU and GPU flex tests)."""
    sign = 8 if rel > 0 else 0
    a = abs(rel)
    if a < 4:
        r = a
    else:
        r = min(4 + int(math.log(a / 4.0) / math.log(32.0) * 4.0), 7)
    return sign + r


@functools.lru_cache(maxsize=1)
def kernel_tool():
    """``tools/check_kernels.py`` as a module: its nvcc flags, architectures, ptxas parser."""
    path = Path(__file__).resolve().parents[1] / "tools" / "check_kernels.py"
    spec = importlib.util.spec_from_file_location("check_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NVCC = kernel_tool().find_nvcc()
# Tests that compile with nvcc: skipped without it, except under CI, where they fail.
needs_nvcc = pytest.mark.skipif(NVCC is None and not os.environ.get("CI"),
                                reason="nvcc not found")


def compile_module(tmp_path, text, inst, archs=None, no_warnings=False):
    """The ptxas report ``{(entry, arch): {...}}`` of one generated module (a flex-hooked
    kernel) compiled with nvcc for ``archs`` (default: every architecture CI checks). The
    inlined headers keep their ``#pragma once``, which NVRTC ignores and nvcc warns about: it
    is dropped. ``no_warnings``: any compiler warning but ptxas's info lines fails."""
    if NVCC is None:
        pytest.fail("nvcc not found under CI")
    tool = kernel_tool()
    src = tmp_path / f"{inst.name}.cu"
    src.write_text(text.replace("#pragma once", ""))
    report = {}
    for arch, code in archs or tool.ARCHS:
        proc = subprocess.run(
            [NVCC, *tool.FLAGS, f"-gencode=arch={arch},code={code}", *inst.defines,
             "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)],
            capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = proc.stdout + proc.stderr
        if no_warnings:
            warnings = [ln for ln in out.splitlines()
                        if "warning" in ln.lower() and "ptxas info" not in ln]
            assert not warnings, warnings[:5]
        report.update(tool.parse_ptxas(out))
    return report


HOST_CXX = shutil.which("c++") or shutil.which("g++")


def host_program(tmp_path_factory, name, source):
    """A kernel header's host harness: C++ ``source`` (xattn/kernels on the include path)
    compiled with the host compiler, nvcc's own (``c++`` / ``g++``); the executable's path.
    The test is skipped without one."""
    if HOST_CXX is None:
        pytest.skip("no host C++ compiler (c++ / g++)")
    d = tmp_path_factory.mktemp(name)
    src, exe = d / f"{name}.cpp", d / name
    src.write_text(source)
    kernels = Path(__file__).resolve().parents[1] / "xattn" / "kernels"
    subprocess.run([HOST_CXX, "-std=c++17", "-O1", f"-I{kernels}", "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    return exe


def assert_no_spills(report):
    for (name, arch), r in report.items():
        assert r["spill_st"] == 0 and r["spill_ld"] == 0, (name, arch, r)


def cupy_array(x, dtype):
    """NumPy ``x`` as a CuPy array of ``dtype`` (a name) on the current device, for the GPU
    tests; bfloat16 skips the test where ml_dtypes or this CuPy cannot hold it."""
    import cupy

    if dtype == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes not installed")
        try:
            return cupy.asarray(x.astype(BF16))
        except Exception as exc:  # noqa: BLE001 - a CuPy without bfloat16 arrays
            pytest.skip(f"this CuPy holds no bfloat16 arrays: {exc}")
    return cupy.asarray(x.astype(dtype))


_BROKEN = {}  # backend name -> what its module raised on import (other than ImportError)


def _backend_params():
    try:
        status = available_backends(np)
    except Exception:
        # A backend module that is broken (not merely missing) must fail its cases, not stop
        # the collection of every other test: find which one and remember the error.
        status = {}
        for name, b in _backends.BACKENDS.items():
            if b.device != "cpu":
                continue
            try:
                b.load()
                status[name] = None
            except ImportError as exc:
                status[name] = f"not installed ({exc})"
            except Exception as exc:
                _BROKEN[name] = exc
                status[name] = None
    params = []
    for name, why in status.items():
        marks = () if why is None else (pytest.mark.skip(reason=f"backend {name}: {why}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """Name of one usable CPU backend (pass it as ``backend=``)."""
    if request.param in _BROKEN:
        exc = _BROKEN[request.param]
        pytest.fail(f"backend {request.param} fails to import: {type(exc).__name__}: {exc}")
    return request.param


def _dtype_params(include_16bit=True):
    params = []
    if include_16bit:
        params.append(pytest.param(np.dtype(np.float16), id="float16"))
        marks = () if BF16 is not None else (pytest.mark.skip(reason="ml_dtypes missing"),)
        params.append(pytest.param(BF16, id="bfloat16", marks=marks))
    params.append(pytest.param(np.dtype(np.float32), id="float32"))
    params.append(pytest.param(np.dtype(np.float64), id="float64"))
    return params


ALL_DTYPES = _dtype_params()


@pytest.fixture(params=ALL_DTYPES)
def dtype(request):
    """Every supported input dtype: float16, bfloat16, float32, float64."""
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test id: fresh inputs per case, reproducible on rerun."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def random_array(rng, shape, dtype=np.float64, scale=1.0):
    """Standard-normal array of ``dtype`` (rounded from float64, so 16-bit values are exact)."""
    return (scale * rng.standard_normal(shape)).astype(dtype)


@pytest.fixture
def make_qkv(rng):
    """``make_qkv(q_shape, k_shape, dv=None, dtype=float64)`` -> q, k, v random arrays."""

    def make(q_shape, k_shape, dv=None, dtype=np.float64, scale=1.0):
        v_shape = tuple(k_shape) if dv is None else (*k_shape[:-1], dv)
        return tuple(
            random_array(rng, s, dtype, scale) for s in (q_shape, k_shape, v_shape)
        )

    return make


# Option sets run against the oracle; each builds its arrays for the problem's shapes.
# Combinations that interact (causal+window, GQA+ALiBi, mask+bias+softcap) are listed on their own.
def _random_mask(rng, shape, p=0.8, empty_rows=True):
    m = rng.random(shape) < p
    if empty_rows and shape[-2] > 2:
        m[..., 1, :] = False  # a fully masked row
    return m


OPTION_BUILDERS = {
    "plain": lambda rng, b, h, sq, sk: {},
    "causal": lambda rng, b, h, sq, sk: dict(causal=True),
    "window": lambda rng, b, h, sq, sk: dict(window=(37, 21)),
    "window_left": lambda rng, b, h, sq, sk: dict(window=(50, None)),
    "window_right": lambda rng, b, h, sq, sk: dict(window=(None, 30)),
    "window_0_0": lambda rng, b, h, sq, sk: dict(window=(0, 0)),
    "causal+window": lambda rng, b, h, sq, sk: dict(causal=True, window=(45, None)),
    "causal+window_both": lambda rng, b, h, sq, sk: dict(causal=True, window=(20, 10)),
    "softcap": lambda rng, b, h, sq, sk: dict(softcap=1.5),
    "scale": lambda rng, b, h, sq, sk: dict(scale=0.37),
    "mask_full": lambda rng, b, h, sq, sk: dict(mask=_random_mask(rng, (*b, h, sq, sk))),
    "mask_bcast": lambda rng, b, h, sq, sk: dict(mask=_random_mask(rng, (sq, sk))),
    "mask_keypad": lambda rng, b, h, sq, sk: dict(
        mask=_random_mask(rng, (*b, 1, 1, sk), 0.7, empty_rows=False)
    ),
    "bias": lambda rng, b, h, sq, sk: dict(bias=rng.standard_normal((h, sq, sk))),
    "bias_neg_inf": lambda rng, b, h, sq, sk: dict(
        bias=np.where(rng.random((*b, 1, sq, sk)) < 0.2, -np.inf, 0.0)
    ),
    "alibi": lambda rng, b, h, sq, sk: dict(alibi_slopes=rng.uniform(0.01, 0.5, h)),
    "alibi_batch": lambda rng, b, h, sq, sk: dict(
        alibi_slopes=rng.uniform(0.01, 0.5, (*b, h)), causal=True
    ),
    "mask+bias+softcap": lambda rng, b, h, sq, sk: dict(
        mask=_random_mask(rng, (*b, h, sq, sk)),
        bias=rng.standard_normal((1, sq, sk)),
        softcap=2.0,
    ),
    "everything": lambda rng, b, h, sq, sk: dict(
        causal=True,
        window=(90, None),
        mask=_random_mask(rng, (sq, sk), 0.9),
        bias=0.5 * rng.standard_normal((h, 1, sk)),
        alibi_slopes=rng.uniform(0.01, 0.1, h),
        softcap=3.0,
        scale=0.2,
    ),
}
OPTION_NAMES = list(OPTION_BUILDERS)


def pytest_generate_tests(metafunc):
    # Any test with an ``option_name`` argument runs once per option set.
    if "option_name" in metafunc.fixturenames:
        metafunc.parametrize("option_name", OPTION_NAMES)


@pytest.fixture
def make_options(rng):
    """``make_options(name, batch, hq, sq, sk, dtype)`` -> keyword options for that case.

    Float arrays (bias, slopes) come in ``dtype`` (the inputs' dtype, as a user would pass them).
    """

    def make(name, batch, hq, sq, sk, dtype=np.float64):
        opts = OPTION_BUILDERS[name](rng, tuple(batch), hq, sq, sk)
        for key in ("bias", "alibi_slopes"):
            if key in opts:
                opts[key] = np.asarray(opts[key]).astype(dtype)
        return opts

    return make


def backend_reason(backend, q, k, v, op="forward", **options):
    """None when ``backend`` serves this request, else its reason (the test then skips)."""
    from xattn._array import validate_attention

    options = {key: val for key, val in options.items() if key != "return_lse"}
    prob = validate_attention(q, k, v, **options)
    return available_backends(np, prob, {}, op)[backend]


@pytest.fixture
def flash(backend):
    """``flash(q, k, v, **options)`` forced to the case's backend; skips what it cannot serve."""
    import xattn

    def run(q, k, v, **options):
        why = backend_reason(backend, q, k, v, **options)
        if why is not None:
            pytest.skip(f"backend {backend} does not serve this request: {why}")
        return xattn.flash_attention(q, k, v, backend=backend, **options)

    return run


@pytest.fixture
def flash_backward(backend):
    """``flash_backward(dout, q, k, v, out, lse, **options)`` forced to the case's backend."""
    import xattn

    def run(dout, q, k, v, out, lse, **options):
        why = backend_reason(backend, q, k, v, op="backward", **options)
        if why is not None:
            pytest.skip(f"backend {backend} does not serve this backward request: {why}")
        return xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=backend, **options)

    return run


# TF32 (the tensor cores' float32 mode) emulated in NumPy, for the GPU tests of allow_tf32.
def rna_tf32(x):
    """float32 -> the nearest TF32 value (ties away from zero), as ``cvt.rna.tf32.f32``."""
    x = np.asarray(x, dtype=np.float32)
    bits = (x.view(np.uint32).astype(np.uint64) + 0x1000) & 0xFFFFE000
    return np.where(np.isfinite(x), bits.astype(np.uint32).view(np.float32), x)


def expand_kv(x, hq):
    return np.repeat(x, hq // x.shape[-3], axis=-3) if x.ndim > 2 else x


def tf32_naive(q, k, v, **opts):
    """``(out, lse)``: exact attention of the TF32-rounded inputs, weights rounded to TF32.

    The weights are rounded relative to the row maximum (``exp(s - max)``), as the kernel
    rounds its unnormalised ``exp2`` weights, and normalised by the sum of the rounded ones.
    """
    qr, kr, vr = (rna_tf32(to_numpy(x, np.float32)) for x in (q, k, v))
    _, lse, w = reference_attention(qr, kr, vr, **opts)
    wmax = w.max(axis=-1, keepdims=True, initial=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = rna_tf32(np.where(wmax > 0, w / wmax, 0.0)).astype(np.float64)  # exp(s - max)
        den = p.sum(axis=-1, keepdims=True)
        out = np.where(den > 0, (p @ expand_kv(vr.astype(np.float64), w.shape[-3] if w.ndim > 2
                                             else 1)) / den, 0.0)
        # lse = max + log(sum of rounded weights), with max = lse_exact + log(wmax)
        lse = np.where(den[..., 0] > 0, lse + np.log(wmax[..., 0]) + np.log(den[..., 0]), lse)
    return out, lse


# Option cases of the float32 tensor-core kernels' GPU tests (TF32 and 3xTF32).
FLOAT32_OPTION_CASES = ["window", "window_right0", "causal_window", "alibi", "alibi_batched",
                        "softcap", "bias_shared", "bias_full", "mask", "mask_empty_rows", "scale",
                        "mqa", "gqa4", "all"]


def float32_option_case(case, rng, hq, sq, sk):
    """The score options of one FLOAT32_OPTION_CASES case, as CuPy arrays."""
    import cupy as cp

    import xattn

    if case == "window":
        return dict(window=(20, 7))
    if case == "window_right0":
        return dict(window=(None, 0))
    if case == "causal_window":
        return dict(causal=True, window=(33, None))
    if case == "alibi":
        return dict(alibi_slopes=cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32))
    if case == "alibi_batched":
        return dict(alibi_slopes=cp.asarray(rng.uniform(0.01, 0.5, (2, hq)), dtype=cp.float32))
    if case == "softcap":
        return dict(softcap=5.0)
    if case == "bias_shared":
        return dict(bias=cp.asarray(rng.standard_normal((sq, sk)), dtype=cp.float32))
    if case == "bias_full":
        return dict(bias=cp.asarray(rng.standard_normal((2, hq, sq, sk)), dtype=cp.float32))
    if case == "mask":
        return dict(mask=cp.asarray(rng.random((2, 1, sq, sk)) < 0.7))
    if case == "mask_empty_rows":
        m = rng.random((sq, sk)) < 0.5
        m[::7] = False  # fully masked rows: out 0, lse -inf
        return dict(mask=cp.asarray(m))
    if case == "scale":
        return dict(scale=0.3)
    if case in ("mqa", "gqa4"):
        return {}
    assert case == "all"
    return dict(causal=True, window=(64, 3), softcap=10.0,
                alibi_slopes=cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32),
                bias=cp.asarray(rng.standard_normal((hq, 1, sk)), dtype=cp.float32),
                mask=cp.asarray(rng.random((sq, sk)) < 0.9))
