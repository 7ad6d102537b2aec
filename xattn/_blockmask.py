"""BlockMask: a block-sparse attention pattern as plain integer arrays.

The score matrix is cut into blocks of ``block_size = (bq, bk)`` (the last block row/column
may be shorter). For every query block the visible key blocks are listed in CSR form, split
in two sets:

* **full** blocks (``full_row_ptr``, ``full_col_idx``): every (query, key) pair is visible;
  kernels skip every element test;
* **partial** blocks (``partial_row_ptr``, ``partial_col_idx``): an element rule decides per
  pair. ``rule_kind`` (an ``int``, ``RULE_*`` below) says which rule, ``rule_data`` holds its
  parameters as ints and small integer/boolean arrays, so a CUDA kernel can walk the same
  arrays.

Blocks in neither set are invisible and cost nothing. Both ``row_ptr`` arrays are int32 of
length ``n_q_blocks + 1``; the ``col_idx`` arrays are int32, sorted within each row.

Element rules (``rule_data`` keys in brackets):

========================= ======================================================================
``RULE_NONE`` (0)         no partial blocks
``RULE_CAUSAL`` (1)       ``j <= i + offset`` (``offset``)
``RULE_WINDOW`` (2)       ``i + offset - left <= j <= i + offset + right``, ``-1`` = unbounded
                          (``offset``, ``left``, ``right``; a causal window has ``right <= 0``)
``RULE_DOCUMENTS`` (3)    same document: ``doc(i) == doc(j)`` with ``doc`` from ``cu_seqlens``,
                          and ``j <= i`` when ``causal`` is 1 (``cu_seqlens``, ``causal``)
``RULE_GLOBAL`` (4)       ``|i - j| <= half_window`` or ``is_global[i]`` or ``is_global[j]``
                          (``half_window``, ``is_global``: Longformer)
``RULE_DENSE`` (5)        stored tiles: ``tiles[p]`` is the ``(bq, bk)`` boolean tile of the
                          ``p``-th partial block in CSR order (``tiles``)
``RULE_COMPOSITE`` (6)    ``a & b`` or ``a | b`` of masks with different rules; evaluated in
                          Python, or lowered to stored tiles by :meth:`BlockMask.partial_tiles`
========================= ======================================================================

The causal/window rules are those of :mod:`xattn._masking`; the document and global-token
rules are defined once below (:func:`document_visibility`, :func:`global_visibility`) and used
both by :meth:`BlockMask.to_dense` and by the attention kernels' element test.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _masking
from ._array import _check_not_subclass, normalize_window

__all__ = [
    "BlockMask",
    "DEFAULT_BLOCK_SIZE",
    "RULE_CAUSAL",
    "RULE_COMPOSITE",
    "RULE_DENSE",
    "RULE_DOCUMENTS",
    "RULE_GLOBAL",
    "RULE_NAMES",
    "RULE_NONE",
    "RULE_WINDOW",
    "band_visibility",
    "document_visibility",
    "global_visibility",
]

# 128 x 128 blocks, as FlexAttention: large enough for BLAS-sized tiles on the CPU and for one
# thread block per tile on the GPU, small enough that a window of a few hundred keys is sparse.
DEFAULT_BLOCK_SIZE = 128

RULE_NONE = 0
RULE_CAUSAL = 1
RULE_WINDOW = 2
RULE_DOCUMENTS = 3
RULE_GLOBAL = 4
RULE_DENSE = 5
RULE_COMPOSITE = 6
RULE_NAMES = ("none", "causal", "window", "documents", "global", "dense", "composite")

# The ASCII picture in repr is drawn only up to this many blocks per side.
_REPR_MAX_BLOCKS = 32

# Bytes of built block masks kept per builder (each cache is bounded by the bytes of its
# masks, partial tiles included, not by how many there are).
BUILD_CACHE_BYTES = 64 * 2**20


# --- element rules (the single definitions) -------------------------------------------------


def band_visibility(q0, q1, k0, k1, *, offset, causal, window):
    """Causal/window visibility of a tile (bool ``(q1-q0, k1-k0)``), or None if all visible.

    Evaluated by :func:`xattn._masking.tile_visibility` in coordinates relative to the tile:
    the rules depend only on ``j - (i + offset)``, so every tile of the same geometry shares
    one cached (read-only) array.
    """
    rel = k0 - q0 - offset
    return _masking.tile_visibility(
        np, 0, q1 - q0, rel, rel + (k1 - k0), sq=0, sk=0, causal=causal, window=window
    )


def document_ids(cu_seqlens, start, stop):
    """Document index of the positions ``start .. stop-1`` (empty documents are skipped)."""
    return np.searchsorted(cu_seqlens, np.arange(start, stop), side="right") - 1


def document_visibility(cu_seqlens, q0, q1, k0, k1, *, causal):
    """Packed documents: query ``i`` sees key ``j`` iff both lie in one document (and ``j <= i``
    when ``causal``). Returns a bool ``(q1-q0, k1-k0)`` array."""
    vis = document_ids(cu_seqlens, q0, q1)[:, None] == document_ids(cu_seqlens, k0, k1)[None, :]
    if causal:
        band = band_visibility(q0, q1, k0, k1, offset=0, causal=True, window=None)
        if band is not None:
            vis &= band
    return vis


def global_visibility(is_global, half_window, q0, q1, k0, k1):
    """Longformer: ``|i - j| <= half_window`` or ``i`` global or ``j`` global.

    Returns a bool ``(q1-q0, k1-k0)`` array, or None when every pair is visible.
    """
    band = band_visibility(q0, q1, k0, k1, offset=0, causal=False,
                           window=(half_window, half_window))
    if band is None:
        return None
    return band | is_global[q0:q1, None] | is_global[None, k0:k1]


# --- argument checks ------------------------------------------------------------------------


def _int(name, value, *, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _block_pair(block_size):
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(
                f"block_size: expected an int or a (query, key) pair, got {block_size!r}"
            )
        return (_int("block_size", block_size[0], minimum=1),
                _int("block_size", block_size[1], minimum=1))
    b = _int("block_size", block_size, minimum=1)
    return (b, b)


def _host_array(name, x):
    if type(x).__module__.split(".")[0] == "cupy":
        raise TypeError(
            f"{name}: expected a NumPy array or sequence (masks are built on the host), got a "
            "cupy.ndarray; pass x.get()"
        )
    return np.asarray(x)


# --- construction helpers -------------------------------------------------------------------


def _ranges(starts, stops):
    """Concatenated ``arange(starts[r], stops[r])`` and the row ``r`` of each element."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.maximum(np.asarray(stops, dtype=np.int64) - starts, 0)
    rows = np.repeat(np.arange(len(starts)), lengths)
    first = np.cumsum(lengths) - lengths
    cols = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(first - starts, lengths)
    return rows, cols


def _csr(n_rows, rows, cols):
    """Sort (rows, cols) into CSR; returns ``row_ptr``, ``col_idx`` (int32) and the order."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    order = np.lexsort((cols, rows))
    row_ptr = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=row_ptr[1:])
    return row_ptr, cols[order].astype(np.int32), order


def _readonly(a):
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _classify(counts, rows_per_block, cols_per_block):
    """Block status from visible-pair counts: 1 = full, 2 = partial, 0 = invisible."""
    area = rows_per_block[:, None] * cols_per_block[None, :]
    return np.where(counts == area, 1, np.where(counts > 0, 2, 0))


def _scalar_object(x):
    out = np.empty((), dtype=object)
    out[()] = x
    return out


class _Combined:
    """Exact element predicate of ``a & b`` / ``a | b``."""

    def __init__(self, op, a, b):
        self.op, self.a, self.b = op, a, b

    def __call__(self, q0, q1, k0, k1):
        va, vb = self.a.exact(q0, q1, k0, k1), self.b.exact(q0, q1, k0, k1)
        if self.op == "&":
            if va is None or vb is None:
                return vb if va is None else va
            return va & vb
        if va is None or vb is None:
            return None
        return va | vb


# --- the class ------------------------------------------------------------------------------


class BlockMask:
    """Block-sparse attention pattern: for each query block, its visible key blocks (CSR).

    Build one with a constructor (:meth:`causal`, :meth:`sliding_window`, :meth:`longformer`,
    :meth:`bigbird`, :meth:`documents`, :meth:`from_dense`, :meth:`from_mask_mod`), combine
    with ``&`` and ``|``, and pass it to :func:`xattn.block_sparse_attention` or
    ``flash_attention(..., block_mask=...)``. Attention then visits only the visible blocks,
    and full blocks skip the element test. Constructors cost O(number of blocks) (never an
    ``Sq x Sk`` array unless you pass one) and are cached per (pattern, shapes, options), so a
    repeated call returns the same immutable object.

    Positions follow DESIGN's bottom-right alignment: query ``i`` sits at key position
    ``i + k_len - q_len``.

    Attributes
    ----------
    q_len, k_len : int
        Query and key lengths; need not be multiples of the block size.
    block_size : tuple of int
        ``(bq, bk)``.
    n_blocks : tuple of int
        ``(ceil(q_len / bq), ceil(k_len / bk))``.
    full_row_ptr, full_col_idx, partial_row_ptr, partial_col_idx : int32 arrays
        CSR of the full and the partial blocks (read-only).
    rule_kind : int
        One of the ``RULE_*`` codes (see the module docstring); ``rule_name`` is its name.
    rule_data : dict
        The rule's parameters (ints and NumPy arrays).
    batch_shape : tuple
        ``()`` for an ordinary mask. A mask that differs per batch element (Longformer with
        per-batch global tokens) has the batch shape; index it (``bm[i]``) for one element's
        mask and CSR arrays.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> bm = xattn.BlockMask.causal(300, block_size=128)
    >>> bm
    BlockMask(q_len=300, k_len=300, block_size=(128, 128), n_blocks=(3, 3),
              nnz_blocks=6 (full 3, partial 3), density=0.667, rule='causal')
    +..
    #+.
    ##+
    >>> bm.full_row_ptr.tolist(), bm.full_col_idx.tolist()
    ([0, 0, 1, 3], [0, 0, 1])
    >>> bool((bm.to_dense() == np.tril(np.ones((300, 300), bool))).all())
    True
    """

    __array_ufunc__ = None  # ``ndarray & bm`` defers to BlockMask (which raises TypeError)

    def __init__(self, q_len, k_len, block_size, full, partial, *, rule_kind, rule_data=None,
                 predicate=None, tiles=None, description=""):
        # Private: use the constructors. ``full``/``partial`` are (rows, cols) block indices;
        # ``predicate(q0, q1, k0, k1)`` is the exact element visibility of any range (None =
        # look it up from the blocks); ``tiles`` are the stored partial tiles for RULE_DENSE,
        # in the order of ``partial``.
        self.q_len, self.k_len = int(q_len), int(k_len)
        self.block_size = block_size
        bq, bk = block_size
        self.n_blocks = (-(-self.q_len // bq), -(-self.k_len // bk))
        nq = self.n_blocks[0]
        fptr, fcol, _ = _csr(nq, *full)
        pptr, pcol, order = _csr(nq, *partial)
        self.full_row_ptr, self.full_col_idx = _readonly(fptr), _readonly(fcol)
        self.partial_row_ptr, self.partial_col_idx = _readonly(pptr), _readonly(pcol)
        if len(pcol) == 0:
            rule_kind, rule_data, predicate, tiles = RULE_NONE, {}, predicate, None
        self.rule_kind = int(rule_kind)
        self.rule_data = dict(rule_data or {})
        if tiles is not None:
            self.rule_data["tiles"] = _readonly(np.asarray(tiles, dtype=bool)[order])
        self._predicate = predicate
        self._description = description
        self.batch_shape = ()
        self._members = None
        self._visible_pairs = None

    # --- batched masks (one BlockMask per batch element) ---

    @classmethod
    def _stack(cls, members):
        first = members.flat[0]
        if members.ndim == 0 or all(m is first for m in members.flat):
            return first
        bm = object.__new__(cls)
        bm.q_len, bm.k_len = first.q_len, first.k_len
        bm.block_size, bm.n_blocks = first.block_size, first.n_blocks
        bm.batch_shape = members.shape
        bm._members = members
        bm._description = first._description
        bm.rule_kind = first.rule_kind
        return bm

    def __getitem__(self, index):
        if self._members is None:
            raise TypeError("BlockMask: only a batched mask (batch_shape != ()) can be indexed")
        out = self._members[index]
        return BlockMask._stack(out) if isinstance(out, np.ndarray) else out

    def __getattr__(self, name):
        # Only reached for attributes a batched mask does not carry (the CSR arrays).
        if name.startswith("__") or self.__dict__.get("_members") is None:
            raise AttributeError(name)
        raise AttributeError(
            f"BlockMask.{name}: this mask differs per batch element (batch_shape "
            f"{self.batch_shape}); index it first, e.g. bm[0].{name}"
        )

    # --- summary ---

    @property
    def rule_name(self) -> str:
        return RULE_NAMES[self.rule_kind]

    @property
    def num_full_blocks(self) -> int:
        if self._members is not None:
            return sum(m.num_full_blocks for m in self._members.flat)
        return len(self.full_col_idx)

    @property
    def num_partial_blocks(self) -> int:
        if self._members is not None:
            return sum(m.num_partial_blocks for m in self._members.flat)
        return len(self.partial_col_idx)

    @property
    def nnz_blocks(self) -> int:
        """Number of visible (full or partial) blocks (summed over the batch, if batched)."""
        return self.num_full_blocks + self.num_partial_blocks

    @property
    def density(self) -> float:
        """Fraction of blocks that are visible (full or partial); averaged over the batch."""
        total = self.n_blocks[0] * self.n_blocks[1] * max(1, math.prod(self.batch_shape))
        return self.nnz_blocks / total if total else 0.0

    @property
    def visible_pairs(self) -> int:
        """Exact number of visible (query, key) pairs (summed over the batch): the work that
        "useful FLOP/s" counts. Costs O(full blocks + partial area)."""
        if self._members is not None:
            return sum(m.visible_pairs for m in self._members.flat)
        if self._visible_pairs is None:
            rows, cols = self._blocks(full=True)
            total = int((self._rows_in(rows) * self._cols_in(cols)).sum())
            for tile in self._partial_tile_iter():
                total += int(np.count_nonzero(tile))
            self._visible_pairs = total
        return self._visible_pairs

    def __repr__(self):
        head = (
            f"BlockMask(q_len={self.q_len}, k_len={self.k_len}, block_size={self.block_size}, "
            f"n_blocks={self.n_blocks},\n          "
        )
        if self.batch_shape:
            head += f"batch_shape={self.batch_shape}, "
        head += (
            f"nnz_blocks={self.nnz_blocks} (full {self.num_full_blocks}, partial "
            f"{self.num_partial_blocks}), density={self.density:.3g}, rule={self.rule_name!r})"
        )
        nq, nk = self.n_blocks
        if self.batch_shape or nq > _REPR_MAX_BLOCKS or nk > _REPR_MAX_BLOCKS:
            return head
        grid = self._grid(0, nq, 0, nk)[0]
        rows = ("".join(".#+"[c] for c in row) for row in grid)
        return head + "\n" + "\n".join(rows)

    # --- block lookup ---

    def _rows_in(self, block_rows):
        bq = self.block_size[0]
        return np.minimum((block_rows + 1) * bq, self.q_len) - block_rows * bq

    def _cols_in(self, block_cols):
        bk = self.block_size[1]
        return np.minimum((block_cols + 1) * bk, self.k_len) - block_cols * bk

    def _blocks(self, *, full):
        ptr, col = ((self.full_row_ptr, self.full_col_idx) if full
                    else (self.partial_row_ptr, self.partial_col_idx))
        rows = np.repeat(np.arange(self.n_blocks[0]), np.diff(ptr))
        return rows, col.astype(np.int64)

    def _keys(self, *, full):
        rows, cols = self._blocks(full=full)
        return rows * self.n_blocks[1] + cols

    def _grid(self, i0, i1, j0, j1):
        """Status (0 none, 1 full, 2 partial) of blocks [i0, i1) x [j0, j1), and for partial
        blocks their index in the partial CSR arrays (else -1)."""
        grid = np.zeros((i1 - i0, j1 - j0), dtype=np.int8)
        pidx = np.full(grid.shape, -1, dtype=np.int64)
        for code, ptr, col in ((1, self.full_row_ptr, self.full_col_idx),
                               (2, self.partial_row_ptr, self.partial_col_idx)):
            a, b = int(ptr[i0]), int(ptr[i1])
            rows = np.repeat(np.arange(i0, i1), np.diff(ptr[i0:i1 + 1]))
            cols = col[a:b]
            sel = (cols >= j0) & (cols < j1)
            grid[rows[sel] - i0, cols[sel] - j0] = code
            if code == 2:
                pidx[rows[sel] - i0, cols[sel] - j0] = np.arange(a, b)[sel]
        return grid, pidx

    def _block_tile(self, p, a0, a1, b0, b1):
        """Visibility of [a0, a1) x [b0, b1) inside partial block number ``p``."""
        if self.rule_kind == RULE_DENSE:
            bq, bk = self.block_size
            i, j = a0 // bq, b0 // bk
            return self.rule_data["tiles"][p, a0 - i * bq:a1 - i * bq, b0 - j * bk:b1 - j * bk]
        return self._predicate(a0, a1, b0, b1)

    def _partial_tile_iter(self):
        bq, bk = self.block_size
        rows, cols = self._blocks(full=False)
        for p, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            a0, b0 = i * bq, j * bk
            a1, b1 = min(a0 + bq, self.q_len), min(b0 + bk, self.k_len)
            tile = self._block_tile(p, a0, a1, b0, b1)
            yield np.ones((a1 - a0, b1 - b0), bool) if tile is None else tile

    def _assemble(self, q0, q1, k0, k1):
        """Visibility of [q0, q1) x [k0, k1) read from the blocks (full, partial, absent)."""
        bq, bk = self.block_size
        i0, i1 = q0 // bq, -(-q1 // bq)
        j0, j1 = k0 // bk, -(-k1 // bk)
        grid, pidx = self._grid(i0, i1, j0, j1)
        # Index the block grid per element: O((q1 - q0) * (k1 - k0)), never O(bq * bk).
        rows = np.arange(q0, q1) // bq - i0
        cols = np.arange(k0, k1) // bk - j0
        out = (grid == 1)[rows[:, None], cols[None, :]]
        for r, c in np.argwhere(grid == 2).tolist():
            i, j = i0 + r, j0 + c
            a0, a1 = max(i * bq, q0), min((i + 1) * bq, q1, self.q_len)
            b0, b1 = max(j * bk, k0), min((j + 1) * bk, k1, self.k_len)
            tile = self._block_tile(int(pidx[r, c]), a0, a1, b0, b1)
            out[a0 - q0:a1 - q0, b0 - k0:b1 - k0] = True if tile is None else tile
        return out

    def exact(self, q0, q1, k0, k1):
        """Visibility of the query rows [q0, q1) and key columns [k0, k1) as a bool array, or
        None when every pair is visible (rule-defined masks only). For kernels and tests."""
        if self._members is not None:
            raise ValueError("BlockMask.exact: index a batched mask first (bm[i])")
        if self._predicate is not None:
            return self._predicate(q0, q1, k0, k1)
        return self._assemble(q0, q1, k0, k1)

    def to_dense(self):
        """The boolean ``(*batch_shape, q_len, k_len)`` mask (True = may attend), read from the
        blocks: full blocks are True, partial blocks evaluate the element rule."""
        if self._members is not None:
            return np.stack([m.to_dense() for m in self._members.flat]).reshape(
                *self.batch_shape, self.q_len, self.k_len
            )
        return self._assemble(0, self.q_len, 0, self.k_len)

    def partial_tiles(self):
        """Every partial block's ``(bq, bk)`` boolean tile in CSR order, as one array
        ``(num_partial_blocks, bq, bk)`` (edge tiles padded with False): the ``RULE_DENSE``
        lowering of any rule, for kernels that do not implement it."""
        bq, bk = self.block_size
        if self.rule_kind == RULE_DENSE:
            stored = self.rule_data["tiles"]
            if stored.shape[1:] == (bq, bk):
                return stored
            # from_dense stores tiles clamped to a mask smaller than one block: pad on demand.
            out = np.zeros((len(stored), bq, bk), dtype=bool)
            out[:, :stored.shape[1], :stored.shape[2]] = stored
            return _readonly(out)
        out = np.zeros((self.num_partial_blocks, bq, bk), dtype=bool)
        for p, tile in enumerate(self._partial_tile_iter()):
            out[p, :tile.shape[0], :tile.shape[1]] = tile
        return _readonly(out)

    # --- combinators ---

    def _combine(self, other, op):
        if not isinstance(other, BlockMask):
            return NotImplemented
        if (self.q_len, self.k_len, self.block_size) != (other.q_len, other.k_len,
                                                         other.block_size):
            raise ValueError(
                f"BlockMask {op}: masks must share q_len, k_len and block_size, got "
                f"({self.q_len}, {self.k_len}, {self.block_size}) and "
                f"({other.q_len}, {other.k_len}, {other.block_size})"
            )
        if self._members is not None or other._members is not None:
            a = self._members if self._members is not None else _scalar_object(self)
            b = other._members if other._members is not None else _scalar_object(other)
            a, b = np.broadcast_arrays(a, b)
            out = np.empty(a.shape, dtype=object)
            for idx in np.ndindex(a.shape):
                out[idx] = a[idx]._combine(b[idx], op)
            return BlockMask._stack(out)
        return _combine_cached(self, other, op)

    def __and__(self, other):
        """``a & b``: pairs visible in both masks (same lengths and block size).

        A block is full where both are full, partial where both are visible otherwise; its
        element rule is the conjunction of the two (``RULE_COMPOSITE``).
        """
        return self._combine(other, "&")

    def __or__(self, other):
        """``a | b``: pairs visible in either mask (same lengths and block size).

        A block is full where either is full, partial where either is visible otherwise.
        """
        return self._combine(other, "|")

    __rand__ = __and__
    __ror__ = __or__

    # --- constructors ---

    @classmethod
    def causal(cls, q_len, k_len=None, *, block_size=DEFAULT_BLOCK_SIZE):
        """Causal mask, bottom-right aligned: query ``i`` sees keys ``j <= i + k_len - q_len``.

        Examples
        --------
        >>> import xattn
        >>> xattn.BlockMask.causal(2, 4, block_size=1).to_dense().astype(int)
        array([[1, 1, 1, 0],
               [1, 1, 1, 1]])
        """
        q_len = _int("q_len", q_len, minimum=1)
        k_len = q_len if k_len is None else _int("k_len", k_len, minimum=1)
        return _band(q_len, k_len, _block_pair(block_size), True, None)

    @classmethod
    def sliding_window(cls, q_len, k_len=None, *, window, causal=False,
                       block_size=DEFAULT_BLOCK_SIZE):
        """Sliding window: query ``i`` sees ``i + off - left <= j <= i + off + right``.

        ``window=(left, right)`` as in :func:`xattn.flash_attention` (``None`` on a side =
        unbounded), ``off = k_len - q_len``; ``causal=True`` also requires ``j <= i + off``.

        Examples
        --------
        >>> import xattn
        >>> bm = xattn.BlockMask.sliding_window(4096, window=(256, 256), block_size=128)
        >>> bm.nnz_blocks, bm.num_partial_blocks, round(bm.density, 3)
        (154, 60, 0.15)
        """
        q_len = _int("q_len", q_len, minimum=1)
        k_len = q_len if k_len is None else _int("k_len", k_len, minimum=1)
        if window is None:
            raise ValueError("window: expected (left, right), got None")
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        return _band(q_len, k_len, _block_pair(block_size), bool(causal),
                     normalize_window(window))

    @classmethod
    def documents(cls, cu_seqlens, *, causal=False, block_size=DEFAULT_BLOCK_SIZE,
                  seq_len=None):
        """Packed variable-length sequences: attention only inside each document.

        ``cu_seqlens`` holds the document boundaries ``[0, end_0, end_1, ..., total]``
        (flash-attn's varlen convention; non-decreasing, so empty documents are allowed); the
        mask is ``total x total``. ``causal=True`` is causal inside each document. Pass
        ``seq_len`` to check that the documents cover exactly that many positions.

        Examples
        --------
        >>> import xattn
        >>> xattn.BlockMask.documents([0, 2, 5], block_size=2).to_dense().astype(int)
        array([[1, 1, 0, 0, 0],
               [1, 1, 0, 0, 0],
               [0, 0, 1, 1, 1],
               [0, 0, 1, 1, 1],
               [0, 0, 1, 1, 1]])
        """
        cu = _host_array("cu_seqlens", cu_seqlens)
        if cu.ndim != 1 or cu.size < 2 or not np.issubdtype(cu.dtype, np.integer):
            raise ValueError(
                "cu_seqlens: expected a 1-D integer array [0, ..., total] with at least 2 "
                f"entries, got shape {cu.shape} dtype {cu.dtype}"
            )
        if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] <= 0:
            raise ValueError(
                "cu_seqlens: expected non-decreasing offsets starting at 0 and ending at the "
                f"total length (> 0), got {cu.tolist() if cu.size <= 20 else cu}"
            )
        if seq_len is not None and cu[-1] != _int("seq_len", seq_len, minimum=1):
            raise ValueError(
                f"cu_seqlens: the last offset must equal seq_len={seq_len}, got {int(cu[-1])}"
            )
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        return _documents(tuple(cu.tolist()), bool(causal), _block_pair(block_size))

    @classmethod
    def longformer(cls, seq_len, *, window, global_tokens, block_size=DEFAULT_BLOCK_SIZE):
        """Longformer (Hugging Face semantics): a sliding window plus symmetric global tokens.

        Query ``i`` sees key ``j`` iff ``|i - j| <= window // 2``, or ``i`` is global (global
        queries see every key), or ``j`` is global (every query sees the global keys).

        Parameters
        ----------
        seq_len : int
        window : int
            Even and positive (HF ``attention_window``): ``window // 2`` keys on each side.
        global_tokens : array_like
            Integer positions shared by the batch (negative values count from the end, as in
            NumPy indexing), or a boolean ``(S,)`` array, or a boolean ``(*batch, S)`` array
            with one set of global tokens per batch element (the mask then has that
            ``batch_shape``).
        block_size : int or (int, int)

        Examples
        --------
        >>> import xattn
        >>> bm = xattn.BlockMask.longformer(8, window=2, global_tokens=[0], block_size=4)
        >>> bm.to_dense().astype(int)
        array([[1, 1, 1, 1, 1, 1, 1, 1],
               [1, 1, 1, 0, 0, 0, 0, 0],
               [1, 1, 1, 1, 0, 0, 0, 0],
               [1, 0, 1, 1, 1, 0, 0, 0],
               [1, 0, 0, 1, 1, 1, 0, 0],
               [1, 0, 0, 0, 1, 1, 1, 0],
               [1, 0, 0, 0, 0, 1, 1, 1],
               [1, 0, 0, 0, 0, 0, 1, 1]])
        """
        seq_len = _int("seq_len", seq_len, minimum=1)
        window = _int("window", window, minimum=0)
        if window == 0 or window % 2:
            raise ValueError(
                f"window: expected an even positive int (window // 2 keys on each side), "
                f"got {window}"
            )
        bs = _block_pair(block_size)
        glob = global_token_flags(global_tokens, seq_len)
        if glob.ndim == 1:
            return _longformer(seq_len, window // 2, _index_key(glob), bs)
        members = np.empty(glob.shape[:-1], dtype=object)
        for idx in np.ndindex(members.shape):
            members[idx] = _longformer(seq_len, window // 2, _index_key(glob[idx]), bs)
        return cls._stack(members)

    @classmethod
    def bigbird(cls, seq_len, *, block_size=64, window_blocks=3, global_blocks=1,
                random_blocks=3, seed=None):
        """BigBird ITC: global, band and random blocks (every block is full).

        * the first and last ``global_blocks`` blocks are global: their queries see every key
          block and every query block sees them;
        * a band of ``window_blocks`` (odd) blocks centred on the diagonal;
        * exactly ``random_blocks`` further key blocks per non-global query block, drawn
          without replacement from the blocks that are neither band nor global. When fewer
          candidates exist (short sequences) all of them are taken: the count is clamped.

        ``seed`` (an int) makes the pattern reproducible and cacheable; ``seed=None`` draws a
        fresh pattern on every call (keep the mask to reuse it, e.g. for the backward pass).
        The last block is shorter when ``seq_len`` is not a multiple of ``block_size``.

        Examples
        --------
        >>> import xattn
        >>> xattn.BlockMask.bigbird(640, block_size=64, random_blocks=2, seed=0)
        BlockMask(q_len=640, k_len=640, block_size=(64, 64), n_blocks=(10, 10),
                  nnz_blocks=74 (full 74, partial 0), density=0.74, rule='none')
        ##########
        ###...##.#
        ####.#..##
        #####...##
        #..###.###
        #..#####.#
        #..#####.#
        #..#.#####
        #....#####
        ##########
        """
        seq_len = _int("seq_len", seq_len, minimum=1)
        bs = _int("block_size", block_size, minimum=1)
        window_blocks = _int("window_blocks", window_blocks, minimum=1)
        if window_blocks % 2 == 0:
            raise ValueError(
                f"window_blocks: expected an odd int (a band centred on the diagonal), "
                f"got {window_blocks}"
            )
        global_blocks = _int("global_blocks", global_blocks, minimum=0)
        random_blocks = _int("random_blocks", random_blocks, minimum=0)
        args = (seq_len, bs, window_blocks, global_blocks, random_blocks)
        if seed is None:
            return _bigbird(*args, np.random.default_rng())
        seed = _int("seed", seed, minimum=0)
        return _bigbird_cached(*args, seed)

    @classmethod
    def from_dense(cls, mask, *, block_size=DEFAULT_BLOCK_SIZE):
        """BlockMask of a boolean ``(q_len, k_len)`` mask (True = may attend).

        Partial blocks keep their tiles (``RULE_DENSE``). Not cached (arrays are not hashable).

        Examples
        --------
        >>> import numpy as np, xattn
        >>> m = np.tril(np.ones((5, 7), bool), 2)
        >>> bm = xattn.BlockMask.from_dense(m, block_size=4)
        >>> bm.num_full_blocks, bm.num_partial_blocks, bool((bm.to_dense() == m).all())
        (2, 2, True)
        """
        if isinstance(mask, np.ndarray):  # np.asarray would drop a MaskedArray's mask
            _check_not_subclass("mask", mask)
        m = _host_array("mask", mask)
        if m.ndim != 2:
            raise ValueError(f"mask: expected a 2-D (q_len, k_len) array, got shape {m.shape}")
        if m.dtype != np.bool_:
            raise TypeError(f"mask: expected a boolean array (True = may attend), got {m.dtype}")
        if 0 in m.shape:
            raise ValueError(f"mask: expected a non-empty (q_len, k_len) array, got {m.shape}")
        bs = _block_pair(block_size)
        return _from_strips(m.shape[0], m.shape[1], bs, lambda q0, q1: m[q0:q1], "from_dense")

    @classmethod
    def from_mask_mod(cls, fn, q_len, k_len, *, block_size=DEFAULT_BLOCK_SIZE):
        """BlockMask of a predicate ``fn(q_idx, k_idx) -> bool array``.

        ``fn`` is called with broadcast integer index arrays (one block row of queries,
        ``(bq, 1)``, against all keys, ``(1, k_len)``), so memory stays O(bq * k_len); it must
        return booleans broadcastable to that shape. Indices are absolute (no bottom-right
        shift). Cached on ``(fn, q_len, k_len, block_size)``.

        Examples
        --------
        >>> import xattn
        >>> def dilated(q, k):
        ...     return (q - k) % 2 == 0
        >>> bm = xattn.BlockMask.from_mask_mod(dilated, 6, 6, block_size=3)
        >>> bm.to_dense().astype(int)[:3]
        array([[1, 0, 1, 0, 1, 0],
               [0, 1, 0, 1, 0, 1],
               [1, 0, 1, 0, 1, 0]])
        """
        if not callable(fn):
            raise TypeError(f"fn: expected a callable fn(q_idx, k_idx), got {type(fn).__name__}")
        q_len = _int("q_len", q_len, minimum=1)
        k_len = _int("k_len", k_len, minimum=1)
        bs = _block_pair(block_size)
        try:
            hash(fn)
        except TypeError:
            return _from_mask_mod(fn, q_len, k_len, bs)
        return _from_mask_mod_cached(fn, q_len, k_len, bs)


# --- builders (cached on hashable arguments) ------------------------------------------------


def _empty():
    return (np.zeros(0, np.int64), np.zeros(0, np.int64))


@_masking.cached_by_bytes(BUILD_CACHE_BYTES)
def _band(q_len, k_len, bs, causal, window):
    """Causal and/or window: the visible keys of each query block form one interval, the keys
    visible to every query of the block a sub-interval (rules from _masking)."""
    bq, bk = bs
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    vis_lo, vis_hi, full_lo, full_hi = (np.zeros(nq, np.int64) for _ in range(4))
    for i in range(nq):
        q0, q1 = i * bq, min((i + 1) * bq, q_len)
        lo, hi = _masking.key_range(q0, q1, sq=q_len, sk=k_len, causal=causal, window=window)
        # Keys seen by every query of the block: the first query's range meets the last's.
        _, first_hi = _masking.key_range(q0, q0 + 1, sq=q_len, sk=k_len, causal=causal,
                                         window=window)
        last_lo, _ = _masking.key_range(q1 - 1, q1, sq=q_len, sk=k_len, causal=causal,
                                        window=window)
        vis_lo[i], vis_hi[i] = lo // bk, -(-hi // bk) if hi > lo else lo // bk
        # Blocks lying wholly inside [last_lo, first_hi); the last key block may be short.
        f_lo = -(-last_lo // bk)
        f_hi = nk if first_hi >= k_len else first_hi // bk
        if f_hi <= f_lo or hi <= lo:
            f_lo = f_hi = vis_hi[i]
        full_lo[i], full_hi[i] = f_lo, f_hi
    full = _ranges(full_lo, full_hi)
    left = _ranges(vis_lo, full_lo)
    right = _ranges(full_hi, vis_hi)
    partial = (np.concatenate((left[0], right[0])), np.concatenate((left[1], right[1])))
    off = k_len - q_len
    if window is None:
        kind, data, desc = RULE_CAUSAL, {"offset": off}, "causal"
    else:
        left_w, right_w = window
        if causal:
            right_w = 0 if right_w is None else min(right_w, 0)
        data = {"offset": off, "left": -1 if left_w is None else left_w,
                "right": -1 if right_w is None else right_w}
        kind, desc = RULE_WINDOW, f"sliding_window({window}, causal={causal})"

    def predicate(q0, q1, k0, k1):
        return band_visibility(q0, q1, k0, k1, offset=off, causal=causal, window=window)

    if not causal and window is None:
        predicate = None
    return BlockMask(q_len, k_len, bs, full, partial, rule_kind=kind, rule_data=data,
                     predicate=predicate or (lambda *a: None), description=desc)


@_masking.cached_by_bytes(BUILD_CACHE_BYTES)
def _documents(cu, causal, bs):
    cu = np.asarray(cu, dtype=np.int64)
    total = int(cu[-1])
    bq, bk = bs
    nq = -(-total // bq)
    vis_lo, vis_hi, full_lo, full_hi = (np.zeros(nq, np.int64) for _ in range(4))
    for i in range(nq):
        q0, q1 = i * bq, min((i + 1) * bq, total)
        d0, d1 = document_ids(cu, q0, q0 + 1)[0], document_ids(cu, q1 - 1, q1)[0]
        lo, hi = int(cu[d0]), int(cu[d1 + 1])
        if causal:
            hi = q1
        vis_lo[i], vis_hi[i] = lo // bk, -(-hi // bk)
        f_lo = f_hi = vis_hi[i]
        if d0 == d1:  # one document: blocks wholly inside it (and below the diagonal)
            f_hi_key = min(hi, q0 + 1) if causal else hi
            a = -(-lo // bk)
            b = (f_hi_key // bk) if f_hi_key < total else -(-total // bk)
            if b > a:
                f_lo, f_hi = a, b
        full_lo[i], full_hi[i] = f_lo, f_hi
    full = _ranges(full_lo, full_hi)
    left, right = _ranges(vis_lo, full_lo), _ranges(full_hi, vis_hi)
    partial = (np.concatenate((left[0], right[0])), np.concatenate((left[1], right[1])))
    cu32 = _readonly(cu.astype(np.int32))

    def predicate(q0, q1, k0, k1):
        return document_visibility(cu32, q0, q1, k0, k1, causal=causal)

    return BlockMask(total, total, bs, full, partial, rule_kind=RULE_DOCUMENTS,
                     rule_data={"cu_seqlens": cu32, "causal": int(causal)},
                     predicate=predicate,
                     description=f"documents({len(cu) - 1} docs, causal={causal})")


def global_token_flags(global_tokens, seq_len, batch=None):
    """Boolean ``(S,)`` or ``(*batch, S)`` flags of Longformer global tokens (validated).

    With ``batch`` (the inputs' leading dims), a per-batch boolean array must match it.
    """
    g = _host_array("global_tokens", global_tokens)
    if g.dtype == np.bool_:
        if g.ndim == 0 or g.shape[-1] != seq_len or (
            batch is not None and g.ndim > 1 and g.shape[:-1] != tuple(batch)
        ):
            expect = f"(..., {seq_len})" if batch is None else \
                f"({seq_len},) or {(*batch, seq_len)}"
            raise ValueError(
                f"global_tokens: a boolean array must have shape {expect}, got {g.shape}"
            )
        if g.ndim > 1 and (g == g.reshape(-1, seq_len)[:1].reshape((1,) * (g.ndim - 1)
                                                              + (seq_len,))).all():
            g = g.reshape(-1, seq_len)[0]  # the same globals everywhere: one shared mask
        return g
    if g.size == 0:
        return np.zeros(seq_len, bool)
    if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(
            "global_tokens: expected a 1-D integer index array or a boolean (..., S) array, "
            f"got shape {g.shape} dtype {g.dtype}"
        )
    bad = (g < -seq_len) | (g >= seq_len)
    if bad.any():
        raise ValueError(
            f"global_tokens: index {int(g[bad][0])} is out of range for a sequence of length "
            f"{seq_len}"
        )
    flags = np.zeros(seq_len, bool)
    flags[g] = True
    return flags


def _index_key(flags):
    return tuple(np.flatnonzero(flags).tolist()), len(flags)


@_masking.cached_by_bytes(BUILD_CACHE_BYTES)
def _longformer(seq_len, half, key, bs):
    glob_idx, _ = key
    is_global = np.zeros(seq_len, bool)
    is_global[list(glob_idx)] = True
    is_global = _readonly(is_global)
    bq, bk = bs
    nq, nk = -(-seq_len // bq), -(-seq_len // bk)
    # Per block: does it hold any / only global positions, and the extent of its
    # non-global positions (a block of non-global rows R and columns C is full iff every
    # |i - j| <= half, i.e. max(C) - min(R) <= half and max(R) - min(C) <= half).
    pos = np.arange(seq_len)

    def extents(b):
        starts = np.arange(0, seq_len, b)
        any_g = np.logical_or.reduceat(is_global, starts)
        all_g = np.logical_and.reduceat(is_global, starts)
        lo = np.minimum.reduceat(np.where(is_global, seq_len, pos), starts)
        hi = np.maximum.reduceat(np.where(is_global, -1, pos), starts)
        return any_g, all_g, lo, hi

    q_any, q_all, q_lo, q_hi = extents(bq)
    k_any, k_all, k_lo, k_hi = extents(bk)
    global_cols = np.flatnonzero(k_any)
    full_rows, full_cols, part_rows, part_cols = [], [], [], []
    for i in range(nq):
        q0, q1 = i * bq, min((i + 1) * bq, seq_len)
        if q_any[i]:
            cols = np.arange(nk)
        else:
            lo, hi = max(q0 - half, 0), min(q1 - 1 + half + 1, seq_len)
            cols = np.union1d(np.arange(lo // bk, -(-hi // bk)), global_cols)
        full = q_all[i] | k_all[cols] | ((k_hi[cols] - q_lo[i] <= half)
                                         & (q_hi[i] - k_lo[cols] <= half))
        full_rows.append(np.full(int(full.sum()), i))
        full_cols.append(cols[full])
        part_rows.append(np.full(int((~full).sum()), i))
        part_cols.append(cols[~full])
    cat = np.concatenate

    def predicate(q0, q1, k0, k1):
        return global_visibility(is_global, half, q0, q1, k0, k1)

    return BlockMask(seq_len, seq_len, bs, (cat(full_rows), cat(full_cols)),
                     (cat(part_rows), cat(part_cols)), rule_kind=RULE_GLOBAL,
                     rule_data={"half_window": half, "is_global": is_global},
                     predicate=predicate,
                     description=f"longformer(window={2 * half}, {len(glob_idx)} global)")


@_masking.cached_by_bytes(BUILD_CACHE_BYTES)
def _bigbird_cached(seq_len, bs, window_blocks, global_blocks, random_blocks, seed):
    return _bigbird(seq_len, bs, window_blocks, global_blocks, random_blocks,
                    np.random.default_rng(seed))


def _bigbird(seq_len, bs, window_blocks, global_blocks, random_blocks, rng):
    nb = -(-seq_len // bs)
    half = window_blocks // 2
    glob = np.zeros(nb, bool)
    glob[:global_blocks] = True
    glob[max(nb - global_blocks, 0):] = True
    global_idx = np.flatnonzero(glob)
    rows, cols = [], []
    for i in range(nb):
        if glob[i]:
            c = np.arange(nb)
        else:
            band = np.arange(max(i - half, 0), min(i + half + 1, nb))
            taken = np.union1d(band, global_idx)
            n_cand = nb - len(taken)
            # Draw ranks among the candidates, then skip over the taken blocks (ascending) to
            # map rank -> block: O(random_blocks + taken) per row, never O(nb).
            picks = np.sort(rng.choice(n_cand, min(random_blocks, n_cand), replace=False))
            for t in taken:
                picks += picks >= t
            c = np.union1d(taken, picks)
        rows.append(np.full(len(c), i))
        cols.append(c)
    full = (np.concatenate(rows), np.concatenate(cols))
    return BlockMask(seq_len, seq_len, (bs, bs), full, _empty(), rule_kind=RULE_NONE,
                     description="bigbird")


def _from_strips(q_len, k_len, bs, strip, desc):
    """Classify blocks one query-block row at a time; keep the partial tiles."""
    bq, bk = bs
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    # A block larger than the mask holds only the mask: buffers and stored tiles are clamped to
    # it (a 5x5 mask with block_size=20000 must not allocate 20000**2 bytes). The block grid
    # and block_size stay as asked, so the mask combines with others of that block_size.
    tq, tk = min(bq, q_len), min(bk, k_len)
    cols_per_block = np.minimum(np.arange(1, nk + 1) * bk, k_len) - np.arange(nk) * bk
    full_rows, full_cols, part_rows, part_cols, tiles = [], [], [], [], []
    for i in range(nq):
        q0, q1 = i * bq, min((i + 1) * bq, q_len)
        m = np.zeros((tq, nk * tk), bool)
        m[:q1 - q0, :k_len] = strip(q0, q1)
        blocks = m.reshape(tq, nk, tk).transpose(1, 0, 2)  # (nk, tq, tk)
        counts = blocks.sum(axis=(1, 2))
        status = _classify(counts[None], np.array([q1 - q0]), cols_per_block)[0]
        f, p = np.flatnonzero(status == 1), np.flatnonzero(status == 2)
        full_rows.append(np.full(len(f), i))
        full_cols.append(f)
        part_rows.append(np.full(len(p), i))
        part_cols.append(p)
        tiles.append(blocks[p])
    cat = np.concatenate
    return BlockMask(q_len, k_len, bs, (cat(full_rows), cat(full_cols)),
                     (cat(part_rows), cat(part_cols)), rule_kind=RULE_DENSE,
                     tiles=cat(tiles) if tiles else np.zeros((0, tq, tk), bool),
                     description=desc)


def _from_mask_mod(fn, q_len, k_len, bs):
    kj = np.arange(k_len)[None, :]

    def strip(q0, q1):
        out = np.asarray(fn(np.arange(q0, q1)[:, None], kj))
        if out.dtype != np.bool_:
            raise TypeError(f"fn: expected a boolean result, got dtype {out.dtype}")
        return np.broadcast_to(out, (q1 - q0, k_len))

    return _from_strips(q_len, k_len, bs, strip, f"from_mask_mod({getattr(fn, '__name__', fn)})")


_from_mask_mod_cached = _masking.cached_by_bytes(BUILD_CACHE_BYTES)(_from_mask_mod)


@_masking.cached_by_bytes(BUILD_CACHE_BYTES)
def _combine_cached(a, b, op):
    nk = a.n_blocks[1]
    va = np.union1d(a._keys(full=True), a._keys(full=False))
    vb = np.union1d(b._keys(full=True), b._keys(full=False))
    if op == "&":
        vis, full = np.intersect1d(va, vb), np.intersect1d(a._keys(full=True),
                                                           b._keys(full=True))
    else:
        vis, full = np.union1d(va, vb), np.union1d(a._keys(full=True), b._keys(full=True))
    part = np.setdiff1d(vis, full)
    return BlockMask(a.q_len, a.k_len, a.block_size, (full // nk, full % nk),
                     (part // nk, part % nk), rule_kind=RULE_COMPOSITE,
                     predicate=_Combined(op, a, b),
                     description=f"({a._description} {op} {b._description})")
