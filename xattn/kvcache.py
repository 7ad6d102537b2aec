"""Inference: a key/value cache for autoregressive decoding, and attention over it.

:class:`KVCache` holds the keys and values of ``batch`` sequences as they grow, contiguous or
paged (a pool of fixed-size pages and a block table per sequence, as in vLLM and
flash-attn's ``flash_attn_with_kvcache``). :func:`decode_attention` attends from the ``T``
newest query tokens of each sequence to everything the cache holds for it, causal and
bottom-right aligned per sequence: it computes, for every sequence ``b``,
``flash_attention(q[b], K_b, V_b, causal=True, ...)`` with ``K_b``/``V_b`` the first
``cache.lengths[b]`` positions. MQA and GQA (``kv_heads < Hq``) shrink the cache and the bytes
read per generated token by ``Hq / kv_heads``.

Lengths and the block table live on the host (NumPy int32) for every namespace: they decide
what an append writes and where, and an append past the capacity must be refused before
anything is written.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _backends
from ._array import (
    _check_float,
    array_namespace,
    check_bool,
    check_float_dtype,
    check_positive_int,
    check_scalar,
    compute_dtype,
    is_cupy,
    normalize_window,
)

__all__ = ["KVCache", "decode_attention"]


def _namespace_name(xp) -> str:
    name = getattr(xp, "__name__", None)
    if name not in ("numpy", "cupy"):
        raise TypeError(f"xp: expected the numpy or cupy module, got {xp!r}")
    return name


class KVCache:
    """Keys and values of ``batch`` growing sequences, for :func:`decode_attention`.

    Parameters
    ----------
    batch, kv_heads, max_len, head_dim : int
        Sequences, key/value heads (``Hkv``: GQA/MQA caches hold fewer heads than the queries
        have), the capacity of each sequence in tokens, and the key head dim ``D``.
    dtype : dtype
        float16, bfloat16, float32 or float64; appended keys/values and the queries must have it.
    xp : module
        ``numpy`` (default) or ``cupy``: where the cache lives. CuPy caches are allocated on the
        current device; every array passed in must live there too.
    page_size : int, optional
        Paged layout: storage is a pool of ``num_pages`` pages of ``page_size`` tokens, and the
        block table maps position ``p`` of sequence ``b`` to page
        ``block_table[b, p // page_size]``. Pages are taken from the pool as sequences grow and
        returned by :meth:`reset`, so sequences of very different lengths share one pool.
        Default: contiguous, ``(batch, kv_heads, max_len, D)``.
    num_pages : int, optional
        Pool size of a paged cache; default ``batch * ceil(max_len / page_size)`` (every
        sequence can reach ``max_len``). A smaller pool holds more sequences than it could at
        full length; an append that needs a page when none is free raises.
    head_dim_v : int, optional
        Value head dim ``Dv`` (default ``D``).
    window : int, optional
        A ring buffer for a model whose attention window is fixed: a query at position ``p``
        sees keys ``p - window .. p``, so only the newest ``max_len`` tokens are kept and
        position ``p`` is stored in slot ``p % max_len``. Sequences then grow without bound
        (``lengths`` counts every token appended); :func:`decode_attention` uses this
        window and needs ``window + T <= max_len``. A paged ring needs ``max_len`` to be a
        multiple of ``page_size``.

    Attributes
    ----------
    k_cache, v_cache : arrays
        The storage (read them, do not write): contiguous ``(batch, kv_heads, max_len, D)``;
        paged ``(num_pages, kv_heads, page_size, D)`` (each page holds all kv heads, each head's
        ``page_size`` keys contiguous). Positions at or past a sequence's length hold stale or
        zero data that attention never reads.
    block_table : numpy.ndarray or None
        int32 ``(batch, max_pages)`` page indices of a paged cache (``-1``: not yet allocated),
        a copy; None for a contiguous cache.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> cache = xattn.KVCache(2, 4, 64, 16, dtype=np.float32)
    >>> rng = np.random.default_rng(0)
    >>> k, v = (rng.standard_normal((2, 4, 5, 16), dtype=np.float32) for _ in range(2))
    >>> cache.append(k, v, lengths=[5, 3])        # a ragged prefill: 5 and 3 real tokens
    >>> cache.lengths
    array([5, 3], dtype=int32)
    >>> cache.nbytes                              # 2 (K and V) * 2 * 4 * 64 * 16 * 4 bytes
    65536
    >>> keys, values = cache.sequence(1)
    >>> keys.shape
    (4, 3, 16)
    """

    def __init__(self, batch, kv_heads, max_len, head_dim, *, dtype, xp=np, page_size=None,
                 num_pages=None, head_dim_v=None, window=None):
        self.batch = check_positive_int("batch", batch)
        self.kv_heads = check_positive_int("kv_heads", kv_heads)
        self.max_len = check_positive_int("max_len", max_len)
        self.head_dim = check_positive_int("head_dim", head_dim)
        hv = check_positive_int("head_dim_v", head_dim_v, allow_none=True)
        self.head_dim_v = self.head_dim if hv is None else hv
        self.dtype = dt = check_float_dtype(dtype)
        self._xp_name = _namespace_name(xp)
        self.xp = xp
        self.page_size = check_positive_int("page_size", page_size, allow_none=True)
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, numbers.Integral):
                raise TypeError(f"window: expected a non-negative int or None, got {window!r}")
            if not 0 <= window < self.max_len:
                raise ValueError(f"window: a ring buffer of max_len={self.max_len} keeps windows "
                                 f"of at most {self.max_len - 1} keys, got {window}")
            if self.page_size is not None and self.max_len % self.page_size:
                raise ValueError(f"window: a paged ring buffer needs max_len ({self.max_len}) "
                                 f"to be a multiple of page_size ({self.page_size})")
        self.window = None if window is None else int(window)
        self._lengths = np.zeros(self.batch, dtype=np.int32)
        # Bumped by every change of lengths or block table: the device copies of those few
        # int32s (_device_meta) are made once per change, not once per decode call.
        self._changes = 0
        self._meta = None
        # decode_attention's host work, cached (see _launch_plans and _call_key): validated
        # problems per call signature (the cache's shape never changes), and the launchers'
        # plans for the current state (dropped at every change).
        self._calls: dict = {}
        self._plans: dict = {}
        self._plans_at = -1
        shape_k = (self.kv_heads, self.head_dim)
        shape_v = (self.kv_heads, self.head_dim_v)
        if self.page_size is None:
            if num_pages is not None:
                raise ValueError("num_pages: only meaningful with page_size (a paged cache)")
            self.num_pages = None
            self._block_table = None
            lead = (self.batch, self.kv_heads, self.max_len)
            self._k = xp.zeros(lead + (self.head_dim,), dtype=dt)
            self._v = xp.zeros(lead + (self.head_dim_v,), dtype=dt)
        else:
            per_seq = -(-self.max_len // self.page_size)
            default = self.batch * per_seq
            self.num_pages = check_positive_int("num_pages", default if num_pages is None
                                                else num_pages)
            self._block_table = np.full((self.batch, per_seq), -1, dtype=np.int32)
            # Pages are handed out lowest index first: a fresh cache fills its pool in order.
            self._free = list(range(self.num_pages - 1, -1, -1))
            self._k = xp.zeros((self.num_pages, shape_k[0], self.page_size, shape_k[1]), dtype=dt)
            self._v = xp.zeros((self.num_pages, shape_v[0], self.page_size, shape_v[1]), dtype=dt)
        self._array_type = type(self._k)

    # -- read-only views of the state ---------------------------------------------------------
    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def lengths(self) -> np.ndarray:
        """Tokens appended per sequence, int32 ``(batch,)`` (a NumPy copy); a ring buffer holds
        the newest ``max_len`` of them."""
        return self._lengths.copy()

    @property
    def k_cache(self):
        return self._k

    @property
    def v_cache(self):
        return self._v

    @property
    def block_table(self):
        return None if self._block_table is None else self._block_table.copy()

    @property
    def free_pages(self) -> int | None:
        """Pages left in the pool of a paged cache (None when contiguous)."""
        return len(self._free) if self.paged else None

    @property
    def nbytes(self) -> int:
        """Bytes of key and value storage allocated (the capacity, not the tokens held)."""
        return int(self._k.nbytes + self._v.nbytes)

    def __repr__(self):
        layout = (f"paged, page_size={self.page_size}, num_pages={self.num_pages}"
                  if self.paged else "contiguous")
        if self.window is not None:
            layout += f", ring buffer for window={self.window}"
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, max_len={self.max_len}, "
                f"head_dim={self.head_dim}, head_dim_v={self.head_dim_v}, dtype={self.dtype}, "
                f"xp={self._xp_name}, {layout}, lengths={self._lengths.tolist()})")

    # -- the storage as the kernels see it ----------------------------------------------------
    def _pool(self, upto=None):
        """``(k_pages, v_pages, block_table, page_size)``; a contiguous cache is one page per
        sequence (page ``b`` of length ``max_len``), so one kernel reads both layouts.

        A ring buffer's table is unrolled over positions ``[0, upto)`` (default: the longest
        sequence): logical page ``u`` is page ``u % pages_per_sequence`` of the ring, so the
        kernels address positions past ``max_len`` without knowing about the ring.
        """
        ps = self.page_size if self.paged else self.max_len
        table = (self._block_table if self.paged
                 else np.arange(self.batch, dtype=np.int32)[:, None])
        if self.window is not None:
            upto = int(self._lengths.max(initial=0)) if upto is None else upto
            wraps = np.arange(max(1, -(-upto // ps))) % table.shape[1]
            table = np.ascontiguousarray(table[:, wraps])
        return self._k, self._v, table, ps

    def _device_meta(self):
        """``(k_pages, v_pages, table, lengths, page_size)`` as :meth:`_pool`, with ``table`` and
        ``lengths`` int32 arrays in the cache's namespace: copied explicitly, once per change of
        the cache (a few int32s, not keys or values, in one transfer: ``lengths`` and ``table``
        are views of one array), so repeated decode calls on an unchanged cache launch no
        host-to-device transfer."""
        if self._meta is None or self._meta[0] != self._changes:
            _, _, table, ps = self._pool()
            xp = self.xp
            host = np.concatenate([self._lengths, table.ravel()]).astype(np.int32, copy=False)
            # xp.array copies (asarray would alias the host state on NumPy).
            both = xp.array(host, dtype=xp.int32)
            self._meta = (self._changes, both[self.batch:].reshape(table.shape),
                          both[:self.batch], ps)
        _, table, lengths, ps = self._meta
        return self._k, self._v, table, lengths, ps

    def _launch_plans(self) -> dict:
        """A dict for a launcher's plans of the cache's current state (split count, grid,
        launch arguments), emptied by every change (append, reset): a plan kept there is
        reused only while lengths and block table stay as they were when it was made."""
        if self._plans_at != self._changes or len(self._plans) > 64:
            self._plans.clear()
            self._plans_at = self._changes
        return self._plans

    def _segments(self, b, start, stop):
        """``(page, offset, position, count)`` runs covering positions ``[start, stop)`` of
        sequence ``b``, each within one page."""
        _, _, table, ps = self._pool(upto=stop)
        p = start
        while p < stop:
            n = min(stop, (p // ps + 1) * ps) - p
            yield int(table[b, p // ps]), p % ps, p, n
            p += n

    def sequence(self, index):
        """Keys and values held for sequence ``index``: ``(kv_heads, length, D)`` and
        ``(kv_heads, length, Dv)``; views of a contiguous cache, gathered copies of a paged one.
        """
        b = self._index(index, "index")
        n = int(self._lengths[b])
        return self._gather(b, self._first_held(n), n)

    def _first_held(self, length):
        """The oldest position still stored (a ring buffer keeps the newest max_len)."""
        return 0 if self.window is None else max(0, length - self.max_len)

    def _gather(self, b, start, stop):
        """Positions ``[start, stop)`` of sequence ``b`` as ``(kv_heads, n, D)`` arrays."""
        if not self.paged and self.window is None:
            return self._k[b, :, start:stop], self._v[b, :, start:stop]
        xp, n = self.xp, stop - start
        k = xp.empty((self.kv_heads, n, self.head_dim), dtype=self.dtype)
        v = xp.empty((self.kv_heads, n, self.head_dim_v), dtype=self.dtype)
        for page, off, pos, cnt in self._segments(b, start, stop):
            k[:, pos - start:pos - start + cnt] = self._k[page, :, off:off + cnt]
            v[:, pos - start:pos - start + cnt] = self._v[page, :, off:off + cnt]
        return k, v

    def _index(self, index, name):
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"{name}: expected an int, got {type(index).__name__}")
        if not -self.batch <= index < self.batch:
            raise IndexError(f"{name}: {index} is out of range for batch {self.batch}")
        return int(index) % self.batch

    def _check_namespace(self, name, x):
        xp = array_namespace(x, names=(name,))
        if xp.__name__ != self._xp_name:
            raise TypeError(
                f"{name}: the cache lives in {self._xp_name} but {name} is a {xp.__name__} "
                "array; xattn never copies between host and device"
            )
        if is_cupy(x) and x.device.id != self._k.device.id:
            raise TypeError(
                f"{name}: on CUDA device {x.device.id}, the cache on device {self._k.device.id}"
            )

    def _check_array(self, name, x, shape):
        self._check_namespace(name, x)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
        if np.dtype(x.dtype) != self.dtype:
            raise TypeError(f"{name}: expected the cache's dtype {self.dtype}, got {x.dtype}")

    # -- mutation -----------------------------------------------------------------------------
    def append(self, k, v, *, lengths=None, rotary=None, rotary_interleaved=False):
        """Store new keys and values after each sequence's current length.

        Parameters
        ----------
        k, v : arrays ``(batch, kv_heads, T, D)`` and ``(batch, kv_heads, T, Dv)``
            In the cache's namespace, device and dtype; never modified.
        lengths : sequence of int or integer NumPy array ``(batch,)``, optional
            How many of the ``T`` tokens are real for each sequence (a ragged prefill: the
            first ``lengths[b]`` are stored, the rest ignored). Default: all ``T``.
        rotary : ``(cos, sin)``, optional
            Rotary tables indexed by absolute position, ``(P, rotary_dim // 2)`` as from
            :func:`xattn.rotary_cos_sin` ``(P, rotary_dim)``; new key ``t`` of sequence ``b``
            is rotated at position ``lengths_before[b] + t`` (:func:`xattn.apply_rotary`)
            before it is stored. Values are stored as given.
        rotary_interleaved : bool
            GPT-J channel pairs instead of NeoX ``rotate_half`` (as in :func:`apply_rotary`).

        Raises
        ------
        ValueError
            A sequence would pass ``max_len``, a paged pool has too few free pages, or shapes
            disagree. Every check runs before anything is written: a failed append leaves the
            cache as it was.
        TypeError
            Wrong namespace, device or dtype.
        """
        for name, x in (("k", k), ("v", v)):
            if x is None:
                raise TypeError(f"{name}: expected an array, got None")
            self._check_namespace(name, x)
        if k.ndim != 4:
            raise ValueError(
                f"k: expected 4 dims (batch, kv_heads, T, head_dim), got shape {k.shape}"
            )
        T = int(k.shape[2])
        self._check_array("k", k, (self.batch, self.kv_heads, T, self.head_dim))
        self._check_array("v", v, (self.batch, self.kv_heads, T, self.head_dim_v))
        counts = self._counts(lengths, T)
        new = self._lengths.astype(np.int64) + counts
        if self.window is not None:  # a ring: lengths grow without bound
            if T > self.max_len:
                raise ValueError(f"append: {T} tokens at once exceed the ring buffer's max_len="
                                 f"{self.max_len}; nothing was written")
            over = np.nonzero(new > np.iinfo(np.int32).max)[0]
        else:
            over = np.nonzero(new > self.max_len)[0]
        if over.size:
            b = int(over[0])
            raise ValueError(
                f"append: sequence {b} holds {int(self._lengths[b])} tokens and would grow by "
                f"{int(counts[b])} to {int(new[b])}, past max_len={self.max_len} "
                f"({over.size} sequence(s) affected); nothing was written"
            )
        interleaved = check_bool("rotary_interleaved", rotary_interleaved)
        tables = None if rotary is None else self._rotary_tables(rotary, int(new.max()))
        pages = self._plan_pages(new) if self.paged else {}
        # Every check has passed: from here on nothing raises for bad input.
        from .positional import apply_rotary

        for b in range(self.batch):
            n = int(counts[b])
            if n == 0:
                continue
            start = int(self._lengths[b])
            kb, vb = k[b, :, :n], v[b, :, :n]
            if tables is not None:
                cos, sin = tables
                kb = apply_rotary(kb, cos[start:start + n], sin[start:start + n],
                                  interleaved=interleaved)
            for idx, page in pages.get(b, ()):
                self._block_table[b, idx] = page
            if not self.paged and self.window is None:
                self._k[b, :, start:start + n] = kb
                self._v[b, :, start:start + n] = vb
                continue
            for page, off, pos, cnt in self._segments(b, start, start + n):
                src = slice(pos - start, pos - start + cnt)
                self._k[page, :, off:off + cnt] = kb[:, src]
                self._v[page, :, off:off + cnt] = vb[:, src]
        self._lengths[:] = new
        self._changes += 1

    def _counts(self, lengths, T):
        if lengths is None:
            return np.full(self.batch, T, dtype=np.int64)
        if is_cupy(lengths):
            raise TypeError(
                "lengths: expected host integers (a list or NumPy array); the cache keeps its "
                "lengths on the host, and reading a CuPy array would be a hidden device copy"
            )
        arr = np.asarray(lengths)
        if arr.dtype == np.bool_ or not (arr.dtype.kind in "iu" or arr.size == 0):
            raise TypeError(f"lengths: expected integers, got {arr.dtype}")
        if arr.shape != (self.batch,):
            raise ValueError(f"lengths: expected shape ({self.batch},), got {arr.shape}")
        if (arr < 0).any() or (arr > T).any():
            raise ValueError(f"lengths: expected values in [0, {T}] (T = k.shape[2]), got "
                             f"{arr.tolist()}")
        return arr.astype(np.int64)

    def _rotary_tables(self, rotary, needed):
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise TypeError(f"rotary: expected a (cos, sin) pair, got {type(rotary).__name__}")
        cos, sin = rotary
        for name, x in (("rotary cos", cos), ("rotary sin", sin)):
            if x is None or not hasattr(x, "shape"):
                raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
            xp = array_namespace(x, names=(name,))
            if xp.__name__ != self._xp_name:
                raise TypeError(f"{name}: a {xp.__name__} array for a {self._xp_name} cache; "
                                "xattn never copies between host and device")
            _check_float(name, x)
        if cos.shape != sin.shape or cos.ndim != 2:
            raise ValueError(f"rotary: expected cos and sin of one shape (positions, "
                             f"rotary_dim // 2), got {cos.shape} and {sin.shape}")
        if 2 * cos.shape[1] > self.head_dim:
            raise ValueError(f"rotary: rotary_dim 2*{cos.shape[1]} exceeds head_dim "
                             f"{self.head_dim}")
        if cos.shape[0] < needed:
            raise ValueError(f"rotary: the tables cover positions [0, {cos.shape[0]}), the "
                             f"append reaches position {needed - 1}")
        return cos, sin

    def _plan_pages(self, new):
        """``{b: [(table index, page)]}`` for the pages this append needs; raises if the pool
        cannot supply them (before anything is written)."""
        ps = self.page_size
        need = []
        cap = self.max_len if self.window is not None else None
        for b in range(self.batch):
            old_n, new_n = int(self._lengths[b]), int(new[b])
            if cap is not None:  # a ring takes pages until it is full, then reuses them
                old_n, new_n = min(old_n, cap), min(new_n, cap)
            have = -(-old_n // ps)
            want = -(-new_n // ps)
            need.extend((b, idx) for idx in range(have, want))
        if len(need) > len(self._free):
            raise ValueError(
                f"append: needs {len(need)} new pages of {ps} tokens, the pool has "
                f"{len(self._free)} free of num_pages={self.num_pages}; reset finished "
                "sequences or build the cache with a larger num_pages; nothing was written"
            )
        plan = {}
        for b, idx in need:
            plan.setdefault(b, []).append((idx, self._free.pop()))
        return plan

    def reset(self, batch_index=None):
        """Empty sequences (all by default; an int or a sequence of ints otherwise).

        Their lengths become 0 and a paged cache returns their pages to the pool. The storage
        is not cleared: positions past a length are never read.
        """
        if batch_index is None:
            rows = range(self.batch)
        elif isinstance(batch_index, numbers.Integral) and not isinstance(batch_index, bool):
            rows = [self._index(batch_index, "batch_index")]
        else:
            rows = sorted({self._index(i, "batch_index") for i in batch_index})
        for b in rows:
            if self.paged:
                used = self._block_table[b][self._block_table[b] >= 0]
                self._free.extend(int(p) for p in used[::-1])
                self._block_table[b] = -1
            self._lengths[b] = 0
        self._changes += 1


@dataclass(frozen=True)
class DecodeProblem:
    """One decode_attention call: shapes and options, for the backend table."""

    xp: Any
    batch: int
    hq: int
    hkv: int
    sq: int  # T, the new query tokens per sequence
    sk: int  # the cache's max_len (lengths vary per sequence)
    d: int
    dv: int
    dtype: np.dtype
    cdtype: np.dtype
    scale: float
    window: tuple | None
    softcap: float | None
    has_alibi: bool
    paged: bool
    page_size: int

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def causal(self) -> bool:
        return True


def _validate_decode(q, cache, window, alibi_slopes, softcap, scale):
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected an xattn.KVCache, got {type(cache).__name__}")
    if q is None or not hasattr(q, "shape"):
        raise TypeError(f"q: expected an array, got {type(q).__name__}")
    xp = array_namespace(q, alibi_slopes, names=("q", "alibi_slopes"))
    if xp.__name__ != cache._xp_name:
        raise TypeError(
            f"q: a {xp.__name__} array, but the cache lives in {cache._xp_name}; xattn never "
            "copies between host and device"
        )
    if is_cupy(q) and q.device.id != cache.k_cache.device.id:
        raise TypeError(f"q: on CUDA device {q.device.id}, the cache on device "
                        f"{cache.k_cache.device.id}")
    if q.ndim != 4:
        raise ValueError(f"q: expected 4 dims (batch, Hq, T, head_dim), got shape {q.shape}")
    B, hq, T, d = (int(s) for s in q.shape)
    if B != cache.batch:
        raise ValueError(f"q: expected batch {cache.batch} like the cache, got shape {q.shape}")
    if d != cache.head_dim:
        raise ValueError(f"q: expected head_dim {cache.head_dim} like the cache, got shape "
                         f"{q.shape}")
    if hq % cache.kv_heads:
        raise ValueError(f"q heads ({hq}) must be a multiple of the cache's kv_heads "
                         f"({cache.kv_heads}) for GQA/MQA; got q {q.shape}")
    if T < 1:
        raise ValueError(f"q: expected at least one query token, got shape {q.shape}")
    if np.dtype(q.dtype) != cache.dtype:
        raise TypeError(f"q: expected the cache's dtype {cache.dtype}, got {q.dtype}")
    scale_f = 1.0 / math.sqrt(d) if scale is None else check_scalar("scale", scale)
    softcap = check_scalar("softcap", softcap)
    window = normalize_window(window)
    if cache.window is not None:
        if window is None:
            window = (cache.window, None)
        if window[0] is None or window[0] > cache.window:
            raise ValueError(f"window: the cache is a ring buffer for window={cache.window} and "
                             f"holds no older keys; got window={window}")
        if window[0] + T > cache.max_len:
            raise ValueError(f"q: {T} query tokens with a window of {window[0]} keys need "
                             f"{window[0] + T} positions, the ring buffer keeps "
                             f"max_len={cache.max_len}")
    if alibi_slopes is not None:
        _check_float("alibi_slopes", alibi_slopes)
        if alibi_slopes.shape not in ((hq,), (B, hq)):
            raise ValueError(f"alibi_slopes: expected shape ({hq},) or {(B, hq)}, got "
                             f"{alibi_slopes.shape}")
    return DecodeProblem(
        xp=xp, batch=B, hq=hq, hkv=cache.kv_heads, sq=T, sk=cache.max_len, d=d,
        dv=cache.head_dim_v, dtype=cache.dtype, cdtype=compute_dtype(cache.dtype),
        scale=scale_f, window=window, softcap=softcap, has_alibi=alibi_slopes is not None,
        paged=cache.paged, page_size=cache.page_size or cache.max_len,
    )


def _rotate_queries(q, cache, rotary, interleaved):
    """q rotated at each sequence's positions ``length - T + t`` (a new array)."""
    from .positional import apply_rotary

    cos, sin = cache._rotary_tables(rotary, int(cache._lengths.max(initial=0)))
    xp = cache.xp
    T = q.shape[2]
    out = xp.empty_like(q)
    for b in range(q.shape[0]):
        n = int(cache._lengths[b])
        # Query t of sequence b sits at position n - T + t; positions below 0 see no key
        # (their rows come out 0), so any table row will do for them.
        pos = np.clip(np.arange(n - T, n), 0, None)
        if xp.__name__ == "cupy":
            pos = xp.asarray(pos)
        out[b] = apply_rotary(q[b], cos[pos], sin[pos], interleaved=interleaved)
    return out


def decode_attention(q, cache, /, *, window=None, alibi_slopes=None, softcap=None, scale=None,
                     rotary=None, rotary_interleaved=False, return_lse=False, backend="auto"):
    """Attention of the newest tokens to a :class:`KVCache`: one step of autoregressive decoding.

    For each sequence ``b`` with ``L = cache.lengths[b]`` (the new tokens already appended),
    the ``T`` queries ``q[b]`` sit at positions ``L - T .. L - 1`` and the result equals
    ``flash_attention(q[b], K_b, V_b, causal=True, ...)`` on the cache's first ``L``
    positions (bottom-right causal; a query at a negative position, ``L < T``, sees nothing:
    output 0, ``lse = -inf``).

    Parameters
    ----------
    q : array ``(batch, Hq, T, D)``
        The cache's namespace, device and dtype; ``Hq`` a multiple of ``cache.kv_heads``
        (query head ``h`` reads kv head ``h // (Hq // kv_heads)``). ``T`` is 1 for plain
        decoding and up to ~16 for speculative decoding; the kernels are built for small ``T``
        (use :func:`flash_attention` for long prompt chunks).
    cache : KVCache
    window : ``(left, right)``, optional
        Sliding window as in :func:`flash_attention`: query at position ``p`` sees keys
        ``p - left .. p`` (``right`` adds nothing under the causal rule). A ring-buffer cache
        (``KVCache(window=W)``) defaults to ``(W, None)`` and refuses a wider window.
    alibi_slopes : array ``(Hq,)`` or ``(batch, Hq)``, optional
        ALiBi bias ``-slope * (p - j)``, in the kernel.
    softcap, scale
        As in :func:`flash_attention` (default scale ``1/sqrt(D)``).
    rotary : ``(cos, sin)``, optional
        Rotary tables indexed by absolute position (as for :meth:`KVCache.append`): q is
        rotated at its positions before attending. Keys are rotated when appended.
    rotary_interleaved : bool
        GPT-J channel pairs instead of NeoX ``rotate_half``.
    return_lse : bool
        Also return the log-sum-exp ``(batch, Hq, T)`` (float32; float64 for float64).
    backend : str
        ``"auto"``, or ``"numba"`` (the CPU split-KV kernel), ``"numpy"`` (CPU array code)
        or ``"generic"`` (the same array code on CuPy); every dtype on each.
        ``"cupy.decode"`` names the CUDA split-KV kernel (float16/bfloat16, ``D = Dv`` in 64
        or 128), which ``"auto"`` takes on CuPy where it applies (see :doc:`/inference`).

    Returns
    -------
    out : array ``(batch, Hq, T, Dv)`` in the cache's dtype, and ``lse`` with ``return_lse``.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> B, Hq, Hkv, D = 1, 8, 2, 32
    >>> cache = xattn.KVCache(B, Hkv, 128, D, dtype=np.float32)
    >>> k, v = (rng.standard_normal((B, Hkv, 50, D), dtype=np.float32) for _ in range(2))
    >>> cache.append(k, v)                                      # prefill 50 tokens
    >>> k1, v1 = (rng.standard_normal((B, Hkv, 1, D), dtype=np.float32) for _ in range(2))
    >>> cache.append(k1, v1)                                    # the new token's key/value
    >>> q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32)
    >>> out = xattn.decode_attention(q, cache)
    >>> K, V = cache.sequence(0)
    >>> ref = xattn.flash_attention(q[0], K, V, causal=True)
    >>> out.shape, bool(np.allclose(out[0], ref, atol=1e-5))
    ((1, 8, 1, 32), True)
    """
    key = _call_key(q, cache, window, alibi_slopes, softcap, scale, backend)
    hit = None if key is None else cache._calls.get(key)
    if hit is None:
        prob = _validate_decode(q, cache, window, alibi_slopes, softcap, scale)
        impl = _backends.select(prob, {}, backend, op="decode")
        if key is not None:
            if len(cache._calls) > 64:
                cache._calls.clear()
            cache._calls[key] = (prob, impl)
    else:
        prob, impl = hit
    return_lse = check_bool("return_lse", return_lse)
    interleaved = check_bool("rotary_interleaved", rotary_interleaved)
    if rotary is not None:
        q = _rotate_queries(q, cache, rotary, interleaved)
    if getattr(impl, "DECODE_LSE_OPTIONAL", False):
        out, lse = impl.decode(prob, q, cache, alibi_slopes=alibi_slopes, need_lse=return_lse)
    else:
        out, lse = impl.decode(prob, q, cache, alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


_PLAIN_NUMBERS = (int, float)


def _call_key(q, cache, window, alibi_slopes, softcap, scale, backend):
    """A key under which this call's validated problem and table choice may be reused, or None
    (validate in full).

    Everything the validation and the choice read is in it: the exact array types (the cache's
    own, so the namespace checks hold), q's shape, dtype and device, the options by type and
    value (plain ints, floats, None and tuples of them only: anything else, including bools
    and NumPy scalars, is validated every time), ALiBi's shape, dtype and device, the backend
    name and ``XATTN_DISABLE``. The cache's own shape and options never change after
    construction. With debug logging on, every call goes through the table (it logs the
    choice)."""
    if type(cache) is not KVCache or type(q) is not cache._array_type:
        return None
    if type(backend) is not str or _backends._log.isEnabledFor(10):  # logging.DEBUG
        return None
    for x in (softcap, scale):
        if x is not None and type(x) not in _PLAIN_NUMBERS:
            return None
    if window is not None:
        if type(window) is not tuple or len(window) != 2:
            return None
        for w in window:
            if w is not None and type(w) is not int:
                return None
    dev = q.device.id if cache._xp_name == "cupy" else None
    if alibi_slopes is None:
        ali = None
    elif type(alibi_slopes) is cache._array_type:
        ali = (alibi_slopes.shape, alibi_slopes.dtype,
               alibi_slopes.device.id if dev is not None else None)
    else:
        return None
    return (q.shape, q.dtype, dev, window, type(softcap), softcap, type(scale), scale, ali,
            backend, os.environ.get("XATTN_DISABLE", ""))
