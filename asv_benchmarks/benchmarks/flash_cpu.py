"""flash_attention and its backward on the CPU with the fused (numba) backend.

fp32, B=1, H=8, D=64 as in the foundation issue's performance section; the comparison with
PyTorch's scaled_dot_product_attention lives in ``benchmarks/cpu_flash_vs_torch.py`` (torch
is not a dependency of the asv environment). Skipped when numba or threadpoolctl is missing.
S=16384 takes seconds per call on a 2-core machine (non-causal forward ~3 s, backward ~8 s):
each timing is one call, and the timeout leaves room for it.
"""

import numpy as np

import xattn

from . import sizes

HEADS, HEAD_DIM = 8, 64


def _require_fused():
    try:
        import numba  # noqa: F401
        import threadpoolctl  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError(
            f"the fused CPU backend needs numba and threadpoolctl: {exc}"
        ) from None


class FlashCPU:
    """Forward and backward of ``flash_attention(backend="numba")``."""

    params = (sizes([1024, 4096, 16384], [256]), [False, True])
    param_names = ["seq_len", "causal"]
    number = 1
    repeat = (1, 3, 20.0)
    timeout = 600

    def setup(self, seq_len, causal):
        _require_fused()
        rng = np.random.default_rng(0)
        shape = (1, HEADS, seq_len, HEAD_DIM)
        self.q, self.k, self.v, self.dout = (
            rng.standard_normal(shape, dtype=np.float32) for _ in range(4)
        )
        # Compile the kernels (cached on disk after the first run) outside the timed region.
        small = (x[..., :64, :] for x in (self.q, self.k, self.v))
        xattn.flash_attention(*small, causal=causal, backend="numba")
        self.out, self.lse = xattn.flash_attention(
            self.q, self.k, self.v, causal=causal, backend="numba", return_lse=True
        )

    def time_forward(self, seq_len, causal):
        xattn.flash_attention(self.q, self.k, self.v, causal=causal, backend="numba")

    def time_backward(self, seq_len, causal):
        xattn.flash_attention_backward(
            self.dout, self.q, self.k, self.v, self.out, self.lse, causal=causal,
            backend="numba",
        )

    def peakmem_forward(self, seq_len, causal):
        xattn.flash_attention(self.q, self.k, self.v, causal=causal, backend="numba")

    def peakmem_backward(self, seq_len, causal):
        xattn.flash_attention_backward(
            self.dout, self.q, self.k, self.v, self.out, self.lse, causal=causal,
            backend="numba",
        )

    def track_forward_gflops(self, seq_len, causal):
        import time

        t0 = time.perf_counter()
        xattn.flash_attention(self.q, self.k, self.v, causal=causal, backend="numba")
        seconds = time.perf_counter() - t0
        flops = 4 * HEADS * seq_len * seq_len * HEAD_DIM * (0.5 if causal else 1.0)
        return flops / seconds / 1e9

    track_forward_gflops.unit = "GFLOP/s"


class FlashCPUOptions:
    """The options on top of the plain call: GQA, ALiBi, softcap, sliding window, mask."""

    params = (sizes([4096], [256]), ["gqa4", "alibi", "softcap", "window256", "mask"])
    param_names = ["seq_len", "option"]
    number = 1
    repeat = (1, 3, 20.0)
    timeout = 300

    def setup(self, s, option):
        _require_fused()
        rng = np.random.default_rng(0)
        hkv = 2 if option == "gqa4" else HEADS
        self.q = rng.standard_normal((1, HEADS, s, HEAD_DIM), dtype=np.float32)
        self.k, self.v = (
            rng.standard_normal((1, hkv, s, HEAD_DIM), dtype=np.float32) for _ in range(2)
        )
        self.kwargs = {
            "gqa4": {"causal": True},
            "alibi": {"causal": True, "alibi_slopes": xattn.alibi_slopes(HEADS)},
            "softcap": {"causal": True, "softcap": 30.0},
            "window256": {"causal": True, "window": (256, 0)},
            "mask": {"mask": rng.random((1, 1, 1, s)) < 0.9},  # key padding
        }[option]
        small = (x[..., :128, :] for x in (self.q, self.k, self.v))
        xattn.flash_attention(*small, backend="numba")

    def time_forward(self, s, option):
        xattn.flash_attention(self.q, self.k, self.v, backend="numba", **self.kwargs)
