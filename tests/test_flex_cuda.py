"""The CUDA C translation of score_mod/mask_mod (xattn._flex_cuda), checked without a GPU.

The generated functions are compiled as host code by nvcc (``-x cu``, the same front end as
device code) into one shared library with a small harness per function, called through ctypes
on random inputs and compared with the Python function. Unsupported constructs raise
FlexCompileError naming them; the hooked forward kernel compiles for sm_80 and sm_90a without
spills. Without nvcc these tests skip, except under CI (``CI`` set), where nvcc must exist.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess

import numpy as np
import pytest
from conftest import NVCC, assert_no_spills, compile_module, needs_nvcc, t5_bucket

import xattn
from xattn import _flex_codegen as cg
from xattn import _flex_cuda as fc

# --- the functions: those of the CPU tests and docs, plus Python's corner cases -------------

SLOPES = xattn.alibi_slopes(4, dtype=np.float64)
CAP = 2.0
DOC = np.repeat(np.arange(6, dtype=np.int32), 25).reshape(1, 150)
DOC = np.concatenate([DOC, DOC[:, ::-1]])


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return CAP * math.tanh(score / CAP)


def np_softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * np.tanh(score / 20.0)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def odd_rows(b, h, q_idx, kv_idx):
    return q_idx % 2 == 1


def sink_and_band(b, h, q_idx, kv_idx):
    return kv_idx < 40 or abs(q_idx + 600 - kv_idx) <= 150 or kv_idx % 301 < 9


def window_by_head(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= 8 * (h + 1)


def documents(b, h, q_idx, kv_idx):
    return DOC[b, q_idx] == DOC[b, kv_idx]


def doc_args(b, h, q_idx, kv_idx, doc, table):
    return doc[b, q_idx] == doc[b, kv_idx] and not (q_idx < kv_idx)


def t5(score, b, h, q_idx, kv_idx, doc, table):
    return score + table[h, t5_bucket(kv_idx - q_idx)]


def python_ints(score, b, h, q_idx, kv_idx):
    d = q_idx - kv_idx
    x = d // 3 + d % 5 - (-d) // 7 + (-d) % 4
    x += 2 ** 3 + (d & 7) - (d >> 1)
    return score + x * 0.01 + min(d, 3, -2 * d) - max(-d, 1)


def big_ints(score, b, h, q_idx, kv_idx):
    # Products of positions need 64 bits; sums and differences fit 32 (the translation
    # chooses per expression): checked with positions up to 2**30.
    x = (q_idx * kv_idx) % 1000003 + (q_idx + kv_idx + 5) // 7 % 1000 - abs(kv_idx - q_idx) % 999
    return score + x * 1e-6 + min(q_idx - kv_idx, 0) * 1e-9 + (-q_idx) // 3 % 10


def big_mask(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) * 3 > q_idx or (q_idx + kv_idx) % 2 == 0


def python_floats(score, b, h, q_idx, kv_idx):
    # constants exact in float32 (the kernel computes in float32: 0.7 would round)
    y = score % 1.5 + score // 0.75 + float(q_idx) / 4
    if score > 0.5 and not kv_idx > q_idx:
        y = y * 2
    elif -1 < score <= 0.5:
        y = -y
    else:
        y = y + int(score * 3.5) + round(score * 2.5) + math.floor(score) + math.ceil(-score)
    if y > 40.0:
        return float("-inf")
    return np.where(y > 1.0, np.exp(-abs(y)), np.sqrt(1.0 + y * y)) + math.pi * 0


def args_dtypes(score, b, h, q_idx, kv_idx, t16, flags, i64, u8, cube):
    x = score + t16[h, kv_idx - q_idx] if flags[q_idx % 7] else score - 1
    return x + i64[kv_idx % 5] * 0.5 + u8[h] + cube[b, h % 2, q_idx % 3]


def numpy_funcs(score, b, h, q_idx, kv_idx):
    x = np.maximum(score, -1.0) + np.minimum(score, 1.5) + np.log1p(abs(score))
    return x + np.float32(0.25) * np.sign(score) + np.square(score) + math.atan2(score, 2.0)


def bool_mask(b, h, q_idx, kv_idx):
    diff = kv_idx - q_idx
    ok = 0 <= -diff < 40
    if h == 1:
        return ok and diff % 2 == 0
    return ok or bool(kv_idx == 0)


# Score functions whose derivative the translation refuses (np.square and atan2 have no rule).
NOT_DIFFERENTIABLE = {"numpy": r"a call to square\(\) with a differentiable argument"}

CASES = [
    ("alibi", alibi, None, ()),
    ("softcap", softcap, None, ()),
    ("np_softcap", np_softcap, None, ()),
    ("ints", python_ints, None, ()),
    ("big_ints", big_ints, big_mask, ()),
    ("floats", python_floats, None, ()),
    ("numpy", numpy_funcs, None, ()),
    ("causal", None, causal, ()),
    ("odd_rows", None, odd_rows, ()),
    ("sink_band", None, sink_and_band, ()),
    ("window_head", None, window_by_head, ()),
    ("documents", None, documents, ()),
    ("bool_mask", None, bool_mask, ()),
    ("t5_docs", t5, doc_args, "t5"),
    ("dtypes", args_dtypes, None, "dtypes"),
]


def _args(kind, rng):
    if kind == "t5":
        return (np.ascontiguousarray(DOC[:, ::-1]).astype(np.int64),
                rng.standard_normal((4, 16)).astype(np.float32))
    if kind == "dtypes":
        t16 = rng.standard_normal((4, 400)).astype(np.float16)
        cube = rng.standard_normal((3, 4, 6))[:2, ::2, ::-2]  # strided, negative stride
        return (t16, rng.random(7) > 0.5, rng.integers(-9, 9, 5).astype(np.int64),
                rng.integers(0, 200, 4).astype(np.uint8), cube)
    return ()


# --- the harness --------------------------------------------------------------------------


def _harness(n, mods, role):
    """One extern "C" function evaluating the translated function on arrays of inputs; the
    XattnUserArgs fields come from ``ptrs`` (pointers) and ``meta`` (shapes, strides)."""
    fields, m = [], 0
    for i, s in enumerate(mods.slots):
        fields.append(f"(const {s.ctype}*)ptrs[{i}]")
        for _ in range(2 * s.ndim):
            fields.append(f"meta[{m}]")
            m += 1
    init = ", ".join(fields) if fields else "0"
    if role == "score":
        call = "out[i] = xattn_user_score(u, score[i], b[i], h[i], q[i], kv[i]);"
    elif role == "dscore":
        # value and derivative interleaved
        call = ("out[2 * i] = xattn_user_score_d(u, score[i], b[i], h[i], q[i], kv[i], "
                "&out[2 * i + 1]);")
    else:
        call = "out[i] = xattn_user_mask(u, b[i], h[i], q[i], kv[i]) ? 1.f : 0.f;"
    return "\n".join([
        f'extern "C" void run_{n}_{role}(long long count, const float* score, const long long* b,',
        "        const long long* h, const long long* q, const long long* kv, float* out,",
        "        void** ptrs, const long long* meta) {",
        "    (void)ptrs; (void)meta;",
        f"    XattnUserArgs u{{{init}}};",
        f"    for (long long i = 0; i < count; ++i) {call}",
        "}",
    ])


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if NVCC is None:
        pytest.fail("nvcc not found under CI") if os.environ.get("CI") else pytest.skip(
            "nvcc not found")
    rng = np.random.default_rng(0)
    parts = ["#define XATTN_UFN static inline", "#define XATTN_UCONST", "#include <math.h>"]
    built = {}
    for n, (name, smod, mmod, kind) in enumerate(CASES):
        args = _args(kind, rng)
        sc = cg.capture(smod, "score_mod", 5 + len(args)) if smod else None
        takes = mmod is not None and mmod.__code__.co_argcount == 4 + len(args) and bool(args)
        mc = cg.capture(mmod, "mask_mod", 4 + len(args) if takes else 4) if mmod else None
        grad = smod is not None and name not in NOT_DIFFERENTIABLE
        mods = fc.translate(sc, mc, len(args), takes, args, grad=grad)
        parts += [f"namespace c{n} {{", mods.text]
        for role, fn in (("score", smod), ("mask", mmod), ("dscore", smod if grad else None)):
            if fn is not None:
                parts.append(_harness(n, mods, role))
                built[name, role] = (n, fn, mods, args)
        parts.append("}")
    tmp = tmp_path_factory.mktemp("flexcuda")
    src, lib = tmp / "harness.cu", tmp / "harness.so"
    src.write_text("\n".join(parts))
    proc = subprocess.run([NVCC, "-x", "cu", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
                           "-O1", "-o", str(lib), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return ctypes.CDLL(str(lib)), built


def _run(lib, n, role, mods, args, score, b, h, q, kv):
    count = len(score)
    out = np.empty(count * (2 if role == "dscore" else 1), np.float32)
    ptrs = (ctypes.c_void_p * max(1, len(mods.slots)))()
    meta = []
    for i, s in enumerate(mods.slots):
        a = args[s.source[1]]
        ptrs[i] = a.ctypes.data
        meta += list(a.shape) + [st // a.itemsize for st in a.strides]
    meta = np.array(meta or [0], np.int64)
    i64 = [np.ascontiguousarray(x, np.int64) for x in (b, h, q, kv)]
    f = getattr(lib, f"run_{n}_{role}")
    p = ctypes.c_void_p
    f.argtypes = [ctypes.c_longlong, p, p, p, p, p, p, p, p]
    f(count, score.ctypes.data, *(x.ctypes.data for x in i64), out.ctypes.data, ptrs,
      meta.ctypes.data)
    return out


@needs_nvcc
@pytest.mark.parametrize(("name", "role"), [(c[0], r) for c in CASES
                                            for r, f in (("score", c[1]), ("mask", c[2])) if f])
def test_translation_matches_python(library, name, role):
    lib, built = library
    n, fn, mods, args = built[name, role]
    rng = np.random.default_rng(n)
    count = 3000
    score = (rng.standard_normal(count) * 3).astype(np.float32)
    b = rng.integers(0, 2, count)
    h = rng.integers(0, 4, count)
    top = 2**30 if name.startswith("big") else 150
    q = rng.integers(0, top, count)
    kv = rng.integers(0, top, count)
    got = _run(lib, n, role, mods, args, score, b, h, q, kv)
    want = np.array([fn(*((s,) if role == "score" else ()), int(bb), int(hh), int(qq),
                        int(kk), *args)
                     for s, bb, hh, qq, kk in zip(score, b, h, q, kv, strict=True)],
                    dtype=np.float64)
    if role == "mask":
        np.testing.assert_array_equal(got, want.astype(np.float32))
        assert 0 < got.sum() < count or name in ("causal",)
    else:
        # float32 arithmetic against Python's float64: agreement to float32 rounding
        np.testing.assert_allclose(got, want, rtol=3e-6, atol=3e-5)


def _inputs(n, name, count):
    rng = np.random.default_rng(n)
    score = (rng.standard_normal(count) * 3).astype(np.float32)
    top = 2**30 if name.startswith("big") else 150
    return (score, rng.integers(0, 2, count), rng.integers(0, 4, count),
            rng.integers(0, top, count), rng.integers(0, top, count))


@needs_nvcc
@pytest.mark.parametrize("name", [c[0] for c in CASES
                                  if c[1] is not None and c[0] not in NOT_DIFFERENTIABLE])
def test_score_derivative_matches_finite_differences(library, name):
    """xattn_user_score_d (the backward kernel's): its value is xattn_user_score's, its
    derivative the Python function's slope, by central differences in float64 where the
    function is smooth (one-sided slopes agree: no kink, jump or branch change nearby)."""
    lib, built = library
    n, fn, mods, args = built[name, "dscore"]
    score, b, h, q, kv = _inputs(n, name, 2000)
    got = _run(lib, n, "dscore", mods, args, score, b, h, q, kv).reshape(-1, 2)
    val = _run(lib, n, "score", mods, args, score, b, h, q, kv)
    np.testing.assert_array_equal(got[:, 0], val)
    eps = 1e-4

    def f(s, bb, hh, qq, kk):
        return float(fn(s, int(bb), int(hh), int(qq), int(kk), *args))

    checked = 0
    for i, (s, bb, hh, qq, kk) in enumerate(zip(score.astype(np.float64), b, h, q, kv,
                                               strict=True)):
        f0, fp, fm = f(s, bb, hh, qq, kk), f(s + eps, bb, hh, qq, kk), f(s - eps, bb, hh, qq, kk)
        if not all(map(math.isfinite, (f0, fp, fm))):
            continue
        right, left = (fp - f0) / eps, (f0 - fm) / eps
        if abs(right - left) > 1e-3 * (1 + abs(right)):
            continue  # a kink or a jump within eps
        want = (fp - fm) / (2 * eps)
        assert abs(got[i, 1] - want) <= 1e-3 * (1 + abs(want)), (i, s, got[i], want)
        checked += 1
    assert checked > len(score) // 2


@pytest.mark.parametrize("name", sorted(NOT_DIFFERENTIABLE))
def test_score_without_derivative_is_refused_by_name(name):
    smod = next(c[1] for c in CASES if c[0] == name)
    cap = cg.capture(smod, "score_mod", 5)
    fc.translate(cap, None)  # the forward translates it
    with pytest.raises(cg.FlexCompileError, match=NOT_DIFFERENTIABLE[name]) as info:
        fc.translate(cap, None, grad=True)
    assert "score_mod: cannot differentiate" in str(info.value) and "line" in str(info.value)


def test_derivative_shares_the_numba_rules():
    """The derivative text comes from _flex_codegen's differentiator (one set of rules):
    a softcap's derivative is written from tanh's rule, 1 - tanh^2."""
    mods = fc.translate(cg.capture(softcap, "score_mod", 5), None, grad=True)
    body = mods.text.split("xattn_user_score_d(", 1)[1]
    assert "*dscore_out = " in body and "tanhf(" in body
    assert "((0x1.0000000000000p+0f) - (v__xa_t" in body
    assert mods.has_grad and not fc.translate(cg.capture(softcap, "score_mod", 5), None).has_grad


def test_generated_c_names_the_user_functions_and_arrays():
    def t(score, b, h, q_idx, kv_idx, table):
        return score + table[h, q_idx - kv_idx]

    table = np.zeros((4, 9), np.float32)
    mods = fc.translate(cg.capture(t, "score_mod", 6), cg.capture(causal, "mask_mod", 4), 1,
                        False, (table,))
    assert "XATTN_UFN float xattn_user_score(const XattnUserArgs& u" in mods.text
    assert "XATTN_UFN bool xattn_user_mask(" in mods.text
    assert "const float* a0;" in mods.text and "u.a0_s1" in mods.text
    pre = mods.kernel_prelude()
    assert "#define XATTN_USER_PARAMS , const float* xu_a0, long long xu_a0_n0" in pre
    # The key is the text: same functions, same key; a new captured value, a new key.
    again = fc.translate(cg.capture(t, "score_mod", 6), cg.capture(causal, "mask_mod", 4), 1,
                         False, (table + 1,))
    assert again.key == mods.key


def _bad_loop(score, b, h, q_idx, kv_idx):
    for i in range(3):
        score = score + i
    return score


def _bad_attr(score, b, h, q_idx, kv_idx):
    return score.real


def _bad_str(score, b, h, q_idx, kv_idx):
    return score + len("ab")


def _bad_and(score, b, h, q_idx, kv_idx):
    return (q_idx and kv_idx) + score


def _bad_slice(score, b, h, q_idx, kv_idx, t):
    return score + t[h, :]


def _bad_rank(score, b, h, q_idx, kv_idx, t):
    return score + t[h]


def _bad_tuple(score, b, h, q_idx, kv_idx):
    x, y = score, 1.0
    return x + y


def _bad_kw(score, b, h, q_idx, kv_idx):
    return np.exp(score, out=None)


def _bad_call(score, b, h, q_idx, kv_idx):
    return np.clip(score, -1.0, 1.0)


def _bad_param(score, b, h, q_idx, kv_idx):
    score = score * 2
    return score


@pytest.mark.parametrize(("fn", "match"), [
    (_bad_loop, r"_bad_loop .*loops \(`for`/`while`\)"),
    (_bad_attr, r"the attribute `.real`"),
    (_bad_str, r"call to len\(\)|the constant 'ab'"),
    (_bad_and, r"`and`/`or` on values that are not booleans"),
    (_bad_slice, r"slices"),
    (_bad_rank, r"has 2 dimension\(s\), indexed with 1"),
    (_bad_tuple, r"assignments to anything but one plain name"),
    (_bad_kw, r"keyword arguments"),
    (_bad_call, r"the call numpy.clip\(\) with 3 argument"),
    (_bad_param, r"assignment to the parameter 'score'"),
])
def test_unsupported_constructs_are_named(fn, match):
    n = fn.__code__.co_argcount
    args = (np.zeros((2, 3), np.float32),) if n == 6 else ()
    with pytest.raises(cg.FlexCompileError, match=match) as info:
        fc.translate(cg.capture(fn, "score_mod", n), None, len(args), False, args)
    assert "score_mod: cannot compile" in str(info.value) and "line" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_big_captured_host_array_is_refused():
    big = np.zeros(fc.MAX_EMBEDDED + 1, np.float32)

    def f(score, b, h, q_idx, kv_idx):
        return score + big[kv_idx]

    with pytest.raises(cg.FlexCompileError, match="pass a CuPy array in score_mod_args"):
        fc.translate(cg.capture(f, "score_mod", 5), None)


def test_backend_cupy_needs_cupy_arrays():
    q = np.ones((1, 8, 4), np.float16)
    with pytest.raises(TypeError, match="backend='cupy' needs CuPy arrays"):
        xattn.flex_attention(q, q, q, mask_mod=causal, backend="cupy")
    with pytest.raises(ValueError, match="'numba_cuda' or 'cupy'"):
        xattn.flex_attention(q, q, q, backend="tensor")
    lse = np.zeros((1, 8), np.float32)
    with pytest.raises(TypeError, match="backend='cupy' needs CuPy arrays"):
        xattn.flex_attention_backward(q, q, q, q, q, lse, mask_mod=causal, backend="cupy")


# --- the hooked kernel compiles, spill-free ----------------------------------------------

@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("d", [64, 128])
def test_hooked_kernel_compiles_without_spills(tmp_path, d):
    from xattn._backends.cupy_ import flex_tc

    table = np.zeros((4, 16), np.float32)
    doc = np.zeros((2, 64), np.int64)
    mods = fc.translate(cg.capture(t5, "score_mod", 7), cg.capture(doc_args, "mask_mod", 6),
                        2, True, (doc, table))
    alibi_mods = fc.translate(cg.capture(alibi, "score_mod", 5),
                              cg.capture(causal, "mask_mod", 4))
    report = {}
    for m, sparse in ((mods, True), (alibi_mods, True), (alibi_mods, False)):
        inst, _ = flex_tc.instance("f16", d, True, sparse)
        report.update(compile_module(tmp_path, flex_tc.kernel_text(m), inst))
    names = {k[0] for k in report}
    assert any(n.endswith("_flex_bm") for n in names) and "xattn_flex_block_states" in names
    assert_no_spills(report)


# --- the derived block mask's lists (the launcher's host logic, with NumPy for CuPy) ------

def test_block_lists_combine_heads_and_batches():
    import types

    from xattn._backends.cupy_ import flex_tc

    fake = types.SimpleNamespace(
        empty=np.empty, zeros=np.zeros, cumsum=np.cumsum, nonzero=np.nonzero, int8=np.int8,
        int32=np.int32, cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)))
    sq, sk, bs = 300, 333, flex_tc.BLOCK

    def fn(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= 60 * (h + 1) and (b == 0 or kv_idx <= q_idx)

    i, j = np.arange(sq)[:, None], np.arange(sk)[None]
    dense = np.array([[(np.abs(i - j) <= 60 * (h + 1)) & ((b == 0) | (j <= i))
                       for h in range(3)] for b in range(2)])

    def states_fn(grid, block, args):
        states = args[0]
        nkb, nqb, nz = grid
        nh = int(args[5])
        for z in range(nz):
            b, h = divmod(z, nh)
            for qb in range(nqb):
                for kb in range(nkb):
                    t = dense[b, h, qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
                    states[z, qb, kb] = 2 if t.all() else (1 if t.any() else 0)

    cap = cg.capture(fn, "mask_mod", 4)
    assert {"b", "h"} <= cap.reads
    mods = fc.translate(None, cap)
    frow, fcol, prow, pcol = flex_tc.block_lists(
        fake, mods, states_fn, (), mmod=cap, cacheable=False, batch=2, hq=3, sq=sq, sk=sk)
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    blocks = dense.reshape(6, sq, sk)
    for qb in range(nqb):
        full = set(fcol[frow[qb]:frow[qb + 1]].tolist())
        part = set(pcol[prow[qb]:prow[qb + 1]].tolist())
        for kb in range(nkb):
            t = blocks[:, qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
            want = "full" if t.all() else ("partial" if t.any() else "empty")
            got = "full" if kb in full else ("partial" if kb in part else "empty")
            assert got == want, (qb, kb)
        assert not full & part


def test_csc_lists_transpose_the_derived_mask():
    """The backward's CSC lists (flex_tc_bwd.csc_lists, NumPy for CuPy): per key block the
    visible query blocks in order, -1 for full blocks, the partial CSR entry otherwise."""
    from xattn._backends.cupy_ import flex_tc_bwd

    rng = np.random.default_rng(3)
    for nqb, nkb in ((5, 7), (1, 1), (3, 2)):
        state = rng.integers(0, 3, (nqb, nkb))  # 0 empty, 1 partial, 2 full
        lists = []
        for want in (2, 1):
            sel = state == want
            ptr = np.zeros(nqb + 1, np.int32)
            ptr[1:] = np.cumsum(sel.sum(axis=1))
            cols = np.nonzero(sel)[1].astype(np.int32)
            lists += [ptr, cols if cols.size else np.zeros(1, np.int32)]
        frow, fcol, prow, pcol = lists
        col_ptr, row_idx, tile_idx = flex_tc_bwd.csc_lists(np, frow, fcol, prow, pcol, nqb,
                                                            nkb)
        for kb in range(nkb):
            rows = row_idx[col_ptr[kb]:col_ptr[kb + 1]]
            tiles = tile_idx[col_ptr[kb]:col_ptr[kb + 1]]
            assert rows.tolist() == np.nonzero(state[:, kb])[0].tolist()
            for r, t in zip(rows, tiles, strict=True):
                if state[r, kb] == 2:
                    assert t == -1
                else:
                    assert prow[r] <= t < prow[r + 1] and pcol[t] == kb


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("d", [64, 128])
def test_hooked_backward_compiles_without_spills(tmp_path, d):
    """flash_bwd.cu with the user's functions and the score derivative (XATTN_USER_MODS):
    sm_80 and sm_90a, no spills, for a T5 table + document mask, ALiBi + causal (block-
    sparse) and a softcap (dense)."""
    from xattn._backends.cupy_ import flex_tc_bwd

    table = np.zeros((4, 16), np.float32)
    doc = np.zeros((2, 64), np.int64)
    cases = [
        (fc.translate(cg.capture(t5, "score_mod", 7), cg.capture(doc_args, "mask_mod", 6), 2,
                      True, (doc, table), grad=True), True),
        (fc.translate(cg.capture(alibi, "score_mod", 5), cg.capture(causal, "mask_mod", 4),
                      grad=True), True),
        (fc.translate(cg.capture(softcap, "score_mod", 5), None, grad=True), False),
    ]
    report = {}
    for m, sparse in cases:
        inst, _ = flex_tc_bwd.instance("f16", d, True, sparse)
        report.update(compile_module(tmp_path, flex_tc_bwd.kernel_text(m), inst))
    names = {k[0] for k in report}
    assert any(n.endswith("_flex_bm_atomic") for n in names)
    assert any(n.endswith("_flex_atomic") for n in names)
    assert_no_spills(report)


def test_csc_cache_hits_by_identity_and_stays_bounded_across_threads():
    """flex_tc_bwd's CSC cache (NumPy for CuPy): a hit is the same lists for the same frow
    object, and threads inserting at once keep it within _MAX_CSC (its lock)."""
    import threading

    from xattn._backends.cupy_ import flex_tc_bwd

    def lists():
        frow = np.array([0, 1], np.int32)
        return frow, np.zeros(1, np.int32), np.zeros(2, np.int32), np.zeros(1, np.int32)

    frow, fcol, prow, pcol = lists()
    first = flex_tc_bwd._csc_cached(np, frow, fcol, prow, pcol, 1, 1)
    assert flex_tc_bwd._csc_cached(np, frow, fcol, prow, pcol, 1, 1) is first
    errors = []

    def worker():
        try:
            for _ in range(50):
                flex_tc_bwd._csc_cached(np, *lists(), 1, 1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(flex_tc_bwd._csc) <= flex_tc_bwd._MAX_CSC


def test_derived_mask_args_follow_the_block_mask_struct():
    """The flex launchers' block-mask arguments have XattnBlockMask's fields (the dense
    launch's null arguments are the built-in ones): BLOCK-square blocks, one bit word per
    32 keys of a block, no element rule."""
    from xattn._backends.cupy_ import flex_tc
    from xattn._backends.cupy_.blockmask import null_kernel_args

    lists = tuple(np.zeros(2, np.int32) for _ in range(4))
    got = flex_tc.derived_mask_args(*lists)
    assert len(got) == len(null_kernel_args())
    assert all(a is b for a, b in zip(got[:4], lists, strict=True))
    assert [int(x) for x in got[4:]] == [0, flex_tc.BLOCK, flex_tc.BLOCK,
                                         flex_tc.BLOCK // 32, 0, 0, -1, -1]


def test_backward_pads_head_dims_as_the_forward_admits_them():
    """flex_tc_bwd takes flash_bwd's padded head dims: every head dim the forward's table
    admits (flex_tc.reason) has a backward kernel, the block-sparse one from D = 64."""
    import types

    from xattn._backends.cupy_ import flash_bwd, flex_tc

    for d in range(1, max(flex_tc.HEAD_DIMS) + 2):
        prob = types.SimpleNamespace(d=d, dv=1)
        dense = flash_bwd._common_dim(prob)
        assert dense == flex_tc.padded_dim(d)
        if dense is not None:
            assert flash_bwd._sparse_dim(prob) == max(dense, 64)
            assert flash_bwd.block_mask_configs(dense, (flex_tc.BLOCK, flex_tc.BLOCK))[0]


def test_source_reason_names_a_function_without_source():
    """The one check both tensor-core directions make before translating (flex_tc's
    source_reason): None for readable sources, the function's name otherwise."""
    from xattn._backends.cupy_ import flex_tc

    cap = cg.capture(causal, "mask_mod", 4)
    assert flex_tc.source_reason(None, cap) is None
    ns = {}
    exec("def no_file(b, h, q_idx, kv_idx):\n    return kv_idx <= q_idx\n", ns)  # noqa: S102
    if cg.has_source(ns["no_file"]):
        pytest.skip("this Python reads the source of exec'd functions")
    why = flex_tc.source_reason(cap, cg.capture(ns["no_file"], "mask_mod", 4))
    assert "no_file" in why and "not available" in why


@pytest.mark.slow
@needs_nvcc
def test_hooked_sm90_backward_compiles_without_spills(tmp_path):
    """flash_bwd_sm90.cu with the user's functions (the Hopper backward that
    flex_attention_backward takes on compute capability 9.0): sm_90a, no spills, named
    ``_flex`` / ``_flex_bm``; a score_mod at padded head dim 128 has no entry (mma.sync)."""
    from xattn._backends.cupy_ import flex_tc_bwd

    table = np.zeros((4, 16), np.float32)
    doc = np.zeros((2, 64), np.int64)
    cases = [
        (fc.translate(cg.capture(t5, "score_mod", 7), cg.capture(doc_args, "mask_mod", 6), 2,
                      True, (doc, table), grad=True), 64, True, True),
        (fc.translate(cg.capture(alibi, "score_mod", 5), cg.capture(causal, "mask_mod", 4),
                      grad=True), 64, True, True),
        (fc.translate(cg.capture(softcap, "score_mod", 5), None, grad=True), 64, True, False),
        (fc.translate(None, cg.capture(causal, "mask_mod", 4), grad=True), 128, False, True),
    ]
    report = {}
    for m, d, mods, sparse in cases:
        inst = flex_tc_bwd.instance_sm90("f16", d, mods, sparse)
        assert inst.arch == "sm_90a" and inst.name.endswith("_flex_bm" if sparse else "_flex")
        report.update(compile_module(tmp_path, flex_tc_bwd.kernel_text(m, inst.source), inst,
                                     archs=[("compute_90a", "sm_90a")]))
    assert {n for n, _ in report} >= {"flash_bwd_sm90_f16_d64_flex_bm",
                                       "flash_bwd_sm90_f16_d64_flex",
                                       "flash_bwd_sm90_f16_d128_flex_bm"}
    assert_no_spills(report)
    assert flex_tc_bwd.instance_sm90("f16", 128, True, True) is None
    assert flex_tc_bwd.kernel_for("f16", 128, True, True, 90)[0].name.endswith(
        "_flex_bm_atomic")
    assert flex_tc_bwd.kernel_for("f16", 64, True, True, 80)[0].source == "flash_bwd.cu"
    inst, bn, ncol, threads, _ = flex_tc_bwd.kernel_for("bf16", 64, True, True, 90)
    assert (inst.source, bn, ncol, threads) == ("flash_bwd_sm90.cu", 128, 1, 256)
