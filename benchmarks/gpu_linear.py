"""GPU: causal linear attention on CuPy beside a plain PyTorch version of the same formula.

The issue-4 problem: causal ``linear_attention`` (elu + 1), S = 1,048,576, H = 1, D = 64,
float32, on CuPy arrays, and in the same run a plain PyTorch implementation of the same
chunked formula (chunks of 64: the masked quadratic form inside a chunk, an exclusive cumsum of
chunk states across chunks) on the very same device buffers (shared through DLPack). Both are
checked against the float64 formula on a prefix (a causal prefix depends only on itself) and
against each other on the whole sequence before being timed. Times are CUDA-event medians
after warm-up. Extra rows (not in the issue's target): float16 inputs, non-causal, and the
causal Performer.

Needs only numpy, cupy and torch (CUDA). Run from the repository root::

    python3 benchmarks/gpu_linear.py            # writes $OUT/gpu_linear.json when $OUT is set
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import cupy as cp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import xattn  # noqa: E402

S, H, D = 1 << 20, 1, 64
CHUNK = 64
EPS = 1e-6
WARMUP, REPEAT = 3, 20


def torch_linear_causal(q, k, v, chunk=CHUNK, eps=EPS):
    """Chunked causal elu+1 linear attention in plain PyTorch.

    q, k, v are (H, S, D) CUDA tensors with S a multiple of ``chunk``.
    """
    h, s, d = q.shape
    dv = v.shape[-1]
    n = s // chunk
    fq = (torch.nn.functional.elu(q) + 1).view(h, n, chunk, d)
    fk = (torch.nn.functional.elu(k) + 1).view(h, n, chunk, d)
    vv = v.view(h, n, chunk, dv)
    kv = fk.transpose(-1, -2) @ vv  # (h, n, d, dv) chunk states
    z = fk.sum(dim=-2)  # (h, n, d)
    zero_kv = torch.zeros_like(kv[:, :1])
    zero_z = torch.zeros_like(z[:, :1])
    kv_before = torch.cat([zero_kv, kv.cumsum(dim=1)[:, :-1]], dim=1)
    z_before = torch.cat([zero_z, z.cumsum(dim=1)[:, :-1]], dim=1)
    mask = torch.ones(chunk, chunk, device=q.device, dtype=q.dtype).tril()
    a = (fq @ fk.transpose(-1, -2)) * mask
    num = a @ vv + fq @ kv_before
    den = a.sum(dim=-1) + (fq * z_before.unsqueeze(-2)).sum(dim=-1)
    return (num / (den.unsqueeze(-1) + eps)).reshape(h, s, dv)


def prefix_reference(q, k, v, n=2048):
    """float64 formula for the first ``n`` positions of head 0 (host)."""
    qs, ks, vs = (cp.asnumpy(x[0, :n]).astype(np.float64) for x in (q, k, v))

    def phi(x):
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))

    w = np.tril(phi(qs) @ phi(ks).T)
    return (w @ vs) / (w.sum(axis=-1, keepdims=True) + EPS)


def time_cupy(fn):
    for _ in range(WARMUP):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(REPEAT):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def time_torch(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEAT):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def max_err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def main():
    torch.backends.cuda.matmul.allow_tf32 = False  # same arithmetic as CuPy's fp32 cuBLAS
    card = torch.cuda.get_device_name()
    print(f"card: {card}  (cupy {cp.__version__}, torch {torch.__version__}, numpy "
          f"{np.__version__})")
    rng = cp.random.default_rng(0)
    q, k, v = (rng.standard_normal((H, S, D), dtype=cp.float32) for _ in range(3))
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    rows = []
    results = {"card": card, "S": S, "H": H, "D": D, "rows": rows}

    # --- correctness before timing -------------------------------------------------------------
    out = xattn.linear_attention(q, k, v, causal=True)
    tout = torch_linear_causal(tq, tk, tv)
    torch.cuda.synchronize()
    ref = prefix_reference(q, k, v)
    err_x = max_err(cp.asnumpy(out[0, : ref.shape[0]]), ref)
    err_t = max_err(tout[0, : ref.shape[0]].cpu().numpy(), ref)
    err_xt = float(cp.abs(out - cp.from_dlpack(tout)).max())
    finite = bool(cp.isfinite(out).all())
    print(f"check: prefix(2048) vs float64: xattn {err_x:.2e}, torch {err_t:.2e}; "
          f"xattn vs torch over all S: {err_xt:.2e}; finite: {finite}")
    assert finite and err_x < 1e-4 and err_t < 1e-4 and err_xt < 1e-3, "correctness check failed"
    results["check"] = dict(prefix_err_xattn=err_x, prefix_err_torch=err_t, xattn_vs_torch=err_xt)
    del out, tout

    flops = H * S * (2 * CHUNK * (2 * D + 1) + 4 * D * (D + 1))

    def row(name, ms_x, ms_t=None):
        r = dict(name=name, xattn_ms=ms_x, torch_ms=ms_t,
                 ratio=None if ms_t is None else ms_x / ms_t)
        rows.append(r)
        return r

    # --- the problem ----------------------------------------------------------------
    ms_x = time_cupy(lambda: xattn.linear_attention(q, k, v, causal=True))
    ms_t = time_torch(lambda: torch_linear_causal(tq, tk, tv))
    row("causal elu fp32 (issue target)", ms_x, ms_t)

    # --- extra rows -------------------------------------------------------------------------------
    q16, k16, v16 = (x.astype(cp.float16) for x in (q, k, v))
    out16 = xattn.linear_attention(q16, k16, v16, causal=True)
    assert bool(cp.isfinite(out16).all()), "fp16 output not finite"
    row("causal elu fp16 in/out", time_cupy(lambda: xattn.linear_attention(q16, k16, v16,
                                                                           causal=True)))
    row("non-causal elu fp32", time_cupy(lambda: xattn.linear_attention(q, k, v)))
    w = xattn.performer_projection(xattn.linear.default_num_features(D), D, seed=0, xp=cp)
    outp = xattn.performer_attention(q, k, v, causal=True, projection=w)
    assert bool(cp.isfinite(outp).all()), "performer output not finite"
    row(f"causal performer m={w.shape[0]} fp32",
        time_cupy(lambda: xattn.performer_attention(q, k, v, causal=True, projection=w)))

    print(f"\ncausal linear attention, H={H} S={S} D={D}; CUDA-event median of {REPEAT} "
          f"after {WARMUP} warm-up; card {card}")
    print(f"{'case':40s} {'xattn ms':>10s} {'torch ms':>10s} {'xattn/torch':>12s}")
    for r in rows:
        t = "" if r["torch_ms"] is None else f"{r['torch_ms']:.3f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['name']:40s} {r['xattn_ms']:10.3f} {t:>10s} {ratio:>12s}")
    print(f"(issue target: {flops / ms_x / 1e9:.1f} TFLOP/s xattn, "
          f"{flops / ms_t / 1e9:.1f} TFLOP/s torch, chunk-64 flop count)")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gpu_linear.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
