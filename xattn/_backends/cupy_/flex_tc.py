"""flex_attention on tensor cores: the user's functions compiled into the 16-bit forward.

:mod:`xattn._flex_cuda` translates ``score_mod``/``mask_mod`` to CUDA C; the text is put
before a forward kernel file with ``XATTN_USER_MODS`` defined, so NVRTC inlines the user's
functions into it (``backend="cupy"`` of :func:`xattn.flex_attention`): ``score_mod`` runs on
every score of a visited tile (after the scale, natural units, before the online softmax),
``mask_mod`` only in the partial blocks of a block mask derived from it. The kernel by dtype
(:func:`kernel_choice`): float16/bfloat16 ``xattn/kernels/flash_fwd.cu`` (``mma.sync``), or on
compute capability 9.0 with a padded head dim of 64 or 128 the Hopper kernel
``flash_fwd_sm90.cu`` (wgmma, warp-specialised, the same hook; :func:`kernel_for`); float32
``xattn/kernels/flash_fwd_tf32.cu``, error-compensated 3xTF32 (float32 accuracy, about
``1e-6`` relative) or, with ``allow_tf32=True``, plain TF32 (about ``1e-3``).

Block mask: a small kernel of the same module (``xattn_flex_block_states``) evaluates
``mask_mod`` on every (query, key) pair of every :data:`BLOCK` x :data:`BLOCK` block, per batch
element only if the function reads ``b`` and per head only if it reads ``h``, and classifies
each block empty / partial / full (one pass of ``Sq * Sk`` mask evaluations on the device,
about the cost of one score tile per block without its product); blocks are then combined
over batch and heads (empty where every one is empty, full where every one is full) into the
CSR lists the forward kernel walks: empty blocks are never loaded, full blocks run no mask.
A mask that reads no array is classified once per (function, shape, device) and cached; one
that reads arrays is classified on every call (their contents may change).

Compiled modules are cached per (device, generated text, entry); NVRTC's output is also kept
on disk by CuPy.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict

import numpy as np

from ... import _flex_cuda
from . import _compile, _params, flash_tf32, instances
from ._compile import _allow_smem, _Logged, source
from .blockmask import null_kernel_args

__all__ = ["BLOCK", "forward", "kernel_choice", "kernel_text", "reason"]

# Side of the blocks of the derived block mask: a multiple of every 16-bit forward
# configuration's query tile (64 or 128 rows; the Hopper kernel's block-sparse entries: 128)
# and key tile (32 or 64 keys; Hopper: 64 or 128), large enough that the CSR lists stay short
# and small enough that a causal diagonal wastes little.
BLOCK = 128
# Threads of the block-classification kernel.
STATE_THREADS = 256
HEAD_DIMS = instances.HEAD_DIMS
_log = logging.getLogger("xattn")
_lock = threading.Lock()
_modules: OrderedDict = OrderedDict()
_plans: OrderedDict = OrderedDict()
_MAX_MODULES = 64
_MAX_PLANS = 32

_STATES_KERNEL = r"""
// Classify each BLOCK x BLOCK block of pairs for one (batch, head) slice z: 0 = mask_mod hides
// every pair, 2 = it shows every pair inside (sq, sk), 1 = mixed. Grid (key blocks, query
// blocks, slices); slice z is batch z / nh, head z % nh (0 when the function ignores them).
extern "C" __global__ void __launch_bounds__(XATTN_STATE_THREADS)
    xattn_flex_block_states(signed char* states, int sq, int sk, int bq, int bk, int nh
                            XATTN_USER_PARAMS) {
    const XattnUserArgs u = XATTN_USER_MAKE;
    const int kb = blockIdx.x, qb = blockIdx.y, z = blockIdx.z;
    const int b = z / nh, h = z - (z / nh) * nh;
    int any = 0, all = 1;
    for (int i = threadIdx.x; i < bq * bk; i += blockDim.x) {
        const int qi = qb * bq + i / bk, kj = kb * bk + i % bk;
        if (qi < sq && kj < sk) {
            const bool vis = xattn_user_mask(u, b, h, qi, kj);
            any |= vis;
            all &= vis;
        }
    }
    any = __syncthreads_or(any);
    all = __syncthreads_and(all);
    if (threadIdx.x == 0)
        states[((long long)z * gridDim.y + qb) * gridDim.x + kb] = any ? (all ? 2 : 1) : 0;
}
"""


def padded_dim(d: int):
    return next((x for x in HEAD_DIMS if x >= d), None)


def _is_float32(prob) -> bool:
    return np.dtype(prob.dtype) == np.float32


def reason(prob, allow_tf32=False):
    """None when the tensor-core flex kernel serves ``prob``, else why not."""

    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if _params.type_name(prob.dtype) is None and not _is_float32(prob):
        return (f"dtype {prob.dtype}: the tensor-core flex kernels take float16, bfloat16 and "
                "float32 (backend='numba_cuda' computes float64)")
    if padded_dim(max(prob.d, prob.dv)) is None:
        return f"head_dim {max(prob.d, prob.dv)} > {max(HEAD_DIMS)}"
    nbatch = math.prod(prob.batch) if prob.heads_axis else 1
    if nbatch > 65535 or prob.hq > 65535:
        return f"batch ({nbatch}) or heads ({prob.hq}) above the grid limit 65535"
    if max(prob.sq, prob.sk) >= _flex_cuda.MAX_INDEX:
        return (f"sequence length {max(prob.sq, prob.sk)} >= 2**30 (the translated functions "
                "compute with 32-bit positions)")
    cc = _params.compute_capability()
    if cc < 80:
        return (f"compute capability {cc} < 80: the kernel uses mma.sync "
                f"{'tf32' if _is_float32(prob) else 'bf16/f16'} and cp.async")
    if _is_float32(prob):
        *_, need = _float32_config(prob, allow_tf32)
        have = _params.max_smem_per_block()
        if need > have:
            return (f"head_dim {max(prob.d, prob.dv)}: the float32 flex kernel needs {need} "
                    f"bytes of shared memory per block, this device allows {have}")
    return None


def source_reason(*caps):
    """None when Python can read the source of every captured function (``None`` entries
    skipped), else why the tensor-core kernels cannot serve them."""
    from ... import _flex_codegen as cg

    for cap in caps:
        if cap is not None and not cg.has_source(cap.fn):
            return (f"the source of {cap.fn.__name__} is not available (the tensor-core "
                    "kernels translate the source)")
    return None


def instance(tn, dp, mods: bool, sparse: bool):
    """The forward instance (entry name, -D options) for the user's functions."""
    if sparse:
        cfg = (instances.FWD_BM_MODS.get(dp) if mods else None) or instances.FWD_BM[dp]
        cfg = next(c for c in cfg if BLOCK % (c[0] * c[1] * 16) == 0 and BLOCK % c[2] == 0)
    else:
        cfg = instances.FWD_MODS.get(dp, instances.FWD[dp]) if mods else instances.FWD[dp]
    inst = instances.fwd(tn, dp, cfg, mods, sparse)
    # Own entry names (the variant token of the name): never the built-in entries' names.
    mn = "flex" + ("_bm" if sparse else "")
    params = tuple((k, mn if k == "XATTN_MN" else v) for k, v in inst.params)
    name = inst.name.rsplit("_", 2 if sparse else 1)[0] + "_" + mn
    return instances.Instance(inst.source, inst.macro, params, (name,)), cfg


def _flex_named(inst, sparse):
    """``inst`` under flex's own entry name (the variant token ``flex``/``flex_bm``): never a
    built-in entry's name."""
    mn = "flex" + ("_bm" if sparse else "")
    key = next(k for k, _ in inst.params if k.endswith("_MN"))
    old = dict(inst.params)[key]
    params = tuple((k, mn if k == key else v) for k, v in inst.params)
    return instances.Instance(inst.source, inst.macro, params, (inst.name[:-len(old)] + mn,))


def _float32_config(prob, allow_tf32):
    """``(x3, config, padded head dim, shared memory)`` of the float32 kernel: 3xTF32, or
    plain TF32 when the caller allows it; the default tile configuration of
    flash_fwd_tf32.cu (its query and key tiles divide :data:`BLOCK`). No instance is built:
    :func:`reason` reads the shared memory on every call."""
    x3 = not allow_tf32
    dp = flash_tf32.padded_dim(max(prob.d, prob.dv), x3)
    cfg = (flash_tf32.X3_CONFIGS if x3 else flash_tf32.CONFIGS)[dp]
    if BLOCK % (cfg[0] * cfg[1] * 16) or BLOCK % cfg[2]:
        raise AssertionError(f"float32 config {cfg} does not tile the {BLOCK}-square blocks")
    return x3, cfg, dp, flash_tf32.smem_bytes(dp, cfg, x3)


def _float32_choice(prob, allow_tf32, mods=False, sparse=False):
    """``(instance, config, padded head dim, shared memory)`` of the float32 kernel
    (:func:`_float32_config`) under flex's entry names."""
    x3, cfg, dp, smem = _float32_config(prob, allow_tf32)
    inst = _flex_named(instances.tf32_bm(dp, cfg, mods, x3, sparse), sparse)
    return inst, cfg, dp, smem


def instance_sm90(tn, dp, mods: bool, sparse: bool):
    """The Hopper forward instance for the user's functions: ``(instance, (BN, warpgroups,
    mode))``. Its ``_mods`` entry also serves a call with neither function (the user score is
    then the identity), since only the ``_mods`` / ``_bm`` entries take the hook's arguments."""
    from . import flash_sm90

    if sparse:
        cfg = flash_sm90.block_mask_config(dp, (BLOCK, BLOCK), mods)
    else:
        cfg, mods = flash_sm90.MODS_CONFIGS[dp], True
    inst = instances.sm90(tn, dp, cfg, mods, sparse)
    mn = "flex" + ("_bm" if sparse else "")
    params = tuple((k, mn if k == "XATTN90_MN" else v) for k, v in inst.params)
    name = inst.name.rsplit("_o", 1)[0] + f"_o{cfg[2]}_{mn}"
    # extra: XATTN90_TMA selects the mode-75 entry macro (tensor maps first).
    return instances.Instance(inst.source, inst.macro, params, (name,), extra=inst.extra,
                              arch=inst.arch), cfg


def kernel_for(tn, dp, mods: bool, sparse: bool, cc: int):
    """``(instance, query rows per thread block, threads, shared memory bytes)`` of the kernel
    that runs the user's functions for 16-bit inputs: the Hopper kernel on compute capability
    9.0 for padded head dims it has (64, 128), else the ``mma.sync`` kernel."""
    from . import flash_sm90

    if cc == 90 and dp in flash_sm90.MODS_CONFIGS:
        inst, cfg = instance_sm90(tn, dp, mods, sparse)
        return inst, 64 * cfg[1], flash_sm90.threads(cfg), flash_sm90.smem_bytes(dp, cfg)
    inst, cfg = instance(tn, dp, mods, sparse)
    nw, mt, bn = cfg
    return inst, nw * mt * 16, nw * 32, (nw * mt * 16 + 4 * bn) * (dp + 8) * 2


def kernel_choice(prob, mods: bool, sparse: bool, allow_tf32=False, cc=80):
    """The flex forward of one request: ``(instance, padded head dim, query rows per thread
    block, threads, dynamic shared memory bytes)``. ``mods``: a score_mod runs; ``sparse``: the
    block mask derived from mask_mod is walked; ``cc``: the device's compute capability."""
    if _is_float32(prob):
        inst, (nw, mt, _), dp, smem = _float32_choice(prob, allow_tf32, mods, sparse)
        return inst, dp, nw * mt * 16, nw * 32, smem
    dp = padded_dim(max(prob.d, prob.dv))
    inst, rows, threads, smem = kernel_for(_params.type_name(prob.dtype), dp, mods, sparse, cc)
    return inst, dp, rows, threads, smem


def kernel_text(mods, kernel_file="flash_fwd.cu") -> str:
    """The module source: the translated functions and hook macros, the forward kernel and
    (with a mask_mod) the block-classification kernel."""
    parts = [mods.kernel_prelude(), source(kernel_file)]
    if mods.has_mask:
        parts += [f"#define XATTN_STATE_THREADS {STATE_THREADS}", _STATES_KERNEL]
    return "\n".join(parts)


def _function(mods, inst, smem):
    return cached_function(mods, inst, smem, lambda: kernel_text(mods, inst.source),
                           "flex_attention", "xattn_flex_")


def cached_function(mods, inst, smem, text_of, caller, prefix):
    """``(module, entry, block-states function or None)`` of one generated kernel (the forward
    here, the backward in flex_tc_bwd.py): compiled on first use (NVRTC, or an sm_90a cubin of
    its own) from ``text_of()`` and kept per (device, functions, entry), the last
    ``_MAX_MODULES`` used. A source NVRTC refuses is our bug: it is kept in a file named in the
    error (``caller``: the function the error names, ``prefix``: the file's)."""
    import cupy

    dev = cupy.cuda.Device().id
    key = (dev, mods.key, inst.name)
    with _lock:
        hit = _modules.get(key)
        if hit is not None:
            _modules.move_to_end(key)
            return hit
    text = text_of()
    try:
        if inst.arch is None:
            mod = cupy.RawModule(code=text, options=("-std=c++17", *inst.defines))
        else:  # sm_90a: a cubin of its own (CuPy adds a portable -arch), cached on disk
            mod = _compile.load_module(_compile.cubin_path(text, inst.defines))
        fn = mod.get_function(inst.name)  # NVRTC runs here
    except Exception as exc:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".cu", prefix=prefix,
                                         delete=False) as f:
            f.write(f"// options: {' '.join(inst.defines)}\n{text}")
        raise RuntimeError(f"{caller}: the generated kernel {inst.name} did not compile "
                           f"(source kept in {f.name}): {exc}") from exc
    if smem > 48 * 1024:
        _allow_smem(fn, smem)
    states = mod.get_function("xattn_flex_block_states") if mods.has_mask else None
    hit = (mod, _Logged(inst.name, fn), states)
    with _lock:
        _modules[key] = hit
        while len(_modules) > _MAX_MODULES:
            _modules.popitem(last=False)
    return hit


def _mask_reads(cap, pos):
    params = cap.params
    return pos < len(params) and params[pos] in cap.reads


def block_lists(cp, mods, states_fn, user_args, *, mmod, cacheable, batch, hq, sq, sk):
    """CSR lists (full and partial per query block) of the block mask derived from mask_mod,
    as int32 device arrays."""
    nb = batch if _mask_reads(mmod, 0) else 1
    nh = hq if _mask_reads(mmod, 1) else 1
    nqb, nkb = -(-sq // BLOCK), -(-sk // BLOCK)
    key = (cp.cuda.Device().id, mods.key, nb, nh, sq, sk)
    if cacheable:
        with _lock:
            hit = _plans.get(key)
        if hit is not None:
            return hit
    states = cp.empty((nb * nh, nqb, nkb), dtype=cp.int8)
    states_fn(grid=(nkb, nqb, nb * nh), block=(STATE_THREADS,),
              args=(states, np.int32(sq), np.int32(sk), np.int32(BLOCK), np.int32(BLOCK),
                    np.int32(nh), *user_args))
    lo, hi = states.min(axis=0), states.max(axis=0)
    full, partial = lo == 2, (hi > 0) & (lo < 2)
    out = []
    for sel in (full, partial):
        ptr = cp.zeros(nqb + 1, dtype=cp.int32)
        ptr[1:] = cp.cumsum(sel.sum(axis=1, dtype=cp.int32))
        cols = cp.nonzero(sel)[1].astype(cp.int32)  # row-major: columns sorted per row
        out += [ptr, cols if cols.size else cp.zeros(1, cp.int32)]
    lists = tuple(out)
    if cacheable:
        with _lock:
            _plans[key] = lists
            while len(_plans) > _MAX_PLANS:
                _plans.popitem(last=False)
    return lists


def derived_mask_args(frow, fcol, prow, pcol):
    """The ``XattnBlockMask`` launch arguments of the derived mask's lists (:func:`block_lists`,
    :data:`BLOCK` square blocks, no tile bits, no element rule), in its field order."""
    i32 = np.int32
    return (frow, fcol, prow, pcol, np.uint64(0), i32(BLOCK), i32(BLOCK), i32(-(-BLOCK // 32)),
            i32(0), i32(0), i32(-1), i32(-1))


def _no_score_options():
    """The ScoreMods block (masking.cuh, XATTN_SCORE_MOD_PARAMS) with every option off."""
    i32, i64, null = np.int32, np.int64, np.uint64(0)
    return (i32(0), i32(-1), i32(-1), np.float32(0.0), null, i64(0),
            null, i64(0), i64(0), i64(0), i64(0), null, i64(0), i64(0), i64(0), i64(0))


def forward(prob, q, k, v, *, smod, mmod, args, mask_takes_args, allow_tf32=False):
    """``(out, lse)`` of flex attention on the tensor cores (16-bit or float32 CuPy inputs,
    see :func:`reason`; ``allow_tf32``: float32 in plain TF32 instead of 3xTF32); ``lse``
    float32 ``(batch..., Hq, Sq)``."""
    with q.device:
        return _forward(prob, q, k, v, smod, mmod, args, mask_takes_args, allow_tf32)


def _forward(prob, q, k, v, smod, mmod, args, mask_takes_args, allow_tf32):
    import cupy as cp

    mods = _flex_cuda.translate_cached(smod, mmod, len(args), mask_takes_args, args)
    sparse = mmod is not None
    inst, dp, bm_rows, threads, smem = kernel_choice(prob, smod is not None, sparse, allow_tf32,
                                                     _params.compute_capability())
    batch = math.prod(prob.batch) if prob.heads_axis else 1
    hq, hkv = (prob.hq, prob.hkv) if prob.heads_axis else (1, 1)
    sq, sk = prob.sq, prob.sk
    out = cp.empty((batch, hq, sq, dp), dtype=q.dtype)
    lse = cp.empty((batch, hq, sq), dtype=cp.float32)
    if out.size == 0 or sk == 0:
        out.fill(0)
        lse.fill(-np.inf)
        return _result(cp, prob, out, lse)
    _, fn, states_fn = _function(mods, inst, smem)
    user_args = mods.kernel_args(args, smod, mmod)
    if sparse:
        # Captured host arrays are compiled in (their values are in mods.key); device arrays
        # and score_mod_args may change between calls.
        cacheable = not mask_takes_args and all(isinstance(a, np.ndarray) for a in mmod.arrays)
        frow, fcol, prow, pcol = block_lists(
            cp, mods, states_fn, user_args, mmod=mmod, cacheable=cacheable, batch=batch,
            hq=hq, sq=sq, sk=sk)
        bm_args = derived_mask_args(frow, fcol, prow, pcol)
    else:
        bm_args = null_kernel_args()
    q4 = _params.operand(cp, q, batch, hq, sq, dp)
    k4 = _params.operand(cp, k, batch, hkv, sk, dp)
    v4 = _params.operand(cp, v, batch, hkv, sk, dp)
    # The Hopper kernel's mode-75 entries take the tensor maps of K and V first.
    maps = _sm90_maps(inst, q4, k4, v4)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("flex_attention: backend cupy, entry %s", inst.name,
                   extra={"xattn_backend": "cupy"})
    fn(grid=(-(-sq // bm_rows), hq, batch), block=(threads,),
       args=(*maps, q4, k4, v4, out, lse, np.int32(hq), np.int32(hq // hkv), np.int32(sq),
             np.int32(sk), np.float32(prob.scale), *_no_score_options(), *bm_args,
             *user_args),
       shared_mem=smem)
    return _result(cp, prob, out, lse)


def _sm90_maps(inst, q4, k4, v4):
    if inst.source != "flash_fwd_sm90.cu":
        return ()
    from . import flash_sm90

    return flash_sm90.entry_maps(inst, q4, k4, v4)


def _result(cp, prob, out, lse):
    if out.shape[-1] != prob.dv:
        out = cp.ascontiguousarray(out[..., :prob.dv])
    return out.reshape(prob.out_shape), lse.reshape(prob.lse_shape)
