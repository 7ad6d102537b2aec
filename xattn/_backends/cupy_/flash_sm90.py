"""The ``cupy.sm90`` entry: Hopper (sm_90a) flash attention forward with warpgroup MMA.

The kernel (``flash_fwd_sm90.cu``) serves float16 and bfloat16, head dims 64 and 128,
``Dv == D``, causal (bottom-right) and sliding window, any scale, GQA/MQA, Sq and Sk of any
length, and always writes ``lse``. Everything else (score modifications, mask, bias, ALiBi, a
block mask, other head dims, other cards, the backward pass) is refused by :func:`supports`,
and ``auto`` walks on to ``cupy.sm80``.

The module is compiled for ``sm_90a`` only (the wgmma instructions exist in no portable
target), so it runs on compute capability 9.0 exactly; :mod:`._compile` builds and caches its
cubins on disk.
"""

from __future__ import annotations

import math

import numpy as np

from . import _compile, _params, instances
from ._compile import compiled_function

__all__ = ["BUILT", "CONFIGS", "compiled_function", "forward", "get_kernel", "precompile",
           "smem_bytes", "supports", "threads"]

# Per head dim: (keys per block BN, consumer warpgroups per block, mode), from the one list of
# every compiled entry (instances.py). 64 query rows per warpgroup. Mode bit 0 (overlap): block
# j - 1's P V is issued before block j's softmax (three K/V buffers); bit 1 (swizzle): 128-byte
# swizzled shared memory instead of the core-matrix layout (1 KiB more shared memory for the
# alignment). Bit 3 (warp-specialised, with bits 0 and 1): one more warpgroup per block, a
# producer that copies K/V into a ring of 3 stages handed over by mbarriers (setmaxnreg: the
# producer keeps 24 registers); bit 4 adds ping-pong of two consumers' GEMMs (named barriers).
# Defaults from `python3 tools/wgmma_probe.py --bench` on an H200 (fp16 S=4096, TFLOP/s, see
# docs/dev/perf_gpu.rst): D=128 (128, 2, 11) 442 / causal 386 (mode 3: 427 / 369; mode 0: 228 /
# 202; mma.sync 294 / 248), D=64 (64, 3, 11) 348 / 294 (mode 3: 304 / 269; mma.sync 292 / 258).
# Mode 27 (ping-pong on top of 11) measured slower: 394 / 344 at D=128.
CONFIGS = instances.SM90
# Every configuration that can be built, as (D, BN, warpgroups, mode): the shipped ones (CI
# compiles them) and the experimental schedules (built on request: config=...).
BUILT = frozenset((*instances.SM90_SHIPPED, *instances.SM90_EXPERIMENTAL))
# Options this kernel ignores safely: allow_tf32 concerns float32 only.
_KNOWN = frozenset({"allow_tf32"})


def supports(prob, opts, op="forward"):
    """``None`` when the sm_90a kernel serves this request, else the reason it does not."""
    why = _params.half_kernel_reason(prob, op, ("forward", "the sm_90a kernel is forward only"),
                                     "the sm_90a kernel")
    if why is not None:
        return why
    if prob.d not in CONFIGS or prob.dv != prob.d:
        return (f"head_dim {prob.d} (Dv {prob.dv}): the sm_90a kernel has D = Dv in "
                f"{sorted(CONFIGS)}")
    if prob.has_score_mods:
        return "softcap, mask, bias and ALiBi run on the mma.sync kernel (cupy.sm80)"
    if prob.block_mask is not None:
        return "a block_mask runs on the mma.sync kernel (cupy.sm80)"
    unknown = sorted(k for k, v in (opts or {}).items() if v is not None and k not in _KNOWN)
    if unknown:
        return f"options {unknown} (a tile plan) run on cupy.sm80"
    return _params.device_reason(prob, "the sm_90a kernel", exact_cc=90)


def smem_bytes(d, cfg):
    bn, nwg, mode = cfg
    nbuf = 3 if mode & 1 else 2
    # Mode bit 3's mbarriers are static shared memory (128 bytes), outside this count.
    return (nwg * 64 * d + 2 * nbuf * bn * d) * 2 + (1024 if mode & 2 else 0)


def threads(cfg):
    """Threads per block: 128 per consumer warpgroup, plus the producer's 128 in mode bit 3."""
    bn, nwg, mode = cfg
    return (nwg + (1 if mode & 8 else 0)) * 128


def precompile(type_name: str, keys, workers: int = 8):
    """Compile the cubins of several (D, BN, warpgroups, mode) at once (threads), so that a
    benchmark of every configuration does not wait for them one by one."""
    entries = [(i.name, i.defines, i.includes) for i in
               (instances.sm90(type_name, d, tuple(c)) for d, *c in keys)]
    _compile.precompile("flash_fwd_sm90.cu", entries, workers)


def get_kernel(type_name: str, d: int, cfg: tuple):
    """The compiled entry point for one dtype, head dim and (BN, warpgroups, mode); cached
    per device."""
    inst = instances.sm90(type_name, d, cfg)
    return compiled_function(inst.source, inst.name, inst.defines, smem_bytes(d, cfg),
                             arch=inst.arch, includes=inst.includes)


def forward(prob, q, k, v, *, allow_tf32=False, config=None):
    """Return ``(out, lse)`` from the sm_90a kernel (the caller checked :func:`supports`, or a
    test calls it directly). ``config`` = (keys per block, warpgroups, mode) overrides the
    default (``CONFIGS``; ``BUILT`` lists the choices)."""
    if prob.has_score_mods or prob.block_mask is not None:
        raise NotImplementedError("the sm_90a kernel takes no mask, bias, ALiBi or block mask")
    with q.device:
        return _forward(prob, q, k, v, config)


def _forward(prob, q, k, v, config):
    import cupy as xp

    tn = _params.type_name(prob.dtype)
    d = prob.d
    if tn is None or d not in CONFIGS or prob.dv != d:
        raise NotImplementedError(f"the sm_90a kernel has no entry for dtype {prob.dtype}, "
                                  f"D {d}, Dv {prob.dv}")
    cfg = tuple(config) if config is not None else CONFIGS[d]
    if (d, *cfg) not in BUILT:
        raise ValueError(f"config {cfg} for D={d} is not built; built: {sorted(BUILT)}")
    B = math.prod(prob.batch)
    q4, k4, v4, out, lse = _params.forward_buffers(xp, prob, q, k, v, d, q.dtype)
    if _params.nothing_to_launch(out, lse):
        return _params.forward_result(xp, prob, out, lse)
    fn = get_kernel(tn, d, cfg)
    nwg = cfg[1]
    bm = 64 * nwg
    i32, f32 = np.int32, np.float32
    args = (q4, k4, v4, out, lse, i32(prob.hq), i32(prob.group), i32(prob.sq), i32(prob.sk),
            f32(prob.scale), *_params.visibility_args(prob))  # no score mods here
    fn(((prob.sq + bm - 1) // bm, prob.hq, B), (threads(cfg),), args,
       shared_mem=smem_bytes(d, cfg))
    return _params.forward_result(xp, prob, out, lse)
