"""The ``cupy.sm80`` entry: flash attention on tensor cores (``mma.sync``, sm_80 and newer).

The forward kernel (``flash_fwd.cu``: ``mma.sync.m16n8k16`` with ``ldmatrix`` and ``cp.async``
double buffering) and the backward kernels (:mod:`.flash_bwd`) serve float16 and bfloat16
inputs with every option of :func:`xattn.flash_attention`. Requests the kernels cannot serve
(other dtypes, head dims above 256, compute capability below 8.0, block sizes the tiles do not
divide, unknown options) are refused by :func:`supports` with a reason, so that
``backend="auto"`` walks on to the next entry of the kernel table and
``backend="cupy.sm80"`` raises. The forward launcher here also serves the float32 SIMT kernel
(``flash_fwd_simt.cu``) for the ``cupy.simt`` entry (:mod:`.flash_simt`).

``prob.block_mask``: each thread block walks the CSR lists of its query block row
(``xattn/kernels/blockmask.cuh``); invisible key blocks are never loaded, full blocks run no
element test, partial blocks run the mask's element rule (causal/window arithmetically, every
other rule from bit-packed tiles). The mask's arrays are uploaded once per (mask, device) and
cached (:mod:`xattn._backends.cupy_.blockmask`; :func:`._params.block_mask_args` fills the
launch arguments). The kernel's query tile must lie inside one
mask block row and its key tile inside one mask block: a configuration of :data:`BM_CONFIGS`
with ``bq % rows == 0`` and ``bk % keys == 0`` is chosen (float32: 32 x 32); block sizes that
none divides (e.g. not multiples of 32) are refused with a reason.

``Dv != D``: q and k, or v, are zero-padded to the common head dim ``max(D, Dv)`` (rounded up as
below) -- copies of the narrower operands -- and the output is sliced back to ``Dv`` columns
(a copy).

bfloat16: CuPy >= 14 holds ``ml_dtypes.bfloat16`` arrays natively; the kernels read them as raw
16-bit words. Head dims that are not 32, 64, 96, 128 or 256 are zero-padded to the next of
those (a copy of q, k, v; zeros change neither ``q.k`` nor the kept output columns).

Modules are compiled lazily with NVRTC, one per (device, dtype, head dim, tile configuration,
plain or with score mods) and cached for the process (:mod:`._compile`; CuPy also keeps
binaries on disk).
"""

from __future__ import annotations

import math

import numpy as np

from . import _params, flash_bwd, instances
from ._compile import compiled_function

__all__ = ["BM_CONFIGS", "CONFIGS", "backward", "forward", "get_kernel", "supports"]

# Tile configurations, from the one list of every compiled entry (instances.py): per head dim
# (warps, 16-row tiles per warp, keys per block); MODS_CONFIGS where the score-mod variant
# would spill with the plain one; BM_CONFIGS / BM_MODS_CONFIGS the block-sparse candidates in
# order of preference (the first whose query tile divides the mask's bq and key tile its bk).
CONFIGS = instances.FWD
MODS_CONFIGS = instances.FWD_MODS
BM_CONFIGS = instances.FWD_BM
BM_MODS_CONFIGS = instances.FWD_BM_MODS
# The float32 SIMT kernel's fixed tile (flash_fwd_simt.cu).
SIMT_BLOCK_Q, SIMT_BLOCK_K = 32, 32
# Options the forward kernels understand: allow_tf32 is a permission (the strict kernels
# honour it by not using it). A block mask is no option: it travels in prob.block_mask.
KNOWN_FORWARD_OPTIONS = frozenset({"allow_tf32"})


def _padded_dim(d: int):
    return next((x for x in sorted(CONFIGS) if x >= d), None)


def supports(prob, opts, op):
    """``None`` when the ``mma.sync`` kernels serve this request, else the reason they do not."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if _params.type_name(prob.dtype) is None:
        return (f"dtype {prob.dtype}: the mma.sync kernels take float16 and bfloat16 (float32: "
                "cupy.simt, cupy.tf32 with allow_tf32=True, cupy.tf32x3 when named; float64: "
                "generic)")
    if op == "backward":
        return flash_bwd.supports(prob, opts)
    if op != "forward":
        return f"op {op!r}: the mma.sync kernels do forward and backward"
    return forward_reason(prob, opts)


def forward_reason(prob, opts, fp32=False):
    """The checks of the forward launcher (``fp32``: the SIMT kernel), None when it serves."""
    unknown = sorted(k for k, v in (opts or {}).items()
                     if v is not None and k not in KNOWN_FORWARD_OPTIONS)
    if unknown:
        return f"options {unknown} are not implemented in the CuPy forward kernels"
    if _padded_dim(max(prob.d, prob.dv)) is None:
        return (f"head_dim {max(prob.d, prob.dv)} > {max(CONFIGS)} is not implemented in the "
                "CuPy kernels")
    if prob.block_mask is not None:
        reason = _block_mask_reason(prob)
        if reason:
            return reason
    return _params.device_reason(prob, "the kernels use " + (
        "cp.async" if fp32 else "mma.sync bf16/f16 and cp.async"))


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


def _block_mask_reason(prob):
    """Why the forward kernels cannot walk ``prob.block_mask``, or None."""
    bm = prob.block_mask
    if bm.batch_shape:
        return "block_mask: a batched mask (one call per batch element goes through flash.py)"
    dp = _padded_dim(max(prob.d, prob.dv))
    fp32 = np.dtype(prob.dtype) == np.float32
    mods = _params.has_score_mods(prob)
    if block_mask_config(dp, bm.block_size, mods, fp32) is None:
        cands = [(SIMT_BLOCK_Q, SIMT_BLOCK_K)] if fp32 else [
            (c[0] * c[1] * 16, c[2])
            for c in (BM_MODS_CONFIGS.get(dp) if mods else None) or BM_CONFIGS[dp]]
        tiles = " or ".join(f"{r} x {n}" for r, n in cands)
        return (f"block_mask: block size {bm.block_size} is not served by the CuPy kernels "
                f"(head dim {dp}, {prob.dtype}): (bq, bk) must be multiples of a kernel tile "
                f"({tiles}); the generic backend serves it")
    return None


def smem_bytes(d, cfg):
    nw, mt, bn = cfg
    return (nw * mt * 16 + 4 * bn) * (d + 8) * 2


def get_kernel(type_name: str, d: int, cfg: tuple, mods: bool, sparse: bool = False):
    """The compiled forward entry point for one dtype, head dim and tile configuration
    (``sparse``: the block-mask walk)."""
    inst = instances.fwd(type_name, d, cfg, mods, sparse)
    return compiled_function(inst.source, inst.name, inst.defines, smem_bytes(d, cfg))


def simt_smem_bytes(d):
    return ((SIMT_BLOCK_Q + SIMT_BLOCK_K) * (d + 4) + SIMT_BLOCK_K * d
            + SIMT_BLOCK_Q * (SIMT_BLOCK_K + 1)) * 4


def get_simt_kernel(d: int, sparse: bool = False):
    """The float32 SIMT forward entry point for one head dim (``sparse``: the block-mask
    walk)."""
    inst = instances.fwd_simt(d)
    return compiled_function(inst.source, inst.names[1 if sparse else 0], inst.defines,
                             simt_smem_bytes(d))


def forward(prob, q, k, v, *, allow_tf32=False, config=None):
    """Return ``(out, lse)`` computed by the ``mma.sync`` kernel (see :func:`supports`).

    ``config`` overrides the tile configuration ``(warps, tiles per warp, keys per block)``
    (benchmarks use it to compare configurations). With ``prob.block_mask`` the kernels walk
    the mask's own block lists (uploaded once, see :mod:`.blockmask`).
    """
    if _params.type_name(prob.dtype) is None:
        raise NotImplementedError(f"dtype {prob.dtype}: the mma.sync kernels take float16 and "
                                  "bfloat16")
    # Allocate and launch on the inputs' device, whichever device is current.
    with q.device:
        return _forward(prob, q, k, v, config)


def _forward(prob, q, k, v, config):
    import cupy as xp

    tn = _params.type_name(prob.dtype)
    d, dv = prob.d, prob.dv
    # Dv != D: q, k and v all padded to one head dim (zeros change neither q.k nor the kept
    # output columns), the output sliced back to dv.
    dp = _padded_dim(max(d, dv))
    mods = _params.has_score_mods(prob)
    block_mask = prob.block_mask
    if block_mask is not None:
        reason = _block_mask_reason(prob)
        if reason:
            raise NotImplementedError(reason)
        fits = block_mask_config(dp, block_mask.block_size, mods, tn is None)
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
    q4, k4, v4, out, lse = _params.forward_buffers(xp, prob, q, k, v, dp, q.dtype)
    if _params.nothing_to_launch(out, lse):
        return _params.forward_result(xp, prob, out, lse)

    sparse = block_mask is not None
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
        *_params.option_args(xp, prob),
        *_params.block_mask_args(xp, prob),
    )
    fn(grid=((prob.sq + bm - 1) // bm, prob.hq, B), block=(threads,), args=args,
       shared_mem=smem)
    return _params.forward_result(xp, prob, out, lse)


def backward(prob, dout, q, k, v, out, lse, **kw):
    return flash_bwd.backward(prob, dout, q, k, v, out, lse, **kw)
