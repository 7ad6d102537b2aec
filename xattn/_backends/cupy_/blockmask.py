"""A :class:`~xattn.BlockMask` on the GPU: its arrays as device int32/uint32 arrays, cached.

The CUDA kernels (``xattn/kernels/blockmask.cuh``) walk the mask's own CSR lists: per query
block the full and the partial key blocks (``full_row_ptr``, ``full_col_idx``,
``partial_row_ptr``, ``partial_col_idx``, int32 as :mod:`xattn._blockmask` stores them). In a
partial block the element rule runs:

* ``RULE_CAUSAL`` and ``RULE_WINDOW`` are evaluated arithmetically from ``rule_data``
  (``offset``, ``left``, ``right``): nothing more is uploaded;
* every other rule (documents, global tokens, dense tiles, ``&``/``|`` composites) is lowered
  once on the host to the partial blocks' boolean tiles (:meth:`BlockMask.partial_tiles`),
  bit-packed: tile ``p`` is ``(bq, words)`` uint32 with ``words = ceil(bk / 32)``, bit
  ``c % 32`` of word ``c // 32`` of row ``r`` is pair ``(r, c)`` of the block (``bq * bk / 8``
  bytes per partial block, an eighth of a bool array).

Upload: the first call for a given (mask object, device) copies these arrays to that device
(one host-to-device copy each, ordered on the current stream) and keeps them for as long as
the mask object lives (a :class:`weakref.WeakKeyDictionary`; BlockMask constructors are
themselves cached, so a repeated ``BlockMask.causal(...)`` finds the same upload). Later calls
make no host round trip and no copy.

For key-block-parallel kernels (the backward pass) :func:`csc_arrays` gives the transpose:
per key block, its query blocks in row order, each with its partial-block number ``p``
(``-1`` for a full block), so that both walks read the same stored tiles;
:func:`device_csc` uploads it under the same cache.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from ..._blockmask import RULE_CAUSAL, RULE_NONE, RULE_WINDOW

__all__ = [
    "KERNEL_RULE_CAUSAL",
    "KERNEL_RULE_NONE",
    "KERNEL_RULE_TILES",
    "KERNEL_RULE_WINDOW",
    "DeviceBlockMask",
    "csc_arrays",
    "device_block_mask",
    "device_csc",
    "kernel_rule",
    "null_kernel_args",
    "packed_tiles",
]

# The XATTN_BM_* codes of blockmask.cuh.
KERNEL_RULE_NONE = 0
KERNEL_RULE_CAUSAL = 1
KERNEL_RULE_WINDOW = 2
KERNEL_RULE_TILES = 5

_lock = threading.Lock()
# mask -> {(kind, device id): uploaded arrays}; entries die with the mask.
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kernel_rule(bm):
    """``(rule, offset, left, right)``: the kernel's element rule of ``bm``'s partial blocks.

    Examples
    --------
    >>> import xattn
    >>> from xattn._backends.cupy_.blockmask import kernel_rule
    >>> kernel_rule(xattn.BlockMask.causal(300, 500, block_size=64))
    (1, 200, -1, -1)
    >>> kernel_rule(xattn.BlockMask.documents([0, 100, 300], block_size=64))[0]
    5
    """
    if bm.num_partial_blocks == 0 or bm.rule_kind == RULE_NONE:
        return KERNEL_RULE_NONE, 0, -1, -1
    data = bm.rule_data
    if bm.rule_kind == RULE_CAUSAL:
        return KERNEL_RULE_CAUSAL, int(data["offset"]), -1, -1
    if bm.rule_kind == RULE_WINDOW:
        return KERNEL_RULE_WINDOW, int(data["offset"]), int(data["left"]), int(data["right"])
    return KERNEL_RULE_TILES, 0, -1, -1


def packed_tiles(bm):
    """The partial tiles of ``bm`` bit-packed for the kernels: uint32 ``(P, bq, words)``.

    ``words = ceil(bk / 32)``; bit ``c % 32`` of word ``c // 32`` in row ``r`` of tile ``p``
    is ``bm.partial_tiles()[p, r, c]`` (columns past ``bk`` are 0).

    Examples
    --------
    >>> import numpy as np, xattn
    >>> from xattn._backends.cupy_.blockmask import packed_tiles
    >>> m = np.tril(np.ones((40, 40), bool))
    >>> bm = xattn.BlockMask.from_dense(m, block_size=(8, 40))
    >>> t = packed_tiles(bm)
    >>> t.shape, t.dtype.name, hex(int(t[0, 3, 0]))
    ((5, 8, 2), 'uint32', '0xf')
    """
    tiles = np.asarray(bm.partial_tiles(), dtype=bool)
    p, bq, bk = tiles.shape
    words = -(-bk // 32)
    if words * 32 != bk:
        padded = np.zeros((p, bq, words * 32), dtype=bool)
        padded[..., :bk] = tiles
        tiles = padded
    packed = np.packbits(tiles, axis=-1, bitorder="little")  # (p, bq, 4 * words) bytes
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)


def csc_arrays(bm):
    """The transpose of ``bm``'s block lists: ``(col_ptr, row_idx, tile_idx)``, int32.

    For key block ``j`` the entries ``col_ptr[j]:col_ptr[j + 1]`` list its visible query
    blocks ``row_idx`` in increasing order, with ``tile_idx`` the block's index in the partial
    CSR arrays (its stored tile), or ``-1`` when the block is full.

    Examples
    --------
    >>> import xattn
    >>> from xattn._backends.cupy_.blockmask import csc_arrays
    >>> ptr, rows, tiles = csc_arrays(xattn.BlockMask.causal(300, block_size=128))
    >>> ptr.tolist(), rows.tolist(), tiles.tolist()
    ([0, 3, 5, 6], [0, 1, 2, 1, 2, 2], [0, -1, -1, 1, -1, 2])
    """
    nq, nk = bm.n_blocks
    fptr, fcol = np.asarray(bm.full_row_ptr), np.asarray(bm.full_col_idx)
    pptr, pcol = np.asarray(bm.partial_row_ptr), np.asarray(bm.partial_col_idx)
    rows = np.concatenate((np.repeat(np.arange(nq), np.diff(fptr)),
                           np.repeat(np.arange(nq), np.diff(pptr))))
    cols = np.concatenate((fcol, pcol)).astype(np.int64)
    tile = np.concatenate((np.full(len(fcol), -1), np.arange(len(pcol))))
    order = np.lexsort((rows, cols))
    col_ptr = np.zeros(nk + 1, dtype=np.int32)
    np.cumsum(np.bincount(cols, minlength=nk), out=col_ptr[1:])
    return (col_ptr, rows[order].astype(np.int32), tile[order].astype(np.int32))


class DeviceBlockMask:
    """A BlockMask's kernel arguments on one device (built by :func:`device_block_mask`)."""

    __slots__ = ("bk", "bq", "device", "fcol", "frow", "left", "nbytes", "off", "pcol",
                 "prow", "right", "rule", "tiles", "words", "__weakref__")

    def kernel_args(self):
        """The trailing block-mask arguments of the forward entry points, in order."""
        i32 = np.int32
        tiles = self.tiles if self.tiles is not None else np.uint64(0)
        return (self.frow, self.fcol, self.prow, self.pcol, tiles, i32(self.bq), i32(self.bk),
                i32(self.words), i32(self.rule), i32(self.off), i32(self.left),
                i32(self.right))


def null_kernel_args():
    """The block-mask arguments of a dense launch (the dense entries never read them)."""
    null, i32 = np.uint64(0), np.int32
    return (null, null, null, null, null, i32(1), i32(1), i32(1), i32(0), i32(0), i32(-1),
            i32(-1))


def _device_id(xp):
    """The current device of CuPy, ``"host"`` for NumPy (CPU tests run the same code on NumPy
    stand-ins; no kernel ever reads those)."""
    return xp.cuda.Device().id if xp.__name__ == "cupy" else "host"


def _cached(bm, kind, build, xp):
    dev = _device_id(xp)
    with _lock:
        per_mask = _cache.get(bm)
        hit = None if per_mask is None else per_mask.get((kind, dev))
    if hit is not None:
        return hit
    value = build(xp)
    with _lock:
        per_mask = _cache.setdefault(bm, {})
        return per_mask.setdefault((kind, dev), value)


def _array_module(xp):
    if xp is None:
        import cupy as xp
    return xp


def device_block_mask(bm, xp=None):
    """``bm``'s CSR arrays (and packed tiles) on the current device, uploaded on first use
    (``xp``: CuPy by default; NumPy for the CPU tests).

    ``bm`` must be unbatched (``bm.batch_shape == ()``).
    """

    def build(xp):
        dm = DeviceBlockMask()
        dm.device = _device_id(xp)
        dm.bq, dm.bk = bm.block_size
        dm.rule, dm.off, dm.left, dm.right = kernel_rule(bm)
        arrays = [np.ascontiguousarray(a, dtype=np.int32) for a in
                  (bm.full_row_ptr, bm.full_col_idx, bm.partial_row_ptr, bm.partial_col_idx)]
        # Zero-length arrays still get a (valid, unread) allocation.
        dm.frow, dm.fcol, dm.prow, dm.pcol = (xp.asarray(a if a.size else np.zeros(1, np.int32))
                                              for a in arrays)
        dm.words = -(-dm.bk // 32)
        dm.tiles = None
        if dm.rule == KERNEL_RULE_TILES:
            dm.tiles = xp.asarray(packed_tiles(bm))
        dm.nbytes = sum(a.nbytes for a in (dm.frow, dm.fcol, dm.prow, dm.pcol)) + (
            0 if dm.tiles is None else dm.tiles.nbytes)
        return dm

    return _cached(bm, "csr", build, _array_module(xp))


def device_csc(bm, xp=None):
    """:func:`csc_arrays` of ``bm`` on the current device (int32), uploaded on first use;
    the packed tiles are ``device_block_mask(bm).tiles``."""

    def build(xp):
        return tuple(xp.asarray(a if a.size else np.zeros(1, np.int32))
                     for a in csc_arrays(bm))

    return _cached(bm, "csc", build, _array_module(xp))
