"""The host side of the Hopper backward's experimental TMA entries (``flash_bwd_sm90.backward(
..., config="tma" | "tma2")``): instances, shared memory, the tensor maps' order and boxes,
the config checks -- on the CPU, with cuTensorMapEncodeTiled replaced by a fake (this machine
has no CUDA driver). The GPU tests are in tests/gpu/test_gpu_sm90_bwd.py (-k tma)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_tma_host import FakeDeviceArray, fake  # noqa: F401 - the fixture is used by name

from xattn._array import validate_attention
from xattn._backends.cupy_ import flash_bwd_sm90 as k90b
from xattn._backends.cupy_ import instances

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 232448  # dynamic shared memory of one block on sm_90 (227 KiB)


def test_tma_instances_are_shipped():
    """The plain requests' entries (flash_bwd_sm90.DEFAULT_CONFIG): shipped (CI compiles them),
    with their own macro and the buffer count as a define."""
    assert instances.SM90_BWD_TMA == {"tma": 3, "tma2": 2}
    shipped = {i.name for i in instances.shipped()}
    extra = {i.name for i in instances.experimental()}
    for var, nb in instances.SM90_BWD_TMA.items():
        for d in (64, 128):
            for tn in ("f16", "bf16"):
                i = instances.bwd_sm90(tn, d, var)
                assert i.name == f"flash_bwd_sm90_{tn}_d{d}_{var}"
                assert i.macro == "XATTN_BWD90_TMA_ONE" and i.arch == "sm_90a"
                assert i.macro_call() == f"XATTN_BWD90_TMA_ONE({tn}, {d}, {var}, {nb})"
                assert f"-DXATTN_BWD90_NB={nb}" in i.defines
                assert i.name in shipped and i.name not in extra
    assert set(k90b.DEFAULT_CONFIG.values()) <= set(instances.SM90_BWD_TMA)


def test_tma_shared_memory():
    """The plain entry's bytes are unchanged; each TMA buffer adds a Q and a dO tile and an
    8-byte mbarrier, and three buffers still fit at D = 128."""
    assert k90b.smem_bytes(128) == 182272 and k90b.smem_bytes(64) == 116736
    for d in (64, 128):
        tile = 64 * d * 2
        assert k90b.smem_bytes(d, "tma2") == k90b.smem_bytes(d) + 16
        assert k90b.smem_bytes(d, "tma") == k90b.smem_bytes(d) + 2 * tile + 24
        assert k90b.smem_bytes(d, "tma") <= SMEM_LIMIT
    assert k90b.smem_bytes(128, "tma") == 215064


def test_tma_maps_in_order(fake):  # noqa: F811 - pytest fixture
    """q and dout in 64-row boxes, k and v in 128-row boxes, 64 columns, 128-byte swizzle."""
    q = FakeDeviceArray((2, 4, 77, 128), 0x7F0000000000)
    do = FakeDeviceArray((2, 4, 77, 128), 0x7F0000100000)
    k = FakeDeviceArray((2, 2, 150, 128), 0x7F0000200000)
    v = FakeDeviceArray((2, 2, 150, 128), 0x7F0000300000)
    maps = k90b.tma_maps(q, k, v, do)
    assert len(maps) == 4 and all(m.size == 1 for m in maps)
    calls = fake.calls
    assert [c["ptr"] for c in calls] == [0x7F0000000000, 0x7F0000100000, 0x7F0000200000,
                                         0x7F0000300000]
    assert [c["box"] for c in calls] == [[64, 64, 1]] * 2 + [[64, 128, 1]] * 2
    assert [c["dims"] for c in calls] == [[128, 77, 8]] * 2 + [[128, 150, 4]] * 2
    assert all(c["swizzle"] == 3 for c in calls)
    bad = FakeDeviceArray((2, 4, 77, 128), 0x7F0000100008)
    with pytest.raises(ValueError, match="dout: the TMA path needs a 16-byte aligned"):
        k90b.tma_maps(q, k, v, bad)


def test_check_config():
    x = np.zeros((1, 2, 64, 64), dtype=np.float16)
    plain = validate_attention(x, x, x, causal=True)
    assert k90b.check_config(plain, None) == k90b.DEFAULT_CONFIG[64] == "tma"
    assert k90b.check_config(plain, "plain") is None  # the cp.async entry
    assert k90b.check_config(plain, "tma") == "tma"
    assert k90b.check_config(plain, "tma2") == "tma2"
    with pytest.raises(ValueError, match=r"config: one of \['tma', 'tma2'\]"):
        k90b.check_config(plain, "tma4")
    soft = validate_attention(x, x, x, softcap=5.0)
    with pytest.raises(ValueError, match="config='tma': the TMA entries are the plain.*'mods'"):
        k90b.check_config(soft, "tma")
    assert k90b.check_config(soft, None) is None  # the score-mod entries have no TMA twin
    win = validate_attention(x, x, x, window=(8, 8))
    assert k90b.check_config(win, "tma2") == "tma2"  # its window twin, on request
    assert k90b.check_config(win, None) == ("tma" if instances.SM90_BWD_WIN_TMA_ON else None)
    assert k90b.check_config(win, "plain") is None  # the cp.async window entry
    assert k90b.check_config(win, "plain", deterministic=True) is None  # it has a nodq twin
    wide = validate_attention(*(np.zeros((1, 2, 64, 128), dtype=np.float16),) * 3,
                              window=(8, 8))
    with pytest.raises(ValueError, match="config='plain': this problem needs the 'win'"):
        k90b.check_config(wide, "plain")  # no cp.async window entry at D = 128


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/bin/nvcc").exists(),
                    reason="needs nvcc")
def test_tma_entries_compile_without_spills():
    """The TMA entries compile for sm_80 (the trap) and sm_90a, spill-free, warning-free."""
    spec = importlib.util.spec_from_file_location("check_kernels",
                                                  ROOT / "tools" / "check_kernels.py")
    ck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ck)
    items = [instances.bwd_sm90("f16", d, var) for var in instances.SM90_BWD_TMA
             for d in (64, 128)]
    ok, log, res = ck.compile_file(ck.find_nvcc(), ck.KERNELS / "flash_bwd_sm90.cu", None, items)
    assert ok, log[-4000:]
    for i in items:
        for arch in ("sm_80", "sm_90a"):
            r = res[(i.name, arch)]
            assert r["spill_st"] == r["spill_ld"] == r["stack"] == 0, (i.name, arch, r)
