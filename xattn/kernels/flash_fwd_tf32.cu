// Flash attention forward for float32 inputs on tensor cores in TF32 (opt-in: allow_tf32=True).
//
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (sm_80+): Q K^T and P V take operands
// rounded to TF32 (cvt.rna.tf32.f32: 10-bit mantissa, round to nearest, ties away from zero);
// products are accumulated in float32, and the online softmax (base 2, ex2.approx.ftz), the
// running max / sum, the output accumulator and lse stay in float32. The row sum l adds the
// TF32-rounded weights, the same values the tensor core multiplies V by, so the output is an
// exact convex combination of the rounded weights.
//
// One thread block owns BM = NW * MT * 16 query rows of one (batch, query head); each warp owns
// MT row tiles of 16 rows and walks the visible key blocks of BN keys. K and V tiles are
// double-buffered in shared memory with cp.async (16-byte, zero-filled past the sequence end).
// cvt.rna.tf32.f32 is no single SASS instruction (FSETP + IADD + LOP3 per value), so every
// element is rounded once per block, in place, by the thread whose cp.async brought it (no
// extra barrier), instead of once per warp in the fragment loops; Q is rounded once.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32), g = lane / 4,
// t = lane % 4:  A 16x8 row: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);
// B 8x8 col: b0 (k t, n g), b1 (k t+4, n g);  C 16x8: c0, c1 (g, 2t, 2t+1), c2, c3 (g+8, ...).
// ldmatrix is 16-bit only, so fragments come from shared memory in plain loads. Two choices of
// the order of the summed index make those loads wide and the P hand-over free:
//   S = Q K^T: a k-step pair covers 16 head-dim columns; lane t takes columns 4t..4t+3 of that
//     chunk (one 16-byte load per row): k-step 0 gets (4t, 4t+1) as k = (t, t+4), k-step 1 gets
//     (4t+2, 4t+3). Q and K use the same order, so the dot product is unchanged.
//   O += P V: in the C layout of the score tile n (keys 8n..8n+7) lane t holds keys 2t, 2t+1 of
//     rows g and g+8. Taking k = t <-> key 2t and k = t+4 <-> key 2t+1 makes that exactly the A
//     layout (a0 = c0, a1 = c2, a2 = c1, a3 = c3): no shuffles, no shared memory; V's B
//     fragment follows the same order (b0 = V[2t][g], b1 = V[2t+1][g]).
// Bank conflicts (32 banks of 4 bytes): a 16-byte load is served per quarter warp (8 lanes =
// rows g, g+1 x 4 lanes t), so Q and K rows are padded to D + 16 floats (row step = 16 banks:
// the two rows of a quarter fill all 32 banks); V rows are read 4 bytes at a time at row 2t or
// 2t+1, column g: padding to D + 4 floats puts lane (g, t) on bank 8t + g (+4), all distinct.
//
// Layout (contiguous): q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D), out like q (float32),
// lse (B, Hq, Sq) float32 natural log. GQA: query head h reads kv head h / group. Positions
// bottom-right: query i sits at key position i + (Sk - Sq). Options and argument list as in
// flash_fwd.cu; softcap / bias / ALiBi / mask in the `mods` variant. Rows with nothing visible
// give out 0 and lse -inf.
//
// 3xTF32 (X3, the `cupy.tf32x3` entry: float32 accuracy on tensor cores). Every operand x is
// split into hi = tf32(x) and lo = tf32(x - hi) (x - hi is exact: Sterbenz), and each product
// is taken as lo*hi' + hi*lo' + hi*hi' (lo*lo' is dropped): per product the error is about
// 2^-21 relative instead of 2^-10, below the float32 rounding of the sums (docs/numerics.rst).
// In Q K^T the small products chain into their own accumulator, added to the score once per
// key block on the CUDA cores, so that only hi*hi' chains into the score: each MMA truncates
// the sum it writes, and a score truncated 3 D / 8 times instead of D / 8 biases lse enough to
// show in the float32 backward. K, V (and Q when it is in
// shared memory) are split once per block, by the thread whose cp.async brought the chunk:
// hi replaces x in place and lo goes D floats further along the same row (rows of 2D + 16 /
// 2D + 4 floats: the same bank pattern for hi and lo); lo is 0 where hi == x, which keeps
// +-inf inputs +-inf (inf - inf would be NaN) and NaN inputs NaN. Q in registers is split
// once; the softmax weights P stay float32 (l sums them unrounded) and are split in registers
// once per key block, whose P V is summed from zero and added to the output accumulator on
// the CUDA cores (the tensor cores round their sums toward zero: over every key that bias
// would exceed float32's error). Twice the shared memory of the TF32 variant per key block,
// so the tile configurations are smaller (instances.py).
//
// flex_attention on float32 (xattn/_backends/cupy_/flex_tc.py): the same kernel with the user's
// functions inlined (XATTN_USER_MODS, as in flash_fwd.cu): score_mod on every score of a
// visited tile (after the scale, natural units), and the key tiles walked from the CSR lists
// of the block mask derived from mask_mod (SPARSE, blockmask.cuh): empty blocks are never
// loaded, full blocks run no mask, partial blocks run mask_mod per element. Those entries take
// the block-mask arguments and the user's arrays after the common ones (XATTN_TF32_BM_ENTRY);
// the dense entries keep their argument list. That code is compiled only into modules that
// build such an entry (XATTN_TF32_WALK): the dense entries' source stays exactly as it was,
// because NVVM vectorises this file's shared-memory loads differently after unrelated changes
// (a header included, a template parameter added: tools/ptx_diff.py) and their PTX must not
// move.
//
// Entry points: flash_fwd_<tf32|tf32x3>_d<D>_w<NW>_m<MT>_n<BN>_<plain|mods>[_bm]; the loader
// builds one per module (-DXATTN_TF32_D=.. etc., see the end of this file).

#if defined(XATTN_TF32_SPARSE) || defined(XATTN_USER_MODS)
#define XATTN_TF32_WALK 1
#endif

#include "masking.cuh"
#ifdef XATTN_TF32_WALK
#include "blockmask.cuh"
#endif
#include "mma_sm80.cuh"
#include "tf32.cuh"
#include "mma_fwd_tile.cuh"
#ifdef XATTN_USER_MODS
// flex_attention's hook (xattn_user_score_at / _visible); only its builds see the header.
#include "flex_hook.cuh"
#endif
#include "fwd_score_rules.cuh"

#ifndef XATTN_TF32_KS_UNROLL
#define XATTN_TF32_KS_UNROLL 2
#endif
#ifndef XATTN_TF32X3_KS_UNROLL
#define XATTN_TF32X3_KS_UNROLL 1
#endif

// The block-sparse entries without flex_attention's hook take no user arrays.
#if defined(XATTN_TF32_WALK) && !defined(XATTN_USER_PARAMS)
#define XATTN_USER_PARAMS
#define XATTN_USER_INIT
#endif

namespace xattn::tf32 {

struct Args : ScoreMods {
    const float* q;
    const float* k;
    const float* v;
    float* o;
    float* lse;
    int hq, group, sq, sk;
    float scale;         // softmax scale (natural units)
};

#ifdef XATTN_TF32_WALK
// The block-sparse entries' arguments (the dense entries' Args stay as they are).
struct BmArgs : Args {
    XattnBlockMask bm;
#ifdef XATTN_USER_MODS
    XattnUserArgs user;  // flex_attention: the arrays the user's functions read
#endif
};
#endif

// Round to TF32, in place, the chunks of a tile that this thread's load_tile copied: after
// cp.async.wait_group they are visible to this thread; the caller's barrier publishes them.
template <int ROWS, int D, int LD, int NT>
__device__ __forceinline__ void round_tile(float* s, int tid) {
    constexpr int CPR = D / 4;
    constexpr int TOTAL = ROWS * CPR;
#pragma unroll
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int i = it * NT + tid;
        if (TOTAL % NT != 0 && i >= TOTAL) break;
        const int r = i / CPR, c = i % CPR;
        float4* p = reinterpret_cast<float4*>(s + r * LD + c * 4);
        float4 x = *p;
        x.x = __uint_as_float(to_tf32(x.x));
        x.y = __uint_as_float(to_tf32(x.y));
        x.z = __uint_as_float(to_tf32(x.z));
        x.w = __uint_as_float(to_tf32(x.w));
        *p = x;
    }
}

// The softmax weights rounded to TF32 (what the tensor core multiplies V by).
struct Tf32Weight {
    __device__ __forceinline__ float operator()(float p) const {
        return __uint_as_float(to_tf32(p));
    }
};

#ifdef XATTN_TF32_WALK
template <int D, int NW, int MT, int BN, bool MODS, bool X3, bool SPARSE, class A>
__device__ __forceinline__ void flash_fwd_tf32_core(const A& a) {
#else
template <int D, int NW, int MT, int BN, bool MODS, bool X3>
__device__ __forceinline__ void flash_fwd_tf32_core(const Args& a) {
#endif
    // Q and K rows (16-byte loads, see the header); V rows (4-byte loads). X3: hi then lo.
    constexpr int LDK = X3 ? 2 * D + 16 : D + 16;
    constexpr int LDV = X3 ? 2 * D + 4 : D + 4;
    constexpr int BM = NW * MT * 16;
    constexpr int NT = NW * 32;
    constexpr int KC = D / 16;  // 16-column chunks of the head dim: two k-steps each
    constexpr int NS = BN / 8;  // n-tiles of the score block = k-steps of P V
    constexpr int ND = D / 8;   // n-tiles of the output
    // Q fragments live in registers (TF32-rounded or split once, loaded straight from global
    // memory) when they are few; otherwise Q stays in shared memory and is re-read per key
    // block. X3 holds two registers per element (hi, lo), so half as many fit.
    constexpr bool QREG = MT * D <= (X3 ? 64 : 128);
    constexpr int KUNROLL = QREG ? KC : (X3 ? XATTN_TF32X3_KS_UNROLL : XATTN_TF32_KS_UNROLL);

    extern __shared__ __align__(16) float smem_f[];
    float* sK = smem_f;
    float* sV = sK + 2 * BN * LDK;
    float* sQ = sV + 2 * BN * LDV;  // used only without QREG

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
    const float* Qg = a.q + bh * sq * D;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;
    const float* Kg = a.k + kvh;
    const float* Vg = a.v + kvh;
    const int wrow = warp * MT * 16;  // first row of this warp inside the block

    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
#ifdef XATTN_TF32_WALK
    // SPARSE: the key tiles are the block mask's visible ones of this query block row,
    // clipped to [kb0, kb1), in its order (kb = -1 ends the walk); pblk >= 0 marks a tile of
    // the pblk-th partial block, the only tiles that run the element rule.
    // Without SPARSE the walk is [kb0, kb1).
    XattnCsrWalk walk;
    int kfirst = kb1 > kb0 ? kb0 : -1, pblk = -1;
    if constexpr (SPARSE) {
        xattn_csr_begin(a.bm, q0 / a.bm.bq, BN, kb0, kb1, walk);
        xattn_csr_next(a.bm, walk, kfirst, pblk);
    }
#endif

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

    // qf[mt][c][0..3]: columns 16c + 4t .. 16c + 4t + 3 of row g; [4..7]: the same of row g + 8.
    // ql: their lo parts (X3).
    unsigned qf[QREG ? MT : 1][QREG ? KC : 1][8];
    unsigned ql[QREG && X3 ? MT : 1][QREG && X3 ? KC : 1][8];
    if constexpr (QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int qi = q0 + wrow + mt * 16 + g + hr * 8;
#pragma unroll
                for (int c = 0; c < KC; ++c) {
                    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
                    if (qi < sq && kb1 > kb0)
                        x = *reinterpret_cast<const float4*>(Qg + (long long)qi * D + c * 16 +
                                                             t4 * 4);
                    if constexpr (X3) {
                        split_tf32(x.x, qf[mt][c][hr * 4 + 0], ql[mt][c][hr * 4 + 0]);
                        split_tf32(x.y, qf[mt][c][hr * 4 + 1], ql[mt][c][hr * 4 + 1]);
                        split_tf32(x.z, qf[mt][c][hr * 4 + 2], ql[mt][c][hr * 4 + 2]);
                        split_tf32(x.w, qf[mt][c][hr * 4 + 3], ql[mt][c][hr * 4 + 3]);
                    } else {
                        qf[mt][c][hr * 4 + 0] = to_tf32(x.x);
                        qf[mt][c][hr * 4 + 1] = to_tf32(x.y);
                        qf[mt][c][hr * 4 + 2] = to_tf32(x.z);
                        qf[mt][c][hr * 4 + 3] = to_tf32(x.w);
                    }
                }
            }
    }

#ifdef XATTN_TF32_WALK
    if (kfirst >= 0) {
        if constexpr (!QREG) load_tile<BM, D, LDK, NT>(sQ, Qg, q0, sq, tid);
        load_tile<BN, D, LDK, NT>(sK, Kg, kfirst * BN, sk, tid);
        load_tile<BN, D, LDV, NT>(sV, Vg, kfirst * BN, sk, tid);
        cp_async_commit();
    }

    // it counts the visited tiles (the buffer parity); a walk visits a tile at most once, so
    // kb == kfirst marks the first.
    for (int kb = kfirst, it = 0; kb >= 0; ++it) {
        const int buf = it & 1;
        // The next tile (kn = -1 after the last): SPARSE's prefetch follows the walk, never
        // loading an invisible tile.
        int kn = kb + 1 < kb1 ? kb + 1 : -1, pn = -1;
        if constexpr (SPARSE) xattn_csr_next(a.bm, walk, kn, pn);
        if (kn >= 0) {
            load_tile<BN, D, LDK, NT>(sK + (buf ^ 1) * BN * LDK, Kg, kn * BN, sk, tid);
            load_tile<BN, D, LDV, NT>(sV + (buf ^ 1) * BN * LDV, Vg, kn * BN, sk, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
#else
    const int kfirst = kb0;  // the first key tile (the dense walk)
    if (kb1 > kb0) {
        if constexpr (!QREG) load_tile<BM, D, LDK, NT>(sQ, Qg, q0, sq, tid);
        load_tile<BN, D, LDK, NT>(sK, Kg, kb0 * BN, sk, tid);
        load_tile<BN, D, LDV, NT>(sV, Vg, kb0 * BN, sk, tid);
        cp_async_commit();
    }

    for (int kb = kb0; kb < kb1; ++kb) {
        const int buf = (kb - kb0) & 1;
        if (kb + 1 < kb1) {
            load_tile<BN, D, LDK, NT>(sK + (buf ^ 1) * BN * LDK, Kg, (kb + 1) * BN, sk, tid);
            load_tile<BN, D, LDV, NT>(sV + (buf ^ 1) * BN * LDV, Vg, (kb + 1) * BN, sk, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
#endif
        if constexpr (X3) {
            if constexpr (!QREG) {
                if (kb == kfirst) split_tile<BM, D, LDK, NT>(sQ, tid);
            }
            split_tile<BN, D, LDK, NT>(sK + buf * BN * LDK, tid);
            split_tile<BN, D, LDV, NT>(sV + buf * BN * LDV, tid);
        } else {
            if constexpr (!QREG) {
                if (kb == kfirst) round_tile<BM, D, LDK, NT>(sQ, tid);
            }
            round_tile<BN, D, LDK, NT>(sK + buf * BN * LDK, tid);
            round_tile<BN, D, LDV, NT>(sV + buf * BN * LDV, tid);
        }
        __syncthreads();

        // S = Q K^T for this warp's rows, float32 accumulators in registers.
        float s[MT][NS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
        float st[X3 ? MT : 1][X3 ? NS : 1][4];  // small products (X3)
        if constexpr (X3) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NS; ++n)
                    st[mt][n][0] = st[mt][n][1] = st[mt][n][2] = st[mt][n][3] = 0.f;
        }
        const float* Kb = sK + buf * BN * LDK;
        // With Q read from shared memory the chunk loop indexes no register array, so it need
        // not be unrolled fully (that keeps ptxas from hoisting every load of the tile).
#pragma unroll KUNROLL
        for (int c = 0; c < KC; ++c) {
            unsigned af[MT][8];
            unsigned al[X3 ? MT : 1][8];  // lo parts (X3)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (QREG) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) af[mt][i] = qf[QREG ? mt : 0][QREG ? c : 0][i];
                    if constexpr (X3) {
#pragma unroll
                        for (int i = 0; i < 8; ++i)
                            al[X3 ? mt : 0][i] = ql[QREG && X3 ? mt : 0][QREG && X3 ? c : 0][i];
                    }
                } else {
#pragma unroll
                    for (int hr = 0; hr < 2; ++hr) {
                        const float* row = sQ + (wrow + mt * 16 + g + hr * 8) * LDK + c * 16 +
                                           t4 * 4;
                        const float4 x = *reinterpret_cast<const float4*>(row);
                        af[mt][hr * 4 + 0] = __float_as_uint(x.x);
                        af[mt][hr * 4 + 1] = __float_as_uint(x.y);
                        af[mt][hr * 4 + 2] = __float_as_uint(x.z);
                        af[mt][hr * 4 + 3] = __float_as_uint(x.w);
                        if constexpr (X3) {
                            const uint4 y = *reinterpret_cast<const uint4*>(row + D);
                            al[X3 ? mt : 0][hr * 4 + 0] = y.x;
                            al[X3 ? mt : 0][hr * 4 + 1] = y.y;
                            al[X3 ? mt : 0][hr * 4 + 2] = y.z;
                            al[X3 ? mt : 0][hr * 4 + 3] = y.w;
                        }
                    }
                }
            }
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                const float* row = Kb + (n * 8 + g) * LDK + c * 16 + t4 * 4;
                const float4 x = *reinterpret_cast<const float4*>(row);
                const unsigned k0 = __float_as_uint(x.x), k1 = __float_as_uint(x.y),
                               k2 = __float_as_uint(x.z), k3 = __float_as_uint(x.w);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    // k-step 0: columns (4t, 4t+1) as k = (t, t+4); k-step 1: (4t+2, 4t+3).
                    if constexpr (X3) {
                        // hi*hi' chains into s; the two small products chain into their own
                        // accumulator (t, about 2^-10 of s), added to s once after the last
                        // chunk: the tensor cores truncate each sum they write, so chaining
                        // all three into s truncates 3 D / 8 times per score, this D / 8.
                        const uint4 kl = *reinterpret_cast<const uint4*>(row + D);
                        const unsigned* h = af[mt];
                        const unsigned* l = al[X3 ? mt : 0];
                        float(&tt)[4] = st[X3 ? mt : 0][X3 ? n : 0];
                        mma_tf32(tt, l[0], l[4], l[1], l[5], k0, k1);
                        mma_tf32(tt, h[0], h[4], h[1], h[5], kl.x, kl.y);
                        mma_tf32(tt, l[2], l[6], l[3], l[7], k2, k3);
                        mma_tf32(tt, h[2], h[6], h[3], h[7], kl.z, kl.w);
                        mma_tf32(s[mt][n], h[0], h[4], h[1], h[5], k0, k1);
                        mma_tf32(s[mt][n], h[2], h[6], h[3], h[7], k2, k3);
                    } else {
                        mma_tf32(s[mt][n], af[mt][0], af[mt][4], af[mt][1], af[mt][5], k0, k1);
                        mma_tf32(s[mt][n], af[mt][2], af[mt][6], af[mt][3], af[mt][7], k2, k3);
                    }
                }
            }
        }

        if constexpr (X3) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][n][e] += st[mt][n][e];
        }

        // Score modifications and masking, each a block-uniform branch around its own pass so
        // that the common interior tile runs none of the element tests.
        const int k0 = kb * BN;
        if constexpr (MODS) {
            XATTN_FWD_EACH_SCORE(MT, NS, s, q0 + wrow, k0, g, t4,
                                 XATTN_FWD_SCORE_MOD(a, b, h, off, sq, sk))
        }
        if (xattn_tile_needs_test(q0, q1, k0, BN, off, sk, a.causal, a.wl, a.wr)) {
            XATTN_FWD_EACH_SCORE(MT, NS, s, q0 + wrow, k0, g, t4, XATTN_FWD_EDGE(a, off, sk))
        }
#ifdef XATTN_TF32_WALK
        // A partial block of the block mask: its element rule (a block-uniform branch).
        if constexpr (SPARSE) {
            if (pblk >= 0) {
#ifndef XATTN_USER_MODS
                const int qb = q0 / a.bm.bq * a.bm.bq, kc = k0 / a.bm.bk * a.bm.bk;
#endif
                XATTN_FWD_EACH_SCORE(MT, NS, s, q0 + wrow, k0, g, t4,
                                     XATTN_FWD_BLOCK_MASK(a, pblk, qb, kc, b, h, sq, sk))
            }
        }
#endif

        // Online softmax and accumulator rescale (mma_fwd_tile.cuh). TF32 rounds the weights
        // here, once: the row sum and P V then see the same values. X3 keeps them float32
        // (split per k-step of P V below).
        float alphas[MT][2];
        bool grew;
        if constexpr (X3)
            grew = fwd_online_softmax<MT, NS>(s, m, l, alphas, sl2, ExactWeight());
        else
            grew = fwd_online_softmax<MT, NS>(s, m, l, alphas, sl2, Tf32Weight());
        fwd_rescale<D, MT, ND>(acc, alphas, grew);

        // O += P V: k-step j covers keys 8j..8j+7 with k = t <-> key 2t, k = t+4 <-> key 2t+1.
        // The A fragment is (c0, c2, c1, c3) of score tile j.
        const float* Vb = sV + buf * BN * LDV;
        if constexpr (X3) {
            // P split once (finite, or NaN from NaN inputs: no inf guard). Each output tile dn
            // sums this key block's P V in ob and adds it to acc on the CUDA cores: the tensor
            // cores round their float32 sums toward zero, a bias that three MMAs per k-step
            // over every key would pile up in acc (about 1e-7 relative per MMA: 1e-4 over
            // S = 4096, ten times the float32 budget); per key block it stays at 3 BN / 8.
            unsigned ph[MT][NS][4], pl[MT][NS][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < NS; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float p = s[mt][j][(i & 1) * 2 + (i >> 1)];
                        ph[mt][j][i] = to_tf32(p);
                        pl[mt][j][i] = to_tf32(p - __uint_as_float(ph[mt][j][i]));
                    }
#pragma unroll
            for (int dn = 0; dn < ND; ++dn) {
                float ob[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    ob[mt][0] = ob[mt][1] = ob[mt][2] = ob[mt][3] = 0.f;
#pragma unroll
                for (int j = 0; j < NS; ++j) {
                    const float* v0 = Vb + (j * 8 + t4 * 2) * LDV + g + dn * 8;
                    const unsigned b0 = __float_as_uint(v0[0]), b1 = __float_as_uint(v0[LDV]);
                    const unsigned c0 = __float_as_uint(v0[D]);
                    const unsigned c1 = __float_as_uint(v0[LDV + D]);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        mma3_tf32(ob[mt], ph[mt][j], pl[mt][j], b0, b1, c0, c1);
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][dn][e] += ob[mt][e];
            }
        } else {
#pragma unroll
            for (int j = 0; j < NS; ++j) {
                const float* v0 = Vb + (j * 8 + t4 * 2) * LDV + g;
#pragma unroll
                for (int dn = 0; dn < ND; ++dn) {
                    const unsigned b0 = __float_as_uint(v0[dn * 8]);
                    const unsigned b1 = __float_as_uint(v0[LDV + dn * 8]);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        mma_tf32(acc[mt][dn], __float_as_uint(s[mt][j][0]),
                            __float_as_uint(s[mt][j][2]), __float_as_uint(s[mt][j][1]),
                            __float_as_uint(s[mt][j][3]), b0, b1);
                }
            }
        }
        __syncthreads();  // the next iteration's cp.async overwrites this buffer
#ifdef XATTN_TF32_WALK
        if constexpr (SPARSE) pblk = pn;
        kb = kn;
#endif
    }

    // Epilogue: finish the row sums across the 4 lanes of a row, normalise, write out and lse.
    float* Og = a.o + bh * sq * D;
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
                for (int n = 0; n < ND; ++n)
                    *reinterpret_cast<float2*>(Og + (long long)qi * D + n * 8 + t4 * 2) =
                        make_float2(acc[mt][n][hr * 2] * inv, acc[mt][n][hr * 2 + 1] * inv);
                if (t4 == 0 && a.lse)
                    a.lse[bh * sq + qi] =
                        ls > 0.f ? (m[mt][hr] + __log2f(ls)) * XATTN_LN2 : -XATTN_INF;
            }
        }
    }
}

}  // namespace xattn::tf32

// TN names the precision: tf32 (X3 false) or tf32x3 (X3 true).
#define XATTN_TF32_ENTRY(TN, D, NW, MT, BN, MN, MODS, X3)                                    \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                    \
        flash_fwd_##TN##_d##D##_w##NW##_m##MT##_n##BN##_##MN(                                \
            const float *q, const float *k, const float *v, float *o, float *lse, int hq,    \
            int group, int sq, int sk, float scale, XATTN_SCORE_MOD_PARAMS) {                \
        xattn::tf32::flash_fwd_tf32_core<D, NW, MT, BN, MODS, X3>(xattn::tf32::Args{         \
            XATTN_SCORE_MOD_INIT, q, k, v, o, lse, hq, group, sq, sk, scale});               \
    }

#ifdef XATTN_TF32_WALK
// The block-sparse entries (MN ends in _bm, or flex's own names): the common arguments, then
// the block mask's (null / zero for a dense walk) and, in flex modules, the user's arrays.
#define XATTN_TF32_BM_ENTRY(TN, D, NW, MT, BN, MN, MODS, X3, SPARSE)                          \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                    \
        flash_fwd_##TN##_d##D##_w##NW##_m##MT##_n##BN##_##MN(                                \
            const float *q, const float *k, const float *v, float *o, float *lse, int hq,    \
            int group, int sq, int sk, float scale, XATTN_SCORE_MOD_PARAMS,                  \
            const int *bm_frow, const int *bm_fcol, const int *bm_prow, const int *bm_pcol,  \
            const unsigned *bm_tiles, int bm_bq, int bm_bk, int bm_words, int bm_rule,       \
            int bm_off, int bm_left, int bm_right XATTN_USER_PARAMS) {                       \
        xattn::tf32::flash_fwd_tf32_core<D, NW, MT, BN, MODS, X3, SPARSE>(                   \
            xattn::tf32::BmArgs{                                                             \
                xattn::tf32::Args{XATTN_SCORE_MOD_INIT, q, k, v, o, lse, hq, group, sq, sk,  \
                                  scale},                                                    \
                xattn::XattnBlockMask{bm_frow, bm_fcol, bm_prow, bm_pcol, bm_tiles, bm_bq,   \
                                      bm_bk, bm_words, bm_rule, bm_off, bm_left, bm_right}   \
                XATTN_USER_INIT});                                                           \
    }
#endif

// One more expansion level so that macro arguments (-D values) expand before ## pastes them.
#define XATTN_TF32_ONE(TN, D, NW, MT, BN, MN, MODS, X3) \
    XATTN_TF32_ENTRY(TN, D, NW, MT, BN, MN, MODS, X3)
#ifdef XATTN_TF32_WALK
#define XATTN_TF32_BM_ONE(TN, D, NW, MT, BN, MN, MODS, X3, SPARSE) \
    XATTN_TF32_BM_ENTRY(TN, D, NW, MT, BN, MN, MODS, X3, SPARSE)
#endif
// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
#if defined(XATTN_TF32_D) && defined(XATTN_TF32_SPARSE)
XATTN_TF32_BM_ONE(XATTN_TF32_TN, XATTN_TF32_D, XATTN_TF32_NW, XATTN_TF32_MT, XATTN_TF32_BN,
                  XATTN_TF32_MN, XATTN_TF32_MODS, XATTN_TF32_X3, XATTN_TF32_SPARSE)
#elif defined(XATTN_TF32_D)
XATTN_TF32_ONE(XATTN_TF32_TN, XATTN_TF32_D, XATTN_TF32_NW, XATTN_TF32_MT, XATTN_TF32_BN,
               XATTN_TF32_MN, XATTN_TF32_MODS, XATTN_TF32_X3)
#endif
