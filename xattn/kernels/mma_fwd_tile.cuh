// The per-key-block steps that the mma.sync forward kernels (flash_fwd.cu: 16-bit,
// flash_fwd_tf32.cu: TF32 / 3xTF32) share, on one warp's score fragments s[MT][NS][4] in the
// m16n8 accumulator layout (lane g = lane / 4, t = lane % 4 holds rows g and g + 8, columns
// 2t and 2t + 1 of each 8-key n-tile; MT row tiles of 16 rows): the online softmax in base 2
// and the rescale of the output accumulator. Each kernel keeps its own products and fragment
// loads; the masking passes are fwd_score_rules.cuh's.
#pragma once

#include "common.cuh"
#include "masking.cuh"

namespace xattn {

// Online softmax of one key block, per row (the 4 lanes of a quad share a row): s becomes the
// weights P = weight(2^(s sl2 - m)), m the running maximum in base-2 units, l the running sum
// of the weights as P V will see them (weight: identity, or the rounding a kernel's product
// applies), alphas the factors the accumulator must be rescaled by. Returns whether a row
// maximum of this lane moved.
template <int MT, int NS, class Weight>
__device__ __forceinline__ bool fwd_online_softmax(float (&s)[MT][NS][4], float (&m)[MT][2],
                                                   float (&l)[MT][2], float (&alphas)[MT][2],
                                                   float sl2, Weight weight) {
    bool grew = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = -XATTN_INF;
#pragma unroll
            for (int n = 0; n < NS; ++n)
                mx = fmaxf(mx, fmaxf(s[mt][n][hr * 2], s[mt][n][hr * 2 + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // Running max in base-2 units; a row with nothing visible so far keeps -inf and
            // exponentiates against 0 so that every p is exactly 0 (no inf - inf).
            const float m_new = fmaxf(m[mt][hr], mx * sl2);
            const float m_use = m_new == -XATTN_INF ? 0.f : m_new;
            const float alpha = ex2(m[mt][hr] - m_use);
            grew = grew || m_new != m[mt][hr];
            alphas[mt][hr] = alpha;
            m[mt][hr] = m_new;
            float rs = 0.f;
#pragma unroll
            for (int n = 0; n < NS; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = weight(ex2(fmaf(s[mt][n][hr * 2 + e], sl2, -m_use)));
                    s[mt][n][hr * 2 + e] = p;
                    rs += p;
                }
            }
            l[mt][hr] = l[mt][hr] * alpha + rs;
        }
    }
    return grew;
}

// The weights as computed (the 16-bit kernel rounds them in its P V packing, after the sum).
struct ExactWeight {
    __device__ __forceinline__ float operator()(float p) const { return p; }
};

// Rescale the output accumulator by the softmax's alphas. It costs one multiply per output
// element; once the row maxima settle (most key blocks) no row of the warp moved and the warp
// skips it. Measured for the 16-bit kernel on an H200: a gain at D >= 128 (+2-6%), a loss at
// D = 64 (-3%), where the rescale is only MT * D / 2 multiplies per key block.
template <int D, int MT, int ND>
__device__ __forceinline__ void fwd_rescale(float (&acc)[MT][ND][4],
                                            const float (&alphas)[MT][2], bool grew) {
    if (D < 128 || __any_sync(0xffffffffu, grew)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr)
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    acc[mt][n][hr * 2] *= alphas[mt][hr];
                    acc[mt][n][hr * 2 + 1] *= alphas[mt][hr];
                }
    }
}

}  // namespace xattn
