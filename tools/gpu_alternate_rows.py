"""Forward causal D=128 S=4096 fp16/bf16 (``backend="cupy"``) of the xattn tree at argv[1],
beside torch SDPA in the same process; one ``ROW`` line per timing (two per dtype).

Usage, to compare two trees by alternating processes (``git archive OLD | tar -x -C old``)::

    for i in 1 2 3; do
        python3 tools/gpu_alternate_rows.py . new; python3 tools/gpu_alternate_rows.py old old
    done
"""

import importlib
import sys


def main(tree, tag):
    sys.path.insert(0, tree)
    cp = importlib.import_module("cupy")
    np = importlib.import_module("numpy")
    torch = importlib.import_module("torch")
    bf16 = np.dtype(importlib.import_module("ml_dtypes").bfloat16)
    sdpa = importlib.import_module("torch.nn.functional").scaled_dot_product_attention
    do_bench = importlib.import_module("triton.testing").do_bench
    xattn = importlib.import_module("xattn")

    b, h, s, d = 4, 16, 4096, 128
    flops = 4 * b * h * s * s * d / 2
    for dt in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dt) for _ in range(3))
        if dt == torch.bfloat16:
            xs = [cp.asarray(t.view(torch.int16)).view(bf16) for t in (q, k, v)]
        else:
            xs = [cp.asarray(t) for t in (q, k, v)]

        def fx(xs=xs):
            return xattn.flash_attention(*xs, causal=True, backend="cupy")

        def ft(q=q, k=k, v=v):
            return sdpa(q, k, v, is_causal=True)

        for _ in range(2):
            tx = do_bench(fx, warmup=25, rep=200, return_mode="median")
            tt = do_bench(ft, warmup=25, rep=200, return_mode="median")
            print(f"ROW {tag} {str(dt)[6:]} xattn {flops / tx / 1e9:.1f} torch "
                  f"{flops / tt / 1e9:.1f} ratio {tt / tx:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
