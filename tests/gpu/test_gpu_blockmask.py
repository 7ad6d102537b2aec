"""Block-sparse attention in the CuPy kernels (``block_mask``) and ``Dv != D``.

CPU part (always runs): the host-side device arrays of :mod:`xattn._backends.cupy_.blockmask`
(CSR/CSC, packed tiles, rule codes), and ``xattn/kernels/blockmask.cuh`` itself compiled for the
host (its CSR/CSC walks and element rule, checked against the BlockMask), plus the block-size
rule of ``supports()``.

GPU part (marked ``gpu``): every mask kind x dtype x head dim against the float64 oracle
(``reference_attention`` with ``bm.to_dense()``), options combined, empty rows, poisoned
outputs, dispatch. Failures name the case, the max error and where it occurs (batch, head,
query, key block row/column), so that a broken rule or walk shows which.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import cupy_array

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn._backends.cupy_ import blockmask as hb
from xattn._backends.cupy_ import flash as ck
from xattn.testing import assert_close, naive_attention, reference_attention

KERNELS = Path(xattn.__file__).resolve().parent / "kernels"


def _masks(seed=0):
    """name -> BlockMask: every rule kind, lengths not multiples of the blocks."""
    rng = np.random.default_rng(seed)
    dense = rng.random((150, 270)) < 0.4
    dense[:, 64:96] = True  # full blocks among partial ones
    dense[40:70, :] = False  # empty rows inside partial blocks
    dense[:, 200:] = False  # invisible blocks
    return {
        "causal": xattn.BlockMask.causal(200, 300, block_size=64),
        "window": xattn.BlockMask.sliding_window(300, window=(70, 30), block_size=64),
        "causal_window": xattn.BlockMask.sliding_window(300, window=(100, None), causal=True,
                                                        block_size=(64, 32)),
        "longformer": xattn.BlockMask.longformer(333, window=64, global_tokens=[0, 100, 332],
                                                 block_size=64),
        "bigbird": xattn.BlockMask.bigbird(400, block_size=64, random_blocks=2, seed=3),
        "documents": xattn.BlockMask.documents([0, 50, 180, 310], causal=True, block_size=64),
        "from_dense": xattn.BlockMask.from_dense(dense, block_size=(64, 32)),
        "and": (xattn.BlockMask.causal(260, block_size=64)
                & xattn.BlockMask.sliding_window(260, window=(90, 90), block_size=64)),
        "or": (xattn.BlockMask.documents([0, 100, 260], block_size=64)
               | xattn.BlockMask.sliding_window(260, window=(20, 20), block_size=64)),
    }


MASKS = _masks()


# --- CPU: host-side arrays --------------------------------------------------------------------


def _grid(bm):
    """Block status (0 none, 1 full, 2 partial) and partial index (else -1) from the CSR."""
    nq, nk = bm.n_blocks
    status = np.zeros((nq, nk), np.int8)
    pidx = np.full((nq, nk), -1, np.int64)
    for i in range(nq):
        for c in bm.full_col_idx[bm.full_row_ptr[i]:bm.full_row_ptr[i + 1]]:
            status[i, c] = 1
        for p in range(bm.partial_row_ptr[i], bm.partial_row_ptr[i + 1]):
            status[i, bm.partial_col_idx[p]] = 2
            pidx[i, bm.partial_col_idx[p]] = p
    return status, pidx


@pytest.mark.parametrize("name", sorted(MASKS))
def test_csc_is_the_transpose(name):
    bm = MASKS[name]
    status, pidx = _grid(bm)
    col_ptr, row_idx, tile_idx = hb.csc_arrays(bm)
    nq, nk = bm.n_blocks
    assert col_ptr.dtype == row_idx.dtype == tile_idx.dtype == np.int32
    assert col_ptr.shape == (nk + 1,) and col_ptr[0] == 0 and col_ptr[-1] == bm.nnz_blocks
    got_status = np.zeros_like(status)
    got_pidx = np.full_like(pidx, -1)
    for j in range(nk):
        rows = row_idx[col_ptr[j]:col_ptr[j + 1]]
        assert (np.diff(rows) > 0).all(), f"column {j}: rows not strictly increasing"
        for r, t in zip(rows, tile_idx[col_ptr[j]:col_ptr[j + 1]], strict=True):
            got_status[r, j] = 1 if t < 0 else 2
            got_pidx[r, j] = t
    np.testing.assert_array_equal(got_status, status)
    np.testing.assert_array_equal(got_pidx, pidx)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_packed_tiles_unpack_to_partial_tiles(name):
    bm = MASKS[name]
    tiles = np.asarray(bm.partial_tiles())
    packed = hb.packed_tiles(bm)
    words = -(-bm.block_size[1] // 32)
    assert packed.dtype == np.uint32 and packed.shape == (*tiles.shape[:2], words)
    bits = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    np.testing.assert_array_equal(bits[..., :tiles.shape[2]].astype(bool), tiles)
    assert not bits[..., tiles.shape[2]:].any()


def test_packed_tiles_pad_odd_block_width():
    m = np.random.default_rng(1).random((50, 70)) < 0.5
    bm = xattn.BlockMask.from_dense(m, block_size=(16, 40))
    packed = hb.packed_tiles(bm)
    assert packed.shape == (bm.num_partial_blocks, 16, 2)
    bits = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little").astype(bool)
    np.testing.assert_array_equal(bits[..., :40], bm.partial_tiles())
    assert not bits[..., 40:].any()


@pytest.mark.parametrize("name,rule", [("causal", hb.KERNEL_RULE_CAUSAL),
                                       ("window", hb.KERNEL_RULE_WINDOW),
                                       ("causal_window", hb.KERNEL_RULE_WINDOW),
                                       ("bigbird", hb.KERNEL_RULE_NONE),
                                       ("longformer", hb.KERNEL_RULE_TILES),
                                       ("documents", hb.KERNEL_RULE_TILES),
                                       ("from_dense", hb.KERNEL_RULE_TILES),
                                       ("and", hb.KERNEL_RULE_TILES),
                                       ("or", hb.KERNEL_RULE_TILES)])
def test_kernel_rule_codes(name, rule):
    assert hb.kernel_rule(MASKS[name])[0] == rule


# --- CPU: blockmask.cuh compiled for the host ---------------------------------------------------

_HOST_HARNESS = r"""
// Host build of xattn/kernels/blockmask.cuh for tests/test_gpu_blockmask.py: the CSR / CSC
// walks and the element rule compiled by the host C++ compiler (the device qualifiers and
// __ldg shimmed), called through ctypes and checked against the BlockMask on the CPU.
#include <algorithm>
using std::max;
using std::min;
#define __device__
#define __forceinline__ inline
template <class T>
static inline T __ldg(const T* p) {
    return *p;
}
#include "blockmask.cuh"
using namespace xattn;

static XattnBlockMask make(const int* frow, const int* fcol, const int* prow, const int* pcol,
                           const unsigned* tiles, const int* meta) {
    // meta: bq, bk, words, rule, off, left, right
    return XattnBlockMask{frow,    fcol,    prow,    pcol,    tiles,   meta[0], meta[1],
                          meta[2], meta[3], meta[4], meta[5], meta[6]};
}

extern "C" int csr_walk(const int* frow, const int* fcol, const int* prow, const int* pcol,
                        const int* meta, int row, int bn, int kt0, int kt1, int* out_kt,
                        int* out_p, int cap) {
    XattnBlockMask bm = make(frow, fcol, prow, pcol, nullptr, meta);
    XattnCsrWalk w;
    xattn_csr_begin(bm, row, bn, kt0, kt1, w);
    int n = 0, kt, p;
    for (;;) {
        xattn_csr_next(bm, w, kt, p);
        if (kt < 0 || n >= cap) break;
        out_kt[n] = kt;
        out_p[n] = p;
        ++n;
    }
    return n;
}

extern "C" int csc_walk(const int* col_ptr, const int* row_idx, const int* tile_idx,
                        const int* meta, int col, int rows, int qt0, int qt1, int* out_qt,
                        int* out_p, int cap) {
    XattnBlockMask bm = make(nullptr, nullptr, nullptr, nullptr, nullptr, meta);
    XattnCscMask cm{col_ptr, row_idx, tile_idx};
    XattnCscWalk w;
    xattn_csc_begin(cm, bm, col, rows, qt0, qt1, w);
    int n = 0, qt, p;
    for (;;) {
        xattn_csc_next(cm, w, qt, p);
        if (qt < 0 || n >= cap) break;
        out_qt[n] = qt;
        out_p[n] = p;
        ++n;
    }
    return n;
}

// The element rule of partial block p (top-left pair (qb, kc)) over [q0, q1) x [k0, k1).
extern "C" void bm_visible(const unsigned* tiles, const int* meta, int p, int qb, int kc,
                           int q0, int q1, int k0, int k1, unsigned char* out) {
    XattnBlockMask bm = make(nullptr, nullptr, nullptr, nullptr, tiles, meta);
    for (int i = q0; i < q1; ++i)
        for (int j = k0; j < k1; ++j)
            out[(i - q0) * (k1 - k0) + (j - k0)] = xattn_bm_visible(bm, p, qb, kc, i, j);
}
"""


@pytest.fixture(scope="module")
def cuh(tmp_path_factory):
    """blockmask.cuh built into a shared library by the host compiler (skipped without one)."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("cuh")
    src = d / "harness.cpp"
    src.write_text(_HOST_HARNESS)
    lib = d / "harness.so"
    res = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror",
                          f"-I{KERNELS}", str(src), "-o", str(lib)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return ctypes.CDLL(str(lib))


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


def _meta(bm):
    rule, off, left, right = hb.kernel_rule(bm)
    bq, bk = bm.block_size
    return _i32([bq, bk, -(-bk // 32), rule, off, left, right])


def _csr_walk(lib, bm, row, bn, kt0, kt1):
    arrays = [_i32(a) for a in (bm.full_row_ptr, bm.full_col_idx, bm.partial_row_ptr,
                                bm.partial_col_idx)]
    arrays = [a if a.size else np.zeros(1, np.int32) for a in arrays]
    cap = 4096
    kt, p = np.zeros(cap, np.int32), np.zeros(cap, np.int32)
    meta = _meta(bm)
    n = lib.csr_walk(*map(_ptr, arrays), _ptr(meta), row, bn, kt0, kt1, _ptr(kt), _ptr(p), cap)
    return list(zip(kt[:n].tolist(), p[:n].tolist(), strict=True))


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("bn", [32, 64])
def test_cuh_csr_walk(cuh, name, bn):
    """The walk visits exactly the key tiles of bn keys inside visible blocks, clipped to
    [kt0, kt1), full blocks with p = -1 and partial ones with their CSR index."""
    bm = MASKS[name]
    bq, bk = bm.block_size
    if bk % bn:
        pytest.skip("bn must divide bk")
    status, pidx = _grid(bm)
    per = bk // bn
    ntiles = bm.n_blocks[1] * per
    for row in range(bm.n_blocks[0]):
        for kt0, kt1 in [(0, ntiles), (1, ntiles - 1), (per + 1, 3 * per), (2, 2), (0, 1)]:
            want = sorted(
                (kt, -1 if status[row, kt // per] == 1 else int(pidx[row, kt // per]))
                for kt in range(max(kt0, 0), min(kt1, ntiles)) if status[row, kt // per]
            )
            got = _csr_walk(cuh, bm, row, bn, kt0, kt1)
            assert sorted(got) == want, f"{name} row {row} kt [{kt0}, {kt1}): got {got}"
            assert len(set(got)) == len(got), f"{name} row {row}: a tile visited twice"


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("rows", [32, 64])
def test_cuh_csc_walk(cuh, name, rows):
    bm = MASKS[name]
    bq, _ = bm.block_size
    if bq % rows:
        pytest.skip("rows must divide bq")
    status, pidx = _grid(bm)
    col_ptr, row_idx, tile_idx = (a if a.size else np.zeros(1, np.int32)
                                  for a in hb.csc_arrays(bm))
    per = bq // rows
    ntiles = bm.n_blocks[0] * per
    meta = _meta(bm)
    cap = 4096
    qt, p = np.zeros(cap, np.int32), np.zeros(cap, np.int32)
    for col in range(bm.n_blocks[1]):
        for qt0, qt1 in [(0, ntiles), (1, ntiles - 2), (per, per + 1)]:
            n = cuh.csc_walk(_ptr(col_ptr), _ptr(row_idx), _ptr(tile_idx), _ptr(meta), col,
                             rows, qt0, qt1, _ptr(qt), _ptr(p), cap)
            got = list(zip(qt[:n].tolist(), p[:n].tolist(), strict=True))
            want = [(t, -1 if status[t // per, col] == 1 else int(pidx[t // per, col]))
                    for t in range(max(qt0, 0), min(qt1, ntiles)) if status[t // per, col]]
            assert got == want, f"{name} col {col} qt [{qt0}, {qt1}): got {got}"


@pytest.mark.parametrize("name", sorted(MASKS))
def test_cuh_element_rule_matches_to_dense(cuh, name):
    """Full blocks all visible, partial blocks through xattn_bm_visible: the mask's dense form
    (rows/columns past the lengths are not compared: the kernels mask them anyway)."""
    bm = MASKS[name]
    bq, bk = bm.block_size
    dense = bm.to_dense()
    status, pidx = _grid(bm)
    tiles = hb.packed_tiles(bm) if hb.kernel_rule(bm)[0] == hb.KERNEL_RULE_TILES else \
        np.zeros((1, 1, 1), np.uint32)
    meta = _meta(bm)
    got = np.zeros(dense.shape, bool)
    for i, j in zip(*np.nonzero(status), strict=True):
        q0, k0 = int(i) * bq, int(j) * bk
        q1, k1 = min(q0 + bq, bm.q_len), min(k0 + bk, bm.k_len)
        if status[i, j] == 1:
            got[q0:q1, k0:k1] = True
            continue
        out = np.zeros((q1 - q0, k1 - k0), np.uint8)
        cuh.bm_visible(_ptr(tiles), _ptr(meta), int(pidx[i, j]), q0, k0, q0, q1, k0, k1,
                       _ptr(out))
        got[q0:q1, k0:k1] = out.astype(bool)
    bad = np.argwhere(got != dense)
    assert bad.size == 0, f"{name}: {len(bad)} pairs differ, first (q, k) {bad[:5].tolist()}"


# --- CPU: which block sizes the kernels take ----------------------------------------------------


@pytest.mark.parametrize("d,block,mods,fp32,want", [
    (64, (128, 128), False, False, (4, 2, 64)),
    (64, (64, 64), False, False, (4, 1, 64)),
    (64, (32, 32), False, False, (2, 1, 32)),
    (128, (128, 128), False, False, (4, 2, 32)),
    (128, (128, 128), True, False, (4, 1, 64)),
    (128, (64, 32), False, False, (2, 1, 32)),
    (256, (64, 64), False, False, (4, 1, 32)),
    (256, (32, 32), False, False, None),
    (64, (48, 64), False, False, None),
    (64, (64, 48), False, False, None),
    (64, (96, 32), True, True, ("simt", 32, 32)),
    (64, (16, 32), False, True, None),
])
def test_block_mask_config(d, block, mods, fp32, want):
    assert ck.block_mask_config(d, block, mods, fp32) == want


def test_block_mask_reason_names_the_block_size():
    q = np.zeros((2, 100, 64), np.float16)
    bm = xattn.BlockMask.causal(100, block_size=48)
    reason = ck._block_mask_reason(validate_attention(q, q, q, block_mask=bm))
    assert "block size (48, 48)" in reason
    bm64 = xattn.BlockMask.causal(100, block_size=64)
    assert ck._block_mask_reason(validate_attention(q, q, q, block_mask=bm64)) is None


# --- GPU ----------------------------------------------------------------------------------------

try:
    import cupy as cp

    _NGPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no CuPy / driver / device: the GPU tests skip
    cp, _NGPU = None, 0

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_NGPU == 0, reason="no CuPy or no CUDA device")


def _qkv(rng, dtype, sq, sk, d, *, dv=None, b=2, hq=4, hkv=2, amp=1.0):
    q = cupy_array(amp * rng.standard_normal((b, hq, sq, d)), dtype)
    k = cupy_array(amp * rng.standard_normal((b, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((b, hkv, sk, d if dv is None else dv)), dtype)
    return q, k, v


def _where(err, bm, shape):
    """Describe the worst element: (batch, head, query, column) and its mask block."""
    idx = np.unravel_index(int(np.nanargmax(err)), shape)
    where = f"index {tuple(int(i) for i in idx)}"
    if bm is not None and len(idx) >= 2:
        where += f" (query block row {int(idx[-2]) // bm.block_size[0]})"
    return where


def _compare(case, got, ref, *, bm, dtype, naive=None, atol=None, rtol=None, name="out"):
    try:
        assert_close(got, ref, xp=cp, dtype=dtype, naive=naive, atol=atol, rtol=rtol, name=name)
    except AssertionError as exc:
        a = cp.asnumpy(got).astype(np.float64)
        r = np.asarray(ref, dtype=np.float64)
        err = np.where(np.isfinite(r), np.abs(a - r), np.where(np.isnan(a), np.inf, 0.0))
        nan_rows = np.argwhere(np.isnan(a))[:3].tolist()
        raise AssertionError(
            f"[{case}] {exc}; max |err| {float(np.max(err)):.3g} at {_where(err, bm, a.shape)}; "
            f"first NaN entries {nan_rows}"
        ) from None


def _run(case, q, k, v, bm, *, fp32=False, **opts):
    """Kernel (backend='cupy') against the float64 oracle with the mask's dense form."""
    out, lse = xattn.flash_attention(q, k, v, block_mask=bm, return_lse=True, backend="cupy",
                                     **opts)
    dense = cp.asarray(bm.to_dense())
    ref_opts = dict(opts)
    user_mask = ref_opts.pop("mask", None)
    ref_opts["mask"] = dense if user_mask is None else dense & user_mask
    ref, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
    if fp32:
        _compare(case, out, ref, bm=bm, dtype=np.float32, atol=1e-4, rtol=1e-4)
    else:
        naive = naive_attention(q, k, v, **ref_opts)
        _compare(case, out, ref, bm=bm, dtype=q.dtype, naive=naive)
    _compare(case, lse, ref_lse, bm=bm, dtype=np.float32, atol=2e-3, rtol=1e-3, name="lse")
    return out, lse


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_block_mask_kinds(dtype, d, name):
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), d])
    q, k, v = _qkv(rng, dtype, bm.q_len, bm.k_len, d)
    _run(f"{name} {dtype} D={d}", q, k, v, bm, fp32=dtype == "float32")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [32, 128, (64, 32), (128, 64)])
def test_block_sizes_and_configs(dtype, d, block):
    """Block sizes that select each tile configuration (see BM_CONFIGS)."""
    rng = np.random.default_rng([d, 7])
    dense = rng.random((333, 290)) < 0.3
    dense[:, 100:200] = True
    bm = xattn.BlockMask.from_dense(dense, block_size=block)
    q, k, v = _qkv(rng, dtype, 333, 290, d)
    _run(f"from_dense block {block} {dtype} D={d}", q, k, v, bm, fp32=dtype == "float32")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("name", ["window", "longformer", "from_dense", "documents"])
@pytest.mark.parametrize("option", ["causal", "window", "bias", "alibi", "softcap", "mask",
                                    "all"])
def test_block_mask_with_options(dtype, name, option):
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32((name + option).encode())])
    hq = 4
    q, k, v = _qkv(rng, dtype, bm.q_len, bm.k_len, 64, hq=hq,
                   amp=3.0 if option in ("softcap", "all") else 1.0)
    opts = {}
    slopes = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
    if option in ("causal", "all"):
        opts["causal"] = True
    if option == "window":
        opts["window"] = (45, 10)
    if option == "all":
        opts["window"] = (80, None)
    if option in ("bias", "all"):
        opts["bias"] = cp.asarray(rng.standard_normal((hq, bm.q_len, bm.k_len)),
                                  dtype=cp.float32)
    if option in ("alibi", "all"):
        opts["alibi_slopes"] = slopes
    if option in ("softcap", "all"):
        opts["softcap"] = 8.0
    if option in ("mask", "all"):
        opts["mask"] = cp.asarray(rng.random((bm.q_len, bm.k_len)) < 0.8)
    _run(f"{name} + {option} {dtype}", q, k, v, bm, fp32=dtype == "float32", **opts)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_empty_rows(dtype):
    """A query block row with no visible block and rows emptied inside partial blocks:
    out 0, lse -inf."""
    rng = np.random.default_rng(11)
    dense = rng.random((200, 180)) < 0.5
    dense[64:128] = False  # a whole block row: that thread block visits nothing
    dense[5:9] = False  # rows inside partial blocks
    bm = xattn.BlockMask.from_dense(dense, block_size=64)
    assert bm.full_row_ptr[2] == bm.full_row_ptr[1] and bm.partial_row_ptr[2] == \
        bm.partial_row_ptr[1]
    q, k, v = _qkv(rng, dtype, 200, 180, 64)
    out, lse = _run(f"empty rows {dtype}", q, k, v, bm, fp32=dtype == "float32")
    for rows in (slice(64, 128), slice(5, 9)):
        assert bool(cp.all(out[..., rows, :] == 0)), f"rows {rows}: out not 0"
        assert bool(cp.all(cp.isneginf(lse[..., rows]))), f"rows {rows}: lse not -inf"


@gpu
@needs_gpu
def test_causal_clips_every_block():
    """causal with Sq > Sk clips whole query blocks away: out 0, lse -inf there."""
    rng = np.random.default_rng(12)
    bm = MASKS["from_dense"]
    q, k, v = _qkv(rng, "float16", bm.q_len, bm.k_len, 64)
    k, v = k[..., :120, :], v[..., :120, :]
    bm = xattn.BlockMask.from_dense(bm.to_dense()[:, :120], block_size=(64, 32))
    _run("from_dense Sk < Sq causal", q, k, v, bm, causal=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_public_sparse_functions(dtype):
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, dtype, 700, 700, 64)
    tol = dict(dtype=np.float32, atol=1e-4, rtol=1e-4) if dtype == "float32" else \
        dict(dtype=q.dtype, atol=2e-2, rtol=2e-2)
    out = xattn.longformer_attention(q, k, v, window=128, global_tokens=[0, 350],
                                     block_size=64, backend="cupy")
    bm = xattn.BlockMask.longformer(700, window=128, global_tokens=[0, 350], block_size=64)
    ref, _, _ = reference_attention(q, k, v, mask=cp.asarray(bm.to_dense()))
    _compare("longformer_attention", out, ref, bm=bm, **tol)
    out = xattn.bigbird_attention(q, k, v, seed=1, backend="cupy")
    bm = xattn.BlockMask.bigbird(700, seed=1)
    ref, _, _ = reference_attention(q, k, v, mask=cp.asarray(bm.to_dense()))
    _compare("bigbird_attention", out, ref, bm=bm, **tol)


@gpu
@needs_gpu
def test_dispatch_and_refusal():
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, "float16", 200, 300, 64)
    bm = MASKS["causal"]
    prob = validate_attention(q, k, v, block_mask=bm)
    assert _backends.select_entry(prob, {}, "auto").name == "cupy.sm80"
    odd = xattn.BlockMask.causal(200, 300, block_size=48)
    with pytest.raises(NotImplementedError, match=r"block size \(48, 48\)"):
        xattn.flash_attention(q, k, v, block_mask=odd, backend="cupy")
    out = xattn.flash_attention(q, k, v, block_mask=odd)  # auto: the generic backend
    ref, _, _ = reference_attention(q, k, v, mask=cp.asarray(odd.to_dense()))
    _compare("odd block size on auto", out, ref, bm=odd, dtype=q.dtype, atol=2e-2, rtol=2e-2)


@gpu
@needs_gpu
def test_switch_off_falls_back(monkeypatch):
    monkeypatch.setenv("XATTN_DISABLE", "cupy")
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, "float16", 200, 300, 64)
    bm = MASKS["causal"]
    with pytest.raises(NotImplementedError, match="XATTN_DISABLE"):
        xattn.flash_attention(q, k, v, block_mask=bm, backend="cupy")
    out = xattn.flash_attention(q, k, v, block_mask=bm)
    ref, _, _ = reference_attention(q, k, v, mask=cp.asarray(bm.to_dense()))
    _compare("cupy entries off", out, ref, bm=bm, dtype=q.dtype, atol=2e-2, rtol=2e-2)


@gpu
@needs_gpu
def test_device_arrays_uploaded_once():
    bm = xattn.BlockMask.documents([0, 70, 300], block_size=64)
    a = hb.device_block_mask(bm)
    assert hb.device_block_mask(bm) is a
    assert a.tiles is not None and a.tiles.dtype == cp.uint32
    np.testing.assert_array_equal(cp.asnumpy(a.fcol)[:bm.num_full_blocks], bm.full_col_idx)
    np.testing.assert_array_equal(cp.asnumpy(a.tiles), hb.packed_tiles(bm))
    assert hb.device_csc(bm) is hb.device_csc(bm)


@gpu
@needs_gpu
def test_block_mask_deterministic():
    rng = np.random.default_rng(16)
    bm = MASKS["longformer"]
    q, k, v = _qkv(rng, "bfloat16", bm.q_len, bm.k_len, 128)
    a = xattn.flash_attention(q, k, v, block_mask=bm, backend="cupy")
    b = xattn.flash_attention(q, k, v, block_mask=bm, backend="cupy")
    assert bool(cp.all(a.view(cp.uint16) == b.view(cp.uint16)))


# --- GPU: Dv != D --------------------------------------------------------------------------------


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d,dv", [(64, 128), (128, 64), (40, 72), (32, 256), (96, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_dv_differs_from_d(dtype, d, dv, causal):
    rng = np.random.default_rng([d, dv, causal])
    q, k, v = _qkv(rng, dtype, 77, 150, d, dv=dv)
    out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cupy")
    assert out.shape == (2, 4, 77, dv)
    ref, ref_lse, _ = reference_attention(q, k, v, causal=causal)
    case = f"Dv={dv} D={d} {dtype} causal={causal}"
    if dtype == "float32":
        _compare(case, out, ref, bm=None, dtype=np.float32, atol=1e-4, rtol=1e-4)
    else:
        naive = naive_attention(q, k, v, causal=causal)
        _compare(case, out, ref, bm=None, dtype=q.dtype, naive=naive)
    _compare(case, lse, ref_lse, bm=None, dtype=np.float32, atol=2e-3, rtol=1e-3, name="lse")


@gpu
@needs_gpu
def test_dv_differs_with_block_mask():
    rng = np.random.default_rng(17)
    bm = MASKS["documents"]
    q, k, v = _qkv(rng, "float16", bm.q_len, bm.k_len, 64, dv=128)
    _run("documents Dv=128 D=64", q, k, v, bm)
