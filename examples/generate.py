"""Greedy generation with a small random-weight decoder: RoPE, GQA and a KV cache.

A Llama-shaped transformer (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU
MLP, an output projection) with random weights, so the tokens mean nothing: the point is the
inference loop. The prompt goes through :func:`xattn.flash_attention` once (prefill) and
its keys and values into one :class:`xattn.KVCache` per layer; each new token then costs
one :meth:`KVCache.append` and one :func:`xattn.decode_attention` per layer, reading the
cache instead of recomputing the prefix. Prints tokens per second.

Usage::

    python examples/generate.py                      # NumPy on the CPU
    python examples/generate.py --device gpu         # CuPy on the current GPU
    python examples/generate.py --tokens 64 --batch 4 --page-size 16 --check

``--check`` recomputes every generated token's logits by attention over the whole sequence
(no cache) and stops with an error if greedy decoding would have chosen another token.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import numpy as np

try:
    import xattn
except ImportError:  # run from a clone without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import xattn


class Decoder:
    """Random weights of a small decoder-only transformer, in namespace ``xp``."""

    def __init__(self, xp, *, vocab, layers, heads, kv_heads, head_dim, seed=0):
        self.xp = xp
        self.vocab, self.layers = vocab, layers
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.dim = dim = heads * head_dim
        rng = np.random.default_rng(seed)

        def w(*shape):
            return xp.asarray(rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[0]))

        self.embed = xp.asarray(rng.standard_normal((vocab, dim), dtype=np.float32))
        self.unembed = w(dim, vocab)
        self.blocks = [
            dict(wq=w(dim, dim), wk=w(dim, kv_heads * head_dim), wv=w(dim, kv_heads * head_dim),
                 wo=w(dim, dim), w_gate=w(dim, 4 * dim), w_up=w(dim, 4 * dim),
                 w_down=w(4 * dim, dim))
            for _ in range(layers)
        ]

    def _norm(self, x):
        return x / self.xp.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-6)

    def _heads(self, x, n):
        """(B, S, n * D) -> (B, n, S, D)."""
        B, S, _ = x.shape
        return x.reshape(B, S, n, self.head_dim).transpose(0, 2, 1, 3)

    def _mlp(self, blk, x):
        gate = x @ blk["w_gate"]
        return ((gate / (1 + self.xp.exp(-gate))) * (x @ blk["w_up"])) @ blk["w_down"]

    def forward(self, tokens, attend):
        """Logits ``(B, S, vocab)`` of ``tokens`` ``(B, S)``; ``attend(layer, q, k, v)``
        returns the attention output ``(B, Hq, S, D)`` of raw (unrotated) q, k, v."""
        x = self.embed[tokens]
        B, S, _ = x.shape
        for i, blk in enumerate(self.blocks):
            h = self._norm(x)
            q = self._heads(h @ blk["wq"], self.heads)
            k = self._heads(h @ blk["wk"], self.kv_heads)
            v = self._heads(h @ blk["wv"], self.kv_heads)
            a = attend(i, q, k, v)
            x = x + a.transpose(0, 2, 1, 3).reshape(B, S, self.dim) @ blk["wo"]
            x = x + self._mlp(blk, self._norm(x))
        return self._norm(x) @ self.unembed


def generate(model, prompt, new_tokens, *, max_len, page_size=None):
    """Greedy continuation of ``prompt`` ``(B, P)``; returns ``(tokens (B, P + n), seconds
    per decode step)``."""
    xp = model.xp
    B, P = prompt.shape
    cos, sin = xattn.rotary_cos_sin(max_len, model.head_dim, dtype=np.float32, xp=xp)
    caches = [xattn.KVCache(B, model.kv_heads, max_len, model.head_dim, dtype=np.float32,
                            xp=xp, page_size=page_size) for _ in range(model.layers)]

    def prefill(i, q, k, v):
        # The prompt attends to itself with flash attention; its rotated keys fill the cache.
        qr = xattn.apply_rotary(q, cos[:P], sin[:P])
        kr = xattn.apply_rotary(k, cos[:P], sin[:P])
        caches[i].append(kr, v)
        return xattn.flash_attention(qr, kr, v, causal=True)

    def step(i, q, k, v):
        # One new token: its key is rotated at its position as it is stored, then q (rotated
        # at the same position) attends to everything the cache holds.
        caches[i].append(k, v, rotary=(cos, sin))
        return xattn.decode_attention(q, caches[i], rotary=(cos, sin))

    tokens = [prompt]
    logits = model.forward(prompt, prefill)
    nxt = logits[:, -1].argmax(axis=-1)
    times = []
    for _ in range(new_tokens):
        tokens.append(nxt[:, None])
        t0 = time.perf_counter()
        logits = model.forward(nxt[:, None], step)
        nxt = logits[:, -1].argmax(axis=-1)
        if xp.__name__ == "cupy":
            xp.cuda.get_current_stream().synchronize()
        times.append(time.perf_counter() - t0)
    return xp.concatenate(tokens, axis=1), times


def check(model, tokens, prompt_len, max_len):
    """Greedy choices recomputed without a cache: every token after the first generated one
    must be the argmax of the full-sequence logits at the position before it."""
    cos, sin = xattn.rotary_cos_sin(max_len, model.head_dim, dtype=np.float32, xp=model.xp)
    S = tokens.shape[1] - 1

    def full(i, q, k, v):
        return xattn.flash_attention(xattn.apply_rotary(q, cos[:S], sin[:S]),
                                     xattn.apply_rotary(k, cos[:S], sin[:S]), v, causal=True)

    logits = model.forward(tokens[:, :S], full)
    want = logits[:, prompt_len - 1:].argmax(axis=-1)
    got = tokens[:, prompt_len:]
    if not bool((want == got).all()):
        raise SystemExit("check failed: cached decoding chose other tokens than a full "
                         "recomputation")
    return int(got.size)


@contextlib.contextmanager
def _one_blas_thread(on):
    """BLAS held at one thread on the CPU. The model's matmuls are a few rows each: OpenBLAS
    threads cost more to wake than they save (measured here: 30 ms instead of 0.3 ms for a
    (2, 512) x (512, 2048) product with two threads on a busy machine), and they would compete
    with xattn's own thread pool."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        on = False
    if not on:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate per sequence")
    p.add_argument("--prompt", type=int, default=64, help="prompt length")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--check", action="store_true", help="verify against a full recomputation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.device == "gpu":
        import cupy as xp
    else:
        xp = np
    model = Decoder(xp, vocab=args.vocab, layers=args.layers, heads=args.heads,
                    kv_heads=args.kv_heads, head_dim=args.head_dim, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    prompt = xp.asarray(rng.integers(0, args.vocab, (args.batch, args.prompt)))
    max_len = args.prompt + args.tokens + 1
    with _one_blas_thread(args.device == "cpu"):
        tokens, times = generate(model, prompt, args.tokens, max_len=max_len,
                                 page_size=args.page_size)
    # The first step includes compilation of the CPU kernels (cached on disk afterwards).
    steady = times[1:] or times
    rate = args.batch / (sum(steady) / len(steady))
    print(f"{args.device}: batch {args.batch}, {args.layers} layers, {args.heads} query / "
          f"{args.kv_heads} kv heads of {args.head_dim}, prompt {args.prompt}")
    print(f"generated {args.tokens} tokens per sequence: {rate:.1f} tokens/s "
          f"({1e3 * sum(steady) / len(steady):.2f} ms per step)")
    print("first sequence:", " ".join(str(int(t)) for t in tokens[0, args.prompt:][:16]),
          "..." if args.tokens > 16 else "")
    if args.check:
        n = check(model, tokens, args.prompt, max_len)
        print(f"check: {n} greedy tokens equal a full recomputation without the cache")
    return tokens


if __name__ == "__main__":
    main()
