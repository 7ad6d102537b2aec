"""The CuPy launchers' shared helpers (``_backends/cupy_/_params.py``) are written against the
array namespace, so CPU CI runs them on NumPy: padding of operands, the parameter block's
strides for broadcast masks and biases, empty problems, poisoning."""

from __future__ import annotations

import numpy as np
import pytest

from xattn import _backends
from xattn._array import validate_attention
from xattn._backends.cupy_ import _params, instances


def _prob(b=(2,), hq=4, hkv=2, sq=5, sk=7, d=6, dv=None, **options):
    dv = d if dv is None else dv
    q = np.zeros((*b, hq, sq, d), np.float16)
    k = np.zeros((*b, hkv, sk, d), np.float16)
    v = np.zeros((*b, hkv, sk, dv), np.float16)
    return validate_attention(q, k, v, **options), (q, k, v)


def test_operand_pads_and_keeps_values(rng):
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float16)
    out = _params.operand(np, x, 2, 3, 5, 8)
    assert out.shape == (2, 3, 5, 8) and out.flags.c_contiguous
    np.testing.assert_array_equal(out[..., :6], x)
    assert not out[..., 6:].any()
    same = _params.operand(np, x, 2, 3, 5, 6)
    np.testing.assert_array_equal(same, x)
    cast = _params.operand(np, x, 2, 3, 5, 6, np.float32)
    assert cast.dtype == np.float32
    # A contiguous view 2 bytes into an allocation: an aligned copy (the kernels' 16-byte
    # copies need one), the values kept, the caller's array untouched.
    base = np.zeros(x.size + 16, dtype=np.float16)
    start = next(i for i in range(1, 9) if (base.ctypes.data + 2 * i) % 16)
    view = base[start:start + x.size].reshape(x.shape)
    view[...] = x
    moved = _params.operand(np, view, 2, 3, 5, 6)
    assert moved.ctypes.data % 16 == 0 and moved.ctypes.data != view.ctypes.data
    np.testing.assert_array_equal(moved, x)


def test_forward_buffers_and_result_shapes(monkeypatch):
    monkeypatch.setenv("XATTN_POISON", "1")
    prob, (q, k, v) = _prob(d=6, dv=4)
    q4, k4, v4, out, lse = _params.forward_buffers(np, prob, q, k, v, 8, q.dtype)
    assert q4.shape == (2, 4, 5, 8) and k4.shape == v4.shape == (2, 2, 7, 8)
    assert np.isnan(out).all() and np.isnan(lse).all(), "XATTN_POISON fills outputs with NaN"
    assert lse.dtype == np.float32
    o, s = _params.forward_result(np, prob, out, lse)
    assert o.shape == prob.out_shape and s.shape == prob.lse_shape


def test_nothing_to_launch_on_empty_problems():
    out = np.empty((1, 2, 3, 4), np.float16)
    lse = np.empty((1, 2, 3), np.float32)
    assert not _params.nothing_to_launch(out, lse)
    empty_out = np.empty((1, 2, 3, 0), np.float16)
    assert _params.nothing_to_launch(empty_out, lse)
    assert np.isneginf(lse).all(), "rows without keys have lse -inf"


def test_option_args_fill_the_parameter_block_in_order(rng):
    mask = rng.random((5, 7)) < 0.5                     # broadcast over batch and heads
    bias = rng.standard_normal((4, 1, 7)).astype(np.float32)  # per head, over queries
    slopes = np.arange(4, dtype=np.float32)
    prob, _ = _prob(causal=True, window=(3, None), softcap=2.5, mask=mask, bias=bias,
                    alibi_slopes=slopes)
    args = _params.option_args(np, prob)
    assert len(args) == 16, "XATTN_SCORE_MOD_PARAMS has 16 parameters"
    causal, wl, wr, softcap, alibi, alibi_bs = args[:6]
    assert (int(causal), int(wl), int(wr), float(softcap)) == (1, 3, -1, 2.5)
    np.testing.assert_array_equal(alibi, slopes)
    assert int(alibi_bs) == 0, "one slope per head: no batch stride"
    bias_arr, *bias_st = args[6:11]
    assert [int(s) for s in bias_st] == [0, 7, 0, 1]    # (batch, head, query, key)
    mask_arr, *mask_st = args[11:16]
    assert [int(s) for s in mask_st] == [0, 0, 7, 1]
    assert mask_arr.dtype == np.uint8
    # What the kernel reads: element offsets from the operand's data pointer.
    bias_mem = np.lib.stride_tricks.as_strided(bias_arr, shape=(bias.size,), strides=(4,))
    mask_mem = np.lib.stride_tricks.as_strided(mask_arr, shape=(mask.size,), strides=(1,))
    for b, h, i, j in ((1, 3, 4, 6), (0, 0, 0, 0), (1, 2, 1, 5)):
        assert bias_mem[b * bias_st[0] + h * bias_st[1] + i * bias_st[2] + j * bias_st[3]] \
            == bias[h, 0, j]
        assert bool(mask_mem[b * mask_st[0] + h * mask_st[1] + i * mask_st[2] + j * mask_st[3]]) \
            == bool(mask[i, j])


def test_option_args_without_options_are_nulls():
    prob, _ = _prob()
    args = _params.option_args(np, prob)
    assert _params.visibility_args(prob) == args[:3]
    assert (int(args[0]), int(args[1]), int(args[2]), float(args[3])) == (0, -1, -1, 0.0)
    assert int(args[4]) == 0 and int(args[6]) == 0 and int(args[11]) == 0


@pytest.mark.parametrize("name", [n for n, b in _backends.BACKENDS.items() if b.device == "gpu"
                                  and n != "generic"])
def test_gpu_kernels_refuse_host_problems_without_importing_cupy(name):
    import sys

    prob, _ = _prob()
    mod = _backends.BACKENDS[name].load()
    assert mod.supports(prob, {}, "forward") == "inputs are not CuPy arrays"
    assert "cupy" not in sys.modules or sys.modules["cupy"] is not None


def test_option_args_per_batch_slopes_and_uncollapsible_batch(rng):
    slopes = rng.random((2, 3, 4)).astype(np.float32)
    args = _params.option_args(np, _prob(b=(2, 3), alibi_slopes=slopes)[0])
    assert int(args[5]) == 4, "per-batch slopes: batch stride = heads"
    # A bias whose two batch dims no single stride describes is materialised (documented).
    bias = rng.standard_normal((3, 2, 1, 5, 7)).astype(np.float32).transpose(1, 0, 2, 3, 4)
    args = _params.option_args(np, _prob(b=(2, 3), bias=bias)[0])
    arr, bs, hs, qs, ks = args[6:11]
    mem = np.lib.stride_tricks.as_strided(arr, shape=(arr.size,), strides=(4,))
    for (b0, b1), h, i, j in (((1, 2), 3, 4, 6), ((0, 1), 0, 2, 1)):
        flat_b = b0 * 3 + b1
        assert mem[flat_b * int(bs) + h * int(hs) + i * int(qs) + j * int(ks)] \
            == bias[b0, b1, 0, i, j]


def test_half_kernel_first_checks_keep_each_kernels_words():
    from types import SimpleNamespace

    from xattn._backends.cupy_ import decode, flash_sm90

    fake = SimpleNamespace(xp=SimpleNamespace(__name__="cupy"), dtype=np.dtype(np.float32),
                           d=64, dv=64)
    assert flash_sm90.supports(fake, {}, "backward") == "the sm_90a kernel is forward only"
    assert decode.supports(fake, {}, "forward") == "serves decode_attention only"
    assert flash_sm90.supports(fake, {}, "forward") == (
        "dtype float32: the sm_90a kernel takes float16 and bfloat16")
    assert decode.supports(fake, {}, "decode") == (
        "dtype float32: the kernel takes float16 and bfloat16")


def test_block_mask_args_fill_the_block_mask_struct_from_the_problem():
    # The block-mask launch arguments come from prob.block_mask through the one filler
    # (_params.block_mask_args): XattnBlockMask's fields in order, the CSC transpose after
    # them for the backward, the device arrays cached per (mask, device) -- on NumPy
    # stand-ins here, on CuPy on the GPU.
    import xattn
    from xattn._backends.cupy_ import blockmask

    bm = xattn.BlockMask.documents([0, 3, 8], block_size=4)
    prob, _ = _prob(sq=8, sk=8, block_mask=bm)
    fwd = _params.block_mask_args(np, prob)
    assert len(fwd) == 12, "XattnBlockMask has 12 fields"
    frow, fcol, prow, pcol, tiles, *scalars = fwd
    np.testing.assert_array_equal(frow, bm.full_row_ptr)
    np.testing.assert_array_equal(fcol[:bm.num_full_blocks], bm.full_col_idx)
    np.testing.assert_array_equal(prow, bm.partial_row_ptr)
    np.testing.assert_array_equal(pcol, bm.partial_col_idx)
    np.testing.assert_array_equal(tiles, blockmask.packed_tiles(bm))
    # bq, bk, words per tile row, rule, offset, window sides
    assert [int(x) for x in scalars] == [4, 4, 1, blockmask.KERNEL_RULE_TILES, 0, -1, -1]
    bwd = _params.block_mask_args(np, prob, csc=True)
    assert len(bwd) == 15
    for got, want in zip(bwd[12:], blockmask.csc_arrays(bm), strict=True):
        np.testing.assert_array_equal(got, want)
    # Another problem with the same mask finds the cached arrays: no new copy per call.
    again = _params.block_mask_args(np, _prob(sq=8, sk=8, block_mask=bm)[0], csc=True)
    arrays = [i for i, a in enumerate(bwd) if isinstance(a, np.ndarray)]
    assert len(arrays) == 8 and all(again[i] is bwd[i] for i in arrays)
    # Without a mask: the dense launch's null pointers, the same count.
    dense, _ = _prob(sq=8, sk=8)
    assert len(_params.block_mask_args(np, dense)) == 12
    nulls = _params.block_mask_args(np, dense, csc=True)
    assert len(nulls) == 15 and [int(nulls[i]) for i in (0, 4, 12, 13, 14)] == [0] * 5
    # The score-mod parameter block is the same with or without the mask.
    for a, b in zip(_params.option_args(np, prob), _params.option_args(np, dense), strict=True):
        assert type(a) is type(b) and int(a) == int(b)


def test_launchers_take_the_block_mask_from_the_problem():
    # No CuPy launcher takes a block_mask (or the CPU plan of one) beside the problem.
    import inspect

    from xattn._backends.cupy_ import (
        flash,
        flash_bwd,
        flash_simt,
        flash_sm90,
        flash_tf32,
        flash_tf32x3,
    )

    for fn in (flash.forward, flash_bwd.backward, flash_simt.forward, flash_sm90.forward,
               flash_tf32.forward, flash_tf32x3.forward):
        params = set(inspect.signature(fn).parameters)
        assert not params & {"block_mask", "plan", "element_rule"}, fn.__module__


def test_sm90_backward_refusals_name_their_reason(monkeypatch):
    """cupy.sm90_bwd turns down every request its kernel does not serve, with the reason, so
    that auto walks on to cupy.sm80, and takes the options its entries have (windows, score
    mods at D = 64, block masks its tiles divide); the device is a stand-in of compute
    capability 9.0 (no GPU needed)."""
    import dataclasses
    from types import SimpleNamespace

    from xattn import BlockMask
    from xattn._backends.cupy_ import _params
    from xattn._backends.cupy_ import flash_bwd_sm90 as m

    on_gpu = SimpleNamespace(__name__="cupy")
    cc = {"value": 90}
    monkeypatch.setattr(_params, "compute_capability", lambda: cc["value"])

    def prob_of(dtype=np.float16, d=64, dv=64, s=5, **score):
        q = np.zeros((2, s, d), dtype)
        prob = validate_attention(q, q, np.zeros((2, s, dv), dtype), **score)
        return dataclasses.replace(prob, xp=on_gpu)

    def why(dtype=np.float16, d=64, dv=64, op="backward", opts=None, **score):
        return m.supports(prob_of(dtype, d, dv, **score), opts or {}, op)

    assert "backward only" in why(op="forward")
    assert "float16 and bfloat16" in why(np.float32)
    assert "head_dim 96" in why(d=96, dv=96)
    assert "Dv 128" in why(d=64, dv=128)
    # deterministic=True: the dK/dV-only twins of its entries + flash_bwd.cu's dq kernel, once
    # its switch is on (off until a GPU run has passed their tests).
    monkeypatch.setattr(instances, "SM90_BWD_DETERMINISTIC_ON", False)
    assert "SM90_BWD_DETERMINISTIC_ON" in why(opts={"deterministic": True})
    monkeypatch.setattr(instances, "SM90_BWD_DETERMINISTIC_ON", True)
    assert why(opts={"deterministic": True}) is None
    assert "return_dbias" in why(opts={"return_dbias": True})
    bias = np.zeros((5, 5), np.float32)
    mask = np.ones((2, 1, 5), bool)
    served = [{}, {"causal": True}, {"window": (2, 0)}, {"window": (None, 1), "causal": True},
              {"softcap": 5.0}, {"alibi_slopes": np.ones(2, np.float32)}, {"bias": bias},
              {"mask": mask}, {"softcap": 3.0, "window": (1, 1), "bias": bias}]
    for score in served:
        assert why(**score) is None, score
        assert why(opts={"deterministic": True}, **score) is None, score
    # D = 128 windows: the TMA window twin while SM90_BWD_WIN_TMA_ON, else cupy.sm80.
    assert why(d=128, dv=128, window=(2, 3), causal=True) is None
    monkeypatch.setattr(instances, "SM90_BWD_WIN_TMA_ON", False)
    assert "measured slower" in why(d=128, dv=128, window=(2, 3), causal=True)
    monkeypatch.setattr(instances, "SM90_BWD_WIN_TMA_ON", True)
    for score in served[4:]:
        reason = why(d=128, dv=128, **score)
        assert reason is not None and "D = [64]" in reason and "cupy.sm80" in reason, score
    assert [m.variant(prob_of(**s)) for s in served[:5]] == [None, None, "win", "win", "mods"]

    def bm_why(block_size, d=64, **score):
        prob = prob_of(d=d, dv=d, s=256, **score)
        bm = BlockMask.causal(256, block_size=block_size)
        return m.supports(dataclasses.replace(prob, block_mask=bm), {}, "backward")

    assert bm_why(128) is None and bm_why((64, 128)) is None and bm_why(256) is None
    assert bm_why(128, d=128) is None and bm_why(128, softcap=2.0) is None
    assert "D = [64]" in bm_why(128, d=128, softcap=2.0)
    for size in (64, (128, 64), (32, 128)):
        reason = bm_why(size)
        assert reason is not None and "block size" in reason and "cupy.sm80" in reason, size
    prob = dataclasses.replace(prob_of(s=256, softcap=1.0),
                               block_mask=BlockMask.causal(256, block_size=128))
    assert m.variant(prob) == "mods_bm"
    cc["value"] = 80
    assert "9.0 only" in why()


def test_persistent_grid_asks_the_driver_once_per_function_object(monkeypatch):
    """flash_sm90.resident_blocks: one occupancy query per compiled function object (a rebuilt
    entry of the same name, whose freed predecessor's address the new one may take, is asked
    again), at least one block."""
    import sys
    import types

    from xattn._backends.cupy_ import flash_sm90

    asked = []
    answers = iter([3, 0])

    def occupancy(ptr, threads, smem):
        asked.append((ptr, threads, smem))
        return next(answers)

    driver = types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=occupancy)
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(driver=driver)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(flash_sm90, "_RESIDENT", {})
    cfg = (64, 1, 235)
    first = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=1234))
    assert flash_sm90.resident_blocks(first, 64, cfg) == 3
    assert flash_sm90.resident_blocks(first, 64, cfg) == 3
    rebuilt = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=1234))
    assert flash_sm90.resident_blocks(rebuilt, 64, cfg) == 1
    assert asked == [(1234, flash_sm90.threads(cfg), flash_sm90.smem_bytes(64, cfg))] * 2
