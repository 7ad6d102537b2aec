"""Flex attention: exact attention with user-written score and mask functions.

The functions are plain Python on scalars, compiled by Numba into the tile loop (``numba.njit``
on the CPU, ``numba.cuda.jit(device=True)`` on the GPU), as PyTorch's FlexAttention compiles its
``score_mod``/``mask_mod``. Forward only.
"""

from __future__ import annotations

import os

import numpy as np

from ._array import AttnProblem, check_bool, dlpack_interop, validate_attention

__all__ = ["flex_attention"]


def _keep_score(score, b, h, q_idx, kv_idx):
    return score


def _see_all(b, h, q_idx, kv_idx):
    return True


def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _flat(x, prob: AttnProblem, heads: int):
    """``(..., H, S, D)`` as a C-contiguous ``(B*H, S, D)`` array (a copy only if needed)."""
    xp = prob.xp
    return xp.ascontiguousarray(x.reshape(-1, heads, *x.shape[-2:]).reshape(-1, *x.shape[-2:]))


@dlpack_interop
def flex_attention(
    q,
    k,
    v,
    /,
    *,
    score_mod=None,
    mask_mod=None,
    scale=None,
    return_lse=False,
    backend="auto",
):
    """Attention with a user-programmable score modification and mask.

    ``s = scale * q.k``, then ``s = score_mod(s, b, h, q_idx, kv_idx)`` where
    ``mask_mod(b, h, q_idx, kv_idx)`` is True; other pairs are hidden. Rows with no visible key
    give 0 and ``lse = -inf``. ``b`` is the flat index over the leading batch dims, ``h`` the query
    head. Both functions take and return scalars and must be compilable by Numba (plain
    arithmetic, ``math`` functions, module-level constants or closures over numbers).

    Every (query, key) pair is evaluated: the cost is O(Sq * Sk) whatever the mask. For
    structured sparsity whose tiles can be skipped use :func:`xattn.flash_attention` with
    ``causal``/``window``/``block_mask``.

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, Sq, D)``, ``(..., Hkv, Sk, D)``, ``(..., Hkv, Sk, Dv)``
        NumPy (computed by ``numba.njit``) or CuPy (computed by a ``numba.cuda`` kernel on the
        current CuPy stream). float32 and float64 are computed in their own precision; 16-bit
        inputs are upcast to float32 (on their device) and the output cast back.
        GPU: ``D, Dv <= 128``.
    score_mod : callable ``(score, b, h, q_idx, kv_idx) -> score``, optional
    mask_mod : callable ``(b, h, q_idx, kv_idx) -> bool``, optional
    scale : float, optional
        Default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the natural-log log-sum-exp ``(..., Hq, Sq)``.
    backend : ``"auto"``, ``"numba"`` (CPU) or ``"numba_cuda"`` (GPU)
        ``"numba_cuda"`` also accepts NumPy arrays when Numba's CUDA simulator is enabled
        (``NUMBA_ENABLE_CUDASIM=1``), for testing the GPU kernel without a GPU.

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
    prob = validate_attention(q, k, v, scale=scale)
    return_lse = check_bool("return_lse", return_lse)
    score_mod = _keep_score if score_mod is None else score_mod
    mask_mod = _see_all if mask_mod is None else mask_mod
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
    on_gpu = prob.xp.__name__ == "cupy"
    if backend == "auto":
        backend = "numba_cuda" if on_gpu else "numba"
    if backend not in ("numba", "numba_cuda"):
        raise ValueError(f"backend: expected 'auto', 'numba' or 'numba_cuda', got {backend!r}")
    if backend == "numba" and on_gpu:
        raise TypeError("backend='numba' runs on the CPU but the inputs are CuPy arrays")
    if backend == "numba_cuda" and not on_gpu and not _simulator():
        raise TypeError(
            "backend='numba_cuda' needs CuPy arrays (or NUMBA_ENABLE_CUDASIM=1 for the "
            "simulator); xattn never copies between host and device"
        )

    xp = prob.xp
    hq = prob.hq if prob.heads_axis else 1
    hkv = prob.hkv if prob.heads_axis else 1
    work = np.dtype(np.float64) if prob.dtype == np.float64 else np.dtype(np.float32)
    q3 = _flat(q.astype(work, copy=False), prob, hq)
    k3 = _flat(k.astype(work, copy=False), prob, hkv)
    v3 = _flat(v.astype(work, copy=False), prob, hkv)
    out3 = xp.empty((q3.shape[0], prob.sq, prob.dv), dtype=work)
    lse2 = xp.empty((q3.shape[0], prob.sq), dtype=work)
    if q3.shape[0] and prob.sq:
        if backend == "numba":
            from ._backends.numpy_ import flex_njit

            flex_njit.launch(q3, k3, v3, out3, lse2, scale=prob.scale, hq=hq, hkv=hkv,
                             score_mod=score_mod, mask_mod=mask_mod)
        else:
            from ._backends.numba_cuda import flex_fwd

            stream = xp.cuda.get_current_stream().ptr if on_gpu else None
            flex_fwd.launch(q3, k3, v3, out3, lse2, scale=prob.scale, hq=hq, hkv=hkv,
                            score_mod=score_mod, mask_mod=mask_mod, stream_ptr=stream)
    out = out3.reshape(prob.out_shape).astype(prob.dtype, copy=False)
    if not return_lse:
        return out
    return out, lse2.reshape(prob.lse_shape).astype(prob.cdtype, copy=False)
