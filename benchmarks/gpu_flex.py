"""flex_attention (Numba CUDA, fp32 SIMT) beside PyTorch FlexAttention on the same GPU.

Same score_mod (ALiBi) and mask_mod (causal) written for each library; correctness against
torch's result first, then CUDA-event timings (median). Prints a table with the card name.

    python3 benchmarks/gpu_flex.py [--seq 4096 16384]
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
    args = ap.parse_args()

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

    rows = []
    for S in args.seq:
        rng = np.random.default_rng(S)
        q, k, v = (rng.standard_normal((1, H, S, D), dtype=np.float32) for _ in range(3))
        qc, kc, vc = (cp.asarray(x) for x in (q, k, v))
        qt, kt, vt = (torch.from_numpy(x).cuda() for x in (q, k, v))
        bm = create_block_mask(t_causal, 1, H, S, S, device="cuda")
        ref = compiled(qt, kt, vt, score_mod=t_alibi, block_mask=bm)
        out = xattn.flex_attention(qc, kc, vc, score_mod=alibi, mask_mod=causal)
        err = float(cp.abs(out - cp.asarray(ref.cpu().numpy())).max())
        assert err < 1e-3, f"S={S}: xattn vs torch max error {err}"
        flops = 4 * H * S * S * D / 2  # causal: half the pairs
        ms_x = time_ms(
            lambda qc=qc, kc=kc, vc=vc: xattn.flex_attention(
                qc, kc, vc, score_mod=alibi, mask_mod=causal
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
    print(f"\nflex attention fp32, causal + ALiBi, H={H} D={D}, card: {card}")
    print(f"{'S':>6} {'xattn ms':>9} {'TFLOP/s':>8} {'torch ms':>9} {'TFLOP/s':>8} "
          f"{'ratio':>6} {'max err':>8}")
    for S, mx, fx, mt, ft, err in rows:
        print(f"{S:>6} {mx:9.2f} {fx:8.2f} {mt:9.2f} {ft:8.2f} {fx / ft:6.2f} {err:8.1e}")
    assert all(math.isfinite(r[1]) for r in rows)


if __name__ == "__main__":
    main()
