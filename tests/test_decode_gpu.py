"""The CuPy split-KV decode kernel (decode_splitkv.cu, backend="cupy.decode") against the
float64 oracle on the cache contents. GPU tests skip without CuPy and a device; the split
heuristic and the table entry are checked everywhere."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cupy_array

import xattn
from xattn import _backends
from xattn._backends.cupy_ import decode as cupy_decode
from xattn.testing import assert_close, naive_attention, reference_attention, to_numpy


def test_split_heuristic():
    # One sequence, 8 kv heads, 132 SMs x 3 resident blocks: 49 splits fill 392 of 396 slots
    # in one wave (50 would start a second wave of 4 blocks).
    assert cupy_decode.num_splits(1, 8, 1, 8192, 132, 3) == 49
    # 64 sequences: 512 blocks would leave 2 waves of 396 slots 65 % full; 3 splits fill 4
    # waves 97 %.
    assert cupy_decode.num_splits(64, 8, 1, 8192, 132, 3) == 3
    # Blocks that exactly fill the card take no split.
    assert cupy_decode.num_splits(33, 4, 1, 8192, 132, 1) == 1
    # A short context is never cut below 4 tiles per warp.
    assert cupy_decode.num_splits(1, 1, 1, 40, 132, 3) == 2
    assert cupy_decode.num_splits(1, 1, 1, 3, 132, 3) == 1
    assert cupy_decode.num_splits(0, 8, 1, 8192, 132, 3) == 1  # nothing to launch


def test_resident_blocks():
    # H100: 64K registers, 228 KiB of shared memory, 2048 threads per SM. The D=128 kernel's
    # 69.6 KB of shared memory allow 3 blocks; 255 registers a thread would allow 2.
    smem = cupy_decode.smem_bytes(128)
    assert cupy_decode.resident_blocks(128, smem, 65536, 233472, 2048) == 3
    assert cupy_decode.resident_blocks(255, smem, 65536, 233472, 2048) == 2
    assert cupy_decode.resident_blocks(32, 0, 65536, 233472, 2048) == 16


def test_auto_takes_the_kernel_before_generic():
    """Checked against the oracle on an H100 (2026-12-05), the kernel is auto's decode path on
    CuPy; what it refuses (float32, other head dims) goes on to generic."""
    order = _backends._PREFERENCE["gpu"]
    assert order.index("cupy.decode") < order.index("generic")
    assert "cupy.decode" not in _backends.OPT_IN
    assert cupy_decode.smem_bytes(128) == (16 * 136 + 4 * 4 * 16 * 136) * 2


def _cases():
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128):
            yield pytest.param(dtype, d, id=f"{dtype}-d{d}")


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "d"), list(_cases()))
@pytest.mark.parametrize(("hq", "hkv"), [(8, 8), (32, 8), (16, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("page_size", [None, 16, 7])
@pytest.mark.parametrize("options", [{}, {"window": (300, None)}, {"softcap": 2.0},
                                     {"alibi": True}], ids=["plain", "window", "softcap",
                                                           "alibi"])
def test_cupy_decode_matches_oracle(rng, dtype, d, hq, hkv, T, page_size, options):
    cupy = pytest.importorskip("cupy")
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = cupy.asarray(rng.uniform(0.01, 0.1, hq).astype(np.float32))
    B, lengths = 3, (2000, 517, 3)  # 2000 keys: several splits; 3 < T for T = 4
    cache = xattn.KVCache(B, hkv, 2048, d, dtype=cupy_array(np.zeros(1), dtype).dtype,
                          xp=cupy, page_size=page_size)
    k = cupy_array(rng.standard_normal((B, hkv, max(lengths), d)), dtype)
    v = cupy_array(rng.standard_normal((B, hkv, max(lengths), d)), dtype)
    cache.append(k, v, lengths=list(lengths))
    q = cupy_array(rng.standard_normal((B, hq, T, d)), dtype)
    out, lse = xattn.decode_attention(q, cache, backend="cupy.decode", return_lse=True,
                                      **options)
    ref_opts = {key: (to_numpy(val) if hasattr(val, "shape") else val)
                for key, val in options.items()}
    for b in range(B):
        K, V = cache.sequence(b)
        ref, ref_lse, _ = reference_attention(q[b], K, V, causal=True, **ref_opts)
        naive = naive_attention(q[b], K, V, causal=True, **ref_opts)
        assert_close(out[b], ref, xp=cupy, dtype=q.dtype, naive=naive, name=f"out[{b}]")
        assert_close(lse[b], ref_lse, xp=cupy, dtype=np.float32, atol=1e-3, rtol=1e-3,
                     name=f"lse[{b}]")
