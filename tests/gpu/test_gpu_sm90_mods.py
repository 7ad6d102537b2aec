"""The Hopper (wgmma) forward's score modifications and block masks against the float64 oracle
(needs CuPy and a compute capability 9.0 GPU).

The ``_mods`` entries (softcap, bias, ALiBi, boolean mask, every combination) and the ``_bm``
entries (the block mask's CSR walk, shared by the producer warpgroup and the consumers; the
element rule in partial blocks only), called through ``backend="cupy.sm90"`` so that a refusal
fails the test instead of falling back; awkward shapes: Sq != Sk, lengths that are not tile
multiples, GQA/MQA, bfloat16, window edges, empty rows, Sq = 1. flex_attention's hook on this
kernel is covered by test_gpu_flex_tc.py (it runs there on a Hopper card); the choice of
kernel is checked here through the debug log.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pytest
from conftest import CC, cupy_array

import xattn
from xattn import _backends
from xattn._array import validate_attention
from xattn.testing import assert_close, naive_attention, reference_attention

cp = pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CC != 90, reason="needs a compute capability 9.0 (Hopper) GPU"),
]

from xattn._backends.cupy_ import flash_sm90 as k90  # noqa: E402


def _inputs(rng, dtype, *, b=2, hq=4, hkv=2, sq=77, sk=150, d=64, amp=1.0):
    q = cupy_array(amp * rng.standard_normal((b, hq, sq, d)), dtype)
    k = cupy_array(amp * rng.standard_normal((b, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((b, hkv, sk, d)), dtype)
    return q, k, v


class _Kernels(logging.Handler):
    """Collects the names of the kernels launched (the xattn logger at debug level)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        name = getattr(record, "xattn_kernel", "")
        if name:
            self.names.append(name)

    def __enter__(self):
        self.logger = logging.getLogger("xattn")
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)  # setLevel: the logger caches isEnabledFor
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def _check(case, q, k, v, *, block_mask=None, **opts):
    """backend="cupy.sm90" against the oracle (block mask as its dense form); returns the
    outputs and the kernels that ran."""
    with _Kernels() as log:
        out, lse = xattn.flash_attention(q, k, v, block_mask=block_mask, return_lse=True,
                                         backend="cupy.sm90", **opts)
        cp.cuda.runtime.deviceSynchronize()
    assert log.names and all(n.startswith("flash_fwd_sm90_") for n in log.names), log.names
    ref_opts = dict(opts)
    if block_mask is not None:
        dense = cp.asarray(block_mask.to_dense())
        user = ref_opts.pop("mask", None)
        ref_opts["mask"] = dense if user is None else dense & user
    ref, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
    naive = naive_attention(q, k, v, **ref_opts)
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive, name=f"{case} out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3,
                 name=f"{case} lse")
    return out, lse, log.names


def _mask(rng, shape, p=0.8):
    m = rng.random(shape) < p
    m[..., 1, :] = False  # a fully masked row: out 0, lse -inf
    return m


# name -> (shape changes, options builder(rng, b, hq, sq, sk))
MODS = {
    "softcap": ({"amp": 3.0}, lambda r, b, h, sq, sk: dict(softcap=2.5)),
    "alibi": ({}, lambda r, b, h, sq, sk: dict(alibi_slopes=r.uniform(0.01, 0.5, h))),
    "alibi_batch_causal": ({}, lambda r, b, h, sq, sk: dict(
        alibi_slopes=r.uniform(0.01, 0.5, (b, h)), causal=True)),
    "bias": ({}, lambda r, b, h, sq, sk: dict(bias=r.standard_normal((h, sq, sk)))),
    "bias_keys": ({}, lambda r, b, h, sq, sk: dict(bias=r.standard_normal((b, 1, 1, sk)))),
    "bias_neg_inf": ({}, lambda r, b, h, sq, sk: dict(
        bias=np.where(r.random((b, 1, sq, sk)) < 0.2, -np.inf, 0.0))),
    "mask": ({}, lambda r, b, h, sq, sk: dict(mask=_mask(r, (b, h, sq, sk)))),
    "alibi+softcap+bias": ({"amp": 2.0}, lambda r, b, h, sq, sk: dict(
        alibi_slopes=r.uniform(0.01, 0.3, h), softcap=4.0,
        bias=r.standard_normal((1, sq, sk)))),
    "window_edges+alibi": ({}, lambda r, b, h, sq, sk: dict(
        window=(20, 7), alibi_slopes=r.uniform(0.01, 0.3, h))),
    "causal_window+softcap": ({"amp": 3.0}, lambda r, b, h, sq, sk: dict(
        causal=True, window=(45, None), softcap=3.0)),
    "everything": ({"amp": 2.0}, lambda r, b, h, sq, sk: dict(
        causal=True, window=(90, None), mask=_mask(r, (sq, sk), 0.9),
        bias=0.5 * r.standard_normal((h, 1, sk)), alibi_slopes=r.uniform(0.01, 0.1, h),
        softcap=3.0, scale=0.2)),
    "gqa4+alibi": ({"hq": 8, "hkv": 2}, lambda r, b, h, sq, sk: dict(
        alibi_slopes=r.uniform(0.01, 0.5, h))),
    "mqa+softcap": ({"hq": 4, "hkv": 1, "amp": 3.0}, lambda r, b, h, sq, sk: dict(softcap=2.0)),
    "sq_gt_sk_causal+bias": ({"sq": 300, "sk": 70}, lambda r, b, h, sq, sk: dict(
        causal=True, bias=r.standard_normal((h, sq, sk)))),
    "long_odd+alibi": ({"sq": 515, "sk": 1000, "b": 1}, lambda r, b, h, sq, sk: dict(
        alibi_slopes=r.uniform(0.01, 0.1, h), causal=True)),
    "sq1+mask": ({"sq": 1, "sk": 300}, lambda r, b, h, sq, sk: dict(
        mask=r.random((b, h, sq, sk)) < 0.5)),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", sorted(MODS))
def test_score_mods(case, d, dtype):
    shape, build = MODS[case]
    shape = {"b": 2, "hq": 4, "hkv": 2, "sq": 77, "sk": 150, **shape}
    rng = np.random.default_rng([zlib.crc32(case.encode()), d])
    amp = shape.pop("amp", 1.0)
    q, k, v = _inputs(rng, dtype, d=d, amp=amp, **shape)
    opts = build(rng, shape["b"], shape["hq"], shape["sq"], shape["sk"])
    opts = {key: cp.asarray(val.astype(np.float32) if val.dtype.kind == "f" else val)
            if isinstance(val, np.ndarray) else val for key, val in opts.items()}
    _, _, names = _check(f"{case} {dtype} D={d}", q, k, v, **opts)
    assert all(n.endswith("_mods") for n in names), names


def _masks(seed=0):
    """name -> BlockMask with blocks the sm_90a tiles divide (bq % 128, bk % 64 or 128):
    every rule kind, partial blocks, lengths that are not block multiples."""
    rng = np.random.default_rng(seed)
    dense = rng.random((333, 470)) < 0.4
    dense[:, 128:256] = True  # full blocks among partial ones
    dense[40:70, :] = False  # empty rows inside partial blocks
    dense[:, 400:] = False  # invisible blocks
    return {
        "causal": xattn.BlockMask.causal(300, 421, block_size=128),
        "window": xattn.BlockMask.sliding_window(500, window=(100, 50), block_size=128),
        "window_bk64": xattn.BlockMask.sliding_window(500, window=(70, 30),
                                                      block_size=(128, 64)),
        "causal_window": xattn.BlockMask.sliding_window(600, window=(200, None), causal=True,
                                                        block_size=(256, 128)),
        "longformer": xattn.BlockMask.longformer(333, window=64, global_tokens=[0, 100, 332],
                                                 block_size=128),
        "bigbird": xattn.BlockMask.bigbird(700, block_size=128, random_blocks=1, seed=3),
        "documents": xattn.BlockMask.documents([0, 50, 180, 310, 500], causal=True,
                                               block_size=128),
        "from_dense": xattn.BlockMask.from_dense(dense, block_size=(128, 64)),
        "from_dense_256": xattn.BlockMask.from_dense(dense, block_size=256),
        "and": (xattn.BlockMask.causal(400, block_size=128)
                & xattn.BlockMask.sliding_window(400, window=(150, 150), block_size=128)),
        "or": (xattn.BlockMask.documents([0, 100, 390], block_size=128)
               | xattn.BlockMask.sliding_window(390, window=(20, 20), block_size=128)),
    }


MASKS = _masks()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_block_masks(name, d, dtype):
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), d])
    q, k, v = _inputs(rng, dtype, d=d, sq=bm.q_len, sk=bm.k_len)
    _, _, names = _check(f"{name} {dtype} D={d}", q, k, v, block_mask=bm)
    assert all(n.endswith("_bm") and "_mods" not in n for n in names), names


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["window", "from_dense", "documents", "longformer"])
@pytest.mark.parametrize("option", ["causal", "window", "alibi+softcap", "bias", "mask",
                                    "gqa4", "all"])
def test_block_masks_with_options(name, d, option):
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32((name + option).encode()), d])
    hq, hkv = (8, 2) if option == "gqa4" else (4, 2)
    q, k, v = _inputs(rng, "float16", d=d, hq=hq, hkv=hkv, sq=bm.q_len, sk=bm.k_len,
                      amp=2.0 if "softcap" in option or option == "all" else 1.0)
    opts = {}
    if option in ("causal", "all"):
        opts["causal"] = True
    if option == "window":
        opts["window"] = (45, 10)
    if option == "all":
        opts["window"] = (80, None)
    if option in ("bias", "all"):
        opts["bias"] = cp.asarray(rng.standard_normal((hq, bm.q_len, bm.k_len)),
                                  dtype=cp.float32)
    if option in ("alibi+softcap", "all"):
        opts["alibi_slopes"] = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
        opts["softcap"] = 6.0
    if option in ("mask", "all"):
        opts["mask"] = cp.asarray(rng.random((bm.q_len, bm.k_len)) < 0.8)
    _, _, names = _check(f"{name} + {option} D={d}", q, k, v, block_mask=bm, **opts)
    mods = option not in ("causal", "window", "gqa4")
    assert all(n.endswith("_mods_bm" if mods else "_bm") for n in names), names


def test_block_mask_empty_rows_and_clipped_blocks():
    """A query block row with nothing visible (its thread block's producer and consumers walk
    an empty list), rows emptied inside partial blocks, and causal with Sq > Sk clipping whole
    blocks away: out 0, lse -inf there."""
    rng = np.random.default_rng(11)
    dense = rng.random((400, 360)) < 0.5
    dense[128:256] = False
    dense[5:9] = False
    bm = xattn.BlockMask.from_dense(dense, block_size=128)
    q, k, v = _inputs(rng, "float16", sq=400, sk=360)
    out, lse, _ = _check("empty rows", q, k, v, block_mask=bm)
    for rows in (slice(128, 256), slice(5, 9)):
        assert bool(cp.all(out[..., rows, :] == 0)), f"rows {rows}: out not 0"
        assert bool(cp.all(cp.isneginf(lse[..., rows]))), f"rows {rows}: lse not -inf"
    k2, v2 = k[..., :200, :], v[..., :200, :]
    bm2 = xattn.BlockMask.from_dense(dense[:, :200], block_size=(128, 64))
    _check("causal Sk < Sq", q, k2, v2, block_mask=bm2, causal=True)


@pytest.mark.parametrize("config", [(128, 2, 11), (64, 2, 11), (128, 2, 27)])
def test_explicit_configs(config):
    """The block-sparse and mods entries under another built configuration (64-key tiles,
    the ping-pong schedule)."""
    rng = np.random.default_rng(list(config))
    bm = MASKS["from_dense_256"]
    q, k, v = _inputs(rng, "float16", d=64, sq=bm.q_len, sk=bm.k_len)
    opts = dict(alibi_slopes=cp.asarray(xattn.alibi_slopes(4), dtype=cp.float32), causal=True)
    prob = validate_attention(q, k, v, block_mask=bm, **opts)
    out, lse = k90.forward(prob, q, k, v, config=config)
    dense = cp.asarray(bm.to_dense())
    ref, ref_lse, _ = reference_attention(q, k, v, mask=dense, **opts)
    assert_close(out, ref, xp=cp, dtype=q.dtype,
                 naive=naive_attention(q, k, v, mask=dense, **opts))
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3)


def test_supports_and_routing():
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, "float16", sq=300, sk=300)
    slopes = cp.asarray(xattn.alibi_slopes(4), dtype=cp.float32)
    for opts in (dict(alibi_slopes=slopes), dict(softcap=3.0),
                 dict(block_mask=xattn.BlockMask.causal(300, block_size=128)),
                 dict(block_mask=xattn.BlockMask.causal(300, block_size=(128, 64)),
                      alibi_slopes=slopes)):
        prob = validate_attention(q, k, v, **opts)
        assert k90.supports(prob, {}, "forward") is None, opts
        assert _backends.explain(prob, {})["backend"] == "cupy.sm90", opts
    small = validate_attention(q, k, v, block_mask=xattn.BlockMask.causal(300, block_size=64))
    why = k90.supports(small, {}, "forward")
    assert why is not None and "block size (64, 64)" in why
    assert _backends.explain(small, {})["backend"] == "cupy.sm80"


def test_flex_runs_on_wgmma():
    """flex_attention on a Hopper card: the sm_90a kernel with the user's functions, both with
    a mask_mod (the derived block mask's walk) and with a score_mod alone; D = 96 (padded)
    stays on mma.sync."""
    slopes = xattn.alibi_slopes(4, dtype=np.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * abs(q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    rng = np.random.default_rng(5)
    i, j = np.arange(300)[:, None], np.arange(333)[None]
    bias = -slopes[:, None, None] * np.abs(i - j)[None]
    for d, mmod, want in ((64, causal, "flash_fwd_sm90_"), (128, None, "flash_fwd_sm90_"),
                          (96, causal, "flash_fwd_f16_")):
        q, k, v = _inputs(rng, "float16", d=d, sq=300, sk=333)
        with _Kernels() as log:
            out = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=mmod, backend="cupy")
        assert any(n.startswith(want) for n in log.names), (d, log.names)
        opts = dict(bias=bias, mask=(j <= i) if mmod else None)
        ref, _, _ = reference_attention(q, k, v, **opts)
        assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive_attention(q, k, v, **opts),
                     name=f"flex D={d}")


# --- Mode 75: the same entries with the K/V ring filled by the copy engine ----------------
# The mode-75 twins of the _mods / _bm / _mods_bm / flex entries (instances.SM90_*_TMA: the
# same tiles; the producer is one thread issuing tensor-map copies, ws_produce_tma, or
# ws_produce_walk_tma along the block mask's CSR list), called with an explicit config so that
# they run whichever family instances.SM90_MODS_ON_TMA makes the default. Each against the
# oracle (outputs poisoned: tests/gpu/conftest.py) and bit for bit against its mode-11 twin.

from xattn._backends.cupy_ import instances  # noqa: E402

TMA_TABLES = {11: (instances.SM90_MODS, instances.SM90_BM, instances.SM90_BM_MODS),
              75: (instances.SM90_MODS_TMA, instances.SM90_BM_TMA, instances.SM90_BM_MODS_TMA)}


def _bits(x):
    return x.view(cp.uint16 if x.dtype.itemsize == 2 else cp.uint32)


def _assert_same_bits(case, got, want):
    for name, a, b in zip(("out", "lse"), got, want, strict=True):
        same = _bits(a) == _bits(b)
        assert bool(same.all()), (f"{case} {name}: mode 75 differs from mode 11 in "
                                  f"{int((~same).sum())} of {same.size} elements")


def _oracle(case, out, lse, q, k, v, block_mask=None, **opts):
    ref_opts = dict(opts)
    if block_mask is not None:
        dense = cp.asarray(block_mask.to_dense())
        user = ref_opts.pop("mask", None)
        ref_opts["mask"] = dense if user is None else dense & user
    ref, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
    naive = naive_attention(q, k, v, **ref_opts)
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive, name=f"{case} out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3,
                 name=f"{case} lse")


def _tma_config(d, mods, block_mask=None):
    """The mode-75 configuration the launcher would take with the switch on."""
    table_mods, table_bm, table_bm_mods = TMA_TABLES[75]
    if block_mask is None:
        return table_mods[d]
    bq, bk = block_mask.block_size
    cands = (table_bm_mods.get(d) if mods else None) or table_bm[d]
    return next(c for c in cands if bq % (64 * c[1]) == 0 and bk % c[0] == 0)


def _check_twins(case, q, k, v, *, block_mask=None, **opts):
    """Mode 75 against the oracle, then against mode 11 with the same tiles, bit for bit."""
    prob = validate_attention(q, k, v, block_mask=block_mask, **opts)
    cfg = _tma_config(q.shape[-1], prob.has_score_mods, block_mask)
    assert cfg[2] == 75
    o75, l75 = k90.forward(prob, q, k, v, config=cfg)
    cp.cuda.runtime.deviceSynchronize()
    _oracle(f"{case} {cfg}", o75, l75, q, k, v, block_mask=block_mask, **opts)
    o11, l11 = k90.forward(prob, q, k, v, config=(cfg[0], cfg[1], 11))
    _assert_same_bits(f"{case} {cfg}", (o75, l75), (o11, l11))
    return o75, l75


def _device_opts(opts):
    return {key: cp.asarray(val.astype(np.float32) if val.dtype.kind == "f" else val)
            if isinstance(val, np.ndarray) else val for key, val in opts.items()}


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype,case", [("float16", c) for c in sorted(MODS)] + [
    ("bfloat16", c) for c in ("alibi", "softcap", "everything", "gqa4+alibi")])
def test_tma_score_mods(case, dtype, d):
    """Every score modification of the _mods entries (softcap, bias, ALiBi, bool mask, their
    combinations with causal / window, GQA, MQA, Sq != Sk, Sq = 1) in mode 75."""
    shape, build = MODS[case]
    shape = {"b": 2, "hq": 4, "hkv": 2, "sq": 77, "sk": 150, **shape}
    rng = np.random.default_rng([zlib.crc32(case.encode()), d, 75])
    amp = shape.pop("amp", 1.0)
    q, k, v = _inputs(rng, dtype, d=d, amp=amp, **shape)
    opts = _device_opts(build(rng, shape["b"], shape["hq"], shape["sq"], shape["sk"]))
    _check_twins(f"{case} {dtype} D={d}", q, k, v, **opts)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_tma_block_masks(name, d):
    """The CSR walk on the copy engine: causal, windows (128- and 64-key tiles), Longformer,
    BigBird, documents, dense masks with full, partial and empty blocks, & and |."""
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), d, 75])
    q, k, v = _inputs(rng, "float16", d=d, sq=bm.q_len, sk=bm.k_len)
    _check_twins(f"{name} D={d}", q, k, v, block_mask=bm)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["window", "longformer", "bigbird", "documents"])
@pytest.mark.parametrize("option", ["causal", "alibi+softcap", "mask", "gqa4", "all"])
def test_tma_block_masks_with_options(name, d, option):
    bm = MASKS[name]
    rng = np.random.default_rng([zlib.crc32((name + option).encode()), d, 75])
    hq, hkv = (8, 2) if option == "gqa4" else (4, 2)
    q, k, v = _inputs(rng, "float16", d=d, hq=hq, hkv=hkv, sq=bm.q_len, sk=bm.k_len,
                      amp=2.0 if option in ("alibi+softcap", "all") else 1.0)
    opts = {}
    if option in ("causal", "all"):
        opts["causal"] = True
    if option == "all":
        opts["window"] = (80, None)
        opts["bias"] = cp.asarray(rng.standard_normal((hq, 1, bm.k_len)), dtype=cp.float32)
    if option in ("alibi+softcap", "all"):
        opts["alibi_slopes"] = cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32)
        opts["softcap"] = 6.0
    if option in ("mask", "all"):
        opts["mask"] = cp.asarray(rng.random((bm.q_len, bm.k_len)) < 0.8)
    _check_twins(f"{name} + {option} D={d}", q, k, v, block_mask=bm, **opts)


def _nan_tailed(rng, dtype, shape):
    """A (B, H, S, D) operand whose allocation continues with NaN past its last element (a
    view of the allocation's head, same address), as in test_gpu_flash_sm90.py: a key tile at
    the last head's sequence end that read past Sk would bring NaN in, where the tensor map's
    bounds give zeros."""
    n = int(np.prod(shape))
    host = np.concatenate([rng.standard_normal(n), np.full(256 * shape[-1], np.nan)])
    base = cupy_array(host, dtype)
    x = base[:n].reshape(shape)
    assert x.data.ptr == base.data.ptr and x.flags.c_contiguous
    return x


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kind", ["mods", "bm", "bm_keys64", "mods_bm", "long_bm"])
def test_tma_sequence_ends(d, kind):
    """Several batches and heads with Sq and Sk off the tile sizes: every (b, kv head)'s last
    key tile reaches past Sk (zeros from the tensor map's bounds; NaN follows the last head);
    GQA; "long_bm": 9 key blocks of a dense random mask per row, so the walk turns the 3-stage
    ring over several times."""
    rng = np.random.default_rng([d, len(kind), 75])
    b, hq, hkv, sq, sk = 3, 4, 2, 141, 203
    if kind == "long_bm":
        b, hq, hkv, sq, sk = 2, 2, 1, 300, 1100
    q = cupy_array(rng.standard_normal((b, hq, sq, d)), "float16")
    k = _nan_tailed(rng, "float16", (b, hkv, sk, d))
    v = _nan_tailed(rng, "float16", (b, hkv, sk, d))
    opts = {}
    if kind in ("mods", "mods_bm"):
        opts = {"alibi_slopes": cp.asarray(xattn.alibi_slopes(hq), dtype=cp.float32),
                "softcap": 5.0, "causal": kind == "mods"}
    bm = None
    if kind != "mods":
        dense = rng.random((sq, sk)) < (0.7 if kind == "long_bm" else 0.5)
        bm = xattn.BlockMask.from_dense(dense, block_size=(128, 64) if kind == "bm_keys64"
                                        else 128)
    _check_twins(f"{kind} D={d}", q, k, v, block_mask=bm, **opts)


def test_tma_block_mask_empty_rows():
    """A query block row with an empty list (the one producer thread issues nothing, the
    consumers wait for nothing), rows emptied inside partial blocks: out 0, lse -inf."""
    rng = np.random.default_rng(75)
    dense = rng.random((400, 360)) < 0.5
    dense[128:256] = False
    dense[5:9] = False
    bm = xattn.BlockMask.from_dense(dense, block_size=128)
    q, k, v = _inputs(rng, "float16", sq=400, sk=360)
    out, lse = _check_twins("empty rows", q, k, v, block_mask=bm)
    for rows in (slice(128, 256), slice(5, 9)):
        assert bool(cp.all(out[..., rows, :] == 0)), f"rows {rows}: out not 0"
        assert bool(cp.all(cp.isneginf(lse[..., rows]))), f"rows {rows}: lse not -inf"


def test_tma_default_follows_the_switch():
    """flash_attention's _mods / _bm entries run the family instances.SM90_MODS_ON_TMA picks."""
    mode = 75 if instances.SM90_MODS_ON_TMA else 11
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, "float16", sq=300, sk=300)
    slopes = cp.asarray(xattn.alibi_slopes(4), dtype=cp.float32)
    with _Kernels() as log:
        xattn.flash_attention(q, k, v, alibi_slopes=slopes, backend="cupy.sm90")
        xattn.flash_attention(q, k, v, block_mask=xattn.BlockMask.causal(300, block_size=128),
                              backend="cupy.sm90")
    names = log.names
    assert any(n.endswith("_mods") for n in names) and any(n.endswith("_bm") for n in names)
    assert all(f"_o{mode}_" in n for n in names), names


TMA_HEADS = 8
TMA_SLOPES = xattn.alibi_slopes(TMA_HEADS, dtype=np.float64)
TMA_DOC = np.repeat(np.arange(6), 70)[:400].astype(np.int32)  # documents of 70 tokens


def flex_alibi(score, b, h, q_idx, kv_idx):
    return score - TMA_SLOPES[h] * abs(q_idx - kv_idx)


def flex_causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def flex_documents(b, h, q_idx, kv_idx):
    return TMA_DOC[q_idx] == TMA_DOC[kv_idx] and kv_idx <= q_idx


def _family(monkeypatch, mode):
    for name, table in zip(("MODS_CONFIGS", "BM_CONFIGS", "BM_MODS_CONFIGS"),
                           TMA_TABLES[mode], strict=True):
        monkeypatch.setattr(k90, name, table)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["alibi+causal", "alibi", "documents_gqa", "causal"])
def test_tma_flex(monkeypatch, d, case):
    """flex_attention on the mode-75 entries (the launcher's tables set to the twins): the
    tensor maps before the parameter block and the user's arrays; score_mod alone (the _flex
    entry), mask_mod's derived block mask (the _flex_bm entry's walk), with and without a
    score_mod, GQA; against the oracle and bit for bit against the mode-11 entries."""
    smod = flex_alibi if "alibi" in case else None
    mmod = {"alibi+causal": flex_causal, "causal": flex_causal,
            "documents_gqa": flex_documents}.get(case)
    hq, hkv, sq, sk = (TMA_HEADS, 2, 400, 400) if case == "documents_gqa" else (4, 2, 300, 333)
    rng = np.random.default_rng([zlib.crc32(case.encode()), d, 75])
    q, k, v = _inputs(rng, "float16", b=2, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d)
    got = {}
    for mode in (75, 11):
        _family(monkeypatch, mode)
        with _Kernels() as log:
            got[mode] = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod,
                                             return_lse=True, backend="cupy")
            cp.cuda.runtime.deviceSynchronize()
        want = f"_o{mode}_flex" + ("_bm" if mmod else "")
        assert any(n.startswith("flash_fwd_sm90_") and n.endswith(want) for n in log.names), \
            (mode, log.names)
    i, j = np.arange(sq)[:, None], np.arange(sk)[None]
    opts = {}
    if smod is not None:
        opts["bias"] = -TMA_SLOPES[:hq, None, None] * np.abs(i - j)[None]
    if mmod is flex_causal:
        opts["mask"] = j <= i
    elif mmod is flex_documents:
        opts["mask"] = (TMA_DOC[:sq, None] == TMA_DOC[None, :sk]) & (j <= i)
    _oracle(f"flex {case} D={d}", *got[75], q, k, v, **opts)
    _assert_same_bits(f"flex {case} D={d}", got[75], got[11])
