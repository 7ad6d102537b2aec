// Warpgroup MMA (wgmma, sm_90a) for the Hopper kernel, in namespace xattn: fences, commit and
// wait, and wgmma.mma_async m64nNk16 with A and B from shared memory (ss) or A from registers
// (rs), one overload per (N, 16-bit type). Compiled only for sm_90a (XATTN_SM90_OK).
#pragma once

#include "common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define XATTN_SM90_OK 1
#else
#define XATTN_SM90_OK 0
#endif

namespace xattn {

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
// One overload per (N, 16-bit type). An asm statement must name every accumulator register:
// the macros spell them out once.
#define XATTN_ACC8(i)                                                                        \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]),             \
        "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define XATTN_ACC32 XATTN_ACC8(0), XATTN_ACC8(8), XATTN_ACC8(16), XATTN_ACC8(24)
#define XATTN_ACC64 XATTN_ACC32, XATTN_ACC8(32), XATTN_ACC8(40), XATTN_ACC8(48), XATTN_ACC8(56)
#define XATTN_REGS32                                                                         \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                 \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define XATTN_REGS64                                                                         \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                 \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                        \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                        \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
// N = 80 (Q K^T of an 80-key tile: the experimental D = 256 tile), 192 and 256 (the P V of
// head dims 192 and 256); each defines both ss and rs.
#define XATTN_ACC40 XATTN_ACC32, XATTN_ACC8(32)
#define XATTN_REGS40                                                                         \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                       \
    "%32,%33,%34,%35,%36,%37,%38,%39}"
#define XATTN_ACC96 XATTN_ACC64, XATTN_ACC8(64), XATTN_ACC8(72), XATTN_ACC8(80), XATTN_ACC8(88)
#define XATTN_ACC128 XATTN_ACC64, XATTN_ACC8(64), XATTN_ACC8(72), XATTN_ACC8(80),            \
    XATTN_ACC8(88), XATTN_ACC8(96), XATTN_ACC8(104), XATTN_ACC8(112), XATTN_ACC8(120)
#define XATTN_REGS96                                                                         \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                       \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                       \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"                       \
    "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"                       \
    "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95}"
#define XATTN_REGS128                                                                        \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                       \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                       \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"                       \
    "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"                       \
    "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"                       \
    "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"           \
    "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}"
// N = 176: Q K^T of a 176-key tile (D = 128's tile for long full rows, FlashAttention-3's).
#define XATTN_ACC88 XATTN_ACC64, XATTN_ACC8(64), XATTN_ACC8(72), XATTN_ACC8(80)
#define XATTN_REGS88                                                                     \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                            \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                   \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                   \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"                   \
    "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"                   \
    "%80,%81,%82,%83,%84,%85,%86,%87}"
// NACC = N / 2 accumulators per thread; after them come the A and B operands (SS_AB / RS_AB:
// their operand numbers), the scale-d predicate (SS_P / RS_P) and, for rs, imm-trans-b (RS_T).
#define XATTN_WGMMA(N, NACC, TY, SS_P, SS_AB, RS_P, RS_AB, RS_T)                              \
    __device__ __forceinline__ void wgmma_ss(float (&d)[NACC], unsigned long long da,        \
                                             unsigned long long db, int scale_d, TY) {      \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                       \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TY "." #TY " "        \
                     XATTN_REGS##NACC ", " SS_AB ", p, 1, 1, 0, 0;\n}\n"                       \
                     : XATTN_ACC##NACC                                                        \
                     : "l"(da), "l"(db), "r"(scale_d));                                       \
    }                                                                                         \
    template <int TRANS_B>                                                                    \
    __device__ __forceinline__ void wgmma_rs(float (&d)[NACC], const unsigned (&a)[4],       \
                                             unsigned long long db, int scale_d, TY) {      \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_P ", 0;\n"                       \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TY "." #TY " "        \
                     XATTN_REGS##NACC ", " RS_AB ", p, 1, 1, " RS_T ";\n}\n"                   \
                     : XATTN_ACC##NACC                                                        \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d),   \
                       "n"(TRANS_B));                                                         \
    }
#define XATTN_WGMMA_N64(TY) \
    XATTN_WGMMA(64, 32, TY, "%34", "%32, %33", "%37", "{%32,%33,%34,%35}, %36", "%38")
#define XATTN_WGMMA_N128(TY) \
    XATTN_WGMMA(128, 64, TY, "%66", "%64, %65", "%69", "{%64,%65,%66,%67}, %68", "%70")
#define XATTN_WGMMA_N80(TY) \
    XATTN_WGMMA(80, 40, TY, "%42", "%40, %41", "%45", "{%40,%41,%42,%43}, %44", "%46")
#define XATTN_WGMMA_N176(TY) \
    XATTN_WGMMA(176, 88, TY, "%90", "%88, %89", "%93", "{%88,%89,%90,%91}, %92", "%94")
#define XATTN_WGMMA_N192(TY) \
    XATTN_WGMMA(192, 96, TY, "%98", "%96, %97", "%101", "{%96,%97,%98,%99}, %100", "%102")
#define XATTN_WGMMA_N256(TY) \
    XATTN_WGMMA(256, 128, TY, "%130", "%128, %129", "%133", "{%128,%129,%130,%131}, %132", "%134")
XATTN_WGMMA_N64(f16)
XATTN_WGMMA_N64(bf16)
XATTN_WGMMA_N128(f16)
XATTN_WGMMA_N128(bf16)
XATTN_WGMMA_N80(f16)
XATTN_WGMMA_N80(bf16)
XATTN_WGMMA_N176(f16)
XATTN_WGMMA_N176(bf16)
XATTN_WGMMA_N192(f16)
XATTN_WGMMA_N192(bf16)
XATTN_WGMMA_N256(f16)
XATTN_WGMMA_N256(bf16)

// wgmma m64nNk8 with TF32 operands (the 3xTF32 forward, flash_fwd_tf32x3_sm90.cu), f32
// accumulate. .tf32 takes no transpose immediates: A and B must both be K-major in shared
// memory. The register A fragment of m64k8 (4 x b32 per thread, CUTLASS's ALayout_64x8): a0
// (row g, k t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4), rows of warp w from 16 w.
#define XATTN_WGMMA_TF32(N, NACC, SS_P, SS_AB, RS_P, RS_AB)                                   \
    __device__ __forceinline__ void wgmma_ss_tf32(float (&d)[NACC], unsigned long long da,   \
                                                  unsigned long long db, int scale_d) {      \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                       \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k8.f32.tf32.tf32 "               \
                     XATTN_REGS##NACC ", " SS_AB ", p, 1, 1;\n}\n"                             \
                     : XATTN_ACC##NACC                                                        \
                     : "l"(da), "l"(db), "r"(scale_d));                                       \
    }                                                                                         \
    __device__ __forceinline__ void wgmma_rs_tf32(float (&d)[NACC], const unsigned (&a)[4],  \
                                                  unsigned long long db, int scale_d) {      \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_P ", 0;\n"                       \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k8.f32.tf32.tf32 "               \
                     XATTN_REGS##NACC ", " RS_AB ", p, 1, 1;\n}\n"                             \
                     : XATTN_ACC##NACC                                                        \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));  \
    }
XATTN_WGMMA_TF32(64, 32, "%34", "%32, %33", "%37", "{%32,%33,%34,%35}, %36")
XATTN_WGMMA_TF32(128, 64, "%66", "%64, %65", "%69", "{%64,%65,%66,%67}, %68")
#endif  // XATTN_SM90_OK


}  // namespace xattn
