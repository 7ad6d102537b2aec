"""Flex attention on the CPU: the user's score/mask functions inside the fused tile loop.

The structure is the fused flash kernel's (:mod:`.fused`): jobs of (batch element, kv head,
share of the query blocks) on the one thread pool (:mod:`._pool`, ``XATTN_NUM_THREADS``), the
``G`` query heads of a GQA group stacked into one block of rows. A run of consecutive visible
key blocks seen by the same rows is a *segment* (up to ``MAX_TILE_K`` keys); consecutive
segments spanning up to ``_MAX_SPAN`` keys form a *chunk*, whose scores share one
``(rows, span)`` buffer::

    per segment: S[rows, keys] = q_rows @ k_seg.T     BLAS gemm into its block of S
                 S <- score_mod / -inf                 the user's functions, compiled here
    per row:     m, l, acc, S <- online softmax step   once over the row's whole chunk
    per segment: acc[rows] += S[rows, keys] @ v_seg    BLAS gemm, accumulating (beta = 1)

(A band's staircase edges are many short segments; one softmax step per row and chunk instead
of one per segment, and no separate ``P @ V`` output to add, made the sliding window ~15%
faster: docs/dev/perf_flex.rst.)

A chunk with partial blocks whose rows see clearly fewer keys than its BLAS tiles would visit
(a sliding window's edges) takes the *band path* instead: each row's scores are computed over
its own visible range only (its first and last visible key, recorded with the block mask), by
the register-blocked kernels of :mod:`._flex_micro`, 12 rows (QK^T) or 6 rows (P @ V) at a
time, so the band's edges cost neither the corners of tall tiles nor short BLAS calls
(+20-30 % on a +-256 window, docs/dev/perf_flex.rst).

A job is one compiled call: the interpreter never runs inside the tile loop. Which key blocks
a query block visits comes from a block mask derived from ``mask_mod`` (:func:`block_plan`,
every element evaluated once per shape and cached): empty blocks are skipped, full blocks skip
``mask_mod`` (and, without a ``score_mod``, the element loop altogether), partial blocks
evaluate it per element. The backward pass (FlashAttention-2 recomputation from ``lse``) walks
the same blocks and calls the forward-mode derivative of ``score_mod``
(:func:`xattn._flex_codegen.differentiate`); partial dk/dv and table gradients of jobs that
share a kv head are added in job order, so results are bitwise reproducible.

The kernels are generated as Python source around the user's translated functions
(:mod:`xattn._flex_codegen`), written to ``$XATTN_CACHE_DIR/flex`` (default
``~/.cache/xattn/flex``) under the hash of their text and compiled with ``cache=True``, so a
fresh process loads machine code instead of compiling, and in-memory modules are looked up
by the functions' code and captured values, so a ``lambda`` rebuilt per call compiles once.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
import types
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np

from ... import _flex_codegen as cg
from ..._masking import clean_rows
from . import _pool
from .tiled import bad_flags

# Score rows per query block (the G heads of a GQA group stacked) and the block-mask granularity
# in keys. Consecutive query blocks with nearly the same visible keys are merged into taller
# tiles (MERGE_ROWS below), and runs of consecutive visible key blocks are multiplied as one
# tile of up to MAX_TILE_K keys, so small blocks cost little BLAS efficiency: they make the
# mask finer. A sliding window visits about window + BLOCK_ROWS/G + BLOCK_K keys per row.
BLOCK_ROWS = 64
BLOCK_K = 32
MIN_BLOCK_Q = 16
# Block states of the derived block mask.
EMPTY, PARTIAL, FULL = 0, 1, 2
# Bump when the templates below change, so stale cached kernels are never loaded.
_TEMPLATE_VERSION = "11"

_lock = threading.Lock()
_modules: OrderedDict = OrderedDict()  # key -> generated module (LRU)
_MAX_MODULES = 128
_block_cache: OrderedDict = OrderedDict()  # block-mask key -> (states, plans)
_MAX_BLOCK_BYTES = 64 << 20
_cache_dir_value = None


def block_q(group: int) -> int:
    return max(MIN_BLOCK_Q, BLOCK_ROWS // max(group, 1))


# --- the disk cache -----------------------------------------------------------------------


def cache_dir():
    """``$XATTN_CACHE_DIR/flex`` (default ``~/.cache/xattn/flex``), or None if not writable."""
    global _cache_dir_value
    if _cache_dir_value is None:
        base = os.environ.get("XATTN_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xattn")
        path = Path(base) / "flex"
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, suffix=".probe"):
                pass
            _cache_dir_value = path
        except OSError:
            _cache_dir_value = False
    return _cache_dir_value or None


def _import_source(text: str, kind: str, inject: dict | None):
    """Execute generated source as a module; from a file in the cache dir when possible."""
    name = f"xattn_flex_{kind}_{cg.source_hash(_TEMPLATE_VERSION, text)}"
    directory = None if inject else cache_dir()
    if directory is None:
        module = types.ModuleType(name)
        module.__dict__.update(inject or {})
        exec(compile(text.replace("_CACHE = True", "_CACHE = False"), f"<{name}>", "exec"),
             module.__dict__)
        return module
    path = directory / f"{name}.py"
    if not path.exists():
        # Written once under a content-hash name, atomically: concurrent processes agree.
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- code generation -----------------------------------------------------------------------

_HEADER = """\
# Generated by xattn (flex attention) from the user's score_mod/mask_mod; do not edit.
import math as _math
import numpy as _np
import numba as _numba
from numba.np.linalg import ensure_blas as _ensure_blas
from xattn._backends.numpy_ import _fused_kernels as _K
from xattn._backends.numpy_ import _flex_micro as _M

_CACHE = True
_JIT = dict(nogil=True, fastmath=_K._FASTMATH, cache=_CACHE)
_INLINE = dict(inline="always")


@_numba.njit(**_JIT)
def _segment_end(kbs, ka, kz, t, t_end, bk, maxw):
    # Consecutive visible key blocks seen by the same query rows form one tile of at most
    # maxw keys: one long matmul instead of several short ones.
    t1 = t + 1
    while (t1 < t_end and kbs[t1] == kbs[t1 - 1] + 1 and ka[t1] == ka[t] and kz[t1] == kz[t]
           and (kbs[t1] - kbs[t] + 1) * bk <= maxw):
        t1 += 1
    return t1


@_numba.njit(**_JIT)
def _segment(kbs, ka, kz, u, t_end, bk, maxw, bqf, G, nq, sk):
    # The tile that starts at block u: its end block u1, its stacked rows [r0, r1) and its keys
    # [k0, k1).
    u1 = _segment_end(kbs, ka, kz, u, t_end, bk, maxw)
    return (u1, ka[u] * bqf * G, min(kz[u] * bqf, nq) * G, kbs[u] * bk,
            min(kbs[u1 - 1] * bk + bk, sk))


# Keys per chunk of score columns (see forward_job): (rows x span) scores stay in L2.
_MAX_SPAN = 1024
_GEMM = _numba.types.ExternalFunction("numba_xxgemm", _numba.types.intc(
    _numba.types.char, _numba.types.char, _numba.types.char, _numba.types.intp,
    _numba.types.intp, _numba.types.intp, _numba.types.voidptr, _numba.types.voidptr,
    _numba.types.intp, _numba.types.voidptr, _numba.types.intp, _numba.types.voidptr,
    _numba.types.voidptr, _numba.types.intp))
_ensure_blas()


@_numba.njit(**_JIT)
def _gemm(tb, m, n, k, a, lda, b, ldb, beta, c, ldc, ab):
    # Row-major c[:m, :n] (row stride ldc) = a[:m, :k] (lda) @ (b[:n, :k].T if tb else
    # b[:k, :n]) (ldb) + beta * c, through the BLAS behind numba's np.dot (numba_xxgemm):
    # unlike np.dot it writes into a block of a wider buffer and accumulates (beta = 1).
    # Column-major BLAS computes c.T = op(b).T @ a.T.
    ab[0] = 1.0
    ab[1] = beta
    kind = _np.int8(115) if c.itemsize == 4 else _np.int8(100)  # 's' or 'd'
    _GEMM(kind, _np.int8(116) if tb else _np.int8(110), _np.int8(110), n, m, k, ab[0:].ctypes,
          b.ctypes, ldb, a.ctypes, lda, ab[1:].ctypes, c.ctypes, ldc)


@_numba.njit(**_JIT)
def forward_scratch(rmax, D, Dv, sk, maxw, micro, itemsize):
    # Sizes (floats, int64s) of forward_job's scratch for rmax stacked rows: q rows, acc,
    # the score chunk, the transposed keys (band path only); the value flags' prefix counts.
    rpad = (rmax + _M.QK_ROWS - 1) // _M.QK_ROWS * _M.QK_ROWS
    cwq = _M.QK_VECS * (_M.VEC_BYTES // itemsize)
    maxspan = max(maxw, _MAX_SPAN)
    ktld = 4 * (maxspan + cwq) + 16
    nf = rpad * D + rpad * Dv + rpad * (maxspan + 32 + cwq) + (D * ktld if micro else 0)
    return nf, sk + 1


@_numba.njit(**_JIT)
def _value_flags(v2, vcum, j0, j1):
    # vcum[j + 1] = vcum[j] + (value row j holds NaN/inf) for j in [j0, j1); returns how
    # many of them do.
    Dv = v2.shape[1]
    for j in range(j0, j1):
        row = v2[j]
        total = 0.0
        for c in range(Dv):
            total += row[c]
        # (Not math.isfinite: under these fast-math flags it folds to True. A finite sum
        # that overflows float64 is flagged too, which only costs it the exact path.)
        vcum[j + 1] = vcum[j] + (0 if abs(total) <= 1.7976931348623157e308 else 1)
    return vcum[j1] - vcum[j0]


@_numba.njit(**_JIT)
def _row_step(row, m, l, acc, x):
    # One online-softmax step of row x over its contiguous scores `row`, rewritten as
    # exp(row - m_new) (the step of _K.online_softmax_tile, for one row of a chunk).
    m_old = m[x]
    m_new = _K._row_max(row, m_old)
    if m_new == -_np.inf:
        for c in range(row.shape[0]):
            row[c] = 0
        return
    if m_new != m_old:
        alpha = _math.exp(m_old - m_new)
        l[x] *= alpha
        for c in range(acc.shape[1]):
            acc[x, c] *= alpha
        m[x] = m_new
    l[x] += _K._exp2_tile(row, m_new)


# Hidden pairs whose keys or queries hold NaN/inf (issue #9 item 6): the compiled counterparts
# of xattn._masking.add_visible_terms and tiled._zero_hidden for the tiles that meet such rows
# (the NumPy helpers cannot run inside a compiled job). The rule is the one of
# docs/numerics.rst: the tile is multiplied by a copy with those rows at 0, and their terms
# are added back for the visible pairs only.


@_numba.njit(**_JIT)
def _flagged(cum, lo, n, idx):
    # Positions p in [0, n) with cum[lo + p + 1] != cum[lo + p] (cum: prefix counts of the
    # flagged rows), written to idx; returns their count.
    cnt = 0
    for p in range(n):
        if cum[lo + p + 1] != cum[lo + p]:
            idx[cnt] = p
            cnt += 1
    return cnt


@_numba.njit(**_JIT)
def _visible(s, vis):
    # Visibility of the pairs of a score tile: its final score is not -inf.
    for r in range(s.shape[0]):
        for c in range(s.shape[1]):
            vis[r, c] = s[r, c] != -_np.inf


@_numba.njit(**_JIT)
def _visible_terms(out, a, b, idx, cnt, vis):
    # out[r] += a[r, i] * b[i] for the inner indices i = idx[:cnt], visible pairs (r, i) only.
    for n in range(cnt):
        i = idx[n]
        for r in range(out.shape[0]):
            if vis[r, i]:
                x = a[r, i]
                for c in range(out.shape[1]):
                    out[r, c] += x * b[i, c]


"""


class _Part:
    """One user function inside a generated module: its definition and its call."""

    def __init__(self, cap, prefix):
        self.cap = cap
        self.prefix = prefix
        self.inject = {}
        self.lines = []
        if cap is None:
            self.extra = []
            return
        src = cg.function_source(cap, f"_user{prefix}")
        if src is None:  # no source (python -c, a REPL): compile the object itself
            self.src = None
            self.inject[f"_user{prefix}"] = cap.fn
            self.lines.append(f"{prefix} = _numba.njit(**_INLINE)(_user{prefix})")
            self.extra = []  # numba freezes what it captured
            return
        self.src = src
        self.lines += src.header
        self.lines.append("@_numba.njit(**_INLINE)")
        self.lines.append(src.text())
        self.lines.append(f"{prefix} = _user{prefix}")
        self.extra = [f"_c{prefix}{n}" for n in range(len(src.array_params))]

    def call(self, fixed, args):
        return f"{self.prefix}({', '.join([*fixed, *args, *self.extra])})"


def _arg_names(n):
    return [f"_a{i}" for i in range(n)]


def _forward_text(smod, mmod, nargs, mask_takes_args):
    args = _arg_names(nargs)
    margs = args if mask_takes_args else []
    sp = _Part(smod, "_smod")
    mp = _Part(mmod, "_mmod")
    params = ", ".join([*args, *sp.extra, *mp.extra])
    tail = f", {params}" if params else ""
    score_row = (sp.call(["srow[j - j0]", "b", "h", "i", "j"], args) if smod
                 else "srow[j - j0]")
    visible_row = mp.call(["b", "h", "i", "j"], margs) if mmod else "True"
    visible = visible_row
    mask_tail = ", ".join([*margs, *mp.extra])
    mask_tail = f", {mask_tail}" if mask_tail else ""
    # The value rows' non-finite pass before a chunk's P @ V (keys up to ce), the same text in
    # the band path and the BLAS-tile path of forward_job.
    value_pass = '''                if ce > vdone:
                    if _value_flags(v2, vcum, vdone, ce):
                        if not copied:
                            vc2 = v2.copy()
                            vc2f = vc2.reshape(-1)
                            vbuf = _np.empty(rmax * (maxspan + 32 + cwq), _np.bool_)
                            copied = True
                        for j in range(vdone, ce):
                            if vcum[j + 1] != vcum[j]:
                                vc2[j, :] = 0.0
                    vdone = ce
                exact = vcum[ce] != vcum[c0]'''
    body = f'''
@_numba.njit(**_JIT)
def forward_job(q, k2, v2, out, lse, scale, hq, b, g, G, bqs, bqf, qlo, qhi, qbs, ptr, kbs, kst,
                ka, kz, bk, maxw, micro, rfirst, rlast, rdense, fws, iws{tail}):
    # q (B*Hq, Sq, D) and out (B*Hq, Sq, Dv), lse (B*Hq, Sq): whole arrays; k2, v2: this
    # job's kv head (Sk, D), (Sk, Dv). Query group n of this (b, g) holds the query rows
    # [qlo[n], qhi[n]) (at most bqs), in fine blocks of bqf rows; it sees the key blocks
    # kbs[ptr[n]:ptr[n + 1]] in states kst[...], each only from its fine blocks
    # [ka, kz). The job computes the groups qbs. Stacked row r*G + hh is query q0 + r of
    # head g*G + hh, so every fine-block range is one contiguous run of rows.
    # micro: chunks with partial blocks may take the band path (see the chunk loop);
    # rfirst, rlast, rdense (1 or Hq, Sq): each query row's first and last visible key, and
    # whether it sees every key between them (row_bounds).
    # fws, iws: this worker's scratch (forward_scratch sizes them), kept by the caller from
    # call to call: fresh megabyte buffers per job cost page faults and unmaps (TLB
    # shootdowns that stall the other workers), ~10 % of a window call's time.
    sk = k2.shape[0]
    D = q.shape[2]
    Dv = v2.shape[1]
    rmax = G * bqs
    # Rows padded to whole micro-kernel blocks (their results are never read).
    rpad = (rmax + _M.QK_ROWS - 1) // _M.QK_ROWS * _M.QK_ROWS
    cwq = _M.QK_VECS * (_M.VEC_BYTES // q.itemsize)
    cwp = _M.PV_VECS * (_M.VEC_BYTES // q.itemsize)
    maxspan = max(maxw, _MAX_SPAN)
    # Transposed keys (D, ktld) of the columns [kbase, kdone), kept from chunk to chunk: a
    # band's consecutive chunks overlap, and each key is transposed once per job.
    ktld = 4 * (maxspan + cwq) + 16
    nf, ni = forward_scratch(rmax, D, Dv, sk, maxw, micro, q.itemsize)
    if fws.shape[0] < nf:
        fws = _np.empty(nf, q.dtype)
    if iws.shape[0] < ni:
        iws = _np.empty(ni, _np.int64)
    qbuf = fws[: rpad * D]
    o = rpad * D
    abuf = fws[o: o + rpad * Dv]
    o += rpad * Dv
    sbuf = fws[o: o + rpad * (maxspan + 32 + cwq)]
    o += rpad * (maxspan + 32 + cwq)
    ktbuf = fws[o: o + (D * ktld if micro else 0)]
    # The first key this job's query groups can see.
    klo = sk
    for n in range(qbs.shape[0]):
        if ptr[qbs[n] + 1] > ptr[qbs[n]]:
            klo = min(klo, kbs[ptr[qbs[n]]] * bk)
    # Values of hidden keys must not reach the output (k needs nothing: hidden scores are
    # -inf). vcum (Sk + 1): prefix counts of the keys whose value row holds NaN/inf, over
    # [klo, vdone) (counts relative to klo; only their differences are read), extended
    # chunk by chunk just before the chunk's P @ V (_value_flags), so that the value rows
    # are read from memory once, not once for the flags and again for the products; vc2: v2
    # with those rows at 0 (a copy, made when the first one is found).
    vcum = iws[: sk + 1]
    vcum[klo] = 0
    vdone = klo
    vc2 = v2
    copied = False
    m = _np.empty(rmax, q.dtype)
    l = _np.empty(rmax, q.dtype)
    lse_rows = _np.empty(rmax, q.dtype)
    vbuf = _np.empty(0, _np.bool_)
    cov = _np.empty(rmax, _np.int64)
    idx = _np.empty(maxspan + maxw, _np.int64)
    kbase = 0
    kdone = 0
    nband = 0  # chunks that took the band path (returned: tests and benchmarks read it)
    tl = _np.empty(rpad, _np.int64)
    th = _np.empty(rpad, _np.int64)
    segs = _np.empty(maxspan // bk + 2, _np.int64)
    colf = _np.empty(maxspan + 1, _np.bool_)
    v2f = v2.reshape(-1)
    k2f = k2.reshape(-1)
    vw = (_M.VEC_BYTES // q.itemsize)
    vc2f = vc2.reshape(-1)
    vis = vbuf[:0].reshape((0, 0))
    lo = _np.empty(rmax, _np.int64)
    hi = _np.empty(rmax, _np.int64)
    ab = _np.empty(2, q.dtype)
    for n in range(qbs.shape[0]):
        q0 = qlo[qbs[n]]
        nq = qhi[qbs[n]] - q0
        rows = G * nq
        qt = qbuf[: rows * D].reshape((rows, D))
        acc = abuf[: rows * Dv].reshape((rows, Dv))
        for r in range(nq):
            for hh in range(G):
                # 1-D rows: the element loops vectorise (3-D indexing cost ~1 ns/element).
                src = q[b * hq + g * G + hh, q0 + r]
                dst = qt[r * G + hh]
                for c in range(D):
                    dst[c] = src[c] * scale
        m[:rows] = -_np.inf
        l[:rows] = 0.0
        acc[:] = 0.0
        t = ptr[qbs[n]]
        t_end = ptr[qbs[n] + 1]
        while t < t_end:
            # A chunk: the segments from t on whose keys fit in maxspan. Their scores go
            # into one (rows, span) block; each row's online-softmax step then runs once
            # over its whole covered range, and the P @ V products add into acc directly.
            c0 = kbs[t] * bk
            tc = t
            ce = c0
            while tc < t_end:
                t1 = _segment_end(kbs, ka, kz, tc, t_end, bk, maxw)
                k1 = min(kbs[t1 - 1] * bk + bk, sk)
                if tc > t and k1 - c0 > maxspan:
                    break
                ce = k1
                tc = t1
            span = ce - c0
            # Row stride: a multiple of 16 elements plus 16, never a power of two (a 4 KiB
            # stride made the score GEMM ~25% slower through cache aliasing).
            ld = (span + cwq + 15) // 16 * 16 + 16
            S = sbuf[: rows * ld].reshape((rows, ld))
            lo[:rows] = span
            hi[:rows] = 0
            cov[:rows] = 0
            visited = 0
            u = t
            while u < tc:
                u1 = _segment_end(kbs, ka, kz, u, tc, bk, maxw)
                r0 = ka[u] * bqf * G
                r1 = min(kz[u] * bqf, nq) * G
                a0 = kbs[u] * bk - c0
                a1 = min(kbs[u1 - 1] * bk + bk, sk) - c0
                visited += (r1 - r0) * (a1 - a0)
                for x in range(r0, r1):
                    lo[x] = min(lo[x], a0)
                    hi[x] = max(hi[x], a1)
                    cov[x] += a1 - a0
                u = u1
            use_micro = False
            if micro:
                for u in range(t, tc):
                    if kst[u] == {PARTIAL}:
                        use_micro = True
                        break
            if use_micro:
                # Each row's own range: its covered keys cut to its first and last visible
                # key (from the block mask's evaluation of mask_mod, cached with the plan).
                tight = 0
                for x in range(rows):
                    hr = (g * G + x % G) if rfirst.shape[0] > 1 else 0
                    i = q0 + x // G
                    tl[x] = max(lo[x], rfirst[hr, i] - c0)
                    th[x] = min(hi[x], rlast[hr, i] + 1 - c0)
                    if th[x] <= tl[x]:
                        tl[x] = 0
                        th[x] = 0
                    tight += th[x] - tl[x]
                # The band path runs where it saves pairs: its kernels run at ~85% of BLAS
                # on long tiles, so tiles that follow the mask closely (a causal diagonal)
                # stay with BLAS.
                use_micro = tight * 20 < visited * 19
            if use_micro:
                nband += 1
                # The band path (_flex_micro): each row's scores are computed over its own
                # visible range only, a few rows at a time, so a band's edges cost neither
                # the pairs of a rectangle's corners nor the short products of a staircase.
                ns = 0
                u = t
                while u < tc:
                    segs[ns] = u
                    ns += 1
                    u = _segment_end(kbs, ka, kz, u, tc, bk, maxw)
                segs[ns] = tc
                if c0 < kbase or c0 + span + cwq > kbase + ktld:
                    if kbase <= c0 < kdone:
                        # Slide the window: the overlap moves to the front.
                        for d in range(D):
                            dst = ktbuf[d * ktld: d * ktld + kdone - c0]
                            src = ktbuf[d * ktld + c0 - kbase: d * ktld + kdone - kbase]
                            for c in range(kdone - c0):
                                dst[c] = src[c]
                    else:
                        kdone = c0
                    kbase = c0
                if ce > kdone:
                    c = kdone
                    if D % vw == 0:
                        while c + vw <= ce:
                            for d in range(0, D, vw):
                                _M.transpose_tile(k2f, c * D + d, D, ktbuf,
                                                  d * ktld + c - kbase, ktld)
                            c += vw
                    for c in range(c, ce):
                        krow = k2[c]
                        for d in range(D):
                            ktbuf[d * ktld + c - kbase] = krow[d]
                    kdone = ce
                x0 = 0
                while x0 < rows:
                    # Blocks of QK_ROWS rows, the last few in blocks of QK_TAIL.
                    nr = _M.QK_ROWS if rows - x0 > _M.QK_ROWS - _M.QK_TAIL else _M.QK_TAIL
                    a0 = span
                    a1 = 0
                    for x in range(x0, min(x0 + nr, rows)):
                        if th[x] > tl[x]:
                            a0 = min(a0, tl[x])
                            a1 = max(a1, th[x])
                    cc = a0
                    while cc < a1:
                        if a1 - cc <= vw:
                            if nr == _M.QK_ROWS:
                                _M.qk_tile_1(qbuf, x0 * D, D, ktbuf, c0 - kbase + cc, ktld,
                                             sbuf, x0 * ld + cc, ld, D)
                            else:
                                _M.qk_tile_tail_1(qbuf, x0 * D, D, ktbuf, c0 - kbase + cc,
                                                  ktld, sbuf, x0 * ld + cc, ld, D)
                        elif nr == _M.QK_ROWS:
                            _M.qk_tile(qbuf, x0 * D, D, ktbuf, c0 - kbase + cc, ktld, sbuf,
                                       x0 * ld + cc, ld, D)
                        else:
                            _M.qk_tile_tail(qbuf, x0 * D, D, ktbuf, c0 - kbase + cc, ktld,
                                            sbuf, x0 * ld + cc, ld, D)
                        cc += cwq
                    x0 += nr
                # Keys between a row's segments (block-sparse masks) are hidden.
                for x in range(rows):
                    if cov[x] != hi[x] - lo[x] and th[x] > tl[x]:
                        colf[tl[x]:th[x]] = False
                        for si in range(ns):
                            u = segs[si]
                            if ka[u] * bqf * G <= x < min(kz[u] * bqf, nq) * G:
                                a0 = max(kbs[u] * bk - c0, tl[x])
                                a1 = min(min(kbs[segs[si + 1] - 1] * bk + bk, sk) - c0, th[x])
                                colf[a0:a1] = True
                        for c in range(tl[x], th[x]):
                            if not colf[c]:
                                S[x, c] = -_np.inf
                for si in range(ns):
                    u = segs[si]
                    r0 = ka[u] * bqf * G
                    r1 = min(kz[u] * bqf, nq) * G
                    for v_ in range(u, segs[si + 1]):
                        partial = kst[v_] == {PARTIAL}
                        if not (partial or {bool(smod)}):
                            continue
                        j0 = kbs[v_] * bk
                        j1 = min(j0 + bk, sk)
                        for x in range(r0, r1):
                            jl = max(j0, c0 + tl[x])
                            jh = min(j1, c0 + th[x])
                            if jh <= jl:
                                continue
                            hh = x % G
                            h = g * G + hh
                            i = q0 + x // G
                            srow = sbuf[x * ld + j0 - c0: x * ld + j1 - c0]
                            # rdense: [tl, th) is visible, the block is full for this row.
                            if partial and not rdense[(h if rdense.shape[0] > 1 else 0), i]:
                                for j in range(jl, jh):
                                    if {visible_row}:
                                        srow[j - j0] = {score_row}
                                    else:
                                        srow[j - j0] = -_np.inf
                            elif {bool(smod)}:
                                for j in range(jl, jh):
                                    srow[j - j0] = {score_row}
{value_pass}
                if exact:
                    vis = vbuf[: rows * ld].reshape((rows, ld))
                    for x in range(rows):
                        for c in range(span):
                            vis[x, c] = tl[x] <= c < th[x] and S[x, c] != -_np.inf
                for x in range(rows):
                    if th[x] > tl[x]:
                        _row_step(sbuf[x * ld + tl[x]: x * ld + th[x]], m, l, acc, x)
                # Each block of rows multiplies its weights over the union of its rows'
                # ranges; the weights outside a row's own range are zero.
                vsrc = vc2f if exact else v2f
                for x0 in range(0, rows, _M.PV_ROWS):
                    a0 = span
                    a1 = 0
                    for x in range(x0, min(x0 + _M.PV_ROWS, rows)):
                        if th[x] > tl[x]:
                            a0 = min(a0, tl[x])
                            a1 = max(a1, th[x])
                    if a1 <= a0:
                        continue
                    for x in range(x0, x0 + _M.PV_ROWS):
                        if x < rows and th[x] > tl[x]:
                            sbuf[x * ld + a0: x * ld + tl[x]] = 0.0
                            sbuf[x * ld + th[x]: x * ld + a1] = 0.0
                        else:
                            sbuf[x * ld + a0: x * ld + a1] = 0.0
                    for cb in range(0, Dv - Dv % cwp, cwp):
                        _M.pv_tile(sbuf, x0 * ld + a0, ld, vsrc, (c0 + a0) * Dv + cb, Dv, abuf,
                                   x0 * Dv + cb, Dv, a1 - a0)
                    for cb in range(Dv - Dv % cwp, Dv, vw):
                        _M.pv_tile_1(sbuf, x0 * ld + a0, ld, vsrc, (c0 + a0) * Dv + cb, Dv,
                                     abuf, x0 * Dv + cb, Dv, a1 - a0)
                if exact:
                    nbad = _flagged(vcum, c0, span, idx)
                    _visible_terms(acc, S[:, :span], v2[c0:ce], idx, nbad, vis[:, :span])
            else:
                # Keys between a row's segments (block-sparse masks) are hidden.
                for x in range(rows):
                    if cov[x] != hi[x] - lo[x]:
                        for c in range(lo[x], hi[x]):
                            S[x, c] = -_np.inf
                u = t
                while u < tc:
                    u1, r0, r1, k0, k1 = _segment(kbs, ka, kz, u, tc, bk, maxw, bqf, G, nq, sk)
                    w = k1 - k0
                    s = S[r0:r1, k0 - c0:k1 - c0]
                    _gemm(True, r1 - r0, w, D, qt[r0:r1], D, k2[k0:k1], D, 0.0, s, ld, ab)
                    for v_ in range(u, u1):
                        # Rows as contiguous 1-D slices of sbuf: the element loops vectorise.
                        j0 = kbs[v_] * bk
                        j1 = min(j0 + bk, sk)
                        partial = kst[v_] == {PARTIAL}
                        if not (partial or {bool(smod)}):
                            continue
                        for x in range(r0, r1):
                            hh = x % G
                            h = g * G + hh
                            i = q0 + x // G
                            srow = sbuf[x * ld + j0 - c0: x * ld + j1 - c0]
                            if partial:
                                for j in range(j0, j1):
                                    if {visible_row}:
                                        srow[j - j0] = {score_row}
                                    else:
                                        srow[j - j0] = -_np.inf
                            else:
                                for j in range(j0, j1):
                                    srow[j - j0] = {score_row}
                    u = u1
{value_pass}
                if exact:
                    vis = vbuf[: rows * ld].reshape((rows, ld))
                    _visible(S, vis)
                for x in range(rows):
                    if hi[x] > lo[x]:
                        _row_step(sbuf[x * ld + lo[x]: x * ld + hi[x]], m, l, acc, x)
                u = t
                while u < tc:
                    u1, r0, r1, k0, k1 = _segment(kbs, ka, kz, u, tc, bk, maxw, bqf, G, nq, sk)
                    w = k1 - k0
                    s = S[r0:r1, k0 - c0:k1 - c0]
                    nbad = _flagged(vcum, k0, w, idx) if exact else 0
                    if nbad:
                        _gemm(False, r1 - r0, Dv, w, s, ld, vc2[k0:k1], Dv, 1.0, acc[r0:r1], Dv,
                              ab)
                        _visible_terms(acc[r0:r1], s, v2[k0:k1], idx, nbad,
                                       vis[r0:r1, k0 - c0:k1 - c0])
                    else:
                        _gemm(False, r1 - r0, Dv, w, s, ld, v2[k0:k1], Dv, 1.0, acc[r0:r1], Dv,
                              ab)
                    u = u1
            t = tc
        _K.finish_rows(acc, m[:rows], l[:rows], lse_rows[:rows])
        for r in range(nq):
            for hh in range(G):
                lse[b * hq + g * G + hh, q0 + r] = lse_rows[r * G + hh]
                dst = out[b * hq + g * G + hh, q0 + r]
                src = acc[r * G + hh]
                for c in range(Dv):
                    dst[c] = src[c]
    return nband


@_numba.njit(**_JIT)
def block_states(b, h, sq, sk, bq, bk, qb0, qb1, out{mask_tail}):
    # out (n_query_blocks, n_key_blocks) int8: {EMPTY} empty, {PARTIAL} partial, {FULL} full.
    # The count of visible keys per row vectorises; a block stops at its first mixed row.
    nkb = out.shape[1]
    for qb in range(qb0, qb1):
        i0 = qb * bq
        i1 = min(i0 + bq, sq)
        for kb in range(nkb):
            j0 = kb * bk
            j1 = min(j0 + bk, sk)
            seen = 0
            total = 0
            state = -1
            for i in range(i0, i1):
                cnt = 0
                for j in range(j0, j1):
                    if {visible}:
                        cnt += 1
                seen += cnt
                total += j1 - j0
                if seen != 0 and seen != total:
                    state = {PARTIAL}
                    break
            if state < 0:
                state = {FULL} if seen == total else {EMPTY}
            out[qb, kb] = state


@_numba.njit(**_JIT)
def row_bounds(b, h, sq, sk, bq, bk, qb0, qb1, st, first, last, dense{mask_tail}):
    # The first and last visible key of each query row of the blocks [qb0, qb1) (-1 and -2
    # when it sees none), from the block states st: empty blocks are skipped, full ones
    # decide at their edge, partial ones are evaluated up to their first visible key.
    # dense: 1 where the row sees every key from its first to its last (its partial blocks
    # all evaluated and counted), so that its partial blocks need no mask in forward_job.
    nkb = st.shape[1]
    for i in range(qb0 * bq, min(qb1 * bq, sq)):
        qb = i // bq
        f = -1
        for kb in range(nkb):
            state = st[qb, kb]
            if state == {EMPTY}:
                continue
            j0 = kb * bk
            if state == {FULL}:
                f = j0
                break
            for j in range(j0, min(j0 + bk, sk)):
                if {visible}:
                    f = j
                    break
            if f >= 0:
                break
        e = -2
        if f >= 0:
            for kb in range(nkb - 1, -1, -1):
                state = st[qb, kb]
                if state == {EMPTY}:
                    continue
                j1 = min(kb * bk + bk, sk)
                if state == {FULL}:
                    e = j1 - 1
                    break
                for j in range(j1 - 1, kb * bk - 1, -1):
                    if {visible}:
                        e = j
                        break
                if e >= 0:
                    break
        first[i] = f
        last[i] = e
        cnt = 0
        if f >= 0:
            for kb in range(f // bk, e // bk + 1):
                state = st[qb, kb]
                j0 = kb * bk
                j1 = min(j0 + bk, sk)
                if state == {FULL}:
                    cnt += j1 - j0
                elif state == {PARTIAL}:
                    for j in range(j0, j1):
                        if {visible}:
                            cnt += 1
        dense[i] = f >= 0 and cnt == e - f + 1
'''
    text = "\n".join([_HEADER, _micro_tag(), _passes(sp, mp), *sp.lines, *mp.lines, body])
    return text, {**sp.inject, **mp.inject}, sp, mp


def _micro_tag():
    # The micro-kernels' shapes and vector width are compiled into forward_job: part of the
    # text, so that the hash (and numba's disk cache) changes with them.
    from . import _flex_micro as m

    return (f"# band path: {m.VERSION}, QK {m.QK_ROWS}/{m.QK_TAIL}x{m.QK_VECS}, "
            f"PV {m.PV_ROWS}x{m.PV_VECS}, {m.VEC_BYTES}-byte vectors")


def _passes(sp, mp):
    # Whether the kernels take each function's captured arrays as parameters (they do unless
    # the function had no source and numba froze what it captured).
    return (f"_PASS_SMOD = {getattr(sp, 'src', None) is not None}\n"
            f"_PASS_MMOD = {getattr(mp, 'src', None) is not None}")


def _backward_text(smod, mmod, nargs, mask_takes_args, diff_args):
    """``diff_args``: positions of the floating score_mod_args that get a gradient."""
    args = _arg_names(nargs)
    margs = args if mask_takes_args else []
    sp = _Part(smod, "_smod")
    mp = _Part(mmod, "_mmod")
    sites = []
    lines = []
    if smod is not None:
        if sp.src is None:
            raise cg.FlexCompileError(
                "score_mod: flex_attention_backward differentiates score_mod from its source, "
                f"which Python cannot find for {smod.fn.__name__} (defined in `python -c` or "
                "a plain REPL?); define it in a file, a notebook cell or IPython"
            )
        params = [a.arg for a in sp.src.node.args.args]
        names = {params[5 + i]: i for i in diff_args}
        deriv = cg.differentiate(sp.src, smod, names, "_smod_ad")
        sites = deriv.sites
        lines += ["@_numba.njit(**_INLINE)", deriv.text]
    grads = [f"_g{i}" for i in diff_args]
    params = ", ".join([*args, *sp.extra, *mp.extra, *grads])
    tail = f", {params}" if params else ""
    visible = mp.call(["b", "h", "i", "j"], margs) if mmod else "True"
    nsites = len(sites)
    if smod is not None:
        ad = sp.call(["s[r, c]", "b", "h", "i", "j"], args).replace("_smod(", "_smod_ad(", 1)
        first = f"res = {ad}\n{' ' * 28}p[r, c] = res[0]\n{' ' * 28}tt[r, c] = res[1]"
    else:
        first = "p[r, c] = s[r, c]"
    scatter = ""
    if sites:
        ad = sp.call(["s[r, c]", "b", "h", "i", "j"], args).replace("_smod(", "_smod_ad(", 1)
        adds = "\n".join(
            f"{' ' * 24}_g{arg}[res[{2 + nsites + n}]] += ds * res[{2 + n}]"
            for n, arg in enumerate(sites)
        )
        scatter = f"""
                    if ds != 0.0:
                        res = {ad}
{adds}"""
    dscore = "ds * tt[r, c]" if smod is not None else "ds"
    body = f'''
@_numba.njit(**_JIT)
def backward_job(q, k2, v2, dout, out, lse, dq, dk2, dv2, scale, hq, b, g, G, bqs, bqf, qlo, qhi,
                 qbs, ptr, kbs, kst, ka, kz, bk, maxw, kc2, kcum, qbad{tail}):
    # As forward_job; dk2, dv2: this job's accumulators (Sk, D), (Sk, Dv) of its kv head;
    # dq rows of the job's query groups are its own. _g*: private gradients of the floating
    # score_mod_args. kcum (Sk + 1): prefix counts of the keys whose k or v holds NaN/inf,
    # kc2: k2 with those rows at 0; qbad (B*Hq, Sq) int8 (or (1, 0) when none): the query
    # rows whose q, dout or out does. A tile that meets such rows or keys takes the exact
    # steps: its hidden pairs are held at exactly 0.
    sk = k2.shape[0]
    D = q.shape[2]
    Dv = v2.shape[1]
    rmax = G * bqs
    qt = _np.empty((rmax, D), q.dtype)
    do = _np.empty((rmax, Dv), q.dtype)
    delta = _np.empty(rmax, q.dtype)
    lse_t = _np.empty(rmax, q.dtype)
    dq_acc = _np.empty((rmax, D), q.dtype)
    dq_part = _np.empty((rmax, D), q.dtype)
    sbuf = _np.empty(rmax * maxw, q.dtype)
    pbuf = _np.empty(rmax * maxw, q.dtype)
    tbuf = _np.ones(rmax * maxw, q.dtype)
    dpbuf = _np.empty(rmax * maxw, q.dtype)
    kpart = _np.empty(maxw * max(D, Dv), q.dtype)
    anyq = qbad.shape[1] != 0
    nx = rmax if anyq or kcum[sk] else 0
    qc = _np.zeros((nx if anyq else 0, D), q.dtype)
    dc = _np.zeros((nx if anyq else 0, Dv), q.dtype)
    rcum = _np.zeros(rmax + 1, _np.int64)
    vbuf = _np.empty(nx * maxw, _np.bool_)
    ridx = _np.empty(rmax, _np.int64)
    cidx = _np.empty(maxw, _np.int64)
    vis = vbuf[:0].reshape((0, 0))
    for n in range(qbs.shape[0]):
        q0 = qlo[qbs[n]]
        nq = qhi[qbs[n]] - q0
        rows = G * nq
        if anyq:
            for r in range(nq):
                for hh in range(G):
                    x = r * G + hh
                    rcum[x + 1] = rcum[x] + qbad[b * hq + g * G + hh, q0 + r]
        for r in range(nq):
            for hh in range(G):
                row = b * hq + g * G + hh
                x = r * G + hh
                total = 0.0
                for c in range(D):
                    qt[x, c] = q[row, q0 + r, c] * scale
                for c in range(Dv):
                    do[x, c] = dout[row, q0 + r, c]
                    total += dout[row, q0 + r, c] * out[row, q0 + r, c]
                delta[x] = total
                y = lse[row, q0 + r]
                # Rows with no visible key have lse = -inf; +inf makes their P exactly 0.
                lse_t[x] = _np.inf if y == -_np.inf else y
                if anyq:
                    # The products with flagged rows use copies with those rows at 0.
                    bad = rcum[x + 1] != rcum[x]
                    for c in range(D):
                        qc[x, c] = 0.0 if bad else qt[x, c]
                    for c in range(Dv):
                        dc[x, c] = 0.0 if bad else do[x, c]
        dqa = dq_acc[:rows]
        dqa[:] = 0.0
        t = ptr[qbs[n]]
        t_end = ptr[qbs[n] + 1]
        while t < t_end:
            t1 = _segment_end(kbs, ka, kz, t, t_end, bk, maxw)
            r0 = ka[t] * bqf * G
            r1 = min(kz[t] * bqf, nq) * G
            nr = r1 - r0
            k0 = kbs[t] * bk
            k1 = min(kbs[t1 - 1] * bk + bk, sk)
            w = k1 - k0
            s = sbuf[: nr * w].reshape((nr, w))
            p = pbuf[: nr * w].reshape((nr, w))
            tt = tbuf[: nr * w].reshape((nr, w))
            dp = dpbuf[: nr * w].reshape((nr, w))
            qr = qt[r0:r1]
            dor = do[r0:r1]
            _np.dot(qr, k2[k0:k1].T, s)
            for u in range(t, t1):
                c0 = kbs[u] * bk - k0
                c1 = min(c0 + bk, w)
                partial = kst[u] == {PARTIAL}
                for r in range(nr):
                    hh = (r0 + r) % G
                    h = g * G + hh
                    i = q0 + (r0 + r) // G
                    for c in range(c0, c1):
                        j = k0 + c
                        if partial and not ({visible}):
                            p[r, c] = -_np.inf
                        else:
                            {first}
            nbr = 0
            nbc = 0
            if anyq and rcum[r1] != rcum[r0]:
                nbr = _flagged(rcum, r0, nr, ridx)
            if kcum[k1] != kcum[k0]:
                nbc = _flagged(kcum, k0, w, cidx)
            exact = nbr + nbc > 0
            if exact:
                vis = vbuf[: nr * w].reshape((nr, w))
                _visible(p, vis)
            _K.probs_from_lse(p, lse_t[r0:r1])
            if exact:
                # exp(-inf - lse) is NaN where lse is: hidden weights are exactly 0.
                for r in range(nr):
                    for c in range(w):
                        if not vis[r, c]:
                            p[r, c] = 0.0
            kp = kpart[: w * Dv].reshape((w, Dv))
            if nbr:
                _np.dot(p.T, dc[r0:r1], kp)
                _visible_terms(kp, p.T, dor, ridx, nbr, vis.T)  # the terms of p.T @ dor
            else:
                _np.dot(p.T, dor, kp)
            _K.add_rows(dv2[k0:k1], kp)
            _np.dot(dor, v2[k0:k1].T, dp)
            for r in range(nr):
                hh = (r0 + r) % G
                h = g * G + hh
                i = q0 + (r0 + r) // G
                d = delta[r0 + r]
                for c in range(w):
                    j = k0 + c
                    ds = p[r, c] * (dp[r, c] - d)
                    if exact and not vis[r, c]:
                        ds = 0.0{scatter}
                    dp[r, c] = {dscore}
                    if exact and not vis[r, c]:
                        dp[r, c] = 0.0
            if nbc:
                _np.dot(dp, kc2[k0:k1], dq_part[r0:r1])
                _visible_terms(dq_part[r0:r1], dp, k2[k0:k1], cidx, nbc, vis)
            else:
                _np.dot(dp, k2[k0:k1], dq_part[r0:r1])
            _K.add_rows(dqa[r0:r1], dq_part[r0:r1])
            kp = kpart[: w * D].reshape((w, D))
            if nbr:
                _np.dot(dp.T, qc[r0:r1], kp)
                _visible_terms(kp, dp.T, qr, ridx, nbr, vis.T)  # of dp.T @ qr
            else:
                _np.dot(dp.T, qr, kp)
            _K.add_rows(dk2[k0:k1], kp)
            t = t1
        for r in range(nq):
            for hh in range(G):
                for c in range(D):
                    dq[b * hq + g * G + hh, q0 + r, c] = dqa[r * G + hh, c] * scale
'''
    text = "\n".join([_HEADER, _passes(sp, mp), *sp.lines, *mp.lines, *lines, body])
    return text, {**sp.inject, **mp.inject}, sp, mp


def _module(kind, key, make):
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            _modules.move_to_end(key)
            return mod
    text, inject, _, _ = make()
    mod = _import_source(text, kind, inject or None)
    with _lock:
        _modules[key] = mod
        while len(_modules) > _MAX_MODULES:
            _modules.popitem(last=False)
    return mod


def _fn_key(cap):
    if cap is None:
        return None
    if cg.has_source(cap.fn):
        return cap.key
    # Without source numba compiles the object and freezes the arrays it captured.
    return (cap.key, tuple(_digest(a) for a in cap.arrays))


def _digest(a):
    import hashlib

    return (a.shape, a.dtype.str, hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8),
                                                   digest_size=16).hexdigest())


def forward_module(smod, mmod, args, mask_takes_args):
    sig = tuple((np.asarray(a).dtype.str, np.ndim(a)) for a in args)
    key = ("fwd", _fn_key(smod), _fn_key(mmod), sig, mask_takes_args)
    mod = _module("fwd", key, lambda: _forward_text(smod, mmod, len(args), mask_takes_args))
    return mod


def backward_module(smod, mmod, args, mask_takes_args, diff_args):
    sig = tuple((np.asarray(a).dtype.str, np.ndim(a)) for a in args)
    key = ("bwd", _fn_key(smod), _fn_key(mmod), sig, mask_takes_args, tuple(diff_args))
    return _module("bwd", key, lambda: _backward_text(smod, mmod, len(args), mask_takes_args,
                                                      diff_args))


def compile_kernels(smod, mmod, args, mask_takes_args, *, backward=False, diff_args=()):
    """The generated module (compiled by numba on its first call)."""
    if backward:
        return backward_module(smod, mmod, args, mask_takes_args, diff_args)
    return forward_module(smod, mmod, args, mask_takes_args)


def _call(fn, caps, *a):
    """Call a generated kernel; a Numba typing error is re-raised naming the user function."""
    try:
        return fn(*a)
    except Exception as exc:
        from numba.core.errors import NumbaError

        if not isinstance(exc, NumbaError):
            raise
        text = str(exc)
        smod, mmod = caps
        if smod is not None and "_user_smod" in text:
            who = f"score_mod ({smod.fn.__name__})"
        elif mmod is not None and "_user_mmod" in text:
            who = f"mask_mod ({mmod.fn.__name__})"
        else:
            who = "score_mod/mask_mod"
        raise cg.FlexCompileError(
            f"{who}: Numba could not compile it into the kernel (numbers, math/numpy "
            f"functions, if/else and array reads work):\n{text}"
        ) from None


# --- block mask ----------------------------------------------------------------------------


def block_plan(mod, mmod, args, mask_takes_args, *, batch, hq, hkv, sq, sk, bq, bk):
    """Per (batch, kv head): CSR ``(ptr, kbs, kst)`` of the visible key blocks (cached).

    Query block ``qb`` sees the key blocks ``kbs[ptr[qb]:ptr[qb + 1]]`` in states ``kst``.
    ``mask_mod`` is evaluated on every (query, key) pair once per shape: per batch element
    only if it reads ``b``, per head only if it reads ``h``.
    """
    nqb, nkb = -(-sq // bq), -(-sk // bk)
    G = hq // hkv
    if mmod is None:
        return _dense_plan(sq, sk, bq, bk)
    dep_b = "b" in _reads(mmod, 0)
    dep_h = "h" in _reads(mmod, 1)
    margs = args if mask_takes_args else ()
    nb = batch if dep_b else 1
    nh = hq if dep_h else 1
    content = tuple(_digest(a) for a in (*margs, *mmod.arrays))
    key = (_fn_key(mmod), content, nb, nh, sq, sk, bq, bk, G)
    with _lock:
        hit = _block_cache.get(key)
        if hit is not None:
            _block_cache.move_to_end(key)
            return hit
    states = np.empty((nb, nh, nqb, nkb), np.int8)
    # Each row's first and last visible key: the band path's ranges (forward_job).
    first = np.empty((nb, nh, sq), np.int64)
    last = np.empty((nb, nh, sq), np.int64)
    dense = np.empty((nb, nh, sq), np.int8)
    step = max(1, nqb // (4 * _pool.num_threads()))
    jobs = [(b, h, qb, min(qb + step, nqb)) for b in range(nb) for h in range(nh)
            for qb in range(0, nqb, step)]
    extra = (*margs, *(mmod.arrays if mod._PASS_MMOD else ()))

    def job(j):
        b, h, qb0, qb1 = j
        _call(mod.block_states, (None, mmod), b, h, sq, sk, bq, bk, qb0, qb1, states[b, h], *extra)
        _call(mod.row_bounds, (None, mmod), b, h, sq, sk, bq, bk, qb0, qb1, states[b, h],
              first[b, h], last[b, h], dense[b, h], *extra)

    _pool.run_jobs(job, jobs)
    # A GQA group's stacked rows: empty if every head's block is, full if every head's is.
    if dep_h:
        st = states.reshape(nb, hkv, G, nqb, nkb)
        lo, hi = st.min(axis=2), st.max(axis=2)
        comb = np.where(hi == EMPTY, EMPTY, np.where(lo == FULL, FULL, PARTIAL)).astype(np.int8)
    else:
        comb = states
    csr = {(bi, gi): _group_rows(comb[bi, gi], bq, sq)
           for bi in range(comb.shape[0]) for gi in range(comb.shape[1])}
    plan = {"csr": csr, "dep_b": dep_b, "dep_h": dep_h, "first": first, "last": last,
            "dense": dense}
    plan["bytes"] = sum(x.nbytes for c in csr.values() for x in c) + sum(
        x.nbytes for x in (first, last, dense))
    with _lock:
        _block_cache[key] = plan
        while sum(p["bytes"] for p in _block_cache.values()) > _MAX_BLOCK_BYTES:
            _block_cache.popitem(last=False)
    return plan


# Fine query blocks are grouped MERGE_ROWS at a time into one tall block of rows (256 rows
# of 64-row fine blocks). Each visible key block is multiplied only with the rows of the fine
# blocks that see it (the hull from the first to the last), so the middle of a band runs in
# tall tiles (measured 91 GFLOP per CPU-second against 71 for 64-row tiles, dense) while its
# edges waste no more than 64-row tiles would.
MERGE_ROWS = 4


def _group_rows(st, bq, sq):
    """``(qlo, qhi, ptr, kbs, kst, ka, kz)`` of the query groups of one (batch, kv head).

    ``st`` is the ``(n_fine_blocks, n_key_blocks)`` state table. Group ``n`` holds the query
    rows ``[qlo[n], qhi[n])``; it sees the key blocks ``kbs[ptr[n]:ptr[n + 1]]``, each from
    its fine blocks ``[ka, kz)`` (relative to the group), full (``kst``) only if every fine
    block of that range sees the whole key block.
    """
    nqb, nkb = st.shape
    lo, hi, kbs_l, kst_l, ka_l, kz_l, counts = [], [], [], [], [], [], []
    for f0 in range(0, nqb, MERGE_ROWS):
        sub = st[f0:f0 + MERGE_ROWS]
        m = sub.shape[0]
        vis = sub != EMPTY
        cols = np.flatnonzero(vis.any(axis=0))
        first = np.argmax(vis[:, cols], axis=0)
        last = m - np.argmax(vis[::-1, cols], axis=0)
        notfull = np.zeros((m + 1, len(cols)), np.int64)
        np.cumsum(sub[:, cols] != FULL, axis=0, out=notfull[1:])
        full = notfull[last, np.arange(len(cols))] == notfull[first, np.arange(len(cols))]
        lo.append(f0 * bq)
        hi.append(min((f0 + m) * bq, sq))
        kbs_l.append(cols)
        kst_l.append(np.where(full, FULL, PARTIAL))
        ka_l.append(first)
        kz_l.append(last)
        counts.append(len(cols))
    ptr = np.zeros(len(lo) + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return (np.array(lo, np.int64), np.array(hi, np.int64), ptr, cat(kbs_l, np.int64),
            cat(kst_l, np.int8), cat(ka_l, np.int64), cat(kz_l, np.int64))


@lru_cache(maxsize=32)
def _dense_plan(sq, sk, bq, bk):
    st = np.full((-(-sq // bq), -(-sk // bk)), FULL, np.int8)
    # Every block is full: the band path (chunks with partial blocks) never runs.
    none = np.zeros((1, 1, 1), np.int64)
    return {"csr": {(0, 0): _group_rows(st, bq, sq)}, "dep_b": False, "dep_h": False,
            "first": none, "last": none, "dense": none.astype(np.int8)}


def _reads(cap, pos):
    """The parameter name at ``pos`` if the function reads it."""
    params = cap.params
    return {params[pos]} & cap.reads if pos < len(params) else set()


def _csr(plan, b, g):
    return plan["csr"][(b if plan["dep_b"] else 0, g if plan["dep_h"] else 0)]


# Keys per matmul at most: runs of visible key blocks up to this width are one tile.
MAX_TILE_K = 512
# Jobs per worker thread: enough to balance uneven (causal) query blocks.
_JOBS_PER_THREAD = 4
# The forward's: twice as many, in contiguous runs of query groups. On a shared machine one
# worker is often slower than the other (measured 26 against 31-41 ms for the same head of a
# window); smaller jobs shorten the tail that the faster worker waits for.
_FWD_JOBS_PER_THREAD = 8


def _jobs(plan, batch, hkv, per_thread=_JOBS_PER_THREAD, runs=False):
    """``(b, g, qbs)`` jobs: each (b, g)'s query blocks dealt out in interleaved shares.

    ``runs``: in contiguous runs instead (consecutive query groups of a band share most of
    their keys, which the forward's band path transposes once per job).
    """
    heads = [(b, g) for b in range(batch) for g in range(hkv)]
    want = per_thread * _pool.num_threads()
    most = max(len(c[0]) for c in plan["csr"].values())
    split = 1 if len(heads) >= want else min(most, -(-want // len(heads)))
    jobs = []
    for b, g in heads:
        qlo, _, ptr, _, _, _, _ = _csr(plan, b, g)
        nqb = len(qlo)
        for part in range(split):
            if runs:
                qbs = np.arange(part * nqb // split, (part + 1) * nqb // split, dtype=np.int64)
            else:
                qbs = np.arange(part, nqb, split, dtype=np.int64)
            if len(qbs):
                cost = int(np.sum(ptr[qbs + 1] - ptr[qbs]))
                jobs.append((cost, len(jobs), b, g, qbs))
    return jobs, split


def _tail_split(plan, jobs):
    """The jobs longest first, the last ``2 * threads`` of them cut in two contiguous halves.

    A worker that meets a slow stretch (on this machine: the output's first-touch page
    faults, ~0.3-6 ms each) finishes its last job late while the other waits; short jobs at
    the end bound that wait. Only the tail is cut: more jobs throughout cost the causal
    forward its key reuse between consecutive groups (docs/dev/perf_flex.rst).
    """
    jobs = sorted(jobs, key=lambda j: -j[0])
    if not TAIL_SPLIT:
        return jobs
    n = 2 * _pool.num_threads()
    if len(jobs) < 2 or n < 2:
        return jobs
    head, tail = jobs[:-n], []
    for cost, i, b, g, qbs in jobs[-n:]:
        if len(qbs) < 2:
            tail.append((cost, i, b, g, qbs))
            continue
        ptr = _csr(plan, b, g)[2]
        for part in (qbs[: len(qbs) // 2], qbs[len(qbs) // 2:]):
            tail.append((int(np.sum(ptr[part + 1] - ptr[part])), i, b, g, part))
    return head + sorted(tail, key=lambda j: -j[0])


TAIL_SPLIT = True


# --- launches ------------------------------------------------------------------------------

# Whether chunks with partial blocks may take the band path of forward_job (register-blocked
# micro-kernels over each row's visible range: :mod:`._flex_micro`).
BAND_PATH = True


def _micro_fits(dtype, dv):
    """The band path's P @ V kernels cover ``dv`` in whole vectors."""
    from . import _flex_micro

    return dv % (_flex_micro.VEC_BYTES // np.dtype(dtype).itemsize) == 0


# Each thread's scratch for forward_job, kept between calls (grown, never shrunk): a few MB
# per worker thread and dtype (2.4 MB for float32 at D = 64, more for wide GQA groups, plus 8
# bytes per key). Thread-local, so the jobs that run at the same time never share it; a job
# that runs in the calling thread (no pool, or a nested call) uses that thread's.
_tls = threading.local()


def _scratch(dtype, nf, ni):
    """This thread's ``(floats of dtype, int64s)`` scratch with at least ``nf``, ``ni`` items."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    key = np.dtype(dtype).str
    f, i = bufs.get(key, (None, None))
    if f is None or f.shape[0] < nf:
        f = np.empty(nf, dtype)
    if i is None or i.shape[0] < ni:
        i = np.empty(ni, np.int64)
    bufs[key] = (f, i)
    return f, i


def forward(q3, k3, v3, out3, lse2, *, scale, batch, hq, hkv, smod, mmod, args,
            mask_takes_args):
    """Run on ``(B*H, S, D)`` float32/float64 NumPy arrays, writing ``out3`` and ``lse2``."""
    mod = compile_kernels(smod, mmod, args, mask_takes_args)
    sq, sk = q3.shape[1], k3.shape[1]
    G = hq // hkv
    bq, bk = block_q(G), BLOCK_K
    plan = block_plan(mod, mmod, args, mask_takes_args, batch=batch, hq=hq, hkv=hkv,
                      sq=sq, sk=sk, bq=bq, bk=bk)
    extra = _extra(mod, smod, mmod, args)
    scale = q3.dtype.type(scale)
    jobs, _ = _jobs(plan, batch, hkv, _FWD_JOBS_PER_THREAD, runs=True)
    # (The keys whose values are not finite are found inside the jobs: forward_job.)

    bqmax = bq * MERGE_ROWS
    micro = BAND_PATH and mmod is not None and _micro_fits(v3.dtype, v3.shape[2])

    nf, ni = mod.forward_scratch(G * bqmax, q3.shape[2], v3.shape[2], sk, MAX_TILE_K, micro,
                                 q3.dtype.itemsize)

    def job(j):
        _, _, b, g, qbs = j
        qlo, qhi, ptr, kbs, kst, ka, kz = _csr(plan, b, g)
        kv = b * hkv + g
        bi = b if plan["dep_b"] else 0
        fws, iws = _scratch(q3.dtype, nf, ni)
        return _call(mod.forward_job, (smod, mmod), q3, k3[kv], v3[kv], out3, lse2,
              scale, hq, b, g, G, bqmax, bq, qlo, qhi, qbs, ptr, kbs, kst, ka, kz, bk,
              MAX_TILE_K, micro, plan["first"][bi],
              plan["last"][bi], plan["dense"][bi], fws, iws, *extra)

    counts = []
    _pool.run_jobs(lambda j: counts.append(job(j)), _tail_split(plan, jobs))
    last_forward["band_chunks"] = int(sum(counts))


# What the last forward call did (for tests and benchmarks; not thread-safe across calls).
last_forward = {"band_chunks": 0}


def _cleaned(x3, flags):
    """``(x3 with its flagged rows at 0, prefix counts of the flags per leading index)``.

    Without flagged rows, ``x3`` itself and one row of zeros (shared by every job).
    """
    n = x3.shape[1]
    if flags is None:
        return x3, np.zeros((1, n + 1), np.int64)
    cum = np.zeros((flags.shape[0], n + 1), np.int64)
    np.cumsum(flags, axis=1, out=cum[:, 1:])
    flat = x3.reshape(-1, x3.shape[2])
    return clean_rows(np, flat, np.flatnonzero(flags)).reshape(x3.shape), cum


def _extra(mod, smod, mmod, args):
    """The kernels' trailing arguments: score_mod_args, then each function's arrays."""
    return (*args, *(smod.arrays if smod is not None and mod._PASS_SMOD else ()),
            *(mmod.arrays if mmod is not None and mod._PASS_MMOD else ()))


def backward(dout3, q3, k3, v3, out3, lse2, *, scale, batch, hq, hkv, smod, mmod, args,
             mask_takes_args, diff_args):
    """Return ``(dq3, dk3, dv3, grads)``; ``grads[n]`` (float64) for ``args[diff_args[n]]``."""
    fwd = compile_kernels(smod, mmod, args, mask_takes_args)
    mod = compile_kernels(smod, mmod, args, mask_takes_args, backward=True,
                          diff_args=diff_args)
    sq, sk, D, Dv = q3.shape[1], k3.shape[1], q3.shape[2], v3.shape[2]
    cd = q3.dtype
    G = hq // hkv
    bq, bk = block_q(G), BLOCK_K
    plan = block_plan(fwd, mmod, args, mask_takes_args, batch=batch, hq=hq, hkv=hkv,
                      sq=sq, sk=sk, bq=bq, bk=bk)
    extra = _extra(mod, smod, mmod, args)
    dq3 = np.empty_like(q3)
    dk3 = np.zeros((batch * hkv, sk, D), cd)
    dv3 = np.zeros((batch * hkv, sk, Dv), cd)
    jobs, split = _jobs(plan, batch, hkv)
    partial = {}
    scale_t = cd.type(scale)
    # Rows whose products may be NaN/inf (issue #9 item 6); one pass over each input.
    with _pool.blas_limit():  # see forward()
        kc3, kcum = _cleaned(k3, bad_flags(np, (k3, v3), cd))
        qflags = bad_flags(np, (q3, dout3, out3), cd)
    qbad = np.zeros((1, 0), np.int8) if qflags is None else qflags.astype(np.int8)

    bqmax = bq * MERGE_ROWS

    def job(j):
        _, n, b, g, qbs = j
        qlo, qhi, ptr, kbs, kst, ka, kz = _csr(plan, b, g)
        if split > 1:  # several jobs share this kv head: private sums, added below
            dk2 = np.zeros((sk, D), cd)
            dv2 = np.zeros((sk, Dv), cd)
        else:
            dk2, dv2 = dk3[b * hkv + g], dv3[b * hkv + g]
        grads = tuple(np.zeros(np.shape(args[i]), np.float64) for i in diff_args)
        _call(mod.backward_job, (smod, mmod), q3, k3[b * hkv + g], v3[b * hkv + g], dout3,
              out3, lse2, dq3, dk2, dv2, scale_t, hq, b, g, G, bqmax, bq, qlo, qhi, qbs, ptr,
              kbs, kst, ka, kz, bk, MAX_TILE_K, kc3[b * hkv + g],
              kcum[min(b * hkv + g, len(kcum) - 1)], qbad, *extra, *grads)
        partial[n] = (dk2 if split > 1 else None, dv2 if split > 1 else None, grads)

    _pool.run_jobs(job, sorted(jobs, key=lambda j: -j[0]))
    grads = [np.zeros(np.shape(args[i]), np.float64) for i in diff_args]
    # Partial sums added in job order, not finishing order: bitwise reproducible.
    for _, n, b, g, _ in jobs:
        dk2, dv2, gr = partial[n]
        if dk2 is not None:
            dk3[b * hkv + g] += dk2
            dv3[b * hkv + g] += dv2
        for acc, x in zip(grads, gr, strict=False):
            acc += x
    return dq3, dk3, dv3, grads
