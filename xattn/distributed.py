"""Ring attention: exact attention over a sequence split across processes (MPI or NCCL).

Each rank holds a slice of the sequence's queries, keys and values. Key/value blocks travel
between the ranks while every rank computes its queries against the block it holds, with
:func:`xattn.flash_attention`; the partial results are merged through their log-sum-exp. The
transfer of the next block is started before the computation on the current one, so the two
overlap where the transport makes progress on its own (NCCL, MPI with eager messages or an
asynchronous progress thread).

Layouts of a sequence of ``S`` tokens over ``P`` ranks (``"contiguous"``: rank ``r`` holds
``[r S/P, (r+1) S/P)``; ``"zigzag"``: rank ``r`` holds chunks ``r`` and ``2P-1-r`` of ``2P``
equal chunks, which gives every rank the same causal work)::

    contiguous, P=4:  | r0 | r1 | r2 | r3 |
    zigzag,     P=4:  |r0|r1|r2|r3|r3|r2|r1|r0|

Masking uses global positions: query ``I`` sees key ``J`` under the rules of
:mod:`xattn._masking` with ``Sq == Sk``. Each (query chunk, key chunk) pair is handed to
``flash_attention`` as an ordinary problem whose bottom-right rules equal the global ones (see
:func:`_pair_problem`); no rule is re-implemented here.

Neither mpi4py nor CuPy is imported by ``import xattn.distributed``.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache

import numpy as np

from . import _masking
from ._array import check_same_shape, is_cupy, normalize_window, validate_attention
from ._transport import (
    DEFAULT_TIMEOUT,
    NcclComm,
    RingError,
    RingTimeoutError,
    exchange_all,
    transport_for,
)
from .flash import flash_attention, flash_attention_backward

__all__ = [
    "NcclComm",
    "RingError",
    "RingTimeoutError",
    "ring_attention",
    "merge_attention",
    "ring_attention_backward",
    "shard",
    "unshard",
]

LAYOUTS = ("contiguous", "zigzag")

# MPI tags of the message streams (NCCL ignores them and matches by order).
_TAG_CHECK, _TAG_GATHER, _TAG_DONE = 1, 2, 3
_TAG_K, _TAG_V, _TAG_DK, _TAG_DV, _TAG_HOME_K, _TAG_HOME_V = 10, 11, 12, 13, 14, 15
_TAG_PASS_STRIDE = 100  # tags of the second ring pass are shifted by this
_FINGERPRINT_BYTES = 2048


# ------------------------------------------------------------------------------------------
# Layout


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _chunk_ids(layout, rank, size) -> tuple:
    """Global chunk indices held by ``rank``, in local order."""
    return (rank,) if layout == "contiguous" else (rank, 2 * size - 1 - rank)


def _rank_size(comm):
    if isinstance(comm, NcclComm):
        return comm.rank, comm.size
    if type(comm).__module__.split(".")[0] == "mpi4py":
        return comm.Get_rank(), comm.Get_size()
    transport_for(comm, DEFAULT_TIMEOUT)  # raises the TypeError naming what comm must be
    raise AssertionError("unreachable")


def _seq_axis(x, axis):
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: {axis} is out of range for an array of shape {x.shape}")
    return axis % x.ndim


def _take(x, axis, start, stop):
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def shard(x, comm, /, *, layout="contiguous", axis=-2):
    """This rank's part of a whole sequence ``x`` (a copy), split as ``layout`` says.

    Parameters
    ----------
    x : array
        The whole sequence, identical on every rank; the sequence runs along ``axis``
        (``-2`` for ``(..., heads, seq, head_dim)`` arrays, ``-1`` for an lse).
    comm : mpi4py communicator or NcclComm
        Only its rank and size are used; nothing is sent.
    layout : {"contiguous", "zigzag"}
        ``"zigzag"`` needs a length divisible by ``2 * size``, ``"contiguous"`` by ``size``.

    Examples
    --------
    >>> import numpy as np
    >>> from xattn.distributed import shard
    >>> class Comm:   # a stand-in for mpi4py.MPI.COMM_WORLD on rank 1 of 2
    ...     __module__ = "mpi4py.MPI"
    ...     def Get_rank(self): return 1
    ...     def Get_size(self): return 2
    >>> shard(np.arange(8.0)[:, None], Comm(), layout="zigzag")[:, 0]
    array([2., 3., 4., 5.])
    """
    _check_layout(layout)
    rank, size = _rank_size(comm)
    ax = _seq_axis(x, axis)
    ids = _chunk_ids(layout, rank, size)
    n = size * len(ids)
    s = x.shape[ax]
    if s % n:
        raise ValueError(
            f"x: sequence length {s} (axis {axis} of shape {x.shape}) must be divisible by "
            f"{n} for layout={layout!r} over {size} ranks"
        )
    c = s // n
    xp = _namespace(x)
    return xp.concatenate([_take(x, ax, i * c, (i + 1) * c) for i in ids], axis=ax)


def unshard(x_local, comm, /, *, layout="contiguous", axis=-2, timeout=None):
    """The whole sequence on every rank, gathered from each rank's ``x_local`` (collective).

    The inverse of :func:`shard`: every rank must call it with shards of the same shape.
    """
    _check_layout(layout)
    transport = transport_for(comm, _timeout(timeout))
    ax = _seq_axis(x_local, axis)
    xp = _namespace(x_local)
    ids_local = _chunk_ids(layout, transport.rank, transport.size)
    if x_local.shape[ax] % len(ids_local):
        raise ValueError(
            f"x_local: length {x_local.shape[ax]} along axis {axis} must be even for zigzag"
        )
    parts = exchange_all(transport, xp.ascontiguousarray(x_local), _TAG_GATHER, "unshard")
    c = x_local.shape[ax] // len(ids_local)
    chunks = {}
    for r, part in enumerate(parts):
        for a, cid in enumerate(_chunk_ids(layout, r, transport.size)):
            chunks[cid] = _take(part, ax, a * c, (a + 1) * c)
    return xp.concatenate([chunks[i] for i in sorted(chunks)], axis=ax)


def _namespace(x):
    if is_cupy(x):
        import cupy

        return cupy
    if not isinstance(x, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray or cupy.ndarray, got {type(x).__qualname__}")
    return np


def _timeout(timeout):
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    return float(timeout)


# ------------------------------------------------------------------------------------------
# One (query chunk, key chunk) pair as a flash_attention problem


@lru_cache(maxsize=1024)
def _pair_problem(cq, ck, c, causal, window):
    """How flash_attention computes global query chunk ``cq`` against key chunk ``ck``.

    Chunks hold ``c`` tokens; chunk ``x`` covers global positions ``[x c, (x+1) c)``. Returns
    None when no (query, key) pair is visible, else ``(qs, ks, causal, window)``: slices of
    the two chunks and flash options whose bottom-right rules on the sliced problem equal the
    global rules. The visibility tests themselves are :mod:`xattn._masking`'s.

    Off the diagonal only a window can cut the chunk pair, and then along one diagonal
    ``j - i >= m`` (keys before) or ``j - i <= m`` (keys after); such a band is a window with
    ``Sq == Sk`` after cutting ``|m|`` rows and keys so that its diagonal becomes the main one.
    """
    n = max(cq, ck) + 1  # any sequence long enough to hold both chunks
    q0, q1, k0, k1 = cq * c, (cq + 1) * c, ck * c, (ck + 1) * c
    lo, hi = _masking.key_range(q0, q1, sq=n * c, sk=n * c, causal=causal, window=window)
    if max(lo, k0) >= min(hi, k1):
        return None
    every = slice(None)
    if cq == ck:
        return every, every, causal, window
    if _masking.tile_is_full(q0, q1, k0, k1, sq=n * c, sk=n * c, causal=causal, window=window):
        return every, every, False, None
    left, right = window  # not full and off the diagonal: a window side cuts the pair
    if ck < cq:  # keys before the queries: visible iff j - i >= m
        m = (cq - ck) * c - left
        if m <= 0:
            return every, every, False, (-m, None)
        return slice(0, c - m), slice(m, c), False, (0, None)
    m = right - (ck - cq) * c  # keys after the queries: visible iff j - i <= m
    if m >= 0:
        return every, every, False, (None, m)
    return slice(-m, c), slice(0, c + m), False, (None, 0)


def _alibi_terms(xp, slopes, qpos, kpos, heads_axis, dtype):
    """ALiBi of an off-diagonal pair as a per-key bias plus a per-query lse shift.

    Off the diagonal all keys lie on one side of all queries, so ``-slope |I - J|`` splits into
    ``slope s (J - J0)`` (a bias over keys) and ``-slope s (I - J0)`` (constant along each
    query row: it shifts the row's lse, not its softmax), with ``s = sign(I - J)``. ``J0`` is
    the key nearest the queries, which keeps both terms <= 0 and small where it matters.
    """
    before = kpos[-1] < qpos[0]
    sign, j0 = (1.0, kpos[-1]) if before else (-1.0, kpos[0])
    kd = xp.asarray(sign * (kpos - j0), dtype=dtype)
    qd = xp.asarray(-sign * (qpos - j0), dtype=dtype)
    s = xp.asarray(slopes, dtype=dtype)
    if heads_axis:
        return s[..., :, None, None] * kd, s[..., :, None] * qd
    return s[0] * kd[None, :], s[0] * qd


# ------------------------------------------------------------------------------------------
# The schedule: which blocks travel how far, in which direction


@lru_cache(maxsize=256)
def _schedule(size, layout, c, causal, window):
    """``((dr, hops, served), ...)``: one ring pass per direction ``dr`` that moves blocks.

    Rank ``r`` needs the key block of rank ``o`` when some chunk pair between them is visible.
    The pair ``(o, r)`` is served (computed) by the pass in the shorter direction (``+1``:
    blocks travel to higher ranks; ties go to ``+1``). ``hops[o]`` is how far block ``o``
    travels in that pass: to its last reader, so with a window only the neighbours within
    reach receive it. Depends only on sizes and options, hence cached.
    """
    def visible(qr, kr):
        return any(
            _pair_problem(cq, ck, c, causal, window) is not None
            for cq in _chunk_ids(layout, qr, size)
            for ck in _chunk_ids(layout, kr, size)
        )

    def in_pass(dr, t):  # t hops in direction dr; ties go to the +1 pass
        return t <= size - t if dr == 1 else t < size - t

    passes = []
    for dr in (1, -1):
        served = frozenset(
            (o, (o + dr * t) % size)
            for o in range(size)
            for t in range(1, size)
            if in_pass(dr, t) and visible((o + dr * t) % size, o)
        )
        hops = tuple(
            max((t for t in range(1, size) if (o, (o + dr * t) % size) in served and
                 in_pass(dr, t)), default=0)
            for o in range(size)
        )
        if any(hops):
            passes.append((dr, hops, served))
    return tuple(passes)


# ------------------------------------------------------------------------------------------
# Setup shared by the forward and backward: validation, transport, cross-rank check


class _Ring:
    def __init__(self, op, comm, q, k, v, extra, options, layout, timeout):
        self.transport = transport_for(comm, _timeout(timeout))
        self.rank, self.size = self.transport.rank, self.transport.size
        self.options = options
        error, describe = None, {}
        try:
            _check_layout(layout)
            prob = validate_attention(q, k, v, **options, extra=extra)
            if isinstance(comm, NcclComm):
                if not is_cupy(q):
                    raise TypeError(
                        f"q: NcclComm moves CuPy arrays, got {type(q).__module__}."
                        f"{type(q).__qualname__}; use an mpi4py communicator for NumPy arrays")
                if q.device.id != comm.device:
                    raise TypeError(f"q: on GPU {q.device.id}, but the NcclComm was created on "
                                    f"GPU {comm.device}")
            if prob.sq != prob.sk:
                raise ValueError(
                    f"q, k: every rank must hold as many queries as keys, got q {q.shape}, "
                    f"k {k.shape}"
                )
            nloc = len(_chunk_ids(layout, self.rank, self.size))
            if prob.sq % nloc:
                raise ValueError(
                    f"q: the local sequence length {prob.sq} must be even for layout='zigzag'"
                )
            self.prob, self.layout, self.c = prob, layout, prob.sq // nloc
            describe = _describe(op, q, k, v, extra, options, layout, self.size)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the peers hear of it
            error = exc
            describe = {"op": op, "invalid": f"{type(exc).__name__}: {exc}"[:1500]}
        self._check_agreement(q, describe, error)

    def _check_agreement(self, q, describe, error):
        """Exchange every rank's description of the call; any difference fails every rank."""
        text = json.dumps(describe, sort_keys=True).encode()[:_FINGERPRINT_BYTES]
        buf = np.zeros(_FINGERPRINT_BYTES, np.uint8)
        buf[: len(text)] = np.frombuffer(text, np.uint8)
        if isinstance(self.transport_comm, NcclComm) and self.size > 1:
            import cupy

            buf = cupy.asarray(buf)
        try:
            got = exchange_all(self.transport, buf, _TAG_CHECK, "the cross-rank check of the call")
        except RingTimeoutError as exc:
            self.transport.notify_failure(str(exc))
            raise
        descs = [
            json.loads(bytes(np.asarray(b.get() if is_cupy(b) else b)).rstrip(b"\0"))
            for b in got
        ]
        if error is not None:
            raise error
        bad = [r for r, d in enumerate(descs) if "invalid" in d]
        if bad:
            raise ValueError(
                f"rank {self.rank}: rank {bad[0]} rejected its inputs: {descs[bad[0]]['invalid']}"
            )
        differ = [r for r, d in enumerate(descs) if d != descs[0]]
        if differ:
            r = differ[0]
            keys = sorted(k for k in descs[0] if descs[0].get(k) != descs[r].get(k))
            detail = "; ".join(f"{key}: rank 0 {descs[0].get(key)}, rank {r} {descs[r].get(key)}"
                               for key in keys)
            raise ValueError(
                f"rank {self.rank}: the ranks called {descs[0]['op']} with different "
                f"arguments ({detail})"
            )

    @property
    def transport_comm(self):
        return getattr(self.transport, "comm", None)

    def run(self, fn, *args):
        """Run ``fn``, then agree that every rank succeeded: a failure on one rank is sent to
        the others (MPI), which then raise instead of returning or waiting forever."""
        try:
            result = fn(*args)
            done = self.prob.xp.zeros(1, dtype=np.uint8)
            exchange_all(self.transport, done, _TAG_DONE, "the final agreement of the call")
            return result
        except RingError as exc:
            if isinstance(exc, RingTimeoutError):
                self.transport.notify_failure(str(exc))
            raise
        except BaseException as exc:
            self.transport.notify_failure(f"{type(exc).__name__}: {exc}")
            raise

    def chunk(self, x, a, sl=slice(None)):
        """Local chunk ``a`` of ``x`` (sequence on axis -2), cut by ``sl``."""
        start = a * self.c
        rows = range(start, start + self.c)[sl]
        return x[..., rows.start: rows.stop, :]

    def pairs(self, origin):
        """``(a, b, problem, qpos, kpos)`` for each visible pair of local query chunk ``a``
        and chunk ``b`` of the key block from rank ``origin``."""
        c = self.c
        causal, window = self.prob.causal, self.prob.window
        for a, cq in enumerate(_chunk_ids(self.layout, self.rank, self.size)):
            for b, ck in enumerate(_chunk_ids(self.layout, origin, self.size)):
                prob = _pair_problem(cq, ck, c, causal, window)
                if prob is not None:
                    qs, ks = prob[0], prob[1]
                    qpos = np.arange(cq * c, (cq + 1) * c)[qs]
                    kpos = np.arange(ck * c, (ck + 1) * c)[ks]
                    yield a, b, prob, qpos, kpos

    def flash_options(self, prob, qpos, kpos):
        """flash options of one pair, and the lse shift of its ALiBi (None if none)."""
        _, _, causal, window = prob
        o = self.options
        opts = dict(causal=causal, window=window, scale=o["scale"], softcap=o["softcap"])
        slopes = o["alibi_slopes"]
        if slopes is None:
            return opts, None
        if qpos[0] == kpos[0] and len(qpos) == len(kpos):  # diagonal: flash's own ALiBi
            return {**opts, "alibi_slopes": slopes}, None
        bias, shift = _alibi_terms(self.prob.xp, slopes, qpos, kpos, self.prob.heads_axis,
                                   self.prob.cdtype)
        return {**opts, "bias": bias}, shift


def _describe(op, q, k, v, extra, options, layout, size):
    slopes = options["alibi_slopes"]
    digest = None
    if slopes is not None:
        host = slopes.get() if is_cupy(slopes) else slopes
        digest = hashlib.sha1(np.ascontiguousarray(host, dtype=np.float64).tobytes()).hexdigest()
    d = {
        "op": op,
        "namespace": "cupy" if is_cupy(q) else "numpy",
        "q": [list(q.shape), str(q.dtype)],
        "k": [list(k.shape), str(k.dtype)],
        "v": [list(v.shape), str(v.dtype)],
        "causal": bool(options["causal"]),
        "window": normalize_window(options["window"]),
        "scale": None if options["scale"] is None else float(options["scale"]).hex(),
        "softcap": None if options["softcap"] is None else float(options["softcap"]).hex(),
        "alibi_slopes": digest,
        "layout": layout,
        "size": size,
    }
    for name, x in extra:
        d[name] = [list(x.shape), str(x.dtype)]
    return d


# ------------------------------------------------------------------------------------------
# Forward


def ring_attention(q, k, v, /, comm, *, causal=False, window=None, scale=None,
                   alibi_slopes=None, softcap=None, layout="contiguous", return_lse=False,
                   timeout=None):
    """Exact attention over a sequence split across the ranks of ``comm`` (collective).

    Every rank passes its shard of the sequence (see :func:`shard`) and gets its shard of the
    output: the result equals ``flash_attention`` on the whole sequence, split the same way.
    Masks and ALiBi use global positions (query ``I`` sees key ``J <= I`` when causal, etc.).

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, S/P, D)``, ``(..., Hkv, S/P, D)``, ``(..., Hkv, S/P, Dv)``
        This rank's shard, NumPy or CuPy; only the ``Hkv`` key/value heads travel (GQA).
    comm : mpi4py communicator or :class:`NcclComm`
        mpi4py moves NumPy arrays, and CuPy arrays through host memory; ``NcclComm`` moves
        CuPy arrays between GPUs.
    causal, window, scale, alibi_slopes, softcap
        As in :func:`xattn.flash_attention`, on global positions. With a window only the
        ranks within reach exchange blocks.
    layout : {"contiguous", "zigzag"}
        How the sequence is split (module docstring). Every shard has the same length.
    return_lse : bool
        Also return this rank's shard of the log-sum-exp, for :func:`ring_attention_backward`.
    timeout : float, optional
        Seconds to wait for any one transfer before raising :class:`RingTimeoutError`
        (default 300). A rank that fails tells the others (MPI), which then raise
        :class:`RingError`; ranks that disagree on shapes or options all raise ValueError.

    Returns
    -------
    out : array ``(..., Hq, S/P, Dv)``, and ``lse`` ``(..., Hq, S/P)`` with ``return_lse``.
    """
    options = dict(causal=causal, window=window, scale=scale, alibi_slopes=alibi_slopes,
                   softcap=softcap)
    ring = _Ring("ring_attention", comm, q, k, v, (), options, layout, timeout)
    out, lse = ring.run(_forward, ring, q, k, v)
    return (out, lse) if return_lse else out


def _merge(xp, out_acc, lse_acc, out_p, lse_p):
    """Fold a partial result (``out_p``, ``lse_p``) into the running one, in place."""
    new = xp.logaddexp(lse_acc, lse_p)
    # Rows that no key has reached yet keep lse = -inf and out = 0 instead of NaN.
    ref = xp.where(xp.isneginf(new), 0.0, new)
    out_acc *= xp.exp(lse_acc - ref)[..., None]
    out_acc += xp.exp(lse_p - ref)[..., None] * out_p
    lse_acc[...] = new


def merge_attention(out_a, lse_a, out_b, lse_b, /):
    """Attention over the union of two disjoint key sets, from the result on each.

    ``(out_a, lse_a)`` and ``(out_b, lse_b)`` come from ``flash_attention(...,
    return_lse=True)`` (or :func:`ring_attention`) of the same queries against two key sets
    with no key in common; the result is attention over both, as if computed in one call.
    This is the merge ring attention applies to every block, offered for combining it with
    other partial results (e.g. global tokens held elsewhere). Rows that see no key in
    either part return 0 and ``lse = -inf``.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> from xattn.distributed import merge_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 10, 4))
    >>> a = xattn.flash_attention(q, k[:, :6], v[:, :6], return_lse=True)
    >>> b = xattn.flash_attention(q, k[:, 6:], v[:, 6:], return_lse=True)
    >>> out, lse = merge_attention(*a, *b)
    >>> bool(np.allclose(out, xattn.flash_attention(q, k, v)))
    True
    """
    xp = _namespace(out_a)
    dtype = lse_a.dtype
    out = out_a.astype(dtype, copy=True)
    lse = lse_a.astype(dtype, copy=True)
    _merge(xp, out, lse, out_b, lse_b)
    return out.astype(out_a.dtype, copy=False), lse


def _post_kv(ring, dr, hops, tag0, t, held, kv_meta):
    """Start the block transfers of step ``t`` of a pass: receive the block of rank
    ``r - dr t`` from the neighbour behind, send the block held since step ``t - 1`` ahead."""
    r, p = ring.rank, ring.size
    o_in, o_out = (r - dr * t) % p, (r - dr * (t - 1)) % p
    recvs, sends = [], []
    if t <= hops[o_in]:
        recvs = [(shape, dtype, (r - dr) % p, tag0 + tag, xp) for shape, dtype, tag, xp in kv_meta]
    if t <= hops[o_out]:
        sends = [(x, (r + dr) % p, tag0 + tag) for x, (_, _, tag, _) in zip(held, kv_meta,
                                                                          strict=True)]
    return ring.transport.post(sends, recvs, what=f"the key/value block of step {t}")


def _kv_meta(ring, k, v):
    xp = ring.prob.xp
    return [(k.shape, k.dtype, _TAG_K, xp), (v.shape, v.dtype, _TAG_V, xp)]


def _forward(ring, q, k, v):
    prob, xp = ring.prob, ring.prob.xp
    out_acc = xp.zeros(prob.out_shape, dtype=prob.cdtype)
    lse_acc = xp.full(prob.lse_shape, -math.inf, dtype=prob.cdtype)

    def compute(kb, vb, origin):
        for a, b, pp, qpos, kpos in ring.pairs(origin):
            qs, ks = pp[0], pp[1]
            opts, shift = ring.flash_options(pp, qpos, kpos)
            o, lse = flash_attention(ring.chunk(q, a, qs), ring.chunk(kb, b, ks),
                                     ring.chunk(vb, b, ks), return_lse=True, **opts)
            if shift is not None:
                lse = lse + shift
            _merge(xp, ring.chunk(out_acc, a, qs), ring.chunk(lse_acc[..., None], a, qs)[..., 0],
                   o, lse)
            ring.transport.progress()

    kv_meta = _kv_meta(ring, k, v)
    passes = _schedule(ring.size, ring.layout, ring.c, prob.causal, prob.window)
    # The first transfer of every pass starts now, overlapping the own block's computation.
    first = [_post_kv(ring, dr, hops, i * _TAG_PASS_STRIDE, 1, (k, v), kv_meta)
             for i, (dr, hops, _) in enumerate(passes)]
    compute(k, v, ring.rank)
    for i, (dr, hops, served) in enumerate(passes):
        tag0 = i * _TAG_PASS_STRIDE
        handle = first[i]
        for t in range(1, max(hops) + 1):
            got = ring.transport.wait(handle)
            origin = (ring.rank - dr * t) % ring.size
            held = tuple(got) if got else None
            if t < max(hops):
                handle = _post_kv(ring, dr, hops, tag0, t + 1, held, kv_meta)
            if held is not None and (origin, ring.rank) in served:
                compute(*held, origin)
    return out_acc.astype(prob.dtype, copy=False), lse_acc


# ------------------------------------------------------------------------------------------
# Backward


def ring_attention_backward(dout, q, k, v, out, lse, /, comm, *, causal=False, window=None,
                            scale=None, alibi_slopes=None, softcap=None, layout="contiguous",
                            timeout=None):
    """Gradient of :func:`ring_attention`: this rank's ``(dq, dk, dv)`` (collective).

    ``dout``, ``out`` and ``lse`` are this rank's shards (``out, lse`` from
    ``ring_attention(..., return_lse=True)``); pass the forward call's options. Key/value
    blocks travel as in the forward pass, each followed by the accumulator of its ``dk, dv``,
    which ends its trip at the rank that owns the block.

    Returns
    -------
    dq, dk, dv : arrays shaped and typed like this rank's ``q``, ``k``, ``v``
    """
    options = dict(causal=causal, window=window, scale=scale, alibi_slopes=alibi_slopes,
                   softcap=softcap)
    extra = (("dout", dout), ("out", out), ("lse", lse))
    ring = _Ring("ring_attention_backward", comm, q, k, v, extra, options, layout, timeout)
    check_same_shape("dout", dout, ring.prob.out_shape)
    check_same_shape("out", out, ring.prob.out_shape)
    check_same_shape("lse", lse, ring.prob.lse_shape)
    return ring.run(_backward, ring, dout, q, k, v, out, lse)


def _backward(ring, dout, q, k, v, out, lse):
    prob, xp, r, p = ring.prob, ring.prob.xp, ring.rank, ring.size
    cdt = prob.cdtype
    dq = xp.zeros(q.shape, dtype=cdt)
    dk = xp.zeros(k.shape, dtype=cdt)
    dv = xp.zeros(v.shape, dtype=cdt)
    lse_rows = lse[..., None]  # sequence on axis -2, like the other arrays

    def compute(kb, vb, origin):
        """dq in place; returns this rank's (dk, dv) contribution to block ``origin``."""
        gk = gv = None
        for a, b, pp, qpos, kpos in ring.pairs(origin):
            qs, ks = pp[0], pp[1]
            opts, shift = ring.flash_options(pp, qpos, kpos)
            lse_f = ring.chunk(lse_rows, a, qs)[..., 0]
            if shift is not None:
                lse_f = lse_f - shift
            g = flash_attention_backward(
                ring.chunk(dout, a, qs), ring.chunk(q, a, qs), ring.chunk(kb, b, ks),
                ring.chunk(vb, b, ks), ring.chunk(out, a, qs), lse_f.astype(lse.dtype), **opts
            )
            if gk is None:
                gk, gv = xp.zeros(kb.shape, dtype=cdt), xp.zeros(vb.shape, dtype=cdt)
            ring.chunk(dq, a, qs)[...] += g[0]
            ring.chunk(gk, b, ks)[...] += g[1]
            ring.chunk(gv, b, ks)[...] += g[2]
            ring.transport.progress()
        return gk, gv

    kv_meta = _kv_meta(ring, k, v)
    acc_meta = [(k.shape, cdt, _TAG_DK, xp), (v.shape, cdt, _TAG_DV, xp)]
    home_meta = [(k.shape, cdt, _TAG_HOME_K, xp), (v.shape, cdt, _TAG_HOME_V, xp)]
    passes = _schedule(p, ring.layout, ring.c, prob.causal, prob.window)
    first = [_post_kv(ring, dr, hops, i * _TAG_PASS_STRIDE, 1, (k, v), kv_meta)
             for i, (dr, hops, _) in enumerate(passes)]
    own = compute(k, v, r)
    if own[0] is not None:
        dk += own[0]
        dv += own[1]
    for i, (dr, hops, served) in enumerate(passes):
        tag0 = i * _TAG_PASS_STRIDE
        steps = max(hops)
        kv_handle = first[i]
        acc_handle, acc = None, None
        for t in range(1, steps + 1):
            origin = (r - dr * t) % p
            got = ring.transport.wait(kv_handle)
            held = tuple(got) if got else None
            if t < steps:
                kv_handle = _post_kv(ring, dr, hops, tag0, t + 1, held, kv_meta)
            contrib = (None, None)
            if held is not None and (origin, r) in served:
                contrib = compute(*held, origin)
            if acc_handle is not None:  # the accumulators posted at step t - 1
                acc, home = _split_acc(ring.transport.wait(acc_handle), hops, r, t - 1)
                _add_home(dk, dv, home)
            if held is not None:
                if t == 1:
                    acc = [xp.zeros(k.shape, dtype=cdt), xp.zeros(v.shape, dtype=cdt)]
                if contrib[0] is not None:
                    acc[0] += contrib[0]
                    acc[1] += contrib[1]
            acc_handle = _post_acc(ring, dr, hops, tag0, t, acc if held is not None else None,
                                   acc_meta, home_meta)
        if acc_handle is not None:
            _, home = _split_acc(ring.transport.wait(acc_handle), hops, r, steps)
            _add_home(dk, dv, home)
    return dq.astype(q.dtype, copy=False), dk.astype(k.dtype, copy=False), \
        dv.astype(v.dtype, copy=False)


def _post_acc(ring, dr, hops, tag0, t, acc, acc_meta, home_meta):
    """After step ``t``: pass the accumulator of the block held at step ``t`` on (or home
    after its last hop), receive the next step's accumulator, and this rank's own one when
    its trip ends at step ``t``."""
    r, p = ring.rank, ring.size
    origin, nxt = (r - dr * t) % p, (r - dr * (t + 1)) % p
    sends, recvs = [], []
    if acc is not None:
        dest = (r + dr) % p if t < hops[origin] else origin
        meta = acc_meta if t < hops[origin] else home_meta
        sends = [(x, dest, tag0 + m[2]) for x, m in zip(acc, meta, strict=True)]
    if t + 1 <= hops[nxt]:
        recvs += [(s, d, (r - dr) % p, tag0 + tag, xp) for s, d, tag, xp in acc_meta]
    if hops[r] == t:
        holder = (r + dr * t) % p
        recvs += [(s, d, holder, tag0 + tag, xp) for s, d, tag, xp in home_meta]
    return ring.transport.post(sends, recvs, what=f"the dk/dv accumulators of step {t}")


def _split_acc(got, hops, r, t):
    """Received arrays of the accumulator handle of step ``t``: (next acc, own home acc)."""
    got = list(got)
    home = got[-2:] if hops[r] == t else None
    if home is not None:
        got = got[:-2]
    return (got if got else None), home


def _add_home(dk, dv, home):
    if home is not None:
        dk += home[0]
        dv += home[1]
