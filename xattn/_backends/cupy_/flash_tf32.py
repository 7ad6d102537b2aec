"""Float32 flash attention on tensor cores in TF32: the opt-in path of ``allow_tf32=True``.

The kernel (``xattn/kernels/flash_fwd_tf32.cu``) multiplies with
``mma.sync.m16n8k8.f32.tf32.tf32.f32`` (sm_80 and newer): q, k, v and the softmax weights are
rounded to TF32 (10-bit mantissa, ``cvt.rna``) on their way into the tensor cores; the products
are accumulated in float32 and the softmax statistics, the accumulator, ``out`` and ``lse`` stay
float32. Its error is that of the rounded inputs (about ``1e-3`` relative, see
:doc:`numerics`), against ``1e-6`` for the strict float32 SIMT kernel that serves float32 by
default.

The ``cupy.tf32`` entry of the kernel table: ``auto`` takes it when the caller passed
``allow_tf32=True``, the inputs are float32 and :func:`supports` accepts the request; otherwise
the strict ``cupy.simt`` kernel runs (``XATTN_DISABLE=cupy.tf32`` does the same: allow_tf32 is
then honoured by not using it). Options: every one of the 16-bit kernel (causal, window, scale, GQA,
softcap, bias, ALiBi, mask, lse); head dims 32, 64, 96, 128 and 256, others zero-padded to the
next of those; no ``block_mask`` yet.

The same kernel file built with ``X3`` is the 3xTF32 variant (error-compensated, float32
accuracy) of the ``cupy.tf32x3`` entry, :mod:`.flash_tf32x3`; the helpers below take
``x3=True`` for it (its own tile configurations, twice the shared memory per key block).
"""

from __future__ import annotations

import math

import numpy as np

from . import _params, instances
from ._compile import compiled_function

__all__ = ["CONFIGS", "X3_CONFIGS", "forward", "get_kernel", "smem_bytes", "supports"]

# Per head dim: (warps, 16-row tiles per warp, keys per block), from the one list of every
# compiled entry (instances.py; ptxas -v on sm_80/sm_90a: no spills, <= 255 registers).
CONFIGS = instances.TF32
X3_CONFIGS = instances.TF32X3


def _configs(x3):
    return X3_CONFIGS if x3 else CONFIGS


def padded_dim(d: int, x3: bool = False):
    """The kernel head dim that serves ``d`` (zero padding), or None when none does."""
    return next((x for x in sorted(_configs(x3)) if x >= d), None)


def q_in_registers(d: int, cfg, x3: bool = False) -> bool:
    """Whether the kernel keeps Q in registers (``QREG`` in the .cu file: MT * D <= 128, or
    <= 64 for 3xTF32, which holds two registers per element)."""
    return cfg[1] * d <= (64 if x3 else 128)


def smem_bytes(d: int, cfg, x3: bool = False) -> int:
    """Dynamic shared memory of one block: K and V double-buffered, Q unless in registers.

    3xTF32 rows hold the TF32 head and residual side by side (``2 D`` floats + padding)."""
    nw, mt, bn = cfg
    w = 2 * d if x3 else d
    ldk, ldv = w + 16, w + 4  # row padding against bank conflicts, as in the kernel
    q = 0 if q_in_registers(d, cfg, x3) else nw * mt * 16 * ldk
    return (2 * bn * ldk + 2 * bn * ldv + q) * 4


def supports(prob, opts, op="forward"):
    """``None`` when the TF32 kernel serves this float32 request, else the reason it does not.

    It needs the caller's permission (``allow_tf32=True`` in ``opts``); any other option (a
    block mask, a tile plan) is refused, and the 3xTF32 kernel, the strict kernel or the
    generic backend serves the call.
    """
    return request_reason(prob, opts, op, x3=False)


def request_reason(prob, opts, op, *, x3):
    """The checks of :func:`supports` for either precision (``x3``: 3xTF32, no permission
    needed: it keeps float32 accuracy)."""
    what = "the 3xTF32 kernel" if x3 else "the TF32 kernel"
    why = _params.float32_kernel_reason(prob, op, what)
    if why is not None:
        return why
    opts = opts or {}
    if not x3 and not opts.get("allow_tf32"):
        return "float32 on tensor cores needs allow_tf32=True"
    if prob.block_mask is not None:
        return (f"block_mask is not implemented in {what} (cupy.simt walks block masks in "
                "float32)")
    unknown = sorted(k for k, v in opts.items() if v is not None and k != "allow_tf32")
    if unknown:
        return f"options {unknown} are not implemented in {what}"
    if prob.dv != prob.d:
        return f"Dv ({prob.dv}) != D ({prob.d}) is not implemented in {what}"
    configs = _configs(x3)
    if padded_dim(prob.d, x3) is None:
        return f"head_dim {prob.d} > {max(configs)} is not implemented in {what}"
    reason = _params.device_reason(prob, "mma.sync .tf32 and cp.async need sm_80")
    if reason:
        return reason
    dp = padded_dim(prob.d, x3)
    need = smem_bytes(dp, configs[dp], x3)
    have = _params.max_smem_per_block()
    if need > have:
        return (f"head_dim {prob.d}: {what} needs {need} bytes of shared memory per "
                f"block, this device allows {have}")
    return None


def get_kernel(d: int, cfg, mods: bool, x3: bool = False):
    """The compiled entry point for one head dim, tile configuration, variant, precision."""
    inst = instances.tf32(d, cfg, mods, x3)
    return compiled_function(inst.source, inst.name, inst.defines, smem_bytes(d, cfg, x3))


def forward(prob, q, k, v, *, allow_tf32=True, config=None):
    """Return ``(out, lse)`` computed by the TF32 kernel on the inputs' device.

    The caller has checked :func:`supports` (``allow_tf32`` is that permission; a block mask
    or tile plan is refused). ``config`` overrides the tile configuration
    ``(warps, tiles per warp, keys per block)`` (benchmarks compare configurations with it).
    """
    if prob.block_mask is not None:
        raise NotImplementedError("the TF32 kernel takes no block_mask")
    with q.device:
        return _forward(prob, q, k, v, config)


def _forward(prob, q, k, v, config, x3=False):
    import cupy as xp

    d = prob.d
    dp = padded_dim(d, x3)
    mods = _params.has_score_mods(prob)
    cfg = tuple(config) if config is not None else _configs(x3)[dp]
    B = math.prod(prob.batch)
    q4, k4, v4, out, lse = _params.forward_buffers(xp, prob, q, k, v, dp, xp.float32)
    if _params.nothing_to_launch(out, lse):
        return _params.forward_result(xp, prob, out, lse)

    fn = get_kernel(dp, cfg, mods, x3)
    nw, mt, _ = cfg
    bm = nw * mt * 16
    i32, f32 = np.int32, np.float32
    args = (
        q4, k4, v4, out, lse,
        i32(prob.hq), i32(prob.group), i32(prob.sq), i32(prob.sk), f32(prob.scale),
        *_params.option_args(xp, prob),
    )
    fn(grid=((prob.sq + bm - 1) // bm, prob.hq, B), block=(nw * 32,), args=args,
       shared_mem=smem_bytes(dp, cfg, x3))
    return _params.forward_result(xp, prob, out, lse)
