"""flex_attention with a user ALiBi score function and a causal mask (CPU and GPU)."""

import numpy as np

import xattn

from . import sizes

SLOPES = xattn.alibi_slopes(8)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


class FlexCPU:
    params = [sizes([1024, 4096], [128])]
    param_names = ["seq_len"]
    timeout = 300

    def setup(self, seq_len):
        try:
            import numba  # noqa: F401
        except ImportError:
            raise NotImplementedError("numba is not installed") from None
        rng = np.random.default_rng(0)
        self.q, self.k, self.v = (
            rng.standard_normal((8, seq_len, 64), dtype=np.float32) for _ in range(3)
        )
        # Compile outside the timed region.
        xattn.flex_attention(self.q[:, :64], self.k[:, :64], self.v[:, :64],
                             score_mod=alibi, mask_mod=causal)

    def time_alibi_causal(self, seq_len):
        xattn.flex_attention(self.q, self.k, self.v, score_mod=alibi, mask_mod=causal)


class FlexGPU:
    params = [[4096, 16384]]
    param_names = ["seq_len"]
    timeout = 300

    def setup(self, seq_len):
        try:
            import cupy as cp

            if cp.cuda.runtime.getDeviceCount() == 0:
                raise NotImplementedError("no CUDA device")
        except ImportError:
            raise NotImplementedError("cupy is not installed") from None
        self.cp = cp
        rng = np.random.default_rng(0)
        self.q, self.k, self.v = (
            cp.asarray(rng.standard_normal((8, seq_len, 64), dtype=np.float32))
            for _ in range(3)
        )
        xattn.flex_attention(self.q, self.k, self.v, score_mod=alibi, mask_mod=causal)
        cp.cuda.Device().synchronize()

    def time_alibi_causal(self, seq_len):
        xattn.flex_attention(self.q, self.k, self.v, score_mod=alibi, mask_mod=causal)
        self.cp.cuda.Device().synchronize()
