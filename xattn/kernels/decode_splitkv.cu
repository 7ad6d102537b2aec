// Decode attention over a KV cache, split over the keys ("flash-decoding"), on tensor cores
// (mma.sync.m16n8k16, sm_80+), with GQA packing and paged reads through a block table.
//
// NOT YET RUN ON A GPU: compiled and checked with ptxas only (no spills, tools/check_kernels.py).
// The launcher (xattn/_backends/cupy_/decode.py) is reachable only with backend="cupy.decode",
// never by "auto", until a GPU run has checked it against the float64 oracle.
//
// Problem: sequence b holds L = lengths[b] tokens; its T newest queries sit at positions
// L - T .. L - 1 (bottom-right causal), optionally with a left window wl. Query head h reads
// kv head h / G (G = Hq / Hkv).
//
// GQA packing: the G query heads of one kv head and the T tokens are R = G * T rows, which
// are contiguous in q (B, Hq, T, D): rows (g * G + h') * T + t. One thread block owns 16 of
// those rows (a row block: R = 4 at T = 1 still fills one m16 tile, padded) for one kv head,
// one sequence and one split of the keys, so each key and value of the split is read from
// memory once for all the query heads sharing it.
//
// Grid: x = split, y = kv head * row blocks + row block, z = sequence. Block: NW warps. The
// split's key tiles (BN = 16 keys) are dealt to the warps round-robin; each warp keeps its
// own online softmax (float32 running max in base 2, sum, accumulator in registers) and its
// own double-buffered K/V tiles in shared memory, filled with cp.async from the pages. At the
// end the warps' states are merged through shared memory; with one split the block writes
// the final output and lse, otherwise float32 partial outputs and their lse, which
// decode_combine merges (out = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s)).
//
// Storage: k, v pools (P, Hkv, page_size, D) of 16-bit values; table (B, max_pages) int32;
// a contiguous cache is one page per sequence (page_size = max_len, table[b] = {b}).
//
// Known gap: a key hidden from some rows of a tile (the causal edge at T > 1, a window's
// edge) enters P V with weight 0, so inf or NaN in its value row would give NaN there.

#include "masking.cuh"
#include "mma_sm80.cuh"

namespace xattn {

struct DecodeArgs {
    const unsigned short* q;   // (B, Hq, T, D)
    const unsigned short* k;   // (P, Hkv, page_size, D)
    const unsigned short* v;   // (P, Hkv, page_size, D)
    const int* table;          // (B, max_pages)
    const int* lengths;        // (B,)
    unsigned short* o;         // (B, Hq, T, D), written when splits == 1
    float* lse;                // (B, Hq, T) natural log, written when splits == 1
    float* o_part;             // (splits, B, Hq, T, D) float32, normalised per split
    float* lse_part;           // (splits, B, Hq, T)
    int batch, hq, hkv, T, page_size, max_pages, splits;
    float scale;               // natural units
    float softcap;             // 0 = off
    int wl;                    // window's left extent, -1 = none
    const float* alibi;        // slopes indexed b * alibi_bs + h; null = off
    long long alibi_bs;
};

// Copy ROWS keys (positions j0 .. j0 + ROWS - 1) of kv head g from the pages into shared
// memory (row stride LD); positions at or past `hi` are zero-filled. One warp, 32 lanes.
template <int ROWS, int D, int LD>
__device__ __forceinline__ void load_paged(unsigned short* s, const unsigned short* pool,
                                           const int* table, int ps, int hkv, int g, int j0,
                                           int hi, int lane) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int TOTAL = ROWS * CPR;
    const unsigned sbase = smem_u32(s);
#pragma unroll
    for (int it = 0; it < (TOTAL + 31) / 32; ++it) {
        const int i = it * 32 + lane;
        if (TOTAL % 32 != 0 && i >= TOTAL) break;
        const int r = i / CPR, c = i % CPR;
        const int j = j0 + r;
        const bool ok = j < hi;
        const unsigned short* src = pool;
        if (ok) {
            const long long page = table[j / ps];
            src = pool + ((page * hkv + g) * ps + j % ps) * D + c * 8;
        }
        cp_async16(sbase + (unsigned)((r * LD + c * 8) * 2), src, ok);
    }
}

template <class T, int D, int NW>
__device__ __forceinline__ void decode_core(const DecodeArgs& a) {
    constexpr int BN = 16;          // keys per warp tile: one k16 step of P V
    constexpr int LD = D + 8;       // padded rows: conflict-free ldmatrix
    constexpr int KS = D / 16;      // k-steps of Q K^T
    constexpr int ND = D / 8;       // n-tiles of the output
    constexpr int NT = NW * 32;
    constexpr int TILE = BN * LD;   // one K or V tile, in 16-bit elements

    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned short* sQ = reinterpret_cast<unsigned short*>(smem_raw);
    unsigned short* sKV = sQ + 16 * LD;  // per warp: [stage][K, V] tiles

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, t4 = lane & 3;
    const int G = a.hq / a.hkv, R = G * a.T;
    const int RB = (R + 15) / 16;
    const int split = blockIdx.x, g = blockIdx.y / RB, rb = blockIdx.y % RB, b = blockIdx.z;
    const int L = a.lengths[b];
    const int first = L - a.T;  // position of query token 0
    // Keys any query of the sequence may see, cut into BN-key tiles from lo, dealt to splits.
    const int lo = a.wl >= 0 ? max(0, first - a.wl) : 0;
    const int hi = L;
    const int n_tiles = hi > lo ? (hi - lo + BN - 1) / BN : 0;
    const int per_split = (n_tiles + a.splits - 1) / a.splits;
    const int t0 = split * per_split, t1 = min(t0 + per_split, n_tiles);
    const int* table = a.table + (long long)b * a.max_pages;
    const long long row0 = ((long long)b * a.hq + (long long)g * G) * a.T;  // packed row 0

    // Q: the block's 16 packed rows (rows past R read as zeros), once per block.
    load_tile<16, D, LD, NT>(sQ, a.q + row0 * D, rb * 16, R, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qf[KS][4];
    const unsigned sQa = smem_u32(sQ);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const int r = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = ks * 16 + (lane >> 4) * 8;
        ldsm_x4(qf[ks], sQa + (unsigned)((r * LD + c) * 2));
    }

    // This lane's two rows (gq, gq + 8 of the block): validity, position, ALiBi slope.
    bool row_ok[2];
    int pos[2];
    float slope[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int pr = rb * 16 + gq + hr * 8;
        row_ok[hr] = pr < R;
        pos[hr] = first + (row_ok[hr] ? pr % a.T : 0);
        slope[hr] = (a.alibi && row_ok[hr])
                        ? a.alibi[(long long)b * a.alibi_bs + g * G + pr / a.T] : 0.f;
    }

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m[2] = {-XATTN_INF, -XATTN_INF}, l[2] = {0.f, 0.f};

    unsigned short* wKV = sKV + warp * 4 * TILE;  // [buf][K, V]
    const unsigned wKVa = smem_u32(wKV);
    int kt = t0 + warp;
    if (kt < t1) {
        load_paged<BN, D, LD>(wKV, a.k, table, a.page_size, a.hkv, g, lo + kt * BN, hi, lane);
        load_paged<BN, D, LD>(wKV + TILE, a.v, table, a.page_size, a.hkv, g, lo + kt * BN, hi,
                              lane);
        cp_async_commit();
    }
    for (int buf = 0; kt < t1; buf ^= 1) {
        const int kn = kt + NW;
        if (kn < t1) {  // prefetch this warp's next tile into the other buffer
            unsigned short* nxt = wKV + (buf ^ 1) * 2 * TILE;
            load_paged<BN, D, LD>(nxt, a.k, table, a.page_size, a.hkv, g, lo + kn * BN, hi,
                                  lane);
            load_paged<BN, D, LD>(nxt + TILE, a.v, table, a.page_size, a.hkv, g, lo + kn * BN,
                                  hi, lane);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncwarp();  // every lane's copies of this tile are visible to the warp

        // S = Q K^T: 16 rows x 16 keys, two n8 tiles.
        float s[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        const unsigned kbase = wKVa + (unsigned)(buf * 2 * TILE * 2);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            unsigned bf[4];
            const int r = (lane & 7) + (lane >> 4) * 8;
            const int c = ks * 16 + ((lane >> 3) & 1) * 8;
            ldsm_x4(bf, kbase + (unsigned)((r * LD + c) * 2));
            mma(s[0], qf[ks], bf[0], bf[1], T());
            mma(s[1], qf[ks], bf[2], bf[3], T());
        }

        // Score modifications (softcap, ALiBi) and the rules, element by element: flash-attn's
        // order, natural units; then base 2 for the softmax.
        const int k0 = lo + kt * BN;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = k0 + n * 8 + t4 * 2 + e;
                    float x = s[n][hr * 2 + e] * a.scale;
                    if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);
                    x -= slope[hr] * fabsf((float)(pos[hr] - j));
                    const bool vis = row_ok[hr] && j < hi && j <= pos[hr] &&
                                     (a.wl < 0 || j >= pos[hr] - a.wl);
                    s[n][hr * 2 + e] = vis ? x * XATTN_LOG2E : -XATTN_INF;
                }

        // Online softmax per row (the 4 lanes of a quad share a row).
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = fmaxf(fmaxf(s[0][hr * 2], s[0][hr * 2 + 1]),
                             fmaxf(s[1][hr * 2], s[1][hr * 2 + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[hr], mx);
            // Nothing visible yet: exponentiate against 0 so that every p is exactly 0.
            const float m_use = m_new == -XATTN_INF ? 0.f : m_new;
            const float alpha = ex2(m[hr] - m_use);
            m[hr] = m_new;
            float rs = 0.f;
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = ex2(s[n][hr * 2 + e] - m_use);
                    s[n][hr * 2 + e] = p;
                    rs += p;
                }
            l[hr] = l[hr] * alpha + rs;
#pragma unroll
            for (int n = 0; n < ND; ++n) {
                acc[n][hr * 2] *= alpha;
                acc[n][hr * 2 + 1] *= alpha;
            }
        }

        // O += P V: the two score n-tiles are the m16k16 A fragment (no shared memory).
        unsigned pf[4];
        pf[0] = pack2(s[0][0], s[0][1], T());
        pf[1] = pack2(s[0][2], s[0][3], T());
        pf[2] = pack2(s[1][0], s[1][1], T());
        pf[3] = pack2(s[1][2], s[1][3], T());
        const unsigned vbase = kbase + (unsigned)(TILE * 2);
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            unsigned vf[4];
            const int r = (lane & 7) + ((lane >> 3) & 1) * 8;
            const int c = dn * 16 + (lane >> 4) * 8;
            ldsm_x4_t(vf, vbase + (unsigned)((r * LD + c) * 2));
            mma(acc[2 * dn], pf, vf[0], vf[1], T());
            mma(acc[2 * dn + 1], pf, vf[2], vf[3], T());
        }
        __syncwarp();  // all lanes are done with this buffer before it is refilled
        kt = kn;
    }

    // Merge the warps' states through shared memory (the K/V tiles are no longer needed).
    __syncthreads();
    float* sAcc = reinterpret_cast<float*>(sKV);  // [NW][16][D]
    float* sM = sAcc + NW * 16 * D;               // [NW][16], base 2
    float* sL = sM + NW * 16;                     // [NW][16]
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float ls = l[hr];
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        ls += __shfl_xor_sync(0xffffffffu, ls, 2);
        const int r = gq + hr * 8;
        if (t4 == 0) {
            sM[warp * 16 + r] = m[hr];
            sL[warp * 16 + r] = ls;
        }
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            sAcc[(warp * 16 + r) * D + n * 8 + t4 * 2] = acc[n][hr * 2];
            sAcc[(warp * 16 + r) * D + n * 8 + t4 * 2 + 1] = acc[n][hr * 2 + 1];
        }
    }
    __syncthreads();
    for (int i = tid; i < 16 * D; i += NT) {
        const int r = i / D, d = i % D;
        const int pr = rb * 16 + r;
        if (pr >= R) continue;
        float mx = -XATTN_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) mx = fmaxf(mx, sM[w * 16 + r]);
        const float m_use = mx == -XATTN_INF ? 0.f : mx;
        float sum = 0.f, val = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float wt = ex2(sM[w * 16 + r] - m_use);
            sum += wt * sL[w * 16 + r];
            val += wt * sAcc[(w * 16 + r) * D + d];
        }
        const float out = sum > 0.f ? val / sum : 0.f;
        const float lse = sum > 0.f ? (m_use + __log2f(sum)) * XATTN_LN2 : -XATTN_INF;
        const long long row = row0 + pr;  // (b, h, t) flattened
        if (a.splits == 1) {
            a.o[row * D + d] = (unsigned short)(pack2(out, 0.f, T()) & 0xffffu);
            if (d == 0) a.lse[row] = lse;
        } else {
            const long long base = (long long)split * a.batch * a.hq * a.T + row;
            a.o_part[base * D + d] = out;
            if (d == 0) a.lse_part[base] = lse;
        }
    }
}

// out = sum_s exp(lse_s - lse) o_s with lse = log sum_s exp(lse_s); one thread per (row, d).
template <class T, int D>
__device__ __forceinline__ void combine_core(const DecodeArgs& a) {
    const long long rows = (long long)a.batch * a.hq * a.T;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * D) return;
    const long long row = i / D;
    const int d = (int)(i % D);
    float mx = -XATTN_INF;
    for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, a.lse_part[s * rows + row]);
    const float m_use = mx == -XATTN_INF ? 0.f : mx;
    float sum = 0.f, val = 0.f;
    for (int s = 0; s < a.splits; ++s) {
        const float wt = __expf(a.lse_part[s * rows + row] - m_use);  // 0 for empty splits
        sum += wt;
        val += wt * a.o_part[(s * rows + row) * D + d];
    }
    a.o[row * D + d] = (unsigned short)(pack2(sum > 0.f ? val / sum : 0.f, 0.f, T()) & 0xffffu);
    if (d == 0) a.lse[row] = sum > 0.f ? m_use + __logf(sum) : -XATTN_INF;
}

}  // namespace xattn

#define XATTN_DECODE_PARAMS                                                                 \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,              \
        const int *table, const int *lengths, unsigned short *o, float *lse, float *o_part, \
        float *lse_part, int batch, int hq, int hkv, int T, int page_size, int max_pages,   \
        int splits, float scale, float softcap, int wl, const float *alibi, long long alibi_bs

#define XATTN_DECODE_ARGS                                                                   \
    xattn::DecodeArgs{q,     k,         v,        table, lengths,   o,         lse,         \
                      o_part, lse_part, batch,    hq,    hkv,       T,         page_size,   \
                      max_pages, splits, scale,   softcap, wl,      alibi,     alibi_bs}

#define XATTN_DECODE_ENTRY(TN, D, NW)                                                       \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                   \
        decode_splitkv_##TN##_d##D##_w##NW(XATTN_DECODE_PARAMS) {                           \
        xattn::decode_core<xattn::TN, D, NW>(XATTN_DECODE_ARGS);                            \
    }                                                                                       \
    extern "C" __global__ void decode_combine_##TN##_d##D(XATTN_DECODE_PARAMS) {            \
        xattn::combine_core<xattn::TN, D>(XATTN_DECODE_ARGS);                               \
    }
#define XATTN_DECODE_ONE(TN, D, NW) XATTN_DECODE_ENTRY(TN, D, NW)

// Instantiation: the loader builds one module per (dtype, head dim) with -D options, CI one
// translation unit with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
#ifdef XATTN_D
XATTN_DECODE_ONE(XATTN_TN, XATTN_D, XATTN_NW)
#endif
