"""Flash attention: exact attention tile by tile with an online softmax, O(S) extra memory."""

from __future__ import annotations

import logging
import os

from . import _backends, _masking, _plans
from ._array import (
    check_bool,
    check_same_shape,
    dlpack_interop,
    is_cupy,
    score_options,
    validate_attention,
)

__all__ = ["flash_attention", "flash_attention_backward"]


def _route(prob):
    """``(prob, opts, kwargs)``: the problem, the options the table decides on and the
    backend's keyword arguments. A window on NumPy arrays becomes the block-sparse plan of its
    band (O(S * window) work); a block mask (one, not a batched one: see _plans.per_batch)
    travels in ``prob.block_mask``, which every backend and ``supports`` read from there."""
    if (prob.block_mask is None and prob.window is not None
            and not _masking.no_pairs(prob)):
        prob, sparse = _plans.window_plan(prob)
    else:
        sparse = {}
    return prob, dict(sparse), sparse


# The host work of a call before its launch (validation, route, the kernel table's choice) per
# call signature, reused while everything it reads is the same: on CuPy it was about 40 % of a
# call's ~140 microseconds of Python (cProfile on an H100 machine's host, 2026-12-05), latency
# that a short kernel cannot hide (tools/gpu_fwd_short.py --host times a call with and without).
_PLANNED: dict = {}
_PLAIN = (int, float, bool)


def _plain(x) -> bool:
    if x is None or type(x) in _PLAIN:
        return True
    return type(x) is tuple and all(y is None or type(y) in _PLAIN for y in x)


def _signature(op, arrays, score, block_mask, backend, flags):
    """The key under which this call's planned host work may be reused, or None (plan in full).

    It holds everything the validation, the route and the table read: the exact array types,
    every array's shape, dtype and device, the score options by type and value
    (plain numbers, bools, None and tuples of them only: an array operand, a NumPy scalar or
    anything else is checked every time), the flags, the backend name, ``XATTN_DISABLE`` and
    the kernel table's switches (``instances.SWITCHES``).
    Only CuPy calls are planned once (a CPU call runs far longer than its planning, and the
    CPU table's choice also follows which packages import); with a block mask or debug
    logging on (it logs each choice) nothing is reused."""
    if block_mask is not None or type(backend) is not str or not is_cupy(arrays[0]):
        return None
    if _backends._log.isEnabledFor(logging.DEBUG):
        return None
    t = type(arrays[0])
    if any(type(a) is not t for a in arrays):
        return None
    if not all(_plain(x) for x in score.values()):
        return None
    from ._backends.cupy_ import instances  # plain Python: imports no CuPy

    dev = tuple(a.device.id for a in arrays)
    return (op, t, tuple((a.shape, a.dtype) for a in arrays), dev, tuple(sorted(score.items())),
            flags, backend, os.environ.get("XATTN_DISABLE", ""), instances.switches())


def _remember(key, plan):
    if key is not None:
        if len(_PLANNED) >= 256:
            _PLANNED.clear()
        _PLANNED[key] = plan
    return plan


@dlpack_interop
@score_options(before="block_mask")
def flash_attention(q, k, v, /, *, block_mask=None, return_lse=False, allow_tf32=False,
                    backend="auto", **score):
    """Exact attention computed tile by tile, never holding an ``Sq x Sk`` matrix.

    Computes the same function as :func:`xattn.standard_attention` (see it for every option)
    with an online softmax over key tiles: O(S) extra memory on every backend. Tiles that the
    causal/window rules hide entirely are skipped, so a sliding window costs O(S * window).

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, Sq, D)``, ``(..., Hkv, Sk, D)``, ``(..., Hkv, Sk, Dv)``
        NumPy or CuPy; float16, bfloat16, float32 or float64. GQA/MQA when ``Hkv < Hq``.
    {score_options}
        As in :func:`xattn.standard_attention`.
    block_mask : xattn.BlockMask, optional
        Structured sparsity (see :func:`xattn.block_sparse_attention`): only the mask's
        visible blocks are computed; combines with every other option.
    return_lse : bool
        Also return the log-sum-exp ``(..., Hq, Sq)`` (float32; float64 for float64 inputs)
        that :func:`flash_attention_backward` needs.
    allow_tf32 : bool
        Permit float32 inputs on the GPU to be multiplied on tensor cores in TF32 (10-bit
        mantissa inputs, float32 accumulation: see :doc:`/gpu` for the error). Off by default,
        as in CuPy: float32 then runs at float32-class accuracy on tensor cores (3xTF32,
        ``"cupy.tf32x3"``; ``backend="cupy.simt"`` is the strict CUDA-core kernel); other
        dtypes and the CPU backends ignore it.
    backend : str
        ``"auto"`` (default) picks the fastest implementation that supports the request;
        ``"numba"`` and ``"numpy"`` on the CPU, ``"cupy.sm90"``, ``"cupy.sm80"``,
        ``"cupy.tf32"``, ``"cupy.tf32x3"``, ``"cupy.simt"`` and ``"generic"`` on the GPU force
        one (``"cupy"``: the best CuPy kernel that serves the request; see
        :doc:`/diagnostics`). A forced backend that cannot serve the request raises
        ``NotImplementedError``.

    Returns
    -------
    out : array ``(..., Hq, Sq, Dv)`` in the input dtype, and ``lse`` with ``return_lse``.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((4, 300, 64), dtype=np.float32) for _ in range(3))
    >>> out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
    >>> ref = xattn.standard_attention(q, k, v, causal=True)
    >>> out.shape, lse.dtype.name, bool(np.allclose(out, ref, atol=1e-5))
    ((4, 300, 64), 'float32', True)
    """
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    return_lse = check_bool("return_lse", return_lse)
    key = _signature("forward", (q, k, v), score, block_mask, backend, allow_tf32)
    plan = _PLANNED.get(key) if key is not None else None
    if plan is None:
        prob = validate_attention(q, k, v, block_mask=block_mask, **score)
        if _batched_mask(prob):
            options = dict(score, return_lse=return_lse, allow_tf32=allow_tf32, backend=backend)
            return _plans.per_batch(flash_attention, prob, (q, k, v), options)
        prob, opts, sparse = _route(prob)
        if allow_tf32:
            opts["allow_tf32"] = True
        plan = _remember(key, (prob, sparse, _backends.select(prob, opts, backend, op="forward")))
    prob, sparse, impl = plan
    out, lse = impl.forward(prob, q, k, v, allow_tf32=allow_tf32, **sparse)
    return (out, lse) if return_lse else out


@dlpack_interop
@score_options(before="block_mask")
def flash_attention_backward(dout, q, k, v, out, lse, /, *, block_mask=None,
                             deterministic=False, return_dbias=False, backend="auto", **score):
    """Gradient of flash attention: ``(dq, dk, dv)`` for the upstream gradient ``dout``.

    Recomputes the scores tile by tile from the forward pass's ``lse`` (no ``Sq x Sk`` matrix
    is stored), so memory stays O(S). Pass the same options as the forward call. ``mask`` is a
    constant; the gradient of ``bias`` is returned on request (``return_dbias``).

    Parameters
    ----------
    dout : array ``(..., Hq, Sq, Dv)``
        Gradient of the loss with respect to ``out``.
    q, k, v : arrays
        The forward inputs.
    out, lse : arrays
        The forward outputs, from ``flash_attention(..., return_lse=True)``; ``lse`` is
        ``(..., Hq, Sq)`` float32 (float64 for float64 inputs), checked.
    deterministic : bool
        Bitwise reproducible gradients. The CPU backends always are; the CuPy kernel by
        default adds the ``dq`` contributions of the key blocks with float32 atomics (order
        varies from run to run) and with ``deterministic=True`` runs a separate ``dq`` pass.
        With ``return_dbias`` and a bias broadcast over batch elements or heads, the CPU
        threads add into shared dbias entries in the order they finish unless
        ``deterministic=True`` (which then runs those jobs one after another).
    return_dbias : bool
        Also return ``dbias``, the gradient of the loss with respect to ``bias``: shaped and
        typed like ``bias``, summed over the dims that ``bias`` broadcasts (None without a
        bias). Every CPU backend and the generic GPU path compute it; the CuPy kernels do not
        (``backend="auto"`` then takes the generic path).

    Returns
    -------
    dq, dk, dv : arrays shaped and typed like ``q``, ``k``, ``v``
        GQA: the gradients of the query heads sharing a kv head are summed into dk/dv.
    dbias : array, with ``return_dbias=True``

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(1)
    >>> q, k, v = (rng.standard_normal((2, 50, 16)) for _ in range(3))
    >>> out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = xattn.flash_attention_backward(np.ones_like(out), q, k, v, out, lse,
    ...                                             causal=True)
    >>> bool(np.allclose(dv.sum(axis=-2), 50.0))   # each query's weights sum to one
    True
    """
    deterministic = check_bool("deterministic", deterministic)
    return_dbias = check_bool("return_dbias", return_dbias)
    key = _signature("backward", (dout, q, k, v, out, lse), score, block_mask, backend,
                     (deterministic, return_dbias))
    plan = _PLANNED.get(key) if key is not None else None
    if plan is not None:  # no bias (an array option is never in a key): no dbias either
        prob, sparse, impl = plan
        res = impl.backward(prob, dout, q, k, v, out, lse, deterministic=deterministic,
                            **sparse)
        return (*res, None) if return_dbias else res
    prob = validate_attention(q, k, v, extra=(("dout", dout), ("out", out), ("lse", lse)),
                              block_mask=block_mask, **score)
    check_same_shape("dout", dout, prob.out_shape)
    check_same_shape("out", out, prob.out_shape)
    check_same_shape("lse", lse, prob.lse_shape)
    if lse.dtype != prob.cdtype:  # a rounded lse moves every recomputed probability
        raise TypeError(
            f"lse: expected dtype {prob.cdtype} (the forward pass's log-sum-exp: float32, "
            f"float64 for float64 inputs), got {lse.dtype}"
        )
    bias = prob.bias
    want_dbias = return_dbias and bias is not None
    if _batched_mask(prob):
        options = dict(score, deterministic=deterministic, return_dbias=want_dbias,
                       backend=backend)
        res = _plans.per_batch(flash_attention_backward, prob, (dout, q, k, v, out, lse),
                               options, backward=True)
        if not return_dbias:
            return res
        if not want_dbias:
            return (*res, None)
        # Each element's dbias has the full score shape there: sum to the bias's shape.
        return (*res[:3], _sum_to(res[3], bias.shape).astype(bias.dtype, copy=False))
    prob, opts, sparse = _route(prob)
    if deterministic:
        opts["deterministic"] = True
    if want_dbias:
        opts["return_dbias"] = True
        sparse = {**sparse, "return_dbias": True}
    impl = _backends.select(prob, opts, backend, op="backward")
    if not want_dbias:
        _remember(key, (prob, sparse, impl))
    res = impl.backward(prob, dout, q, k, v, out, lse, deterministic=deterministic, **sparse)
    if not return_dbias:
        return res
    if not want_dbias:
        return (*res, None)
    return (*res[:3], res[3].astype(bias.dtype, copy=False))


def _batched_mask(prob) -> bool:
    """One block mask per batch element: one call per element (_plans.per_batch)."""
    return prob.block_mask is not None and bool(prob.block_mask.batch_shape)


def _sum_to(x, shape):
    """Sum ``x`` over the leading and size-1 dims of ``shape`` it was broadcast along."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
