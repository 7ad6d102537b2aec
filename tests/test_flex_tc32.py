"""flex_attention's float32 tensor-core kernel (3xTF32 / TF32), checked without a GPU.

The hooked ``flash_fwd_tf32.cu`` (the user's functions inlined, the derived block mask walked)
compiles for sm_80 and sm_90a without warnings or spills, in every combination flex builds
(score_mod and/or mask_mod, 3xTF32 and TF32, head dims 64 and 128); the kernel choice by dtype
picks it for float32 with the tile configurations of the dense float32 kernels, under flex's
own entry names. The numerics are checked on the GPU (tests/gpu/test_gpu_flex_tc32.py).
Without nvcc the compile test skips, except under CI (``CI`` set), where nvcc must exist.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import assert_no_spills, compile_module, needs_nvcc, t5_bucket

import xattn
from xattn import _flex_codegen as cg
from xattn import _flex_cuda as fc
from xattn._backends.cupy_ import flash_tf32, flex_tc, instances

SLOPES = xattn.alibi_slopes(4, dtype=np.float64)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def doc_args(b, h, q_idx, kv_idx, doc, table):
    return doc[b, q_idx] == doc[b, kv_idx]


def t5(score, b, h, q_idx, kv_idx, doc, table):
    return score + table[h, t5_bucket(kv_idx - q_idx)]


def _prob(dtype, d=64, dv=None):
    return types.SimpleNamespace(dtype=np.dtype(dtype), d=d, dv=dv or d)


@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("d", [32, 64, 80, 128, 256])
def test_float32_choice_is_the_tf32_kernel_under_flex_names(d, allow_tf32):
    for mods in (False, True):
        for sparse in (False, True):
            inst, dp, rows, threads, smem = flex_tc.kernel_choice(
                _prob("float32", d), mods, sparse, allow_tf32, cc=90)
            x3 = not allow_tf32
            assert dp == flash_tf32.padded_dim(d, x3)
            cfg = (instances.TF32X3 if x3 else instances.TF32)[dp]
            assert (rows, threads) == (cfg[0] * cfg[1] * 16, cfg[0] * 32)
            assert smem == flash_tf32.smem_bytes(dp, cfg, x3)
            assert inst.source == "flash_fwd_tf32.cu" and inst.macro == "XATTN_TF32_BM_ONE"
            tn = "tf32x3" if x3 else "tf32"
            nw, mt, bn = cfg
            mn = "flex_bm" if sparse else "flex"
            assert inst.name == f"flash_fwd_{tn}_d{dp}_w{nw}_m{mt}_n{bn}_{mn}"
            params = dict(inst.params)
            assert params["XATTN_TF32_MN"] == mn
            assert params["XATTN_TF32_SPARSE"] == ("true" if sparse else "false")
            assert params["XATTN_TF32_MODS"] == ("true" if mods else "false")
            # Query and key tiles divide the derived block mask's blocks.
            assert flex_tc.BLOCK % (nw * mt * 16) == 0 and flex_tc.BLOCK % bn == 0


@pytest.mark.parametrize("cc", [80, 90])
def test_16bit_choice_is_the_16bit_kernels(cc):
    got = flex_tc.kernel_choice(_prob("float16", 80, 48), True, True, cc=cc)
    assert got == (*flex_tc.kernel_for("f16", 96, True, True, cc)[:1], 96,
                   *flex_tc.kernel_for("f16", 96, True, True, cc)[1:])
    got = flex_tc.kernel_choice(_prob("bfloat16", 64), True, False, cc=cc)
    assert got[0] == flex_tc.kernel_for("bf16", 64, True, False, cc)[0]
    assert got[0].source == ("flash_fwd_sm90.cu" if cc == 90 else "flash_fwd.cu")


def test_float64_is_refused_with_the_reason():
    prob = types.SimpleNamespace(xp=types.SimpleNamespace(__name__="cupy"),
                                 dtype=np.dtype(np.float64), d=64, dv=64)
    assert "backend='numba_cuda' computes float64" in flex_tc.reason(prob)


def test_flex_attention_checks_allow_tf32():
    q = np.ones((1, 8, 4), np.float32)
    with pytest.raises(TypeError, match="allow_tf32"):
        xattn.flex_attention(q, q, q, allow_tf32="yes")


def test_dense_entries_take_their_old_arguments():
    """The float32 entries flash_attention launches are still the dense macro's."""
    for d, cfg in instances.TF32X3.items():
        inst = instances.tf32(d, cfg, True, x3=True)
        assert inst.macro == "XATTN_TF32_ONE"
        assert "XATTN_TF32_SPARSE" not in dict(inst.params)


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("d", [64, 128])
def test_hooked_float32_kernel_compiles_without_spills(tmp_path, d):
    table = np.zeros((4, 16), np.float32)
    doc = np.zeros((2, 64), np.int64)
    mods = fc.translate(cg.capture(t5, "score_mod", 7), cg.capture(doc_args, "mask_mod", 6),
                        2, True, (doc, table))
    alibi_mods = fc.translate(cg.capture(alibi, "score_mod", 5),
                              cg.capture(causal, "mask_mod", 4))
    mask_only = fc.translate(None, cg.capture(causal, "mask_mod", 4))
    neither = fc.translate(None, None)
    cases = [(mods, True, True, False), (alibi_mods, True, True, False),
             (alibi_mods, True, False, False), (mask_only, False, True, False),
             (neither, False, False, False), (alibi_mods, True, True, True)]
    report = {}
    for m, has_score, sparse, tf32 in cases:
        inst, *_ = flex_tc.kernel_choice(_prob("float32", d), has_score, sparse, tf32)
        report.update(compile_module(tmp_path, flex_tc.kernel_text(m, inst.source), inst,
                                     no_warnings=True))
    names = {k[0] for k in report}
    assert {f"flash_fwd_tf32x3_d{d}_w{c[0]}_m{c[1]}_n{c[2]}_{mn}"
            for c in [instances.TF32X3[d]] for mn in ("flex", "flex_bm")} <= names
    assert any(n.startswith("flash_fwd_tf32_") for n in names)
    assert_no_spills(report)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_float32_reason_compares_the_kernels_shared_memory(monkeypatch, allow_tf32):
    """reason() on float32 (a stand-in for CuPy and the device): None where the device allows
    the kernel's shared memory, else the head dim and both byte counts."""
    import sys

    from xattn._backends.cupy_ import _params

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_params, "compute_capability", lambda: 80)
    prob = types.SimpleNamespace(xp=types.SimpleNamespace(__name__="cupy"),
                                 dtype=np.dtype(np.float32), d=128, dv=128, heads_axis=False,
                                 batch=(), hq=1, sq=64, sk=64)
    need = flex_tc.kernel_choice(prob, True, True, allow_tf32)[-1]
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: need)
    assert flex_tc.reason(prob, allow_tf32) is None
    monkeypatch.setattr(_params, "max_smem_per_block", lambda: need - 1)
    why = flex_tc.reason(prob, allow_tf32)
    assert f"needs {need} bytes" in why and f"allows {need - 1}" in why
