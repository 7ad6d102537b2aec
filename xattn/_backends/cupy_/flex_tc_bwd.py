"""flex_attention_backward on tensor cores: the user's functions compiled into the 16-bit
backward kernels.

The kernel (:func:`kernel_for`, by compute capability as :func:`.flex_tc.kernel_for` picks the
forward's): on compute capability 9.0 the Hopper backward ``xattn/kernels/flash_bwd_sm90.cu``
(wgmma, the five GEMMs on warpgroup MMA; padded head dim 64, or 128 without a score_mod, whose
derivative does not fit its registers there), elsewhere the ``mma.sync`` backward
``xattn/kernels/flash_bwd.cu`` (FlashAttention-2 scheme). Both take the same argument list
and read the user's functions through the same hook (``bwd_score_rules.cuh``).

:mod:`xattn._flex_cuda` translates ``score_mod`` together with its derivative with respect to
the score (``xattn_user_score_d``, from the forward-mode rules the Numba kernels use) and
``mask_mod``; the text is put before the kernel file with ``XATTN_USER_MODS`` defined, so
the compiler inlines them into the backward kernel. Each recomputed score runs
``xattn_user_score_d`` (after the scale, natural units): its value gives ``P`` against the
forward's ``lse``, its derivative ``dcap`` gives ``dS = P (dP - delta) dcap``.

Steps (current CuPy stream, as :mod:`.flash_bwd` runs them):

1. ``delta = rowsum(dout * out)`` (the built-in 16-bit kernel);
2. the main kernel, one CTA per (key block, kv head, batch element; mma.sync at D = 256: two
   column halves): dK, dV of its keys and
   ``dS K`` added to a float32 ``dq_accum`` with atomics (dq is not bitwise reproducible, as
   the SIMT kernel's was not);
3. ``dq = scale * dq_accum`` in the input type.

With a ``mask_mod`` the block mask is derived as the forward derives it
(:func:`.flex_tc.block_lists`, :data:`.flex_tc.BLOCK` square blocks; the same classification
kernel in this module): the main kernel walks its CSC transpose (built here on the device),
empty blocks are never loaded, full blocks run no ``mask_mod``, partial blocks run it per
element. Compiled modules share :mod:`.flex_tc`'s cache.

Gradients of floating ``score_mod_args`` (``dargs``) are not computed here:
:func:`reason` refuses such calls, and :func:`xattn.flex_attention_backward` sends them to the
SIMT kernel (``backend="numba_cuda"``) under ``"auto"``, saying so in the ``xattn`` log.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np

from ... import _flex_cuda
from . import _params, flash_bwd, flash_bwd_sm90, flex_tc, instances
from ._compile import source
from .blockmask import null_kernel_args

__all__ = ["backward", "csc_lists", "instance", "kernel_for", "kernel_text", "reason"]

_log = logging.getLogger("xattn")
# The CSC transposes of the derived masks' CSR lists: id(frow) -> (frow, lists); frow is
# held so that its id stays unique while the entry lives.
_csc: dict = {}
_MAX_CSC = 32
_csc_lock = threading.Lock()  # calls from several threads share _csc (as flex_tc's caches)


def reason(prob, smod, mmod, args):
    """None when the tensor-core backward serves this call, else why not."""
    if prob.xp.__name__ == "cupy" and _params.type_name(prob.dtype) is None:
        # Checked here too: the forward's table (flex_tc.reason) may serve other dtypes.
        return (f"dtype {prob.dtype}: the tensor-core flex backward takes float16 and "
                "bfloat16 (backend='numba_cuda' computes float32/float64)")
    why = flex_tc.reason(prob)
    if why is not None:
        return why
    if flash_bwd._common_dim(prob) is None:
        return f"head_dim {max(prob.d, prob.dv)}: no backward kernel configuration"
    floating = [i for i, a in enumerate(args) if a.dtype.kind == "f"]
    if floating:
        return (f"score_mod_args {floating} are floating arrays: their gradients (dargs) are "
                "computed by the SIMT kernel only (backend='numba_cuda')")
    return flex_tc.source_reason(smod, mmod)


def instance(tn, dp, mods: bool, sparse: bool):
    """The main backward instance (atomic dq) for the user's functions, and its config."""
    if sparse:
        cfg, _ = flash_bwd.block_mask_configs(dp, (flex_tc.BLOCK, flex_tc.BLOCK))
    else:
        cfg = flash_bwd.CONFIGS[dp]
    inst = instances.bwd(tn, dp, cfg, mods, True, sparse)
    # Own entry names (the variant token): never the built-in entries' names.
    old = dict(inst.params)["XATTN_MN"]
    mn = "flex" + ("_bm" if sparse else "")
    params = tuple((k, mn if k == "XATTN_MN" else v) for k, v in inst.params)
    name = inst.name.replace(f"_{old}_", f"_{mn}_")
    return instances.Instance(inst.source, inst.macro, params, (name,),
                              extra=inst.extra), cfg


def instance_sm90(tn, dp, mods: bool, sparse: bool):
    """The Hopper backward's instance for the user's functions, or None where it has no
    entry (a score_mod at padded head dim 128; neither function at 128). With neither function
    the window entry serves (the option entries alone take the hook's arguments), which exists
    at D = 64 only."""
    var = "_".join(("mods",) * mods + ("bm",) * sparse) or "win"
    if dp not in flash_bwd_sm90.HEAD_DIMS or not flash_bwd_sm90.built(var, dp):
        return None
    inst = instances.bwd_sm90(tn, dp, var)
    mn = "flex" + ("_bm" if sparse else "")
    params = tuple((k, mn if k == "XATTN_BWD90_MN" else v) for k, v in inst.params)
    return instances.Instance(inst.source, inst.macro, params,
                              (inst.name[:-len(var)] + mn,), arch=inst.arch)


def kernel_for(tn, dp, mods: bool, sparse: bool, cc: int):
    """``(instance, keys per CTA, CTAs per key block, threads, shared memory bytes)`` of the
    backward that runs the user's functions: the Hopper kernel on compute capability 9.0
    where it has an entry (:func:`instance_sm90`), else the ``mma.sync`` kernel."""
    if cc == 90:
        inst = instance_sm90(tn, dp, mods, sparse)
        if inst is not None:
            return (inst, flash_bwd_sm90.BLOCK_N, 1, flash_bwd_sm90.THREADS,
                    flash_bwd_sm90.smem_bytes(dp))
    inst, cfg = instance(tn, dp, mods, sparse)
    dc, nw, _, _ = cfg
    return inst, 16 * nw, dp // dc, nw * 32, flash_bwd.smem_bytes(dp, cfg)


def kernel_text(mods, kernel_file="flash_bwd.cu") -> str:
    """The module source: the translated functions (with the score derivative) and hook
    macros, the backward kernel and (with a mask_mod) the block-classification kernel."""
    parts = [mods.kernel_prelude(), source(kernel_file)]
    if mods.has_mask:
        parts += [f"#define XATTN_STATE_THREADS {flex_tc.STATE_THREADS}",
                  flex_tc._STATES_KERNEL]
    return "\n".join(parts)


def _function(mods, inst, smem):
    return flex_tc.cached_function(mods, inst, smem, lambda: kernel_text(mods, inst.source),
                                   "flex_attention_backward", "xattn_flex_bwd_")


def csc_lists(xp, frow, fcol, prow, pcol, nqb, nkb):
    """The CSC transpose of the derived mask's CSR lists (``XattnCscMask``): per key block,
    the visible query blocks in order (``col_ptr``, ``row_idx``) and per entry the partial
    block's CSR entry number, -1 for a full block (the kernels only test ``>= 0``)."""
    tile = xp.full((nqb, nkb), -2, dtype=xp.int32)  # -2 empty, -1 full, >= 0 partial entry
    for ptr, cols, val in ((frow, fcol, None), (prow, pcol, True)):
        n = int(ptr[-1])
        if n == 0:
            continue
        ent = xp.arange(n, dtype=xp.int32)
        rows = (xp.searchsorted(ptr, ent, side="right") - 1).astype(xp.int32)
        tile[rows, cols[:n]] = ent if val else -1
    vis = tile.T > -2
    col_ptr = xp.zeros(nkb + 1, dtype=xp.int32)
    col_ptr[1:] = xp.cumsum(vis.sum(axis=1, dtype=xp.int32))
    kcol, qrow = xp.nonzero(vis)  # row-major over (key block, query block): sorted per column
    if qrow.size == 0:
        return col_ptr, xp.zeros(1, xp.int32), xp.zeros(1, xp.int32)
    return (col_ptr, qrow.astype(xp.int32),
            tile.T[kcol, qrow].astype(xp.int32))


def _csc_cached(cp, frow, fcol, prow, pcol, nqb, nkb):
    with _csc_lock:
        hit = _csc.get(id(frow))
    if hit is not None and hit[0] is frow:
        return hit[1]
    lists = csc_lists(cp, frow, fcol, prow, pcol, nqb, nkb)
    with _csc_lock:
        _csc[id(frow)] = (frow, lists)
        while len(_csc) > _MAX_CSC:
            _csc.pop(next(iter(_csc)))
    return lists


def backward(prob, dout, q, k, v, out, lse, *, smod, mmod, args, mask_takes_args):
    """``(dq, dk, dv)`` of flex attention on the tensor cores (see :func:`reason`), shaped
    and typed like ``q``, ``k``, ``v``."""
    with q.device:
        return _backward(prob, dout, q, k, v, out, lse, smod, mmod, args, mask_takes_args)


def _backward(prob, dout, q, k, v, out, lse, smod, mmod, args, mask_takes_args):
    import cupy as cp

    mods = _flex_cuda.translate_cached(smod, mmod, len(args), mask_takes_args, args,
                                       grad=True)
    tn = _params.type_name(prob.dtype)
    sparse = mmod is not None
    # The backward's own padded head dims (the block-sparse tiles start at D = 64).
    dp = flash_bwd._sparse_dim(prob) if sparse else flash_bwd._common_dim(prob)
    batch = math.prod(prob.batch) if prob.heads_axis else 1
    hq, hkv = (prob.hq, prob.hkv) if prob.heads_axis else (1, 1)
    sq, sk = prob.sq, prob.sk
    dtype = q.dtype
    if batch * hq * sq == 0 or sk == 0:
        return (cp.zeros(q.shape, dtype=dtype), cp.zeros(k.shape, dtype=dtype),
                cp.zeros(v.shape, dtype=dtype))
    inst, bn, ncol, threads, smem = kernel_for(tn, dp, smod is not None, sparse,
                                               _params.compute_capability())
    _, fn, states_fn = _function(mods, inst, smem)
    user_args = mods.kernel_args(args, smod, mmod)

    i32, f32 = np.int32, np.float32
    if sparse:
        cacheable = not mask_takes_args and all(isinstance(a, np.ndarray) for a in mmod.arrays)
        frow, fcol, prow, pcol = flex_tc.block_lists(
            cp, mods, states_fn, user_args, mmod=mmod, cacheable=cacheable, batch=batch,
            hq=hq, sq=sq, sk=sk)
        nqb, nkb = -(-sq // flex_tc.BLOCK), -(-sk // flex_tc.BLOCK)
        csc = (_csc_cached(cp, frow, fcol, prow, pcol, nqb, nkb) if cacheable
               else csc_lists(cp, frow, fcol, prow, pcol, nqb, nkb))
        bm_args = (*flex_tc.derived_mask_args(frow, fcol, prow, pcol), *csc)
    else:
        null = np.uint64(0)
        bm_args = (*null_kernel_args(), null, null, null)

    q4 = _params.operand(cp, q, batch, hq, sq, dp)
    k4 = _params.operand(cp, k, batch, hkv, sk, dp)
    v4 = _params.operand(cp, v, batch, hkv, sk, dp)
    do4 = _params.operand(cp, dout, batch, hq, sq, dp, dtype)
    o4 = _params.operand(cp, out, batch, hq, sq, dp, dtype)
    lse3 = cp.ascontiguousarray(lse.reshape(batch, hq, sq), dtype=cp.float32)
    dq4, dk4, dv4, delta = flash_bwd.grad_buffers(cp, batch, hq, hkv, sq, sk, dp, dtype)
    wgmma = inst.source == "flash_bwd_sm90.cu"  # its dq_accum is in tile order
    acc = (flash_bwd_sm90.dq_accum(cp, batch, hq, sq, dp) if wgmma
           else cp.zeros((batch, hq, sq, dp), dtype=cp.float32))

    flash_bwd.run_delta(tn, o4, do4, delta, dp)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("flex_attention_backward: backend cupy, entry %s", inst.name,
                   extra={"xattn_backend": "cupy"})
    null = np.uint64(0)
    fn(grid=(-(-sk // bn) * ncol, hkv, batch), block=(threads,),
       args=(q4, k4, v4, do4, lse3, delta, acc, null, dk4, dv4, i32(hq), i32(hq // hkv),
             i32(sq), i32(sk), f32(prob.scale), *flex_tc._no_score_options(), *bm_args,
             *user_args),
       shared_mem=smem)
    if wgmma:
        flash_bwd_sm90.run_dq_convert(tn, dp, acc, dq4, batch * hq * sq, sq, prob.scale)
    else:
        flash_bwd.run_dq_convert(tn, acc, dq4, prob.scale)
    return (flash_bwd.unpad(cp, dq4, prob.d, q.shape), flash_bwd.unpad(cp, dk4, prob.d, k.shape),
            flash_bwd.unpad(cp, dv4, prob.dv, v.shape))
