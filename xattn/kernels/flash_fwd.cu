// Flash attention forward on tensor cores: mma.sync.m16n8k16 (sm_80+), ldmatrix, cp.async.
//
// One thread block owns BM = NW * MT * 16 query rows of one (batch, query head); each warp owns
// MT row tiles of 16 rows and walks the visible key blocks of BN keys with an online softmax in
// base 2 (scores prescaled by log2(e), ex2.approx), float32 running max / sum / accumulator.
// K and V tiles are double-buffered in shared memory with cp.async; rows are padded by 16 bytes
// so that ldmatrix reads are free of bank conflicts. The score fragment of Q K^T is re-used as
// the A operand of P V without going through shared memory (the m16n8 accumulator layout of
// two neighbouring n-tiles is the m16k16 A layout).
//
// Layout (contiguous): q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, D), out like q,
// lse (B, Hq, Sq) float32 natural log. GQA: query head h reads kv head h / group (no copies).
// Positions are aligned bottom-right: query i sits at key position i + (Sk - Sq).
//
// No CUDA headers: conversions, ldmatrix, cp.async and mma are inline PTX (mma_sm80.cuh); the
// local headers (masking.cuh: the visibility rules, blockmask.cuh: the CSR walk) are inlined by
// the loader, so NVRTC needs no include path. Entry points: flash_fwd_<f16|bf16>_d<D>_w<NW>_m<MT>_n<BN>_<plain|mods>;
// the loader builds one entry per module (see the end of this file).

#include "masking.cuh"
#include "blockmask.cuh"
#include "mma_sm80.cuh"
#include "mma_fwd_tile.cuh"
// flex_attention's hook (XATTN_USER_MODS, xattn/_backends/cupy_/flex_tc.py).
#include "flex_hook.cuh"
#include "fwd_score_rules.cuh"

#ifndef XATTN_KS_UNROLL
#define XATTN_KS_UNROLL 2
#endif

namespace xattn {

// The parameter block (ScoreMods) first, then this kernel's own arguments.
struct FwdArgs : ScoreMods, FwdOperands<unsigned short> {
    XattnBlockMask bm;  // read by the block-sparse (SPARSE) entries only
#ifdef XATTN_USER_MODS
    XattnUserArgs user;  // flex_attention: the arrays the user's functions read
#endif
};

template <class T, int D, int NW, int MT, int BN, bool MODS, bool SPARSE>
__device__ __forceinline__ void flash_fwd_core(const FwdArgs& a) {
    constexpr int LD = D + 8;
    constexpr int BM = NW * MT * 16;
    constexpr int NT = NW * 32;
    constexpr int KS = D / 16;   // k-steps over the head dim
    constexpr int NS = BN / 8;   // n-tiles of the score block
    constexpr int ND = D / 8;    // n-tiles of the output
    constexpr bool QREG = MT == 1 && D <= 128;  // Q fragments in registers when they are few
    constexpr int KUNROLL = QREG ? KS : XATTN_KS_UNROLL;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned short* sQ = reinterpret_cast<unsigned short*>(smem_raw);
    unsigned short* sK = sQ + BM * LD;
    unsigned short* sV = sK + 2 * BN * LD;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    // Heavy (late, causal) query blocks first: better tail balance.
    const int qblk = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int q0 = qblk * BM;
    const int q1 = min(q0 + BM, sq);
    const int hkv = a.hq / a.group;
    const long long bh = (long long)b * a.hq + h;
    const unsigned short* Qg = a.q + bh * sq * D;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;
    const unsigned short* Kg = a.k + kvh;
    const unsigned short* Vg = a.v + kvh;

    // Key range any query of this block may see under causal / window (a superset).
    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    // The key tiles to visit: [kb0, kb1) in order, or (SPARSE) the BlockMask's visible blocks
    // of this query block row, clipped to [kb0, kb1). kt = -1 ends the walk; pblk >= 0 marks a
    // tile of the pblk-th partial block (the element rule runs there only).
    XattnCsrWalk walk;
    int kt = kb1 > kb0 ? kb0 : -1, pblk = -1;
    if constexpr (SPARSE) {
        xattn_csr_begin(a.bm, q0 / a.bm.bq, BN, kb0, kb1, walk);
        xattn_csr_next(a.bm, walk, kt, pblk);
    }

    float acc[MT][ND][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < ND; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
        m[mt][0] = m[mt][1] = -XATTN_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }

    const float sl2 = MODS ? XATTN_LOG2E : a.scale * XATTN_LOG2E;
    const unsigned sQa = smem_u32(sQ), sKa = smem_u32(sK), sVa = smem_u32(sV);
    const int wrow = warp * MT * 16;  // first row of this warp inside the block
    unsigned qf[QREG ? MT : 1][QREG ? KS : 1][4];

    if (kt >= 0) {
        load_tile<BM, D, LD, NT>(sQ, Qg, q0, sq, tid);
        load_tile<BN, D, LD, NT>(sK, Kg, kt * BN, sk, tid);
        load_tile<BN, D, LD, NT>(sV, Vg, kt * BN, sk, tid);
        cp_async_commit();
    }

    // kt < 0: nothing visible (out 0, lse -inf). The loop leaves by the break below: a loop
    // test on kt there made ptxas schedule the dense loop worse (more PTX setp/or).
    if (kt >= 0)
    for (int buf = 0, first = 1;; buf ^= 1, first = 0) {
        // The prefetch follows the walk: the next visible tile, never an invisible one.
        int kt_next, pblk_next = -1;
        bool more;
        if constexpr (SPARSE) {
            xattn_csr_next(a.bm, walk, kt_next, pblk_next);
            more = kt_next >= 0;
        } else {
            kt_next = kt + 1;
            more = kt_next < kb1;
        }
        if (more) {
            load_tile<BN, D, LD, NT>(sK + (buf ^ 1) * BN * LD, Kg, kt_next * BN, sk, tid);
            load_tile<BN, D, LD, NT>(sV + (buf ^ 1) * BN * LD, Vg, kt_next * BN, sk, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        if (QREG && first) {
#pragma unroll
            for (int mt = 0; mt < (QREG ? MT : 1); ++mt)
#pragma unroll
                for (int ks = 0; ks < (QREG ? KS : 1); ++ks) {
                    int r = wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    int c = ks * 16 + (lane >> 4) * 8;
                    ldsm_x4(qf[mt][ks], sQa + (unsigned)((r * LD + c) * 2));
                }
        }

        // S = Q K^T for this warp's rows: float32 accumulators in registers.
        float s[MT][NS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
        const unsigned kbase = sKa + (unsigned)(buf * BN * LD * 2);
        // With Q read from shared memory the k-step loop indexes no register array, so it
        // need not be unrolled fully: that keeps ptxas from hoisting every ldmatrix of the
        // tile (and spilling) when two row tiles per warp already hold 128+ accumulators.
#pragma unroll KUNROLL
        for (int ks = 0; ks < KS; ++ks) {
            unsigned af[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (QREG) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) af[mt][i] = qf[QREG ? mt : 0][QREG ? ks : 0][i];
                } else {
                    int r = wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    int c = ks * 16 + (lane >> 4) * 8;
                    ldsm_x4(af[mt], sQa + (unsigned)((r * LD + c) * 2));
                }
            }
#pragma unroll
            for (int nn = 0; nn < NS / 2; ++nn) {
                unsigned bf[4];
                int r = nn * 16 + (lane & 7) + (lane >> 4) * 8;
                int c = ks * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4(bf, kbase + (unsigned)((r * LD + c) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(s[mt][2 * nn], af[mt], bf[0], bf[1], T());
                    mma(s[mt][2 * nn + 1], af[mt], bf[2], bf[3], T());
                }
            }
        }

        // Score modifications and masking, each a block-uniform branch around its own pass so
        // that the common interior tile runs none of the element tests.
        const int k0 = kt * BN;
        if constexpr (MODS) {
            XATTN_FWD_EACH_SCORE(MT, NS, s, q0 + wrow, k0, g, t4,
                                 XATTN_FWD_SCORE_MOD(a, b, h, off, sq, sk))
        }
        if (xattn_tile_needs_test(q0, q1, k0, BN, off, sk, a.causal, a.wl, a.wr)) {
            XATTN_FWD_EACH_SCORE(MT, NS, s, q0 + wrow, k0, g, t4, XATTN_FWD_EDGE(a, off, sk))
        }
        if (SPARSE && pblk >= 0) {  // a partial block of the BlockMask: its element rule
#ifndef XATTN_USER_MODS
            const int qb = q0 / a.bm.bq * a.bm.bq, kc = k0 / a.bm.bk * a.bm.bk;
#endif
            XATTN_FWD_EACH_SCORE(MT, NS, s, q0 + wrow, k0, g, t4,
                                 XATTN_FWD_BLOCK_MASK(a, pblk, qb, kc, b, h, sq, sk))
        }

        // Online softmax and accumulator rescale (mma_fwd_tile.cuh).
        float alphas[MT][2];
        const bool grew = fwd_online_softmax<MT, NS>(s, m, l, alphas, sl2, ExactWeight());
        fwd_rescale<D, MT, ND>(acc, alphas, grew);

        // O += P V. P is rounded to the input type (as the tensor cores need it); its float32
        // sum went into l above.
        const unsigned vbase = sVa + (unsigned)(buf * BN * LD * 2);
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            unsigned pf[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pf[mt][0] = pack2(s[mt][2 * j][0], s[mt][2 * j][1], T());
                pf[mt][1] = pack2(s[mt][2 * j][2], s[mt][2 * j][3], T());
                pf[mt][2] = pack2(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1], T());
                pf[mt][3] = pack2(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3], T());
            }
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                unsigned vf[4];
                int r = j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                int c = dn * 16 + (lane >> 4) * 8;
                ldsm_x4_t(vf, vbase + (unsigned)((r * LD + c) * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(acc[mt][2 * dn], pf[mt], vf[0], vf[1], T());
                    mma(acc[mt][2 * dn + 1], pf[mt], vf[2], vf[3], T());
                }
            }
        }
        __syncthreads();  // the next iteration's cp.async overwrites this buffer
        if (!more) break;
        kt = kt_next;
        pblk = pblk_next;
    }

    // Epilogue: finish the row sums across the 4 lanes of a row, normalise, write out and lse.
    unsigned short* Og = a.o + bh * sq * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float ls = l[mt][hr];
            ls += __shfl_xor_sync(0xffffffffu, ls, 1);
            ls += __shfl_xor_sync(0xffffffffu, ls, 2);
            const int qi = q0 + wrow + mt * 16 + g + hr * 8;
            const float inv = ls > 0.f ? 1.f / ls : 0.f;
            if (qi < sq) {
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    unsigned pk = pack2(acc[mt][n][hr * 2] * inv, acc[mt][n][hr * 2 + 1] * inv, T());
                    *reinterpret_cast<unsigned*>(Og + (long long)qi * D + n * 8 + t4 * 2) = pk;
                }
                if (t4 == 0 && a.lse)
                    a.lse[bh * sq + qi] = ls > 0.f ? (m[mt][hr] + __log2f(ls)) * XATTN_LN2 : -XATTN_INF;
            }
        }
    }
}

}  // namespace xattn

#define XATTN_FWD_PARAMS                                                                     \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,               \
        unsigned short *o, float *lse, int hq, int group, int sq, int sk, float scale,        \
        XATTN_SCORE_MOD_PARAMS, const int *bm_frow, const int *bm_fcol, const int *bm_prow,   \
        const int *bm_pcol, const unsigned *bm_tiles, int bm_bq, int bm_bk, int bm_words,     \
        int bm_rule, int bm_off, int bm_left, int bm_right XATTN_USER_PARAMS

#define XATTN_FWD_ARGS                                                                       \
    xattn::FwdArgs{XATTN_SCORE_MOD_INIT,                                                     \
                   xattn::FwdOperands<unsigned short>{q, k, v, o, lse, hq, group, sq, sk, scale},\
                   xattn::XattnBlockMask{bm_frow, bm_fcol, bm_prow, bm_pcol, bm_tiles, bm_bq,  \
                                         bm_bk, bm_words, bm_rule, bm_off, bm_left, bm_right}\
                   XATTN_USER_INIT}

// MN names the variant: plain | mods (score modifications), with _bm for the block-sparse walk.
// Every entry takes the block-mask arguments; the dense ones ignore them (pass nulls/zeros).
#define XATTN_FWD_ENTRY(TN, T, D, NW, MT, BN, MN, MODS, SPARSE)                              \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                    \
        flash_fwd_##TN##_d##D##_w##NW##_m##MT##_n##BN##_##MN(XATTN_FWD_PARAMS) {             \
        xattn::flash_fwd_core<xattn::T, D, NW, MT, BN, MODS, SPARSE>(XATTN_FWD_ARGS);        \
    }

// One more expansion level so that macro arguments (-D values) expand before ## pastes them.
#define XATTN_FWD_ONE(TN, D, NW, MT, BN, MN, MODS, SPARSE) \
    XATTN_FWD_ENTRY(TN, TN, D, NW, MT, BN, MN, MODS, SPARSE)

// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
#ifdef XATTN_D
XATTN_FWD_ONE(XATTN_TN, XATTN_D, XATTN_NW, XATTN_MT, XATTN_BN, XATTN_MN, XATTN_MODS,
              XATTN_SPARSE)
#endif
