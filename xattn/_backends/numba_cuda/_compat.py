"""Import numba.cuda on any supported NumPy.

numba-cuda 0.30.x still refers to ``np.row_stack``, which NumPy 2.5 removed; the alias is the
function NumPy documented it as (``vstack``) and is set only when missing.
"""

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack  # noqa: NPY201

from numba import cuda  # noqa: E402

__all__ = ["cuda"]
