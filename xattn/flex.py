"""Flex attention: exact attention with user-written score and mask functions, and gradients.

The functions are plain Python on scalars. xattn reads their source, resolves what they
capture (:mod:`xattn._flex_codegen`) and compiles them with Numba into the tile loop: on the
CPU the fused kernel of :mod:`xattn._backends.numpy_.flex_njit` (BLAS tiles, online softmax,
the one thread pool, tiles skipped by a block mask derived from ``mask_mod``), on the GPU a
``numba.cuda`` kernel; on CuPy float16/bfloat16 inputs both passes run on tensor cores instead,
the functions translated to CUDA C (:mod:`xattn._flex_cuda`). The backward pass differentiates
``score_mod`` from its source.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ._array import AttnProblem, check_bool, check_same_shape, dlpack_interop, validate_attention

__all__ = ["flex_attention", "flex_attention_backward"]

_log = logging.getLogger("xattn")


def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _flat(x, prob: AttnProblem, heads: int):
    """``(..., H, S, D)`` as a C-contiguous ``(B*H, S, D)`` array (a copy only if needed)."""
    xp = prob.xp
    return xp.ascontiguousarray(x.reshape(-1, heads, *x.shape[-2:]).reshape(-1, *x.shape[-2:]))


def _check_args(score_mod_args, prob):
    if not isinstance(score_mod_args, (tuple, list)):
        raise TypeError(
            "score_mod_args: expected a tuple of arrays, got "
            f"{type(score_mod_args).__name__}"
        )
    ns = prob.xp.__name__
    for i, a in enumerate(score_mod_args):
        mod = type(a).__module__.split(".")[0]
        if not hasattr(a, "dtype") or not hasattr(a, "shape") or mod != ns:
            raise TypeError(
                f"score_mod_args[{i}]: expected a {ns} array like q (xattn never copies "
                f"between host and device), got {type(a).__name__}"
            )
        if a.dtype.kind not in "fiub":
            raise TypeError(
                f"score_mod_args[{i}]: expected a float, integer or boolean array, got {a.dtype}"
            )
    return tuple(score_mod_args)


class _Setup:
    """Validated inputs, captured user functions and the chosen backend of one call."""

    def __init__(self, q, k, v, score_mod, mask_mod, score_mod_args, scale, backend, extra=(),
                 forward=True, allow_tf32=False):
        from . import _flex_codegen as cg

        self.prob = prob = validate_attention(q, k, v, scale=scale, extra=extra)
        self.args = args = _check_args(score_mod_args, prob)
        n = len(args)
        for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
        self.smod = None if score_mod is None else cg.capture(score_mod, "score_mod", 5 + n)
        self.mask_takes_args = False
        self.mmod = None
        if mask_mod is not None:
            code = getattr(cg._unwrap(mask_mod), "__code__", None)
            self.mask_takes_args = bool(n) and code is not None and code.co_argcount == 4 + n
            self.mmod = cg.capture(mask_mod, "mask_mod", 4 + n if self.mask_takes_args else 4)
        on_gpu = prob.xp.__name__ == "cupy"
        if backend not in ("auto", "numba", "numba_cuda", "cupy"):
            raise ValueError("backend: expected 'auto', 'numba', 'numba_cuda' or 'cupy', got "
                             f"{backend!r}")
        self.tc_reason = None
        if backend in ("auto", "cupy") and on_gpu:
            from ._backends.cupy_ import flex_tc, flex_tc_bwd

            # Forward: the tensor-core kernels serve 16-bit and float32 inputs. Backward: 16-bit
            # inputs without floating score_mod_args (their gradients are the SIMT kernel's).
            # auto hands the rest (float64, big head dims, old GPUs) to numba_cuda and logs
            # why. A function they cannot translate or differentiate raises
            # (FlexCompileError) under auto too: no silent fallback.
            if forward:
                self.tc_reason = (flex_tc.reason(prob, allow_tf32)
                                  or flex_tc.source_reason(self.smod, self.mmod))
            else:
                self.tc_reason = flex_tc_bwd.reason(prob, self.smod, self.mmod, args)
            if backend == "cupy" and self.tc_reason:
                raise NotImplementedError(f"backend='cupy': {self.tc_reason}")
        if backend == "auto" and on_gpu and self.tc_reason:
            _log.debug("%s: backend numba_cuda, not cupy: %s",
                       "flex_attention" if forward else "flex_attention_backward",
                       self.tc_reason, extra={"xattn_backend": "numba_cuda"})
        if backend == "auto":
            backend = ("cupy" if self.tc_reason is None else "numba_cuda") if on_gpu else "numba"
        if backend == "cupy" and not on_gpu:
            raise TypeError("backend='cupy' needs CuPy arrays; xattn never copies between host "
                            "and device")
        if backend == "numba" and on_gpu:
            raise TypeError("backend='numba' runs on the CPU but the inputs are CuPy arrays")
        if backend == "numba_cuda" and not on_gpu and not _simulator():
            raise TypeError(
                "backend='numba_cuda' needs CuPy arrays (or NUMBA_ENABLE_CUDASIM=1 for the "
                "simulator); xattn never copies between host and device"
            )
        self.backend, self.on_gpu = backend, on_gpu
        self.hq = prob.hq if prob.heads_axis else 1
        self.hkv = prob.hkv if prob.heads_axis else 1
        self.batch = int(np.prod(prob.batch, dtype=np.int64)) if prob.heads_axis else 1
        self.work = np.dtype(np.float64) if prob.dtype == np.float64 else np.dtype(np.float32)
        # Nothing to compute: a zero-sized batch, head or query axis (empty in, empty out).
        self.empty = self.batch * self.hq == 0 or prob.sq == 0

    def flat(self, x, heads):
        return _flat(x.astype(self.work, copy=False), self.prob, heads)


@dlpack_interop
def flex_attention(
    q,
    k,
    v,
    /,
    *,
    score_mod=None,
    mask_mod=None,
    score_mod_args=(),
    scale=None,
    return_lse=False,
    allow_tf32=False,
    backend="auto",
):
    """Attention with a user-programmable score modification and mask.

    ``s = scale * q.k``, then ``s = score_mod(s, b, h, q_idx, kv_idx, *score_mod_args)``
    where ``mask_mod(b, h, q_idx, kv_idx)`` is True; other pairs are hidden. Rows with no
    visible key give 0 and ``lse = -inf``; NaN in the inputs, or a score that ``score_mod``
    makes NaN or ``+inf``, gives NaN in its row, as in :func:`xattn.flash_attention`. ``b`` is
    the flat index over the leading batch dims, ``h`` the query head; ``q_idx`` and ``kv_idx``
    are absolute positions (no bottom-right shift: write it in the function if you want it).

    Both functions take and return scalars and are compiled into the kernel (see
    :doc:`/flex`): plain arithmetic, ``if``/``else``, ``math``/``numpy`` functions, numbers
    and arrays they capture, and reads of the ``score_mod_args`` arrays. Anything else (a
    dict, a list, an object) is refused with a ``TypeError`` naming the function. Compiled
    kernels are cached in memory and on disk (``$XATTN_CACHE_DIR/flex``, default
    ``~/.cache/xattn/flex``), keyed by the functions' code and captured values.

    On the CPU, a block mask derived from ``mask_mod`` (every pair evaluated once per shape,
    cached) lets the kernel skip hidden tiles and evaluate ``mask_mod`` only where a tile is
    partly visible: causal and sliding-window masks cost what :func:`xattn.flash_attention`'s
    own ``causal``/``window`` cost.

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, Sq, D)``, ``(..., Hkv, Sk, D)``, ``(..., Hkv, Sk, Dv)``
        NumPy (computed by ``numba.njit``) or CuPy (on the current CuPy stream: float16,
        bfloat16 and float32 on tensor cores, float64 by a ``numba.cuda`` kernel; see
        ``backend``). On the CPU float32 and float64 are computed in their own precision and
        16-bit inputs are upcast to float32, the output cast back. GPU: ``D, Dv <= 256`` on
        tensor cores, ``<= 128`` in the ``numba_cuda`` kernel.
    score_mod : callable ``(score, b, h, q_idx, kv_idx, *score_mod_args) -> score``, optional
    mask_mod : callable ``(b, h, q_idx, kv_idx) -> bool``, optional
        It may also take the ``score_mod_args`` after ``kv_idx``.
    score_mod_args : tuple of arrays
        Arrays the functions read (relative-position tables, per-head slopes, document ids),
        of the inputs' namespace; they are passed to the kernel, not compiled into it, so new
        values reuse the compiled code. :func:`flex_attention_backward` returns gradients
        for the floating ones.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the natural-log log-sum-exp ``(..., Hq, Sq)`` that
        :func:`flex_attention_backward` needs.
    allow_tf32 : bool
        float32 on the GPU's tensor cores (``backend="cupy"``) in plain TF32 (10-bit
        mantissa, about ``1e-3`` relative error) instead of the default error-compensated
        3xTF32 (float32 accuracy, about ``1e-6``), as in :func:`xattn.flash_attention`.
        Nothing else reads it.
    backend : ``"auto"``, ``"numba"`` (CPU), ``"cupy"`` or ``"numba_cuda"`` (GPU)
        ``"cupy"``: float16/bfloat16 and float32 on tensor cores, the functions translated
        to CUDA C and compiled into the ``mma.sync`` flash kernels (float32 in 3xTF32, see
        :doc:`/flex`, "On the GPU: tensor cores"); a construct it cannot translate raises a
        ``TypeError`` (``FlexCompileError``) naming it. ``"numba_cuda"``: a SIMT kernel for
        every dtype (16-bit inputs upcast). ``"auto"`` on CuPy arrays picks ``"cupy"`` for
        float16, bfloat16 and float32 inputs on compute capability 8.0+ with head dims up to
        256 (and functions whose source Python can read), else ``"numba_cuda"`` (float64);
        the
        ``xattn`` logger says which at debug level. ``"numba_cuda"`` also accepts NumPy
        arrays when Numba's CUDA simulator is enabled (``NUMBA_ENABLE_CUDASIM=1``), for
        testing the GPU kernel without a GPU.

    Examples
    --------
    ALiBi written as a score function, with a causal mask:

    >>> import numpy as np, xattn
    >>> slopes = xattn.alibi_slopes(4)
    >>> def alibi(score, b, h, q_idx, kv_idx):
    ...     return score - slopes[h] * abs(q_idx - kv_idx)
    >>> def causal(b, h, q_idx, kv_idx):
    ...     return kv_idx <= q_idx
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((4, 100, 32), dtype=np.float32) for _ in range(3))
    >>> out = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal)
    >>> ref = xattn.flash_attention(q, k, v, causal=True, alibi_slopes=slopes)
    >>> bool(np.allclose(out, ref, atol=1e-5))
    True
    """
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    st = _Setup(q, k, v, score_mod, mask_mod, score_mod_args, scale, backend,
                allow_tf32=allow_tf32)
    return_lse = check_bool("return_lse", return_lse)
    prob, xp, work = st.prob, st.prob.xp, st.work
    _log.debug("flex_attention: backend %s", st.backend, extra={"xattn_backend": st.backend})
    if st.backend == "cupy":
        from ._backends.cupy_ import flex_tc

        out, lse = flex_tc.forward(prob, q, k, v, smod=st.smod, mmod=st.mmod, args=st.args,
                                   mask_takes_args=st.mask_takes_args, allow_tf32=allow_tf32)
        return (out, lse.astype(prob.cdtype, copy=False)) if return_lse else out
    rows = st.batch * st.hq
    out3 = xp.zeros((rows, prob.sq, prob.dv), dtype=work)
    lse2 = xp.full((rows, prob.sq), -np.inf, dtype=work)
    if not st.empty and prob.sk:
        q3, k3, v3 = st.flat(q, st.hq), st.flat(k, st.hkv), st.flat(v, st.hkv)
        if st.backend == "numba":
            from ._backends.numpy_ import flex_njit

            flex_njit.forward(q3, k3, v3, out3, lse2, scale=prob.scale, batch=st.batch,
                              hq=st.hq, hkv=st.hkv, smod=st.smod, mmod=st.mmod, args=st.args,
                              mask_takes_args=st.mask_takes_args)
        else:
            from ._backends.numba_cuda import flex_fwd

            stream = xp.cuda.get_current_stream().ptr if st.on_gpu else None
            flex_fwd.launch(q3, k3, v3, out3, lse2, scale=prob.scale, hq=st.hq, hkv=st.hkv,
                            smod=st.smod, mmod=st.mmod, args=st.args,
                            mask_takes_args=st.mask_takes_args, stream_ptr=stream)
    out = out3.reshape(prob.out_shape).astype(prob.dtype, copy=False)
    if not return_lse:
        return out
    return out, lse2.reshape(prob.lse_shape).astype(prob.cdtype, copy=False)


@dlpack_interop
def flex_attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    /,
    *,
    score_mod=None,
    mask_mod=None,
    score_mod_args=(),
    scale=None,
    backend="auto",
):
    """Gradient of :func:`flex_attention`: ``(dq, dk, dv, dargs)``.

    The derivative of ``score_mod`` is derived from its Python source (forward-mode,
    source to source: see :doc:`/flex`); you never write a gradient. ``dargs`` holds one
    gradient per entry of ``score_mod_args``: an array of the entry's shape and dtype for
    floating arrays (the reads of a table scatter-add into it), None for integer and boolean
    ones. A ``score_mod`` that cannot be differentiated (a loop, a call to a function without
    a known derivative) raises a ``TypeError`` naming the construct and its line.

    Scores are recomputed tile by tile from ``lse`` (no ``Sq x Sk`` matrix), on the same
    block mask as the forward pass. On CuPy float16/bfloat16 inputs without floating
    ``score_mod_args`` (``backend="cupy"``, what ``"auto"`` picks there) the tensor-core
    backward runs: ``score_mod`` and its derivative translated to CUDA C inside the
    ``mma.sync`` kernels, empty blocks of the mask derived from ``mask_mod`` skipped, dq added
    with float32 atomics (not bitwise reproducible). Calls with floating ``score_mod_args``
    (whose gradients ``dargs`` holds), float32/float64 inputs and head dims above 256 run a
    SIMT kernel (``backend="numba_cuda"``) that evaluates every pair and adds dk, dv and the
    table gradients with atomics; ``"auto"`` says which at debug level in the ``xattn`` log,
    and ``backend="cupy"`` raises ``NotImplementedError`` for them.

    Parameters
    ----------
    dout : array ``(..., Hq, Sq, Dv)``
        Gradient of the loss with respect to ``out``.
    q, k, v, score_mod, mask_mod, score_mod_args, scale
        As in the forward call.
    out, lse : arrays
        The forward outputs, from ``flex_attention(..., return_lse=True)``.
    backend : ``"auto"``, ``"numba"`` (CPU), ``"cupy"`` or ``"numba_cuda"`` (GPU)
        As in :func:`flex_attention`; ``"cupy"`` (tensor cores) takes 16-bit inputs without
        floating ``score_mod_args``.

    Returns
    -------
    dq, dk, dv : arrays shaped and typed like ``q``, ``k``, ``v``
        GQA: the gradients of the query heads sharing a kv head are summed into dk/dv.
    dargs : tuple
        Per ``score_mod_args`` entry, its gradient or None.

    Examples
    --------
    A learned per-head bias on the distance, as in ALiBi, and its gradient:

    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 40, 8)) for _ in range(3))
    >>> slopes = np.array([0.5, 0.25])
    >>> def alibi(score, b, h, q_idx, kv_idx, slopes):
    ...     return score - slopes[h] * abs(q_idx - kv_idx)
    >>> out, lse = xattn.flex_attention(q, k, v, score_mod=alibi, score_mod_args=(slopes,),
    ...                                 return_lse=True)
    >>> dq, dk, dv, (dslopes,) = xattn.flex_attention_backward(
    ...     np.ones_like(out), q, k, v, out, lse, score_mod=alibi, score_mod_args=(slopes,))
    >>> dslopes.shape, dslopes.dtype.name
    ((2,), 'float64')
    """
    st = _Setup(q, k, v, score_mod, mask_mod, score_mod_args, scale, backend,
                extra=(("dout", dout), ("out", out), ("lse", lse)), forward=False)
    prob, work = st.prob, st.work
    check_same_shape("dout", dout, prob.out_shape)
    check_same_shape("out", out, prob.out_shape)
    check_same_shape("lse", lse, prob.lse_shape)
    diff = [i for i, a in enumerate(st.args) if a.dtype.kind == "f"]
    xp = prob.xp
    _log.debug("flex_attention_backward: backend %s", st.backend,
               extra={"xattn_backend": st.backend})
    if st.empty or prob.sk == 0:
        dq = xp.zeros(q.shape, q.dtype)
        dk, dv = xp.zeros(k.shape, k.dtype), xp.zeros(v.shape, v.dtype)
        grads = [xp.zeros(st.args[i].shape, np.float64) for i in diff]
    elif st.backend == "cupy":
        from ._backends.cupy_ import flex_tc_bwd

        dq, dk, dv = flex_tc_bwd.backward(prob, dout, q, k, v, out, lse, smod=st.smod,
                                          mmod=st.mmod, args=st.args,
                                          mask_takes_args=st.mask_takes_args)
        grads = []  # reason() admits no floating score_mod_args
    else:
        flat = (st.flat(dout, st.hq), st.flat(q, st.hq), st.flat(k, st.hkv), st.flat(v, st.hkv),
                st.flat(out, st.hq),
                xp.ascontiguousarray(lse.astype(work, copy=False).reshape(-1, prob.sq)))
        opts = dict(scale=prob.scale, hq=st.hq, hkv=st.hkv, smod=st.smod, mmod=st.mmod,
                    args=st.args, mask_takes_args=st.mask_takes_args, diff_args=diff)
        if st.backend == "numba":
            from ._backends.numpy_ import flex_njit

            dq3, dk3, dv3, grads = flex_njit.backward(*flat, batch=st.batch, **opts)
        else:
            from ._backends.numba_cuda import flex_bwd

            q3, k3 = flat[1], flat[2]
            dq3 = xp.empty_like(q3)
            dk3, dv3 = xp.zeros_like(k3), xp.zeros_like(flat[3])
            grads = [xp.zeros(st.args[i].shape, np.float64) for i in diff]
            stream = xp.cuda.get_current_stream().ptr if st.on_gpu else None
            flex_bwd.launch(*flat, dq3, dk3, dv3, grads, stream_ptr=stream, **opts)
        dq = dq3.reshape(q.shape).astype(q.dtype, copy=False)
        dk = dk3.reshape(k.shape).astype(k.dtype, copy=False)
        dv = dv3.reshape(v.shape).astype(v.dtype, copy=False)
    it = iter(grads)
    dargs = tuple(next(it).astype(a.dtype, copy=False) if i in diff else None
                  for i, a in enumerate(st.args))
    return dq, dk, dv, dargs
