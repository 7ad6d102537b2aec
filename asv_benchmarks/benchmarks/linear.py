"""Benchmarks of linear attention and the Performer (issue 4).

Time against the sequence length (with exact flash attention at the same sizes, to follow the
crossover), the Performer's error against exact softmax attention as the number of random
features grows (``track_*``), and the GPU path when CuPy and a device are present (``setup``
raises ``NotImplementedError`` to skip otherwise; the timed bodies synchronize the device).
"""

import numpy as np

import xattn

from . import sizes

HEAD_DIM = 64


def _qkv(xp, heads, seq_len, dtype="float32", seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    arrays = [
        (scale * rng.standard_normal((heads, seq_len, HEAD_DIM), dtype=np.float32)).astype(dtype)
        for _ in range(3)
    ]
    return [xp.asarray(a) for a in arrays]


class LinearTimeVsLength:
    """Causal and non-causal ``linear_attention`` (elu+1), 4 heads, D=64, float32."""

    params = (sizes([1024, 4096, 16384, 65536], [1024]), [False, True])
    param_names = ["seq_len", "causal"]

    def setup(self, seq_len, causal):
        self.q, self.k, self.v = _qkv(np, 4, seq_len)

    def time_linear(self, seq_len, causal):
        xattn.linear_attention(self.q, self.k, self.v, causal=causal)

    def time_linear_backward(self, seq_len, causal):
        xattn.linear_attention_backward(self.q, self.q, self.k, self.v, causal=causal)

    def time_performer(self, seq_len, causal):
        xattn.performer_attention(self.q, self.k, self.v, causal=causal, seed=0)

    def peakmem_linear(self, seq_len, causal):
        xattn.linear_attention(self.q, self.k, self.v, causal=causal)


class ExactTimeVsLength:
    """``flash_attention`` at the lengths above: the other side of the crossover."""

    params = (sizes([1024, 4096, 16384], [1024]), [False, True])
    param_names = ["seq_len", "causal"]

    def setup(self, seq_len, causal):
        self.q, self.k, self.v = _qkv(np, 4, seq_len)
        xattn.flash_attention(self.q[:, :300], self.k[:, :300], self.v[:, :300])  # warm-up

    def time_flash(self, seq_len, causal):
        xattn.flash_attention(self.q, self.k, self.v, causal=causal)


class LinearLongSequence:
    """The issue's scale problem at a quarter of its length: causal, H=1, S=262144, D=64."""

    timeout = 120

    def setup(self):
        self.q, self.k, self.v = _qkv(np, 1, 1 << 18)

    def time_causal(self):
        xattn.linear_attention(self.q, self.k, self.v, causal=True)

    def peakmem_causal(self):
        xattn.linear_attention(self.q, self.k, self.v, causal=True)


class ChunkSize:
    """The causal scan's chunk size: intra-chunk quadratic work against per-chunk overheads."""

    params = sizes([16, 32, 64, 128, 256], [64])
    param_names = ["chunk_size"]

    def setup(self, chunk_size):
        self.q, self.k, self.v = _qkv(np, 4, 16384)

    def time_causal(self, chunk_size):
        xattn.linear_attention(self.q, self.k, self.v, causal=True, chunk_size=chunk_size)


class PerformerError:
    """Relative error of FAVOR+ against exact softmax attention vs the number of features."""

    params = (sizes([16, 64, 266, 1024], [16]), [True, False])
    param_names = ["num_features", "orthogonal"]
    seeds = range(5)

    def setup(self, num_features, orthogonal):
        self.q, self.k, self.v = _qkv(np, 2, 512, "float64", scale=0.5)
        self.exact = xattn.standard_attention(self.q, self.k, self.v)

    def track_relative_error(self, num_features, orthogonal):
        errs = [
            np.linalg.norm(
                xattn.performer_attention(
                    self.q, self.k, self.v, num_features=num_features, orthogonal=orthogonal,
                    seed=s,
                )
                - self.exact
            )
            / np.linalg.norm(self.exact)
            for s in self.seeds
        ]
        return float(np.median(errs))  # the estimator is heavy-tailed: median over seeds

    track_relative_error.unit = "relative error"

    def time_performer(self, num_features, orthogonal):
        xattn.performer_attention(
            self.q, self.k, self.v, num_features=num_features, orthogonal=orthogonal, seed=0
        )


def _cupy():
    try:
        import cupy
    except ImportError:
        raise NotImplementedError("cupy is not installed") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise NotImplementedError("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        raise NotImplementedError("no usable CUDA device") from None
    return cupy


class GpuLinear:
    """CuPy: causal/non-causal linear attention and the causal Performer, H=1, D=64."""

    params = ([65536, 1 << 20], ["float32", "float16"], [False, True])
    param_names = ["seq_len", "dtype", "causal"]

    def setup(self, seq_len, dtype, causal):
        self.cp = _cupy()
        self.q, self.k, self.v = _qkv(self.cp, 1, seq_len, dtype)
        xattn.linear_attention(self.q, self.k, self.v, causal=causal)  # warm-up
        self.cp.cuda.Device().synchronize()

    def time_linear(self, seq_len, dtype, causal):
        xattn.linear_attention(self.q, self.k, self.v, causal=causal)
        self.cp.cuda.Device().synchronize()

    def time_performer(self, seq_len, dtype, causal):
        xattn.performer_attention(self.q, self.k, self.v, causal=causal, seed=0)
        self.cp.cuda.Device().synchronize()
