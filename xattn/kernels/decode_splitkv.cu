// Decode attention over a KV cache, split over the keys ("flash-decoding"), on tensor cores
// (mma.sync.m16n8k16, sm_80+), with GQA packing and paged reads through a block table.
//
// Problem: sequence b holds L = lengths[b] tokens; its T newest queries sit at positions
// L - T .. L - 1 (bottom-right causal), optionally with a left window wl. Query head h reads
// kv head h / G (G = Hq / Hkv).
//
// GQA packing: the G query heads of one kv head and the T tokens are R = G * T rows, which
// are contiguous in q (B, Hq, T, D): rows (g * G + h') * T + t. A pair (sequence, kv head,
// row block of 16 of those rows: R = 4 at T = 1 still fills one m16 tile, padded) is the unit
// of work, so each key and value is read from memory once for all the query heads sharing it.
//
// Grid: x = NB blocks of NW warps, each taking an equal run of the list of every pair's key
// tiles (decode_core: balanced whatever the batch and the lengths; with equal lengths a block
// finds its run by division, reading nothing first). Within a block, a segment's key tiles (BN
// = 16 keys, starting at a multiple of 16) are dealt to the warps in turn; each warp keeps its
// own online softmax (float32 running max in base 2, sum, accumulator in registers). Two ways
// to bring a warp its tiles, instance parameters both (xattn/_backends/cupy_/instances.py:
// DECODE):
//  * the shared-memory ring (decode_segment, KIND s): ST stages of K/V tiles per warp, filled
//    with cp.async from the pages ST - 1 tiles ahead of the one it computes (ST tiles in
//    flight while it waits), read by ldmatrix;
//  * the register path (decode_segment_regs, KIND r, the default): each lane loads its share
//    of a tile's key and value rows straight into registers, with Q and K in one permutation
//    of the head dim that lets a lane's 16-byte chunks be its mma fragments, and V transposed
//    in registers by movmatrix; the next tile's loads leave as soon as registers free up
//    (ST = 0: keys after the scores, values after P V; ST = 1: a second tile of registers).
//    No cp.async groups, no shared-memory round trip: it read 1-3 % faster than the ring on
//    an H100 (docs/dev/perf_gpu.rst, 2026-12-06).
// A tile inside one page costs one block-table read for all its rows (on the register path
// none in a contiguous cache, whose sequence b is page b). Only the tiles at the causal edge, the sequence end and
// the window's edge test each score; the others are visible to every row. At the end of a
// segment the warps' states are merged through shared memory; a segment that is its whole
// pair writes the final output and lse. Otherwise the block writes its float32 partial output
// and lse and takes a ticket from the pair's counter; the block that draws the last ticket
// merges the pair's segments (out = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s))
// and sets the counter back to 0 for the next launch on the stream -- one launch per call, no
// second kernel (the launcher keeps one zeroed counter array per device and stream:
// xattn/_backends/cupy_/decode.py).
//
// Storage: k, v pools (P, Hkv, page_size, D) of 16-bit values; table (B, max_pages) int32;
// a contiguous cache is one page per sequence (page_size = max_len, table[b] = {b}).
//
// Known gap: a key hidden from some rows of a tile (the causal edge at T > 1, a window's
// edge) enters P V with weight 0, so inf or NaN in its value row would give NaN there.

#include "masking.cuh"
#include "mma_sm80.cuh"

// Most segments of one pair (the launcher's _MAX_SPLITS; its block count keeps within it): the
// merging block keeps one weight per (segment, row) in shared memory.
#define XATTN_DECODE_MAX_SPLITS 512

namespace xattn {

struct DecodeArgs {
    const unsigned short* q;   // (B, Hq, T, D)
    const unsigned short* k;   // (P, Hkv, page_size, D)
    const unsigned short* v;   // (P, Hkv, page_size, D)
    const int* table;          // (B, max_pages)
    const int* lengths;        // (B,)
    unsigned short* o;         // (B, Hq, T, D)
    float* lse;                // (B, Hq, T) natural log (null: not wanted)
    float* o_part;             // (pairs + NB - 1, 16, D) float32 per segment slot, normalised
    float* lse_part;           // (pairs + NB - 1, 16)
    int* counters;             // (pairs,), zero between launches; NB > 1 only
    int batch, hq, hkv, T, page_size, max_pages;
    int splits;                // NB = gridDim.x (the kernel reads gridDim.x)
    float scale;               // natural units
    float softcap;             // 0 = off
    int wl;                    // window's left extent, -1 = none
    int uniform;               // every sequence's length when all are equal, else -1: the
                               // blocks find their tiles without reading the lengths
    int contiguous;            // 1: a contiguous cache, whose sequence b is page b (no table
                               // read before a tile's first load)
    const float* alibi;        // slopes indexed b * alibi_bs + h; null = off
    long long alibi_bs;
};

// cp.async of 16 bytes with a 256-byte L2 prefetch hint: each key row is 128-256 contiguous
// bytes and a tile's rows are contiguous within a page, so the neighbouring sectors are the
// next copies' anyway; src-size 0 zero-fills (rows past the sequence end).
__device__ __forceinline__ void cp_async16_l2(unsigned dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(n));
}

// Copy the K and V rows of one BN-key tile (positions j0 .. j0 + BN - 1, kv head g) from the
// pages into shared memory (row stride LD); positions at or past `hi` are zero-filled. One
// warp, 32 lanes. A tile that lies in one page (every tile of a cache whose page size is a
// multiple of BN, since tiles start at multiples of BN; every tile of a contiguous cache but
// the one astride a ring buffer's wrap) costs one table read and one division for all its
// rows, and each lane's copies step by constants from one base; only a tile astride a page
// boundary looks up each row's page.
template <int BN, int D, int LD>
__device__ __forceinline__ void load_kv(unsigned sk, unsigned sv, const unsigned short* kpool,
                                        const unsigned short* vpool, const int* table, int ps,
                                        int hkv, int g, int j0, int hi, int lane) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int TOTAL = BN * CPR;
    static_assert(TOTAL % 32 == 0, "whole iterations of the warp");
    const int last = min(j0 + BN, hi) - 1;  // the tile's last stored position
    const int pi = j0 / ps;
    const int off = j0 - pi * ps;
    if (off + (last - j0) < ps) {
        const long long base =
            (((long long)__ldg(table + pi) * hkv + g) * ps + off) * D + (lane % CPR) * 8;
#pragma unroll
        for (int it = 0; it < TOTAL / 32; ++it) {
            const int r = it * (32 / CPR) + lane / CPR;
            const bool ok = j0 + r <= last;
            const long long e = ok ? base + (long long)r * D : 0;
            const unsigned so = (unsigned)((r * LD + (lane % CPR) * 8) * 2);
            cp_async16_l2(sk + so, kpool + e, ok);
            cp_async16_l2(sv + so, vpool + e, ok);
        }
    } else {
#pragma unroll
        for (int it = 0; it < TOTAL / 32; ++it) {
            const int r = it * (32 / CPR) + lane / CPR;
            const int j = j0 + r;
            const bool ok = j <= last;
            long long e = 0;
            if (ok) {
                const int p = j / ps;
                e = (((long long)__ldg(table + p) * hkv + g) * ps + (j - p * ps)) * D +
                    (lane % CPR) * 8;
            }
            const unsigned so = (unsigned)((r * LD + (lane % CPR) * 8) * 2);
            cp_async16_l2(sk + so, kpool + e, ok);
            cp_async16_l2(sv + so, vpool + e, ok);
        }
    }
}

// The merge of a pair's (sequence, kv head, row block) partial results by the block that
// finished last: the partials of its segments s = 0 .. nseg - 1 sit in slots slot0 + s
// ([slot][16 rows] lse, [slot][16 rows][D] outputs). For each of the pair's rows (packed rows
// pr0 .. pr0 + 15 below R), weights w_s = exp(lse_s - max_s lse_s) in shared memory (sW,
// [segment][16 rows]; one warp per row), then out = sum_s w_s o_s / sum_s w_s for every
// (row, d) and lse = max + log sum_s w_s, in segment order whatever order the blocks finished
// in. The partials are read through L2 (__ldcg: other blocks wrote them, and L1 is not
// coherent), as plain loads the compiler may batch: the merge runs after the last block's
// keys, so its latency is the launch's tail (volatile loads, each waited for in turn, cost
// 8 us at two segments a pair). A segment whose keys are all hidden carries lse = -inf and
// weighs 0; a row that sees no key gets 0 and -inf.
template <class T, int D, int NW>
__device__ __forceinline__ void merge_segments(const DecodeArgs& a, float* smem, long long slot0,
                                               int nseg, long long row0, int pr0, int R,
                                               int warp, int lane, int tid) {
    constexpr int NT = NW * 32;
    constexpr int D4 = D / 4;
    float* sW = smem;                                        // [segment][16]
    float* sSum = sW + XATTN_DECODE_MAX_SPLITS * 16;         // [16]
    const float* lse_p = a.lse_part + slot0 * 16;
    const float4* o_p = reinterpret_cast<const float4*>(a.o_part + slot0 * 16 * D);
    for (int r = warp; r < 16; r += NW) {
        if (pr0 + r >= R) continue;  // padding rows: nothing was written for them
        float mx = -XATTN_INF;
        for (int s = lane; s < nseg; s += 32) {
            const float x = __ldcg(lse_p + s * 16 + r);
            sW[s * 16 + r] = x;  // the lse, then its weight (this lane's own entries)
            mx = fmaxf(mx, x);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_use = mx == -XATTN_INF ? 0.f : mx;
        float sum = 0.f;
        for (int s = lane; s < nseg; s += 32) {
            const float w = __expf(sW[s * 16 + r] - m_use);
            sW[s * 16 + r] = w;
            sum += w;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
            sSum[r] = sum;
            if (a.lse != nullptr)
                a.lse[row0 + pr0 + r] = sum > 0.f ? m_use + __logf(sum) : -XATTN_INF;
        }
    }
    __syncthreads();  // sW and sSum are complete
    for (int f = tid; f < 16 * D4; f += NT) {
        const int r = f / D4, c4 = f % D4;
        if (pr0 + r >= R) continue;
        float4 acc = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
        for (int s = 0; s < nseg; ++s) {
            const float w = sW[s * 16 + r];
            const float4 x = __ldcg(o_p + (s * 16 + r) * D4 + c4);
            acc.x += w * x.x;
            acc.y += w * x.y;
            acc.z += w * x.z;
            acc.w += w * x.w;
        }
        const float sum = sSum[r];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        uint2 packed;
        packed.x = pack2(acc.x * inv, acc.y * inv, T());
        packed.y = pack2(acc.z * inv, acc.w * inv, T());
        *reinterpret_cast<uint2*>(a.o + (row0 + pr0 + r) * D + c4 * 4) = packed;
    }
}

// Sequence b's length (no read when all are equal).
__device__ __forceinline__ int seq_len(const DecodeArgs& a, int b) {
    return a.uniform >= 0 ? a.uniform : __ldg(a.lengths + b);
}

// Key tiles of a sequence of L tokens: [lo, L) in BN-key tiles from a multiple of BN (so that
// tiles and pages align; the window's rule hides the keys below lo). At least one: a sequence
// with no key still owns a tile (zero-filled, every score hidden), so that some block writes
// its rows (0 and lse = -inf) -- every pair is reached through its tiles.
__device__ __forceinline__ int key_lo(int L, int T, int wl, int bn) {
    return wl >= 0 ? max(0, L - T - wl) / bn * bn : 0;
}
__device__ __forceinline__ int seq_tiles(int L, int T, int wl, int bn) {
    const int lo = key_lo(L, T, wl, bn);
    return L > lo ? (L - lo + bn - 1) / bn : 1;
}

// What a lane knows of its two rows (gq, gq + 8 of the block's 16 packed rows): whether they
// exist, the position of their query token, their ALiBi slope.
struct SegmentRows {
    bool ok[2];
    int pos[2];
    float slope[2];
};

__device__ __forceinline__ SegmentRows segment_rows(const DecodeArgs& a, int b, int g, int rb,
                                                    int first, int gq) {
    const int G = a.hq / a.hkv, R = G * a.T;
    SegmentRows rows;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int pr = rb * 16 + gq + hr * 8;
        rows.ok[hr] = pr < R;
        rows.pos[hr] = first + (rows.ok[hr] ? pr % a.T : 0);
        rows.slope[hr] = (a.alibi && rows.ok[hr])
                             ? a.alibi[(long long)b * a.alibi_bs + g * G + pr / a.T] : 0.f;
    }
    return rows;
}

// One 16-key tile's scores s (two n8 tiles of the m16n8 accumulator layout, keys k0 ..
// k0 + 15) -> the online softmax of this lane's two rows (m, l, acc rescaled) -> P as the
// m16k16 A fragment of P V.
//
// Score modifications (softcap, ALiBi) in flash-attn's order, natural units, then the rules,
// then base 2 for the softmax. Only tiles that reach past the first query's position (the
// causal edge, the sequence end) or below the last query's window need the element test; the
// others are visible to every row.
//
// The accumulator's rescale is skipped when the whole warp's factors are exactly 1 (no row's
// maximum moved: most tiles once the first few have been seen), which changes no bit: x * 1
// is x.
template <class T, int ND>
__device__ __forceinline__ void softmax_tile(const DecodeArgs& a, const SegmentRows& rows,
                                             float (&s)[2][4], float (&m)[2], float (&l)[2],
                                             float (&acc)[ND][4], unsigned (&pf)[4], int k0,
                                             int first, int hi, int t4) {
    const bool mods = a.softcap > 0.f || a.alibi != nullptr;
    const bool edge = k0 + 16 > first + 1 || (a.wl >= 0 && k0 < hi - 1 - a.wl);
    if (mods || edge) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int nn = 0; nn < 2; ++nn)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = k0 + nn * 8 + t4 * 2 + e;
                    float x = s[nn][hr * 2 + e] * a.scale;
                    if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);
                    x -= rows.slope[hr] * fabsf((float)(rows.pos[hr] - j));
                    const bool vis =
                        !edge || (rows.ok[hr] && j < hi && j <= rows.pos[hr] &&
                                  (a.wl < 0 || j >= rows.pos[hr] - a.wl));
                    s[nn][hr * 2 + e] = vis ? x * XATTN_LOG2E : -XATTN_INF;
                }
    } else {
        const float scale2 = a.scale * XATTN_LOG2E;
#pragma unroll
        for (int nn = 0; nn < 2; ++nn)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nn][e] *= scale2;
    }

    // Online softmax per row (the 4 lanes of a quad share a row).
    float alpha[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float mx = fmaxf(fmaxf(s[0][hr * 2], s[0][hr * 2 + 1]),
                         fmaxf(s[1][hr * 2], s[1][hr * 2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[hr], mx);
        // Nothing visible yet: exponentiate against 0 so that every p is exactly 0.
        const float m_use = m_new == -XATTN_INF ? 0.f : m_new;
        alpha[hr] = ex2(m[hr] - m_use);
        m[hr] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int nn = 0; nn < 2; ++nn)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pv = ex2(s[nn][hr * 2 + e] - m_use);
                s[nn][hr * 2 + e] = pv;
                rs += pv;
            }
        l[hr] = l[hr] * alpha[hr] + rs;
    }
    if (!__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int nn = 0; nn < ND; ++nn) {
                acc[nn][hr * 2] *= alpha[hr];
                acc[nn][hr * 2 + 1] *= alpha[hr];
            }
    }

    // The two score n-tiles are the m16k16 A fragment of P V (no shared memory).
    pf[0] = pack2(s[0][0], s[0][1], T());
    pf[1] = pack2(s[0][2], s[0][3], T());
    pf[2] = pack2(s[1][0], s[1][1], T());
    pf[3] = pack2(s[1][2], s[1][3], T());
}

// The output columns of a lane's accumulators: n-tile n, element e (of each row) -> column.
// mma order: n-tile n holds columns n * 8 .. n * 8 + 7, a lane t4 its 2 t4 and 2 t4 + 1.
struct ColsMma {
    __device__ __forceinline__ static int at(int n, int t4, int e) { return n * 8 + t4 * 2 + e; }
};
// The register path's order (decode_segment_regs): n-tile n = 4 c + w holds columns
// c * 32 + (i / 2) * 8 + 2 w + i % 2 (i = 0 .. 7), so that a lane's columns of one c are the
// 8 contiguous c * 32 + t4 * 8 .. + 7 it loaded.
struct ColsRegs {
    __device__ __forceinline__ static int at(int n, int t4, int e) {
        return (n >> 2) * 32 + t4 * 8 + (n & 3) * 2 + e;
    }
};

// The end of a segment: merge the block's warps' states through shared memory (smem: at
// least NW * 16 * (D + 2) floats, free now), then write the output and lse (a segment that is
// its whole pair) or the segment's float32 partials, take the pair's ticket and, in the block
// that draws the last one, merge the pair's segments.
template <class T, int D, int NW, class COLS>
__device__ __forceinline__ void finish_segment(const DecodeArgs& a, float* smem,
                                               const float (&acc)[D / 8][4],
                                               const float (&m)[2], const float (&l)[2], int rb,
                                               long long row0, long long p, long long slot,
                                               long long slot0, int nseg) {
    constexpr int ND = D / 8;
    constexpr int NT = NW * 32;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, t4 = lane & 3;
    const int R = a.hq / a.hkv * a.T;
    float* sAcc = smem;                // [NW][16][D]
    float* sM = sAcc + NW * 16 * D;    // [NW][16], base 2
    float* sL = sM + NW * 16;          // [NW][16]
    // Only the block's rows below R exist (4 of the 16 for GQA 4:1 at T = 1): the padding
    // rows are neither stored nor merged.
    const int live = min(16, R - rb * 16);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float ls = l[hr];
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        ls += __shfl_xor_sync(0xffffffffu, ls, 2);
        const int r = gq + hr * 8;
        if (r >= live) continue;
        if (t4 == 0) {
            sM[warp * 16 + r] = m[hr];
            sL[warp * 16 + r] = ls;
        }
#pragma unroll
        for (int nn = 0; nn < ND; ++nn) {
            sAcc[(warp * 16 + r) * D + COLS::at(nn, t4, 0)] = acc[nn][hr * 2];
            sAcc[(warp * 16 + r) * D + COLS::at(nn, t4, 1)] = acc[nn][hr * 2 + 1];
        }
    }
    __syncthreads();
    const bool whole = nseg == 1;  // the segment is the whole pair: write the result
    for (int i = tid; i < live * D; i += NT) {
        const int r = i / D, d = i % D;
        const int pr = rb * 16 + r;
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
        if (whole) {
            a.o[row * D + d] = (unsigned short)(pack2(out, 0.f, T()) & 0xffffu);
            if (d == 0 && a.lse != nullptr) a.lse[row] = lse;
        } else {
            a.o_part[(slot * 16 + r) * D + d] = out;
            if (d == 0) a.lse_part[slot * 16 + r] = lse;
        }
    }
    if (whole) return;

    // Several segments: the last block of this pair to finish merges them. Each thread's
    // partials are made visible device-wide before the block takes its ticket (the fence), and
    // the barrier orders every thread's fence before thread 0's atomic.
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int* counter = a.counters + p;
        const bool last = atomicAdd(counter, 1) == nseg - 1;
        // Every other segment has taken its ticket: the counter is free for the next launch.
        if (last) atomicExch(counter, 0);
        __threadfence();  // the partials read below are not older than the ticket
        s_last = last;
    }
    __syncthreads();
    if (s_last) merge_segments<T, D, NW>(a, smem, slot0, nseg, row0, rb * 16, R, warp, lane, tid);
}

// One segment of a pair: its tiles t0 .. t1 - 1, in the block's NW warps; the pair is
// sequence b's kv head g, row block rb; pair index p (the ticket counter), the segment's slot.
template <class T, int D, int NW, int ST>
__device__ __forceinline__ void decode_segment(const DecodeArgs& a, unsigned char* smem_raw,
                                               int b, int g, int rb, int t0, int t1,
                                               long long p, long long slot, long long slot0,
                                               int nseg) {
    static_assert(ST >= 2 && ST <= 8, "2 to 8 stages");
    // The merge's weights and sums fit in the K/V stages it reuses.
    static_assert(NW * ST * 2 * 16 * (D + 8) * 2 >= (XATTN_DECODE_MAX_SPLITS * 16 + 16) * 4,
                  "shared memory for the segment merge");
    constexpr int BN = 16;          // keys per warp tile: one k16 step of P V
    constexpr int LD = D + 8;       // padded rows: conflict-free ldmatrix
    constexpr int KS = D / 16;      // k-steps of Q K^T
    constexpr int ND = D / 8;       // n-tiles of the output
    constexpr int NT = NW * 32;
    constexpr int TILE = BN * LD;   // one K or V tile, in 16-bit elements

    unsigned short* sQ = reinterpret_cast<unsigned short*>(smem_raw);
    unsigned short* sKV = sQ + 16 * LD;  // per warp: [stage][K, V] tiles

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, t4 = lane & 3;
    const int G = a.hq / a.hkv, R = G * a.T;
    const int L = seq_len(a, b);
    const int first = L - a.T;  // position of query token 0
    const int lo = key_lo(L, a.T, a.wl, BN);
    const int hi = L;
    const int* table = a.table + (long long)b * a.max_pages;
    const long long row0 = ((long long)b * a.hq + (long long)g * G) * a.T;  // packed row 0

    // Q: the block's 16 packed rows (rows past R read as zeros).
    load_tile<16, D, LD, NT>(sQ, a.q + row0 * D, rb * 16, R, tid);
    cp_async_commit();

    // This warp's tiles: t0 + warp, t0 + warp + NW, ...; its first ST - 1 go in flight now,
    // one commit group per stage (empty groups keep the count uniform).
    const int count = t1 > t0 + warp ? (t1 - t0 - warp + NW - 1) / NW : 0;
    unsigned short* wKV = sKV + warp * ST * 2 * TILE;  // [stage][K, V]
    const unsigned wKVa = smem_u32(wKV);
#pragma unroll
    for (int s = 0; s < ST - 1; ++s) {
        if (s < count)
            load_kv<BN, D, LD>(wKVa + s * 4 * TILE, wKVa + s * 4 * TILE + 2 * TILE, a.k, a.v,
                               table, a.page_size, a.hkv, g, lo + (t0 + warp + s * NW) * BN, hi,
                               lane);
        cp_async_commit();
    }

    cp_async_wait<ST - 1>();  // the Q group (the oldest) has landed
    __syncthreads();
    unsigned qf[KS][4];
    const unsigned sQa = smem_u32(sQ);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const int r = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = ks * 16 + (lane >> 4) * 8;
        ldsm_x4(qf[ks], sQa + (unsigned)((r * LD + c) * 2));
    }
    const SegmentRows rows = segment_rows(a, b, g, rb, first, gq);

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m[2] = {-XATTN_INF, -XATTN_INF}, l[2] = {0.f, 0.f};

    int slot_st = 0, fill = ST - 1;  // the stage read now, the stage the next copy fills
    for (int i = 0; i < count; ++i) {
        // The stage of tile i - 1 is free once every lane is done with it (the barrier): it is
        // refilled with tile i + ST - 1 before the wait for tile i, so that a waiting warp has
        // ST tiles in flight, not ST - 1 (a warp spends most of its time waiting).
        __syncwarp();
        if (i + ST - 1 < count)
            load_kv<BN, D, LD>(wKVa + fill * 4 * TILE, wKVa + fill * 4 * TILE + 2 * TILE, a.k,
                               a.v, table, a.page_size, a.hkv, g,
                               lo + (t0 + warp + (i + ST - 1) * NW) * BN, hi, lane);
        cp_async_commit();
        fill = fill + 1 == ST ? 0 : fill + 1;
        // Tile i has landed (at most ST - 1 younger groups are pending); the barrier makes each
        // lane's copies of it visible to the others.
        cp_async_wait<ST - 1>();
        __syncwarp();

        // S = Q K^T: 16 rows x 16 keys, two n8 tiles.
        float s[2][4];
#pragma unroll
        for (int nn = 0; nn < 2; ++nn) s[nn][0] = s[nn][1] = s[nn][2] = s[nn][3] = 0.f;
        const unsigned kbase = wKVa + (unsigned)(slot_st * 4 * TILE);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            unsigned bf[4];
            const int r = (lane & 7) + (lane >> 4) * 8;
            const int c = ks * 16 + ((lane >> 3) & 1) * 8;
            ldsm_x4(bf, kbase + (unsigned)((r * LD + c) * 2));
            mma(s[0], qf[ks], bf[0], bf[1], T());
            mma(s[1], qf[ks], bf[2], bf[3], T());
        }

        unsigned pf[4];
        softmax_tile<T, ND>(a, rows, s, m, l, acc, pf, lo + (t0 + warp + i * NW) * BN, first,
                            hi, t4);

        // O += P V.
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
        slot_st = slot_st + 1 == ST ? 0 : slot_st + 1;
    }
    cp_async_wait<0>();  // no copy may land in the stages after the merge reuses them
    __syncthreads();     // the K/V stages are free for the warps' merge
    finish_segment<T, D, NW, ColsMma>(a, reinterpret_cast<float*>(sKV), acc, m, l, rb, row0, p,
                                      slot, slot0, nseg);
}

// 16 bytes of global memory read once: no L1 allocation, a 256-byte L2 prefetch (a tile's key
// rows are contiguous in a page, so the neighbouring sectors are the next loads' anyway); zero
// where !ok (rows past the sequence end must read as 0, not as whatever the cache holds there:
// P V weighs them 0, and 0 times inf is NaN).
__device__ __forceinline__ uint4 ld_once16(const unsigned short* src, bool ok) {
    uint4 r;
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(src), "r"((int)ok));
    return r;
}

// Word i (0..3) of a 16-byte chunk (i a constant after unrolling).
__device__ __forceinline__ unsigned word(const uint4& u, int i) {
    return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

// Transpose of an 8x8 16-bit matrix across the warp (lane 4 r + c holds row r's columns 2 c,
// 2 c + 1; after: the same of the transpose).
__device__ __forceinline__ unsigned movmatrix_t(unsigned x) {
    unsigned y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// The register path's loads of one 16-key tile (keys j0 ..): lane (gq, t4) takes key rows
// gq and gq + 8, and of each the 16-byte chunks at bytes c * 64 + t4 * 16, c = 0 .. D / 32 -
// 1 -- each load instruction of the warp reads 8 rows' 64 contiguous bytes. KvRows holds the
// two rows' element offsets in the pools (a tile inside one page costs one table read for
// both) and whether they hold a key; rows at or past `hi` read as zeros.
struct KvRows {
    long long e[2];
    bool ok[2];
};

template <int D>
__device__ __forceinline__ KvRows kv_rows(const DecodeArgs& a, const int* table, int b, int g,
                                          int j0, int hi, int gq, int t4) {
    const int ps = a.page_size;
    const int last = min(j0 + 16, hi) - 1;
    const int pi = j0 / ps;
    const int off = j0 - pi * ps;
    KvRows r;
    if (off + (last - j0) < ps) {
        const long long page = a.contiguous ? b : __ldg(table + pi);
        const long long base = ((page * a.hkv + g) * ps + off + gq) * D + t4 * 8;
        r.e[0] = base;
        r.e[1] = base + 8 * D;
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int j = min(j0 + h * 8 + gq, last);
            const int pj = j / ps;
            const long long page = a.contiguous ? b : __ldg(table + pj);
            r.e[h] = ((page * a.hkv + g) * ps + (j - pj * ps)) * D + t4 * 8;
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) r.ok[h] = j0 + h * 8 + gq <= last;
    return r;
}

template <int D>
__device__ __forceinline__ void load_rows(uint4 (&x)[2][D / 32], const unsigned short* pool,
                                          const KvRows& r) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < D / 32; ++c) x[h][c] = ld_once16(pool + r.e[h] + c * 32, r.ok[h]);
}

// The register path of one segment (same contract as decode_segment): no shared memory until
// the merge. Each warp's tiles go straight from global memory into registers (load_rows);
// with PF = 1 the next tile's loads are issued before the current tile is computed (two tiles
// of registers), with PF = 0 the next tile's keys after the scores and its values after P V.
// The reduction over the head dim does not care in which order its terms come, so Q and K
// share one permutation of d that lets each lane hold whole 16-byte chunks of a key row: k-step
// ks takes of lane t4 the columns (ks / 2) * 32 + t4 * 8 + (ks % 2) * 4 + (0, 1 | 2, 3). P V
// needs V with the keys across the lanes: movmatrix transposes each 8x8 piece in registers,
// and the output's columns come out in ColsRegs's order.
template <class T, int D, int NW, int PF>
__device__ __forceinline__ void decode_segment_regs(const DecodeArgs& a, unsigned char* smem_raw,
                                                    int b, int g, int rb, int t0, int t1,
                                                    long long p, long long slot, long long slot0,
                                                    int nseg) {
    static_assert(PF == 0 || PF == 1, "prefetch distance 0 or 1");
    constexpr int BN = 16;
    constexpr int C = D / 32;   // 16-byte chunks of a key row per lane
    constexpr int KS = D / 16;
    constexpr int ND = D / 8;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, t4 = lane & 3;
    const int G = a.hq / a.hkv, R = G * a.T;
    const int L = seq_len(a, b);
    const int first = L - a.T;
    const int lo = key_lo(L, a.T, a.wl, BN);
    const int hi = L;
    const int* table = a.table + (long long)b * a.max_pages;
    const long long row0 = ((long long)b * a.hq + (long long)g * G) * a.T;
    const int count = t1 > t0 + warp ? (t1 - t0 - warp + NW - 1) / NW : 0;
    auto key0 = [&](int i) { return lo + (t0 + warp + i * NW) * BN; };

    uint4 kr[2][C], vr[2][C];
    if (count > 0) {
        const KvRows r = kv_rows<D>(a, table, b, g, key0(0), hi, gq, t4);
        load_rows<D>(kr, a.k, r);
        load_rows<D>(vr, a.v, r);
    }

    // Q in the same layout as K: rows gq and gq + 8 of the block (rows past R read as zeros),
    // as A fragments of Q K^T. They wait in shared memory, not in 32 registers (this warp's
    // copy, in fragment order: one conflict-free 16-byte load per k-step and lane, read again
    // for every tile).
    const unsigned sQf = smem_u32(smem_raw) + (unsigned)(warp * KS * 32 * 16);
    {
        uint4 qr[2][C];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int pr = rb * 16 + gq + h * 8;
#pragma unroll
            for (int c = 0; c < C; ++c)
                qr[h][c] = ld_once16(a.q + (row0 + (pr < R ? pr : 0)) * D + c * 32 + t4 * 8,
                                     pr < R);
        }
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(
                             sQf + (unsigned)((ks * 32 + lane) * 16)),
                         "r"(word(qr[0][ks / 2], (ks % 2) * 2)),
                         "r"(word(qr[1][ks / 2], (ks % 2) * 2)),
                         "r"(word(qr[0][ks / 2], (ks % 2) * 2 + 1)),
                         "r"(word(qr[1][ks / 2], (ks % 2) * 2 + 1))
                         : "memory");
        __syncwarp();
    }
    const SegmentRows rows = segment_rows(a, b, g, rb, first, gq);

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m[2] = {-XATTN_INF, -XATTN_INF}, l[2] = {0.f, 0.f};

    auto scores = [&](const uint4 (&k)[2][C], float (&s)[2][4]) {
#pragma unroll
        for (int nn = 0; nn < 2; ++nn) s[nn][0] = s[nn][1] = s[nn][2] = s[nn][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            unsigned q4[4];
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(q4[0]), "=r"(q4[1]), "=r"(q4[2]), "=r"(q4[3])
                         : "r"(sQf + (unsigned)((ks * 32 + lane) * 16)));
#pragma unroll
            for (int nn = 0; nn < 2; ++nn)
                mma(s[nn], q4, word(k[nn][ks / 2], (ks % 2) * 2),
                    word(k[nn][ks / 2], (ks % 2) * 2 + 1), T());
        }
    };
    auto pv = [&](const uint4 (&v)[2][C], const unsigned (&pf)[4]) {
#pragma unroll
        for (int c = 0; c < C; ++c)
#pragma unroll
            for (int w = 0; w < 4; ++w)
                mma(acc[c * 4 + w], pf, movmatrix_t(word(v[0][c], w)),
                    movmatrix_t(word(v[1][c], w)), T());
    };

    if constexpr (PF == 0) {
        for (int i = 0; i < count; ++i) {
            float s[2][4];
            scores(kr, s);
            // The next tile's keys go in flight as soon as this tile's are used, its values
            // after P V: one tile of registers.
            const bool more = i + 1 < count;
            KvRows r;
            if (more) {
                r = kv_rows<D>(a, table, b, g, key0(i + 1), hi, gq, t4);
                load_rows<D>(kr, a.k, r);
            }
            unsigned pf[4];
            softmax_tile<T, ND>(a, rows, s, m, l, acc, pf, key0(i), first, hi, t4);
            pv(vr, pf);
            if (more) load_rows<D>(vr, a.v, r);
        }
    } else {
        // Two tiles of registers: the next tile's loads go in flight before this one's work.
        uint4 kn[2][C], vn[2][C];
        auto step = [&](const uint4 (&k)[2][C], const uint4 (&v)[2][C], uint4 (&k1)[2][C],
                        uint4 (&v1)[2][C], int i) {
            if (i + 1 < count) {
                const KvRows r = kv_rows<D>(a, table, b, g, key0(i + 1), hi, gq, t4);
                load_rows<D>(k1, a.k, r);
                load_rows<D>(v1, a.v, r);
            }
            float s[2][4];
            scores(k, s);
            unsigned pf[4];
            softmax_tile<T, ND>(a, rows, s, m, l, acc, pf, key0(i), first, hi, t4);
            pv(v, pf);
        };
        for (int i = 0; i < count; i += 2) {
            step(kr, vr, kn, vn, i);
            if (i + 1 < count) step(kn, vn, kr, vr, i + 1);
        }
    }
    __syncthreads();  // every warp is done with its Q copy: the merge overwrites it
    finish_segment<T, D, NW, ColsRegs>(a, reinterpret_cast<float*>(smem_raw), acc, m, l, rb,
                                       row0, p, slot, slot0, nseg);
}

// The schedule: every pair (sequence b, kv head g, row block rb; pair index
// p = (b * Hkv + g) * RB + rb) owns its sequence's n_b key tiles, and the pairs' tiles, in
// pair order, form one list of `total` tiles. Block i of the NB = gridDim.x blocks takes the
// run [i W, (i + 1) W) of that list, W = ceil(total / NB): every block reads the same number
// of keys (but the last), whatever the batch, the kv heads and the lengths; with equal lengths
// and NB = pairs * splits (the launcher's choice) each run is one split of one pair. (NB = the
// card's resident blocks, which fills every wave, measured slower on an H100: runs that cut
// pairs pay a second segment's prologue and a merge.) A run covers pieces of one or more
// pairs, its segments, taken in order. A pair cut into several segments (by the blocks
// first = p0 / W .. last = (p1 - 1) / W, [p0, p1) its tiles in the list) leaves one partial
// result per segment in slot p + i (block i; distinct for distinct (pair, block), since runs
// and pairs both follow the list's order), merged by the block that finishes last.
template <class T, int D, int NW, int ST, int REGS>
__device__ __forceinline__ void decode_core(const DecodeArgs& a) {
    constexpr int BN = 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ long long s_start, s_end, s_base, s_w;
    __shared__ int s_b;
    const int tid = threadIdx.x, lane = tid & 31;
    const int G = a.hq / a.hkv, R = G * a.T;
    const int RB = (R + 15) / 16;
    const int HR = a.hkv * RB;  // pairs per sequence
    long long w, end, cur, base;
    int b;
    if (a.uniform >= 0) {
        // Equal lengths: the run's first sequence by division, before any memory is read (the
        // first tiles' loads leave at once).
        const long long span = (long long)HR * seq_tiles(a.uniform, a.T, a.wl, BN);
        const long long total = span * a.batch;
        w = (total + gridDim.x - 1) / gridDim.x;
        cur = (long long)blockIdx.x * w;
        end = min(cur + w, total);
        b = (int)(cur / span);
        base = (long long)b * span;
        if (cur >= end) return;  // a block past the list's end (more blocks than tiles)
    } else {
        // Tiles of sequence bb in the list (0 past the batch).
        auto span_of = [&](int bb) -> long long {
            return bb < a.batch ? (long long)HR * seq_tiles(seq_len(a, bb), a.T, a.wl, BN) : 0;
        };
        if (tid < 32) {
            // The list's length, then the sequence holding this block's first tile and the
            // tiles before it (warp 0; a 32-wide scan of the lengths per step).
            long long total = 0;
            for (int b0 = 0; b0 < a.batch; b0 += 32) {
                long long c = span_of(b0 + lane);
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
                total += c;
            }
            const long long ww = (total + gridDim.x - 1) / gridDim.x;
            const long long start = (long long)blockIdx.x * ww;
            long long run = 0;
            int found = -1;
            long long found_base = 0;
            for (int b0 = 0; b0 < a.batch && found < 0; b0 += 32) {
                const int bb = b0 + lane;
                const long long c = span_of(bb);
                long long incl = c;  // inclusive scan over the lanes
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const long long up = __shfl_up_sync(0xffffffffu, incl, o);
                    if (lane >= o) incl += up;
                }
                const bool here = bb < a.batch && start >= run + incl - c && start < run + incl;
                const unsigned hit = __ballot_sync(0xffffffffu, here);
                if (hit) {
                    const int src = __ffs(hit) - 1;
                    found = b0 + src;
                    found_base = run + __shfl_sync(0xffffffffu, incl - c, src);
                }
                run += __shfl_sync(0xffffffffu, incl, 31);
            }
            if (lane == 0) {
                s_w = ww;
                s_start = start;
                s_end = min(start + ww, total);
                s_b = found;
                s_base = found_base;
            }
        }
        __syncthreads();
        w = s_w, end = s_end, cur = s_start, base = s_base, b = s_b;
        if (b < 0 || cur >= end) return;  // a block past the list's end
    }
    while (cur < end) {
        const int n = seq_tiles(seq_len(a, b), a.T, a.wl, BN);
        const long long span = (long long)HR * n;
        if (cur >= base + span) {  // the run goes on into the next sequence
            base += span;
            ++b;
            continue;
        }
        const int y = (int)((cur - base) / n);  // pair within the sequence: kv head, row block
        const long long p0 = base + (long long)y * n, p1 = p0 + n;
        const long long s1 = min(end, p1);
        const long long p = (long long)b * HR + y;
        const long long first = p0 / w, last = (p1 - 1) / w;
        __syncthreads();  // the previous segment's shared memory is free
        if constexpr (REGS)
            decode_segment_regs<T, D, NW, ST>(a, smem_raw, b, y / RB, y % RB, (int)(cur - p0),
                                              (int)(s1 - p0), p, p + blockIdx.x, p + first,
                                              (int)(last - first + 1));
        else
            decode_segment<T, D, NW, ST>(a, smem_raw, b, y / RB, y % RB, (int)(cur - p0),
                                         (int)(s1 - p0), p, p + blockIdx.x, p + first,
                                         (int)(last - first + 1));
        cur = s1;
    }
}

}  // namespace xattn

#define XATTN_DECODE_PARAMS                                                                 \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,              \
        const int *table, const int *lengths, unsigned short *o, float *lse, float *o_part, \
        float *lse_part, int *counters, int batch, int hq, int hkv, int T, int page_size,   \
        int max_pages, int splits, float scale, float softcap, int wl, int uniform,         \
        int contiguous, const float *alibi, long long alibi_bs

#define XATTN_DECODE_ARGS                                                                   \
    xattn::DecodeArgs{q,         k,        v,      table,   lengths, o,     lse,            \
                      o_part,    lse_part, counters, batch, hq,      hkv,   T,              \
                      page_size, max_pages, splits, scale,  softcap, wl,    uniform,        \
                      contiguous, alibi,   alibi_bs}

// KIND: s, the shared-memory ring of ST stages; r, the register path with prefetch distance ST.
#define XATTN_DECODE_KIND_s 0
#define XATTN_DECODE_KIND_r 1
#define XATTN_DECODE_ENTRY(TN, D, NW, KIND, ST)                                             \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                   \
        decode_splitkv_##TN##_d##D##_w##NW##_##KIND##ST(XATTN_DECODE_PARAMS) {              \
        xattn::decode_core<xattn::TN, D, NW, ST, XATTN_DECODE_KIND_##KIND>(                 \
            XATTN_DECODE_ARGS);                                                             \
    }
#define XATTN_DECODE_ONE(TN, D, NW, KIND, ST) XATTN_DECODE_ENTRY(TN, D, NW, KIND, ST)

// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit with one macro call per entry -- both from the list in
// xattn/_backends/cupy_/instances.py. Without those options this file builds nothing.
#if defined(XATTN_D) && defined(XATTN_ST)
XATTN_DECODE_ONE(XATTN_TN, XATTN_D, XATTN_NW, XATTN_KIND, XATTN_ST)
#endif
