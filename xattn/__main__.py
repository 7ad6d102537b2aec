"""``python -m xattn``: run every implemented attention variant on one problem and compare them.

For each variant it prints the median time of a few calls, the throughput (useful GFLOP/s:
only visible query/key pairs count), the peak extra memory of one call and the largest absolute
error against the exact float64 result of :func:`xattn.testing.reference_attention` under the
same mask (or, for linear attention, against its own formula evaluated in float64).

Variants that other parts of xattn add later (sparse, linear) are picked up when they exist.
Run ``python -m xattn --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from typing import Any

import numpy as np

import xattn
from xattn import _backends
from xattn._array import bfloat16_dtype, is_cupy, validate_attention
from xattn._config import config_info, format_config
from xattn.testing import reference_attention, to_numpy

PROG = "python -m xattn"

# A variant is exact when it computes softmax attention under some mask; its error is measured
# against the float64 reference with that mask. Approximations say what they approximate.
VARIANT_HELP = {
    "standard": "standard_attention: the full score matrix, O(S^2) memory",
    "flash": "flash_attention, once per available backend of the device",
    "causal": "flash_attention(causal=True), bottom-right aligned",
    "window": "flash_attention(window=(L, R)): sliding window, see --window",
    "gqa": "flash_attention with fewer k/v heads (--kv-heads, default heads/4)",
    "alibi": "flash_attention(alibi_slopes=alibi_slopes(heads))",
    "softcap": "flash_attention(softcap=10.0): Gemma-2 style tanh capping",
    "block_sparse": "block_sparse_attention with BlockMask.documents: four packed documents",
    "longformer": "longformer_attention: band of window//2 each side + global token 0",
    "bigbird": "bigbird_attention: global, band and random key blocks (seed 0)",
    "flex": "flex_attention with ALiBi written as a Python score_mod (numba-compiled)",
    "linear": "linear_attention(feature_map='elu'): approximation, error vs its float64 formula",
    "performer": "performer_attention (FAVOR+, seed 0): error vs exact softmax attention",
}

# The xattn names a variant needs; a variant whose names are missing is not offered.
VARIANT_NEEDS = {
    "block_sparse": ("BlockMask", "block_sparse_attention"),
    "longformer": ("longformer_attention",),
    "bigbird": ("bigbird_attention", "BlockMask"),
    "flex": ("flex_attention",),
    "linear": ("linear_attention",),
    "performer": ("performer_attention",),
}

# Optional modules a variant needs, and the extra that installs them: without them the row is
# skipped with a one-line reason (a base install, numpy only, still runs the main job).
VARIANT_EXTRAS = {
    "flex": ("numba", ("numba", "threadpoolctl")),
}

SOFTCAP = 10.0


class UsageError(Exception):
    """A bad option: reported as one line with exit code 2."""


def missing_extra(name: str) -> str | None:
    """Why variant ``name`` cannot run here (an optional module is not installed), or None."""
    extra, modules = VARIANT_EXTRAS.get(name, (None, ()))
    missing = [m for m in modules if find_spec(m) is None]
    if not missing:
        return None
    return f"needs {' and '.join(missing)}: pip install 'xattn[{extra}]'"


def available_variants() -> list[str]:
    return [
        name
        for name in VARIANT_HELP
        if all(hasattr(xattn, attr) for attr in VARIANT_NEEDS.get(name, ()))
    ]


# ----------------------------------------------------------------------------- options


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _window_side(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 or -1 (unbounded), got {text!r}"
        ) from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or -1 (unbounded), got {value}")
    return None if value == -1 else value


def build_parser() -> argparse.ArgumentParser:
    offered = available_variants()
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run every implemented attention variant on one random problem and print, per\n"
            "variant: the median time of --repeats calls, throughput in useful GFLOP/s\n"
            "(4 * B * Hq * D * visible query/key pairs / time; n/a for linear attention),\n"
            "the peak extra memory of one call (tracemalloc on the CPU, CuPy's pool on the\n"
            "GPU; the output is not counted) and the max abs error against the exact float64\n"
            "result under the same mask."
        ),
        epilog=(
            "variants (those marked * are not in this version of xattn yet):\n"
            + "\n".join(
                f"{' ' if name in offered else '*'} {name:13s} {text}"
                for name, text in VARIANT_HELP.items()
            )
            + "\n\nexample: python -m xattn --seq-len 4096 --causal --variants flash,window"
        ),
    )
    p = parser.add_argument
    p("--seq-len", type=_positive_int, default=2048, metavar="S",
      help="sequence length of queries and keys (default 2048)")
    p("--heads", type=_positive_int, default=8, metavar="H",
      help="query heads (default 8)")
    p("--kv-heads", type=_positive_int, default=None, metavar="HKV",
      help="key/value heads of every variant (default: --heads, i.e. multi-head); the 'gqa' "
           "variant uses it when it is below --heads, else heads/4")
    p("--head-dim", type=_positive_int, default=64, metavar="D", help="head dimension (default 64)")
    p("--batch", type=_positive_int, default=1, metavar="B", help="batch size (default 1)")
    p("--dtype", choices=("float16", "bfloat16", "float32", "float64"), default="float32",
      help="input dtype (default float32; bfloat16 needs ml_dtypes)")
    p("--causal", action="store_true",
      help="make every variant causal (bottom-right aligned)")
    p("--window", nargs=2, type=_window_side, default=(256, 256), metavar=("L", "R"),
      help="window of the 'window' variant: query i sees keys i-L..i+R; -1 = unbounded "
           "(default 256 256)")
    p("--device", choices=("cpu", "gpu"), default="cpu",
      help="cpu: NumPy arrays (default); gpu: CuPy arrays on the current CUDA device")
    p("--repeats", type=_positive_int, default=None, metavar="N",
      help="timed calls per variant after one warm-up call; the median is shown (default 3 "
           "on the CPU, 20 on the GPU)")
    p("--variants", default=None, metavar="LIST",
      help="comma-separated variants to run (default: all available), e.g. flash,causal")
    p("--no-check", action="store_true",
      help="skip the float64 reference (it needs O(S^2) memory per head)")
    p("--json", default=None, metavar="PATH",
      help="also write the provenance, the problem and every row to PATH as JSON")
    return parser


@dataclass
class Config:
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    dtype: Any
    causal: bool
    window: tuple
    device: str
    repeats: int
    variants: list[str]
    check: bool
    json: str | None = None


def parse_args(argv) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    offered = available_variants()
    if args.variants is None:
        names = offered
    else:
        names = list(dict.fromkeys(n.strip() for n in args.variants.split(",") if n.strip()))
        if not names:
            parser.error("--variants: expected a comma-separated list of variant names")
        for n in names:
            if n not in VARIANT_HELP:
                parser.error(
                    f"--variants: unknown variant {n!r}; choose from {', '.join(VARIANT_HELP)}"
                )
            if n not in offered:
                needs = ", ".join(f"xattn.{a}" for a in VARIANT_NEEDS[n])
                parser.error(f"--variants: {n!r} is not available in this xattn (needs {needs})")
    if args.dtype == "bfloat16":
        dtype = bfloat16_dtype()
        if dtype is None:
            parser.error("--dtype bfloat16 needs ml_dtypes (pip install 'xattn[bf16]')")
    else:
        dtype = np.dtype(args.dtype)
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if args.heads % kv_heads:
        parser.error(f"--kv-heads: {kv_heads} does not divide --heads {args.heads}")
    return Config(
        batch=args.batch,
        heads=args.heads,
        seq_len=args.seq_len,
        head_dim=args.head_dim,
        dtype=dtype,
        causal=args.causal,
        window=tuple(args.window),
        device=args.device,
        kv_heads=kv_heads,
        repeats=args.repeats or (20 if args.device == "gpu" else 3),
        variants=names,
        check=not args.no_check,
        json=args.json,
    )


def get_namespace(device: str):
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError as exc:
        raise UsageError(
            f"--device gpu needs CuPy ({exc}); install the wheel for your CUDA, e.g. "
            "pip install 'xattn[cuda]' (CUDA 12) or 'xattn[cuda13]'"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError without a driver
        raise UsageError(f"--device gpu: CuPy finds no usable CUDA device ({exc})") from None
    if count < 1:
        raise UsageError("--device gpu: CuPy finds no CUDA device")
    return cupy


# ----------------------------------------------------------------------------- variants


@dataclass
class Case:
    """One row of the table: a call to time and the exact result to compare it with."""

    name: str
    backend: str | None  # None: what backend="auto" picks, recorded on the first call
    call: Callable[[], Any]
    pairs: int | None  # visible (query, key) pairs per head; None: not softmax attention
    reference: Callable[[], np.ndarray] | None
    versus: str
    skip: str | None = None  # why the row cannot run here (e.g. an extra not installed)


def band_pairs(sq: int, sk: int, causal: bool, window) -> int:
    """Visible (query, key) pairs per head under causal/window (bottom-right aligned)."""
    i = np.arange(sq, dtype=np.int64) + (sk - sq)
    lo = np.zeros(sq, dtype=np.int64)
    hi = np.full(sq, sk - 1, dtype=np.int64)
    if causal:
        hi = np.minimum(hi, i)
    if window is not None:
        left, right = window
        if left is not None:
            lo = np.maximum(lo, i - left)
        if right is not None:
            hi = np.minimum(hi, i + right)
    return int(np.clip(hi - lo + 1, 0, None).sum())


class Problem:
    """Random inputs on the chosen device and a cache of float64 references."""

    def __init__(self, cfg: Config, xp):
        self.cfg, self.xp = cfg, xp
        rng = np.random.default_rng(0)
        b, h, hkv, s, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.seq_len, cfg.head_dim

        def make(shape):
            host = rng.standard_normal(shape, dtype=np.float32).astype(cfg.dtype)
            return xp.asarray(host)

        self.q = make((b, h, s, d))
        self.k = make((b, hkv, s, d))
        self.v = make((b, hkv, s, d))
        if hkv < h:
            self.gqa_heads = hkv
        else:
            self.gqa_heads = max(1, h // 4)
            while h % self.gqa_heads:
                self.gqa_heads -= 1
        # GQA inputs: the first kv heads of k and v, copied so that they are contiguous.
        self.k_gqa = xp.ascontiguousarray(self.k[:, : self.gqa_heads])
        self.v_gqa = xp.ascontiguousarray(self.v[:, : self.gqa_heads])
        self._refs: dict = {}

    def reference(self, key, k=None, v=None, **options):
        """Float64 exact attention, one query head at a time to bound its memory."""
        if key in self._refs:
            return self._refs[key]
        k = self.k if k is None else k
        v = self.v if v is None else v
        hq, hkv = self.q.shape[1], k.shape[1]
        slopes = options.pop("alibi_slopes", None)
        outs = []
        for h in range(hq):
            kv = h // (hq // hkv)
            opts = dict(options)
            if slopes is not None:
                opts["alibi_slopes"] = to_numpy(slopes)[h : h + 1]
            out, _, _ = reference_attention(
                self.q[:, h : h + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], **opts
            )
            outs.append(out)
        self._refs[key] = np.concatenate(outs, axis=1)
        return self._refs[key]


class _Provenance(logging.Handler):
    """Collects what the ``xattn`` logger says at debug level: the kernel-table entries chosen
    (``xattn_backend``) and the GPU kernels launched (``xattn_kernel``)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.backends: list[str] = []
        self.kernels: list[str] = []

    def emit(self, record):
        for attr, out in (("xattn_backend", self.backends), ("xattn_kernel", self.kernels)):
            value = getattr(record, attr, None)
            if value is not None and value not in out:
                out.append(value)


@contextmanager
def recording_backends():
    """Collect the backends and kernels that serve the calls inside the block (from the
    ``xattn`` logger: no patching)."""
    logger = logging.getLogger("xattn")
    handler = _Provenance()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _linear_reference(q, k, v, *, causal, eps=1e-6):
    """Katharopoulos et al. linear attention, phi(x) = elu(x) + 1, straight from the formula."""
    q, k, v = (to_numpy(x) for x in (q, k, v))
    hq, hkv = q.shape[1], k.shape[1]
    k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)

    def phi(x):
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))

    a = phi(q) @ np.swapaxes(phi(k), -1, -2)
    if causal:
        sq, sk = a.shape[-2:]
        a = a * np.tri(sq, sk, sk - sq)
    return (a @ v) / (a.sum(axis=-1, keepdims=True) + eps)


def build_cases(p: Problem) -> list[Case]:
    cfg, xp = p.cfg, p.xp
    q, k, v = p.q, p.k, p.v
    s, causal = cfg.seq_len, cfg.causal
    full = band_pairs(s, s, causal, None)
    dev = None  # backend column: what the call picks, recorded when it first runs
    ckw = {"causal": True} if causal else {}
    cases = []

    def exact(name, fn, backend, pairs, *, kk=None, vv=None, causal=causal, **opts):
        kv = k if kk is None else kk
        # Variants with the same options share one (expensive) float64 reference.
        key = ("softmax", kv.shape[1], causal, tuple(sorted((o, repr(x)) for o, x in opts.items())))
        cases.append(
            Case(
                name=name,
                backend=backend,
                call=fn,
                pairs=pairs,
                reference=lambda: p.reference(key, kk, vv, causal=causal, **opts),
                versus="exact",
            )
        )

    def flash(name, pairs, *, kk=None, vv=None, causal=causal, **opts):
        kk_, vv_ = (k if kk is None else kk), (v if vv is None else vv)
        backend = None  # whichever backend="auto" picks; recorded when the case runs

        def fn():
            return xattn.flash_attention(q, kk_, vv_, causal=causal, **opts)

        exact(name, fn, backend, pairs, kk=kk, vv=vv, causal=causal, **opts)

    for name in cfg.variants:
        why = missing_extra(name)
        if why is not None:
            cases.append(Case(name, None, lambda: None, None, None, "", skip=why))
        elif name == "standard":
            exact(name, lambda: xattn.standard_attention(q, k, v, causal=causal), dev, full)
        elif name == "flash":
            reasons = _backends.available_backends(xp)
            for backend, why in reasons.items():
                if why is not None:
                    continue

                def fn(backend=backend):
                    return xattn.flash_attention(q, k, v, causal=causal, backend=backend)

                exact(name, fn, backend, full)
        elif name == "causal":
            flash(name, band_pairs(s, s, True, None), causal=True)
        elif name == "window":
            flash(name, band_pairs(s, s, causal, cfg.window), window=cfg.window)
        elif name == "gqa":
            flash(name, full, kk=p.k_gqa, vv=p.v_gqa)
        elif name == "alibi":
            slopes = xattn.alibi_slopes(cfg.heads, xp=xp)
            flash(name, full, alibi_slopes=slopes)
        elif name == "softcap":
            flash(name, full, softcap=SOFTCAP)
        elif name == "block_sparse":
            cases.append(_block_sparse_case(p, dev, ckw))
        elif name == "longformer":
            cases.append(_longformer_case(p, dev, ckw))
        elif name == "bigbird":
            cases.append(_bigbird_case(p, dev, ckw))
        elif name == "flex":
            host_slopes = to_numpy(xattn.alibi_slopes(cfg.heads), np.float64)
            flex_kw = _flex_mods(host_slopes, causal)
            # flex dispatches on its own (numba.njit on the host; on the GPU the tensor-core
            # kernel for 16-bit inputs, numba.cuda otherwise): ask it which one runs.
            from xattn.flex import _Setup

            flex_backend = _Setup(q, k, v, flex_kw.get("score_mod"), flex_kw.get("mask_mod"),
                                  (), None, "auto").backend
            exact(name, lambda kw=flex_kw: xattn.flex_attention(q, k, v, **kw), flex_backend, full,
                  alibi_slopes=xattn.alibi_slopes(cfg.heads, xp=xp))
        elif name == "linear":
            cases.append(
                Case(
                    name=name,
                    backend=dev,
                    call=lambda: xattn.linear_attention(q, k, v, feature_map="elu", **ckw),
                    pairs=None,
                    reference=lambda: _linear_reference(q, k, v, causal=causal),
                    versus="formula",
                )
            )
        elif name == "performer":
            cases.append(
                Case(
                    name=name,
                    backend=dev,
                    call=lambda: xattn.performer_attention(q, k, v, seed=0, **ckw),
                    pairs=None,
                    reference=lambda: p.reference(
                        ("softmax", k.shape[1], causal, ()), causal=causal
                    ),
                    versus="softmax",
                )
            )
    return cases


def _flex_mods(slopes, causal):
    """ALiBi as a user score function (and the causal rule as a mask function) for flex."""

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * abs(q_idx - kv_idx)

    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return {"score_mod": alibi, "mask_mod": causal_mask if causal else None}


def _masked_case(p, name, dev, ckw, dense, call):
    """A sparse variant: its dense visibility (Sq, Sk), combined with --causal when set."""
    s = p.cfg.seq_len
    if ckw:
        dense = dense & np.tri(s, s, 0, dtype=bool)
    return Case(
        name=name,
        backend=dev,
        call=call,
        pairs=int(dense.sum()),
        reference=lambda: p.reference((name,), mask=dense, causal=False),
        versus="exact",
    )


def _block_sparse_case(p, dev, ckw):
    s = p.cfg.seq_len
    # Four packed documents of unequal lengths (1/8, 3/8, 1/4, 1/4 of the sequence).
    cu = np.unique(np.array([0, s // 8, s // 2, (3 * s) // 4, s], dtype=np.int64))
    bm = xattn.BlockMask.documents(cu, **ckw)
    doc = np.searchsorted(cu, np.arange(s), side="right")
    dense = doc[:, None] == doc[None, :]
    q, k, v = p.q, p.k, p.v
    return _masked_case(p, "block_sparse", dev, ckw, dense,
                        lambda: xattn.block_sparse_attention(q, k, v, bm, **ckw))


def _longformer_case(p, dev, ckw):
    s = p.cfg.seq_len
    window = 2 * max(1, min(256, s // 8))
    glob = np.array([0], dtype=np.int64)
    i = np.arange(s)
    dense = np.abs(i[:, None] - i[None, :]) <= window // 2
    dense[glob, :] = True
    dense[:, glob] = True
    q, k, v = p.q, p.k, p.v
    # Longformer has no causal option of its own; --causal adds a boolean mask.
    extra = {"mask": np.tri(s, s, 0, dtype=bool)} if ckw else {}
    return _masked_case(
        p, "longformer", dev, ckw, dense,
        lambda: xattn.longformer_attention(q, k, v, window=window, global_tokens=glob, **extra),
    )


def _bigbird_case(p, dev, ckw):
    s = p.cfg.seq_len
    opts = dict(block_size=min(64, max(1, s // 16)), window_blocks=3, global_blocks=1,
                random_blocks=3, seed=0)
    dense = np.asarray(to_numpy(xattn.BlockMask.bigbird(s, **opts).to_dense(), bool))
    q, k, v = p.q, p.k, p.v
    extra = {"mask": np.tri(s, s, 0, dtype=bool)} if ckw else {}
    return _masked_case(p, "bigbird", dev, ckw, dense,
                        lambda: xattn.bigbird_attention(q, k, v, **opts, **extra))


# ----------------------------------------------------------------------------- measuring


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _sync(xp):
    if xp.__name__ == "cupy":
        xp.cuda.get_current_stream().synchronize()


def _nbytes(result) -> int:
    parts = result if isinstance(result, tuple) else (result,)
    return sum(int(x.nbytes) for x in parts if hasattr(x, "nbytes"))


def measure_memory(xp, call) -> int:
    """Peak bytes allocated during one call beyond what it returns."""
    if xp.__name__ == "cupy":
        pool = xp.get_default_memory_pool()
        _sync(xp)
        pool.free_all_blocks()
        before = pool.total_bytes()
        result = call()
        _sync(xp)
        # Blocks freed during the call stay in the pool, so its growth bounds the peak.
        peak = pool.total_bytes() - before
    else:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            result = call()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    extra = peak - _nbytes(result)
    del result
    return max(extra, 0)


def measure_time(xp, call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(xp)
        t0 = time.perf_counter()
        call()
        _sync(xp)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Row:
    variant: str
    backend: str
    seconds: float | None
    gflops: float | None
    extra_bytes: int | None
    error: float | None
    versus: str
    note: str = ""
    kernels: list = field(default_factory=list)  # GPU entry points launched (from the log)


def run_case(p: Problem, case: Case) -> Row:
    xp, cfg = p.xp, p.cfg
    if case.skip is not None:
        return Row(case.name, "-", None, None, None, None, case.versus,
                   note=f"skipped, {case.skip}")
    try:
        with recording_backends() as seen:
            out = _first(case.call())  # warm-up: JIT compilation, caches, kernel builds
    except (NotImplementedError, MemoryError) as exc:
        return Row(case.name, case.backend or "auto", None, None, None, None, case.versus,
                   note=f"skipped: {exc}".splitlines()[0])
    if case.backend is None:
        case.backend = "+".join(seen.backends) or ("cupy" if is_cupy(out) else "numpy")
    error = None
    if cfg.check and case.reference is not None:
        ref = case.reference()
        error = float(np.max(np.abs(to_numpy(out) - ref))) if ref.size else 0.0
    del out
    extra = measure_memory(xp, case.call)
    seconds = measure_time(xp, case.call, cfg.repeats)
    gflops = None
    if case.pairs is not None and seconds > 0:
        flops = 4 * cfg.head_dim * cfg.batch * cfg.heads * case.pairs  # 2*D for q.k, 2*D for p.v
        gflops = flops / seconds / 1e9
    return Row(case.name, case.backend, seconds, gflops, extra, error, case.versus,
               kernels=list(seen.kernels))


COLUMNS = (("variant", 12, "<"), ("backend", 10, "<"), ("time ms", 9, ">"),
           ("GFLOP/s", 8, ">"), ("extra MiB", 9, ">"), ("max |err|", 9, ">"), ("vs", 7, "<"))


def _line(cells) -> str:
    # The last column is left unpadded, and a skipped row's reason may be longer than it.
    parts = [f"{c:{align}{w}}" for c, (_, w, align) in zip(cells[:-1], COLUMNS, strict=False)]
    return "  ".join([*parts, cells[-1]]).rstrip()


def table_header() -> str:
    return "\n".join([_line([c[0] for c in COLUMNS]), _line(["-" * c[1] for c in COLUMNS])])


def _fmt(x: float) -> str:
    """Three significant digits, without exponents in the usual range (GPU times are < 1 ms)."""
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:#.3g}" if x >= 0.001 else f"{x:.1e}"


def format_row(r: Row) -> str:
    if r.seconds is None:
        return _line([r.variant, r.backend, "-", "-", "-", "-", r.note])
    return _line([
        r.variant,
        r.backend,
        _fmt(r.seconds * 1e3),
        "n/a" if r.gflops is None else _fmt(r.gflops),
        "n/a" if r.extra_bytes is None else f"{r.extra_bytes / 2**20:.1f}",
        "skipped" if r.error is None else f"{r.error:.2e}",
        r.versus,
    ])


def describe(cfg: Config, xp, info=None) -> str:
    """The header: provenance (as :func:`xattn.show_config`) and the problem."""
    info = config_info() if info is None else info
    window = tuple(-1 if w is None else w for w in cfg.window)
    device = "gpu (CuPy arrays)" if xp.__name__ == "cupy" else "cpu (NumPy arrays)"
    return (
        f"{format_config(info)}\n"
        f"device: {device}\n"
        f"problem: batch={cfg.batch} heads={cfg.heads} kv_heads={cfg.kv_heads} "
        f"seq_len={cfg.seq_len} head_dim={cfg.head_dim} dtype={np.dtype(cfg.dtype).name} "
        f"causal={cfg.causal} window={window[0]},{window[1]}; median of {cfg.repeats} calls"
    )


FOOTER = """\
GFLOP/s counts 4*B*Hq*D per visible query/key pair (flash-attn convention); n/a where the
variant is not softmax attention. extra MiB: peak allocation of one call beyond its output
(tracemalloc on the CPU: buffers numba allocates outside Python are not seen; CuPy pool growth
on the GPU). max |err| is against float64: 'exact' = xattn.testing.reference_attention with
the same mask, 'formula' = the variant's own formula, 'softmax' = exact softmax attention."""


def write_json(path, cfg: Config, info: dict, rows) -> None:
    """The run as JSON: provenance (:func:`xattn.show_config`'s dict), problem, rows."""
    problem = {k: v for k, v in asdict(cfg).items() if k != "json"}
    problem["dtype"] = np.dtype(cfg.dtype).name
    problem["window"] = [None if w is None else int(w) for w in cfg.window]
    doc = {"config": info, "problem": problem, "rows": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    cfg = parse_args(argv)  # argparse reports its own errors (one line, exit code 2)
    try:
        xp = get_namespace(cfg.device)
        p = Problem(cfg, xp)
        validate_attention(p.q, p.k, p.v, causal=cfg.causal, window=cfg.window)
        cases = build_cases(p)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    info = config_info()
    print(describe(cfg, xp, info))
    print()
    print(table_header(), flush=True)
    rows = []
    for case in cases:
        try:
            row = run_case(p, case)
        except (ValueError, TypeError) as exc:
            print(f"{PROG}: error: {case.name}: {exc}", file=sys.stderr)
            return 2
        rows.append(row)
        print(format_row(row), flush=True)
    if cfg.json:
        write_json(cfg.json, cfg, info, rows)
    print()
    print(FOOTER)
    missing = [n for n in VARIANT_HELP if n not in available_variants()]
    if missing:
        print(f"not in this xattn yet: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
