"""The host side of the Hopper forward's TMA mode (mode 75): tensor-map arguments, their checks,
the launch argument's form, the instance list -- on the CPU, with cuTensorMapEncodeTiled
replaced by a fake (this machine has no CUDA driver). The GPU tests are in
tests/gpu/test_gpu_flash_sm90.py."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from xattn._backends.cupy_ import flash_sm90, instances, tma

ROOT = Path(__file__).resolve().parents[1]


class FakeEncode:
    """Records each call's arguments as Python values and writes a recognisable map."""

    def __init__(self, code=0):
        self.calls, self.code = [], code

    def __call__(self, out, dtype, rank, ptr, dims, strides, box, estr, inter, swz, l2, oob):
        self.calls.append({
            "out": out.value, "dtype": dtype, "rank": rank, "ptr": ptr.value,
            "dims": list(dims[:rank]), "strides": list(strides[:max(1, rank - 1)])[:rank - 1],
            "box": list(box[:rank]), "estr": list(estr[:rank]), "interleave": inter,
            "swizzle": swz, "l2": l2, "oob": oob})
        words = (ctypes.c_uint64 * 16).from_address(out.value)
        for i in range(16):
            words[i] = 0x1000 + i + len(self.calls)
        return self.code


@pytest.fixture
def fake(monkeypatch):
    f = FakeEncode()
    monkeypatch.setattr(tma, "_driver_encode", lambda: f)
    tma._encode_cached.cache_clear()
    tma._ROWS.clear()
    yield f
    tma._encode_cached.cache_clear()
    tma._ROWS.clear()


def test_encode_passes_the_cuda_h_values(fake):
    m = tma.encode_tiled(0x7F0000000100, "float16", (128, 300, 6), (256, 76800), (64, 128, 1))
    (c,) = fake.calls
    # cuda.h: FLOAT16 = 6, INTERLEAVE_NONE = 0, SWIZZLE_128B = 3, L2_PROMOTION_L2_128B = 2,
    # FLOAT_OOB_FILL_NONE = 0 (zeros).
    assert c == {"out": m.ctypes.data, "dtype": 6, "rank": 3, "ptr": 0x7F0000000100,
                 "dims": [128, 300, 6], "strides": [256, 76800], "box": [64, 128, 1],
                 "estr": [1, 1, 1], "interleave": 0, "swizzle": 3, "l2": 2, "oob": 0}
    bf = tma.encode_tiled(0x7F0000000100, "bfloat16", (64, 10, 1), (128, 1280), (64, 64, 1),
                          swizzle=64 * 2, l2_promotion=256)
    assert fake.calls[1]["dtype"] == 9 and fake.calls[1]["l2"] == 3
    assert bf.ctypes.data != m.ctypes.data


def test_map_is_a_size_one_aligned_read_only_array(fake):
    """CuPy passes a NumPy array of size one by value (its bytes become the parameter), and
    the encode writes through a 64-byte-aligned address."""
    m = tma.encode_tiled(0x10000, np.float16, (64, 64, 2), (128, 8192), (64, 64, 1))
    assert isinstance(m, np.ndarray) and m.size == 1 and m.dtype == tma.DESC_DTYPE
    assert m.itemsize == tma.DESC_BYTES == 128 and m.nbytes == 128
    assert m.__array_interface__["data"][0] % 64 == 0
    assert not m.flags.writeable
    assert [int(w) for w in m["w"][0]] == [0x1000 + i + 1 for i in range(16)]
    z = tma.null_desc()
    assert z.size == 1 and z.itemsize == 128 and not z.any() and z.ctypes.data % 64 == 0


def test_cache_reuses_identical_maps(fake):
    args = (0x20000, "f16", (128, 1000, 4), (256, 256000), (64, 128, 1))
    a = tma.encode_tiled(*args)
    b = tma.encode_tiled(*args)
    assert a is b and len(fake.calls) == 1
    c = tma.encode_tiled(*args, cache=False)
    assert c is not a and len(fake.calls) == 2
    tma.encode_tiled(0x20100, *args[1:])  # another address: another map
    assert len(fake.calls) == 3


def test_driver_error_is_a_runtime_error(monkeypatch):
    f = FakeEncode(code=1)
    monkeypatch.setattr(tma, "_driver_encode", lambda: f)
    monkeypatch.setattr(tma, "_error_string", lambda code: f"CUresult {code}: invalid argument")
    with pytest.raises(RuntimeError, match=r"cuTensorMapEncodeTiled failed: CUresult 1: "
                                           r"invalid argument .*dims \(64, 64, 1\)"):
        tma.encode_tiled(0x10000, "f16", (64, 64, 1), (128, 8192), (64, 64, 1), cache=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"ptr": 0x10008}, "ptr: .*16-byte aligned"),
    ({"ptr": 0}, "ptr: .*non-null"),
    ({"strides_bytes": (120, 8192)}, r"strides_bytes\[0\]: .*multiple of 16"),
    ({"strides_bytes": (128,)}, "strides_bytes: 2 strides"),
    ({"box": (128, 64, 1)}, r"box\[0\]: 256 bytes exceed the 128-byte swizzle"),
    ({"box": (64, 512, 1)}, r"box\[1\]: 1 to 256"),
    ({"box": (4, 64, 1), "swizzle": 0}, r"box\[0\]: .*multiple of 16"),
    ({"box": (64, 64)}, "box: 3 extents"),
    ({"dims": (64, 0, 1)}, r"dims\[1\]: 1 to 2\*\*32"),
    ({"dims": (1,) * 6, "strides_bytes": (16,) * 5, "box": (8,) * 6}, "dims: rank 1 to 5"),
    ({"swizzle": 96}, "swizzle: one of"),
    ({"l2_promotion": 32}, "l2_promotion: one of"),
])
def test_arguments_are_checked_before_the_driver(fake, kwargs, match):
    args = {"ptr": 0x10000, "dtype": "float16", "dims": (64, 64, 2),
            "strides_bytes": (128, 8192), "box": (64, 64, 1)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tma.encode_tiled(**args)
    assert not fake.calls


def test_dtype_is_checked(fake):
    with pytest.raises(TypeError, match="dtype: tensor maps are built for"):
        tma.encode_tiled(0x10000, np.float32, (64, 64, 2), (256, 16384), (32, 64, 1))


def test_bhsd_layout():
    """dims {D, S, B H} innermost first: rows past S are outside the map (zeros), so a tile at
    a sequence end never reads the next head."""
    assert tma.bhsd_layout((2, 3, 100, 128), 2, 128) == ((128, 100, 6), (256, 25600),
                                                         (64, 128, 1))
    assert tma.bhsd_layout((1, 1, 7, 64), 2, 64) == ((64, 7, 1), (128, 896), (64, 64, 1))


class _Data:
    def __init__(self, ptr):
        self.ptr = ptr


class FakeDeviceArray:
    """What check_operand / rows_map read of a CuPy array."""

    def __init__(self, shape, ptr, dtype=np.float16, contiguous=True):
        self.shape, self.ndim = tuple(shape), len(shape)
        self.dtype = np.dtype(dtype)
        self.size = int(np.prod(shape))
        self.data = _Data(ptr)
        self.strides = tuple(np.empty(shape, dtype=self.dtype).strides)
        self.flags = type("F", (), {"c_contiguous": contiguous})()


def test_rows_map_of_an_operand(fake):
    k = FakeDeviceArray((2, 4, 333, 64), 0x7F0000200000)
    m = tma.rows_map(k, "k", 64)
    assert m.size == 1 and fake.calls[-1]["dims"] == [64, 333, 8]
    assert fake.calls[-1]["strides"] == [128, 333 * 128]
    assert fake.calls[-1]["box"] == [64, 64, 1] and fake.calls[-1]["swizzle"] == 3
    empty = tma.rows_map(FakeDeviceArray((1, 2, 0, 64), 0), "k", 64)
    assert not empty.any() and len(fake.calls) == 1  # no map of extent 0 is encoded


@pytest.mark.parametrize("arr,match", [
    (FakeDeviceArray((1, 2, 10, 64), 0x10002), "k: the TMA path needs a 16-byte aligned base "
                                               "address, got 0x10002"),
    (FakeDeviceArray((1, 2, 10, 64), 0x10000, contiguous=False), "k: .*C-contiguous"),
    (FakeDeviceArray((2, 10, 64), 0x10000), "k: .*C-contiguous"),
])
def test_operand_checks(fake, arr, match):
    with pytest.raises(ValueError, match=match):
        tma.rows_map(arr, "k", 64)
    assert not fake.calls


def test_launcher_maps_in_order(fake):
    """The launcher's maps: K then V, BN-row boxes; q is checked for alignment too."""
    q = FakeDeviceArray((1, 4, 77, 128), 0x7F0000000000)
    k = FakeDeviceArray((1, 2, 150, 128), 0x7F0000100000)
    v = FakeDeviceArray((1, 2, 150, 128), 0x7F0000200000)
    mk, mv = flash_sm90._tma_maps(q, k, v, 128)
    assert [c["ptr"] for c in fake.calls] == [0x7F0000100000, 0x7F0000200000]
    assert all(c["box"] == [64, 128, 1] and c["dims"] == [128, 150, 2] for c in fake.calls)
    with pytest.raises(ValueError, match="q: the TMA path needs a 16-byte aligned"):
        flash_sm90._tma_maps(FakeDeviceArray((1, 4, 77, 128), 0x7F0000000004), k, v, 128)


def test_importing_tma_loads_no_driver():
    spec = importlib.util.spec_from_file_location("tma_fresh", tma.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._driver.cache_info().currsize == 0


def test_mode75_instances():
    """Mode 75 is the plain entries' default (measured faster than mode 11 on an H100), built
    with its own macro and argument list; mode 11 stays shipped for the _mods / _bm entries."""
    assert {c for c in instances.SM90_SHIPPED if c[3] == 75} == {(64, 64, 3, 75),
                                                                (128, 128, 2, 75),
                                                                (128, 176, 2, 75),
                                                                (192, 64, 2, 75),
                                                                (256, 64, 2, 75)}
    # The one-consumer entries of SM90_SHORT: mode 203 (Q by the copy engine too).
    assert {c for c in instances.SM90_SHIPPED if c[3] == 203} == {(64, 64, 1, 203),
                                                                 (64, 128, 1, 203),
                                                                 (128, 64, 1, 203)}
    assert all(c[2] == 75 for c in instances.SM90.values())
    for tn in ("f16", "bf16"):
        i = instances.sm90(tn, 128, (128, 2, 75))
        assert i.name == f"flash_fwd_sm90_{tn}_d128_n128_g2_o75"
        assert i.macro == "XATTN90_TMA_ONE" and "-DXATTN90_TMA=1" in i.defines
        assert i.macro_call() == f"XATTN90_TMA_ONE({tn}, 128, 128, 2, 75)"
    names = {i.name for i in instances.shipped()}
    assert {n for n in names if n.endswith("_o75")} == {
        f"flash_fwd_sm90_{tn}_d{d}_n{n}_g{g}_o75" for tn in ("f16", "bf16")
        for d, n, g in ((64, 64, 3), (128, 128, 2), (128, 176, 2), (192, 64, 2),
                        (256, 64, 2))}
    for d, cfg in ((64, (64, 3, 75)), (128, (128, 2, 75))):
        base = (cfg[0], cfg[1], 11)
        assert flash_sm90.smem_bytes(d, cfg) == flash_sm90.smem_bytes(d, base)
        assert flash_sm90.threads(cfg) == flash_sm90.threads(base)


@pytest.mark.parametrize("d", [192, 256])
def test_wide_head_dim_instances_and_shared_memory(d):
    """Head dims 192 and 256 run mode 75 only (flash_fwd_sm90_ws_kv: two K stages and two V
    stages of 64 keys, Q of 128 rows: 192 KiB + 1 KiB of alignment at D = 256), the plain
    entries only (no _mods / _bm instance: supports sends those requests to cupy.sm80)."""
    assert instances.SM90[d] == (64, 2, 75)
    assert d in flash_sm90.PLAIN_ONLY and not {64, 128} & flash_sm90.PLAIN_ONLY
    assert flash_sm90.smem_bytes(d, (64, 2, 75)) == 128 * d * 2 + 4 * 64 * d * 2 + 1024
    assert flash_sm90.smem_bytes(d, (64, 2, 75)) + 128 <= 232448  # + the mbarriers
    assert flash_sm90.threads((64, 2, 75)) == 384
    i = instances.sm90("bf16", d, (64, 2, 75))
    assert i.macro_call() == f"XATTN90_TMA_ONE(bf16, {d}, 64, 2, 75)" and i.ci
    assert not any(dict(i.params).get("XATTN90_D") == d and dict(i.params).get("XATTN90_MN")
                   for i in instances.shipped())


@pytest.mark.parametrize("d", [192, 256])
def test_wide_head_dim_refuses_mods_and_block_masks(d):
    """The plain-only head dims name themselves when score mods or a block mask come (host
    side: NumPy problems reach the same checks before any launch)."""
    import xattn
    from xattn._array import validate_attention

    x = np.zeros((1, 2, 130, d), dtype=np.float16)
    plain = validate_attention(x, x, x, causal=True, window=(64, None))
    assert flash_sm90._plain_only_reason(plain) is None
    assert flash_sm90.launch_config(plain) == (64, 2, 75)
    assert flash_sm90.launch_config(plain, (80, 2, 75) if d == 256 else None)[0] in (64, 80)
    capped = validate_attention(x, x, x, softcap=5.0)
    masked = validate_attention(x, x, x, block_mask=xattn.BlockMask.causal(130, block_size=128))
    for prob, what in ((capped, "score modifications"), (masked, "a block_mask")):
        assert flash_sm90._plain_only_reason(prob) == (
            f"{what} at head_dim {d}: the sm_90a kernel has plain entries only there (causal, "
            f"window, GQA); cupy.sm80 serves them")
        with pytest.raises(ValueError, match=f"head_dim {d}"):
            flash_sm90.launch_config(prob)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/bin/nvcc").exists(),
                    reason="needs nvcc")
def test_mode75_entries_compile_without_spills():
    """The mode-75 entries (also in CI's shipped list, checked here on their own; D = 192 / 256:
    the split-ring kernel, with the experimental 80-key tile) compile for sm_80 (the trap) and
    sm_90a, spill-free, warning-free."""
    spec = importlib.util.spec_from_file_location("check_kernels",
                                                  ROOT / "tools" / "check_kernels.py")
    ck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ck)
    items = [instances.sm90("f16", d, c) for d, c in ((64, (64, 3, 75)), (128, (128, 2, 75)),
                                                       (192, (64, 2, 75)), (256, (64, 2, 75)),
                                                       (256, (80, 2, 75)))]
    ok, log, res = ck.compile_file(ck.find_nvcc(), ck.KERNELS / "flash_fwd_sm90.cu", None, items)
    assert ok, log[-4000:]
    for i in items:
        for arch in ("sm_80", "sm_90a"):
            r = res[(i.name, arch)]
            assert r["spill_st"] == r["spill_ld"] == r["stack"] == 0, (i.name, arch, r)


def test_short_span_rule(monkeypatch):
    """instances.SM90_SHORT (one consumer warpgroup for short key spans): off by default, the
    default configuration everywhere; on, the mean visible keys per query row pick it for
    windows and short causal or full rows, never for score mods."""
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90

    def prob(s, d, **score):
        x = np.zeros((1, 2, s, d), np.float16)
        return validate_attention(x, x, x, **score)

    cases = {  # (S, D, options) -> config with the switch on
        (65536, 64, (("window", (256, 256)),)): (64, 1, 203),
        (1024, 64, (("causal", True),)): (64, 1, 203),
        (1024, 64, ()): (64, 1, 203),
        (4096, 64, (("causal", True),)): (64, 3, 75),
        (4096, 64, ()): (64, 3, 75),
        (1024, 128, (("causal", True),)): (64, 1, 203),
        (1024, 128, ()): (128, 2, 75),
        (4096, 128, (("causal", True), ("window", (300, None)))): (64, 1, 203),
    }
    assert flash_sm90.mean_span(prob(1024, 64, causal=True)) == 512.5
    assert flash_sm90.mean_span(prob(2048, 64, window=(100, 20))) == 121
    assert flash_sm90.mean_span(prob(2048, 64, causal=True, window=(100, 20))) == 101
    monkeypatch.setattr(instances, "SM90_SHORT_ON", False)
    for s, d, opts in cases:
        p = prob(s, d, **dict(opts))
        assert flash_sm90.launch_config(p) == instances.SM90[d], (s, d, opts)
    monkeypatch.setattr(instances, "SM90_SHORT_ON", True)
    for (s, d, opts), want in cases.items():
        assert flash_sm90.launch_config(prob(s, d, **dict(opts))) == want, (s, d, opts)
    capped = prob(1024, 64, causal=True, softcap=5.0)
    assert flash_sm90.launch_config(capped) == flash_sm90.MODS_CONFIGS[64]


def test_long_span_rule(monkeypatch):
    """instances.SM90_LONG (D = 128's 176-key tile): full rows whose key span reaches the
    threshold, never causal ones, windows, other head dims or score mods; off, the default."""
    from xattn._array import validate_attention
    from xattn._backends.cupy_ import flash_sm90

    def prob(sq, sk, d, **score):
        q, k = np.zeros((1, 2, sq, d), np.float16), np.zeros((1, 2, sk, d), np.float16)
        return validate_attention(q, k, k, **score)

    wide = instances.SM90_LONG[128][1]
    assert wide == (176, 2, 75) and (128, *wide) in instances.SM90_SHIPPED
    cases = {  # (Sq, Sk, D, options) -> config with the switch on
        (4096, 4096, 128, ()): wide,
        (1, 2048, 128, ()): wide,
        (2048, 2047, 128, ()): (128, 2, 75),
        (1024, 1024, 128, ()): (128, 2, 75),
        (8192, 8192, 128, (("causal", True),)): (128, 2, 75),
        (8192, 8192, 128, (("window", (4000, 4000)),)): (128, 2, 75),
        (4096, 4096, 64, ()): (64, 3, 75),
    }
    for (sq, sk, d, opts), want in cases.items():
        assert flash_sm90.launch_config(prob(sq, sk, d, **dict(opts))) == want, (sq, sk, opts)
    biased = prob(4096, 4096, 128, softcap=5.0)
    assert flash_sm90.launch_config(biased) == flash_sm90.MODS_CONFIGS[128]
    monkeypatch.setattr(instances, "SM90_LONG_ON", False)
    assert flash_sm90.launch_config(prob(4096, 4096, 128)) == instances.SM90[128]


def test_padded_head_dims(monkeypatch):
    """Head dims between the built ones run the next entry with zero-padded operands once
    instances.SM90_PAD_ON is on (off: refused with the switch's name); score mods pad as the
    plain entries do; above 128 the wide entries' switch decides as well."""
    import dataclasses
    from types import SimpleNamespace

    from xattn._array import validate_attention
    from xattn._backends.cupy_ import _params, flash_sm90

    assert [flash_sm90.padded_dim(d) for d in (32, 64, 80, 96, 128, 160, 200, 256, 300)] == [
        64, 64, 128, 128, 128, 192, 256, 256, None]
    monkeypatch.setattr(_params, "compute_capability", lambda: 90)
    gpu = SimpleNamespace(__name__="cupy")

    def prob(d, **score):
        x = np.zeros((1, 2, 100, d), np.float16)
        return dataclasses.replace(validate_attention(x, x, x, **score), xp=gpu)

    monkeypatch.setattr(instances, "SM90_PAD_ON", False)
    why = flash_sm90.supports(prob(96), {})
    assert why is not None and "SM90_PAD_ON" in why and "padded to 128" in why
    assert flash_sm90.supports(prob(64), {}) is None
    monkeypatch.setattr(instances, "SM90_PAD_ON", True)
    for d, score in ((96, {}), (80, {"causal": True}), (32, {"softcap": 5.0}),
                     (112, {"window": (10, 10)})):
        assert flash_sm90.supports(prob(d, **score), {}) is None, (d, score)
    padded = flash_sm90._padded(prob(96, causal=True))
    assert (padded.d, padded.dv) == (128, 128)
    assert padded.scale == prob(96).scale == pytest.approx(96 ** -0.5)
    assert flash_sm90.launch_config(padded) == (flash_sm90.short_config(padded)
                                                or instances.SM90[128])
    monkeypatch.setattr(instances, "SM90_WIDE_ON", False)
    assert "SM90_WIDE_ON" in flash_sm90.supports(prob(160), {})
    assert "head_dim 300" in flash_sm90.supports(prob(300), {})
