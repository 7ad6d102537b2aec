// Flash attention backward for Hopper (sm_90a) on warpgroup MMA (wgmma.mma_async): the main
// kernel of the backward (dK, dV and dQ's atomic partial sums), the table entry cupy.sm90_bwd
// (auto's backward on sm_90 for what it serves), and its dq-convert kernel; flash_bwd.cu's
// delta kernel runs before them (xattn/_backends/cupy_/flash_bwd_sm90.py).
//
// One thread block = 2 warpgroups (256 threads, no producer) owns BN = 128 keys of one
// (batch, kv head): K and V stay in shared memory, warpgroup w owns keys 64 w .. 64 w + 63 (the
// M of its wgmmas). The block walks the query heads of its GQA group and, for each, the query
// blocks of BM = 64 rows that may see its keys (causal clips the range), Q, dO, lse and delta
// double-buffered by cp.async. Per query block each warpgroup computes
//   S^T  = K Q^T       wgmma ss m64n64, A = K rows, B = Q rows, both K-major (GEMM K = head dim)
//   dP^T = V dO^T      likewise
//   P^T  = exp2(S^T scale log2e - lse log2e) on the accumulator fragment (the visibility test
//          on edge tiles only; lse = +inf on rows past Sq or that see no key: p = 0 there)
//   dS^T = P^T (dP^T - delta)
//   dV  += P^T dO      wgmma rs m64nD, A = P^T from registers (the accumulator fragment packed
//   dK  += dS^T Q      to 16-bit pairs is the register A fragment of m64k16, as the forward's
//                      P V), B = dO / Q MN-major (their rows are queries = the GEMM K)
//   dS^T is also stored (transposed, as dS: rows = queries, K-major) to shared memory, and
//   dQ  += dS K        wgmma ss m64n64 with A = dS (K-major) and B = K (MN-major, imm-trans-b),
//                      M = the 64 queries; the 64 x 64 float32 result is staged in shared
//                      memory and added to dq_accum by ONE bulk reduction per warpgroup
//                      (cp.reduce.async.bulk .add.f32, 16 KiB; the copy engine adds it in L2).
//   dq_accum is therefore laid out in accumulator-fragment order, not row-major: the tile of
//   (query block qb, 64 columns c) holds element j of warpgroup thread t at (j / 4) 512 + 4 t +
//   j % 4, so the staging stores are conflict-free float4s and the tile is one contiguous run;
//   this file's dq-convert kernel reads that order back (H100: per-thread red.add.v2 cost
//   about a quarter of the kernel's time, 256-byte bulk adds per row were slower still).
//   D = 128: warpgroup w computes dQ columns 64 w .. 64 w + 63 over all 128 keys (the two
//   warpgroups meet at a barrier after both stored their dS); D = 64: each warpgroup computes
//   the whole dQ row block over its own 64 keys and both add (no cross-warpgroup barrier).
// dK is scaled by `scale` once at the end; dK / dV are written once (GQA: the query heads of a
// group are summed in the accumulators, deterministic); dq = scale * dq_accum is the convert
// kernel's job.
//
// Shared memory: every tile in the 128-byte-swizzle layout of flash_fwd_sm90.cu (descriptor
// layout type 1): a tile of R rows x C 16-bit columns is C / 64 panels of R rows x 128 bytes
// (panel p at byte 128 R p); the 16-byte chunk c of row r sits at chunk c ^ (r % 8) of its
// row; tiles start 1024-byte aligned. K-major operand: SBO = 1024 (next 8 rows), a k-step of
// 16 columns advances the start by 32 bytes inside a panel (by a panel every 4 k-steps).
// MN-major operand: SBO = 1024 (next 8 rows along the GEMM K), LBO = 128 R (next 64 columns
// along N), a k-step of 16 rows advances the start by 2048 bytes. tools/wgmma_probe.py checks
// the forward's uses of these layouts; its "bwd" probes check this kernel's five GEMMs.
//
// cp.async and the dS stores write through the generic proxy and wgmma reads through the async
// proxy: every writer runs fence.proxy.async before the barrier that precedes the wgmma.
//
// Layout (contiguous): q, dout (B, Hq, Sq, D); k, v (B, Hkv, Sk, D); lse, delta (B, Hq, Sq)
// float32 (lse natural log, -inf on rows that see no key); dq_accum float32, B x Hq x
// ceil(Sq / 64) x D / 64 tiles of 64 x 64 in fragment order, zeroed by the launcher; dk, dv
// like k, v. GQA: query head h reads kv head h / group.
// Bottom-right alignment: query i sits at key position i + (Sk - Sq). The plain entries:
// causal, scale, GQA. The option entries (_win, _mods, _bm, _mods_bm; _flex, _flex_bm under
// flex_attention_backward's hook) take flash_bwd.cu's argument list (bwd_score_rules.cuh) and
// add the window (which also clips each key block's range of query blocks), the score
// modifications (softcap with its derivative in dS, ALiBi, bias, mask; or the user's
// score_mod with its derivative) and the block mask: the key block's CSC column is counted,
// then walked step by step (blockmask.cuh), each step's partial-block number kept for the
// element rule (or the user's mask_mod), with the mma.sync backward's per-element rules
// (bwd_p, bwd_ds of bwd_score_rules.cuh): at D = 64 P^T while dP^T runs, as the plain entries,
// then dS^T; at D = 128 both in one pass after dP^T (registers). The launcher checks that the
// 128 keys lie inside one mask key block and each 64-row step inside one mask query block.
//
// TMA entries (_tma: NB = 3 Q/dO buffers, _tma2: NB = 2; the plain requests' default, the
// launcher's DEFAULT_CONFIG; on an H100 1.15-1.25x the cp.async entry): the same products in
// the same order, only the loads differ. Thread 0
// issues Q and dO of step i + NB - 1 (boxes of 64 columns x 64 rows from the tensor maps of
// tma.py, which write the 128-byte-swizzled panels above; rows past Sq arrive as zeros) into
// buffer (i + NB - 1) % NB, announcing their bytes with mbarrier.arrive.expect_tx on that
// buffer's full barrier (count 1); K and V come once, on step 0's phase. That buffer was last
// read in step i - 1, whose wgmmas completed before the barrier ending it, so no empty barrier
// is needed. Every thread waits on the full barrier of buffer i % NB, parity (i / NB) & 1,
// instead of cp.async wait + fence.proxy.async + a block barrier (the copy engine writes
// through the async proxy, which wgmma reads). lse and delta of step i + 1 come as raw values
// by 4-byte cp.async issued at the top of step i by the first BM threads, which wait for them,
// map them as stage() does (log2e, +inf for -inf and rows past Sq, delta 0 there) and are
// published by the block barrier ending step i. A byte count that the copies never deliver
// would hang the wait: the GPU scripts run under timeouts.
//
// The _nodq twins (deterministic=True; DQ = false in the core): the TMA and option entries'
// arguments and their dK / dV products in the same order (bit for bit theirs), nothing of dQ:
// no dS staging, no dS K, no bulk adds (dq_accum is not read), less shared memory; dq comes
// from flash_bwd.cu's deterministic dq kernel (one CTA per query block, no atomics).
//
// No CUDA headers; the local headers are inlined by the loader. The wgmma code is compiled only
// for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); for other targets the entries trap.
// Entry points: flash_bwd_sm90_<f16|bf16>_d<64|128>[_<win|mods|bm|mods_bm|flex|flex_bm|tma|
// tma2>][_nodq].

#include "common.cuh"
#include "masking.cuh"
#include "bwd_score_rules.cuh"
#include "wgmma_sm90.cuh"
#include "tma_sm90.cuh"

namespace xattn::sm90bwd {

struct BwdArgs {
    const unsigned short* q;
    const unsigned short* k;
    const unsigned short* v;
    const unsigned short* dout;
    const float* lse;
    const float* delta;
    float* dq_accum;
    unsigned short* dk;
    unsigned short* dv;
    int hq, group, sq, sk;
    float scale;
    int causal;
    static constexpr int wl = -1, wr = -1;  // no window: the option entries take one
};

// The TMA entries (_tma: NB = 3 Q/dO buffers, _tma2: 2): the plain entries'
// arguments and the tensor maps of q, dout (boxes of 64 columns x BM rows) and k, v (64 x BN),
// the kernel parameters' own addresses (const __grid_constant__ TmaDesc).
template <int NB>
struct BwdArgsTma : BwdArgs {
    const TmaDesc* tq;
    const TmaDesc* tdo;
    const TmaDesc* tk;
    const TmaDesc* tv;
};
// Their sliding-window twins (_tma_win / _tma2_win, EXPERIMENTAL): the window sides (-1 =
// unbounded) as two more arguments, which hide BwdArgs's constant ones. The plain entries' code
// reads them already (the query-block range, the edge tiles' visibility test).
template <int NB>
struct BwdArgsTmaWin : BwdArgsTma<NB> {
    int wl, wr;
};

constexpr int BN = 128;  // keys per block (64 per warpgroup)
constexpr int BM = 64;   // query rows per step
constexpr int NT = 256;  // threads
constexpr int DQ_TILE = 64 * 64;  // floats of one dQ tile (64 queries x 64 columns)

#if XATTN_SM90_OK
// Shared-memory matrix descriptor with the 128-byte swizzle (layout type 1), base offset 0:
// bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 62-63 layout type.
__device__ __forceinline__ unsigned long long desc_sw(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) |
           ((unsigned long long)((lbo >> 4) & 0x3FFFu) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
// K-major operand: rows `row`.. (a multiple of 8) of a tile of R rows; k-step ks (16 columns).
template <int R>
__device__ __forceinline__ unsigned long long kmaj(unsigned tile, int row, int ks) {
    return desc_sw(tile + row * 128 + (ks >> 2) * R * 128 + (ks & 3) * 32, 16, 1024);
}
// MN-major operand of a tile of R rows (the GEMM K) from panel p (64 columns of N) on; k-step j
// (rows 16 j..).
template <int R>
__device__ __forceinline__ unsigned long long mnmaj(unsigned tile, int p, int j) {
    return desc_sw(tile + p * R * 128 + j * 2048, R * 128, 1024);
}

// wgmma m64n64k16 with A and B from shared memory, B MN-major (imm-trans-b = 1): dQ = dS K.
#define XATTN_BWD90_SS_TB(TY)                                                                 \
    __device__ __forceinline__ void wgmma_ss_tb(float (&d)[32], unsigned long long da,        \
                                                unsigned long long db, int scale_d, TY) {     \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                             \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TY "." #TY " "            \
                     XATTN_REGS32 ", %32, %33, p, 1, 1, 0, 1;\n}\n"                            \
                     : XATTN_ACC32                                                             \
                     : "l"(da), "l"(db), "r"(scale_d));                                        \
    }
XATTN_BWD90_SS_TB(f16)
XATTN_BWD90_SS_TB(bf16)

// dst[0..DQ_TILE) += the tile at shared address src, by the copy engine (bulk_group: the
// issuing thread later waits for the read of src before it is rewritten).
__device__ __forceinline__ void bulk_add_tile(float* dst, unsigned src) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 ::"l"(dst), "r"(src), "n"(DQ_TILE * 4) : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void bulk_wait_all() {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// Immediate barrier ids (a register id makes ptxas reserve all 16 hardware barriers).
template <int ID, int N>
__device__ __forceinline__ void bar_sync() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(N) : "memory");
}

// st.shared.u16 at addr + OFF (an immediate: the compiler keeps one base register, not one
// address per element).
template <int OFF>
__device__ __forceinline__ void st_shared_u16(unsigned addr, unsigned short x) {
    asm volatile("st.shared.u16 [%0 + %2], %1;\n" ::"r"(addr), "h"(x), "n"(OFF) : "memory");
}
// The value, opaque to the optimiser: descriptors and addresses derived from it inside the loop
// are recomputed each step (a few integer adds) instead of being hoisted into dozens of
// registers that the accumulators need.
__device__ __forceinline__ unsigned opaque(unsigned x) {
    asm volatile("" : "+r"(x));
    return x;
}
__device__ __forceinline__ unsigned short to_bits(float x, f16) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ unsigned short to_bits(float x, bf16) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
    return r;
}
#endif  // XATTN_SM90_OK

// A (ROWS x D) tile of 16-bit elements from global (row stride D) into the swizzled layout;
// rows at or past `limit` are zero-filled. Eight consecutive threads copy the eight chunks of
// one 128-byte panel row (no bank conflict, 128 contiguous global bytes).
template <int ROWS, int D>
__device__ __forceinline__ void load_tile(unsigned sbase, const unsigned short* g, int row0,
                                          int limit, int tid) {
    constexpr int CPR = D / 8;
    constexpr int TOTAL = ROWS * CPR;
    static_assert(TOTAL % NT == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int it = 0; it < TOTAL / NT; ++it) {
        const int i = it * NT + tid;
        const int r = i / CPR, cc = i % CPR, c = cc & 7;
        const bool ok = row0 + r < limit;
        const unsigned short* src = ok ? g + (long long)(row0 + r) * D + cc * 8 : g;
        cp_async16_ordered(
            sbase + (unsigned)((cc >> 3) * ROWS * 128 + r * 128 + ((c ^ (r & 7)) << 4)), src, ok);
    }
}

// P^T rounded to the input type as the register A fragment of m64k16 for query chunk j
// (accumulator n-blocks 2 j and 2 j + 1), as the forward packs P.
template <class T>
__device__ __forceinline__ void pack_a(unsigned (&p)[BM / 16][4], const float (&s)[BM / 2]) {
#pragma unroll
    for (int j = 0; j < BM / 16; ++j) {
        p[j][0] = pack2(s[(2 * j) * 4 + 0], s[(2 * j) * 4 + 1], T());
        p[j][1] = pack2(s[(2 * j) * 4 + 2], s[(2 * j) * 4 + 3], T());
        p[j][2] = pack2(s[(2 * j + 1) * 4 + 0], s[(2 * j + 1) * 4 + 1], T());
        p[j][3] = pack2(s[(2 * j + 1) * 4 + 2], s[(2 * j + 1) * 4 + 3], T());
    }
}

#if XATTN_SM90_OK
// The dS stores of one thread: element dp[n * 4 + hr * 2 + e] at b4[hr][e] + 1024 n.
template <class T, int N = 0>
__device__ __forceinline__ void store_ds(const unsigned (&b4)[2][2], const float (&dp)[BM / 2]) {
    if constexpr (N < BM / 8) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                st_shared_u16<N * 1024>(b4[hr][e], to_bits(dp[N * 4 + hr * 2 + e], T()));
        store_ds<T, N + 1>(b4, dp);
    }
}

// The five products of one step for warpgroup wg (issue only; the caller fences, commits and
// waits). tools/wgmma_probe_bwd.cu runs exactly these on integer matrices.
// S^T (or dP^T) = A B^T over the head dim: A = rows 64 wg.. of the BN-row tile at, B = the
// BM-row tile bt, both K-major.
template <class T, int D>
__device__ __forceinline__ void gemm_scores(float (&s)[BM / 2], unsigned at, unsigned bt,
                                            int wg) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        wgmma_ss(s, kmaj<BN>(at, wg * 64, ks), kmaj<BM>(bt, 0, ks), ks > 0 ? 1 : 0, T());
}
// acc += X B: X (64 keys x BM queries) from registers (pack_a), B = the BM x D tile bt, read
// MN-major (dV += P^T dO, dK += dS^T Q).
template <class T, int D>
__device__ __forceinline__ void gemm_keys(float (&acc)[D / 2], const unsigned (&x)[BM / 16][4],
                                          unsigned bt) {
#pragma unroll
    for (int j = 0; j < BM / 16; ++j) wgmma_rs<1>(acc, x[j], mnmaj<BM>(bt, 0, j), 1, T());
}
// gemm_keys as a commit group of its own, its register operands fenced first.
template <class T, int D>
__device__ __forceinline__ void issue_keys(float (&acc)[D / 2], unsigned (&x)[BM / 16][4],
                                           unsigned bt) {
#pragma unroll
    for (int j = 0; j < BM / 16; ++j) fence_regs(x[j]);
    fence_regs(acc);
    wgmma_fence();
    gemm_keys<T, D>(acc, x, bt);
    wgmma_commit();
}
// dS^T fragment x (element x[n * 4 + hr * 2 + e]: key 64 wg + 16 warp + g + 8 hr, query
// 8 n + 2 t4 + e) stored as dS (queries x keys, K-major, swizzled) at sS: element (query ql,
// key kl) at panel kl / 64, row ql, chunk (kl % 64) / 8 ^ ql % 8, byte 2 (kl % 8). With
// ql = 8 n + 2 t4 + e and kl = 64 wg + 16 warp + 8 hr + g the chunk depends on (hr, e) only
// and the row step 8 n is an immediate 1024 n. Two threads share each 32-bit word of a store:
// no bank conflict.
template <class T>
__device__ __forceinline__ void stage_ds(unsigned sS, const float (&x)[BM / 2], int wg,
                                         int warp, int g, int t4) {
    const unsigned base = opaque(sS) + (unsigned)(wg * BM * 128 + t4 * 256 + g * 2);
    const int cw = 2 * warp, r2 = 2 * t4;
    unsigned b4[2][2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int e = 0; e < 2; ++e)
            b4[hr][e] = base + e * 128 + ((((cw + hr) ^ (r2 + e)) & 7) << 4);
    store_ds<T>(b4, x);
}
// dQ (64 queries x 64 columns) = dS K: D = 128, columns 64 wg.. over all BN keys; D = 64, all
// columns over this warpgroup's 64 keys (the two warpgroups' partial sums are both added).
template <class T, int D>
__device__ __forceinline__ void gemm_dq(float (&dq)[32], unsigned sS, unsigned kt, int wg) {
    constexpr int KS0 = D == 128 ? 0 : 1;  // multiplies wg: the first k-step / 4
    constexpr int NKS = D == 128 ? BN / 16 : 4;
#pragma unroll
    for (int ks = 0; ks < NKS; ++ks) {
        const int kk = KS0 * wg * 4 + ks;
        wgmma_ss_tb(dq, kmaj<BM>(sS, 0, kk), mnmaj<BN>(kt, D == 128 ? wg : 0, kk),
                    ks > 0 ? 1 : 0, T());
    }
}
#endif

// XATTN90_BWD_EDGE_ROWS: the largest head dim whose entries mask an edge tile by intervals
// (64), as the forward's mask_rows does since it measured 8 % faster on the window row
// (flash_fwd_sm90.cu): each key's interval of visible queries (masking.cuh's
// xattn_visible_queries) in the main kernel's key-major tiles, each query's interval of keys in
// the dq kernel's, two comparisons a score instead of the whole rule. The same scores become
// -inf, so the gradients equal the per-score rule's bit for bit
// (tests/gpu/test_gpu_sm90_bwd_switches.py builds 0 and 128 beside the shipped 64). One H100 run
// of tools/gpu_bwd_variants.py (2026-12-06, fp16, TFLOP/s, per-score rule -> intervals): D = 64
// window +-256 at S = 65536 145.5 -> 164.7, S = 4096 causal 265.9 -> 274.5; D = 128 S = 4096
// causal 369.4 -> 348.4, deterministic 306.1 -> 294.8, S = 1024 causal 225.3 -> 217.3.
#ifndef XATTN90_BWD_EDGE_ROWS
#define XATTN90_BWD_EDGE_ROWS 64
#endif
__host__ __device__ constexpr bool edge_rows(int d) { return d <= XATTN90_BWD_EDGE_ROWS; }

// Key-major tile: s[n * 4 + hr * 2 + e] is key kw + g + 8 hr, query q0 + 8 n + 2 t4 + e.
template <int BM>
__device__ __forceinline__ void mask_key_rows(float (&s)[BM / 2], int q0, int kw, int g, int t4,
                                              int off, int sk, int causal, int wl, int wr) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        int lo, hi;
        xattn_visible_queries(kw + g + 8 * hr, off, sk, causal, wl, wr, lo, hi);
        const int base = q0 + 2 * t4;
        lo = lo > base ? lo - base : 0;
        hi = hi > base ? hi - base : 0;  // >= 0: the compile-time offsets below are >= 0
#pragma unroll
        for (int n = 0; n < BM / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (8 * n + e < lo || 8 * n + e >= hi) s[n * 4 + hr * 2 + e] = -XATTN_INF;
    }
}

// Query-major tile (the dq kernel): s[n * 4 + hr * 2 + e] is query qw + g + 8 hr, key k0 + 8 n +
// 2 t4 + e.
template <int NK>
__device__ __forceinline__ void mask_query_rows(float (&s)[NK / 2], int qw, int k0, int g,
                                                int t4, int off, int sk, int causal, int wl,
                                                int wr) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        int lo, hi;
        xattn_visible_keys(qw + g + 8 * hr, off, sk, causal, wl, wr, lo, hi);
        lo -= k0 + 2 * t4;
        hi -= k0 + 2 * t4;
#pragma unroll
        for (int n = 0; n < NK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (8 * n + e < lo || 8 * n + e >= hi) s[n * 4 + hr * 2 + e] = -XATTN_INF;
    }
}

template <class A>
struct plain_args {  // the plain entries' argument struct (no window, no options)
    static constexpr bool value = false;
};
template <>
struct plain_args<BwdArgs> {
    static constexpr bool value = true;
};
template <int NB>
struct plain_args<BwdArgsTma<NB>> {
    static constexpr bool value = true;
};
template <int NB>
struct plain_args<BwdArgsTmaWin<NB>> {
    static constexpr bool value = true;
};
// Q/dO buffers filled by the copy engine (0: cp.async by every thread, two buffers).
template <class A>
struct tma_bufs {
    static constexpr int value = 0;
};
template <int NB>
struct tma_bufs<BwdArgsTma<NB>> {
    static constexpr int value = NB;
};
template <int NB>
struct tma_bufs<BwdArgsTmaWin<NB>> {
    static constexpr int value = NB;
};

#if XATTN_SM90_OK
// One 4-byte row value (lse or delta) global -> shared, completing with the thread's cp.async
// groups (the TMA entries' lse / delta of the next step).
__device__ __forceinline__ void cp_async4(unsigned dst, const float* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
#endif

// MODS / SPARSE (the option entries, A = xattn::BwdArgs of bwd_score_rules.cuh): the score
// modifications (or flex_attention's score_mod) and the block mask's CSC walk (or the mask
// derived from mask_mod); the window entries (neither, A = xattn::BwdArgs) only read the
// window sides. The plain entries (A = BwdArgs above) compile none of it.
// DQ false (the _nodq entries of deterministic=True): dK and dV only, from the same products
// in the same order (bit for bit the DQ entry's); no dS staging, no dS K, no bulk adds, no
// dq_accum (a null pointer, never read): flash_bwd.cu's deterministic dq kernel computes dq.
template <class T, int D, bool MODS = false, bool SPARSE = false, bool DQ = true,
          class A = BwdArgs>
__device__ __forceinline__ void flash_bwd_sm90_core(const A& a) {
#if XATTN_SM90_OK
    static_assert(D == 64 || D == 128, "wgmma wrappers exist for N = 64 and 128");
    constexpr unsigned KV_TILE = BN * D * 2, Q_TILE = BM * D * 2;
    constexpr unsigned DS_TILE = DQ ? BM * BN * 2 : 0;
    constexpr int DQ_STAGE = DQ ? DQ_TILE : 0;
    // TMA (the _tma entries): the copy engine fills NBUF Q/dO buffers, each on its full
    // mbarrier; lse / delta stay two thread-written buffers.
    constexpr bool TMA = tma_bufs<A>::value > 0;
    constexpr int NBUF = TMA ? tma_bufs<A>::value : 2;
    static_assert(NBUF == 2 || NBUF == 3, "two or three Q/dO buffers");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    const unsigned raw = smem_u32(smem_raw);
    const unsigned sK = (raw + 1023u) & ~1023u;  // 1 KiB more allocated for the alignment
    const unsigned sV = sK + KV_TILE;
    const unsigned sQ = sV + KV_TILE;         // NBUF buffers
    const unsigned sO = sQ + NBUF * Q_TILE;   // NBUF buffers
    const unsigned sS = sO + NBUF * Q_TILE;   // dS (BM queries x BN keys, K-major)
    float* sL = reinterpret_cast<float*>(smem_raw + (sS + DS_TILE - raw));  // 2 x BM lse log2e
    float* sD = sL + 2 * BM;                                                // 2 x BM delta
    float* sDQ = sD + 2 * BM;  // dQ staging: one DQ_TILE per warpgroup (16-byte aligned)
    const unsigned fullb = smem_u32(sDQ + 2 * DQ_STAGE);  // TMA: NBUF full mbarriers

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int hk = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int hkv = a.hq / a.group;
    const int k0 = blockIdx.x * BN, k1 = min(k0 + BN, sk);
    const int kw0 = k0 + wg * 64;  // this warpgroup's first key
    const long long kvh = ((long long)b * hkv + hk) * sk * D;
    // The first thread of each warpgroup issues its tile's bulk add (dq_dst: the dq_accum
    // tile, null when none is pending) and waits for its read.
    const int wt = tid & 127;
    float* const dq_stage = sDQ + wg * DQ_TILE;
    const int nqb = (sq + BM - 1) / BM, dq_tiles = D / 64;
    float* dq_dst = nullptr;
    bool issued = false;  // this thread issued bulk adds: it waits for them before it exits

    int qb0, qb1;
    xattn_query_blocks(k0, k1, off, sq, a.causal, a.wl, a.wr, BM, qb0, qb1);
    // The query blocks of one head: [qb0, qb1), or (SPARSE) those of them that the BlockMask's
    // column of this key block lists (CSC; the 128 keys lie inside one mask key block, each
    // 64-row step inside one mask query block: the launcher checks the block size).
    int nq = qb1 > qb0 ? qb1 - qb0 : 0;
    int mcol = 0;  // the mask's key block
    if constexpr (SPARSE) {
        mcol = k0 / a.bm.bk;
        if (nq > 0)
            nq = xattn_csc_count(a.cm, a.cm.col_ptr[mcol], a.cm.col_ptr[mcol + 1],
                                 a.bm.bq / BM, qb0, qb1);
    }
    const int nsteps = nq * a.group;  // (query head of the group, query block), head-major
    // SPARSE: the CSC cursor (entry ce, query block cqt, partial block cpb, -1 = full) of the
    // latest staged step; walk(i) moves it onto step i (steps are staged in order, every head
    // walks the same column).
    int ce = 0, cqt = 0, cpb = -1;
    auto walk = [&](int i) {
        if constexpr (SPARSE) {
            const int per = a.bm.bq / BM;
            if (i % nq == 0)
                xattn_csc_from(a.cm, a.cm.col_ptr[mcol], a.cm.col_ptr[mcol + 1], per, qb0, qb1,
                               ce, cqt, cpb);
            else
                xattn_csc_advance(a.cm, mcol, per, qb0, qb1, ce, cqt, cpb);
        }
    };

    // Q, dO, lse (base 2, +inf past Sq or on rows that see no key) and delta of step i into
    // buffer bf (SPARSE: the cursor is on step i).
    auto stage = [&](int i, int bf) {
        const int h = hk * a.group + i / nq;
        const int q0 = (SPARSE ? cqt : qb0 + i % nq) * BM;
        const long long bh = (long long)b * a.hq + h;
        load_tile<BM, D>(sQ + bf * Q_TILE, a.q + bh * sq * D, q0, sq, tid);
        load_tile<BM, D>(sO + bf * Q_TILE, a.dout + bh * sq * D, q0, sq, tid);
        if (tid < BM) {
            float l2, dl;
            xattn_bwd_row(a.lse, a.delta, bh * sq + q0 + tid, q0 + tid < sq, l2, dl);
            sL[bf * BM + tid] = l2;
            sD[bf * BM + tid] = dl;
        }
    };

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
    // With score mods the scores are scaled before them (natural units).
    const float sl2 = MODS ? XATTN_LOG2E : a.scale * XATTN_LOG2E;

    // TMA: Q and dO of step i into buffer i % NBUF by the copy engine (one thread), the
    // phase's arrival announcing their bytes and `extra` more (step 0: K and V); the step's
    // lse / delta (raw values into lse buffer lbuf, cp.async by the first BM threads; fixed up
    // as stage() writes them by rows_fix once they landed).
    [[maybe_unused]] auto issue = [&](int i, unsigned extra) {
        if constexpr (TMA) {
            const int bfi = i % NBUF;
            const int bh = b * a.hq + hk * a.group + i / nq;
            const int q0 = (qb0 + i % nq) * BM;
            const unsigned full = fullb + bfi * 8;
            tma_arrive_expect_tx(full, 2 * Q_TILE + extra);
#pragma unroll
            for (int p = 0; p < D / 64; ++p) {
                tma_load_3d(sQ + bfi * Q_TILE + p * BM * 128, a.tq, p * 64, q0, bh, full);
                tma_load_3d(sO + bfi * Q_TILE + p * BM * 128, a.tdo, p * 64, q0, bh, full);
            }
        }
    };
    [[maybe_unused]] auto rows_async = [&](int i, int lbuf) {
        const int q0 = (qb0 + i % nq) * BM;
        const long long bh = (long long)b * a.hq + hk * a.group + i / nq;
        if (q0 + tid < sq) {
            cp_async4(smem_u32(sL + lbuf * BM + tid), a.lse + bh * sq + q0 + tid);
            cp_async4(smem_u32(sD + lbuf * BM + tid), a.delta + bh * sq + q0 + tid);
        }
        cp_async_commit_ordered();
    };
    [[maybe_unused]] auto rows_fix = [&](int i, int lbuf) {
        const bool ok = (qb0 + i % nq) * BM + tid < sq;
        const float x = sL[lbuf * BM + tid];
        sL[lbuf * BM + tid] = ok && x != -XATTN_INF ? x * XATTN_LOG2E : XATTN_INF;
        sD[lbuf * BM + tid] = ok ? sD[lbuf * BM + tid] : 0.f;
    };

    if constexpr (TMA) {
        if (tid == 0) {
#pragma unroll
            for (int s = 0; s < NBUF; ++s) tma_mbar_init(fullb + s * 8, 1);
            tma_mbar_init_fence();
            if (nsteps > 0) {
                tma_prefetch_desc(a.tq);
                tma_prefetch_desc(a.tdo);
                tma_prefetch_desc(a.tk);
                tma_prefetch_desc(a.tv);
            }
        }
        if (nsteps > 0 && tid < BM) {
            const long long bh = (long long)b * a.hq + hk * a.group;
            float l2, dl;
            xattn_bwd_row(a.lse, a.delta, bh * sq + qb0 * BM + tid, qb0 * BM + tid < sq, l2, dl);
            sL[tid] = l2;
            sD[tid] = dl;
        }
        __syncthreads();  // the barriers are initialised, step 0's lse / delta written
        if (tid == 0 && nsteps > 0) {
            issue(0, 2 * KV_TILE);
            const int kvc = b * hkv + hk;
#pragma unroll
            for (int p = 0; p < D / 64; ++p) {
                tma_load_3d(sK + p * BN * 128, a.tk, p * 64, k0, kvc, fullb);
                tma_load_3d(sV + p * BN * 128, a.tv, p * 64, k0, kvc, fullb);
            }
            for (int i = 1; i < NBUF - 1 && i < nsteps; ++i) issue(i, 0);
        }
    } else if (nsteps > 0) {
        load_tile<BN, D>(sK, a.k + kvh, k0, sk, tid);
        load_tile<BN, D>(sV, a.v + kvh, k0, sk, tid);
        walk(0);
        stage(0, 0);
        cp_async_commit_ordered();
    }

    for (int i = 0; i < nsteps; ++i) {
        const int bf = TMA ? i % NBUF : i & 1;  // Q / dO buffer
        const int lf = i & 1;                    // lse / delta buffer
        const int tq = cqt, pblk = cpb;  // SPARSE: this step's query block and partial block
        if constexpr (TMA) {
            // Buffer (i + NBUF - 1) % NBUF was last read in step i - 1, which ended with a
            // barrier after its wgmmas completed; the wait below replaces the barrier (lse /
            // delta of this step were published by the last one).
            if (i + 1 < nsteps) {
                if (tid == 0 && i + NBUF - 1 < nsteps) issue(i + NBUF - 1, 0);
                if (tid < BM) rows_async(i + 1, lf ^ 1);
            }
            tma_mbar_wait(fullb + bf * 8, (i / NBUF) & 1);
        } else {
            if (i + 1 < nsteps) {
                // Buffer bf ^ 1 was last read in step i - 1, which ended with a barrier after
                // its wgmmas completed.
                walk(i + 1);
                stage(i + 1, bf ^ 1);
                cp_async_commit_ordered();
                cp_async_wait_ordered<1>();
            } else {
                cp_async_wait_ordered<0>();
            }
            fence_proxy_async();
            __syncthreads();
        }

        const int h = hk * a.group + i / nq;
        const int q0 = (SPARSE ? tq : qb0 + i % nq) * BM;
        const int q1 = min(q0 + BM, sq);
        const long long bh = (long long)b * a.hq + h;
        const unsigned qt = sQ + bf * Q_TILE, ot = sO + bf * Q_TILE;
        const unsigned kt = opaque(sK), vt = opaque(sV);
        const float* lb = sL + lf * BM;
        const float* db = sD + lf * BM;

        // S^T = K Q^T and dP^T = V dO^T (two commit groups: P^T is computed while dP^T runs).
        // The accumulators start from zeros (scale-d 0 ignores them, but the asm reads them:
        // declared outside the loop they would stay live across it).
        float s[BM / 2], dp[BM / 2];
#pragma unroll
        for (int z = 0; z < BM / 2; ++z) s[z] = dp[z] = 0.f;
        fence_regs(s);
        fence_regs(dp);
        wgmma_fence();
        gemm_scores<T, D>(s, kt, qt, wg);
        wgmma_commit();
        gemm_scores<T, D>(dp, vt, ot, wg);
        wgmma_commit();
        wgmma_wait<1>();
        fence_regs(s);

        // Accumulator element s[n * 4 + hr * 2 + e]: key kw0 + 16 warp + g + 8 hr, query
        // q0 + 8 n + 2 t4 + e. The visibility test only on tiles that need it.
        const bool edge = xattn_tile_needs_test(q0, q1, kw0, 64, off, sk, a.causal, a.wl, a.wr);
        // The option entries (OPT) run bwd_score_rules.cuh's rules (bwd_p: the score mods or
        // flex_attention's score_mod, the visibility test on edge tiles, the block mask's
        // element rule in its partial blocks; bwd_ds with the mods' derivative dcap). P^T is
        // computed while dP^T runs, then dS^T; at D = 128 (JOINT) both in one pass once dP^T
        // is there: the overlap kept more registers live than its 255 (the window entry
        // spilled 8 bytes).
        constexpr bool OPT = !plain_args<A>::value;
        constexpr bool JOINT = OPT && D == 128;
        if constexpr (JOINT) {
            wgmma_wait<0>();
            fence_regs(dp);
        }
        if constexpr (!OPT && edge_rows(D)) {
            if (edge) mask_key_rows<BM>(s, q0, kw0 + warp * 16, g, t4, off, sk, a.causal, a.wl,
                                        a.wr);
        }
        float dc[OPT && !JOINT ? BM / 2 : 1];  // dcap per element (folded away when constant)
#pragma unroll
        for (int n = 0; n < BM / 8; ++n)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int ql = n * 8 + t4 * 2 + e;
                    if constexpr (OPT) {
                        const int idx = n * 4 + hr * 2 + e;
                        float& dcap = dc[JOINT ? 0 : idx];
                        s[idx] = bwd_p<MODS>(
                            a, s[idx], b, h, q0 + ql, kw0 + warp * 16 + g + hr * 8, off, sk,
                            edge, SPARSE && pblk >= 0, pblk, SPARSE ? q0 / a.bm.bq * a.bm.bq : 0,
                            SPARSE ? k0 / a.bm.bk * a.bm.bk : 0, sl2, lb[ql], dcap);
                        if constexpr (JOINT) dp[idx] = bwd_ds(s[idx], dp[idx], db[ql], dcap);
                    } else {
                        float x = s[n * 4 + hr * 2 + e];
                        if (!edge_rows(D) && edge &&
                            !xattn_visible(q0 + ql, kw0 + warp * 16 + g + hr * 8, off, sk,
                                           a.causal, a.wl, a.wr))
                            x = -XATTN_INF;
                        s[n * 4 + hr * 2 + e] = ex2(fmaf(x, sl2, -lb[ql]));
                    }
                }
        unsigned pa[BM / 16][4];
        pack_a<T>(pa, s);

        issue_keys<T, D>(dv, pa, ot);  // dV += P^T dO

        if constexpr (!JOINT) {
            wgmma_wait<1>();  // dP^T (the dV group may still run)
            fence_regs(dp);
#pragma unroll
            for (int idx = 0; idx < BM / 2; ++idx) {  // query 8 n + 2 t4 + e of idx = 4 n + 2 hr + e
                const float dl = db[idx / 4 * 8 + t4 * 2 + idx % 2];
                if constexpr (OPT)
                    dp[idx] = bwd_ds(s[idx], dp[idx], dl, dc[idx]);
                else
                    dp[idx] = s[idx] * (dp[idx] - dl);
            }
        }
        unsigned da[BM / 16][4];
        pack_a<T>(da, dp);

        issue_keys<T, D>(dk, da, qt);  // dK += dS^T Q

        if constexpr (DQ) {
            stage_ds<T>(sS, dp, wg, warp, g, t4);  // dS for dQ
            fence_proxy_async();
            // The last step's dQ rows must be read out of the staging tile before it is
            // rewritten below; the barrier that follows tells the whole warpgroup.
            if (dq_dst != nullptr) bulk_wait_read();
            if constexpr (D == 128)
                bar_sync<1, NT>();  // both warpgroups' dS are stored
            else if (wg == 0)
                bar_sync<2, 128>();  // this warpgroup's dS (its own keys only)
            else
                bar_sync<3, 128>();

            wgmma_wait<1>();  // dV done: its A fragment registers are free
#pragma unroll
            for (int j = 0; j < BM / 16; ++j) fence_regs(pa[j]);
            fence_regs(dv);

            // dQ = dS K.
            float dq[32];
#pragma unroll
            for (int z = 0; z < 32; ++z) dq[z] = 0.f;
            fence_regs(dq);
            wgmma_fence();
            gemm_dq<T, D>(dq, opaque(sS), kt, wg);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(dq);
            fence_regs(dk);
#pragma unroll
            for (int j = 0; j < BM / 16; ++j) fence_regs(da[j]);

            // The fragment in fragment order (see the header), then one bulk add of the tile.
#pragma unroll
            for (int n = 0; n < 8; ++n)
                *reinterpret_cast<float4*>(dq_stage + n * 512 + wt * 4) =
                    make_float4(dq[n * 4], dq[n * 4 + 1], dq[n * 4 + 2], dq[n * 4 + 3]);
            fence_proxy_async();  // the bulk add reads the tile through the async proxy
            dq_dst = wt == 0 ? a.dq_accum + ((bh * nqb + q0 / BM) * dq_tiles +
                                             (D == 128 ? wg : 0)) * (long long)DQ_TILE
                             : nullptr;
        } else {
            // dV and dK must be done before the barrier below hands their Q / dO
            // buffers to the next loads.
            wgmma_wait<0>();
#pragma unroll
            for (int j = 0; j < BM / 16; ++j) {
                fence_regs(pa[j]);
                fence_regs(da[j]);
            }
            fence_regs(dv);
            fence_regs(dk);
        }
        if constexpr (TMA) {
            if (tid < BM && i + 1 < nsteps) {  // the next step's lse / delta, published below
                cp_async_wait_ordered<0>();
                rows_fix(i + 1, lf ^ 1);
            }
        }
        __syncthreads();  // the tile is written; the next step overwrites Q / dO and dS
        if constexpr (DQ) {
            if (dq_dst != nullptr) {
                bulk_add_tile(dq_dst, smem_u32(dq_stage));
                issued = true;
            }
        }
    }
    if (issued) bulk_wait_all();  // the tile must outlive the reads of the adds

    // dK (times scale) and dV of this warpgroup's keys; keys no query sees get zeros.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int kj = kw0 + warp * 16 + g + hr * 8;
        if (kj < sk) {
            unsigned short* dkr = a.dk + kvh + (long long)kj * D + t4 * 2;
            unsigned short* dvr = a.dv + kvh + (long long)kj * D + t4 * 2;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                *reinterpret_cast<unsigned*>(dkr + n * 8) =
                    pack2(dk[n * 4 + hr * 2] * a.scale, dk[n * 4 + hr * 2 + 1] * a.scale, T());
                *reinterpret_cast<unsigned*>(dvr + n * 8) =
                    pack2(dv[n * 4 + hr * 2], dv[n * 4 + hr * 2 + 1], T());
            }
        }
    }
#else
    (void)a;
    __trap();
#endif
}

// The deterministic dq kernel on wgmma (the _dq entries; plain requests: causal, scale, GQA):
// one thread block of two warpgroups per (128 query rows, query head, batch element), Q and dO
// kept in shared memory, walking the key blocks of 64 that its rows may see in order, K and V
// double-buffered by cp.async. Per key block warpgroup w (queries 64 w .. 64 w + 63: the M of
// its wgmmas) computes
//   S  = Q K^T      wgmma ss m64n64 (gemm_scores: A = rows 64 w.. of the 128-row Q tile,
//   dP = dO V^T     B = the 64-row K / V tile, both K-major)
//   P  = exp2(S scale log2e - lse log2e), dS = P (dP - delta) on the accumulator fragment
//   dQ += dS K      wgmma rs m64nD (gemm_keys: A = dS packed from the fragment, B = the K tile
//                   MN-major, its rows are keys = the GEMM K)
// and writes dq = scale * dQ once in the input type: no atomics, a fixed order, so the result
// is bitwise reproducible (not bitwise flash_bwd.cu's dq kernel's: another summation order).
// 128 query rows a thread block (64 a warpgroup), 64 keys a step: flash_bwd_sm90_dq_core's
// DQ_ROWS, DQ_KEYS (function scope: a translation unit of the main kernel alone does not
// reference them).

// The main kernel's arguments (dq_accum, dk and dv unused: null) and dq.
struct DqArgs : BwdArgs {
    unsigned short* dq;
};

template <class T, int D>
__device__ __forceinline__ void flash_bwd_sm90_dq_core(const DqArgs& a) {
#if XATTN_SM90_OK
    static_assert(D == 64 || D == 128, "wgmma wrappers exist for N = 64 and 128");
    constexpr int DQ_ROWS = 128, DQ_KEYS = 64;
    static_assert(DQ_ROWS == BN && DQ_KEYS == BM, "gemm_scores / gemm_keys take these tiles");
    constexpr unsigned Q_TILE = DQ_ROWS * D * 2, K_TILE = DQ_KEYS * D * 2;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    const unsigned raw = smem_u32(smem_raw);
    const unsigned sQ = (raw + 1023u) & ~1023u;  // 1 KiB more allocated for the alignment
    const unsigned sO = sQ + Q_TILE;
    const unsigned sK = sO + Q_TILE;      // two buffers
    const unsigned sV = sK + 2 * K_TILE;  // two buffers

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int qblk = gridDim.x - 1 - blockIdx.x;  // heavy (late, causal) blocks first
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int hkv = a.hq / a.group;
    const int q0 = qblk * DQ_ROWS, q1 = min(q0 + DQ_ROWS, sq);
    const int qw0 = q0 + wg * 64, qw1 = min(qw0 + 64, sq);  // this warpgroup's rows
    const long long bh = (long long)b * a.hq + h;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;

    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, -1, -1, DQ_KEYS, kb0, kb1);

    // This thread's two rows (16 warp + g + 8 hr of its warpgroup): lse in base 2 (+inf past
    // Sq or on rows that see no key: p = 0 there) and delta.
    float l2[2], dl[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int qi = qw0 + warp * 16 + g + hr * 8;
        xattn_bwd_row(a.lse, a.delta, bh * sq + qi, qi < sq, l2[hr], dl[hr]);
    }
    const float sl2 = a.scale * XATTN_LOG2E;

    float dq[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;

    if (kb1 > kb0) {
        load_tile<DQ_ROWS, D>(sQ, a.q + bh * sq * D, q0, sq, tid);
        load_tile<DQ_ROWS, D>(sO, a.dout + bh * sq * D, q0, sq, tid);
        load_tile<DQ_KEYS, D>(sK, a.k + kvh, kb0 * DQ_KEYS, sk, tid);
        load_tile<DQ_KEYS, D>(sV, a.v + kvh, kb0 * DQ_KEYS, sk, tid);
        cp_async_commit_ordered();
    }
    for (int kb = kb0; kb < kb1; ++kb) {
        const int bf = (kb - kb0) & 1;
        if (kb + 1 < kb1) {
            // Buffer bf ^ 1 was last read in the previous step, which ended with a barrier
            // after its wgmmas completed.
            const int kn = (kb + 1) * DQ_KEYS;
            load_tile<DQ_KEYS, D>(sK + (bf ^ 1) * K_TILE, a.k + kvh, kn, sk, tid);
            load_tile<DQ_KEYS, D>(sV + (bf ^ 1) * K_TILE, a.v + kvh, kn, sk, tid);
            cp_async_commit_ordered();
            cp_async_wait_ordered<1>();
        } else {
            cp_async_wait_ordered<0>();
        }
        fence_proxy_async();  // the cp.async writes, read by wgmma through the async proxy
        __syncthreads();      // every thread's copies of this step's tiles (and Q, dO) landed

        const unsigned kt = opaque(sK + bf * K_TILE), vt = opaque(sV + bf * K_TILE);
        float s[32], dp[32];
#pragma unroll
        for (int z = 0; z < 32; ++z) s[z] = dp[z] = 0.f;
        fence_regs(s);
        fence_regs(dp);
        wgmma_fence();
        gemm_scores<T, D>(s, opaque(sQ), kt, wg);
        wgmma_commit();
        gemm_scores<T, D>(dp, opaque(sO), vt, wg);
        wgmma_commit();
        wgmma_wait<1>();
        fence_regs(s);

        // Element s[n * 4 + hr * 2 + e]: query qw0 + 16 warp + g + 8 hr, key
        // 64 kb + 8 n + 2 t4 + e. The visibility test only on tiles that need it.
        const int k0 = kb * DQ_KEYS;
        const bool edge = xattn_tile_needs_test(qw0, qw1, k0, DQ_KEYS, off, sk, a.causal, -1,
                                                -1);
        if (edge_rows(D) && edge)
            mask_query_rows<DQ_KEYS>(s, qw0 + warp * 16, k0, g, t4, off, sk, a.causal, -1, -1);
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int qi = qw0 + warp * 16 + g + hr * 8, kj = k0 + n * 8 + t4 * 2 + e;
                    float x = s[n * 4 + hr * 2 + e];
                    if (!edge_rows(D) && edge &&
                        !xattn_visible(qi, kj, off, sk, a.causal, -1, -1))
                        x = -XATTN_INF;
                    s[n * 4 + hr * 2 + e] = ex2(fmaf(x, sl2, -l2[hr]));
                }
        wgmma_wait<0>();
        fence_regs(dp);
#pragma unroll
        for (int idx = 0; idx < 32; ++idx) dp[idx] = s[idx] * (dp[idx] - dl[(idx >> 1) & 1]);
        unsigned da[BM / 16][4];
        pack_a<T>(da, dp);

        issue_keys<T, D>(dq, da, kt);  // dQ += dS K
        wgmma_wait<0>();
        fence_regs(dq);
#pragma unroll
        for (int j = 0; j < BM / 16; ++j) fence_regs(da[j]);
        __syncthreads();  // both warpgroups are done with buffer bf: the next copies refill it
    }

    // dq = scale * dQ of this thread's two rows; rows that see no key get zeros.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int qi = qw0 + warp * 16 + g + hr * 8;
        if (qi < sq) {
            unsigned short* row = a.dq + (bh * sq + qi) * D + t4 * 2;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<unsigned*>(row + n * 8) =
                    pack2(dq[n * 4 + hr * 2] * a.scale, dq[n * 4 + hr * 2 + 1] * a.scale, T());
        }
    }
#else
    (void)a;
    __trap();
#endif
}

// dq = scale * dq_accum, from the fragment order of the main kernel's tiles (see the header)
// to (B, Hq, Sq, D) rows in the input type; one thread per pair of adjacent columns.
template <class T, int D>
__device__ __forceinline__ void dq_convert_core(const float* acc, unsigned short* dq,
                                                long long rows, int sq, float scale) {
    const long long pairs = rows * (D / 2);
    const int nqb = (sq + BM - 1) / BM;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs;
         p += (long long)gridDim.x * blockDim.x) {
        const long long row = p / (D / 2);
        const int c = (int)(p % (D / 2)) * 2;
        const long long bh = row / sq;
        const int s = (int)(row % sq), r = s % BM, cc = c % 64;
        // Thread t = 32 warp + 4 g + t4 of the warpgroup that held (r, cc): element
        // j = 4 n + 2 hr + e with r = 16 warp + 8 hr + g and cc = 8 n + 2 t4 + e.
        const int t = (r / 16) * 32 + (r % 8) * 4 + (cc % 8) / 2;
        const long long tile = (bh * nqb + s / BM) * (D / 64) + c / 64;
        const float2 x = *reinterpret_cast<const float2*>(
            acc + tile * DQ_TILE + (cc / 8) * 512 + t * 4 + ((r % 16) / 8) * 2);
        *reinterpret_cast<unsigned*>(dq + row * D + c) = pack2(x.x * scale, x.y * scale, T());
    }
}

}  // namespace xattn::sm90bwd

#define XATTN_BWD90_ENTRY(TN, D)                                                              \
    extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_sm90_##TN##_d##D(          \
        const unsigned short *q, const unsigned short *k, const unsigned short *v,            \
        const unsigned short *dout, const float *lse, const float *delta, float *dq_accum,    \
        unsigned short *dk, unsigned short *dv, int hq, int group, int sq, int sk,            \
        float scale, int causal) {                                                            \
        xattn::sm90bwd::flash_bwd_sm90_core<xattn::TN, D>(xattn::sm90bwd::BwdArgs{            \
            q, k, v, dout, lse, delta, dq_accum, dk, dv, hq, group, sq, sk, scale, causal});  \
    }                                                                                         \
    extern "C" __global__ void flash_bwd_sm90_dqconv_##TN##_d##D(                             \
        const float *acc, unsigned short *dq, long long rows, int sq, float scale) {          \
        xattn::sm90bwd::dq_convert_core<xattn::TN, D>(acc, dq, rows, sq, scale);              \
    }
// One more expansion level so that -D values expand before ## pastes them.
#define XATTN_BWD90_ONE(TN, D) XATTN_BWD90_ENTRY(TN, D)

// The TMA entries (MN: tma = 3 Q/dO buffers, tma2 = 2): the tensor maps of q,
// dout, k and v (tma.py's rows_map: boxes of 64 columns x 64 / 128 / 128 rows / 128 rows),
// then the plain entries' arguments (q, k, v, dout are not read). Their dK/dV-only twins
// (DQ 0, _<MN>_nodq: deterministic=True, dq by a dq kernel; dq_accum is not read) take the
// same argument list.
#define XATTN_BWD90_TMA_PARAMS                                                                \
    const __grid_constant__ xattn::TmaDesc tq, const __grid_constant__ xattn::TmaDesc tdo,    \
        const __grid_constant__ xattn::TmaDesc tk, const __grid_constant__ xattn::TmaDesc tv, \
        const unsigned short *q, const unsigned short *k, const unsigned short *v,            \
        const unsigned short *dout, const float *lse, const float *delta, float *dq_accum,    \
        unsigned short *dk, unsigned short *dv, int hq, int group, int sq, int sk,            \
        float scale, int causal
#define XATTN_BWD90_TMA_ARGS(NB)                                                              \
    xattn::sm90bwd::BwdArgsTma<NB> {                                                          \
        {q, k, v, dout, lse, delta, dq_accum, dk, dv, hq, group, sq, sk, scale, causal}, &tq, \
            &tdo, &tk, &tv                                                                    \
    }
#define XATTN_BWD90_TMA_ENTRY(TN, D, MN, NB, DQ, SFX)                                        \
    extern "C" __global__ void __launch_bounds__(256, 1)                                      \
        flash_bwd_sm90_##TN##_d##D##_##MN##SFX(XATTN_BWD90_TMA_PARAMS) {                      \
        xattn::sm90bwd::flash_bwd_sm90_core<xattn::TN, D, false, false, DQ != 0>(             \
            XATTN_BWD90_TMA_ARGS(NB));                                                        \
    }
#define XATTN_BWD90_TMA_ONE(TN, D, MN, NB) XATTN_BWD90_TMA_ENTRY(TN, D, MN, NB, 1, )
#define XATTN_BWD90_TMA_NODQ_ONE(TN, D, MN, NB) XATTN_BWD90_TMA_ENTRY(TN, D, MN, NB, 0, _nodq)
// The sliding-window twins of both (MN: tma_win, tma2_win): the same arguments, then the
// window sides.
#define XATTN_BWD90_TMA_WIN_ENTRY(TN, D, MN, NB, DQ, SFX)                                    \
    extern "C" __global__ void __launch_bounds__(256, 1)                                      \
        flash_bwd_sm90_##TN##_d##D##_##MN##SFX(XATTN_BWD90_TMA_PARAMS, int wl, int wr) {      \
        xattn::sm90bwd::flash_bwd_sm90_core<xattn::TN, D, false, false, DQ != 0>(             \
            xattn::sm90bwd::BwdArgsTmaWin<NB>{XATTN_BWD90_TMA_ARGS(NB), wl, wr});             \
    }
#define XATTN_BWD90_TMA_WIN_ONE(TN, D, MN, NB) XATTN_BWD90_TMA_WIN_ENTRY(TN, D, MN, NB, 1, )
#define XATTN_BWD90_TMA_WIN_NODQ_ONE(TN, D, MN, NB) \
    XATTN_BWD90_TMA_WIN_ENTRY(TN, D, MN, NB, 0, _nodq)

// The option entries (MN: win = causal and window | mods = score modifications | bm = block
// mask | mods_bm; flex | flex_bm for flex_attention_backward): flash_bwd.cu's argument list
// (XATTN_BWD_PARAMS of bwd_score_rules.cuh; dq is not read), so one launch tuple serves both
// kernels. The plain entries keep their short argument list and their code.
#define XATTN_BWD90_OPT_ENTRY(TN, D, MN, MODS, SPARSE)                                       \
    extern "C" __global__ void __launch_bounds__(256, 1)                                      \
        flash_bwd_sm90_##TN##_d##D##_##MN(XATTN_BWD_PARAMS) {                                 \
        xattn::sm90bwd::flash_bwd_sm90_core<xattn::TN, D, MODS, SPARSE>(XATTN_BWD_ARGS);      \
    }
#define XATTN_BWD90_OPT_ONE(TN, D, MN, MODS, SPARSE) XATTN_BWD90_OPT_ENTRY(TN, D, MN, MODS, SPARSE)
// Their dK/dV-only twins (_<MN>_nodq, deterministic=True; neither dq nor dq_accum is read).
#define XATTN_BWD90_OPT_NODQ_ENTRY(TN, D, MN, MODS, SPARSE)                                  \
    extern "C" __global__ void __launch_bounds__(256, 1)                                      \
        flash_bwd_sm90_##TN##_d##D##_##MN##_nodq(XATTN_BWD_PARAMS) {                          \
        xattn::sm90bwd::flash_bwd_sm90_core<xattn::TN, D, MODS, SPARSE, false>(               \
            XATTN_BWD_ARGS);                                                                  \
    }
#define XATTN_BWD90_OPT_NODQ_ONE(TN, D, MN, MODS, SPARSE) \
    XATTN_BWD90_OPT_NODQ_ENTRY(TN, D, MN, MODS, SPARSE)
// The deterministic dq kernel on wgmma (flash_bwd_sm90_dq_<TN>_d<D>; plain requests).
#define XATTN_BWD90_DQ_ENTRY(TN, D)                                                           \
    extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_sm90_dq_##TN##_d##D(       \
        const unsigned short *q, const unsigned short *k, const unsigned short *v,            \
        const unsigned short *dout, const float *lse, const float *delta, unsigned short *dq, \
        int hq, int group, int sq, int sk, float scale, int causal) {                         \
        xattn::sm90bwd::flash_bwd_sm90_dq_core<xattn::TN, D>(xattn::sm90bwd::DqArgs{          \
            {q, k, v, dout, lse, delta, nullptr, nullptr, nullptr, hq, group, sq, sk, scale,   \
             causal},                                                                         \
            dq});                                                                             \
    }
#define XATTN_BWD90_DQ_ONE(TN, D) XATTN_BWD90_DQ_ENTRY(TN, D)
// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
// XATTN_BWD90_NO_ENTRIES: tools/wgmma_probe.cu includes this file for its helpers only.
#if defined(XATTN_BWD90_D) && !defined(XATTN_BWD90_NO_ENTRIES)
#if defined(XATTN_BWD90_DQK)
XATTN_BWD90_DQ_ONE(XATTN_BWD90_TN, XATTN_BWD90_D)
#elif defined(XATTN_BWD90_NB) && defined(XATTN_BWD90_WIN) && defined(XATTN_BWD90_NODQ)
XATTN_BWD90_TMA_WIN_NODQ_ONE(XATTN_BWD90_TN, XATTN_BWD90_D, XATTN_BWD90_MN, XATTN_BWD90_NB)
#elif defined(XATTN_BWD90_NB) && defined(XATTN_BWD90_WIN)
XATTN_BWD90_TMA_WIN_ONE(XATTN_BWD90_TN, XATTN_BWD90_D, XATTN_BWD90_MN, XATTN_BWD90_NB)
#elif defined(XATTN_BWD90_NB) && defined(XATTN_BWD90_NODQ)
XATTN_BWD90_TMA_NODQ_ONE(XATTN_BWD90_TN, XATTN_BWD90_D, XATTN_BWD90_MN, XATTN_BWD90_NB)
#elif defined(XATTN_BWD90_NB)
XATTN_BWD90_TMA_ONE(XATTN_BWD90_TN, XATTN_BWD90_D, XATTN_BWD90_MN, XATTN_BWD90_NB)
#elif defined(XATTN_BWD90_MN) && defined(XATTN_BWD90_NODQ)
XATTN_BWD90_OPT_NODQ_ONE(XATTN_BWD90_TN, XATTN_BWD90_D, XATTN_BWD90_MN, XATTN_BWD90_MODS,
                         XATTN_BWD90_SPARSE)
#elif defined(XATTN_BWD90_MN)
XATTN_BWD90_OPT_ONE(XATTN_BWD90_TN, XATTN_BWD90_D, XATTN_BWD90_MN, XATTN_BWD90_MODS,
                    XATTN_BWD90_SPARSE)
#else
XATTN_BWD90_ONE(XATTN_BWD90_TN, XATTN_BWD90_D)
#endif
#endif
