"""The ``cupy.sm90_bwd`` entry: the Hopper (sm_90a) backward on warpgroup MMA.

``flash_bwd_sm90.cu``'s main kernel computes dK, dV and the float32 partial sums of dQ with
wgmma (all five GEMMs of the backward); the delta kernel is the mma.sync backward's
(:mod:`.flash_bwd`), so the three launches are:

1. ``delta = rowsum(dout * out)`` (``flash_bwd_delta_<t>``);
2. the wgmma kernel, one CTA of two warpgroups per (128 keys, kv head, batch element), walking
   the query heads of its GQA group and the 64-row query blocks that see its keys; dS K is
   staged in shared memory and added to a zeroed float32 ``dq_accum`` (in the kernel's tile
   order) by one bulk reduction per 64 x 64 tile (``cp.reduce.async.bulk .add.f32``; the
   order of those adds varies from run to run);
3. ``dq = scale * dq_accum`` in the input type, back to row order
   (``flash_bwd_sm90_dqconv_<t>_d<D>``).

Served: float16 and bfloat16, ``D == Dv`` in 64 or 128, causal or not (bottom-right), any
scale, GQA/MQA (dk/dv summed over the group in registers), any ``Sq`` / ``Sk``, fully masked
rows (zero gradients); compute capability 9.0 only. Refused with the reason
(:func:`supports`): the forward, windows, score modifications (softcap, mask, bias, ALiBi),
block masks, ``deterministic=True``, other head dims and dtypes.

``auto`` tries it before ``cupy.sm80``'s backward (measured ahead of it on an H100,
``tools/gpu_check_sm90bwd.sh bench``); requests it refuses walk on to ``cupy.sm80``.
"""

from __future__ import annotations

import math

import numpy as np

from . import _params, flash_bwd, instances
from ._compile import compiled_function

__all__ = ["HEAD_DIMS", "backward", "forward", "get_kernel", "smem_bytes", "supports"]

HEAD_DIMS = instances.SM90_BWD_HEAD_DIMS
# Keys per CTA (two warpgroups of 64) and query rows per step: fixed by the kernel.
BLOCK_N, BLOCK_M = 128, 64
THREADS = 256


def supports(prob, opts, op="backward"):
    """``None`` when the sm_90a backward kernel serves this request, else the reason."""
    why = _params.half_kernel_reason(
        prob, op, ("backward", "the cupy.sm90_bwd entry is backward only (the forward runs on "
                   "cupy.sm90)"), "the sm_90a backward kernel")
    if why is not None:
        return why
    if prob.d not in HEAD_DIMS or prob.dv != prob.d:
        return (f"head_dim {prob.d} (Dv {prob.dv}): the sm_90a backward kernel has D = Dv in "
                f"{list(HEAD_DIMS)}")
    if prob.has_score_mods:
        return "softcap, mask, bias and ALiBi run on the mma.sync backward (cupy.sm80)"
    if prob.window is not None:
        return "a sliding window runs on the mma.sync backward (cupy.sm80)"
    if prob.block_mask is not None:
        return "a block_mask runs on the mma.sync backward (cupy.sm80)"
    opts = opts or {}
    if opts.get("deterministic"):
        return ("deterministic=True: the sm_90a backward adds dq with atomics (cupy.sm80 has "
                "the deterministic dq kernel)")
    unknown = sorted(k for k, v in opts.items() if v is not None and k != "deterministic")
    if unknown:
        return f"options {unknown} are not implemented in the sm_90a backward kernel"
    return _params.device_reason(prob, "the sm_90a backward kernel", exact_cc=90)


def smem_bytes(d):
    """K, V, two Q and two dO buffers, dS (64 x 128), lse and delta (two buffers each), a
    64 x 64 float32 dQ staging tile per warpgroup, plus 1 KiB for the 1024-byte alignment of
    the swizzled tiles."""
    return ((2 * BLOCK_N * d + 4 * BLOCK_M * d + BLOCK_M * BLOCK_N) * 2 + 4 * BLOCK_M * 4
            + 2 * 64 * 64 * 4 + 1024)


def get_kernel(tn, d, convert=False):
    """The compiled sm_90a main entry of one dtype and head dim, or (``convert``) its dq
    conversion kernel (one cubin, cached on disk)."""
    inst = instances.bwd_sm90(tn, d)
    name = inst.names[1] if convert else inst.name
    return compiled_function(inst.source, name, inst.defines, 0 if convert else smem_bytes(d),
                             arch=inst.arch)


def forward(prob, q, k, v, **_):
    """The entry has no forward (:func:`supports` refuses it; the table never routes here)."""
    raise NotImplementedError("the cupy.sm90_bwd entry is backward only (the forward runs on "
                              "cupy.sm90)")


def backward(prob, dout, q, k, v, out, lse, *, deterministic=False):
    """Return ``(dq, dk, dv)`` from the sm_90a backward kernel (see :func:`supports`)."""
    why = supports(prob, {"deterministic": deterministic or None}, "backward")
    if why is not None:
        raise NotImplementedError(why)
    with q.device:
        return _backward(prob, dout, q, k, v, out, lse)


def _backward(prob, dout, q, k, v, out, lse):
    import cupy as xp

    tn = _params.type_name(prob.dtype)
    d = prob.d
    B, hq, hkv, sq, sk = math.prod(prob.batch), prob.hq, prob.hkv, prob.sq, prob.sk
    dtype = q.dtype
    if B * hq * sq == 0 or sk == 0:
        return (xp.zeros(q.shape, dtype=dtype), xp.zeros(k.shape, dtype=dtype),
                xp.zeros(v.shape, dtype=dtype))

    q4 = _params.operand(xp, q, B, hq, sq, d, dtype)
    k4 = _params.operand(xp, k, B, hkv, sk, d, dtype)
    v4 = _params.operand(xp, v, B, hkv, sk, d, dtype)
    do4 = _params.operand(xp, dout, B, hq, sq, d, dtype)
    o4 = _params.operand(xp, out, B, hq, sq, d, dtype)
    lse3 = xp.ascontiguousarray(lse.reshape(B, hq, sq), dtype=xp.float32)

    dq4, dk4, dv4, delta = flash_bwd.grad_buffers(xp, B, hq, hkv, sq, sk, d, dtype)
    # dq_accum in the kernel's tile order: whole 64-row query blocks (the last one padded).
    acc = xp.zeros((B, hq, -(-sq // BLOCK_M) * BLOCK_M, d), dtype=xp.float32)
    i32, f32 = np.int32, np.float32

    flash_bwd.run_delta(tn, o4, do4, delta, d)
    get_kernel(tn, d)(
        grid=((sk + BLOCK_N - 1) // BLOCK_N, hkv, B), block=(THREADS,),
        args=(q4, k4, v4, do4, lse3, delta, acc, dk4, dv4, i32(hq), i32(prob.group), i32(sq),
              i32(sk), f32(prob.scale), i32(bool(prob.causal))),
        shared_mem=smem_bytes(d))
    pairs = B * hq * sq * d // 2
    get_kernel(tn, d, convert=True)(
        grid=(min((pairs + 255) // 256, 65535),), block=(256,),
        args=(acc, dq4, np.int64(B * hq * sq), i32(sq), f32(prob.scale)))
    return dq4.reshape(q.shape), dk4.reshape(k.shape), dv4.reshape(v.shape)
