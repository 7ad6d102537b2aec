"""The ``cupy.simt`` entry: strict float32 flash attention on the CUDA cores.

Forward: ``flash_fwd_simt.cu`` (one 32-query x 32-key tile per block, float32 FMAs), launched by
the forward launcher of :mod:`.flash` with every option of :func:`xattn.flash_attention`,
a block mask included (its blocks must be multiples of 32 x 32). Backward:
``flash_bwd_simt.cu`` through :mod:`.flash_bwd` (dq added with atomics, so
``deterministic=True`` and ``block_mask`` are refused: the ``generic`` entry serves them).

float32 requests come here through ``auto`` (with ``allow_tf32=True`` the ``cupy.tf32`` entry
comes first); the 3xTF32 entry ``cupy.tf32x3`` serves float32 forwards only when named.
"""

from __future__ import annotations

import numpy as np

from . import flash as _launch
from . import flash_bwd

__all__ = ["backward", "forward", "supports"]


def supports(prob, opts, op):
    """``None`` when the float32 SIMT kernels serve this request, else the reason."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if np.dtype(prob.dtype) != np.float32:
        return f"dtype {prob.dtype}: the SIMT kernels take float32"
    if op == "backward":
        return flash_bwd.supports(prob, opts)
    if op != "forward":
        return f"op {op!r}: the SIMT kernels do forward and backward"
    return _launch.forward_reason(prob, opts, fp32=True)


def forward(prob, q, k, v, *, allow_tf32=False, config=None):
    """Return ``(out, lse)`` computed by the float32 SIMT kernel (see :func:`supports`), which
    walks ``prob.block_mask`` when there is one."""
    if np.dtype(prob.dtype) != np.float32:
        raise NotImplementedError(f"dtype {prob.dtype}: the SIMT kernels take float32")
    with q.device:
        return _launch._forward(prob, q, k, v, config)


def backward(prob, dout, q, k, v, out, lse, **kw):
    """Return ``(dq, dk, dv)`` computed by the float32 SIMT backward kernel."""
    if np.dtype(prob.dtype) != np.float32:
        raise NotImplementedError(f"dtype {prob.dtype}: the SIMT kernels take float32")
    return flash_bwd.backward(prob, dout, q, k, v, out, lse, **kw)
