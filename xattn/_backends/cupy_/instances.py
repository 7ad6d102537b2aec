"""Every compiled kernel entry point, from one list: the launchers' table and CI's compile list.

As flash-attn 3's ``generate_kernels.py``: the tile configurations live here, once, in Python.
The launchers ask :func:`fwd`, :func:`bwd`, ... for the :class:`Instance` of a request (entry
name, the ``-D`` options that make NVRTC build exactly that entry) and
``tools/check_kernels.py`` compiles :func:`shipped` -- one generated translation unit per kernel
file that includes the file and expands one entry macro per instance -- for sm_80 and sm_90a,
spill-free and warning-free. The ``.cu`` files define entry macros and build nothing on their
own. Experimental instances (Hopper schedule modes 0-3 and 27, kept for
``tools/wgmma_probe.py --bench``) are in :func:`experimental` and compiled only on request.

Tile configurations (chosen from ``ptxas -v``, no spills, and timings on an H200: see
:doc:`/dev/perf_gpu`):

* 16-bit forward (``flash_fwd.cu``): per head dim ``(warps, 16-row tiles per warp, keys per
  block)``; :data:`FWD_MODS` where the score-modification variant would spill with the plain
  configuration; :data:`FWD_BM` / :data:`FWD_BM_MODS` the block-sparse candidates in order of
  preference (the first whose query tile divides the mask's ``bq`` and key tile its ``bk``).
* backward (``flash_bwd.cu``): main kernel ``(dK/dV columns per CTA, warps, query rows per step,
  dq slice width)``, deterministic dq kernel ``(warps, keys per block)``, block-sparse
  candidates of each.
* TF32 forward (``flash_fwd_tf32.cu``) and the Hopper forward (``flash_fwd_sm90.cu``:
  ``(keys per block, consumer warpgroups, schedule mode)``).
* the Hopper backward (``flash_bwd_sm90.cu``): one entry per dtype and head dim
  (:data:`SM90_BWD_HEAD_DIMS`), its tile fixed in the kernel (2 warpgroups, 128 keys x 64
  queries per step).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BWD", "BWD_BM", "BWD_BM_DQ", "BWD_DQ", "DECODE", "DECODE_EXTRA",
           "DECODE_HEAD_DIMS", "FWD",
           "FWD_BM", "FWD_BM_MODS", "FWD_MODS", "HEAD_DIMS", "Instance", "SM90", "SM90_BM",
           "SM90_BM_MODS", "SM90_BM_MODS_TMA", "SM90_BM_TMA", "SM90_BWD_HEAD_DIMS",
           "SM90_BWD_DETERMINISTIC_ON", "SM90_BWD_DQ_WGMMA", "SM90_BWD_TMA",
           "SM90_BWD_TMA_DEFAULT", "SM90_BWD_TMA_WIN_DIMS", "SM90_BWD_WIN_TMA_ON",
           "SM90_BWD_VARIANTS", "SM90_EXPERIMENTAL", "SM90_MODS",
           "SM90_MODS_ON_TMA", "SM90_MODS_TMA", "SM90_PAD_ON", "SM90_LONG", "SM90_LONG_ON",
           "SM90_SHORT", "SM90_SHORT_ON",
           "SWITCHES",
           "SM90_WIDE_EXPERIMENTAL", "SM90_WIDE_ON",
           "TF32",
           "TF32X3", "TF32X3_BWD", "TF32X3_BWD_EXTRA", "TF32X3_BWD_LARGE_SMEM", "TF32X3_BWD_ON",
           "TF32X3_SM90", "TF32X3_SM90_ON", "TF32X3_SM90_OV_EXPERIMENTAL",
           "bwd", "bwd_aux", "bwd_dq", "bwd_simt", "bwd_sm90", "bwd_sm90_dq", "bwd_tf32x3",
           "decode",
           "experimental", "fwd", "fwd_simt", "shipped", "switches", "sm90", "tf32",
           "tf32_bm", "tf32x3_sm90"]

# Head dims the kernels are built for; others up to 256 are zero-padded to the next one.
HEAD_DIMS = (32, 64, 96, 128, 256)

FWD = {32: (4, 1, 64), 64: (4, 2, 64), 96: (4, 1, 64), 128: (4, 2, 32), 256: (4, 1, 32)}
FWD_MODS = {128: (4, 1, 64)}
# Built beside the defaults for tuning (benchmarks pass config=...).
FWD_EXTRA = {64: ((4, 1, 64),), 128: ((4, 1, 64),)}
FWD_BM = {
    32: ((4, 1, 64), (2, 1, 32)),
    64: ((4, 2, 64), (4, 1, 64), (2, 1, 32)),
    96: ((4, 1, 64), (2, 1, 32)),
    128: ((4, 2, 32), (4, 1, 64), (2, 1, 32)),
    256: ((4, 1, 32),),
}
FWD_BM_MODS = {128: ((4, 1, 64), (2, 1, 32))}

# At D=128, (128, 4, 64, 64) was 8% faster but spills, so the spill-free (128, 4, 32, 64) stays.
BWD = {
    32: (32, 4, 64, 32),
    64: (64, 4, 64, 32),
    96: (96, 4, 64, 96),
    128: (128, 4, 32, 64),
    256: (128, 4, 32, 64),
}
BWD_DQ = {32: (4, 64), 64: (4, 64), 96: (4, 64), 128: (4, 64), 256: (4, 32)}
# The walk and the element rule cost registers, so D = 96 and D = 256 take smaller steps than
# their dense kernels; D = 32 is padded to 64 with a block mask (its own tiles spilled under
# ptxas 13.0 on sm_90a).
BWD_BM = {
    64: ((64, 4, 64, 64), (64, 4, 32, 64), (64, 2, 32, 64)),
    96: ((96, 4, 32, 96), (96, 2, 32, 96)),
    128: ((128, 4, 32, 64), (128, 2, 32, 64)),
    256: ((128, 4, 16, 64), (128, 2, 16, 64)),
}
BWD_BM_DQ = {
    # (4, 32) spilled with score mods (sm_80 / sm_90a, 128-168 registers): not a candidate.
    64: ((4, 64), (2, 32)),
    96: ((4, 64), (2, 32)),
    128: ((4, 64), (2, 32)),
    256: ((4, 16), (2, 16)),
}

# <= 255 registers so that two 128-thread blocks fit an SM's register file.
TF32 = {32: (4, 2, 64), 64: (4, 1, 64), 96: (4, 1, 32), 128: (4, 1, 32), 256: (4, 1, 16)}
# Alternatives for tuning: (config, with the mods variant?) -- plain only where mods spill.
TF32_EXTRA = {64: (((4, 2, 32), False), ((8, 1, 64), True)),
              128: (((8, 1, 32), True), ((4, 2, 16), False))}

# 3xTF32 (the same file, X3): K and V rows hold hi and lo (twice the shared memory of TF32 per
# key block), Q sits in registers only up to MT * D = 64, and each key block's P V is summed
# apart from the accumulator, so the tiles are smaller. Chosen from ptxas -v alone (no GPU run
# yet; benchmarks/gpu_flash.py --only fp32 --configs times every candidate): spill-free on
# sm_80 and sm_90a, and the most warps per SM that registers and shared memory allow -- D=64
# (4, 1, 32): 228 registers, 69 KiB, 2 blocks = 8 warps; D=128 (8, 1, 16): 170 registers,
# 203 KiB, 8 warps ((4, 1, 32) gets 4; (4, 1, 16) spilled at 168 registers). Over 163 KiB
# (D >= 128) an A100 refuses the size and the SIMT kernel serves.
TF32X3 = {32: (4, 1, 32), 64: (4, 1, 32), 96: (4, 1, 16), 128: (8, 1, 16), 256: (4, 1, 8)}
# Candidates timed beside the default by benchmarks/gpu_flash.py (tf32x3 rows): plain + mods.
TF32X3_EXTRA = {64: ((8, 1, 32), (8, 1, 16), (4, 2, 16)), 128: ((4, 1, 32),)}

# The 3xTF32 float32 backward (flash_bwd_tf32x3.cu, the cupy.tf32x3 entry's backward): per head
# dim (dK/dV columns per CTA, warps, query rows per step); 16 keys per warp. K, V, Q and dO rows
# hold hi and lo (2 D + 16 floats), so shared memory sets the tiles: D = 64 (64, 4, 16) 99 KiB
# (two blocks of 4 warps on an H100 / H200, one on an A100); D = 128 splits the columns over
# two CTAs (both recompute S^T and dP^T: with all 128 columns the dK/dV accumulators spilled,
# 255 registers) and takes 2 warps (107 KiB, fits an A100's 163 KiB). ptxas 13.0 (sm_80 /
# sm_90a): D = 64 184 / 182 registers (mods 210 / 182), D = 128 236 / 244 (mods 242 / 244), no
# spills. First run on an H100 80GB HBM3 (2026-12-06, tools/gpu_tf32x3bwd_bench.py, fp32
# S = 4096, B*S = 16384, Hq*D = 2048, TFLOP/s, torch's float32 backward in the same process):
# D = 64 (64, 4, 16) 32.6 / causal 30.7, (64, 4, 32) 27.7 / 26.6, cupy.simt 13.4 / 13.2, torch
# 34.9 / 32.8; D = 128 (64, 2, 16) 13.7 / 12.7, (64, 4, 16) 15.3 / 15.0, cupy.simt 12.5 / 12.3,
# torch 35.6 / 34.8; max relative error against float64 1e-6 - 2.4e-6 (cupy.simt 1.1e-6 -
# 2.6e-6).
TF32X3_BWD = {64: (64, 4, 16), 128: (64, 2, 16)}
# Candidates for timing (config=...): more query rows per step at D = 64 (125 KiB, 234 / 248
# registers), 4 warps at D = 128 (179 KiB: Hopper only; 220 / 228 registers).
TF32X3_BWD_EXTRA = {64: ((64, 4, 32),), 128: ((64, 4, 16),)}
# Taken instead of the default where the device's opt-in shared memory per block holds it
# (Hopper: 227 KiB; an A100's 163 KiB does not): D = 128 with 4 warps, +12-18 % above.
TF32X3_BWD_LARGE_SMEM = {128: (64, 4, 16)}
# THE SWITCH of that backward: on, float32 gradients take it (auto's order puts cupy.tf32x3
# before cupy.simt); off, cupy.tf32x3.supports refuses op="backward" (the reason names this
# switch), float32 gradients stay on cupy.simt and flash_tf32x3.backward called directly runs
# it. While off, its instances are experimental (built on request and by tools/check_kernels.py
# --experimental) but for the D = 64 default plain entry, which CI compiles; all are shipped when
# on. On since the H100 run above: its GPU tests (tests/gpu/test_gpu_flash_bwd_tf32x3.py, 50
# cases: D 64 / 128, causal, window, GQA, score mods, ragged lengths, rows without keys, every
# built configuration) passed and compute-sanitizer memcheck / racecheck were clean.
TF32X3_BWD_ON = True

# 3xTF32 on Hopper's wgmma (flash_fwd_tf32x3_sm90.cu, the cupy.tf32x3_sm90 entry): head dim ->
# keys per block. One shape: a producer warpgroup that splits K and V (V transposed) into
# hi / lo tiles and two consumer warpgroups of 64 query rows, a ring of 2 stages: 193 KiB of
# shared memory at D = 64 (D = 128 would need 384 KiB with this ring). ptxas 13.0 sm_90a: no
# spills (tools/check_kernels.py).
TF32X3_SM90 = {64: 64}
# Built on request (config=(64, 1), tools/check_kernels.py --experimental): the same kernel
# with the previous key tile's P V overlapping this tile's softmax and separate K and V rings
# (the _ov entry); the benchmark of tools/gpu_check_tf32wg.sh times it beside the default.
# (D, BN) of each.
TF32X3_SM90_OV_EXPERIMENTAL = ((64, 64),)
# THE SWITCH of that entry: off, cupy.tf32x3_sm90.supports refuses every request (the reason
# names this switch) and float32 on cc 9.0 keeps cupy.tf32x3. On since an H100 run
# (2026-12-05, tools/gpu_check_tf32wg.sh): 63 GPU tests, memcheck / racecheck clean, fp32 D=64
# S=4096 80.2 TFLOP/s (causal 73.9) against cupy.tf32x3's 42.0 (40.6) and torch's float32
# 35.3 (33.3), max relative error 9.9e-7 against float64.
TF32X3_SM90_ON = True

# Mode 75: warp-specialised (a producer warpgroup, mbarrier ring of 3 K/V stages) with the P V
# overlap and the 128-byte swizzle, the ring filled by the copy engine (TMA); see
# flash_fwd_sm90.cu. Mode 11 (cp.async fills) stays shipped: the _mods / _bm entries run it.
# H100, fp16 S=4096 (tools/gpu_check_fwdtma.sh bench): D=128 537 / causal 437 TFLOP/s against
# mode 11's 423 / 361, D=64 383 / 300 against 333 / 277.
# D=256 and D=192 (64, 2, 75) run flash_fwd_sm90_ws_kv: separate K and V rings of two stages
# (at D=256, Q and three K+V stages of 64 keys would need 257 KiB of shared memory), mode 75
# only, plain entries only (no _mods / _bm).
SM90 = {64: (64, 3, 75), 128: (128, 2, 75), 192: (64, 2, 75), 256: (64, 2, 75)}
# THE SWITCH of those two head dims: the kernel table routes D = 192 / 256 to the wgmma kernel
# only when on (off: cupy.sm80). On since an H100 run (2026-12-05, tools/gpu_check_d256.sh):
# GPU tests and sanitizers clean; fp16 S=4096 D=256 611 / causal 513 TFLOP/s against
# cupy.sm80's 232 / 199 and torch's 639 / 547; D=192 515 / 455 against 141 / 109 and 625 / 539.
SM90_WIDE_ON = True
# THE SWITCH of the other head dims on the wgmma forward: on, a head dim between two of SM90's
# (32, 80, 96, 112, ...) runs the next one's entry with its operands zero-padded
# (flash_sm90.padded_dim), as the mma.sync kernel pads to HEAD_DIMS. On since an H100 run
# (2026-12-05): tests/gpu/test_gpu_flash_sm90.py -k padded passed; fp16 S=4096 D=96 284 TFLOP/s
# against cupy.sm80's 216 (causal 190 / 196), D=80 254 / 145 (causal 172 / 115).
SM90_PAD_ON = True
SM90_SHIPPED = ((64, 128, 2, 11), (64, 64, 3, 11), (128, 128, 2, 11), (64, 64, 3, 75),
                (128, 128, 2, 75), (192, 64, 2, 75), (256, 64, 2, 75),
                (64, 64, 1, 203), (64, 128, 1, 203), (128, 64, 1, 203), (128, 176, 2, 75))
# The score-modification entries (_mods: softcap, bias, ALiBi, bool mask; flex_attention's
# score_mod) take the default configuration of their head dim. The block-sparse entries (_bm,
# plain and with mods) need the thread block's query rows (64 per consumer warpgroup) to divide
# the mask's bq and its key tile to divide bk: candidates in order of preference, the first
# that divides is taken. Two consumers (128 rows) so that 128-row masks (flex_attention's
# derived mask, BlockMask's default sizes) fit; 64-key tiles for bk = 64.
# At D=128 the 128-key tile spilled with mods (ptxas 13.0, 240 registers): 64 keys there.
SM90_MODS = {64: (64, 3, 11), 128: (64, 2, 11)}
SM90_BM = {64: ((128, 2, 11), (64, 2, 11)), 128: ((128, 2, 11), (64, 2, 11))}
SM90_BM_MODS = {128: ((64, 2, 11),)}
# Their mode-75 twins: the same tiles and consumers, the K/V ring filled by the copy engine
# (one producer thread: ws_produce_tma, or ws_produce_walk_tma for the CSR walk), the entries
# taking the tensor maps of K and V first. The switch's family is shipped (CI compiles it), the
# other one experimental (built on request and by tools/check_kernels.py --experimental).
SM90_MODS_TMA = {64: (64, 3, 75), 128: (64, 2, 75)}
SM90_BM_TMA = {64: ((128, 2, 75), (64, 2, 75)), 128: ((128, 2, 75), (64, 2, 75))}
SM90_BM_MODS_TMA = {128: ((64, 2, 75),)}
# THE SWITCH: which family the _mods / _bm / _mods_bm entries and flex_attention's Hopper
# kernel use by default (flash_sm90.MODS_CONFIGS, BM_CONFIGS, BM_MODS_CONFIGS). False: the
# mode-11 tables above; True: the mode-75 twins. Off: on an H100 (2026-12-05,
# tools/gpu_check_fwdtmamods.sh bench) the twins ran at mode 11's speed (ALiBi 122.6 / 121.6,
# softcap 84.8 / 84.8, window block mask 94.8 / 98.9, flex 226.3 / 227.1 TFLOP/s): those
# entries are held by their per-element work. An explicit config=(..., 11 | 75) picks either.
SM90_MODS_ON_TMA = False
# (D, BN, warpgroups, mode) of the earlier schedules (0-3) and ping-pong (27): measured slower
# than mode 11 on an H200, kept buildable for tools/wgmma_probe.py --bench.
SM90_EXPERIMENTAL = (
    (64, 128, 2, 0), (64, 64, 3, 0), (128, 128, 2, 0), (128, 64, 2, 0), (128, 64, 3, 0),
    (64, 128, 2, 1), (64, 64, 3, 1), (128, 64, 2, 1), (128, 64, 3, 1),
    (64, 128, 2, 2), (64, 64, 3, 2), (128, 128, 2, 2), (128, 64, 3, 2),
    (64, 128, 2, 3), (128, 64, 2, 3), (128, 128, 2, 3), (64, 64, 3, 3),
    (64, 128, 2, 27), (128, 128, 2, 27),
    (64, 128, 2, 75), (128, 64, 2, 75),
    # The one-consumer entries' mode-75 twins (SM90_SHORT's before mode 203 replaced them).
    (64, 64, 1, 75), (64, 128, 1, 75), (128, 64, 1, 75),
    # Mode 203 (Q by the copy engine too) on the defaults of D 64 / 128: within 2-4 % of
    # mode 75 either way on an H100 (2026-12-06, tools/gpu_fwd_short.py --twins), not taken.
    (64, 64, 3, 203), (128, 128, 2, 203),
    # Persistent (mode 235 = 203 + bit 5): the resident blocks (two an SM, three at D = 64 with
    # 64-key tiles since 2026-12-06) walking the tiles, one consumer.
    # Same run: +6 % over mode 203 on non-causal windows +-128 (D = 64) and +-256 (D = 128),
    # -6 % at +-256 D = 64, -18 % on S = 1024 causal (round-robin tiles of unequal work): not
    # taken.
    (64, 64, 1, 235), (64, 128, 1, 235), (128, 64, 1, 235),
)
# Short key spans: one consumer warpgroup (NWG = 1: two thread blocks an SM, so that one
# block's chain of Q K^T, softmax and P V runs beside the other's), per head dim: (largest mean
# visible keys per query row, configuration for a window, configuration otherwise). From one
# run on an H100 (2026-12-05, fp16, B*S = 16384, Hq*D = 2048, do_bench, each against the
# default in the same process, TFLOP/s): D = 64 window +-256 at S = 65536 (64, 1, 75) 224.6
# against 191.6 (+17 %); S = 1024 causal 238.7 against 196.9 (+21 %), full (128, 1, 75) 348.4
# against 309.5 (+13 %); at S = 4096 both slower than the default (357 / 383 against 395).
# D = 128: S = 1024 causal (64, 1, 75) 312.2 against 299.2 (+4 %), full 375.9 against 451.8.
# A second run (tools/gpu_fwd_short.py, same card) set the thresholds: windows +-128 / +-256 /
# +-512 at D = 64 gain 32 / 19 / 6 %, +-256 at D = 128 9 %, +-512 there loses 2 %; S = 2048
# causal (1024.5 mean keys) is a wash at D = 64 and loses at D = 128 (table in
# docs/dev/perf_gpu.rst). Since 2026-12-06 the mode-203 twins (Q by the copy engine too; the
# same arithmetic, bit for bit): one H100 run of tools/gpu_fwd_short.py --twins gave D = 64
# window +-256 at S = 65536 229.5 against mode 75's 222.2, +-128 156.1 / 149.0, +-512 277.6 /
# 263.6, S = 1024 causal 238.4 / 236.0; D = 128 +-256 288.9 / 271.8, S = 1024 causal
# 320.9 / 310.9 (+-512 342.0 / 349.4, outside the rule's 640). Since the D = 64 entry with
# 64-key tiles holds three blocks an SM, it is D = 64's choice without a window too (H100,
# 2026-12-06, tools/gpu_fwd_short.py --twins, (64, 1, 203) against (128, 1, 203)): S = 1024
# causal 287.3 / 262.9, full 370.9 / 347.3; S = 2048 causal 325.5 / 317.9 (default 299.6).
SM90_SHORT = {64: (1100, (64, 1, 203), (64, 1, 203)), 128: (640, (64, 1, 203), (64, 1, 203))}
# THE SWITCH of that rule (flash_sm90.launch_config): on since the one-consumer instances
# passed the GPU tests (tests/gpu/test_gpu_flash_sm90.py, every built configuration) and
# compute-sanitizer memcheck / racecheck (H100, 2026-12-05; the mode-203 ones 2026-12-06);
# they are in SM90_SHIPPED.
SM90_SHORT_ON = True
# Long full rows (no causal rule, no window; mean visible keys per query row at least the
# threshold), per head dim: (threshold, configuration). D = 128 takes FlashAttention-3's
# non-causal hdim-128 tile there, 176 keys: flash_fwd_sm90_ws_kv (split K / V rings of two
# stages, 2 x 2 x 44 KiB beside Q's 32 KiB). H100 (2026-12-06, tools/gpu_fwd_variants.py, fp16,
# TFLOP/s, (176, 2, 75) against (128, 2, 75) in the same rounds): S = 4096 545.3 / 534.6,
# 559.4 / 539.7 (another row of (128, 2, 75), timed first, 577.8), 551.7 / 537.4 (torch
# 584-611); S = 1024 442.1 / 444.3 and 443.6 / 447.9, hence the threshold. Issue 11's bench
# (same card): fp16 580.0 against torch's 589.2, 0.98x (0.90-0.91x with 128 keys before).
# Causal rows keep 128-key tiles (FlashAttention-3's choice too: less work wasted on the
# diagonal).
SM90_LONG = {128: (2048, (176, 2, 75))}
# THE SWITCH of that rule (flash_sm90.launch_config).
SM90_LONG_ON = True

# D=256 with 80-key tiles (flash_fwd_sm90_ws_kv, 2 + 2 stages of 40 KiB: 225 KiB with Q, as
# FlashAttention-3's hdim-256 tile): built on request, to be timed against (64, 2, 75)
# (tools/gpu_d256_bench.py); ptxas 13.0 sm_90a: no spills.
SM90_WIDE_EXPERIMENTAL = ((256, 80, 2, 75),)

# The experimental Hopper schedules without warp specialisation (modes 0-3), relative to the
# repository root: compiled only with tools/check_kernels.py --experimental or config=...
SM90_MODES_SOURCE = "tools/flash_fwd_sm90_modes.cuh"

TYPES = ("f16", "bf16")


@dataclass(frozen=True)
class Instance:
    """One compiled module: kernel file, entry macro and its arguments, entry names.

    ``params`` are ``(define, value)`` pairs in the macro's argument order: NVRTC builds the
    module with ``-D<define>=<value>`` (the file then expands the macro once), CI writes
    ``MACRO(value, ...)`` into a generated translation unit. ``ci=False``: an instance that CI
    does not compile (a bfloat16 block-sparse twin, the same code as its float16 one but for
    the mma/cvt type). ``includes``: files of the repository (not the package) appended after
    the kernel file, for experimental code that ships with no entry.
    """

    source: str
    macro: str
    params: tuple
    names: tuple
    extra: tuple = ()
    arch: str | None = None
    ci: bool = True
    includes: tuple = ()

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def defines(self) -> tuple:
        return tuple(f"-D{k}={v}" for k, v in (*self.extra, *self.params))

    def macro_call(self) -> str:
        return f"{self.macro}({', '.join(str(v) for _, v in self.params)})"


def _b(x):
    return "true" if x else "false"


def fwd(tn, d, cfg, mods, sparse=False) -> Instance:
    """The 16-bit forward entry of one dtype, head dim, ``(warps, tiles, keys)``, variant."""
    nw, mt, bn = cfg
    mn = ("mods" if mods else "plain") + ("_bm" if sparse else "")
    params = (("XATTN_TN", tn), ("XATTN_D", d), ("XATTN_NW", nw), ("XATTN_MT", mt),
              ("XATTN_BN", bn), ("XATTN_MN", mn), ("XATTN_MODS", _b(mods)),
              ("XATTN_SPARSE", _b(sparse)))
    return Instance("flash_fwd.cu", "XATTN_FWD_ONE", params,
                    (f"flash_fwd_{tn}_d{d}_w{nw}_m{mt}_n{bn}_{mn}",),
                    ci=not (sparse and tn != "f16"))


def bwd(tn, d, cfg, mods, dq, sparse=False) -> Instance:
    """The main backward entry (``dq``: atomics into dq_accum; else the dq kernel runs)."""
    dc, nw, bm, dqn = cfg
    mn = ("mods" if mods else "plain") + ("_bm" if sparse else "")
    qn = "atomic" if dq else "nodq"
    params = (("XATTN_TN", tn), ("XATTN_D", d), ("XATTN_DC", dc), ("XATTN_NW", nw),
              ("XATTN_BM", bm), ("XATTN_DQN", dqn), ("XATTN_MN", mn), ("XATTN_MODS", _b(mods)),
              ("XATTN_QN", qn), ("XATTN_DQ", _b(dq)), ("XATTN_SPARSE", _b(sparse)))
    return Instance("flash_bwd.cu", "XATTN_BWD_ONE", params,
                    (f"flash_bwd_{tn}_d{d}_c{dc}_w{nw}_m{bm}_q{dqn}_{mn}_{qn}",),
                    extra=(("XATTN_KIND", 1),), ci=not (sparse and tn != "f16"))


def bwd_dq(tn, d, cfg, mods, sparse=False) -> Instance:
    """The deterministic dq entry of one dtype, head dim, ``(warps, keys)``, variant."""
    nw, bn = cfg
    mn = ("mods" if mods else "plain") + ("_bm" if sparse else "")
    params = (("XATTN_TN", tn), ("XATTN_D", d), ("XATTN_NW", nw), ("XATTN_BN", bn),
              ("XATTN_MN", mn), ("XATTN_MODS", _b(mods)), ("XATTN_SPARSE", _b(sparse)))
    return Instance("flash_bwd.cu", "XATTN_BWD_DQ_ONE", params,
                    (f"flash_bwd_dq_{tn}_d{d}_w{nw}_n{bn}_{mn}",),
                    extra=(("XATTN_KIND", 2),), ci=not (sparse and tn != "f16"))


def bwd_aux(tn) -> Instance:
    """``flash_bwd_delta_<tn>`` and ``flash_bwd_dq_convert_<tn>`` (one module)."""
    return Instance("flash_bwd.cu", "XATTN_BWD_AUX", (("XATTN_TN", tn),),
                    (f"flash_bwd_delta_{tn}", f"flash_bwd_dq_convert_{tn}"),
                    extra=(("XATTN_KIND", 3),))


def fwd_simt(d) -> Instance:
    """The float32 SIMT forward of one head dim: dense and block-sparse entries."""
    return Instance("flash_fwd_simt.cu", "XATTN_SIMT_ONE", (("XATTN_SIMT_D", d),),
                    (f"flash_fwd_f32_simt_d{d}", f"flash_fwd_f32_simt_d{d}_bm"))


def bwd_simt(d, mods) -> Instance:
    mn = "mods" if mods else "plain"
    params = (("XATTN_SIMT_D", d), ("XATTN_SIMT_MN", mn), ("XATTN_SIMT_MODS", _b(mods)))
    return Instance("flash_bwd_simt.cu", "XATTN_BWD_SIMT_ONE", params,
                    (f"flash_bwd_f32_simt_d{d}_{mn}",))


def tf32(d, cfg, mods, x3=False) -> Instance:
    """The float32 tensor-core forward: TF32 (``x3=False``) or 3xTF32 (``x3=True``)."""
    nw, mt, bn = cfg
    mn = "mods" if mods else "plain"
    tn = "tf32x3" if x3 else "tf32"
    params = (("XATTN_TF32_TN", tn), ("XATTN_TF32_D", d), ("XATTN_TF32_NW", nw),
              ("XATTN_TF32_MT", mt), ("XATTN_TF32_BN", bn), ("XATTN_TF32_MN", mn),
              ("XATTN_TF32_MODS", _b(mods)), ("XATTN_TF32_X3", _b(x3)))
    return Instance("flash_fwd_tf32.cu", "XATTN_TF32_ONE", params,
                    (f"flash_fwd_{tn}_d{d}_w{nw}_m{mt}_n{bn}_{mn}",))


def tf32_bm(d, cfg, mods, x3, sparse) -> Instance:
    """The float32 tensor-core forward's entry with the block-mask arguments (and, in a flex
    module, the user's arrays): ``sparse`` walks the block mask's lists, else ``[kb0, kb1)``.
    Only flex_attention builds it (with its own entry name): CI compiles it through
    tests/test_flex_cuda.py, not from :func:`shipped`."""
    nw, mt, bn = cfg
    mn = ("mods" if mods else "plain") + "_bm"
    tn = "tf32x3" if x3 else "tf32"
    params = (("XATTN_TF32_TN", tn), ("XATTN_TF32_D", d), ("XATTN_TF32_NW", nw),
              ("XATTN_TF32_MT", mt), ("XATTN_TF32_BN", bn), ("XATTN_TF32_MN", mn),
              ("XATTN_TF32_MODS", _b(mods)), ("XATTN_TF32_X3", _b(x3)),
              ("XATTN_TF32_SPARSE", _b(sparse)))
    return Instance("flash_fwd_tf32.cu", "XATTN_TF32_BM_ONE", params,
                    (f"flash_fwd_{tn}_d{d}_w{nw}_m{mt}_n{bn}_{mn}",))


def tf32x3_sm90(d, bn, overlap=False) -> Instance:
    """The 3xTF32 float32 forward on wgmma (``flash_fwd_tf32x3_sm90.cu``) of one head dim and
    key tile (:data:`TF32X3_SM90`); ``overlap``: the experimental ``_ov`` schedule
    (:data:`TF32X3_SM90_OV_EXPERIMENTAL`)."""
    sfx = "_ov" if overlap else ""
    params = (("XATTN_X3SM90_D", d), ("XATTN_X3SM90_BN", bn),
              ("XATTN_X3SM90_OV", int(bool(overlap))), ("XATTN_X3SM90_SFX", sfx))
    return Instance("flash_fwd_tf32x3_sm90.cu", "XATTN_TF32X3_SM90_ONE", params,
                    (f"flash_fwd_tf32x3_sm90_d{d}_n{bn}{sfx}",), arch="sm_90a")


def bwd_tf32x3(d, cfg, mods) -> Instance:
    """The 3xTF32 float32 backward (``flash_bwd_tf32x3.cu``) of one head dim,
    ``(dK/dV columns per CTA, warps, query rows per step)`` and variant."""
    dc, nw, bm = cfg
    mn = "mods" if mods else "plain"
    params = (("XATTN_BWDX3_D", d), ("XATTN_BWDX3_DC", dc), ("XATTN_BWDX3_NW", nw),
              ("XATTN_BWDX3_BM", bm), ("XATTN_BWDX3_MN", mn), ("XATTN_BWDX3_MODS", _b(mods)))
    return Instance("flash_bwd_tf32x3.cu", "XATTN_BWDX3_ONE", params,
                    (f"flash_bwd_tf32x3_d{d}_c{dc}_w{nw}_m{bm}_{mn}",))


def _bwd_tf32x3_all() -> list:
    """Every instance of the 3xTF32 backward: defaults and timing candidates, both variants."""
    return [bwd_tf32x3(d, cfg, mods) for d, c in TF32X3_BWD.items()
            for cfg in (c, *TF32X3_BWD_EXTRA.get(d, ())) for mods in (False, True)]


# The one 3xTF32 backward entry CI compiles while TF32X3_BWD_ON is off: every kernel file has a
# shipped instance (tests/test_kernel_sources.py), and the D = 64 default is the smallest.
_BWD_TF32X3_CI = bwd_tf32x3(64, TF32X3_BWD[64], False)


def sm90(tn, d, cfg, mods=False, sparse=False) -> Instance:
    """The Hopper forward of one dtype, head dim and ``(keys per block, warpgroups, mode)``;
    ``mods`` / ``sparse``: the entry with score modifications / the block mask's walk (modes
    11, 27 and 75 only; flash_fwd.cu's argument list, after the tensor maps in mode 75)."""
    bn, nwg, mode = cfg
    params = (("XATTN90_TN", tn), ("XATTN90_D", d), ("XATTN90_BN", bn), ("XATTN90_NWG", nwg),
              ("XATTN90_OV", mode))
    name = f"flash_fwd_sm90_{tn}_d{d}_n{bn}_g{nwg}_o{mode}"
    if mods or sparse:
        mn = "_".join(("mods",) * mods + ("bm",) * sparse)
        params += (("XATTN90_MN", mn), ("XATTN90_MODS", _b(mods)),
                   ("XATTN90_SPARSE", _b(sparse)))
        # Mode bit 6: the tensor maps of K and V before that argument list (own macro).
        macro, extra = (("XATTN90_MODS_TMA_ONE", (("XATTN90_TMA", 1),)) if mode & 64
                        else ("XATTN90_MODS_ONE", ()))
        # The bfloat16 block-sparse twins are left to --all, as flash_fwd.cu's.
        return Instance("flash_fwd_sm90.cu", macro, params, (f"{name}_{mn}",), extra=extra,
                        arch="sm_90a", ci=not (sparse and tn != "f16"))
    # Modes 0-3 (the schedules before warp specialisation) live in tools/, not in the package.
    extra = () if mode & 8 else (SM90_MODES_SOURCE,)
    if mode & 64:  # the tensor-map entries (their own argument list and macro)
        # Mode bit 7: Q's map too (XATTN90_TMA = 2 selects that entry macro); with bit 5 the
        # persistent entry (3), which takes the batch as one more argument.
        macro, tma = (("XATTN90_TMAQP_ONE", 3) if mode & 32 else ("XATTN90_TMAQ_ONE", 2)) \
            if mode & 128 else ("XATTN90_TMA_ONE", 1)
        return Instance("flash_fwd_sm90.cu", macro, params, (name,),
                        extra=(("XATTN90_TMA", tma),), arch="sm_90a", includes=extra)
    return Instance("flash_fwd_sm90.cu", "XATTN90_ONE", params, (name,), arch="sm_90a",
                    includes=extra)


def bwd_sm90(tn, d, variant=None, dq=True) -> Instance:
    """The Hopper backward main kernel (``flash_bwd_sm90.cu``) of one dtype and head dim
    (:data:`SM90_BWD_HEAD_DIMS`); ``variant`` one of :data:`SM90_BWD_VARIANTS` (``None``: the
    plain entry, causal only, its own short argument list; the others take ``flash_bwd.cu``'s
    argument list) or of :data:`SM90_BWD_TMA` (the plain entry with TMA loads: the tensor maps
    of q, dout, k, v, then the plain argument list), or one of those with ``_win`` (the window
    sides as two more arguments). ``dq=False``: the entry's dK/dV-only twin
    (``..._nodq``, its own macro, the same arguments) that ``deterministic=True`` runs before
    ``flash_bwd.cu``'s dq kernel; the TMA and option variants have one, the cp.async plain
    entry none."""
    params = (("XATTN_BWD90_TN", tn), ("XATTN_BWD90_D", d))
    name = f"flash_bwd_sm90_{tn}_d{d}"
    if not dq and variant is None:
        raise ValueError("dq=False: the plain (cp.async) entry has no dK/dV-only twin; the "
                         f"TMA entries {sorted(SM90_BWD_TMA)} and the option entries have")
    nodq = () if dq else (("XATTN_BWD90_NODQ", 1),)
    sfx = "" if dq else "_nodq"
    tma = variant.removesuffix("_win") if variant else None
    if tma in SM90_BWD_TMA:  # Q/dO (and K/V) by the copy engine; _win: with the window sides
        params += (("XATTN_BWD90_MN", variant), ("XATTN_BWD90_NB", SM90_BWD_TMA[tma]))
        win = tma != variant
        macro = ("XATTN_BWD90_TMA" + ("_WIN" if win else "") + ("_ONE" if dq else "_NODQ_ONE"))
        return Instance("flash_bwd_sm90.cu", macro, params, (f"{name}_{variant}{sfx}",),
                        extra=nodq + ((("XATTN_BWD90_WIN", 1),) if win else ()), arch="sm_90a")
    if variant is None:  # the plain module also holds the dq-convert kernel of every variant
        return Instance("flash_bwd_sm90.cu", "XATTN_BWD90_ONE", params,
                        (name, f"flash_bwd_sm90_dqconv_{tn}_d{d}"), arch="sm_90a")
    mods, sparse, _ = SM90_BWD_VARIANTS[variant]
    params += (("XATTN_BWD90_MN", variant), ("XATTN_BWD90_MODS", _b(mods)),
               ("XATTN_BWD90_SPARSE", _b(sparse)))
    macro = "XATTN_BWD90_OPT_ONE" if dq else "XATTN_BWD90_OPT_NODQ_ONE"
    # The bfloat16 block-sparse twins are left to --all, as flash_bwd.cu's.
    return Instance("flash_bwd_sm90.cu", macro, params, (f"{name}_{variant}{sfx}",),
                    extra=nodq, arch="sm_90a", ci=dq or not (sparse and tn != "f16"))


def bwd_sm90_dq(tn, d) -> Instance:
    """The Hopper backward's deterministic dq kernel on wgmma (``flash_bwd_sm90.cu``, plain
    requests: causal, scale, GQA): one thread block per 128 query rows walks key blocks of 64
    in order (:data:`SM90_BWD_DQ_WGMMA` says whether ``deterministic=True`` takes it)."""
    params = (("XATTN_BWD90_TN", tn), ("XATTN_BWD90_D", d))
    return Instance("flash_bwd_sm90.cu", "XATTN_BWD90_DQ_ONE", params,
                    (f"flash_bwd_sm90_dq_{tn}_d{d}",), extra=(("XATTN_BWD90_DQK", 1),),
                    arch="sm_90a")


# Head dims of the Hopper backward (2 warpgroups, 128 keys x 64 queries per step).
SM90_BWD_HEAD_DIMS = (64, 128)
# Its option entries: name token -> (score modifications, block-mask walk, head dims built).
# "win" serves causal + window (the plain entries take no window: their code stays as
# measured). At D = 128 the score mods do not fit the 255 registers beside the 128 dK/dV
# accumulators (ptxas 13.0, sm_90a: mods spilled 48 bytes, mods_bm 72; bm 244 and win 255
# registers fit), so score mods at D = 128 stay on the mma.sync backward.
# "win" at D = 128 was built and measured slower than cupy.sm80's window backward (110 against
# 129 TFLOP/s, fp16 B=4 H=16 S=4096, window (1024, 0) causal, H100, 2026-12-05): not built.
SM90_BWD_VARIANTS = {"win": (False, False, (64,)), "mods": (True, False, (64,)),
                     "bm": (False, True, (64, 128)), "mods_bm": (True, True, (64,))}
# The TMA entries of the plain backward (flash_bwd_sm90.DEFAULT_CONFIG picks one per head dim):
# Q and dO per step, K and V once, by the copy engine (TMA) from tensor maps into this many
# Q/dO buffers. H100, fp16 S=4096 (tools/gpu_check_bwdtma.sh bench): 1.15-1.25x the cp.async
# entry.
SM90_BWD_TMA = {"tma": 3, "tma2": 2}
# The TMA entry a plain request takes per head dim (flash_bwd_sm90.DEFAULT_CONFIG; the two
# differ by 1-3 % on an H100, within a run's spread).
SM90_BWD_TMA_DEFAULT = {64: "tma", 128: "tma2"}
# Their sliding-window twins (``<config>_win``: the TMA entries with the window sides as two
# more arguments; flash_bwd_sm90.backward(..., config="tma" | "tma2") on a window request),
# built at these head dims. THE SWITCH: on, window requests take them by default
# (SM90_BWD_TMA_DEFAULT's config; shipped, the other config's twins built on request) instead
# of the cp.async "win" entry. On since an H100 run (2026-12-06): their GPU tests passed
# (tests/gpu/test_gpu_sm90_bwd.py -k tma_window), and on issue 11's window row (fp16 S = 65536
# +-256 D = 64 H = 16, useful TFLOP/s, tools/gpu_bwdtma_bench.py --window) "tma" ran at 143.4
# against the default route's 121.8; D = 128 S = 16384 +-256 "tma2" 183.9 against 124.9.
SM90_BWD_TMA_WIN_DIMS = (64, 128)
SM90_BWD_WIN_TMA_ON = True
# deterministic=True on the Hopper backward: dK and dV by the _nodq twin of the entry the
# request would take (no dS K, no dq_accum), dq by flash_bwd.cu's deterministic dq kernel
# (one CTA per query block walking its key blocks in order: bitwise reproducible). Shipped:
# the twins of the plain requests' TMA entry (SM90_BWD_TMA_DEFAULT) and of every option entry.
# THE SWITCH for the plain requests' dq: False, flash_bwd.cu's mma.sync dq kernel; True, the
# wgmma dq kernel of flash_bwd_sm90.cu (bwd_sm90_dq: 128 query rows per thread block, key
# blocks of 64). Its tests passed and it timed faster on an H100 (2026-12-05: fp16 D=128 S=4096
# whole deterministic backward 351 TFLOP/s against 267 with the mma.sync dq kernel); on since
# the det tests take either dq kernel (2026-12-05). flash_bwd_sm90.backward(...,
# dq_kernel="mma" | "wgmma") picks one on request.
SM90_BWD_DQ_WGMMA = True
# THE SWITCH of deterministic=True on the Hopper backward as a whole (the _nodq entries and, with
# SM90_BWD_DQ_WGMMA, the wgmma dq kernel): off, cupy.sm90_bwd refuses deterministic=True and
# the table takes cupy.sm80's deterministic backward. On since an H100 run (2026-12-05,
# tools/gpu_check_det.sh): 70 GPU tests, memcheck / racecheck clean; fp16 D=128 S=4096 267
# TFLOP/s against cupy.sm80's 183 (D=64 232 / 186; torch 493 / 429).
SM90_BWD_DETERMINISTIC_ON = True

# Every switch above that the kernel table's choice reads (flash_attention keeps its choice per
# call signature, xattn/flash.py: the switches' values are part of the signature).
SWITCHES = ("TF32X3_SM90_ON", "TF32X3_BWD_ON", "SM90_WIDE_ON", "SM90_PAD_ON", "SM90_MODS_ON_TMA",
            "SM90_SHORT_ON", "SM90_LONG_ON",
            "SM90_BWD_DQ_WGMMA", "SM90_BWD_DETERMINISTIC_ON", "SM90_BWD_WIN_TMA_ON")


def switches() -> tuple:
    """The current values of :data:`SWITCHES`."""
    here = globals()
    return tuple(here[name] for name in SWITCHES)


def decode(tn, d, cfg) -> Instance:
    """The split-KV decode kernel of one dtype, head dim and configuration: ``(warps, stages)``
    (each warp's ring of K/V stages in shared memory) or ``(warps, prefetch, "r")`` (the
    register path: K/V tiles straight into registers, ``prefetch`` tiles ahead)."""
    nw, st, *kind = cfg
    kind = kind[0] if kind else "s"
    params = (("XATTN_TN", tn), ("XATTN_D", d), ("XATTN_NW", nw), ("XATTN_KIND", kind),
              ("XATTN_ST", st))
    return Instance("decode_splitkv.cu", "XATTN_DECODE_ONE", params,
                    (f"decode_splitkv_{tn}_d{d}_w{nw}_{kind}{st}",))


# Head dims of the split-KV decode kernel (decode_splitkv.cu) and its configuration per head
# dim: (warps, stages) for the shared-memory ring (each warp keeps `stages` 16-key K/V tiles in
# shared memory, 8.5 KiB a stage at D=128) or (warps, prefetch, "r") for the register path
# (K/V tiles straight into registers; prefetch 0: the next tile's keys leave after the scores,
# its values after P V; 1: a whole tile ahead, two tiles of registers -- which spills at
# D=128). Chosen on an H100 80GB HBM3 (2026-12-06, benchmarks/gpu_decode.py --configs: fp16,
# Hq=32 Hkv=8, B in 1/16/64 x ctx in 4k/32k/128k, through the launcher, torch in the same
# run): at D=128 the register path (8, 0, "r") -- 223 registers, one block of 8 warps per SM --
# read 1-3 % faster than the ring (8, 2), the default before, at B >= 16 (3.18-3.20 against
# 3.10-3.13 TB/s at B = 64, ctx >= 32k) and was fastest in 7 of 9 rows in each of three runs;
# at D=64 (8, 1, "r") beat the ring (4, 3) in all 9 rows, by 3-23 %. The other entries stay
# candidates (--configs times them; the GPU tests run every one in fp16 and bf16). The ring's
# (8, 3), (4, 2), (4, 4), (2, 4) at D=128 and (4, 2), (2, 4) at D=64, never the fastest, were
# dropped; so was the register path's prefetch 0 at D=64, which spills.
DECODE_HEAD_DIMS = (64, 128)
DECODE = {64: (8, 1, "r"), 128: (8, 0, "r")}
DECODE_EXTRA = {64: ((4, 3), (4, 1, "r")), 128: ((8, 2), (4, 3), (4, 0, "r"))}


def shipped() -> list:
    """Every instance the launchers may request with their own configurations."""
    out = []
    for d in HEAD_DIMS:
        cfgs = {(FWD[d], False), (FWD_MODS.get(d, FWD[d]), True)}
        cfgs |= {(c, m) for c in FWD_EXTRA.get(d, ()) for m in (False, True)}
        for cfg, mods in sorted(cfgs):
            out += [fwd(tn, d, cfg, mods) for tn in TYPES]
        for cfg in FWD_BM.get(d, ()):
            out += [fwd(tn, d, cfg, False, True) for tn in TYPES]
        for cfg in FWD_BM_MODS.get(d) or FWD_BM.get(d, ()):
            out += [fwd(tn, d, cfg, True, True) for tn in TYPES]
        for mods in (False, True):
            for dq in (True, False):
                out += [bwd(tn, d, BWD[d], mods, dq) for tn in TYPES]
            out += [bwd_dq(tn, d, BWD_DQ[d], mods) for tn in TYPES]
            for cfg in BWD_BM.get(d, ()):
                for dq in (True, False):
                    out += [bwd(tn, d, cfg, mods, dq, True) for tn in TYPES]
            for cfg in BWD_BM_DQ.get(d, ()):
                out += [bwd_dq(tn, d, cfg, mods, True) for tn in TYPES]
        out.append(fwd_simt(d))
        out += [bwd_simt(d, mods) for mods in (False, True)]
        out += [tf32(d, TF32[d], mods) for mods in (False, True)]
        for cfg, with_mods in TF32_EXTRA.get(d, ()):
            out += [tf32(d, cfg, mods) for mods in ((False, True) if with_mods else (False,))]
        for cfg in (TF32X3[d], *TF32X3_EXTRA.get(d, ())):
            out += [tf32(d, cfg, mods, x3=True) for mods in (False, True)]
    out += [bwd_aux(tn) for tn in TYPES]
    out += [sm90(tn, *c[:1], c[1:]) for c in SM90_SHIPPED for tn in TYPES]
    out += _sm90_options(SM90_MODS_ON_TMA)
    for d in DECODE_HEAD_DIMS:
        for cfg in (DECODE[d], *DECODE_EXTRA.get(d, ())):
            out += [decode(tn, d, cfg) for tn in TYPES]
    out += [bwd_sm90(tn, d) for d in SM90_BWD_HEAD_DIMS for tn in TYPES]
    out += [bwd_sm90(tn, d, var) for var in SM90_BWD_TMA for d in SM90_BWD_HEAD_DIMS
            for tn in TYPES]
    out += [bwd_sm90(tn, d, var) for var, (*_, dims) in SM90_BWD_VARIANTS.items()
            for d in dims for tn in TYPES]
    out += [bwd_sm90(tn, d, var, dq=False) for d, var in SM90_BWD_TMA_DEFAULT.items()
            for tn in TYPES]
    out += [bwd_sm90(tn, d, f"{var}_win", dq=dq) for d, var in _bwd_win_tma(True)
            for tn in TYPES for dq in (True, False)]
    out += [bwd_sm90(tn, d, var, dq=False) for var, (*_, dims) in SM90_BWD_VARIANTS.items()
            for d in dims for tn in TYPES]
    out += [bwd_sm90_dq(tn, d) for d in SM90_BWD_HEAD_DIMS for tn in TYPES]
    out += [tf32x3_sm90(d, bn) for d, bn in TF32X3_SM90.items()]
    out += [i for i in _bwd_tf32x3_all() if TF32X3_BWD_ON or i == _BWD_TF32X3_CI]
    return out


def _sm90_options(tma) -> list:
    """The Hopper forward's _mods / _bm / _mods_bm entries of one family: the mode-11 tables
    or (``tma``) their mode-75 twins."""
    mods_t, bm_t, bm_mods_t = ((SM90_MODS_TMA, SM90_BM_TMA, SM90_BM_MODS_TMA) if tma
                               else (SM90_MODS, SM90_BM, SM90_BM_MODS))
    out = [sm90(tn, d, c, True) for d, c in mods_t.items() for tn in TYPES]
    for d, cs in bm_t.items():
        out += [sm90(tn, d, c, False, True) for c in cs for tn in TYPES]
        out += [sm90(tn, d, c, True, True) for c in bm_mods_t.get(d, cs) for tn in TYPES]
    return out


def experimental() -> list:
    """Instances built only on request (``tools/check_kernels.py --experimental``): the
    earlier schedules and the option entries of the family the switch leaves off."""
    return ([sm90(tn, c[0], c[1:]) for c in SM90_EXPERIMENTAL + SM90_WIDE_EXPERIMENTAL
             for tn in TYPES]
            + _sm90_options(not SM90_MODS_ON_TMA)
            + [tf32x3_sm90(d, bn, True) for d, bn in TF32X3_SM90_OV_EXPERIMENTAL]
            + [bwd_sm90(tn, d, f"{var}_win", dq=dq) for d, var in _bwd_win_tma(False)
               for tn in TYPES for dq in (True, False)]
            + [i for i in _bwd_tf32x3_all() if not TF32X3_BWD_ON and i != _BWD_TF32X3_CI])


def _bwd_win_tma(shipped_ones) -> list:
    """(head dim, TMA config) of the backward's window twins that are shipped (the default
    config of each head dim while SM90_BWD_WIN_TMA_ON) or, with ``shipped_ones`` False, the
    rest."""
    return [(d, var) for d in SM90_BWD_TMA_WIN_DIMS for var in SM90_BWD_TMA
            if (SM90_BWD_WIN_TMA_ON and var == SM90_BWD_TMA_DEFAULT.get(d)) == shipped_ones]
