"""The backward kernels' CSC walk (``xattn/kernels/blockmask.cuh``: ``xattn_csc_count``,
``xattn_csc_from``, ``xattn_csc_advance``) compiled as host C++ and run on random masks.

The Hopper backward (``flash_bwd_sm90.cu``) counts a key block's query steps first, then
moves its cursor step by step (restarting at the column's first entry for each query head);
the mma.sync backward (``flash_bwd.cu``) walks with ``xattn_csc_from``. Both must visit, in
order, exactly the 64-row query steps of the column's visible mask blocks that lie inside the
range causal / window allow, each with its partial-block number (-1 for a full block). Needs a
host C++ compiler (``c++`` / ``g++``: nvcc's host compiler); skipped without one.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import host_program

# The kernel's walk, as flash_bwd_sm90.cu runs it: the count, then per step `walk(i)`.
PROGRAM = r"""
#include <algorithm>
#include <cstdio>
using std::max;
using std::min;
#define __device__
#define __forceinline__ inline
#define __ldg(p) (*(p))
#include "blockmask.cuh"

int main() {
    int ncol, nent, per, qt0, qt1;
    if (std::scanf("%d %d %d %d %d", &ncol, &nent, &per, &qt0, &qt1) != 5) return 1;
    static int col_ptr[4096], row_idx[65536], tile_idx[65536];
    for (int i = 0; i <= ncol; ++i) std::scanf("%d", &col_ptr[i]);
    for (int i = 0; i < nent; ++i) std::scanf("%d %d", &row_idx[i], &tile_idx[i]);
    const xattn::XattnCscMask cm{col_ptr, row_idx, tile_idx};
    for (int col = 0; col < ncol; ++col) {
        const int nq = xattn::xattn_csc_count(cm, col_ptr[col], col_ptr[col + 1], per, qt0,
                                              qt1);
        std::printf("col %d n %d:", col, nq);
        int e = 0, qt = 0, p = -1;
        for (int i = 0; i < nq; ++i) {
            if (i == 0)
                xattn::xattn_csc_from(cm, col_ptr[col], col_ptr[col + 1], per, qt0, qt1, e, qt,
                                      p);
            else
                xattn::xattn_csc_advance(cm, col, per, qt0, qt1, e, qt, p);
            std::printf(" %d/%d", qt, p);
        }
        // Past the end: the cursor reports no tile.
        if (nq > 0) {
            xattn::xattn_csc_advance(cm, col, per, qt0, qt1, e, qt, p);
            std::printf(" end %d", qt);
        }
        std::printf("\n");
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    return host_program(tmp_path_factory, "csc_walk", PROGRAM)


def _partial_numbers(state):
    """Partial blocks (state 1) numbered in CSR (row-major) order, as the mask stores them."""
    rows, cols = np.nonzero(state == 1)
    return {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}


def _expected(state, per, qt0, qt1):
    """Per key block: the query steps (64-row tiles) of its visible blocks inside
    [qt0, qt1), in order, with the partial-block number or -1."""
    nqb, nkb = state.shape
    part_no = _partial_numbers(state)
    return [[(t, part_no.get((r, c), -1)) for r in range(nqb) if state[r, c]
             for t in range(r * per, r * per + per) if qt0 <= t < qt1] for c in range(nkb)]


@pytest.mark.parametrize("seed", range(6))
def test_csc_walk_visits_each_visible_step_once_in_order(walker, seed):
    rng = np.random.default_rng(seed)
    nqb, nkb = int(rng.integers(1, 9)), int(rng.integers(1, 7))
    per = int(rng.integers(1, 4))  # query steps per mask block (bq = 64 per)
    state = rng.choice(3, size=(nqb, nkb), p=[0.4, 0.3, 0.3])  # 0 empty, 1 partial, 2 full
    qt0 = int(rng.integers(0, nqb * per))
    qt1 = int(rng.integers(qt0, nqb * per + 1))
    col_ptr, ents = [0], []
    want = _expected(state, per, qt0, qt1)
    part_no = _partial_numbers(state)
    for c in range(nkb):
        for r in range(nqb):
            if state[r, c]:
                ents.append((r, part_no.get((r, c), -1)))
        col_ptr.append(len(ents))
    text = f"{nkb} {len(ents)} {per} {qt0} {qt1}\n" + " ".join(map(str, col_ptr)) + "\n"
    text += "\n".join(f"{r} {p}" for r, p in ents) + "\n"
    res = subprocess.run([str(walker)], input=text, capture_output=True, text=True, check=True)
    lines = res.stdout.strip().splitlines()
    assert len(lines) == nkb
    for c, line in enumerate(lines):
        head, _, rest = line.partition(":")
        assert head == f"col {c} n {len(want[c])}", (c, line, want[c])
        toks = rest.split()
        if want[c]:
            assert toks[-2:] == ["end", "-1"], line
            toks = toks[:-2]
        got = [tuple(int(x) for x in tok.split("/")) for tok in toks]
        assert got == want[c], (c, got, want[c], state.tolist(), per, qt0, qt1)
