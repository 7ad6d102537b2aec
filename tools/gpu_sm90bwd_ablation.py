"""Ablation of the wgmma backward's main kernel as it was at commit 7e8229b (dQ added with
per-thread ``red.global.add.v2.f32``): which part of a step costs what. Each variant switches
one part off by patching the kernel text (wrong gradients, timing only): the dQ atomics, the
dQ product, both, or exp2. B=4 H=16 S=4096 fp16, kernel alone (CUDA events, median of 10),
torch SDPA's backward in the same process. The figures it gave on an H100 are in
docs/dev/perf_gpu.rst ("Seventh GPU session"); they led to the bulk dQ reductions.

Usage (the kernel of that commit; on later kernels the patterns are gone and it stops):
``git checkout 7e8229b -- xattn && python3 tools/gpu_sm90bwd_ablation.py`` (the whole
package of that commit, as it ran).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RED = "red_add2(row + n * 8, dq[n * 4 + hr * 2], dq[n * 4 + hr * 2 + 1]);"
GDQ = "gemm_dq<T, D>(dq, opaque(sS), kt, wg);"
EXP = "s[n * 4 + hr * 2 + e] = ex2(fmaf(x, sl2, -lb[ql]));"
NO_RED = (RED, "if (dq[n * 4 + hr * 2] == 1234.5f) " + RED)  # never true: no atomics
VARIANTS = {
    "base": [],
    "no red.add": [NO_RED],
    "no dQ product": [(GDQ, "")],
    "neither": [(GDQ, ""), NO_RED],
    "no exp2": [(EXP, "s[n * 4 + hr * 2 + e] = fmaf(x, sl2, -lb[ql]);")],
}
B, H, S = 4, 16, 4096


def _median_event_ms(make_events, elapsed, f, reps=10, warmup=3):
    """Median milliseconds of f between two events (CuPy's or torch's, on the null stream)."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        a, b = make_events()
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(elapsed(a, b))
    return float(np.median(times))


def main():
    import cupy as cp
    import torch

    import xattn
    from xattn._backends.cupy_ import flash_bwd_sm90 as m
    from xattn._backends.cupy_ import instances
    from xattn._backends.cupy_._compile import _allow_smem, cubin_path, load_module, source

    text0 = source("flash_bwd_sm90.cu")
    jobs = []
    for d in (64, 128):
        inst = instances.bwd_sm90("f16", d)
        for name, subs in VARIANTS.items():
            text = text0
            for old, new in subs:
                if old not in text:
                    raise SystemExit(f"pattern not in the kernel (run at commit 7e8229b): {old}")
                text = text.replace(old, new)
            jobs.append((d, name, inst.name, text, inst.defines))
    t0 = time.time()
    with ThreadPoolExecutor(10) as ex:
        paths = list(ex.map(lambda j: cubin_path(j[3], j[4]), jobs))
    print(f"compiled {len(jobs)} variants in {time.time() - t0:.0f} s", flush=True)

    rng = np.random.default_rng(0)
    data, res = {}, {}

    def flops(d, causal):
        return 2.5 * 4 * B * H * S * S * d * (0.5 if causal else 1.0)

    for (d, name, entry, _, _), path in zip(jobs, paths, strict=True):
        fn = load_module(path).get_function(entry)
        _allow_smem(fn, m.smem_bytes(d))
        for causal in (False, True):
            if (d, causal) not in data:
                q, k, v, do = (cp.asarray(rng.standard_normal((B, H, S, d), dtype=np.float32))
                               .astype(cp.float16) for _ in range(4))
                out, lse = xattn.flash_attention(q, k, v, causal=causal, return_lse=True)
                delta = cp.sum(out.astype(cp.float32) * do.astype(cp.float32), axis=-1)
                data[d, causal] = (q, k, v, do, lse.reshape(B, H, S).astype(cp.float32), delta)
            q, k, v, do, lse, delta = data[d, causal]
            acc = cp.zeros((B, H, S, d), cp.float32)
            args = (q, k, v, do, lse, delta, acc, cp.empty_like(k), cp.empty_like(v),
                    np.int32(H), np.int32(1), np.int32(S), np.int32(S),
                    np.float32(d ** -0.5), np.int32(causal))

            def run(fn=fn, args=args, d=d):
                fn(((S + 127) // 128, H, B), (256,), args, shared_mem=m.smem_bytes(d))

            ms = _median_event_ms(lambda: (cp.cuda.Event(), cp.cuda.Event()),
                                  cp.cuda.get_elapsed_time, run)
            res[d, causal, name] = flops(d, causal) / ms / 1e9
            print(f"D={d} causal={causal} {name}: {ms:.3f} ms "
                  f"{res[d, causal, name]:.0f} TFLOP/s", flush=True)

    for (d, causal), (q, k, v, do, _, _) in data.items():
        tq, tk, tv, tdo = (torch.as_tensor(x, device="cuda") for x in (q, k, v, do))
        tq, tk, tv = (x.detach().requires_grad_() for x in (tq, tk, tv))
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        def grad(o=o, tq=tq, tk=tk, tv=tv, tdo=tdo):
            torch.autograd.grad(o, (tq, tk, tv), tdo, retain_graph=True)

        ms = _median_event_ms(
            lambda: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)),
            lambda a, b: a.elapsed_time(b), grad)
        res[d, causal, "torch SDPA"] = flops(d, causal) / ms / 1e9

    names = [*VARIANTS, "torch SDPA"]
    print("\n| D | causal | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for d, causal in data:
        cells = " | ".join(f"{res[d, causal, n]:.0f}" for n in names)
        print(f"| {d} | {causal} | {cells} |")


if __name__ == "__main__":
    main()
