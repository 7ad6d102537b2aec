"""The sm_90a (wgmma) flash forward against the float64 oracle (needs CuPy and a cc 9.0 GPU).

The kernel is called directly (``flash_sm90.forward``), whatever ``XATTN_DISABLE`` says, so that
these tests decide whether the switch may be turned on. Failures name the case and say where
the errors are (worst element, rows modulo the 64-row warpgroup tile, columns), which is what
locates a fragment or layout bug.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CC, cupy_array

from xattn._array import validate_attention
from xattn.testing import assert_close, naive_attention, reference_attention

cp = pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CC != 90, reason="needs a compute capability 9.0 (Hopper) GPU"),
]

from xattn._backends.cupy_ import flash_sm90 as k90  # noqa: E402


def _inputs(rng, dtype, *, b=2, hq=4, hkv=2, sq=77, sk=150, d=64):
    q = cupy_array(rng.standard_normal((b, hq, sq, d)), dtype)
    k = cupy_array(rng.standard_normal((b, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((b, hkv, sk, d)), dtype)
    return q, k, v


def _where(actual, reference, tol):
    """Where the errors are, in words (rows modulo 64 show a warpgroup-tile pattern)."""
    a = cp.asnumpy(actual.astype(cp.float32)).astype(np.float64)
    r = np.asarray(reference, dtype=np.float64)
    err = np.where(np.isnan(a), np.inf, np.abs(a - r))
    if a.ndim == r.ndim == 3:  # lse: (b, h, row)
        err = np.where(np.isneginf(r) & np.isneginf(a), 0.0, err)
        err = err[..., None]
    bad = err > tol
    if not bad.any():
        return "no element above the tolerance"
    worst = np.unravel_index(np.argmax(err), err.shape)
    rows = np.nonzero(bad.any(axis=(0, 1, 3)))[0]
    cols = np.nonzero(bad.any(axis=(0, 1, 2)))[0]
    heads = np.nonzero(bad.any(axis=(0, 2, 3)))[0]
    return (f"{int(bad.sum())} of {bad.size} elements off (NaN: {int(np.isnan(a).sum())}); "
            f"worst {err[worst]:.3g} at (b, h, row, col) {tuple(int(i) for i in worst)}; "
            f"rows {rows[:24].tolist()}{'...' if rows.size > 24 else ''} ({rows.size}); "
            f"rows % 64 {sorted(set((rows % 64).tolist()))[:24]}; cols {cols[:24].tolist()}"
            f"{'...' if cols.size > 24 else ''} ({cols.size}); heads {heads.tolist()}")


def _check(q, k, v, config=None, **opts):
    prob = validate_attention(q, k, v, **opts)
    out, lse = k90.forward(prob, q, k, v, config=config)
    cp.cuda.runtime.deviceSynchronize()
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    naive = naive_attention(q, k, v, **opts)
    try:
        assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive, name="out")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n  {_where(out, ref, 2e-2)}") from None
    try:
        assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3, name="lse")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n  {_where(lse, ref_lse, 2e-3)}") from None
    return out, lse


def _config(d, mode):
    """The default (BN, warpgroups) with this mode (bit 0: P V overlap, bit 1: 128-byte swizzle,
    bit 3: producer warpgroup, bit 4: ping-pong) when built, else the first built one."""
    bn, nwg, _ = k90.CONFIGS[d]
    if (d, bn, nwg, mode) in k90.BUILT:
        return (bn, nwg, mode)
    return next(c[1:] for c in sorted(k90.BUILT) if c[0] == d and c[3] == mode)


@pytest.mark.parametrize("overlap", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(64, 128), (77, 150), (130, 61), (128, 128), (200, 333),
                                   (1, 300)])
def test_forward(dtype, d, causal, sq, sk, overlap):
    rng = np.random.default_rng([d, sq, sk, causal])
    q, k, v = _inputs(rng, dtype, sq=sq, sk=sk, d=d)
    _check(q, k, v, config=_config(d, overlap), causal=causal)


@pytest.mark.parametrize("mode", [11, 27, 75])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,dtype", [(64, 128, "float16"), (77, 150, "bfloat16"),
                                         (130, 61, "float16"), (1, 300, "bfloat16")])
def test_forward_warp_specialised(dtype, d, causal, sq, sk, mode):
    """Modes 11 / 27 / 75 (producer warpgroup + mbarrier ring, 27 with consumer ping-pong, 75
    with K/V by the copy engine) on the
    short shapes of test_forward: one key block, a partial last block, Sq = 1 (the second
    consumer warpgroup has no row), Sk < Sq. A hang here is an mbarrier / named-barrier
    deadlock (tools/wgmma_probe.py's ring probe checks the stage handoff alone)."""
    rng = np.random.default_rng([d, sq, sk, causal, mode])
    q, k, v = _inputs(rng, dtype, sq=sq, sk=sk, d=d)
    _check(q, k, v, config=_config(d, mode), causal=causal)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d,config", sorted((c[0], c[1:]) for c in k90.BUILT))
@pytest.mark.parametrize("causal", [False, True])
def test_configs_long(dtype, d, config, causal):
    """Every built configuration over several key blocks (the buffers turn over), odd
    lengths."""
    rng = np.random.default_rng([d, *config, causal])
    q, k, v = _inputs(rng, dtype, b=1, hq=2, hkv=1, sq=515, sk=1000, d=d)
    _check(q, k, v, config=config, causal=causal)


@pytest.mark.parametrize("overlap", [0, 1, 2, 3, 27, 75])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["gqa4", "mqa", "scale", "window", "causal_window",
                                  "sq_gt_sk_causal", "large_scores"])
def test_options(d, case, overlap):
    rng = np.random.default_rng([d, len(case)])
    hq, hkv, sq, sk = 8, 2, 100, 173
    opts = {}
    amp = 1.0
    if case == "mqa":
        hkv = 1
    elif case == "scale":
        opts["scale"] = 0.3
    elif case == "window":
        opts["window"] = (20, 7)
    elif case == "causal_window":
        opts.update(causal=True, window=(33, None))
    elif case == "sq_gt_sk_causal":
        sq, sk = 300, 70  # the first 230 rows see no key: out 0, lse -inf
        opts["causal"] = True
    elif case == "large_scores":
        amp = 4.0  # the running maximum moves a lot: exercises the rescale
    q, k, v = _inputs(rng, "float16", hq=hq, hkv=hkv, sq=sq, sk=sk, d=d)
    if amp != 1.0:
        q = q * amp
    out, lse = _check(q, k, v, config=_config(d, overlap), **opts)
    if case == "sq_gt_sk_causal":
        assert bool(cp.all(out[..., : sq - sk, :] == 0))
        assert bool(cp.all(cp.isneginf(lse[..., : sq - sk])))


def test_built_configs_fit():
    """Every built configuration fits the 227 KiB of dynamic shared memory of a Hopper SM; one
    consumer warpgroup's fits twice into the SM's 228 KiB with 1 KiB reserved a block."""
    for d, *cfg in sorted(k90.BUILT):
        assert k90.smem_bytes(d, tuple(cfg)) <= 232448, (d, cfg, k90.smem_bytes(d, tuple(cfg)))
        if cfg[1] == 1:
            assert 2 * (k90.smem_bytes(d, tuple(cfg)) + 1024) <= 233472, (d, cfg)


@pytest.mark.parametrize("d,config", sorted((c[0], c[1:]) for c in k90.BUILT if c[3] & 2))
def test_swizzle_gqa_window(d, config):
    """The swizzled configurations: GQA, a sliding window, Sq != Sk, many key blocks."""
    rng = np.random.default_rng([d, *config])
    q, k, v = _inputs(rng, "bfloat16", b=1, hq=4, hkv=2, sq=333, sk=700, d=d)
    _check(q, k, v, config=config, causal=True, window=(150, None))


def test_supports_and_switch(monkeypatch):
    from xattn import _backends

    q, k, v = _inputs(np.random.default_rng(0), "float16", d=64)
    prob = validate_attention(q, k, v)
    assert k90.supports(prob, {}, "forward") is None
    assert "forward only" in k90.supports(prob, {}, "backward")
    monkeypatch.setenv("XATTN_DISABLE", "cupy.sm90")
    assert _backends.explain(prob, {})["backend"] == "cupy.sm80"
    monkeypatch.delenv("XATTN_DISABLE")
    assert _backends.explain(prob, {})["backend"] == "cupy.sm90"
    alibi = validate_attention(q, k, v, alibi_slopes=cp.ones(4, cp.float32))
    assert k90.supports(alibi, {}, "forward") is None  # the _mods entries
    prob96 = validate_attention(*_inputs(np.random.default_rng(1), "float16", d=96))
    from xattn._backends.cupy_ import instances

    monkeypatch.setattr(instances, "SM90_PAD_ON", False)
    assert "head_dim" in k90.supports(prob96, {}, "forward")
    monkeypatch.setattr(instances, "SM90_PAD_ON", True)
    assert k90.supports(prob96, {}, "forward") is None  # zero-padded to 128


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["plain_causal", "softcap", "block_mask_64_to_mma_sync"])
def test_dispatch(dtype, case):
    """backend="cupy" (and "auto") reach the wgmma kernel where it applies, with its default
    configuration, and the mma.sync kernel for what it does not serve (a block mask of 64-row
    blocks: the wgmma thread block holds 128 or 192 query rows)."""
    import logging

    import xattn

    calls = []

    class Kernels(logging.Handler):
        def emit(self, record):
            name = getattr(record, "xattn_kernel", "")
            if name.startswith("flash_fwd_sm90_"):
                calls.append(name)

    handler = Kernels()
    logger = logging.getLogger("xattn")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # setLevel, not .level: the logger caches isEnabledFor
    try:
        bm = xattn.BlockMask.causal(300, 421, block_size=64)
        opts = {"plain_causal": {"causal": True}, "softcap": {"softcap": 5.0},
                "block_mask_64_to_mma_sync": {"block_mask": bm}}[case]
        ref_opts = {"mask": cp.asarray(bm.to_dense())} if "block_mask" in opts else opts
        q, k, v = _inputs(np.random.default_rng(7), dtype, b=1, sq=300, sk=421, d=128)
        for backend in ("cupy", "auto"):
            out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend=backend, **opts)
            ref, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
            assert_close(out, ref, xp=cp, dtype=q.dtype,
                         naive=naive_attention(q, k, v, **ref_opts))
            assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(calls) == (0 if "block_mask" in opts else 2)
    assert [c.endswith("_mods") for c in calls] == [case == "softcap"] * len(calls)


# Mode 75 (K/V by the copy engine from tensor maps, xattn/_backends/cupy_/tma.py).
TMA_CONFIGS = sorted((c[0], c[1:]) for c in k90.BUILT if c[3] & 64)


def _nan_tailed(rng, dtype, shape):
    """A (B, H, S, D) operand whose allocation continues with NaN past its last element (the
    array is a view of the allocation's head, same address): a tile at the last head's
    sequence end that read past Sk would bring NaN in (0 x NaN in P V), where the tensor map's
    bounds give zeros."""
    n = int(np.prod(shape))
    host = np.concatenate([rng.standard_normal(n), np.full(256 * shape[-1], np.nan)])
    base = cupy_array(host, dtype)
    x = base[:n].reshape(shape)
    assert x.data.ptr == base.data.ptr and x.flags.c_contiguous
    return x


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d,config", TMA_CONFIGS)
@pytest.mark.parametrize("case", ["causal", "full", "window", "gqa_sq_gt_sk", "long"])
def test_tma_sequence_ends(dtype, d, config, case):
    """Mode 75 across several batches and heads with Sk and Sq off the tile sizes: the last
    key tile of every (b, kv head) reaches past Sk, where the tensor map's bounds fill zeros
    (the next head's rows, or NaN past the allocation for the last head, must not come in);
    GQA, Sq != Sk, a window, lse checked; "long": 9 to 18 key blocks, so the 3-stage ring
    turns over several times (the empty barriers' phases)."""
    rng = np.random.default_rng([d, *config, len(case)])
    b, hq, hkv, sq, sk = 3, 4, 2, 141, 203
    opts = {"causal": case in ("causal", "window")}
    if case == "window":
        opts["window"] = (70, None)
    elif case == "gqa_sq_gt_sk":
        hq, hkv, sq, sk = 6, 2, 260, 97
        opts["causal"] = True
    elif case == "long":
        b, hq, hkv, sq, sk = 2, 2, 1, 300, 1100
    q = cupy_array(rng.standard_normal((b, hq, sq, d)), dtype)
    k = _nan_tailed(rng, dtype, (b, hkv, sk, d))
    v = _nan_tailed(rng, dtype, (b, hkv, sk, d))
    _check(q, k, v, config=config, **opts)


@pytest.mark.parametrize("d,config", [(c[0], c[1:]) for c in sorted(k90.BUILT) if c[3] & 32])
@pytest.mark.parametrize("case", ["many_tiles", "causal_empty_tiles", "window"])
def test_persistent_matches_mode_75_bitwise(d, config, case):
    """Mode 235 (persistent: each thread block walks several tiles, the K/V ring's stages and
    phases and the Q buffers carry over from tile to tile) against its one-block-per-tile twin
    (mode 75, the same key tile), bit for bit, on problems of more tiles than blocks:
    GQA with Sq off the tile size, causal with Sq > Sk (tiles without a visible key between
    the others: nothing loaded, zeros and lse -inf written), a window; more tiles than the
    three blocks an SM of the D = 64 entry with 64-key tiles too. The other tests of this file
    (oracle, sequence ends) run it on problems of fewer tiles than blocks."""
    rng = np.random.default_rng([d, *config, len(case)])
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    b, hq, hkv, sq, sk, opts = {
        "many_tiles": (2, 4, 2, 64 * sms + 77, 640, {}),
        "causal_empty_tiles": (1, 8, 2, 64 * sms, 300, {"causal": True}),
        "window": (1, 4, 4, 64 * sms, 64 * sms, {"window": (200, 50)}),
    }[case]
    q = cupy_array(rng.standard_normal((b, hq, sq, d)), "float16")
    k = _nan_tailed(rng, "float16", (b, hkv, sk, d))
    v = _nan_tailed(rng, "float16", (b, hkv, sk, d))
    prob = validate_attention(q, k, v, **opts)
    out, lse = k90.forward(prob, q, k, v, config=config)
    ref, ref_lse = k90.forward(prob, q, k, v, config=(config[0], 1, 75))
    assert bool(cp.all(out.view(cp.uint16) == ref.view(cp.uint16))), case
    assert bool(cp.all((lse == ref_lse) | (cp.isnan(lse) & cp.isnan(ref_lse)))), case


def _twin(d, config):
    """The configuration whose rows get the same arithmetic: mode 11 with the same key tile
    and warpgroups, or for one consumer warpgroup (mode 75 only) the same key tile with more
    warpgroups, mode 11 where built."""
    bn, nwg, _ = config
    if nwg > 1:
        if (d, bn, nwg, 11) not in k90.BUILT:
            pytest.skip(f"no mode-11 twin of {config} is built at D = {d}")
        return (bn, nwg, 11)
    same = sorted(c for c in k90.BUILT if c[:2] == (d, bn) and c[2] > 1 and c[3] in (11, 75))
    return min(same, key=lambda c: c[3] != 11)[1:]


@pytest.mark.parametrize("d,config", [c for c in TMA_CONFIGS if c[0] <= 128])
def test_tma_matches_mode_11_bitwise(d, config):
    """The copy engine changes how the tiles arrive, not the arithmetic: mode 75 gives mode
    11's bits (one consumer warpgroup: those of its twin with more, see _twin; D = 192 / 256
    have no mode-11 entry)."""
    rng = np.random.default_rng([d, 75])
    q, k, v = _inputs(rng, "float16", b=2, hq=4, hkv=2, sq=300, sk=517, d=d)
    prob = validate_attention(q, k, v, causal=True)
    o75, l75 = k90.forward(prob, q, k, v, config=config)
    o11, l11 = k90.forward(prob, q, k, v, config=_twin(d, config))
    assert bool(cp.all(o75 == o11)) and bool(cp.all(l75 == l11))


@pytest.mark.parametrize("operand", ["q", "k", "v"])
def test_tma_takes_an_unaligned_view(operand):
    """A contiguous view that starts 2 bytes into an allocation: the copy engine needs a
    16-byte aligned address, so the launcher reads an aligned copy (a device copy,
    _params.operand) and the result equals the aligned input's; the map check itself names the
    operand."""
    rng = np.random.default_rng(3)
    d, config = TMA_CONFIGS[0]
    q, k, v = _inputs(rng, "float16", b=1, hq=2, hkv=2, sq=64, sk=64, d=d)
    ops = {"q": q, "k": k, "v": v}
    x = ops[operand]
    base = cp.empty(x.size + 8, dtype=x.dtype)
    view = base[1:1 + x.size].reshape(x.shape)
    view[...] = x
    assert view.flags.c_contiguous and view.data.ptr % 16 == 2
    prob = validate_attention(q, k, v)
    want, want_lse = k90.forward(prob, q, k, v, config=config)
    ops[operand] = view
    got, got_lse = k90.forward(prob, ops["q"], ops["k"], ops["v"], config=config)
    assert bool((got == want).all()) and bool((got_lse == want_lse).all())
    assert not bool((view != x).any())  # the caller's array is untouched
    from xattn._backends.cupy_ import tma

    with pytest.raises(ValueError, match=f"{operand}: the TMA path needs a 16-byte aligned"):
        tma.check_operand(view, operand)


def test_tma_empty_keys():
    """Sk = 0: no map is encoded (a zero map is passed and never read); out 0, lse -inf."""
    d, config = TMA_CONFIGS[-1]
    q = cupy_array(np.ones((1, 2, 70, d)), "float16")
    k = cp.zeros((1, 2, 0, d), dtype=cp.float16)
    prob = validate_attention(q, k, k)
    out, lse = k90.forward(prob, q, k, k, config=config)
    assert bool(cp.all(out == 0)) and bool(cp.all(cp.isneginf(lse)))


# Head dims 256 and 192 (flash_fwd_sm90_ws_kv: mode 75 with separate K and V rings of two
# stages, P V by m64n256k16 / m64n192k16): the default configuration, called directly and
# through the dispatch.
WIDE = (192, 256)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", WIDE)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(64, 64), (77, 150), (130, 61), (128, 128), (200, 333),
                                   (1, 300), (300, 1), (515, 1000)])
def test_wide_head_dim(dtype, d, causal, sq, sk):
    """One key block, partial last blocks, Sq = 1 (the second consumer has no row), Sk = 1,
    Sk < Sq, and 16 key blocks (both rings turn over eight times); out and lse against the
    float64 oracle."""
    rng = np.random.default_rng([d, sq, sk, causal])
    q, k, v = _inputs(rng, dtype, sq=sq, sk=sk, d=d)
    _check(q, k, v, config=k90.CONFIGS[d], causal=causal)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", WIDE)
@pytest.mark.parametrize("case", ["gqa4", "mqa", "scale", "window", "causal_window",
                                  "sq_gt_sk_causal", "large_scores", "window_long"])
def test_wide_head_dim_options(dtype, d, case):
    rng = np.random.default_rng([d, len(case)])
    hq, hkv, sq, sk = 8, 2, 100, 173
    opts = {}
    amp = 1.0
    if case == "mqa":
        hkv = 1
    elif case == "scale":
        opts["scale"] = 0.3
    elif case == "window":
        opts["window"] = (20, 7)
    elif case == "causal_window":
        opts.update(causal=True, window=(33, None))
    elif case == "window_long":  # kb0 > 0: the rings start at a later key block
        hq, hkv, sq, sk = 4, 4, 640, 900
        opts["window"] = (130, 70)
    elif case == "sq_gt_sk_causal":
        sq, sk = 300, 70  # the first 230 rows see no key: out 0, lse -inf
        opts["causal"] = True
    elif case == "large_scores":
        amp = 4.0  # the running maximum moves a lot: exercises the rescale
    q, k, v = _inputs(rng, dtype, b=1 if case == "window_long" else 2, hq=hq, hkv=hkv,
                      sq=sq, sk=sk, d=d)
    if amp != 1.0:  # drawn in float64 and converted: q * amp would leave bfloat16 for float32
        q = cupy_array(amp * rng.standard_normal(q.shape), dtype)
    out, lse = _check(q, k, v, config=k90.CONFIGS[d], **opts)
    if case == "sq_gt_sk_causal":
        assert bool(cp.all(out[..., : sq - sk, :] == 0))
        assert bool(cp.all(cp.isneginf(lse[..., : sq - sk])))


def test_d256_dispatch(monkeypatch):
    """With its switch on, auto and "cupy" run the wgmma kernel's D = 256 entry for the plain
    options; score mods and block masks at D = 256 (and 192) are refused with a reason naming
    the head dim and go to cupy.sm80 (and are still right). Off, cupy.sm80 serves D = 256."""
    import logging

    import xattn
    from xattn import _backends
    from xattn._backends.cupy_ import instances

    rng = np.random.default_rng(255)
    q, k, v = _inputs(rng, "float16", b=1, sq=30, sk=41, d=256)
    plain = validate_attention(q, k, v, causal=True)
    monkeypatch.setattr(instances, "SM90_WIDE_ON", False)
    assert "SM90_WIDE_ON" in k90.supports(plain, {}, "forward")
    assert _backends.explain(plain, {})["backend"] == "cupy.sm80"
    monkeypatch.setattr(instances, "SM90_WIDE_ON", True)

    rng = np.random.default_rng(256)
    q, k, v = _inputs(rng, "float16", b=1, sq=300, sk=421, d=256)
    plain = validate_attention(q, k, v, causal=True)
    assert k90.supports(plain, {}, "forward") is None
    assert _backends.explain(plain, {})["backend"] == "cupy.sm90"
    capped = validate_attention(q, k, v, softcap=5.0)
    assert "head_dim 256" in k90.supports(capped, {}, "forward")
    assert _backends.explain(capped, {})["backend"] == "cupy.sm80"
    bm = xattn.BlockMask.causal(300, 421, block_size=128)
    masked = validate_attention(q, k, v, block_mask=bm)
    assert "head_dim 256" in k90.supports(masked, {}, "forward")
    with pytest.raises(ValueError, match="head_dim 256"):
        k90.launch_config(capped)
    with pytest.raises(NotImplementedError, match="block_mask at head_dim 256"):
        k90.forward(masked, q, k, v)
    q192, k192, v192 = _inputs(rng, "bfloat16", b=1, sq=70, sk=90, d=192)
    assert k90.supports(validate_attention(q192, k192, v192, window=(5, 5)), {}) is None
    biased = validate_attention(q192, k192, v192, alibi_slopes=cp.ones(4, cp.float32))
    assert "head_dim 192" in k90.supports(biased, {}, "forward")
    assert _backends.explain(biased, {})["backend"] == "cupy.sm80"

    calls = []

    class Kernels(logging.Handler):
        def emit(self, record):
            name = getattr(record, "xattn_kernel", "")
            if name.startswith("flash_fwd_"):
                calls.append(name)

    handler = Kernels()
    logger = logging.getLogger("xattn")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        for opts in ({"causal": True}, {"softcap": 5.0}):
            out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
            ref, ref_lse, _ = reference_attention(q, k, v, **opts)
            assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive_attention(q, k, v, **opts))
            assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(calls) == 2, calls
    assert calls[0] == "flash_fwd_sm90_f16_d256_n64_g2_o75", calls
    assert not calls[1].startswith("flash_fwd_sm90_"), calls


# Head dims between the built ones (instances.SM90_PAD_ON): the next entry with the operands
# zero-padded (flash_sm90.padded_dim), output cut back to D.
PADDED = (32, 80, 96, 112)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", PADDED)
@pytest.mark.parametrize("case", ["causal", "full_odd", "gqa_window", "softcap", "sq_gt_sk"])
def test_padded_head_dim(dtype, d, case):
    """out (D columns) and lse against the float64 oracle, the plain and _mods entries, the
    default scale 1/sqrt(D) of the unpadded head dim; the caller's arrays untouched."""
    rng = np.random.default_rng([d, len(case), 7])
    hq, hkv, sq, sk = 4, 2, 150, 171
    opts = {"causal": case in ("causal", "sq_gt_sk")}
    if case == "full_odd":
        sq, sk = 77, 300
    elif case == "gqa_window":
        hq, hkv = 8, 2
        opts["window"] = (40, 9)
    elif case == "softcap":
        opts["softcap"] = 5.0
    elif case == "sq_gt_sk":
        sq, sk = 200, 90
    q, k, v = _inputs(rng, dtype, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d)
    before = [x.copy() for x in (q, k, v)]
    out, lse = _check(q, k, v, **opts)
    assert out.shape == (*q.shape[:-1], d) and out.flags.c_contiguous
    for x, y in zip((q, k, v), before, strict=True):
        assert bool(cp.all(x == y))


def test_padded_head_dim_dispatch(monkeypatch):
    """Off, auto keeps cupy.sm80 for D = 96; on, cupy.sm90 serves it (and the result agrees)."""
    import xattn
    from xattn import _backends
    from xattn._backends.cupy_ import instances

    rng = np.random.default_rng(96)
    q, k, v = _inputs(rng, "float16", sq=130, sk=140, d=96)
    prob = validate_attention(q, k, v, causal=True)
    monkeypatch.setattr(instances, "SM90_PAD_ON", False)
    assert _backends.explain(prob, {})["backend"] == "cupy.sm80"
    ref = xattn.flash_attention(q, k, v, causal=True)
    monkeypatch.setattr(instances, "SM90_PAD_ON", True)
    assert _backends.explain(prob, {})["backend"] == "cupy.sm90"
    out = xattn.flash_attention(q, k, v, causal=True)
    assert float(cp.abs(out.astype(cp.float32) - ref.astype(cp.float32)).max()) < 2e-2
