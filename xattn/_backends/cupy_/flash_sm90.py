"""The ``cupy.sm90`` entry: Hopper (sm_90a) flash attention forward with warpgroup MMA.

The kernel (``flash_fwd_sm90.cu``) serves float16 and bfloat16, head dims 64, 128, 192, 256,
``Dv == D``, causal (bottom-right) and sliding window, any scale, GQA/MQA, Sq and Sk of any
length, and always writes ``lse``; at head dims 64 and 128 its ``_mods`` entries add the score
modifications (softcap, bias, ALiBi, boolean mask) and its ``_bm`` entries a block mask
(unbatched, block sizes that its tiles divide: ``bq`` a multiple of 128 and ``bk`` of 64,
:data:`BM_CONFIGS`). Head dims 192 and 256 have the plain entries only (:data:`PLAIN_ONLY`);
a head dim between two built ones runs the next one's entry on zero-padded operands
(:func:`padded_dim`). D = 192 / 256 and the padded head dims each have a switch
(``instances.SM90_WIDE_ON``, ``SM90_PAD_ON``; on, measured in docs/gpu.rst).
Everything else (other head dims, score modifications or block masks at D = 192 / 256, other
block sizes, other cards, the backward pass) is refused by :func:`supports`, and ``auto`` walks
on to ``cupy.sm80``.

The module is compiled for ``sm_90a`` only (the wgmma instructions exist in no portable
target), so it runs on compute capability 9.0 exactly; :mod:`._compile` builds and caches its
cubins on disk.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from . import _compile, _params, instances
from ._compile import compiled_function

__all__ = ["BUILT", "CONFIGS", "PLAIN_ONLY", "compiled_function", "entry_maps", "forward",
           "get_kernel", "launch_config", "long_config", "mean_span", "padded_dim", "precompile",
           "short_config", "smem_bytes", "supports", "threads"]

# Per head dim: (keys per block BN, consumer warpgroups per block, mode), from the one list of
# every compiled entry (instances.py). 64 query rows per warpgroup. Mode bit 0 (overlap): block
# j - 1's P V is issued before block j's softmax (three K/V buffers); bit 1 (swizzle): 128-byte
# swizzled shared memory instead of the core-matrix layout (1 KiB more shared memory for the
# alignment). Bit 3 (warp-specialised, with bits 0 and 1): one more warpgroup per block, a
# producer that copies K/V into a ring of 3 stages handed over by mbarriers (setmaxnreg: the
# producer keeps 24 registers); bit 4 adds ping-pong of two consumers' GEMMs (named barriers).
# Defaults from `python3 tools/wgmma_probe.py --bench` on an H200 (fp16 S=4096, TFLOP/s, see
# docs/dev/perf_gpu.rst): D=128 (128, 2, 11) 442 / causal 386 (mode 3: 427 / 369; mode 0: 228 /
# 202; mma.sync 294 / 248), D=64 (64, 3, 11) 348 / 294 (mode 3: 304 / 269; mma.sync 292 / 258).
# Mode 27 (ping-pong on top of 11) measured slower: 394 / 344 at D=128.
# Bit 6 (mode 75 = 11 + 64, the default since): the producer fills the K/V stages with the
# copy engine (TMA) from tensor maps that the launch passes by value (tma.py); on an H100
# (fp16 S=4096, tools/gpu_check_fwdtma.sh bench) D=128 537 / causal 437 against mode 11's
# 423 / 361 and torch's 552 / 543, D=64 383 / 300 against 333 / 277.
# D=256 and D=192 (64, 2, 75): flash_fwd_sm90_ws_kv, the same schedule with separate K and V
# rings of two stages each (at D=256, Q and three K+V stages do not fit the shared memory); no
# GPU figure yet (tools/gpu_check_d256.sh bench times them against torch and cupy.sm80).
CONFIGS = instances.SM90
# The score-modification entries' configuration per head dim, and the block-sparse candidates
# in order of preference (the first whose query rows divide the mask's bq and whose key tile
# divides its bk); see instances.py. instances.SM90_MODS_ON_TMA picks mode 11 (cp.async) or
# its mode-75 twins (the copy engine, as the plain entries' default) for all three and for
# flex_attention's Hopper kernel (flex_tc.py reads these).
if instances.SM90_MODS_ON_TMA:
    MODS_CONFIGS = instances.SM90_MODS_TMA
    BM_CONFIGS = instances.SM90_BM_TMA
    BM_MODS_CONFIGS = instances.SM90_BM_MODS_TMA
else:
    MODS_CONFIGS = instances.SM90_MODS
    BM_CONFIGS = instances.SM90_BM
    BM_MODS_CONFIGS = instances.SM90_BM_MODS
# Head dims with the plain entries only (no _mods / _bm entries): the kernel of D = 192 and
# 256 (flash_fwd_sm90_ws_kv, separate K and V rings) has no score-modification or block-mask
# walk; those requests go to cupy.sm80.
PLAIN_ONLY = frozenset(d for d in CONFIGS if d not in MODS_CONFIGS and d not in BM_CONFIGS)
# Modes with _mods / _bm entries: warp-specialised (11), ping-pong (27), each with the copy
# engine (75 = 11 + bit 6; 91 = 27 + bit 6 is not offered: ping-pong measured slower).
MODS_MODES = (11, 27, 75)
# Every configuration that can be built, as (D, BN, warpgroups, mode): the shipped ones (CI
# compiles them) and the experimental schedules (built on request: config=...).
BUILT = frozenset((*instances.SM90_SHIPPED, *instances.SM90_EXPERIMENTAL,
                   *instances.SM90_WIDE_EXPERIMENTAL))
# Options this kernel ignores safely: allow_tf32 concerns float32 only.
_KNOWN = frozenset({"allow_tf32"})


def supports(prob, opts, op="forward"):
    """``None`` when the sm_90a kernel serves this request, else the reason it does not."""
    why = _params.half_kernel_reason(prob, op, ("forward", "the sm_90a kernel is forward only"),
                                     "the sm_90a kernel")
    if why is not None:
        return why
    width = padded_dim(prob.d)
    if width is None or prob.dv != prob.d:
        return (f"head_dim {prob.d} (Dv {prob.dv}): the sm_90a kernel has D = Dv up to "
                f"{max(CONFIGS)}")
    if width != prob.d and not instances.SM90_PAD_ON:
        return (f"head_dim {prob.d}: zero-padded to {width} on the sm_90a kernel, which has not "
                "run on a GPU yet (instances.SM90_PAD_ON is off)")
    if width > 128 and not instances.SM90_WIDE_ON:
        return (f"head_dim {prob.d}: the sm_90a kernel's entry is built but has not run on a "
                "GPU yet (instances.SM90_WIDE_ON is off)")
    prob = _padded(prob)
    why = _plain_only_reason(prob)
    if why is not None:
        return why
    if prob.block_mask is not None:
        why = _block_mask_reason(prob)
        if why is not None:
            return why
    unknown = sorted(k for k, v in (opts or {}).items() if v is not None and k not in _KNOWN)
    if unknown:
        return f"options {unknown} (a tile plan) run on cupy.sm80"
    return _params.device_reason(prob, "the sm_90a kernel", exact_cc=90)


def padded_dim(d):
    """The head dim of the entry that serves head dim ``d``: ``d`` itself where built, else
    the next one, the operands zero-padded to it (the zero columns change neither ``q.k`` nor
    the output columns kept); None above the widest."""
    return next((w for w in sorted(CONFIGS) if w >= d), None)


def _padded(prob):
    """``prob`` as its entry sees it: D and Dv of :func:`padded_dim` (the scale stays)."""
    width = padded_dim(prob.d)
    if width == prob.d:
        return prob
    return dataclasses.replace(prob, d=width, dv=width)


def _plain_only_reason(prob):
    """Score modifications or a block mask at a head dim with plain entries only, or None."""
    if prob.d in PLAIN_ONLY and (prob.has_score_mods or prob.block_mask is not None):
        what = "score modifications" if prob.has_score_mods else "a block_mask"
        return (f"{what} at head_dim {prob.d}: the sm_90a kernel has plain entries only "
                f"there (causal, window, GQA); cupy.sm80 serves them")
    return None


def block_mask_config(d, block_size, mods):
    """The configuration ``(BN, warpgroups, mode)`` whose query rows (64 per warpgroup) divide
    the mask's ``bq`` and whose key tile divides its ``bk``, or None."""
    bq, bk = block_size
    cands = (BM_MODS_CONFIGS.get(d) if mods else None) or BM_CONFIGS.get(d, ())
    return next((c for c in cands if bq % (64 * c[1]) == 0 and bk % c[0] == 0), None)


def _block_mask_reason(prob):
    bm = prob.block_mask
    if bm.batch_shape:
        return "block_mask: a batched mask (one call per batch element goes through flash.py)"
    mods = prob.has_score_mods
    if block_mask_config(prob.d, bm.block_size, mods) is None:
        cands = (BM_MODS_CONFIGS.get(prob.d) if mods else None) or BM_CONFIGS.get(prob.d, ())
        tiles = " or ".join(f"{64 * c[1]} x {c[0]}" for c in cands)
        return (f"block_mask: block size {bm.block_size} is not served by the sm_90a kernel "
                f"(head dim {prob.d}): (bq, bk) must be multiples of a tile ({tiles})")
    return None


def smem_bytes(d, cfg):
    bn, nwg, mode = cfg
    # D > 128 or 176-key tiles (flash_fwd_sm90_ws_kv): two K stages and two V stages, released
    # separately.
    nbuf = 3 if mode & 1 and d <= 128 and bn <= 128 else 2
    if nwg == 1 and mode & 32:  # persistent: QST Q buffers (persist_qst in the kernel)
        qst = 2 if 2 * ((2 * 64 * d + 2 * nbuf * bn * d) * 2 + (2 * nbuf + 4) * 8 + 1024) \
            <= 233472 else 1
        return (qst * 64 * d + 2 * nbuf * bn * d) * 2 + (2 * nbuf + 2 * qst) * 8
    if nwg == 1:  # two or three blocks an SM: no alignment pad, the mbarriers after the tiles
        # (mode bit 7: one more, Q's)
        return (64 * d + 2 * nbuf * bn * d) * 2 + (2 * nbuf + (1 if mode & 128 else 0)) * 8
    # Mode bit 3's mbarriers are static shared memory (128 bytes), outside this count.
    return (nwg * 64 * d + 2 * nbuf * bn * d) * 2 + (1024 if mode & 2 else 0)


def threads(cfg):
    """Threads per block: 128 per consumer warpgroup, plus the producer's 128 in mode bit 3."""
    bn, nwg, mode = cfg
    return (nwg + (1 if mode & 8 else 0)) * 128


def precompile(type_name: str, keys, workers: int = 8):
    """Compile the cubins of several (D, BN, warpgroups, mode) at once (threads), so that a
    benchmark of every configuration does not wait for them one by one."""
    entries = [(i.name, i.defines, i.includes) for i in
               (instances.sm90(type_name, d, tuple(c)) for d, *c in keys)]
    _compile.precompile("flash_fwd_sm90.cu", entries, workers)


_instance = functools.lru_cache(maxsize=256)(instances.sm90)


def get_kernel(type_name: str, d: int, cfg: tuple, mods: bool = False, sparse: bool = False):
    """The compiled entry point for one dtype, head dim and (BN, warpgroups, mode), with score
    mods / the block-mask walk; cached per device."""
    inst = _instance(type_name, d, tuple(cfg), mods, sparse)
    return compiled_function(inst.source, inst.name, inst.defines, smem_bytes(d, cfg),
                             arch=inst.arch, includes=inst.includes)


_RESIDENT = {}


def resident_blocks(fn, d: int, cfg: tuple) -> int:
    """Blocks of entry ``fn`` one SM holds (the persistent grid's multiple of the SM count: 3 for
    the D = 64 entries with 64-key tiles, 2 for the other one-consumer ones), as the driver
    computes it from the entry's registers and shared memory; cached per function object, which
    the cache holds, so that a rebuilt entry of the same name (other defines, a freed module's
    address reused) is asked again."""
    hit = _RESIDENT.get(id(fn))
    if hit is None:
        import cupy

        n = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            fn.kernel.ptr, threads(cfg), smem_bytes(d, cfg))
        hit = _RESIDENT[id(fn)] = (fn, max(1, n))
    return hit[1]


def forward(prob, q, k, v, *, allow_tf32=False, config=None):
    """Return ``(out, lse)`` from the sm_90a kernel (the caller checked :func:`supports`, or a
    test calls it directly). ``config`` = (keys per block, warpgroups, mode) overrides the
    default (``CONFIGS``; ``BUILT`` lists the choices; with score mods or a block mask only
    the warp-specialised modes of :data:`MODS_MODES` have entries)."""
    why = _plain_only_reason(_padded(prob))
    if why is None and prob.block_mask is not None:
        why = _block_mask_reason(_padded(prob))
    if why is not None:
        raise NotImplementedError(why)
    with q.device:
        return _forward(prob, q, k, v, config)


def mean_span(prob) -> float:
    """The mean number of keys a query row may see under the causal rule and the window
    (bottom-right: query i sits at key position i + Sk - Sq), ignoring the sequence ends'
    clipping of a window: the work per query block, in keys."""
    sk, sq = prob.sk, prob.sq
    wl, wr = prob.window if prob.window is not None else (None, None)
    right = 0 if prob.causal else None
    if wr is not None:
        right = wr if right is None else min(right, wr)
    if wl is not None and right is not None:
        return float(max(0, min(sk, wl + right + 1)))
    if wl is None and right == 0:  # causal: row i sees Sk - Sq + i + 1 keys
        return float(max(0.0, min(sk, sk - sq + (sq + 1) / 2)))
    return float(sk)


def short_config(prob):
    """The one-consumer configuration of :data:`instances.SM90_SHORT` when its switch is on
    and the problem's mean key span is short enough, else None (plain entries only)."""
    rule = instances.SM90_SHORT.get(prob.d)
    if not instances.SM90_SHORT_ON or rule is None or mean_span(prob) > rule[0]:
        return None
    return rule[1] if prob.window is not None else rule[2]


def long_config(prob):
    """The wide-tile configuration of :data:`instances.SM90_LONG` when its switch is on and the
    problem is a full one (no causal rule, no window) whose key span is long enough, else None
    (plain entries only)."""
    rule = instances.SM90_LONG.get(prob.d)
    if (not instances.SM90_LONG_ON or rule is None or prob.causal or prob.window is not None
            or mean_span(prob) < rule[0]):
        return None
    return rule[1]


def launch_config(prob, config=None):
    """The ``(BN, warpgroups, mode)`` that serves ``prob``: ``config`` checked, or the default
    of its entry kind (plain, score mods, block mask: the tables above)."""
    d = prob.d
    mods, sparse = prob.has_score_mods, prob.block_mask is not None
    if d in PLAIN_ONLY and (mods or sparse):
        raise ValueError(f"head_dim {d}: the sm_90a kernel has no score-modification or "
                         f"block-mask entries there (cupy.sm80 serves them)")
    if config is not None:
        cfg = tuple(config)
    elif sparse:
        cfg = block_mask_config(d, prob.block_mask.block_size, mods)
    elif mods:
        cfg = MODS_CONFIGS[d]
    else:
        cfg = short_config(prob) or long_config(prob) or CONFIGS[d]
    if (d, *cfg) not in BUILT and not ((mods or sparse) and cfg[2] in MODS_MODES):
        raise ValueError(f"config {cfg} for D={d} is not built; built: {sorted(BUILT)}")
    if (mods or sparse) and cfg[2] not in MODS_MODES:
        raise ValueError(f"config {cfg}: score mods and block masks run in modes "
                         f"{', '.join(map(str, MODS_MODES))}")
    if sparse:
        bq, bk = prob.block_mask.block_size
        if bq % (64 * cfg[1]) or bk % cfg[0]:
            raise ValueError(f"config: {cfg} does not divide the block_mask's block size "
                             f"{prob.block_mask.block_size}")
    return cfg


def _forward(prob, q, k, v, config):
    import cupy as xp

    tn = _params.type_name(prob.dtype)
    d = padded_dim(prob.d)
    if tn is None or d is None or prob.dv != prob.d:
        raise NotImplementedError(f"the sm_90a kernel has no entry for dtype {prob.dtype}, "
                                  f"D {prob.d}, Dv {prob.dv}")
    mods, sparse = prob.has_score_mods, prob.block_mask is not None
    cfg = launch_config(_padded(prob), config)
    B = math.prod(prob.batch)
    q4, k4, v4, out, lse = _params.forward_buffers(xp, prob, q, k, v, d, q.dtype)
    if _params.nothing_to_launch(out, lse):
        return _params.forward_result(xp, prob, out, lse)
    # Mode bit 6: the tensor maps of K and V (bit 7: and Q), the entry's first arguments
    # (checked before the kernel is built).
    maps = _tma_maps(q4, k4, v4, cfg[0], 64 * cfg[1] if cfg[2] & 128 else None) \
        if cfg[2] & 64 else ()
    fn = get_kernel(tn, d, cfg, mods, sparse)
    nwg = cfg[1]
    bm = 64 * nwg
    i32, f32 = np.int32, np.float32
    args = (*maps, q4, k4, v4, out, lse, i32(prob.hq), i32(prob.group), i32(prob.sq),
            i32(prob.sk), f32(prob.scale))
    if mods or sparse:  # flash_fwd.cu's argument list: the parameter block, the block mask
        args += (*_params.option_args(xp, prob), *_params.block_mask_args(xp, prob))
    else:  # the plain entries read the visibility fields only
        args += _params.visibility_args(prob)
    grid = ((prob.sq + bm - 1) // bm, prob.hq, B)
    if cfg[2] & 32:  # persistent (mode 235): the resident blocks walk the tiles; the batch last
        grid = (min(math.prod(grid), resident_blocks(fn, d, cfg) * _params.sm_count()), 1, 1)
        args += (i32(B),)
    fn(grid, (threads(cfg),), args, shared_mem=smem_bytes(d, cfg))
    return _params.forward_result(xp, prob, out, lse)


def entry_maps(inst, q4, k4, v4):
    """The tensor maps that the entry of ``inst`` (an :func:`instances.sm90` instance, or
    flex_attention's renamed one) takes before its other arguments: K's and V's in mode bit
    6 (and Q's with bit 7), else none."""
    p = dict(inst.params)
    mode = int(p.get("XATTN90_OV", 0))
    if inst.source != "flash_fwd_sm90.cu" or not mode & 64:
        return ()
    bm = 64 * int(p["XATTN90_NWG"]) if mode & 128 else None
    return _tma_maps(q4, k4, v4, int(p["XATTN90_BN"]), bm)


def _tma_maps(q4, k4, v4, bn, bm=None):
    """The tensor maps of K and V for mode bit 6: boxes of {64 columns, BN keys} of one kv
    head, 128-byte swizzle (the kernel's shared-memory layout, one box per 64-column panel).
    q is read by cp.async (16-byte copies) and checked for the same alignment; with ``bm``
    (mode bit 7) by the copy engine too, in boxes of {64 columns, bm rows}."""
    from . import tma

    if bm is not None:
        return tma.rows_map(k4, "k", bn), tma.rows_map(v4, "v", bn), tma.rows_map(q4, "q", bm)
    tma.check_operand(q4, "q")
    return tma.rows_map(k4, "k", bn), tma.rows_map(v4, "v", bn)
