"""Long-sequence genomics with xattn: FASTA -> k-mer embedding -> RoPE -> window + global layers.

One process::

    python examples/genomics/pipeline.py --length 100000

Four MPI ranks, the sequence split in contiguous quarters, the sliding window computed by
ring attention (only neighbouring ranks exchange keys and values)::

    mpiexec -n 4 python examples/genomics/pipeline.py --length 100000 --mpi

Input: ``--fasta FILE`` (first record), or by default a synthetic genome with planted repeats
(see ``fasta.py``), written to ``OUT/genome.fa`` and read back. Model (random weights: the
point is the data path): a convolution over the one-hot bases (a linear embedding of each
position's k-mer), then ``--layers`` attention layers, each a sliding window of
``--window`` keys (``window // 2`` each side) plus global tokens every ``--global-every``
bases (Longformer semantics: global queries see every key, every query sees the global keys),
with RoPE on every head but one: head 0 of the first layer ties its query and key projections
and has no position encoding, so it attends to positions whose k-mer context equals the
query's. Its attention mass away from the query itself is plotted along the sequence
(``OUT/attention_mass.png``): it is ~0 in unique sequence and rises on the planted repeats.
``OUT/summary.json`` has the time of each layer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import xattn
from xattn.distributed import merge_attention, ring_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fasta import encode, read_fasta, synthetic_genome, write_fasta  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=100_000, help="bases (synthetic genome)")
    p.add_argument("--fasta", help="read this FASTA file (first record) instead")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kmer", type=int, default=24, help="bases seen by the embedding")
    p.add_argument("--window", type=int, default=4096, help="keys per query (even)")
    p.add_argument("--global-every", type=int, default=16384, help="a global token every N")
    p.add_argument("--chunk", type=int, default=8192, help="queries per progress step")
    p.add_argument("--beta", type=float, default=30.0,
                   help="score of an exact k-mer match in the repeat-matching head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="genomics_out")
    p.add_argument("--mpi", action="store_true", help="ring attention over MPI.COMM_WORLD")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.window <= 0 or args.window % 2:
        p.error(f"--window must be even and positive, got {args.window}")
    if args.d_model % args.heads or (args.d_model // args.heads) % 2:
        p.error("--d-model / --heads must be an even head dim")
    return args


class Ranks:
    """Who holds which bases: one process, or contiguous shards over MPI ranks."""

    def __init__(self, use_mpi):
        self.comm = None
        self.rank, self.size = 0, 1
        if use_mpi:
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allgather(self, x):
        return [x] if self.comm is None else self.comm.allgather(x)

    def barrier(self):
        if self.comm is not None:
            self.comm.Barrier()


class Model:
    """Random weights, drawn from ``seed`` (identical on every rank)."""

    def __init__(self, args):
        rng = np.random.default_rng(args.seed)
        d, h = args.d_model, args.heads
        self.heads, self.head_dim = h, d // h
        self.embed = (rng.standard_normal((args.kmer, 4, d)) / math.sqrt(args.kmer * 0.75))
        self.layers = []
        for _ in range(args.layers):
            w = {n: (rng.standard_normal((d, d)) / math.sqrt(d)).astype(np.float32)
                 for n in ("q", "k", "v", "o")}
            self.layers.append(w)
        self.probe = (rng.standard_normal((d, self.head_dim)) / math.sqrt(d)).astype(np.float32)
        self.embed = self.embed.astype(np.float32)


def embed(codes, start, stop, weights):
    """k-mer embedding of positions ``[start, stop)``: each position sees the ``K`` bases
    starting at it, one-hot and centred (an unknown base is all zeros)."""
    kmer = weights.shape[0]
    ctx = codes[start:stop + kmer - 1]
    onehot = np.zeros((len(ctx), 4), np.float32)  # shorter at the end of the sequence
    known = ctx < 4
    onehot[np.flatnonzero(known), ctx[known]] = 1.0
    onehot[known] -= 0.25
    n = stop - start
    x = np.zeros((n, weights.shape[2]), np.float32)
    for m in range(kmer):
        part = onehot[m:m + n]
        x[: len(part)] += part @ weights[m]
    return x


def layer_norm(x):
    mu = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5)


def window_attention_chunked(q, k, v, half, chunk, progress):
    """Sliding window (``half`` keys each side) of one whole sequence, ``chunk`` queries at a
    time: each call sees its queries' keys only, with the window shifted to the call's
    bottom-right alignment."""
    s = q.shape[-2]
    out = np.empty(q.shape[:-1] + (v.shape[-1],), q.dtype)
    lse = np.empty(q.shape[:-1], np.float32)
    for c0 in range(0, s, chunk):
        c1 = min(c0 + chunk, s)
        a, b = max(0, c0 - half), min(s, c1 + half)
        e = b - c1  # keys past the last query: flash aligns the last query with the last key
        o, ls = xattn.flash_attention(q[:, c0:c1], k[:, a:b], v[:, a:b],
                                      window=(half + e, half - e), return_lse=True)
        out[:, c0:c1], lse[:, c0:c1] = o, ls
        progress(1)
    return out, lse


def window_global_attention(q, k, v, pos, global_pos, half, ranks, *, window_fn):
    """Longformer attention of this rank's queries: ``window_fn`` gives the sliding window
    part; the global tokens' keys (outside each query's window) and the global queries (over
    every key, on every rank) are added by merging log-sum-exps.

    ``pos`` are the global positions of this rank's rows, ``global_pos`` all global tokens.
    """
    out, lse = window_fn(q, k, v)
    mine = np.isin(pos, global_pos)
    # Keys and values of the global tokens, from the ranks that hold them.
    parts = ranks.allgather((pos[mine], k[:, mine], v[:, mine], q[:, mine]))
    gpos = np.concatenate([p[0] for p in parts])
    kg, vg, qg = (np.concatenate([p[i] for p in parts], axis=1) for i in (1, 2, 3))
    if len(gpos):
        outside = np.abs(pos[:, None] - gpos[None, :]) > half  # not already in the window
        og, lg = xattn.flash_attention(q, kg, vg, mask=outside[None], return_lse=True)
        out, lse = merge_attention(out, lse, og, lg)
        # Global queries see every key: each rank's keys in turn, merged.
        partial = xattn.flash_attention(qg, k, v, return_lse=True)
        parts = ranks.allgather(partial)
        full_o, full_l = parts[0]
        for o, ls in parts[1:]:
            full_o, full_l = merge_attention(full_o, full_l, o, ls)
        rows = np.flatnonzero(mine)
        order = np.searchsorted(gpos, pos[rows])
        out[:, rows], lse[:, rows] = full_o[:, order], full_l[:, order]
    return out, lse


def run(args):
    ranks = Ranks(args.mpi)
    out_dir = Path(args.out)
    repeats = []
    if args.fasta:
        name, seq = read_fasta(args.fasta)[0]
    else:
        path = out_dir / "genome.fa"
        if ranks.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            seq, repeats = synthetic_genome(args.length, seed=args.seed,
                                            reach=args.window // 2 - 100)
            write_fasta(path, [("synthetic", seq)])
        repeats = ranks.allgather(repeats)[0]
        ranks.barrier()
        name, seq = read_fasta(path)[0]
    codes = encode(seq)
    s = len(codes) - len(codes) % ranks.size  # equal shards: drop the last few bases
    shard = s // ranks.size
    start, stop = ranks.rank * shard, (ranks.rank + 1) * shard
    pos = np.arange(start, stop)
    global_pos = np.arange(0, s, args.global_every)
    half = args.window // 2
    model = Model(args)
    h, dh = model.heads, model.head_dim

    n_attn = math.ceil(shard / args.chunk) if ranks.comm is None else 1
    n_proj = math.ceil(shard / args.chunk)
    bar = None
    if ranks.rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.layers * (n_proj + n_attn), unit="chunk",
                   desc=f"{name}: {s:,} bp on {ranks.size} rank(s)")
    progress = bar.update if bar is not None else (lambda n: None)

    if ranks.comm is None:
        def window_fn(q, k, v):
            return window_attention_chunked(q, k, v, half, args.chunk, progress)
    else:
        def window_fn(q, k, v):
            o, ls = ring_attention(q, k, v, ranks.comm, window=(half, half), return_lse=True)
            progress(1)
            return o, ls

    t0 = time.perf_counter()  # compile the kernels first, so that layer 1's time excludes it
    tiny = np.zeros((h, 64, dh), np.float32)
    xattn.flash_attention(tiny, tiny, tiny, window=(8, 8))
    xattn.flash_attention(tiny, tiny[:, :4], tiny[:, :4], mask=np.ones((1, 64, 4), bool))
    t_warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = embed(codes, start, stop, model.embed)
    t_embed = time.perf_counter() - t0
    cos, sin = xattn.rotary_cos_sin(pos, dh)
    times, cpu_times, mass = [], [], None
    for li, w in enumerate(model.layers):
        if bar is not None:
            bar.set_postfix_str(f"layer {li + 1}/{args.layers}")
        t0, c0_cpu = time.perf_counter(), time.process_time()
        q = np.empty((h, shard, dh), np.float32)
        k, v = np.empty_like(q), np.empty_like(q)
        for c0 in range(0, shard, args.chunk):
            c1 = min(c0 + args.chunk, shard)
            xn = layer_norm(x[c0:c1])
            for name_, dest in (("q", q), ("k", k), ("v", v)):
                dest[:, c0:c1] = (xn @ w[name_]).reshape(c1 - c0, h, dh).transpose(1, 0, 2)
            if li == 0:  # the repeat-matching head: tied projections, no position encoding
                u = xn @ model.probe
                u *= np.sqrt(args.beta * math.sqrt(dh)) / np.linalg.norm(u, axis=-1,
                                                                        keepdims=True)
                q[0, c0:c1], k[0, c0:c1] = u, u
            progress(1)
        rope = slice(1, h) if li == 0 else slice(0, h)
        q[rope] = xattn.apply_rotary(q[rope], cos, sin)
        k[rope] = xattn.apply_rotary(k[rope], cos, sin)
        o, lse = window_global_attention(q, k, v, pos, global_pos, half, ranks,
                                         window_fn=window_fn)
        if li == 0:
            self_score = (q[0] * k[0]).sum(-1) / math.sqrt(dh)
            mass = 1.0 - np.exp(self_score - lse[0])  # weight on keys other than itself
        x = x + o.transpose(1, 0, 2).reshape(shard, h * dh) @ w["o"]
        ranks.barrier()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0_cpu)
    if bar is not None:
        bar.close()

    mass = np.concatenate(ranks.allgather(mass))
    final = np.concatenate(ranks.allgather(x))
    if ranks.rank != 0:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "attention_mass.npy", mass)
    np.save(out_dir / "hidden.npy", final)
    inside = np.zeros(s, bool)
    for r in repeats:
        for a, b in r.spans():
            inside[a:min(b, s)] = True
    summary = {
        "record": name, "bases": int(s), "ranks": ranks.size, "layers": args.layers,
        "window": args.window, "global_tokens": len(global_pos), "heads": h, "head_dim": dh,
        "warmup_s": t_warmup, "embed_s": t_embed, "layer_s": times,
        # CPU seconds of this process (all its threads), a figure less sensitive than the
        # wall time to other jobs sharing the machine.
        "layer_cpu_s_rank0": cpu_times,
        "mass_in_repeats": float(mass[inside].mean()) if inside.any() else None,
        "mass_elsewhere": float(mass[~inside].mean()),
        "repeats": [{"kind": r.kind, "unit": r.unit, "starts": list(r.starts)} for r in repeats],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(out_dir / "attention_mass.png", mass, repeats, summary)
    return summary


def plot(path, mass, repeats, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.2))
    kb = np.arange(len(mass)) / 1000
    ax.plot(kb, mass, lw=0.6, color="0.2", label="attention mass on other positions")
    for i, r in enumerate(repeats):
        for a, b in r.spans():
            ax.axvspan(a / 1000, b / 1000, color="C1" if r.kind == "tandem" else "C0",
                       alpha=0.3, lw=0, label=r.kind if (a, b) == r.spans()[0] and i < 2
                       else None)
    ax.set_xlabel("position (kb)")
    ax.set_ylabel("off-self attention mass")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['record']}: {summary['bases']:,} bp, window {summary['window']}, "
                 f"layer 1 head 0 (k-mer matching), {summary['ranks']} rank(s)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    summary = run(parse_args(argv))
    if summary is not None:
        per_layer = ", ".join(f"{t:.2f}" for t in summary["layer_s"])
        cpu = ", ".join(f"{t:.2f}" for t in summary["layer_cpu_s_rank0"])
        print(f"{summary['bases']:,} bp, {summary['ranks']} rank(s): embedding "
              f"{summary['embed_s']:.2f} s, layers {per_layer} s (CPU time of rank 0: {cpu} s); "
              "off-self attention mass "
              f"{summary['mass_in_repeats']} in planted repeats, "
              f"{summary['mass_elsewhere']:.4f} elsewhere")


if __name__ == "__main__":
    main()
