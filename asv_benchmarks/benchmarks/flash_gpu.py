"""flash_attention and its backward on CuPy arrays: the RawKernels (``backend="cupy"``).

The same shapes as ``benchmarks/gpu_flash.py`` (B*S = 16384, Hq*D = 2048), which also times
torch SDPA beside them on the same card; torch is not a dependency of the asv environment, so
this suite tracks xattn alone. Skipped (setup raises NotImplementedError) without CuPy or a
CUDA device, and where the kernels refuse a case (``backend="cupy"`` raises
NotImplementedError: e.g. no backward kernel). Every timed body synchronises the device, so it
measures the kernels, not the launch. ``track_tflops`` uses the flash-attn FLOP count: forward
``4 B Hq Sq Sk D``, backward 2.5 times that, half for causal; the window counts visible pairs.
"""

import numpy as np

import xattn

from . import sizes


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
    if name in ("float16", "float32"):
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError as exc:
        raise NotImplementedError(f"bfloat16 needs ml_dtypes: {exc}") from None
    return np.dtype(ml_dtypes.bfloat16)


def _inputs(cp, dtype, shape, seed, n=3):
    rng = np.random.default_rng(seed)
    dt = _dtype(cp, dtype)
    return [cp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dt))
            for _ in range(n)]


def _tflops(cp, fn, flops, reps=10):
    """Mean TFLOP/s of ``reps`` back-to-back calls, timed with CUDA events."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return flops / (cp.cuda.get_elapsed_time(start, stop) / reps) / 1e9


class FlashForwardGPU:
    """Forward on tensor cores (float16, bfloat16)."""

    # D = 256: the Hopper wgmma kernel's split-ring entry on sm_90 (mma.sync elsewhere).
    params = (sizes(["float16", "bfloat16"], ["float16"]), sizes([64, 128, 256], [128]),
              sizes([1024, 4096, 16384], [4096]), [False, True])
    param_names = ["dtype", "head_dim", "seq_len", "causal"]
    timeout = 120

    def setup(self, dtype, head_dim, seq_len, causal):
        cp = self.cp = _require_gpu()
        b, h = 16384 // seq_len, 2048 // head_dim
        self.q, self.k, self.v = _inputs(cp, dtype, (b, h, seq_len, head_dim), 0)
        self.causal = causal
        self.flops = 4.0 * b * h * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
        self.time_forward()  # compile and load the kernel outside the timing

    def _call(self):
        return xattn.flash_attention(self.q, self.k, self.v, causal=self.causal,
                                     backend="cupy")

    def time_forward(self, *params):
        self._call()
        self.cp.cuda.Device().synchronize()

    def track_tflops(self, *params):
        return _tflops(self.cp, self._call, self.flops)

    track_tflops.unit = "TFLOP/s"


class FlashBackwardGPU:
    """Backward kernels: dq by atomics (default) or by a separate pass (deterministic)."""

    params = (sizes(["float16", "bfloat16"], ["float16"]), sizes([64, 128], [128]), [4096],
              [False, True], [False, True])
    param_names = ["dtype", "head_dim", "seq_len", "causal", "deterministic"]
    timeout = 120

    def setup(self, dtype, head_dim, seq_len, causal, deterministic):
        cp = self.cp = _require_gpu()
        b, h = 16384 // seq_len, 2048 // head_dim
        self.q, self.k, self.v, self.dout = _inputs(cp, dtype, (b, h, seq_len, head_dim), 1,
                                                    n=4)
        self.causal, self.deterministic = causal, deterministic
        self.out, self.lse = xattn.flash_attention(self.q, self.k, self.v, causal=causal,
                                                   return_lse=True, backend="cupy")
        self.flops = 10.0 * b * h * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
        self.time_backward()  # raises NotImplementedError (skip) without a backward kernel

    def _call(self):
        return xattn.flash_attention_backward(
            self.dout, self.q, self.k, self.v, self.out, self.lse, causal=self.causal,
            deterministic=self.deterministic, backend="cupy")

    def time_backward(self, *params):
        self._call()
        self.cp.cuda.Device().synchronize()

    def track_tflops(self, *params):
        return _tflops(self.cp, self._call, self.flops)

    track_tflops.unit = "TFLOP/s"


class FlashFloat32GPU:
    """float32 forward per kernel-table entry: the strict SIMT kernel, 3xTF32 (float32 accuracy
    on tensor cores, what ``auto`` picks) and TF32 (``allow_tf32=True``)."""

    params = (sizes([64, 128], [64]), ["cupy.simt", "cupy.tf32x3", "cupy.tf32"], [False, True])
    param_names = ["head_dim", "kernel", "causal"]
    timeout = 120

    def setup(self, head_dim, kernel, causal):
        cp = self.cp = _require_gpu()
        b, h, s = 4, 2048 // head_dim, 4096
        self.q, self.k, self.v = _inputs(cp, "float32", (b, h, s, head_dim), 2)
        self.causal, self.kernel = causal, kernel
        self.allow_tf32 = kernel == "cupy.tf32"
        self.flops = 4.0 * b * h * s * s * head_dim * (0.5 if causal else 1.0)
        self.time_forward()

    def _call(self):
        return xattn.flash_attention(self.q, self.k, self.v, causal=self.causal,
                                     allow_tf32=self.allow_tf32, backend=self.kernel)

    def time_forward(self, *params):
        self._call()
        self.cp.cuda.Device().synchronize()

    def track_tflops(self, *params):
        return _tflops(self.cp, self._call, self.flops, reps=3)

    track_tflops.unit = "TFLOP/s"


class FlashFloat32BackwardGPU:
    """float32 backward per kernel-table entry: the strict SIMT kernel and 3xTF32 (float32
    accuracy on tensor cores, what ``auto`` picks), fed by the 3xTF32 forward."""

    params = (sizes([64, 128], [64]), ["cupy.simt", "cupy.tf32x3"], [False, True])
    param_names = ["head_dim", "kernel", "causal"]
    timeout = 120

    def setup(self, head_dim, kernel, causal):
        cp = self.cp = _require_gpu()
        b, h, s = 4, 2048 // head_dim, 4096
        self.q, self.k, self.v, self.dout = _inputs(cp, "float32", (b, h, s, head_dim), 5, n=4)
        self.causal, self.kernel = causal, kernel
        self.out, self.lse = xattn.flash_attention(self.q, self.k, self.v, causal=causal,
                                                   return_lse=True, backend="cupy")
        self.flops = 10.0 * b * h * s * s * head_dim * (0.5 if causal else 1.0)
        self.time_backward()

    def _call(self):
        return xattn.flash_attention_backward(self.dout, self.q, self.k, self.v, self.out,
                                              self.lse, causal=self.causal, backend=self.kernel)

    def time_backward(self, *params):
        self._call()
        self.cp.cuda.Device().synchronize()

    def track_tflops(self, *params):
        return _tflops(self.cp, self._call, self.flops, reps=3)

    track_tflops.unit = "TFLOP/s"


class FlashWindowGPU:
    """Sliding window S=65536 +-256, D=64, 32 heads, float16: cost proportional to the window."""

    params = ([False, True],)
    param_names = ["backward"]
    timeout = 120

    def setup(self, backward):
        cp = self.cp = _require_gpu()
        s, w, h, d = 65536, 256, 32, 64
        self.q, self.k, self.v, self.dout = _inputs(cp, "float16", (1, h, s, d), 3, n=4)
        self.window = (w, w)
        pairs = sum(min(s, i + w + 1) - max(0, i - w) for i in range(s))
        self.flops = 4.0 * h * d * pairs * (2.5 if backward else 1.0)
        self.backward = backward
        if backward:
            self.out, self.lse = xattn.flash_attention(self.q, self.k, self.v,
                                                       window=self.window, return_lse=True,
                                                       backend="cupy")
        self.time_window()

    def _call(self):
        if self.backward:
            return xattn.flash_attention_backward(self.dout, self.q, self.k, self.v, self.out,
                                                  self.lse, window=self.window,
                                                  backend="cupy")
        return xattn.flash_attention(self.q, self.k, self.v, window=self.window,
                                     backend="cupy")

    def time_window(self, *params):
        self._call()
        self.cp.cuda.Device().synchronize()

    def track_tflops(self, *params):
        return _tflops(self.cp, self._call, self.flops)

    track_tflops.unit = "TFLOP/s"
