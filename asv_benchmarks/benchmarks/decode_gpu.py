"""decode_attention over a CuPy KVCache: the split-KV kernel (``cupy.decode``, issue 12).

The rows of ``benchmarks/gpu_decode.py`` (32 query heads, 8 kv heads, float16, one new token,
every sequence holding ``ctx`` tokens, contiguous or paged in 256-token pages), which also
times torch SDPA and the card's copy beside them; torch is not a dependency of the asv
environment, so this suite tracks xattn alone. Skipped (setup raises NotImplementedError)
without CuPy or a CUDA device, or where the cache does not fit the device.
``track_decode_TBps`` is the step as bytes of K and V read per second (CUDA events around
back-to-back calls, each on a cache of its own when the caches are small, so that L2 does not
serve them).
"""

import numpy as np

import xattn

from . import sizes
from .flash_gpu import _require_gpu

HQ, HKV = 32, 8
ROTATE_BYTES = 256 << 20  # caches smaller than this are rotated (L2: 50 MiB on an H100)


class DecodeGPU:
    """One decoding step on the GPU, GQA 32/8, float16."""

    params = (sizes([1, 16, 64], [1]), sizes([4096, 32768, 131072], [4096]), [64, 128],
              ["contiguous", "paged"])
    param_names = ["batch", "ctx", "head_dim", "layout"]
    timeout = 300

    def setup(self, batch, ctx, head_dim, layout):
        cp = self.cp = _require_gpu()
        self.bytes = batch * HKV * ctx * 2 * head_dim * 2
        sets = int(min(8, max(1, -(-ROTATE_BYTES // self.bytes))))
        if sets * self.bytes * 1.2 > cp.cuda.runtime.memGetInfo()[0]:
            raise NotImplementedError(f"{sets * self.bytes / 2**30:.1f} GiB of caches do not fit")
        rs = cp.random.RandomState(0)
        self.caches, self.qs = [], []
        for _ in range(sets):
            cache = xattn.KVCache(batch, HKV, ctx + 1, head_dim, dtype=np.float16, xp=cp,
                                  page_size=256 if layout == "paged" else None)
            for start in range(0, ctx, 4096):
                n = min(4096, ctx - start)
                k, v = (rs.standard_normal((batch, HKV, n, head_dim), dtype=cp.float32)
                        .astype(cp.float16) for _ in range(2))
                cache.append(k, v)
            self.caches.append(cache)
            self.qs.append(rs.standard_normal((batch, HQ, 1, head_dim), dtype=cp.float32)
                           .astype(cp.float16))
        self.i = 0
        for _ in self.caches:  # compile, and plan every cache's launch, outside the timing
            self.time_decode(batch, ctx, head_dim, layout)

    def _step(self):
        j = self.i = (self.i + 1) % len(self.caches)
        return xattn.decode_attention(self.qs[j], self.caches[j])

    def time_decode(self, batch, ctx, head_dim, layout):
        self._step()
        self.cp.cuda.Device().synchronize()

    def track_decode_TBps(self, batch, ctx, head_dim, layout):
        cp = self.cp
        reps = max(3, min(50, int(2e9 // self.bytes)))
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            self._step()
        stop.record()
        stop.synchronize()
        return self.bytes / (cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps) / 1e12

    track_decode_TBps.unit = "TB/s"
