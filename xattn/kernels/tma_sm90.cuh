// Hopper's tensor copy engine (TMA) for the sm_90a kernels, in namespace xattn: the tensor map
// type, its prefetch, tiled 3-D copies global -> shared that complete on an mbarrier, and the
// mbarrier pieces those copies need. No CUDA headers; the instructions compile only for sm_90a
// (XATTN_SM90_OK), the map type everywhere (it appears in entry signatures).
//
// A tensor map (cuda.h's CUtensorMap: 128 opaque bytes, 64-byte aligned) is encoded on the host
// by cuTensorMapEncodeTiled (xattn/_backends/cupy_/tma.py) and passed by value as a
// `const __grid_constant__ TmaDesc` kernel parameter: the copies take the parameter's own
// (generic) address, so the map is never copied to local memory.
//
// Visibility: the copy engine writes shared memory through the async proxy, which is also the
// proxy wgmma reads through, and the mbarrier phase that the copy's complete_tx ends makes the
// bytes visible to the threads that waited on it -- no fence.proxy.async on this path (that
// fence is for generic-proxy writes, cp.async and st.shared, read next by wgmma or TMA). The
// one fence needed is after mbarrier.init (a generic-proxy write) and before the first copy
// that signals the barrier: fence.mbarrier_init, then a CTA barrier.
#pragma once

#include "common.cuh"
#include "wgmma_sm90.cuh"

namespace xattn {

struct alignas(64) TmaDesc {
    unsigned long long w[16];
};

#if XATTN_SM90_OK
__device__ __forceinline__ unsigned long long tma_addr(const TmaDesc* d) {
    return reinterpret_cast<unsigned long long>(d);
}

// Fetches the map into the descriptor cache ahead of the first copy that uses it.
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* d) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(tma_addr(d)) : "memory");
}

// After the mbarrier.init calls of this thread: the initialised barriers are visible to the
// async proxy (the copies' complete_tx) once a CTA barrier has followed.
__device__ __forceinline__ void tma_mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// This phase's arrival, announcing the bytes that the copies signalling it will deliver: the
// phase completes when the arrivals are in and the bytes have landed.
__device__ __forceinline__ void tma_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}

// mbarrier init / wait for the copies' full barriers, for kernels without their own (the
// Hopper backward's TMA entries). The wait spins on try_wait: a phase that never completes (a
// byte count that the copies do not deliver) hangs the kernel -- callers' timeouts end it.
__device__ __forceinline__ void tma_mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void tma_mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nTMA_WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra TMA_WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// One box of a 3-D map (coordinates innermost first, in elements) into shared memory at dst
// (the map's swizzle needs dst aligned to its span: 1024 bytes for 128-byte swizzle);
// elements outside the map's bounds arrive as zeros and count in the bytes delivered.
__device__ __forceinline__ void tma_load_3d(unsigned dst, const TmaDesc* d, int c0, int c1,
                                            int c2, unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(tma_addr(d)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
#endif  // XATTN_SM90_OK

}  // namespace xattn
