"""xattn: attention variants as plain array functions on NumPy (CPU) and CuPy (GPU) arrays.

Arrays in, arrays out: the namespace of the inputs decides the device. Importing xattn imports
neither CuPy nor Numba; they are loaded only when a CuPy array arrives or a fused CPU kernel
runs.
"""

from .flash import flash_attention, flash_attention_backward
from .positional import alibi_bias, alibi_slopes, apply_rotary, rotary_cos_sin
from .standard import standard_attention

__version__ = "0.1.0"

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "flash_attention",
    "flash_attention_backward",
    "rotary_cos_sin",
    "standard_attention",
]
