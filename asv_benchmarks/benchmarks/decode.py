"""Decode attention over a KVCache on the CPU (issue 12), and the cost of appending a token.

Llama-3-8B's attention shapes for one layer: 32 query heads, 8 kv heads (GQA), D=128,
float32 or float16, one sequence. ``time_decode`` is one decoding step (``T`` new tokens) with the
cache holding ``ctx`` tokens, contiguous or paged (16-token pages); ``track_decode_GBps`` is
the same step as bytes of K and V read per second. The comparison with torch SDPA and
``np.copyto`` lives in ``benchmarks/cpu_decode.py`` (torch is not a dependency of the asv
environment). The numba backend is used when it is installed, the NumPy path otherwise
(``backend="auto"``).
"""

import time

import numpy as np

import xattn

from . import sizes

HQ, HKV, HEAD_DIM = 32, 8, 128


def _cache(ctx, layout, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    cache = xattn.KVCache(1, HKV, ctx + 16, HEAD_DIM, dtype=dtype,
                          page_size=16 if layout == "paged" else None)
    step = 8192
    for start in range(0, ctx, step):
        n = min(step, ctx - start)
        k, v = (rng.standard_normal((1, HKV, n, HEAD_DIM), dtype=np.float32).astype(dtype)
                for _ in range(2))
        cache.append(k, v)
    return cache


class Decode:
    """One ``decode_attention`` step, GQA 32/8, D=128, batch 1, float32 or float16 cache."""

    params = (sizes([4096, 32768, 131072], [2048]), [1, 4], ["contiguous", "paged"],
              ["float32", "float16"])
    param_names = ["ctx", "tokens", "layout", "dtype"]
    timeout = 300

    def setup(self, ctx, tokens, layout, dtype):
        self.cache = _cache(ctx, layout, dtype)
        rng = np.random.default_rng(1)
        self.q = rng.standard_normal((1, HQ, tokens, HEAD_DIM), dtype=np.float32).astype(dtype)
        xattn.decode_attention(self.q, self.cache)  # compile the CPU kernels (cached on disk)

    def time_decode(self, ctx, tokens, layout, dtype):
        xattn.decode_attention(self.q, self.cache)

    def track_decode_GBps(self, ctx, tokens, layout, dtype):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            xattn.decode_attention(self.q, self.cache)
            best = min(best, time.perf_counter() - t0)
        return 2 * HKV * ctx * HEAD_DIM * np.dtype(dtype).itemsize / best / 1e9  # K and V

    track_decode_GBps.unit = "GB/s"


class Append:
    """``KVCache.append`` of one token per sequence (batch 8), with and without RoPE."""

    params = (["contiguous", "paged"], [False, True])
    param_names = ["layout", "rotary"]

    def setup(self, layout, rotary):
        rng = np.random.default_rng(0)
        self.cache = xattn.KVCache(8, HKV, 4096, HEAD_DIM, dtype=np.float32,
                                   page_size=16 if layout == "paged" else None)
        self.k, self.v = (rng.standard_normal((8, HKV, 1, HEAD_DIM), dtype=np.float32)
                          for _ in range(2))
        self.rotary = xattn.rotary_cos_sin(4096, HEAD_DIM) if rotary else None

    def time_append(self, layout, rotary):
        if int(self.cache.lengths.max()) >= 4096:
            self.cache.reset()
        self.cache.append(self.k, self.v, rotary=self.rotary)
