// The backward's per-element rules and argument list, shared by the mma.sync backward
// (flash_bwd.cu) and the Hopper backward's option entries (flash_bwd_sm90.cu): the argument
// struct BwdArgs and its flat kernel parameters (XATTN_BWD_PARAMS / XATTN_BWD_ARGS, so one
// launch tuple serves both kernels), and P / dS of one recomputed score (bwd_p_ds: the score
// modifications of masking.cuh or flex_attention's score_mod with its derivative, the
// visibility test, the block mask's element rule or flex_attention's mask_mod).
//
// flex_attention_backward's hook (xattn/_backends/cupy_/flex_tc_bwd.py), as the forward's
// (flex_hook.cuh): a source that defines XATTN_USER_MODS before the kernel file also defines
// XattnUserArgs, xattn_user_score_d (the user's score_mod and its derivative, translated by
// xattn/_flex_cuda.py), xattn_user_mask and XATTN_USER_PARAMS/_INIT (the arrays they read, as
// extra trailing kernel parameters). The MODS entries then run the user's score_mod in place
// of the parameter block's mods, and partial blocks of the (derived) block mask run
// xattn_user_mask in place of the BlockMask's element rule. Without it nothing changes.
#pragma once

#include "common.cuh"
#include "masking.cuh"
#include "blockmask.cuh"
#include "flex_hook.cuh"

namespace xattn {

// The parameter block (ScoreMods) first, then this kernel's own arguments.
struct BwdArgs : ScoreMods {
    const unsigned short* q;
    const unsigned short* k;
    const unsigned short* v;
    const unsigned short* dout;
    const float* lse;    // natural log, -inf on rows that see no key
    const float* delta;  // rowsum(dout * out)
    float* dq_accum;     // float32, zeroed by the launcher; the dq kernel ignores it
    unsigned short* dq;  // written by the dq kernel only
    unsigned short* dk;
    unsigned short* dv;
    int hq, group, sq, sk;
    float scale;
    XattnBlockMask bm;  // read by the block-sparse (SPARSE) entries only
    XattnCscMask cm;    // its transpose, walked by the main kernel
#ifdef XATTN_USER_MODS
    XattnUserArgs user;  // flex_attention_backward: the arrays the user's functions read
#endif
};

#ifdef XATTN_USER_MODS
// Padding rows (qi >= sq) and keys (kj >= sk) never call the user's functions (they may index
// arrays by position); their p is 0 anyway (lse +inf, or hidden by the sequence-end test).
__device__ __forceinline__ float bwd_user_score(const BwdArgs& a, float x, int b, int h, int qi,
                                                int kj, float& dcap) {
#if XATTN_USER_SCORE
    if (qi < a.sq && kj < a.sk) return xattn_user_score_d(a.user, x, b, h, qi, kj, &dcap);
#endif
    return x;
}
#endif

// The forward's score modifications on one raw score q.k: returns the score in the units that
// sl2 turns into base 2 (raw with MODS off, natural with MODS on) and sets dcap to the
// derivative of the softcap (1 without it). Bias, ALiBi and mask are constants.
template <bool MODS>
__device__ __forceinline__ float bwd_score(const BwdArgs& a, float s, int b, int h, int qi,
                                           int kj, int off, float& dcap) {
    dcap = 1.f;
    if constexpr (!MODS) {
        return s;
    } else {
#ifdef XATTN_USER_MODS
        // flex: the user's score_mod on the scaled score (natural units), dcap its derivative.
        return bwd_user_score(a, s * a.scale, b, h, qi, kj, dcap);
#else
        return xattn_score_mod(a, s * a.scale, b, h, qi, kj, off, a.sq, a.sk, dcap);
#endif
    }
}

// P of one (query qi, key kj) element from its raw score s: the score mods, the visibility
// test on edge tiles and the mask's element rule in its partial blocks (both after the mods: a
// softcap maps -inf to -cap), then exp2 against the row's base-2 lse l2; dcap gets the
// derivative of the score mods (1 without a softcap or score_mod).
template <bool MODS>
__device__ __forceinline__ float bwd_p(const BwdArgs& a, float s, int b, int h, int qi, int kj,
                                       int off, int sk, bool edge, bool part, int pblk, int mqb,
                                       int mkc, float sl2, float l2, float& dcap) {
    float x = bwd_score<MODS>(a, s, b, h, qi, kj, off, dcap);
    if (edge && !xattn_visible(qi, kj, off, sk, a.causal, a.wl, a.wr)) x = -XATTN_INF;
#ifdef XATTN_USER_MODS
    // flex: partial blocks of the mask derived from mask_mod run mask_mod itself.
    if (part && !xattn_user_visible(a.user, b, h, qi, kj, a.sq, a.sk)) x = -XATTN_INF;
#else
    if (part && !xattn_bm_visible(a.bm, pblk, mqb, mkc, qi, kj)) x = -XATTN_INF;
#endif
    return ex2(fmaf(x, sl2, -l2));
}

// dS = P (dP - delta) [* dcap] of one element.
__device__ __forceinline__ float bwd_ds(float p, float dp, float dl, float dcap) {
#ifdef XATTN_USER_MODS
    // The user's derivative may be inf or NaN where the pair does not count (a masked pair's
    // score, log or sqrt at 0): a zero weight gives a zero dS, as on the CPU.
    return p == 0.f ? 0.f : p * (dp - dl) * dcap;
#else
    return p * (dp - dl) * dcap;
#endif
}

// P of one element (bwd_p) and dS in place of its dP (bwd_ds).
template <bool MODS>
__device__ __forceinline__ float bwd_p_ds(const BwdArgs& a, float s, float& dp, int b, int h,
                                          int qi, int kj, int off, int sk, bool edge,
                                          bool part, int pblk, int mqb, int mkc, float sl2,
                                          float l2, float dl) {
    float dcap;
    const float p = bwd_p<MODS>(a, s, b, h, qi, kj, off, sk, edge, part, pblk, mqb, mkc, sl2,
                                l2, dcap);
    dp = bwd_ds(p, dp, dl, dcap);
    return p;
}

}  // namespace xattn

#define XATTN_BWD_PARAMS                                                                      \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,                \
        const unsigned short *dout, const float *lse, const float *delta, float *dq_accum,    \
        unsigned short *dq, unsigned short *dk, unsigned short *dv, int hq, int group,        \
        int sq, int sk, float scale, XATTN_SCORE_MOD_PARAMS, const int *bm_frow,              \
        const int *bm_fcol, const int *bm_prow, const int *bm_pcol,       \
        const unsigned *bm_tiles, int bm_bq, int bm_bk, int bm_words, int bm_rule,            \
        int bm_off, int bm_left, int bm_right, const int *bm_col_ptr, const int *bm_row_idx,  \
        const int *bm_tile_idx XATTN_USER_PARAMS

#define XATTN_BWD_ARGS                                                                        \
    xattn::BwdArgs{XATTN_SCORE_MOD_INIT, q, k, v, dout, lse, delta, dq_accum, dq, dk, dv, hq,  \
                   group, sq, sk, scale,                                                      \
                   xattn::XattnBlockMask{bm_frow, bm_fcol, bm_prow, bm_pcol, bm_tiles, bm_bq,  \
                                         bm_bk, bm_words, bm_rule, bm_off, bm_left, bm_right}, \
                   xattn::XattnCscMask{bm_col_ptr, bm_row_idx, bm_tile_idx}            \
                   XATTN_USER_INIT}

