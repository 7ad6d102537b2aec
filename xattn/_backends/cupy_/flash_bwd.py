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
the scores nor the kept gradient columns). ``ENABLE_BWD_KERNEL`` and ``ENABLE_DETERMINISTIC``
switch the two paths off (``backend="auto"`` then uses the generic backend).

float32 has a SIMT kernel (``flash_bwd_simt.cu``: the same scheme on the CUDA cores, dq by
atomics only), off until it has passed the GPU tests (``ENABLE_FP32_BWD``).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from . import flash as _fwd

__all__ = ["CONFIGS", "DQ_CONFIGS", "backward", "supports"]

# Per padded head dim, the main kernel's (columns of dK/dV per CTA, warps, query rows per step,
# dq slice width): BN = 16 * warps keys per CTA. The dK and dV accumulators (BN x DC float32
# each, DC per thread) set the register budget: D = 256 splits the columns over two CTAs.
CONFIGS = {
    32: (32, 4, 64, 32),
    64: (64, 4, 64, 64),
    96: (96, 4, 64, 96),
    128: (128, 4, 32, 64),
    256: (128, 4, 32, 64),
}
# Per padded head dim, the deterministic dq kernel's (warps, keys per block).
DQ_CONFIGS = {32: (4, 64), 64: (4, 64), 96: (4, 64), 128: (4, 64), 256: (4, 32)}

# Switches: False makes supports() refuse, so that backend="auto" takes the generic backend.
ENABLE_BWD_KERNEL = True
ENABLE_DETERMINISTIC = True
# The float32 SIMT kernel (flash_bwd_simt.cu): written without a GPU, not yet run on one.
ENABLE_FP32_BWD = False
SIMT_BLOCK = 32
# Tests set this to fill dq/dk/dv with NaN before the launches (unwritten elements then fail).
POISON = False

_lock = threading.Lock()
_functions: dict = {}


def _common_dim(prob):
    """The padded head dim both D and Dv are zero-extended to (None above 256)."""
    d = max(prob.d, prob.dv)
    return next((x for x in sorted(CONFIGS) if x >= d), None)


def supports(prob, opts):
    """``None`` when the backward kernels serve this request, else the reason they do not."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if not ENABLE_BWD_KERNEL:
        return ("the CuPy backward kernel is switched off (flash_bwd.ENABLE_BWD_KERNEL); the "
                "generic backend serves the backward pass")
    opts = opts or {}
    unknown = sorted(k for k, v in opts.items() if v is not None and k != "deterministic")
    if unknown:
        return (f"options {unknown} (e.g. block_mask) are not implemented in the CuPy backward "
                "kernel")
    if opts.get("deterministic") and not ENABLE_DETERMINISTIC:
        return ("deterministic=True: the separate dq kernel is switched off "
                "(flash_bwd.ENABLE_DETERMINISTIC)")
    if np.dtype(prob.dtype) == np.float32:
        if not ENABLE_FP32_BWD:
            return ("dtype float32: the SIMT backward kernel (flash_bwd_simt.cu) is not enabled "
                    "yet (flash_bwd.ENABLE_FP32_BWD; the generic backend serves float32)")
        if opts.get("deterministic"):
            return ("deterministic=True with float32: the SIMT backward kernel adds dq with "
                    "atomics only (the generic backend is deterministic)")
    elif _fwd._type_name(prob.dtype) is None:
        return (f"dtype {prob.dtype}: the backward kernel takes float16 and bfloat16 (and "
                "float32 with ENABLE_FP32_BWD); float64 uses the generic backend")
    if _common_dim(prob) is None:
        return (f"head_dim {max(prob.d, prob.dv)} > {max(CONFIGS)} is not implemented in the "
                "CuPy backward kernel")
    nbatch = math.prod(prob.batch)
    if nbatch > _fwd._MAX_GRID_YZ or prob.hq > _fwd._MAX_GRID_YZ:
        return f"batch ({nbatch}) or heads ({prob.hq}) above the grid limit {_fwd._MAX_GRID_YZ}"
    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc < 80:
        return f"compute capability {cc} < 80: the kernels use mma.sync bf16/f16 and cp.async"
    return None


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


def _function(name, options, smem, source="flash_bwd.cu"):
    """One entry point, compiled with NVRTC on first use and cached per (device, name)."""
    import cupy

    key = (cupy.cuda.Device().id, name)
    hit = _functions.get(key)
    if hit is None:
        with _lock:
            hit = _functions.get(key)
            if hit is None:
                mod = cupy.RawModule(code=_fwd._source(source),
                                     options=("-std=c++17", *options))
                fn = mod.get_function(name)
                if smem > 48 * 1024:
                    fn.max_dynamic_shared_size_bytes = smem
                hit = _functions[key] = (mod, fn)
    return hit[1]


def get_kernel(tn, d, cfg, mods, dq):
    """The main backward kernel for one dtype, head dim, configuration, score-mod flag and
    dq mode (``dq=True``: atomics into dq_accum; False: the dq kernel runs separately)."""
    dc, nw, bm, dqn = cfg
    mn, qn = ("mods" if mods else "plain"), ("atomic" if dq else "nodq")
    name = f"flash_bwd_{tn}_d{d}_c{dc}_w{nw}_m{bm}_q{dqn}_{mn}_{qn}"
    options = ("-DXATTN_KIND=1", f"-DXATTN_TN={tn}", f"-DXATTN_D={d}", f"-DXATTN_DC={dc}",
               f"-DXATTN_NW={nw}", f"-DXATTN_BM={bm}", f"-DXATTN_DQN={dqn}", f"-DXATTN_MN={mn}",
               f"-DXATTN_MODS={'true' if mods else 'false'}", f"-DXATTN_QN={qn}",
               f"-DXATTN_DQ={'true' if dq else 'false'}")
    return _function(name, options, smem_bytes(d, cfg))


def get_dq_kernel(tn, d, cfg, mods):
    """The deterministic dq kernel for one dtype, head dim, configuration and score-mod flag."""
    nw, bn = cfg
    mn = "mods" if mods else "plain"
    name = f"flash_bwd_dq_{tn}_d{d}_w{nw}_n{bn}_{mn}"
    options = ("-DXATTN_KIND=2", f"-DXATTN_TN={tn}", f"-DXATTN_D={d}", f"-DXATTN_NW={nw}",
               f"-DXATTN_BN={bn}", f"-DXATTN_MN={mn}",
               f"-DXATTN_MODS={'true' if mods else 'false'}")
    return _function(name, options, dq_smem_bytes(d, cfg))


def get_simt_kernel(d, mods):
    """The float32 SIMT backward kernel for one head dim and score-mod flag."""
    mn = "mods" if mods else "plain"
    return _function(f"flash_bwd_f32_simt_d{d}_{mn}",
                     (f"-DXATTN_SIMT_D={d}", f"-DXATTN_SIMT_MN={mn}",
                      f"-DXATTN_SIMT_MODS={'true' if mods else 'false'}"),
                     simt_smem_bytes(d), source="flash_bwd_simt.cu")


def get_aux_kernel(kind, tn):
    """``flash_bwd_delta_<tn>`` or ``flash_bwd_dq_convert_<tn>``."""
    return _function(f"flash_bwd_{kind}_{tn}", ("-DXATTN_KIND=3",), 0)


def backward(prob, dout, q, k, v, out, lse, *, mask=None, bias=None, alibi_slopes=None,
             plan=None, element_rule=None, block_mask=None, deterministic=False, config=None,
             dq_config=None):
    """Return ``(dq, dk, dv)`` computed by the backward kernels (see :func:`supports`).

    ``config`` / ``dq_config`` override the tile configurations of :data:`CONFIGS` /
    :data:`DQ_CONFIGS` (benchmarks use them to compare configurations).
    """
    if plan is not None or element_rule is not None or block_mask is not None:
        raise NotImplementedError("the CuPy backward kernel does not take a tile plan / "
                                  "element rule / block_mask yet")
    with q.device:
        return _backward(prob, dout, q, k, v, out, lse, mask, bias, alibi_slopes,
                         bool(deterministic), config, dq_config)


def _backward(prob, dout, q, k, v, out, lse, mask, bias, alibi_slopes, deterministic, config,
              dq_config):
    import cupy as xp

    tn = _fwd._type_name(prob.dtype)
    simt = np.dtype(prob.dtype) == np.float32
    if tn is None and not simt:
        raise NotImplementedError(f"dtype {prob.dtype} has no CuPy backward kernel")
    if simt and deterministic:
        raise NotImplementedError("deterministic=True: the float32 kernel adds dq with atomics")
    d, dvd = prob.d, prob.dv
    dp = _common_dim(prob)
    cfg = tuple(config) if config is not None else CONFIGS[dp]
    dq_cfg = tuple(dq_config) if dq_config is not None else DQ_CONFIGS[dp]
    mods = prob.softcap is not None or bias is not None or alibi_slopes is not None \
        or mask is not None
    B, hq, hkv, sq, sk = math.prod(prob.batch), prob.hq, prob.hkv, prob.sq, prob.sk
    dtype = q.dtype

    def prep(x, h, s, w):
        # Contiguous (B, H, S, dp) in the input type; zero columns where w < dp.
        if x.dtype != dtype:
            x = x.astype(dtype)
        x = xp.ascontiguousarray(x).reshape(B, h, s, w)
        if w != dp:
            xpad = xp.zeros((B, h, s, dp), dtype=dtype)
            xpad[..., :w] = x
            x = xpad
        return x

    def finish(x, w, shape):
        if w != dp:
            x = xp.ascontiguousarray(x[..., :w])
        return x.reshape(shape)

    if B * hq * sq == 0 or sk == 0:
        # Nothing to differentiate through: queries without keys have zero gradients.
        return (xp.zeros(q.shape, dtype=dtype), xp.zeros(k.shape, dtype=dtype),
                xp.zeros(v.shape, dtype=dtype))

    q4, k4, v4 = prep(q, hq, sq, d), prep(k, hkv, sk, d), prep(v, hkv, sk, dvd)
    do4, o4 = prep(dout, hq, sq, dvd), prep(out, hq, sq, dvd)
    lse3 = xp.ascontiguousarray(lse.reshape(B, hq, sq), dtype=xp.float32)

    dq4 = xp.empty((B, hq, sq, dp), dtype=dtype)
    dk4 = xp.empty((B, hkv, sk, dp), dtype=dtype)
    dv4 = xp.empty((B, hkv, sk, dp), dtype=dtype)
    if POISON:
        for x in (dq4, dk4, dv4):
            x.view(xp.uint16).fill(0x7FFF)  # NaN in float16 and in bfloat16
    delta = xp.empty((B, hq, sq), dtype=xp.float32)
    null = np.uint64(0)
    i32, i64, f32 = np.int32, np.int64, np.float32

    rows = B * hq * sq
    if simt:
        delta[...] = (do4 * o4).sum(axis=-1)
    else:
        get_aux_kernel("delta", tn)(grid=((rows + 7) // 8,), block=(256,),
                                    args=(o4, do4, delta, i64(rows), i32(dp)))

    alibi_arg, alibi_bs = null, 0
    if alibi_slopes is not None:
        alibi_arg = xp.ascontiguousarray(alibi_slopes, dtype=xp.float32).reshape(-1)
        alibi_bs = 0 if alibi_arg.size == hq else hq
    bias_arg, bias_st = null, (0, 0, 0, 0)
    if bias is not None:
        bias_arg, bias_st = _fwd._score_operand(xp, bias.astype(xp.float32, copy=False), prob, 4)
    mask_arg, mask_st = null, (0, 0, 0, 0)
    if mask is not None:
        mask_arg, mask_st = _fwd._score_operand(xp, mask.view(xp.uint8), prob, 1)
    w = prob.window
    wl = -1 if w is None or w[0] is None else w[0]
    wr = -1 if w is None or w[1] is None else w[1]

    acc = None if deterministic else xp.zeros((B, hq, sq, dp), dtype=xp.float32)

    def args(dq_accum, dq):
        return (
            q4, k4, v4, do4, lse3, delta, dq_accum, dq, dk4, dv4,
            i32(hq), i32(prob.group), i32(sq), i32(sk), f32(prob.scale),
            i32(prob.causal), i32(wl), i32(wr), f32(prob.softcap or 0.0),
            alibi_arg, i64(alibi_bs),
            bias_arg, *(i64(s) for s in bias_st),
            mask_arg, *(i64(s) for s in mask_st),
        )

    if simt:
        sb = SIMT_BLOCK
        get_simt_kernel(dp, mods)(
            grid=((sk + sb - 1) // sb, hkv, B), block=(128,),
            args=(q4, k4, v4, do4, lse3, delta, acc, dk4, dv4, *args(null, null)[10:]),
            shared_mem=simt_smem_bytes(dp))
        xp.multiply(acc, f32(prob.scale), out=dq4)
        return (finish(dq4, d, q.shape), finish(dk4, d, k.shape), finish(dv4, dvd, v.shape))
    dc, nw, _, _ = cfg
    bn = 16 * nw
    main = get_kernel(tn, dp, cfg, mods, not deterministic)
    main(grid=(((sk + bn - 1) // bn) * (dp // dc), hkv, B), block=(nw * 32,),
         args=args(null if deterministic else acc, null), shared_mem=smem_bytes(dp, cfg))
    if deterministic:
        dnw, _ = dq_cfg
        bm = 16 * dnw
        get_dq_kernel(tn, dp, dq_cfg, mods)(
            grid=((sq + bm - 1) // bm, hq, B), block=(dnw * 32,), args=args(null, dq4),
            shared_mem=dq_smem_bytes(dp, dq_cfg))
    else:
        pairs = acc.size // 2
        get_aux_kernel("dq_convert", tn)(grid=(min((pairs + 255) // 256, 65535),), block=(256,),
                                         args=(acc, dq4, i64(pairs), f32(prob.scale)))
    return (finish(dq4, d, q.shape), finish(dk4, d, k.shape), finish(dv4, dvd, v.shape))
