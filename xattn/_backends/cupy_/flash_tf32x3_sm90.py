"""The ``cupy.tf32x3_sm90`` entry: float32 at float32 accuracy on Hopper's warpgroup MMA.

The kernel (``xattn/kernels/flash_fwd_tf32x3_sm90.cu``) computes what ``cupy.tf32x3`` computes
-- every float32 operand split into a TF32 head and a TF32 residual, three products
``lo*hi' + hi*lo' + hi*hi'`` per operand pair, the small products of ``Q K^T`` and each key
block's ``P V`` summed apart (see :doc:`numerics`) -- with ``wgmma.mma_async m64n64k8 .tf32``
instead of ``mma.sync m16n8k8``: a producer warpgroup loads K and V, splits them and writes V
transposed (TF32 wgmma takes K-major operands only), two consumer warpgroups of 64 query rows
run the GEMMs and the online softmax. Its own entry, not a configuration of ``cupy.tf32x3``:
another kernel file, another launch (384 threads, 193 KiB of shared memory), compute
capability 9.0 only, and a switch of its own.

Serves float32, head dim 64 (``Dv == D``), causal, window, any scale, GQA/MQA, any ``Sq`` /
``Sk``, ``lse``. Refuses score modifications, block masks, tile plans and every other head dim
(``cupy.tf32x3`` serves them).

**Switched off** (:data:`xattn._backends.cupy_.instances.TF32X3_SM90_ON`): the kernel compiles
for sm_90a without spills, but no GPU has run it yet. While off, :func:`supports` refuses
every request with a reason naming the switch, so ``auto`` keeps ``cupy.tf32x3``;
:func:`forward` called directly still runs it (its GPU tests, ``tools/gpu_check_tf32wg.sh``).
"""

from __future__ import annotations

import math

import numpy as np

from . import _params, instances
from ._compile import compiled_function

__all__ = ["BUILT", "CONFIGS", "THREADS", "forward", "get_kernel",
           "launch_config", "request_reason", "smem_bytes", "supports"]

# Head dim -> keys per block (instances.TF32X3_SM90, the one list of compiled entries).
CONFIGS = instances.TF32X3_SM90
# A producer warpgroup and two consumer warpgroups of 64 query rows.
THREADS = 384
BLOCK_ROWS = 128
STAGES = 2
WHAT = "the 3xTF32 wgmma kernel"


def smem_bytes(d: int, bn: int) -> int:
    """Dynamic shared memory of one block: Q hi / lo (128 rows), ``STAGES`` stages of K hi / lo
    and Vt hi / lo, 1 KiB for the 1024-byte alignment of the swizzled tiles (the mbarriers are
    static shared memory)."""
    return (2 * BLOCK_ROWS * d + STAGES * 4 * bn * d) * 4 + 1024


def supports(prob, opts, op="forward"):
    """``None`` when this kernel serves the request, else the reason: host arrays, then its
    switch (:data:`instances.TF32X3_SM90_ON`), then the request's checks."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if not instances.TF32X3_SM90_ON:
        return (f"{WHAT} is built but has not run on a GPU yet (instances.TF32X3_SM90_ON is "
                "off); cupy.tf32x3 serves float32")
    return request_reason(prob, opts, op)


def request_reason(prob, opts, op="forward"):
    """The checks of :func:`supports` other than the switch: ``None`` or the reason."""
    why = _params.float32_kernel_reason(prob, op, WHAT) or _shape_reason(prob)
    if why is not None:
        return why
    unknown = sorted(k for k, v in (opts or {}).items() if v is not None and k != "allow_tf32")
    if unknown:
        return f"options {unknown} are not implemented in {WHAT}"
    reason = _params.device_reason(prob, WHAT, exact_cc=90)
    if reason:
        return reason
    need = smem_bytes(prob.d, CONFIGS[prob.d])
    have = _params.max_smem_per_block()
    if need > have:
        return f"{WHAT} needs {need} bytes of shared memory per block, this device allows {have}"
    return None


def _shape_reason(prob):
    """What the kernel's code does not cover (head dim, score modifications, block mask)."""
    if prob.d not in CONFIGS or prob.dv != prob.d:
        return (f"head_dim {prob.d} (Dv {prob.dv}): {WHAT} has D = Dv in {sorted(CONFIGS)} "
                "(cupy.tf32x3 serves the others)")
    if prob.block_mask is not None:
        return f"block_mask is not implemented in {WHAT} (cupy.simt walks block masks)"
    if prob.has_score_mods:
        return (f"score modifications (softcap, bias, ALiBi, mask) are not implemented in "
                f"{WHAT} (cupy.tf32x3 serves them)")
    return None


# Every (D, BN, schedule) that can be built: the default (schedule 0) and the experimental
# overlapped one (schedule 1, the _ov entry: config=(BN, 1)).
BUILT = frozenset({*((d, bn, 0) for d, bn in CONFIGS.items()),
                   *((d, bn, 1) for d, bn in instances.TF32X3_SM90_OV_EXPERIMENTAL)})


def get_kernel(d: int, bn: int | None = None, overlap: bool = False):
    """The compiled entry point of head dim ``d`` (sm_90a cubin, cached per device);
    ``overlap``: the experimental ``_ov`` schedule."""
    bn = CONFIGS[d] if bn is None else bn
    inst = instances.tf32x3_sm90(d, bn, overlap)
    return compiled_function(inst.source, inst.name, inst.defines, smem_bytes(d, bn),
                             arch=inst.arch)


def launch_config(d: int, config=None) -> tuple:
    """``(BN, schedule)``: ``config`` checked against :data:`BUILT`, or the default."""
    cfg = (CONFIGS[d], 0) if config is None else tuple(int(c) for c in config)
    if len(cfg) != 2 or (d, *cfg) not in BUILT:
        raise ValueError(f"config: {WHAT} builds (keys per block, schedule) in "
                         f"{sorted(c[1:] for c in BUILT if c[0] == d)} at D = {d}, "
                         f"got {config!r}")
    return cfg


def forward(prob, q, k, v, *, allow_tf32=False, config=None):
    """Return ``(out, lse)`` computed by the 3xTF32 wgmma kernel on the inputs' device.

    Runs whatever the switch says (the GPU tests call it directly); requests its code does not
    cover raise :class:`NotImplementedError`. ``allow_tf32`` changes nothing (float32
    accuracy either way); ``config`` = ``(keys per block, schedule)``: ``None`` for the
    default, ``(64, 1)`` for the experimental overlapped schedule (:data:`BUILT`)."""
    why = _shape_reason(prob)
    if why is not None:
        raise NotImplementedError(why)
    cfg = launch_config(prob.d, config)
    with q.device:
        return _forward(prob, q, k, v, cfg)


def _forward(prob, q, k, v, cfg):
    import cupy as xp

    d = prob.d
    q4, k4, v4, out, lse = _params.forward_buffers(xp, prob, q, k, v, d, xp.float32)
    if _params.nothing_to_launch(out, lse):
        return _params.forward_result(xp, prob, out, lse)
    fn = get_kernel(d, cfg[0], bool(cfg[1]))
    i32, f32 = np.int32, np.float32
    args = (q4, k4, v4, out, lse, i32(prob.hq), i32(prob.group), i32(prob.sq), i32(prob.sk),
            f32(prob.scale), *_params.visibility_args(prob))
    grid = ((prob.sq + BLOCK_ROWS - 1) // BLOCK_ROWS, prob.hq, math.prod(prob.batch))
    fn(grid, (THREADS,), args, shared_mem=smem_bytes(d, cfg[0]))
    return _params.forward_result(xp, prob, out, lse)
