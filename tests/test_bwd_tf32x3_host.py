"""The host side of the 3xTF32 float32 backward (``flash_bwd_tf32x3.cu``, ``cupy.tf32x3``'s
backward): its instances, shared memory, its switch (``instances.TF32X3_BWD_ON``), the routes
with the switch on and off and the refusals -- on the CPU, with a stand-in CuPy device; the
entries compiled by nvcc for sm_80 and sm_90a without spills (slow). The GPU tests are in
tests/gpu/test_gpu_flash_bwd_tf32x3.py."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from xattn import BlockMask, _backends
from xattn._array import validate_attention
from xattn._backends.cupy_ import _params, flash_tf32x3, instances
from xattn._backends.cupy_ import flash_bwd_tf32x3 as x3b

ROOT = Path(__file__).resolve().parents[1]
A100_SMEM = 163 * 1024


@pytest.fixture
def gpu_prob(monkeypatch):
    """``prob(...)``: a problem on a stand-in CuPy device of compute capability 8.0 with an
    A100's opt-in shared memory."""
    monkeypatch.setattr(_params, "compute_capability", lambda: 80)
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: A100_SMEM)
    gpu = SimpleNamespace(__name__="cupy")

    def prob(dtype=np.float32, d=64, dv=None, sq=200, sk=300, hq=2, hkv=2, block_mask=None,
             **score):
        q = np.zeros((hq, sq, d), dtype)
        k = np.zeros((hkv, sk, d), dtype)
        v = np.zeros((hkv, sk, d if dv is None else dv), dtype)
        p = validate_attention(q, k, v, block_mask=block_mask, **score)
        return dataclasses.replace(p, xp=gpu)

    return prob


def test_instances_are_named_and_experimental_while_off(monkeypatch):
    assert instances.TF32X3_BWD_ON is True  # on since its first GPU run (H100, 2026-12-06)
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", False)
    assert "TF32X3_BWD_ON" in instances.SWITCHES
    inst = instances.bwd_tf32x3(64, (64, 4, 16), False)
    assert inst.name == "flash_bwd_tf32x3_d64_c64_w4_m16_plain"
    assert inst.source == "flash_bwd_tf32x3.cu" and inst.arch is None
    assert inst.macro_call() == "XATTN_BWDX3_ONE(64, 64, 4, 16, plain, false)"
    assert inst.defines == ("-DXATTN_BWDX3_D=64", "-DXATTN_BWDX3_DC=64", "-DXATTN_BWDX3_NW=4",
                            "-DXATTN_BWDX3_BM=16", "-DXATTN_BWDX3_MN=plain",
                            "-DXATTN_BWDX3_MODS=false")
    mods = instances.bwd_tf32x3(128, (64, 2, 16), True)
    assert mods.name == "flash_bwd_tf32x3_d128_c64_w2_m16_mods"
    names = {i.name for d, c in instances.TF32X3_BWD.items()
             for cfg in x3b.built(d) for i in (instances.bwd_tf32x3(d, cfg, False),
                                              instances.bwd_tf32x3(d, cfg, True))}
    assert len(names) == 8
    shipped = {i.name for i in instances.shipped()}
    extra = {i.name for i in instances.experimental()}
    # One entry stays in CI's list (every kernel file has a shipped instance), the rest wait.
    assert names & shipped == {inst.name}
    assert names - {inst.name} <= extra and inst.name not in extra


def test_instances_are_shipped_with_the_switch_on(monkeypatch):
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", True)
    shipped = {i.name for i in instances.shipped()}
    extra = {i.name for i in instances.experimental()}
    for d in x3b.HEAD_DIMS:
        for cfg in x3b.built(d):
            for mods in (False, True):
                name = instances.bwd_tf32x3(d, cfg, mods).name
                assert name in shipped and name not in extra


def test_d128_takes_four_warps_where_shared_memory_holds_them(monkeypatch):
    """instances.TF32X3_BWD_LARGE_SMEM: D = 128's 4-warp tile (179 KiB) on Hopper's 227 KiB,
    the 2-warp default (107 KiB) on an A100's 163 KiB; config= overrides either."""
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: 227 * 1024)
    assert x3b.check_config(128, None) == (64, 4, 16)
    assert x3b.check_config(128, (64, 2, 16)) == (64, 2, 16)  # config= overrides it
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: A100_SMEM)
    assert x3b.check_config(128, None) == (64, 2, 16)
    with pytest.raises(ValueError, match=r"needs 182912 bytes .* allows 166912"):
        x3b.check_config(128, (64, 4, 16))  # a clear error, not a failed launch


def test_configurations_and_shared_memory(monkeypatch):
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: A100_SMEM)
    assert x3b.HEAD_DIMS == (64, 128)
    assert x3b.padded_dim(32) == 64 and x3b.padded_dim(96) == 128 and x3b.padded_dim(129) is None
    # K, V: 64 keys of 2 * 64 + 16 floats; Q, dO: 16 rows; dS 16 x (128 + 8); lse, delta.
    assert x3b.smem_bytes(64, (64, 4, 16)) == (2 * 64 * 144 + 2 * 16 * 144 + 16 * 136 + 32) * 4
    for d, cfg in x3b.CONFIGS.items():
        assert x3b.smem_bytes(d, cfg) <= A100_SMEM, (d, cfg)  # the defaults fit an A100
        assert d % cfg[0] == 0 and cfg[0] % 32 == 0 and cfg[2] % 16 == 0
    for d in x3b.HEAD_DIMS:
        for cfg in x3b.built(d):
            assert x3b.smem_bytes(d, cfg) <= 227 * 1024, (d, cfg)  # every one fits an H100
    assert x3b.check_config(64, None) == (64, 4, 16)
    assert x3b.check_config(64, [64, 4, 32]) == (64, 4, 32)
    with pytest.raises(ValueError, match="builds"):
        x3b.check_config(64, (64, 2, 16))


def test_switch_off_refuses_backward_and_names_the_switch(gpu_prob, monkeypatch):
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", False)
    why = flash_tf32x3.supports(gpu_prob(), {}, "backward")
    assert "instances.TF32X3_BWD_ON is off" in why and "cupy.simt" in why
    assert "forward only" in why  # tests/gpu/test_gpu_flash_tf32x3.py reads it so
    # The request itself is one the kernel would serve: only the switch refuses it.
    assert x3b.request_reason(gpu_prob(), {}) is None


def test_forward_unchanged(gpu_prob, monkeypatch):
    monkeypatch.setattr(flash_tf32x3.flash_tf32, "request_reason",
                        lambda prob, opts, op, x3: ("called", op, x3))
    for on in (False, True):
        monkeypatch.setattr(instances, "TF32X3_BWD_ON", on)
        assert flash_tf32x3.supports(gpu_prob(), {}, "forward") == ("called", "forward", True)


def test_serves_with_the_switch_on(gpu_prob, monkeypatch):
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", True)
    for score in (dict(), dict(causal=True), dict(window=(16, 4)), dict(scale=0.5),
                  dict(softcap=20.0), dict(causal=True, window=(64, None))):
        assert flash_tf32x3.supports(gpu_prob(**score), {}, "backward") is None, score
    assert flash_tf32x3.supports(gpu_prob(hq=8, hkv=2), {}, "backward") is None
    assert flash_tf32x3.supports(gpu_prob(d=96), {}, "backward") is None
    assert flash_tf32x3.supports(gpu_prob(d=64, dv=128), {}, "backward") is None
    assert flash_tf32x3.supports(gpu_prob(), {"deterministic": False}, "backward") is None


@pytest.mark.parametrize("case, opts, want", [
    (dict(dtype=np.float16), {}, "takes float32 inputs"),
    (dict(d=256), {}, "head_dim 256 > 128"),
    (dict(d=64, dv=160), {}, "head_dim 160 > 128"),
    (dict(), {"deterministic": True}, "deterministic=True"),
    (dict(), {"return_dbias": True}, "not implemented"),
    (dict(block_mask=BlockMask.causal(200, 300, block_size=(64, 64))), {}, "block_mask"),
])
def test_refusals_name_the_reason(gpu_prob, monkeypatch, case, opts, want):
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", True)
    assert want in flash_tf32x3.supports(gpu_prob(**case), opts, "backward")


def test_refuses_old_cards_small_smem_and_numpy(gpu_prob, monkeypatch):
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", True)
    monkeypatch.setattr(_params, "compute_capability", lambda: 75)
    assert "compute capability 75" in flash_tf32x3.supports(gpu_prob(), {}, "backward")
    monkeypatch.setattr(_params, "compute_capability", lambda: 86)
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: 99 * 1024)
    why = flash_tf32x3.supports(gpu_prob(d=128), {}, "backward")
    assert "needs 109184 bytes of shared memory" in why
    q = np.zeros((2, 8, 64), np.float32)
    assert flash_tf32x3.supports(validate_attention(q, q, q), {}, "backward") == \
        "inputs are not CuPy arrays"


def test_backward_raises_for_what_its_code_does_not_cover(gpu_prob):
    with pytest.raises(NotImplementedError, match="deterministic"):
        flash_tf32x3.backward(gpu_prob(), *([None] * 6), deterministic=True)
    with pytest.raises(NotImplementedError, match="block_mask"):
        x3b.backward(gpu_prob(block_mask=BlockMask.causal(200, 300, block_size=(64, 64))),
                     *([None] * 6))
    with pytest.raises(NotImplementedError, match="head_dim 256"):
        x3b.backward(gpu_prob(d=256), *([None] * 6))
    with pytest.raises(NotImplementedError, match="return_dbias"):
        x3b.backward(gpu_prob(), *([None] * 6), return_dbias=True)
    with pytest.raises(ValueError, match="builds"):
        x3b.backward(gpu_prob(), *([None] * 6), config=(32, 4, 16))


def test_routes(gpu_prob, monkeypatch):
    """Float32 backward: cupy.simt while the switch is off, cupy.tf32x3 when on; the forward's
    route does not move."""
    from xattn._backends.cupy_ import flash_simt

    monkeypatch.setattr(flash_simt, "supports", lambda prob, opts, op: None)
    monkeypatch.setattr(_backends, "_load_error", lambda backend: None)
    for name in ("cupy.sm90", "cupy.sm90_bwd", "cupy.sm80", "cupy.tf32", "cupy.tf32x3_sm90"):
        module = _backends.BACKENDS[name].load()
        monkeypatch.setattr(module, "supports", lambda prob, opts, op="forward": "not here")
    prob = gpu_prob(causal=True)
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", False)
    assert _backends.explain(prob, {}, op="backward")["backend"] == "cupy.simt"
    monkeypatch.setattr(instances, "TF32X3_BWD_ON", True)
    assert _backends.explain(prob, {}, op="backward")["backend"] == "cupy.tf32x3"
    assert _backends.explain(prob, {"deterministic": True}, op="backward")["backend"] == \
        "cupy.simt"


@pytest.mark.slow
def test_tf32x3_bwd_entries_compile_without_spills():
    """Every built entry compiles for sm_80 and sm_90a, spill-free, warning-free."""
    spec = importlib.util.spec_from_file_location("check_kernels",
                                                  ROOT / "tools" / "check_kernels.py")
    ck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ck)
    nvcc = ck.find_nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    items = [instances.bwd_tf32x3(d, cfg, mods) for d in x3b.HEAD_DIMS for cfg in x3b.built(d)
             for mods in (False, True)]
    ok, log, res = ck.compile_file(nvcc, ck.KERNELS / "flash_bwd_tf32x3.cu", None, items)
    assert ok, log[-4000:]
    for i in items:
        for arch in ("sm_80", "sm_90a"):
            r = res[(i.name, arch)]
            assert r["spill_st"] == r["spill_ld"] == r["stack"] == 0, (i.name, arch, r)


@pytest.mark.parametrize("launcher", ["tf32x3", "simt"])
def test_float32_host_steps_around_the_kernel(monkeypatch, launcher):
    """flash_bwd.float32_backward, the host side of both float32 backwards, on the CPU (NumPy
    stands in for CuPy, a stand-in kernel computes the float64 oracle's gradients on the padded
    operands it is given): operands zero-padded to the kernel's head dim, the argument order
    and the launch geometry, delta = rowsum(dout * out), dq = scale * dq_accum, and the
    gradients cut back to the inputs' shapes."""
    import sys

    from xattn._backends.cupy_ import flash_bwd
    from xattn.testing import reference_attention, reference_attention_backward

    monkeypatch.setitem(sys.modules, "cupy", np)
    rng = np.random.default_rng(3)
    b, hq, hkv, sq, sk, d = 2, 4, 2, 5, 7, 48
    q, dout = (rng.standard_normal((b, hq, sq, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, hkv, sk, d)).astype(np.float32) for _ in range(2))
    copies = [x.copy() for x in (q, k, v, dout)]
    out, lse, _ = reference_attention(q, k, v, causal=True, scale=0.3)
    out, lse = out.astype(np.float32), lse.astype(np.float32)
    prob = validate_attention(q, k, v, causal=True, scale=0.3)
    seen = {}

    def kernel(*, grid, block, args, shared_mem):
        q4, k4, v4, do4, lse3, delta, acc, dk4, dv4, *ints = args
        seen.update(grid=grid, block=block, ints=ints[:5], smem=shared_mem)
        assert q4.shape == (b, hq, sq, 64) and not q4[..., d:].any()  # padded to 64
        np.testing.assert_allclose(delta, (dout * out).sum(-1), rtol=1e-6)
        dq, dk, dv = reference_attention_backward(do4, q4, k4, v4, causal=True, scale=0.3)
        acc[...] = dq / 0.3  # the kernels leave the scale to the launcher
        dk4[...], dv4[...] = dk, dv

    if launcher == "tf32x3":
        monkeypatch.setattr(x3b, "get_kernel", lambda dp, cfg, mods: kernel)
        got = x3b._backward(prob, dout, q, k, v, out, lse, 64, (64, 4, 16))
        assert seen["grid"] == (1 * 1, hkv, b) and seen["block"] == (128,)
        assert seen["smem"] == x3b.smem_bytes(64, (64, 4, 16))
    else:
        monkeypatch.setattr(flash_bwd, "get_simt_kernel", lambda dp, mods: kernel)
        got = flash_bwd._backward(prob, dout, q, k, v, out, lse, False, None, None)
        assert seen["grid"] == (1, hkv, b) and seen["block"] == (128,)
    assert [int(x) for x in seen["ints"][:4]] == [hq, 2, sq, sk]
    assert float(seen["ints"][4]) == pytest.approx(0.3)
    want = reference_attention_backward(dout, q, k, v, causal=True, scale=0.3)
    for g, w, x in zip(got, want, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    for x, c in zip((q, k, v, dout), copies, strict=True):
        assert np.array_equal(x, c)  # inputs untouched
