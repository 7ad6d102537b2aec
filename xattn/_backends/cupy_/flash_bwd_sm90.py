"""The ``cupy.sm90_bwd`` entry: the Hopper (sm_90a) backward on warpgroup MMA.

``flash_bwd_sm90.cu``'s main kernel computes dK, dV and the float32 partial sums of dQ with
wgmma (all five GEMMs of the backward); the delta kernel is the mma.sync backward's
(:mod:`.flash_bwd`), so the three launches are:

1. ``delta = rowsum(dout * out)`` (``flash_bwd_delta_<t>``);
2. the wgmma kernel, one CTA of two warpgroups per (128 keys, kv head, batch element), walking
   the query heads of its GQA group and the 64-row query blocks that see its keys; dS K is
   staged in shared memory and added to a zeroed float32 ``dq_accum`` (in the kernel's tile
   order) by one bulk reduction per 64 x 64 tile (``cp.reduce.async.bulk .add.f32``; the
   order of those adds varies from run to run);
3. ``dq = scale * dq_accum`` in the input type, back to row order
   (``flash_bwd_sm90_dqconv_<t>_d<D>``).

Served: float16 and bfloat16, ``D == Dv`` in 64 or 128, causal or not (bottom-right), sliding
windows at D = 64 (the D = 128 entry measured slower than ``cupy.sm80``'s), any scale, GQA/MQA
(dk/dv summed over the group in registers), any ``Sq`` / ``Sk``, fully masked rows (zero
gradients); the score modifications (softcap with its derivative in dS, ALiBi, additive bias and
boolean mask in every broadcast shape, as ``cupy.sm80``'s backward takes them) at D = 64; a
block mask (unbatched) whose blocks its tiles divide: ``bk`` a multiple of 128 (the CTA's keys),
``bq`` of 64 (one query step), at D = 64 and, without score mods, D = 128. The kernel walks the
mask's CSC column of its 128 keys (the query blocks that see them), so invisible blocks are
never loaded; full blocks run no element test, partial blocks the mask's element rule. Compute
capability 9.0 only. Refused with the reason (:func:`supports`), so that ``auto`` walks on to
``cupy.sm80``: the forward, score mods at D = 128 (they do not fit the registers beside the
dK/dV accumulators), other block sizes, ``return_dbias``, other head dims and dtypes.

``deterministic=True`` (everything above): dK and dV by the ``_nodq`` twin of the entry the
request would take (the same products in the same order, so dk and dv equal the
non-deterministic call's bit for bit, without dS K, its staging, the bulk adds, dq_accum and
the convert kernel), then dq by ``flash_bwd.cu``'s deterministic dq kernel (the mma.sync one,
:func:`.flash_bwd.run_dq`: one CTA per query block walks its key blocks in order and writes
dq once, no atomics: bitwise reproducible). :func:`kernel_names` says which kernels run.
A wgmma version of that dq kernel (``flash_bwd_sm90_dq_<t>_d<D>``: 128 query rows per thread
block, key blocks of 64, ``S``, ``dP`` and ``dQ += dS K`` on wgmma, dq written once, no
atomics) serves the plain requests (causal, scale, GQA) with ``dq_kernel="wgmma"``
(:data:`DQ_KERNELS`); :data:`instances.SM90_BWD_DQ_WGMMA` (on) makes it their default
(measured faster, see instances.py); ``dq_kernel="mma"`` keeps the mma.sync one.

Entries (:func:`variant`): the plain one (causal only, its own argument list), and with a
window, score mods or a block mask one of ``win``, ``mods``, ``bm``, ``mods_bm``, which take
``flash_bwd.cu``'s argument list (the parameter block of :func:`._params.option_args`, then
the block mask's CSR and CSC arrays of :func:`._params.block_mask_args`).
``flex_attention_backward`` builds the same kernel with the user's functions compiled in
(:mod:`.flex_tc_bwd`).

The TMA entries (``backward(..., config="tma")`` or ``"tma2"``, :data:`CONFIGS`; the plain
requests' default, :data:`DEFAULT_CONFIG`; ``config="plain"`` takes the cp.async entry): the
plain entry with Q and dO of each query step, and K and V once, copied by the copy engine
(TMA) from tensor maps (:mod:`.tma`: boxes of 64 columns x 64 query rows or x 128 keys,
128-byte swizzle) into three (``tma``) or two (``tma2``) Q/dO buffers, each handed over by an
mbarrier instead of cp.async by every thread and a block barrier. Same arithmetic in the same
order: dk and dv equal the plain entry's bit for bit. On an H100 (fp16 B=4 H=16 S=4096, whole
backward, ``bash tools/gpu_check_bwdtma.sh bench``): D=128 392 / causal 341 TFLOP/s (tma2)
against the cp.async entry's 314 / 297, D=64 272 / 233 (tma) against 221 / 200.
"""

from __future__ import annotations

import math

import numpy as np

from . import _params, flash_bwd, instances
from ._compile import compiled_function

__all__ = ["CONFIGS", "DQ_KERNELS", "HEAD_DIMS", "backward", "block_mask_reason", "built",
           "check_config", "dq_accum", "dq_config", "dq_kernel_choice", "dq_smem_bytes",
           "forward", "get_kernel", "grid", "kernel_names", "run_dq_convert", "smem_bytes",
           "supports", "tma_maps", "variant"]

HEAD_DIMS = instances.SM90_BWD_HEAD_DIMS
# Keys per CTA (two warpgroups of 64) and query rows per step: fixed by the kernel.
BLOCK_N, BLOCK_M = 128, 64
THREADS = 256
# The TMA entries of the plain backward: config name -> Q/dO buffers; the one a plain request
# takes per head dim (measured above; the two differ by 1-3 %, within a run's spread).
CONFIGS = instances.SM90_BWD_TMA
DEFAULT_CONFIG = instances.SM90_BWD_TMA_DEFAULT
PLAIN = "plain"  # config= for the cp.async entry
# deterministic=True's dq kernel (dq_kernel=): flash_bwd.cu's on mma.sync (every request) or
# this file's on wgmma (plain requests only).
DQ_KERNELS = ("mma", "wgmma")
# Shared memory of the wgmma dq kernel: Q and dO (128 rows), two K and two V buffers (64 rows).
DQ_ROWS, DQ_KEYS = 128, 64


def variant(prob):
    """The kernel entry's variant token for this problem (:data:`instances.SM90_BWD_VARIANTS`),
    or ``None`` for the plain entry (causal only)."""
    mods, sparse = prob.has_score_mods, prob.block_mask is not None
    if mods or sparse:
        return "_".join(("mods",) * mods + ("bm",) * sparse)
    return "win" if prob.window is not None else None


def built(var, d) -> bool:
    """Whether the entry of variant ``var`` exists at head dim ``d`` (a window also where its
    TMA twins serve it by default: :data:`instances.SM90_BWD_WIN_TMA_ON`)."""
    if var == "win" and _win_tma(d) and instances.SM90_BWD_WIN_TMA_ON:
        return True
    return var is None or d in instances.SM90_BWD_VARIANTS[var][2]


def _win_tma(d):
    return d in instances.SM90_BWD_TMA_WIN_DIMS


def entry(prob, config):
    """The variant of the entry that runs ``prob`` with the checked ``config``
    (:func:`check_config`): the TMA entry ``config`` for a plain request, its ``_win`` twin for
    a window request, else :func:`variant` (``None``: the cp.async plain entry)."""
    var = variant(prob)
    if config is None:
        return var
    return config if var is None else f"{config}_win"


def block_mask_reason(block_mask):
    """``None`` when the kernel walks this block mask, else why not: its 128 keys must lie
    inside one mask key block and each 64-row query step inside one mask query block."""
    if block_mask.batch_shape:
        return "block_mask: a batched mask (one call per batch element goes through flash.py)"
    bq, bk = block_mask.block_size
    if bq % BLOCK_M or bk % BLOCK_N:
        return (f"block_mask: block size {tuple(block_mask.block_size)} is not served by the "
                f"sm_90a backward kernel: bq must be a multiple of {BLOCK_M} and bk of "
                f"{BLOCK_N} (its query step and key block); cupy.sm80 takes smaller blocks")
    return None


def supports(prob, opts, op="backward"):
    """``None`` when the sm_90a backward kernel serves this request, else the reason."""
    why = (_params.half_kernel_reason(
        prob, op, ("backward", "the cupy.sm90_bwd entry is backward only (the forward runs on "
                   "cupy.sm90)"), "the sm_90a backward kernel")
        or _entry_reason(prob) or _options_reason(opts or {}))
    return why or _params.device_reason(prob, "the sm_90a backward kernel", exact_cc=90)


def _entry_reason(prob):
    """Why no entry serves this head dim, block mask or set of score mods, or None."""
    if prob.d not in HEAD_DIMS or prob.dv != prob.d:
        return (f"head_dim {prob.d} (Dv {prob.dv}): the sm_90a backward kernel has D = Dv in "
                f"{list(HEAD_DIMS)}")
    why = None if prob.block_mask is None else block_mask_reason(prob.block_mask)
    var = variant(prob)
    if why is None and not built(var, prob.d):
        dims = list(instances.SM90_BWD_VARIANTS[var][2])
        if var == "win":
            why = (f"a sliding window at head_dim {prob.d}: the sm_90a backward has it at D = "
                   f"{dims} (its D = 128 entry measured slower than cupy.sm80's, which serves "
                   "it)")
        else:
            why = (f"softcap, mask, bias and ALiBi at head_dim {prob.d}: the sm_90a backward "
                   f"has them at D = {dims} (at D = 128 they do not fit the registers beside "
                   "the dK/dV accumulators); cupy.sm80 serves them")
    return why


def _options_reason(opts):
    unknown = sorted(k for k, v in opts.items() if v is not None and k != "deterministic")
    if unknown:
        return f"options {unknown} are not implemented in the sm_90a backward kernel"
    if opts.get("deterministic") and not instances.SM90_BWD_DETERMINISTIC_ON:
        return ("deterministic=True: the sm_90a backward's dK/dV-only entries have not run on a "
                "GPU yet (instances.SM90_BWD_DETERMINISTIC_ON is off); cupy.sm80 serves it")
    return None


def smem_bytes(d, config=None, dq=True):
    """K, V, two Q and two dO buffers, dS (64 x 128), lse and delta (two buffers each), a
    64 x 64 float32 dQ staging tile per warpgroup, plus 1 KiB for the 1024-byte alignment of
    the swizzled tiles; ``config`` (:data:`CONFIGS`): its Q/dO buffers and one 8-byte
    mbarrier each (D = 128, three buffers: 215,064 bytes of the 232,448 a block may have);
    ``dq=False`` (the dK/dV-only entries): neither dS nor the staging tiles."""
    nb = CONFIGS[config] if config is not None else 2
    bars = 8 * nb if config is not None else 0
    ds, stage = (BLOCK_M * BLOCK_N * 2, 2 * 64 * 64 * 4) if dq else (0, 0)
    return ((2 * BLOCK_N * d + 2 * nb * BLOCK_M * d) * 2 + ds
            + 4 * BLOCK_M * 4 + stage + 1024 + bars)


def get_kernel(tn, d, var=None, convert=False, dq=True):
    """The compiled sm_90a entry of one dtype, head dim and variant (:func:`variant`), or
    (``convert``) the dq conversion kernel of them all (in the plain entry's cubin; cached on
    disk); ``dq=False``: the variant's dK/dV-only twin (deterministic=True)."""
    inst = instances.bwd_sm90(tn, d, None if convert else var, dq=dq or convert)
    name = inst.names[1] if convert else inst.name
    tma = var.removesuffix("_win") if var else None  # a TMA entry's buffers, window or not
    smem = 0 if convert else smem_bytes(d, tma if tma in CONFIGS else None, dq)
    return compiled_function(inst.source, name, inst.defines, smem, arch=inst.arch)


def dq_config(prob):
    """The deterministic dq kernel's ``(warps, keys per block)`` (:mod:`.flash_bwd`'s
    configuration for this head dim, or the first block-mask candidate that divides the
    mask's blocks: (4, 64) always does here, bq being a multiple of 64 and bk of 128)."""
    if prob.block_mask is None:
        return flash_bwd.DQ_CONFIGS[prob.d]
    cfg = flash_bwd.block_mask_configs(prob.d, prob.block_mask.block_size)[1]
    if cfg is None:  # unreachable while block_mask_reason holds; never a silent substitute
        raise NotImplementedError(f"block_mask: no deterministic dq configuration divides "
                                  f"{tuple(prob.block_mask.block_size)}")
    return cfg


def dq_kernel_choice(prob, dq_kernel=None):
    """The deterministic dq kernel (one of :data:`DQ_KERNELS`) that serves ``prob``:
    ``dq_kernel`` checked (``"wgmma"``: plain requests only), or the default
    (:data:`instances.SM90_BWD_DQ_WGMMA` for plain requests, else ``"mma"``)."""
    plain = variant(prob) is None
    if dq_kernel is None:
        return "wgmma" if plain and instances.SM90_BWD_DQ_WGMMA else "mma"
    if dq_kernel not in DQ_KERNELS:
        raise ValueError(f"dq_kernel: one of {list(DQ_KERNELS)} or None, got {dq_kernel!r}")
    if dq_kernel == "wgmma" and not plain:
        raise ValueError(f"dq_kernel='wgmma': the wgmma dq kernel serves plain requests "
                         f"(causal, scale, GQA); this problem needs the {variant(prob)!r} "
                         "options (dq_kernel='mma' serves them)")
    return dq_kernel


def dq_smem_bytes(d):
    """Shared memory of the wgmma dq kernel: Q and dO tiles of 128 rows, two K and two V
    buffers of 64 rows, plus 1 KiB for the 1024-byte alignment of the swizzled tiles."""
    return (2 * DQ_ROWS + 4 * DQ_KEYS) * d * 2 + 1024


def kernel_names(prob, deterministic=False, config=None, dq_kernel=None):
    """The kernels :func:`backward` launches for ``prob``, in order (the route tests and the
    benchmark's note print): the delta kernel, the main entry (``..._nodq`` with
    ``deterministic``), then the dq conversion or (``deterministic``) the dq kernel
    (``flash_bwd.cu``'s, or this file's with ``dq_kernel="wgmma"``). ``config`` and
    ``dq_kernel`` as :func:`backward` takes them."""
    tn = _params.type_name(prob.dtype)
    config = check_config(prob, config, deterministic)
    var = entry(prob, config)
    names = [f"flash_bwd_delta_{tn}"]
    if deterministic:
        names.append(instances.bwd_sm90(tn, prob.d, var, dq=False).name)
        if dq_kernel_choice(prob, dq_kernel) == "wgmma":
            names.append(instances.bwd_sm90_dq(tn, prob.d).name)
        else:
            names.append(instances.bwd_dq(tn, prob.d, dq_config(prob), prob.has_score_mods,
                                          prob.block_mask is not None).name)
    else:
        names.append(instances.bwd_sm90(tn, prob.d, var).name)
        names.append(f"flash_bwd_sm90_dqconv_{tn}_d{prob.d}")
    return tuple(names)


def dq_accum(xp, batch, hq, sq, d):
    """The zeroed float32 dq_accum, in the kernel's tile order: whole 64-row query blocks (the
    last one padded), each as D / 64 tiles of 64 x 64 in accumulator-fragment order."""
    return xp.zeros((batch, hq, -(-sq // BLOCK_M) * BLOCK_M, d), dtype=xp.float32)


def run_dq_convert(tn, d, acc, dq4, rows, sq, scale):
    """``dq = scale * dq_accum`` in the input type, from the tile order back to ``rows`` rows
    of ``d`` (``rows`` = batch x heads x sq)."""
    pairs = rows * d // 2
    get_kernel(tn, d, convert=True)(grid=(min((pairs + 255) // 256, 65535),), block=(256,),
                                    args=(acc, dq4, np.int64(rows), np.int32(sq),
                                          np.float32(scale)))


def grid(batch, hkv, sk):
    """The launch grid: (key blocks of 128, kv heads, batch elements)."""
    return ((sk + BLOCK_N - 1) // BLOCK_N, hkv, batch)


def forward(prob, q, k, v, **_):
    """The entry has no forward (:func:`supports` refuses it; the table never routes here)."""
    raise NotImplementedError("the cupy.sm90_bwd entry is backward only (the forward runs on "
                              "cupy.sm90)")


def check_config(prob, config, deterministic=False):
    """The TMA entry (a key of :data:`CONFIGS`) this problem runs, or ``None`` for a
    cp.async entry: ``config`` None takes :data:`DEFAULT_CONFIG` for the plain entry's
    problems (and for a window's when :data:`instances.SM90_BWD_WIN_TMA_ON`: the TMA entries'
    ``_win`` twins; the score-mod and block-mask entries have no TMA twin), ``"plain"`` the
    cp.async plain entry (which has no dK/dV-only twin: not with ``deterministic``) or, for a
    window where it is built, the cp.async window entry;
    ValueError for anything else."""
    var = variant(prob)
    win_tma = var == "win" and _win_tma(prob.d)
    if config is None:
        if var is None or (win_tma and instances.SM90_BWD_WIN_TMA_ON):
            return DEFAULT_CONFIG.get(prob.d)
        return None
    if config == PLAIN:
        if var == "win" and prob.d in instances.SM90_BWD_VARIANTS["win"][2]:
            return None  # the cp.async window entry (and its dK/dV-only twin)
        if var is not None:
            raise ValueError(f"config='plain': this problem needs the {var!r} entry")
        if deterministic:
            raise ValueError("config='plain' with deterministic=True: the cp.async entry has "
                             f"no dK/dV-only twin (the TMA entries {sorted(CONFIGS)} have)")
        return None
    if config not in CONFIGS:
        raise ValueError(f"config: one of {sorted(CONFIGS)} (the TMA entries), 'plain' or "
                         f"None, got {config!r}")
    if var is not None and not win_tma:
        raise ValueError(f"config={config!r}: the TMA entries are the plain backward's (causal, "
                         f"scale, GQA, and a window at D = {list(instances.SM90_BWD_TMA_WIN_DIMS)}"
                         f"); this problem needs the {var!r} entry")
    return config


def backward(prob, dout, q, k, v, out, lse, *, deterministic=False, config=None,
             dq_kernel=None):
    """Return ``(dq, dk, dv)`` from the sm_90a backward kernel (see :func:`supports`);
    ``config``: the entry of a plain request, one of :data:`CONFIGS` or ``"plain"`` (default:
    :data:`DEFAULT_CONFIG`; benchmarks and tests pass it); ``dq_kernel``: deterministic=True's
    dq kernel (:func:`dq_kernel_choice`)."""
    why = supports(prob, {"deterministic": deterministic or None}, "backward")
    if why is not None:
        raise NotImplementedError(why)
    deterministic = bool(deterministic)
    config = check_config(prob, config, deterministic)
    if dq_kernel is not None and not deterministic:
        raise ValueError("dq_kernel: only with deterministic=True (the default backward adds "
                         "dq in the main kernel)")
    dq_kernel = dq_kernel_choice(prob, dq_kernel) if deterministic else None
    with q.device:
        return _backward(prob, dout, q, k, v, out, lse, config, deterministic, dq_kernel)


def tma_maps(q4, k4, v4, do4):
    """The tensor maps of the TMA entries, in their argument order: q and dout in boxes of 64
    columns x 64 query rows, k and v in boxes of 64 columns x 128 keys (one box per 64-column
    panel of the kernel's 128-byte-swizzled tiles; rows past the sequence arrive as zeros).
    Each operand is checked first (C-contiguous, 16-byte aligned)."""
    from . import tma

    return (tma.rows_map(q4, "q", BLOCK_M), tma.rows_map(do4, "dout", BLOCK_M),
            tma.rows_map(k4, "k", BLOCK_N), tma.rows_map(v4, "v", BLOCK_N))


def _backward(prob, dout, q, k, v, out, lse, config=None, deterministic=False,
              dq_kernel=None):
    import cupy as xp

    tn = _params.type_name(prob.dtype)
    d = prob.d
    B, hq, hkv, sq, sk = math.prod(prob.batch), prob.hq, prob.hkv, prob.sq, prob.sk
    dtype = q.dtype
    if B * hq * sq == 0 or sk == 0:
        return (xp.zeros(q.shape, dtype=dtype), xp.zeros(k.shape, dtype=dtype),
                xp.zeros(v.shape, dtype=dtype))

    q4 = _params.operand(xp, q, B, hq, sq, d, dtype)
    k4 = _params.operand(xp, k, B, hkv, sk, d, dtype)
    v4 = _params.operand(xp, v, B, hkv, sk, d, dtype)
    do4 = _params.operand(xp, dout, B, hq, sq, d, dtype)
    o4 = _params.operand(xp, out, B, hq, sq, d, dtype)
    lse3 = xp.ascontiguousarray(lse.reshape(B, hq, sq), dtype=xp.float32)

    dq4, dk4, dv4, delta = flash_bwd.grad_buffers(xp, B, hq, hkv, sq, sk, d, dtype)
    # dq_accum in the kernel's tile order: whole 64-row query blocks (the last one padded);
    # deterministic: none (the dK/dV-only entry reads no dq_accum, the dq kernel writes dq).
    null = np.uint64(0)
    acc = null if deterministic else dq_accum(xp, B, hq, sq, d)
    i32, f32 = np.int32, np.float32

    var = entry(prob, config)
    # The tensor maps (checked before any launch).
    maps = tma_maps(q4, k4, v4, do4) if config is not None else ()
    plain = var is None or config is not None
    # flash_bwd.cu's parameter block: the option entries' arguments and the dq kernel's.
    if deterministic or not plain:
        opt_args = _params.option_args(xp, prob)
        bm_args = _params.block_mask_args(xp, prob, csc=True)
    dq_cfg = dq_config(prob) if deterministic else None
    flash_bwd.run_delta(tn, o4, do4, delta, d)
    if plain:  # a TMA entry's _win twin takes the window sides after causal
        vis = (_params.visibility_args(prob) if var and var.endswith("_win")
               else (i32(bool(prob.causal)),))
        args = (*maps, q4, k4, v4, do4, lse3, delta, acc, dk4, dv4, i32(hq), i32(prob.group),
                i32(sq), i32(sk), f32(prob.scale), *vis)
    else:  # flash_bwd.cu's argument list (dq, null here, is not read)
        args = (q4, k4, v4, do4, lse3, delta, acc, null, dk4, dv4, i32(hq),
                i32(prob.group), i32(sq), i32(sk), f32(prob.scale), *opt_args, *bm_args)
    get_kernel(tn, d, var, dq=not deterministic)(
        grid=grid(B, hkv, sk), block=(THREADS,), args=args,
        shared_mem=smem_bytes(d, config, not deterministic))
    if dq_kernel == "wgmma":
        inst = instances.bwd_sm90_dq(tn, d)
        kernel = compiled_function(inst.source, inst.name, inst.defines, dq_smem_bytes(d),
                                   arch=inst.arch)
        kernel(grid=((sq + DQ_ROWS - 1) // DQ_ROWS, hq, B), block=(THREADS,),
               args=(q4, k4, v4, do4, lse3, delta, dq4, i32(hq), i32(prob.group), i32(sq),
                     i32(sk), f32(prob.scale), i32(bool(prob.causal))),
               shared_mem=dq_smem_bytes(d))
    elif deterministic:
        flash_bwd.run_dq(tn, prob, d, dq_cfg, (q4, k4, v4, do4, lse3, delta, dq4, dk4, dv4),
                         opt_args, bm_args)
    else:
        run_dq_convert(tn, d, acc, dq4, B * hq * sq, sq, prob.scale)
    return dq4.reshape(q.shape), dk4.reshape(k.shape), dv4.reshape(v.shape)
