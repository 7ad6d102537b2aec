// Flash attention backward on tensor cores (FlashAttention-2 scheme): mma.sync.m16n8k16 (sm_80+),
// ldmatrix, cp.async.
//
// Four kernels, launched in this order by xattn/_backends/cupy_/flash_bwd.py:
// 1. flash_bwd_delta_<t>: delta[i] = sum_d dout[i, d] * out[i, d] in float32, one warp per row.
// 2. flash_bwd_<t>_...: grid (key blocks x column chunks, Hkv, B). A CTA of NW warps owns
//    BN = 16 NW keys of one kv head (16 per warp) and DC of the D output columns of dK/dV
//    (DC = D except at D = 256, where two CTAs split the columns and both recompute S and dP:
//    the dK and dV accumulators of BN x D floats would not fit in registers). K and V stay in
//    shared memory; the CTA walks the query heads of its GQA group and, for each, the query
//    blocks of BM rows that may see its keys (causal/window clip the range), with Q and dO
//    double-buffered by cp.async. Per query block, each warp computes for its 16 keys
//      S^T = K Q^T and dP^T = V dO^T          (keys in rows: 16 x BM float32 fragments)
//      P^T = exp2(S^T log2e - lse log2e)       (the forward's score mods and masks; p = 0 on
//                                               rows with lse = -inf and past Sq)
//      dS^T = P^T (dP^T - delta) [* (1 - tanh^2) with softcap]
//      dV += P^T dO,  dK += dS^T Q              (the S^T/dP^T accumulators are re-packed as the
//                                               A operands, as the forward does with P)
//    and, unless dq has its own pass, dS^T goes through shared memory and each warp adds a
//    16 x DQN slice of dS K into the float32 dq_accum with red.global.add.f32. dK is scaled by
//    `scale` once at the end; dK/dV are written once per CTA in the input type (GQA: the query
//    heads of a group are summed in registers, never with atomics, so dK/dV are deterministic).
// 3. flash_bwd_dq_convert_<t>: dq = scale * dq_accum in the input type; or, with
//    deterministic=True, flash_bwd_dq_<t>_...: grid (query blocks, Hq, B), each warp owns 16
//    query rows and walks the key blocks they may see, recomputing S = Q K^T, dP = dO V^T and
//    dS, accumulating dQ += dS K in registers (no atomics: bitwise reproducible).
//
// Block-sparse entries (MN *_bm, SPARSE): the main kernel visits only the query tiles of the
// BlockMask's CSC list for its key block's column, the dq kernel only the key tiles of the CSR
// list of its query block row (blockmask.cuh); full blocks run no element test, partial blocks
// the mask's element rule after the score mods. The host picks tiles that lie inside one mask
// block (BN and the dq kernel's key tile divide bk, BM and its query block divide bq).
//
// Layout (contiguous): q, dout (B, Hq, Sq, D); k, v (B, Hkv, Sk, D); lse, delta (B, Hq, Sq)
// float32; dq_accum (B, Hq, Sq, D) float32; dq/dk/dv like q/k/v. Dv != D is zero-padded to a
// common D by the launcher. Positions are aligned bottom-right (query i at key i + Sk - Sq).
// No CUDA headers: the local headers are inlined by the loader.

#include "masking.cuh"
#include "mma_sm80.cuh"
#include "blockmask.cuh"
#include "bwd_score_rules.cuh"

namespace xattn {

// S = A B^T and dP = C E^T for this warp's 16 rows of A and C (shared-memory tiles at the
// addresses a_s, c_s, starting at row wrow) against the NS * 8 rows of B and E (at b_s, e_s),
// over the KS * 16 head columns; row stride LD elements. The main kernel reads keys in rows
// (S^T = K Q^T, dP^T = V dO^T), the dq kernel queries (S = Q K^T, dP = dO V^T).
template <class T, int NS, int KS, int LD>
__device__ __forceinline__ void bwd_products(float (&s)[NS][4], float (&dp)[NS][4],
                                             unsigned a_s, unsigned c_s, unsigned b_s,
                                             unsigned e_s, int wrow, int lane) {
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.f;
#pragma unroll 2
    for (int ks = 0; ks < KS; ++ks) {
        unsigned af[4], cf[4];
        {
            const int r = wrow + (lane & 7) + ((lane >> 3) & 1) * 8;
            const int c = ks * 16 + (lane >> 4) * 8;
            ldsm_x4(af, a_s + (unsigned)((r * LD + c) * 2));
            ldsm_x4(cf, c_s + (unsigned)((r * LD + c) * 2));
        }
#pragma unroll
        for (int nn = 0; nn < NS / 2; ++nn) {
            unsigned bf[4], ef[4];
            const int r = nn * 16 + (lane & 7) + (lane >> 4) * 8;
            const int c = ks * 16 + ((lane >> 3) & 1) * 8;
            ldsm_x4(bf, b_s + (unsigned)((r * LD + c) * 2));
            ldsm_x4(ef, e_s + (unsigned)((r * LD + c) * 2));
            mma(s[2 * nn], af, bf[0], bf[1], T());
            mma(s[2 * nn + 1], af, bf[2], bf[3], T());
            mma(dp[2 * nn], cf, ef[0], ef[1], T());
            mma(dp[2 * nn + 1], cf, ef[2], ef[3], T());
        }
    }
}

// Accumulator tiles 2j and 2j + 1 (16 rows x 16 columns, float32) packed as an mma A operand.
template <class T, int N>
__device__ __forceinline__ void bwd_pack_a(unsigned (&f)[4], const float (&x)[N][4], int j) {
    f[0] = pack2(x[2 * j][0], x[2 * j][1], T());
    f[1] = pack2(x[2 * j][2], x[2 * j][3], T());
    f[2] = pack2(x[2 * j + 1][0], x[2 * j + 1][1], T());
    f[3] = pack2(x[2 * j + 1][2], x[2 * j + 1][3], T());
}

template <class T, int D, int DC, int NW, int BM, int DQN, bool MODS, bool DQ, bool SPARSE>
__device__ __forceinline__ void flash_bwd_core(const BwdArgs& a) {
    constexpr int BN = NW * 16;   // keys per CTA: 16 per warp
    constexpr int LD = D + 8;     // smem row stride (16-byte pad: conflict-free ldmatrix)
    constexpr int LDS = BM + 8;   // dS^T row stride
    constexpr int NT = NW * 32;
    constexpr int KS = D / 16;    // k-steps of S^T and dP^T over the head dim
    constexpr int NS = BM / 8;    // n-tiles of S^T (queries)
    constexpr int NC = DC / 8;    // n-tiles of this CTA's dK/dV columns
    constexpr int NCOL = D / DC;
    static_assert(D % DC == 0 && DC % 16 == 0 && BM % 16 == 0 && DC % DQN == 0 &&
                  DQN % 16 == 0, "tile configuration");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned short* sK = reinterpret_cast<unsigned short*>(smem_raw);
    unsigned short* sV = sK + BN * LD;
    unsigned short* sQ = sV + BN * LD;      // two buffers
    unsigned short* sO = sQ + 2 * BM * LD;  // dO, two buffers
    unsigned short* sS = sO + 2 * BM * LD;  // dS^T (BN x BM), for dQ
    float* sL = reinterpret_cast<float*>(sS + BN * LDS);  // two buffers of lse * log2(e)
    float* sD = sL + 2 * BM;                                // two buffers of delta

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int kblk = blockIdx.x / NCOL;
    const int c0 = (blockIdx.x % NCOL) * DC;
    const int hk = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int hkv = a.hq / a.group;
    const int k0 = kblk * BN;
    const int k1 = min(k0 + BN, sk);
    const long long kvh = ((long long)b * hkv + hk) * sk * D;

    // The steps of this CTA, in loop order: for each query head hh of the GQA group, the query
    // tiles qt (rows qt * BM ...) that causal / window allow, [qb0, qb1), or (SPARSE) those of
    // them that the BlockMask's column of this key block lists (CSC; the CTA's BN keys lie
    // inside one mask key block). pblk >= 0 marks a tile of that partial block (the mask's
    // element rule runs there only); qt = -1 ends the walk.
    int qb0, qb1;
    xattn_query_blocks(k0, k1, off, sq, a.causal, a.wl, a.wr, BM, qb0, qb1);
    // The sparse walk keeps only its CSC entry `ent` beside (hh, qt, pblk): the rest is re-read
    // (L1 hits), since every register counts here (the dK/dV accumulators fill the budget).
    int hh = 0, qt = qb1 > qb0 ? qb0 : -1, pblk = -1, ent = 0;
    const int mcol = SPARSE ? k0 / a.bm.bk : 0;
    // The first query tile of CSC entry e onwards (ent, qt, p), or qt = -1 past the column end.
    auto csc_from = [&](int e, int& e2, int& qt2, int& p2) {
        xattn_csc_from(a.cm, e, a.cm.col_ptr[mcol + 1], a.bm.bq / BM, qb0, qb1, e2, qt2, p2);
    };
    if constexpr (SPARSE) {
        if (qt >= 0) csc_from(a.cm.col_ptr[mcol], ent, qt, pblk);
    }
    // The step after (h2, qt2) (in place): every head walks the same list, so a restart after
    // a non-empty walk is non-empty.
    auto advance = [&](int& h2, int& e2, int& qt2, int& p2) {
        if constexpr (SPARSE) {
            const int per = a.bm.bq / BM;
            const int first = a.cm.row_idx[e2] * per;
            if (qt2 + 1 < min(first + per, qb1)) {
                ++qt2;  // the next query tile of the same mask block
            } else {
                csc_from(e2 + 1, e2, qt2, p2);
                if (qt2 < 0 && h2 + 1 < a.group) {
                    ++h2;
                    csc_from(a.cm.col_ptr[mcol], e2, qt2, p2);
                }
            }
        } else {
            if (++qt2 >= qb1) {
                qt2 = qb0;
                if (++h2 >= a.group) qt2 = -1;
            }
        }
    };

    float dk[NC][4], dv[NC][4];
#pragma unroll
    for (int n = 0; n < NC; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk[n][i] = dv[n][i] = 0.f;

    const float sl2 = MODS ? XATTN_LOG2E : a.scale * XATTN_LOG2E;
    const unsigned sKa = smem_u32(sK), sVa = smem_u32(sV), sQa = smem_u32(sQ),
                   sOa = smem_u32(sO), sSa = smem_u32(sS);
    const int wrow = warp * 16;  // this warp's first key inside the block

    // Stage Q, dO, lse, delta of (query head h, rows q0 ...) into buffer `bf`. lse of rows past
    // Sq and of rows that see no key (-inf) becomes +inf, so that every p of those rows is
    // exactly 0.
    auto stage = [&](int h, int q0, int bf) {
        const long long bh = (long long)b * a.hq + h;
        load_tile<BM, D, LD, NT>(sQ + bf * BM * LD, a.q + bh * sq * D, q0, sq, tid);
        load_tile<BM, D, LD, NT>(sO + bf * BM * LD, a.dout + bh * sq * D, q0, sq, tid);
        for (int i = tid; i < BM; i += NT) {
            const int qi = q0 + i;
            float l = XATTN_INF, dl = 0.f;
            if (qi < sq) {
                const float x = a.lse[bh * sq + qi];
                l = x == -XATTN_INF ? XATTN_INF : x * XATTN_LOG2E;
                dl = a.delta[bh * sq + qi];
            }
            sL[bf * BM + i] = l;
            sD[bf * BM + i] = dl;
        }
    };

    if (qt >= 0) {
        load_tile<BN, D, LD, NT>(sK, a.k + kvh, k0, sk, tid);
        load_tile<BN, D, LD, NT>(sV, a.v + kvh, k0, sk, tid);
        stage(hk * a.group, qt * BM, 0);
        cp_async_commit();
    }

    // Left by the break at the end (the next step's qt < 0).
    if (qt >= 0)
    for (int bf = 0;; bf ^= 1) {
        int hn = hh, en = ent, qn = qt, pn = pblk;
        advance(hn, en, qn, pn);
        const int h = hk * a.group + hh;
        const int q0 = qt * BM;
        const int q1 = min(q0 + BM, sq);
        if (qn >= 0) {
            // Buffer bf ^ 1 was last read in the previous step, which ended with a barrier.
            stage(hk * a.group + hn, qn * BM, bf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const unsigned qbase = sQa + (unsigned)(bf * BM * LD * 2);
        const unsigned obase = sOa + (unsigned)(bf * BM * LD * 2);

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
        float s[NS][4], dp[NS][4];
        bwd_products<T, NS, KS, LD>(s, dp, sKa, sVa, qbase, obase, wrow, lane);

        // P^T and dS^T, element by element. Accumulator element (n, hr, e) of this thread is
        // key wrow + g + 8 hr, query n * 8 + 2 t4 + e of the tile. The visibility test runs
        // only on edge tiles, the mask's element rule only in its partial blocks (both
        // block-uniform branches); both after the score mods (a softcap maps -inf to -cap).
        const bool edge = xattn_tile_needs_test(q0, q1, k0, BN, off, sk, a.causal, a.wl, a.wr);
        const bool part = SPARSE && pblk >= 0;
        const int mqb = SPARSE ? q0 / a.bm.bq * a.bm.bq : 0;
        const int mkc = SPARSE ? k0 / a.bm.bk * a.bm.bk : 0;
        const float* lb = sL + bf * BM;
        const float* db = sD + bf * BM;
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int ql = n * 8 + t4 * 2 + e;
                const int qi = q0 + ql;
                const float l2 = lb[ql], dl = db[ql];
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    const int kj = k0 + wrow + g + hr * 8;
                    s[n][hr * 2 + e] =
                        bwd_p_ds<MODS>(a, s[n][hr * 2 + e], dp[n][hr * 2 + e], b, h, qi, kj,
                                       off, sk, edge, part, pblk, mqb, mkc, sl2, l2, dl);
                }
            }

        // dV += P^T dO and dK += dS^T Q over this CTA's columns; P and dS rounded to the input
        // type as the tensor cores need them.
#pragma unroll
        for (int j = 0; j < BM / 16; ++j) {
            unsigned pf[4], df[4];
            bwd_pack_a<T>(pf, s, j);
            bwd_pack_a<T>(df, dp, j);
#pragma unroll
            for (int dn = 0; dn < DC / 16; ++dn) {
                unsigned of[4], qf[4];
                const int r = j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int c = c0 + dn * 16 + (lane >> 4) * 8;
                ldsm_x4_t(of, obase + (unsigned)((r * LD + c) * 2));
                ldsm_x4_t(qf, qbase + (unsigned)((r * LD + c) * 2));
                mma(dv[2 * dn], pf, of[0], of[1], T());
                mma(dv[2 * dn + 1], pf, of[2], of[3], T());
                mma(dk[2 * dn], df, qf[0], qf[1], T());
                mma(dk[2 * dn + 1], df, qf[2], qf[3], T());
            }
        }

        if constexpr (DQ) {
            // dS^T to shared memory (keys in rows), then dQ[:, cols] += dS K in slices of
            // 16 rows x DQN columns spread over the warps, added to dq_accum with RED.
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int hr = 0; hr < 2; ++hr)
                    *reinterpret_cast<unsigned*>(sS + (wrow + g + hr * 8) * LDS + n * 8 + t4 * 2) =
                        pack2(dp[n][hr * 2], dp[n][hr * 2 + 1], T());
            __syncthreads();
            constexpr int NQT = BM / 16, ITEMS = NQT * (DC / DQN);
            float* dqg = a.dq_accum + ((long long)b * a.hq + h) * sq * D;
            for (int item = warp; item < ITEMS; item += NW) {
                const int qt = item % NQT, cc = c0 + (item / NQT) * DQN;
                float acc[DQN / 8][4];
#pragma unroll
                for (int n = 0; n < DQN / 8; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    // A = dS (queries x keys) read transposed from dS^T: matrix m of the x4
                    // load is (queries + 8 (m & 1), keys + 8 (m >> 1)).
                    unsigned af[4];
                    {
                        const int m = lane >> 3;
                        const int r = kk * 16 + (lane & 7) + (m >> 1) * 8;
                        const int c = qt * 16 + (m & 1) * 8;
                        ldsm_x4_t(af, sSa + (unsigned)((r * LDS + c) * 2));
                    }
#pragma unroll
                    for (int dn = 0; dn < DQN / 16; ++dn) {
                        unsigned kf[4];
                        const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                        const int c = cc + dn * 16 + (lane >> 4) * 8;
                        ldsm_x4_t(kf, sKa + (unsigned)((r * LD + c) * 2));
                        mma(acc[2 * dn], af, kf[0], kf[1], T());
                        mma(acc[2 * dn + 1], af, kf[2], kf[3], T());
                    }
                }
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    const int qi = q0 + qt * 16 + g + hr * 8;
                    if (qi < sq) {
                        float* row = dqg + (long long)qi * D + cc + t4 * 2;
#pragma unroll
                        for (int n = 0; n < DQN / 8; ++n) {
                            red_add2(row + n * 8, acc[n][hr * 2], acc[n][hr * 2 + 1]);
                        }
                    }
                }
            }
        }
        __syncthreads();  // the next step overwrites this step's buffers and dS^T
        if (qn < 0) break;
        hh = hn;
        ent = en;
        qt = qn;
        pblk = pn;
    }

    // dK (times scale) and dV of this CTA's keys and columns; keys no query sees get zeros.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int kj = k0 + wrow + g + hr * 8;
        if (kj < sk) {
            unsigned short* dkr = a.dk + kvh + (long long)kj * D + c0 + t4 * 2;
            unsigned short* dvr = a.dv + kvh + (long long)kj * D + c0 + t4 * 2;
#pragma unroll
            for (int n = 0; n < NC; ++n) {
                *reinterpret_cast<unsigned*>(dkr + n * 8) =
                    pack2(dk[n][hr * 2] * a.scale, dk[n][hr * 2 + 1] * a.scale, T());
                *reinterpret_cast<unsigned*>(dvr + n * 8) =
                    pack2(dv[n][hr * 2], dv[n][hr * 2 + 1], T());
            }
        }
    }
}

// Deterministic dQ: one CTA per (query block, query head), no atomics.
template <class T, int D, int NW, int BN, bool MODS, bool SPARSE>
__device__ __forceinline__ void flash_bwd_dq_core(const BwdArgs& a) {
    constexpr int BM = NW * 16;
    constexpr int LD = D + 8;
    constexpr int NT = NW * 32;
    constexpr int KS = D / 16;
    constexpr int NS = BN / 8;
    constexpr int ND = D / 8;
    static_assert(BN % 16 == 0, "tile configuration");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned short* sQ = reinterpret_cast<unsigned short*>(smem_raw);
    unsigned short* sO = sQ + BM * LD;
    unsigned short* sK = sO + BM * LD;   // two buffers
    unsigned short* sV = sK + 2 * BN * LD;  // two buffers

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int qblk = gridDim.x - 1 - blockIdx.x;  // heavy (late, causal) blocks first
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int q0 = qblk * BM;
    const int q1 = min(q0 + BM, sq);
    const int hkv = a.hq / a.group;
    const long long bh = (long long)b * a.hq + h;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;
    const unsigned short* Kg = a.k + kvh;
    const unsigned short* Vg = a.v + kvh;
    const int wrow = warp * 16;

    // The key tiles: [kb0, kb1) in order, or (SPARSE) the BlockMask's visible blocks of this
    // query block row clipped to it (CSR, as the forward walks them); pblk >= 0 marks a tile of
    // a partial block, kt = -1 ends the walk.
    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    XattnCsrWalk walk;
    int kt = kb1 > kb0 ? kb0 : -1, pblk = -1;
    if constexpr (SPARSE) {
        if (kt >= 0) {
            xattn_csr_begin(a.bm, q0 / a.bm.bq, BN, kb0, kb1, walk);
            xattn_csr_next(a.bm, walk, kt, pblk);
        }
    }

    // This thread's two rows: lse in base 2 (+inf where no key is seen or past Sq) and delta.
    float l2[2], dl[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int qi = q0 + wrow + g + hr * 8;
        l2[hr] = XATTN_INF;
        dl[hr] = 0.f;
        if (qi < sq) {
            const float x = a.lse[bh * sq + qi];
            l2[hr] = x == -XATTN_INF ? XATTN_INF : x * XATTN_LOG2E;
            dl[hr] = a.delta[bh * sq + qi];
        }
    }

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

    const float sl2 = MODS ? XATTN_LOG2E : a.scale * XATTN_LOG2E;
    const unsigned sQa = smem_u32(sQ), sOa = smem_u32(sO), sKa = smem_u32(sK),
                   sVa = smem_u32(sV);

    if (kt >= 0) {
        load_tile<BM, D, LD, NT>(sQ, a.q + bh * sq * D, q0, sq, tid);
        load_tile<BM, D, LD, NT>(sO, a.dout + bh * sq * D, q0, sq, tid);
        load_tile<BN, D, LD, NT>(sK, Kg, kt * BN, sk, tid);
        load_tile<BN, D, LD, NT>(sV, Vg, kt * BN, sk, tid);
        cp_async_commit();
    }

    // Left by the break at the end; the prefetch follows the walk (never an invisible tile).
    if (kt >= 0)
    for (int bf = 0;; bf ^= 1) {
        int kt_next, pblk_next = -1;
        if constexpr (SPARSE) {
            xattn_csr_next(a.bm, walk, kt_next, pblk_next);
        } else {
            kt_next = kt + 1 < kb1 ? kt + 1 : -1;
        }
        if (kt_next >= 0) {
            load_tile<BN, D, LD, NT>(sK + (bf ^ 1) * BN * LD, Kg, kt_next * BN, sk, tid);
            load_tile<BN, D, LD, NT>(sV + (bf ^ 1) * BN * LD, Vg, kt_next * BN, sk, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const unsigned kbase = sKa + (unsigned)(bf * BN * LD * 2);
        const unsigned vbase = sVa + (unsigned)(bf * BN * LD * 2);
        float s[NS][4], dp[NS][4];
        bwd_products<T, NS, KS, LD>(s, dp, sQa, sOa, kbase, vbase, wrow, lane);

        // Element (n, hr, e): query wrow + g + 8 hr, key n * 8 + 2 t4 + e of the tile.
        const int k0 = kt * BN;
        const bool edge = xattn_tile_needs_test(q0, q1, k0, BN, off, sk, a.causal, a.wl, a.wr);
        const bool part = SPARSE && pblk >= 0;
        const int mqb = SPARSE ? q0 / a.bm.bq * a.bm.bq : 0;
        const int mkc = SPARSE ? k0 / a.bm.bk * a.bm.bk : 0;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int qi = q0 + wrow + g + hr * 8;
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kj = k0 + n * 8 + t4 * 2 + e;
                    bwd_p_ds<MODS>(a, s[n][hr * 2 + e], dp[n][hr * 2 + e], b, h, qi, kj, off,
                                   sk, edge, part, pblk, mqb, mkc, sl2, l2[hr], dl[hr]);
                }
        }

        // dQ += dS K: the dS accumulator re-packed as the A operand, K read transposed.
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            unsigned af[4];
            bwd_pack_a<T>(af, dp, j);
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                unsigned kf[4];
                const int r = j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int c = dn * 16 + (lane >> 4) * 8;
                ldsm_x4_t(kf, kbase + (unsigned)((r * LD + c) * 2));
                mma(acc[2 * dn], af, kf[0], kf[1], T());
                mma(acc[2 * dn + 1], af, kf[2], kf[3], T());
            }
        }
        __syncthreads();  // the next iteration's cp.async overwrites this buffer
        if (kt_next < 0) break;
        kt = kt_next;
        pblk = pblk_next;
    }

#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int qi = q0 + wrow + g + hr * 8;
        if (qi < sq) {
            unsigned short* row = a.dq + (bh * sq + qi) * D + t4 * 2;
#pragma unroll
            for (int n = 0; n < ND; ++n)
                *reinterpret_cast<unsigned*>(row + n * 8) =
                    pack2(acc[n][hr * 2] * a.scale, acc[n][hr * 2 + 1] * a.scale, T());
        }
    }
}

// delta = rowsum(dout * out) in float32: one warp per row of d (even) 16-bit elements.
template <class T>
__device__ __forceinline__ void bwd_delta(const unsigned short* o, const unsigned short* dout,
                                          float* delta, long long rows, int d) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // warp-uniform
    const unsigned* op = reinterpret_cast<const unsigned*>(o + row * d);
    const unsigned* gp = reinterpret_cast<const unsigned*>(dout + row * d);
    float acc = 0.f;
    for (int i = lane; i < d / 2; i += 32) {
        const unsigned x = op[i], y = gp[i];
        acc = fmaf(to_f32((unsigned short)(x & 0xffffu), T()),
                   to_f32((unsigned short)(y & 0xffffu), T()), acc);
        acc = fmaf(to_f32((unsigned short)(x >> 16), T()), to_f32((unsigned short)(y >> 16), T()),
                   acc);
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (lane == 0) delta[row] = acc;
}

// dq = scale * dq_accum in the 16-bit type, two elements per thread and step.
template <class T>
__device__ __forceinline__ void bwd_dq_convert(const float* acc, unsigned short* dq,
                                               long long pairs, float scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += stride)
        reinterpret_cast<unsigned*>(dq)[i] = pack2(acc[2 * i] * scale, acc[2 * i + 1] * scale, T());
}

}  // namespace xattn

// Every entry takes the block-mask arguments (the CSR arrays and rule as the forward's, then the
// CSC transpose); the dense ones ignore them (the launcher passes nulls). MN names the variant:
// plain | mods (score modifications), with _bm for the block-sparse walk.
// Main kernel: flash_bwd_<t>_d<D>_c<DC>_w<NW>_m<BM>_q<DQN>_<MN>_<atomic|nodq>.
#define XATTN_BWD_ENTRY(TN, T, D, DC, NW, BM, DQN, MN, MODS, QN, DQ, SPARSE)                  \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                     \
        flash_bwd_##TN##_d##D##_c##DC##_w##NW##_m##BM##_q##DQN##_##MN##_##QN(                 \
            XATTN_BWD_PARAMS) {                                                               \
        xattn::flash_bwd_core<xattn::T, D, DC, NW, BM, DQN, MODS, DQ, SPARSE>(XATTN_BWD_ARGS); \
    }
#define XATTN_BWD_ONE(TN, D, DC, NW, BM, DQN, MN, MODS, QN, DQ, SPARSE) \
    XATTN_BWD_ENTRY(TN, TN, D, DC, NW, BM, DQN, MN, MODS, QN, DQ, SPARSE)

// Deterministic dq kernel: flash_bwd_dq_<t>_d<D>_w<NW>_n<BN>_<MN>.
#define XATTN_BWD_DQ_ENTRY(TN, T, D, NW, BN, MN, MODS, SPARSE)                                \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                     \
        flash_bwd_dq_##TN##_d##D##_w##NW##_n##BN##_##MN(XATTN_BWD_PARAMS) {                   \
        xattn::flash_bwd_dq_core<xattn::T, D, NW, BN, MODS, SPARSE>(XATTN_BWD_ARGS);          \
    }
#define XATTN_BWD_DQ_ONE(TN, D, NW, BN, MN, MODS, SPARSE) \
    XATTN_BWD_DQ_ENTRY(TN, TN, D, NW, BN, MN, MODS, SPARSE)

#define XATTN_BWD_AUX(TN)                                                                     \
    extern "C" __global__ void flash_bwd_delta_##TN(const unsigned short *o,                  \
                                                    const unsigned short *dout, float *delta, \
                                                    long long rows, int d) {                  \
        xattn::bwd_delta<xattn::TN>(o, dout, delta, rows, d);                                 \
    }                                                                                         \
    extern "C" __global__ void flash_bwd_dq_convert_##TN(const float *acc, unsigned short *dq, \
                                                         long long pairs, float scale) {      \
        xattn::bwd_dq_convert<xattn::TN>(acc, dq, pairs, scale);                              \
    }

// One more expansion level so that -D values expand before ## pastes them.
#define XATTN_BWD_AUX_ONE(TN) XATTN_BWD_AUX(TN)

// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
// XATTN_KIND picks the entry macro: 1 the main kernel, 2 the deterministic dq kernel, 3 the
// delta and dq-convert kernels of one type.
#if defined(XATTN_KIND) && XATTN_KIND == 1
XATTN_BWD_ONE(XATTN_TN, XATTN_D, XATTN_DC, XATTN_NW, XATTN_BM, XATTN_DQN, XATTN_MN, XATTN_MODS,
              XATTN_QN, XATTN_DQ, XATTN_SPARSE)
#elif defined(XATTN_KIND) && XATTN_KIND == 2
XATTN_BWD_DQ_ONE(XATTN_TN, XATTN_D, XATTN_NW, XATTN_BN, XATTN_MN, XATTN_MODS, XATTN_SPARSE)
#elif defined(XATTN_KIND) && XATTN_KIND == 3
XATTN_BWD_AUX_ONE(XATTN_TN)
#endif
