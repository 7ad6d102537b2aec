// Probes of the wgmma products of the Hopper backward (xattn/kernels/flash_bwd_sm90.cu), run by
// `python3 tools/wgmma_probe.py --bwd` on integer-valued matrices (exact in float32).
//
// probe_bwd_<t>_d<D>: one block of 256 threads (the kernel's two warpgroups) loads K (128 x D)
// and Q (64 x D) into the kernel's swizzled tiles with its load_tile, takes X (128 keys x 64
// queries) into the accumulator fragment layout, and runs the kernel's helpers:
//   c1 (128 x 64) = K Q^T                (gemm_scores: S^T and dP^T)
//   c2 (128 x D)  = X Q                  (pack_a + gemm_keys: dV += P^T dO, dK += dS^T Q)
//   c3 (64 x D)  += X^T K                (stage_ds + gemm_dq + the kernel's red.add.v2: dQ)
// c3 must be zeroed by the caller (D = 64 adds the two warpgroups' partial sums).

#define XATTN_BWD90_NO_ENTRIES
#include "flash_bwd_sm90.cu"

namespace xattn::sm90bwd {

template <class T, int D>
__device__ __forceinline__ void probe_bwd(const unsigned short* K, const unsigned short* Q,
                                          const float* X, float* c1, float* c2, float* c3) {
#if XATTN_SM90_OK
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const unsigned sK = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned sQ = sK + BN * D * 2;
    const unsigned sS = sQ + BM * D * 2;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;

    load_tile<BN, D>(sK, K, 0, BN, tid);
    load_tile<BM, D>(sQ, Q, 0, BM, tid);
    cp_async_commit_ordered();
    cp_async_wait_ordered<0>();
    fence_proxy_async();
    __syncthreads();

    // Fragment element i = n * 4 + hr * 2 + e: row (key) 64 wg + 16 warp + g + 8 hr, column
    // 8 n + 2 t4 + e.
    const int r0 = wg * 64 + warp * 16 + g;
    float x[BM / 2], s[BM / 2], acc[D / 2], dq[32];
#pragma unroll
    for (int n = 0; n < BM / 8; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                x[n * 4 + hr * 2 + e] = X[(r0 + hr * 8) * BM + n * 8 + t4 * 2 + e];
                s[n * 4 + hr * 2 + e] = 0.f;
            }
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) dq[i] = 0.f;
    unsigned xa[BM / 16][4];
    pack_a<T>(xa, x);

    fence_regs(s);
    fence_regs(acc);
#pragma unroll
    for (int j = 0; j < BM / 16; ++j) fence_regs(xa[j]);
    wgmma_fence();
    gemm_scores<T, D>(s, sK, sQ, wg);
    wgmma_commit();
    gemm_keys<T, D>(acc, xa, sQ);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);
    fence_regs(acc);

    stage_ds<T>(sS, x, wg, warp, g, t4);
    fence_proxy_async();
    __syncthreads();
    fence_regs(dq);
    wgmma_fence();
    gemm_dq<T, D>(dq, sS, sK, wg);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dq);

#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = r0 + hr * 8;
#pragma unroll
        for (int n = 0; n < BM / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) c1[r * BM + n * 8 + t4 * 2 + e] = s[n * 4 + hr * 2 + e];
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) c2[r * D + n * 8 + t4 * 2 + e] = acc[n * 4 + hr * 2 + e];
        const int qi = warp * 16 + g + hr * 8, c0 = D == 128 ? wg * 64 : 0;
#pragma unroll
        for (int n = 0; n < 8; ++n)
            red_add2(c3 + qi * D + c0 + n * 8 + t4 * 2, dq[n * 4 + hr * 2], dq[n * 4 + hr * 2 + 1]);
    }
#else
    (void)K, (void)Q, (void)X, (void)c1, (void)c2, (void)c3;
    __trap();
#endif
}

}  // namespace xattn::sm90bwd

#define XATTN_PROBE_BWD(TN, D)                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        probe_bwd_##TN##_d##D(const unsigned short* K, const unsigned short* Q, const float* X, \
                              float* c1, float* c2, float* c3) {                              \
        xattn::sm90bwd::probe_bwd<xattn::TN, D>(K, Q, X, c1, c2, c3);                         \
    }
XATTN_PROBE_BWD(f16, 64)
XATTN_PROBE_BWD(f16, 128)
XATTN_PROBE_BWD(bf16, 64)
XATTN_PROBE_BWD(bf16, 128)
