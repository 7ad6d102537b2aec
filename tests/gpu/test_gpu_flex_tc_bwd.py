"""flex_attention_backward on tensor cores (backend="cupy"): score_mod, its derivative and
mask_mod inside the mma.sync backward kernels.

Gradients of q, k, v against the float64 oracle (``reference_attention_backward`` with the
score_mod written as a dense bias/softcap and the mask_mod as a dense mask; the error may be
at most twice that of a naive computation in the same precision, as for flash attention's
backward) and against the CPU flex backward (numba, float32). ALiBi with captured slopes, a
T5-style relative-position table (captured CuPy array), tanh softcap, a document mask with
captured ids, causal and sliding-window mask_mods; float16 and bfloat16; D 64 and 128 (and
padded head dims); GQA; lengths that are not tile multiples; Sq != Sk both ways. Slopes in
``score_mod_args`` (whose gradient the tensor-core kernel does not compute) are refused by
``backend="cupy"`` and routed to numba_cuda by ``"auto"``.
"""

from __future__ import annotations

import logging
import math
import zlib

import numpy as np
import pytest
from conftest import CC, GPU_ONLY, cupy_array, t5_bucket

import xattn
from xattn.testing import (
    naive_attention_backward,
    reference_attention_backward,
    to_numpy,
    tolerance,
)

cp = pytest.importorskip("cupy")
pytestmark = GPU_ONLY

B, HQ, HKV, SQ, SK = 2, 4, 2, 300, 333
SLOPES = xattn.alibi_slopes(HQ, dtype=np.float64)
CAP = 5.0
NB = 16  # T5 buckets: 8 per direction
TABLE_HOST = np.random.default_rng(7).standard_normal((HQ, NB)).astype(np.float32)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return CAP * math.tanh(score / CAP)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def window(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= 70


def _doc_ids(n, seed):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), 4, replace=False))
    ids = np.zeros(n, np.int32)
    for c in cuts:
        ids[c:] += 1
    return ids


DOC_HOST = np.stack([_doc_ids(max(SQ, SK), 1), _doc_ids(max(SQ, SK), 2)])


def _functions(case):
    """GPU score/mask functions of a case; the T5 table and the document ids are captured
    CuPy arrays (read through kernel arguments, no gradient asked)."""
    smod, mmod = case
    table, doc = cp.asarray(TABLE_HOST), cp.asarray(DOC_HOST)

    def t5(score, b, h, q_idx, kv_idx):
        return score + table[h, t5_bucket(kv_idx - q_idx)]

    def documents(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]

    s = {"alibi": alibi, "t5": t5, "softcap": softcap, None: None}[smod]
    m = {"causal": causal, "window": window, "documents": documents, None: None}[mmod]
    return s, m


def _cpu_functions(case):
    smod, mmod = case

    def t5(score, b, h, q_idx, kv_idx):
        return score + TABLE_HOST[h, t5_bucket(kv_idx - q_idx)]

    def documents(b, h, q_idx, kv_idx):
        return DOC_HOST[b, q_idx] == DOC_HOST[b, kv_idx]

    s = {"alibi": alibi, "t5": t5, "softcap": softcap, None: None}[smod]
    m = {"causal": causal, "window": window, "documents": documents, None: None}[mmod]
    return s, m


def _dense(case, sq, sk):
    """Oracle options of a case: bias (H, Sq, Sk) / softcap / mask (B, 1, Sq, Sk)."""
    i, j = np.arange(sq)[:, None], np.arange(sk)[None]
    opts = {}
    smod, mmod = case
    if smod == "alibi":
        opts["bias"] = -SLOPES[:, None, None] * np.abs(i - j)[None]
    elif smod == "t5":
        buckets = np.vectorize(t5_bucket)(j - i)
        opts["bias"] = TABLE_HOST.astype(np.float64)[:, buckets]
    elif smod == "softcap":
        opts["softcap"] = CAP
    if mmod == "causal":
        opts["mask"] = j <= i
    elif mmod == "window":
        opts["mask"] = np.abs(i - j) <= 70
    elif mmod == "documents":
        opts["mask"] = (DOC_HOST[:, :sq, None] == DOC_HOST[:, None, :sk])[:, None]
    return opts


def _assert_grad(case, name, got, ref, naive, dtype):
    """``got`` within 2x the naive error of ``ref`` plus atol, NaN-free, typed, on the GPU."""
    assert isinstance(got, cp.ndarray), f"[{case}] {name}: not a CuPy array ({type(got)})"
    assert np.dtype(got.dtype) == np.dtype(dtype), \
        f"[{case}] {name}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    a = to_numpy(got).astype(np.float64)
    assert a.shape == ref.shape, f"[{case}] {name}: shape {a.shape}, expected {ref.shape}"
    assert np.isfinite(a).all(), f"[{case}] {name}: non-finite entries"
    atol = tolerance(dtype)[0] * max(1.0, float(np.abs(ref).max(initial=0.0)))
    naive_err = float(np.abs(naive - ref).max(initial=0.0))
    err = np.abs(a - ref)
    bound = 2.0 * naive_err + atol
    worst = float(err.max(initial=0.0))
    if worst > bound:
        idx = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(
            f"[{case}] {name}: max error {worst:.3g} > bound {bound:.3g} (2 x naive "
            f"{naive_err:.3g} + atol {atol:.3g}) at {tuple(int(i) for i in idx)}: got "
            f"{a[idx]!r}, expected {ref[idx]!r}; {int((err > bound).sum())}/{err.size} out")


def _inputs(rng, dtype, d, sq, sk, hq=HQ, hkv=HKV):
    q = cupy_array(rng.standard_normal((B, hq, sq, d)), dtype)
    k = cupy_array(rng.standard_normal((B, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((B, hkv, sk, d)), dtype)
    dout = cupy_array(rng.standard_normal((B, hq, sq, d)), dtype)
    return q, k, v, dout


def _run(case, dtype, d, sq=SQ, sk=SK, backend="cupy"):
    rng = np.random.default_rng(zlib.crc32(repr((case, d, dtype, sq, sk)).encode()))
    q, k, v, dout = _inputs(rng, dtype, d, sq, sk)
    smod, mmod = _functions(case)
    out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod, return_lse=True,
                                    backend="cupy")
    grads = xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=smod,
                                          mask_mod=mmod, backend=backend)
    return (q, k, v, dout, out), grads


CASES = [("alibi", "causal"), ("t5", "documents"), ("softcap", None), (None, "window"),
         ("t5", "causal"), ("alibi", None)]
# Every case in float16 at D = 64; the main ones also in bfloat16 and at D = 128 (each
# combination is one NVRTC compile of the backward kernel, a few seconds, and one of the
# forward's).
MATRIX = ([(c, 64, "float16") for c in CASES]
          + [(CASES[0], 64, "bfloat16"), (CASES[1], 128, "float16"),
             (CASES[2], 128, "bfloat16")])


@pytest.mark.parametrize(("case", "d", "dtype"), MATRIX,
                         ids=[f"{c[0]}+{c[1]}-d{d}-{t}" for c, d, t in MATRIX])
def test_gradients_against_oracle(case, d, dtype):
    (q, k, v, dout, out), (dq, dk, dv, dargs) = _run(case, dtype, d)
    assert dargs == ()
    opts = _dense(case, SQ, SK)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naive, strict=True):
        _assert_grad(case, name, g, r, n, q.dtype)


@pytest.mark.parametrize(("case", "d", "sq", "sk"),
                         [(("alibi", "causal"), 80, 200, 130),
                          (("softcap", "window"), 32, 77, 150),
                          (("t5", None), 96, 130, 61)],
                         ids=["alibi+causal-d80-200x130", "softcap+window-d32-77x150",
                              "t5-d96-130x61"])
def test_padded_head_dims_and_shapes(case, d, sq, sk):
    (q, k, v, dout, out), (dq, dk, dv, _) = _run(case, "float16", d, sq, sk)
    opts = _dense(case, sq, sk)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naive, strict=True):
        _assert_grad(case, name, g, r, n, q.dtype)


@pytest.mark.parametrize("case", [("alibi", "causal"), ("t5", "documents")],
                         ids=["alibi+causal", "t5+documents"])
def test_gpu_equals_cpu(case):
    """The CPU flex backward (numba, float32 on the same 16-bit values) agrees."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a numba that does not import here
        pytest.skip(f"the CPU flex kernel needs numba: {exc}")
    (q, k, v, dout, out), grads = _run(case, "float16", 64)
    host = [to_numpy(x, np.float32) for x in (q, k, v, dout, out)]
    qh, kh, vh, doh, oh = host
    smod, mmod = _cpu_functions(case)
    _, lse = xattn.flex_attention(qh, kh, vh, score_mod=smod, mask_mod=mmod, return_lse=True,
                                  backend="numba")
    cpu = xattn.flex_attention_backward(doh, qh, kh, vh, oh, lse, score_mod=smod,
                                        mask_mod=mmod, backend="numba")
    naive = naive_attention_backward(dout, q, k, v, out, **_dense(case, SQ, SK))
    for name, g, c, n in zip(("dq", "dk", "dv"), grads[:3], cpu[:3], naive, strict=True):
        c = c.astype(np.float64)
        # The naive error is measured against the CPU result: the same float64-free bound.
        _assert_grad(f"{case} vs CPU", name, g, c, n, q.dtype)


def test_auto_picks_the_tensor_core_backward(caplog):
    rng = np.random.default_rng(0)
    q, k, v, dout = _inputs(rng, "float16", 64, 130, 130)
    out, lse = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal, return_lse=True)
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        dq, dk, dv, _ = xattn.flex_attention_backward(dout, q, k, v, out, lse,
                                                       score_mod=alibi, mask_mod=causal)
    ran = [getattr(r, "xattn_backend", None) for r in caplog.records]
    assert "cupy" in ran and "numba_cuda" not in ran
    kernels = [getattr(r, "xattn_kernel", "") for r in caplog.records]
    # Compute capability 9.0: the wgmma backward (flash_bwd_sm90.cu), else mma.sync.
    want = "flash_bwd_sm90_f16_d64_flex_bm" if CC == 90 else "_flex_bm_atomic"
    assert any(name.endswith(want) for name in kernels), kernels
    opts = _dense(("alibi", "causal"), 130, 130)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naive, strict=True):
        _assert_grad("auto", name, g, r, n, q.dtype)


@pytest.mark.parametrize(("case", "d"),
                         [(("alibi", "causal"), 64), (("t5", "documents"), 64),
                          (("softcap", None), 64), ((None, "documents"), 128),
                          (("alibi", "causal"), 128)],
                         ids=["alibi+causal-d64", "t5+documents-d64", "softcap-d64",
                              "documents-d128", "alibi+causal-d128"])
def test_kernel_by_compute_capability(case, d, caplog):
    """The backward kernel is chosen as the forward's (flex_tc.kernel_for): on compute
    capability 9.0 the wgmma backward (flash_bwd_sm90.cu, ``_flex`` / ``_flex_bm``) at padded
    head dim 64, and at 128 without a score_mod (whose derivative does not fit its registers
    there: mma.sync); elsewhere the mma.sync backward. Gradients against the oracle either
    way."""
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        (q, k, v, dout, out), (dq, dk, dv, _) = _run(case, "float16", d)
    kernels = [getattr(r, "xattn_kernel", "") for r in caplog.records]
    sparse = case[1] is not None
    if CC == 90 and (d == 64 or case[0] is None):
        want = f"flash_bwd_sm90_f16_d{d}_flex" + ("_bm" if sparse else "")
        assert want in kernels, kernels
    else:
        assert any(n.startswith("flash_bwd_f16_") and n.endswith("_atomic") for n in kernels), \
            kernels
    opts = _dense(case, SQ, SK)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naive, strict=True):
        _assert_grad(f"{case} d={d}", name, g, r, n, q.dtype)


def test_floating_score_mod_args_are_refused_by_cupy_and_routed_by_auto(caplog):
    def alibi_args(score, b, h, q_idx, kv_idx, slopes):
        return score - slopes[h] * abs(q_idx - kv_idx)

    rng = np.random.default_rng(1)
    q, k, v, dout = _inputs(rng, "float16", 64, 64, 64)
    slopes = cp.asarray(SLOPES.astype(np.float32))
    out, lse = xattn.flex_attention(q, k, v, score_mod=alibi_args, score_mod_args=(slopes,),
                                    mask_mod=causal, return_lse=True)
    with pytest.raises(NotImplementedError, match=r"backend='cupy': score_mod_args \[0\].*"
                                                  r"dargs"):
        xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=alibi_args,
                                      score_mod_args=(slopes,), mask_mod=causal,
                                      backend="cupy")
    try:
        from numba import cuda  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - numba.cuda does not import on every machine
        pytest.skip(f"the SIMT route needs numba.cuda: {exc}")
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        dq, dk, dv, (dslopes,) = xattn.flex_attention_backward(
            dout, q, k, v, out, lse, score_mod=alibi_args, score_mod_args=(slopes,),
            mask_mod=causal)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("backend numba_cuda, not cupy" in m and "dargs" in m for m in msgs), msgs
    assert dslopes.shape == slopes.shape and np.isfinite(to_numpy(dslopes)).all()


def test_score_mod_without_derivative_raises_by_name():
    def squared(score, b, h, q_idx, kv_idx):
        return np.square(score)

    rng = np.random.default_rng(2)
    q, k, v, dout = _inputs(rng, "float16", 64, 40, 40)
    out, lse = xattn.flex_attention(q, k, v, score_mod=squared, return_lse=True)
    with pytest.raises(TypeError, match=r"cannot differentiate squared.*square\(\)"):
        xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=squared)


def test_fully_masked_rows_get_zero_gradients():
    def late(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx - 150  # rows < 150 see nothing

    rng = np.random.default_rng(3)
    q, k, v, dout = _inputs(rng, "float16", 64, 200, 200)
    out, lse = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=late, return_lse=True,
                                    backend="cupy")
    dq, dk, dv, _ = xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=alibi,
                                                  mask_mod=late, backend="cupy")
    assert not to_numpy(dq[..., :150, :]).any()
    assert not to_numpy(dk[..., 50:, :]).any() and not to_numpy(dv[..., 50:, :]).any()
    i, j = np.arange(200)[:, None], np.arange(200)[None]
    opts = {"bias": -SLOPES[:, None, None] * np.abs(i - j)[None], "mask": j <= i - 150}
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, naive, strict=True):
        _assert_grad("late", name, g, r, n, q.dtype)
