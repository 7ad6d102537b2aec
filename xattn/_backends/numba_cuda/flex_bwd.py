"""Flex attention backward on the GPU with Numba CUDA (SIMT, one query row per thread).

The companion of :mod:`.flex_fwd`: each thread recomputes its row's scores from ``lse``, calls
the forward-mode derivative of ``score_mod`` (:func:`xattn._flex_codegen.differentiate`) and
accumulates ``dq`` in registers; ``dk``, ``dv`` and the ``score_mod_args`` gradients are
shared between rows and added with atomics (so the result is not bitwise reproducible, as with
the CuPy flash kernels' default). A reference-speed kernel: correct on every mask, no tiles
skipped. Checked under Numba's CUDA simulator on tiny shapes; it has not run on a GPU yet.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from ... import _flex_codegen as cg
from ._compat import cuda
from .flex_fwd import BLOCK_Q, MAX_D, _fn_key, _part, _passed, cached, nothing_to_launch

_lock = threading.Lock()
_kernels: OrderedDict = OrderedDict()
_MAX_KERNELS = 32

_KERNEL = """
@_cuda.jit
def kernel(q, k, v, dout, out, lse, dq, dk, dv, scale, hq, hkv{tail}):
    # q, dq (B*Hq, Sq, D); k, dk (B*Hkv, Sk, D); v, dv (B*Hkv, Sk, Dv); dout, out
    # (B*Hq, Sq, Dv); lse (B*Hq, Sq). dk, dv and the _g* gradients start at zero.
    i = _cuda.blockIdx.x * BLOCK_Q + _cuda.threadIdx.x
    bh = _cuda.blockIdx.y
    sq, d = q.shape[1], q.shape[2]
    sk, dvd = k.shape[1], v.shape[2]
    if i >= sq:
        return  # no shared memory and no barrier below: idle threads may leave
    b = bh // hq
    h = bh - b * hq
    bkv = b * hkv + h // (hq // hkv)
    qreg = _cuda.local.array(MAX_D, NTYPE)
    doreg = _cuda.local.array(MAX_D, NTYPE)
    dqacc = _cuda.local.array(MAX_D, NTYPE)
    for c in range(d):
        qreg[c] = q[bh, i, c] * scale
        dqacc[c] = 0.0
    delta = 0.0
    for c in range(dvd):
        doreg[c] = dout[bh, i, c]
        delta += dout[bh, i, c] * out[bh, i, c]
    lrow = lse[bh, i]
    if lrow != NEG_INF:  # a row with no visible key has no gradient
        for j in range(sk):
            if {visible}:
                s = 0.0
                for c in range(d):
                    s += qreg[c] * k[bkv, j, c]
                {derivative}
                if val == NEG_INF:
                    continue  # hidden by score_mod: no term, whatever k, v, dout hold
                p = _math.exp(val - lrow)
                dp = 0.0
                for c in range(dvd):
                    dp += doreg[c] * v[bkv, j, c]
                    _cuda.atomic.add(dv, (bkv, j, c), p * doreg[c])
                ds = p * (dp - delta){scatter}
                dsr = ds * dscore
                for c in range(d):
                    dqacc[c] += dsr * k[bkv, j, c]
                    _cuda.atomic.add(dk, (bkv, j, c), dsr * qreg[c])
    for c in range(d):
        dq[bh, i, c] = dqacc[c] * scale
"""


def build_kernel(smod, mmod, nargs, mask_takes_args, diff_args, dtype_name):
    """Generate and compile the backward kernel (once per functions, arguments and dtype)."""
    args = [f"_a{i}" for i in range(nargs)]
    margs = args if mask_takes_args else []
    slines, sinj, sextra = _part(smod, "_smod")
    mlines, minj, mextra = _part(mmod, "_mmod")
    if smod is not None and "_user_smod" in sinj:
        raise cg.FlexCompileError(
            "score_mod: flex_attention_backward differentiates score_mod from its source, "
            f"which Python cannot find for {smod.fn.__name__}; define it in a file"
        )
    lines, scatter = [], ""
    grads = [f"_g{i}" for i in diff_args]
    call = ", ".join(["s", "b", "h", "i", "j", *args, *sextra])
    if smod is not None:
        src = cg.function_source(smod, "_user_smod")
        frozen = set(sinj)
        src.node.args.args = [a for a in src.node.args.args if a.arg not in frozen]
        params = [a.arg for a in src.node.args.args]
        deriv = cg.differentiate(src, smod, {params[5 + i]: i for i in diff_args}, "_smod_ad")
        lines += ["@_cuda.jit(device=True)", deriv.text]
        n = len(deriv.sites)
        derivative = (f"res = _smod_ad({call})\n{' ' * 16}val = res[0]\n"
                      f"{' ' * 16}dscore = res[1]")
        scatter = "".join(
            f"\n{' ' * 16}_cuda.atomic.add(_g{arg}, res[{2 + n + m}], ds * res[{2 + m}])"
            for m, arg in enumerate(deriv.sites)
        )
    else:
        derivative = f"val = s\n{' ' * 16}dscore = 1.0"
    visible = (f"_mmod({', '.join(['b', 'h', 'i', 'j', *margs, *mextra])})"
               if mmod is not None else "True")
    tail = "".join(f", {p}" for p in [*args, *sextra, *mextra, *grads])
    text = "\n".join([
        "import math as _math",
        "import numpy as _np",
        "import numba as _numba",
        "from numba import cuda as _cuda",
        *slines, *mlines, *lines,
        _KERNEL.format(tail=tail, visible=visible, derivative=derivative, scatter=scatter),
    ])
    from numba import float32, float64

    namespace = {"BLOCK_Q": BLOCK_Q, "MAX_D": MAX_D,
                 "NTYPE": {"float32": float32, "float64": float64}[dtype_name],
                 "NEG_INF": -math.inf, **sinj, **minj}
    exec(compile(text, f"<xattn flex cuda bwd {cg.source_hash(text)}>", "exec"), namespace)
    return namespace["kernel"], (sinj, minj)


def launch(dout3, q3, k3, v3, out3, lse2, dq3, dk3, dv3, grads, *, scale, hq, hkv, smod,
           mmod, args, mask_takes_args, diff_args, stream_ptr=None):
    """Fill ``dq3`` and add into the zeroed ``dk3``, ``dv3`` and ``grads`` (device arrays)."""
    if nothing_to_launch(q3, v3):
        return
    dtype_name = np.dtype(q3.dtype).name
    key = (_fn_key(smod), _fn_key(mmod), tuple((a.dtype.str, a.ndim) for a in args),
           mask_takes_args, tuple(diff_args), dtype_name)
    kernel, injected = cached(
        _kernels, _lock, _MAX_KERNELS, key,
        lambda: build_kernel(smod, mmod, len(args), mask_takes_args, diff_args, dtype_name))
    extra = (*args, *_passed(smod, injected[0]), *_passed(mmod, injected[1]), *grads)
    grid = (max(1, -(-q3.shape[1] // BLOCK_Q)), q3.shape[0])
    launch_args = (q3, k3, v3, dout3, out3, lse2, dq3, dk3, dv3, q3.dtype.type(scale), hq, hkv,
                   *extra)
    if stream_ptr is None:
        kernel[grid, BLOCK_Q](*launch_args)
    else:
        kernel[grid, BLOCK_Q, cuda.external_stream(stream_ptr)](*launch_args)
