"""``block_mask`` in the CuPy backward kernels (``flash_bwd.cu``, launcher ``flash_bwd.py``).

CPU part (always runs): the configuration choice and refusal reasons of
:func:`~xattn._backends.cupy_.flash_bwd.block_mask_configs`, and that every block-sparse
candidate is in the compile-checked instance list (instances.py).

GPU part (marked ``gpu``): dq/dk/dv of the block-sparse kernels (forward from the cupy
forward kernel) against the float64 oracle ``reference_attention_backward`` with the mask's
dense form, within twice the error of a naive same-precision implementation plus atol. Outputs
are poisoned with NaN first, so unwritten elements fail. Failures name the case, the gradient,
the max error and where it occurs (index, mask block row/column), so that a broken walk (whole
blocks wrong) or element rule (edges of partial blocks wrong) shows which.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import cupy_array

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn._backends.cupy_ import flash_bwd as kb
from xattn.testing import (
    naive_attention_backward,
    reference_attention_backward,
    to_numpy,
    tolerance,
)

KERNELS = Path(xattn.__file__).resolve().parent / "kernels"


# --- CPU ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,block,want", [
    (64, (64, 64), ((64, 4, 64, 64), (4, 64))),
    (64, (128, 128), ((64, 4, 64, 64), (4, 64))),
    (64, (32, 32), ((64, 2, 32, 64), (2, 32))),
    (64, (64, 32), ((64, 2, 32, 64), (2, 32))),
    (64, (32, 64), ((64, 4, 32, 64), (2, 32))),
    (96, (64, 64), ((96, 4, 32, 96), (4, 64))),
    (128, (128, 64), ((128, 4, 32, 64), (4, 64))),
    (256, (64, 64), ((128, 4, 16, 64), (4, 16))),
    (256, (32, 32), ((128, 2, 16, 64), (2, 16))),
    (32, (64, 64), ((64, 4, 64, 64), (4, 64))),
    (32, (16, 64), (None, None)),
    (64, (48, 64), (None, None)),
    (64, (64, 48), (None, None)),
])
def test_block_mask_configs(d, block, want):
    assert kb.block_mask_configs(d, block) == want


def test_candidates_fit_their_tiles():
    for d, cands in kb.BM_CONFIGS.items():
        for c in cands:
            assert c[2] % 16 == 0 and d % c[0] == 0


def test_block_mask_reasons():
    q = np.zeros((2, 100, 64), np.float16)

    def prob(block_size, x=q):
        return validate_attention(x, x, x,
                                  block_mask=xattn.BlockMask.causal(100, block_size=block_size))

    assert kb.block_mask_reason(prob(64)) is None
    reason = kb.block_mask_reason(prob(48))
    assert "block size (48, 48)" in reason and "generic backend" in reason
    # (64, 48): no dq configuration divides bk = 48, and none of the main kernel either.
    assert kb.block_mask_reason(prob((64, 48)), deterministic=True) is not None
    q32 = np.zeros((2, 100, 64), np.float32)
    assert "float32" in kb.block_mask_reason(prob(64, q32))


# --- GPU ------------------------------------------------------------------------------------------

try:
    import cupy as cp

    _NGPU = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no CuPy / driver / device: the GPU tests skip
    cp, _NGPU = None, 0

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_NGPU == 0, reason="no CuPy or no CUDA device")


def _qkv(rng, dtype, sq, sk, d, *, b=2, hq=4, hkv=2, amp=1.0):
    q = cupy_array(amp * rng.standard_normal((b, hq, sq, d)), dtype)
    k = cupy_array(amp * rng.standard_normal((b, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((b, hkv, sk, d)), dtype)
    return q, k, v


def _assert_grad(case, name, got, ref, naive, dtype, bm):
    a = to_numpy(got)
    assert isinstance(got, cp.ndarray), f"[{case}] {name}: not a CuPy array ({type(got)})"
    assert np.dtype(got.dtype) == np.dtype(dtype), \
        f"[{case}] {name}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    assert a.shape == ref.shape, f"[{case}] {name}: shape {a.shape}, expected {ref.shape}"
    # dq rows are queries, dk/dv rows keys: name the mask block they sit in.
    bsz = bm.block_size[0] if name == "dq" else bm.block_size[1]
    kind = "query block row" if name == "dq" else "key block column"
    bad = np.argwhere(~np.isfinite(a))
    assert bad.size == 0, (
        f"[{case}] {name}: {len(bad)} non-finite entries (unwritten/poisoned?), first at "
        f"{bad[:5].tolist()}, {kind}s {sorted({int(i[-2]) // bsz for i in bad})[:10]}")
    atol = tolerance(dtype)[0] * max(1.0, float(np.abs(ref).max(initial=0.0)))
    naive_err = float(np.abs(naive - ref).max(initial=0.0))
    err = np.abs(a - ref)
    bound = 2.0 * naive_err + atol
    worst = float(err.max(initial=0.0))
    if worst > bound:
        idx = np.unravel_index(int(np.argmax(err)), err.shape)
        out_rows = sorted({int(i[-2]) for i in np.argwhere(err > bound)})
        raise AssertionError(
            f"[{case}] {name}: max error {worst:.3g} > bound {bound:.3g} (2 x naive "
            f"{naive_err:.3g} + atol {atol:.3g}); worst at {tuple(int(i) for i in idx)} "
            f"({kind} {int(idx[-2]) // bsz}): got {a[idx]!r}, expected {ref[idx]!r}; "
            f"{int((err > bound).sum())}/{err.size} entries out, rows {out_rows[:12]}, "
            f"{kind}s {sorted({r // bsz for r in out_rows})[:12]}; max |ref| "
            f"{float(np.abs(ref).max()):.3g}")


def _check(case, q, k, v, bm, *, deterministic=False, **opts):
    """Forward (cupy) + backward (backend='cupy') with ``bm`` against the oracle with the
    mask's dense form (and'ed with a user mask)."""
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 1)
    out, lse = xattn.flash_attention(q, k, v, block_mask=bm, return_lse=True, **opts)
    dout = cupy_array(rng.standard_normal(out.shape), np.dtype(q.dtype).name)
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, block_mask=bm,
                                           backend="cupy", deterministic=deterministic, **opts)
    ref_opts = dict(opts)
    dense = np.asarray(bm.to_dense())
    user = ref_opts.pop("mask", None)
    ref_opts["mask"] = dense if user is None else dense & cp.asnumpy(user)
    refs = reference_attention_backward(dout, q, k, v, **ref_opts)
    naive = naive_attention_backward(dout, q, k, v, out, **ref_opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        _assert_grad(case, name, g, r, n, q.dtype, bm)
    return grads, (dout, out, lse)


def _masks():
    rng = np.random.default_rng(0)
    dense = rng.random((150, 270)) < 0.4
    dense[:, 64:128] = True  # full blocks among partial ones
    dense[40:70, :] = False  # empty rows inside partial blocks
    dense[:, 200:] = False  # invisible blocks: keys nobody sees
    return {
        "causal": xattn.BlockMask.causal(200, 300, block_size=64),
        "causal128": xattn.BlockMask.causal(333, block_size=128),
        "window": xattn.BlockMask.sliding_window(300, window=(70, 30), block_size=64),
        "window128": xattn.BlockMask.sliding_window(400, window=(150, 0), block_size=128),
        "longformer": xattn.BlockMask.longformer(333, window=64, global_tokens=[0, 100, 332],
                                                 block_size=64),
        "bigbird": xattn.BlockMask.bigbird(400, block_size=64, random_blocks=2, seed=3),
        "documents": xattn.BlockMask.documents([0, 50, 180, 310], causal=True, block_size=64),
        "from_dense": xattn.BlockMask.from_dense(dense, block_size=64),
        "from_dense128": xattn.BlockMask.from_dense(dense, block_size=128),
    }


MASKS = _masks()


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,d", [("float16", 64), ("bfloat16", 128)])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_kinds(dtype, d, name):
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), d])
    q, k, v = _qkv(rng, dtype, bm.q_len, bm.k_len, d)
    _check(f"{name} {dtype} D={d}", q, k, v, bm)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,d,block", [
    ("float16", 64, 32), ("bfloat16", 64, 128), ("float16", 128, (64, 32)),
    ("bfloat16", 64, (128, 64)), ("float16", 64, (32, 128)), ("float16", 32, 128),
    ("bfloat16", 256, 64), ("float16", 256, 32), ("float16", 96, 64), ("bfloat16", 128, 32),
])
def test_block_sizes_and_head_dims(dtype, d, block):
    """Block sizes that select each configuration (BM_CONFIGS): several query steps per mask
    block, one key tile per mask block, and the two-warp tiles of 32-blocks."""
    rng = np.random.default_rng([d, 7, zlib.crc32(str(block).encode())])
    dense = rng.random((333, 290)) < 0.3
    dense[:, 100:200] = True
    bm = xattn.BlockMask.from_dense(dense, block_size=block)
    q, k, v = _qkv(rng, dtype, 333, 290, d)
    _check(f"from_dense block {block} {dtype} D={d}", q, k, v, bm)


@gpu
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gqa_and_unequal_lengths(deterministic):
    """hq = 8 over hkv = 2 (each CTA walks the mask once per query head of its group), Sq != Sk
    not multiples of the block (bottom-right causal)."""
    rng = np.random.default_rng([21, deterministic])
    bm = xattn.BlockMask.causal(200, 333, block_size=64) \
        | xattn.BlockMask.from_dense(rng.random((200, 333)) < 0.05, block_size=64)
    q, k, v = _qkv(rng, "float16", 200, 333, 64, b=1, hq=8, hkv=2)
    _check(f"gqa 8/2 sq=200 sk=333 deterministic={deterministic}", q, k, v, bm,
           deterministic=deterministic)
    q, k, v = _qkv(rng, "bfloat16", 200, 333, 128, b=2, hq=4, hkv=1)
    _check(f"mqa 4/1 D=128 sq=200 sk=333 deterministic={deterministic}", q, k, v, bm,
           deterministic=deterministic)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,deterministic", [("float16", False), ("bfloat16", True)])
def test_empty_rows_and_columns(dtype, deterministic):
    """A block row no key block is visible to, rows emptied inside partial blocks (lse -inf:
    dq exactly 0) and a key block column no query sees (dk/dv exactly 0)."""
    rng = np.random.default_rng(11)
    dense = rng.random((200, 180)) < 0.5
    dense[64:128] = False  # a whole block row
    dense[5:9] = False  # rows inside partial blocks
    dense[:, 64:128] = False  # a whole key block column
    bm = xattn.BlockMask.from_dense(dense, block_size=64)
    q, k, v = _qkv(rng, dtype, 200, 180, 64)
    (dq, dk, dv), _ = _check(f"empty rows/columns {dtype} deterministic={deterministic}",
                             q, k, v, bm, deterministic=deterministic)
    for rows in (slice(64, 128), slice(5, 9)):
        assert bool(cp.all(dq[..., rows, :] == 0)), f"dq rows {rows}: not exactly 0"
    assert bool(cp.all(dk[..., 64:128, :] == 0)), "dk of keys no query sees: not exactly 0"
    assert bool(cp.all(dv[..., 64:128, :] == 0)), "dv of keys no query sees: not exactly 0"


@gpu
@needs_gpu
@pytest.mark.parametrize("name,option", [
    ("window", "causal"), ("from_dense", "window"), ("longformer", "bias"),
    ("documents", "alibi"), ("window", "softcap"), ("from_dense", "mask"),
    ("longformer", "all"), ("window128", "all"),
])
def test_with_score_mods(name, option):
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32((name + option).encode())])
    hq = 4
    q, k, v = _qkv(rng, "float16", bm.q_len, bm.k_len, 64, hq=hq,
                   amp=3.0 if option in ("softcap", "all") else 1.0)
    opts = {}
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
        opts["alibi_slopes"] = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
    if option in ("softcap", "all"):
        opts["softcap"] = 8.0
    if option in ("mask", "all"):
        opts["mask"] = cp.asarray(rng.random((bm.q_len, bm.k_len)) < 0.8)
    _check(f"{name} + {option} float16", q, k, v, bm, **opts)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,d,name,option", [
    ("float16", 64, "window", None), ("bfloat16", 128, "from_dense128", None),
    ("float16", 256, "longformer", "softcap"), ("bfloat16", 64, "bigbird", "causal"),
])
def test_deterministic_bitwise(dtype, d, name, option):
    bm = MASKS[name]
    rng = np.random.default_rng([d, zlib.crc32(name.encode())])
    q, k, v = _qkv(rng, dtype, bm.q_len, bm.k_len, d, amp=2.0 if option else 1.0)
    opts = {"softcap": 6.0} if option == "softcap" else \
        ({"causal": True} if option == "causal" else {})
    case = f"{name} {dtype} D={d} {option} deterministic"
    grads, (dout, out, lse) = _check(case, q, k, v, bm, deterministic=True, **opts)
    again = xattn.flash_attention_backward(dout, q, k, v, out, lse, block_mask=bm,
                                           backend="cupy", deterministic=True, **opts)
    for label, a, b in zip(("dq", "dk", "dv"), grads, again, strict=True):
        diff = int(cp.count_nonzero(a.view(cp.uint16) != b.view(cp.uint16)))
        assert diff == 0, f"[{case}] {label}: {diff} elements differ between two runs"


@gpu
@needs_gpu
def test_batched_mask_goes_per_element():
    """A batched mask (one per batch element): flash.py calls the kernels once per element."""
    rng = np.random.default_rng(31)
    flags = np.zeros((2, 150), bool)
    flags[0, [0, 70]] = True
    flags[1, [149]] = True
    bm = xattn.BlockMask.longformer(150, window=40, global_tokens=flags, block_size=64)
    assert bm.batch_shape == (2,)
    q, k, v = _qkv(rng, "float16", 150, 150, 64, b=2)
    out, lse = xattn.flash_attention(q, k, v, block_mask=bm, return_lse=True)
    dout = cp.asarray(rng.standard_normal(out.shape).astype(np.float16))
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, block_mask=bm,
                                           backend="cupy")
    for i in range(2):
        dense = np.asarray(bm[i].to_dense())
        refs = reference_attention_backward(dout[i], q[i], k[i], v[i], mask=dense)
        naive = naive_attention_backward(dout[i], q[i], k[i], v[i], out[i], mask=dense)
        for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
            _assert_grad(f"batched mask element {i}", name, g[i], r, n, q.dtype, bm[i])


@gpu
@needs_gpu
def test_dispatch_refusal_and_switch(monkeypatch):
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, "float16", 200, 300, 64)
    bm = MASKS["causal"]
    prob = validate_attention(q, k, v, block_mask=bm)
    for det in (False, True):
        opts = {}
        if det:
            opts["deterministic"] = True
        name = _backends.select_entry(prob, opts, "auto", op="backward").name
        assert name == "cupy.sm80", f"deterministic={det}: auto picked {name} for the backward"
    odd = xattn.BlockMask.causal(200, 300, block_size=48)
    out, lse = xattn.flash_attention(q, k, v, block_mask=odd, return_lse=True)
    dout = cp.asarray(rng.standard_normal(out.shape).astype(np.float16))
    with pytest.raises(NotImplementedError, match=r"block size \(48, 48\)"):
        xattn.flash_attention_backward(dout, q, k, v, out, lse, block_mask=odd, backend="cupy")
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, block_mask=odd)  # generic
    dense = np.asarray(odd.to_dense())
    refs = reference_attention_backward(dout, q, k, v, mask=dense)
    naive = naive_attention_backward(dout, q, k, v, out, mask=dense)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        _assert_grad("odd block size on auto", name, g, r, n, q.dtype, odd)
    monkeypatch.setenv("XATTN_DISABLE", "cupy")
    out, lse = xattn.flash_attention(q, k, v, block_mask=bm, return_lse=True)
    with pytest.raises(NotImplementedError, match="XATTN_DISABLE"):
        xattn.flash_attention_backward(dout, q, k, v, out, lse, block_mask=bm, backend="cupy")
