"""flex_attention with a user ALiBi score function and a causal mask (CPU and GPU), a
sliding-window mask_mod, and the backward pass with a learned slope gradient (CPU).

The anchors of the CPU rows (flash_attention with causal/alibi_slopes, dense flash) are timed
in the same classes, so ``asv compare`` shows the ratio; ``benchmarks/cpu_flex.py`` prints it.
"""

import numpy as np

import xattn

from . import sizes

SLOPES = xattn.alibi_slopes(8)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def alibi_args(score, b, h, q_idx, kv_idx, slopes):
    return score - slopes[h] * abs(q_idx - kv_idx)


WINDOW = 256


def sliding(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= WINDOW


def _require_numba():
    try:
        import numba  # noqa: F401
    except ImportError:
        raise NotImplementedError("numba is not installed") from None


class FlexCPU:
    params = [sizes([1024, 4096], [128])]
    param_names = ["seq_len"]
    number = 1
    timeout = 300

    def setup(self, seq_len):
        _require_numba()
        rng = np.random.default_rng(0)
        self.q, self.k, self.v = (
            rng.standard_normal((8, seq_len, 64), dtype=np.float32) for _ in range(3)
        )
        # Compile and derive the block mask outside the timed region.
        self.time_alibi_causal(seq_len)
        self.out, self.lse = xattn.flex_attention(
            self.q, self.k, self.v, score_mod=alibi_args, mask_mod=causal,
            score_mod_args=(SLOPES,), return_lse=True)
        self.time_backward_alibi_slopes(seq_len)
        self.time_flash_anchor(seq_len)

    def time_alibi_causal(self, seq_len):
        xattn.flex_attention(self.q, self.k, self.v, score_mod=alibi, mask_mod=causal)

    def time_flash_anchor(self, seq_len):
        xattn.flash_attention(self.q, self.k, self.v, causal=True, alibi_slopes=SLOPES)

    def time_backward_alibi_slopes(self, seq_len):
        xattn.flex_attention_backward(self.out, self.q, self.k, self.v, self.out, self.lse,
                                      score_mod=alibi_args, mask_mod=causal,
                                      score_mod_args=(SLOPES,))


class FlexWindowCPU:
    """Sliding window +-256 as a mask_mod: its cost follows the visible blocks."""

    params = [sizes([4096, 16384], [128])]
    param_names = ["seq_len"]
    number = 1
    timeout = 300

    def setup(self, seq_len):
        _require_numba()
        rng = np.random.default_rng(0)
        self.q, self.k, self.v = (
            rng.standard_normal((8, seq_len, 64), dtype=np.float32) for _ in range(3)
        )
        self.time_window(seq_len)

    def time_window(self, seq_len):
        xattn.flex_attention(self.q, self.k, self.v, mask_mod=sliding)

    def time_flash_window_anchor(self, seq_len):
        xattn.flash_attention(self.q, self.k, self.v, window=(WINDOW, WINDOW))


def _cupy_or_skip():
    """CuPy with a device, or NotImplementedError (asv's skip)."""
    try:
        import cupy as cp
    except ImportError:
        raise NotImplementedError("cupy is not installed") from None
    if cp.cuda.runtime.getDeviceCount() == 0:
        raise NotImplementedError("no CUDA device")
    return cp


class FlexGPU:
    params = [[4096, 16384]]
    param_names = ["seq_len"]
    timeout = 300

    def setup(self, seq_len):
        self.cp = cp = _cupy_or_skip()
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


SLOPES16 = xattn.alibi_slopes(16)


def alibi16(score, b, h, q_idx, kv_idx):
    return score - SLOPES16[h] * abs(q_idx - kv_idx)


class FlexGPUTensorCores:
    """Issue #13's row: fp16, 16 heads, D=64, causal mask_mod + ALiBi score_mod, the functions
    compiled into the mma.sync kernel (``backend="cupy"``). ``benchmarks/gpu_flex.py
    --dtype float16`` times torch.compile(flex_attention) beside it."""

    params = [[4096, 16384]]
    param_names = ["seq_len"]
    timeout = 300

    def setup(self, seq_len):
        cp = _cupy_or_skip()
        if int(cp.cuda.Device().compute_capability) < 80:
            raise NotImplementedError("the tensor-core kernel needs compute capability 8.0")
        self.cp = cp
        rng = np.random.default_rng(0)
        self.q, self.k, self.v = (
            cp.asarray(rng.standard_normal((1, 16, seq_len, 64), dtype=np.float32)
                       .astype(np.float16))
            for _ in range(3)
        )
        self._run()
        cp.cuda.Device().synchronize()

    def _run(self):
        return xattn.flex_attention(self.q, self.k, self.v, score_mod=alibi16, mask_mod=causal,
                                    backend="cupy")

    def time_alibi_causal_fp16(self, seq_len):
        self._run()
        self.cp.cuda.Device().synchronize()

    def track_tflops(self, seq_len):
        cp = self.cp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(5):
            self._run()
        stop.record()
        stop.synchronize()
        ms = cp.cuda.get_elapsed_time(start, stop) / 5
        return 4 * 16 * seq_len * seq_len * 64 / 2 / ms / 1e9

    track_tflops.unit = "TFLOP/s"
