"""Flash attention backward on CuPy arrays: RawKernels compiled from ``xattn/kernels/flash_bwd.cu``.

float16 and bfloat16 on tensor cores (``mma.sync.m16n8k16``, sm_80 and newer) with every option
the forward kernel serves: causal, window, scale, softcap, additive bias and boolean mask (read
tile by tile, no gradient), ALiBi, GQA/MQA (dk/dv of a kv head summed over its query heads in
registers, no copies of k/v), any ``Sq``/``Sk``, fully masked rows (zero gradients).

Steps (all on the current CuPy stream, outputs on the inputs' device):

1. ``delta = rowsum(dout * out)`` in float32;
2. the main kernel, one CTA per (key block, kv head, batch element): dK and dV of its keys and,
   by default, ``dS K`` added to a float32 ``dq_accum`` with atomics (the order of those adds
   varies from run to run);
3. ``dq = scale * dq_accum`` in the input type, or with ``deterministic=True`` a separate dq
   kernel (one CTA per query block, no atomics: bitwise reproducible).

Head dims that are not 32, 64, 96, 128 or 256 are zero-padded to the next of those, and
``Dv != D`` pads both to the larger one's size (copies of q, k, v, dout; zeros change neither
the scores nor the kept gradient columns). The ``cupy.sm80`` entry serves float16 and
bfloat16 here; ``cupy.simt`` serves float32 with the SIMT kernel (``flash_bwd_simt.cu``: the
same scheme on the CUDA cores, dq by atomics only), so ``deterministic=True`` with float32
goes to the generic entry.

``prob.block_mask`` (float16/bfloat16): the main kernel walks the
mask's CSC list of its key block's column (the query blocks that see those keys, uploaded once
per (mask, device) by :mod:`.blockmask`), the deterministic dq kernel the CSR list of its query
block row, as the forward does; invisible blocks are never loaded, full blocks run no element
test, partial blocks the mask's element rule (``xattn/kernels/blockmask.cuh``). A kernel's key
tile must lie inside one mask key block and its query step inside one mask query block: the
first configuration of :data:`BM_CONFIGS` / :data:`BM_DQ_CONFIGS` that divides ``(bq, bk)`` is
taken, and block sizes none divides (not multiples of 32 / 16) are refused with a reason.
Batched masks never get here: :func:`xattn.flash_attention_backward` calls once per batch
element. The device arrays and launch arguments of the mask come from
:func:`._params.block_mask_args`.
"""

from __future__ import annotations

import math

import numpy as np

from . import _params, instances
from ._compile import compiled_function

__all__ = ["BM_CONFIGS", "BM_DQ_CONFIGS", "CONFIGS", "DQ_CONFIGS", "backward",
           "block_mask_configs", "block_mask_reason", "supports"]

# Tile configurations, from the one list of every compiled entry (instances.py). Per padded
# head dim, the main kernel's (columns of dK/dV per CTA, warps, query rows per step, dq slice
# width): BN = 16 * warps keys per CTA; the dK and dV accumulators (BN x DC float32 each, DC per
# thread) set the register budget, so D = 256 splits the columns over two CTAs. DQ_CONFIGS: the
# deterministic dq kernel's (warps, keys per block). Block-sparse candidates, in order of
# preference: the first main configuration whose key tile (16 * warps) divides the mask's bk
# and whose query step divides bq, and the first dq configuration whose query block
# (16 * warps) divides bq and whose key block divides bk.
CONFIGS = instances.BWD
DQ_CONFIGS = instances.BWD_DQ
BM_CONFIGS = instances.BWD_BM
BM_DQ_CONFIGS = instances.BWD_BM_DQ

# The float32 SIMT kernel's tile (flash_bwd_simt.cu).
SIMT_BLOCK = 32


def _common_dim(prob):
    """The padded head dim both D and Dv are zero-extended to (None above 256)."""
    d = max(prob.d, prob.dv)
    return next((x for x in sorted(CONFIGS) if x >= d), None)


def _sparse_dim(prob):
    """The padded head dim of the block-sparse kernels (D = 32 runs the D = 64 tiles)."""
    dp = _common_dim(prob)
    return None if dp is None else max(dp, min(BM_CONFIGS))


def block_mask_configs(dp, block_size):
    """``(config, dq_config)``: the main and dq kernel configurations that serve a mask of
    ``block_size`` at padded head dim ``dp``; either is None when no candidate divides the
    blocks.

    Examples
    --------
    >>> from xattn._backends.cupy_.flash_bwd import block_mask_configs
    >>> block_mask_configs(64, (128, 128))
    ((64, 4, 64, 64), (4, 64))
    >>> block_mask_configs(128, (32, 32))
    ((128, 2, 32, 64), (2, 32))
    >>> block_mask_configs(256, (64, 64))
    ((128, 4, 16, 64), (4, 16))
    >>> block_mask_configs(64, (48, 64))
    (None, None)
    """
    bq, bk = block_size
    dp = max(dp, min(BM_CONFIGS))
    cfg = next((c for c in BM_CONFIGS[dp] if bk % (16 * c[1]) == 0 and bq % c[2] == 0), None)
    dq = next((c for c in BM_DQ_CONFIGS[dp] if bq % (16 * c[0]) == 0 and bk % c[1] == 0), None)
    return cfg, dq


def block_mask_reason(prob, deterministic=False):
    """``None`` when the backward kernels serve ``prob.block_mask``, else the reason."""
    bm = prob.block_mask
    if bm.batch_shape:
        return "block_mask: a batched mask (one call per batch element goes through flash.py)"
    if np.dtype(prob.dtype) == np.float32:
        return ("block_mask with float32: the SIMT backward kernel walks no block mask (the "
                "generic backend serves it)")
    dp = _sparse_dim(prob)
    cfg, dq = block_mask_configs(dp, bm.block_size)
    if cfg is None or (deterministic and dq is None):
        tiles = " or ".join(f"{16 * c[1]} keys x {c[2]} queries" for c in BM_CONFIGS[dp])
        return (f"block_mask: block size {tuple(bm.block_size)} is not served by the CuPy "
                f"backward kernels (head dim {dp}): bk must be a multiple of a key tile and "
                f"bq of its query step ({tiles}); the generic backend serves it")
    return None


def supports(prob, opts):
    """``None`` when the backward kernels serve this request, else the reason they do not."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    opts = opts or {}
    # A block mask is no option: it travels in prob.block_mask, which the kernels walk.
    unknown = sorted(k for k, v in opts.items() if v is not None and k != "deterministic")
    if unknown:
        return f"options {unknown} are not implemented in the CuPy backward kernel"
    if np.dtype(prob.dtype) == np.float32:
        if opts.get("deterministic"):
            return ("deterministic=True with float32: the SIMT backward kernel adds dq with "
                    "atomics only (the generic backend is deterministic)")
    elif _params.type_name(prob.dtype) is None:
        return (f"dtype {prob.dtype}: the backward kernels take float16, bfloat16 and float32; "
                "float64 uses the generic backend")
    if _common_dim(prob) is None:
        return (f"head_dim {max(prob.d, prob.dv)} > {max(CONFIGS)} is not implemented in the "
                "CuPy backward kernel")
    if prob.block_mask is not None:
        reason = block_mask_reason(prob, bool(opts.get("deterministic")))
        if reason:
            return reason
    return _params.device_reason(prob, "the kernels use mma.sync bf16/f16 and cp.async")


def smem_bytes(d, cfg):
    """Dynamic shared memory of the main kernel: K, V, two Q and dO buffers, dS^T, lse, delta."""
    _, nw, bm, _ = cfg
    bn, ld = 16 * nw, d + 8
    return (2 * bn * ld + 4 * bm * ld + bn * (bm + 8)) * 2 + 4 * bm * 4


def dq_smem_bytes(d, cfg):
    """Dynamic shared memory of the dq kernel: Q, dO and two K and V buffers."""
    nw, bn = cfg
    return (2 * 16 * nw + 4 * bn) * (d + 8) * 2


def simt_smem_bytes(d):
    """Dynamic shared memory of the float32 kernel: K, V, Q, dO rows, P^T, dS^T, lse, delta."""
    b = SIMT_BLOCK
    return (4 * b * (d + 1) + 2 * b * (b + 1) + 2 * b) * 4


def get_kernel(tn, d, cfg, mods, dq, sparse=False):
    """The main backward kernel for one dtype, head dim, configuration, score-mod flag and
    dq mode (``dq=True``: atomics into dq_accum; False: the dq kernel runs separately), and
    with ``sparse`` the block-mask walk."""
    inst = instances.bwd(tn, d, cfg, mods, dq, sparse)
    return compiled_function(inst.source, inst.name, inst.defines, smem_bytes(d, cfg))


def get_dq_kernel(tn, d, cfg, mods, sparse=False):
    """The deterministic dq kernel for one dtype, head dim, configuration, score-mod flag and
    (``sparse``) the block-mask walk."""
    inst = instances.bwd_dq(tn, d, cfg, mods, sparse)
    return compiled_function(inst.source, inst.name, inst.defines, dq_smem_bytes(d, cfg))


def get_simt_kernel(d, mods):
    """The float32 SIMT backward kernel for one head dim and score-mod flag."""
    inst = instances.bwd_simt(d, mods)
    return compiled_function(inst.source, inst.name, inst.defines, simt_smem_bytes(d))


def get_aux_kernel(kind, tn):
    """``flash_bwd_delta_<tn>`` or ``flash_bwd_dq_convert_<tn>``."""
    inst = instances.bwd_aux(tn)
    return compiled_function(inst.source, f"flash_bwd_{kind}_{tn}", inst.defines, 0)


# The steps that every tensor-core backward launcher (this one, flash_bwd_sm90.py,
# flex_tc_bwd.py) shares around its main kernel.

def grad_buffers(xp, batch, hq, hkv, sq, sk, dp, dtype):
    """``(dq, dk, dv, delta)``: the gradients (batch, heads, seq, dp) in ``dtype``, uninitialised
    (poisoned under ``XATTN_POISON``: an element no kernel wrote shows), and the float32 row
    sums (batch, hq, sq)."""
    dq4 = xp.empty((batch, hq, sq, dp), dtype=dtype)
    dk4 = xp.empty((batch, hkv, sk, dp), dtype=dtype)
    dv4 = xp.empty((batch, hkv, sk, dp), dtype=dtype)
    if _params.poison():
        _params.fill_poison(xp, dq4, dk4, dv4)
    return dq4, dk4, dv4, xp.empty((batch, hq, sq), dtype=xp.float32)


def run_delta(tn, o4, do4, delta, dp):
    """``delta = rowsum(dout * out)`` in float32 (step 1), rows of ``dp`` columns."""
    rows = delta.size
    get_aux_kernel("delta", tn)(grid=((rows + 7) // 8,), block=(256,),
                                args=(o4, do4, delta, np.int64(rows), np.int32(dp)))


def run_dq_convert(tn, acc, dq4, scale):
    """``dq = scale * dq_accum`` in the input type (step 3 of the atomic variant)."""
    pairs = acc.size // 2
    get_aux_kernel("dq_convert", tn)(grid=(min((pairs + 255) // 256, 65535),), block=(256,),
                                     args=(acc, dq4, np.int64(pairs), np.float32(scale)))


def run_dq(tn, prob, dp, dq_cfg, bufs, opt_args, bm_args):
    """The deterministic dq kernel (step 3 with ``deterministic=True``; also after the Hopper
    backward's dK/dV-only entries): one CTA of ``16 * warps`` query rows per (query block,
    query head, batch element) walks its key blocks in order. ``bufs``: ``(q4, k4, v4, do4,
    lse3, delta, dq4, dk4, dv4)`` at padded head dim ``dp`` (dq4 is written, dk4 / dv4 are
    not read); ``opt_args`` / ``bm_args``: :func:`._params.option_args` and
    :func:`._params.block_mask_args` (``csc=True``) of ``prob``."""
    q4, k4, v4, do4, lse3, delta, dq4, dk4, dv4 = bufs
    dnw, _ = dq_cfg
    bm = 16 * dnw
    B, hq, sq = math.prod(prob.batch), prob.hq, prob.sq
    kernel = get_dq_kernel(tn, dp, dq_cfg, _params.has_score_mods(prob),
                           prob.block_mask is not None)
    kernel(grid=((sq + bm - 1) // bm, hq, B), block=(dnw * 32,),
           args=(q4, k4, v4, do4, lse3, delta, np.uint64(0), dq4, dk4, dv4, np.int32(hq),
                 np.int32(prob.group), np.int32(sq), np.int32(prob.sk),
                 np.float32(prob.scale), *opt_args, *bm_args),
           shared_mem=dq_smem_bytes(dp, dq_cfg))


def float32_backward(prob, dout, q, k, v, out, lse, dp, kernel, grid_x, threads, smem):
    """The float32 backward's host steps around its main ``kernel`` (the SIMT one here,
    :mod:`.flash_bwd_tf32x3`'s 3xTF32 one; both take the same arguments): operands as
    contiguous float32 (batch, heads, seq, ``dp``), ``delta = rowsum(dout * out)`` by CuPy,
    the kernel on a grid of ``(grid_x, kv heads, batch)`` blocks of ``threads`` adding ``dS K``
    to a zeroed float32 ``dq_accum``, then ``dq = scale * dq_accum``. Call inside the inputs'
    device context."""
    import cupy as xp

    B, hq, hkv, sq, sk = math.prod(prob.batch), prob.hq, prob.hkv, prob.sq, prob.sk
    f32, i32 = np.float32, np.int32
    if B * hq * sq == 0 or sk == 0:
        # Nothing to differentiate through: queries without keys have zero gradients.
        return (xp.zeros(q.shape, dtype=f32), xp.zeros(k.shape, dtype=f32),
                xp.zeros(v.shape, dtype=f32))

    def prep(x, h, s):
        return _params.operand(xp, x, B, h, s, dp, f32)

    q4, k4, v4 = prep(q, hq, sq), prep(k, hkv, sk), prep(v, hkv, sk)
    do4, o4 = prep(dout, hq, sq), prep(out, hq, sq)
    lse3 = xp.ascontiguousarray(lse.reshape(B, hq, sq), dtype=f32)
    dq4, dk4, dv4, delta = grad_buffers(xp, B, hq, hkv, sq, sk, dp, f32)
    delta[...] = (do4 * o4).sum(axis=-1)
    acc = xp.zeros((B, hq, sq, dp), dtype=f32)
    kernel(grid=(grid_x, hkv, B), block=(threads,),
           args=(q4, k4, v4, do4, lse3, delta, acc, dk4, dv4, i32(hq), i32(prob.group),
                 i32(sq), i32(sk), f32(prob.scale), *_params.option_args(xp, prob)),
           shared_mem=smem)
    xp.multiply(acc, f32(prob.scale), out=dq4)
    return (unpad(xp, dq4, prob.d, q.shape), unpad(xp, dk4, prob.d, k.shape),
            unpad(xp, dv4, prob.dv, v.shape))


def unpad(xp, x, w, shape):
    """The first ``w`` columns of a padded (..., dp) result, as ``shape`` (a copy only where
    padded)."""
    if w != x.shape[-1]:
        x = xp.ascontiguousarray(x[..., :w])
    return x.reshape(shape)


def backward(prob, dout, q, k, v, out, lse, *, deterministic=False, config=None,
             dq_config=None):
    """Return ``(dq, dk, dv)`` computed by the backward kernels (see :func:`supports`).

    ``config`` / ``dq_config`` override the tile configurations of :data:`CONFIGS` /
    :data:`DQ_CONFIGS` (benchmarks use them to compare configurations). With
    ``prob.block_mask`` the kernels walk the mask's own block lists.
    """
    if prob.block_mask is not None:
        reason = block_mask_reason(prob, bool(deterministic))
        if reason:
            raise NotImplementedError(reason)
    with q.device:
        return _backward(prob, dout, q, k, v, out, lse, bool(deterministic), config,
                         dq_config)


def _backward(prob, dout, q, k, v, out, lse, deterministic, config, dq_config):
    import cupy as xp

    tn = _params.type_name(prob.dtype)
    simt = np.dtype(prob.dtype) == np.float32
    if tn is None and not simt:
        raise NotImplementedError(f"dtype {prob.dtype} has no CuPy backward kernel")
    if simt and deterministic:
        raise NotImplementedError("deterministic=True: the float32 kernel adds dq with atomics")
    d, dvd = prob.d, prob.dv
    block_mask = prob.block_mask
    sparse = block_mask is not None
    dp = _sparse_dim(prob) if sparse else _common_dim(prob)
    mods = _params.has_score_mods(prob)
    if simt:
        sb = SIMT_BLOCK
        return float32_backward(prob, dout, q, k, v, out, lse, dp, get_simt_kernel(dp, mods),
                                (prob.sk + sb - 1) // sb, 128, simt_smem_bytes(dp))
    if sparse:
        bm_cfg, bm_dq_cfg = block_mask_configs(dp, block_mask.block_size)
        cfg = tuple(config) if config is not None else bm_cfg
        dq_cfg = tuple(dq_config) if dq_config is not None else bm_dq_cfg
        bq, bk = block_mask.block_size
        if bk % (16 * cfg[1]) or bq % cfg[2]:
            raise ValueError(f"config: {cfg} does not divide the block_mask's block size "
                             f"{tuple(block_mask.block_size)}")
        if deterministic and (bq % (16 * dq_cfg[0]) or bk % dq_cfg[1]):
            raise ValueError(f"dq_config: {dq_cfg} does not divide the block_mask's block "
                             f"size {tuple(block_mask.block_size)}")
    else:
        cfg = tuple(config) if config is not None else CONFIGS[dp]
        dq_cfg = tuple(dq_config) if dq_config is not None else DQ_CONFIGS[dp]
    B, hq, hkv, sq, sk = math.prod(prob.batch), prob.hq, prob.hkv, prob.sq, prob.sk
    dtype = q.dtype

    def prep(x, h, s, w):
        # Contiguous (B, H, S, dp) in the input type; zero columns where w < dp.
        return _params.operand(xp, x, B, h, s, dp, dtype)

    if B * hq * sq == 0 or sk == 0:
        # Nothing to differentiate through: queries without keys have zero gradients.
        return (xp.zeros(q.shape, dtype=dtype), xp.zeros(k.shape, dtype=dtype),
                xp.zeros(v.shape, dtype=dtype))

    q4, k4, v4 = prep(q, hq, sq, d), prep(k, hkv, sk, d), prep(v, hkv, sk, dvd)
    do4, o4 = prep(dout, hq, sq, dvd), prep(out, hq, sq, dvd)
    lse3 = xp.ascontiguousarray(lse.reshape(B, hq, sq), dtype=xp.float32)

    dq4, dk4, dv4, delta = grad_buffers(xp, B, hq, hkv, sq, sk, dp, dtype)
    null = np.uint64(0)
    i32, f32 = np.int32, np.float32

    run_delta(tn, o4, do4, delta, dp)

    opt_args = _params.option_args(xp, prob)
    acc = None if deterministic else xp.zeros((B, hq, sq, dp), dtype=xp.float32)

    bm_args = _params.block_mask_args(xp, prob, csc=True)

    def args(dq_accum, dq):
        # The score-operand arguments; the tensor-core entries take bm_args after them.
        return (
            q4, k4, v4, do4, lse3, delta, dq_accum, dq, dk4, dv4,
            i32(hq), i32(prob.group), i32(sq), i32(sk), f32(prob.scale), *opt_args,
        )

    dc, nw, _, _ = cfg
    bn = 16 * nw
    main = get_kernel(tn, dp, cfg, mods, not deterministic, sparse)
    main(grid=(((sk + bn - 1) // bn) * (dp // dc), hkv, B), block=(nw * 32,),
         args=(*args(null if deterministic else acc, null), *bm_args),
         shared_mem=smem_bytes(dp, cfg))
    if deterministic:
        run_dq(tn, prob, dp, dq_cfg, (q4, k4, v4, do4, lse3, delta, dq4, dk4, dv4), opt_args,
               bm_args)
    else:
        run_dq_convert(tn, acc, dq4, prob.scale)
    return (unpad(xp, dq4, d, q.shape), unpad(xp, dk4, d, k.shape),
            unpad(xp, dv4, dvd, v.shape))
