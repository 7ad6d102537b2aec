"""Flex attention forward on the GPU with Numba CUDA: user score/mask functions in the tile loop.

One thread owns one query row (SIMT, no tensor cores): it keeps its query and its output
accumulator in registers/local memory and walks the keys tile by tile, with the block staging
each key/value tile in shared memory once for all its rows. The user's ``score_mod`` and
``mask_mod`` are compiled as device functions and inlined into the loop, FlexAttention-style.

Also runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on NumPy arrays, which is
how the CPU CI checks it on tiny shapes.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import numpy as np

from ... import _flex_codegen as cg
from ._compat import cuda

# Query rows per block (one per thread): 64 threads keep two warps busy per block while the
# per-thread local arrays below stay affordable.
BLOCK_Q = 64
# Keys staged per step; 32 x MAX_D x 4 B x 2 (k and v) = 32 KiB of shared memory at D = 128.
BLOCK_K = 32
# Largest head dims of the per-thread arrays (compile-time sizes in Numba CUDA).
MAX_D = 128


_lock = threading.Lock()
_kernels: OrderedDict = OrderedDict()  # (functions' keys, arg types, dtype) -> kernel
_MAX_KERNELS = 64


def _part(cap, prefix):
    """``(module lines, names injected, extra kernel parameters)`` of one user function.

    Captured CuPy arrays become kernel parameters; captured NumPy arrays are frozen into the
    kernel (constant memory, as numba.cuda does with globals), so no host array is ever
    copied to the device behind the caller's back; their contents are part of the cache key.
    """
    if cap is None:
        return [], {}, []
    src = cg.function_source(cap, f"_user{prefix}")
    if src is None:  # no source: compile the object itself (numba freezes what it captured)
        return ([f"{prefix} = _cuda.jit(device=True)(_user{prefix})"],
                {f"_user{prefix}": cap.fn}, [])
    frozen = {name: a for name, a in zip(src.array_params, cap.arrays, strict=True)
              if isinstance(a, np.ndarray)}
    src.node.args.args = [a for a in src.node.args.args if a.arg not in frozen]
    lines = [*src.header, "@_cuda.jit(device=True)", src.text(), f"{prefix} = _user{prefix}"]
    extra = [f"_c{prefix}{n}" for n, name in enumerate(src.array_params) if name not in frozen]
    return lines, frozen, extra


_KERNEL = """
@_cuda.jit
def kernel(q, k, v, out, lse, scale, hq, hkv{tail}):
    # q (B*Hq, Sq, D), k (B*Hkv, Sk, D), v (B*Hkv, Sk, Dv), out (B*Hq, Sq, Dv), lse (B*Hq, Sq)
    tid = _cuda.threadIdx.x
    i = _cuda.blockIdx.x * BLOCK_Q + tid
    bh = _cuda.blockIdx.y
    b = bh // hq
    h = bh - b * hq
    bkv = b * hkv + h // (hq // hkv)
    sq, d = q.shape[1], q.shape[2]
    sk, dv = k.shape[1], v.shape[2]
    active = i < sq

    ks = _cuda.shared.array((BLOCK_K, MAX_D), NTYPE)
    vs = _cuda.shared.array((BLOCK_K, MAX_D), NTYPE)
    qreg = _cuda.local.array(MAX_D, NTYPE)
    acc = _cuda.local.array(MAX_D, NTYPE)
    sc = _cuda.local.array(BLOCK_K, NTYPE)
    m = NEG_INF
    denom = 0.0
    for c in range(dv):
        acc[c] = 0.0
    if active:
        for c in range(d):
            qreg[c] = q[bh, i, c] * scale

    for k0 in range(0, sk, BLOCK_K):
        tk = min(BLOCK_K, sk - k0)
        # Stage the key/value tile cooperatively (strided by the block, coalesced along D).
        for idx in range(tid, tk * d, BLOCK_Q):
            r = idx // d
            ks[r, idx - r * d] = k[bkv, k0 + r, idx - r * d]
        for idx in range(tid, tk * dv, BLOCK_Q):
            r = idx // dv
            vs[r, idx - r * dv] = v[bkv, k0 + r, idx - r * dv]
        # The tile must be complete before any row reads it.
        _cuda.syncthreads()
        if active:
            # Scores of this row against the tile, user functions applied, then one
            # online-softmax rescale per tile instead of one per key. The maxima keep NaN
            # (a NaN score makes its row NaN, as in flash_attention).
            m_tile = NEG_INF
            for r in range(tk):
                j = k0 + r
                s = NEG_INF
                if {visible}:
                    s = 0.0
                    for c in range(d):
                        s += qreg[c] * ks[r, c]
                    s = {score}
                sc[r] = s
                if s > m_tile or s != s:
                    m_tile = s
            m_new = m
            if m_tile > m or m_tile != m_tile:
                m_new = m_tile
            if m_new != NEG_INF:
                alpha = _math.exp(m - m_new)
                denom *= alpha
                for c in range(dv):
                    acc[c] *= alpha
                for r in range(tk):
                    # A hidden key (-inf score) never contributes, whatever its values
                    # (0 * NaN would): docs/numerics.rst.
                    if sc[r] != NEG_INF:
                        p = _math.exp(sc[r] - m_new)
                        denom += p
                        for c in range(dv):
                            acc[c] += p * vs[r, c]
                m = m_new
        # Every row is done with the tile before the next iteration overwrites it.
        _cuda.syncthreads()

    if active:
        if denom == 0.0:
            # No visible key: 0 and lse = -inf. A NaN denominator (NaN or +inf scores) falls
            # through and gives NaN.
            for c in range(dv):
                out[bh, i, c] = 0.0
            lse[bh, i] = NEG_INF
        else:
            for c in range(dv):
                out[bh, i, c] = acc[c] / denom
            lse[bh, i] = m + _math.log(denom)
"""


def build_kernel(smod, mmod, nargs, mask_takes_args, dtype_name):
    """Generate and compile (once per functions, argument count and dtype) the kernel."""
    args = [f"_a{i}" for i in range(nargs)]
    margs = args if mask_takes_args else []
    slines, sinj, sextra = _part(smod, "_smod")
    mlines, minj, mextra = _part(mmod, "_mmod")
    params = [*args, *sextra, *mextra]
    score = (f"_smod({', '.join(['s', 'b', 'h', 'i', 'j', *args, *sextra])})"
             if smod is not None else "s")
    visible = (f"_mmod({', '.join(['b', 'h', 'i', 'j', *margs, *mextra])})"
               if mmod is not None else "True")
    text = "\n".join([
        "import math as _math",
        "import numpy as _np",
        "import numba as _numba",
        "from numba import cuda as _cuda",
        *slines, *mlines,
        _KERNEL.format(tail="".join(f", {p}" for p in params), visible=visible, score=score),
    ])
    from numba import float32, float64

    namespace = {"BLOCK_Q": BLOCK_Q, "BLOCK_K": BLOCK_K, "MAX_D": MAX_D,
                 "NTYPE": {"float32": float32, "float64": float64}[dtype_name],
                 "NEG_INF": -math.inf, "cuda": cuda, **sinj, **minj}
    exec(compile(text, f"<xattn flex cuda {cg.source_hash(text)}>", "exec"), namespace)
    return namespace["kernel"], (sinj, minj)


def _fn_key(cap):
    """Cache key of a user function: its code and captured values, and the contents of the
    captured host arrays (frozen into the kernel) or of everything without source."""
    if cap is None:
        return None
    if not cg.has_source(cap.fn):
        return (cap.key, False, tuple(_digest(a) for a in cap.arrays))
    return (cap.key, True, tuple(_digest(a) for a in cap.arrays if isinstance(a, np.ndarray)))


def _digest(a):
    return (a.shape, a.dtype.str, hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8),
                                                   digest_size=16).hexdigest())


def _passed(cap, injected):
    """The captured arrays the kernel takes as parameters (not frozen, not compiled-in)."""
    if cap is None or "_user_smod" in injected or "_user_mmod" in injected:
        return ()
    return tuple(a for a in cap.arrays if not isinstance(a, np.ndarray))


def nothing_to_launch(q3, v3) -> bool:
    """True for an empty problem; head dims above MAX_D are refused (NotImplementedError)."""
    d, dv = q3.shape[2], v3.shape[2]
    if d > MAX_D or dv > MAX_D:
        raise NotImplementedError(f"head dims up to {MAX_D}, got D={d}, Dv={dv}")
    return q3.shape[1] == 0 or q3.shape[0] == 0


def cached(kernels, lock, limit, key, build):
    """``kernels[key]``, built by ``build()`` on a miss (outside the lock: compiling takes
    seconds); the oldest entries go beyond ``limit``."""
    with lock:
        hit = kernels.get(key)
    if hit is None:
        hit = build()
        with lock:
            kernels[key] = hit
            while len(kernels) > limit:
                kernels.popitem(last=False)
    return hit


def launch(q3, k3, v3, out3, lse2, *, scale, hq, hkv, smod, mmod, args=(),
           mask_takes_args=False, stream_ptr=None):
    """Run the kernel on ``(B*H, S, D)`` device (or, under the simulator, host) arrays.

    ``stream_ptr`` is the CuPy stream to launch on, so the kernel orders with the caller's work.
    """
    if nothing_to_launch(q3, v3):
        return
    dtype_name = np.dtype(q3.dtype).name
    key = (_fn_key(smod), _fn_key(mmod), tuple((a.dtype.str, a.ndim) for a in args),
           mask_takes_args, dtype_name)
    kernel, injected = cached(
        _kernels, _lock, _MAX_KERNELS, key,
        lambda: build_kernel(smod, mmod, len(args), mask_takes_args, dtype_name))
    extra = (*args, *_passed(smod, injected[0]), *_passed(mmod, injected[1]))
    grid = (max(1, -(-q3.shape[1] // BLOCK_Q)), q3.shape[0])
    launch_args = (q3, k3, v3, out3, lse2, q3.dtype.type(scale), hq, hkv, *extra)
    if stream_ptr is None:
        kernel[grid, BLOCK_Q](*launch_args)
    else:
        stream = cuda.external_stream(stream_ptr)
        kernel[grid, BLOCK_Q, stream](*launch_args)
