"""Tensor maps (TMA descriptors) for Hopper's copy engine: ``cuTensorMapEncodeTiled`` through
ctypes on ``libcuda.so.1``.

A kernel that copies tiles with ``cp.async.bulk.tensor`` takes, per operand, a 128-byte
``CUtensorMap`` by value (``xattn/kernels/tma_sm90.cuh``: ``const __grid_constant__ TmaDesc``).
:func:`encode_tiled` fills one on the host and returns it as a NumPy array of one 128-byte
element (:data:`DESC_DTYPE`), 64-byte aligned: CuPy passes a NumPy array of size one to a
kernel by value, copying its bytes into the parameter (the driver reads the parameter's size,
128 bytes, from the kernel), so the array is the launch argument as it is.

The driver library is loaded on the first encode, never at import (importing xattn loads no
CUDA library); errors of the driver come back as :class:`RuntimeError` with its error string,
arguments the driver would refuse as :class:`ValueError` before the call. Encoded maps are kept
in a small LRU cache keyed by every input (a map holds nothing but these values, so a freed
and reused address with the same shape gives the same, valid, map).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

__all__ = ["DESC_BYTES", "DESC_DTYPE", "bhsd_layout", "check_operand", "encode_tiled",
           "null_desc", "rows_map"]

DESC_BYTES = 128  # sizeof(CUtensorMap)
_DESC_ALIGN = 64  # its alignment (cuda.h: CU_TENSOR_MAP_NUM_QWORDS, alignas(64))
# One CUtensorMap as a NumPy element (16 opaque 64-bit words, like TmaDesc in the kernel).
DESC_DTYPE = np.dtype([("w", "<u8", (16,))])

# cuda.h (CUDA 13.0): CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion.
_DATA_TYPE = {"float16": (6, 2), "bfloat16": (9, 2)}  # name -> (enum, bytes per element)
_SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}  # bytes of the swizzle span -> enum
_L2_PROMOTION = {0: 0, 64: 1, 128: 2, 256: 3}  # bytes -> enum
_INTERLEAVE_NONE = 0
_OOB_FILL_NONE = 0  # out-of-bounds elements read as zeros (the other value fills NaN)
_MAX_RANK = 5


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        name = {"f16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    else:
        name = np.dtype(dtype).name
    if name not in _DATA_TYPE:
        raise TypeError(f"dtype: tensor maps are built for {sorted(_DATA_TYPE)} here, got "
                        f"{name!r}")
    return name


def _check(ptr, name, dims, strides, box, swizzle, l2_promotion):
    """Every rule of cuTensorMapEncodeTiled that these maps can break, as a ValueError that
    names the argument (cuda.h's documentation of the call)."""
    esize = _DATA_TYPE[name][1]
    rank = len(dims)
    if not 1 <= rank <= _MAX_RANK:
        raise ValueError(f"dims: rank 1 to {_MAX_RANK}, got {rank} ({dims})")
    if len(strides) != rank - 1:
        raise ValueError(f"strides_bytes: {rank - 1} strides (every dimension but the "
                         f"innermost) for dims {dims}, got {len(strides)} ({strides})")
    if len(box) != rank:
        raise ValueError(f"box: {rank} extents for dims {dims}, got {len(box)} ({box})")
    if swizzle not in _SWIZZLE:
        raise ValueError(f"swizzle: one of {sorted(_SWIZZLE)} bytes, got {swizzle}")
    if l2_promotion not in _L2_PROMOTION:
        raise ValueError(f"l2_promotion: one of {sorted(_L2_PROMOTION)} bytes, got "
                         f"{l2_promotion}")
    if ptr <= 0 or ptr % 16:
        raise ValueError(f"ptr: the global address must be non-null and 16-byte aligned, got "
                         f"{ptr:#x}")
    for i, n in enumerate(dims):
        if not 1 <= n <= 2**32:
            raise ValueError(f"dims[{i}]: 1 to 2**32 elements, got {n} (dims {dims})")
    for i, s in enumerate(strides):
        if s <= 0 or s % 16 or s >= 2**40:
            raise ValueError(f"strides_bytes[{i}]: a positive multiple of 16 below 2**40, got "
                             f"{s} (strides {strides})")
    for i, n in enumerate(box):
        if not 1 <= n <= 256:
            raise ValueError(f"box[{i}]: 1 to 256 elements, got {n} (box {box})")
    inner = box[0] * esize
    if inner % 16:
        raise ValueError(f"box[0]: its bytes ({box[0]} x {esize}) must be a multiple of 16")
    if swizzle and inner > swizzle:
        raise ValueError(f"box[0]: {inner} bytes exceed the {swizzle}-byte swizzle span "
                         f"({box[0]} elements of {esize} bytes)")


def encode_tiled(ptr, dtype, dims, strides_bytes, box, swizzle=128, l2_promotion=128, *,
                 cache=True):
    """The tiled tensor map of a global array: a NumPy array of one :data:`DESC_DTYPE` element
    (read-only, 64-byte aligned), to pass as a kernel argument.

    ``ptr``: the device address of element (0, ..., 0); ``dtype``: float16 or bfloat16 (a
    NumPy dtype or its name, or the kernels' ``f16`` / ``bf16``); ``dims``: extents in
    elements, innermost first; ``strides_bytes``: the byte strides of ``dims[1:]``; ``box``:
    the extents of one copy, innermost first; ``swizzle``: the shared-memory swizzle span in
    bytes (0, 32, 64, 128); ``l2_promotion``: the L2 fill granularity in bytes. Elements
    outside ``dims`` arrive as zeros. ``cache=False`` encodes even when an identical map is
    cached (timing the encode).
    """
    name = _dtype_name(dtype)
    dims = tuple(int(x) for x in dims)
    strides = tuple(int(x) for x in strides_bytes)
    box = tuple(int(x) for x in box)
    ptr = int(ptr)
    _check(ptr, name, dims, strides, box, int(swizzle), int(l2_promotion))
    fn = _encode_cached if cache else _encode
    return fn(ptr, name, dims, strides, box, int(swizzle), int(l2_promotion))


def _aligned_desc():
    """A zeroed, 64-byte-aligned array of one DESC_DTYPE element (the encode writes it)."""
    raw = np.zeros(DESC_BYTES + _DESC_ALIGN, dtype=np.uint8)
    off = -raw.ctypes.data % _DESC_ALIGN
    return raw[off:off + DESC_BYTES].view(DESC_DTYPE)


def null_desc():
    """An all-zero map, for a kernel that will not use it (an operand with no element: the
    driver encodes no map of extent 0)."""
    out = _aligned_desc()
    out.flags.writeable = False
    return out


def _encode(ptr, name, dims, strides, box, swizzle, l2_promotion):
    out = _aligned_desc()
    rank = len(dims)
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    code = _driver_encode()(
        ctypes.c_void_p(out.ctypes.data), _DATA_TYPE[name][0], rank, ctypes.c_void_p(ptr),
        (u64 * rank)(*dims), (u64 * max(1, rank - 1))(*strides), (u32 * rank)(*box),
        (u32 * rank)(*([1] * rank)), _INTERLEAVE_NONE, _SWIZZLE[swizzle],
        _L2_PROMOTION[l2_promotion], _OOB_FILL_NONE)
    if code != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed: {_error_string(code)} (dtype "
                           f"{name}, address {ptr:#x}, dims {dims}, strides {strides} bytes, "
                           f"box {box}, swizzle {swizzle}, L2 promotion {l2_promotion})")
    out.flags.writeable = False
    return out


_encode_cached = functools.lru_cache(maxsize=64)(_encode)


class _Driver:
    """libcuda.so.1's entry points used here, bound once."""

    def __init__(self):
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise RuntimeError(f"tensor maps need the CUDA driver library (libcuda.so.1): "
                               f"{exc}") from exc
        try:
            encode = lib.cuTensorMapEncodeTiled
        except AttributeError as exc:
            raise RuntimeError("this CUDA driver has no cuTensorMapEncodeTiled (tensor maps "
                               "need a CUDA 12 or newer driver)") from exc
        p = ctypes.POINTER
        encode.restype = ctypes.c_int
        encode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                           p(ctypes.c_uint64), p(ctypes.c_uint64), p(ctypes.c_uint32),
                           p(ctypes.c_uint32), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int]
        lib.cuGetErrorString.restype = ctypes.c_int
        lib.cuGetErrorString.argtypes = [ctypes.c_int, p(ctypes.c_char_p)]
        lib.cuInit.restype = ctypes.c_int
        lib.cuInit.argtypes = [ctypes.c_uint]
        self.lib, self.encode = lib, encode
        # Idempotent; CuPy's runtime has normally done it already.
        code = lib.cuInit(0)
        if code != 0:
            raise RuntimeError(f"cuInit failed: {self.error_string(code)}")

    def error_string(self, code):
        msg = ctypes.c_char_p()
        if self.lib.cuGetErrorString(int(code), ctypes.byref(msg)) != 0 or not msg.value:
            return f"CUresult {code}"
        return f"CUresult {code}: {msg.value.decode(errors='replace')}"


@functools.lru_cache(maxsize=1)
def _driver():
    return _Driver()


def _driver_encode():
    """The cuTensorMapEncodeTiled callable (tests replace this function with a fake)."""
    return _driver().encode


def _error_string(code):
    try:
        return _driver().error_string(code)
    except RuntimeError:
        return f"CUresult {code}"


def bhsd_layout(shape, itemsize, rows, cols=64):
    """``(dims, strides_bytes, box)`` of the 3-D map over a C-contiguous ``(B, H, S, D)``
    array that copies boxes of ``rows`` rows x ``cols`` columns of one (b, h): dims
    ``{D, S, B * H}`` innermost first, so that rows past ``S`` are outside the map (zeros),
    never the next head's."""
    b, h, s, d = (int(x) for x in shape)
    return (d, s, b * h), (d * itemsize, s * d * itemsize), (cols, rows, 1)


def check_operand(x, name):
    """A (B, H, S, D) operand that the copy engine reads in place: C-contiguous, its address
    16-byte aligned (a view that starts inside an allocation may not be). Returns the
    address."""
    if x.ndim != 4 or not x.flags.c_contiguous:
        raise ValueError(f"{name}: the TMA path reads a C-contiguous (B, H, S, D) array, got "
                         f"shape {tuple(x.shape)} with strides {tuple(x.strides)}")
    ptr = int(x.data.ptr)
    if ptr % 16:
        raise ValueError(f"{name}: the TMA path needs a 16-byte aligned base address, got "
                         f"{ptr:#x} (a view starting {ptr % 16} bytes past an aligned "
                         f"address; pass a copy, e.g. cupy.ascontiguousarray(x.copy()))")
    return ptr


# rows_map's maps by (address, shape, dtype, box, swizzle): a call on the arrays of an earlier
# one skips the encode's checks and argument conversions (about 10 of its 14 microseconds).
_ROWS: dict = {}


def rows_map(x, name, rows, cols=64, swizzle=128):
    """The tensor map of the (B, H, S, D) operand ``x`` read in boxes of ``rows`` x ``cols``
    (see :func:`bhsd_layout`), after :func:`check_operand`; :func:`null_desc` for an operand
    without elements."""
    ptr = check_operand(x, name)
    key = (ptr, x.shape, x.dtype, rows, cols, swizzle)
    hit = _ROWS.get(key)
    if hit is not None:
        return hit
    if x.size == 0:
        return null_desc()
    dims, strides, box = bhsd_layout(x.shape, x.dtype.itemsize, rows, cols)
    if len(_ROWS) >= 256:
        _ROWS.clear()
    out = _ROWS[key] = encode_tiled(ptr, x.dtype, dims, strides, box, swizzle)
    return out
