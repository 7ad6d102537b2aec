"""KVCache and decode_attention against the float64 oracle on the cache's contents.

Every decode result is compared with ``reference_attention(q[b], K_b, V_b, causal=True, ...)``
where ``K_b``/``V_b`` are what the cache holds for sequence ``b``: decoding must equal flash
attention on the cache contents, sequence by sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BF16, random_array

import xattn
from xattn import _backends
from xattn.kvcache import _validate_decode
from xattn.testing import assert_close, naive_attention, reference_attention

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _reason(backend, q, cache, **options):
    """None when ``backend`` serves this decode request, else why not (the test skips)."""
    prob = _validate_decode(q, cache, options.get("window"), options.get("alibi_slopes"),
                            options.get("softcap"), options.get("scale"))
    return _backends.available_backends(np, prob, {}, "decode")[backend]


def _decode(q, cache, backend, **options):
    why = _reason(backend, q, cache, **options)
    if why is not None:
        pytest.skip(f"backend {backend}: {why}")
    return xattn.decode_attention(q, cache, backend=backend, return_lse=True, **options)


def _check(out, lse, q, cache, **options):
    """Each sequence's rows against the oracle on that sequence's cache contents."""
    dtype = np.dtype(q.dtype)
    ref_opts = {k: v for k, v in options.items()}
    if ref_opts.get("alibi_slopes") is not None and ref_opts["alibi_slopes"].ndim == 2:
        per_batch = ref_opts.pop("alibi_slopes")
    else:
        per_batch = None
    for b in range(q.shape[0]):
        K, V = cache.sequence(b)
        opts = dict(ref_opts)
        if per_batch is not None:
            opts["alibi_slopes"] = per_batch[b]
        ref, ref_lse, _ = reference_attention(q[b], K, V, causal=True, **opts)
        naive = None
        if dtype.itemsize == 2:
            naive = naive_attention(q[b], K, V, causal=True, **opts)
        assert_close(out[b], ref, xp=np, dtype=dtype, naive=naive, name=f"out[{b}]")
        assert_close(lse[b], ref_lse, xp=np, dtype=F64 if dtype == F64 else F32,
                     atol=1e-4 if dtype.itemsize == 2 else None, name=f"lse[{b}]")


def _filled(rng, dtype, batch=2, hkv=2, max_len=300, d=16, lengths=(150, 97), dv=None,
            page_size=None, num_pages=None):
    cache = xattn.KVCache(batch, hkv, max_len, d, dtype=dtype, page_size=page_size,
                          num_pages=num_pages, head_dim_v=dv)
    T = max(lengths)
    k = random_array(rng, (batch, hkv, T, d), dtype)
    v = random_array(rng, (batch, hkv, T, dv or d), dtype)
    cache.append(k, v, lengths=list(lengths))
    return cache


# -- decode equals attention on the cache contents -----------------------------------------


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged16"])
def test_prefill_then_steps(backend, dtype, rng, page_size):
    """Prefill (ragged), then single-token steps and a 4-token step, checked after each."""
    B, Hq, Hkv, D = 2, 8, 2, 16
    cache = _filled(rng, dtype, batch=B, hkv=Hkv, d=D, lengths=(40, 23), page_size=page_size)
    for T in (1, 1, 4, 1):
        k = random_array(rng, (B, Hkv, T, D), dtype)
        v = random_array(rng, (B, Hkv, T, D), dtype)
        cache.append(k, v)
        q = random_array(rng, (B, Hq, T, D), dtype)
        out, lse = _decode(q, cache, backend)
        _check(out, lse, q, cache)
    assert cache.lengths.tolist() == [47, 30]


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("T", [1, 4, 16])
def test_head_layouts(backend, rng, hq, hkv, T):
    cache = _filled(rng, F32, hkv=hkv, lengths=(131, 64))
    q = random_array(rng, (2, hq, T, 16), F32)
    out, lse = _decode(q, cache, backend)
    _check(out, lse, q, cache)


OPTIONS = {
    "window": lambda rng, h: dict(window=(37, None)),
    "window_both_sides": lambda rng, h: dict(window=(20, 5)),
    "window_0": lambda rng, h: dict(window=(0, 0)),
    "alibi": lambda rng, h: dict(alibi_slopes=rng.uniform(0.01, 0.5, h)),
    "alibi_per_batch": lambda rng, h: dict(alibi_slopes=rng.uniform(0.01, 0.5, (2, h))),
    "softcap": lambda rng, h: dict(softcap=1.5),
    "scale": lambda rng, h: dict(scale=0.37),
    "everything": lambda rng, h: dict(window=(50, None), alibi_slopes=rng.uniform(0.01, 0.1, h),
                                      softcap=3.0, scale=0.2),
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("T", [1, 4])
def test_options(backend, rng, name, T):
    dtype = F64
    options = OPTIONS[name](rng, 8)
    if "alibi_slopes" in options:
        options["alibi_slopes"] = options["alibi_slopes"].astype(dtype)
    cache = _filled(rng, dtype, lengths=(180, 61))
    q = random_array(rng, (2, 8, T, 16), dtype)
    out, lse = _decode(q, cache, backend, **options)
    _check(out, lse, q, cache, **options)


def test_value_head_dim(backend, rng):
    cache = _filled(rng, F32, dv=24, lengths=(70, 9))
    q = random_array(rng, (2, 4, 2, 16), F32)
    out, lse = _decode(q, cache, backend)
    assert out.shape == (2, 4, 2, 24)
    _check(out, lse, q, cache)


def test_ragged_and_short_sequences(backend, rng):
    """Lengths 0, below T, and unequal: queries at negative positions see nothing."""
    cache = _filled(rng, F32, batch=4, lengths=(0, 2, 57, 130))
    q = random_array(rng, (4, 4, 4, 16), F32)
    out, lse = _decode(q, cache, backend)
    _check(out, lse, q, cache)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(np.isneginf(lse[1][:, :2])) and np.all(np.isfinite(lse[1][:, 2:]))


def test_empty_cache(backend, rng):
    cache = xattn.KVCache(2, 2, 16, 16, dtype=F32, page_size=4)
    q = random_array(rng, (2, 4, 2, 16), F32)
    out, lse = _decode(q, cache, backend)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_long_context_splits(backend, rng):
    """Long enough that the numba backend splits each key range and merges the parts."""
    from xattn._backends.numpy_.decode import plan_splits

    L = 20000
    assert len(plan_splits([(0, L)], 1, 2)) > 1
    cache = _filled(rng, F32, batch=1, hkv=1, max_len=L, d=8, lengths=(L,))
    q = random_array(rng, (1, 4, 3, 8), F32)
    out, lse = _decode(q, cache, backend, window=(15000, None))
    _check(out, lse, q, cache, window=(15000, None))


def test_hidden_keys_never_leak(backend, rng):
    """NaN keys and inf values that a row may not see leave that row untouched, whether the
    causal rule (a newer token) or the window (an older one) hides them."""
    cache = _filled(rng, F64, lengths=(120, 80))
    clean = [[x.copy() for x in cache.sequence(b)] for b in range(2)]
    # T = 2, window (50, None). Sequence 0: key 119 is the newest, hidden from query 0.
    # Sequence 1: queries at 78 and 79 see keys from 28 and 29: key 28 is hidden from query 1.
    for b, pos in ((0, 119), (1, 28)):
        cache.k_cache[b, :, pos] = np.nan
        cache.v_cache[b, :, pos] = np.inf
    q = random_array(rng, (2, 4, 2, 16), F64)
    out, _ = xattn.decode_attention(q, cache, backend=backend, window=(50, None),
                                    return_lse=True)
    for b, row in ((0, 0), (1, 1)):
        ref, _, _ = reference_attention(q[b], *clean[b], causal=True, window=(50, None))
        assert_close(out[b][:, row], ref[:, row], xp=np, dtype=F64, name=f"sequence {b}")


def test_16bit_values_convert_exactly():
    """The numba kernel reads 16-bit caches as bits: every float16 and bfloat16 bit pattern
    (subnormals, infinities, NaN) converts as NumPy / ml_dtypes convert it."""
    pytest.importorskip("numba")
    from numba import njit

    from xattn._backends.numpy_ import decode_kernels as K

    @njit
    def convert(bits, bf16):
        buf = np.empty(bits.shape, dtype=np.float32)
        return K._chunk(bits, 0, bits.shape[0], buf, bf16).copy()

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    for dtype, bf16 in ((np.dtype(np.float16), False), (BF16, True)):
        if dtype is None:
            continue
        want = bits.view(dtype).astype(np.float32)
        got = convert(bits, bf16)
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


# -- paged layout -------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
def test_paged_equals_contiguous(backend, rng, page_size):
    """Sequences grown in turns (their pages interleave in the pool) against one contiguous
    cache fed the same tokens."""
    B, Hkv, D = 3, 2, 16
    contiguous = xattn.KVCache(B, Hkv, 200, D, dtype=F64)
    paged = xattn.KVCache(B, Hkv, 200, D, dtype=F64, page_size=page_size)
    for T, lengths in ((9, (9, 3, 0)), (5, (0, 5, 5)), (40, (40, 17, 33)), (1, (1, 1, 1))):
        k = random_array(rng, (B, Hkv, T, D), F64)
        v = random_array(rng, (B, Hkv, T, D), F64)
        contiguous.append(k, v, lengths=lengths)
        paged.append(k, v, lengths=lengths)
    assert paged.lengths.tolist() == contiguous.lengths.tolist() == [50, 26, 39]
    for b in range(B):
        for a, c in zip(paged.sequence(b), contiguous.sequence(b), strict=True):
            np.testing.assert_array_equal(a, c)
    q = random_array(rng, (B, 4, 2, D), F64)
    out_p, lse_p = _decode(q, paged, backend)
    out_c, lse_c = _decode(q, contiguous, backend)
    assert_close(out_p, out_c, xp=np, dtype=F64)
    assert_close(lse_p, lse_c, xp=np, dtype=F64)
    _check(out_p, lse_p, q, paged)


def test_paged_pool_reuse(rng):
    """Pages come back on reset and serve other sequences; block tables never share a page."""
    cache = xattn.KVCache(2, 1, 64, 8, dtype=F32, page_size=8, num_pages=6)
    k = random_array(rng, (2, 1, 24, 8), F32)
    cache.append(k, k, lengths=[24, 16])  # 3 + 2 pages
    assert cache.free_pages == 1
    with pytest.raises(ValueError, match="free"):
        cache.append(k[:, :, :9], k[:, :, :9], lengths=[9, 0])  # needs 2 pages
    assert cache.lengths.tolist() == [24, 16] and cache.free_pages == 1
    cache.reset(0)
    assert cache.free_pages == 4 and cache.lengths.tolist() == [0, 16]
    cache.append(k, k, lengths=[0, 24])
    table = cache.block_table
    used = table[table >= 0]
    assert len(set(used.tolist())) == used.size == 5 and cache.free_pages == 1
    np.testing.assert_array_equal(cache.sequence(1)[0][:, 16:], k[1])


# -- ring buffer ---------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged4"])
def test_ring_buffer(backend, rng, page_size):
    """A ring of 32 slots for a window of 20 keys, fed 4-5x its size: decoding equals windowed
    attention over the whole history, which the test keeps on its own."""
    B, Hkv, D, W = 2, 2, 16, 20
    cache = xattn.KVCache(B, Hkv, 32, D, dtype=F64, window=W, page_size=page_size)
    cos, sin = xattn.rotary_cos_sin(200, D, dtype=np.float64)
    history_k = [[], []]
    history_v = [[], []]
    steps = [(30, (30, 11))] + [(4, (4, 4)), (1, (1, 0))] * 20 + [(3, (3, 3))]
    for i, (T, lengths) in enumerate(steps):
        k = random_array(rng, (B, Hkv, T, D), F64)
        v = random_array(rng, (B, Hkv, T, D), F64)
        cache.append(k, v, lengths=lengths, rotary=(cos, sin))
        for b in range(B):
            history_k[b].append(k[b, :, :lengths[b]])
            history_v[b].append(v[b, :, :lengths[b]])
        if i == 0 or (i % 7 and i != len(steps) - 1):
            continue
        q = random_array(rng, (B, 4, T, D), F64)
        out, _ = _decode(q, cache, backend, rotary=(cos, sin))
        for b in range(B):
            K, V = np.concatenate(history_k[b], axis=1), np.concatenate(history_v[b], axis=1)
            L = K.shape[1]
            Kr = xattn.apply_rotary(K, cos[:L], sin[:L])
            pos = np.clip(np.arange(L - T, L), 0, None)
            qr = xattn.apply_rotary(q[b], cos[pos], sin[pos])
            ref, _, _ = reference_attention(qr, Kr, V, causal=True, window=(W, None))
            assert_close(out[b], ref, xp=np, dtype=F64, name=f"step {i}, sequence {b}")
    assert cache.lengths.tolist() == [133, 94]
    K, _ = cache.sequence(0)
    assert K.shape == (Hkv, 32, D)
    if page_size:
        assert cache.free_pages == cache.num_pages - 2 * 8


def test_ring_buffer_errors(rng):
    with pytest.raises(ValueError, match="at most 31 keys"):
        xattn.KVCache(1, 1, 32, 8, dtype=F32, window=32)
    with pytest.raises(ValueError, match="multiple of page_size"):
        xattn.KVCache(1, 1, 30, 8, dtype=F32, window=8, page_size=4)
    cache = xattn.KVCache(1, 1, 32, 8, dtype=F32, window=20)
    k = random_array(rng, (1, 1, 33, 8), F32)
    with pytest.raises(ValueError, match="exceed the ring"):
        cache.append(k, k)
    cache.append(k[:, :, :30], k[:, :, :30])
    cache.append(k[:, :, :30], k[:, :, :30])  # past max_len: a ring keeps the newest 32
    q = random_array(rng, (1, 2, 1, 8), F32)
    with pytest.raises(ValueError, match="holds no older keys"):
        xattn.decode_attention(q, cache, window=(25, None))
    with pytest.raises(ValueError, match="need 33 positions"):
        xattn.decode_attention(random_array(rng, (1, 2, 13, 8), F32), cache)
    assert xattn.decode_attention(q, cache, window=(5, None)).shape == (1, 2, 1, 8)


# -- rotary embeddings ---------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_at_append(backend, rng, interleaved):
    """Keys rotated on append and q rotated in decode equal apply_rotary then attention."""
    B, Hq, Hkv, D, rd = 2, 4, 2, 16, 12
    cos, sin = xattn.rotary_cos_sin(300, rd, dtype=np.float64)
    cache = xattn.KVCache(B, Hkv, 300, D, dtype=F64)
    raw_k = [[], []]
    raw_v = [[], []]
    for T, lengths in ((30, (30, 12)), (1, (1, 1)), (3, (3, 3))):
        k = random_array(rng, (B, Hkv, T, D), F64)
        v = random_array(rng, (B, Hkv, T, D), F64)
        cache.append(k, v, lengths=lengths, rotary=(cos, sin), rotary_interleaved=interleaved)
        for b in range(B):
            raw_k[b].append(k[b, :, :lengths[b]])
            raw_v[b].append(v[b, :, :lengths[b]])
    q = random_array(rng, (B, Hq, 3, D), F64)
    out, _ = _decode(q, cache, backend, rotary=(cos, sin), rotary_interleaved=interleaved)
    for b in range(B):
        K, V = np.concatenate(raw_k[b], axis=1), np.concatenate(raw_v[b], axis=1)
        L = K.shape[1]
        Kr = xattn.apply_rotary(K, cos[:L], sin[:L], interleaved=interleaved)
        qr = xattn.apply_rotary(q[b], cos[L - 3:L], sin[L - 3:L], interleaved=interleaved)
        ref = xattn.flash_attention(qr, Kr, V, causal=True)
        assert_close(out[b], ref, xp=np, dtype=F64)


def test_rotary_table_too_short_writes_nothing(rng):
    cache = _filled(rng, F32, lengths=(10, 10))
    before = cache.k_cache.copy()
    cos, sin = xattn.rotary_cos_sin(12, 16)
    k = random_array(rng, (2, 2, 4, 16), F32)
    with pytest.raises(ValueError, match="position 13"):
        cache.append(k, k, rotary=(cos, sin))
    assert cache.lengths.tolist() == [10, 10]
    np.testing.assert_array_equal(cache.k_cache, before)


def test_inputs_never_modified(rng):
    cache = xattn.KVCache(1, 2, 50, 16, dtype=F32)
    k, v = random_array(rng, (1, 2, 5, 16), F32), random_array(rng, (1, 2, 5, 16), F32)
    q = random_array(rng, (1, 4, 5, 16), F32)
    copies = [x.copy() for x in (k, v, q)]
    cos, sin = xattn.rotary_cos_sin(50, 16)
    cache.append(k, v, rotary=(cos, sin))
    xattn.decode_attention(q, cache, rotary=(cos, sin))
    for x, c in zip((k, v, q), copies, strict=True):
        np.testing.assert_array_equal(x, c)
    cache.k_cache[...] = 0  # the cache holds its own copy
    np.testing.assert_array_equal(k, copies[0])


def test_strided_inputs(backend, rng):
    cache = xattn.KVCache(2, 2, 64, 16, dtype=F32)
    big = random_array(rng, (2, 4, 20, 32), F32)
    cache.append(big[:, ::2, :, ::2], big[:, 1::2, :, 1::2])
    np.testing.assert_array_equal(cache.sequence(1)[0], big[1, ::2, :, ::2])
    q = random_array(rng, (2, 8, 3, 32), F32)[..., ::2]
    out, lse = _decode(q, cache, backend)
    _check(out, lse, q, cache)


# -- state, sizes, dispatch ----------------------------------------------------------------


def test_reset_and_nbytes(rng):
    cache = _filled(rng, F32, batch=3, lengths=(5, 6, 7))
    assert cache.nbytes == 2 * 3 * 2 * 300 * 16 * 4
    cache.reset([0, 2])
    assert cache.lengths.tolist() == [0, 6, 0]
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]
    paged = xattn.KVCache(3, 2, 300, 16, dtype=np.float16, page_size=32, head_dim_v=8)
    assert paged.num_pages == 3 * 10
    assert paged.nbytes == 30 * 2 * 32 * (16 + 8) * 2


def test_gqa_shrinks_the_cache():
    """Bytes per token scale with kv_heads (Llama-3-8B: 32 query heads, 8 kv heads)."""
    sizes = {h: xattn.KVCache(1, h, 64, 128, dtype=np.float16).nbytes for h in (32, 8, 1)}
    assert sizes[32] == 4 * sizes[8] == 32 * sizes[1] == 2 * 32 * 64 * 128 * 2


def test_dispatch(rng):
    cache32 = _filled(rng, F32, lengths=(3, 3))
    q = random_array(rng, (2, 4, 1, 16), F32)
    prob = _validate_decode(q, cache32, None, None, None, None)
    assert _backends.select(prob, {}, "auto", op="decode").__name__.endswith("numpy_.decode")
    assert _backends.select(prob, {}, "numpy", op="decode").__name__.endswith("decode_generic")
    with pytest.raises(TypeError, match="never copies"):
        xattn.decode_attention(q, cache32, backend="cupy")
    with pytest.raises(ValueError, match="backend"):
        xattn.decode_attention(q, cache32, backend="nope")
    # The flash entries' main modules are never asked to decode.
    assert "does not implement decode" in _backends._why_not(
        _backends.Backend("x", "cpu", ".numpy_.fused", ""), prob, {}, "decode")
    if BF16 is not None:  # 16-bit caches go to the numba kernel too (read as their bits)
        cache16 = _filled(rng, BF16, lengths=(3, 3))
        prob16 = _validate_decode(q.astype(BF16), cache16, None, None, None, None)
        if _backends.available_backends(np)["numba"] is None:
            assert _backends.select(prob16, {}, "auto", op="decode").__name__.endswith(
                "numpy_.decode")


# -- bad input -----------------------------------------------------------------------------


def test_append_past_max_len_writes_nothing(rng):
    for page_size in (None, 8):
        cache = xattn.KVCache(2, 2, 20, 16, dtype=F32, page_size=page_size)
        k = random_array(rng, (2, 2, 15, 16), F32)
        cache.append(k, k, lengths=[15, 3])
        before = (cache.k_cache.copy(), cache.v_cache.copy(), cache.block_table,
                  cache.free_pages)
        with pytest.raises(ValueError, match="max_len=20.*nothing was written"):
            cache.append(k[:, :, :6], k[:, :, :6])  # sequence 1 fits, sequence 0 does not
        assert cache.lengths.tolist() == [15, 3]
        np.testing.assert_array_equal(cache.k_cache, before[0])
        np.testing.assert_array_equal(cache.v_cache, before[1])
        if page_size:
            np.testing.assert_array_equal(cache.block_table, before[2])
            assert cache.free_pages == before[3]
        cache.append(k[:, :, :5], k[:, :, :5])  # exactly full
        assert cache.lengths.tolist() == [20, 8]


def test_append_errors(rng):
    cache = xattn.KVCache(2, 2, 20, 16, dtype=F32)
    k = random_array(rng, (2, 2, 3, 16), F32)
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 2, 3, 16\)"):
        cache.append(random_array(rng, (2, 4, 3, 16), F32), k)  # wrong head count
    with pytest.raises(ValueError, match="v: expected shape"):
        cache.append(k, k[:, :, :, :8])
    with pytest.raises(TypeError, match="k: expected the cache's dtype float32, got float64"):
        cache.append(k.astype(F64), k.astype(F64))
    with pytest.raises(ValueError, match="4 dims"):
        cache.append(k[0], k[0])
    with pytest.raises(TypeError, match="numpy.ndarray or cupy.ndarray"):
        cache.append(k.tolist(), k)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 3\]"):
        cache.append(k, k, lengths=[4, 1])
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
        cache.append(k, k, lengths=[1])
    with pytest.raises(TypeError, match="lengths: expected integers"):
        cache.append(k, k, lengths=[1.5, 1])
    assert cache.lengths.tolist() == [0, 0]


def test_constructor_errors():
    with pytest.raises(TypeError, match="dtype: expected a floating dtype"):
        xattn.KVCache(1, 1, 8, 8, dtype=np.int32)
    with pytest.raises(ValueError, match="max_len: expected a positive int"):
        xattn.KVCache(1, 1, 0, 8, dtype=F32)
    with pytest.raises(TypeError, match="kv_heads: expected a positive int"):
        xattn.KVCache(1, 2.0, 8, 8, dtype=F32)
    with pytest.raises(ValueError, match="num_pages: only meaningful with page_size"):
        xattn.KVCache(1, 1, 8, 8, dtype=F32, num_pages=4)
    with pytest.raises(TypeError, match="xp: expected the numpy or cupy module"):
        xattn.KVCache(1, 1, 8, 8, dtype=F32, xp=pytest)
    with pytest.raises(IndexError, match="batch_index"):
        xattn.KVCache(2, 1, 8, 8, dtype=F32).reset(2)


def test_decode_errors(rng):
    cache = _filled(rng, F32, lengths=(5, 5))
    q = random_array(rng, (2, 4, 1, 16), F32)
    with pytest.raises(TypeError, match="q: expected the cache's dtype float32, got float64"):
        xattn.decode_attention(q.astype(F64), cache)
    with pytest.raises(ValueError, match=r"multiple of the cache's kv_heads \(2\)"):
        xattn.decode_attention(q[:, :3], cache)
    with pytest.raises(ValueError, match="batch 2"):
        xattn.decode_attention(q[:1], cache)
    with pytest.raises(ValueError, match="head_dim 16"):
        xattn.decode_attention(q[..., :8], cache)
    with pytest.raises(ValueError, match="4 dims"):
        xattn.decode_attention(q[0], cache)
    with pytest.raises(ValueError, match="at least one query token"):
        xattn.decode_attention(q[:, :, :0], cache)
    with pytest.raises(TypeError, match="cache: expected an xattn.KVCache"):
        xattn.decode_attention(q, q)
    with pytest.raises(ValueError, match="alibi_slopes: expected shape"):
        xattn.decode_attention(q, cache, alibi_slopes=np.ones(3, F32))
    torch = pytest.importorskip("torch")
    # Another array library (and likewise a CuPy q for a NumPy cache) is refused, not copied.
    with pytest.raises(TypeError, match="numpy.ndarray or cupy.ndarray"):
        xattn.decode_attention(torch.from_numpy(q), cache)


@pytest.mark.gpu
def test_cupy_cache_refuses_numpy_query(rng):
    cupy = pytest.importorskip("cupy")
    cache = xattn.KVCache(1, 1, 8, 8, dtype=F32, xp=cupy)
    q = random_array(rng, (1, 1, 1, 8), F32)
    with pytest.raises(TypeError, match="never copies"):
        xattn.decode_attention(q, cache)
    with pytest.raises(TypeError, match="never copies"):
        cache.append(q, q)


def test_device_meta_is_copied_once_per_change():
    """The kernels' copies of lengths and block table: reused while the cache is unchanged,
    renewed by every append and reset, and always equal to the host state."""
    cache = xattn.KVCache(2, 1, 64, 8, dtype=np.float32, page_size=16, num_pages=8)
    kv = np.ones((2, 1, 20, 8), np.float32)

    def check():
        k, v, table, lengths, ps = cache._device_meta()
        assert ps == 16 and k is cache.k_cache and v is cache.v_cache
        np.testing.assert_array_equal(table, cache._pool()[2])
        np.testing.assert_array_equal(lengths, cache.lengths)
        return table, lengths

    cache.append(kv, kv)
    first = check()
    again = check()
    assert first[0] is again[0] and first[1] is again[1]  # no new copy: nothing changed
    cache.append(kv[:, :, :3], kv[:, :, :3], lengths=[3, 0])
    assert check()[1] is not first[1]
    cache.reset(0)
    table, lengths = check()
    assert lengths.tolist() == [0, 20]
