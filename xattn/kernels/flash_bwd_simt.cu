// Flash attention backward for float32 on the CUDA cores (SIMT), any sm_80+ device.
//
// The scheme of flash_bwd.cu without tensor cores: one block of 128 threads owns BN = 32 keys
// of one (batch, kv head) with K and V in shared memory, and walks the query heads of its GQA
// group and the query blocks of BM = 32 rows that may see its keys. Per query block:
//   S^T, dP^T: thread t computes the 8 pairs (key t / 4, queries t % 4 + 4 i) from shared
//       memory (rows padded by one float: the 8 key rows a warp reads fall on distinct banks);
//   P^T = exp2(S^T log2e - lse log2e), dS^T = P^T (dP^T - delta) [* (1 - tanh^2)], both to
//       shared memory;
//   dV += P^T dO, dK += dS^T Q: thread t owns key t / 4 and columns t % 4 + 4 j in registers;
//   dQ += dS K: thread t computes query t / 4, columns t % 4 + 4 j and adds them to the float32
//       dq_accum with atomics (the launcher scales it by `scale`).
// Same options and conventions as flash_fwd.cu. Layout (contiguous): q, dout (B, Hq, Sq, D);
// k, v, dk, dv (B, Hkv, Sk, D); lse, delta (B, Hq, Sq); dq_accum (B, Hq, Sq, D).

#include "common.cuh"
#include "masking.cuh"

namespace xattn::bwd_simt {

constexpr int BM = 32;
constexpr int BN = 32;
constexpr int NT = 128;

struct Args : ScoreMods {
    const float* q;
    const float* k;
    const float* v;
    const float* dout;
    const float* lse;
    const float* delta;
    float* dq_accum;
    float* dk;
    float* dv;
    int hq, group, sq, sk;
    float scale;
};

// Rows [row0, row0 + ROWS) of a (rows x D) matrix into shared memory (row stride D + 1);
// rows at or past `limit` become zeros.
template <int ROWS, int D>
__device__ __forceinline__ void load_rows(float* s, const float* g, int row0, int limit) {
    for (int i = threadIdx.x; i < ROWS * D; i += NT) {
        const int r = i / D, c = i % D;
        s[r * (D + 1) + c] = row0 + r < limit ? g[(long long)(row0 + r) * D + c] : 0.f;
    }
}

template <int D, bool MODS>
__device__ __forceinline__ void core(const Args& a) {
    constexpr int LD = D + 1;
    constexpr int LP = BM + 1;
    constexpr int NJ = D / 4;  // columns per thread
    extern __shared__ float smem[];
    float* sK = smem;
    float* sV = sK + BN * LD;
    float* sQ = sV + BN * LD;
    float* sO = sQ + BM * LD;
    float* sP = sO + BM * LD;   // P^T (BN x BM)
    float* sS = sP + BN * LP;   // dS^T (BN x BM)
    float* sL = sS + BN * LP;   // lse * log2(e), +inf for rows without keys or past Sq
    float* sD = sL + BM;        // delta

    const int tid = threadIdx.x;
    const int kr = tid >> 2, c4 = tid & 3;  // key row (or query row for dQ), column phase
    const int hk = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int hkv = a.hq / a.group;
    const int k0 = blockIdx.x * BN;
    const int k1 = min(k0 + BN, sk);
    const long long kvh = ((long long)b * hkv + hk) * sk * D;
    int qb0, qb1;
    xattn_query_blocks(k0, k1, off, sq, a.causal, a.wl, a.wr, BM, qb0, qb1);
    const int nq = qb1 - qb0;
    const int total = nq * a.group;
    const float sl2 = MODS ? XATTN_LOG2E : a.scale * XATTN_LOG2E;

    float dk[NJ], dv[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) dk[j] = dv[j] = 0.f;

    if (total > 0) {
        load_rows<BN, D>(sK, a.k + kvh, k0, sk);
        load_rows<BN, D>(sV, a.v + kvh, k0, sk);
    }

    for (int it = 0; it < total; ++it) {
        const int h = hk * a.group + it / nq;
        const int q0 = (qb0 + it % nq) * BM;
        const int q1 = min(q0 + BM, sq);
        const long long bh = (long long)b * a.hq + h;
        __syncthreads();  // the previous step is done with sQ, sO, sP, sS
        load_rows<BM, D>(sQ, a.q + bh * sq * D, q0, sq);
        load_rows<BM, D>(sO, a.dout + bh * sq * D, q0, sq);
        for (int i = tid; i < BM; i += NT) {
            const int qi = q0 + i;
            float l, dl;
            xattn_bwd_row(a.lse, a.delta, bh * sq + qi, qi < sq, l, dl);
            sL[i] = l;
            sD[i] = dl;
        }
        __syncthreads();

        float s[8], dp[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = dp[i] = 0.f;
        for (int d = 0; d < D; ++d) {
            const float kv = sK[kr * LD + d], vv = sV[kr * LD + d];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int ql = c4 + 4 * i;
                s[i] = fmaf(kv, sQ[ql * LD + d], s[i]);
                dp[i] = fmaf(vv, sO[ql * LD + d], dp[i]);
            }
        }
        const bool edge = xattn_tile_needs_test(q0, q1, k0, BN, off, sk, a.causal, a.wl, a.wr);
        const int kj = k0 + kr;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int ql = c4 + 4 * i;
            const int qi = q0 + ql;
            float x = s[i], dcap = 1.f;
            if constexpr (MODS) x = xattn_score_mod(a, x * a.scale, b, h, qi, kj, off, sq, sk, dcap);
            if (edge && !xattn_visible(qi, kj, off, sk, a.causal, a.wl, a.wr)) x = -XATTN_INF;
            const float p = ex2(fmaf(x, sl2, -sL[ql]));
            sP[kr * LP + ql] = p;
            sS[kr * LP + ql] = p * (dp[i] - sD[ql]) * dcap;
        }
        __syncthreads();

        // dV and dK of key kr, columns c4 + 4 j.
        for (int ql = 0; ql < BM; ++ql) {
            const float p = sP[kr * LP + ql], ds = sS[kr * LP + ql];
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                dv[j] = fmaf(p, sO[ql * LD + c4 + 4 * j], dv[j]);
                dk[j] = fmaf(ds, sQ[ql * LD + c4 + 4 * j], dk[j]);
            }
        }
        // dQ of query kr (same thread mapping, rows are queries now), columns c4 + 4 j.
        const int qi = q0 + kr;
        if (qi < sq) {
            float* row = a.dq_accum + (bh * sq + qi) * D;
#pragma unroll 4
            for (int j = 0; j < NJ; ++j) {
                float acc = 0.f;
                for (int kl = 0; kl < BN; ++kl)
                    acc = fmaf(sS[kl * LP + kr], sK[kl * LD + c4 + 4 * j], acc);
                atomicAdd(row + c4 + 4 * j, acc);
            }
        }
    }

    if (k0 + kr < sk) {  // keys that no query sees get zeros
        float* dkr = a.dk + kvh + (long long)(k0 + kr) * D;
        float* dvr = a.dv + kvh + (long long)(k0 + kr) * D;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            dkr[c4 + 4 * j] = dk[j] * a.scale;
            dvr[c4 + 4 * j] = dv[j];
        }
    }
}

}  // namespace xattn::bwd_simt

#define XATTN_BWD_SIMT_ENTRY(D, MN, MODS)                                                     \
    extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_f32_simt_d##D##_##MN(      \
        const float *q, const float *k, const float *v, const float *dout, const float *lse,  \
        const float *delta, float *dq_accum, float *dk, float *dv, int hq, int group, int sq, \
        int sk, float scale, XATTN_SCORE_MOD_PARAMS) {                                        \
        xattn::bwd_simt::core<D, MODS>(xattn::bwd_simt::Args{                                 \
            XATTN_SCORE_MOD_INIT, q, k, v, dout, lse, delta, dq_accum, dk, dv, hq, group, sq,  \
            sk, scale});                                                                      \
    }
#define XATTN_BWD_SIMT_ONE(D, MN, MODS) XATTN_BWD_SIMT_ENTRY(D, MN, MODS)

// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
#ifdef XATTN_SIMT_D
XATTN_BWD_SIMT_ONE(XATTN_SIMT_D, XATTN_SIMT_MN, XATTN_SIMT_MODS)
#endif
