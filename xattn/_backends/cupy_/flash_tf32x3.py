"""Float32 flash attention on tensor cores at float32 accuracy: 3xTF32 (the ``cupy.tf32x3`` entry).

The TF32 kernel file (``xattn/kernels/flash_fwd_tf32.cu``) built with ``X3``: every float32
operand ``x`` of ``Q K^T`` and ``P V`` is split into a TF32 head ``hi = tf32(x)`` and a TF32
residual ``lo = tf32(x - hi)``, and each product is taken as ``lo*hi' + hi*lo' + hi*hi'``
(three ``mma.sync.m16n8k8`` TF32 MMAs into one float32 accumulator, the small terms first; the
``lo*lo'`` term is dropped). The per-product error is about ``2**-21`` relative instead of
TF32's ``2**-10`` (see :doc:`numerics`), so the result keeps the strict SIMT kernel's float32
accuracy; the softmax, its statistics, the accumulator, ``out`` and ``lse`` stay float32.

Float32 requests meet this entry before ``cupy.simt`` in ``auto``'s order (no ``allow_tf32``
needed: nothing is given up); ``allow_tf32=True`` meets ``cupy.tf32`` first, and
``XATTN_DISABLE=cupy.tf32x3`` brings back the SIMT kernel. Options: those of ``cupy.tf32``
(causal, window, scale, GQA, softcap, bias, ALiBi, mask, lse); head dims 32, 64, 96, 128 and
256, others zero-padded to the next; no ``block_mask`` (the SIMT kernel serves it).

Backward: the 3xTF32 backward of :mod:`.flash_bwd_tf32x3` (``flash_bwd_tf32x3.cu``), behind its
switch :data:`xattn._backends.cupy_.instances.TF32X3_BWD_ON`: while it is off, :func:`supports`
refuses ``op="backward"`` with a reason naming the switch and the SIMT backward serves the
gradient; :func:`backward` called directly runs the kernel either way.
"""

from __future__ import annotations

from . import flash_bwd_tf32x3, flash_tf32, instances

__all__ = ["CONFIGS", "backward", "forward", "supports"]

CONFIGS = flash_tf32.X3_CONFIGS


def supports(prob, opts, op="forward"):
    """``None`` when the 3xTF32 kernels serve this float32 request, else the reason; the
    backward only while :data:`instances.TF32X3_BWD_ON`."""
    if op != "backward":
        return flash_tf32.request_reason(prob, opts, op, x3=True)
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if not instances.TF32X3_BWD_ON:
        return ("the 3xTF32 backward is built but has not run on a GPU yet "
                "(instances.TF32X3_BWD_ON is off): the 3xTF32 kernel serves forward only, "
                "cupy.simt the float32 backward")
    return flash_bwd_tf32x3.request_reason(prob, opts)


def forward(prob, q, k, v, *, allow_tf32=False, config=None):
    """Return ``(out, lse)`` computed by the 3xTF32 kernel on the inputs' device.

    The caller has checked :func:`supports` (a block mask or tile plan is refused;
    ``allow_tf32`` changes nothing here). ``config`` overrides the tile configuration
    ``(warps, tiles per warp, keys per block)`` (benchmarks compare configurations with it).
    """
    if prob.block_mask is not None:
        raise NotImplementedError("the 3xTF32 kernel takes no block_mask")
    with q.device:
        return flash_tf32._forward(prob, q, k, v, config, x3=True)


def backward(prob, dout, q, k, v, out, lse, *, deterministic=False, config=None, **kw):
    """Return ``(dq, dk, dv)`` computed by the 3xTF32 backward (whatever the switch says: the
    table checks it in :func:`supports`). ``config`` overrides the tile configuration
    ``(dK/dV columns per CTA, warps, query rows per step)``."""
    return flash_bwd_tf32x3.backward(prob, dout, q, k, v, out, lse,
                                     deterministic=deterministic, config=config, **kw)
