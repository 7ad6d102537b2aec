"""The kernels' common parameters, filled in one place for every CuPy launcher.

:func:`option_args` turns the validated problem (:class:`xattn._array.AttnProblem`, which
carries every score option, operands included) into the kernels' parameter block: the flat
launch arguments that every entry point gathers into ``xattn::ScoreMods``
(``xattn/kernels/masking.cuh``), the struct that ``xattn_score_mod`` reads.
:func:`block_mask_args` does the same for the problem's block mask (``xattn::XattnBlockMask``
of ``blockmask.cuh``, the cached device arrays of :mod:`.blockmask`). The other
helpers are the checks every launcher shares: the kernels' dtype names, the grid limits, the
device's compute capability, and ``XATTN_POISON`` (a debug switch from the environment: fill
every output with NaN before the launch so that unwritten elements fail the tests).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from .blockmask import device_block_mask, device_csc, null_kernel_args

__all__ = ["MAX_GRID_YZ", "block_mask_args", "compute_capability", "grid_reason", "option_args",
           "poison", "sm_count", "type_name", "visibility_args"]

MAX_GRID_YZ = 65535


def type_name(dtype):
    """The kernels' name of a 16-bit dtype (``f16``, ``bf16``), None for any other."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return "f16"
    if dtype.name == "bfloat16":
        return "bf16"
    return None


def poison() -> bool:
    """``XATTN_POISON=1``: outputs are filled with NaN before each launch (tests, debugging)."""
    return os.environ.get("XATTN_POISON", "") not in ("", "0")


def fill_poison(xp, *arrays):
    """NaN into every array (16-bit arrays through their bits: 0x7FFF is NaN in both)."""
    for x in arrays:
        if x.dtype.itemsize == 2:
            x.view(xp.uint16).fill(0x7FFF)
        else:
            x.fill(np.nan)


def compute_capability() -> int:
    import cupy

    return _device_facts(cupy.cuda.runtime.getDevice())[0]


def sm_count() -> int:
    """Multiprocessors of the current device (cached: CuPy's ``Device().attributes`` reads
    every attribute of the device, tens of microseconds, as long as a whole decode step)."""
    import cupy

    return _device_facts(cupy.cuda.runtime.getDevice())[1]


def max_smem_per_block() -> int:
    """Shared memory one block of the current device may opt in to, in bytes (cached)."""
    import cupy

    return _device_facts(cupy.cuda.runtime.getDevice())[2]


@functools.lru_cache(maxsize=64)
def _device_facts(device_id):
    import cupy

    rt = cupy.cuda.runtime
    cc = int(cupy.cuda.Device(device_id).compute_capability)
    # The attribute's CUDA enum number where CuPy lacks the name.
    optin = getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97)
    return (cc, int(rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device_id)),
            int(rt.deviceGetAttribute(optin, device_id)))


def half_kernel_reason(prob, op, served, kernel):
    """The first checks of a 16-bit kernel's ``supports``: CuPy inputs, the op it serves
    (``served``: ``(op, reason when another op is asked)``), float16/bfloat16 inputs; the
    reason, or None. ``kernel`` names the kernel in the dtype message."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if op != served[0]:
        return served[1]
    if type_name(prob.dtype) is None:
        return f"dtype {prob.dtype}: {kernel} takes float16 and bfloat16"
    return None


def float32_kernel_reason(prob, op, kernel):
    """The first checks of a float32 forward kernel's ``supports``: CuPy inputs, the forward
    pass, float32 inputs; the reason, or None. ``kernel`` names the kernel in the messages."""
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if op != "forward":
        return f"{kernel} is forward only"
    if np.dtype(prob.dtype) != np.float32:
        return f"dtype {prob.dtype}: {kernel} takes float32 inputs"
    return None


def grid_reason(prob):
    """Why the (batch, heads) grid dims do not fit a launch, or None."""
    nbatch = math.prod(prob.batch)
    if nbatch > MAX_GRID_YZ or prob.hq > MAX_GRID_YZ:
        return f"batch ({nbatch}) or heads ({prob.hq}) above the grid limit {MAX_GRID_YZ}"
    return None


def device_reason(prob, uses, *, exact_cc=None):
    """Why this launch cannot run on the current device (grid limits, compute capability: at
    least 8.0, or exactly ``exact_cc``), or None. ``uses`` names what the kernels need."""
    reason = grid_reason(prob)
    if reason:
        return reason
    cc = compute_capability()
    if exact_cc is not None and cc != exact_cc:
        return f"compute capability {cc}: {uses} runs on {exact_cc // 10}.{exact_cc % 10} only"
    if exact_cc is None and cc < 80:
        return f"compute capability {cc} < 80: {uses}"
    return None


def has_score_mods(prob) -> bool:
    """Whether the problem needs the kernels' score-modification variant (``mods``)."""
    return prob.has_score_mods


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


def visibility_args(prob):
    """The parameter block's leading visibility fields: causal and the window sides (-1 =
    unbounded), all that a kernel without score modifications reads."""
    w = prob.window
    wl = -1 if w is None or w[0] is None else w[0]
    wr = -1 if w is None or w[1] is None else w[1]
    return np.int32(prob.causal), np.int32(wl), np.int32(wr)


def option_args(xp, prob):
    """The kernels' parameter block (``xattn::ScoreMods`` in ``xattn/kernels/masking.cuh``) as
    launch arguments, in the order of ``XATTN_SCORE_MOD_PARAMS``: causal, window sides (-1 =
    unbounded), softcap (0 = off), ALiBi slopes and their batch stride, the bias and the mask
    with their (batch, head, query, key) element strides (null pointers when absent), all read
    from ``prob``. This is the one place that fills it; every launcher passes it whole."""
    i64, f32 = np.int64, np.float32
    null = np.uint64(0)
    alibi_arg, alibi_bs = null, 0
    if prob.alibi_slopes is not None:
        alibi_arg = xp.ascontiguousarray(prob.alibi_slopes, dtype=xp.float32).reshape(-1)
        alibi_bs = 0 if alibi_arg.size == prob.hq else prob.hq
    bias_arg, bias_st = null, (0, 0, 0, 0)
    if prob.bias is not None:
        bias_arg, bias_st = _score_operand(xp, prob.bias.astype(xp.float32, copy=False), prob, 4)
    mask_arg, mask_st = null, (0, 0, 0, 0)
    if prob.mask is not None:
        mask_arg, mask_st = _score_operand(xp, prob.mask.view(xp.uint8), prob, 1)
    return (*visibility_args(prob), f32(prob.softcap or 0.0),
            alibi_arg, i64(alibi_bs),
            bias_arg, *(i64(s) for s in bias_st),
            mask_arg, *(i64(s) for s in mask_st))


def block_mask_args(xp, prob, *, csc=False):
    """The block-mask launch arguments of ``prob.block_mask``, which follow the parameter block
    in every entry point that can walk a mask: ``xattn::XattnBlockMask``
    (``xattn/kernels/blockmask.cuh``) in its field order, then with ``csc`` the transpose that
    the backward walks (``XattnCscMask``). The device arrays come from the per-(mask, device)
    cache of :mod:`.blockmask`: uploaded on the first call, never copied again. A problem
    without a block mask gets the dense launch's null arguments (its entries read none)."""
    bm = prob.block_mask
    if bm is None:
        null = np.uint64(0)
        return (*null_kernel_args(), null, null, null) if csc else null_kernel_args()
    args = device_block_mask(bm, xp).kernel_args()
    return (*args, *device_csc(bm, xp)) if csc else args


def operand(xp, x, batch, heads, seq, width, dtype=None):
    """``x`` as a C-contiguous ``(batch, heads, seq, width)`` array of ``dtype`` (default: its
    own), zero-padded along the last axis up to ``width``, starting at a 16-byte aligned
    address (the kernels' copies -- cp.async, the copy engine -- move 16 aligned bytes; a
    contiguous view may start inside an allocation); a device copy only where needed. Zero
    columns change neither ``q.k`` nor the output columns that are kept."""
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    e = x.shape[-1]
    x = xp.ascontiguousarray(x)
    if x.size and _address(x) % 16:
        x = x.copy()  # CuPy's allocations are 256-byte aligned
    x = x.reshape(batch, heads, seq, e)
    if e == width:
        return x
    padded = xp.zeros((batch, heads, seq, width), dtype=x.dtype)
    padded[..., :e] = x
    return padded


def _address(x):
    """The address of a CuPy (or, in the CPU tests, NumPy) array's first element."""
    ptr = getattr(getattr(x, "data", None), "ptr", None)
    return int(ptr) if ptr is not None else x.__array_interface__["data"][0]


def forward_buffers(xp, prob, q, k, v, width, dtype):
    """q, k, v as the forward kernels read them (``(B, H, S, width)`` of ``dtype``,
    contiguous) and fresh ``out (B, Hq, Sq, width)`` and float32 ``lse (B, Hq, Sq)`` (NaN with
    ``XATTN_POISON``)."""
    b = math.prod(prob.batch)
    q4, k4, v4 = (operand(xp, q, b, prob.hq, prob.sq, width, dtype),
                  operand(xp, k, b, prob.hkv, prob.sk, width, dtype),
                  operand(xp, v, b, prob.hkv, prob.sk, width, dtype))
    out = xp.empty((b, prob.hq, prob.sq, width), dtype=dtype)
    lse = xp.empty((b, prob.hq, prob.sq), dtype=xp.float32)
    if poison():
        fill_poison(xp, out, lse)
    return q4, k4, v4, out, lse


def nothing_to_launch(out, lse) -> bool:
    """True for an empty problem; then ``lse`` holds -inf (no visible key) and no kernel runs."""
    if out.size and lse.size:
        return False
    if lse.size:
        lse.fill(-np.inf)
    return True


def forward_result(xp, prob, out, lse):
    """``(out, lse)`` in the caller's shapes, ``out`` cut back to ``Dv`` columns."""
    if out.shape[-1] != prob.dv:
        out = xp.ascontiguousarray(out[..., :prob.dv])
    return out.reshape(prob.out_shape), lse.reshape(prob.lse_shape)
