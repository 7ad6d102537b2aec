"""Plans: which key tiles each query block visits, and the rules of the partial ones.

Every plan in xattn is built here (or, for the causal/window geometry alone, by
:func:`xattn._masking.tile_plan`, re-exported here), from shapes and options only, and cached
where that pays:

* :func:`tile_plan`: the causal/window tiles of a dense call (the CPU backends' default plan;
  the fused backend sizes its query blocks with ``fused.block_q``);
* :func:`block_plan` and :class:`ElementRule`: a :class:`~xattn.BlockMask` as a plan (its
  CSR arrays and the call's own ``causal``/``window``) plus the element rule of partial tiles;
* :func:`window_plan`: ``flash_attention(window=...)`` on NumPy arrays as the block-sparse plan
  of its band, so a sliding window costs O(S * window);
* :func:`plan_options` / :func:`cpu_plan`: the plan of the problem's block mask
  (``prob.block_mask``), which the CPU backends take from here, and :func:`per_batch`: the
  per-batch-element loop of a batched mask (``check_block_mask``, the one check of a mask
  against the problem, lives in :mod:`xattn._array` and is re-exported here).

A plan is, per query block, ``(q0, q1, tiles)`` with ``tiles`` a tuple of ``(k0, k1, full)``;
``element_rule(q0, q1, k0, k1)`` returns the boolean visibility of a non-full tile (or None).
Runs of consecutive key blocks of one kind (full or partial) are merged into tiles of up to
:data:`PLAN_TILE_K` keys, so the matmuls stay BLAS-sized while full blocks still skip every
element test. The GPU kernels walk a BlockMask's CSR lists themselves
(:mod:`xattn._backends.cupy_.blockmask`) and ignore these plans.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _masking
from ._array import check_block_mask
from ._blockmask import RULE_GLOBAL, BlockMask
from ._masking import tile_plan

__all__ = ["ElementRule", "block_plan", "check_block_mask", "cpu_plan", "per_batch",
           "plan_options", "tile_plan", "window_plan"]

# Widest merged key tile of a plan: the numpy backend's BLOCK_K (128 x 512 float32 scores
# = 256 KiB, an L2-sized tile).
PLAN_TILE_K = 512


def _runs(full_cols, partial_cols):
    """Runs ``(j0, j1, full)`` of consecutive key blocks of one kind, in column order."""
    if partial_cols:
        items = sorted([(c, True) for c in full_cols] + [(c, False) for c in partial_cols])
    else:
        items = [(c, True) for c in full_cols]
    runs = []
    for c, full in items:
        if runs and runs[-1][1] == c and runs[-1][2] == full:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1, full])
    return runs


def _runs_of(flags):
    """``(start, stop, value)`` of the runs of equal values of a boolean array."""
    if len(flags) == 0:
        return []
    brk = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = [0, *brk.tolist()]
    stops = [*brk.tolist(), len(flags)]
    return [(a, b, bool(flags[a])) for a, b in zip(starts, stops, strict=True)]


def _add_tiles(tiles, partial, q0, q1, k0, k1, full, key_lo, key_hi, rules):
    """Append ``[k0, k1)`` cut to the call's key range, in tiles of at most PLAN_TILE_K."""
    sq, sk, causal, window = rules
    k0, k1 = max(k0, key_lo), min(k1, key_hi)
    for a in range(k0, k1, PLAN_TILE_K):
        b = min(a + PLAN_TILE_K, k1)
        tile_full = full and _masking.tile_is_full(q0, q1, a, b, sq=sq, sk=sk, causal=causal,
                                                   window=window)
        tiles.append((a, b, tile_full))
        if not full:
            partial.add((q0, a))


def _global_plan(bm, causal, window):
    """Exact plan of a Longformer mask: a block holding some global rows or columns would be
    a partial block over its whole width, so rows are split in runs of global rows (every key
    visible: full tiles) and of other rows (the band: two partial edges around a full middle,
    plus one full tile per run of global keys outside it). The work is the visible pairs."""
    s, bq = bm.q_len, bm.block_size[0]
    half, is_global = bm.rule_data["half_window"], bm.rule_data["is_global"]
    global_keys = [(a, b) for a, b, g in _runs_of(is_global) if g]
    rules = (s, s, causal, window)
    plan, partial = [], set()
    for r0 in range(0, s, bq):
        for a, b, glob in _runs_of(is_global[r0:min(r0 + bq, s)]):
            q0, q1 = r0 + a, r0 + b
            lo, hi = _masking.key_range(q0, q1, sq=s, sk=s, causal=causal, window=window)
            if glob:
                segments = [(0, s, True)]
            else:
                band_lo, band_hi = max(q0 - half, 0), min(q1 + half, s)
                mid_lo, mid_hi = max(q1 - 1 - half, 0), min(q0 + half + 1, s)
                if mid_hi > mid_lo:
                    segments = [(band_lo, mid_lo, False), (mid_lo, mid_hi, True),
                                (mid_hi, band_hi, False)]
                else:
                    segments = [(band_lo, band_hi, False)]
                for ga, gb in global_keys:
                    segments += [(ga, min(gb, band_lo), True), (max(ga, band_hi), gb, True)]
            tiles = []
            for k0, k1, full in sorted(segments):
                _add_tiles(tiles, partial, q0, q1, k0, k1, full, lo, hi, rules)
            plan.append((q0, q1, tuple(tiles)))
    return tuple(plan), frozenset(partial)


@_masking.cached_by_bytes(_masking.PLAN_CACHE_BYTES)
def block_plan(bm, causal, window):
    """``(plan, partial)`` for a BlockMask under the call's causal/window options.

    ``plan`` lists every query block (empty ones too: their rows come out 0 with ``lse``
    -inf); ``partial`` is the set of ``(q0, k0)`` of the tiles whose element rule must be
    evaluated. Cached: it depends only on the mask and the options.
    """
    if bm.rule_kind == RULE_GLOBAL:
        return _global_plan(bm, causal, window)
    sq, sk = bm.q_len, bm.k_len
    bq, bk = bm.block_size
    chunk = max(bk, PLAN_TILE_K // bk * bk)
    # Plain Python lists: rows hold a handful of blocks, where NumPy calls cost more.
    fptr, fcol = bm.full_row_ptr.tolist(), bm.full_col_idx.tolist()
    pptr, pcol = bm.partial_row_ptr.tolist(), bm.partial_col_idx.tolist()
    plan, partial = [], set()
    for i in range(bm.n_blocks[0]):
        q0, q1 = i * bq, min((i + 1) * bq, sq)
        lo, hi = _masking.key_range(q0, q1, sq=sq, sk=sk, causal=causal, window=window)
        tiles = []
        for j0, j1, full in _runs(fcol[fptr[i]:fptr[i + 1]], pcol[pptr[i]:pptr[i + 1]]):
            start, stop = max(j0 * bk, lo), min(j1 * bk, hi)
            for k0 in range(start, stop, chunk):
                k1 = min(k0 + chunk, stop)
                tile_full = full and _masking.tile_is_full(
                    q0, q1, k0, k1, sq=sq, sk=sk, causal=causal, window=window
                )
                tiles.append((k0, k1, tile_full))
                if not full:
                    partial.add((q0, k0))
        plan.append((q0, q1, tuple(tiles)))
    return tuple(plan), frozenset(partial)


class ElementRule:
    """``element_rule(q0, q1, k0, k1)`` of a plan: the BlockMask's visibility of a partial
    tile (bool ``(q1-q0, k1-k0)`` in the problem's namespace), None for tiles that the mask
    sees fully (only the call's causal/window then applies).

    A kernel that evaluates rules natively can read ``element_rule.bm.rule_kind`` and
    ``rule_data`` instead of calling it, and ``element_rule.partial`` (the ``(q0, k0)`` of the
    partial tiles) to know where the rule applies."""

    def __init__(self, bm, partial, xp):
        self.bm, self.partial, self.xp = bm, partial, xp

    def __call__(self, q0, q1, k0, k1):
        if (q0, k0) not in self.partial:
            return None
        vis = self.bm.exact(q0, q1, k0, k1)
        if vis is None or self.xp is np:
            return vis
        return self.xp.asarray(vis)


def plan_options(prob):
    """``{"plan", "element_rule"}`` of the problem's (unbatched) block mask under its own
    causal/window options."""
    bm = prob.block_mask
    plan, partial = block_plan(bm, prob.causal, prob.window)
    return {"plan": plan, "element_rule": ElementRule(bm, partial, prob.xp)}


def cpu_plan(prob, plan=None, element_rule=None):
    """``(plan, element_rule)`` that a CPU backend walks: those handed over (a window's plan,
    :func:`window_plan`), else those of ``prob.block_mask`` (cached), else ``(None, None)``
    (the backend's own causal/window tiles)."""
    if plan is None and prob.block_mask is not None:
        opts = plan_options(prob)
        return opts["plan"], opts["element_rule"]
    return plan, element_rule


# Sliding windows through flash_attention(window=...) on NumPy arrays: query blocks of
# AUTO_BLOCK_ROWS rows of the GQA group (as the CPU backends size theirs), key blocks of
# AUTO_BLOCK_K so that the full middle of the band splits from its partial edges.
AUTO_BLOCK_ROWS = 128
AUTO_BLOCK_K = 128


def window_plan(prob):
    """``(prob, backend kwargs)`` for a call with a ``window`` on NumPy arrays.

    The call becomes block-sparse attention under ``BlockMask.sliding_window`` of its own
    window (cached): per query block one partial tile at each edge of the band and merged full
    tiles between, which skip the element test, so the cost is O(S * window). The mask holds
    the causal/window rules, so they are taken off the problem; the element rule evaluates
    them per tile geometry, cached across query blocks. Other calls come back unchanged.
    """
    if prob.window is None or prob.xp is not np:
        return prob, {}
    bq = max(16, AUTO_BLOCK_ROWS // prob.group)
    bm = BlockMask.sliding_window(prob.sq, prob.sk, window=prob.window, causal=prob.causal,
                                  block_size=(bq, AUTO_BLOCK_K))
    plan, partial = block_plan(bm, False, None)
    stripped = dataclasses.replace(prob, causal=False, window=None)
    return stripped, {"plan": plan, "element_rule": ElementRule(bm, partial, np)}


def per_batch(fn, prob, arrays, options, *, backward=False):
    """Run ``fn`` (flash_attention or its backward) once per batch element of the problem's
    batched BlockMask, each with that element's mask and operands, and gather the results."""
    block_mask, xp = prob.block_mask, prob.xp
    operands = {name: xp.broadcast_to(x, prob.operand_shape(name))
                for name, x in prob.operands().items() if x is not None}
    results = None
    for idx in np.ndindex(*prob.batch):
        res = fn(
            *(a[idx] for a in arrays),
            block_mask=block_mask[idx],
            **{**options, **{name: x[idx] for name, x in operands.items()}},
        )
        res = res if isinstance(res, tuple) else (res,)
        if results is None:
            results = [xp.empty((*prob.batch, *r.shape), dtype=r.dtype) for r in res]
        for out, r in zip(results, res, strict=True):
            out[idx] = r
    return tuple(results) if backward or len(results) > 1 else results[0]
