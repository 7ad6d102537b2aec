"""The Hopper forward's score-mod and block-mask entries, host side (no GPU): the instance list,
the block sizes the wgmma tiles serve, flex_attention's choice of kernel per card and head dim,
and the generated flex sources compiled for sm_90a, spill-free (needs nvcc)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_no_spills, compile_module, needs_nvcc, t5_bucket

import xattn
from xattn import _flex_codegen as cg
from xattn import _flex_cuda as fc
from xattn._array import validate_attention
from xattn._backends.cupy_ import flash_sm90, flex_tc, instances

SLOPES = np.linspace(0.05, 0.4, 4)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def doc_args(b, h, q_idx, kv_idx, doc, table):
    return doc[b, q_idx] == doc[b, kv_idx] and not (q_idx < kv_idx)


def t5(score, b, h, q_idx, kv_idx, doc, table):
    return score + table[h, t5_bucket(kv_idx - q_idx)]


@pytest.mark.parametrize("dp", [64, 128])
@pytest.mark.parametrize("mods", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_kernel_for_takes_wgmma_on_hopper(dp, mods, sparse):
    inst, rows, threads, smem = flex_tc.kernel_for("f16", dp, mods, sparse, 90)
    assert inst.source == "flash_fwd_sm90.cu" and inst.arch == "sm_90a"
    assert inst.name.endswith("_flex_bm" if sparse else "_flex")
    bn = int(dict(inst.params)["XATTN90_BN"])
    if sparse:  # the derived mask's blocks: whole thread-block row tiles and key tiles
        assert flex_tc.BLOCK % rows == 0 and flex_tc.BLOCK % bn == 0
    assert threads == rows * 2 + 128 and smem <= 232448  # consumers + the producer
    # Its configuration is one that CI compiles (with the built-in entry's name).
    cfg = (bn, rows // 64, int(dict(inst.params)["XATTN90_OV"]))
    shipped = {i.name for i in instances.shipped()}
    builtin = instances.sm90("f16", dp, cfg, mods or not sparse, sparse).name
    assert builtin in shipped, builtin
    assert cfg == (flash_sm90.block_mask_config(dp, (128, 128), mods) if sparse
                   else flash_sm90.MODS_CONFIGS[dp])


@pytest.mark.parametrize("cc,dp", [(80, 64), (89, 128), (90, 32), (90, 96), (90, 256),
                                   (100, 64)])
def test_kernel_for_keeps_mma_sync_elsewhere(cc, dp):
    inst, rows, threads, _ = flex_tc.kernel_for("bf16", dp, True, True, cc)
    assert inst.source == "flash_fwd.cu" and inst.arch is None
    assert inst.name.endswith("_flex_bm") and threads * int(dict(inst.params)["XATTN_MT"]) \
        == rows * 2


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("dp", [64, 128])
def test_hooked_sm90_kernel_compiles_without_spills(tmp_path, dp):
    table = np.zeros((4, 16), np.float32)
    doc = np.zeros((2, 64), np.int64)
    mods = fc.translate(cg.capture(t5, "score_mod", 7), cg.capture(doc_args, "mask_mod", 6),
                        2, True, (doc, table))
    alibi_mods = fc.translate(cg.capture(alibi, "score_mod", 5),
                              cg.capture(causal, "mask_mod", 4))
    mask_only = fc.translate(None, cg.capture(causal, "mask_mod", 4))
    report = {}
    for m, smod, sparse in ((mods, True, True), (alibi_mods, True, True),
                            (alibi_mods, True, False), (mask_only, False, True)):
        inst, *_ = flex_tc.kernel_for("f16", dp, smod, sparse, 90)
        report.update(compile_module(tmp_path, flex_tc.kernel_text(m, inst.source), inst,
                                     archs=(("compute_90a", "sm_90a"),)))
    names = {k[0] for k in report}
    assert any(n.endswith("_flex_bm") for n in names) and "xattn_flex_block_states" in names
    assert any(n.endswith("_flex") for n in names)
    assert_no_spills(report)


@pytest.mark.parametrize(("d", "block", "mods", "want"), [
    (64, (128, 128), False, (128, 2, 11)),
    (64, (128, 64), False, (64, 2, 11)),
    (64, (256, 128), True, (128, 2, 11)),
    (128, (128, 128), False, (128, 2, 11)),
    (128, (128, 128), True, (64, 2, 11)),  # the 128-key tile spilled with mods
    (128, (256, 64), True, (64, 2, 11)),
    (64, (64, 64), False, None),  # 64 rows: the thread block holds 128
    (128, (128, 32), False, None),
    (96, (128, 128), False, None),
])
def test_block_mask_config(d, block, mods, want):
    # The tiles; the mode is the family's that instances.SM90_MODS_ON_TMA picks (11 or 75).
    mode = 75 if instances.SM90_MODS_ON_TMA else 11
    assert flash_sm90.block_mask_config(d, block, mods) == (want and (*want[:2], mode))


def test_block_mask_reason_names_the_block_size():
    q = np.zeros((2, 300, 64), np.float16)
    bm = xattn.BlockMask.causal(300, block_size=64)
    why = flash_sm90._block_mask_reason(validate_attention(q, q, q, block_mask=bm))
    assert "block size (64, 64)" in why and "128 x 128" in why
    ok = xattn.BlockMask.causal(300, block_size=(128, 64))
    assert flash_sm90._block_mask_reason(validate_attention(q, q, q, block_mask=ok)) is None


def test_instances_mods_and_block_mask_entries():
    """Every configuration the launcher picks for mods / block masks is shipped; the plain
    entries keep their names and argument list (macro); entry names are unique."""
    shipped = {i.name: i for i in instances.shipped()}
    for tn in ("f16", "bf16"):
        for d, cfg in flash_sm90.MODS_CONFIGS.items():
            inst = instances.sm90(tn, d, cfg, True)
            assert inst.name.endswith("_mods") and inst.name in shipped
            macro = "XATTN90_MODS_TMA_ONE" if cfg[2] & 64 else "XATTN90_MODS_ONE"
            assert inst.macro == macro and inst.ci
        for d, cands in flash_sm90.BM_CONFIGS.items():
            for cfg in cands:
                assert instances.sm90(tn, d, cfg, False, True).name in shipped
            for cfg in flash_sm90.BM_MODS_CONFIGS.get(d, cands):
                inst = instances.sm90(tn, d, cfg, True, True)
                assert inst.name.endswith("_mods_bm") and inst.name in shipped
                assert inst.ci == (tn == "f16")
        plain = instances.sm90(tn, 64, (64, 3, 11))
        assert plain.macro == "XATTN90_ONE" and plain.name == f"flash_fwd_sm90_{tn}_d64_n64_g3_o11"
    assert len(shipped) == len(instances.shipped())
