"""flex_attention on float32 CuPy arrays: the user's functions inside the 3xTF32 kernel.

``backend="cupy"`` (and ``auto``) runs float32 flex on ``flash_fwd_tf32.cu`` built with the
user's functions inlined and the derived block mask walked. Every case against the float64
oracle (``reference_attention`` with the score_mod written as a dense bias/softcap and the
mask_mod as a dense mask) under the float32 rule of the strict kernels (``atol = rtol = 2e-5``,
:func:`xattn.testing.tolerance`; ``lse`` the same); where scores are large (softcap) the naive
float32 rule applies instead (twice the error of textbook float32 attention), as for the dense
3xTF32 tests. ``allow_tf32=True`` (plain TF32) is held to the TF32 naive rule of
tests/gpu/test_gpu_flash_tf32.py: twice the error of exact attention on TF32-rounded inputs and
weights. The GPU result also equals the CPU flex kernel's (numba, float32) to the float32 rule.

Cases: ALiBi with captured slopes and with slopes in score_mod_args, a T5-style
relative-position table in score_mod_args, tanh softcap, a document mask with captured ids,
causal, sliding-window and per-head window mask_mods; GQA (4 query heads on 2 kv heads);
Sq != Sk, neither a multiple of the tiles; D 64 and 128; rows that see nothing; padded head
dims. Outputs are poisoned with NaN before each launch (tests/gpu/conftest.py).
"""

from __future__ import annotations

import logging
import math
import zlib

import numpy as np
import pytest
from conftest import GPU_ONLY, t5_bucket, tf32_naive

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


def alibi_args(score, b, h, q_idx, kv_idx, slopes):
    return score - slopes[h] * abs(q_idx - kv_idx)


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
    """Oracle options of a case: bias (H, Sq, Sk) / softcap / mask."""
    i, j = np.arange(sq)[:, None], np.arange(sk)[None]
    opts = {}
    smod, mmod = case
    if smod in ("alibi", "alibi_args"):
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

    s = {"alibi": alibi, "alibi_args": alibi_args, "t5": t5, "softcap": softcap,
         None: None}[smod]
    m = {"causal": causal, "window": window, "documents": documents,
         "window_by_head": window_by_head, None: None}[mmod]
    return s, m


def _args(case, rng):
    """The score_mod_args of a case (device arrays), and the T5 table (or None)."""
    if case[0] == "t5":
        table = cp.asarray(rng.standard_normal((HQ, NB)).astype(np.float32))
        return (table,), table
    if case[0] == "alibi_args":
        return (cp.asarray(SLOPES.astype(np.float32)),), None
    return (), None


CASES = [("alibi", "causal"), ("alibi_args", "causal"), ("t5", "documents"), ("softcap", None),
         (None, "window"), ("alibi", "window"), (None, "causal"), ("t5", None),
         ("softcap", "window_by_head"), (None, None)]
MATRIX = [(c, 64) for c in CASES] + [(c, 128) for c in CASES[:4]]


def _inputs(rng, d, sq=SQ, sk=SK, dv=None):
    q = cp.asarray(rng.standard_normal((B, HQ, sq, d)).astype(np.float32))
    k = cp.asarray(rng.standard_normal((B, HKV, sk, d)).astype(np.float32))
    v = cp.asarray(rng.standard_normal((B, HKV, sk, dv or d)).astype(np.float32))
    return q, k, v


# The dense 3xTF32 tests' bound too: max |error| <= REL * max |reference| (issue 11).
REL = 1e-5


def _check(case, out, lse, q, k, v, opts):
    """The float32 rules against the float64 oracle (the naive rule instead where softcap
    makes scores large)."""
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    naive = naive_attention(q, k, v, **opts) if case[0] == "softcap" else None
    assert_close(out, ref, xp=cp, dtype=np.float32, naive=naive, name=f"out {case}")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, name=f"lse {case}")
    if naive is None:
        a = to_numpy(out)
        err = np.abs(a - ref)
        worst = np.unravel_index(int(np.argmax(err)), err.shape)
        bound = REL * float(np.abs(ref).max())
        assert err[worst] <= bound, (
            f"out {case}: max error {err[worst]:.3g} at {tuple(map(int, worst))} exceeds "
            f"{REL:g} * max|out| = {bound:.3g}")


@pytest.mark.parametrize(("case", "d"), MATRIX, ids=[f"{c[0]}+{c[1]}-d{d}" for c, d in MATRIX])
def test_against_oracle(case, d):
    rng = np.random.default_rng(zlib.crc32(repr((case, d)).encode()))
    q, k, v = _inputs(rng, d)
    args, table = _args(case, rng)
    smod, mmod = _functions(case)
    out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod,
                                    score_mod_args=args, return_lse=True, backend="cupy")
    _check(case, out, lse, q, k, v, _dense(case, table))


@pytest.mark.parametrize("case", CASES[:5], ids=[f"{c[0]}+{c[1]}" for c in CASES[:5]])
def test_plain_tf32_when_allowed(case, caplog):
    """allow_tf32=True: the TF32 entry, within twice the error of exact attention on the
    TF32-rounded inputs and weights."""
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()) + 1)
    q, k, v = _inputs(rng, 64)
    args, table = _args(case, rng)
    smod, mmod = _functions(case)
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod,
                                        score_mod_args=args, return_lse=True, allow_tf32=True)
    kernels = [getattr(r, "xattn_kernel", "") for r in caplog.records]
    assert any(n.startswith("flash_fwd_tf32_") and "_flex" in n for n in kernels), kernels
    opts = _dense(case, table)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    naive, naive_lse = tf32_naive(q, k, v, **opts)
    assert_close(out, ref, xp=cp, dtype=np.float32, naive=naive, name=f"tf32 out {case}")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, naive=naive_lse,
                 name=f"tf32 lse {case}")


@pytest.mark.parametrize("case", CASES[:6], ids=[f"{c[0]}+{c[1]}" for c in CASES[:6]])
def test_gpu_equals_cpu(case):
    """The CPU flex kernel (numba, float32) gives the same result to float32 accuracy."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a numba that does not import here
        pytest.skip(f"the CPU flex kernel needs numba: {exc}")
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, 64)
    args, _ = _args(case, rng)
    smod, mmod = _functions(case)
    out = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod, score_mod_args=args,
                               backend="cupy")
    qh, kh, vh = (to_numpy(x, np.float32) for x in (q, k, v))
    if case[1] == "documents":
        def cpu_mask(b, h, q_idx, kv_idx):
            return DOC_HOST[b, q_idx] == DOC_HOST[b, kv_idx]
    else:
        cpu_mask = mmod
    cpu = xattn.flex_attention(qh, kh, vh, score_mod=smod, mask_mod=cpu_mask,
                               score_mod_args=tuple(to_numpy(a, np.float32) for a in args),
                               backend="numba")
    assert cpu.dtype == np.float32
    assert_close(out, cpu.astype(np.float64), xp=cp, dtype=np.float32,
                 name=f"out vs CPU {case}")


def test_auto_picks_the_3xtf32_kernel(caplog):
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, 64, 130, 130)
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        out = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal)
    ran = [getattr(r, "xattn_backend", None) for r in caplog.records]
    assert "cupy" in ran and "numba_cuda" not in ran
    kernels = [getattr(r, "xattn_kernel", "") for r in caplog.records]
    assert any(n.startswith("flash_fwd_tf32x3_") and n.endswith("_flex_bm") for n in kernels), \
        kernels
    opts = _dense(("alibi", "causal"), sq=130, sk=130)
    ref, _, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref, xp=cp, dtype=np.float32)


def test_empty_rows_and_new_arg_values_reuse_the_kernel():
    from xattn._backends.cupy_ import flex_tc

    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 64, 200, 200)

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
    assert_close(outs[1], to_numpy(outs[0]).astype(np.float64), xp=cp, dtype=np.float32)


def test_head_dim_padding_and_2d_inputs():
    rng = np.random.default_rng(5)
    q = cp.asarray(rng.standard_normal((97, 80)).astype(np.float32))
    k = cp.asarray(rng.standard_normal((120, 80)).astype(np.float32))
    v = cp.asarray(rng.standard_normal((120, 48)).astype(np.float32))
    out, lse = xattn.flex_attention(q, k, v, mask_mod=causal, return_lse=True, backend="cupy")
    i, j = np.arange(97)[:, None], np.arange(120)[None]
    ref, ref_lse, _ = reference_attention(q, k, v, mask=j <= i)
    assert_close(out, ref, xp=cp, dtype=np.float32)
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32)
