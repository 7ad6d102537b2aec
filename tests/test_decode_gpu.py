"""The CuPy split-KV decode kernel (decode_splitkv.cu, backend="cupy.decode") against the
float64 oracle on the cache contents, its in-kernel split merge (ticket counters) and its
launch through the prebuilt cuLaunchKernel argument block (a default call must take it). GPU
tests skip without CuPy and a device; the split heuristic, the table entry, the argument
block's layout and the function-handle lookup are checked everywhere."""

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


def test_block_cap_keeps_pairs_within_the_merge():
    # Runs of W tiles cut a pair of n tiles into at most ceil(n / W) + 1 segments.
    for total, n in ((592, 250), (10**6, 8192), (8192 * 8, 8192), (5, 3)):
        nb = cupy_decode.max_blocks(total, n)
        w = -(-total // nb)
        assert -(-n // w) + 1 <= cupy_decode._MAX_SPLITS
    assert cupy_decode.max_blocks(592, 250) == 592  # W = 1 tile still fits
    assert cupy_decode.max_blocks(0, 1) == 1


def test_seq_tiles_matches_the_kernel_rule():
    # 16-key tiles from 0, or from the window's first key rounded down to a multiple of 16;
    # a sequence without keys still owns one tile.
    assert list(cupy_decode.seq_tiles([0, 1, 16, 17, 4096], 1, -1)) == [1, 1, 1, 2, 256]
    # T = 1, left 100, L = 1000: keys 899 .. 999, tiles from 896: 7 tiles.
    assert list(cupy_decode.seq_tiles([1000, 50, 3], 1, 100)) == [7, 4, 1]
    assert list(cupy_decode.seq_tiles([3], 4, -1)) == [1]  # fewer keys than queries


def _schedule(tiles, hr, nb):
    """The kernel's partition (decode_core in decode_splitkv.cu), written out in Python:
    for every block, its segments as (pair, first tile, end tile, slot, first slot, count)."""
    spans = [hr * n for n in tiles]
    total = sum(spans)
    w = -(-total // nb)
    out = []
    for i in range(nb):
        start, end = i * w, min(i * w + w, total)
        segs, base, cur = [], 0, start
        for b, n in enumerate(tiles):
            while base <= cur < min(end, base + spans[b]):
                y = (cur - base) // n
                p0 = base + y * n
                s1 = min(end, p0 + n)
                first, last = p0 // w, (p0 + n - 1) // w
                p = b * hr + y
                segs.append((p, cur - p0, s1 - p0, p + i, p + first, last - first + 1))
                cur = s1
            base += spans[b]
        out.append(segs)
    return out


@pytest.mark.parametrize(("tiles", "hr", "nb"), [
    ((256,) * 16, 8, 132), ((2048,), 8, 132), ((250, 44, 2), 2, 512), ((1, 3, 1), 4, 64),
    ((7, 1, 300, 2, 2), 3, 5), ((8192,) * 64, 8, 396)])
def test_schedule_covers_every_pair_once(tiles, hr, nb):
    """Every pair's tiles are read exactly once; a pair's segments count what the kernel
    expects (the merge waits for that many tickets); slots are distinct and their range is
    what the launcher allocates; no pair has more segments than the merge holds."""
    sched = _schedule(tiles, hr, nb)
    seen = {}
    for segs in sched:
        for p, t0, t1, slot, slot0, nseg in segs:
            seen.setdefault(p, []).append((t0, t1, slot, slot0, nseg))
    pairs = len(tiles) * hr
    assert sorted(seen) == list(range(pairs))
    slots = [s for v in seen.values() for _, _, s, _, _ in v]
    assert len(slots) == len(set(slots)) and max(slots) < pairs + nb - 1
    for p, v in seen.items():
        n = tiles[p // hr]
        v.sort()
        assert v[0][0] == 0 and v[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(v[:-1], v[1:], strict=True))
        assert all(x[4] == len(v) and x[3] == v[0][2] for x in v)
        assert [x[2] for x in v] == list(range(v[0][2], v[0][2] + len(v)))
        assert len(v) <= cupy_decode._MAX_SPLITS


def test_resident_blocks():
    # H100: 64K registers, 228 KiB of shared memory, 2048 threads per SM. Four warps with two
    # stages (69.6 KB of shared memory) allow 3 blocks; 255 registers a thread would allow 2.
    smem = cupy_decode.smem_bytes(128, (4, 2))
    assert cupy_decode.resident_blocks(128, smem, 65536, 233472, 2048) == 3
    assert cupy_decode.resident_blocks(255, smem, 65536, 233472, 2048) == 2
    assert cupy_decode.resident_blocks(32, 0, 65536, 233472, 2048) == 16
    # Three stages: 108.8 KB, 2 blocks; two warps of four stages: 3 blocks by shared memory.
    assert cupy_decode.resident_blocks(166, cupy_decode.smem_bytes(128, (4, 3)), 65536, 233472,
                                       2048) == 2
    assert cupy_decode.resident_blocks(162, cupy_decode.smem_bytes(128, (2, 4)), 65536, 233472,
                                       2048, 2) == 3


def test_instances_and_shared_memory():
    """Every (warps, stages) candidate is built for both dtypes (tools/check_kernels.py
    compiles them spill-free), no separate merge kernel is left, and the shared memory is the
    Q tile plus each warp's ring of K and V tiles."""
    from xattn._backends.cupy_ import instances

    names = [n for i in instances.shipped() for n in i.names if n.startswith("decode_")]
    assert len(names) == len(set(names))
    for d in instances.DECODE_HEAD_DIMS:
        for nw, st, *kind in (instances.DECODE[d], *instances.DECODE_EXTRA.get(d, ())):
            k = kind[0] if kind else "s"
            for tn in ("f16", "bf16"):
                assert f"decode_splitkv_{tn}_d{d}_w{nw}_{k}{st}" in names
            if k == "s":
                assert cupy_decode.smem_bytes(d, (nw, st)) == (16 * (d + 8)
                                                              + nw * st * 2 * 16 * (d + 8)) * 2
            else:  # the register path: the merges' floats (the Q fragments' copies, half
                # of the warps' states, fit in the same space)
                assert cupy_decode.smem_bytes(d, (nw, st, k)) == max(
                    nw * 16 * (d + 2) * 4, (512 * 16 + 16) * 4) >= nw * d // 16 * 512
    assert not [n for n in names if n.startswith("decode_combine")]
    assert cupy_decode.smem_bytes(128) == cupy_decode.smem_bytes(128, instances.DECODE[128])
    # The register path (8, 0, "r") serves D=128; (8, 2), the shared-memory ring it replaced,
    # stays a candidate.
    assert instances.DECODE[128] == (8, 0, "r") and (8, 2) in instances.DECODE_EXTRA[128]
    # The split count leaves each of the block's warps at least 4 tiles.
    assert cupy_decode.num_splits(1, 1, 1, 64, 132, 3, 2) == 8
    assert cupy_decode.num_splits(1, 1, 1, 64, 132, 3, 8) == 2


def test_block_cap_matches_the_kernel():
    """The merging block keeps one weight per (segment, row) in shared memory sized by the
    kernel's XATTN_DECODE_MAX_SPLITS: the launcher's block cap (max_blocks) keeps every pair
    within that many segments."""
    import re

    from xattn._backends.cupy_._compile import source

    m = re.search(r"#define XATTN_DECODE_MAX_SPLITS (\d+)", source("decode_splitkv.cu"))
    assert m is not None and int(m.group(1)) == cupy_decode._MAX_SPLITS


def test_function_handle():
    """The CUfunction handle of what compiled_function returns: a bare Function's .ptr, a
    cupy.RawKernel's .kernel.ptr (a RawKernel has no .ptr: looking only for .ptr left the
    fast launch off), through the debug-logging wrapper too; None where neither exists."""
    from types import SimpleNamespace

    from xattn._backends.cupy_._compile import _Logged

    function = SimpleNamespace(ptr=1234)
    raw_kernel = SimpleNamespace(kernel=SimpleNamespace(ptr=5678), num_regs=100)
    assert cupy_decode.function_handle(function) == 1234
    assert cupy_decode.function_handle(raw_kernel) == 5678
    assert cupy_decode.function_handle(_Logged("k", raw_kernel)) == 5678
    assert cupy_decode.function_handle(_Logged("k", function)) == 1234
    assert cupy_decode.function_handle(SimpleNamespace(num_regs=1)) is None
    assert cupy_decode.function_handle(SimpleNamespace(kernel=SimpleNamespace(ptr=0))) is None


def test_auto_takes_the_kernel_before_generic():
    """Checked against the oracle on an H100 (2026-12-05), the kernel is auto's decode path on
    CuPy; what it refuses (float32, other head dims) goes on to generic."""
    order = _backends._PREFERENCE["gpu"]
    assert order.index("cupy.decode") < order.index("generic")
    assert "cupy.decode" not in _backends.OPT_IN


def _cases():
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128):
            yield pytest.param(dtype, d, id=f"{dtype}-d{d}")


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "d"), list(_cases()))
@pytest.mark.parametrize(("hq", "hkv"), [(8, 8), (32, 8), (16, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("page_size", [None, 16, 7])  # 7: tiles straddle pages
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


def _fill(rng, cache, lengths, dtype):
    B, hkv, d = cache.batch, cache.kv_heads, cache.head_dim
    k = cupy_array(rng.standard_normal((B, hkv, max(lengths), d)), dtype)
    v = cupy_array(rng.standard_normal((B, hkv, max(lengths), d)), dtype)
    cache.append(k, v, lengths=list(lengths))


def _check(cache, q, out, lse, name="", **options):
    import cupy

    ref_opts = {key: (to_numpy(val) if hasattr(val, "shape") else val)
                for key, val in options.items()}
    for b in range(cache.batch):
        K, V = cache.sequence(b)
        opts_b = dict(ref_opts)
        if getattr(opts_b.get("alibi_slopes"), "ndim", 1) == 2:  # (B, Hq): this sequence's
            opts_b["alibi_slopes"] = opts_b["alibi_slopes"][b]
        ref, ref_lse, _ = reference_attention(q[b], K, V, causal=True, **opts_b)
        naive = naive_attention(q[b], K, V, causal=True, **opts_b)
        assert_close(out[b], ref, xp=cupy, dtype=q.dtype, naive=naive, name=f"{name} out[{b}]")
        if lse is not None:
            assert_close(lse[b], ref_lse, xp=cupy, dtype=np.float32, atol=1e-3, rtol=1e-3,
                         name=f"{name} lse[{b}]")


def _configs(default=False, register_only=False):
    """(head dim, configuration) of the candidates (and the defaults, with ``default``), or of
    the register-path ones only."""
    from xattn._backends.cupy_ import instances

    for d in instances.DECODE_HEAD_DIMS:
        for cfg in ((instances.DECODE[d],) if default else ()) + instances.DECODE_EXTRA.get(d, ()):
            if not register_only or len(cfg) == 3:
                yield pytest.param(d, cfg, id=f"d{d}-" + "-".join(map(str, cfg)))


@pytest.mark.gpu
@pytest.mark.parametrize(("d", "cfg"), list(_configs()))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("page_size", [None, 16, 24])
@pytest.mark.parametrize("window", [None, (100, None)])
def test_every_instance_matches_oracle(rng, d, cfg, dtype, T, page_size, window):
    """The candidates the benchmark times beside the default (other warps and stages), on
    ragged lengths, paged (24: tiles straddle pages) and windowed, in both 16-bit types."""
    cupy = pytest.importorskip("cupy")
    from xattn.kvcache import _validate_decode

    rt = cupy.cuda.runtime
    optin = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97),
                                  rt.getDevice())
    if cupy_decode.smem_bytes(d, cfg) + 16 > optin:
        pytest.skip(f"{cfg} needs {cupy_decode.smem_bytes(d, cfg)} bytes of shared memory a "
                    f"block, this device allows {optin}")
    cache = xattn.KVCache(3, 8, 1536, d, dtype=cupy_array(np.zeros(1), dtype).dtype, xp=cupy,
                          page_size=page_size)
    _fill(rng, cache, (1500, 333, 2), dtype)
    q = cupy_array(rng.standard_normal((3, 32, T, d)), dtype)
    prob = _validate_decode(q, cache, window, None, None, None)
    out, lse = cupy_decode.decode(prob, q, cache, config=cfg)
    _check(cache, q, out, lse, name=str(cfg), window=window)


@pytest.mark.gpu
@pytest.mark.parametrize(("d", "cfg"), list(_configs(default=True, register_only=True)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("splits", [None, 1, 3, 40])
@pytest.mark.parametrize("page_size", [None, 24])
def test_register_path_options(rng, d, cfg, dtype, splits, page_size):
    """The register path (K/V straight into registers, Q and K in a permuted head-dim order,
    V transposed by movmatrix, the output in ColsRegs's column order): GQA with T = 2,
    softcap and ALiBi, one split and several, a page size that tiles straddle."""
    cupy = pytest.importorskip("cupy")
    from xattn.kvcache import _validate_decode

    cache = xattn.KVCache(2, 4, 3072, d, dtype=cupy_array(np.zeros(1), dtype).dtype, xp=cupy,
                          page_size=page_size)
    _fill(rng, cache, (3000, 41), dtype)
    q = cupy_array(rng.standard_normal((2, 16, 2, d)), dtype)
    slopes = cupy.asarray(rng.uniform(0.01, 0.1, 16).astype(np.float32))
    prob = _validate_decode(q, cache, None, slopes, 5.0, None)
    out, lse = cupy_decode.decode(prob, q, cache, alibi_slopes=slopes, splits=splits,
                                  config=cfg)
    _check(cache, q, out, lse, name=f"{cfg} {dtype} splits={splits}", softcap=5.0,
           alibi_slopes=slopes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("splits", [None, 1, 3, 40])
@pytest.mark.parametrize("page_size", [None, 24])
def test_shared_memory_ring_d128(rng, dtype, splits, page_size):
    """The shared-memory ring (8, 2), D=128's default before the register path: both 16-bit
    types, one split (no merge), several (the in-kernel merge) and the heuristic's count, GQA
    with T = 2, softcap and ALiBi."""
    cupy = pytest.importorskip("cupy")
    from xattn.kvcache import _validate_decode

    cache = xattn.KVCache(2, 4, 3072, 128, dtype=cupy_array(np.zeros(1), dtype).dtype, xp=cupy,
                          page_size=page_size)
    _fill(rng, cache, (3000, 41), dtype)
    q = cupy_array(rng.standard_normal((2, 16, 2, 128)), dtype)
    slopes = cupy.asarray(rng.uniform(0.01, 0.1, 16).astype(np.float32))
    prob = _validate_decode(q, cache, None, slopes, 5.0, None)
    out, lse = cupy_decode.decode(prob, q, cache, alibi_slopes=slopes, splits=splits,
                                  config=(8, 2))
    _check(cache, q, out, lse, name=f"{dtype} splits={splits}", softcap=5.0,
           alibi_slopes=slopes)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 5, 37, 128, 512])
@pytest.mark.parametrize("lengths", [(4000, 700, 17), (5, 40, 1), (2500, 2500, 2500), (2, 2, 2)])
@pytest.mark.parametrize("page_size", [32, None])
def test_forced_split_counts(rng, splits, lengths, page_size):
    """One block (it writes every pair's output), several (runs that cut pairs: the lse merge,
    runs that span sequences), up to the cap: pairs in hundreds of segments, and more blocks
    than tiles (blocks past the list's end do nothing); ragged lengths (the blocks scan them)
    and equal ones (the blocks find their tiles by division), paged and contiguous (sequence
    b is page b, no table read)."""
    cupy = pytest.importorskip("cupy")
    from xattn.kvcache import _validate_decode

    cache = xattn.KVCache(3, 2, 4096, 128, dtype=np.float16, xp=cupy, page_size=page_size)
    _fill(rng, cache, lengths, "float16")
    q = cupy_array(rng.standard_normal((3, 8, 2, 128)), "float16")
    prob = _validate_decode(q, cache, None, None, None, None)
    out, lse = cupy_decode.decode(prob, q, cache, splits=splits)
    _check(cache, q, out, lse, name=f"splits={splits}")
    (plan,) = cache._launch_plans().values()
    # The last two scalars: the common length (-1: ragged), contiguous or not.
    assert int(plan.tail[-2]) == (lengths[0] if len(set(lengths)) == 1 else -1)
    assert int(plan.tail[-1]) == (page_size is None)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 24, 7])
@pytest.mark.parametrize("T", [1, 4])
def test_paged_equals_contiguous_exactly(rng, page_size, T):
    """The same tokens in a contiguous and a paged cache give the same bits: the tiles, the
    split count and the order of every sum are the layout's business only in the addresses."""
    cupy = pytest.importorskip("cupy")
    lengths = (3000, 1234, 5)
    caches = [xattn.KVCache(3, 8, 3072, 128, dtype=np.float16, xp=cupy, page_size=ps)
              for ps in (None, page_size)]
    k = cupy_array(rng.standard_normal((3, 8, max(lengths), 128)), "float16")
    v = cupy_array(rng.standard_normal((3, 8, max(lengths), 128)), "float16")
    for c in caches:
        c.append(k, v, lengths=list(lengths))
    q = cupy_array(rng.standard_normal((3, 32, T, 128)), "float16")
    slopes = cupy.asarray(rng.uniform(0.01, 0.1, 32).astype(np.float32))
    for opts in ({}, {"window": (500, None)}, {"softcap": 3.0, "alibi_slopes": slopes}):
        a, la = xattn.decode_attention(q, caches[0], return_lse=True, **opts)
        b, lb = xattn.decode_attention(q, caches[1], return_lse=True, **opts)
        assert bool((a == b).all()) and bool((la == lb).all()), opts
    _check(caches[1], q, b, lb, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize(("page_size", "max_len"), [(None, 520), (16, 512), (8, 520)])
def test_ring_buffer(rng, page_size, max_len):
    """A ring buffer (KVCache(window=W)) past its capacity: the unrolled block table wraps
    the slots; a tile that straddles the wrap (max_len 520, page 8) takes the per-row path."""
    cupy = pytest.importorskip("cupy")
    cache = xattn.KVCache(2, 2, max_len, 64, dtype=np.float16, xp=cupy, page_size=page_size,
                          window=300)
    for _ in range(3):
        _fill(rng, cache, (400, 250), "float16")
    q = cupy_array(rng.standard_normal((2, 8, 3, 64)), "float16")
    out, lse = xattn.decode_attention(q, cache, return_lse=True, backend="cupy.decode")
    _check(cache, q, out, lse, window=(300, None))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("page_size", [None, 16])
def test_every_sequence_empty(d, page_size):
    """Every length 0 (the equal-length launch with a common length of 0): each row sees no
    key, so its output is 0 and its lse -inf, on the default instance of each head dim."""
    cupy = pytest.importorskip("cupy")
    cache = xattn.KVCache(3, 2, 64, d, dtype=np.float16, xp=cupy, page_size=page_size)
    q = cupy.ones((3, 8, 1, d), dtype=np.float16)
    out, lse = xattn.decode_attention(q, cache, return_lse=True, backend="cupy.decode")
    assert bool((out == 0).all())
    assert bool(cupy.isneginf(lse).all())


@pytest.mark.gpu
def test_plans_follow_the_cache(rng):
    """The launch plan (split count, grid, arguments) is renewed by every append and reset;
    without return_lse no lse is written and the output is the same bits; a non-contiguous q
    is read as its values."""
    cupy = pytest.importorskip("cupy")
    cache = xattn.KVCache(2, 2, 2048, 128, dtype=np.float16, xp=cupy, page_size=16)
    _fill(rng, cache, (40, 3), "float16")
    for step in range(3):
        q = cupy_array(rng.standard_normal((2, 8, 1, 128)), "float16")
        out, lse = xattn.decode_attention(q, cache, return_lse=True)
        again = xattn.decode_attention(q, cache)
        assert bool((out == again).all())
        _check(cache, q, out, lse, name=f"step {step}")
        _fill(rng, cache, (600, 1), "float16")  # more splits, new pages
    cache.reset(0)
    _fill(rng, cache, (5, 0), "float16")
    qt = cupy_array(rng.standard_normal((2, 4, 8, 128)), "float16").transpose(0, 2, 1, 3)
    out, lse = xattn.decode_attention(qt, cache, return_lse=True)
    _check(cache, qt, out, lse, name="after reset, transposed q")


@pytest.mark.gpu
@pytest.mark.parametrize("alibi_shape", [None, "heads", "batch"])
def test_fast_launch_equals_cupy_launch(rng, monkeypatch, alibi_shape):
    """The prebuilt cuLaunchKernel argument block (FAST_LAUNCH) passes what CuPy's own launch
    passes: the same bits, one split and several, with and without lse and ALiBi."""
    cupy = pytest.importorskip("cupy")
    assert cupy_decode._driver() is not None, "CuPy's driver binding (launchKernel) is missing"
    cache = xattn.KVCache(2, 2, 2048, 64, dtype=np.float16, xp=cupy, page_size=16)
    _fill(rng, cache, (2000, 30), "float16")
    q = cupy_array(rng.standard_normal((2, 8, 2, 64)), "float16")
    opts = {}
    if alibi_shape is not None:
        shape = (8,) if alibi_shape == "heads" else (2, 8)
        opts["alibi_slopes"] = cupy.asarray(rng.uniform(0.01, 0.1, shape))  # float64: copied
    got = {}
    for fast in (True, False):
        monkeypatch.setattr(cupy_decode, "FAST_LAUNCH", fast)
        from xattn.kvcache import _validate_decode

        prob = _validate_decode(q, cache, None, opts.get("alibi_slopes"), None, None)
        for splits in (1, 6):
            out, lse = cupy_decode.decode(prob, q, cache, splits=splits, **opts)
            bare, none = cupy_decode.decode(prob, q, cache, splits=splits, need_lse=False,
                                            **opts)
            assert none is None and bool((bare == out).all())
            got[fast, splits] = (out, lse)
    for splits in (1, 6):
        (a, la), (b, lb) = got[True, splits], got[False, splits]
        assert bool((a == b).all()) and bool((la == lb).all()), splits
        # The fast path had an argument block to launch with (it once silently had none).
        assert any(p.args is not None and p.splits == splits
                   for p in cache._launch_plans().values()), splits
    ref_opts = {k: v.astype(np.float32) for k, v in opts.items()}
    _check(cache, q, *got[True, 6], **ref_opts)


def test_launch_argument_block_matches_the_kernel_signature():
    """The prebuilt cuLaunchKernel block: parameter i of XATTN_DECODE_PARAMS (read from the
    kernel file) points at a value of its C type holding what CuPy's launch would pass."""
    import ctypes
    import re
    import struct

    from xattn._backends.cupy_._compile import source

    text = source("decode_splitkv.cu")
    body = text[text.index("#define XATTN_DECODE_PARAMS"):text.index("#define XATTN_DECODE_ARGS")]
    params = re.findall(r"(const unsigned short \*|unsigned short \*|const int \*|int \*|"
                        r"float \*|const float \*|long long|int|float)\s*(\w+)",
                        body.replace("\\", ""))
    fmt = {"long long": "q", "int": "i", "float": "f"}
    kinds = [fmt.get(t, "Q") for t, _ in params]
    assert [n for _, n in params][9] == "counters"
    assert len(kinds) == len(cupy_decode._PARAM_AT) == 24
    # k, v, table, lengths; batch, hq, hkv, T, page_size, max_pages, splits; scale,
    # softcap; wl, uniform, contiguous.
    fixed = (11, 12, 13, 14, 3, 32, 8, 1, 4096, 300, 2, 0.25, 1.5, -1, 77, 1)
    block = cupy_decode._ArgBlock(fixed)
    # q, out, lse, partial outputs, partial lse, ALiBi slopes, ticket counters, ALiBi batch
    # stride.
    cupy_decode._PER_CALL.pack_into(block.buf, 0, 101, 105, 106, 107, 108, 119, 109, 32)
    expected = (101, 11, 12, 13, 14, 105, 106, 107, 108, 109, 3, 32, 8, 1, 4096, 300, 2, 0.25,
                1.5, -1, 77, 1, 119, 32)
    for i, (kind, want) in enumerate(zip(kinds, expected, strict=True)):
        size = struct.calcsize("<" + kind)
        raw = ctypes.string_at(block.array[i], size)
        assert struct.unpack("<" + kind, raw)[0] == want, (i, params[i], want)


@pytest.mark.gpu
def test_fast_launch_from_a_new_thread(rng):
    """A thread whose first CUDA work is a decode call (the driver-API launch needs the
    runtime's context bound to the thread) gets the main thread's bits."""
    import threading

    cupy = pytest.importorskip("cupy")
    cache = xattn.KVCache(1, 2, 512, 64, dtype=np.float16, xp=cupy)
    _fill(rng, cache, (300,), "float16")
    q = cupy_array(rng.standard_normal((1, 8, 1, 64)), "float16")
    want = xattn.decode_attention(q, cache)
    got = {}

    def work():
        try:
            got["out"] = xattn.decode_attention(q, cache)
            cupy.cuda.Device().synchronize()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            got["error"] = exc

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert "error" not in got, got.get("error")
    assert bool((got["out"] == want).all())


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_default_call_takes_the_fast_launch(rng, monkeypatch, splits):
    """A call as a user makes it (debug logging off) launches through the prebuilt argument
    block, once per call, and never through CuPy's launch (the compiled function's wrapper):
    the test fails if the fast path silently falls back."""
    cupy = pytest.importorskip("cupy")
    import logging

    from xattn._backends.cupy_ import _compile
    from xattn.kvcache import _validate_decode

    assert not logging.getLogger("xattn").isEnabledFor(logging.DEBUG)
    counts = {"fast": 0, "cupy": 0}
    fast, slow = cupy_decode._launch_fast, _compile._Logged.__call__

    def count_fast(*args, **kwargs):
        counts["fast"] += 1
        return fast(*args, **kwargs)

    def count_slow(self, *args, **kwargs):
        counts["cupy"] += 1
        return slow(self, *args, **kwargs)

    monkeypatch.setattr(cupy_decode, "_launch_fast", count_fast)
    monkeypatch.setattr(_compile._Logged, "__call__", count_slow)
    cache = xattn.KVCache(2, 8, 4096, 128, dtype=np.float16, xp=cupy)
    _fill(rng, cache, (4000, 900), "float16")
    q = cupy_array(rng.standard_normal((2, 32, 1, 128)), "float16")
    if splits is None:
        for _ in range(3):
            out, lse = xattn.decode_attention(q, cache, return_lse=True)
    else:
        prob = _validate_decode(q, cache, None, None, None, None)
        for _ in range(3):
            out, lse = cupy_decode.decode(prob, q, cache, splits=splits)
    assert counts == {"fast": 3, "cupy": 0}, counts
    (plan,) = cache._launch_plans().values()
    assert plan.args is not None and plan.fn_main
    _check(cache, q, out, lse, name="fast launch")


@pytest.mark.gpu
def test_merge_tickets_are_left_zero(rng):
    """Many launches with the in-kernel merge (several splits) on the default stream and on a
    second one: the same bits every time (a counter left off zero would make some block merge
    too early or never), every ticket counter back at 0 afterwards, one array per stream."""
    cupy = pytest.importorskip("cupy")
    from xattn.kvcache import _validate_decode

    cache = xattn.KVCache(3, 2, 2048, 64, dtype=np.float16, xp=cupy, page_size=16)
    _fill(rng, cache, (2000, 333, 5), "float16")
    q = cupy_array(rng.standard_normal((3, 8, 3, 64)), "float16")
    prob = _validate_decode(q, cache, None, None, None, None)
    first, first_lse = cupy_decode.decode(prob, q, cache, splits=9)
    _check(cache, q, first, first_lse, name="9 splits")
    def launches():
        for splits in (9, 2, 9, 128, 9):
            out, lse = cupy_decode.decode(prob, q, cache, splits=splits)
            if splits == 9:
                assert bool((out == first).all()) and bool((lse == first_lse).all())

    launches()  # the default stream
    cupy.cuda.Device().synchronize()
    with cupy.cuda.Stream() as stream:
        launches()
        stream.synchronize()
    cupy.cuda.Device().synchronize()
    dev = cupy.cuda.runtime.getDevice()
    mine = [v for (d, _, _), v in cupy_decode._tickets.items() if d == dev]
    assert len(mine) >= 2
    assert all(int(v.max()) == 0 and int(v.min()) == 0 for v in mine)
