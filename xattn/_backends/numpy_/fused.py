"""Fused CPU flash attention: BLAS-sized matmuls around numba kernels, on a thread pool.

The same algorithm as :mod:`xattn._backends.numpy_.tiled` (whose helpers it reuses, and whose
results it matches), arranged for a multi-core CPU:

* Work is cut into independent jobs run on a pool of Python threads (one per core,
  :mod:`._pool`), with BLAS held at one thread inside each job; the matmuls and the ``nogil``
  numba kernels release the GIL, so the cores run jobs in parallel.
* Forward job = (batch element, kv head, query block). The ``G`` query heads sharing the kv
  head are stacked into one ``(G * bq, D)`` block, so k and v are never repeated. Per key tile::

      s = q_blk @ k_tile.T            BLAS, into a buffer reused across tiles
      score mods (if any)             xattn._masking.apply_score_mods, in place
      m, l, acc, s <- online softmax  one numba pass: row max, exp2, row sum, rescale acc
      acc += s @ v_tile               BLAS

  Runs of consecutive tiles that need no score mods (float32/float64 contiguous k, v) go to
  :func:`._fused_kernels.forward_tiles` in one call, which does the same with numba's
  ``np.dot``: the interpreter and the GIL stay out of the inner loop (+7% measured).

* Backward (FlashAttention-2 recomputation from ``lse``): job = (batch element, kv head,
  share of the query blocks). A job owns ``dq`` of its query blocks and accumulates ``dk``,
  ``dv`` of its kv head; when there are fewer kv heads than threads, the query blocks are
  split over several jobs, each with private ``dk``/``dv`` partials that are added in a fixed
  order (no races, no atomics, and the same bits on every run).

Memory per worker: one score tile (plus the ``dP`` tile in the backward pass) and O(block)
row state, so the extra memory is independent of the sequence length.
"""

from __future__ import annotations

import threading

import numpy as np

from ... import _masking, _plans
from . import _pool
from .tiled import (
    _tile_args,
    _visible_product,
    _zero_hidden,
    add_dbias,
    as4d,
    bad_flags,
    bad_index,
    dbias_buffer,
    tile_space,
)

# Score rows per tile, shared by the heads of a GQA group, and keys per tile. 256 x 512
# float32 scores are 512 KiB, the L2 of one core of the development machine: the tile is
# written by one matmul, rewritten by the softmax pass and read by the next matmul while
# (mostly) cached. Measured against 128 x 512 (half the tile): 5-10% faster forward (fewer
# tiles, so less Python overhead per FLOP, and k/v tiles re-read half as often); 128 x 256,
# 256 x 256 and 128 x 1024 were slower or equal (docs/dev/perf_cpu.rst).
BLOCK_ROWS = 256
BLOCK_K = 512
# Query rows per head never drop below this (large GQA groups), so each head's slice of a
# tile keeps BLAS-friendly sizes.
MIN_BLOCK_Q = 16
# Backward: aim for at least this many jobs per worker thread so the cores stay balanced.
_JOBS_PER_THREAD = 2


def _kernels():
    from . import _fused_kernels

    return _fused_kernels


def numba_missing():
    """None when the packages of the numba kernels import, else the reason (every numba
    kernel module -- flash, decode -- checks this before it loads)."""
    try:
        import numba  # noqa: F401
        import scipy  # noqa: F401  (its BLAS serves numba's np.dot in the kernels)
        import threadpoolctl  # noqa: F401
    except ImportError as exc:
        return f"needs numba, scipy and threadpoolctl (pip install 'xattn[numba]'): {exc}"
    return None


def host_reason(prob):
    """Why the numba kernels cannot take this problem at all (numba missing, or arrays not
    on the host), or None."""
    why = numba_missing()
    if why is None and prob.xp is not np:
        why = "runs on NumPy arrays only"
    return why


def supports(prob, opts, op):
    """None when this backend serves the request, else the reason it cannot."""
    why = host_reason(prob)
    if why is not None:
        return why
    # A BlockMask travels in prob (forward/backward walk its plan); a window's plan arrives
    # as plan + element_rule.
    unknown = set(opts) - {"plan", "element_rule", "allow_tf32", "deterministic",
                           "return_dbias"}
    if unknown:
        return f"options not handled by this backend: {sorted(unknown)}"
    return None


def block_q(prob) -> int:
    """Query rows per head in one tile: ``G * block_q`` rows fill a ``BLOCK_ROWS`` tile."""
    return max(MIN_BLOCK_Q, BLOCK_ROWS // prob.group)


def plan_of(prob, plan, element_rule):
    """``(plan, element_rule)``: :func:`xattn._plans.cpu_plan` (those handed over, else the
    problem's block mask's), else the causal/window tiles sized by :func:`block_q`."""
    plan, element_rule = _plans.cpu_plan(prob, plan, element_rule)
    if plan is None:
        plan = _masking.tile_plan(prob.sq, prob.sk, block_q(prob), BLOCK_K, prob.causal,
                                  prob.window)
    return plan, element_rule


def _head_chunks(g, G, bq):
    """Query-head ranges of kv head ``g`` whose stacked rows fill at most one tile.

    The default plan sizes query blocks so that the whole group fits; plans from elsewhere
    (a BlockMask's blocks) may not, and one matmul over ``G * bq`` rows would then spill
    the score tile out of L2.
    """
    per = max(1, BLOCK_ROWS // bq)
    return [(h, min(h + per, (g + 1) * G)) for h in range(g * G, (g + 1) * G, per)]


def _needs_mods(prob, element_rule):
    """``needs(full)``: whether a tile must go through apply_score_mods at all."""
    always = prob.has_score_mods
    partial = prob.causal or prob.window is not None or element_rule is not None

    def needs(full):
        return always or (partial and not full)

    return needs


def _as_cd(x, cd):
    """Contiguous ``cd`` copy of a tile only when needed (16-bit or strided inputs)."""
    if x.dtype != cd:
        return x.astype(cd, order="C")
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _compiled_ok(x, cd):
    """Whether a per-head k/v array can go to :func:`forward_tiles` as is."""
    return x.dtype == cd and x.flags.c_contiguous


def _widest(plan):
    return max((k1 - k0 for _, _, tiles in plan for k0, k1, _ in tiles), default=0)


def forward(prob, q, k, v, *, plan=None, element_rule=None, allow_tf32=False):
    """Return ``(out, lse)``; see :func:`xattn._backends.numpy_.tiled.forward` for ``plan``."""
    if _masking.no_pairs(prob):
        return _masking.empty_forward(prob)
    K = _kernels()
    cd, G, D, Dv = prob.cdtype, prob.group, prob.d, prob.dv
    plan, element_rule = plan_of(prob, plan, element_rule)
    q4, k4, v4 = as4d(q, prob), as4d(k, prob), as4d(v, prob)
    views = _masking.score_operands(np, prob, tile_space(prob))
    needs_mods = _needs_mods(prob, element_rule)
    out = np.empty((*prob.batch, prob.hq, prob.sq, Dv), dtype=prob.dtype)
    lse = np.empty((*prob.batch, prob.hq, prob.sq), dtype=cd)
    out4, lse4 = out, lse  # allocated with a head axis already, even for 2-D inputs
    scale = cd.type(prob.scale)
    width = _widest(plan)
    # Under the one-thread limit: NumPy's BLAS threads would spin on after this product and
    # take the cores from the jobs that follow (measured: 77-79 -> 87-88 GFLOP per CPU-second).
    with _pool.blas_limit():
        bad_keys = bad_flags(np, (v4,), cd)  # keys whose values must stay out of hidden pairs

    @_masking.quiet
    def job(args):
        bidx, g, h0, h1, q0, q1, tiles = args
        nh, bq = h1 - h0, q1 - q0
        rows = nh * bq
        bad_g = None if bad_keys is None else bad_keys[bidx][g]
        qt = np.empty((nh, bq, D), dtype=cd)
        qt[...] = q4[bidx][h0:h1, q0:q1]
        qt *= scale
        q2 = qt.reshape(rows, D)
        m = np.full(rows, -np.inf, dtype=cd)
        l = np.zeros(rows, dtype=cd)
        acc = np.zeros((rows, Dv), dtype=cd)
        pv = np.empty((rows, Dv), dtype=cd)
        sbuf = np.empty(rows * width, dtype=cd)
        kg, vg = k4[bidx][g], v4[bidx][g]
        compiled = _compiled_ok(kg, cd) and _compiled_ok(vg, cd)
        run = []  # consecutive plain tiles, handed to compiled code in one call
        for k0, k1, full in tiles:
            mods = needs_mods(full)
            bad = None if bad_g is None else bad_index(np, bad_g[k0:k1])
            if compiled and not mods and bad is None:
                run.append((k0, k1))
                continue
            if run:
                K.forward_tiles(q2, kg, vg, np.array(run), m, l, acc, sbuf, pv)
                run = []
            kt, vt = _as_cd(kg[k0:k1], cd), _as_cd(vg[k0:k1], cd)
            s = sbuf[: rows * (k1 - k0)].reshape(rows, k1 - k0)
            np.matmul(q2, kt.T, out=s)
            if mods:
                _masking.apply_score_mods(
                    np,
                    s.reshape(nh, bq, k1 - k0),
                    **_tile_args(prob, views, bidx, h0, h1, q0, q1, k0, k1, full, element_rule),
                )
            if bad is not None:  # visibility of the non-finite keys, before s becomes P
                vis = s[:, bad] != -np.inf
            K.online_softmax_tile(s, m, l, acc)
            if bad is None:
                np.matmul(s, vt, out=pv)
            else:
                pv[...] = _visible_product(np, s, vt, bad, vis)
            K.add_rows(acc, pv)
        if run:
            K.forward_tiles(q2, kg, vg, np.array(run), m, l, acc, sbuf, pv)
        lse_rows = np.empty(rows, dtype=cd)
        K.finish_rows(acc, m, l, lse_rows)
        out4[bidx][h0:h1, q0:q1] = acc.reshape(nh, bq, Dv)
        lse4[bidx][h0:h1, q0:q1] = lse_rows.reshape(nh, bq)

    jobs = [
        (bidx, g, h0, h1, q0, q1, tiles)
        for bidx in np.ndindex(*prob.batch)
        for g in range(prob.hkv)
        for q0, q1, tiles in plan
        for h0, h1 in _head_chunks(g, G, q1 - q0)
    ]
    # Longest first (causal blocks differ in length): the pool ends on short jobs.
    jobs.sort(key=lambda j: -(j[3] - j[2]) * (j[5] - j[4]) * sum(t[1] - t[0] for t in j[6]))
    _pool.run_jobs(job, jobs)
    if not prob.heads_axis:
        out, lse = out[0], lse[0]
    return out, lse


def backward(prob, dout, q, k, v, out, lse, *, plan=None, element_rule=None,
             deterministic=False, return_dbias=False):
    """Return ``(dq, dk, dv)`` (and ``dbias``), recomputing the scores tile by tile from
    ``lse``."""
    if _masking.no_pairs(prob):
        grads = _masking.empty_backward(prob)
        return (*grads, dbias_buffer(np, prob)[0]) if return_dbias else grads
    K = _kernels()
    cd, G, D, Dv = prob.cdtype, prob.group, prob.d, prob.dv
    plan, element_rule = plan_of(prob, plan, element_rule)
    q4, k4, v4 = as4d(q, prob), as4d(k, prob), as4d(v, prob)
    do4, o4, lse4 = as4d(dout, prob), as4d(out, prob), as4d(lse, prob)
    views = _masking.score_operands(np, prob, tile_space(prob))
    needs_mods = _needs_mods(prob, element_rule)
    dq = np.empty((*prob.batch, prob.hq, prob.sq, D), dtype=prob.dtype)
    # dk/dv accumulate over query blocks: in the compute dtype, cast at the end if needed.
    dk = np.zeros((*prob.batch, prob.hkv, prob.sk, D), dtype=cd)
    dv = np.zeros((*prob.batch, prob.hkv, prob.sk, Dv), dtype=cd)
    dq4, dk4, dv4 = dq, dk, dv  # allocated with a head axis already, even for 2-D inputs
    scale = cd.type(prob.scale)
    width = _widest(plan)
    softcap = prob.softcap is not None
    with _pool.blas_limit():  # see forward()
        bad_q = bad_flags(np, (q4, do4, o4), cd)  # rows whose delta or products may be NaN
        bad_k = bad_flags(np, (k4, v4), cd)
    lock = threading.Lock()
    dbias, dpad = dbias_buffer(np, prob) if return_dbias else (None, None)

    @_masking.quiet
    def job(args):
        bidx, g, qblocks, private, _ = args
        kg, vg = k4[bidx][g], v4[bidx][g]
        if private:
            dk_acc = np.zeros((prob.sk, D), dtype=cd)
            dv_acc = np.zeros((prob.sk, Dv), dtype=cd)
        else:
            dk_acc, dv_acc = dk4[bidx][g], dv4[bidx][g]
        items = [(q0, q1, tiles, h0, h1) for q0, q1, tiles in qblocks
                 for h0, h1 in _head_chunks(g, G, q1 - q0)]
        rows_max = max((h1 - h0) * (q1 - q0) for q0, q1, _, h0, h1 in items)
        sbuf = np.empty(rows_max * width, dtype=cd)
        dpbuf = np.empty(rows_max * width, dtype=cd)
        tbuf = np.empty(rows_max * width, dtype=cd) if softcap else None
        kbuf = np.empty(width * max(D, Dv), dtype=cd)
        for q0, q1, tiles, h0, h1 in items:
            nh, bq = h1 - h0, q1 - q0
            rows = nh * bq
            brows = None if bad_q is None else bad_index(
                np, bad_q[bidx][h0:h1, q0:q1].reshape(-1))
            qt = np.empty((nh, bq, D), dtype=cd)
            qt[...] = q4[bidx][h0:h1, q0:q1]
            qt *= scale
            q2 = qt.reshape(rows, D)
            do2 = np.empty((nh, bq, Dv), dtype=cd)
            do2[...] = do4[bidx][h0:h1, q0:q1]
            do2 = do2.reshape(rows, Dv)
            o2 = np.empty((nh, bq, Dv), dtype=cd)
            o2[...] = o4[bidx][h0:h1, q0:q1]
            # delta_i = sum_j P_ij dP_ij = dO_i . O_i
            delta = np.empty(rows, dtype=cd)
            K.row_dots(do2, o2.reshape(rows, Dv), delta)
            lse_t = lse4[bidx][h0:h1, q0:q1].astype(cd).reshape(rows)
            # Rows with no visible key have lse = -inf; +inf makes their P exactly 0.
            lse_t[np.isneginf(lse_t)] = np.inf
            dq_acc = np.zeros((rows, D), dtype=cd)
            dq_part = np.empty((rows, D), dtype=cd)
            # Unlike the forward pass, a compiled loop over plain tiles (numba's np.dot) was
            # 3-4% slower here than these numpy calls: docs/dev/perf_cpu.rst.
            for k0, k1, full in tiles:
                kw = k1 - k0
                kt, vt = _as_cd(kg[k0:k1], cd), _as_cd(vg[k0:k1], cd)
                s = sbuf[: rows * kw].reshape(rows, kw)
                np.matmul(q2, kt.T, out=s)
                t = tbuf[: rows * kw].reshape(nh, bq, kw) if softcap else None
                if needs_mods(full):
                    _masking.apply_score_mods(
                        np,
                        s.reshape(nh, bq, kw),
                        tanh_out=t,
                        **_tile_args(prob, views, bidx, h0, h1, q0, q1, k0, k1, full,
                                     element_rule),
                    )
                bcols = None if bad_k is None else bad_index(np, bad_k[bidx][g, k0:k1])
                if brows is not None or bcols is not None:
                    _exact_tile(s, t, kt, vt, q2, do2, delta, lse_t, dq_acc,
                                dk_acc[k0:k1], dv_acc[k0:k1], brows, bcols,
                                (bidx, h0, h1, q0, q1, k0, k1))
                    continue
                K.probs_from_lse(s, lse_t)
                kpart = kbuf[: kw * Dv].reshape(kw, Dv)
                np.matmul(s.T, do2, out=kpart)
                K.add_rows(dv_acc[k0:k1], kpart)
                dp = dpbuf[: rows * kw].reshape(rows, kw)
                np.matmul(do2, vt.T, out=dp)
                if dpad is not None:
                    # dbias needs dS of the final scores, before the softcap's chain factor.
                    K.score_grad(s, dp, delta)
                    with lock:
                        add_dbias(dpad, dp.reshape(nh, bq, kw), bidx, h0, h1, q0, q1, k0, k1)
                    if softcap:
                        tr = t.reshape(rows, kw)
                        dp *= 1 - tr * tr
                elif softcap:
                    K.score_grad_softcap(s, dp, delta, t.reshape(rows, kw))
                else:
                    K.score_grad(s, dp, delta)
                np.matmul(dp, kt, out=dq_part)
                K.add_rows(dq_acc, dq_part)
                kpart = kbuf[: kw * D].reshape(kw, D)
                np.matmul(dp.T, q2, out=kpart)
                K.add_rows(dk_acc[k0:k1], kpart)
            dq_acc *= scale
            dq4[bidx][h0:h1, q0:q1] = dq_acc.reshape(nh, bq, D)
        if private:
            _add_in_order(args, dk_acc, dv_acc)

    def _exact_tile(s, t, kt, vt, q2, do2, delta, lse_t, dq_acc, dk_acc, dv_acc, brows,
                    bcols, tile):
        """One tile's steps where non-finite rows meet it: hidden pairs held at exactly 0."""
        vis_r = None if brows is None else s[brows] != -np.inf
        vis_c = None if bcols is None else s[:, bcols] != -np.inf
        vis_rt = None if vis_r is None else vis_r.T
        K.probs_from_lse(s, lse_t)
        # A bad row's lse may be NaN: exp(-inf - NaN) is NaN, but a hidden P is exactly 0.
        _zero_hidden(np, s, brows, vis_r, bcols, vis_c)
        dv_acc += _visible_product(np, s.T, do2, brows, vis_rt)
        dp = do2 @ vt.T
        if dpad is not None:
            K.score_grad(s, dp, delta)
            ds = dp.copy()
            _zero_hidden(np, ds, brows, vis_r, bcols, vis_c)
            bidx, h0, h1, q0, q1, k0, k1 = tile
            with lock:
                add_dbias(dpad, ds.reshape(h1 - h0, q1 - q0, k1 - k0), *tile)
            if softcap:
                tr = t.reshape(s.shape)
                dp *= 1 - tr * tr
        elif softcap:
            K.score_grad_softcap(s, dp, delta, t.reshape(s.shape))
        else:
            K.score_grad(s, dp, delta)
        _zero_hidden(np, dp, brows, vis_r, bcols, vis_c)
        dq_acc += _visible_product(np, dp, kt, bcols, vis_c)
        dk_acc += _visible_product(np, dp.T, q2, brows, vis_rt)

    heads = [(bidx, g) for bidx in np.ndindex(*prob.batch) for g in range(prob.hkv)]
    want = _JOBS_PER_THREAD * _pool.num_threads()
    split = 1 if len(heads) >= want or not heads else min(len(plan), -(-want // len(heads)))
    jobs = []
    for bidx, g in heads:
        for part in range(split):
            # Interleaved shares: causal query blocks grow in length, so each share gets
            # short and long ones alike.
            blocks = plan[part::split]
            if blocks:
                jobs.append((bidx, g, blocks, split > 1, part))
    # The shares' dk/dv partials are added in share order, not in the order the threads
    # finish them, so the gradient is the same bits on every run (for one XATTN_NUM_THREADS,
    # which sets the split). A share that finishes early waits in ``pending`` (memory, not
    # time) until the ones before it are in; shares start in order, so few ever wait.
    pending, next_part = {}, {}

    def _add_in_order(args, dk_acc, dv_acc):
        bidx, g, _, _, part = args
        with lock:
            pending[bidx, g, part] = (dk_acc, dv_acc)
            n = next_part.get((bidx, g), 0)
            while (bidx, g, n) in pending:
                dk_p, dv_p = pending.pop((bidx, g, n))
                K.add_rows(dk4[bidx][g], dk_p)
                K.add_rows(dv4[bidx][g], dv_p)
                n += 1
            next_part[bidx, g] = n

    if dpad is not None and deterministic and _dbias_shared(prob, dpad, split):
        # Jobs add into the same dbias entries: in a fixed order, one job at a time.
        for j in jobs:
            job(j)
    else:
        _pool.run_jobs(job, jobs)
    if prob.dtype != cd:
        dk, dv = dk.astype(prob.dtype), dv.astype(prob.dtype)
    if not prob.heads_axis:
        dq, dk, dv = dq[0], dk[0], dv[0]
    if return_dbias:
        return dq, dk, dv, dbias
    return dq, dk, dv


def _dbias_shared(prob, dpad, split):
    """Whether two backward jobs can add into the same dbias entry (a broadcast bias)."""
    nb = len(prob.batch)
    over_batch = any(dpad.shape[a] == 1 and prob.batch[a] > 1 for a in range(nb))
    return over_batch or (dpad.shape[nb] == 1 and prob.hkv > 1) or (
        dpad.shape[nb + 1] == 1 and split > 1)

