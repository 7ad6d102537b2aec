"""Every GPU entry of the kernel table x every option set of the CPU suite, against the float64
oracle: what an entry accepts (its ``supports``) it must compute correctly, forward and
backward. Entries refuse what they do not serve; the refusal is the skip reason."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import tf32_naive

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn.testing import (
    assert_close,
    naive_attention,
    naive_attention_backward,
    reference_attention,
    reference_attention_backward,
)

pytestmark = pytest.mark.gpu

# The dtype each entry is asked about, and the backend options that go with it.
DTYPES = {"cupy.tf32": ("float32", {"allow_tf32": True}), "cupy.tf32x3": ("float32", {}),
          "cupy.tf32x3_sm90": ("float32", {}),
          "cupy.simt": ("float32", {}), "generic": ("float32", {})}


def _case(make_options, option_name, dtype):
    import cupy as cp

    rng = np.random.default_rng(zlib.crc32(option_name.encode()))
    b, hq, hkv, sq, sk, d = (2,), 4, 2, 77, 150, 64
    opts = make_options(option_name, b, hq, sq, sk, np.float32)
    opts = {k: cp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
    q, k, v = (cp.asarray(rng.standard_normal(s).astype(dtype))
               for s in ((*b, hq, sq, d), (*b, hkv, sk, d), (*b, hkv, sk, d)))
    return q, k, v, opts


def test_entry_against_the_oracle(gpu_entry, option_name, make_options, poison_outputs):
    import cupy as cp

    dtype, extra = DTYPES.get(gpu_entry, ("float16", {}))
    q, k, v, opts = _case(make_options, option_name, dtype)
    prob = validate_attention(q, k, v, **opts)
    why = _backends.explain(prob, extra, gpu_entry)["reasons"][gpu_entry]
    if why is not None:
        pytest.skip(f"{gpu_entry} does not serve {option_name}: {why}")
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend=gpu_entry, **extra,
                                     **opts)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    # TF32 rounds the operands to 10 mantissa bits: its naive twin rounds them the same way.
    naive = (tf32_naive(q, k, v, **opts)[0] if extra.get("allow_tf32")
             else naive_attention(q, k, v, **opts))
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive,
                 name=f"{gpu_entry} {option_name} out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3,
                 name=f"{gpu_entry} {option_name} lse")


def test_entry_backward_against_the_oracle(gpu_entry, option_name, make_options,
                                           poison_outputs):
    import cupy as cp

    dtype, _ = DTYPES.get(gpu_entry, ("float16", {}))
    q, k, v, opts = _case(make_options, option_name, dtype)
    prob = validate_attention(q, k, v, **opts)
    why = _backends.explain(prob, {}, gpu_entry, op="backward")["reasons"][gpu_entry]
    if why is not None:
        pytest.skip(f"{gpu_entry} does not serve the backward of {option_name}: {why}")
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    dout = cp.asarray(np.random.default_rng(7).standard_normal(out.shape).astype(dtype))
    grads = xattn.flash_attention_backward(dout, q, k, v, out, lse, backend=gpu_entry, **opts)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    naive = naive_attention_backward(dout, q, k, v, out, **opts)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, refs, naive, strict=True):
        assert_close(g, r, xp=cp, dtype=q.dtype, naive=n, name=f"{gpu_entry} {option_name} {name}")


def _block_masks():
    """Block masks of every rule kind (causal / window arithmetic, tiles), with block sizes
    that the wgmma entry's tiles divide (128 x 128, 128 x 64, 256) and one they do not (64)."""
    rng = np.random.default_rng(3)
    dense = rng.random((300, 333)) < 0.4
    dense[:, 128:256] = True
    return {
        "bm_causal_128": xattn.BlockMask.causal(300, 333, block_size=128),
        "bm_window_128x64": xattn.BlockMask.sliding_window(300, 333, window=(70, 20),
                                                           block_size=(128, 64)),
        "bm_documents_256": xattn.BlockMask.documents([0, 90, 200, 300], causal=True,
                                                      block_size=256),
        "bm_dense_128": xattn.BlockMask.from_dense(dense, block_size=128),
        "bm_dense_64": xattn.BlockMask.from_dense(dense, block_size=64),
    }


BLOCK_MASKS = _block_masks()


@pytest.mark.parametrize("mask_name", sorted(BLOCK_MASKS))
@pytest.mark.parametrize("with_mods", [False, True])
def test_entry_block_mask_against_the_oracle(gpu_entry, mask_name, with_mods, poison_outputs):
    """Every entry that walks block masks, alone and with score mods (ALiBi + softcap)."""
    import cupy as cp

    bm = BLOCK_MASKS[mask_name]
    dtype, extra = DTYPES.get(gpu_entry, ("float16", {}))
    rng = np.random.default_rng(zlib.crc32(mask_name.encode()))
    q, k, v = (cp.asarray(rng.standard_normal(s).astype(dtype))
               for s in ((2, 4, bm.q_len, 64), (2, 2, bm.k_len, 64), (2, 2, bm.k_len, 64)))
    opts = {}
    if with_mods:
        opts = dict(alibi_slopes=cp.asarray(xattn.alibi_slopes(4), dtype=cp.float32),
                    softcap=4.0)
    prob = validate_attention(q, k, v, block_mask=bm, **opts)
    why = _backends.explain(prob, extra, gpu_entry)["reasons"][gpu_entry]
    if why is not None:
        pytest.skip(f"{gpu_entry} does not serve {mask_name}: {why}")
    out, lse = xattn.flash_attention(q, k, v, block_mask=bm, return_lse=True,
                                     backend=gpu_entry, **extra, **opts)
    ref_opts = dict(opts, mask=cp.asarray(bm.to_dense()))
    ref, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
    naive = (tf32_naive(q, k, v, **ref_opts)[0] if extra.get("allow_tf32")
             else naive_attention(q, k, v, **ref_opts))
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive,
                 name=f"{gpu_entry} {mask_name} out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3,
                 name=f"{gpu_entry} {mask_name} lse")
