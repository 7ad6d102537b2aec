// Flash attention forward for Hopper (sm_90a): warpgroup MMA (wgmma.mma_async) with operands in
// shared memory, cp.async double buffering.
//
// One thread block = NWG consumer warpgroups of 128 threads; each warpgroup owns 64 query rows
// (the M of wgmma) of one (batch, query head) and walks the key blocks of BN keys:
//   S = Q K^T   wgmma m64nBNk16, A = Q and B = K both from shared memory (K-major),
//   online softmax in base 2 on the float32 accumulator fragment (rows g and g + 8 of each
//   warp's 16, four lanes per row, exactly like the mma.sync m16n8 layout),
//   O += P V    wgmma m64nDk16, A = P from registers (the S fragment packed to 16-bit pairs is
//               the register A fragment of m64k16), B = V from shared memory, MN-major
//               (V rows are keys = the K of this GEMM), so imm-trans-b = 1.
// Shared memory uses the no-swizzle canonical layout: 8x8 core matrices of 16-bit elements,
// each 128 contiguous bytes (8 rows of 16 bytes). A tile of R rows x D columns is stored
// row-block major: core matrix (rb, cb) (rows 8rb.., columns 8cb..) at byte
// (rb * D / 8 + cb) * 128. Descriptors (PTX ISA "Matrix Descriptor Format"): bits 0-13 start
// address >> 4, 16-29 leading byte offset >> 4 (distance between core matrices along the GEMM
// K dimension), 32-45 stride byte offset >> 4 (along M or N), 62-63 swizzle (0 = none).
//   Q, K (K-major, GEMM K = head dim):  LBO = 128 (next column block), SBO = 16 D (next row block)
//   V    (MN-major, GEMM K = keys):     LBO = 16 D (next key block),   SBO = 128 (next d block)
// tools/wgmma_probe.py checks exactly these layouts on single wgmma instructions.
//
// cp.async writes through the generic proxy and wgmma reads through the async proxy: every
// writer runs fence.proxy.async after its cp.async wait and before the barrier that precedes
// the wgmma.
//
// Layout (contiguous): q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), out like q, lse (B, Hq, Sq)
// float32 natural log. GQA: query head h reads kv head h / group. Bottom-right alignment:
// query i sits at key position i + (Sk - Sq). Options: causal, window, scale, GQA, lse (no
// score mods: those stay on flash_fwd.cu). The same argument list as flash_fwd.cu's entries.
//
// No CUDA headers; masking.cuh is inlined by the loader. The wgmma code is compiled only for
// sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); for other targets the entries trap.
// Entry points: flash_fwd_sm90_<f16|bf16>_d<D>_n<BN>_g<NWG>_o<0|1> (o1: P V overlapped).

#include "masking.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define XATTN_SM90_OK 1
#else
#define XATTN_SM90_OK 0
#endif

namespace xattn90 {

struct f16 {};
struct bf16 {};

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    // src-size 0 zero-fills the 16 bytes: rows past the sequence end read as zeros.
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#if XATTN_SM90_OK
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers that an in-flight wgmma reads or writes: the empty volatile asm "redefines"
// them after the wait (and before the issue), so the compiler moves no use across it.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(unsigned (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// wgmma m64nNk16, f32 accumulate. SS: A and B from shared memory, B K-major (imm-trans-b 0).
// RS: A from registers, B from shared memory (TRANS_B: imm-trans-b, 1 = MN-major). scale-d 0
// overwrites D instead of accumulating.
__device__ __forceinline__ void wgmma_ss(float (&d)[32], unsigned long long da,
                                         unsigned long long db, int scale_d, f16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const unsigned (&a)[4],
                                         unsigned long long db, int scale_d, f16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d),
          "n"(TRANS_B));
}
__device__ __forceinline__ void wgmma_ss(float (&d)[32], unsigned long long da,
                                         unsigned long long db, int scale_d, bf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const unsigned (&a)[4],
                                         unsigned long long db, int scale_d, bf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d),
          "n"(TRANS_B));
}
__device__ __forceinline__ void wgmma_ss(float (&d)[64], unsigned long long da,
                                         unsigned long long db, int scale_d, f16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const unsigned (&a)[4],
                                         unsigned long long db, int scale_d, f16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d),
          "n"(TRANS_B));
}
__device__ __forceinline__ void wgmma_ss(float (&d)[64], unsigned long long da,
                                         unsigned long long db, int scale_d, bf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const unsigned (&a)[4],
                                         unsigned long long db, int scale_d, bf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d),
          "n"(TRANS_B));
}
#endif  // XATTN_SM90_OK

// Shared-memory matrix descriptor, no swizzle (layout type 0), base offset 0.
__device__ __forceinline__ unsigned long long make_desc(unsigned addr, unsigned lbo,
                                                        unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) |
           ((unsigned long long)((lbo >> 4) & 0x3FFFu) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFFu) << 32);
}

// Two floats -> one register holding (lo, hi) in the 16-bit type, round to nearest even.
__device__ __forceinline__ unsigned pack2(float lo, float hi, f16) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, bf16) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Copy a (ROWS x D) tile of 16-bit elements from global (row stride D) into the core-matrix
// layout above; rows at or past `limit` are zero-filled. Chunk c (16 bytes) goes to byte 16 c:
// eight consecutive chunks fill one core matrix (its 8 rows), so the shared-memory writes of a
// warp cover 512 contiguous bytes (no bank conflicts) and each warp reads 8 rows x 64 bytes.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(unsigned sbase, const unsigned short* g, int row0,
                                          int limit, int tid) {
    constexpr int CPR = D / 8;  // core matrices (16-byte chunks) per row
    constexpr int TOTAL = ROWS * CPR;
#pragma unroll
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int c = it * NT + tid;
        if (TOTAL % NT != 0 && c >= TOTAL) break;
        const int cm = c >> 3, rin = c & 7;
        const int r = (cm / CPR) * 8 + rin, col = (cm % CPR) * 8;
        const bool ok = row0 + r < limit;
        const unsigned short* src = ok ? g + (long long)(row0 + r) * D + col : g;
        cp_async16(sbase + (unsigned)(c * 16), src, ok);
    }
}

struct FwdArgs {
    const unsigned short* q;
    const unsigned short* k;
    const unsigned short* v;
    unsigned short* o;
    float* lse;
    int hq, group, sq, sk;
    float scale;         // softmax scale (natural units)
    int causal, wl, wr;  // window sides, -1 = unbounded
};

// Masking and online softmax of one score tile held by a warpgroup: s[n * 4 + hr * 2 + e] is
// row wq0 + 16 warp + g + 8 hr, key k0 + 8 n + 2 t4 + e (the wgmma accumulator layout). On
// return s holds p = 2^(s * sl2 - m), m / l are updated and alpha rescales the old output.
template <int BN>
__device__ __forceinline__ void mask_tile(float (&s)[BN / 2], const FwdArgs& a, int wq0,
                                          int wq1, int k0, int warp, int g, int t4) {
    constexpr int NS = BN / 8;
    const int off = a.sk - a.sq;
    if (xattn_tile_needs_test(wq0, wq1, k0, BN, off, a.sk, a.causal, a.wl, a.wr)) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int qi = wq0 + warp * 16 + g + hr * 8;
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kj = k0 + n * 8 + t4 * 2 + e;
                    if (!xattn_visible(qi, kj, off, a.sk, a.causal, a.wl, a.wr))
                        s[n * 4 + hr * 2 + e] = -XATTN_INF;
                }
        }
    }
}

// Straight-line code (no branch): it may run while a wgmma is in flight.
template <int BN>
__device__ __forceinline__ void softmax_rows(float (&s)[BN / 2], float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], float sl2) {
    constexpr int NS = BN / 8;
    // The 4 lanes of a quad share a row.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float mx = -XATTN_INF;
#pragma unroll
        for (int n = 0; n < NS; ++n)
            mx = fmaxf(mx, fmaxf(s[n * 4 + hr * 2], s[n * 4 + hr * 2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row with nothing visible so far keeps -inf and exponentiates against 0, so every
        // p is exactly 0 (no inf - inf).
        const float m_new = fmaxf(m[hr], mx * sl2);
        const float m_use = m_new == -XATTN_INF ? 0.f : m_new;
        alpha[hr] = ex2(m[hr] - m_use);
        m[hr] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = ex2(fmaf(s[n * 4 + hr * 2 + e], sl2, -m_use));
                s[n * 4 + hr * 2 + e] = p;
                rs += p;
            }
        l[hr] = l[hr] * alpha[hr] + rs;
    }
}

// Masking and online softmax of one score tile held by a warpgroup: s[n * 4 + hr * 2 + e] is
// row wq0 + 16 warp + g + 8 hr, key k0 + 8 n + 2 t4 + e (the wgmma accumulator layout). On
// return s holds p = 2^(s * sl2 - m), m / l are updated and alpha rescales the old output.
template <int BN>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 2], float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], const FwdArgs& a, int wq0,
                                             int wq1, int k0, int warp, int g, int t4,
                                             float sl2) {
    mask_tile<BN>(s, a, wq0, wq1, k0, warp, g, t4);
    softmax_rows<BN>(s, m, l, alpha, sl2);
}

// P rounded to the input type as the register A fragment of m64k16 for key chunk j: rows
// g / g + 8, keys 16 j + 2 t4 (+8), i.e. score chunks 2 j and 2 j + 1.
template <class T, int BN>
__device__ __forceinline__ void pack_p(unsigned (&p)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
        p[j][0] = pack2(s[(2 * j) * 4 + 0], s[(2 * j) * 4 + 1], T());
        p[j][1] = pack2(s[(2 * j) * 4 + 2], s[(2 * j) * 4 + 3], T());
        p[j][2] = pack2(s[(2 * j + 1) * 4 + 0], s[(2 * j + 1) * 4 + 1], T());
        p[j][3] = pack2(s[(2 * j + 1) * 4 + 2], s[(2 * j + 1) * 4 + 3], T());
    }
}

template <int D>
__device__ __forceinline__ void rescale(float (&acc)[D / 2], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            acc[n * 4 + hr * 2] *= alpha[hr];
            acc[n * 4 + hr * 2 + 1] *= alpha[hr];
        }
}

// Epilogue: finish the row sums across the 4 lanes of a row, normalise, write out and lse.
template <class T, int D>
__device__ __forceinline__ void write_out(const FwdArgs& a, const float (&acc)[D / 2],
                                          const float (&m)[2], const float (&l)[2],
                                          long long bh, int wq0, int warp, int g, int t4) {
    unsigned short* Og = a.o + bh * a.sq * D;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float ls = l[hr];
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        ls += __shfl_xor_sync(0xffffffffu, ls, 2);
        const int qi = wq0 + warp * 16 + g + hr * 8;
        const float inv = ls > 0.f ? 1.f / ls : 0.f;
        if (qi < a.sq) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const unsigned pk =
                    pack2(acc[n * 4 + hr * 2] * inv, acc[n * 4 + hr * 2 + 1] * inv, T());
                *reinterpret_cast<unsigned*>(Og + (long long)qi * D + n * 8 + t4 * 2) = pk;
            }
            if (t4 == 0 && a.lse)
                a.lse[bh * a.sq + qi] =
                    ls > 0.f ? (m[hr] + __log2f(ls)) * XATTN_LN2 : -XATTN_INF;
        }
    }
}

// OVL = false: per key block, S = Q K^T, softmax, O += P V, each wgmma batch waited for at
// once; two buffers (the next block loads during this one).
// OVL = true (after FlashAttention-3's intra-warpgroup overlap): the P V of block j - 1 is
// issued after block j's Q K^T and masking and runs on the tensor cores during block j's
// softmax; three buffers, since V of block j - 1 is still read while block j + 1 loads.
template <class T, int D, int BN, int NWG, bool OVL>
__device__ __forceinline__ void flash_fwd_sm90_core(const FwdArgs& a) {
#if XATTN_SM90_OK
    static_assert(D == 64 || D == 128, "wgmma wrappers exist for N = 64 and 128");
    static_assert(BN == 64 || BN == 128, "wgmma wrappers exist for N = 64 and 128");
    constexpr int BM = NWG * 64;
    constexpr int NT = NWG * 128;
    constexpr int NBUF = OVL ? 3 : 2;
    constexpr unsigned ROWBLK = 16 * D;  // bytes between 8-row blocks of a (rows x D) tile
    constexpr unsigned TILE = BN * D * 2;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    const unsigned sQa = smem_u32(smem_raw);
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

    const unsigned long long dq = make_desc(sQa + wg * 64 * D * 2, 128, ROWBLK);

    if (kb1 > kb0) {
        load_tile<BM, D, NT>(sQa, Qg, q0, sq, tid);
        load_tile<BN, D, NT>(sKa, Kg, kb0 * BN, sk, tid);
        load_tile<BN, D, NT>(sVa, Vg, kb0 * BN, sk, tid);
        cp_async_commit();
        if constexpr (OVL) {
            if (kb0 + 1 < kb1) {
                load_tile<BN, D, NT>(sKa + TILE, Kg, (kb0 + 1) * BN, sk, tid);
                load_tile<BN, D, NT>(sVa + TILE, Vg, (kb0 + 1) * BN, sk, tid);
            }
            cp_async_commit();  // possibly empty: one group per block keeps the count uniform
        }
    }

    if constexpr (!OVL) {
        for (int kb = kb0; kb < kb1; ++kb) {
            const int buf = (kb - kb0) & 1;
            if (kb + 1 < kb1) {
                // The other buffer was last read in the previous iteration, which ended with a
                // barrier after every warpgroup's wgmma.wait_group 0.
                load_tile<BN, D, NT>(sKa + (buf ^ 1) * TILE, Kg, (kb + 1) * BN, sk, tid);
                load_tile<BN, D, NT>(sVa + (buf ^ 1) * TILE, Vg, (kb + 1) * BN, sk, tid);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            fence_proxy_async();  // make this thread's cp.async data visible to wgmma
            __syncthreads();

            // Warpgroup-uniform: under causal / window a warpgroup may see none of this block.
            if (kb >= wkb0 && kb < wkb1) {
                // S = Q K^T: D / 16 chained wgmmas, the first overwrites S (scale-d = 0).
                const unsigned long long dk = make_desc(sKa + buf * TILE, 128, ROWBLK);
                fence_regs(s);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks)
                    wgmma_ss(s, dq + (unsigned long long)(ks * 256 >> 4),
                             dk + (unsigned long long)(ks * 256 >> 4), ks > 0 ? 1 : 0, T());
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(s);

                float alpha[2];
                softmax_tile<BN>(s, m, l, alpha, a, wq0, wq1, kb * BN, warp, g, t4, sl2);
                rescale<D>(acc, alpha);

                // O += P V: P rounded to the input type (its float32 sum went into l).
                unsigned p[BN / 16][4];
                pack_p<T, BN>(p, s);
                const unsigned long long dv = make_desc(sVa + buf * TILE, ROWBLK, 128);
                fence_regs(acc);
                wgmma_fence();
#pragma unroll
                for (int j = 0; j < BN / 16; ++j)
                    wgmma_rs<1>(acc, p[j], dv + (unsigned long long)((j * 2 * ROWBLK) >> 4), 1,
                                T());
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(acc);
#pragma unroll
                for (int j = 0; j < BN / 16; ++j) fence_regs(p[j]);
            }
            __syncthreads();  // the next iteration's cp.async overwrites the other buffer
        }
    } else {
        // Every warpgroup runs every block of the thread block's range (a block a warpgroup
        // cannot see masks to p = 0 and alpha = 1): no wgmma sits in a warpgroup-dependent
        // branch, which would make ptxas serialise them (C7520).
        unsigned pp[BN / 16][4];  // P of the previous block, its P V not yet issued
        for (int kb = kb0; kb < kb1; ++kb) {
            const int buf = (kb - kb0) % 3;
            const int pbuf = (kb - kb0 + 2) % 3;  // block kb - 1's buffer
            cp_async_wait<1>();  // block kb's group (only block kb + 1's may be in flight)
            fence_proxy_async();
            __syncthreads();

            // S = Q K^T, waited for at once: the masking below branches, and ptxas completes
            // every wgmma in flight before a branch it cannot prove uniform.
            const unsigned long long dk = make_desc(sKa + buf * TILE, 128, ROWBLK);
            fence_regs(s);
            fence_regs(acc);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks)
                wgmma_ss(s, dq + (unsigned long long)(ks * 256 >> 4),
                         dk + (unsigned long long)(ks * 256 >> 4), ks > 0 ? 1 : 0, T());
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(s);
            mask_tile<BN>(s, a, wq0, wq1, kb * BN, warp, g, t4);

            // O += P V of block kb - 1, running during this block's softmax. The first block
            // has none: it adds P = 0 times its own (loaded, finite) V instead of branching.
            const bool first = kb == kb0;
            const unsigned long long dv =
                make_desc(sVa + (first ? buf : pbuf) * TILE, ROWBLK, 128);
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
                wgmma_rs<1>(acc, pp[j], dv + (unsigned long long)((j * 2 * ROWBLK) >> 4), 1,
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
                load_tile<BN, D, NT>(sKa + nb * TILE, Kg, (kb + 2) * BN, sk, tid);
                load_tile<BN, D, NT>(sVa + nb * TILE, Vg, (kb + 2) * BN, sk, tid);
            }
            cp_async_commit();
        }
        if (kb1 > kb0) {
            const unsigned long long dv = make_desc(sVa + ((kb1 - 1 - kb0) % 3) * TILE, ROWBLK,
                                                    128);
            fence_regs(acc);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < BN / 16; ++j)
                wgmma_rs<1>(acc, pp[j], dv + (unsigned long long)((j * 2 * ROWBLK) >> 4), 1,
                            T());
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(acc);
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) fence_regs(pp[j]);
        }
        cp_async_wait<0>();  // no cp.async left in flight at exit
    }

    write_out<T, D>(a, acc, m, l, bh, wq0, warp, g, t4);
#else
    (void)a;
    __trap();  // built for a target without wgmma: the loader only launches on sm_90a
#endif
}

}  // namespace xattn90

#define XATTN90_PARAMS                                                                     \
    const unsigned short *q, const unsigned short *k, const unsigned short *v,             \
        unsigned short *o, float *lse, int hq, int group, int sq, int sk, float scale,      \
        int causal, int wl, int wr

// OV: 0 = plain, 1 = P V overlapped with the next softmax (entry name suffix _o1).
#define XATTN90_ENTRY(TN, D, BN, NWG, OV)                                                  \
    extern "C" __global__ void __launch_bounds__(NWG * 128, 1)                             \
        flash_fwd_sm90_##TN##_d##D##_n##BN##_g##NWG##_o##OV(XATTN90_PARAMS) {               \
        xattn90::flash_fwd_sm90_core<xattn90::TN, D, BN, NWG, OV != 0>(                     \
            xattn90::FwdArgs{q, k, v, o, lse, hq, group, sq, sk, scale, causal, wl, wr});  \
    }
// One more expansion level so that -D values expand before ## pastes them.
#define XATTN90_ONE(TN, D, BN, NWG, OV) XATTN90_ENTRY(TN, D, BN, NWG, OV)
#define XATTN90_BOTH(D, BN, NWG, OV) \
    XATTN90_ONE(f16, D, BN, NWG, OV) XATTN90_ONE(bf16, D, BN, NWG, OV)

// The loader builds one entry per module (-DXATTN90_TN=f16|bf16 -DXATTN90_D=.. -DXATTN90_BN=..
// -DXATTN90_NWG=.. -DXATTN90_OV=0|1); without them (CI's compile check) every configuration
// below is built. XATTN90_NO_ENTRIES: the probe (wgmma_probe.cu) includes this file for its
// helpers only.
#ifndef XATTN90_NO_ENTRIES
#ifdef XATTN90_D
XATTN90_ONE(XATTN90_TN, XATTN90_D, XATTN90_BN, XATTN90_NWG, XATTN90_OV)
#else
XATTN90_BOTH(64, 128, 2, 0)
XATTN90_BOTH(64, 64, 3, 0)
XATTN90_BOTH(128, 128, 2, 0)
XATTN90_BOTH(128, 64, 2, 0)
XATTN90_BOTH(128, 64, 3, 0)
XATTN90_BOTH(64, 128, 2, 1)
XATTN90_BOTH(64, 64, 3, 1)
XATTN90_BOTH(128, 64, 2, 1)
XATTN90_BOTH(128, 64, 3, 1)
#endif
#endif
