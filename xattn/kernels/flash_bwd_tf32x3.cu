// Flash attention backward for float32 on tensor cores at float32 accuracy: 3xTF32 on
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (sm_80+), the `cupy.tf32x3` entry's
// backward (xattn/_backends/cupy_/flash_bwd_tf32x3.py).
//
// The scheme of flash_bwd.cu (FlashAttention-2), the numerics of flash_fwd_tf32.cu's X3. One
// CTA of NW warps owns BN = 16 NW keys of one (batch, kv head), 16 per warp, with K and V in
// shared memory, and walks the query heads of its GQA group and the query blocks of BM rows
// that may see its keys (causal / window clip the range). Per query block, each warp computes
// for its 16 keys
//   S^T = K Q^T, dP^T = V dO^T         (keys in the M dimension, queries in N)
//   P^T = exp2(S^T log2e - lse log2e)  (score mods and masks of the forward; p = 0 on rows
//                                       past Sq and rows that see no key: lse -> +inf)
//   dS^T = P^T (dP^T - delta) [* (1 - tanh^2) with softcap]
//   dV += P^T dO,  dK += dS^T Q         (P^T and dS^T re-used from the accumulators as A)
// then dS goes through shared memory and the warps share dQ[:, :] += dS K over the CTA's BN
// keys, added to the float32 dq_accum with red.global.add (the launcher scales it). dK is
// scaled once at the end; dK/dV are written once per CTA (GQA summed in registers).
//
// 3xTF32: every operand x of the five products is split into hi = tf32(x) and lo =
// tf32(x - hi) (exact: Sterbenz; lo = 0 where hi == x, so +-inf stays +-inf and NaN NaN), and
// each product is lo*hi' + hi*lo' + hi*hi' (lo*lo' dropped: about 2^-21 relative per
// product instead of TF32's 2^-10). The tensor cores truncate each float32 sum they write, a
// bias that grows with the number of MMAs that chain into one accumulator, so:
// - S^T and dP^T chain only hi*hi' into their accumulator and the small products into their
//   own, added on the CUDA cores after the last k-step (D / 8 truncations per score instead of
//   3 D / 8, as the forward's Q K^T: an error in s is a relative error of p);
// - dV and dK sum each query block's product from zero (3 BM / 8 truncations) and add it to
//   the float32 accumulators on the CUDA cores (over Sq queries the chained bias would exceed
//   float32's budget, as the forward's P V over keys);
// - dQ sums the CTA's BN keys from zero (3 BN / 8) before its atomic add.
// P and dS are float32 (exact exp2 and products, as the SIMT kernel), split in registers once
// per query block. K and V are split once per CTA, Q and dO once per query block, in place in
// shared memory by the thread whose cp.async brought the chunk (hi in place, lo D floats
// further along the row), so no fragment loop converts anything.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32), g = lane / 4,
// t = lane % 4: A 16x8 row: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B 8x8 col:
// b0 (k t, n g), b1 (k t+4, n g); C 16x8: c0, c1 (g, 2t, 2t+1), c2, c3 (g+8, ...). ldmatrix is
// 16-bit only; the order of each summed index and of the output columns is chosen so that
// every fragment is one 16-byte shared-memory load:
//   S^T, dP^T (summed over the head dim): lane t takes columns 4t..4t+3 of a 16-column chunk,
//     k-step 0 as k = (t, t+4) <-> columns (4t, 4t+1), k-step 1 <-> (4t+2, 4t+3); K / V rows
//     (A) and Q / dO rows (B, query n = g of n-tile n is row 8n + g) read the same order.
//   dV, dK (summed over queries): the C layout of S^T tile j holds queries 8j + 2t, 8j + 2t + 1
//     of keys g, g+8; taking k = t <-> query 8j + 2t and k = t+4 <-> 8j + 2t + 1 makes it the
//     A layout (a0 = c0, a1 = c2, a2 = c1, a3 = c3). The output columns of a group of 32 are
//     spread over 4 n-tiles: n-tile i, n = g <-> column 32p + 4g + i, so b0 of the four tiles
//     is one float4 of dO / Q row 8j + 2t, and a thread's accumulators hold columns
//     32p + 8t .. 32p + 8t + 7 of its two keys (two float4 stores).
//   dQ (summed over keys): A = dS (queries x keys) from shared memory with k = t <-> key
//     8kk + 2t and k = t+4 <-> 8kk + 2t + 1 (one float2), B = K rows 8kk + 2t, 8kk + 2t + 1 in
//     the column order of dV.
// Bank conflicts (16-byte loads are served per quarter warp): tile rows are 2D + 16 floats
// (16 banks apart: the two rows g, g+1 of a quarter of the S^T loads fill all 32 banks), and
// the 16-byte chunks of row r are XOR-swizzled by 8 ((r / 2) % 4) floats, so that the rows
// 8j + 2t (t = 0..3) of the dV / dK / dQ loads land 8 banks apart; rows g and g+1 (g even)
// share their swizzle. dS rows are 2 BN + 8 floats: the float2 reads of a half warp (rows g,
// columns 2t) are conflict-free, the scalar writes two-way.
//
// Layout (contiguous): q, dout (B, Hq, Sq, D); k, v, dk, dv (B, Hkv, Sk, D); lse, delta
// (B, Hq, Sq) float32; dq_accum (B, Hq, Sq, D) float32, zeroed by the launcher. Positions are
// aligned bottom-right (query i at key i + Sk - Sq). Options as flash_bwd_simt.cu (causal,
// window, scale, GQA; softcap / bias / ALiBi / mask in the `mods` entries). No CUDA headers.

#include "masking.cuh"
#include "mma_sm80.cuh"
#include "tf32.cuh"

#ifndef XATTN_BWDX3_KC_UNROLL
#define XATTN_BWDX3_KC_UNROLL 1
#endif
#ifndef XATTN_BWDX3_KK_UNROLL
#define XATTN_BWDX3_KK_UNROLL 1
#endif

namespace xattn::bwd_x3 {

// Unrolling of the head-dim chunk loop of S^T / dP^T and the key loop of dQ: with more, ptxas
// hoists the fragment loads of later steps and the D = 128 entries spill.
constexpr int KC_UNROLL = XATTN_BWDX3_KC_UNROLL;
constexpr int KK_UNROLL = XATTN_BWDX3_KK_UNROLL;

struct Args : ScoreMods {
    const float* q;
    const float* k;
    const float* v;
    const float* dout;
    const float* lse;    // natural log, -inf on rows that see no key
    const float* delta;  // rowsum(dout * out)
    float* dq_accum;
    float* dk;
    float* dv;
    int hq, group, sq, sk;
    float scale;
};

// The XOR swizzle of the 16-byte chunks of tile row r (see the header): 0, 8, 16 or 24 floats.
struct PairSwizzle {
    __device__ __forceinline__ int operator()(int r) const { return ((r >> 1) & 3) << 3; }
};
__device__ __forceinline__ int swz(int r) { return PairSwizzle{}(r); }

__device__ __forceinline__ float4 lds4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ unsigned u(float x) { return __float_as_uint(x); }

// Four float32 adds into global memory (16-byte aligned): one vector RED on sm_90.
__device__ __forceinline__ void red_add4(float* p, float x, float y, float z, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(x), "f"(y),
                 "f"(z), "f"(w)
                 : "memory");
#else
    red_add(p, x);
    red_add(p + 1, y);
    red_add(p + 2, z);
    red_add(p + 3, w);
#endif
}

// C = A B^T for this warp's 16 rows of tile sa (from row wrow) against the NS * 8 rows of
// tile sb, over the head dim: hi*hi' into c, the two small products into cs (see the header).
// S^T = K Q^T and dP^T = V dO^T, one after the other (fewer live fragments than together).
template <int D, int NS, int KC, int LD>
__device__ __forceinline__ void x3_products(float (&c)[NS][4], float (&cs)[NS][4],
                                            const float* sa, const float* sb, int wrow, int g,
                                            int t4) {
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) c[n][i] = cs[n][i] = 0.f;
    const int r0 = wrow + g, r1 = r0 + 8;  // rows g, g+8 share their swizzle
#pragma unroll KC_UNROLL
    for (int kc = 0; kc < KC; ++kc) {
        const int col = (kc * 16 + t4 * 4) ^ swz(r0);
        const float4 ah0 = lds4(sa + r0 * LD + col), al0 = lds4(sa + r0 * LD + D + col);
        const float4 ah1 = lds4(sa + r1 * LD + col), al1 = lds4(sa + r1 * LD + D + col);
#pragma unroll
        for (int n = 0; n < NS; ++n) {
            const int rb = n * 8 + g;
            const int bc = (kc * 16 + t4 * 4) ^ swz(rb);
            const float4 bh = lds4(sb + rb * LD + bc), bl = lds4(sb + rb * LD + D + bc);
            // k-step 0: columns (4t, 4t+1) as k = (t, t+4); k-step 1: (4t+2, 4t+3).
            mma_tf32(cs[n], u(al0.x), u(al1.x), u(al0.y), u(al1.y), u(bh.x), u(bh.y));
            mma_tf32(cs[n], u(ah0.x), u(ah1.x), u(ah0.y), u(ah1.y), u(bl.x), u(bl.y));
            mma_tf32(cs[n], u(al0.z), u(al1.z), u(al0.w), u(al1.w), u(bh.z), u(bh.w));
            mma_tf32(cs[n], u(ah0.z), u(ah1.z), u(ah0.w), u(ah1.w), u(bl.z), u(bl.w));
            mma_tf32(c[n], u(ah0.x), u(ah1.x), u(ah0.y), u(ah1.y), u(bh.x), u(bh.y));
            mma_tf32(c[n], u(ah0.z), u(ah1.z), u(ah0.w), u(ah1.w), u(bh.z), u(bh.w));
        }
    }
}

// dX += A^T B over one block's queries, summed from zero per group of 32 output columns and
// added on the CUDA cores (see the header): A = P^T or dS^T as split fragments (NS k-steps),
// B = dO or Q rows 8j + 2t, 8j + 2t + 1; acc[4p + i][e] is column c0 + 32p + 8t + 4 (e % 2) + i
// (this CTA's DC columns from c0).
template <int D, int DC, int NS, int LD>
__device__ __forceinline__ void x3_accumulate(float (&acc)[DC / 8][4],
                                              const unsigned (&ah)[NS][4],
                                              const unsigned (&al)[NS][4], const float* sb,
                                              int c0, int g, int t4) {
#pragma unroll
    for (int p = 0; p < DC / 32; ++p) {
        float tmp[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) tmp[i][e] = 0.f;
#pragma unroll
        for (int j = 0; j < NS; ++j) {
            const int r0 = j * 8 + t4 * 2, r1 = r0 + 1;  // same swizzle (8t)
            const int col = (c0 + p * 32 + g * 4) ^ swz(r0);
            const float4 bh0 = lds4(sb + r0 * LD + col), bl0 = lds4(sb + r0 * LD + D + col);
            const float4 bh1 = lds4(sb + r1 * LD + col), bl1 = lds4(sb + r1 * LD + D + col);
            mma3_tf32(tmp[0], ah[j], al[j], u(bh0.x), u(bh1.x), u(bl0.x), u(bl1.x));
            mma3_tf32(tmp[1], ah[j], al[j], u(bh0.y), u(bh1.y), u(bl0.y), u(bl1.y));
            mma3_tf32(tmp[2], ah[j], al[j], u(bh0.z), u(bh1.z), u(bl0.z), u(bl1.z));
            mma3_tf32(tmp[3], ah[j], al[j], u(bh0.w), u(bh1.w), u(bl0.w), u(bl1.w));
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[p * 4 + i][e] += tmp[i][e];
    }
}

template <int D, int DC, int NW, int BM, bool MODS>
__device__ __forceinline__ void core(const Args& a) {
    constexpr int BN = NW * 16;    // keys per CTA: 16 per warp
    constexpr int LD = 2 * D + 16; // tile row: hi, lo, 16 floats of padding
    constexpr int LDS = 2 * BN + 8;  // dS row (a query): hi of BN keys, lo, padding
    constexpr int NT = NW * 32;
    constexpr int KC = D / 16;     // 16-column chunks of the head dim (two k-steps each)
    constexpr int NS = BM / 8;     // n-tiles of S^T (queries) = k-steps of dV / dK
    constexpr int ND = DC / 8;     // n-tiles of this CTA's dK / dV columns
    constexpr int NG = DC / 32;    // its 32-column groups of dK / dV / dQ (4 n-tiles each)
    constexpr int NCOL = D / DC;   // CTAs that share one key block (column slices)
    constexpr int ITEMS = (BM / 16) * NG;  // dQ work items: 16 queries x 32 columns
    static_assert(D % DC == 0 && DC % 32 == 0 && BM % 16 == 0, "tile configuration");

    extern __shared__ __align__(16) float smem_f[];
    float* sK = smem_f;
    float* sV = sK + BN * LD;
    float* sQ = sV + BN * LD;
    float* sO = sQ + BM * LD;
    float* sS = sO + BM * LD;  // dS (BM x BN), hi then lo per row
    float* sL = sS + BM * LDS; // lse * log2(e), +inf for rows without keys or past Sq
    float* sD = sL + BM;       // delta

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int hk = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int hkv = a.hq / a.group;
    const int kblk = blockIdx.x / NCOL;
    const int c0 = (blockIdx.x % NCOL) * DC;  // this CTA's first column of dK, dV, dQ
    const int k0 = kblk * BN;
    const int k1 = min(k0 + BN, sk);
    const long long kvh = ((long long)b * hkv + hk) * sk * D;
    const int wrow = warp * 16;  // this warp's first key inside the block

    int qb0, qb1;
    xattn_query_blocks(k0, k1, off, sq, a.causal, a.wl, a.wr, BM, qb0, qb1);
    const int nq = qb1 - qb0;
    const int total = nq * a.group;  // steps: query blocks of every head of the group
    const float sl2 = MODS ? XATTN_LOG2E : a.scale * XATTN_LOG2E;

    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk[n][i] = dv[n][i] = 0.f;

    // Q, dO (cp.async), lse and delta (plain stores) of step `it`.
    auto stage = [&](int it) {
        const int h = hk * a.group + it / nq;
        const int q0 = (qb0 + it % nq) * BM;
        const long long bh = (long long)b * a.hq + h;
        load_tile<BM, D, LD, NT, PairSwizzle>(sQ, a.q + bh * sq * D, q0, sq, tid);
        load_tile<BM, D, LD, NT, PairSwizzle>(sO, a.dout + bh * sq * D, q0, sq, tid);
        for (int i = tid; i < BM; i += NT) {
            const int qi = q0 + i;
            float l, dl;
            xattn_bwd_row(a.lse, a.delta, bh * sq + qi, qi < sq, l, dl);
            sL[i] = l;
            sD[i] = dl;
        }
    };

    if (total > 0) {
        load_tile<BN, D, LD, NT, PairSwizzle>(sK, a.k + kvh, k0, sk, tid);
        load_tile<BN, D, LD, NT, PairSwizzle>(sV, a.v + kvh, k0, sk, tid);
        stage(0);
        cp_async_commit();
    }

    for (int it = 0; it < total; ++it) {
        const int h = hk * a.group + it / nq;
        const int q0 = (qb0 + it % nq) * BM;
        const int q1 = min(q0 + BM, sq);
        cp_async_wait<0>();
        if (it == 0) {
            split_tile<BN, D, LD, NT, PairSwizzle>(sK, tid);
            split_tile<BN, D, LD, NT, PairSwizzle>(sV, tid);
        }
        split_tile<BM, D, LD, NT, PairSwizzle>(sQ, tid);
        split_tile<BM, D, LD, NT, PairSwizzle>(sO, tid);
        // Publishes the split tiles, lse and delta of this step; the previous step's dQ pass
        // (the last reader of sS) is done.
        __syncthreads();

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys: hi*hi' into s / dp, the
        // small products into st / dpt (see the header).
        float s[NS][4], dp[NS][4], st[NS][4], dpt[NS][4];
        x3_products<D, NS, KC, LD>(s, st, sK, sQ, wrow, g, t4);
        x3_products<D, NS, KC, LD>(dp, dpt, sV, sO, wrow, g, t4);

        // P^T and dS^T in float32, element by element, then split into A fragments (register
        // order a0..a3 = c0, c2, c1, c3). Element (n, e): key wrow + g + 8 (e / 2), query
        // 8n + 2t + e % 2 of the block. The visibility test runs on edge tiles only (a
        // block-uniform branch), after the score mods (a softcap maps -inf to -cap).
        const bool edge = xattn_tile_needs_test(q0, q1, k0, BN, off, sk, a.causal, a.wl, a.wr);
        unsigned ph[NS][4], pl[NS][4], dh[NS][4], dl[NS][4];
#pragma unroll
        for (int n = 0; n < NS; ++n) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ql = n * 8 + t4 * 2 + (e & 1);
                const int qi = q0 + ql;
                const int kj = k0 + wrow + g + (e >> 1) * 8;
                float x = s[n][e] + st[n][e], dcap = 1.f;
                if constexpr (MODS)
                    x = xattn_score_mod(a, x * a.scale, b, h, qi, kj, off, sq, sk, dcap);
                if (edge && !xattn_visible(qi, kj, off, sk, a.causal, a.wl, a.wr))
                    x = -XATTN_INF;
                p[e] = ex2(fmaf(x, sl2, -sL[ql]));
                ds[e] = p[e] * ((dp[n][e] + dpt[n][e]) - sD[ql]) * dcap;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int e = (i & 1) * 2 + (i >> 1);
                split_tf32(p[e], ph[n][i], pl[n][i]);
                split_tf32(ds[e], dh[n][i], dl[n][i]);
            }
            // dS to shared memory for the dQ pass, query-major (hi, then lo BN floats on).
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int e = (i & 1) * 2 + (i >> 1);
                float* row = sS + (n * 8 + t4 * 2 + (e & 1)) * LDS + wrow + g + (e >> 1) * 8;
                row[0] = __uint_as_float(dh[n][i]);
                row[BN] = __uint_as_float(dl[n][i]);
            }
        }

        // dV += P^T dO, then dK += dS^T Q.
        x3_accumulate<D, DC, NS, LD>(dv, ph, pl, sO, c0, g, t4);
        x3_accumulate<D, DC, NS, LD>(dk, dh, dl, sQ, c0, g, t4);

        // Every warp's dS is in sS and every read of sQ, sO, sL, sD of this step is done.
        __syncthreads();
        if (it + 1 < total) {
            stage(it + 1);  // overlaps the dQ pass, which reads only sS and sK
            cp_async_commit();
        }

        // dQ += dS K over the CTA's BN keys: items of 16 queries x 32 columns over the warps.
        {
            float* dqg = a.dq_accum + ((long long)b * a.hq + h) * sq * D;
#pragma unroll 1
            for (int item = warp; item < ITEMS; item += NW) {
                const int qt = item % (BM / 16), p = item / (BM / 16);
                float acc[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
                const float* a0p = sS + (qt * 16 + g) * LDS + t4 * 2;
                const float* a1p = a0p + 8 * LDS;
#pragma unroll KK_UNROLL
                for (int kk = 0; kk < BN / 8; ++kk) {
                    // A: dS rows g, g+8, keys 8kk + 2t (k = t) and 8kk + 2t + 1 (k = t+4).
                    const float2 xh0 = *reinterpret_cast<const float2*>(a0p + kk * 8);
                    const float2 xh1 = *reinterpret_cast<const float2*>(a1p + kk * 8);
                    const float2 xl0 = *reinterpret_cast<const float2*>(a0p + BN + kk * 8);
                    const float2 xl1 = *reinterpret_cast<const float2*>(a1p + BN + kk * 8);
                    const unsigned ah[4] = {u(xh0.x), u(xh1.x), u(xh0.y), u(xh1.y)};
                    const unsigned al[4] = {u(xl0.x), u(xl1.x), u(xl0.y), u(xl1.y)};
                    const int r0 = kk * 8 + t4 * 2, r1 = r0 + 1;
                    const int col = (c0 + p * 32 + g * 4) ^ swz(r0);
                    const float4 kh0 = lds4(sK + r0 * LD + col), kl0 = lds4(sK + r0 * LD + D + col);
                    const float4 kh1 = lds4(sK + r1 * LD + col), kl1 = lds4(sK + r1 * LD + D + col);
                    mma3_tf32(acc[0], ah, al, u(kh0.x), u(kh1.x), u(kl0.x), u(kl1.x));
                    mma3_tf32(acc[1], ah, al, u(kh0.y), u(kh1.y), u(kl0.y), u(kl1.y));
                    mma3_tf32(acc[2], ah, al, u(kh0.z), u(kh1.z), u(kl0.z), u(kl1.z));
                    mma3_tf32(acc[3], ah, al, u(kh0.w), u(kh1.w), u(kl0.w), u(kl1.w));
                }
                // acc[i][e]: query g + 8 (e / 2), column c0 + 32p + 8t + 4 (e % 2) + i.
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    const int qi = q0 + qt * 16 + g + hr * 8;
                    if (qi < sq) {
                        float* row = dqg + (long long)qi * D + c0 + p * 32 + t4 * 8;
                        red_add4(row, acc[0][hr * 2], acc[1][hr * 2], acc[2][hr * 2],
                                 acc[3][hr * 2]);
                        red_add4(row + 4, acc[0][hr * 2 + 1], acc[1][hr * 2 + 1],
                                 acc[2][hr * 2 + 1], acc[3][hr * 2 + 1]);
                    }
                }
            }
        }
        // The next step's barrier (after its split) orders this pass's sS reads before the
        // next writes of sS; sK is never written again.
    }

    // dK (times scale) and dV of this CTA's keys: dk[4p + i][e] is key g + 8 (e / 2), column
    // c0 + 32p + 8t + 4 (e % 2) + i. Keys that no query sees get zeros.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int kj = k0 + wrow + g + hr * 8;
        if (kj < sk) {
            float* dkr = a.dk + kvh + (long long)kj * D + c0 + t4 * 8;
            float* dvr = a.dv + kvh + (long long)kj * D + c0 + t4 * 8;
#pragma unroll
            for (int p = 0; p < NG; ++p)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int e = hr * 2 + half;
                    *reinterpret_cast<float4*>(dkr + p * 32 + half * 4) =
                        make_float4(dk[p * 4][e] * a.scale, dk[p * 4 + 1][e] * a.scale,
                                    dk[p * 4 + 2][e] * a.scale, dk[p * 4 + 3][e] * a.scale);
                    *reinterpret_cast<float4*>(dvr + p * 32 + half * 4) =
                        make_float4(dv[p * 4][e], dv[p * 4 + 1][e], dv[p * 4 + 2][e],
                                    dv[p * 4 + 3][e]);
                }
        }
    }
}

}  // namespace xattn::bwd_x3

// flash_bwd_tf32x3_d<D>_c<DC>_w<NW>_m<BM>_<plain|mods>: the argument list of
// flash_bwd_simt.cu; grid (key blocks x D / DC, Hkv, B).
#define XATTN_BWDX3_ENTRY(D, DC, NW, BM, MN, MODS)                                            \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                     \
        flash_bwd_tf32x3_d##D##_c##DC##_w##NW##_m##BM##_##MN(                                 \
            const float *q, const float *k, const float *v, const float *dout,                \
            const float *lse, const float *delta, float *dq_accum, float *dk, float *dv,      \
            int hq, int group, int sq, int sk, float scale, XATTN_SCORE_MOD_PARAMS) {         \
        xattn::bwd_x3::core<D, DC, NW, BM, MODS>(xattn::bwd_x3::Args{                         \
            XATTN_SCORE_MOD_INIT, q, k, v, dout, lse, delta, dq_accum, dk, dv, hq, group, sq,  \
            sk, scale});                                                                      \
    }
// One more expansion level so that -D values expand before ## pastes them.
#define XATTN_BWDX3_ONE(D, DC, NW, BM, MN, MODS) XATTN_BWDX3_ENTRY(D, DC, NW, BM, MN, MODS)

// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
#ifdef XATTN_BWDX3_D
XATTN_BWDX3_ONE(XATTN_BWDX3_D, XATTN_BWDX3_DC, XATTN_BWDX3_NW, XATTN_BWDX3_BM, XATTN_BWDX3_MN,
                XATTN_BWDX3_MODS)
#endif
