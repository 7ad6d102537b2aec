"""Sparse attention: block-sparse, sliding window, Longformer, BigBird, packed documents.

Every variant is exact attention under a :class:`BlockMask` (see :mod:`xattn._blockmask` for
its arrays), computed by the flash kernels: each query block visits only its visible key
blocks, so work and memory are proportional to the visible blocks, never to ``Sq x Sk``.

The CPU kernels consume a *plan* built by :mod:`xattn._plans` from the BlockMask's CSR arrays
and the call's own ``causal``/``window`` options (``block_plan``, ``window_plan``,
``plan_options`` and ``per_batch`` are re-exported here for existing callers). The mask is
checked once, with the other options, by :func:`xattn._array.validate_attention`, and
travels in the problem (``prob.block_mask``).
"""

from __future__ import annotations

from ._array import dlpack_interop, score_options, validate_attention
from ._blockmask import DEFAULT_BLOCK_SIZE, BlockMask, global_token_flags
from ._plans import (  # noqa: F401 - re-exported for existing callers
    ElementRule,
    block_plan,
    check_block_mask,
    per_batch,
    plan_options,
    window_plan,
)
from .flash import flash_attention

__all__ = [
    "BlockMask",
    "bigbird_attention",
    "block_sparse_attention",
    "longformer_attention",
]

# --- public functions -----------------------------------------------------------------------


@dlpack_interop
@score_options(before="return_lse")
def block_sparse_attention(q, k, v, block_mask, /, *, return_lse=False, backend="auto",
                           **score):
    """Exact attention restricted to a :class:`BlockMask`, visiting only its visible blocks.

    The same as ``flash_attention(q, k, v, block_mask=block_mask, ...)``: every option of
    :func:`xattn.flash_attention` combines with the mask (a pair is visible iff the block mask
    and every other rule allow it). Invisible blocks cost nothing; full blocks skip the
    element test. Gradient: ``flash_attention_backward(..., block_mask=block_mask)``.

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, Sq, D)``, ``(..., Hkv, Sk, D)``, ``(..., Hkv, Sk, Dv)``
    block_mask : BlockMask
        Built for ``q_len=Sq``, ``k_len=Sk``; a batched mask must match the batch dims.
    {score_options}, return_lse, backend
        As in :func:`xattn.flash_attention`.

    Returns
    -------
    out : array ``(..., Hq, Sq, Dv)``, and ``lse`` ``(..., Hq, Sq)`` with ``return_lse``.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 1000, 32), dtype=np.float32) for _ in range(3))
    >>> bm = xattn.BlockMask.documents([0, 300, 1000], causal=True)
    >>> out = xattn.block_sparse_attention(q, k, v, bm)
    >>> ref = xattn.standard_attention(q, k, v, mask=bm.to_dense())
    >>> bool(np.allclose(out, ref, atol=1e-5))
    True
    """
    if block_mask is None:  # (any other non-BlockMask is refused by validate_attention)
        raise TypeError("block_mask: expected an xattn.BlockMask, got None")
    return flash_attention(q, k, v, block_mask=block_mask, return_lse=return_lse,
                           backend=backend, **score)


# The end of the self-attention variants' parameter lists, and what they return.
_SELF_ATTENTION_TAIL = """{score_options}, return_lse, backend
        As in :func:`xattn.flash_attention`.

    Returns
    -------
    out : array ``(..., Hq, S, Dv)``, and ``lse`` with ``return_lse``."""


def _self_attention_doc(fn):
    fn.__doc__ = fn.__doc__.replace("{self_attention_tail}", _SELF_ATTENTION_TAIL)
    return fn


def _self_attention_len(name, q, k, v, score):
    prob = validate_attention(q, k, v, **score)
    if prob.sq != prob.sk:
        raise ValueError(
            f"{name}: expected self-attention (equal query and key lengths), got q "
            f"{q.shape} and k {k.shape}"
        )
    return prob


@dlpack_interop
@score_options(before="return_lse", exclude=("causal", "window"))
@_self_attention_doc
def longformer_attention(q, k, v, /, *, window, global_tokens, block_size=DEFAULT_BLOCK_SIZE,
                         return_lse=False, backend="auto", **score):
    """Longformer attention (Hugging Face semantics): sliding window plus global tokens.

    Query ``i`` sees key ``j`` iff ``|i - j| <= window // 2``, or ``i`` is a global token
    (global queries see every key), or ``j`` is a global token (every query sees the global
    keys). The local and global parts share one softmax, as in HF ``LongformerSelfAttention``
    (one set of projections; project separately beforehand for HF's ``query_global`` etc.).
    Cost O(S * (window + number of global tokens)).

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, S, D)``, ``(..., Hkv, S, D)``, ``(..., Hkv, S, Dv)``
    window : int
        Even and positive: ``window // 2`` keys on each side (HF ``attention_window``).
    global_tokens : array_like
        Integer positions shared by the batch (negative values count from the end), or a
        boolean ``(S,)`` array, or a boolean ``(*batch, S)`` array with one set of global
        tokens per batch element (the inputs' leading dims).
    block_size : int
        Block size of the underlying :meth:`BlockMask.longformer`.
    {self_attention_tail}

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 700, 32)) for _ in range(3))
    >>> out = xattn.longformer_attention(q, k, v, window=128, global_tokens=[0, 350])
    >>> bm = xattn.BlockMask.longformer(700, window=128, global_tokens=[0, 350])
    >>> bool(np.allclose(out, xattn.standard_attention(q, k, v, mask=bm.to_dense())))
    True
    """
    prob = _self_attention_len("longformer_attention", q, k, v, score)
    flags = global_token_flags(global_tokens, prob.sq, prob.batch if prob.heads_axis else ())
    bm = BlockMask.longformer(prob.sq, window=window, global_tokens=flags,
                              block_size=block_size)
    return flash_attention(q, k, v, block_mask=bm, return_lse=return_lse, backend=backend,
                           **score)


@dlpack_interop
@score_options(before="return_lse", exclude=("causal", "window"))
@_self_attention_doc
def bigbird_attention(q, k, v, /, *, block_size=64, window_blocks=3, global_blocks=1,
                      random_blocks=3, seed=None, return_lse=False, backend="auto", **score):
    """BigBird (ITC) block-sparse attention under ``BlockMask.bigbird(S, ...)``.

    The first and last ``global_blocks`` blocks attend everywhere and are attended by all; a
    band of ``window_blocks`` blocks is centred on the diagonal; each other query block sees
    ``random_blocks`` further random key blocks, reproducible from ``seed``. Cost O(S) for
    fixed block counts. ``S`` need not be a multiple of ``block_size``.

    With ``seed=None`` every call draws a new pattern; for a training step build the mask
    once with :meth:`BlockMask.bigbird` and pass it to :func:`xattn.flash_attention` and
    :func:`xattn.flash_attention_backward`, or pass a seed.

    Parameters
    ----------
    q, k, v : arrays ``(..., Hq, S, D)``, ``(..., Hkv, S, D)``, ``(..., Hkv, S, Dv)``
    block_size, window_blocks, global_blocks, random_blocks, seed
        As in :meth:`BlockMask.bigbird`.
    {self_attention_tail}

    Examples
    --------
    >>> import numpy as np, xattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((4, 1000, 32)) for _ in range(3))
    >>> out = xattn.bigbird_attention(q, k, v, seed=1)
    >>> bm = xattn.BlockMask.bigbird(1000, seed=1)
    >>> bool(np.allclose(out, xattn.standard_attention(q, k, v, mask=bm.to_dense())))
    True
    """
    prob = _self_attention_len("bigbird_attention", q, k, v, score)
    bm = BlockMask.bigbird(prob.sq, block_size=block_size, window_blocks=window_blocks,
                           global_blocks=global_blocks, random_blocks=random_blocks, seed=seed)
    return flash_attention(q, k, v, block_mask=bm, return_lse=return_lse, backend=backend,
                           **score)
