"""Long-sequence genomics with xattn: FASTA -> k-mer embedding -> RoPE -> window + global layers.

One process, on the CPU (NumPy, float32) or on one GPU (CuPy arrays end to end, float16
attention)::

    python examples/genomics/pipeline.py --length 100000
    python examples/genomics/pipeline.py --length 1000000 --device gpu

Four MPI ranks, the sequence split in contiguous quarters, the sliding window computed by
ring attention (only neighbouring ranks exchange keys and values); with ``--device gpu`` each
rank uses GPU ``rank % (number of GPUs)`` and MPI moves the blocks through host memory::

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
``OUT/summary.json`` has the time of each layer (on the GPU: after a device synchronisation).

On the GPU the residual stream, layer norm and projections stay float32; queries, keys and
values are ``--dtype`` (default float16: the tensor-core kernels take 16-bit inputs). Arrays
reach the host only after the last layer (the plot, the summary), and under ``--mpi`` where
ranks exchange blocks and global tokens (explicit copies through host memory).
"""

from __future__ import annotations

import argparse
import importlib.util
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

# Queries per progress step (and per projection / window-attention call) by device: the GPU
# wants large calls (one launch covers ~10^5 queries), the CPU small ones (bounded memory).
DEFAULT_CHUNK = {"cpu": 8192, "gpu": 131072}
# On the GPU the global queries (a few dozen) over all keys are cut into pieces of this many
# keys, run as one batched call and merged by lse: as one problem they would occupy one
# thread block per head for the whole sweep over 10^6 keys.
GLOBAL_SPAN = {"cpu": None, "gpu": 16384}


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
    p.add_argument("--chunk", type=int, default=None,
                   help="queries per progress step (default 8192 on cpu, 131072 on gpu)")
    p.add_argument("--beta", type=float, default=30.0,
                   help="score of an exact k-mer match in the repeat-matching head")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: NumPy arrays; gpu: CuPy arrays (one GPU per rank, shared if "
                        "there are more ranks than GPUs)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="queries, keys and values (default float32 on cpu, float16 on gpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="genomics_out")
    p.add_argument("--mpi", action="store_true", help="ring attention over MPI.COMM_WORLD")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.window <= 0 or args.window % 2:
        p.error(f"--window must be even and positive, got {args.window}")
    if args.d_model % args.heads or (args.d_model // args.heads) % 2:
        p.error("--d-model / --heads must be an even head dim")
    if args.chunk is None:
        args.chunk = DEFAULT_CHUNK[args.device]
    if args.chunk <= 0:
        p.error(f"--chunk must be positive, got {args.chunk}")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "float16"
    return args


def array_module(x):
    """NumPy or CuPy, whichever holds ``x`` (CuPy is imported only when it does)."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def attention_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Device:
    """Where this rank's arrays live: NumPy on the CPU, or CuPy on one GPU."""

    def __init__(self, name, rank):
        self.name = name
        self.xp = np
        self.label = "cpu"
        if name == "gpu":
            import cupy

            ngpu = cupy.cuda.runtime.getDeviceCount()
            if ngpu == 0:
                raise RuntimeError("--device gpu: no CUDA device is visible")
            dev = cupy.cuda.Device(rank % ngpu)  # ranks beyond the GPU count share them
            dev.use()
            self.xp = cupy
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            name_ = props["name"]
            self.label = name_.decode() if isinstance(name_, bytes) else str(name_)

    def sync(self):
        """Wait for the device's queued work, so that a clock read after it means something."""
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()

    @staticmethod
    def to_host(x):
        return x if isinstance(x, np.ndarray) else x.get()


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

    def allgather_arrays(self, arrays):
        """Every rank's tuple of ``arrays``, as a list by rank, in the arrays' namespace. MPI
        moves host memory: device arrays are copied to the host and back, here and only
        here."""
        if self.comm is None:
            return [tuple(arrays)]
        xp = array_module(arrays[0])
        host = tuple(Device.to_host(a) for a in arrays)
        return [tuple(xp.asarray(a) for a in part) for part in self.comm.allgather(host)]

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


def embed(codes, start, stop, weights, xp=np):
    """k-mer embedding of positions ``[start, stop)``: each position sees the ``K`` bases
    starting at it, one-hot and centred (an unknown base is all zeros). ``codes`` and
    ``weights`` are host arrays, uploaded here once when ``xp`` is CuPy."""
    kmer = weights.shape[0]
    ctx = xp.asarray(codes[start:stop + kmer - 1])  # shorter at the end of the sequence
    onehot = (ctx[:, None] == xp.arange(4, dtype=ctx.dtype)).astype(xp.float32)
    onehot -= xp.float32(0.25) * (ctx < 4).astype(xp.float32)[:, None]
    w = xp.asarray(weights)
    n = stop - start
    x = xp.zeros((n, weights.shape[2]), xp.float32)
    for m in range(kmer):
        part = onehot[m:m + n]
        x[: part.shape[0]] += part @ w[m]
    return x


def layer_norm(x):
    xp = array_module(x)
    mu = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + 1e-5)


def window_attention_chunked(q, k, v, half, chunk, progress):
    """Sliding window (``half`` keys each side) of one whole sequence, ``chunk`` queries at a
    time: each call sees its queries' keys only, with the window shifted to the call's
    bottom-right alignment."""
    xp = array_module(q)
    s = q.shape[-2]
    out = xp.empty(q.shape[:-1] + (v.shape[-1],), q.dtype)
    lse = xp.empty(q.shape[:-1], xp.float32)
    for c0 in range(0, s, chunk):
        c1 = min(c0 + chunk, s)
        a, b = max(0, c0 - half), min(s, c1 + half)
        e = b - c1  # keys past the last query: flash aligns the last query with the last key
        o, ls = xattn.flash_attention(q[:, c0:c1], k[:, a:b], v[:, a:b],
                                      window=(half + e, half - e), return_lse=True)
        out[:, c0:c1], lse[:, c0:c1] = o, ls
        progress(1)
    return out, lse


def attend_all_keys(q, k, v, span=None):
    """``(out, lse)`` of a few queries ``q (H, G, D)`` over every key of ``k, v (H, S, D)``.

    With ``span`` the keys are cut into pieces of ``span`` (plus a remainder), computed as
    one batched call (the queries repeated per piece) and merged through their lse in float32:
    the same result, with ``S / span`` times more independent work for the GPU.
    """
    s = k.shape[-2]
    n = s // span if span else 0
    if n < 2:
        return xattn.flash_attention(q, k, v, return_lse=True)
    xp = array_module(q)
    h, g, d = q.shape
    head = n * span
    kb = k[:, :head].reshape(h, n, span, k.shape[-1])
    vb = v[:, :head].reshape(h, n, span, v.shape[-1])
    qb = xp.ascontiguousarray(xp.broadcast_to(q[:, None], (h, n, g, d)))
    o, lse = xattn.flash_attention(qb, kb, vb, return_lse=True)  # (H, n, G, Dv), (H, n, G)
    top = lse.max(axis=1)  # finite: every piece has keys and nothing is masked
    w = xp.exp(lse - top[:, None])
    total = w.sum(axis=1)
    out = (w[..., None] * o.astype(xp.float32)).sum(axis=1) / total[..., None]
    out, out_lse = out.astype(q.dtype), top + xp.log(total)
    if head < s:
        rest = xattn.flash_attention(q, k[:, head:], v[:, head:], return_lse=True)
        out, out_lse = merge_attention(out, out_lse, *rest)
    return out, out_lse


class GlobalTokens:
    """The global tokens as one rank sees them, from positions only (built once, reused by
    every layer): which local rows are global tokens, where each sits among all of them, and
    which global keys lie outside each local query's window."""

    def __init__(self, pos, global_pos, half, xp=np):
        gpos = np.sort(np.asarray(global_pos))
        rows = np.flatnonzero(np.isin(pos, gpos))
        self.count = len(gpos)
        self.rows = xp.asarray(rows)
        self.order = xp.asarray(np.searchsorted(gpos, pos[rows]))
        # Global keys inside a query's window are already in the window part.
        dist = xp.abs(xp.asarray(pos)[:, None] - xp.asarray(gpos)[None, :])
        self.outside = (dist > half)[None]


def window_global_attention(q, k, v, pos, global_pos, half, ranks, *, window_fn,
                            tokens=None, span=None):
    """Longformer attention of this rank's queries: ``window_fn`` gives the sliding window
    part; the global tokens' keys (outside each query's window) and the global queries (over
    every key, on every rank) are added by merging log-sum-exps.

    ``pos`` are the global positions of this rank's rows, ``global_pos`` all global tokens
    (sorted, held by the ranks in rank order); ``tokens`` their :class:`GlobalTokens`, built
    here when not given; ``span`` see :func:`attend_all_keys`.
    """
    if tokens is None:
        tokens = GlobalTokens(pos, global_pos, half, array_module(q))
    out, lse = window_fn(q, k, v)
    if not tokens.count:
        return out, lse
    mine = tokens.rows
    # Keys, values and queries of the global tokens, from the ranks that hold them.
    parts = ranks.allgather_arrays((k[:, mine], v[:, mine], q[:, mine]))
    kg, vg, qg = (array_module(q).concatenate([p[i] for p in parts], axis=1) for i in range(3))
    og, lg = xattn.flash_attention(q, kg, vg, mask=tokens.outside, return_lse=True)
    out, lse = merge_attention(out, lse, og, lg)
    # Global queries see every key: each rank's keys in turn, merged.
    parts = ranks.allgather_arrays(attend_all_keys(qg, k, v, span))
    full_o, full_l = parts[0]
    for o, ls in parts[1:]:
        full_o, full_l = merge_attention(full_o, full_l, o, ls)
    out[:, mine], lse[:, mine] = full_o[:, tokens.order], full_l[:, tokens.order]
    return out, lse


def warm_up(xp, dtype, h, dh):
    """Compile the attention kernels and the array library's own kernels on tiny inputs, so
    that layer 1's time excludes the compilation."""
    tiny = xp.zeros((h, 64, dh), dtype)
    o, ls = xattn.flash_attention(tiny, tiny, tiny, window=(8, 8), return_lse=True)
    og, lg = xattn.flash_attention(tiny, tiny[:, :4], tiny[:, :4],
                                   mask=xp.ones((1, 64, 4), bool), return_lse=True)
    merge_attention(o, ls, og, lg)
    attend_all_keys(tiny[:, :4], tiny, tiny, 16)
    cos, sin = xattn.rotary_cos_sin(64, dh, xp=xp)
    xattn.apply_rotary(tiny, cos, sin)
    layer_norm(xp.ones((64, 8), xp.float32))


def run(args):
    ranks = Ranks(args.mpi)
    dev = Device(args.device, ranks.rank)
    xp, dtype = dev.xp, attention_dtype(args.dtype)
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
    # The weights go to the device once, before the layers.
    layers = [{n: xp.asarray(a) for n, a in w.items()} for w in model.layers]
    probe = xp.asarray(model.probe)
    tokens = GlobalTokens(pos, global_pos, half, xp)
    span = GLOBAL_SPAN[args.device]

    def progress(n):  # the progress bar's, once it exists (the closures below look it up)
        return None

    if ranks.comm is None:
        def window_fn(q, k, v):
            return window_attention_chunked(q, k, v, half, args.chunk, progress)
    else:
        def window_fn(q, k, v):
            o, ls = ring_attention(q, k, v, ranks.comm, window=(half, half), return_lse=True)
            progress(1)
            return o, ls

    def layer(x, w, first):
        """One pre-norm attention layer with a residual over this rank's rows; returns the new
        ``x`` and, for the ``first`` layer, the k-mer head's off-self attention mass."""
        q = xp.empty((h, shard, dh), dtype)
        k, v = xp.empty_like(q), xp.empty_like(q)
        for c0 in range(0, shard, args.chunk):
            c1 = min(c0 + args.chunk, shard)
            xn = layer_norm(x[c0:c1])
            for name_, dest in (("q", q), ("k", k), ("v", v)):
                dest[:, c0:c1] = (xn @ w[name_]).reshape(c1 - c0, h, dh).transpose(1, 0, 2)
            if first:  # the repeat-matching head: tied projections, no position encoding
                u = xn @ probe
                u *= math.sqrt(args.beta * math.sqrt(dh)) / xp.linalg.norm(u, axis=-1,
                                                                          keepdims=True)
                q[0, c0:c1], k[0, c0:c1] = u, u
            progress(1)
        rope = slice(1, h) if first else slice(0, h)
        q[rope] = xattn.apply_rotary(q[rope], cos, sin)
        k[rope] = xattn.apply_rotary(k[rope], cos, sin)
        o, lse = window_global_attention(q, k, v, pos, global_pos, half, ranks,
                                         window_fn=window_fn, tokens=tokens, span=span)
        mass = None
        if first:
            self_score = (q[0].astype(xp.float32) * k[0].astype(xp.float32)).sum(-1)
            # weight on keys other than the query itself
            mass = 1.0 - xp.exp(self_score / math.sqrt(dh) - lse[0])
        o = o.transpose(1, 0, 2).reshape(shard, h * dh).astype(xp.float32, copy=False)
        return x + o @ w["o"], mass

    t0 = time.perf_counter()  # compile the kernels first, so that layer 1's time excludes it
    warm_up(xp, dtype, h, dh)
    dev.sync()
    t_warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = embed(codes, start, stop, model.embed, xp)
    cos, sin = xattn.rotary_cos_sin(pos, dh, xp=xp)
    dev.sync()
    t_embed = time.perf_counter() - t0
    if xp is not np:
        # CuPy compiles each elementwise and reduction kernel on its first use (then caches it
        # on disk): one whole layer, untimed and discarded, does them all.
        t0 = time.perf_counter()
        layer(x, layers[0], True)
        dev.sync()
        ranks.barrier()
        t_warmup += time.perf_counter() - t0

    n_attn = math.ceil(shard / args.chunk) if ranks.comm is None else 1
    n_proj = math.ceil(shard / args.chunk)
    bar = None
    if ranks.rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.layers * (n_proj + n_attn), unit="chunk",
                   desc=f"{name}: {s:,} bp on {ranks.size} rank(s)")
        progress = bar.update  # noqa: F811 - the closures above now report to the bar

    times, cpu_times, mass = [], [], None
    for li, w in enumerate(layers):
        if bar is not None:
            bar.set_postfix_str(f"layer {li + 1}/{args.layers}")
        ranks.barrier()
        dev.sync()
        t0, c0_cpu = time.perf_counter(), time.process_time()
        x, m = layer(x, w, li == 0)
        mass = m if li == 0 else mass
        dev.sync()
        ranks.barrier()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0_cpu)
    if bar is not None:
        bar.close()

    # The results leave the device here, after the last layer.
    mass = np.concatenate(ranks.allgather(Device.to_host(mass)))
    final = np.concatenate(ranks.allgather(Device.to_host(x)))
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
        "device": dev.label, "dtype": str(dtype),
        "warmup_s": t_warmup, "embed_s": t_embed, "layer_s": times,
        # CPU seconds of this process (all its threads), a figure less sensitive than the
        # wall time to other jobs sharing the machine.
        "layer_cpu_s_rank0": cpu_times,
        "mass_in_repeats": float(mass[inside].mean()) if inside.any() else None,
        "mass_elsewhere": float(mass[~inside].mean()),
        "repeats": [{"kind": r.kind, "unit": r.unit, "starts": list(r.starts)} for r in repeats],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no attention_mass.png (pip install matplotlib)",
              file=sys.stderr)
    else:
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
        per_layer = ", ".join(f"{t:.3f}" for t in summary["layer_s"])
        cpu = ", ".join(f"{t:.2f}" for t in summary["layer_cpu_s_rank0"])
        print(f"{summary['bases']:,} bp, {summary['ranks']} rank(s) on {summary['device']} "
              f"({summary['dtype']}): embedding "
              f"{summary['embed_s']:.2f} s, layers {per_layer} s (CPU time of rank 0: {cpu} s); "
              "off-self attention mass "
              f"{summary['mass_in_repeats']} in planted repeats, "
              f"{summary['mass_elsewhere']:.4f} elsewhere")


if __name__ == "__main__":
    main()
