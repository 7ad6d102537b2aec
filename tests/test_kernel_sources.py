"""The CUDA sources compile for sm_80 and sm_90a without warnings or spills (CPU CI, needs nvcc)."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_no_spills, compile_module, needs_nvcc

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check_kernels.py"


def _tool():
    spec = importlib.util.spec_from_file_location("check_kernels", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_sources_are_package_data():
    files = sorted((ROOT / "xattn" / "kernels").glob("*.cu"))
    assert files, "no CUDA sources under xattn/kernels"
    for f in files:
        assert "extern \"C\"" in f.read_text(), f"{f.name}: no extern \"C\" entry points"
    from xattn._backends.cupy_ import instances

    assert {i.source for i in instances.shipped()} == {f.name for f in files}


def _launcher_choices():
    """Every (kind, instance) a launcher builds with its own configurations."""
    from xattn._backends.cupy_ import flash, flash_bwd, flash_sm90, flash_tf32, instances

    out = []
    for d in instances.HEAD_DIMS:
        for tn in ("f16", "bf16"):
            out.append(instances.fwd(tn, d, flash.CONFIGS[d], False))
            out.append(instances.fwd(tn, d, flash.MODS_CONFIGS.get(d, flash.CONFIGS[d]), True))
            for c in flash.BM_CONFIGS[d]:
                out.append(instances.fwd(tn, d, c, False, True))
            for c in flash.BM_MODS_CONFIGS.get(d) or flash.BM_CONFIGS[d]:
                out.append(instances.fwd(tn, d, c, True, True))
            for mods in (False, True):
                for dq in (False, True):
                    out.append(instances.bwd(tn, d, flash_bwd.CONFIGS[d], mods, dq))
                    for c in flash_bwd.BM_CONFIGS.get(d, ()):
                        out.append(instances.bwd(tn, d, c, mods, dq, True))
                out.append(instances.bwd_dq(tn, d, flash_bwd.DQ_CONFIGS[d], mods))
                for c in flash_bwd.BM_DQ_CONFIGS.get(d, ()):
                    out.append(instances.bwd_dq(tn, d, c, mods, True))
        for mods in (False, True):
            out.append(instances.tf32(d, flash_tf32.CONFIGS[d], mods))
            out.append(instances.tf32(d, flash_tf32.X3_CONFIGS[d], mods, x3=True))
    for d, cfg in flash_sm90.CONFIGS.items():
        out += [instances.sm90(tn, d, cfg) for tn in ("f16", "bf16")]
    return out


def test_every_launcher_choice_is_in_the_compile_checked_list():
    """The launchers' configurations and CI's compile list come from one list: every entry a
    launcher can pick by itself is shipped (CI compiles it, or its float16 twin)."""
    from xattn._backends.cupy_ import instances

    shipped = set(instances.shipped())
    ci_calls = {i.macro_call().replace("bf16", "f16") for i in shipped if i.ci}
    for inst in _launcher_choices():
        assert inst in shipped, inst.name
        assert inst.macro_call().replace("bf16", "f16") in ci_calls, inst.name
    assert len({i.name for i in shipped}) == len(shipped), "two instances share an entry name"


def test_generated_unit_expands_one_macro_per_instance():
    from xattn._backends.cupy_ import instances

    inst = instances.bwd("f16", 64, (64, 4, 64, 32), True, False)
    assert inst.defines[0] == "-DXATTN_KIND=1"
    assert inst.macro_call() == ("XATTN_BWD_ONE(f16, 64, 64, 4, 64, 32, mods, true, nodq, false, "
                                 "false)")
    text = _tool().unit_source("flash_bwd.cu", [inst])
    assert text.splitlines()[0].endswith('flash_bwd.cu"') and inst.macro_call() in text


def test_ptxas_report_parser():
    log = (
        "ptxas info    : Compiling entry function 'k1' for 'sm_90a'\n"
        "ptxas info    : Function properties for k1\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem\n"
    )
    res = _tool().parse_ptxas(log)
    assert res[("k1", "sm_90a")] == {"regs": 255, "smem": 16, "stack": 8, "spill_st": 4,
                                     "spill_ld": 4}


@pytest.mark.slow
@pytest.mark.skipif(_tool().find_nvcc() is None, reason="nvcc not found")
def test_every_kernel_compiles_for_sm80_and_sm90a():
    proc = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "sm_80" in proc.stdout and "sm_90a" in proc.stdout


def test_sm90_cubins_are_cached_on_disk(tmp_path, monkeypatch):
    """The Hopper module compiles each (source, options) once; later processes read the file."""
    from xattn._backends.cupy_ import _compile as k90

    monkeypatch.setenv("XATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(k90, "_cubin_dir", None)
    calls = []

    def fake_compile(source, defines=()):
        calls.append(defines)
        return b"cubin of " + source.encode() + b" ".join(d.encode() for d in defines)

    monkeypatch.setattr(k90, "compile_cubin", fake_compile)
    p1 = k90.cubin_path("src", ("-DA=1",))
    p2 = k90.cubin_path("src", ("-DA=1",))
    p3 = k90.cubin_path("src", ("-DA=2",))
    p4 = k90.cubin_path("src2", ("-DA=1",))
    assert p1 == p2 and len({p1, p3, p4}) == 3
    assert calls == [("-DA=1",), ("-DA=2",), ("-DA=1",)]
    assert p1.parent == tmp_path / "cache" and p1.read_bytes() == b"cubin of src-DA=1"
    assert not list(p1.parent.glob("*.tmp"))


@needs_nvcc
@pytest.mark.parametrize("d,config", [(64, (64, 1, 203)), (64, (64, 1, 235)), (64, (64, 3, 75)),
                                      (128, (128, 2, 75))])
def test_sm90_forward_switch_builds_compile_without_spills(d, config, tmp_path):
    """The Hopper forward's switches (XATTN90_LAZY, off in the shipped build, and
    XATTN90_NWG1_BLOCKS = 2, the two-block build of the entry that ships with three; timed by
    tools/gpu_fwd_variants.py) still compile without warnings or spills; the shipped (64, 1,
    203) entry keeps three blocks an SM's 80 registers a thread at launch."""
    from xattn._backends.cupy_ import instances

    shipped = instances.sm90("f16", d, config)
    for extra, regs in ((("XATTN90_LAZY", 8), ("XATTN90_NWG1_BLOCKS", 2)), 128), ((), 80):
        (tmp_path / str(regs)).mkdir()
        report = _switched_build(tmp_path / str(regs), shipped, extra)
        if (d, config) == (64, (64, 1, 203)):
            assert all(r["regs"] == regs for r in report.values()), report


@needs_nvcc
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_sm90_experimental_schedules_compile(mode, tmp_path):
    """The Hopper forward's schedules before warp specialisation (tools/flash_fwd_sm90_modes.cuh,
    modes 0-3: built on request and by tools/check_kernels.py --experimental, which CI does not
    run) still compile against the kernel file's helpers, without warnings or spills: a helper
    they call was once removed from flash_fwd_sm90.cu and only a GPU run found it."""
    from xattn._backends.cupy_ import instances

    _switched_build(tmp_path, instances.sm90("f16", 128, (128, 2, mode)), ())


@needs_nvcc
@pytest.mark.parametrize("which", ["tma-64", "tma2-128", "tma_win-64", "tma2_win-128", "dq-128",
                                   "plain-64"])
def test_sm90_backward_edge_rows_switch_compiles_without_spills(which, tmp_path):
    """XATTN90_BWD_EDGE_ROWS (flash_bwd_sm90.cu: the largest head dim masked by intervals, 64
    in the shipped build; tested bit for bit by tests/gpu/test_gpu_sm90_bwd_switches.py): the
    entries whose edge tiles it switches -- the plain and TMA ones, the TMA window twins, the
    wgmma dq kernel -- still compile without warnings or spills the other way (D = 64 on the
    per-score rule, D = 128 on intervals)."""
    from xattn._backends.cupy_ import instances

    variant, d = which.rsplit("-", 1)
    d = int(d)
    if variant == "dq":
        inst = instances.bwd_sm90_dq("f16", d)
    else:
        inst = instances.bwd_sm90("f16", d, None if variant == "plain" else variant)
    _switched_build(tmp_path, inst, (("XATTN90_BWD_EDGE_ROWS", 128 if d > 64 else 0),))


def _switched_build(tmp_path, inst, extra):
    """ptxas's report of instance ``inst`` built for sm_90a with the ``extra`` defines (CI's nvcc
    flags): no warning, no spill."""
    from xattn._backends.cupy_ import _compile

    inst = dataclasses.replace(inst, extra=inst.extra + tuple(extra))
    text = _compile.source(inst.source) + "".join(_compile._repository_file(f)
                                                  for f in inst.includes)
    report = compile_module(tmp_path, text, inst, archs=[("compute_90a", "sm_90a")],
                            no_warnings=True)
    assert report
    assert_no_spills(report)
    return report
