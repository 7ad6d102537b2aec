// Flash attention forward for Hopper (sm_90a): warpgroup MMA (wgmma.mma_async) with operands in
// shared memory, cp.async double buffering.
//
// One thread block = NWG consumer warpgroups of 128 threads; each warpgroup owns 64 query rows
// (the M of wgmma) of one (batch, query head) and walks the key blocks of BN keys:
//   S = Q K^T   wgmma m64nBNk16, A = Q and B = K both from shared memory (K-major),
//   online softmax in base 2 on the float32 accumulator fragment (rows g and g + 8 of each
//   warp's 16, four lanes per row, exactly like the mma.sync m16n8 layout),
//   O += P V    wgmma m64nDk16, A = P from registers (the S fragment packed to 16-bit pairs is
//               the register A fragment of m64k16), B = V from shared memory, MN-major
//               (V rows are keys = the K of this GEMM), so imm-trans-b = 1.
// Shared memory uses the no-swizzle canonical layout: 8x8 core matrices of 16-bit elements,
// each 128 contiguous bytes (8 rows of 16 bytes). A tile of R rows x D columns is stored
// row-block major: core matrix (rb, cb) (rows 8rb.., columns 8cb..) at byte
// (rb * D / 8 + cb) * 128. Descriptors (PTX ISA "Matrix Descriptor Format"): bits 0-13 start
// address >> 4, 16-29 leading byte offset >> 4 (distance between core matrices along the GEMM
// K dimension), 32-45 stride byte offset >> 4 (along M or N), 62-63 swizzle (0 = none).
//   Q, K (K-major, GEMM K = head dim):  LBO = 128 (next column block), SBO = 16 D (next row block)
//   V    (MN-major, GEMM K = keys):     LBO = 16 D (next key block),   SBO = 128 (next d block)
// tools/wgmma_probe.py checks exactly these layouts on single wgmma instructions.
//
// cp.async writes through the generic proxy and wgmma reads through the async proxy: every
// writer runs fence.proxy.async after its cp.async wait and before the barrier that precedes
// the wgmma.
//
// Layout (contiguous): q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), out like q, lse (B, Hq, Sq)
// float32 natural log. GQA: query head h reads kv head h / group. Bottom-right alignment:
// query i sits at key position i + (Sk - Sq). Options: causal, window, scale, GQA, lse; the
// _mods / _bm entries (modes 11/27/75) add the score modifications (softcap, bias, ALiBi, bool
// mask: masking.cuh's ScoreMods, applied as flash_fwd.cu applies them) and the block mask's
// CSR walk (blockmask.cuh: producer and consumers walk the same list, so only visible key
// tiles are loaded; the element rule runs in partial blocks only), and take flash_fwd.cu's
// argument list (XATTN90_MODS_PARAMS), flex_attention's hook (flex_hook.cuh) included. The
// plain entries keep their short argument list and their code.
//
// No CUDA headers; the local headers are inlined by the loader. The wgmma code is compiled only for
// sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); for other targets the entries trap.
// Entry points: flash_fwd_sm90_<f16|bf16>_d<D>_n<BN>_g<NWG>_o<mode> (mode bits at the end).
// Modes 11 / 27 (flash_fwd_sm90_ws) add a producer warpgroup: K/V stages handed over by
// mbarriers, no __syncthreads in the loop, 27 with ping-pong of the two consumer warpgroups;
// mode 75 (bit 6, the plain entries' default) fills that ring with the copy engine (TMA,
// tma_sm90.cuh): one producer thread, ws_produce_tma, or ws_produce_walk_tma along a block
// mask's CSR list.

#include "common.cuh"
#include "masking.cuh"
#include "blockmask.cuh"
#include "flex_hook.cuh"
#include "fwd_score_rules.cuh"
#include "wgmma_sm90.cuh"
#include "tma_sm90.cuh"

namespace xattn::sm90 {

// Shared-memory matrix descriptor, no swizzle (layout type 0), base offset 0.
__device__ __forceinline__ unsigned long long make_desc(unsigned addr, unsigned lbo,
                                                        unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) |
           ((unsigned long long)((lbo >> 4) & 0x3FFFu) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFFu) << 32);
}

// This thread's share of a tile of TOTAL 16-byte chunks that NT threads copy together: f(i)
// for the chunks i = tid, tid + NT, ... below TOTAL (unrolled; the bound is tested only where
// NT does not divide TOTAL). The sm_80 loaders keep their loops written out: the PTX of
// flash_fwd_simt.cu and flash_fwd_tf32.cu varies from build to build (one ld.shared more or
// less vectorised), so a change to them cannot be shown byte-identical by tools/ptx_diff.py.
template <int TOTAL, int NT, class F>
__device__ __forceinline__ void for_each_chunk(int tid, F&& f) {
#pragma unroll
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int i = it * NT + tid;
        if (TOTAL % NT != 0 && i >= TOTAL) break;
        f(i);
    }
}

// Copy a (ROWS x D) tile of 16-bit elements from global (row stride D) into the core-matrix
// layout above; rows at or past `limit` are zero-filled. Chunk c (16 bytes) goes to byte 16 c:
// eight consecutive chunks fill one core matrix (its 8 rows), so the shared-memory writes of a
// warp cover 512 contiguous bytes (no bank conflicts) and each warp reads 8 rows x 64 bytes.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(unsigned sbase, const unsigned short* g, int row0,
                                          int limit, int tid) {
    constexpr int CPR = D / 8;  // core matrices (16-byte chunks) per row
    constexpr int TOTAL = ROWS * CPR;
    for_each_chunk<TOTAL, NT>(tid, [&](int c) {
        const int cm = c >> 3, rin = c & 7;
        const int r = (cm / CPR) * 8 + rin, col = (cm % CPR) * 8;
        const bool ok = row0 + r < limit;
        const unsigned short* src = ok ? g + (long long)(row0 + r) * D + col : g;
        cp_async16_ordered(sbase + (unsigned)(c * 16), src, ok);
    });
}

// 128-byte swizzle (descriptor layout type 1): a (R rows x D) tile is stored as D / 64 panels
// of R rows x 64 columns (128 bytes per row, panel p at byte 128 R p); the 16-byte chunk c of
// row r sits at chunk c ^ (r % 8) of its row. The hardware applies the same XOR to address bits
// 4-6 with bits 7-9, so every tile starts 1024-byte aligned. K-major (Q, K): SBO = 1024 (next
// 8 rows), LBO unused (16); a k-step of 16 columns advances the start by 32 bytes inside a
// panel. MN-major (V, keys x D): SBO = 1024 (next 8 keys), LBO = 128 R (next 64 columns); a
// k-step of 16 keys advances the start by 2048 bytes. Eight consecutive threads copy the eight
// chunks of one 128-byte row: their shared-memory writes cover 128 bytes (no bank conflict)
// and their global reads 128 contiguous bytes.
__device__ __forceinline__ unsigned long long make_desc_sw128(unsigned addr, unsigned lbo,
                                                              unsigned sbo) {
    return make_desc(addr, lbo, sbo) | (1ull << 62);
}

template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile_sw(unsigned sbase, const unsigned short* g, int row0,
                                             int limit, int tid) {
    constexpr int CPR = D / 8;
    constexpr int TOTAL = ROWS * CPR;
    for_each_chunk<TOTAL, NT>(tid, [&](int i) {
        const int r = i / CPR, cc = i % CPR, c = cc & 7;
        const bool ok = row0 + r < limit;
        const unsigned short* src = ok ? g + (long long)(row0 + r) * D + cc * 8 : g;
        cp_async16_ordered(
            sbase + (unsigned)((cc >> 3) * ROWS * 128 + r * 128 + ((c ^ (r & 7)) << 4)), src, ok);
    });
}

// The layout switch (SW: 128-byte swizzle, else core matrices) for loads and descriptors.
template <bool SW, int ROWS, int D, int NT>
__device__ __forceinline__ void load_any(unsigned sbase, const unsigned short* g, int row0,
                                         int limit, int tid) {
    if constexpr (SW)
        load_tile_sw<ROWS, D, NT>(sbase, g, row0, limit, tid);
    else
        load_tile<ROWS, D, NT>(sbase, g, row0, limit, tid);
}
// K-major operand (Q or K) of a tile of R rows, from row `row` on (a multiple of 8).
template <bool SW, int R, int D>
__device__ __forceinline__ unsigned long long kmajor_desc(unsigned tile, int row) {
    if constexpr (SW)
        return make_desc_sw128(tile + row * 128, 16, 1024);
    else
        return make_desc(tile + row * D * 2, 128, 16 * D);
}
// Descriptor increment (16-byte units) of k-step ks (columns 16 ks..) of a K-major operand.
template <bool SW, int R>
__device__ __forceinline__ unsigned long long kmajor_step(int ks) {
    return SW ? (unsigned long long)(((ks >> 2) * R * 128 + (ks & 3) * 32) >> 4)
              : (unsigned long long)((ks * 256) >> 4);
}
// MN-major operand V of a tile of BN keys x D.
template <bool SW, int BN, int D>
__device__ __forceinline__ unsigned long long mnmajor_desc(unsigned tile) {
    if constexpr (SW)
        return make_desc_sw128(tile, BN * 128, 1024);
    else
        return make_desc(tile, 16 * D, 128);
}
// Descriptor increment of k-step j (keys 16 j..) of V.
template <bool SW, int D>
__device__ __forceinline__ unsigned long long mnmajor_step(int j) {
    return SW ? (unsigned long long)((j * 2048) >> 4) : (unsigned long long)((j * 32 * D) >> 4);
}

// The plain entries: the visibility rules only.
struct FwdArgs : FwdOperands<unsigned short> {
    int causal, wl, wr;  // window sides, -1 = unbounded
};

// The _o75 entries (mode bit 6, K/V by the copy engine): the plain arguments and the tensor
// maps of K and V (the addresses of the entry's __grid_constant__ parameters).
struct FwdArgsTma : FwdArgs {
    const TmaDesc* tk;
    const TmaDesc* tv;
};
// The _o203 entries (mode bit 7 on 75, EXPERIMENTAL): Q by the copy engine too (the producer
// thread's first copy), its tensor map after those of K and V.
struct FwdArgsTmaQ : FwdArgsTma {
    const TmaDesc* tq;
};
// The _o235 entries (mode bits 5 and 7 on 75, EXPERIMENTAL: persistent): one more argument,
// the batch (the grid no longer spans it).
struct FwdArgsTmaQP : FwdArgsTmaQ {
    int nb;
};
// Which copies an argument struct's entries make by the copy engine: K/V (every struct that
// extends FwdArgsTma, and FwdArgsModsTma below), and Q too (those extending FwdArgsTmaQ).
template <class A>
struct uses_tma {
    static constexpr bool value = __is_base_of(FwdArgsTma, A);
};
template <class A>
struct q_by_tma {
    static constexpr bool value = __is_base_of(FwdArgsTmaQ, A);
};

// The _mods / _bm entries: flash_fwd.cu's parameter block (ScoreMods first), the block mask
// and, for flex_attention, the arrays the user's functions read.
struct FwdArgsMods : ScoreMods, FwdOperands<unsigned short> {
    XattnBlockMask bm;  // read by the SPARSE entries only
#ifdef XATTN_USER_MODS
    XattnUserArgs user;
#endif
};

// The _o75 _mods / _bm / flex entries: that parameter block and the tensor maps of K and V.
struct FwdArgsModsTma : FwdArgsMods {
    const TmaDesc* tk;
    const TmaDesc* tv;
};
template <>
struct uses_tma<FwdArgsModsTma> {
    static constexpr bool value = true;
};

// The element passes on one score tile held by a warpgroup (fwd_score_rules.cuh): s[n * 4 +
// hr * 2 + e] is row wq0 + 16 warp + g + 8 hr, key k0 + 8 n + 2 t4 + e (the wgmma accumulator
// layout), seen as one 16-row tile per warp: s[1][BN / 8][4].
template <int BN>
__device__ __forceinline__ float (&row_tile(float (&s)[BN / 2]))[1][BN / 8][4] {
    return *reinterpret_cast<float (*)[1][BN / 8][4]>(&s);
}

// Masking by each row's interval of visible keys (masking.cuh's xattn_visible_keys): per score
// two comparisons of a compile-time key offset with the row's bounds, instead of the whole rule
// with its options read per score. An edge tile of a short window or a causal diagonal cost
// about 350 instructions a warp that way, a fifth of the window forward's instructions
// (Nsight Compute, H100, 2026-12-06); this way about 100, and the window row ran 8 % faster
// (tools/gpu_fwd_variants.py, H100, 2026-12-06; docs/dev/perf_gpu.rst).
template <int BN, class A>
__device__ __forceinline__ void mask_rows(float (&s)[BN / 2], const A& a, int wq0, int k0,
                                          int warp, int g, int t4) {
    const int base = k0 + 2 * t4;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        int lo, hi;
        xattn_visible_keys(wq0 + warp * 16 + g + 8 * hr, a.sk - a.sq, a.sk, a.causal, a.wl,
                           a.wr, lo, hi);
        lo -= base;
        hi -= base;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (8 * n + e < lo || 8 * n + e >= hi) s[n * 4 + hr * 2 + e] = -XATTN_INF;
    }
}

// The element test only where the tile needs it (rows [wq0, wq1) against keys k0..k0+BN).
template <int BN, class A>
__device__ __forceinline__ void mask_tile(float (&s)[BN / 2], const A& a, int wq0,
                                          int wq1, int k0, int warp, int g, int t4) {
    if (xattn_tile_needs_test(wq0, wq1, k0, BN, a.sk - a.sq, a.sk, a.causal, a.wl, a.wr)) {
        mask_rows<BN>(s, a, wq0, k0, warp, g, t4);
    }
}

// The score modifications on every score of a tile (the _mods entries): the caller then runs
// the softmax with sl2 = log2(e) (the scale is applied).
template <int BN>
__device__ __forceinline__ void mod_elements(float (&s)[BN / 2], const FwdArgsMods& a, int wq0,
                                             int k0, int b, int h, int warp, int g, int t4) {
    const int off = a.sk - a.sq;
    XATTN_FWD_EACH_SCORE(1, BN / 8, row_tile<BN>(s), wq0 + warp * 16, k0, g, t4,
                         XATTN_FWD_SCORE_MOD(a, b, h, off, a.sq, a.sk))
    (void)off;
}

// The element rule of partial block number pblk of the block mask (the _bm entries), or the
// user's mask_mod. Rows [q0, q0 + BM) of the thread block lie inside one mask block row, keys
// [k0, k0 + BN) inside one mask block.
template <int BN>
__device__ __forceinline__ void bm_elements(float (&s)[BN / 2], const FwdArgsMods& a, int pblk,
                                            int q0, int wq0, int k0, int b, int h, int warp,
                                            int g, int t4) {
    const int qb = q0 / a.bm.bq * a.bm.bq, kc = k0 / a.bm.bk * a.bm.bk;
    XATTN_FWD_EACH_SCORE(1, BN / 8, row_tile<BN>(s), wq0 + warp * 16, k0, g, t4,
                         XATTN_FWD_BLOCK_MASK(a, pblk, qb, kc, b, h, a.sq, a.sk))
    (void)qb, (void)kc, (void)pblk;
}

// Lazy rescaling (0 = off): a row's running max moves only when a tile's max exceeds it by more
// than this many powers of two, so after a row's first tiles alpha is exactly 1 and the warp
// skips rescaling its output (consumer_take_p). P then stays below 2^XATTN90_LAZY, which the
// 16-bit P and the float32 sums hold with their relative precision unchanged; out and lse are
// the same quantities (acc / l, m + log2 l).
#ifndef XATTN90_LAZY
#define XATTN90_LAZY 0
#endif

template <bool B>
struct bool_c {
    static constexpr bool value = B;
};

// Straight-line code (no branch): it may run while a wgmma is in flight.
template <int BN>
__device__ __forceinline__ void softmax_rows(float (&s)[BN / 2], float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], float sl2) {
    constexpr int NS = BN / 8;
    // The 4 lanes of a quad share a row.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float mx = -XATTN_INF;
#pragma unroll
        for (int n = 0; n < NS; ++n)
            mx = fmaxf(mx, fmaxf(s[n * 4 + hr * 2], s[n * 4 + hr * 2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row with nothing visible so far keeps -inf and exponentiates against 0, so every
        // p is exactly 0 (no inf - inf).
#if XATTN90_LAZY > 0
        // -inf + LAZY is -inf: a row's first visible score always sets its max.
        const float m_new = mx * sl2 > m[hr] + (float)XATTN90_LAZY ? mx * sl2 : m[hr];
        const float m_use = m_new == -XATTN_INF ? 0.f : m_new;
        alpha[hr] = m_new == m[hr] ? 1.f : ex2(m[hr] - m_use);
#else
        const float m_new = fmaxf(m[hr], mx * sl2);
        const float m_use = m_new == -XATTN_INF ? 0.f : m_new;
        alpha[hr] = ex2(m[hr] - m_use);
#endif
        m[hr] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = ex2(fmaf(s[n * 4 + hr * 2 + e], sl2, -m_use));
                s[n * 4 + hr * 2 + e] = p;
                rs += p;
            }
        l[hr] = l[hr] * alpha[hr] + rs;
    }
}

// Masking and online softmax of one score tile held by a warpgroup: s[n * 4 + hr * 2 + e] is
// row wq0 + 16 warp + g + 8 hr, key k0 + 8 n + 2 t4 + e (the wgmma accumulator layout). On
// return s holds p = 2^(s * sl2 - m), m / l are updated and alpha rescales the old output.
template <int BN, class A>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 2], float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], const A& a, int wq0,
                                             int wq1, int k0, int warp, int g, int t4,
                                             float sl2) {
    mask_tile<BN>(s, a, wq0, wq1, k0, warp, g, t4);
    softmax_rows<BN>(s, m, l, alpha, sl2);
}

// P rounded to the input type as the register A fragment of m64k16 for key chunk j: rows
// g / g + 8, keys 16 j + 2 t4 (+8), i.e. score chunks 2 j and 2 j + 1.
template <class T, int BN>
__device__ __forceinline__ void pack_p(unsigned (&p)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
        p[j][0] = pack2(s[(2 * j) * 4 + 0], s[(2 * j) * 4 + 1], T());
        p[j][1] = pack2(s[(2 * j) * 4 + 2], s[(2 * j) * 4 + 3], T());
        p[j][2] = pack2(s[(2 * j + 1) * 4 + 0], s[(2 * j + 1) * 4 + 1], T());
        p[j][3] = pack2(s[(2 * j + 1) * 4 + 2], s[(2 * j + 1) * 4 + 3], T());
    }
}

template <int D>
__device__ __forceinline__ void rescale(float (&acc)[D / 2], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            acc[n * 4 + hr * 2] *= alpha[hr];
            acc[n * 4 + hr * 2 + 1] *= alpha[hr];
        }
}

// One thread's two adjacent output columns, in the output's type (16-bit T, or float32 for
// flash_fwd_tf32x3_sm90.cu).
template <class T>
__device__ __forceinline__ void store_pair(unsigned short* p, float x, float y) {
    *reinterpret_cast<unsigned*>(p) = pack2(x, y, T());
}
template <class T>
__device__ __forceinline__ void store_pair(float* p, float x, float y) {
    *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

// Epilogue: finish the row sums across the 4 lanes of a row, normalise, write out and lse.
template <class T, int D, class A>
__device__ __forceinline__ void write_out(const A& a, const float (&acc)[D / 2],
                                          const float (&m)[2], const float (&l)[2],
                                          long long bh, int wq0, int warp, int g, int t4) {
    auto* Og = a.o + bh * a.sq * D;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float ls = l[hr];
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        ls += __shfl_xor_sync(0xffffffffu, ls, 2);
        const int qi = wq0 + warp * 16 + g + hr * 8;
        const float inv = ls > 0.f ? 1.f / ls : 0.f;
        if (qi < a.sq) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                store_pair<T>(Og + (long long)qi * D + n * 8 + t4 * 2,
                              acc[n * 4 + hr * 2] * inv, acc[n * 4 + hr * 2 + 1] * inv);
            if (t4 == 0 && a.lse)
                a.lse[bh * a.sq + qi] =
                    ls > 0.f ? (m[hr] + __log2f(ls)) * XATTN_LN2 : -XATTN_INF;
        }
    }
}

// Modes 0-3 (no warp specialisation: the schedules measured before mode 11, kept for
// experiments) are defined in tools/flash_fwd_sm90_modes.cuh, which only experimental builds
// append (tools/check_kernels.py --experimental, config=... from a checkout). The package's
// entries are warp-specialised (mode bit 3) and never instantiate this.
template <class T, int D, int BN, int NWG, bool OVL, bool SW, bool EARLY>
__device__ __forceinline__ void flash_fwd_sm90_core(const FwdArgs& a);

#if XATTN_SM90_OK
// mbarrier and named-barrier primitives of the warp-specialised schedule (mode bit 3).
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}
// Blocks until the phase of parity `parity` of the barrier has completed. With
// XATTN90_MBAR_TIMEOUT (the probe) a wait that never ends traps instead of hanging the GPU.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
#ifdef XATTN90_MBAR_TIMEOUT
    for (long long n = 0;; ++n) {
        unsigned done;
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
        if (done) return;
        if (n > (1ll << 24)) __trap();
    }
#else
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
#endif
}
// Immediate barrier ids: a register id makes ptxas reserve all 16 hardware barriers.
template <int ID, int N>
__device__ __forceinline__ void named_sync() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(N) : "memory");
}
template <int ID, int N>
__device__ __forceinline__ void named_arrive() {
    asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif

// load_tile_sw for the 128 producer threads with few registers (the producer runs on 24):
// with 128 threads and D / 8 chunks per row, a thread always copies the same chunk column, so
// its swizzled column and its row step are fixed and only the row advances.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile_sw_lean(unsigned sbase, const unsigned short* g,
                                                  int row0, int limit, int tid) {
    constexpr int CPR = D / 8;
    constexpr int RSTEP = 128 / CPR;  // rows per pass (8 or 16: keeps r % 8 fixed)
    static_assert(RSTEP % 8 == 0 && ROWS % RSTEP == 0, "fixed swizzle column per thread");
    const int cc = tid % CPR, r0 = tid / CPR;
    unsigned dst = sbase + (unsigned)((cc >> 3) * ROWS * 128 + r0 * 128 + (((cc & 7) ^ (r0 & 7)) << 4));
    const unsigned short* src = g + (long long)(row0 + r0) * D + cc * 8;
    int left = limit - row0 - r0;  // rows of this thread still inside the sequence
#pragma unroll 4
    for (int it = 0; it < ROWS / RSTEP; ++it) {
        const bool ok = left > 0;
        cp_async16_ordered(dst, ok ? src : g, ok);
        dst += RSTEP * 128;
        src += RSTEP * D;
        left -= RSTEP;
    }
}

#if XATTN_SM90_OK
// The producer warpgroup of the warp-specialised schedule (128 threads, tid 0..127): key
// blocks kb0 .. kb0 + nkb - 1 of K and V (BN rows each, rows >= limit zero-filled) into the
// ring of NST stages (K stage s at sK + s BN D 2 bytes, V likewise), swizzled. full[s] (count
// 128) is arrived when stage s holds its block and the data is visible to the async proxy
// (wgmma); the producer reuses stage s after empty[s] completed a phase. A block's full is
// arrived after the next block's copies are issued, so two blocks are in flight; NST >= 3
// keeps that from waiting on a release that needs this very arrival.
template <int BN, int D, int NST>
__device__ __forceinline__ void ws_produce(unsigned sK, unsigned sV, const unsigned short* Kg,
                                           const unsigned short* Vg, int kb0, int nkb,
                                           int limit, unsigned fullb, unsigned emptyb,
                                           int tid) {
    static_assert(NST >= 3, "see above");
    constexpr unsigned TILE = BN * D * 2;
    for (int i = 0; i < nkb; ++i) {
        const int st = i % NST;
        if (i >= NST) mbar_wait(emptyb + st * 8, ((i / NST) - 1) & 1);
        load_tile_sw_lean<BN, D>(sK + st * TILE, Kg, (kb0 + i) * BN, limit, tid);
        load_tile_sw_lean<BN, D>(sV + st * TILE, Vg, (kb0 + i) * BN, limit, tid);
        cp_async_commit_ordered();
        if (i > 0) {
            cp_async_wait_ordered<1>();
            fence_proxy_async();
            mbar_arrive(fullb + ((i - 1) % NST) * 8);
        }
    }
    if (nkb > 0) {
        cp_async_wait_ordered<0>();
        fence_proxy_async();
        mbar_arrive(fullb + ((nkb - 1) % NST) * 8);
    }
}

// ws_produce for the block-sparse entries: the key tiles of the CSR walk of mask block row
// `row` clipped to [kb0, kb1) (the consumers walk the very same list), in the same ring with
// the same handoff; stage i % NST holds the i-th visited tile.
template <int BN, int D, int NST>
__device__ __forceinline__ void ws_produce_walk(unsigned sK, unsigned sV,
                                                const unsigned short* Kg,
                                                const unsigned short* Vg,
                                                const XattnBlockMask& bm, int row, int kb0,
                                                int kb1, int limit, unsigned fullb,
                                                unsigned emptyb, int tid) {
    static_assert(NST >= 3, "see ws_produce");
    constexpr unsigned TILE = BN * D * 2;
    XattnCsrWalk walk;
    int kt, p;
    xattn_csr_begin(bm, row, BN, kb0, kb1, walk);
    xattn_csr_next(bm, walk, kt, p);
    int i = 0;
    for (; kt >= 0; ++i) {
        const int st = i % NST;
        if (i >= NST) mbar_wait(emptyb + st * 8, ((i / NST) - 1) & 1);
        load_tile_sw_lean<BN, D>(sK + st * TILE, Kg, kt * BN, limit, tid);
        load_tile_sw_lean<BN, D>(sV + st * TILE, Vg, kt * BN, limit, tid);
        cp_async_commit_ordered();
        if (i > 0) {
            cp_async_wait_ordered<1>();
            fence_proxy_async();
            mbar_arrive(fullb + ((i - 1) % NST) * 8);
        }
        xattn_csr_next(bm, walk, kt, p);
    }
    if (i > 0) {
        cp_async_wait_ordered<0>();
        fence_proxy_async();
        mbar_arrive(fullb + ((i - 1) % NST) * 8);
    }
}

// ws_produce on the copy engine (mode bit 6), run by ONE thread: for key block kb0 + j it
// waits for the stage's release, arrives on its full barrier (count 1) announcing the stage's
// bytes, and issues D / 64 boxes of {64 columns, BN rows} for K and for V, each box one
// 128-byte-swizzled panel of the tile (the layout load_tile_sw writes). The maps are 3-D
// {D, Sk, B * Hkv}: rows at or past Sk arrive as zeros, never the next head's rows; kvh is
// this block's kv head (b * Hkv + h / group). i0 is the running count of blocks handed over
// before these (0 for one tile per thread block): block kb0 + j takes stage (i0 + j) % NST, so
// a loop over several tiles continues the ring's phases. Up to NST blocks are in flight (the
// full barrier needs no arrival after the data lands, unlike ws_produce's).
template <int BN, int D, int NST>
__device__ __forceinline__ void ws_produce_tma(unsigned sK, unsigned sV, const TmaDesc* tk,
                                               const TmaDesc* tv, int kvh, int kb0, int nkb,
                                               int i0, unsigned fullb, unsigned emptyb) {
    constexpr unsigned TILE = BN * D * 2;
    for (int j = 0; j < nkb; ++j) {
        const int i = i0 + j, st = i % NST;
        if (i >= NST) mbar_wait(emptyb + st * 8, ((i / NST) - 1) & 1);
        const unsigned full = fullb + st * 8;
        tma_arrive_expect_tx(full, 2 * TILE);
        const int row = (kb0 + j) * BN;
#pragma unroll
        for (int p = 0; p < D / 64; ++p) {
            tma_load_3d(sK + st * TILE + p * BN * 128, tk, p * 64, row, kvh, full);
            tma_load_3d(sV + st * TILE + p * BN * 128, tv, p * 64, row, kvh, full);
        }
    }
}

// ws_produce_walk on the copy engine (the _o75 _bm entries), run by ONE thread: the key tiles
// of the CSR walk of mask block row `row` clipped to [kb0, kb1) -- the consumers' list --
// each handed over as ws_produce_tma hands over a block (stage i % NST for the i-th visited
// tile, its release awaited on reuse, expect_tx of both tiles on a full barrier of count 1).
template <int BN, int D, int NST>
__device__ __forceinline__ void ws_produce_walk_tma(unsigned sK, unsigned sV, const TmaDesc* tk,
                                                    const TmaDesc* tv, int kvh,
                                                    const XattnBlockMask& bm, int row, int kb0,
                                                    int kb1, unsigned fullb, unsigned emptyb) {
    constexpr unsigned TILE = BN * D * 2;
    XattnCsrWalk walk;
    int kt, pb;
    xattn_csr_begin(bm, row, BN, kb0, kb1, walk);
    xattn_csr_next(bm, walk, kt, pb);
    for (int i = 0; kt >= 0; ++i) {
        const int st = i % NST;
        if (i >= NST) mbar_wait(emptyb + st * 8, ((i / NST) - 1) & 1);
        const unsigned full = fullb + st * 8;
        tma_arrive_expect_tx(full, 2 * TILE);
#pragma unroll
        for (int p = 0; p < D / 64; ++p) {
            tma_load_3d(sK + st * TILE + p * BN * 128, tk, p * 64, kt * BN, kvh, full);
            tma_load_3d(sV + st * TILE + p * BN * 128, tv, p * 64, kt * BN, kvh, full);
        }
        xattn_csr_next(bm, walk, kt, pb);
    }
}
#endif

// Thread 0's copy-engine start, after its mbarrier inits: the inits made visible to the copy
// engine, the two tensor maps prefetched when the block has keys to load.
template <class A>
__device__ __forceinline__ void tma_start(const A& a, bool any) {
    tma_mbar_init_fence();
    if (any) {
        tma_prefetch_desc(a.tk);
        tma_prefetch_desc(a.tv);
        if constexpr (q_by_tma<A>::value) tma_prefetch_desc(a.tq);
    }
}

// The consumer warpgroup's steps, shared by flash_fwd_sm90_ws and flash_fwd_sm90_ws_kv.
// The consumer's running state before its first key tile.
template <int D, int BN>
__device__ __forceinline__ void consumer_init(float (&acc)[D / 2], float (&s)[BN / 2],
                                              float (&m)[2], float (&l)[2]) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
    m[0] = m[1] = -XATTN_INF;
    l[0] = l[1] = 0.f;
}

// S = Q K^T of one key tile (K at sK), issued and awaited.
template <class T, int BM, int BN, int D>
__device__ __forceinline__ void consumer_qk(float (&s)[BN / 2], float (&acc)[D / 2],
                                            unsigned long long dq, unsigned sK) {
    const unsigned long long dk = kmajor_desc<true, BN, D>(sK, 0);
    fence_regs(s);
    fence_regs(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        wgmma_ss(s, dq + kmajor_step<true, BM>(ks), dk + kmajor_step<true, BN>(ks),
                 ks > 0 ? 1 : 0, T());
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);
}

// O += P V of the previous key tile (V described by dv), issued, not awaited.
template <class T, int BN, int D>
__device__ __forceinline__ void consumer_pv(float (&acc)[D / 2], unsigned (&pp)[BN / 16][4],
                                            unsigned long long dv) {
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
    fence_regs(acc);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < BN / 16; ++j)
        wgmma_rs<1>(acc, pp[j], dv + mnmajor_step<true, D>(j), 1, T());
    wgmma_commit();
}

// The online softmax of S while that P V runs, then the wait for it: P of this tile in pn,
// the rescale factors in alpha (the caller releases the V stage, then consumer_take_p).
template <class T, int BN, int D>
__device__ __forceinline__ void consumer_softmax(float (&s)[BN / 2], float (&m)[2],
                                                 float (&l)[2], float (&alpha)[2],
                                                 unsigned (&pn)[BN / 16][4],
                                                 float (&acc)[D / 2],
                                                 unsigned (&pp)[BN / 16][4], float sl2) {
    softmax_rows<BN>(s, m, l, alpha, sl2);
    pack_p<T, BN>(pn, s);
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) fence_regs(pn[j]);
    fence_regs(alpha);
    fence_regs(m);
    fence_regs(l);
    wgmma_wait<0>();
    fence_regs(acc);
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
}

// The accumulator rescaled for this tile's maximum, and its P kept for the next P V.
template <int BN, int D>
__device__ __forceinline__ void consumer_take_p(float (&acc)[D / 2], const float (&alpha)[2],
                                                unsigned (&pp)[BN / 16][4],
                                                const unsigned (&pn)[BN / 16][4]) {
#if XATTN90_LAZY > 0
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f))
#endif
        rescale<D>(acc, alpha);
#pragma unroll
    for (int j = 0; j < BN / 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) pp[j][e] = pn[j][e];
}

// The last tile's P V, issued and awaited.
template <class T, int BN, int D>
__device__ __forceinline__ void consumer_last_pv(float (&acc)[D / 2],
                                                 unsigned (&pp)[BN / 16][4],
                                                 unsigned long long dv) {
    fence_regs(acc);
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < BN / 16; ++j)
        wgmma_rs<1>(acc, pp[j], dv + mnmajor_step<true, D>(j), 1, T());
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc);
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
}

// Thread blocks an SM for the one-consumer entries (NWG = 1, 256 threads): 3 for D = 64 with
// 64-key tiles -- the one such entry whose shared memory (57 KiB) fits three times and whose
// consumer fits the 136 registers left (ptxas 13.0: no spills; 128-key tiles need more); the
// others keep 2. With two, the window forward waited on latency (Nsight Compute, H100: no
// eligible warp in 55 % of the cycles); the third block's consumer lifted its row by 17 %
// (H100, 2026-12-06). XATTN90_NWG1_BLOCKS = 2 builds the two-block version, for timing.
#ifndef XATTN90_NWG1_BLOCKS
#define XATTN90_NWG1_BLOCKS 3
#endif
__host__ __device__ constexpr int nwg1_blocks(int d, int bn) {
    return d == 64 && bn == 64 ? XATTN90_NWG1_BLOCKS : 2;
}
// The consumer's registers after setmaxnreg: the launch gives each of a block's 256 threads
// R = 65536 / (blocks * 256) registers, rounded down to a multiple of 8 (128 for two blocks,
// 80 for three); the producer warpgroup keeps 24 and hands the rest to the consumer.
__host__ __device__ constexpr int nwg1_consumer_regs(int blocks) {
    return 2 * (65536 / (blocks * 256) / 8 * 8) - 24;
}

// Warp-specialised schedule (mode bit 3, after FlashAttention-3): warpgroup 0 is a producer
// that only copies K/V blocks into a ring of WS_ST stages (cp.async, 128-byte swizzle) and
// gives its registers to the NWG consumer warpgroups (setmaxnreg); the consumers run the
// overlap schedule of mode 3. Stage handoff by mbarriers, no __syncthreads in the loop:
//   full[s]  (count 128, the producer threads): the producer waits for its cp.async group,
//            makes it visible to the async proxy (fence.proxy.async) and arrives, one block
//            behind its issue so two blocks are in flight;
//   empty[s] (count 4 NWG, lane 0 of every consumer warp): arrived after the P V that last
//            reads the stage has completed (V of block j - 1 is read in iteration j).
// The producer waits on empty[s] only when it reuses stage s (block i, i >= WS_ST, waits for
// block i - WS_ST's release, which the consumers give in iteration i - WS_ST + 1; they need
// full of that block, which the producer gave at its step i - WS_ST + 2 <= i - 1 for WS_ST = 3).
// PP (mode bit 4, two consumers): ping-pong. Named barriers 2 and 3 hand the tensor cores from
// one consumer warpgroup to the other: a warpgroup issues S = Q K^T and its P V only in its
// turn and passes the turn on right after the P V issue, so its softmax runs while the other
// warpgroup's GEMMs execute.
// MODS / SPARSE (the _mods / _bm entries, A = FwdArgsMods): the score modifications on every
// visited tile, the block mask's walk; the plain entries (A = FwdArgs) compile neither.
template <class T, int D, int BN, int NWG, bool PP, bool MODS = false, bool SPARSE = false,
          class A = FwdArgs>
__device__ __forceinline__ void flash_fwd_sm90_ws(const A& a) {
#if XATTN_SM90_OK
    static_assert(D == 64 || D == 128, "wgmma wrappers exist for N = 64 and 128");
    static_assert(BN == 64 || BN == 128, "wgmma wrappers exist for N = 64 and 128");
    static_assert(NWG == 2 || ((NWG == 1 || NWG == 3) && !PP),
                  "ping-pong pairs two consumer warpgroups");
    static_assert(NWG != 1 || uses_tma<A>::value, "one consumer: the copy engine's producer");
    // Registers: 168 (NWG = 2) or 128 (NWG = 3) per thread at launch; the producer keeps 24
    // and the consumers take the rest in multiples of 8 (64512 of the 65536 in both cases).
    // The block-sparse producer's CSR walk fits the 24 as well (ptxas 13.0 allocates the code
    // after setmaxnreg.dec within it: R0-R20 in the SASS of the _bm entries).
    // NWG = 1: two thread blocks per SM (launch bound 2: 128 registers a thread at launch, the
    // producer's 24 and the consumer's 232 sum to that), so that one block's serial chain of
    // Q K^T, softmax and P V runs beside the other's (three at D = 64 with 64-key tiles, above).
    constexpr int CREGS =
        NWG == 1 ? nwg1_consumer_regs(nwg1_blocks(D, BN)) : NWG == 2 ? 240 : 160;
    constexpr int WS_ST = 3;
    constexpr int BM = NWG * 64;
    constexpr int NC = NWG * 128;  // consumer threads
    constexpr unsigned TILE = BN * D * 2;
    constexpr bool TMA = uses_tma<A>::value;  // mode bit 6: ws_produce_tma
    constexpr bool QTMA = q_by_tma<A>::value;  // mode bit 7: Q by the producer thread's copy

    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned sQa, fullb;
    if constexpr (NWG == 1) {
        // Two blocks must fit an SM's 228 KiB (less 1 KiB reserved a block): no alignment pad
        // and the mbarriers after the tiles, so the layout needs a 1 KiB-aligned base (checked).
        sQa = smem_u32(smem_raw);
        if (sQa & 1023u) __trap();
        fullb = sQa + BM * D * 2 + 2 * WS_ST * TILE;
    } else {
        // full[0..], empty[0..], then Q's full barrier in mode bit 7
        __shared__ __align__(8) unsigned long long bars[2 * WS_ST + (QTMA ? 1 : 0)];
        sQa = (smem_u32(smem_raw) + 1023u) & ~1023u;  // 1 KiB more allocated
        fullb = smem_u32(bars);
    }
    const unsigned sKa = sQa + BM * D * 2;
    const unsigned sVa = sKa + WS_ST * TILE;
    const unsigned emptyb = fullb + WS_ST * 8;
    const unsigned qfullb = emptyb + WS_ST * 8;  // mode bit 7 only

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int qblk = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int q0 = qblk * BM, q1 = min(q0 + BM, sq);
    const int hkv = a.hq / a.group;
    const long long bh = (long long)b * a.hq + h;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;
    const unsigned short* Kg = a.k + kvh;
    const unsigned short* Vg = a.v + kvh;
    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    const int nkb = kb1 > kb0 ? kb1 - kb0 : 0;

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < WS_ST; ++s) {
            mbar_init(fullb + s * 8, TMA ? 1 : 128);
            mbar_init(emptyb + s * 8, NWG * 4);  // one arrival per consumer warp
        }
        if constexpr (QTMA) mbar_init(qfullb, 1);
        if constexpr (TMA) tma_start(a, nkb > 0);
    }
    __syncthreads();  // the only block-wide barrier: the mbarriers are initialised

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if constexpr (TMA && SPARSE) {
            if (tid == 0)
                ws_produce_walk_tma<BN, D, WS_ST>(sKa, sVa, a.tk, a.tv, b * hkv + h / a.group,
                                                  a.bm, q0 / a.bm.bq, kb0, kb1, fullb, emptyb);
        } else if constexpr (TMA) {
            if (tid == 0) {
                if constexpr (QTMA) {
                    // Rows past Sq come as zeros from the map's bounds (its rows are one
                    // head's Sq), as load_tile_sw's zero fill; one box per 64-column panel.
                    if (nkb > 0) {
                        tma_arrive_expect_tx(qfullb, BM * D * 2);
#pragma unroll
                        for (int p = 0; p < D / 64; ++p)
                            tma_load_3d(sQa + p * BM * 128, a.tq, p * 64, q0, (int)bh, qfullb);
                    }
                }
                ws_produce_tma<BN, D, WS_ST>(sKa, sVa, a.tk, a.tv, b * hkv + h / a.group, kb0,
                                             nkb, 0, fullb, emptyb);
            }
        } else if constexpr (SPARSE)
            ws_produce_walk<BN, D, WS_ST>(sKa, sVa, Kg, Vg, a.bm, q0 / a.bm.bq, kb0, kb1, sk,
                                          fullb, emptyb, tid);
        else
            ws_produce<BN, D, WS_ST>(sKa, sVa, Kg, Vg, kb0, nkb, sk, fullb, emptyb, tid);
        return;
    }

    // Consumers.
    setmaxnreg_inc<CREGS>();
    const int ctid = tid - 128, cwg = wg - 1;
    const int wq0 = q0 + cwg * 64;
    const unsigned short* Qg = a.q + bh * sq * D;

    float acc[D / 2], s[BN / 2], m[2], l[2];
    consumer_init<D, BN>(acc, s, m, l);
    // With score mods the scores are scaled before them (natural units): the softmax only
    // converts to base 2.
    const float sl2 = MODS ? XATTN_LOG2E : a.scale * XATTN_LOG2E;
    const unsigned long long dq = kmajor_desc<true, BM, D>(sQa, cwg * 64);

    // SPARSE: the key tiles of the CSR walk (the producer's list); kt = -1 ends it, pblk >= 0
    // marks a tile of a partial block.
    XattnCsrWalk walk;
    int kt = -1, pblk = -1;
    if constexpr (SPARSE) {
        xattn_csr_begin(a.bm, q0 / a.bm.bq, BN, kb0, kb1, walk);
        xattn_csr_next(a.bm, walk, kt, pblk);
    }
    const bool any = SPARSE ? kt >= 0 : nkb > 0;

    if (any) {
        if constexpr (QTMA) {
            mbar_wait(qfullb, 0);
        } else {
            load_tile_sw<BM, D, NC>(sQa, Qg, q0, sq, ctid);
            cp_async_commit_ordered();
            cp_async_wait_ordered<0>();
            fence_proxy_async();
            named_sync<1, NC>();  // Q complete (consumers only; the producer never joins)
        }
    }
    if constexpr (PP) {
        if (cwg == 1) named_arrive<2, NC>();  // warpgroup 0 has the first turn
    }

    unsigned pp[BN / 16][4];
    // One visited key tile kb (the i-th): S = Q K^T, masking, P V of the previous tile, softmax.
    auto step = [&](const int i, const int kb, const int pb) {
        const int st = i % WS_ST;
        const int pst = (i + WS_ST - 1) % WS_ST;  // block kb - 1's stage
        mbar_wait(fullb + st * 8, (i / WS_ST) & 1);
        if constexpr (PP) {
            if (cwg == 0)
                named_sync<2, NC>();
            else
                named_sync<3, NC>();
        }

        consumer_qk<T, BM, BN, D>(s, acc, dq, sKa + st * TILE);
        // The element passes of the plain entries run before the P V issue (their measured
        // schedule); those of the _mods / _bm entries after it, while P V runs (they write s
        // only, no operand of that wgmma), in the order mods, visibility, block mask.
        if constexpr (!MODS && !SPARSE)
            mask_tile<BN>(s, a, wq0, min(wq0 + 64, sq), kb * BN, warp, g, t4);

        const bool first = i == 0;
        const unsigned long long dv = mnmajor_desc<true, BN, D>(sVa + (first ? st : pst) * TILE);
        if (first) {
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) pp[j][0] = pp[j][1] = pp[j][2] = pp[j][3] = 0u;
        }
        consumer_pv<T, BN, D>(acc, pp, dv);
        if constexpr (PP) {
            if (cwg == 0)
                named_arrive<3, NC>();
            else
                named_arrive<2, NC>();
        }

        if constexpr (MODS || SPARSE) {
            if constexpr (MODS) mod_elements<BN>(s, a, wq0, kb * BN, b, h, warp, g, t4);
            mask_tile<BN>(s, a, wq0, min(wq0 + 64, sq), kb * BN, warp, g, t4);
            if constexpr (SPARSE) {
                if (pb >= 0) bm_elements<BN>(s, a, pb, q0, wq0, kb * BN, b, h, warp, g, t4);
            }
        }

        float alpha[2];
        unsigned pn[BN / 16][4];
        consumer_softmax<T, BN, D>(s, m, l, alpha, pn, acc, pp, sl2);
        // V of block kb - 1 is read (the wait above is warpgroup-wide): one arrival per warp.
        if (!first && lane == 0) mbar_arrive(emptyb + pst * 8);
        consumer_take_p<BN, D>(acc, alpha, pp, pn);
    };
    int nvis = nkb;  // tiles visited
    if constexpr (SPARSE) {
        for (nvis = 0; kt >= 0; ++nvis) {
            step(nvis, kt, pblk);
            xattn_csr_next(a.bm, walk, kt, pblk);
        }
    } else {
        for (int i = 0; i < nkb; ++i) step(i, kb0 + i, -1);
    }
    if (nvis > 0)
        consumer_last_pv<T, BN, D>(acc, pp,
                                   mnmajor_desc<true, BN, D>(sVa + ((nvis - 1) % WS_ST) * TILE));
    if constexpr (PP) {
        if (cwg == 0) named_sync<2, NC>();  // takes warpgroup 1's last hand-over
    }
    write_out<T, D>(a, acc, m, l, bh, wq0, warp, g, t4);
#else
    (void)a;
    __trap();
#endif
}

#if XATTN_SM90_OK
// ws_produce_tma for the split rings of flash_fwd_sm90_ws_kv (D > 128), run by ONE thread: K
// of key block kb0 + j into K stage j % KST (full_k / empty_k), its V into V stage j % VST
// (full_v / empty_v), each stage awaited free on reuse and announced with its own bytes. A K
// stage comes back as soon as Q K^T has read it, a V stage one iteration later (after P V).
// K runs one block ahead of V in the issue order (K0, K1, V0, K2, V1, ...), so that K of block
// j + 1 does not queue behind V of block j, whose stage is freed later: with two stages of
// each, K(j + 1) is issued in the middle of iteration j - 1 and V(j) at its end, both about
// 1.5 iterations before the consumers need them.
template <int BN, int D, int KST, int VST>
__device__ __forceinline__ void ws_produce_tma_kv(unsigned sK, unsigned sV, const TmaDesc* tk,
                                                  const TmaDesc* tv, int kvh, int kb0, int nkb,
                                                  unsigned full_k, unsigned full_v,
                                                  unsigned empty_k, unsigned empty_v) {
    constexpr unsigned TILE = BN * D * 2;
    auto load_k = [&](int j) {
        const int ks = j % KST;
        if (j >= KST) mbar_wait(empty_k + ks * 8, ((j / KST) - 1) & 1);
        tma_arrive_expect_tx(full_k + ks * 8, TILE);
#pragma unroll
        for (int p = 0; p < D / 64; ++p)
            tma_load_3d(sK + ks * TILE + p * BN * 128, tk, p * 64, (kb0 + j) * BN, kvh,
                        full_k + ks * 8);
    };
    if (nkb > 0) load_k(0);
    for (int j = 0; j < nkb; ++j) {
        if (j + 1 < nkb) load_k(j + 1);
        const int vs = j % VST;
        if (j >= VST) mbar_wait(empty_v + vs * 8, ((j / VST) - 1) & 1);
        tma_arrive_expect_tx(full_v + vs * 8, TILE);
#pragma unroll
        for (int p = 0; p < D / 64; ++p)
            tma_load_3d(sV + vs * TILE + p * BN * 128, tv, p * 64, (kb0 + j) * BN, kvh,
                        full_v + vs * 8);
    }
}
#endif

// The mode-75 plain entries of head dims 256 and 192 (D > 128), and D = 128's 176-key tile
// (where three K+V stages of 88 KiB do not fit either): flash_fwd_sm90_ws's schedule
// (producer thread on the copy engine, NWG = 2 consumers running the P V overlap, masks before
// the P V issue), with K and V in separate rings. Shared memory decides at D = 256: Q (128
// rows) is 64 KiB and a 64-key tile of K or of V 32 KiB, so flash_fwd_sm90_ws's three K+V
// stages (192 KiB) do not fit beside Q in 227 KiB, and with two K+V stages a stage would come
// back only after the P V that reads its V, one iteration after its Q K^T: the producer could
// never load ahead. Here (as in FlashAttention-3) a K stage is released right after the Q K^T
// that reads it and a V stage after its P V: 2 + 2 stages, 192 KiB with Q at D = 256 (144 KiB
// at D = 192, which takes the same code with N = 192), and K of block i + 2 is issued as soon
// as block i's Q K^T is done. Registers per consumer thread at D = 256: O 128 fp32, S 32, P
// 2 x 16 (the pending P V's operand and the next one), within the 240 of setmaxnreg.
template <class T, int D, int BN, int NWG>
__device__ __forceinline__ void flash_fwd_sm90_ws_kv(const FwdArgsTma& a) {
#if XATTN_SM90_OK
    // BN = 80 (experimental, D = 256): 2 + 2 stages of 40 KiB beside Q fill 225 KiB. BN = 176
    // (D = 128's long full rows, instances.SM90_LONG: FlashAttention-3's non-causal hdim-128
    // tile): 2 + 2 stages of 44 KiB beside Q's 32 KiB, 208 KiB; registers O 64, S 88, P 2 x 44.
    static_assert(((D == 192 || D == 256) && (BN == 64 || (BN == 80 && D == 256)) ||
                   (D == 128 && BN == 176)) && NWG == 2,
                  "the split rings are sized for D = 192 / 256, 64 (80) keys, or D = 128 with "
                  "176 keys, two consumers");
    constexpr int CREGS = 240;  // 24 for the producer, as flash_fwd_sm90_ws with NWG = 2
    constexpr int KST = 2, VST = 2;
    constexpr int BM = NWG * 64;
    constexpr int NC = NWG * 128;
    constexpr unsigned TILE = BN * D * 2;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    // full_k[KST], full_v[VST], empty_k[KST], empty_v[VST]
    __shared__ __align__(8) unsigned long long bars[2 * (KST + VST)];
    const unsigned sQa = (smem_u32(smem_raw) + 1023u) & ~1023u;  // 1 KiB more allocated
    const unsigned sKa = sQa + BM * D * 2;
    const unsigned sVa = sKa + KST * TILE;
    const unsigned full_k = smem_u32(bars), full_v = full_k + KST * 8;
    const unsigned empty_k = full_v + VST * 8, empty_v = empty_k + KST * 8;

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int qblk = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int q0 = qblk * BM, q1 = min(q0 + BM, sq);
    const int hkv = a.hq / a.group;
    const long long bh = (long long)b * a.hq + h;
    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    const int nkb = kb1 > kb0 ? kb1 - kb0 : 0;

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < KST; ++s) {
            mbar_init(full_k + s * 8, 1);
            mbar_init(empty_k + s * 8, NWG * 4);  // one arrival per consumer warp
        }
#pragma unroll
        for (int s = 0; s < VST; ++s) {
            mbar_init(full_v + s * 8, 1);
            mbar_init(empty_v + s * 8, NWG * 4);
        }
        tma_start(a, nkb > 0);
    }
    __syncthreads();  // the only block-wide barrier: the mbarriers are initialised

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (tid == 0)
            ws_produce_tma_kv<BN, D, KST, VST>(sKa, sVa, a.tk, a.tv, b * hkv + h / a.group, kb0,
                                               nkb, full_k, full_v, empty_k, empty_v);
        return;
    }

    // Consumers.
    setmaxnreg_inc<CREGS>();
    const int ctid = tid - 128, cwg = wg - 1;
    const int wq0 = q0 + cwg * 64;
    const unsigned short* Qg = a.q + bh * sq * D;

    float acc[D / 2], s[BN / 2], m[2], l[2];
    consumer_init<D, BN>(acc, s, m, l);
    const float sl2 = a.scale * XATTN_LOG2E;
    const unsigned long long dq = kmajor_desc<true, BM, D>(sQa, cwg * 64);

    if (nkb > 0) {
        load_tile_sw<BM, D, NC>(sQa, Qg, q0, sq, ctid);
        cp_async_commit_ordered();
        cp_async_wait_ordered<0>();
        fence_proxy_async();
        named_sync<1, NC>();  // Q complete (consumers only; the producer never joins)
    }

    // Block kb0 + i: S = Q K^T (K stage i % KST, released once read), masking, P V of block
    // i - 1 (V stage (i - 1) % VST, released after it), softmax. Iteration 0 issues a P V of
    // P = 0 on block 0's V, as flash_fwd_sm90_ws does, so that every iteration has the same
    // shape.
    unsigned pp[BN / 16][4];
    for (int i = 0; i < nkb; ++i) {
        const int kb = kb0 + i, ks = i % KST;
        mbar_wait(full_k + ks * 8, (i / KST) & 1);
        consumer_qk<T, BM, BN, D>(s, acc, dq, sKa + ks * TILE);
        // K of block i is read (the wait is warpgroup-wide): one arrival per warp.
        if (lane == 0) mbar_arrive(empty_k + ks * 8);
        mask_tile<BN>(s, a, wq0, min(wq0 + 64, sq), kb * BN, warp, g, t4);

        const bool first = i == 0;
        const int vi = first ? 0 : i - 1, vs = vi % VST;
        mbar_wait(full_v + vs * 8, (vi / VST) & 1);
        const unsigned long long dv = mnmajor_desc<true, BN, D>(sVa + vs * TILE);
        if (first) {
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) pp[j][0] = pp[j][1] = pp[j][2] = pp[j][3] = 0u;
        }
        consumer_pv<T, BN, D>(acc, pp, dv);

        float alpha[2];
        unsigned pn[BN / 16][4];
        consumer_softmax<T, BN, D>(s, m, l, alpha, pn, acc, pp, sl2);
        if (!first && lane == 0) mbar_arrive(empty_v + vs * 8);
        consumer_take_p<BN, D>(acc, alpha, pp, pn);
    }
    if (nkb > 0) {  // the last block's P V (its V may not have been awaited yet)
        const int vi = nkb - 1, vs = vi % VST;
        mbar_wait(full_v + vs * 8, (vi / VST) & 1);
        consumer_last_pv<T, BN, D>(acc, pp, mnmajor_desc<true, BN, D>(sVa + vs * TILE));
    }
    write_out<T, D>(a, acc, m, l, bh, wq0, warp, g, t4);
#else
    (void)a;
    __trap();
#endif
}

// Persistent schedule with one consumer warpgroup (mode 235 = 75 + bits 5 and 7,
// EXPERIMENTAL). Short key spans (windows, S = 1024) give each thread block of mode 75 only a
// few key tiles, so its start -- barrier set-up, the round trip of Q and of the first K/V
// stage -- and its write-out are a large share of its time, which the other block on the SM
// hides only in part. Here the grid is two blocks per SM; each walks the tiles t = blockIdx.x,
// blockIdx.x + gridDim.x, ... of the (query block, head, batch) list in the order of the
// one-block-per-tile grid (query block fastest, longest first). The producer thread copies a
// tile's Q into one of QST buffers (Q's full / empty mbarriers: the consumer warps release a
// buffer after the tile's last S = Q K^T) and then the tile's key blocks into the K/V ring,
// whose stage and phase come from a running count of key blocks over the block's tiles; so the
// next tile's Q and first key blocks arrive while the consumers finish the current one. Tiles
// with no visible key block load nothing (both sides skip them alike) and write zeros and
// lse = -inf. The arithmetic per tile is mode 75's (the GPU tests compare the bits).
// Q buffers: two where two thread blocks still fit an SM (228 KiB, 1 KiB reserved a block).
template <int D, int BN>
struct persist_qst {
    static constexpr int value =
        2 * ((2 * 64 * D + 6 * BN * D) * 2 + 10 * 8 + 1024) <= 233472 ? 2 : 1;
};

template <class T, int D, int BN>
__device__ __forceinline__ void flash_fwd_sm90_ws_persist(const FwdArgsTmaQP& a) {
#if XATTN_SM90_OK
    static_assert(D == 64 || D == 128, "wgmma wrappers exist for N = 64 and 128");
    static_assert(BN == 64 || BN == 128, "wgmma wrappers exist for N = 64 and 128");
    constexpr int WS_ST = 3, BM = 64, QST = persist_qst<D, BN>::value;
    constexpr unsigned TILE = BN * D * 2, QBYTES = BM * D * 2;

    // Q buffers, the K and V rings, then the mbarriers: full[WS_ST], empty[WS_ST],
    // qfull[QST], qempty[QST] (flash_sm90.smem_bytes counts the same).
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const unsigned sQa = smem_u32(smem_raw);
    if (sQa & 1023u) __trap();
    const unsigned sKa = sQa + QST * QBYTES;
    const unsigned sVa = sKa + WS_ST * TILE;
    const unsigned fullb = sVa + WS_ST * TILE, emptyb = fullb + WS_ST * 8;
    const unsigned qfullb = emptyb + WS_ST * 8, qemptyb = qfullb + QST * 8;

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int sq = a.sq, sk = a.sk, off = sk - sq, hkv = a.hq / a.group;
    const int nq = (sq + BM - 1) / BM, ntiles = nq * a.hq * a.nb;
    // Tile t: query block nq - 1 - t % nq, head and batch from t / nq (head faster).
    auto tile = [&](int t, int& q0, int& h, int& b, int& kb0, int& kb1) {
        const int r = t / nq;
        q0 = (nq - 1 - (t - r * nq)) * BM;
        b = r / a.hq;
        h = r - b * a.hq;
        xattn_key_blocks(q0, min(q0 + BM, sq), off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    };

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < WS_ST; ++s) {
            mbar_init(fullb + s * 8, 1);
            mbar_init(emptyb + s * 8, 4);  // one arrival per consumer warp
        }
#pragma unroll
        for (int s = 0; s < QST; ++s) {
            mbar_init(qfullb + s * 8, 1);
            mbar_init(qemptyb + s * 8, 4);
        }
        tma_start(a, (int)blockIdx.x < ntiles);
    }
    __syncthreads();  // the only block-wide barrier: the mbarriers are initialised

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (tid == 0) {
            int i = 0, qn = 0;  // key blocks and Q tiles issued so far
            for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
                int q0, h, b, kb0, kb1;
                tile(t, q0, h, b, kb0, kb1);
                if (kb1 <= kb0) continue;
                const int qs = qn % QST;
                const unsigned qfull = qfullb + qs * 8;
                if (qn >= QST) mbar_wait(qemptyb + qs * 8, ((qn / QST) - 1) & 1);
                tma_arrive_expect_tx(qfull, QBYTES);
#pragma unroll
                for (int p = 0; p < D / 64; ++p)
                    tma_load_3d(sQa + qs * QBYTES + p * BM * 128, a.tq, p * 64, q0, b * a.hq + h,
                                qfull);
                ++qn;
                ws_produce_tma<BN, D, WS_ST>(sKa, sVa, a.tk, a.tv, b * hkv + h / a.group, kb0,
                                             kb1 - kb0, i, fullb, emptyb);
                i += kb1 - kb0;
            }
        }
        return;
    }

    // The consumer warpgroup: mode 75's steps per tile, on the running stage count.
    setmaxnreg_inc<232>();
    const float sl2 = a.scale * XATTN_LOG2E;
    float acc[D / 2], s[BN / 2], m[2], l[2];
    unsigned pp[BN / 16][4];
    int ibase = 0, qn = 0;
    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
        int q0, h, b, kb0, kb1;
        tile(t, q0, h, b, kb0, kb1);
        const int nkb = kb1 > kb0 ? kb1 - kb0 : 0;
        consumer_init<D, BN>(acc, s, m, l);
        if (nkb > 0) {
            const int qs = qn % QST;
            mbar_wait(qfullb + qs * 8, (qn / QST) & 1);
            const unsigned long long dq = kmajor_desc<true, BM, D>(sQa + qs * QBYTES, 0);
            for (int i = 0; i < nkb; ++i) {
                const int ir = ibase + i, st = ir % WS_ST;
                const int pst = (ir + WS_ST - 1) % WS_ST;  // block i - 1's stage
                mbar_wait(fullb + st * 8, (ir / WS_ST) & 1);
                consumer_qk<T, BM, BN, D>(s, acc, dq, sKa + st * TILE);
                // The tile's last S = Q K^T is complete: this warp's reads of Q are done.
                if (i == nkb - 1 && lane == 0) mbar_arrive(qemptyb + qs * 8);
                mask_tile<BN>(s, a, q0, min(q0 + 64, sq), (kb0 + i) * BN, warp, g, t4);
                const bool first = i == 0;
                if (first) {
#pragma unroll
                    for (int j = 0; j < BN / 16; ++j)
                        pp[j][0] = pp[j][1] = pp[j][2] = pp[j][3] = 0u;
                }
                consumer_pv<T, BN, D>(acc, pp,
                                      mnmajor_desc<true, BN, D>(sVa + (first ? st : pst) * TILE));
                float alpha[2];
                unsigned pn[BN / 16][4];
                consumer_softmax<T, BN, D>(s, m, l, alpha, pn, acc, pp, sl2);
                if (!first && lane == 0) mbar_arrive(emptyb + pst * 8);
                consumer_take_p<BN, D>(acc, alpha, pp, pn);
            }
            // The last block's P V, then its stage goes back to the producer.
            const int last = (ibase + nkb - 1) % WS_ST;
            consumer_last_pv<T, BN, D>(acc, pp, mnmajor_desc<true, BN, D>(sVa + last * TILE));
            if (lane == 0) mbar_arrive(emptyb + last * 8);
            ibase += nkb;
            ++qn;
        }
        write_out<T, D>(a, acc, m, l, (long long)b * a.hq + h, q0, warp, g, t4);
    }
#else
    (void)a;
    __trap();
#endif
}

// Mode bits -> schedule. Bit 3 (warp-specialised, +128 producer threads) needs bits 0 and 1.
template <class T, int D, int BN, int NWG, int OV>
__device__ __forceinline__ void flash_fwd_sm90_mode(const FwdArgs& a) {
    if constexpr ((OV & 8) != 0) {
        static_assert((OV & 3) == 3, "mode bit 3 runs the swizzled overlap schedule");
        flash_fwd_sm90_ws<T, D, BN, NWG, (OV & 16) != 0>(a);
    } else {
        flash_fwd_sm90_core<T, D, BN, NWG, (OV & 1) != 0, (OV & 2) != 0, (OV & 4) != 0>(a);
    }
}

// Mode bit 6 (the _o75 entries): the warp-specialised schedule with K/V by the copy engine.
template <class T, int D, int BN, int NWG, int OV>
__device__ __forceinline__ void flash_fwd_sm90_tma_mode(const FwdArgsTma& a) {
    static_assert((OV & 64) != 0 && (OV & 11) == 11, "mode bit 6 extends modes 11 / 27");
    if constexpr (D > 128 || BN > 128) {  // separate K and V rings (shared memory)
        static_assert(OV == 75, "head dims 192 / 256 and 176-key tiles: mode 75 only");
        flash_fwd_sm90_ws_kv<T, D, BN, NWG>(a);
    } else {
        flash_fwd_sm90_ws<T, D, BN, NWG, (OV & 16) != 0, false, false, FwdArgsTma>(a);
    }
}

// Mode bit 7 on 75 (the _o203 entries): Q by the copy engine too.
template <class T, int D, int BN, int NWG, int OV>
__device__ __forceinline__ void flash_fwd_sm90_tmaq_mode(const FwdArgsTmaQ& a) {
    static_assert(OV == 203 && D <= 128, "mode bit 7: mode 75's schedule, D = 64 / 128");
    flash_fwd_sm90_ws<T, D, BN, NWG, false, false, false, FwdArgsTmaQ>(a);
}

// Mode bits 5 and 7 on 75 (the _o235 entries): the persistent schedule, one consumer.
template <class T, int D, int BN, int NWG, int OV>
__device__ __forceinline__ void flash_fwd_sm90_persist_mode(const FwdArgsTmaQP& a) {
    static_assert(OV == 235 && NWG == 1 && D <= 128, "mode 235: one consumer, D = 64 / 128");
    flash_fwd_sm90_ws_persist<T, D, BN>(a);
}

// The _mods / _bm entries: the warp-specialised schedules only (mode bit 3).
template <class T, int D, int BN, int NWG, int OV, bool MODS, bool SPARSE>
__device__ __forceinline__ void flash_fwd_sm90_mods_mode(const FwdArgsMods& a) {
    static_assert((OV & 8) != 0 && (OV & 3) == 3, "score mods and block masks: mode 11 or 27");
    flash_fwd_sm90_ws<T, D, BN, NWG, (OV & 16) != 0, MODS, SPARSE>(a);
}

// The _o75 _mods / _bm / flex entries: those schedules with K/V by the copy engine (bit 6).
template <class T, int D, int BN, int NWG, int OV, bool MODS, bool SPARSE>
__device__ __forceinline__ void flash_fwd_sm90_mods_tma_mode(const FwdArgsModsTma& a) {
    static_assert((OV & 64) != 0 && (OV & 11) == 11, "mode bit 6 extends modes 11 / 27");
    flash_fwd_sm90_ws<T, D, BN, NWG, (OV & 16) != 0, MODS, SPARSE, FwdArgsModsTma>(a);
}

}  // namespace xattn::sm90

#define XATTN90_PARAMS                                                                     \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,             \
        unsigned short *o, float *lse, int hq, int group, int sq, int sk, float scale,      \
        int causal, int wl, int wr

// OV (entry name suffix _o<OV>), the schedule and the shared-memory layout:
//   0 plain, 1 P V overlapped with the next softmax (both core-matrix layout);
//   2 plain, 3 overlapped, both with the 128-byte swizzle;
//   7 overlapped with the swizzle, S = Q K^T issued with the previous P V (wait_group 1):
//     EXPERIMENTAL, not built -- ptxas 13.0 serialises its wgmmas (info C7513, "non wgmma
//     instructions defining input registers ... between start and end of the pipeline stage";
//     check_kernels.py does not flag ptxas infos), so it is no faster than mode 3 as written.
//   11 = 3 + bit 3: warp-specialised (flash_fwd_sm90_ws): a producer warpgroup in front of the
//     NWG = 2 consumers (launch (NWG + 1) * 128 threads), mbarrier ring of 3 K/V stages,
//     setmaxnreg 24 / 240 for NWG = 2, 24 / 160 for NWG = 3 (ptxas reports the launch-bound
//     cap, 168 or 128; no spills);
//   27 = 11 + bit 4: consumer ping-pong through named barriers 2 / 3.
//   75 = 11 + bit 6 (XATTN90_TMA_ENTRY, the plain entries' default): K/V stages filled by the
//     copy engine (cp.async.bulk.tensor from 3-D tensor maps, one producer thread, full
//     barriers of count 1 with the stage's bytes); Q stays on the consumers' cp.async. The
//     entries take the tensor maps of K and V first (xattn/_backends/cupy_/tma.py), then
//     XATTN90_PARAMS; the _mods / _bm twins (XATTN90_MODS_TMA_ENTRY) take them before
//     XATTN90_MODS_PARAMS. A persistent variant (bit 5, mode 43: one block per SM walking
//     the tiles longest-first, Q loaded by the producer) measured 0.96-1.04x mode 11 on an
//     H100 and was removed; commit ade605b holds it.
//   203 = 75 + bit 7 (XATTN90_TMAQ_ENTRY, EXPERIMENTAL): Q by the copy engine as well, the
//     producer thread's first copy (one box per 64-column panel, Q's own full barrier);
//     the entries take the tensor maps of K, V and Q first.
//   235 = 203 + bit 5 (XATTN90_TMAQP_ENTRY, EXPERIMENTAL, NWG = 1): persistent, two blocks an
//     SM walking the tiles (flash_fwd_sm90_ws_persist); the batch is one more argument.
#define XATTN90_ENTRY(TN, D, BN, NWG, OV)                                                  \
    extern "C" __global__ void __launch_bounds__(((OV & 8) ? NWG + 1 : NWG) * 128, 1)      \
        flash_fwd_sm90_##TN##_d##D##_n##BN##_g##NWG##_o##OV(XATTN90_PARAMS) {               \
        xattn::sm90::flash_fwd_sm90_mode<xattn::TN, D, BN, NWG, OV>(                         \
            xattn::sm90::FwdArgs{                                                           \
                xattn::FwdOperands<unsigned short>{q, k, v, o, lse, hq, group, sq, sk, scale}, \
                causal, wl, wr});                                                           \
    }
// One more expansion level so that -D values expand before ## pastes them.
#define XATTN90_ONE(TN, D, BN, NWG, OV) XATTN90_ENTRY(TN, D, BN, NWG, OV)
#define XATTN90_TMA_ENTRY(TN, D, BN, NWG, OV)                                              \
    extern "C" __global__ void __launch_bounds__((NWG + 1) * 128,                          \
                                    NWG == 1 ? xattn::sm90::nwg1_blocks(D, BN) : 1)        \
        flash_fwd_sm90_##TN##_d##D##_n##BN##_g##NWG##_o##OV(                                \
            const __grid_constant__ xattn::TmaDesc tk, const __grid_constant__ xattn::TmaDesc tv, \
            XATTN90_PARAMS) {                                                               \
        xattn::sm90::flash_fwd_sm90_tma_mode<xattn::TN, D, BN, NWG, OV>(                     \
            xattn::sm90::FwdArgsTma{                                                        \
                xattn::sm90::FwdArgs{                                                       \
                    xattn::FwdOperands<unsigned short>{q, k, v, o, lse, hq, group, sq, sk,  \
                                                       scale},                              \
                    causal, wl, wr},                                                        \
                &tk, &tv});                                                                 \
    }
#define XATTN90_TMA_ONE(TN, D, BN, NWG, OV) XATTN90_TMA_ENTRY(TN, D, BN, NWG, OV)
// Mode 203 (bit 7 on 75): the tensor map of Q after those of K and V.
#define XATTN90_TMAQ_ENTRY(TN, D, BN, NWG, OV)                                             \
    extern "C" __global__ void __launch_bounds__((NWG + 1) * 128,                          \
                                    NWG == 1 ? xattn::sm90::nwg1_blocks(D, BN) : 1)        \
        flash_fwd_sm90_##TN##_d##D##_n##BN##_g##NWG##_o##OV(                                \
            const __grid_constant__ xattn::TmaDesc tk, const __grid_constant__ xattn::TmaDesc tv, \
            const __grid_constant__ xattn::TmaDesc tq, XATTN90_PARAMS) {                    \
        xattn::sm90::flash_fwd_sm90_tmaq_mode<xattn::TN, D, BN, NWG, OV>(                    \
            xattn::sm90::FwdArgsTmaQ{                                                       \
                xattn::sm90::FwdArgsTma{                                                    \
                    xattn::sm90::FwdArgs{                                                   \
                        xattn::FwdOperands<unsigned short>{q, k, v, o, lse, hq, group, sq, sk, \
                                                           scale},                          \
                        causal, wl, wr},                                                    \
                    &tk, &tv},                                                              \
                &tq});                                                                      \
    }
#define XATTN90_TMAQ_ONE(TN, D, BN, NWG, OV) XATTN90_TMAQ_ENTRY(TN, D, BN, NWG, OV)
// Mode 235 (persistent, bits 5 and 7 on 75): the maps of K, V and Q, the plain arguments, then
// the batch; a grid of two blocks per SM (or fewer, one per tile).
#define XATTN90_TMAQP_ENTRY(TN, D, BN, NWG, OV)                                            \
    extern "C" __global__ void __launch_bounds__((NWG + 1) * 128, 2)                        \
        flash_fwd_sm90_##TN##_d##D##_n##BN##_g##NWG##_o##OV(                                \
            const __grid_constant__ xattn::TmaDesc tk, const __grid_constant__ xattn::TmaDesc tv, \
            const __grid_constant__ xattn::TmaDesc tq, XATTN90_PARAMS, int nb) {            \
        xattn::sm90::flash_fwd_sm90_persist_mode<xattn::TN, D, BN, NWG, OV>(                 \
            xattn::sm90::FwdArgsTmaQP{                                                      \
                xattn::sm90::FwdArgsTmaQ{                                                   \
                    xattn::sm90::FwdArgsTma{                                                \
                        xattn::sm90::FwdArgs{                                               \
                            xattn::FwdOperands<unsigned short>{q, k, v, o, lse, hq, group, sq, \
                                                               sk, scale},                  \
                            causal, wl, wr},                                                \
                        &tk, &tv},                                                          \
                    &tq},                                                                   \
                nb});                                                                       \
    }
#define XATTN90_TMAQP_ONE(TN, D, BN, NWG, OV) XATTN90_TMAQP_ENTRY(TN, D, BN, NWG, OV)

// The _mods / _bm entries (MN: mods | bm | mods_bm, flex | flex_bm for flex_attention): the
// argument list of flash_fwd.cu's entries (the parameter block, the block mask, the user's
// arrays), so one launch tuple serves both kernels.
#define XATTN90_MODS_PARAMS                                                                \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,             \
        unsigned short *o, float *lse, int hq, int group, int sq, int sk, float scale,      \
        XATTN_SCORE_MOD_PARAMS, const int *bm_frow, const int *bm_fcol, const int *bm_prow, \
        const int *bm_pcol, const unsigned *bm_tiles, int bm_bq, int bm_bk, int bm_words,   \
        int bm_rule, int bm_off, int bm_left, int bm_right XATTN_USER_PARAMS
#define XATTN90_MODS_ENTRY(TN, D, BN, NWG, OV, MN, MODS, SPARSE)                            \
    extern "C" __global__ void __launch_bounds__(((OV & 8) ? NWG + 1 : NWG) * 128, 1)      \
        flash_fwd_sm90_##TN##_d##D##_n##BN##_g##NWG##_o##OV##_##MN(XATTN90_MODS_PARAMS) {   \
        xattn::sm90::flash_fwd_sm90_mods_mode<xattn::TN, D, BN, NWG, OV, MODS, SPARSE>(     \
            xattn::sm90::FwdArgsMods{                                                       \
                XATTN_SCORE_MOD_INIT,                                                       \
                xattn::FwdOperands<unsigned short>{q, k, v, o, lse, hq, group, sq, sk, scale}, \
                xattn::XattnBlockMask{bm_frow, bm_fcol, bm_prow, bm_pcol, bm_tiles, bm_bq,    \
                                      bm_bk, bm_words, bm_rule, bm_off, bm_left, bm_right}    \
                XATTN_USER_INIT});                                                          \
    }
#define XATTN90_MODS_ONE(TN, D, BN, NWG, OV, MN, MODS, SPARSE) \
    XATTN90_MODS_ENTRY(TN, D, BN, NWG, OV, MN, MODS, SPARSE)
// Their mode-75 twins (XATTN90_TMA with XATTN90_MN): the tensor maps of K and V first, as
// XATTN90_TMA_ENTRY's, then the same XATTN90_MODS_PARAMS (flex_attention's arrays last).
#define XATTN90_MODS_TMA_ENTRY(TN, D, BN, NWG, OV, MN, MODS, SPARSE)                        \
    extern "C" __global__ void __launch_bounds__((NWG + 1) * 128, 1)                       \
        flash_fwd_sm90_##TN##_d##D##_n##BN##_g##NWG##_o##OV##_##MN(                        \
            const __grid_constant__ xattn::TmaDesc tk, const __grid_constant__ xattn::TmaDesc tv, \
            XATTN90_MODS_PARAMS) {                                                          \
        xattn::sm90::flash_fwd_sm90_mods_tma_mode<xattn::TN, D, BN, NWG, OV, MODS, SPARSE>( \
            xattn::sm90::FwdArgsModsTma{                                                    \
                xattn::sm90::FwdArgsMods{                                                   \
                    XATTN_SCORE_MOD_INIT,                                                   \
                    xattn::FwdOperands<unsigned short>{q, k, v, o, lse, hq, group, sq, sk,  \
                                                       scale},                              \
                    xattn::XattnBlockMask{bm_frow, bm_fcol, bm_prow, bm_pcol, bm_tiles,     \
                                          bm_bq, bm_bk, bm_words, bm_rule, bm_off, bm_left, \
                                          bm_right}                                         \
                    XATTN_USER_INIT},                                                       \
                &tk, &tv});                                                                 \
    }
#define XATTN90_MODS_TMA_ONE(TN, D, BN, NWG, OV, MN, MODS, SPARSE) \
    XATTN90_MODS_TMA_ENTRY(TN, D, BN, NWG, OV, MN, MODS, SPARSE)
// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
// XATTN90_NO_ENTRIES: tools/wgmma_probe.cu includes this file for its helpers only.
#if defined(XATTN90_D) && !defined(XATTN90_NO_ENTRIES)
#if defined(XATTN90_MN) && defined(XATTN90_TMA)
XATTN90_MODS_TMA_ONE(XATTN90_TN, XATTN90_D, XATTN90_BN, XATTN90_NWG, XATTN90_OV, XATTN90_MN,
                     XATTN90_MODS, XATTN90_SPARSE)
#elif defined(XATTN90_MN)
XATTN90_MODS_ONE(XATTN90_TN, XATTN90_D, XATTN90_BN, XATTN90_NWG, XATTN90_OV, XATTN90_MN,
                 XATTN90_MODS, XATTN90_SPARSE)
#elif defined(XATTN90_TMA) && XATTN90_TMA == 3
XATTN90_TMAQP_ONE(XATTN90_TN, XATTN90_D, XATTN90_BN, XATTN90_NWG, XATTN90_OV)
#elif defined(XATTN90_TMA) && XATTN90_TMA == 2
XATTN90_TMAQ_ONE(XATTN90_TN, XATTN90_D, XATTN90_BN, XATTN90_NWG, XATTN90_OV)
#elif defined(XATTN90_TMA)
XATTN90_TMA_ONE(XATTN90_TN, XATTN90_D, XATTN90_BN, XATTN90_NWG, XATTN90_OV)
#else
XATTN90_ONE(XATTN90_TN, XATTN90_D, XATTN90_BN, XATTN90_NWG, XATTN90_OV)
#endif
#endif
