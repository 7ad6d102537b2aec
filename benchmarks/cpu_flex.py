"""CPU flex attention against flash attention on the same problems, in one run.

1. ALiBi as a ``score_mod`` (slopes in ``score_mod_args``) with a causal ``mask_mod``, against
   ``flash_attention(causal=True, alibi_slopes=...)``; S=4096, H=8, D=64, float32.
2. A sliding window of +-256 keys as a ``mask_mod`` at S=16384, in useful GFLOP/s (visible
   pairs only), against dense ``flash_attention`` (no mask) at the same size.

Each case is checked against flash before it is timed; times are the median of ``--repeat``
runs after one warm-up (which also compiles and derives the block mask). Usage::

    PYTHONPATH=. python benchmarks/cpu_flex.py [--heads 8] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import xattn


def _time(fn, repeat):
    fn()  # warm-up: compile, block mask
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def alibi(score, b, h, q_idx, kv_idx, slopes):
    return score - slopes[h] * abs(q_idx - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


WINDOW = 256


def sliding(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= WINDOW


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="S=1024 and S=4096 (a smoke run)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    H, D = a.heads, 64
    rows = []

    s1 = 1024 if a.quick else 4096
    q, k, v = (rng.standard_normal((1, H, s1, D), dtype=np.float32) for _ in range(3))
    slopes = xattn.alibi_slopes(H)
    flex = lambda: xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal,  # noqa: E731
                                        score_mod_args=(slopes,))
    flash = lambda: xattn.flash_attention(q, k, v, causal=True, alibi_slopes=slopes)  # noqa: E731
    err = float(np.abs(flex() - flash()).max())
    assert err < 1e-4, err
    flops = 2.0 * H * s1 * s1 * D
    t_flash, t_flex = _time(flash, a.repeat), _time(flex, a.repeat)
    rows.append((f"causal+ALiBi S={s1}", "flash(causal, alibi_slopes)", flops / t_flash / 1e9,
                 flops / t_flex / 1e9))

    s2 = 4096 if a.quick else 16384
    q, k, v = (rng.standard_normal((1, H, s2, D), dtype=np.float32) for _ in range(3))
    i = np.arange(s2)
    visible = float(np.sum(np.minimum(i + WINDOW, s2 - 1) - np.maximum(i - WINDOW, 0) + 1))
    win = lambda: xattn.flex_attention(q, k, v, mask_mod=sliding)  # noqa: E731
    ref = xattn.flash_attention(q[:, :1], k[:, :1], v[:, :1], window=(WINDOW, WINDOW))
    err = float(np.abs(win()[:, :1] - ref).max())
    assert err < 1e-4, err
    dense = lambda: xattn.flash_attention(q, k, v)  # noqa: E731
    t_dense = _time(dense, 1 if not a.quick else a.repeat)
    t_win = _time(win, a.repeat)
    t_fwin = _time(lambda: xattn.flash_attention(q, k, v, window=(WINDOW, WINDOW)), a.repeat)
    useful = 4.0 * H * visible * D
    rows.append((f"window +-{WINDOW} S={s2}", "dense flash", 4.0 * H * s2 * s2 * D / t_dense / 1e9,
                 useful / t_win / 1e9))
    rows.append((f"window +-{WINDOW} S={s2}", "flash(window=)", useful / t_fwin / 1e9,
                 useful / t_win / 1e9))

    print(f"{'case':<22} {'anchor':<28} {'anchor GFLOP/s':>15} {'flex GFLOP/s':>13} {'ratio':>6}")
    for case, anchor, ga, gf in rows:
        print(f"{case:<22} {anchor:<28} {ga:>15.1f} {gf:>13.1f} {gf / ga:>6.2f}")


if __name__ == "__main__":
    main()
