"""The sm_90a (wgmma) backward, ``cupy.sm90_bwd``, against the float64 oracle
(needs CuPy and a compute capability 9.0 GPU): the plain entries (causal, GQA), and the option
entries forced with ``backend="cupy.sm90_bwd"``: every option case of the mma.sync backward's
tests at D = 64 (windows, softcap, ALiBi, bias and mask in several broadcast shapes, GQA with
all of them), block masks of 128-key blocks (walk, element rules, empty
rows and columns, GQA, with score mods), and the refusals that send the rest to cupy.sm80;
the TMA entries (-k tma); deterministic=True (-k det: the _nodq entries with flash_bwd.cu's dq
kernel, and the wgmma dq kernel on request).

dq, dk and dv must lie within the bound of the mma.sync backward's tests
(``test_gpu_flash_bwd._assert_grad``: 2x the float64 error of the naive same-dtype backward
plus the dtype's atol); failures name the case, the gradient, the worst element and the rows
and columns that are out, so a fragment or layout fault shows up as a pattern (rows modulo the
64-query step, keys modulo the 64-key warpgroup, columns past 64 = the second dQ panel).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import CC, cupy_array
from test_gpu_blockmask_bwd import _assert_grad as _assert_grad_bm
from test_gpu_flash_bwd import _OPTION_CASES, _assert_grad, _inputs, _option_case

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn._backends.cupy_ import flash_bwd_sm90 as k90b
from xattn._backends.cupy_ import instances
from xattn.testing import naive_attention_backward, reference_attention_backward

cp = pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CC != 90, reason="needs a compute capability 9.0 (Hopper) GPU"),
]

ENTRY = "cupy.sm90_bwd"


@pytest.fixture(autouse=True)
def _deterministic_switch(request, monkeypatch):
    """The det tests run with deterministic=True's switch on (instances.py: off by default
    until these tests have passed on a GPU)."""
    if "det" in request.node.name:
        from xattn._backends.cupy_ import instances

        monkeypatch.setattr(instances, "SM90_BWD_DETERMINISTIC_ON", True)


def _check(case, q, k, v, **opts):
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 1)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    dout = cupy_array(rng.standard_normal(out.shape), np.dtype(q.dtype).name)
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=ENTRY, **opts)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        _assert_grad(case, name, g, r, n, q.dtype)
    return grads


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(77, 150), (130, 61), (64, 128)])
def test_sm90_backward(dtype, d, causal, sq, sk):
    # (130, 61) causal: the first 69 query rows see no key (lse = -inf, zero gradients);
    # (64, 128): exactly one query step and one key block.
    rng = np.random.default_rng([d, sq, sk, causal, 90])
    q, k, v = _inputs(rng, dtype, sq=sq, sk=sk, d=d)
    _check(f"{dtype} d={d} causal={causal} sq={sq} sk={sk}", q, k, v, causal=causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["gqa4", "mqa", "mha", "scale"])
def test_sm90_backward_heads_and_scale(d, case):
    hq, hkv, opts = {"gqa4": (8, 2, {}), "mqa": (4, 1, {"causal": True}),
                     "mha": (4, 4, {}), "scale": (4, 2, {"scale": 0.37, "causal": True})}[case]
    rng = np.random.default_rng([d, len(case), 91])
    q, k, v = _inputs(rng, "float16", hq=hq, hkv=hkv, sq=200, sk=333, d=d)
    _check(f"float16 d={d} {case}", q, k, v, **opts)


@pytest.mark.parametrize("d", [64, 128])
def test_sm90_backward_many_blocks(d):
    # Several key blocks and query steps (both Q/dO buffers, the causal query range per block),
    # lengths that are multiples of no tile.
    rng = np.random.default_rng([d, 92])
    q, k, v = _inputs(rng, "bfloat16", b=(1,), hq=4, hkv=2, sq=600, sk=700, d=d)
    _check(f"bfloat16 d={d} causal sq=600 sk=700", q, k, v, causal=True)


def test_sm90_backward_matches_the_mma_sync_backward():
    # The same gradients as cupy.sm80 up to rounding (both are float32-accumulated).
    rng = np.random.default_rng(93)
    q, k, v = _inputs(rng, "float16", b=(2,), hq=4, hkv=2, sq=256, sk=256, d=128)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, causal=True)
    dout = cupy_array(rng.standard_normal(out.shape), "float16")
    a = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=ENTRY, causal=True)
    b = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend="cupy.sm80",
                                       causal=True)
    for name, x, y in zip(("dq", "dk", "dv"), a, b, strict=True):
        xf, yf = (cp.asnumpy(t.astype(cp.float32)) for t in (x, y))
        scale = max(1.0, float(np.abs(yf).max()))
        err = float(np.abs(xf - yf).max())
        assert err <= 2e-2 * scale, f"{name}: max |sm90 - sm80| {err:.3g} (max |sm80| {scale:.3g})"


def test_auto_takes_the_sm90_backward_and_it_refuses_with_reasons(monkeypatch):
    rng = np.random.default_rng(94)
    q, k, v = _inputs(rng, "float16", sq=40, sk=50, d=64)
    prob = validate_attention(q, k, v, causal=True)
    assert ENTRY not in _backends.OPT_IN
    assert _backends.explain(prob, {}, "auto", op="backward")["backend"] == ENTRY
    assert _backends.explain(prob, {}, ENTRY, op="backward")["backend"] == ENTRY
    # deterministic=True is served too (its _nodq entries + flash_bwd.cu's dq kernel), once its
    # switch is on; off, cupy.sm80 serves it.
    from xattn._backends.cupy_ import instances

    monkeypatch.setattr(instances, "SM90_BWD_DETERMINISTIC_ON", False)
    assert _backends.explain(prob, {"deterministic": True}, "auto",
                             op="backward")["backend"] == "cupy.sm80"

    monkeypatch.setattr(instances, "SM90_BWD_DETERMINISTIC_ON", True)
    assert _backends.explain(prob, {"deterministic": True}, "auto",
                             op="backward")["backend"] == ENTRY
    refusals = {
        "return_dbias": (validate_attention(q, k, v, bias=cp.zeros((40, 50), cp.float32)),
                         {"return_dbias": True}, "return_dbias"),
    }
    for case, (p, opts, word) in refusals.items():
        why = _backends.explain(p, opts, ENTRY, op="backward")["reasons"][ENTRY]
        assert why is not None and word in why, (case, why)
    why = _backends.explain(prob, {}, ENTRY, op="forward")["reasons"][ENTRY]
    assert why is not None and "backward only" in why
    q96, k96, v96 = _inputs(rng, "float16", sq=40, sk=50, d=96)
    why = _backends.explain(validate_attention(q96, k96, v96), {}, ENTRY,
                            op="backward")["reasons"][ENTRY]
    assert why is not None and "head_dim 96" in why
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="return_dbias"):
        xattn.flash_attention_backward(out, q, k, v, out, lse, backend=ENTRY,
                                       bias=cp.zeros((40, 50), cp.float32), return_dbias=True)


@pytest.mark.parametrize("sq,sk", [(0, 50), (40, 0), (0, 0)])
def test_sm90_backward_empty_lengths(sq, sk):
    # The launcher returns zeros without a launch (queries without keys, keys without queries).
    q = cp.ones((1, 4, sq, 64), cp.float16)
    k = cp.ones((1, 2, sk, 64), cp.float16)
    out = cp.zeros_like(q)
    lse = cp.full((1, 4, sq), -cp.inf, cp.float32)
    grads = xattn.flash_attention_backward(out, q, k, k, out, lse, backend=ENTRY)
    for x, like in zip(grads, (q, k, k), strict=True):
        assert x.shape == like.shape and x.dtype == like.dtype
        assert not bool(cp.any(x != 0))


# --- the option entries (win, mods, bm, mods_bm) ----------------------------------------------

def _entry_name(prob):
    """The compiled entry that serves ``prob`` (the variant the launcher picks)."""
    from xattn._backends.cupy_ import flash_bwd_sm90 as m

    var = m.variant(prob)
    return f"flash_bwd_sm90_f16_d{prob.d}" + (f"_{var}" if var else "")


# bfloat16 on the cases that exercise the most rules; float16 on all.
_BF16_CASES = ("softcap", "alibi_batched", "bias_full", "mask_empty_rows", "causal_window",
               "all")


@pytest.mark.parametrize(("dtype", "case"),
                         [("float16", c) for c in _OPTION_CASES]
                         + [("bfloat16", c) for c in _BF16_CASES])
def test_sm90_backward_options_d64(dtype, case):
    # The option cases of test_gpu_flash_bwd (windows, softcap, ALiBi per head and per batch
    # element, bias (Sq, Sk) float32 and (B, H, Sq, Sk) float16, masks (B, 1, Sq, Sk) and
    # (Sq, Sk) with fully masked rows, scale, MHA / GQA / MQA, all at once), forced onto the
    # wgmma backward.
    rng = np.random.default_rng([zlib.crc32(case.encode()), 64, 90])
    (q, k, v), opts = _option_case(rng, case, dtype, 64)
    dq, dk, dv = _check(f"{dtype} d=64 {case}", q, k, v, **opts)
    if case == "mask_empty_rows":
        assert bool(cp.all(dq[..., ::7, :] == 0)), "dq of fully masked rows is not exactly 0"
    if case == "window_far":
        assert bool(cp.all(dk[..., :140, :] == 0)) and bool(cp.all(dv[..., :140, :] == 0)), \
            "dk/dv of keys that no query sees are not exactly 0"


def test_sm90_backward_gqa_with_every_mod_many_blocks():
    # Several key blocks and query steps, GQA 8/2, every modification at once, lengths that are
    # multiples of no tile (the bias read per query head, ALiBi per batch element).
    rng = np.random.default_rng(95)
    b, hq, hkv, sq, sk = 2, 8, 2, 300, 420
    q, k, v = _inputs(rng, "bfloat16", b=(b,), hq=hq, hkv=hkv, sq=sq, sk=sk, d=64, amp=2.0)
    opts = dict(causal=True, window=(200, None), softcap=8.0,
                alibi_slopes=cp.asarray(rng.uniform(0.01, 0.2, (b, hq)), dtype=cp.float32),
                bias=cp.asarray(rng.standard_normal((hq, 1, sk)), dtype=cp.float32),
                mask=cp.asarray(rng.random((b, 1, sq, sk)) < 0.85))
    _check("bfloat16 d=64 gqa 8/2 every mod sq=300 sk=420", q, k, v, **opts)


def _check_bm(case, q, k, v, bm, **opts):
    """Forward (auto) + backward forced onto the wgmma backward with ``bm``, against the oracle
    with the mask's dense form (and'ed with a user mask)."""
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 3)
    out, lse = xattn.flash_attention(q, k, v, block_mask=bm, return_lse=True, **opts)
    dout = cupy_array(rng.standard_normal(out.shape), np.dtype(q.dtype).name)
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, block_mask=bm,
                                           backend=ENTRY, **opts)
    ref_opts = dict(opts)
    dense = np.asarray(bm.to_dense())
    user = ref_opts.pop("mask", None)
    ref_opts["mask"] = dense if user is None else dense & cp.asnumpy(user)
    refs = reference_attention_backward(dout, q, k, v, **ref_opts)
    naive = naive_attention_backward(dout, q, k, v, out, **ref_opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        _assert_grad_bm(case, name, g, r, n, q.dtype, bm)
    return grads


def _bm_masks():
    rng = np.random.default_rng(0)
    dense = rng.random((300, 270)) < 0.4
    dense[:, 128:256] = True  # a full block column among partial ones
    dense[40:70, :] = False  # empty rows inside partial blocks
    return {
        "causal128": xattn.BlockMask.causal(333, block_size=128),
        "window128": xattn.BlockMask.sliding_window(400, window=(150, 0), block_size=128),
        "documents128": xattn.BlockMask.documents([0, 50, 180, 310], causal=True,
                                                  block_size=128),
        "from_dense128": xattn.BlockMask.from_dense(dense, block_size=128),
        # Two 64-row query steps per mask block row; 256-key blocks (two CTAs per column).
        "from_dense_128x256": xattn.BlockMask.from_dense(dense, block_size=(128, 256)),
        "causal_64x128": xattn.BlockMask.causal(300, 333, block_size=(64, 128)),
    }


BM_MASKS = _bm_masks()


@pytest.mark.parametrize(("dtype", "d"), [("float16", 64), ("bfloat16", 128)])
@pytest.mark.parametrize("name", sorted(BM_MASKS))
def test_sm90_backward_block_masks(dtype, d, name):
    bm = BM_MASKS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), d, 96])
    q, k, v = _inputs(rng, dtype, b=(2,), hq=4, hkv=2, sq=bm.q_len, sk=bm.k_len, d=d)
    _check_bm(f"{name} {dtype} d={d}", q, k, v, bm)


@pytest.mark.parametrize("name,option", [
    ("window128", "all"), ("documents128", "alibi"), ("from_dense128", "softcap"),
    ("causal_64x128", "mask"), ("from_dense_128x256", "window"),
])
def test_sm90_backward_block_masks_with_options(name, option):
    bm = BM_MASKS[name]
    rng = np.random.default_rng([zlib.crc32((name + option).encode()), 97])
    hq = 4
    sq, sk = bm.q_len, bm.k_len
    q, k, v = _inputs(rng, "float16", b=(2,), hq=hq, hkv=2, sq=sq, sk=sk, d=64,
                      amp=3.0 if option in ("softcap", "all") else 1.0)
    opts = {}
    if option == "window":
        opts["window"] = (90, 20)
    elif option == "alibi":
        opts["alibi_slopes"] = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
    elif option == "softcap":
        opts["softcap"] = 6.0
    elif option == "mask":
        opts["mask"] = cp.asarray(rng.random((2, 1, sq, sk)) < 0.8)
    elif option == "all":
        opts.update(causal=True, window=(300, None), softcap=10.0,
                    alibi_slopes=cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32),
                    bias=cp.asarray(rng.standard_normal((hq, 1, sk)), dtype=cp.float32),
                    mask=cp.asarray(rng.random((sq, sk)) < 0.9))
    _check_bm(f"{name} + {option}", q, k, v, bm, **opts)


@pytest.mark.parametrize("d", [64, 128])
def test_sm90_backward_block_mask_gqa_empty_rows_and_columns(d):
    # GQA 8/2 (each CTA walks the column once per query head), a block row no key block is
    # visible to (dq exactly 0), a key block column no query sees (dk/dv exactly 0).
    rng = np.random.default_rng([d, 98])
    dense = rng.random((400, 390)) < 0.5
    dense[128:256] = False
    dense[:, 128:256] = False
    bm = xattn.BlockMask.from_dense(dense, block_size=128)
    q, k, v = _inputs(rng, "float16", b=(1,), hq=8, hkv=2, sq=400, sk=390, d=d)
    dq, dk, dv = _check_bm(f"gqa 8/2 empty rows/columns d={d}", q, k, v, bm)
    assert bool(cp.all(dq[..., 128:256, :] == 0)), "dq of rows that see nothing is not 0"
    assert bool(cp.all(dk[..., 128:256, :] == 0)) and bool(cp.all(dv[..., 128:256, :] == 0)), \
        "dk/dv of keys that no query sees are not exactly 0"


def test_auto_routes_options_to_the_sm90_backward_and_refuses_the_rest():
    rng = np.random.default_rng(99)
    q, k, v = _inputs(rng, "float16", sq=200, sk=300, d=64)
    q2, k2, v2 = _inputs(rng, "float16", sq=200, sk=300, d=128)
    bias = cp.asarray(rng.standard_normal((200, 300)), dtype=cp.float32)
    served = {
        "window d=64": validate_attention(q, k, v, window=(8, 0)),
        "softcap d=64": validate_attention(q, k, v, softcap=5.0),
        "bias d=64": validate_attention(q, k, v, bias=bias, causal=True),
        "block mask d=128": validate_attention(
            q2, k2, v2, block_mask=xattn.BlockMask.causal(200, 300, block_size=128)),
        "block mask + alibi d=64": validate_attention(
            q, k, v, block_mask=xattn.BlockMask.causal(200, 300, block_size=(64, 128)),
            alibi_slopes=cp.asarray(xattn.alibi_slopes(4), dtype=cp.float32)),
    }
    if instances.SM90_BWD_WIN_TMA_ON:  # the TMA window twins serve D = 128 windows too
        served["window d=128"] = validate_attention(q2, k2, v2, window=(30, 5), causal=True)
    for case, prob in served.items():
        got = _backends.explain(prob, {}, "auto", op="backward")
        assert got["backend"] == ENTRY, (case, got)
    refused = {
        "softcap d=128": (validate_attention(q2, k2, v2, softcap=5.0), "D = [64]"),
        "block mask 64": (validate_attention(
            q, k, v, block_mask=xattn.BlockMask.causal(200, 300, block_size=64)), "block size"),
    }
    for case, (prob, word) in refused.items():
        got = _backends.explain(prob, {}, "auto", op="backward")
        assert got["backend"] == "cupy.sm80", (case, got)
        assert word in got["reasons"][ENTRY], (case, got["reasons"][ENTRY])
    out, lse = xattn.flash_attention(q2, k2, v2, return_lse=True, softcap=5.0)
    with pytest.raises(NotImplementedError, match="D = "):
        xattn.flash_attention_backward(out, q2, k2, v2, out, lse, backend=ENTRY, softcap=5.0)
    # The entries the launcher names exist (the variant tokens of instances.py).
    assert _entry_name(served["softcap d=64"]).endswith("_mods")
    assert _entry_name(served["block mask + alibi d=64"]).endswith("_mods_bm")


# The TMA entries (flash_bwd_sm90.backward(..., config="tma" | "tma2"), the plain requests'
# default: Q / dO per step and K / V once by the copy engine; tools/gpu_check_bwdtma.sh runs
# these with -k tma).
TMA_CONFIGS = sorted(k90b.CONFIGS)


def _nan_tailed(rng, dtype, shape, amp=1.0):
    """A (B, H, S, D) operand whose allocation continues with NaN past its last element (same
    address as the allocation): a box at the last head's sequence end that read past S would
    bring NaN in (0 x NaN in the gradient products), where the tensor map's bounds give
    zeros."""
    n = int(np.prod(shape))
    host = np.concatenate([amp * rng.standard_normal(n), np.full(256 * shape[-1], np.nan)])
    base = cupy_array(host, dtype)
    x = base[:n].reshape(shape)
    assert x.data.ptr == base.data.ptr and x.flags.c_contiguous
    return x


def _tma_run(config, dtype, d, *, b=2, hq=4, hkv=2, sq=141, sk=203, causal=True, seed=0,
             oracle=True):
    """The TMA entry's gradients against the float64 oracle (``oracle``) and the plain entry's:
    dk and dv bit for bit (same products in the same order, summed in registers), dq within
    two units in the last place of its largest entry (the bulk adds of dq_accum land in an
    order that varies from run to run, in both entries)."""
    case = f"{config} {dtype} d={d} b={b} hq={hq} hkv={hkv} sq={sq} sk={sk} causal={causal}"
    rng = np.random.default_rng([d, b, hq, hkv, sq, sk, causal, seed, len(config)])
    q, do = (_nan_tailed(rng, dtype, (b, hq, sq, d)) for _ in range(2))
    k, v = (_nan_tailed(rng, dtype, (b, hkv, sk, d)) for _ in range(2))
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                              causal=causal)
    got = k90b.backward(prob, do, q, k, v, out, lse, config=config)
    plain = k90b.backward(prob, do, q, k, v, out, lse, config="plain")
    cp.cuda.runtime.deviceSynchronize()
    for name, g, p in zip(("dk", "dv"), got[1:], plain[1:], strict=True):
        nbad = int((g != p).sum())
        assert nbad == 0, f"[{case}] {name}: {nbad} entries differ from the plain entry's"
    eps = float(np.finfo(np.float16).eps) if dtype == "float16" else 2.0 ** -7
    diff = float(cp.abs(got[0].astype(cp.float32) - plain[0].astype(cp.float32)).max())
    big = float(cp.abs(plain[0].astype(cp.float32)).max())
    assert diff <= 2 * eps * max(big, 1e-3), f"[{case}] dq: max |diff| {diff:.3g} (max {big:.3g})"
    if oracle:
        refs = reference_attention_backward(do, q, k, v, causal=causal)
        naive = naive_attention_backward(do, q, k, v, out, causal=causal)
        for name, g, r, n in zip(("dq", "dk", "dv"), got, refs, naive, strict=True):
            _assert_grad(case, name, g, r, n, q.dtype)
    return got


@pytest.mark.parametrize("config", TMA_CONFIGS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_backward(config, dtype, d, causal):
    # GQA (2 query heads per kv head), two batch elements, Sq and Sk off the tiles: the last
    # query box of each head and the last key box reach past the sequence (NaN behind them).
    _tma_run(config, dtype, d, causal=causal)


@pytest.mark.parametrize("config", TMA_CONFIGS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("shape", ["rows_without_keys", "one_step", "mqa_long", "sq_gt_sk"])
def test_tma_backward_shapes(config, d, shape):
    # rows_without_keys: causal Sq > Sk, the first 69 rows see no key (lse = -inf) in step 0
    # and step 1 (the first step's lse / delta are staged apart from the later ones');
    # one_step: exactly one query step and one key block; mqa_long: 8 query heads on one kv
    # head, 10 query blocks each: 80 steps per key block, the buffers' barriers turn over many
    # times; sq_gt_sk: non-causal Sq > Sk.
    b, hq, hkv, sq, sk, causal = {
        "rows_without_keys": (1, 1, 1, 130, 61, True), "one_step": (1, 2, 2, 64, 128, False),
        "mqa_long": (1, 8, 1, 600, 300, True), "sq_gt_sk": (2, 4, 2, 260, 97, False)}[shape]
    _tma_run(config, "float16", d, b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, causal=causal,
             oracle=shape != "mqa_long")


@pytest.mark.parametrize("d", [64, 128])
def test_tma_backward_repeats(d):
    # Two runs of the same entry: dk and dv bit for bit (no atomics on them).
    first = _tma_run("tma", "bfloat16", d, b=1, hq=6, hkv=2, sq=333, sk=517, oracle=False)
    again = _tma_run("tma", "bfloat16", d, b=1, hq=6, hkv=2, sq=333, sk=517, oracle=False)
    assert all(bool((x == y).all()) for x, y in zip(first[1:], again[1:], strict=True))


def test_tma_backward_refusals():
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, "float16", sq=64, sk=64)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, softcap=5.0)
    extra = (("dout", out), ("out", out), ("lse", lse))
    prob = validate_attention(q, k, v, extra=extra, softcap=5.0)
    with pytest.raises(ValueError, match="config='tma': the TMA entries are the plain"):
        k90b.backward(prob, out, q, k, v, out, lse, config="tma")
    q2, k2, v2 = _inputs(rng, "float16", sq=64, sk=64, d=128)
    out2, lse2 = xattn.flash_attention(q2, k2, v2, return_lse=True)
    extra2 = (("dout", out2), ("out", out2), ("lse", lse2))
    prob = validate_attention(q2, k2, v2, extra=extra2, window=(16, 16))
    with pytest.raises(ValueError, match="config='plain': this problem needs the 'win' entry"):
        k90b.backward(prob, out2, q2, k2, v2, out2, lse2, config="plain")  # none at D = 128
    prob = validate_attention(q, k, v, extra=extra)
    with pytest.raises(ValueError, match="config: one of"):
        k90b.backward(prob, out, q, k, v, out, lse, config="tma3")


@pytest.mark.parametrize("config", TMA_CONFIGS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["causal_left", "two_sided_gqa", "sq_gt_sk_right"])
def test_tma_window_backward(monkeypatch, config, d, case):
    """The TMA entries' window twins (config= on a window request: _tma_win / _tma2_win; the
    switch on so that D = 128 windows are served) against the float64 oracle, with NaN behind
    every operand's end; their deterministic _nodq twins give the same dk / dv bit for bit."""
    from xattn._backends.cupy_ import instances

    monkeypatch.setattr(instances, "SM90_BWD_WIN_TMA_ON", True)
    window, causal, (b, hq, hkv, sq, sk) = {
        "causal_left": ((70, None), True, (2, 4, 2, 141, 203)),
        "two_sided_gqa": ((40, 90), False, (1, 6, 2, 333, 517)),
        "sq_gt_sk_right": ((None, 30), False, (1, 2, 1, 260, 97)),
    }[case]
    dtype = "bfloat16" if case == "two_sided_gqa" else "float16"
    name = f"{config} window {case} d={d}"
    rng = np.random.default_rng([d, len(case), len(config), 23])
    q, do = (_nan_tailed(rng, dtype, (b, hq, sq, d)) for _ in range(2))
    k, v = (_nan_tailed(rng, dtype, (b, hkv, sk, d)) for _ in range(2))
    opts = {"causal": causal, "window": window}
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)), **opts)
    assert k90b.kernel_names(prob, config=config)[1].endswith(f"_{config}_win"), name
    got = k90b.backward(prob, do, q, k, v, out, lse, config=config)
    refs = reference_attention_backward(do, q, k, v, **opts)
    naive = naive_attention_backward(do, q, k, v, out, **opts)
    for label, g, r, n in zip(("dq", "dk", "dv"), got, refs, naive, strict=True):
        _assert_grad(name, label, g, r, n, q.dtype)
    det = k90b.backward(prob, do, q, k, v, out, lse, config=config, deterministic=True)
    for label, x, y in zip(("dk", "dv"), det[1:], got[1:], strict=True):
        nbad = int((x.view(cp.uint16) != y.view(cp.uint16)).sum())
        assert nbad == 0, f"[{name}] {label}: {nbad} entries differ from the dq entry's"


# deterministic=True (tools/gpu_check_det.sh runs these with -k det): dK / dV by the _nodq twin
# of the entry the request takes (TMA entries for plain requests, option entries otherwise),
# dq by the wgmma dq kernel (plain requests, instances.SM90_BWD_DQ_WGMMA) or flash_bwd.cu's
# deterministic dq kernel.

def _det_run(case, q, k, v, do, *, block_mask=None, oracle=True, vs_sm80=False, **opts):
    """The deterministic backward of ``cupy.sm90_bwd`` against: the float64 oracle
    (``oracle``); itself run again (dq, dk, dv bit for bit); the non-deterministic call (dk, dv
    bit for bit: the same products in the same order); with ``vs_sm80`` cupy.sm80's
    deterministic call (dq bit for bit where the same mma.sync dq kernel runs, within two
    units in the last place where the wgmma one does; a few cases only, each needs one more
    mma.sync module). Also that the route is the new one."""
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, block_mask=block_mask, **opts)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                              block_mask=block_mask, **opts)
    route = _backends.explain(prob, {"deterministic": True}, "auto", op="backward")
    assert route["backend"] == ENTRY, (case, route)
    names = k90b.kernel_names(prob, deterministic=True)
    # dq by the wgmma dq kernel for plain requests while instances.SM90_BWD_DQ_WGMMA is on
    # (another summation order than cupy.sm80's mma.sync dq kernel), else by the latter.
    wgmma_dq = k90b.dq_kernel_choice(prob) == "wgmma"
    dq_prefix = "flash_bwd_sm90_dq_" if wgmma_dq else "flash_bwd_dq_"
    assert names[1].endswith("_nodq") and names[2].startswith(dq_prefix), (case, names)

    def run(backend=ENTRY, deterministic=True):
        return xattn.flash_attention_backward(do, q, k, v, out, lse, block_mask=block_mask,
                                              deterministic=deterministic, backend=backend,
                                              **opts)

    det, again, nondet = run(), run(), run(deterministic=False)
    cp.cuda.runtime.deviceSynchronize()

    def bits(x):
        return x.view(cp.uint16)

    for name, x, y in zip(("dq", "dk", "dv"), det, again, strict=True):
        nbad = int((bits(x) != bits(y)).sum())
        assert nbad == 0, f"[{case}] {name}: {nbad} entries differ between two runs"
    for name, x, y in zip(("dk", "dv"), det[1:], nondet[1:], strict=True):
        nbad = int((bits(x) != bits(y)).sum())
        assert nbad == 0, f"[{case}] {name}: {nbad} entries differ from the wgmma entry's"
    if vs_sm80:
        sm80 = run("cupy.sm80")
        if wgmma_dq:
            _assert_ulps(case, det[0], sm80[0])
        else:
            nbad = int((bits(det[0]) != bits(sm80[0])).sum())
            assert nbad == 0, f"[{case}] dq: {nbad} entries differ from cupy.sm80's det. dq"
    if oracle:
        ref_opts = dict(opts)
        if block_mask is not None:
            dense = np.asarray(block_mask.to_dense())
            user = ref_opts.pop("mask", None)
            ref_opts["mask"] = dense if user is None else dense & cp.asnumpy(user)
        refs = reference_attention_backward(do, q, k, v, **ref_opts)
        naive = naive_attention_backward(do, q, k, v, out, **ref_opts)
        for name, g, r, n in zip(("dq", "dk", "dv"), det, refs, naive, strict=True):
            _assert_grad(case, name, g, r, n, q.dtype)
    return det


def _det_inputs(rng, dtype, b, hq, hkv, sq, sk, d, amp=1.0):
    """q, k, v, dout with NaN behind each allocation's end (a TMA box reading past the
    sequence would bring it in)."""
    q = _nan_tailed(rng, dtype, (b, hq, sq, d), amp)
    k = _nan_tailed(rng, dtype, (b, hkv, sk, d), amp)
    v = _nan_tailed(rng, dtype, (b, hkv, sk, d))
    do = _nan_tailed(rng, dtype, (b, hq, sq, d))
    return q, k, v, do


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ["gqa", "rows_without_keys", "sq_gt_sk"])
def test_det_backward(dtype, d, causal, shape):
    # gqa: 2 batch elements, 4 query heads on 2 kv heads, Sq != Sk off the tiles;
    # rows_without_keys: Sq > Sk (with causal the first 69 rows see no key: zero dq);
    # sq_gt_sk: Sq > Sk, several query blocks per key block, MQA.
    b, hq, hkv, sq, sk = {"gqa": (2, 4, 2, 141, 203), "rows_without_keys": (1, 2, 2, 130, 61),
                          "sq_gt_sk": (1, 4, 1, 260, 97)}[shape]
    rng = np.random.default_rng([d, causal, len(shape), 11])
    q, k, v, do = _det_inputs(rng, dtype, b, hq, hkv, sq, sk, d)
    _det_run(f"det {dtype} d={d} causal={causal} {shape}", q, k, v, do, causal=causal,
             vs_sm80=dtype == "float16" and shape == "gqa")


@pytest.mark.parametrize("case", ["window", "softcap_alibi", "bias_mask", "all"])
def test_det_backward_options_d64(case):
    # The option entries' nodq twins (win, mods) at D = 64, GQA 4/2, lengths off the tiles.
    rng = np.random.default_rng([zlib.crc32(case.encode()), 12])
    b, hq, hkv, sq, sk = 2, 4, 2, 150, 230
    dtype = "bfloat16" if case == "all" else "float16"
    q, k, v, do = _det_inputs(rng, dtype, b, hq, hkv, sq, sk, 64,
                              amp=2.0 if case in ("softcap_alibi", "all") else 1.0)
    slopes = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
    bias = cp.asarray(rng.standard_normal((hq, 1, sk)), dtype=cp.float32)
    mask = cp.asarray(rng.random((b, 1, sq, sk)) < 0.85)
    opts = {"window": dict(window=(40, 10)),
            "softcap_alibi": dict(softcap=6.0, alibi_slopes=slopes, causal=True),
            "bias_mask": dict(bias=bias, mask=mask),
            "all": dict(causal=True, window=(100, None), softcap=8.0, alibi_slopes=slopes,
                        bias=bias, mask=mask)}[case]
    _det_run(f"det d=64 {case}", q, k, v, do, vs_sm80=case == "all", **opts)


@pytest.mark.parametrize(("name", "d", "option"), [
    ("causal128", 64, None), ("from_dense128", 128, None), ("causal_64x128", 128, None),
    ("documents128", 64, "alibi"), ("from_dense_128x256", 64, "softcap"),
])
def test_det_backward_block_masks(name, d, option):
    # The bm / mods_bm nodq twins; the dq kernel walks the mask's CSR rows.
    bm = BM_MASKS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), d, 13])
    hq = 4
    q, k, v, do = _det_inputs(rng, "float16", 2, hq, 2, bm.q_len, bm.k_len, d)
    opts = {}
    if option == "alibi":
        opts["alibi_slopes"] = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
    elif option == "softcap":
        opts["softcap"] = 6.0
    _det_run(f"det {name} d={d} {option}", q, k, v, do, block_mask=bm,
             vs_sm80=name in ("from_dense128", "documents128"), **opts)


def test_det_backward_many_steps_repeat():
    # 8 query heads on one kv head, 10 query blocks each (80 steps per key block: the TMA
    # buffers turn over many times); bit-reproducible over five runs, no oracle (size).
    rng = np.random.default_rng(14)
    q, k, v, do = _det_inputs(rng, "bfloat16", 1, 8, 1, 600, 640, 128)
    first = _det_run("det mqa long d=128", q, k, v, do, causal=True, oracle=False)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, causal=True)
    for _ in range(3):
        g = xattn.flash_attention_backward(do, q, k, v, out, lse, causal=True,
                                           deterministic=True)
        for x, y in zip(first, g, strict=True):
            assert bool((x.view(cp.uint16) == y.view(cp.uint16)).all())


def test_det_backward_config_plain_refused():
    rng = np.random.default_rng(15)
    q, k, v = _inputs(rng, "float16", sq=64, sk=64)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    prob = validate_attention(q, k, v, extra=(("dout", out), ("out", out), ("lse", lse)))
    with pytest.raises(ValueError, match="config='plain' with deterministic=True"):
        k90b.backward(prob, out, q, k, v, out, lse, deterministic=True, config="plain")
    # The other TMA entry's twin is built on request and gives the same dk / dv.
    a = k90b.backward(prob, out, q, k, v, out, lse, deterministic=True, config="tma")
    b = k90b.backward(prob, out, q, k, v, out, lse, deterministic=True, config="tma2")
    for x, y in zip(a, b, strict=True):
        assert bool((x.view(cp.uint16) == y.view(cp.uint16)).all())


# The wgmma dq kernel (flash_bwd_sm90.backward(..., deterministic=True, dq_kernel="wgmma"),
# plain requests' default while instances.SM90_BWD_DQ_WGMMA is on).

def _assert_ulps(case, got, want):
    """dq of two dq kernels (two summation orders) within two units in the last place of
    max |dq|."""
    eps = float(np.finfo(np.float16).eps) if got.dtype == cp.float16 else 2.0 ** -7
    diff = float(cp.abs(got.astype(cp.float32) - want.astype(cp.float32)).max())
    big = float(cp.abs(want.astype(cp.float32)).max())
    assert diff <= 2 * eps * max(big, 1e-3), f"[{case}] dq: max |diff| {diff:.3g} (max {big:.3g})"


def _det_wgmma_run(case, q, k, v, do, *, oracle=True, **opts):
    """dq of the wgmma dq kernel: against the float64 oracle, bit for bit across two runs,
    within two units in the last place (of max |dq|) of the mma.sync dq kernel's (another
    summation order); dk / dv bit for bit the other route's (the same _nodq entry)."""
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                              **opts)
    assert k90b.kernel_names(prob, True, dq_kernel="wgmma")[2].startswith("flash_bwd_sm90_dq_")

    def run(dq_kernel):
        return k90b.backward(prob, do, q, k, v, out, lse, deterministic=True,
                             dq_kernel=dq_kernel)

    got, again, mma = run("wgmma"), run("wgmma"), run("mma")
    cp.cuda.runtime.deviceSynchronize()
    for name, x, y in zip(("dq", "dk", "dv"), got, again, strict=True):
        nbad = int((x.view(cp.uint16) != y.view(cp.uint16)).sum())
        assert nbad == 0, f"[{case}] {name}: {nbad} entries differ between two runs"
    for name, x, y in zip(("dk", "dv"), got[1:], mma[1:], strict=True):
        nbad = int((x.view(cp.uint16) != y.view(cp.uint16)).sum())
        assert nbad == 0, f"[{case}] {name}: {nbad} entries differ from the mma dq route's"
    _assert_ulps(case, got[0], mma[0])
    if oracle:
        refs = reference_attention_backward(do, q, k, v, **opts)
        naive = naive_attention_backward(do, q, k, v, out, **opts)
        _assert_grad(case, "dq", got[0], refs[0], naive[0], q.dtype)
    return got


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ["gqa", "rows_without_keys", "sq_gt_sk", "one_block"])
def test_det_wgmma_dq(dtype, d, causal, shape):
    # gqa: 2 batch elements, GQA 4/2, Sq != Sk off the tiles (two 128-row blocks, the second
    # one's second warpgroup past Sq); rows_without_keys: causal Sq > Sk, the first 69 rows see
    # no key (zero dq); sq_gt_sk: MQA, several blocks; one_block: exactly 128 rows, 64 keys.
    b, hq, hkv, sq, sk = {"gqa": (2, 4, 2, 141, 203), "rows_without_keys": (1, 2, 2, 130, 61),
                          "sq_gt_sk": (1, 4, 1, 300, 97), "one_block": (1, 2, 1, 128, 64)}[shape]
    rng = np.random.default_rng([d, causal, len(shape), 16])
    q, k, v, do = _det_inputs(rng, dtype, b, hq, hkv, sq, sk, d)
    dq = _det_wgmma_run(f"det wgmma dq {dtype} d={d} causal={causal} {shape}", q, k, v, do,
                        causal=causal)[0]
    if shape == "rows_without_keys" and causal:
        assert bool(cp.all(dq[..., :69, :] == 0)), "dq of rows that see no key is not 0"


@pytest.mark.parametrize("d", [64, 128])
def test_det_wgmma_dq_long_and_scale(d):
    # Many key blocks (both K/V buffers turn over), a scale, causal, bf16; and repeats.
    rng = np.random.default_rng([d, 17])
    q, k, v, do = _det_inputs(rng, "bfloat16", 1, 4, 2, 520, 700, d)
    first = _det_wgmma_run(f"det wgmma dq long d={d}", q, k, v, do, causal=True, scale=0.3)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, causal=True, scale=0.3)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)),
                              causal=True, scale=0.3)
    for _ in range(3):
        g = k90b.backward(prob, do, q, k, v, out, lse, deterministic=True, dq_kernel="wgmma")
        assert bool((g[0].view(cp.uint16) == first[0].view(cp.uint16)).all())
