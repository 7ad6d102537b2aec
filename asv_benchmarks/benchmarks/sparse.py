"""Benchmarks of sparse attention: each BlockMask pattern, the sliding window through
``flash_attention(window=...)``, and the cost of building masks and plans.

fp32, H=4, D=64 (the sizes of the sparse acceptance measurement), lengths a 2-core machine
finishes quickly; ``benchmarks/sparse_scaling.py`` runs the long ones (up to 256k).
"""

import numpy as np

import xattn

from . import sizes

HEADS, HEAD_DIM, HALF_WINDOW = 4, 64, 256


def _qkv(seq_len, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, HEADS, seq_len, HEAD_DIM), dtype=np.float32)
            for _ in range(3)]


def _mask(pattern, seq_len):
    if pattern == "causal":
        return xattn.BlockMask.causal(seq_len)
    if pattern == "sliding_window":
        return xattn.BlockMask.sliding_window(seq_len, window=(HALF_WINDOW, HALF_WINDOW))
    if pattern == "longformer":
        glob = np.arange(16)  # a CLS token and a question, as in HF question answering
        return xattn.BlockMask.longformer(seq_len, window=2 * HALF_WINDOW, global_tokens=glob)
    if pattern == "bigbird":
        return xattn.BlockMask.bigbird(seq_len, seed=0)
    if pattern == "documents":
        cu = np.linspace(0, seq_len, 9).astype(int)
        return xattn.BlockMask.documents(cu, causal=True)
    raise ValueError(pattern)


PATTERNS = ["causal", "sliding_window", "longformer", "bigbird", "documents"]


class BlockSparse:
    """``block_sparse_attention`` forward and backward under each pattern."""

    params = (sizes([4096, 16384], [1024]), PATTERNS)
    param_names = ["seq_len", "pattern"]
    timeout = 300

    def setup(self, seq_len, pattern):
        self.q, self.k, self.v = _qkv(seq_len)
        self.bm = _mask(pattern, seq_len)
        self.out, self.lse = xattn.block_sparse_attention(self.q, self.k, self.v, self.bm,
                                                          return_lse=True)
        self.dout = np.ones_like(self.out)

    def time_forward(self, seq_len, pattern):
        xattn.block_sparse_attention(self.q, self.k, self.v, self.bm)

    def peakmem_forward(self, seq_len, pattern):
        xattn.block_sparse_attention(self.q, self.k, self.v, self.bm)

    def time_backward(self, seq_len, pattern):
        xattn.flash_attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse,
                                       block_mask=self.bm)

    def track_useful_gflops(self, seq_len, pattern):
        # Visible pairs only (PERF.md): 4 * H * visible_pairs * D per forward call.
        import time

        t0 = time.perf_counter()
        xattn.block_sparse_attention(self.q, self.k, self.v, self.bm)
        seconds = time.perf_counter() - t0
        return 4 * HEADS * self.bm.visible_pairs * HEAD_DIM / seconds / 1e9

    track_useful_gflops.unit = "GFLOP/s"


class SlidingWindowScaling:
    """``flash_attention(window=(256, 256))``: time must grow linearly with S."""

    params = sizes([16384, 65536], [1024])
    param_names = ["seq_len"]
    timeout = 300

    def setup(self, seq_len):
        self.q, self.k, self.v = _qkv(seq_len)

    def time_forward(self, seq_len):
        xattn.flash_attention(self.q, self.k, self.v, window=(HALF_WINDOW, HALF_WINDOW))

    def peakmem_forward(self, seq_len):
        xattn.flash_attention(self.q, self.k, self.v, window=(HALF_WINDOW, HALF_WINDOW))


class Build:
    """Building a BlockMask and its plan (cached after the first call: timed uncached)."""

    params = (sizes([16384, 65536], [1024]), PATTERNS)
    param_names = ["seq_len", "pattern"]

    def setup(self, seq_len, pattern):
        from xattn import _blockmask, sparse

        self.clear = [_blockmask._band, _blockmask._documents, _blockmask._longformer,
                      _blockmask._bigbird_cached, sparse.block_plan]

    def time_build(self, seq_len, pattern):
        for f in self.clear:
            f.cache_clear()
        bm = _mask(pattern, seq_len)
        xattn.sparse.block_plan(bm, False, None)

    def peakmem_build(self, seq_len, pattern):
        for f in self.clear:
            f.cache_clear()
        bm = _mask(pattern, seq_len)
        xattn.sparse.block_plan(bm, False, None)
