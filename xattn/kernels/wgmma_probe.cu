// Single-instruction probes of the wgmma layouts used by flash_fwd_sm90.cu (sm_90a).
//
// probe_ss_<t>_n<N>: C (64 x N, float32) = A (64 x 64) B^T with B (N x 64): A and B loaded
//   into the core-matrix layout of load_tile, both K-major descriptors, four chained
//   m64nNk16 wgmmas (the descriptor start advanced by 256 bytes per k-step) -- exactly S = Q K^T.
// probe_rs_<t>_n<N>: C (64 x N) = A (64 x 32) B with B (32 x N) row-major: A fragments read
//   from global straight into the register layout, B loaded like V and read MN-major
//   (imm-trans-b 1), two chained wgmmas (start advanced by 2 key blocks) -- exactly O += P V.
// probe_rsk_<t>_n<N>: C = A (64 x 64) B^T, A from registers as in rs, B K-major as in ss
//   (imm-trans-b 0): separates a register-A fault from an MN-major-B fault.
// The descriptor's leading / stride byte offsets are kernel arguments so that the host can try
// the layout of flash_fwd_sm90.cu and the swapped one (tools/wgmma_probe.py). One block of
// 128 threads (one warpgroup). The fragment write of C is the flash kernel's epilogue layout.

#define XATTN90_NO_ENTRIES
#include "flash_fwd_sm90.cu"

namespace xattn90 {

template <class T, int N>
__device__ __forceinline__ void probe_ss(const unsigned short* A, const unsigned short* B,
                                         float* C, unsigned lbo, unsigned sbo) {
#if XATTN_SM90_OK
    constexpr int K = 64;
    __shared__ __align__(128) unsigned short sA[64 * K];
    __shared__ __align__(128) unsigned short sB[N * K];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    load_tile<64, K, 128>(smem_u32(sA), A, 0, 64, tid);
    load_tile<N, K, 128>(smem_u32(sB), B, 0, N, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
    const unsigned long long da = make_desc(smem_u32(sA), lbo, sbo);
    const unsigned long long db = make_desc(smem_u32(sB), lbo, sbo);
    fence_regs(d);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks)
        wgmma_ss(d, da + (unsigned long long)(ks * 256 >> 4),
                 db + (unsigned long long)(ks * 256 >> 4), ks > 0 ? 1 : 0, T());
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(d);
#pragma unroll
    for (int n = 0; n < N / 8; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                C[(warp * 16 + g + hr * 8) * N + n * 8 + t4 * 2 + e] = d[n * 4 + hr * 2 + e];
#else
    (void)A; (void)B; (void)C; (void)lbo; (void)sbo;
    __trap();
#endif
}

template <class T, int N>
__device__ __forceinline__ void probe_rs(const unsigned short* A, const unsigned short* B,
                                         float* C, unsigned lbo, unsigned sbo) {
#if XATTN_SM90_OK
    constexpr int K = 32;
    __shared__ __align__(128) unsigned short sB[K * N];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    load_tile<K, N, 128>(smem_u32(sB), B, 0, K, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    // Register A fragment of m64k16 (per warp, 16 rows): a0 (g, 2t4..), a1 (g+8, 2t4..),
    // a2 (g, 2t4+8..), a3 (g+8, 2t4+8..), two 16-bit values per register, low = lower column.
    unsigned a[K / 16][4];
    const unsigned* A32 = reinterpret_cast<const unsigned*>(A);
#pragma unroll
    for (int j = 0; j < K / 16; ++j) {
        const int r0 = warp * 16 + g, c0 = j * 16 + t4 * 2;
        a[j][0] = A32[(r0 * K + c0) / 2];
        a[j][1] = A32[((r0 + 8) * K + c0) / 2];
        a[j][2] = A32[(r0 * K + c0 + 8) / 2];
        a[j][3] = A32[((r0 + 8) * K + c0 + 8) / 2];
    }
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
    // The key-block stride of the physical layout (16 N bytes): two per k-step.
    const unsigned long long db = make_desc(smem_u32(sB), lbo, sbo);
    fence_regs(d);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < K / 16; ++j)
        wgmma_rs<1>(d, a[j], db + (unsigned long long)((j * 2 * 16 * N) >> 4), 1, T());
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(d);
#pragma unroll
    for (int j = 0; j < K / 16; ++j) fence_regs(a[j]);
#pragma unroll
    for (int n = 0; n < N / 8; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                C[(warp * 16 + g + hr * 8) * N + n * 8 + t4 * 2 + e] = d[n * 4 + hr * 2 + e];
#else
    (void)A; (void)B; (void)C; (void)lbo; (void)sbo;
    __trap();
#endif
}

template <class T, int N>
__device__ __forceinline__ void probe_rsk(const unsigned short* A, const unsigned short* B,
                                          float* C, unsigned lbo, unsigned sbo) {
#if XATTN_SM90_OK
    constexpr int K = 64;
    __shared__ __align__(128) unsigned short sB[N * K];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    load_tile<N, K, 128>(smem_u32(sB), B, 0, N, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    unsigned a[K / 16][4];
    const unsigned* A32 = reinterpret_cast<const unsigned*>(A);
#pragma unroll
    for (int j = 0; j < K / 16; ++j) {
        const int r0 = warp * 16 + g, c0 = j * 16 + t4 * 2;
        a[j][0] = A32[(r0 * K + c0) / 2];
        a[j][1] = A32[((r0 + 8) * K + c0) / 2];
        a[j][2] = A32[(r0 * K + c0 + 8) / 2];
        a[j][3] = A32[((r0 + 8) * K + c0 + 8) / 2];
    }
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
    const unsigned long long db = make_desc(smem_u32(sB), lbo, sbo);
    fence_regs(d);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < K / 16; ++j)
        wgmma_rs<0>(d, a[j], db + (unsigned long long)(j * 256 >> 4), 1, T());
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(d);
#pragma unroll
    for (int j = 0; j < K / 16; ++j) fence_regs(a[j]);
#pragma unroll
    for (int n = 0; n < N / 8; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                C[(warp * 16 + g + hr * 8) * N + n * 8 + t4 * 2 + e] = d[n * 4 + hr * 2 + e];
#else
    (void)A; (void)B; (void)C; (void)lbo; (void)sbo;
    __trap();
#endif
}

}  // namespace xattn90

#define XATTN90_PROBE(KIND, TN, N)                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                         \
        probe_##KIND##_##TN##_n##N(const unsigned short* A, const unsigned short* B, float* C, \
                                   unsigned lbo, unsigned sbo) {                              \
        xattn90::probe_##KIND<xattn90::TN, N>(A, B, C, lbo, sbo);                            \
    }

XATTN90_PROBE(ss, f16, 64)
XATTN90_PROBE(ss, f16, 128)
XATTN90_PROBE(ss, bf16, 64)
XATTN90_PROBE(ss, bf16, 128)
XATTN90_PROBE(rs, f16, 64)
XATTN90_PROBE(rs, f16, 128)
XATTN90_PROBE(rs, bf16, 64)
XATTN90_PROBE(rs, bf16, 128)
XATTN90_PROBE(rsk, f16, 64)
XATTN90_PROBE(rsk, f16, 128)
XATTN90_PROBE(rsk, bf16, 64)
XATTN90_PROBE(rsk, bf16, 128)
