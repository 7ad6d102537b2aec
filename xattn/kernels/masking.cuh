// The visibility rules of xattn/_masking.py for the CUDA kernels, written once.
//
// Query i sits at key position i + off, off = Sk - Sq (bottom-right alignment). With
// dpos = j - (i + off): causal keeps dpos <= 0, window (wl, wr) keeps -wl <= dpos <= wr, and a
// side < 0 is unbounded. The Python loader inlines this file into each kernel source (CuPy's
// compile cache keys on the source text, so an edit here always rebuilds); nvcc finds it next
// to the .cu files.
#pragma once

#define XATTN_INF __int_as_float(0x7f800000)
#define XATTN_LOG2E 1.4426950408889634f
#define XATTN_LN2 0.6931471805599453f

// The kernels' parameter block: every score modification of one call, validated once on the
// host (xattn._array.AttnProblem) and filled by the one Python function
// xattn/_backends/cupy_/_params.py:option_args, in the order of XATTN_SCORE_MOD_PARAMS. Entry
// points take these as flat parameters (XATTN_SCORE_MOD_PARAMS, so a launch passes plain
// scalars and pointers) and gather them with XATTN_SCORE_MOD_INIT into the ScoreMods base of
// their argument struct, which xattn_score_mod and the visibility helpers read.
#define XATTN_SCORE_MOD_PARAMS                                                                \
    int causal, int wl, int wr, float softcap, const float *alibi, long long alibi_bs,        \
        const float *bias, long long bias_bs, long long bias_hs, long long bias_qs,           \
        long long bias_ks, const unsigned char *mask, long long mask_bs, long long mask_hs,   \
        long long mask_qs, long long mask_ks
#define XATTN_SCORE_MOD_INIT                                                                  \
    xattn::ScoreMods {                                                                        \
        causal, wl, wr, softcap, alibi, alibi_bs, bias, bias_bs, bias_hs, bias_qs, bias_ks,   \
            mask, mask_bs, mask_hs, mask_qs, mask_ks                                          \
    }

namespace xattn {

struct ScoreMods {
    int causal, wl, wr;  // window sides, -1 = unbounded
    float softcap;       // 0 = off
    const float* alibi;  // slopes, indexed b * alibi_bs + h; null = off
    long long alibi_bs;
    const float* bias;   // float32 additive bias with broadcast strides; null = off
    long long bias_bs, bias_hs, bias_qs, bias_ks;
    const unsigned char* mask;  // bool, True = may attend; null = off
    long long mask_bs, mask_hs, mask_qs, mask_ks;
};

// The operands of every forward kernel: q, k, v and out of element type E (16-bit types are
// read as raw unsigned short), the float32 natural-log lse, the sizes and the softmax scale
// (natural units). The forward kernels' argument structs derive from it (and from ScoreMods);
// flash_fwd_tf32.cu spells the fields out, since deriving changed the vectorisation of one
// shared-memory load in three of its entries (the other kernels' PTX stays identical).
template <class E>
struct FwdOperands {
    const E* q;
    const E* k;
    const E* v;
    E* o;
    float* lse;
    int hq, group, sq, sk;
    float scale;
};

// Key blocks [kb0, kb1) of size bn that any query in [q0, q1) may see (a superset).
__device__ __forceinline__ void xattn_key_blocks(int q0, int q1, int off, int sk, int causal,
                                                 int wl, int wr, int bn, int& kb0, int& kb1) {
    int lo = 0, hi = sk;
    if (causal) hi = min(hi, q1 + off);
    if (wl >= 0) lo = max(lo, q0 + off - wl);
    if (wr >= 0) hi = min(hi, q1 - 1 + off + wr + 1);
    lo = max(lo, 0);
    hi = min(max(hi, lo), sk);
    kb0 = lo / bn;
    kb1 = hi > lo ? (hi + bn - 1) / bn : kb0;
}

// True when some pair of the tile [q0, q1) x [k0, k0 + bn) fails the rules or lies past sk:
// only such tiles run the element test below.
__device__ __forceinline__ bool xattn_tile_needs_test(int q0, int q1, int k0, int bn, int off,
                                                      int sk, int causal, int wl, int wr) {
    return (k0 + bn > sk) || (causal && k0 + bn - 1 > q0 + off) ||
           (wl >= 0 && k0 < q1 - 1 + off - wl) || (wr >= 0 && k0 + bn - 1 > q0 + off + wr);
}

// The score modifications, in flash-attn's order, on one scaled score x = scale * q.k of query
// qi and key kj: softcap c tanh(x / c), additive bias, ALiBi -slope |i + off - j|, boolean mask
// (False -> -inf). Bias and mask are read only inside the (sq, sk) bounds. dcap gets the
// softcap's derivative 1 - tanh^2 (1 without softcap) for the backward pass.
__device__ __forceinline__ float xattn_score_mod(const ScoreMods& a, float x, int b, int h, int qi,
                                                 int kj, int off, int sq, int sk, float& dcap) {
    dcap = 1.f;
    if (a.softcap > 0.f) {
        const float t = tanhf(x / a.softcap);
        x = a.softcap * t;
        dcap = 1.f - t * t;
    }
    const bool inside = qi < sq && kj < sk;
    if (a.bias && inside)
        x += a.bias[b * a.bias_bs + h * a.bias_hs + qi * a.bias_qs + kj * a.bias_ks];
    if (a.alibi) x -= a.alibi[b * a.alibi_bs + h] * fabsf((float)(qi + off - kj));
    if (a.mask && inside &&
        !a.mask[b * a.mask_bs + h * a.mask_hs + qi * a.mask_qs + kj * a.mask_ks])
        x = -XATTN_INF;
    return x;
}

__device__ __forceinline__ bool xattn_visible(int qi, int kj, int off, int sk, int causal,
                                              int wl, int wr) {
    const int dpos = kj - (qi + off);
    return kj < sk && (!causal || dpos <= 0) && (wl < 0 || dpos >= -wl) &&
           (wr < 0 || dpos <= wr);
}

// The keys that query qi sees, as one interval: for every kj >= 0, xattn_visible(qi, kj, ...)
// holds exactly when lo <= kj < hi (lo, hi in [0, sk]; hi <= lo: none). An edge tile then
// compares each score's key with two bounds per row instead of evaluating the whole rule
// (tests/test_masking_cuh.py checks the equivalence, compiled for the host). The sums are
// 64-bit so that no window side overflows them.
__device__ __forceinline__ void xattn_visible_keys(int qi, int off, int sk, int causal, int wl,
                                                   int wr, int& lo, int& hi) {
    const long long p = (long long)qi + off;
    long long l = 0, h = sk;
    if (wl >= 0) l = p - wl > 0 ? p - wl : 0;
    if (causal) h = p + 1 < h ? p + 1 : h;
    if (wr >= 0) h = p + wr + 1 < h ? p + wr + 1 : h;
    lo = (int)(l < sk ? l : sk);
    hi = (int)(h > 0 ? h : 0);
}

// The queries that see key kj, as one interval (the backward's key-major tiles): for every
// qi >= 0, xattn_visible(qi, kj, ...) holds exactly when lo <= qi < hi (lo, hi in [0, INT_MAX];
// hi <= lo: none; no upper bound but the window's left side: rows past Sq are the caller's).
// Checked against the rule on every query by tests/test_masking_cuh.py.
__device__ __forceinline__ void xattn_visible_queries(int kj, int off, int sk, int causal,
                                                      int wl, int wr, int& lo, int& hi) {
    if (kj >= sk) {
        lo = hi = 0;
        return;
    }
    const long long d0 = (long long)kj - off;  // the query at the key's own position
    const long long top = 2147483647LL;
    long long l = 0, h = top;
    if (causal) l = d0 > l ? d0 : l;
    if (wr >= 0) l = d0 - wr > l ? d0 - wr : l;
    if (wl >= 0) h = d0 + wl + 1 < h ? d0 + wl + 1 : h;
    lo = (int)(l < top ? l : top);
    hi = (int)(h > 0 ? h : 0);
}

// Query blocks [qb0, qb1) of size bm that may see some key of [k0, k1) (a superset): the inverse
// of xattn_key_blocks, used by the backward pass's key-block-parallel loop. Query i sees key j
// only if j <= i + off (causal), i + off - wl <= j (left side) and j <= i + off + wr (right side).
__device__ __forceinline__ void xattn_query_blocks(int k0, int k1, int off, int sq, int causal,
                                                   int wl, int wr, int bm, int& qb0, int& qb1) {
    int lo = 0, hi = sq;
    if (causal) lo = max(lo, k0 - off);
    if (wr >= 0) lo = max(lo, k0 - off - wr);
    if (wl >= 0) hi = min(hi, k1 - 1 - off + wl + 1);
    lo = max(lo, 0);
    hi = min(max(hi, lo), sq);
    qb0 = lo / bm;
    qb1 = hi > lo ? (hi + bm - 1) / bm : qb0;
}

// The backward's view of query row i (flat index into lse and delta, `valid`: the row lies
// inside Sq): its lse in base 2 and its delta; +inf and 0 for a row that sees no key (lse =
// -inf) or lies past Sq, so that every p of the row is exactly 0.
__device__ __forceinline__ void xattn_bwd_row(const float* lse, const float* delta, long long i,
                                              bool valid, float& l2, float& dl) {
    l2 = XATTN_INF;
    dl = 0.f;
    if (valid) {
        const float x = lse[i];
        l2 = x == -XATTN_INF ? XATTN_INF : x * XATTN_LOG2E;
        dl = delta[i];
    }
}

}  // namespace xattn
