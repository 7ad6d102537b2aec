"""flex_attention on tensor cores (backend="cupy"): the user's functions inside mma.sync.

Every case against the float64 oracle (``reference_attention`` with the score_mod written as
a dense bias/softcap and the mask_mod as a dense mask; for fp16/bf16 the error may be at most
twice that of a naive computation in the same precision) and against the CPU flex kernel
(float32). ALiBi with captured slopes, a T5-style relative-position table in score_mod_args,
tanh softcap, a document mask with captured ids, causal and sliding-window mask_mods; float16
and bfloat16; D 64 and 128; lengths that are not tile multiples; GQA.
"""

from __future__ import annotations

import logging
import math
import zlib

import numpy as np
import pytest
from conftest import GPU_ONLY, cupy_array, t5_bucket

import xattn
from xattn.testing import assert_close, naive_attention, reference_attention, to_numpy

cp = pytest.importorskip("cupy")
pytestmark = GPU_ONLY

B, HQ, HKV, SQ, SK = 2, 4, 2, 300, 333
SLOPES = xattn.alibi_slopes(HQ, dtype=np.float64)
CAP = 5.0
NB = 16  # T5 buckets: 8 per direction


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def t5(score, b, h, q_idx, kv_idx, table):
    return score + table[h, t5_bucket(kv_idx - q_idx)]


def softcap(score, b, h, q_idx, kv_idx):
    return CAP * math.tanh(score / CAP)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def window(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= 70


def window_by_head(b, h, q_idx, kv_idx):  # per head: the block mask combines a GQA group's
    return abs(q_idx - kv_idx) <= 40 * (h + 1)


def _doc_ids(n, seed):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), 4, replace=False))
    ids = np.zeros(n, np.int32)
    for c in cuts:
        ids[c:] += 1
    return ids


DOC_HOST = np.stack([_doc_ids(max(SQ, SK), 1), _doc_ids(max(SQ, SK), 2)])


def _bucket_table(sq, sk):
    i, j = np.arange(sq)[:, None], np.arange(sk)[None]
    return np.vectorize(t5_bucket)(j - i)


def _dense(case, table=None, sq=SQ, sk=SK):
    """Oracle options of a case: bias (H, Sq, Sk) / softcap / mask (B, 1, Sq, Sk)."""
    i, j = np.arange(sq)[:, None], np.arange(sk)[None]
    opts = {}
    smod, mmod = case
    if smod == "alibi":
        opts["bias"] = -SLOPES[:, None, None] * np.abs(i - j)[None]
    elif smod == "t5":
        opts["bias"] = to_numpy(table)[:, _bucket_table(sq, sk)]
    elif smod == "softcap":
        opts["softcap"] = CAP
    if mmod == "causal":
        opts["mask"] = j <= i
    elif mmod == "window":
        opts["mask"] = np.abs(i - j) <= 70
    elif mmod == "window_by_head":
        opts["mask"] = np.abs(i - j)[None] <= 40 * (np.arange(HQ)[:, None, None] + 1)
    elif mmod == "documents":
        opts["mask"] = (DOC_HOST[:, :sq, None] == DOC_HOST[:, None, :sk])[:, None]
    return opts


def _functions(case):
    smod, mmod = case
    doc = cp.asarray(DOC_HOST)

    def documents(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]

    s = {"alibi": alibi, "t5": t5, "softcap": softcap, None: None}[smod]
    m = {"causal": causal, "window": window, "documents": documents,
         "window_by_head": window_by_head, None: None}[mmod]
    return s, m


CASES = [("alibi", "causal"), ("t5", "documents"), ("softcap", None), (None, "window"),
         ("alibi", "window"), (None, "causal"), ("t5", None), ("softcap", "window_by_head")]
# Every case in float16 at D = 64; the main ones also in bfloat16 and at D = 128 (each
# combination is one NVRTC compile of the forward kernel: a few seconds).
MATRIX = ([(c, 64, "float16") for c in CASES]
          + [(c, d, t) for c in CASES[:3] for d, t in ((128, "float16"), (64, "bfloat16"),
                                                       (128, "bfloat16"))])


def _inputs(rng, dtype, d, sq=SQ, sk=SK):
    q = cupy_array(rng.standard_normal((B, HQ, sq, d)), dtype)
    k = cupy_array(rng.standard_normal((B, HKV, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((B, HKV, sk, d)), dtype)
    return q, k, v


@pytest.mark.parametrize(("case", "d", "dtype"), MATRIX,
                         ids=[f"{c[0]}+{c[1]}-d{d}-{t}" for c, d, t in MATRIX])
def test_against_oracle_and_cpu(case, d, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((case, d)).encode()))
    q, k, v = _inputs(rng, dtype, d)
    table = cp.asarray(rng.standard_normal((HQ, NB)).astype(np.float32))
    smod, mmod = _functions(case)
    args = (table,) if case[0] == "t5" else ()
    out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod,
                                    score_mod_args=args, return_lse=True, backend="cupy")
    opts = _dense(case, table)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    naive = naive_attention(q, k, v, **opts)
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive, name=f"out {case}")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=5e-3, rtol=1e-3,
                 name=f"lse {case}")


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}+{c[1]}" for c in CASES])
def test_gpu_equals_cpu(case):
    """The CPU flex kernel (numba, float32 on the same 16-bit values) gives the same result."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a numba that does not import here
        pytest.skip(f"the CPU flex kernel needs numba: {exc}")
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, "float16", 64)
    table = cp.asarray(rng.standard_normal((HQ, NB)).astype(np.float32))
    smod, mmod = _functions(case)
    args = (table,) if case[0] == "t5" else ()
    out = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod, score_mod_args=args,
                               backend="cupy")
    naive = naive_attention(q, k, v, **_dense(case, table))
    qh, kh, vh = (to_numpy(x, np.float32) for x in (q, k, v))
    if case[1] == "documents":
        def cpu_mask(b, h, q_idx, kv_idx):
            return DOC_HOST[b, q_idx] == DOC_HOST[b, kv_idx]
    else:
        cpu_mask = mmod
    cpu = xattn.flex_attention(qh, kh, vh, score_mod=smod, mask_mod=cpu_mask,
                               score_mod_args=tuple(to_numpy(a, np.float32) for a in args),
                               backend="numba")
    assert_close(out, cpu, xp=cp, dtype=q.dtype, naive=naive, name=f"out vs CPU {case}")


def test_auto_picks_the_tensor_core_kernel(caplog):
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, "float16", 64, 130, 130)
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        out = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal)
    ran = [getattr(r, "xattn_backend", None) for r in caplog.records]
    assert "cupy" in ran and "numba_cuda" not in ran
    kernels = [getattr(r, "xattn_kernel", "") for r in caplog.records]
    assert any(name.endswith("_flex_bm") for name in kernels), kernels
    opts = _dense(("alibi", "causal"), sq=130, sk=130)
    ref, _, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive_attention(q, k, v, **opts))


def test_empty_rows_and_new_arg_values_reuse_the_kernel():
    from xattn._backends.cupy_ import flex_tc

    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, "float16", 64, 200, 200)

    def late(b, h, q_idx, kv_idx, table):
        return kv_idx <= q_idx - 150  # rows < 150 see nothing

    outs, n_modules = [], []
    for t in (cp.zeros((HQ, NB), cp.float32), cp.ones((HQ, NB), cp.float32)):
        out, lse = xattn.flex_attention(q, k, v, score_mod=t5, mask_mod=late,
                                        score_mod_args=(t,), return_lse=True, backend="cupy")
        n_modules.append(len(flex_tc._modules))
        outs.append(out)
        lse_h = to_numpy(lse)
        assert np.all(np.isneginf(lse_h[..., :150])) and np.all(np.isfinite(lse_h[..., 150:]))
        assert not to_numpy(out[..., :150, :]).any()
    assert n_modules[0] == n_modules[1]
    # A constant table shifts every score of a row equally: the same output.
    assert_close(outs[1], to_numpy(outs[0]), xp=cp, dtype=q.dtype)


def test_head_dim_padding_and_2d_inputs():
    rng = np.random.default_rng(5)
    q = cupy_array(rng.standard_normal((97, 80)), "float16")
    k = cupy_array(rng.standard_normal((120, 80)), "float16")
    v = cupy_array(rng.standard_normal((120, 48)), "float16")
    out = xattn.flex_attention(q, k, v, mask_mod=causal, backend="cupy")
    i, j = np.arange(97)[:, None], np.arange(120)[None]
    ref, _, _ = reference_attention(q, k, v, mask=j <= i)
    assert_close(out, ref, xp=cp, dtype=q.dtype,
                 naive=naive_attention(q, k, v, mask=j <= i))


def test_forced_cupy_refuses_float64():
    q = cp.ones((1, 2, 8, 16), cp.float64)
    with pytest.raises(NotImplementedError, match="backend='cupy': dtype float64"):
        xattn.flex_attention(q, q, q, backend="cupy")
