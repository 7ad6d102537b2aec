"""flex_attention beside PyTorch FlexAttention (torch.compile) on the same GPU.

Same score_mod (ALiBi) and mask_mod (causal) written for each library, same dtype; correctness
against torch's result first, then CUDA-event timings (median). Every dtype runs xattn's
tensor-core kernel with the functions compiled in (``backend="cupy"``): float16/bfloat16 on
``mma.sync`` f16/bf16, float32 in 3xTF32 (float32 accuracy). torch runs float32 at its default
precision: TF32 is not enabled for it (``torch.backends.cuda.matmul.allow_tf32`` is printed).
FLOPs: causal, half of ``4 B H S^2 D``. Prints a table with the card name, xattn / torch as
the ratio.

    python3 benchmarks/gpu_flex.py [--seq 4096 16384] [--dtype float16] [--backward]
                                   [--json FILE]
    python3 benchmarks/gpu_flex.py --dtype float32 --seq 16384 --numba-seq 2048 --allow-tf32

The issue's rows (#13): ``--dtype float16 --seq 16384`` and ``--dtype float32 --seq 16384``
(D = 64, 16 heads). ``--numba-seq`` also times the SIMT route (``backend="numba_cuda"``, the
float32 route before the tensor-core kernel) at those lengths, ``--allow-tf32`` xattn's plain
TF32 flex (``allow_tf32=True``) beside it; both in a second table.

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
                    help="xattn backend (default: cupy, the tensor-core kernels)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--backward", action="store_true",
                    help="time the backward pass (flex_attention_backward vs torch autograd)")
    ap.add_argument("--numba-seq", type=int, nargs="*", default=[],
                    help="also time backend='numba_cuda' (SIMT) at these lengths")
    ap.add_argument("--allow-tf32", action="store_true",
                    help="float32: also time xattn's plain TF32 flex (allow_tf32=True)")
    args = ap.parse_args()
    backend = args.backend or "cupy"

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
    rows, anchors = [], {}  # anchors: S -> (torch's output, torch ms, xattn ms)
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
        anchors[S] = (cp.from_dlpack(ref.float().contiguous()), ms_t, ms_x)
    what = "flex attention backward" if args.backward else "flex attention"
    print(f"\n{what} {args.dtype} (xattn backend={backend}), causal mask_mod + ALiBi "
          f"score_mod, H={H} D={D}, card: {card}, torch float32 matmul: {_torch_fp32(torch)}")
    print(f"{'S':>6} {'xattn ms':>9} {'TFLOP/s':>8} {'torch ms':>9} {'TFLOP/s':>8} "
          f"{'ratio':>6} {'max err':>8}")
    for S, mx, fx, mt, ft, err in rows:
        print(f"{S:>6} {mx:9.2f} {fx:8.2f} {mt:9.2f} {ft:8.2f} {fx / ft:6.2f} {err:8.1e}")
    extra = _extra_rows(args, xattn, cp, torch, time_ms, alibi, causal, tdtype, tol, backend,
                        anchors)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"card": card, "dtype": args.dtype, "backend": backend, "heads": H,
                       "pass": "backward" if args.backward else "forward",
                       "head_dim": D, "rows": [dict(zip(
                           ("seq", "xattn_ms", "xattn_tflops", "torch_ms", "torch_tflops",
                            "max_err"), r, strict=True)) for r in rows],
                       "torch_fp32_matmul": _torch_fp32(torch),
                       "extra": extra}, f, indent=1)
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


def _torch_fp32(torch):
    """torch's float32 matmul setting as this run leaves it (never changed here)."""
    try:
        return str(torch.backends.cuda.matmul.fp32_precision)
    except AttributeError:
        return "allow_tf32=" + str(torch.backends.cuda.matmul.allow_tf32)


def _extra_rows(args, xattn, cp, torch, time_ms, alibi, causal, tdtype, tol, backend, anchors):
    """The second table: xattn's SIMT route at ``--numba-seq`` and plain TF32 (``--allow-tf32``)
    against the main table's torch run at the same length, or, at a length the main table did
    not run (no second torch compile), against xattn's own ``backend`` route timed there; a
    route that cannot run here is reported, not fatal."""
    H, D = args.heads, args.head_dim
    jobs = [(S, "numba_cuda", False) for S in args.numba_seq]
    if args.allow_tf32 and args.dtype == "float32":
        jobs += [(S, "cupy", True) for S in args.seq]
    out_rows = []
    for S, be, tf32 in jobs:
        label = "cupy TF32" if tf32 else be
        rng = np.random.default_rng(S)
        q, k, v = (rng.standard_normal((1, H, S, D), dtype=np.float32) for _ in range(3))
        qc, kc, vc = (cp.from_dlpack(torch.from_numpy(x).cuda().to(tdtype)) for x in (q, k, v))
        flops = 4 * H * S * S * D / 2

        def run(qc=qc, kc=kc, vc=vc, be=be, tf32=tf32):
            return xattn.flex_attention(qc, kc, vc, score_mod=alibi, mask_mod=causal,
                                        backend=be, allow_tf32=tf32)

        def main_route(qc=qc, kc=kc, vc=vc):
            return xattn.flex_attention(qc, kc, vc, score_mod=alibi, mask_mod=causal,
                                        backend=backend)

        try:
            out = run()
            if S in anchors:
                ref, ms_ref, _ = anchors[S]
                against = "torch"
            else:
                ref = main_route().astype(cp.float32)
                ms_ref = time_ms(main_route, cp.cuda.Device().synchronize)
                against = f"xattn {backend}"
            err = float(cp.abs(out.astype(cp.float32) - ref).max())
            # TF32 rounds inputs and weights to a 10-bit mantissa: a looser bound.
            limit = 2e-2 if tf32 else tol
            assert err < limit, f"{label} S={S}: max error {err} vs {against}"
            ms_x = time_ms(run, cp.cuda.Device().synchronize)
            out_rows.append({"seq": S, "route": label, "xattn_ms": ms_x,
                             "xattn_tflops": flops / ms_x / 1e9, "against": against,
                             "against_ms": ms_ref, "against_tflops": flops / ms_ref / 1e9,
                             "max_err": err})
        except Exception as exc:  # noqa: BLE001 - report the route, keep the main table
            out_rows.append({"seq": S, "route": label, "error": f"{type(exc).__name__}: {exc}"})
    if not out_rows:
        return out_rows
    print(f"\nother xattn routes, {args.dtype}, same problem")
    print(f"{'S':>6} {'route':>11} {'ms':>9} {'TFLOP/s':>8} {'against':>12} {'ms':>9} "
          f"{'TFLOP/s':>8} {'ratio':>6} {'max err':>8}")
    for r in out_rows:
        if "error" in r:
            print(f"{r['seq']:>6} {r['route']:>11} unavailable: {r['error'][:120]}")
            continue
        print(f"{r['seq']:>6} {r['route']:>11} {r['xattn_ms']:9.2f} {r['xattn_tflops']:8.2f} "
              f"{r['against']:>12} {r['against_ms']:9.2f} {r['against_tflops']:8.2f} "
              f"{r['xattn_tflops'] / r['against_tflops']:6.2f} {r['max_err']:8.1e}")
    return out_rows

if __name__ == "__main__":
    main()
