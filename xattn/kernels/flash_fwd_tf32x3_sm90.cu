// Flash attention forward for float32 at float32 accuracy on Hopper (sm_90a): 3xTF32 on
// warpgroup MMA (wgmma.mma_async m64nNk8 .tf32), the `cupy.tf32x3_sm90` entry.
//
// The arithmetic is flash_fwd_tf32.cu's X3 variant (the `cupy.tf32x3` entry on mma.sync):
// every float32 operand x is split into hi = tf32(x) and lo = tf32(x - hi) (cvt.rna.tf32.f32;
// x - hi is exact, Sterbenz; lo = 0 where hi == x, which keeps +-inf inputs +-inf), and each
// product is taken as lo*hi' + hi*lo' + hi*hi' (lo*lo' dropped: about 2^-21 relative per
// product instead of TF32's 2^-10). Two choices carry over from that kernel for the same
// reason (the tensor cores truncate each float32 sum they write):
//   S = Q K^T: hi*hi' chains into s (D / 8 wgmmas), the two small products into their own
//     accumulator st (2 D / 8), added to s once per key tile on the CUDA cores;
//   O += P V: each key tile's P V is summed from zero in ob (3 BN / 8 wgmmas, scale-d 0 on the
//     first) and added to the output accumulator on the CUDA cores, so the truncation bias
//     grows with BN, not with Sk.
// The softmax weights P stay float32 (l sums them unrounded) and are split in registers.
//
// Schedule (flash_fwd_sm90.cu's flash_fwd_sm90_ws, simplified): one thread block = a producer
// warpgroup (warpgroup 0) and NWG = 2 consumer warpgroups of 64 query rows each, a ring of
// ST = 2 stages handed over by mbarriers:
//   full[s]  (count 128, every producer thread): the thread's share of stage s is written and
//            fenced for the async proxy (fence.proxy.async: st.shared is a generic-proxy write
//            that wgmma reads through the async proxy);
//   empty[s] (count 4 NWG, lane 0 of every consumer warp): the P V that reads stage s last
//            has completed (wgmma.wait_group 0), so the producer may overwrite it.
// Each consumer warpgroup runs its key tiles in order, without overlapping its own GEMMs and
// softmax: the two consumers drift apart and the tensor cores serve one while the other runs
// its softmax. The overlap of flash_fwd_sm90_ws (the previous tile's P V issued before this
// tile's softmax) is the experimental OVL schedule (the _ov entry, see flash_fwd_tf32x3_sm90
// below): it releases a V stage one iteration later, so with two stages the producer would
// have only part of an iteration to refill a K+V stage; OVL keeps separate K and V rings
// (flash_fwd_sm90_ws_kv's), and the P of the previous tile (64 registers) and ob (32) stay
// live during the softmax (setmaxnreg 216 for its consumers, 64 for its producer, which
// loads half a tile at a time). Which schedule is faster is for the first GPU run to say.
//
// Why the producer does the splitting (and not TMA): TF32 wgmma takes only K-major operands,
// and in P V the GEMM's K is the key axis, so V must sit in shared memory transposed (D rows
// of keys, keys contiguous) -- a layout no TMA box gives from (keys, D) rows -- and every
// operand must be split into hi / lo anyway. The producer warpgroup loads K and V from global
// memory (ld.global 16 bytes), splits in registers and stores hi and lo straight into their
// swizzled tiles: one pass, no staging buffer. Per 64-key tile at D = 64 a producer thread
// moves 16 float4 of K and V: 16 loads, 64 splits (cvt.rna + compare + sub + cvt.rna) and 32
// 16-byte stores, about 1060 SASS instructions (ptxas 13.0) -- one producer warp per
// scheduler, so about 1060 issue cycles and one load latency per tile, ~1.6 us. The consumers
// run 96 wgmmas of 64x64x8 on that tile (48 per warpgroup, 32 cycles each at the TF32 peak:
// ~1.7 us at the peak, ~5 us at a third of it), so the ring of 2 stages keeps them fed except
// near the peak, where the producer would become the limit (measure: tools/gpu_check_tf32wg.sh
// bench). Splitting in the consumers instead would put the same instructions on the critical
// path of the GEMMs and need a barrier between the two consumer warpgroups per tile.
//
// Shared memory (128-byte swizzle, descriptor layout type 1, each tile 1024-byte aligned): a
// K-major tile of R rows x C floats is C / 32 panels of R rows x 128 bytes; the 16-byte chunk
// c (4 floats) of row r sits at chunk c ^ (r % 8) of its row -- byte for byte the 16-bit
// layout of flash_fwd_sm90.cu with twice the elements per chunk, so its descriptors serve:
// SBO 1024 (next 8 rows), a k-step of 8 TF32 = 32 bytes inside a panel (kmajor_step).
//   Q hi, Q lo      BM x D      (rows = queries, K = head dim)
//   K hi, K lo      BN x D      per stage (rows = keys,    K = head dim)
//   Vt hi, Vt lo    D x BN      per stage (rows = head dim, K = keys)
// D = 64, BN = 64: Q 64 KiB + 2 stages x 64 KiB = 192 KiB (+ 1 KiB for the alignment).
//
// P as the A operand from registers: the score accumulator holds, per thread, keys 8 j + 2 t
// and 8 j + 2 t + 1 of rows g and g + 8 for each 8-key chunk j, while the A fragment of
// m64k8 wants k = t and k = t + 4. As in flash_fwd_tf32.cu, the order of the keys inside each
// 8-key group is permuted: k position t <-> key 2 t, position t + 4 <-> key 2 t + 1, so that
// a0..a3 = s[4 j + 0], s[4 j + 2], s[4 j + 1], s[4 j + 3] (no shuffles), and the producer
// writes Vt with the same permutation (its row d, position 4 par + u of group j holds key
// 8 j + 2 u + par). The dot product over the keys is unchanged.
//
// Layout (contiguous): q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), out like q, all float32;
// lse (B, Hq, Sq) float32 natural log. GQA: query head h reads kv head h / group. Bottom-right
// alignment: query i sits at key position i + (Sk - Sq). Options: causal, window, scale, GQA,
// lse (the masking rules of masking.cuh through flash_fwd_sm90.cu's mask_tile). Rows past the
// sequence ends are zero-filled (K, V: so a hidden key contributes 0 * 0, never NaN).
//
// No CUDA headers; the local headers are inlined by the loader. Compiled for sm_90a only
// (XATTN_SM90_OK); for other targets the entry traps.
// Entry points: flash_fwd_tf32x3_sm90_d<D>_n<BN> (the default schedule) and
// flash_fwd_tf32x3_sm90_d<D>_n<BN>_ov (OVL, experimental: built on request) -- the end of
// this file.

#define XATTN90_NO_ENTRIES 1
#include "flash_fwd_sm90.cu"
#include "tf32.cuh"

namespace xattn::sm90x3 {

using namespace xattn::sm90;

struct Args : FwdOperands<float> {
    int causal, wl, wr;  // window sides, -1 = unbounded
};

__device__ __forceinline__ void st_shared4(unsigned addr, uint4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
}

// Byte offset of 16-byte chunk c (floats 4 c .. 4 c + 3) of row r in a K-major tile of R rows
// (128-byte swizzle, panels of 32 floats).
template <int R>
__device__ __forceinline__ unsigned sw_off(int r, int c) {
    return (unsigned)((c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Four floats split into the hi and lo tiles at the same offset.
__device__ __forceinline__ void store_split(unsigned hi_tile, unsigned lo_tile, unsigned off,
                                            float4 x) {
    uint4 h, l;
    split_tf32(x.x, h.x, l.x);
    split_tf32(x.y, h.y, l.y);
    split_tf32(x.z, h.z, l.z);
    split_tf32(x.w, h.w, l.w);
    st_shared4(hi_tile + off, h);
    st_shared4(lo_tile + off, l);
}

__device__ __forceinline__ float4 load4(const float* p, bool ok) {
    return ok ? __ldg(reinterpret_cast<const float4*>(p)) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// ROWS rows of a (., D) float32 matrix from row0 on (rows >= limit read as zeros), split into
// K-major hi / lo tiles by NT threads: thread tid takes chunks tid, tid + NT, ... (eight
// consecutive threads write one 128-byte swizzled row segment: no bank conflict; their global
// reads are 128 contiguous bytes). UNROLL loads are issued before their splits.
template <int ROWS, int D, int NT, int UNROLL>
__device__ __forceinline__ void split_rows(unsigned hi, unsigned lo, const float* g, int row0,
                                           int limit, int tid) {
    constexpr int CPR = D / 4;
    constexpr int TOTAL = ROWS * CPR;
    static_assert(TOTAL % (NT * UNROLL) == 0, "whole passes");
#pragma unroll 1
    for (int it = 0; it < TOTAL / NT; it += UNROLL) {
        float4 x[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int i = (it + u) * NT + tid, r = i / CPR, c = i % CPR;
            x[u] = load4(g + (long long)(row0 + r) * D + c * 4, row0 + r < limit);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int i = (it + u) * NT + tid, r = i / CPR, c = i % CPR;
            store_split(hi, lo, sw_off<ROWS>(r, c), x[u]);
        }
    }
}

// One key tile into a ring stage, by the 128 producer threads: K (BN rows x D) split into
// K-major hi / lo tiles in split_rows's layout, and V written transposed -- Vt (D rows x BN keys,
// K-major for P V) -- with the keys of each 8-key group permuted (see the header), split into
// hi / lo. Rows >= limit read as zeros. Every load of the tile is issued before the first
// split (16 float4 at D = BN = 64: 64 registers of the producer's 96), so a tile costs about
// one load latency, not one per pass (ptxas interleaves the later loads with the first
// stores, and hoists the first ones above the wait for the stage: they read global memory).
//   K: chunk i = tid + 128 u (u < KU) is row i / (D / 4), columns 4 (i % (D / 4)) ...
//   V: job = tid + 128 w (w < VU): Vt chunk c = 8 pk + ci (panel pk, ci = job % 8) holds
//      positions 4 c .. 4 c + 3 = keys 8 (c / 2) + 2 u + (c % 2), u = 0..3; the thread loads
//      those four key rows at columns 4 tc .. 4 tc + 3 (tc = job / 8 % (D / 4)) and stores one
//      chunk into each of the Vt rows 4 tc .. 4 tc + 3. The eight threads of a quarter warp
//      differ in ci only: their stores hit eight distinct swizzled chunks of one row (no bank
//      conflict), and a warp's loads cover 8 rows x 64 contiguous bytes per u (whole sectors).
// DO_K / DO_V: the K part into kbase (hi; lo KT bytes further), the V part into vbase (Vt hi;
// lo KT further); the overlapped schedule (OVL) fills its K and V rings separately.
template <int BN, int D, bool DO_K = true, bool DO_V = true>
__device__ __forceinline__ void produce_tile(unsigned kbase, unsigned vbase, const float* Kg,
                                             const float* Vg, int row0, int limit, int tid) {
    constexpr int CPR = D / 4, TC = D / 4;
    constexpr unsigned KT = BN * D * 4;
    constexpr int KU = BN * CPR / 128;           // K chunks per thread
    constexpr int VU = (BN / 32) * 8 * TC / 128;  // V jobs per thread (4 chunks each)
    static_assert(BN * CPR % 128 == 0 && (BN / 32) * 8 * TC % 128 == 0, "whole passes");
    static_assert(128 % CPR == 0 && 128 % (8 * TC) == 0, "a thread's column is fixed");
    // A thread's K chunks lie 128 / CPR rows apart in one column, its V jobs one panel apart
    // at the same (ci, tc): one base pointer each and immediate offsets (64-bit addresses per
    // load would not fit the producer's registers beside the data).
    constexpr int KSTEP = 128 / CPR;
    const int kr = tid / CPR, ci = tid & 7, tc = (tid >> 3) % TC;
    const float* kp = Kg + (long long)(row0 + kr) * D + (tid % CPR) * 4;
    const int kleft = limit - row0 - kr;  // this thread's K rows inside the sequence: u KSTEP <
    const int vkey = (ci >> 1) * 8 + (ci & 1);  // key of (u = 0, pk = 0), relative to row0
    const float* vp = Vg + (long long)(row0 + vkey) * D + tc * 4;
    const int vleft = limit - row0 - vkey;
    float4 xk[DO_K ? KU : 1], xv[DO_V ? VU : 1][4];
    if constexpr (DO_K) {
#pragma unroll
        for (int u = 0; u < KU; ++u) xk[u] = load4(kp + u * KSTEP * D, u * KSTEP < kleft);
    }
    if constexpr (DO_V) {
#pragma unroll
        for (int w = 0; w < VU; ++w)  // job w: panel pk = w * 128 / (8 TC), keys 32 pk further
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int rel = (w * 128 / (8 * TC)) * 32 + 2 * u;
                xv[w][u] = load4(vp + rel * D, rel < vleft);
            }
    }
    if constexpr (DO_K) {
#pragma unroll
        for (int u = 0; u < KU; ++u)
            store_split(kbase, kbase + KT, sw_off<BN>(kr + u * KSTEP, tid % CPR), xk[u]);
    }
#pragma unroll
    for (int w = 0; w < (DO_V ? VU : 0); ++w) {
        const int c = (w * 128 / (8 * TC)) * 8 + ci, d0 = tc * 4;  // chunk of panel pk
        const unsigned hi = vbase, lo = vbase + KT;
        const float4(&x)[4] = xv[w];
        store_split(hi, lo, sw_off<D>(d0 + 0, c), make_float4(x[0].x, x[1].x, x[2].x, x[3].x));
        store_split(hi, lo, sw_off<D>(d0 + 1, c), make_float4(x[0].y, x[1].y, x[2].y, x[3].y));
        store_split(hi, lo, sw_off<D>(d0 + 2, c), make_float4(x[0].z, x[1].z, x[2].z, x[3].z));
        store_split(hi, lo, sw_off<D>(d0 + 3, c), make_float4(x[0].w, x[1].w, x[2].w, x[3].w));
    }
}

// OVL (the _ov entries, experimental): the previous key tile's P V is issued before this
// tile's softmax and awaited after it (flash_fwd_sm90_ws's overlap), with separate K and V
// rings of two stages each (flash_fwd_sm90_ws_kv's): a K stage comes back right after its
// Q K^T, a V stage after its P V, one iteration later; the producer fills K one tile ahead of
// V (K0, K1, V0, K2, V1, ...). Registers during the overlap: P hi / lo of the previous tile
// and ob in flight, s under the softmax; this tile's P is split after the wait.
template <int D, int BN, bool OVL>
__device__ __forceinline__ void flash_fwd_tf32x3_sm90(const Args& a) {
#if XATTN_SM90_OK
    // D = 128 would need 384 KiB with this ring (Q hi / lo of 128 rows is 128 KiB alone).
    static_assert(D == 64 && BN == 64, "shared memory is sized for D = 64, 64-key tiles");
    constexpr int NWG = 2;
    constexpr int BM = NWG * 64;
    constexpr int NC = NWG * 128;  // consumer threads
    constexpr int ST = 2;          // ring stages (K hi/lo + Vt hi/lo each; OVL: of K, of V)
    constexpr unsigned QT = BM * D * 4, KT = BN * D * 4;  // bytes of one hi or lo tile
    constexpr unsigned STAGE = 4 * KT;
    // Registers (65536 for 384 threads): the producer keeps 96 (a tile's 16 loads of 16 bytes
    // are 64; at 88 ptxas 13.0 spilled), the consumers take 200 each (their code uses R0-R167
    // under that cap): 128 x 96 + 256 x 200 = 63488. OVL: the producer loads half a tile at a
    // time (K or V: 32 registers of data) and keeps PREGS_OVL, the consumers (P V in flight
    // during the softmax) take CREGS_OVL.
#ifndef XATTN_X3SM90_PREGS_OVL
#define XATTN_X3SM90_PREGS_OVL 64
#define XATTN_X3SM90_CREGS_OVL 216
#endif
    constexpr int PREGS = OVL ? XATTN_X3SM90_PREGS_OVL : 96;
    constexpr int CREGS = OVL ? XATTN_X3SM90_CREGS_OVL : 200;
    // setmaxnreg moves registers inside the block's launch allocation (168 a thread for 384
    // threads, the __launch_bounds__ cap): a consumer's setmaxnreg.inc beyond what the
    // producer's .dec gave back would wait forever.
    static_assert(128 * PREGS + NC * CREGS <= 384 * 168, "setmaxnreg beyond the allocation");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    // full[0..ST), empty[0..ST); OVL: full_k, full_v, empty_k, empty_v, ST each.
    __shared__ __align__(8) unsigned long long bars[OVL ? 4 * ST : 2 * ST];
    const unsigned sQh = (smem_u32(smem_raw) + 1023u) & ~1023u;  // 1 KiB more allocated
    const unsigned sQl = sQh + QT;
    // Stage s: K hi, K lo, Vt hi, Vt lo at sS + s STAGE; OVL: K stage s (hi, lo) at
    // sS + 2 s KT, V stage s (Vt hi, lo) at sS + 2 ST KT + 2 s KT (the same bytes in all).
    const unsigned sS = sQl + QT;
    const unsigned fullb = smem_u32(bars), emptyb = fullb + (OVL ? 2 : 1) * ST * 8;
    const unsigned fullv = fullb + ST * 8, emptyv = emptyb + ST * 8;  // OVL only
    auto k_tile = [&](int i) {  // K hi of the i-th tile (lo KT further)
        return OVL ? sS + (i % ST) * 2 * KT : sS + (i % ST) * STAGE;
    };
    auto v_tile = [&](int i) {  // Vt hi of the i-th tile (lo KT further)
        return OVL ? sS + 2 * ST * KT + (i % ST) * 2 * KT : sS + (i % ST) * STAGE + 2 * KT;
    };

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int qblk = gridDim.x - 1 - blockIdx.x;  // heavy (late, causal) query blocks first
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int q0 = qblk * BM, q1 = min(q0 + BM, sq);
    const int hkv = a.hq / a.group;
    const long long bh = (long long)b * a.hq + h;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;
    int kb0, kb1;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    const int nkb = kb1 > kb0 ? kb1 - kb0 : 0;

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < (OVL ? 2 : 1) * ST; ++s) {
            mbar_init(fullb + s * 8, 128);
            mbar_init(emptyb + s * 8, NWG * 4);  // one arrival per consumer warp
        }
    }
    __syncthreads();  // the only block-wide barrier: the mbarriers are initialised

    if (wg == 0) {
        // Producer. Tile kb0 + i goes into stage i % ST once the stage's previous tile
        // (i - ST) has been released by every consumer warp.
        setmaxnreg_dec<PREGS>();
        const float* Kg = a.k + kvh;
        const float* Vg = a.v + kvh;
        if constexpr (OVL) {
            auto load_k = [&](int i) {
                if (i >= ST) mbar_wait(emptyb + (i % ST) * 8, ((i / ST) - 1) & 1);
                produce_tile<BN, D, true, false>(k_tile(i), 0u, Kg, Vg, (kb0 + i) * BN, sk, tid);
                fence_proxy_async();  // this thread's st.shared, visible to wgmma
                mbar_arrive(fullb + (i % ST) * 8);
            };
            auto load_v = [&](int i) {
                if (i >= ST) mbar_wait(emptyv + (i % ST) * 8, ((i / ST) - 1) & 1);
                produce_tile<BN, D, false, true>(0u, v_tile(i), Kg, Vg, (kb0 + i) * BN, sk, tid);
                fence_proxy_async();
                mbar_arrive(fullv + (i % ST) * 8);
            };
            // K0, K1, V0, K2, V1, ...: step j loads K(j) and V(j - 1) (one copy of each
            // in the code: ptxas spilled the producer with K(0) peeled off the loop).
            for (int j = 0; j <= nkb; ++j) {
                if (j < nkb) load_k(j);
                if (j > 0) load_v(j - 1);
            }
        } else {
            for (int i = 0; i < nkb; ++i) {
                const int st = i % ST;
                if (i >= ST) mbar_wait(emptyb + st * 8, ((i / ST) - 1) & 1);
                produce_tile<BN, D>(k_tile(i), v_tile(i), Kg, Vg, (kb0 + i) * BN, sk, tid);
                fence_proxy_async();  // this thread's st.shared, visible to wgmma's async proxy
                mbar_arrive(fullb + st * 8);
            }
        }
        return;
    }

    // Consumers.
    setmaxnreg_inc<CREGS>();
    const int ctid = tid - 128, cwg = wg - 1;
    const int wq0 = q0 + cwg * 64;

    float acc[D / 2], ob[D / 2], s[BN / 2], st_[BN / 2], m[2], l[2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = ob[i] = 0.f;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = st_[i] = 0.f;
    m[0] = m[1] = -XATTN_INF;
    l[0] = l[1] = 0.f;
    const float sl2 = a.scale * XATTN_LOG2E;
    const unsigned long long dqh = kmajor_desc<true, BM, D>(sQh, cwg * 64);
    const unsigned long long dql = kmajor_desc<true, BM, D>(sQl, cwg * 64);

    if (nkb > 0) {
        split_rows<BM, D, NC, 4>(sQh, sQl, a.q + bh * sq * D, q0, sq, ctid);
        fence_proxy_async();
        named_sync<1, NC>();  // Q hi / lo complete (consumers only; the producer never joins)
    }

    // S = Q K^T of the i-th tile, issued and awaited: small products into st_, hi*hi' into s
    // (scale-d 0 on each chain's first), then added.
    auto qk = [&](int i) {
        const unsigned long long dkh = kmajor_desc<true, BN, D>(k_tile(i), 0);
        const unsigned long long dkl = kmajor_desc<true, BN, D>(k_tile(i) + KT, 0);
        fence_regs(s);
        fence_regs(st_);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < D / 8; ++ks) {
            const unsigned long long qs = kmajor_step<true, BM>(ks);
            const unsigned long long kst = kmajor_step<true, BN>(ks);
            wgmma_ss_tf32(st_, dql + qs, dkh + kst, ks > 0 ? 1 : 0);
            wgmma_ss_tf32(st_, dqh + qs, dkl + kst, 1);
            wgmma_ss_tf32(s, dqh + qs, dkh + kst, ks > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
        fence_regs(st_);
#pragma unroll
        for (int e = 0; e < BN / 2; ++e) s[e] += st_[e];
    };
    // P (in s) split in registers, in the A fragment order (see the header): a0..a3 =
    // s[4 j + 0, 2, 1, 3]. P is finite (or NaN from NaN inputs): no inf guard needed.
    unsigned ph[BN / 8][4], pl[BN / 8][4];
    auto split_p = [&]() {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = s[j * 4 + (e & 1) * 2 + (e >> 1)];
                ph[j][e] = to_tf32(p);
                pl[j][e] = to_tf32(p - __uint_as_float(ph[j][e]));
            }
    };
    // ob = P V of the i-th tile from zero (the scale-d 0 of its first wgmma), issued.
    auto pv_issue = [&](int i) {
        const unsigned long long dvh = kmajor_desc<true, D, BN>(v_tile(i), 0);
        const unsigned long long dvl = kmajor_desc<true, D, BN>(v_tile(i) + KT, 0);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            fence_regs(ph[j]);
            fence_regs(pl[j]);
        }
        fence_regs(ob);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const unsigned long long vs = kmajor_step<true, D>(j);
            wgmma_rs_tf32(ob, pl[j], dvh + vs, j > 0 ? 1 : 0);
            wgmma_rs_tf32(ob, ph[j], dvl + vs, 1);
            wgmma_rs_tf32(ob, ph[j], dvh + vs, 1);
        }
        wgmma_commit();
    };
    // ... awaited, added to the accumulator; the stage of its V released (one arrival per
    // warp: the wait is warpgroup-wide), unless empty is 0.
    auto pv_finish = [&](unsigned empty) {
        wgmma_wait<0>();
        fence_regs(ob);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            fence_regs(ph[j]);
            fence_regs(pl[j]);
        }
        if (lane == 0 && empty != 0u) mbar_arrive(empty);
#pragma unroll
        for (int e = 0; e < D / 2; ++e) acc[e] += ob[e];
    };

    for (int i = 0; i < nkb; ++i) {
        const int stg = i % ST, kb = kb0 + i;
        mbar_wait(fullb + stg * 8, (i / ST) & 1);
        qk(i);
        if constexpr (OVL) {
            if (lane == 0) mbar_arrive(emptyb + stg * 8);  // K stage read by Q K^T
        }
        // Masking and the online softmax (flash_fwd_sm90.cu): s becomes p = 2^(s sl2 - m).
        float alpha[2];
        mask_tile<BN>(s, a, wq0, min(wq0 + 64, sq), kb * BN, warp, g, t4);
        if constexpr (OVL) {
            // The previous tile's P V runs while this tile's softmax does; acc (in the
            // previous tile's scale) takes its ob before the rescale. Iteration 0 issues a
            // P V of P = 0 on tile 0's V (not released), as flash_fwd_sm90_ws does, so that
            // every iteration has the same shape: a P V issued on some paths only makes ptxas
            // inject a wait before the softmax (info C7517), which serialises the overlap.
            const bool first = i == 0;
            const int vi = first ? 0 : i - 1;
            if (first) {
#pragma unroll
                for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) ph[j][e] = pl[j][e] = 0u;
            }
            mbar_wait(fullv + (vi % ST) * 8, (vi / ST) & 1);
            pv_issue(vi);
            softmax_rows<BN>(s, m, l, alpha, sl2);
            fence_regs(s);
            fence_regs(alpha);
            fence_regs(m);
            fence_regs(l);
            pv_finish(first ? 0u : emptyv + (vi % ST) * 8);
            rescale<D>(acc, alpha);
            split_p();
        } else {
            softmax_rows<BN>(s, m, l, alpha, sl2);
            rescale<D>(acc, alpha);
            split_p();
            pv_issue(i);
            pv_finish(emptyb + stg * 8);  // K and V of this stage are read
        }
    }
    if constexpr (OVL) {
        if (nkb > 0) {  // the last tile's P V
            const int li = nkb - 1;
            mbar_wait(fullv + (li % ST) * 8, (li / ST) & 1);
            pv_issue(li);
            pv_finish(emptyv + (li % ST) * 8);
        }
    }
    write_out<float, D>(a, acc, m, l, bh, wq0, warp, g, t4);
#else
    (void)a;
    __trap();
#endif
}

}  // namespace xattn::sm90x3

// Launch (NWG + 1) * 128 = 384 threads, one block per SM (193 KiB of shared memory at D = 64).
// OV: 0 (the default schedule), 1 (OVL, the _ov entries).
#define XATTN_TF32X3_SM90_ENTRY(D, BN, OV, SFX)                                             \
    extern "C" __global__ void __launch_bounds__(384, 1)                                    \
        flash_fwd_tf32x3_sm90_d##D##_n##BN##SFX(const float* q, const float* k,             \
                                                const float* v, float* o, float* lse, int hq, \
                                                int group, int sq, int sk, float scale,       \
                                                int causal, int wl, int wr) {                 \
        xattn::sm90x3::flash_fwd_tf32x3_sm90<D, BN, OV != 0>(xattn::sm90x3::Args{           \
            {q, k, v, o, lse, hq, group, sq, sk, scale}, causal, wl, wr});                  \
    }
// One more expansion level so that -D values expand before ## pastes them.
#define XATTN_TF32X3_SM90_ONE(D, BN, OV, SFX) XATTN_TF32X3_SM90_ENTRY(D, BN, OV, SFX)
// Instantiation: the loader builds one module per entry with -D options, CI one translation
// unit per file with one macro call per entry -- both from xattn/_backends/cupy_/instances.py.
// XATTN_X3SM90_SFX is empty for the default entry (the macro's argument is then empty).
#if defined(XATTN_X3SM90_D)
XATTN_TF32X3_SM90_ONE(XATTN_X3SM90_D, XATTN_X3SM90_BN, XATTN_X3SM90_OV, XATTN_X3SM90_SFX)
#endif
