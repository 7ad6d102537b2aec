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
// probe_sss_<t>_n<N>: as ss with the 128-byte swizzle (load_tile_sw, layout type 1) and
//   K = 128 (two 64-column panels, 8 k-steps: the start advances by 32 bytes inside a panel and
//   jumps to the next panel) -- S = Q K^T of the _o2 / _o3 entries at D = 128.
// probe_rss_<t>_n<N>: as rs with the 128-byte swizzle, K = 64 keys (4 k-steps of 2048 bytes),
//   V MN-major; N = 128 spans two panels (LBO = 128 K) -- O += P V of the _o2 / _o3 entries.
// probe_ring_d<D> (below): the mbarrier K/V ring of the warp-specialised entries, bytes only.
// The descriptor's leading / stride byte offsets are kernel arguments so that the host can try
// the layout of flash_fwd_sm90.cu and the swapped one (tools/wgmma_probe.py). One block of
// 128 threads (one warpgroup). The fragment write of C is the flash kernel's epilogue layout.

#define XATTN90_NO_ENTRIES
#define XATTN90_MBAR_TIMEOUT
#include "flash_fwd_sm90.cu"

namespace xattn::sm90 {

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
    cp_async_commit_ordered();
    cp_async_wait_ordered<0>();
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
    cp_async_commit_ordered();
    cp_async_wait_ordered<0>();
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
    cp_async_commit_ordered();
    cp_async_wait_ordered<0>();
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

template <int N>
__device__ __forceinline__ void store_c(float* C, const float (&d)[N / 2], int warp, int g,
                                        int t4) {
#pragma unroll
    for (int n = 0; n < N / 8; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                C[(warp * 16 + g + hr * 8) * N + n * 8 + t4 * 2 + e] = d[n * 4 + hr * 2 + e];
}

template <class T, int N>
__device__ __forceinline__ void probe_sss(const unsigned short* A, const unsigned short* B,
                                          float* C, unsigned lbo, unsigned sbo) {
#if XATTN_SM90_OK
    constexpr int K = 128;
    extern __shared__ __align__(128) unsigned char dyn[];
    const unsigned base = (smem_u32(dyn) + 1023u) & ~1023u;  // the host adds 1 KiB
    const unsigned sA = base, sB = base + 64 * K * 2;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    load_tile_sw<64, K, 128>(sA, A, 0, 64, tid);
    load_tile_sw<N, K, 128>(sB, B, 0, N, tid);
    cp_async_commit_ordered();
    cp_async_wait_ordered<0>();
    fence_proxy_async();
    __syncthreads();
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
    const unsigned long long da = make_desc_sw128(sA, lbo, sbo);
    const unsigned long long db = make_desc_sw128(sB, lbo, sbo);
    fence_regs(d);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks)
        wgmma_ss(d, da + kmajor_step<true, 64>(ks), db + kmajor_step<true, N>(ks), ks > 0 ? 1 : 0,
                 T());
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(d);
    store_c<N>(C, d, warp, g, t4);
#else
    (void)A; (void)B; (void)C; (void)lbo; (void)sbo;
    __trap();
#endif
}

template <class T, int N>
__device__ __forceinline__ void probe_rss(const unsigned short* A, const unsigned short* B,
                                          float* C, unsigned lbo, unsigned sbo) {
#if XATTN_SM90_OK
    constexpr int K = 64;
    extern __shared__ __align__(128) unsigned char dyn[];
    const unsigned sB = (smem_u32(dyn) + 1023u) & ~1023u;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    load_tile_sw<K, N, 128>(sB, B, 0, K, tid);
    cp_async_commit_ordered();
    cp_async_wait_ordered<0>();
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
    const unsigned long long db = make_desc_sw128(sB, lbo, sbo);
    fence_regs(d);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < K / 16; ++j)
        wgmma_rs<1>(d, a[j], db + mnmajor_step<true, N>(j), 1, T());
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(d);
#pragma unroll
    for (int j = 0; j < K / 16; ++j) fence_regs(a[j]);
    store_c<N>(C, d, warp, g, t4);
#else
    (void)A; (void)B; (void)C; (void)lbo; (void)sbo;
    __trap();
#endif
}

// probe_ring_d<D>: the K/V stage handoff of the warp-specialised entries (mode bit 3), no
// wgmma. 256 threads: warpgroup 0 runs ws_produce (the kernel's producer: lean swizzled
// cp.async loads into a ring of 3 stages, full / empty mbarriers) over nkb blocks of 128 rows
// of K and V (rows >= limit zero-filled); warpgroup 1 waits for each full barrier, reads the
// stage back through the documented 128-byte swizzle into natural row-major order (out:
// nkb x 2 x 128 x D, K then V of each block) and arrives on empty. nkb > 3 turns the ring over
// and flips the barrier parities.
template <int D>
__device__ __forceinline__ void probe_ring(const unsigned short* K, const unsigned short* V,
                                           unsigned short* out, int nkb, int limit) {
#if XATTN_SM90_OK
    constexpr int BN = 128, NST = 3;
    constexpr unsigned TILE = BN * D * 2;
    extern __shared__ __align__(128) unsigned char dyn[];
    __shared__ __align__(8) unsigned long long bars[2 * NST];
    const unsigned sK = (smem_u32(dyn) + 1023u) & ~1023u;  // the host adds 1 KiB
    const unsigned sV = sK + NST * TILE;
    const unsigned fullb = smem_u32(bars), emptyb = fullb + NST * 8;
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int st = 0; st < NST; ++st) {
            mbar_init(fullb + st * 8, 128);
            mbar_init(emptyb + st * 8, 128);
        }
    }
    __syncthreads();
    if (tid < 128) {
        ws_produce<BN, D, NST>(sK, sV, K, V, 0, nkb, limit, fullb, emptyb, tid);
        return;
    }
    const int c = tid - 128;
    for (int i = 0; i < nkb; ++i) {
        const int st = i % NST;
        mbar_wait(fullb + st * 8, (i / NST) & 1);
        for (int kv = 0; kv < 2; ++kv) {
            const unsigned base = (kv ? sV : sK) + st * TILE;
            unsigned short* o = out + ((long long)i * 2 + kv) * BN * D;
            for (int e = c; e < BN * D / 8; e += 128) {  // one 16-byte chunk per step
                const int r = e / (D / 8), cc = e % (D / 8);
                const unsigned addr =
                    base + (cc >> 3) * BN * 128 + r * 128 + (((cc & 7) ^ (r & 7)) << 4);
                unsigned w0, w1, w2, w3;
                asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                             : "=r"(w0), "=r"(w1), "=r"(w2), "=r"(w3)
                             : "r"(addr));
                unsigned* dst = reinterpret_cast<unsigned*>(o + r * D + cc * 8);
                dst[0] = w0;
                dst[1] = w1;
                dst[2] = w2;
                dst[3] = w3;
            }
        }
        mbar_arrive(emptyb + st * 8);
    }
#else
    (void)K; (void)V; (void)out; (void)nkb; (void)limit;
    __trap();
#endif
}

}  // namespace xattn::sm90

extern "C" __global__ void __launch_bounds__(256)
    probe_ring_d64(const unsigned short* K, const unsigned short* V, unsigned short* out, int nkb,
                   int limit) {
    xattn::sm90::probe_ring<64>(K, V, out, nkb, limit);
}
extern "C" __global__ void __launch_bounds__(256)
    probe_ring_d128(const unsigned short* K, const unsigned short* V, unsigned short* out,
                    int nkb, int limit) {
    xattn::sm90::probe_ring<128>(K, V, out, nkb, limit);
}

#define XATTN90_PROBE(KIND, TN, N)                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                         \
        probe_##KIND##_##TN##_n##N(const unsigned short* A, const unsigned short* B, float* C, \
                                   unsigned lbo, unsigned sbo) {                              \
        xattn::sm90::probe_##KIND<xattn::TN, N>(A, B, C, lbo, sbo);                            \
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
XATTN90_PROBE(sss, f16, 64)
XATTN90_PROBE(sss, f16, 128)
XATTN90_PROBE(sss, bf16, 64)
XATTN90_PROBE(sss, bf16, 128)
XATTN90_PROBE(rss, f16, 64)
XATTN90_PROBE(rss, f16, 128)
XATTN90_PROBE(rss, bf16, 64)
XATTN90_PROBE(rss, bf16, 128)
