"""Flash attention on CuPy arrays through RawKernels compiled from ``xattn/kernels/*.cu``.

The forward pass runs on tensor cores (``mma.sync.m16n8k16`` with ``ldmatrix`` and
``cp.async`` double buffering, sm_80 and newer) for float16 and bfloat16 inputs with every
option of :func:`xattn.flash_attention`; float32 has a SIMT kernel
(``flash_fwd_simt.cu``, switch: ``ENABLE_FP32_KERNEL``). Requests the
kernels cannot serve (float64, head dims above 256, compute capability below 8.0, block sizes
the tiles do not divide, unknown options) are refused by :func:`supports` with a reason, so
that ``backend="auto"`` falls back to the generic tiled backend and ``backend="cupy"`` raises.

``block_mask`` (switch: ``ENABLE_BLOCK_MASK``): each thread block walks the CSR lists of its
query block row (``xattn/kernels/blockmask.cuh``); invisible key blocks are never loaded, full
blocks run no element test, partial blocks run the mask's element rule (causal/window
arithmetically, every other rule from bit-packed tiles). The mask's arrays are uploaded once per
(mask, device) and cached (:mod:`xattn._backends.cupy_.blockmask`). The kernel's query tile
must lie inside one mask block row and its key tile inside one mask block: a configuration of
:data:`BM_CONFIGS` with ``bq % rows == 0`` and ``bk % keys == 0`` is chosen (float32: 32 x 32);
block sizes that none divides (e.g. not multiples of 32) are refused with a reason.

``Dv != D`` (switch: ``ENABLE_DV_PADDING``): q and k, or v, are zero-padded to the common head
dim ``max(D, Dv)`` (rounded up as below) -- copies of the narrower operands -- and the output
is sliced back to ``Dv`` columns (a copy).

bfloat16: CuPy >= 14 holds ``ml_dtypes.bfloat16`` arrays natively; the kernels read them as raw
16-bit words. Head dims that are not 32, 64, 96, 128 or 256 are zero-padded to the next of
those (a copy of q, k, v; zeros change neither ``q.k`` nor the kept output columns).

Modules are compiled lazily with NVRTC, one per (device, dtype, head dim, tile configuration,
plain or with score mods) and cached for the process (CuPy also keeps binaries on disk).
"""

from __future__ import annotations

import math
import re
import threading
from functools import cache
from pathlib import Path

import numpy as np

__all__ = ["CONFIGS", "backward", "compiled_function", "forward", "get_kernel", "option_args",
           "supports"]

_KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"

# Per head dim: (warps, 16-row tiles per warp, keys per block). Chosen from ptxas -v (no
# spills) and timings on an H200; see notes/gpu_kernels.md.
CONFIGS = {
    32: (4, 1, 64),
    64: (4, 2, 64),
    96: (4, 1, 64),
    128: (4, 2, 32),
    256: (4, 1, 32),
}
# Kernels with score modifications (softcap, bias, ALiBi, mask) hold more registers: where the
# plain configuration would spill with them, they take this one.
MODS_CONFIGS = {128: (4, 1, 64)}
# Block-sparse candidates per head dim, in order of preference: the first whose query tile
# (warps * tiles * 16 rows) divides the mask's bq and whose key tile divides bk serves the
# mask. Every one is in flash_fwd.cu's compile-check list (ptxas: no spills).
BM_CONFIGS = {
    32: ((4, 1, 64), (2, 1, 32)),
    64: ((4, 2, 64), (4, 1, 64), (2, 1, 32)),
    96: ((4, 1, 64), (2, 1, 32)),
    128: ((4, 2, 32), (4, 1, 64), (2, 1, 32)),
    256: ((4, 1, 32),),
}
BM_MODS_CONFIGS = {128: ((4, 1, 64), (2, 1, 32))}
# block_mask in the kernels (False: supports() refuses it, "auto" takes the generic backend).
ENABLE_BLOCK_MASK = True
# Dv != D through zero-padding (False: supports() refuses it).
ENABLE_DV_PADDING = True
_MAX_GRID_YZ = 65535
# Tests set this to fill every output with NaN before the launch (unwritten elements then fail).
POISON = False
# The float32 SIMT kernel (flash_fwd_simt.cu). It passed the GPU tests on an H200 on 2026-11-28
# (13.9 TFLOP/s at D=64 S=4096, 0.39x torch mem-efficient); False sends float32 to "generic".
ENABLE_FP32_KERNEL = True
SIMT_BLOCK_Q, SIMT_BLOCK_K = 32, 32

_lock = threading.Lock()
_functions: dict = {}


def _padded_dim(d: int):
    return next((x for x in sorted(CONFIGS) if x >= d), None)


def _type_name(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return "f16"
    if dtype.name == "bfloat16":
        return "bf16"
    return None


def supports(prob, opts, op):
    """``None`` when the RawKernels serve this request, else the reason they do not."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if op != "forward":
        from . import flash_bwd

        return flash_bwd.supports(prob, opts)
    # allow_tf32 is a permission: the strict float32 kernel honours it by not using it.
    # block_mask comes with the CPU backends' plan/element_rule: the kernels walk the mask.
    known = {"allow_tf32", "block_mask", "plan", "element_rule"}
    unknown = sorted(k for k, v in (opts or {}).items() if v is not None and k not in known)
    if unknown:
        return f"options {unknown} are not implemented in the CuPy forward kernels"
    if np.dtype(prob.dtype) == np.float32:
        if not ENABLE_FP32_KERNEL:
            return ("dtype float32: the SIMT kernel (flash_fwd_simt.cu) is not enabled yet "
                    "(ENABLE_FP32_KERNEL; the generic backend serves float32)")
    elif _type_name(prob.dtype) is None:
        return (f"dtype {prob.dtype}: the kernels take float16 and bfloat16 (and float32 "
                "with ENABLE_FP32_KERNEL); float64 uses the generic backend")
    if prob.dv != prob.d and not ENABLE_DV_PADDING:
        return f"Dv ({prob.dv}) != D ({prob.d}): ENABLE_DV_PADDING is off"
    if _padded_dim(max(prob.d, prob.dv)) is None:
        return (f"head_dim {max(prob.d, prob.dv)} > {max(CONFIGS)} is not implemented in the "
                "CuPy kernels")
    bm = (opts or {}).get("block_mask")
    if bm is not None:
        reason = _block_mask_reason(prob, bm)
        if reason:
            return reason
    nbatch = math.prod(prob.batch)
    if nbatch > _MAX_GRID_YZ or prob.hq > _MAX_GRID_YZ:
        return f"batch ({nbatch}) or heads ({prob.hq}) above the grid limit {_MAX_GRID_YZ}"
    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc < 80:
        return f"compute capability {cc} < 80: the kernels use mma.sync bf16/f16 and cp.async"
    return None


def block_mask_config(dp, block_size, mods, fp32=False):
    """The tile configuration ``(warps, tiles, keys)`` that serves a mask of ``block_size`` at
    padded head dim ``dp``, or None when no configuration divides the blocks. With ``fp32``:
    ``("simt", rows, keys)`` when the SIMT kernel's fixed tile divides them."""
    bq, bk = block_size
    if fp32:
        fits = bq % SIMT_BLOCK_Q == 0 and bk % SIMT_BLOCK_K == 0
        return ("simt", SIMT_BLOCK_Q, SIMT_BLOCK_K) if fits else None
    cands = (BM_MODS_CONFIGS.get(dp) if mods else None) or BM_CONFIGS[dp]
    return next((c for c in cands if bq % (c[0] * c[1] * 16) == 0 and bk % c[2] == 0), None)


def _block_mask_reason(prob, bm):
    if not ENABLE_BLOCK_MASK:
        return "block_mask: the block-sparse kernels are off (ENABLE_BLOCK_MASK)"
    if getattr(bm, "batch_shape", ()):
        return "block_mask: a batched mask (one call per batch element goes through flash.py)"
    dp = _padded_dim(max(prob.d, prob.dv))
    fp32 = np.dtype(prob.dtype) == np.float32
    mods = prob.softcap is not None or prob.has_bias or prob.has_alibi or prob.has_mask
    if block_mask_config(dp, bm.block_size, mods, fp32) is None:
        cands = [(SIMT_BLOCK_Q, SIMT_BLOCK_K)] if fp32 else [
            (c[0] * c[1] * 16, c[2])
            for c in (BM_MODS_CONFIGS.get(dp) if mods else None) or BM_CONFIGS[dp]]
        tiles = " or ".join(f"{r} x {n}" for r, n in cands)
        return (f"block_mask: block size {bm.block_size} is not served by the CuPy kernels "
                f"(head dim {dp}, {prob.dtype}): (bq, bk) must be multiples of a kernel tile "
                f"({tiles}); the generic backend serves it")
    return None


@cache
def _source(name: str) -> str:
    """A kernel's source with its local ``#include "x.cuh"`` / ``"x.cu"`` files inlined, each
    once, recursively.

    Inlining (rather than ``-I``) keeps CuPy's on-disk compile cache honest: it keys on the
    source text, so an edited header changes the key.
    """
    seen: set = set()

    def inline(fname):
        if fname in seen:
            return ""
        seen.add(fname)
        text = (_KERNEL_DIR / fname).read_text()
        return re.sub(r'^#include "([\w.]+\.cuh?)"$', lambda m: inline(m.group(1)), text,
                      flags=re.M)

    return inline(name)


def smem_bytes(d, cfg):
    nw, mt, bn = cfg
    return (nw * mt * 16 + 4 * bn) * (d + 8) * 2


def compiled_function(source: str, name: str, options: tuple, smem: int):
    """Entry point ``name`` of kernel file ``source`` compiled with ``options`` (NVRTC, on first
    use) and cached per (device, name); ``smem`` bytes of dynamic shared memory allowed."""
    import cupy

    key = (cupy.cuda.Device().id, name)
    hit = _functions.get(key)
    if hit is None:
        with _lock:
            hit = _functions.get(key)
            if hit is None:
                mod = cupy.RawModule(code=_source(source), options=("-std=c++17", *options))
                fn = mod.get_function(name)
                if smem > 48 * 1024:
                    fn.max_dynamic_shared_size_bytes = smem
                hit = _functions[key] = (mod, fn)
    return hit[1]


def get_kernel(type_name: str, d: int, cfg: tuple, mods: bool, sparse: bool = False):
    """The compiled forward entry point for one dtype, head dim and tile configuration
    (``sparse``: the block-mask walk)."""
    nw, mt, bn = cfg
    variant = ("mods" if mods else "plain") + ("_bm" if sparse else "")
    name = f"flash_fwd_{type_name}_d{d}_w{nw}_m{mt}_n{bn}_{variant}"
    options = (f"-DXATTN_TN={type_name}", f"-DXATTN_D={d}", f"-DXATTN_NW={nw}",
               f"-DXATTN_MT={mt}", f"-DXATTN_BN={bn}", f"-DXATTN_MN={variant}",
               f"-DXATTN_MODS={'true' if mods else 'false'}",
               f"-DXATTN_SPARSE={'true' if sparse else 'false'}")
    return compiled_function("flash_fwd.cu", name, options, smem_bytes(d, cfg))


def simt_smem_bytes(d):
    return ((SIMT_BLOCK_Q + SIMT_BLOCK_K) * (d + 4) + SIMT_BLOCK_K * d
            + SIMT_BLOCK_Q * (SIMT_BLOCK_K + 1)) * 4


def get_simt_kernel(d: int, sparse: bool = False):
    """The float32 SIMT forward entry point for one head dim (``sparse``: the block-mask
    walk)."""
    name = f"flash_fwd_f32_simt_d{d}" + ("_bm" if sparse else "")
    return compiled_function("flash_fwd_simt.cu", name, (f"-DXATTN_SIMT_D={d}",),
                             simt_smem_bytes(d))


def _collapse_batch(shape, strides):
    """One stride for the flattened batch index, or None when the dims do not collapse."""
    if not shape:
        return 0
    stride = None
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n == 1:
            continue
        if stride is None:
            stride, inner = s, n
            continue
        if s != stride * inner:
            return None
        inner *= n
    return 0 if stride is None else stride


def _score_operand(xp, x, prob, itemsize):
    """Broadcast view of a mask/bias as ``(B, Hq, Sq, Sk)`` element strides, plus the array."""
    view = xp.broadcast_to(x, prob.score_shape)
    if not prob.heads_axis:
        view = view[None]
    nb = len(prob.batch)
    st = [s // itemsize for s in view.strides]
    bs = _collapse_batch(view.shape[:nb], st[:nb])
    if bs is None:
        # Batch dims that no single stride describes: materialise (documented slow path).
        view = xp.ascontiguousarray(view)
        st = [s // itemsize for s in view.strides]
        bs = _collapse_batch(view.shape[:nb], st[:nb])
    return view, (bs, st[nb], st[nb + 1], st[nb + 2])


def option_args(xp, prob, mask, bias, alibi_slopes):
    """The kernels' common option arguments, in their order: causal, window sides (-1 =
    unbounded), softcap (0 = off), ALiBi slopes and their batch stride, the bias and the mask
    with their (batch, head, query, key) element strides (null pointers when absent)."""
    i32, i64, f32 = np.int32, np.int64, np.float32
    null = np.uint64(0)
    alibi_arg, alibi_bs = null, 0
    if alibi_slopes is not None:
        alibi_arg = xp.ascontiguousarray(alibi_slopes, dtype=xp.float32).reshape(-1)
        alibi_bs = 0 if alibi_arg.size == prob.hq else prob.hq
    bias_arg, bias_st = null, (0, 0, 0, 0)
    if bias is not None:
        bias_arg, bias_st = _score_operand(xp, bias.astype(xp.float32, copy=False), prob, 4)
    mask_arg, mask_st = null, (0, 0, 0, 0)
    if mask is not None:
        mask_arg, mask_st = _score_operand(xp, mask.view(xp.uint8), prob, 1)
    w = prob.window
    wl = -1 if w is None or w[0] is None else w[0]
    wr = -1 if w is None or w[1] is None else w[1]
    return (i32(prob.causal), i32(wl), i32(wr), f32(prob.softcap or 0.0),
            alibi_arg, i64(alibi_bs),
            bias_arg, *(i64(s) for s in bias_st),
            mask_arg, *(i64(s) for s in mask_st))


def forward(prob, q, k, v, *, mask=None, bias=None, alibi_slopes=None, plan=None,
            element_rule=None, block_mask=None, allow_tf32=False, config=None):
    """Return ``(out, lse)`` computed by the tensor-core kernel (see :func:`supports`).

    ``config`` overrides the tile configuration ``(warps, tiles per warp, keys per block)``
    (benchmarks use it to compare configurations). With ``block_mask`` the kernels walk the
    mask's own block lists (uploaded once, see :mod:`.blockmask`); ``plan`` and
    ``element_rule`` (the CPU backends' form of the same mask) are then not read.
    """
    if block_mask is None and (plan is not None or element_rule is not None):
        raise NotImplementedError("the CuPy kernels take a block_mask, not a tile plan / "
                                  "element rule")
    # Allocate and launch on the inputs' device, whichever device is current.
    with q.device:
        if allow_tf32 and block_mask is None and np.dtype(prob.dtype) == np.float32:
            from . import flash_tf32  # opt-in TF32 tensor-core kernel (switch: ENABLE_TF32)

            if flash_tf32.supports(prob) is None:
                return flash_tf32.forward(prob, q, k, v, mask, bias, alibi_slopes, config=config)
        if block_mask is None and config is None and np.dtype(prob.dtype) != np.float32:
            from . import flash_sm90  # Hopper wgmma kernel (switch: ENABLE_SM90)

            if flash_sm90.applies(prob, mask=mask, bias=bias, alibi_slopes=alibi_slopes) is None:
                return flash_sm90.forward(prob, q, k, v)
        return _forward(prob, q, k, v, mask, bias, alibi_slopes, config, block_mask=block_mask)


def _forward(prob, q, k, v, mask, bias, alibi_slopes, config, *, block_mask=None):
    import cupy as xp

    tn = _type_name(prob.dtype)
    d, dv = prob.d, prob.dv
    # Dv != D: q, k and v all padded to one head dim (zeros change neither q.k nor the kept
    # output columns), the output sliced back to dv.
    dp = _padded_dim(max(d, dv))
    mods = prob.softcap is not None or bias is not None or alibi_slopes is not None \
        or mask is not None
    if block_mask is not None:
        fits = block_mask_config(dp, block_mask.block_size, mods, tn is None)
        if fits is None:
            raise NotImplementedError(_block_mask_reason(prob, block_mask))
        if config is not None and tn is not None:
            nw, mt, bn = config
            bq, bk = block_mask.block_size
            if bq % (nw * mt * 16) or bk % bn:
                raise ValueError(f"config: {tuple(config)} does not divide the block_mask's "
                                 f"block size {block_mask.block_size}")
        cfg = tuple(config) if config is not None else fits
    elif config is not None:
        cfg = tuple(config)
    else:
        cfg = MODS_CONFIGS.get(dp, CONFIGS[dp]) if mods else CONFIGS[dp]
    if tn is None and np.dtype(prob.dtype) != np.float32:
        raise NotImplementedError(f"dtype {prob.dtype} has no CuPy kernel")
    B = math.prod(prob.batch)
    out_shape, lse_shape = prob.out_shape, prob.lse_shape

    def prep(x, h, s):
        e = x.shape[-1]
        x = xp.ascontiguousarray(x).reshape(B, h, s, e)
        if dp != e:
            xpad = xp.zeros((B, h, s, dp), dtype=x.dtype)
            xpad[..., :e] = x
            x = xpad
        return x

    q4, k4, v4 = prep(q, prob.hq, prob.sq), prep(k, prob.hkv, prob.sk), prep(v, prob.hkv, prob.sk)
    out = xp.empty((B, prob.hq, prob.sq, dp), dtype=q.dtype)
    lse = xp.empty((B, prob.hq, prob.sq), dtype=xp.float32)
    if POISON:
        out.view(xp.uint16).fill(0x7FFF)  # NaN in float16 and in bfloat16
        lse.fill(np.nan)
    if out.size == 0 or lse.size == 0:
        if lse.size:
            lse.fill(-np.inf)
        return out[..., :dv].reshape(out_shape), lse.reshape(lse_shape)

    sparse = block_mask is not None
    if sparse:
        from .blockmask import device_block_mask

        bm_args = device_block_mask(block_mask).kernel_args()
    else:
        from .blockmask import null_kernel_args

        bm_args = null_kernel_args()
    if tn is None:  # float32: the SIMT kernel
        fn, bm, threads, smem = (get_simt_kernel(dp, sparse), SIMT_BLOCK_Q, 128,
                                 simt_smem_bytes(dp))
    else:
        fn = get_kernel(tn, dp, cfg, mods, sparse)
        nw, mt, _ = cfg
        bm, threads, smem = nw * mt * 16, nw * 32, smem_bytes(dp, cfg)
    i32, f32 = np.int32, np.float32
    args = (
        q4, k4, v4, out, lse,
        i32(prob.hq), i32(prob.group), i32(prob.sq), i32(prob.sk), f32(prob.scale),
        *option_args(xp, prob, mask, bias, alibi_slopes),
        *bm_args,
    )
    fn(grid=((prob.sq + bm - 1) // bm, prob.hq, B), block=(threads,), args=args,
       shared_mem=smem)
    if dp != dv:
        out = xp.ascontiguousarray(out[..., :dv])
    return out.reshape(out_shape), lse.reshape(lse_shape)


def backward(prob, dout, q, k, v, out, lse, *, mask=None, bias=None, alibi_slopes=None,
             plan=None, element_rule=None, block_mask=None, deterministic=False):
    from . import flash_bwd

    return flash_bwd.backward(prob, dout, q, k, v, out, lse, mask=mask, bias=bias,
                              alibi_slopes=alibi_slopes, plan=plan, element_rule=element_rule,
                              block_mask=block_mask, deterministic=deterministic)
