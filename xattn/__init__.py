"""xattn: attention variants as plain array functions on NumPy (CPU) and CuPy (GPU) arrays.

Arrays in, arrays out: the namespace of the inputs decides the device. Importing xattn imports
neither CuPy nor Numba; they are loaded only when a CuPy array arrives or a fused CPU kernel
runs.
"""

from ._backends import PerformanceWarning
from ._config import show_config
from .flash import flash_attention, flash_attention_backward
from .flex import flex_attention, flex_attention_backward
from .kvcache import KVCache, decode_attention
from .linear import (
    linear_attention,
    linear_attention_backward,
    performer_attention,
    performer_projection,
)
from .positional import alibi_bias, alibi_slopes, apply_rotary, rotary_cos_sin
from .sparse import (
    BlockMask,
    bigbird_attention,
    block_sparse_attention,
    longformer_attention,
)
from .standard import standard_attention

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "KVCache",
    "PerformanceWarning",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "bigbird_attention",
    "block_sparse_attention",
    "decode_attention",
    "flash_attention",
    "flash_attention_backward",
    "flex_attention",
    "flex_attention_backward",
    "linear_attention",
    "linear_attention_backward",
    "longformer_attention",
    "performer_attention",
    "performer_projection",
    "rotary_cos_sin",
    "show_config",
    "standard_attention",
]
