"""Generic tiled flash attention written with array-namespace operations.

Works on NumPy and CuPy alike and supports every option; it is the reference-shaped tiled
implementation that the fused kernels are measured against, and the fallback where no fused
kernel applies. Memory: one ``(G * BLOCK_Q) x BLOCK_K`` score tile at a time plus O(S) state.

Work is split in jobs of (batch element, kv head, query block). The query heads that share a
kv head (GQA group ``G``) are stacked in one matmul against that kv head's key tile, so k and v
are never repeated.
"""

from __future__ import annotations

import math

import numpy as np

from ... import _masking, _plans

# Query rows per tile (per head of a GQA group) and keys per tile. 128 x 512 float32 scores
# are 256 KiB: the tile stays in L2 while it is exponentiated and multiplied.
BLOCK_Q = 128
BLOCK_K = 512


def supports(prob, opts, op):
    return None  # every option, every dtype, any head_dim


def as4d(x, prob):
    """View an input as ``(*batch, H, S, D)`` (2-D inputs become one head)."""
    return x if prob.heads_axis else x[None]


def tile_space(prob) -> tuple:
    """The index space of the CPU backends' tiles, ``(*batch, Hq, Sq, Sk)`` (2-D inputs: one
    head)."""
    return (*prob.batch, prob.hq, prob.sq, prob.sk)


def bad_flags(xp, arrays, cd):
    """Rows holding NaN/inf in any of ``arrays`` (same leading shape), or None if none do.

    Hidden pairs must add exactly 0 (:mod:`xattn._masking`); only the tiles that meet such
    rows take the exact path, so finite inputs cost this one pass over the inputs.
    """
    flags = None
    for x in arrays:
        f = _masking.nonfinite_rows(xp, x, cd)
        flags = f if flags is None else flags | f
    return flags if bool(flags.any()) else None


def bad_index(xp, flags):
    """Indices of the True entries of a small boolean slice, or None when there are none."""
    if flags is None:
        return None
    idx = xp.flatnonzero(flags)
    return idx if idx.size else None


def dbias_buffer(xp, prob):
    """Zeros shaped like the problem's bias in the compute dtype, and a view of it whose dims
    line up with the tile index space ``(*batch, Hq, Sq, Sk)`` (size 1 where the bias
    broadcasts)."""
    bias = prob.bias
    if bias is None:
        return None, None
    dbias = xp.zeros(bias.shape, dtype=prob.cdtype)
    space = 3 + len(prob.batch)
    return dbias, dbias.reshape((1,) * (space - bias.ndim) + tuple(bias.shape))


def add_dbias(dpad, ds, bidx, h0, h1, q0, q1, k0, k1):
    """``dpad[tile] += ds`` for a ``(heads, rows, keys)`` score-gradient tile, summed over the
    dims where the bias broadcasts (dbias of a bias added to the scores is dS itself)."""
    nb = len(bidx)
    index = [0 if dpad.shape[a] == 1 else i for a, i in enumerate(bidx)]
    spans = ((dpad.shape[nb], h0, h1), (dpad.shape[nb + 1], q0, q1), (dpad.shape[nb + 2], k0, k1))
    axes = tuple(a for a, (n, _, _) in enumerate(spans) if n == 1)
    if axes:
        ds = ds.sum(axis=axes, keepdims=True)
    index += [slice(0, 1) if n == 1 else slice(lo, hi) for n, lo, hi in spans]
    dpad[tuple(index)] += ds


def plan_and_views(prob, plan, element_rule):
    """The plan and element rule (:func:`xattn._plans.cpu_plan`: those handed over, else the
    problem's block mask's, else the causal/window tiles of :func:`xattn._plans.tile_plan`)
    and the score operands (:func:`xattn._masking.score_operands`) over :func:`tile_space`."""
    plan, element_rule = _plans.cpu_plan(prob, plan, element_rule)
    if plan is None:
        plan = _plans.tile_plan(prob.sq, prob.sk, BLOCK_Q, BLOCK_K, prob.causal, prob.window)
    return plan, element_rule, _masking.score_operands(prob.xp, prob, tile_space(prob))


def softmax_step(xp, s, m, denom):
    """One online-softmax step over the score tile ``s``, exponentiated in place against the new
    row maximum: returns ``(m_new, alpha, denom)``, and the caller rescales its accumulator by
    ``alpha``. A row that has seen no visible key yet keeps ``m = -inf`` and weights 0."""
    zero = s.dtype.type(0)
    m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
    m_safe = xp.where(xp.isfinite(m_new), m_new, zero)
    s -= m_safe
    xp.exp(s, out=s)
    alpha = xp.exp(m - m_safe)
    return m_new, alpha, denom * alpha + s.sum(axis=-1, keepdims=True)


def softmax_finish(xp, acc, denom, m, dtype):
    """``(out, lse)`` of accumulated rows: 0 and ``-inf`` for a row with no visible key."""
    empty = denom == 0
    safe = xp.where(empty, denom.dtype.type(1), denom)
    lse = xp.where(empty, denom.dtype.type(-math.inf), xp.log(safe) + m)[..., 0]
    return (acc / safe).astype(dtype, copy=False), lse


def _jobs(prob, plan):
    for bidx in np.ndindex(*prob.batch):
        for g in range(prob.hkv):
            for qb in plan:
                yield bidx, g, qb


def _tile_args(prob, views, bidx, h0, h1, q0, q1, k0, k1, full, element_rule):
    """Keyword arguments of apply_score_mods for one tile of heads [h0, h1)."""
    kw = _masking.tile_mods(prob, views, bidx + (slice(h0, h1), slice(q0, q1), slice(k0, k1)),
                            q0, k0, full)
    if element_rule is not None and not full:
        extra = element_rule(q0, q1, k0, k1)
        if extra is not None:
            kw["mask"] = extra if kw["mask"] is None else kw["mask"] & extra
    return kw


def _visible_product(xp, a, b, bad, vis):
    """``a @ b`` with the terms of hidden pairs at the inner indices ``bad`` exactly 0."""
    if bad is None:
        return a @ b
    out = a @ _masking.clean_rows(xp, b, bad)
    return _masking.add_visible_terms(xp, out, a, b, bad, vis)


def _zero_hidden(xp, ds, brows, vis_r, bcols, vis_c):
    """Set the hidden pairs of the rows ``brows`` and columns ``bcols`` of ``ds`` to 0."""
    if brows is not None:
        ds[brows] = xp.where(vis_r, ds[brows], 0)
    if bcols is not None:
        ds[:, bcols] = xp.where(vis_c, ds[:, bcols], 0)


@_masking.quiet
def forward(prob, q, k, v, *, plan=None, element_rule=None, allow_tf32=False):
    """Return ``(out, lse)``.

    ``plan`` lists, per query block, the key tiles ``(k0, k1, full)`` to visit; ``full`` tiles
    skip every element test. ``element_rule(q0, q1, k0, k1)`` returns an extra boolean
    ``(q1-q0, k1-k0)`` visibility for a non-full tile (or None): how a BlockMask's partial
    blocks are evaluated. Both default to those of ``prob.block_mask``, else to
    ``_masking.tile_plan`` of the causal/window options (:func:`plan_and_views`).
    """
    if _masking.no_pairs(prob):
        return _masking.empty_forward(prob)
    xp, cd, G = prob.xp, prob.cdtype, prob.group
    plan, element_rule, views = plan_and_views(prob, plan, element_rule)
    q4, k4, v4 = as4d(q, prob), as4d(k, prob), as4d(v, prob)
    out = xp.empty((*prob.batch, prob.hq, prob.sq, prob.dv), dtype=prob.dtype)
    lse = xp.empty((*prob.batch, prob.hq, prob.sq), dtype=cd)
    scale = cd.type(prob.scale)
    bad_keys = bad_flags(xp, (v4,), cd)  # (k needs nothing: hidden scores become -inf)
    for bidx, g, (q0, q1, tiles) in _jobs(prob, plan):
        h0, h1 = g * G, (g + 1) * G
        rows = G * (q1 - q0)
        qt = q4[bidx][h0:h1, q0:q1].astype(cd) * scale
        m = xp.full((G, q1 - q0, 1), -math.inf, dtype=cd)
        denom = xp.zeros((G, q1 - q0, 1), dtype=cd)
        acc = xp.zeros((G, q1 - q0, prob.dv), dtype=cd)
        for k0, k1, full in tiles:
            kt = k4[bidx][g, k0:k1].astype(cd, copy=False)
            vt = v4[bidx][g, k0:k1].astype(cd, copy=False)
            s = qt @ kt.T
            _masking.apply_score_mods(
                xp, s, **_tile_args(prob, views, bidx, h0, h1, q0, q1, k0, k1, full, element_rule)
            )
            bad = None if bad_keys is None else bad_index(xp, bad_keys[bidx][g, k0:k1])
            if bad is not None:
                vis = s.reshape(rows, -1)[:, bad] != -math.inf
            m_new, alpha, denom = softmax_step(xp, s, m, denom)
            if bad is None:
                pv = s @ vt
            else:
                pv = s @ _masking.clean_rows(xp, vt, bad)
                _masking.add_visible_terms(xp, pv.reshape(rows, -1), s.reshape(rows, -1), vt,
                                           bad, vis)
            acc = acc * alpha + pv
            m = m_new
        out[bidx][h0:h1, q0:q1], lse[bidx][h0:h1, q0:q1] = softmax_finish(
            xp, acc, denom, m, prob.dtype)
    if not prob.heads_axis:
        out, lse = out[0], lse[0]
    return out, lse


@_masking.quiet
def backward(prob, dout, q, k, v, out, lse, *, plan=None, element_rule=None,
             deterministic=False, return_dbias=False):
    """Return ``(dq, dk, dv)`` (and ``dbias``): scores are recomputed tile by tile from ``lse``."""
    if _masking.no_pairs(prob):
        grads = _masking.empty_backward(prob)
        return (*grads, dbias_buffer(prob.xp, prob)[0]) if return_dbias else grads
    xp, cd, G = prob.xp, prob.cdtype, prob.group
    plan, element_rule, views = plan_and_views(prob, plan, element_rule)
    q4, k4, v4 = as4d(q, prob), as4d(k, prob), as4d(v, prob)
    do4, o4, lse4 = as4d(dout, prob), as4d(out, prob), as4d(lse, prob)
    dq = xp.empty((*prob.batch, prob.hq, prob.sq, prob.d), dtype=prob.dtype)
    dk = xp.zeros((*prob.batch, prob.hkv, prob.sk, prob.d), dtype=cd)
    dv = xp.zeros((*prob.batch, prob.hkv, prob.sk, prob.dv), dtype=cd)
    scale = cd.type(prob.scale)
    bad_q = bad_flags(xp, (q4, do4, o4), cd)  # rows whose delta or products may be NaN
    bad_k = bad_flags(xp, (k4, v4), cd)
    dbias, dpad = dbias_buffer(xp, prob) if return_dbias else (None, None)
    for bidx, g, (q0, q1, tiles) in _jobs(prob, plan):
        h0, h1 = g * G, (g + 1) * G
        rows = G * (q1 - q0)
        brows = None if bad_q is None else bad_index(xp, bad_q[bidx][h0:h1, q0:q1].reshape(-1))
        qt = q4[bidx][h0:h1, q0:q1].astype(cd) * scale
        dot = do4[bidx][h0:h1, q0:q1].astype(cd)
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i
        delta = (dot * o4[bidx][h0:h1, q0:q1].astype(cd)).sum(axis=-1, keepdims=True)
        lse_t = lse4[bidx][h0:h1, q0:q1].astype(cd)[..., None]
        # Empty rows have lse = -inf; +inf makes their P exactly 0 instead of NaN.
        lse_t = xp.where(xp.isneginf(lse_t), cd.type(math.inf), lse_t)
        dqt = xp.zeros((G, q1 - q0, prob.d), dtype=cd)
        for k0, k1, full in tiles:
            kt = k4[bidx][g, k0:k1].astype(cd, copy=False)
            vt = v4[bidx][g, k0:k1].astype(cd, copy=False)
            s = qt @ kt.T
            t = xp.empty_like(s) if prob.softcap is not None else None
            _masking.apply_score_mods(
                xp, s, tanh_out=t,
                **_tile_args(prob, views, bidx, h0, h1, q0, q1, k0, k1, full, element_rule),
            )
            bcols = None if bad_k is None else bad_index(xp, bad_k[bidx][g, k0:k1])
            if brows is None and bcols is None:
                s -= lse_t
                p = xp.exp(s, out=s)
                dv[bidx][g, k0:k1] += p.reshape(rows, -1).T @ dot.reshape(rows, -1)
                ds = dot @ vt.T
                ds -= delta
                ds *= p
                if dpad is not None:
                    add_dbias(dpad, ds, bidx, h0, h1, q0, q1, k0, k1)
                if t is not None:
                    ds *= 1 - t * t  # d/dx of c * tanh(x / c)
                dqt += ds @ kt
                dk[bidx][g, k0:k1] += ds.reshape(rows, -1).T @ qt.reshape(rows, -1)
                continue
            # Non-finite values meet this tile: the same steps with hidden pairs held at 0.
            s2 = s.reshape(rows, -1)
            vis_r = None if brows is None else s2[brows] != -math.inf
            vis_c = None if bcols is None else s2[:, bcols] != -math.inf
            s -= lse_t
            p2 = xp.exp(s, out=s).reshape(rows, -1)
            # A bad row's lse may be NaN: exp(-inf - NaN) is NaN, but a hidden P is exactly 0.
            _zero_hidden(xp, p2, brows, vis_r, bcols, vis_c)
            do2, q2 = dot.reshape(rows, -1), qt.reshape(rows, -1)
            dv[bidx][g, k0:k1] += _visible_product(xp, p2.T, do2, brows,
                                                   None if vis_r is None else vis_r.T)
            ds = (dot @ vt.T).reshape(rows, -1)
            ds -= delta.reshape(rows, 1)
            ds *= p2
            if dpad is not None:
                ds_vis = ds.copy()
                _zero_hidden(xp, ds_vis, brows, vis_r, bcols, vis_c)
                add_dbias(dpad, ds_vis.reshape(s.shape), bidx, h0, h1, q0, q1, k0, k1)
            if t is not None:
                ds *= 1 - t.reshape(rows, -1) ** 2  # d/dx of c * tanh(x / c)
            _zero_hidden(xp, ds, brows, vis_r, bcols, vis_c)
            dqt += _visible_product(xp, ds, kt, bcols, vis_c).reshape(dqt.shape)
            dk[bidx][g, k0:k1] += _visible_product(xp, ds.T, q2, brows,
                                                   None if vis_r is None else vis_r.T)
        dq[bidx][h0:h1, q0:q1] = (dqt * scale).astype(prob.dtype, copy=False)
    # dk accumulated ds^T (scale * q): the scale is already in.
    dk, dv = dk.astype(prob.dtype, copy=False), dv.astype(prob.dtype, copy=False)
    if not prob.heads_axis:
        dq, dk, dv = dq[0], dk[0], dv[0]
    if return_dbias:
        return dq, dk, dv, dbias
    return dq, dk, dv
