"""The host side of ``deterministic=True`` on the Hopper backward (``cupy.sm90_bwd``): dK/dV by
the ``_nodq`` twins of ``flash_bwd_sm90.cu``'s entries, dq by ``flash_bwd.cu``'s deterministic
dq kernel. Instances, shared memory, the kernels each request launches (its route), the config
checks -- on the CPU, with a stand-in device of compute capability 9.0; the nodq entries' PTX
(no dS K, no bulk reduce-add, no dS stores) where nvcc exists. The GPU tests are in
tests/gpu/test_gpu_sm90_bwd.py (-k det)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from xattn import BlockMask
from xattn._array import validate_attention
from xattn._backends.cupy_ import _params, instances
from xattn._backends.cupy_ import flash_bwd_sm90 as k90b

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc"
                                if Path("/usr/local/bin/nvcc").exists() else None)


@pytest.fixture
def on_sm90(monkeypatch):
    """``prob(...)``: a problem on a stand-in CuPy device of compute capability 9.0, with the
    switch of deterministic=True on the wgmma backward on."""
    monkeypatch.setattr(_params, "compute_capability", lambda: 90)
    monkeypatch.setattr(instances, "SM90_BWD_DETERMINISTIC_ON", True)
    gpu = SimpleNamespace(__name__="cupy")

    def prob(dtype=np.float16, d=64, sq=200, sk=300, block_mask=None, **score):
        q = np.zeros((2, sq, d), dtype)
        k = np.zeros((2, sk, d), dtype)
        p = validate_attention(q, k, k, block_mask=block_mask, **score)
        return dataclasses.replace(p, xp=gpu)

    return prob


def test_nodq_instances_are_shipped():
    """The twins of the plain requests' TMA entry per head dim and of every option entry
    (bfloat16 block-sparse ones left to --all, as flash_bwd.cu's), their own macros, the
    NODQ define; the cp.async plain entry has none."""
    shipped = {i.name: i for i in instances.shipped()}
    want = [(d, var) for d, var in instances.SM90_BWD_TMA_DEFAULT.items()]
    want += [(d, var) for var, (*_, dims) in instances.SM90_BWD_VARIANTS.items() for d in dims]
    for d, var in want:
        for tn in ("f16", "bf16"):
            i = instances.bwd_sm90(tn, d, var, dq=False)
            assert i.name == f"flash_bwd_sm90_{tn}_d{d}_{var}_nodq"
            assert "-DXATTN_BWD90_NODQ=1" in i.defines and i.arch == "sm_90a"
            tma = var in instances.SM90_BWD_TMA
            assert i.macro == ("XATTN_BWD90_TMA_NODQ_ONE" if tma else "XATTN_BWD90_OPT_NODQ_ONE")
            # The same macro arguments as the entry it twins.
            assert i.params == instances.bwd_sm90(tn, d, var).params
            assert i.name in shipped
            assert shipped[i.name].ci == (not ("bm" in var and tn == "bf16"))
    assert k90b.DEFAULT_CONFIG is instances.SM90_BWD_TMA_DEFAULT
    with pytest.raises(ValueError, match="no dK/dV-only twin"):
        instances.bwd_sm90("f16", 64, None, dq=False)


def test_nodq_shared_memory():
    """No dS tile (64 x 128 16-bit) and no dQ staging (two 64 x 64 float32 tiles)."""
    dropped = 64 * 128 * 2 + 2 * 64 * 64 * 4
    for d in (64, 128):
        for config in (None, *k90b.CONFIGS):
            assert k90b.smem_bytes(d, config, False) == k90b.smem_bytes(d, config) - dropped
    assert k90b.smem_bytes(128, "tma2", False) == 133136


def test_deterministic_is_served_and_routed(on_sm90):
    """deterministic=True: cupy.sm90_bwd serves every request it serves without it, and
    kernel_names (what the route tests and the benchmark print) names the nodq entry of the
    variant plus flash_bwd.cu's dq kernel of the same options."""
    det = {"deterministic": True}
    cases = {
        "plain d64": (on_sm90(), ("flash_bwd_sm90_f16_d64_tma_nodq",
                                  "flash_bwd_sm90_dq_f16_d64")),
        "causal d128": (on_sm90(d=128, causal=True), ("flash_bwd_sm90_f16_d128_tma2_nodq",
                                                      "flash_bwd_sm90_dq_f16_d128")),
        "window d64": (on_sm90(window=(30, 0), causal=True),
                       ("flash_bwd_sm90_f16_d64_tma_win_nodq",
                        "flash_bwd_dq_f16_d64_w4_n64_plain")),
        "softcap d64": (on_sm90(softcap=5.0), ("flash_bwd_sm90_f16_d64_mods_nodq",
                                               "flash_bwd_dq_f16_d64_w4_n64_mods")),
        "block mask d128": (on_sm90(d=128, block_mask=BlockMask.causal(200, 300,
                                                                       block_size=128)),
                            ("flash_bwd_sm90_f16_d128_bm_nodq",
                             "flash_bwd_dq_f16_d128_w4_n64_plain_bm")),
        "block mask + alibi d64": (on_sm90(block_mask=BlockMask.causal(200, 300,
                                                                       block_size=(64, 128)),
                                           alibi_slopes=np.ones(2, np.float32)),
                                   ("flash_bwd_sm90_f16_d64_mods_bm_nodq",
                                    "flash_bwd_dq_f16_d64_w4_n64_mods_bm")),
    }
    for case, (prob, (main, dq)) in cases.items():
        assert k90b.supports(prob, det, "backward") is None, case
        assert k90b.kernel_names(prob, True) == ("flash_bwd_delta_f16", main, dq), case
        # Without deterministic: the entry it twins, then the dq conversion.
        names = k90b.kernel_names(prob)
        assert names[1] == main.removesuffix("_nodq") and "dqconv" in names[2], case
    # The dq kernel's configuration is one flash_bwd.cu ships (shipped() builds it).
    shipped = {i.name for i in instances.shipped()}
    for _, (_, dq) in cases.values():
        assert dq in shipped, dq


def test_wgmma_dq_kernel(on_sm90):
    """The wgmma dq kernel: shipped, plain requests only, their default (the switch),
    named by kernel_names; its shared memory fits a block."""
    shipped = {i.name for i in instances.shipped()}
    for d in (64, 128):
        for tn in ("f16", "bf16"):
            i = instances.bwd_sm90_dq(tn, d)
            assert i.name == f"flash_bwd_sm90_dq_{tn}_d{d}" and i.name in shipped
            assert i.macro == "XATTN_BWD90_DQ_ONE" and "-DXATTN_BWD90_DQK=1" in i.defines
    assert k90b.dq_smem_bytes(128) == 132096 and k90b.dq_smem_bytes(64) == 66560
    plain, causal = on_sm90(), on_sm90(d=128, causal=True)
    assert instances.SM90_BWD_DQ_WGMMA is True
    assert k90b.dq_kernel_choice(plain) == "wgmma"
    assert k90b.dq_kernel_choice(causal, "mma") == "mma"
    assert k90b.dq_kernel_choice(on_sm90(window=(8, 0))) == "mma"
    assert k90b.kernel_names(causal, True, dq_kernel="mma")[1:] == (
        "flash_bwd_sm90_f16_d128_tma2_nodq", "flash_bwd_dq_f16_d128_w4_n64_plain")
    with pytest.raises(ValueError, match="dq_kernel='wgmma': the wgmma dq kernel serves plain"):
        k90b.dq_kernel_choice(on_sm90(window=(8, 0)), "wgmma")
    with pytest.raises(ValueError, match="dq_kernel: one of"):
        k90b.dq_kernel_choice(plain, "tc")


def test_deterministic_config_checks(on_sm90):
    plain = on_sm90()
    assert k90b.check_config(plain, None, True) == "tma"
    assert k90b.check_config(plain, "tma2", True) == "tma2"  # built on request
    with pytest.raises(ValueError, match="config='plain' with deterministic=True"):
        k90b.check_config(plain, "plain", True)
    assert k90b.check_config(plain, "plain") is None  # unchanged without it
    soft = on_sm90(softcap=5.0)
    with pytest.raises(ValueError, match="config='tma': the TMA entries are the plain"):
        k90b.kernel_names(soft, True, "tma")


def test_tma_window_twins(on_sm90, monkeypatch):
    """A window request takes the TMA entries' _win twins with config= (and by default once
    instances.SM90_BWD_WIN_TMA_ON is on, at D = 128 too); their dK/dV-only twins exist; the
    launcher counts a twin's buffers as its TMA entry's."""
    win = on_sm90(window=(8, 8))
    wide = on_sm90(d=128, window=(8, 8))
    monkeypatch.setattr(instances, "SM90_BWD_WIN_TMA_ON", False)
    assert k90b.check_config(win, None) is None  # the switch off: the cp.async "win" entry
    assert k90b.kernel_names(win)[1] == "flash_bwd_sm90_f16_d64_win"
    assert k90b.kernel_names(win, config="tma")[1] == "flash_bwd_sm90_f16_d64_tma_win"
    assert k90b.kernel_names(win, True, "tma2")[1:] == (
        "flash_bwd_sm90_f16_d64_tma2_win_nodq", "flash_bwd_dq_f16_d64_w4_n64_plain")
    assert k90b.supports(wide, {}) is not None  # D = 128 windows: cupy.sm80 while off
    monkeypatch.setattr(instances, "SM90_BWD_WIN_TMA_ON", True)
    assert k90b.supports(wide, {}) is None
    assert k90b.check_config(win, None) == "tma"
    assert k90b.check_config(wide, None) == "tma2"
    assert k90b.kernel_names(wide)[1] == "flash_bwd_sm90_f16_d128_tma2_win"
    assert k90b.kernel_names(win, True)[1] == "flash_bwd_sm90_f16_d64_tma_win_nodq"
    shipped = {i.name for i in instances.shipped()}
    for name in ("flash_bwd_sm90_bf16_d64_tma_win", "flash_bwd_sm90_f16_d128_tma2_win_nodq"):
        assert name in shipped, name
    experimental = {i.name for i in instances.experimental()}
    for name in ("flash_bwd_sm90_bf16_d128_tma_win", "flash_bwd_sm90_f16_d64_tma2_win_nodq"):
        assert name in experimental, name
    inst = instances.bwd_sm90("f16", 64, "tma_win")
    assert inst.macro == "XATTN_BWD90_TMA_WIN_ONE" and "-DXATTN_BWD90_WIN=1" in inst.defines


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_nodq_entries_do_no_dq_work(tmp_path):
    """In the PTX of each nodq entry: no bulk reduce-add and no dS stores, and exactly the dQ
    GEMM's wgmmas fewer than its twin (D = 128: 8 of 32, D = 64: 4 of 20)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import check_kernels
    import ptx_diff

    pairs = [("f16", 64, "tma"), ("f16", 128, "tma2"), ("f16", 64, "mods_bm"),
             ("f16", 128, "bm")]
    items = [instances.bwd_sm90(tn, d, v, dq=dq) for tn, d, v in pairs for dq in (True, False)]
    unit = tmp_path / "unit.cu"
    unit.write_text(check_kernels.unit_source("flash_bwd_sm90.cu", items))
    out = tmp_path / "unit.ptx"
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", "-ptx", "-o", str(out), str(unit)],
                   check=True, capture_output=True)
    ptx = ptx_diff.entries(out.read_text())
    for tn, d, v in pairs:
        full = ptx[instances.bwd_sm90(tn, d, v).name]
        nodq = ptx[instances.bwd_sm90(tn, d, v, dq=False).name]
        assert "cp.reduce.async.bulk" in full and "cp.reduce.async.bulk" not in nodq
        assert "st.shared.u16" in full and "st.shared.u16" not in nodq
        drop = {64: 4, 128: 8}[d]
        assert nodq.count("wgmma.mma_async") == full.count("wgmma.mma_async") - drop, (d, v)


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_wgmma_dq_kernel_ptx(tmp_path):
    """The wgmma dq kernel: S and dP (D / 16 k-steps each) and dQ += dS K (4 k-steps of 16
    keys) on wgmma; no atomics, no reductions, no bulk copies: its order is fixed."""
    sys.path.insert(0, str(ROOT / "tools"))
    import check_kernels
    import ptx_diff

    items = [instances.bwd_sm90_dq("f16", d) for d in (64, 128)]
    unit = tmp_path / "unit.cu"
    unit.write_text(check_kernels.unit_source("flash_bwd_sm90.cu", items))
    out = tmp_path / "unit.ptx"
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", "-ptx", "-o", str(out), str(unit)],
                   check=True, capture_output=True)
    ptx = ptx_diff.entries(out.read_text())
    for d, i in zip((64, 128), items, strict=True):
        body = ptx[i.name]
        assert body.count("wgmma.mma_async") == 2 * (d // 16) + 4, d
        for op in ("atom", "red", "cp.reduce", "cp.async.bulk"):
            assert not re.search(rf"^\s*{re.escape(op)}\.", body, re.M), (d, op)


def test_deterministic_waits_for_its_switch(on_sm90, monkeypatch):
    """Off (the default until a GPU run has passed the tests), deterministic=True is refused
    with the switch's name, so the table takes cupy.sm80's deterministic backward; requests
    without it are unaffected."""
    monkeypatch.setattr(instances, "SM90_BWD_DETERMINISTIC_ON", False)
    prob = on_sm90(causal=True)
    why = k90b.supports(prob, {"deterministic": True}, "backward")
    assert why is not None and "SM90_BWD_DETERMINISTIC_ON" in why
    assert k90b.supports(prob, {}, "backward") is None
