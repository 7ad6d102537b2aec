// TF32 operands for the float32 kernels on tensor cores (flash_fwd_tf32.cu,
// flash_fwd_tf32x3_sm90.cu, flash_bwd_tf32x3.cu): the rounding the tensor core expects, the
// 3xTF32 split (of one value, and in place of a tile that load_tile copied), and mma.sync's
// m16n8k8 .tf32 product with its 3xTF32 k-step. Why 3xTF32 keeps
// float32 accuracy, and why its small products are summed apart: flash_fwd_tf32.cu's header
// and docs/numerics.rst.

#pragma once

#include "mma_sm80.cuh"

namespace xattn {

// float32 -> TF32 (the float32 bit pattern with the low 13 mantissa bits cleared), rounded to
// nearest with ties away from zero: cvt.rna, as the tensor core expects its .tf32 operands.
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

// x = hi + lo, both TF32 (x - hi is exact: Sterbenz); lo = 0 where hi == x, so that +-inf
// stays +-inf (inf - inf would be NaN) and NaN stays NaN.
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
    hi = to_tf32(x);
    const float h = __uint_as_float(hi);
    lo = h == x ? 0u : to_tf32(x - h);
}

// C += A B, m16n8k8, TF32 operands, float32 accumulator (sm_80+).
__device__ __forceinline__ void mma_tf32(float (&c)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 3xTF32 k-step: C += Alo Bhi + Ahi Blo + Ahi Bhi (the small terms first; Alo Blo is
// dropped), A in register order.
__device__ __forceinline__ void mma3_tf32(float (&c)[4], const unsigned (&ah)[4],
                                          const unsigned (&al)[4], unsigned bh0, unsigned bh1,
                                          unsigned bl0, unsigned bl1) {
    mma_tf32(c, al[0], al[1], al[2], al[3], bh0, bh1);
    mma_tf32(c, ah[0], ah[1], ah[2], ah[3], bl0, bl1);
    mma_tf32(c, ah[0], ah[1], ah[2], ah[3], bh0, bh1);
}

// 3xTF32 split, in place, of the chunks of a tile that this thread's load_tile<ROWS, D, LD, NT,
// SW> copied (visible to it after cp.async.wait_group; the caller's barrier publishes them):
// hi in place, lo D floats further along the row (row stride LD >= 2 D).
template <int ROWS, int D, int LD, int NT, class SW = Unswizzled>
__device__ __forceinline__ void split_tile(float* s, int tid) {
    constexpr int CPR = D / 4;
    constexpr int TOTAL = ROWS * CPR;
#pragma unroll
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int i = it * NT + tid;
        if (TOTAL % NT != 0 && i >= TOTAL) break;
        const int r = i / CPR, c = i % CPR;
        float* p = s + r * LD + ((c * 4) ^ SW{}(r));
        const float4 x = *reinterpret_cast<const float4*>(p);
        uint4 hi, lo;
        split_tf32(x.x, hi.x, lo.x);
        split_tf32(x.y, hi.y, lo.y);
        split_tf32(x.z, hi.z, lo.z);
        split_tf32(x.w, hi.w, lo.w);
        *reinterpret_cast<uint4*>(p) = hi;
        *reinterpret_cast<uint4*>(p + D) = lo;
    }
}

}  // namespace xattn
