// Experimental Hopper schedules of flash_fwd_sm90.cu, modes 0-3 (no warp specialisation):
// the loops measured before mode 11 and kept for comparisons (tools/wgmma_probe.py --bench,
// benchmarks/gpu_flash.py --configs). Appended after xattn/kernels/flash_fwd_sm90.cu by
// experimental builds only (tools/check_kernels.py --experimental; the launcher with an
// experimental config=..., from a checkout): the package ships no entry that uses it.

namespace xattn::sm90 {

// OVL = false: per key block, S = Q K^T, softmax, O += P V, each wgmma batch waited for at
// once; two buffers (the next block loads during this one).
// OVL = true (after FlashAttention-3's intra-warpgroup overlap): the P V of block j - 1 is
// issued after block j's Q K^T and masking and runs on the tensor cores during block j's
// softmax; three buffers, since V of block j - 1 is still read while block j + 1 loads.
template <class T, int D, int BN, int NWG, bool OVL, bool SW, bool EARLY>
__device__ __forceinline__ void flash_fwd_sm90_core(const FwdArgs& a) {
#if XATTN_SM90_OK
    static_assert(D == 64 || D == 128, "wgmma wrappers exist for N = 64 and 128");
    static_assert(BN == 64 || BN == 128, "wgmma wrappers exist for N = 64 and 128");
    constexpr int BM = NWG * 64;
    constexpr int NT = NWG * 128;
    constexpr int NBUF = OVL ? 3 : 2;
    constexpr unsigned TILE = BN * D * 2;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned sQa = smem_u32(smem_raw);
    if constexpr (SW) sQa = (sQa + 1023u) & ~1023u;  // the loader allocated 1 KiB more
    const unsigned sKa = sQa + BM * D * 2;
    const unsigned sVa = sKa + NBUF * TILE;

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    // Heavy (late, causal) query blocks first: better tail balance.
    const int qblk = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq = a.sq, sk = a.sk, off = sk - sq;
    const int q0 = qblk * BM, q1 = min(q0 + BM, sq);
    const int wq0 = q0 + wg * 64, wq1 = min(wq0 + 64, sq);  // this warpgroup's rows
    const int hkv = a.hq / a.group;
    const long long bh = (long long)b * a.hq + h;
    const unsigned short* Qg = a.q + bh * sq * D;
    const long long kvh = ((long long)b * hkv + h / a.group) * sk * D;
    const unsigned short* Kg = a.k + kvh;
    const unsigned short* Vg = a.v + kvh;

    // Key blocks the block loads (a superset for every row) and those this warpgroup uses.
    int kb0, kb1, wkb0 = 0, wkb1 = 0;
    xattn_key_blocks(q0, q1, off, sk, a.causal, a.wl, a.wr, BN, kb0, kb1);
    if (wq1 > wq0) xattn_key_blocks(wq0, wq1, off, sk, a.causal, a.wl, a.wr, BN, wkb0, wkb1);

    float acc[D / 2];
    float s[BN / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
    float m[2] = {-XATTN_INF, -XATTN_INF}, l[2] = {0.f, 0.f};
    const float sl2 = a.scale * XATTN_LOG2E;

    const unsigned long long dq = kmajor_desc<SW, BM, D>(sQa, wg * 64);

    if (kb1 > kb0) {
        load_any<SW, BM, D, NT>(sQa, Qg, q0, sq, tid);
        load_any<SW, BN, D, NT>(sKa, Kg, kb0 * BN, sk, tid);
        load_any<SW, BN, D, NT>(sVa, Vg, kb0 * BN, sk, tid);
        cp_async_commit_ordered();
        if constexpr (OVL) {
            if (kb0 + 1 < kb1) {
                load_any<SW, BN, D, NT>(sKa + TILE, Kg, (kb0 + 1) * BN, sk, tid);
                load_any<SW, BN, D, NT>(sVa + TILE, Vg, (kb0 + 1) * BN, sk, tid);
            }
            cp_async_commit_ordered();  // possibly empty: one group per block keeps the count uniform
        }
    }

    if constexpr (!OVL) {
        for (int kb = kb0; kb < kb1; ++kb) {
            const int buf = (kb - kb0) & 1;
            if (kb + 1 < kb1) {
                // The other buffer was last read in the previous iteration, which ended with a
                // barrier after every warpgroup's wgmma.wait_group 0.
                load_any<SW, BN, D, NT>(sKa + (buf ^ 1) * TILE, Kg, (kb + 1) * BN, sk, tid);
                load_any<SW, BN, D, NT>(sVa + (buf ^ 1) * TILE, Vg, (kb + 1) * BN, sk, tid);
                cp_async_commit_ordered();
                cp_async_wait_ordered<1>();
            } else {
                cp_async_wait_ordered<0>();
            }
            fence_proxy_async();  // make this thread's cp.async data visible to wgmma
            __syncthreads();

            // Warpgroup-uniform: under causal / window a warpgroup may see none of this block.
            if (kb >= wkb0 && kb < wkb1) {
                // S = Q K^T: D / 16 chained wgmmas, the first overwrites S (scale-d = 0).
                const unsigned long long dk = kmajor_desc<SW, BN, D>(sKa + buf * TILE, 0);
                fence_regs(s);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks)
                    wgmma_ss(s, dq + kmajor_step<SW, BM>(ks), dk + kmajor_step<SW, BN>(ks),
                             ks > 0 ? 1 : 0, T());
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(s);

                float alpha[2];
                softmax_tile<BN>(s, m, l, alpha, a, wq0, wq1, kb * BN, warp, g, t4, sl2);
                rescale<D>(acc, alpha);

                // O += P V: P rounded to the input type (its float32 sum went into l).
                unsigned p[BN / 16][4];
                pack_p<T, BN>(p, s);
                const unsigned long long dv = mnmajor_desc<SW, BN, D>(sVa + buf * TILE);
                fence_regs(acc);
                wgmma_fence();
#pragma unroll
                for (int j = 0; j < BN / 16; ++j)
                    wgmma_rs<1>(acc, p[j], dv + mnmajor_step<SW, D>(j), 1,
                                T());
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(acc);
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) fence_regs(p[j]);
            }
            __syncthreads();  // the next iteration's cp.async overwrites the other buffer
        }
    } else if constexpr (EARLY) {
        // As the overlap schedule below, but S = Q K^T of block kb and the P V of block kb - 1
        // go to the tensor cores back to back, and the softmax of block kb waits for S only
        // (wait_group 1), running while P V executes. The masking branch sits outside the
        // wgmma pipeline: each arm issues, waits for and finishes its own wgmmas (ptxas
        // serialises wgmmas in flight across a branch it cannot prove warpgroup-uniform).
        // Every warpgroup runs every block of the thread block's range, as below.
        // Not built (see the entry list): ptxas still serialises it (C7513).
        unsigned pp[BN / 16][4];  // P of the previous block (zero before the first)
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) pp[j][0] = pp[j][1] = pp[j][2] = pp[j][3] = 0u;
        for (int kb = kb0; kb < kb1; ++kb) {
            const int buf = (kb - kb0) % 3;
            const int pbuf = (kb - kb0 + 2) % 3;  // block kb - 1's buffer
            cp_async_wait_ordered<1>();  // block kb's group (only block kb + 1's may be in flight)
            fence_proxy_async();
            __syncthreads();
            const unsigned long long dk = kmajor_desc<SW, BN, D>(sKa + buf * TILE, 0);
            // The first block multiplies P = 0 by its own (loaded, finite) V.
            const unsigned long long dv =
                mnmajor_desc<SW, BN, D>(sVa + (kb == kb0 ? buf : pbuf) * TILE);
            auto step = [&](auto masked) {
                // Every descriptor computed before the first wgmma: an instruction defining a
                // wgmma operand between the two batches makes ptxas serialise them (C7513).
                unsigned long long dqs[D / 16], dks[D / 16], dvs[BN / 16];
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks) {
                    dqs[ks] = dq + kmajor_step<SW, BM>(ks);
                    dks[ks] = dk + kmajor_step<SW, BN>(ks);
                    asm volatile("" : "+l"(dqs[ks]), "+l"(dks[ks]));
                }
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) {
                    dvs[j] = dv + mnmajor_step<SW, D>(j);
                    asm volatile("" : "+l"(dvs[j]));
                }
                fence_regs(s);
                fence_regs(acc);
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks)
                    wgmma_ss(s, dqs[ks], dks[ks], ks > 0 ? 1 : 0, T());
                wgmma_commit();
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) wgmma_rs<1>(acc, pp[j], dvs[j], 1, T());
                wgmma_commit();
                wgmma_wait<1>();  // S is in, P V may still run
                fence_regs(s);
                // The softmax works on a copy: an instruction that wrote s (an operand of the
                // next S wgmma) while P V is in flight makes ptxas serialise every wgmma
                // (C7513).
                float sp[BN / 2];
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) sp[i] = s[i];
                if constexpr (decltype(masked)::value)
                    mask_rows<BN>(sp, a, wq0, kb * BN, warp, g, t4);
                float alpha[2];
                softmax_rows<BN>(sp, m, l, alpha, sl2);
                unsigned pn[BN / 16][4];
                pack_p<T, BN>(pn, sp);
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) fence_regs(pn[j]);
                fence_regs(alpha);
                fence_regs(m);
                fence_regs(l);
                wgmma_wait<0>();
                fence_regs(acc);
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
                rescale<D>(acc, alpha);
#pragma unroll
                for (int j = 0; j < BN / 16; ++j)
#pragma unroll
                    for (int i = 0; i < 4; ++i) pp[j][i] = pn[j][i];
            };
            if (xattn_tile_needs_test(wq0, wq1, kb * BN, BN, off, sk, a.causal, a.wl, a.wr))
                step(bool_c<true>());
            else
                step(bool_c<false>());

            __syncthreads();  // every warpgroup is done with block kb - 1's buffer
            if (kb + 2 < kb1) {
                const int nb = (kb + 2 - kb0) % 3;
                load_any<SW, BN, D, NT>(sKa + nb * TILE, Kg, (kb + 2) * BN, sk, tid);
                load_any<SW, BN, D, NT>(sVa + nb * TILE, Vg, (kb + 2) * BN, sk, tid);
            }
            cp_async_commit_ordered();
        }
        if (kb1 > kb0) {
            const unsigned long long dv =
                mnmajor_desc<SW, BN, D>(sVa + ((kb1 - 1 - kb0) % 3) * TILE);
            fence_regs(acc);
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < BN / 16; ++j)
                wgmma_rs<1>(acc, pp[j], dv + mnmajor_step<SW, D>(j), 1, T());
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc);
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
        }
        cp_async_wait_ordered<0>();  // no cp.async left in flight at exit
    } else {
        // Every warpgroup runs every block of the thread block's range (a block a warpgroup
        // cannot see masks to p = 0 and alpha = 1): no wgmma sits in a warpgroup-dependent
        // branch, which would make ptxas serialise them (C7520).
        unsigned pp[BN / 16][4];  // P of the previous block, its P V not yet issued
        for (int kb = kb0; kb < kb1; ++kb) {
            const int buf = (kb - kb0) % 3;
            const int pbuf = (kb - kb0 + 2) % 3;  // block kb - 1's buffer
            cp_async_wait_ordered<1>();  // block kb's group (only block kb + 1's may be in flight)
            fence_proxy_async();
            __syncthreads();

            // S = Q K^T, waited for at once: the masking below branches, and ptxas completes
            // every wgmma in flight before a branch it cannot prove uniform.
            const unsigned long long dk = kmajor_desc<SW, BN, D>(sKa + buf * TILE, 0);
            fence_regs(s);
            fence_regs(acc);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks)
                wgmma_ss(s, dq + kmajor_step<SW, BM>(ks), dk + kmajor_step<SW, BN>(ks),
                         ks > 0 ? 1 : 0, T());
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(s);
            mask_tile<BN>(s, a, wq0, wq1, kb * BN, warp, g, t4);

            // O += P V of block kb - 1, running during this block's softmax. The first block
            // has none: it adds P = 0 times its own (loaded, finite) V instead of branching.
            const bool first = kb == kb0;
            const unsigned long long dv =
                mnmajor_desc<SW, BN, D>(sVa + (first ? buf : pbuf) * TILE);
            if (first) {
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) pp[j][0] = pp[j][1] = pp[j][2] = pp[j][3] = 0u;
            }
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
            fence_regs(acc);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < BN / 16; ++j)
                wgmma_rs<1>(acc, pp[j], dv + mnmajor_step<SW, D>(j), 1,
                            T());
            wgmma_commit();

            float alpha[2];
            softmax_rows<BN>(s, m, l, alpha, sl2);
            unsigned pn[BN / 16][4];
            pack_p<T, BN>(pn, s);
            // Pin the softmax and the packing before the wait (the compiler would otherwise
            // sink them below it and lose the overlap).
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) fence_regs(pn[j]);
            fence_regs(alpha);
            fence_regs(m);
            fence_regs(l);
            wgmma_wait<0>();
            fence_regs(acc);
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
            rescale<D>(acc, alpha);
#pragma unroll
            for (int j = 0; j < BN / 16; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) pp[j][i] = pn[j][i];

            __syncthreads();  // every warpgroup is done with block kb - 1's buffer
            if (kb + 2 < kb1) {
                const int nb = (kb + 2 - kb0) % 3;
                load_any<SW, BN, D, NT>(sKa + nb * TILE, Kg, (kb + 2) * BN, sk, tid);
                load_any<SW, BN, D, NT>(sVa + nb * TILE, Vg, (kb + 2) * BN, sk, tid);
            }
            cp_async_commit_ordered();
        }
        if (kb1 > kb0) {
            const unsigned long long dv = mnmajor_desc<SW, BN, D>(
                sVa + ((kb1 - 1 - kb0) % 3) * TILE);
            fence_regs(acc);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < BN / 16; ++j)
                wgmma_rs<1>(acc, pp[j], dv + mnmajor_step<SW, D>(j), 1,
                            T());
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc);
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
        }
        cp_async_wait_ordered<0>();  // no cp.async left in flight at exit
    }

    write_out<T, D>(a, acc, m, l, bh, wq0, warp, g, t4);
#else
    (void)a;
    __trap();  // built for a target without wgmma: the loader only launches on sm_90a
#endif
}

}  // namespace xattn::sm90
