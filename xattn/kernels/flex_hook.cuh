// flex_attention's hook for the tensor-core forward kernels (xattn/_backends/cupy_/flex_tc.py):
// a source that defines XATTN_USER_MODS before the kernel file also defines XattnUserArgs,
// xattn_user_score/_mask (the user's functions translated by xattn/_flex_cuda.py) and
// XATTN_USER_PARAMS/_INIT (the arrays they read, as extra trailing kernel parameters). Without
// it the parameter macros are empty and nothing else is defined. Included by flash_fwd.cu,
// flash_fwd_sm90.cu, (XATTN_USER_MODS builds only) flash_fwd_tf32.cu, and through
// bwd_score_rules.cuh by the backward kernels (flash_bwd.cu, flash_bwd_sm90.cu), whose hook
// adds xattn_user_score_d.
#pragma once

#ifndef XATTN_USER_PARAMS
#define XATTN_USER_PARAMS
#define XATTN_USER_INIT
#endif

namespace xattn {

#ifdef XATTN_USER_MODS
// Padding rows (qi >= sq) and keys (kj >= sk) of a tile never call the user's functions:
// they may index arrays by position. Those keys are hidden by the sequence-end test anyway.
__device__ __forceinline__ float xattn_user_score_at(const XattnUserArgs& u, float x, int b,
                                                     int h, int qi, int kj, int sq, int sk) {
#if XATTN_USER_SCORE
    return (qi < sq && kj < sk) ? xattn_user_score(u, x, b, h, qi, kj) : x;
#else
    return x;
#endif
}

__device__ __forceinline__ bool xattn_user_visible(const XattnUserArgs& u, int b, int h, int qi,
                                                   int kj, int sq, int sk) {
#if XATTN_USER_MASK
    return qi < sq && kj < sk && xattn_user_mask(u, b, h, qi, kj);
#else
    return true;
#endif
}
#endif

}  // namespace xattn
