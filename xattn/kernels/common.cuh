// The pieces every xattn kernel shares, in namespace xattn (inline PTX, no CUDA headers):
// the 16-bit type tags, shared-memory addresses, cp.async, 16-bit packing and unpacking, exp2,
// float32 reductions into global memory. The loader inlines this file once per kernel source.
#pragma once

namespace xattn {

struct f16 {};
struct bf16 {};

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    // src-size 0 zero-fills the 16 bytes: rows past the sequence end read as zeros.
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The same copies with a "memory" clobber: the compiler moves no shared-memory access across
// them. The Hopper kernel needs that order (its wgmma reads shared memory through the async
// proxy, invisible to the compiler); the sm_80 kernels order through __syncthreads alone.
__device__ __forceinline__ void cp_async16_ordered(unsigned dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit_ordered() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait_ordered() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two floats -> one register holding (lo, hi) in the 16-bit type, round to nearest even.
__device__ __forceinline__ unsigned pack2(float lo, float hi, f16) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, bf16) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// One 16-bit value -> float (exact in both types).
__device__ __forceinline__ float to_f32(unsigned short x, f16) {
    float r;
    asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(r) : "h"(x));
    return r;
}
__device__ __forceinline__ float to_f32(unsigned short x, bf16) {
    return __uint_as_float((unsigned)x << 16);
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Float32 add into global memory without a return value (RED, not ATOM).
__device__ __forceinline__ void red_add(float* p, float x) {
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(x) : "memory");
}

// Two adjacent floats (p 8-byte aligned): sm_90 has a vector reduction, which halves the
// number of atomic requests the backward's dq accumulation sends to L2.
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    red_add(p, x);
    red_add(p + 1, y);
#endif
}

}  // namespace xattn
