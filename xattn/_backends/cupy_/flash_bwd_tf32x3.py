"""The float32 backward on tensor cores at float32 accuracy: 3xTF32 (``cupy.tf32x3``'s backward).

The kernel (``xattn/kernels/flash_bwd_tf32x3.cu``) runs the FlashAttention-2 backward of
``flash_bwd.cu`` -- one CTA per (key block, kv head, batch element), dK and dV in registers,
``dS K`` added to a float32 ``dq_accum`` with atomics -- on ``mma.sync.m16n8k8`` TF32 tensor
cores (sm_80 and newer), every one of its five products (``S^T = K Q^T``, ``dP^T = V dO^T``,
``dV += P^T dO``, ``dK += dS^T Q``, ``dQ += dS K``) taken as 3xTF32: each float32 operand split
into a TF32 head and residual, three products ``lo*hi' + hi*lo' + hi*hi'``, the small products
summed apart from the large ones and each query block's dV / dK summed from zero (the tensor
cores truncate their sums; see the kernel's header and :doc:`numerics`). ``P`` and ``dS`` are
float32, so the gradients keep the strict SIMT kernel's float32 accuracy.

Steps: ``delta = rowsum(dout * out)`` (float32, as the SIMT backward), the main kernel, then
``dq = scale * dq_accum``. Serves float32, head dims 64 and 128 (others up to 128 zero-padded
to the next, ``Dv != D`` to the larger one), causal, window, scale, GQA/MQA (dK/dV of a kv head
summed in registers), softcap, bias, ALiBi and boolean mask (the ``mods`` entries), any ``Sq``
/ ``Sk``, rows that see no key (zero gradients). Refuses ``deterministic=True`` (dq is added
with atomics: the generic entry serves it), block masks, ``return_dbias`` and head dims above
128 (the SIMT backward serves them).

Behind the switch :data:`xattn._backends.cupy_.instances.TF32X3_BWD_ON` (on since its first
GPU run, on an H100: tests passed, compute-sanitizer clean, D = 64 at 2.4x the SIMT backward):
off, ``cupy.tf32x3``'s ``supports(..., "backward")`` refuses with a reason naming the switch
and float32 gradients stay on ``cupy.simt``; :func:`backward` called directly runs it either
way.
"""

from __future__ import annotations

import numpy as np

from . import _params, instances
from ._compile import compiled_function
from .flash_bwd import float32_backward

__all__ = ["CONFIGS", "EXTRA", "HEAD_DIMS", "backward", "built", "check_config",
           "get_kernel", "padded_dim", "request_reason", "smem_bytes"]

# Per head dim: (dK/dV columns per CTA, warps, query rows per step); instances.py's list.
CONFIGS = instances.TF32X3_BWD
EXTRA = instances.TF32X3_BWD_EXTRA
HEAD_DIMS = tuple(sorted(CONFIGS))
WHAT = "the 3xTF32 backward"


def padded_dim(d: int):
    """The kernel head dim that serves ``d`` (zero padding), or None above the largest."""
    return next((x for x in HEAD_DIMS if x >= d), None)


def built(d: int) -> tuple:
    """The configurations compiled for head dim ``d`` (the default first)."""
    return (CONFIGS[d], *EXTRA.get(d, ()))


def smem_bytes(d: int, cfg) -> int:
    """Dynamic shared memory of one CTA: K and V (16 rows a warp), Q and dO (one query block),
    each row ``2 d + 16`` floats (hi, lo, padding); dS (``bm`` rows of ``2 bn + 8``); lse and
    delta."""
    _, nw, bm = cfg
    bn, ld = 16 * nw, 2 * d + 16
    return (2 * bn * ld + 2 * bm * ld + bm * (2 * bn + 8) + 2 * bm) * 4


def request_reason(prob, opts):
    """``None`` when the 3xTF32 backward serves this request, else the reason (the switch
    aside: :func:`xattn._backends.cupy_.flash_tf32x3.supports` checks it first)."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if np.dtype(prob.dtype) != np.float32:
        return f"dtype {prob.dtype}: {WHAT} takes float32 inputs"
    opts = opts or {}
    if opts.get("deterministic"):
        return (f"deterministic=True: {WHAT} adds dq with atomics (the generic backend is "
                "deterministic)")
    if prob.block_mask is not None:
        return f"block_mask is not implemented in {WHAT} (the generic backend walks it)"
    unknown = sorted(k for k, v in opts.items()
                     if v is not None and k not in ("deterministic", "allow_tf32"))
    if unknown:
        return f"options {unknown} are not implemented in {WHAT}"
    d = max(prob.d, prob.dv)
    dp = padded_dim(d)
    if dp is None:
        return f"head_dim {d} > {max(HEAD_DIMS)} is not implemented in {WHAT}"
    reason = _params.device_reason(prob, "mma.sync .tf32 and cp.async need sm_80")
    if reason:
        return reason
    need = smem_bytes(dp, CONFIGS[dp])
    have = _params.max_smem_per_block()
    if need > have:
        return (f"head_dim {d}: {WHAT} needs {need} bytes of shared memory per block, this "
                f"device allows {have}")
    return None


def get_kernel(d: int, cfg, mods: bool):
    """The compiled entry of one head dim, configuration and variant."""
    inst = instances.bwd_tf32x3(d, cfg, mods)
    return compiled_function(inst.source, inst.name, inst.defines, smem_bytes(d, cfg))


def check_config(dp: int, config):
    """The configuration to launch at padded head dim ``dp``: ``config`` (one of those built,
    :func:`built`, that fits the device's shared memory: ValueError otherwise), else
    :data:`instances.TF32X3_BWD_LARGE_SMEM`'s where the device's shared memory holds it, else
    the default."""
    if config is None:
        large = instances.TF32X3_BWD_LARGE_SMEM.get(dp)
        if large is not None and smem_bytes(dp, large) <= _params.max_smem_per_block():
            return large
        return CONFIGS[dp]
    cfg = tuple(config)
    if cfg not in built(dp):
        raise ValueError(f"config: {WHAT} builds (columns per CTA, warps, query rows) in "
                         f"{list(built(dp))} at head dim {dp}, got {cfg}")
    need, have = smem_bytes(dp, cfg), _params.max_smem_per_block()
    if need > have:
        raise ValueError(f"config={cfg}: {WHAT} needs {need} bytes of shared memory per block "
                         f"at head dim {dp}, this device allows {have}")
    return cfg


def backward(prob, dout, q, k, v, out, lse, *, deterministic=False, config=None, **kw):
    """Return ``(dq, dk, dv)`` computed by the 3xTF32 backward on the inputs' device.

    Runs whatever the switch says (the table's ``supports`` checks the switch); raises
    ``NotImplementedError`` for what the kernel does not cover. ``config`` overrides the tile
    configuration (one of :func:`built`; benchmarks compare them).
    """
    why = None
    if deterministic:
        why = f"deterministic=True: {WHAT} adds dq with atomics"
    elif kw.get("return_dbias"):
        why = f"return_dbias is not implemented in {WHAT}"
    elif prob.block_mask is not None:
        why = f"block_mask is not implemented in {WHAT}"
    elif np.dtype(prob.dtype) != np.float32:
        why = f"dtype {prob.dtype}: {WHAT} takes float32 inputs"
    elif padded_dim(max(prob.d, prob.dv)) is None:
        why = f"head_dim {max(prob.d, prob.dv)} > {max(HEAD_DIMS)} is not implemented in {WHAT}"
    if why:
        raise NotImplementedError(why)
    dp = padded_dim(max(prob.d, prob.dv))
    cfg = check_config(dp, config)
    with q.device:
        return _backward(prob, dout, q, k, v, out, lse, dp, cfg)


def _backward(prob, dout, q, k, v, out, lse, dp, cfg):
    dc, nw, _ = cfg
    bn = 16 * nw
    kernel = get_kernel(dp, cfg, _params.has_score_mods(prob))
    return float32_backward(prob, dout, q, k, v, out, lse, dp, kernel,
                            ((prob.sk + bn - 1) // bn) * (dp // dc), nw * 32,
                            smem_bytes(dp, cfg))
