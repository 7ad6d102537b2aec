// Flash attention forward for float32 on the CUDA cores (SIMT), any sm_80+ device.
//
// One block of 128 threads owns BM = 32 query rows of one (batch, query head); four lanes share
// a row (lane quad c = 0..3). Per key block of BN = 32 keys, staged in shared memory:
//   S:  lane c computes the 8 scores of keys c, c+4, ..., c+28 (float4 reads of q and k rows,
//       rows padded by 4 floats so that the 8 rows of a warp fall on distinct banks);
//   softmax: online, base 2 (ex2.approx.ftz), float32 running max/sum, the quad reduces with
//       two shuffles;
//   O:  P goes through shared memory; lane c accumulates the float4 column groups c, c+4, ...
//       of its row (a warp reads 16 consecutive floats of a v row: no bank conflicts).
// Same options and conventions as flash_fwd.cu (bottom-right causal, window, GQA, softcap,
// bias, ALiBi, mask, lse in natural log; rows with nothing visible give 0 and -inf).
// Layout (contiguous): q (B, Hq, Sq, D), k, v (B, Hkv, Sk, D), out like q, lse (B, Hq, Sq).

#include "common.cuh"
#include "masking.cuh"
#include "blockmask.cuh"

namespace xattn::simt {

constexpr int BM = 32;
constexpr int BN = 32;
constexpr int NT = 128;

struct Args : ScoreMods, FwdOperands<float> {
    XattnBlockMask bm;  // read by the block-sparse (SPARSE) entries only
};

// rows x D floats from global (row stride D) to shared (row stride LD), zeros past `limit`.
template <int D, int LD, int ROWS>
__device__ __forceinline__ void load_rows(float* s, const float* g, int row0, int limit,
                                          int tid) {
    constexpr int V4 = D / 4;
    constexpr int TOTAL = ROWS * V4;
#pragma unroll
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int i = it * NT + tid;
        if (TOTAL % NT != 0 && i >= TOTAL) break;
        const int r = i / V4, c = i % V4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + r < limit)
            x = *reinterpret_cast<const float4*>(g + (long long)(row0 + r) * D + c * 4);
        *reinterpret_cast<float4*>(s + r * LD + c * 4) = x;
    }
}

template <int D, bool SPARSE>
__device__ __forceinline__ void flash_fwd_simt_core(const Args& a) {
    constexpr int LDQ = D + 4;       // q, k rows: float4-aligned, 4-bank shift per row
    constexpr int LDP = BN + 1;      // p rows
    constexpr int G = D / 16;        // float4 column groups per lane

    extern __shared__ __align__(16) float smem_f[];
    float* sQ = smem_f;
    float* sK = sQ + BM * LDQ;
    float* sV = sK + BN * LDQ;
    float* sP = sV + BN * D;

    const int tid = threadIdx.x;
    const int r = tid >> 2, c = tid & 3;
    const int qblk = gridDim.x - 1 - blockIdx.x;  // heavy causal blocks first
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int q0 = qblk * BM, q1 = min(q0 + BM, sq);
    const int hkv = a.hq / a.group;
    const long long bh = (long long)b * a.hq + h;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;
    const float* Kg = a.k + kvh;
    const float* Vg = a.v + kvh;
    const int qi = q0 + r;

    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    // Key tiles to visit: [kb0, kb1), or (SPARSE) the BlockMask's visible blocks of this query
    // block row clipped to it; kt = -1 ends the walk, pblk >= 0 marks a partial block.
    XattnCsrWalk walk;
    int kt = kb1 > kb0 ? kb0 : -1, pblk = -1;
    if constexpr (SPARSE) {
        xattn_csr_begin(a.bm, q0 / a.bm.bq, BN, kb0, kb1, walk);
        xattn_csr_next(a.bm, walk, kt, pblk);
    }
    const int qb = SPARSE ? q0 / a.bm.bq * a.bm.bq : 0;

    load_rows<D, LDQ, BM>(sQ, a.q + bh * sq * D, q0, sq, tid);

    float4 acc[G];
#pragma unroll
    for (int t = 0; t < G; ++t) acc[t] = make_float4(0.f, 0.f, 0.f, 0.f);
    float m = -XATTN_INF, l = 0.f;
    const float slope = a.alibi ? a.alibi[b * a.alibi_bs + h] : 0.f;

    while (kt >= 0) {
        const int k0 = kt * BN;
        __syncthreads();  // the previous block's k, v, p are no longer read
        load_rows<D, LDQ, BN>(sK, Kg, k0, sk, tid);
        load_rows<D, D, BN>(sV, Vg, k0, sk, tid);
        __syncthreads();

        float s[8];
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) s[jj] = 0.f;
#pragma unroll 4
        for (int d = 0; d < D; d += 4) {
            const float4 qv = *reinterpret_cast<const float4*>(sQ + r * LDQ + d);
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
                const float4 kv = *reinterpret_cast<const float4*>(sK + (c + 4 * jj) * LDQ + d);
                s[jj] = fmaf(qv.x, kv.x, s[jj]);
                s[jj] = fmaf(qv.y, kv.y, s[jj]);
                s[jj] = fmaf(qv.z, kv.z, s[jj]);
                s[jj] = fmaf(qv.w, kv.w, s[jj]);
            }
        }

        float mx = -XATTN_INF;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
            const int kj = k0 + c + 4 * jj;
            // xattn_score_mod's rules, with the ALiBi slope read once per block (above): the
            // shared rule re-reads it per element, which costs this kernel 15 global loads.
            float x = s[jj] * a.scale;
            if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);
            const bool inside = qi < sq && kj < sk;
            if (a.bias && inside)
                x += a.bias[b * a.bias_bs + h * a.bias_hs + qi * a.bias_qs + kj * a.bias_ks];
            if (a.alibi) x -= slope * fabsf((float)(qi + off - kj));
            if (a.mask && inside &&
                !a.mask[b * a.mask_bs + h * a.mask_hs + qi * a.mask_qs + kj * a.mask_ks])
                x = -XATTN_INF;
            bool vis = xattn_visible(qi, kj, off, sk, a.causal, a.wl, a.wr);
            if (SPARSE && pblk >= 0)
                vis = vis && xattn_bm_visible(a.bm, pblk, qb, k0 / a.bm.bk * a.bm.bk, qi, kj);
            s[jj] = vis ? x * XATTN_LOG2E : -XATTN_INF;
            mx = fmaxf(mx, s[jj]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m, mx);
        const float m_use = m_new == -XATTN_INF ? 0.f : m_new;
        const float alpha = ex2(m - m_use);
        m = m_new;
        float rs = 0.f;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
            const float p = ex2(s[jj] - m_use);
            rs += p;
            sP[r * LDP + c + 4 * jj] = p;
        }
        l = l * alpha + rs;
#pragma unroll
        for (int t = 0; t < G; ++t) {
            acc[t].x *= alpha;
            acc[t].y *= alpha;
            acc[t].z *= alpha;
            acc[t].w *= alpha;
        }
        __syncwarp();  // the quad's p values of this row are in shared memory

#pragma unroll 4
        for (int j = 0; j < BN; ++j) {
            const float p = sP[r * LDP + j];
#pragma unroll
            for (int t = 0; t < G; ++t) {
                const float4 vv = *reinterpret_cast<const float4*>(sV + j * D + (c + 4 * t) * 4);
                acc[t].x = fmaf(p, vv.x, acc[t].x);
                acc[t].y = fmaf(p, vv.y, acc[t].y);
                acc[t].z = fmaf(p, vv.z, acc[t].z);
                acc[t].w = fmaf(p, vv.w, acc[t].w);
            }
        }
        if constexpr (SPARSE) {
            xattn_csr_next(a.bm, walk, kt, pblk);
        } else {
            kt = kt + 1 < kb1 ? kt + 1 : -1;
        }
    }

    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (qi < sq) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        float* Og = a.o + (bh * sq + qi) * D;
#pragma unroll
        for (int t = 0; t < G; ++t) {
            float4 y = acc[t];
            y.x *= inv;
            y.y *= inv;
            y.z *= inv;
            y.w *= inv;
            *reinterpret_cast<float4*>(Og + (c + 4 * t) * 4) = y;
        }
        if (c == 0 && a.lse) a.lse[bh * sq + qi] = l > 0.f ? (m + __log2f(l)) * XATTN_LN2 : -XATTN_INF;
    }
}

}  // namespace xattn::simt

// Every entry takes the block-mask arguments; the dense ones ignore them (nulls/zeros).
#define XATTN_SIMT_ENTRY(D, NAME, SPARSE)                                                    \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                  \
        const float *q, const float *k, const float *v, float *o, float *lse, int hq,        \
        int group, int sq, int sk, float scale, XATTN_SCORE_MOD_PARAMS, const int *bm_frow,  \
        const int *bm_fcol, const int *bm_prow, const int *bm_pcol,      \
        const unsigned *bm_tiles, int bm_bq, int bm_bk, int bm_words, int bm_rule,           \
        int bm_off, int bm_left, int bm_right) {                                             \
        xattn::simt::flash_fwd_simt_core<D, SPARSE>(xattn::simt::Args{                       \
            XATTN_SCORE_MOD_INIT,                                                            \
            xattn::FwdOperands<float>{q, k, v, o, lse, hq, group, sq, sk, scale},             \
            xattn::XattnBlockMask{bm_frow, bm_fcol, bm_prow, bm_pcol, bm_tiles, bm_bq, bm_bk, \
                                  bm_words, bm_rule, bm_off, bm_left, bm_right}});           \
    }
#define XATTN_SIMT_BOTH(D)                                    \
    XATTN_SIMT_ENTRY(D, flash_fwd_f32_simt_d##D, false)       \
    XATTN_SIMT_ENTRY(D, flash_fwd_f32_simt_d##D##_bm, true)
#define XATTN_SIMT_ONE(D) XATTN_SIMT_BOTH(D)

// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
#ifdef XATTN_SIMT_D
XATTN_SIMT_ONE(XATTN_SIMT_D)
#endif
