// Tensor-core helpers for sm_80+ kernels (inline PTX, no CUDA headers): ldmatrix,
// mma.sync m16n8k16, 16-bit and float tile copies with cp.async. Shared by flash_fwd.cu,
// flash_bwd.cu, flash_fwd_tf32.cu, flash_bwd_tf32x3.cu and decode_splitkv.cu.
#pragma once

#include "common.cuh"

namespace xattn {

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// mma.sync m16n8k16, float accumulators, one overload per 16-bit type tag (PTX: its PTX type
// name, pasted into the instruction string).
#define XATTN_MMA_M16N8K16(TAG, PTX)                                                       \
    __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, \
                                        unsigned b1, TAG) {                                 \
        asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 {%0,%1,%2,%3}, "     \
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                      \
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                \
    }
XATTN_MMA_M16N8K16(f16, "f16")
XATTN_MMA_M16N8K16(bf16, "bf16")
#undef XATTN_MMA_M16N8K16

// The column offset, in elements, that a tile's row r XORs into its 16-byte chunks' columns
// (SW: a swizzle functor; this one keeps the plain layout).
struct Unswizzled {
    __device__ __forceinline__ int operator()(int) const { return 0; }
};

// Copy a (ROWS x D) tile of 16-bit (E = unsigned short) or float elements from global (row
// stride D) into shared memory (row stride LD; chunk c of row r at column c ^ SW(r) in
// elements); rows at or past `limit` are zero-filled.
template <int ROWS, int D, int LD, int NT, class SW = Unswizzled, class E>
__device__ __forceinline__ void load_tile(E* s, const E* g, int row0, int limit, int tid) {
    constexpr int BYTES = sizeof(E);
    constexpr int EPC = 16 / BYTES;  // elements per 16-byte chunk
    constexpr int CPR = D / EPC;     // chunks per row
    constexpr int TOTAL = ROWS * CPR;
    const unsigned sbase = smem_u32(s);
#pragma unroll
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int i = it * NT + tid;
        if (TOTAL % NT != 0 && i >= TOTAL) break;
        const int r = i / CPR, c = i % CPR;
        const bool ok = row0 + r < limit;
        const E* src = ok ? g + (long long)(row0 + r) * D + c * EPC : g;
        cp_async16(sbase + (unsigned)((r * LD + ((c * EPC) ^ SW{}(r))) * BYTES), src, ok);
    }
}

}  // namespace xattn
