"""CuPy launcher of the split-KV decode kernel (``xattn/kernels/decode_splitkv.cu``).

``auto``'s decode path on CuPy (float16/bfloat16, D = Dv in 64 or 128). This version (the
register path by default, the equal-length and contiguous launches) passed its tests against
the float64 oracle (``tests/test_decode_gpu.py``, ``bash tools/gpu_check_decode.sh``) on an
H100 on 2026-12-06, compute-sanitizer clean; docs/inference.rst has the tables.

The work is the list of every pair's key tiles (a pair: sequence, kv head, row block of 16
packed query rows); the kernel deals it out to the blocks of a one-dimensional grid in equal
runs (the runs follow the lengths: a long sequence gets more blocks). :func:`num_splits`
picks the blocks, ``pairs * splits``, from the batch, the kv heads, the longest context and
the SM count: with equal lengths every block reads one whole split of one pair. A pair cut
between blocks leaves float32 partial results, and the last of its blocks
to finish merges them by their lse, counted by a per-(device, stream) int32 ticket array that
the merging blocks leave zeroed: one launch per call. The cache's lengths and block table
live on the host (:mod:`xattn.kvcache`); the cache copies those few int32 values to the
device, explicitly, once after each change (``KVCache._device_meta``), not at every call.
The plan also tells the kernel when every length is equal (it then finds each block's tiles
by division, without reading the lengths first) and when the cache is contiguous (sequence b
is page b: no block-table read before a tile's loads).
"""

from __future__ import annotations

import functools
import logging
import struct
import threading

import numpy as np

from . import _params, instances
from ._compile import compiled_function

BN = 16  # keys per warp tile
HEAD_DIMS = instances.DECODE_HEAD_DIMS
# A warp should walk at least this many tiles of its split, or the merge costs more than it
# saves.
_MIN_TILES_PER_WARP = 4
# A split count above the best smaller one must fill this fraction more of the card's block
# slots to be taken (more splits cost a merge and a prologue each).
_GAIN = 0.05
_SPLITS_CAP = 128  # most splits per pair the heuristic takes
_MAX_SPLITS = 512  # the kernel's XATTN_DECODE_MAX_SPLITS: most segments of one pair (its
# merge keeps a weight per segment)
# decode_attention passes need_lse (False: no lse array is made or written).
DECODE_LSE_OPTIONAL = True


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


def default_config(d):
    """The configuration (``(warps, stages)`` or ``(warps, prefetch, "r")``) the launcher takes
    for head dim ``d``."""
    return instances.DECODE[d]


def smem_bytes(d, cfg=None):
    """Dynamic shared memory: the Q tile and each warp's ring of ``stages`` K and V tiles
    (the warps' merge reuses the K/V space); on the register path the warps' copies of the Q
    fragments, then what the merges need (the warps' float32 states, the segments' weights)
    in the same space."""
    nw, st, *kind = cfg or default_config(d)
    if kind[:1] == ["r"]:
        # The warps' states (16 rows of D + 2 floats a warp) hold twice the bytes of the warps'
        # Q fragments (16 rows of D 16-bit values), so the merge's size covers both.
        return max(nw * 16 * (d + 2) * 4, (_MAX_SPLITS * 16 + 16) * 4)
    ld = d + 8
    return (16 * ld + nw * st * 2 * BN * ld) * 2


def seq_tiles(lengths, T, left):
    """Key tiles of sequences of ``lengths`` tokens (an int array), as the kernel counts them
    (``seq_tiles`` in decode_splitkv.cu): from the window's first key rounded down to a
    multiple of BN, at least one (a sequence without keys still owns a tile, so that its rows
    are written)."""
    n = np.asarray(lengths, dtype=np.int64)
    lo = np.maximum(0, n - T - left) // BN * BN if left >= 0 else np.zeros_like(n)
    return np.where(n > lo, -(-(n - lo) // BN), 1)


@functools.lru_cache(maxsize=512)  # a pure function of ints, on every new plan's path
def num_splits(batch, hkv, row_blocks, max_tiles, sm_count, per_sm=1, nw=4):
    """Splits of each pair's keys: the launch takes ``pairs * splits`` blocks. With equal
    lengths each block then reads one whole split of one pair, so the blocks run in waves of
    ``sm_count * per_sm`` (the resident blocks the card holds); a last wave that is partly
    empty leaves bandwidth idle (64 sequences x 8 kv heads = 512 blocks on 396 slots of an
    H100 ran at 0.69 of copy bandwidth). The count taken fills the waves best, the fewest
    splits among counts within a factor ``1 + _GAIN`` of each other, and leaves every one of
    the ``nw`` warps at least ``_MIN_TILES_PER_WARP`` tiles. (One block per slot with runs
    that cut pairs, which fills every wave, measured slower on an H100: each block then pays
    two segments' prologues and every pair a merge.)"""
    blocks = batch * hkv * row_blocks
    if blocks == 0:
        return 1
    slots = max(1, sm_count * per_sm)
    cap = int(max(1, min(_SPLITS_CAP, max_tiles // (_MIN_TILES_PER_WARP * nw))))
    best, best_fill = 1, 0.0
    for s in range(1, cap + 1):
        total = blocks * s
        fill = total / (-(-total // slots) * slots)
        if fill > best_fill * (1 + _GAIN):
            best, best_fill = s, fill
    return best


def max_blocks(total_tiles, max_tiles):
    """Most blocks a launch may take: a pair of ``max_tiles`` tiles is cut into at most
    ``ceil(max_tiles / W) + 1`` segments by runs of ``W = ceil(total_tiles / blocks)`` tiles,
    which must stay within the kernel's merge (``_MAX_SPLITS`` segments)."""
    w_min = -(-int(max_tiles) // (_MAX_SPLITS - 1))
    return int(max(1, int(total_tiles) // max(1, w_min)))


def blocks_per_sm(fn, d, cfg=None):
    """Resident blocks of the decode kernel per SM, from its registers (``num_regs`` of the
    CuPy kernel) and shared memory against the device's limits, once per device, head dim,
    configuration and kernel."""
    import cupy

    cfg = cfg or default_config(d)
    dev = cupy.cuda.runtime.getDevice()
    key = (dev, d, cfg, fn.num_regs)
    hit = _occupancy.get(key)
    if hit is None:
        rt = cupy.cuda.runtime

        def attr(name, number):  # the CUDA enum's number where CuPy lacks the name
            return rt.deviceGetAttribute(getattr(rt, "cudaDevAttr" + name, number), dev)

        # The static shared memory (the merge's flag) counts beside the dynamic.
        static = int(getattr(fn, "shared_size_bytes", 0) or 0)
        hit = _occupancy[key] = resident_blocks(
            fn.num_regs, smem_bytes(d, cfg) + static, attr("MaxRegistersPerMultiprocessor", 82),
            attr("MaxSharedMemoryPerMultiprocessor", 81),
            attr("MaxThreadsPerMultiProcessor", 39), cfg[0])
    return hit


def resident_blocks(regs, smem, regs_per_sm, smem_per_sm, threads_per_sm, nw=4):
    """Blocks of ``nw`` warps an SM holds at once: registers are given out per warp in units
    of 256, each block's shared memory takes 1 KiB more for the system (sm_80 and sm_90)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // per_warp // nw
    by_smem = smem_per_sm // (smem + 1024)
    by_threads = threads_per_sm // (nw * 32)
    return max(1, min(by_regs, by_smem, by_threads, 32))


_occupancy: dict = {}


@functools.lru_cache(maxsize=64)
def _instance(type_name, d, cfg):
    return instances.decode(type_name, d, cfg)


def _function(type_name, d, cfg):
    inst = _instance(type_name, d, cfg)
    return compiled_function(inst.source, inst.names[0], inst.defines, smem_bytes(d, cfg))


def function_handle(fn):
    """The ``CUfunction`` handle (an int) of a compiled function on the current device, or
    None where it has none: a ``cupy.cuda.function.Function`` carries it as ``.ptr``; a
    ``cupy.RawKernel`` (what ``RawModule.get_function`` returns) has no ``.ptr``, its
    ``.kernel`` is the Function of the current device (loaded, compiled first if need be, on
    first access). The debug-logging wrapper of :func:`compiled_function` passes both
    attributes through."""
    ptr = getattr(fn, "ptr", None)
    if ptr is None:
        ptr = getattr(getattr(fn, "kernel", None), "ptr", None)
    return int(ptr) if ptr else None


# Launch through cuLaunchKernel with an argument block built once per plan (only the
# pointers of q, the outputs, the scratch and the tickets change between calls) instead of
# CuPy's per-call conversion of 22 arguments. False (or debug logging on, which names each
# kernel launched): CuPy's own launch. tests/test_decode_gpu.py checks that both give the same
# bits and that a default call takes this path.
FAST_LAUNCH = True

# The kernel's parameter list (XATTN_DECODE_PARAMS) in one byte buffer: the values a call
# changes first, side by side (q, out, lse, partial outputs, partial lse, ALiBi slopes, ticket
# counters: 64-bit pointers; ALiBi's batch stride: int64), then k, v, table, lengths
# (pointers), batch, hq, hkv, T, page_size, max_pages, blocks (int32), scale, softcap
# (float32), wl, uniform, contiguous (int32). _PARAM_AT[i]: where parameter i of the signature
# lives in the buffer.
_PER_CALL = struct.Struct("<7Qq")
_FIXED = struct.Struct("<4Q7i2f3i")
_PARAM_AT = (0, 64, 72, 80, 88, 8, 16, 24, 32, 48, 96, 100, 104, 108, 112, 116, 120, 124, 128,
             132, 136, 140, 40, 56)
_ARG_BYTES = _PER_CALL.size + _FIXED.size


class _ArgBlock:
    """The ``void* kernelParams[]`` of cuLaunchKernel over one byte buffer of the values (the
    driver copies them at launch, so the next call rewrites the buffer)."""

    __slots__ = ("buf", "array", "ptr", "lock")

    def __init__(self, fixed):
        import ctypes

        self.lock = threading.Lock()
        self.buf = ctypes.create_string_buffer(_ARG_BYTES)
        _FIXED.pack_into(self.buf, _PER_CALL.size, *fixed)
        base = ctypes.addressof(self.buf)
        self.array = (ctypes.c_void_p * len(_PARAM_AT))(*(base + at for at in _PARAM_AT))
        self.ptr = ctypes.addressof(self.array)


def _ptr(x):
    return 0 if x is None else int(x) if isinstance(x, (int, np.integer)) else x.data.ptr


class _Plan:
    """Everything a launch needs that the cache's state and the problem fix: built once per
    (problem, cache state, configuration, device), reused by the calls that follow until the
    cache changes (:meth:`xattn.KVCache._launch_plans`)."""

    __slots__ = ("prob", "main", "splits", "grid", "block", "smem", "head", "tail", "out_shape",
                 "lse_shape", "part_o", "part_lse", "tickets", "args", "fn_main")


def _make_plan(prob, cache, splits, cfg):
    B, Hq, Hkv, T, D = prob.batch, prob.hq, prob.hkv, prob.sq, prob.d
    kpool, vpool, table_dev, lengths_dev, page_size = cache._device_meta()
    left = -1 if prob.window is None or prob.window[0] is None else prob.window[0]
    row_blocks = -(-(prob.group * T) // 16)
    pairs = B * Hkv * row_blocks
    main = _function(_params.type_name(prob.dtype), D, cfg)
    tiles = seq_tiles(cache._lengths, T, left)
    max_tiles = int(tiles.max(initial=1))
    if splits is None:
        splits = pairs * num_splits(B, Hkv, row_blocks, max_tiles, _params.sm_count(),
                                    blocks_per_sm(main, D, cfg), cfg[0])
    total = Hkv * row_blocks * int(tiles.sum())  # the kernel's list of tiles
    splits = int(max(1, min(int(splits), max_blocks(total, max_tiles))))
    i32, f32 = np.int32, np.float32
    plan = _Plan()
    plan.prob, plan.main, plan.splits = prob, main, splits
    plan.grid = (splits, 1, 1)
    plan.block = (cfg[0] * 32,)
    plan.smem = smem_bytes(D, cfg)
    plan.head = (kpool, vpool, table_dev, lengths_dev)
    # Equal lengths (the kernel then finds each block's tiles by division, reading no length
    # before its first loads) and a contiguous cache (sequence b is page b: no table read).
    lengths = cache._lengths
    uniform = int(lengths[0]) if lengths.size and (lengths == lengths[0]).all() else -1
    plan.tail = (i32(B), i32(Hq), i32(Hkv), i32(T), i32(page_size), i32(table_dev.shape[1]),
                 i32(splits), f32(prob.scale), f32(prob.softcap or 0.0), i32(left),
                 i32(uniform), i32(0 if cache.paged else 1))
    plan.out_shape, plan.lse_shape = (B, Hq, T, D), (B, Hq, T)
    # A segment slot per (pair, block) that share tiles: pairs + blocks - 1 at most, each 16
    # rows of float32 partial output and lse; one ticket counter per pair.
    nslots = pairs + splits - 1 if splits > 1 else 0
    plan.part_o = nslots * 16 * D  # float32 elements
    plan.part_lse = nslots * 16
    plan.tickets = pairs if splits > 1 else 0
    plan.args = plan.fn_main = None
    handle = function_handle(main) if _driver() is not None else None
    if handle is not None:
        plan.args = _ArgBlock((*(_ptr(x) for x in plan.head), *(x.item() for x in plan.tail)))
        plan.fn_main = handle
    return plan


# (device, stream) -> int32 device array of ticket counters, all zero between launches: the
# block that merges a (sequence, kv head, row block) sets its counter back to 0, and launches
# on one stream run in order, so every plan on that stream shares one array. It only grows:
# the array it replaces goes back to CuPy's pool, which hands it out again in stream order.
# The per-thread default stream (handle 2, cudaStreamPerThread) is one stream per host thread.
_tickets: dict = {}
_tickets_lock = threading.Lock()
_PER_THREAD_STREAM = 2


def _ticket_counters(dev, stream, n):
    key = (dev, stream, threading.get_ident() if stream == _PER_THREAD_STREAM else 0)
    buf = _tickets.get(key)
    if buf is None or buf.size < n:
        import cupy

        with _tickets_lock:
            buf = _tickets.get(key)
            if buf is None or buf.size < n:
                # cupy.zeros runs on the current stream, the launch's: zero before it reads.
                buf = _tickets[key] = cupy.zeros(max(n, 4096), dtype=cupy.int32)
    return buf


@functools.lru_cache(maxsize=1)
def _driver():
    """``(cupy.cuda.get_current_stream, launchKernel)`` of CuPy's driver binding, or None
    where this CuPy has no such binding (then CuPy's own launch serves)."""
    try:
        from cupy.cuda import get_current_stream
        from cupy_backends.cuda.api import driver

        return get_current_stream, driver.launchKernel
    except (ImportError, AttributeError):
        return None


_bound = threading.local()  # the devices whose primary context this thread has bound


def _bind_context(dev):
    """A driver-API launch needs a current context, which the runtime binds to a host thread
    at its first runtime call that needs one (CuPy's own launch does the same check): a
    thread whose first CUDA work is this launch makes one such call, once per device."""
    done = getattr(_bound, "devices", None)
    if done is None:
        done = _bound.devices = set()
    if dev not in done:
        import cupy

        cupy.cuda.runtime.memGetInfo()
        done.add(dev)


def _launch_fast(plan, stream, q, out, lse, part_o, part_lse, alibi, alibi_bs, tickets):
    launch = _driver()[1]
    g = plan.grid
    # The slots are the plan's: two threads launching one plan take turns.
    with plan.args.lock:
        _PER_CALL.pack_into(plan.args.buf, 0, q.data.ptr, out.data.ptr,
                            0 if lse is None else lse.data.ptr, part_o, part_lse,
                            0 if alibi is None else alibi.data.ptr, tickets, alibi_bs)
        launch(plan.fn_main, g[0], g[1], g[2], plan.block[0], 1, 1, plan.smem, stream,
               plan.args.ptr, 0)


_NULL = np.uint64(0)
_log = logging.getLogger("xattn")


def decode(prob, q, cache, *, alibi_slopes=None, splits=None, config=None, need_lse=True):
    """Return ``(out, lse)`` of :func:`xattn.decode_attention` (``lse`` None without
    ``need_lse``: the kernel then writes none). ``splits`` overrides the number of blocks the
    tiles are dealt to (``pairs *`` :func:`num_splits`) and ``config`` the instance (in
    :func:`default_config`'s forms); ``benchmarks/gpu_decode.py --sweep`` and ``--configs``
    time the choices with them.

    The host work of a call on an unchanged cache is a dictionary look-up, two or three
    allocations and one launch: the split count, grid and scalar arguments are planned once
    per cache state (:class:`_Plan`)."""
    import cupy as cp

    cfg = default_config(prob.d) if config is None else tuple(config)
    plans = cache._launch_plans()
    dev = cp.cuda.runtime.getDevice()
    key = (id(prob), splits, cfg, dev)
    plan = plans.get(key)
    if plan is None or plan.prob is not prob:  # the plan holds prob: its id is not reused
        plan = plans[key] = _make_plan(prob, cache, splits, cfg)

    qc = q if q.flags.c_contiguous else cp.ascontiguousarray(q)
    out = cp.empty(plan.out_shape, dtype=q.dtype)
    lse = cp.empty(plan.lse_shape, dtype=cp.float32) if need_lse else None
    scratch, part_o, part_lse, tickets = None, 0, 0, 0
    fast = FAST_LAUNCH and plan.args is not None and not _log.isEnabledFor(logging.DEBUG)
    if fast:
        # The stream read for the tickets is the launch's; the driver-API launch needs the
        # runtime's context bound to this thread.
        _bind_context(dev)
        stream = _driver()[0]().ptr
    else:
        stream = cp.cuda.get_current_stream().ptr
    if plan.part_o:
        # One scratch allocation, the partial lse after the partial outputs (float32 both);
        # CuPy's pool hands it out again only in stream order, after the kernel.
        scratch = cp.cuda.alloc(4 * (plan.part_o + plan.part_lse))
        part_o = scratch.ptr
        part_lse = part_o + 4 * plan.part_o
        tickets = _ticket_counters(dev, stream, plan.tickets).data.ptr
    alibi, alibi_bs = None, 0
    if alibi_slopes is not None:
        # Slopes (Hq,) or (B, Hq), read by the kernel at b * alibi_bs + h: as they are when
        # float32 and contiguous, else a float32 copy.
        alibi = alibi_slopes
        if alibi.dtype != cp.float32 or not alibi.flags.c_contiguous:
            alibi = cp.ascontiguousarray(alibi, dtype=cp.float32)
        alibi_bs = 0 if alibi.ndim == 1 else plan.out_shape[1]
    if fast:
        _launch_fast(plan, stream, qc, out, lse, part_o, part_lse, alibi, alibi_bs, tickets)
        return out, lse
    u64 = np.uint64
    args = (qc, *plan.head, out, _NULL if lse is None else lse, u64(part_o), u64(part_lse),
            u64(tickets), *plan.tail, _NULL if alibi is None else alibi, np.int64(alibi_bs))
    plan.main(plan.grid, plan.block, args, shared_mem=plan.smem)
    return out, lse
