"""The host side of the 3xTF32 wgmma forward (``cupy.tf32x3_sm90``, flash_fwd_tf32x3_sm90.cu):
its instance, shared memory, its switch and the routes while it is off -- on the CPU, with a
stand-in CuPy device of compute capability 9.0; the entry's SASS (48 TF32 HGMMAs, the
producer within its registers) where nvcc and nvdisasm exist. The GPU tests are in
tests/gpu/test_gpu_flash_tf32x3_sm90.py."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from xattn import BlockMask, _backends
from xattn._array import validate_attention
from xattn._backends.cupy_ import _params, instances
from xattn._backends.cupy_ import flash_tf32x3_sm90 as x3w

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc"
                                if Path("/usr/local/bin/nvcc").exists() else None)
# Opt-in shared memory per block of an H100 / H200.
SM90_SMEM = 227 * 1024


@pytest.fixture
def on_sm90(monkeypatch):
    """``prob(...)``: a problem on a stand-in CuPy device of compute capability 9.0 with the
    opt-in shared memory of an H100."""
    monkeypatch.setattr(_params, "compute_capability", lambda: 90)
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: SM90_SMEM)
    gpu = SimpleNamespace(__name__="cupy")

    def prob(dtype=np.float32, d=64, sq=200, sk=300, block_mask=None, **score):
        q = np.zeros((2, sq, d), dtype)
        k = np.zeros((2, sk, d), dtype)
        p = validate_attention(q, k, k, block_mask=block_mask, **score)
        return dataclasses.replace(p, xp=gpu)

    return prob


def test_instance_is_shipped_and_named():
    shipped = {i.name: i for i in instances.shipped()}
    assert instances.TF32X3_SM90 == {64: 64}
    inst = instances.tf32x3_sm90(64, 64)
    assert inst.name == "flash_fwd_tf32x3_sm90_d64_n64"
    assert inst.source == "flash_fwd_tf32x3_sm90.cu" and inst.arch == "sm_90a"
    assert inst.defines == ("-DXATTN_X3SM90_D=64", "-DXATTN_X3SM90_BN=64",
                            "-DXATTN_X3SM90_OV=0", "-DXATTN_X3SM90_SFX=")
    assert inst.macro_call() == "XATTN_TF32X3_SM90_ONE(64, 64, 0, )"
    assert shipped[inst.name] == inst and inst.ci
    assert x3w.CONFIGS is instances.TF32X3_SM90
    # The overlapped schedule: built on request only (check_kernels.py --experimental).
    ov = instances.tf32x3_sm90(64, 64, True)
    assert ov.name == "flash_fwd_tf32x3_sm90_d64_n64_ov"
    assert ov.macro_call() == "XATTN_TF32X3_SM90_ONE(64, 64, 1, _ov)"
    assert ov.name not in shipped and ov in instances.experimental()
    assert x3w.BUILT == {(64, 64, 0), (64, 64, 1)}
    assert x3w.launch_config(64) == (64, 0) and x3w.launch_config(64, (64, 1)) == (64, 1)


def test_shared_memory_fits_an_sm90_block():
    # Q hi / lo (128 rows x 64 floats) and two stages of K hi / lo and Vt hi / lo (64 x 64).
    q = 2 * 128 * 64 * 4
    stage = 4 * 64 * 64 * 4
    assert x3w.smem_bytes(64, 64) == q + 2 * stage + 1024 == 197632
    assert x3w.smem_bytes(64, 64) <= SM90_SMEM
    assert x3w.THREADS == 384 and x3w.BLOCK_ROWS == 128


def test_switch_is_named_in_the_refusal(on_sm90, monkeypatch):
    assert instances.TF32X3_SM90_ON is True  # on since its GPU tests passed (H100, 2026-12-05)
    monkeypatch.setattr(instances, "TF32X3_SM90_ON", False)
    why = x3w.supports(on_sm90(), {}, "forward")
    assert "instances.TF32X3_SM90_ON is off" in why and "cupy.tf32x3 serves" in why
    q = np.zeros((2, 8, 64), np.float32)  # host arrays: the first check of every GPU entry
    assert x3w.supports(validate_attention(q, q, q), {}, "forward") == \
        "inputs are not CuPy arrays"
    # The request itself is one the kernel would serve: only the switch refuses it.
    assert x3w.request_reason(on_sm90(), {}, "forward") is None


def test_serves_with_the_switch_on(on_sm90, monkeypatch):
    monkeypatch.setattr(instances, "TF32X3_SM90_ON", True)
    assert x3w.supports(on_sm90(), {}, "forward") is None
    assert x3w.supports(on_sm90(causal=True), {}, "forward") is None
    assert x3w.supports(on_sm90(window=(32, 8)), {"allow_tf32": True}, "forward") is None
    q = np.zeros((2, 8, 70, 64), np.float32)
    k = np.zeros((2, 2, 33, 64), np.float32)
    gqa = dataclasses.replace(validate_attention(q, k, k, causal=True),
                              xp=SimpleNamespace(__name__="cupy"))
    assert x3w.supports(gqa, {}, "forward") is None


@pytest.mark.parametrize("case, want", [
    (dict(dtype=np.float16), "takes float32 inputs"),
    (dict(d=128), "has D = Dv in [64]"),
    (dict(d=32), "has D = Dv in [64]"),
    (dict(softcap=30.0), "score modifications"),
    (dict(alibi_slopes=np.ones(2, np.float32)), "score modifications"),
    (dict(block_mask=BlockMask.causal(200, 300, block_size=(64, 64))), "block_mask"),
])
def test_refusals_name_the_reason(on_sm90, monkeypatch, case, want):
    monkeypatch.setattr(instances, "TF32X3_SM90_ON", True)
    assert want in x3w.supports(on_sm90(**case), {}, "forward")


def test_refuses_backward_options_other_cards_and_numpy(on_sm90, monkeypatch):
    monkeypatch.setattr(instances, "TF32X3_SM90_ON", True)
    assert x3w.supports(on_sm90(), {}, "backward") == "the 3xTF32 wgmma kernel is forward only"
    assert "not implemented" in x3w.supports(on_sm90(), {"plan": object()}, "forward")
    monkeypatch.setattr(_params, "compute_capability", lambda: 80)
    assert "runs on 9.0 only" in x3w.supports(on_sm90(), {}, "forward")
    q = np.zeros((2, 8, 64), np.float32)
    assert x3w.supports(validate_attention(q, q, q), {}, "forward") == \
        "inputs are not CuPy arrays"
    monkeypatch.setattr(_params, "compute_capability", lambda: 90)
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: 160 * 1024)
    assert "needs 197632 bytes of shared memory" in x3w.supports(on_sm90(), {}, "forward")


def test_forward_raises_for_what_its_code_does_not_cover(on_sm90):
    with pytest.raises(NotImplementedError, match="score modifications"):
        x3w.forward(on_sm90(softcap=5.0), None, None, None)
    with pytest.raises(NotImplementedError, match="has D = Dv in"):
        x3w.forward(on_sm90(d=96), None, None, None)
    for bad in ((128, 0), (64, 2), (64,)):
        with pytest.raises(ValueError, match="builds .keys per block, schedule."):
            x3w.forward(on_sm90(), None, None, None, config=bad)


def test_routes_unchanged_while_off():
    """The entry sits right before cupy.tf32x3 (after cupy.tf32, which needs allow_tf32) and
    every other entry keeps its place: with the entry refusing every request while its switch
    is off, auto's walk reaches exactly the entries it reached before."""
    order = _backends._PREFERENCE["gpu"]
    assert order.index("cupy.tf32x3_sm90") == order.index("cupy.tf32x3") - 1
    assert order.index("cupy.tf32") < order.index("cupy.tf32x3_sm90")
    assert tuple(n for n in order if n != "cupy.tf32x3_sm90") == (
        "cupy.sm90", "cupy.sm90_bwd", "cupy.sm80", "cupy.tf32", "cupy.tf32x3", "cupy.simt",
        "cupy.decode", "generic")
    alias = _backends.ALIASES["cupy"]
    assert alias.index("cupy.tf32x3_sm90") == alias.index("cupy.tf32x3") - 1
    assert "cupy.tf32x3_sm90" not in _backends.OPT_IN
    assert _backends.BACKENDS["cupy.tf32x3_sm90"].device == "gpu"


def test_disable_names_the_entry_exactly(monkeypatch):
    monkeypatch.setenv("XATTN_DISABLE", "cupy.tf32x3")
    assert _backends.disabled() == {"cupy.tf32x3"}  # not a prefix of cupy.tf32x3_sm90
    monkeypatch.setenv("XATTN_DISABLE", "cupy.tf32x3_sm90")
    assert _backends.disabled() == {"cupy.tf32x3_sm90"}


def _nvdisasm():
    for cand in (shutil.which("nvdisasm"), "/usr/local/cuda/bin/nvdisasm"):
        if cand and Path(cand).exists():
            return cand
    return None


def _sass(tmp_path, call):
    unit = tmp_path / "u.cu"
    unit.write_text(f'#include "{ROOT / "xattn/kernels/flash_fwd_tf32x3_sm90.cu"}"\n{call}\n')
    cubin = tmp_path / "u.cubin"
    out = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o",
                          str(cubin), str(unit)], check=True, capture_output=True, text=True)
    sass = subprocess.run([_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True,
                          text=True).stdout
    return sass, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None or _nvdisasm() is None, reason="needs nvcc and nvdisasm")
def test_sass_of_the_overlapped_schedule(tmp_path):
    """72 TF32 HGMMAs (the loop's 48 and the last tile's P V), no local memory, and no wait
    that ptxas injects (info C7517: a P V issued on some paths only; it would serialise the
    overlap): the softmax's MUFU.EX2 sit between the P V's HGMMAs and their wait."""
    sass, log = _sass(tmp_path, "XATTN_TF32X3_SM90_ONE(64, 64, 1, _ov)")
    assert "C7517" not in log and "C7513" not in log
    assert sum("HGMMA.64x64x8.F32.TF32" in ln for ln in sass.splitlines()) == 72
    assert "STL" not in sass and "LDL" not in sass
    ops = [ln for ln in sass.splitlines() if "HGMMA" in ln or "MUFU.EX2" in ln
           or "WARPGROUP.DEPBAR" in ln]
    first_rs = next(i for i, ln in enumerate(ops) if re.search(r"TF32 R\d+, R\d+, gdesc", ln))
    wait = next(i for i in range(first_rs, len(ops)) if "DEPBAR" in ops[i])
    assert any("MUFU.EX2" in ln for ln in ops[first_rs:wait])


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None or _nvdisasm() is None, reason="needs nvcc and nvdisasm")
def test_sass_has_the_tf32_wgmmas(tmp_path):
    """48 TF32 HGMMAs a key tile (Q K^T: 3 x D / 8 from shared memory; P V: 3 x BN / 8 with A
    from registers); the producer (after setmaxnreg.dec 96) loads a tile with 16 LDG.128 at
    immediate offsets and never touches local memory."""
    sass, _ = _sass(tmp_path, "XATTN_TF32X3_SM90_ONE(64, 64, 0, )")
    hgmma = [ln for ln in sass.splitlines() if "HGMMA.64x64x8.F32.TF32" in ln]
    assert len(hgmma) == 48
    # P V: A from registers (a register operand before the descriptor).
    assert sum(bool(re.search(r"TF32 R\d+, R\d+, gdesc", ln)) for ln in hgmma) == 24
    assert "USETMAXREG.DEALLOC.CTAPOOL 0x60" in sass and "USETMAXREG.TRY_ALLOC.CTAPOOL" in sass
    producer = sass[sass.index("USETMAXREG.DEALLOC"):]
    assert len(re.findall(r"LDG\.E\.128", producer)) == 16
    assert "STL" not in sass and "LDL" not in sass


# ---------------------------------------------------------------------------------------------
# The kernel's index arithmetic, replayed in NumPy: the producer's and the consumers' stores
# (sw_off, produce_tile's V jobs with the key permutation), read back the way wgmma reads a
# K-major 128-byte-swizzled operand through a descriptor (kmajor_desc / kmajor_step), and the
# register A fragment of P taken from the score accumulator. The products must equal Q K^T and
# P V: a wrong chunk, swizzle, panel step or permutation breaks the equality.

def _sw_off(rows, r, c):
    """sw_off<R>(r, c): byte offset of 16-byte chunk c of row r in a K-major tile."""
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)


def _wgmma_read(tile, rows, ks, n_rows):
    """The (n_rows x 8) operand slice that a wgmma of k-step ks reads from a K-major tile of
    ``rows`` rows (float32 words of a byte-addressed buffer): start address advanced by
    kmajor_step (32 bytes inside a panel, rows * 128 per panel), 8-row groups SBO = 1024
    apart, 128 bytes per row, the hardware's XOR of address bits 4-6 with bits 7-9."""
    step = (ks >> 2) * rows * 128 + (ks & 3) * 32
    out = np.empty((n_rows, 8), np.float32)
    for n in range(n_rows):
        for k in range(8):
            addr = step + (n >> 3) * 1024 + (n & 7) * 128 + 4 * k
            addr ^= ((addr >> 7) & 7) << 4
            out[n, k] = tile[addr // 4]
    return out


def test_index_arithmetic_replayed_in_numpy():
    d = bn = 64
    rng = np.random.default_rng(11)
    kmat = rng.standard_normal((bn, d)).astype(np.float32)
    vmat = rng.standard_normal((bn, d)).astype(np.float32)
    qmat = rng.standard_normal((128, d)).astype(np.float32)

    def store(rows, r, c, x, tile):
        off = _sw_off(rows, r, c)
        assert off % 16 == 0 and 0 <= off < tile.size * 4
        tile[off // 4: off // 4 + 4] = x

    # K (producer) and Q (consumers): chunk c of row r from global row r, columns 4c...
    ktile = np.full(bn * d, np.nan, np.float32)
    qtile = np.full(128 * d, np.nan, np.float32)
    for tid in range(128):
        cpr, kstep = d // 4, 128 // (d // 4)
        for u in range(bn * cpr // 128):
            r, c = tid // cpr + u * kstep, tid % cpr
            store(bn, r, c, kmat[r, 4 * c: 4 * c + 4], ktile)
    for i in range(128 * d // 4):
        r, c = i // (d // 4), i % (d // 4)
        store(128, r, c, qmat[r, 4 * c: 4 * c + 4], qtile)
    # Vt (producer): job (ci, tc) of panel pk holds keys 8 (c / 2) + 2 u + c % 2 at row d.
    vtile = np.full(d * bn, np.nan, np.float32)
    tcn = d // 4
    for tid in range(128):
        ci, tc = tid & 7, (tid >> 3) % tcn
        for w in range((bn // 32) * 8 * tcn // 128):
            pk = w * 128 // (8 * tcn)
            c = pk * 8 + ci
            keys = [(c >> 1) * 8 + 2 * u + (c & 1) for u in range(4)]
            for i in range(4):
                store(d, tc * 4 + i, c, vmat[keys, tc * 4 + i], vtile)
    assert not np.isnan(ktile).any() and not np.isnan(vtile).any() and not np.isnan(qtile).any()

    # S = Q K^T of warpgroup 1 (rows 64..127: the descriptor starts 64 rows = 8 KiB in).
    s = np.zeros((64, bn), np.float64)
    for ks in range(d // 8):
        a = _wgmma_read(qtile[64 * 128 // 4:], 128, ks, 64)  # 64 rows x 128 B = 8 KiB in
        b = _wgmma_read(ktile, bn, ks, bn)
        s += a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(s, qmat[64:].astype(np.float64) @ kmat.T.astype(np.float64),
                               rtol=1e-12, atol=1e-12)

    # P V with A from registers: thread (warp, g, t) holds s[4 j + 2 hr + e] = P(16 warp + g +
    # 8 hr, 8 j + 2 t + e); the fragment a0..a3 = s[4 j + 0, 2, 1, 3] is A(row, k) at (g, t),
    # (g + 8, t), (g, t + 4), (g + 8, t + 4) (CUTLASS's ALayout_64x8).
    p = rng.random((64, bn)).astype(np.float32)
    o = np.zeros((64, d), np.float64)
    for j in range(bn // 8):
        a = np.empty((64, 8), np.float32)
        for warp in range(4):
            for g in range(8):
                for t in range(4):
                    acc = [p[16 * warp + g + 8 * hr, 8 * j + 2 * t + e]
                           for hr in range(2) for e in range(2)]  # s[4 j + 2 hr + e]
                    frag = (acc[0], acc[2], acc[1], acc[3])
                    a[16 * warp + g, t] = frag[0]
                    a[16 * warp + g + 8, t] = frag[1]
                    a[16 * warp + g, t + 4] = frag[2]
                    a[16 * warp + g + 8, t + 4] = frag[3]
        b = _wgmma_read(vtile, d, j, d)  # B(n = d, k): Vt row d, k-step j
        o += a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(o, p.astype(np.float64) @ vmat.astype(np.float64),
                               rtol=1e-12, atol=1e-12)
