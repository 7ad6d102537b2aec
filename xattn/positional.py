"""Positions: rotary embeddings (RoPE) and ALiBi slopes/biases."""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _masking
from ._array import (
    _check_float,
    array_namespace,
    check_bool,
    check_float_dtype,
    check_scalar,
    compute_dtype,
    dlpack_interop,
)

__all__ = ["alibi_bias", "alibi_slopes", "apply_rotary", "rotary_cos_sin"]


def _inv_freq(rotary_dim: int, base: float) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))


def _scaled_inv_freq(rotary_dim, base, scaling, seq_len):
    """Inverse frequencies after Hugging Face rope scaling (``modeling_rope_utils`` rules)."""
    if scaling is None:
        return _inv_freq(rotary_dim, base)
    if not isinstance(scaling, dict):
        raise TypeError(
            f"scaling: expected a dict of rope parameters, got {type(scaling).__name__}"
        )
    theta = scaling.get("rope_theta")
    if theta is not None and float(theta) != base:
        # transformers 5 keeps the base inside the rope parameters; a dict passed as is
        # must not be silently combined with another base.
        raise ValueError(
            f"scaling: rope_theta={theta} disagrees with base={base}; pass base={theta}"
        )
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return _inv_freq(rotary_dim, base)

    def get(key, *alternatives):
        for name in (key, *alternatives):
            if name in scaling:
                return float(scaling[name])
        names = " or ".join(repr(n) for n in (key, *alternatives))
        raise ValueError(f"scaling: rope_type {kind!r} needs {names}, got keys {sorted(scaling)}")

    factor = get("factor")
    if factor <= 0:
        raise ValueError(f"scaling: factor must be positive, got {factor}")
    if kind == "linear":
        return _inv_freq(rotary_dim, base) / factor
    if kind == "dynamic":
        max_pos = get("max_position_embeddings", "original_max_position_embeddings")
        if rotary_dim <= 2:  # the NTK exponent rotary_dim / (rotary_dim - 2) needs more
            raise ValueError(f"scaling: dynamic needs rotary_dim > 2, got {rotary_dim}")
        # HF recomputes the base only once the sequence outgrows the trained context.
        seq_len = max(seq_len, max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2)
        )
        return _inv_freq(rotary_dim, base)
    if kind == "llama3":
        low = get("low_freq_factor")
        high = get("high_freq_factor")
        old_ctx = get("original_max_position_embeddings")
        inv = _inv_freq(rotary_dim, base)
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(
        f"scaling: rope_type {kind!r} is not supported (supported: default, linear, dynamic, "
        "llama3)"
    )


@dlpack_interop
def rotary_cos_sin(
    positions_or_length, rotary_dim, *, base=10000.0, scaling=None, dtype=np.float32, xp=None
):
    """Cosine and sine tables for rotary position embeddings (RoPE).

    Parameters
    ----------
    positions_or_length : int or integer array ``(..., S)``
        A length ``S`` (positions ``0..S-1``) or explicit positions (e.g. with a KV-cache
        offset, or per batch element).
    rotary_dim : int
        Number of channels rotated (even, at most the head dim; partial rotary when smaller).
    base : float
        RoPE base ``theta``, a finite number > 0 (else ``ValueError``: a zero or negative base
        would give NaN tables).
    scaling : dict, optional
        Hugging Face rope parameters as found in a model config, e.g.
        ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}``; ``rope_type``
        (or ``type``) ``linear``, ``dynamic`` (needs ``max_position_embeddings`` or
        ``original_max_position_embeddings``) or ``llama3``. A ``rope_theta`` entry (as in
        transformers 5 configs) must equal ``base``, else ``ValueError``.
    dtype : dtype
        Of the returned tables (computed in float64 first): float16, bfloat16, float32 or
        float64 (else ``TypeError``).
    xp : module, optional
        ``numpy`` or ``cupy``; default: the namespace of ``positions_or_length``, else NumPy.

    Returns
    -------
    cos, sin : arrays ``(..., S, rotary_dim // 2)``
        One entry per rotated pair, as flash-attn's rotary kernels take them.

    Examples
    --------
    >>> import numpy as np, xattn
    >>> cos, sin = xattn.rotary_cos_sin(16, 8)
    >>> cos.shape, float(cos[0, 0]), bool(sin[1, 0] == np.float32(np.sin(1.0)))
    ((16, 4), 1.0, True)
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral):
        raise TypeError(f"rotary_dim: expected an int, got {type(rotary_dim).__name__}")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even int, got {rotary_dim}")
    base = check_scalar("base", base, allow_none=False)
    dtype = check_float_dtype(dtype)
    if isinstance(positions_or_length, numbers.Integral) and not isinstance(
        positions_or_length, bool
    ):
        if positions_or_length < 0:
            raise ValueError(f"positions_or_length: expected >= 0, got {positions_or_length}")
        xp = np if xp is None else xp
        pos = np.arange(int(positions_or_length), dtype=np.float64)
        seq_len = int(positions_or_length)
    else:
        pxp = array_namespace(positions_or_length, names=("positions_or_length",))
        if pxp.__name__ == "cupy":
            xp = pxp if xp is None else xp
            if xp is not pxp:
                raise TypeError("positions_or_length is a CuPy array but xp is not cupy")
        xp = np if xp is None else xp
        if not np.issubdtype(positions_or_length.dtype, np.integer):
            raise TypeError(
                f"positions_or_length: expected an int or an integer array, got "
                f"{positions_or_length.dtype}"
            )
        pos = positions_or_length.astype(np.float64)
        seq_len = int(pos.max()) + 1 if pos.size else 0
    inv = _scaled_inv_freq(int(rotary_dim), base, scaling, seq_len)
    if xp.__name__ == "cupy":
        inv = xp.asarray(inv)
        pos = xp.asarray(pos)
    freqs = pos[..., None] * inv
    return xp.cos(freqs).astype(dtype), xp.sin(freqs).astype(dtype)


@dlpack_interop
def apply_rotary(x, cos, sin, /, *, interleaved=False):
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``x`` by position (RoPE).

    Parameters
    ----------
    x : array ``(..., S, D)``
        Queries or keys (any floating dtype; 16-bit inputs are rotated in float32).
    cos, sin : arrays broadcastable to ``(..., S, rotary_dim // 2)``
        From :func:`rotary_cos_sin`; ``rotary_dim <= D``. Channels past ``rotary_dim`` pass
        through unchanged.
    interleaved : bool
        False (default): NeoX/Llama ``rotate_half`` pairs channel ``i`` with
        ``i + rotary_dim / 2``. True: GPT-J pairs channels ``2i`` and ``2i + 1``.

    Returns
    -------
    array like ``x`` (same shape and dtype; a new array).

    Examples
    --------
    >>> import numpy as np, xattn
    >>> x = np.ones((3, 4), dtype=np.float32)
    >>> cos, sin = xattn.rotary_cos_sin(3, 4)
    >>> y = xattn.apply_rotary(x, cos, sin)
    >>> bool(np.allclose(np.linalg.norm(y, axis=-1), 2.0))   # rotations keep the norm
    True
    """
    xp = array_namespace(x, cos, sin, names=("x", "cos", "sin"))
    interleaved = check_bool("interleaved", interleaved)
    _check_float("x", x)
    _check_float("cos", cos)
    _check_float("sin", sin)
    if x.ndim < 2:
        raise ValueError(f"x: expected at least 2 dims (..., seq, dim), got shape {x.shape}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {cos.shape} and {sin.shape}")
    half = cos.shape[-1]
    rd = 2 * half
    if rd > x.shape[-1]:
        raise ValueError(
            f"cos: rotary_dim 2*{half}={rd} exceeds x's head dim {x.shape[-1]} (x {x.shape})"
        )
    if cos.ndim < 2 or cos.shape[-2] != x.shape[-2]:
        raise ValueError(
            f"cos: expected (..., {x.shape[-2]}, {half}) matching x {x.shape}, got {cos.shape}"
        )
    try:
        np.broadcast_shapes(cos.shape[:-1], x.shape[:-1])
    except ValueError:
        raise ValueError(
            f"cos: shape {cos.shape} does not broadcast against x {x.shape}"
        ) from None
    cd = np.float64 if x.dtype == np.float64 else np.float32
    c, s = cos.astype(cd, copy=False), sin.astype(cd, copy=False)
    xr = x[..., :rd].astype(cd)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
    r1 = x1 * c - x2 * s
    r2 = x2 * c + x1 * s
    out = xp.empty(np.broadcast_shapes(x.shape, (*cos.shape[:-1], x.shape[-1])), dtype=x.dtype)
    if interleaved:
        out[..., 0:rd:2] = r1
        out[..., 1:rd:2] = r2
    else:
        out[..., :half] = r1
        out[..., half:rd] = r2
    out[..., rd:] = x[..., rd:]
    return out


def alibi_slopes(num_heads, *, dtype=np.float32, xp=None):
    """ALiBi head slopes by the paper's rule (the values of BLOOM's ``build_alibi_tensor``).

    For a power-of-two head count ``n`` the slopes are ``2**(-8 i / n)``, ``i = 1..n``; otherwise
    the slopes of the nearest smaller power of two are followed by every other slope of the
    next power of two.

    Examples
    --------
    >>> import xattn
    >>> xattn.alibi_slopes(8).tolist()
    [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    >>> len(xattn.alibi_slopes(12))
    12
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"num_heads: expected an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads: expected >= 1, got {num_heads}")
    dtype = check_float_dtype(dtype)
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** np.arange(1, 1 + closest, dtype=np.float64)
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        extra = extra_base ** np.arange(1, 1 + 2 * remaining, 2, dtype=np.float64)
        slopes = np.concatenate([slopes, extra])
    xp = np if xp is None else xp
    return xp.asarray(slopes.astype(dtype))


@dlpack_interop
def alibi_bias(slopes, q_len, k_len):
    """The dense ALiBi bias ``-slope_h * |i + k_len - q_len - j|``, ``(..., H, q_len, k_len)``.

    Symmetric and bottom-right aligned, as :func:`xattn.flash_attention` applies it in the kernel
    with ``alibi_slopes=``; passing this as ``bias=`` gives the same result (at O(S^2) memory).

    The bias is computed and returned in the compute dtype of the slopes: float32 for float16,
    bfloat16 and float32 slopes, float64 for float64 slopes. These are the values the kernels
    add to the scores (a float16 table would round distances past 2048, bfloat16 past 256).

    Examples
    --------
    >>> import xattn
    >>> xattn.alibi_bias(xattn.alibi_slopes(2), 2, 3)[0].tolist()
    [[-0.0625, 0.0, -0.0625], [-0.125, -0.0625, 0.0]]
    """
    xp = array_namespace(slopes, names=("slopes",))
    _check_float("slopes", slopes)
    if slopes.ndim < 1:
        raise ValueError(f"slopes: expected shape (..., H), got {slopes.shape}")
    for name, n in (("q_len", q_len), ("k_len", k_len)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n!r}")
    cd = compute_dtype(slopes.dtype)
    dist = _masking.alibi_distance(xp, 0, q_len, 0, k_len, sq=q_len, sk=k_len, dtype=cd)
    return -slopes.astype(cd)[..., None, None] * dist
