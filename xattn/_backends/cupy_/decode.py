"""CuPy launcher of the split-KV decode kernel (``xattn/kernels/decode_splitkv.cu``).

``auto``'s decode path on CuPy (float16/bfloat16, D = Dv in 64 or 128): its tests against the
float64 oracle (``tests/test_decode_gpu.py``) passed on an H100 and an H200 on 2026-12-05; on
the H200 it read K/V at 0.18-2.72 TB/s (``benchmarks/gpu_decode.py``; docs/inference.rst has
the table and what bounds it).

One thread block per (split of the keys, kv head x row block of 16 packed query rows,
sequence); :func:`num_splits` picks the split count from the batch, the kv heads, the
longest context and the SM count. With more than one split the blocks write float32 partial
results and a second kernel merges them by their lse. The cache's lengths and block table
live on the host (:mod:`xattn.kvcache`); the cache copies those few int32 values to the
device, explicitly, once after each change (``KVCache._device_meta``), not at every call.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import _params, instances
from ._compile import compiled_function

NW = instances.DECODE_WARPS  # warps per block
BN = 16  # keys per warp tile
HEAD_DIMS = instances.DECODE_HEAD_DIMS
# A warp should walk at least this many tiles of its split, or the merge costs more than it
# saves.
_MIN_TILES_PER_WARP = 4
# A split count above the best smaller one must fill this fraction more of the card's block
# slots to be taken (more splits cost a merge and a prologue each).
_GAIN = 0.05
_MAX_SPLITS = 128


def supports(prob, opts, op):
    """``None`` when the kernel serves this request, else the reason it does not."""
    why = _params.half_kernel_reason(prob, op, ("decode", "serves decode_attention only"),
                                     "the kernel")
    if why is not None:
        return why
    if prob.dv != prob.d or prob.d not in HEAD_DIMS:
        return f"head dims D={prob.d}, Dv={prob.dv}: the kernel takes D = Dv in {HEAD_DIMS}"
    if opts:
        return f"options not handled by this backend: {sorted(opts)}"
    cc = _params.compute_capability()
    if cc < 80:
        return f"compute capability {cc} < 80: the kernel uses mma.sync and cp.async"
    return None


def smem_bytes(d):
    """Dynamic shared memory: the Q tile and each warp's two stages of K and V tiles (the
    warps' merge reuses the K/V space)."""
    ld = d + 8
    return (16 * ld + NW * 4 * BN * ld) * 2


@functools.lru_cache(maxsize=512)  # a pure function of ints, on every decode call's path
def num_splits(batch, hkv, row_blocks, max_tiles, sm_count, per_sm=1):
    """Splits of each sequence's keys. Every block does the same work, so the blocks run in
    waves of ``sm_count * per_sm`` (the resident blocks the card holds); a last wave that is
    partly empty leaves bandwidth idle (64 sequences x 8 kv heads = 512 blocks on 396 slots of
    an H100 ran at 0.69 of copy bandwidth). The count taken fills the waves best, the fewest
    splits among counts within a factor ``1 + _GAIN`` of each other, and leaves every warp at least
    ``_MIN_TILES_PER_WARP`` tiles."""
    blocks = batch * hkv * row_blocks
    if blocks == 0:
        return 1
    slots = max(1, sm_count * per_sm)
    cap = int(max(1, min(_MAX_SPLITS, max_tiles // (_MIN_TILES_PER_WARP * NW))))
    best, best_fill = 1, 0.0
    for s in range(1, cap + 1):
        total = blocks * s
        fill = total / (-(-total // slots) * slots)
        if fill > best_fill * (1 + _GAIN):
            best, best_fill = s, fill
    return best


def blocks_per_sm(fn, d):
    """Resident blocks of the decode kernel per SM, from its registers (``num_regs`` of the
    CuPy kernel) and shared memory against the device's limits, once per device, head dim
    and kernel."""
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    key = (dev, d, fn.num_regs)
    hit = _occupancy.get(key)
    if hit is None:
        rt = cupy.cuda.runtime

        def attr(name, number):  # the CUDA enum's number where CuPy lacks the name
            return rt.deviceGetAttribute(getattr(rt, "cudaDevAttr" + name, number), dev)

        hit = _occupancy[key] = resident_blocks(
            fn.num_regs, smem_bytes(d), attr("MaxRegistersPerMultiprocessor", 82),
            attr("MaxSharedMemoryPerMultiprocessor", 81),
            attr("MaxThreadsPerMultiProcessor", 39))
    return hit


def resident_blocks(regs, smem, regs_per_sm, smem_per_sm, threads_per_sm):
    """Blocks of ``NW`` warps an SM holds at once: registers are given out per warp in units
    of 256, each block's shared memory takes 1 KiB more for the system (sm_80 and sm_90)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // per_warp // NW
    by_smem = smem_per_sm // (smem + 1024)
    by_threads = threads_per_sm // (NW * 32)
    return max(1, min(by_regs, by_smem, by_threads, 32))


_occupancy: dict = {}


def _functions(type_name, d):
    inst = instances.decode(type_name, d, NW)
    main = compiled_function(inst.source, inst.names[0], inst.defines, smem_bytes(d))
    combine = compiled_function(inst.source, inst.names[1], inst.defines, 0)
    return main, combine


def decode(prob, q, cache, *, alibi_slopes=None, splits=None):
    """Return ``(out, lse)`` of :func:`xattn.decode_attention`. ``splits`` overrides
    :func:`num_splits` (``benchmarks/gpu_decode.py --sweep`` times the choices with it)."""
    import cupy as cp

    B, Hq, Hkv, T, D = prob.batch, prob.hq, prob.hkv, prob.sq, prob.d
    kpool, vpool, table_dev, lengths_dev, page_size = cache._device_meta()
    lengths = cache.lengths
    left = -1 if prob.window is None or prob.window[0] is None else prob.window[0]
    R = prob.group * T
    row_blocks = -(-R // 16)
    spans = [n - (max(0, n - T - left) if left >= 0 else 0) for n in lengths.tolist()]
    max_tiles = -(-max(spans, default=0) // BN)
    main, combine = _functions(_params.type_name(prob.dtype), D)
    if splits is None:
        splits = num_splits(B, Hkv, row_blocks, max_tiles, _params.sm_count(),
                            blocks_per_sm(main, D))
    splits = int(max(1, min(int(splits), _MAX_SPLITS, max(1, max_tiles))))

    qc = cp.ascontiguousarray(q)
    out = cp.empty((B, Hq, T, D), dtype=q.dtype)
    lse = cp.empty((B, Hq, T), dtype=cp.float32)
    null = np.uint64(0)
    part_o, part_lse = null, null
    if splits > 1:
        part_o = cp.empty((splits, B, Hq, T, D), dtype=cp.float32)
        part_lse = cp.empty((splits, B, Hq, T), dtype=cp.float32)
    alibi, alibi_bs = null, 0
    if alibi_slopes is not None:
        alibi = cp.ascontiguousarray(cp.broadcast_to(alibi_slopes.astype(cp.float32), (B, Hq)))
        alibi_bs = Hq
    i32, i64, f32 = np.int32, np.int64, np.float32
    args = (qc, kpool, vpool, table_dev, lengths_dev, out, lse, part_o, part_lse,
            i32(B), i32(Hq), i32(Hkv), i32(T), i32(page_size), i32(table_dev.shape[1]),
            i32(splits), f32(prob.scale), f32(prob.softcap or 0.0), i32(left), alibi,
            i64(alibi_bs))
    main(grid=(splits, Hkv * row_blocks, B), block=(NW * 32,), args=args,
         shared_mem=smem_bytes(D))
    if splits > 1:
        total = B * Hq * T * D
        combine(grid=(math.ceil(total / 256),), block=(256,), args=args)
    return out, lse
