"""Benchmarks of the core building blocks: standard (textbook) attention and RoPE.

Flash attention, the sparse and linear variants and the GPU kernels have their own modules.
Sizes stay small enough for a 2-core machine; ``asv run --quick`` calls each once.
"""

import numpy as np

import xattn

from . import SMOKE, sizes

HEADS, HEAD_DIM = 8, 64


def _qkv(seq_len, dtype, kv_heads=HEADS, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(1, HEADS, seq_len, HEAD_DIM)] + [(1, kv_heads, seq_len, HEAD_DIM)] * 2
    return [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in shapes]


class StandardAttention:
    """``standard_attention``: O(S^2) memory; the baseline the other variants are read against."""

    params = (sizes([512, 2048], [256]), ["float32", "float64"], [False, True])
    param_names = ["seq_len", "dtype", "causal"]

    def setup(self, seq_len, dtype, causal):
        self.q, self.k, self.v = _qkv(seq_len, dtype)

    def time_forward(self, seq_len, dtype, causal):
        xattn.standard_attention(self.q, self.k, self.v, causal=causal)

    def peakmem_forward(self, seq_len, dtype, causal):
        xattn.standard_attention(self.q, self.k, self.v, causal=causal)

    def track_gflops(self, seq_len, dtype, causal):
        # One timed call, in the units PERF.md uses (4*B*H*S^2*D, half for causal).
        import time

        t0 = time.perf_counter()
        xattn.standard_attention(self.q, self.k, self.v, causal=causal)
        seconds = time.perf_counter() - t0
        flops = 4 * HEADS * seq_len * seq_len * HEAD_DIM * (0.5 if causal else 1.0)
        return flops / seconds / 1e9

    track_gflops.unit = "GFLOP/s"


class StandardAttentionOptions:
    """The score modifications on top of the plain call: GQA, ALiBi, softcap, weights."""

    params = ["gqa", "alibi", "softcap", "return_weights"]
    param_names = ["option"]

    def setup(self, option):
        seq_len = 256 if SMOKE else 1024
        self.q, self.k, self.v = _qkv(seq_len, "float32", kv_heads=2 if option == "gqa" else HEADS)
        self.kwargs = {
            "gqa": {},
            "alibi": {"alibi_slopes": xattn.alibi_slopes(HEADS)},
            "softcap": {"softcap": 30.0},
            "return_weights": {"return_weights": True},
        }[option]

    def time_forward(self, option):
        xattn.standard_attention(self.q, self.k, self.v, **self.kwargs)


class Rotary:
    """RoPE: building the tables and rotating q, k of shape (1, 8, S, 128)."""

    params = (sizes([2048, 16384], [256]), ["neox", "gptj", "partial"])
    param_names = ["seq_len", "layout"]

    def setup(self, seq_len, layout):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((1, 8, seq_len, 128), dtype=np.float32)
        self.rotary_dim = 64 if layout == "partial" else 128
        self.interleaved = layout == "gptj"
        self.cos, self.sin = xattn.rotary_cos_sin(seq_len, self.rotary_dim, dtype=np.float32)

    def time_cos_sin(self, seq_len, layout):
        xattn.rotary_cos_sin(seq_len, self.rotary_dim, dtype=np.float32)

    def time_apply(self, seq_len, layout):
        xattn.apply_rotary(self.x, self.cos, self.sin, interleaved=self.interleaved)

    def peakmem_apply(self, seq_len, layout):
        xattn.apply_rotary(self.x, self.cos, self.sin, interleaved=self.interleaved)


class RotaryScaling:
    """The Hugging Face scaled variants (linear, dynamic NTK, llama3) of the tables."""

    params = ["linear", "dynamic", "llama3"]
    param_names = ["rope_type"]

    def setup(self, rope_type):
        self.scaling = {
            "linear": {"rope_type": "linear", "factor": 4.0},
            "dynamic": {"rope_type": "dynamic", "factor": 4.0,
                        "original_max_position_embeddings": 4096},
            "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        }[rope_type]

    def time_cos_sin(self, rope_type):
        xattn.rotary_cos_sin(32768, 128, scaling=self.scaling, dtype=np.float32)
