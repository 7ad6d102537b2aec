"""flex_attention beside PyTorch FlexAttention (torch.compile) on the same GPU.

Same score_mod (ALiBi) and mask_mod (causal) written for each library, same dtype; correctness
against torch's result first, then CUDA-event timings (median). float32 runs xattn's Numba CUDA
SIMT kernel (``backend="numba_cuda"``), float16/bfloat16 the tensor-core kernel with the
functions compiled in (``backend="cupy"``). FLOPs: causal, half of ``4 B H S^2 D``. Prints a
table with the card name, xattn / torch as the ratio.

    python3 benchmarks/gpu_flex.py [--seq 4096 16384] [--dtype float16] [--backward]
                                   [--json FILE]

The issue's row (#13): ``--dtype float16 --seq 16384`` (D = 64, 16 heads).

``--backward`` times the gradient instead: ``flex_attention_backward`` (tensor cores for
16-bit inputs) against ``torch.autograd.grad`` through the compiled FlexAttention (its
backward kernel only: the graph is kept, the forward is not re-run), after checking dq, dk, dv
against torch's. FLOPs: 2.5x the forward's (causal halves them).
"""

import argparse
import math
import statistics

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backend", default=None,
                    help="xattn backend (default: cupy for 16-bit, numba_cuda for float32)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--backward", action="store_true",
                    help="time the backward pass (flex_attention_backward vs torch autograd)")
    args = ap.parse_args()
    backend = args.backend or ("numba_cuda" if args.dtype == "float32" else "cupy")

    import cupy as cp
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import xattn

    card = torch.cuda.get_device_name()
    H, D = args.heads, args.head_dim
    slopes_np = xattn.alibi_slopes(H, dtype=np.float32)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes_np[h] * abs(q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    slopes_t = torch.from_numpy(slopes_np).cuda()

    def t_alibi(score, b, h, q_idx, kv_idx):
        return score - slopes_t[h] * (q_idx - kv_idx).abs()

    def t_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    compiled = torch.compile(flex_attention)

    def time_ms(fn, sync):
        for _ in range(2):
            fn()
        sync()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(args.repeats):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        return statistics.median(times)

    tdtype = {"float32": torch.float32, "float16": torch.float16,
              "bfloat16": torch.bfloat16}[args.dtype]
    # 16-bit outputs: rounding of the output alone is ~1e-3 (fp16) / 8e-3 (bf16).
    tol = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}[args.dtype]
    rows = []
    for S in args.seq:
        if args.backward:
            rows.append(_backward_row(args, S, backend, alibi, causal, t_alibi, t_causal,
                                      compiled, time_ms, tdtype))
            continue
        rng = np.random.default_rng(S)
        q, k, v = (rng.standard_normal((1, H, S, D), dtype=np.float32) for _ in range(3))
        qt, kt, vt = (torch.from_numpy(x).cuda().to(tdtype) for x in (q, k, v))
        # The same 16-bit values for both libraries (through DLPack, no host round trip).
        qc, kc, vc = (cp.from_dlpack(x) for x in (qt, kt, vt))
        bm = create_block_mask(t_causal, 1, H, S, S, device="cuda")
        ref = compiled(qt, kt, vt, score_mod=t_alibi, block_mask=bm)
        out = xattn.flex_attention(qc, kc, vc, score_mod=alibi, mask_mod=causal,
                                   backend=backend)
        err = float(cp.abs(out.astype(cp.float32)
                           - cp.from_dlpack(ref.float().contiguous())).max())
        assert err < tol, f"S={S}: xattn vs torch max error {err}"
        flops = 4 * H * S * S * D / 2  # causal: half the pairs
        ms_x = time_ms(
            lambda qc=qc, kc=kc, vc=vc: xattn.flex_attention(
                qc, kc, vc, score_mod=alibi, mask_mod=causal, backend=backend
            ),
            cp.cuda.Device().synchronize,
        )
        ms_t = time_ms(
            lambda qt=qt, kt=kt, vt=vt, bm=bm: compiled(
                qt, kt, vt, score_mod=t_alibi, block_mask=bm
            ),
            torch.cuda.synchronize,
        )
        rows.append((S, ms_x, flops / ms_x / 1e9, ms_t, flops / ms_t / 1e9, err))
    what = "flex attention backward" if args.backward else "flex attention"
    print(f"\n{what} {args.dtype} (xattn backend={backend}), causal mask_mod + ALiBi "
          f"score_mod, H={H} D={D}, card: {card}")
    print(f"{'S':>6} {'xattn ms':>9} {'TFLOP/s':>8} {'torch ms':>9} {'TFLOP/s':>8} "
          f"{'ratio':>6} {'max err':>8}")
    for S, mx, fx, mt, ft, err in rows:
        print(f"{S:>6} {mx:9.2f} {fx:8.2f} {mt:9.2f} {ft:8.2f} {fx / ft:6.2f} {err:8.1e}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"card": card, "dtype": args.dtype, "backend": backend, "heads": H,
                       "pass": "backward" if args.backward else "forward",
                       "head_dim": D, "rows": [dict(zip(
                           ("seq", "xattn_ms", "xattn_tflops", "torch_ms", "torch_tflops",
                            "max_err"), r, strict=True)) for r in rows]}, f, indent=1)
    assert all(math.isfinite(r[1]) for r in rows)


def _backward_row(args, S, backend, alibi, causal, t_alibi, t_causal, compiled, time_ms,
                  tdtype):
    """``(S, xattn ms, TFLOP/s, torch ms, TFLOP/s, max relative error)`` of the backward."""
    import cupy as cp
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import xattn

    H, D = args.heads, args.head_dim
    rng = np.random.default_rng(S + 1)
    q, k, v, do = (rng.standard_normal((1, H, S, D), dtype=np.float32) for _ in range(4))
    qt, kt, vt, dot = (torch.from_numpy(x).cuda().to(tdtype) for x in (q, k, v, do))
    # The same 16-bit values for both libraries (DLPack, before torch tracks gradients).
    qc, kc, vc, doc = (cp.from_dlpack(x) for x in (qt, kt, vt, dot))
    for x in (qt, kt, vt):
        x.requires_grad_(True)
    bm = create_block_mask(t_causal, 1, H, S, S, device="cuda")
    out_t = compiled(qt, kt, vt, score_mod=t_alibi, block_mask=bm)
    ref = torch.autograd.grad(out_t, (qt, kt, vt), dot, retain_graph=True)
    print(f"S={S}: torch compiled forward + backward ran", flush=True)
    out, lse = xattn.flex_attention(qc, kc, vc, score_mod=alibi, mask_mod=causal,
                                    return_lse=True, backend=backend)

    def run():
        return xattn.flex_attention_backward(doc, qc, kc, vc, out, lse, score_mod=alibi,
                                             mask_mod=causal, backend=backend)

    got = run()
    err = 0.0
    for g, r in zip(got[:3], ref, strict=True):
        rc = cp.from_dlpack(r.detach().float().contiguous())
        err = max(err, float(cp.abs(g.astype(cp.float32) - rc).max() / cp.abs(rc).max()))
    tol = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}[args.dtype]
    assert err < tol, f"S={S}: xattn vs torch gradients, max relative error {err}"
    print(f"S={S}: xattn gradients match torch's (max relative error {err:.1e})", flush=True)
    flops = 2.5 * 4 * H * S * S * D / 2  # backward = 2.5x forward; causal: half the pairs
    ms_x = time_ms(run, cp.cuda.Device().synchronize)
    ms_t = time_ms(lambda: torch.autograd.grad(out_t, (qt, kt, vt), dot, retain_graph=True),
                   torch.cuda.synchronize)
    return (S, ms_x, flops / ms_x / 1e9, ms_t, flops / ms_t / 1e9, err)


if __name__ == "__main__":
    main()
