"""flash_attention on CuPy arrays: the tensor-core RawKernel (``backend="cupy"``).

The same shapes as ``benchmarks/gpu_flash.py`` (B*S = 16384, Hq*D = 2048), which also times
torch SDPA beside it on the same card; torch is not a dependency of the asv environment, so
this suite tracks xattn alone. Skipped (setup raises NotImplementedError) without CuPy or a
CUDA device. Timings synchronise the device, so they measure the kernel, not the launch.
"""

import numpy as np

import xattn


def _require_gpu():
    try:
        import cupy
    except ImportError as exc:
        raise NotImplementedError(f"needs CuPy: {exc}") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise NotImplementedError("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise NotImplementedError(f"no CUDA device: {exc}") from None
    return cupy


def _dtype(cupy, name):
    if name == "float16":
        return cupy.float16
    try:
        import ml_dtypes
    except ImportError as exc:
        raise NotImplementedError(f"bfloat16 needs ml_dtypes: {exc}") from None
    return np.dtype(ml_dtypes.bfloat16)


class FlashForwardGPU:
    """Forward on tensor cores; ``track_tflops`` in PERF.md's units (half for causal)."""

    params = (["float16", "bfloat16"], [64, 128], [1024, 4096, 16384], [False, True])
    param_names = ["dtype", "head_dim", "seq_len", "causal"]
    timeout = 120

    def setup(self, dtype, head_dim, seq_len, causal):
        cp = _require_gpu()
        self.cp = cp
        b, h = 16384 // seq_len, 2048 // head_dim
        rng = np.random.default_rng(0)
        dt = _dtype(cp, dtype)
        self.q, self.k, self.v = (
            cp.asarray(rng.standard_normal((b, h, seq_len, head_dim), dtype=np.float32)
                       .astype(dt))
            for _ in range(3)
        )
        self.flops = 4.0 * b * h * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
        self._run(causal)  # compile and load the kernel outside the timing

    def _run(self, causal):
        xattn.flash_attention(self.q, self.k, self.v, causal=causal, backend="cupy")
        self.cp.cuda.Device().synchronize()

    def time_forward(self, dtype, head_dim, seq_len, causal):
        self._run(causal)

    def track_tflops(self, dtype, head_dim, seq_len, causal):
        cp = self.cp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        reps = 10
        start.record()
        for _ in range(reps):
            xattn.flash_attention(self.q, self.k, self.v, causal=causal, backend="cupy")
        stop.record()
        stop.synchronize()
        ms = cp.cuda.get_elapsed_time(start, stop) / reps
        return self.flops / ms / 1e9

    track_tflops.unit = "TFLOP/s"


class FlashWindowGPU:
    """Sliding window S=65536 +-256, D=64, 32 heads: cost proportional to the window."""

    timeout = 120

    def setup(self):
        cp = _require_gpu()
        self.cp = cp
        rng = np.random.default_rng(1)
        self.q, self.k, self.v = (
            cp.asarray(rng.standard_normal((1, 32, 65536, 64), dtype=np.float32)
                       .astype(np.float16))
            for _ in range(3)
        )
        self.time_forward()

    def time_forward(self):
        xattn.flash_attention(self.q, self.k, self.v, window=(256, 256), backend="cupy")
        self.cp.cuda.Device().synchronize()
