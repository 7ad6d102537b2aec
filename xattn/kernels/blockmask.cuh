// Block-sparse attention for the CUDA kernels: walking a BlockMask's block lists, and its
// element rule inside partial blocks.
//
// The arrays are those of xattn/_blockmask.py, uploaded once per (mask, device) by
// xattn/_backends/cupy_/blockmask.py: CSR per query block (full and partial lists, int32,
// columns sorted), the CSC transpose per key block for key-parallel (backward) kernels, and
// the partial tiles bit-packed (bit c % 32 of word c / 32 of a row of ceil(bk / 32) uint32).
// A kernel tile must lie inside one mask block: the kernel's query tile divides bq and its
// key tile divides bk (the host refuses other block sizes), so a mask block is a run of
// bk / bn key tiles and its partial index p identifies the stored tile of every one of them.
//
// Element rules, applied only in partial blocks (full blocks run no element test):
//   XATTN_BM_CAUSAL (1): j <= i + off;
//   XATTN_BM_WINDOW (2): i + off - left <= j <= i + off + right (a side < 0 is unbounded);
//   XATTN_BM_TILES  (5): bit (i - row * bq, j - col * bk) of the p-th stored tile (the host
//                        lowers documents, global tokens, dense and composite masks to it).
// The caller's causal / window / sequence-end rules (masking.cuh) apply on top.
#pragma once

#define XATTN_BM_NONE 0
#define XATTN_BM_CAUSAL 1
#define XATTN_BM_WINDOW 2
#define XATTN_BM_TILES 5

namespace xattn {

struct XattnBlockMask {
    const int* frow;         // full_row_ptr, n_q_blocks + 1
    const int* fcol;         // full_col_idx
    const int* prow;         // partial_row_ptr
    const int* pcol;         // partial_col_idx
    const unsigned* tiles;   // (n_partial, bq, words) bit-packed tiles; null unless TILES
    int bq, bk, words;       // block size; uint32 words per tile row = ceil(bk / 32)
    int rule, off, left, right;
};

// Is (qi, kj) visible inside partial block number p, whose top-left pair is (qb, kc)?
__device__ __forceinline__ bool xattn_bm_visible(const XattnBlockMask& bm, int p, int qb, int kc,
                                                 int qi, int kj) {
    if (bm.rule == XATTN_BM_CAUSAL) return kj <= qi + bm.off;
    if (bm.rule == XATTN_BM_WINDOW) {
        const int d = kj - (qi + bm.off);
        return (bm.left < 0 || d >= -bm.left) && (bm.right < 0 || d <= bm.right);
    }
    if (bm.rule == XATTN_BM_TILES) {
        const int c = kj - kc;
        const unsigned w =
            __ldg(bm.tiles + ((long long)p * bm.bq + (qi - qb)) * bm.words + (c >> 5));
        return (w >> (c & 31)) & 1u;
    }
    return true;
}

// --- CSR walk (query-block-parallel kernels: the forward) ----------------------------------
//
// Visits the key tiles of bn keys of query block `row`: every full block, then every partial
// block, each cut into bk / bn tiles, keeping only the tiles in [kt0, kt1) (the key-tile range
// that the call's causal / window allow, see xattn_key_blocks). Block-uniform: every thread of
// the CTA walks the same list, so the loads of col_idx are broadcasts.
struct XattnCsrWalk {
    int fa, nf, pa, n;  // first full entry, full count, first partial entry, total entries
    int t, sub;         // next candidate: entry t, sub-tile sub
    int per, kt0, kt1;  // key tiles per block; allowed key-tile range
};

__device__ __forceinline__ void xattn_csr_begin(const XattnBlockMask& bm, int row, int bn,
                                                int kt0, int kt1, XattnCsrWalk& w) {
    w.fa = bm.frow[row];
    w.nf = bm.frow[row + 1] - w.fa;
    w.pa = bm.prow[row];
    w.n = w.nf + bm.prow[row + 1] - w.pa;
    w.t = 0;
    w.sub = 0;
    w.per = bm.bk / bn;
    w.kt0 = kt0;
    w.kt1 = kt1;
}

// The next key tile of the walk: its index kt (keys kt * bn ...) and the partial-block
// number p (-1 for a full block), or kt = -1 at the end.
__device__ __forceinline__ void xattn_csr_next(const XattnBlockMask& bm, XattnCsrWalk& w, int& kt,
                                               int& p) {
    while (w.t < w.n) {
        const bool full = w.t < w.nf;
        const int e = full ? w.fa + w.t : w.pa + (w.t - w.nf);
        const int first = (full ? bm.fcol[e] : bm.pcol[e]) * w.per;
        const int lo = max(w.sub, w.kt0 - first);
        const int hi = min(w.per, w.kt1 - first);
        if (lo < hi) {
            kt = first + lo;
            p = full ? -1 : e;
            w.sub = lo + 1;
            if (w.sub >= hi) {
                ++w.t;
                w.sub = 0;
            }
            return;
        }
        ++w.t;
        w.sub = 0;
    }
    kt = -1;
    p = -1;
}

// --- CSC walk (key-block-parallel kernels: the backward) -----------------------------------
//
// The transpose, built by the host: per key block `col`, entries [col_ptr[col],
// col_ptr[col + 1]) in row order, each a query block `row_idx[e]` and `tile_idx[e]` (the
// partial-block number p of that block in the CSR order above, -1 when the block is full).
// Visits the query tiles of bm_rows rows (bm_rows divides bq) in [qt0, qt1), the range the
// call's causal / window allow for this key block.
struct XattnCscMask {
    const int* col_ptr;   // n_k_blocks + 1
    const int* row_idx;   // query block of each entry
    const int* tile_idx;  // partial-block number, -1 = full
};

// The lean walk of the backward kernels, whose registers are all taken by the dK / dV
// accumulators: the cursor is only (entry e, query tile qt, partial block p); the column's end
// e1 and the tiles per mask block per = bq / bm_rows are re-read or recomputed by the caller.
// The first query tile of CSC entry e onwards inside [qt0, qt1): its entry e2, tile qt and p,
// or qt = -1 when no entry before e1 has one.
__device__ __forceinline__ void xattn_csc_from(const XattnCscMask& cm, int e, int e1, int per,
                                               int qt0, int qt1, int& e2, int& qt, int& p) {
    qt = -1;
    for (; e < e1; ++e) {
        const int first = cm.row_idx[e] * per;
        const int lo = max(first, qt0);
        if (lo < min(first + per, qt1)) {
            qt = lo;
            p = cm.tile_idx[e];
            break;
        }
    }
    e2 = e;
}

// The cursor (e, qt, p) moved to the next query tile of column col (qt = -1 past its end).
__device__ __forceinline__ void xattn_csc_advance(const XattnCscMask& cm, int col, int per,
                                                  int qt0, int qt1, int& e, int& qt, int& p) {
    const int first = cm.row_idx[e] * per;
    if (qt + 1 < min(first + per, qt1))
        ++qt;  // the next query tile of the same mask block
    else
        xattn_csc_from(cm, e + 1, cm.col_ptr[col + 1], per, qt0, qt1, e, qt, p);
}

// The number of query tiles of column [e0, e1) inside [qt0, qt1) (the steps of one walk).
__device__ __forceinline__ int xattn_csc_count(const XattnCscMask& cm, int e0, int e1, int per,
                                               int qt0, int qt1) {
    int n = 0;
    for (int e = e0; e < e1; ++e) {
        const int first = cm.row_idx[e] * per;
        n += max(0, min(first + per, qt1) - max(first, qt0));
    }
    return n;
}

struct XattnCscWalk {
    int e, e1, sub, per, qt0, qt1;
};

__device__ __forceinline__ void xattn_csc_begin(const XattnCscMask& cm, const XattnBlockMask& bm,
                                                int col, int bm_rows, int qt0, int qt1,
                                                XattnCscWalk& w) {
    w.e = cm.col_ptr[col];
    w.e1 = cm.col_ptr[col + 1];
    w.sub = 0;
    w.per = bm.bq / bm_rows;
    w.qt0 = qt0;
    w.qt1 = qt1;
}

// The next query tile: its index qt (rows qt * bm_rows ...) and p (-1 = full block), or
// qt = -1 at the end.
__device__ __forceinline__ void xattn_csc_next(const XattnCscMask& cm, XattnCscWalk& w, int& qt,
                                               int& p) {
    while (w.e < w.e1) {
        const int first = cm.row_idx[w.e] * w.per;
        const int lo = max(w.sub, w.qt0 - first);
        const int hi = min(w.per, w.qt1 - first);
        if (lo < hi) {
            qt = first + lo;
            p = cm.tile_idx[w.e];
            w.sub = lo + 1;
            if (w.sub >= hi) {
                ++w.e;
                w.sub = 0;
            }
            return;
        }
        ++w.e;
        w.sub = 0;
    }
    qt = -1;
    p = -1;
}

}  // namespace xattn
