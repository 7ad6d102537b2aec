// The element passes that every tensor-core forward kernel (flash_fwd.cu, flash_fwd_tf32.cu,
// flash_fwd_sm90.cu) runs on a score tile after Q K^T, written once: the score modifications
// (masking.cuh's chain, or flex_attention's score_mod), the causal / window edge test and the
// partial-block rule of a block mask (blockmask.cuh, or flex_attention's mask_mod).
//
// Fragment layout (m16n8 accumulators, the same for mma.sync and wgmma): per row tile of 16
// rows, lane g = lane / 4, t4 = lane % 4 holds rows g and g + 8 (hr = 0, 1), keys 8 n + 2 t4 + e
// of each 8-key n-tile n, as element 2 hr + e: s[MT][NS][4] for MT row tiles per warp (the
// wgmma kernel views its s[NS * 4] as s[1][NS][4]).
//
// Macros, not functions: the kernels' PTX must not move (tools/ptx_diff.py), and NVVM orders
// the code differently once the loop nest is a function of its own (it unrolls a callee before
// inlining it: the 16-bit kernel's edge test moved) or the element rule one more inlined call
// (the TF32 kernel's flex entries moved). So the loop nest and the rules expand in the
// kernel's own function, exactly as the passes were written there before. Each pass runs
// behind the caller's block-uniform branch, so that interior tiles run no element test.
#pragma once

#include "masking.cuh"

// The statement(s) ... on every score x_ of the tile, of query row qi_ and key kj_. ROW0: the
// first row of this warp's row tiles, K0 the tile's first key.
#define XATTN_FWD_EACH_SCORE(MT, NS, S, ROW0, K0, G, T4, ...)                                 \
    _Pragma("unroll") for (int mt_ = 0; mt_ < (MT); ++mt_)                                  \
    _Pragma("unroll") for (int hr_ = 0; hr_ < 2; ++hr_) {                                   \
        const int qi_ = (ROW0) + mt_ * 16 + (G) + hr_ * 8;                                  \
        _Pragma("unroll") for (int n_ = 0; n_ < (NS); ++n_)                                 \
        _Pragma("unroll") for (int e_ = 0; e_ < 2; ++e_) {                                  \
            const int kj_ = (K0) + n_ * 8 + (T4) * 2 + e_;                                  \
            float& x_ = (S)[mt_][n_][hr_ * 2 + e_];                                         \
            __VA_ARGS__                                                                     \
        }                                                                                   \
    }

// The rules, statements on x_ (qi_, kj_) for XATTN_FWD_EACH_SCORE. A: the kernel's arguments.
//
// The score becomes score_mod(scale * score), in natural units (the caller's softmax then
// takes sl2 = log2(e)): masking.cuh's chain, or under flex_attention's hook the user's
// function (flex_hook.cuh).
#ifdef XATTN_USER_MODS
#define XATTN_FWD_SCORE_MOD(A, B, H, OFF, SQ, SK) \
    x_ = xattn_user_score_at((A).user, x_ * (A).scale, B, H, qi_, kj_, SQ, SK);
#else
#define XATTN_FWD_SCORE_MOD(A, B, H, OFF, SQ, SK)                                           \
    float dcap_;                                                                            \
    x_ = xattn_score_mod(A, x_ * (A).scale, B, H, qi_, kj_, OFF, SQ, SK, dcap_);
#endif

// Causal / window / sequence end: invisible scores become -inf.
#define XATTN_FWD_EDGE(A, OFF, SK) \
    if (!xattn_visible(qi_, kj_, OFF, SK, (A).causal, (A).wl, (A).wr)) x_ = -XATTN_INF;

// A partial block of the block mask (number PBLK, top-left pair (QB, KC)): its element rule,
// or under flex_attention's hook the user's mask_mod itself (the block mask was derived from
// it: full blocks run nothing, empty ones are never visited; QB, KC are not read).
#ifdef XATTN_USER_MODS
#define XATTN_FWD_BLOCK_MASK(A, PBLK, QB, KC, B, H, SQ, SK) \
    if (!xattn_user_visible((A).user, B, H, qi_, kj_, SQ, SK)) x_ = -XATTN_INF;
#else
#define XATTN_FWD_BLOCK_MASK(A, PBLK, QB, KC, B, H, SQ, SK) \
    if (!xattn_bm_visible((A).bm, PBLK, QB, KC, qi_, kj_)) x_ = -XATTN_INF;
#endif
