"""The Hopper forward's score-mod, block-mask and flex entries in mode 75 (K/V by the copy
engine), host side (no GPU): the mode-75 twins of the instance tables, the switch that makes
them the defaults, the launcher's configuration checks, the tensor-map arguments that the
launchers put first (cuTensorMapEncodeTiled replaced by a fake, as in test_tma_host.py), and
the generated flex sources of the twins compiled for sm_90a, spill-free (needs nvcc). The GPU
tests are in tests/gpu/test_gpu_sm90_mods.py."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from conftest import assert_no_spills, compile_module, needs_nvcc
from test_tma_host import FakeDeviceArray, FakeEncode

import xattn
from xattn import _flex_codegen as cg
from xattn import _flex_cuda as fc
from xattn._array import validate_attention
from xattn._backends.cupy_ import flash_sm90, flex_tc, instances, tma

FAMILIES = {
    11: (instances.SM90_MODS, instances.SM90_BM, instances.SM90_BM_MODS),
    75: (instances.SM90_MODS_TMA, instances.SM90_BM_TMA, instances.SM90_BM_MODS_TMA),
}


@pytest.fixture
def fake(monkeypatch):
    f = FakeEncode()
    monkeypatch.setattr(tma, "_driver_encode", lambda: f)
    tma._encode_cached.cache_clear()
    tma._ROWS.clear()
    yield f
    tma._encode_cached.cache_clear()
    tma._ROWS.clear()


@pytest.fixture(params=sorted(FAMILIES))
def family(request, monkeypatch):
    """The launcher's tables set to one family (what the switch would make them)."""
    mods, bm, bm_mods = FAMILIES[request.param]
    monkeypatch.setattr(flash_sm90, "MODS_CONFIGS", mods)
    monkeypatch.setattr(flash_sm90, "BM_CONFIGS", bm)
    monkeypatch.setattr(flash_sm90, "BM_MODS_CONFIGS", bm_mods)
    return request.param


def _configs(table):
    return [(d, c) for d, cs in table.items() for c in (cs if isinstance(cs[0], tuple)
                                                        else (cs,))]


def test_twins_have_the_mode_11_tiles():
    """Each mode-75 table is its mode-11 table with bit 6 set: same tiles, same shared memory
    and threads (the ring and the producer warpgroup are unchanged)."""
    for old, new in zip(FAMILIES[11], FAMILIES[75], strict=True):
        assert sorted(old) == sorted(new)
        for (d, c11), (d2, c75) in zip(_configs(old), _configs(new), strict=True):
            assert d == d2 and c75 == (c11[0], c11[1], c11[2] | 64) and c75[2] == 75
            assert flash_sm90.smem_bytes(d, c75) == flash_sm90.smem_bytes(d, c11)
            assert flash_sm90.threads(c75) == flash_sm90.threads(c11)


def test_twin_instances():
    """Their own macro (tensor maps first), the XATTN90_TMA define, names with _o75_; the
    switch's family shipped (CI compiles it), the other experimental (check_kernels.py
    --experimental); the bfloat16 block-sparse twins left to --all."""
    shipped = {i.name: i for i in instances.shipped()}
    assert len(shipped) == len(instances.shipped())
    extra = {i.name for i in instances.experimental()}
    on, off = (shipped, extra) if instances.SM90_MODS_ON_TMA else (extra, shipped)
    for mods, sparse, table in ((True, False, instances.SM90_MODS_TMA),
                                (False, True, instances.SM90_BM_TMA),
                                (True, True, instances.SM90_BM_MODS_TMA),
                                (True, True, {64: instances.SM90_BM_TMA[64]})):
        for d, cfg in _configs(table):
            for tn in ("f16", "bf16"):
                i = instances.sm90(tn, d, cfg, mods, sparse)
                mn = "_".join(("mods",) * mods + ("bm",) * sparse)
                assert i.name == f"flash_fwd_sm90_{tn}_d{d}_n{cfg[0]}_g{cfg[1]}_o75_{mn}"
                assert i.macro == "XATTN90_MODS_TMA_ONE" and "-DXATTN90_TMA=1" in i.defines
                assert i.macro_call() == (f"XATTN90_MODS_TMA_ONE({tn}, {d}, {cfg[0]}, "
                                          f"{cfg[1]}, 75, {mn}, {str(mods).lower()}, "
                                          f"{str(sparse).lower()})")
                assert i.name in on and i.ci == (tn == "f16" or not sparse)
                old = instances.sm90(tn, d, (cfg[0], cfg[1], 11), mods, sparse)
                assert old.macro == "XATTN90_MODS_ONE" and old.name in off
                assert not any("XATTN90_TMA" in x for x in old.defines)


def test_switch_picks_one_family():
    """flash_sm90's tables follow instances.SM90_MODS_ON_TMA (reloaded both ways)."""
    was = instances.SM90_MODS_ON_TMA
    try:
        for on in (False, True):
            instances.SM90_MODS_ON_TMA = on
            importlib.reload(flash_sm90)
            want = FAMILIES[75 if on else 11]
            assert (flash_sm90.MODS_CONFIGS, flash_sm90.BM_CONFIGS,
                    flash_sm90.BM_MODS_CONFIGS) == want
            inst, *_ = flex_tc.kernel_for("f16", 64, True, True, 90)
            assert f"_o{75 if on else 11}_flex_bm" in inst.name
    finally:
        instances.SM90_MODS_ON_TMA = was
        importlib.reload(flash_sm90)
    assert flash_sm90.MODS_CONFIGS is FAMILIES[75 if was else 11][0]


def _prob(d=64, sq=300, sk=300, **opts):
    q = np.zeros((2, 4, sq, d), np.float16)
    k = np.zeros((2, 2, sk, d), np.float16)
    return validate_attention(q, k, k, **opts)


def test_launch_config(family, monkeypatch):
    """Defaults by entry kind from the family's tables; explicit mode 75 / 11 / 27 accepted
    for mods and block masks, other modes refused with the modes named (the plain entries'
    short-span rule off: test_tma_host.py covers it)."""
    monkeypatch.setattr(instances, "SM90_SHORT_ON", False)
    slopes = np.full(4, 0.1, np.float32)
    bm = xattn.BlockMask.causal(300, block_size=128)
    assert flash_sm90.launch_config(_prob()) == flash_sm90.CONFIGS[64]
    assert flash_sm90.launch_config(_prob(alibi_slopes=slopes)) == (64, 3, family)
    assert flash_sm90.launch_config(_prob(128, softcap=3.0)) == (64, 2, family)
    assert flash_sm90.launch_config(_prob(block_mask=bm)) == (128, 2, family)
    assert flash_sm90.launch_config(_prob(128, block_mask=bm, softcap=3.0)) == (64, 2, family)
    for mode in (11, 27, 75):
        cfg = (128, 2, mode)
        assert flash_sm90.launch_config(_prob(block_mask=bm, causal=True), cfg) == cfg
        assert flash_sm90.launch_config(_prob(alibi_slopes=slopes), cfg) == cfg
    with pytest.raises(ValueError, match=r"run in modes 11, 27, 75"):
        flash_sm90.launch_config(_prob(alibi_slopes=slopes), (128, 2, 3))  # a plain entry's
    with pytest.raises(ValueError, match=r"\(128, 2, 91\) for D=64 is not built"):
        flash_sm90.launch_config(_prob(alibi_slopes=slopes), (128, 2, 91))
    with pytest.raises(ValueError, match="does not divide the block_mask"):
        flash_sm90.launch_config(_prob(block_mask=xattn.BlockMask.causal(
            300, block_size=(128, 64))), (128, 2, 75))


def test_entry_maps(fake):
    """The maps K then V, boxes of BN keys, for every mode-75 instance (built-in names or
    flex's); none for mode 11 and for the mma.sync kernel; q checked for alignment too."""
    q = FakeDeviceArray((2, 4, 300, 64), 0x7F0000000000)
    k = FakeDeviceArray((2, 2, 333, 64), 0x7F0000100000)
    v = FakeDeviceArray((2, 2, 333, 64), 0x7F0000200000)
    for bn, mods, sparse in ((64, True, False), (128, False, True), (64, True, True)):
        fake.calls.clear()
        tma._encode_cached.cache_clear()
        tma._ROWS.clear()
        inst = instances.sm90("f16", 64, (bn, 2, 75), mods, sparse)
        mk, mv = flash_sm90.entry_maps(inst, q, k, v)
        assert mk.size == mv.size == 1 and mk.dtype == tma.DESC_DTYPE
        assert [c["ptr"] for c in fake.calls] == [0x7F0000100000, 0x7F0000200000]
        assert all(c["box"] == [64, bn, 1] and c["dims"] == [64, 333, 4] for c in fake.calls)
        assert flash_sm90.entry_maps(instances.sm90("f16", 64, (bn, 2, 11), mods, sparse),
                                     q, k, v) == ()
    fake.calls.clear()
    assert flex_tc._sm90_maps(flex_tc.instance("f16", 64, True, True)[0], q, k, v) == ()
    assert not fake.calls
    with pytest.raises(ValueError, match="q: the TMA path needs a 16-byte aligned"):
        flash_sm90.entry_maps(instances.sm90("f16", 64, (64, 3, 75), True), FakeDeviceArray(
            (2, 4, 300, 64), 0x7F0000000002), k, v)


@pytest.mark.parametrize("dp", [64, 128])
@pytest.mark.parametrize("mods", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_flex_instance_of_the_family(family, dp, mods, sparse, fake):
    """flex_attention's Hopper instance follows the tables: mode-75 entries keep the
    XATTN90_TMA define under flex's name (the macro with the maps first), and its launch
    takes the two maps (box rows = the instance's key tile)."""
    inst, rows, threads, smem = flex_tc.kernel_for("f16", dp, mods, sparse, 90)
    p = dict(inst.params)
    assert int(p["XATTN90_OV"]) == family
    assert inst.name.endswith(f"_o{family}_flex" + ("_bm" if sparse else ""))
    assert ("-DXATTN90_TMA=1" in inst.defines) == (family == 75)
    q = FakeDeviceArray((1, 4, 300, dp), 0x7F0000000000)
    k = FakeDeviceArray((1, 2, 333, dp), 0x7F0000100000)
    maps = flex_tc._sm90_maps(inst, q, k, k)
    assert len(maps) == (2 if family == 75 else 0)
    assert all(c["box"] == [64, int(p["XATTN90_BN"]), 1] for c in fake.calls)


SLOPES = np.linspace(0.05, 0.4, 4)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("dp", [64, 128])
def test_flex_twins_compile_without_spills(tmp_path, monkeypatch, dp):
    """The generated flex sources on the mode-75 entries (tensor maps first, the user's
    arrays last) compile for sm_90a without warnings or spills."""
    names = ("MODS_CONFIGS", "BM_CONFIGS", "BM_MODS_CONFIGS")
    for name, table in zip(names, FAMILIES[75], strict=True):
        monkeypatch.setattr(flash_sm90, name, table)
    both = fc.translate(cg.capture(alibi, "score_mod", 5), cg.capture(causal, "mask_mod", 4))
    mask_only = fc.translate(None, cg.capture(causal, "mask_mod", 4))
    report = {}
    for m, smod, sparse in ((both, True, True), (both, True, False), (mask_only, False, True)):
        inst, *_ = flex_tc.kernel_for("f16", dp, smod, sparse, 90)
        assert "_o75_" in inst.name
        report.update(compile_module(tmp_path, flex_tc.kernel_text(m, inst.source), inst,
                                     archs=(("compute_90a", "sm_90a"),), no_warnings=True))
    names = {k[0] for k in report}
    assert any(n.endswith("_o75_flex_bm") for n in names)
    assert any(n.endswith("_o75_flex") for n in names)
    assert_no_spills(report)
