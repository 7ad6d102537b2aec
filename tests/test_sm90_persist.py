"""The Hopper forward's persistent schedule (mode 43), host side (no GPU): the launch grid,
the instance list and the entry the loader builds from its ``-D`` options (needs nvcc)."""

from __future__ import annotations

import pytest
from conftest import assert_no_spills, compile_module, needs_nvcc

from xattn._backends.cupy_ import _compile, flash_sm90, instances


@pytest.mark.parametrize(("sq", "bm", "hq", "batch", "sms", "want"), [
    (77, 128, 1, 1, 132, 1),  # one tile
    (300, 128, 4, 1, 132, 12),  # fewer tiles than SMs: one block per tile
    (1000, 192, 8, 4, 132, 132),  # 192 tiles: every SM, the blocks loop
    (128, 128, 132, 1, 132, 132),  # exactly one tile per SM
    (129, 128, 66, 1, 132, 132),  # a partial last query block counts as a tile
    (4096, 128, 16, 4, 114, 114),
])
def test_persist_grid(sq, bm, hq, batch, sms, want):
    assert flash_sm90.persist_grid(sq, bm, hq, batch, sms) == want


def test_persist_grid_refuses_int32_overflow():
    with pytest.raises(ValueError, match="int32"):
        flash_sm90.persist_grid(2**20, 64, 2**10, 2**10, 132)


def test_persist_instances():
    """Every persistent entry is experimental (measured no faster than mode 11: built on
    request and by tools/check_kernels.py --experimental), takes the entry macros with the
    batch argument, and has its shipped mode-11 twin; the configuration table lists the plain
    ones."""
    shipped = instances.shipped()
    pers = [i for i in instances.experimental() if i.source == "flash_fwd_sm90.cu"
            and dict(i.params).get("XATTN90_OV") == 43]
    names = {i.name for i in shipped}
    assert not [i for i in shipped if "_o43" in i.name]
    assert len(pers) >= 8
    for inst in pers:
        assert inst.macro in ("XATTN90_PONE", "XATTN90_MODS_PONE"), inst.name
        assert "_o43" in inst.name and inst.name.replace("_o43", "_o11") in names, inst.name
    assert {(64, 64, 3, 43), (128, 128, 2, 43)} <= flash_sm90.BUILT
    every = {i.name for i in pers}
    for d, cfg in instances.SM90_MODS.items():
        assert instances.sm90("f16", d, instances.persist_cfg(cfg), True).name in every
    # Q double-buffered where it fits beside the K/V ring (the kernel's QST rule)
    assert flash_sm90.smem_bytes(128, (128, 2, 43)) == flash_sm90.smem_bytes(128, (128, 2, 11))
    for d, cfg in ((64, (64, 3, 43)), (64, (128, 2, 43)), (128, (64, 2, 43))):
        q = cfg[1] * 64 * d * 2
        assert flash_sm90.smem_bytes(d, cfg) == flash_sm90.smem_bytes(d, cfg[:2] + (11,)) + q
        assert flash_sm90.smem_bytes(d, cfg) <= flash_sm90.SMEM_MAX
    assert flash_sm90.threads((64, 3, 43)) == 512
    with pytest.raises(ValueError, match="mode 11"):
        instances.persist_cfg((128, 2, 27))


@needs_nvcc
@pytest.mark.parametrize(("d", "cfg", "mods", "sparse"), [
    (128, (128, 2, 43), False, False),
    (64, (128, 2, 43), True, True),
])
def test_persist_entry_from_loader_defines(tmp_path, d, cfg, mods, sparse):
    """The loader's path (the inlined source and -D options, as NVRTC builds it) produces the
    persistent entry, spill-free on sm_90a."""
    inst = instances.sm90("f16", d, cfg, mods, sparse)
    report = compile_module(tmp_path, _compile.source(inst.source), inst,
                            archs=(("compute_90a", "sm_90a"),))
    assert (inst.name, "sm_90a") in report, sorted(report)
    assert_no_spills(report)


def test_protocol_model():
    """tools/sm90_persist_protocol.py: the kernel's handover order, modelled, in random
    interleavings (no deadlock, every read sees its own tile's data)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "sm90_persist_protocol.py"
    spec = importlib.util.spec_from_file_location("sm90_persist_protocol", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--trials", "500"])
