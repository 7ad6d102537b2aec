"""The Hopper backward's compile-time switch ``XATTN90_BWD_EDGE_ROWS`` (flash_bwd_sm90.cu: the
largest head dim whose entries mask edge tiles by intervals, 64 in the shipped build), built at
0 (every head dim on the per-score rule) and 128 (every head dim on intervals) beside the
shipped kernel (needs CuPy and a cc 9.0 GPU).

The intervals: each key's interval of visible queries in the main kernel's key-major tiles (the
plain, TMA and TMA window entries), each query's interval of keys in the wgmma dq kernel's
tiles. The same scores become -inf either way, so every build must give the shipped build's
gradients bit for bit wherever those are reproducible: dk and dv of every entry, and all three
of deterministic=True (the _nodq twins, then the wgmma dq kernel for plain requests or
flash_bwd.cu's for windows). The default backward's dq is summed by bulk adds in whatever
order the blocks finish, so it is compared within float32 rounding of its largest entry.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import CC, cupy_array

import xattn
from xattn._array import validate_attention

cp = pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CC != 90, reason="needs a compute capability 9.0 (Hopper) GPU"),
]

from xattn._backends.cupy_ import _compile, instances  # noqa: E402
from xattn._backends.cupy_ import flash_bwd_sm90 as k90b  # noqa: E402

CASES = {  # name: (b, hq, hkv, sq, sk, options)
    "causal": (2, 4, 2, 200, 333, {"causal": True}),
    "causal_sq_gt_sk": (1, 4, 2, 333, 200, {"causal": True}),
    "causal_aligned": (1, 2, 2, 256, 256, {"causal": True}),
    "full_ragged": (1, 4, 2, 77, 150, {}),
    "window": (1, 4, 4, 300, 300, {"window": (37, 70)}),
    "window_left_causal": (2, 4, 2, 141, 203, {"causal": True, "window": (70, None)}),
    "window_right": (1, 2, 1, 260, 97, {"window": (None, 30)}),
    "window_0_0": (1, 2, 2, 150, 150, {"window": (0, 0)}),
}


@pytest.fixture
def switched(monkeypatch):
    """A function that makes every sm90 backward entry loaded afterwards carry the defines (the
    shipped entries are set aside and put back)."""
    saved = dict(_compile._functions)

    def use(extra):
        for name in ("bwd_sm90", "bwd_sm90_dq"):
            make = getattr(instances, name)
            monkeypatch.setattr(instances, name, lambda *a, make=make, **kw: dataclasses.replace(
                make(*a, **kw), extra=make(*a, **kw).extra + tuple(extra)))
        for key in [k for k in _compile._functions if k[1].startswith("flash_bwd_sm90")]:
            del _compile._functions[key]
        monkeypatch.setattr(_compile, "_cubins", {})

    yield use
    _compile._functions.clear()
    _compile._functions.update(saved)


def _inputs(case, d, dtype="float16", seed=0):
    b, hq, hkv, sq, sk, opts = CASES[case]
    rng = np.random.default_rng([seed, d, len(case)])
    q, do = (cupy_array(rng.standard_normal((b, hq, sq, d)), dtype) for _ in range(2))
    k, v = (cupy_array(rng.standard_normal((b, hkv, sk, d)), dtype) for _ in range(2))
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    prob = validate_attention(q, k, v, extra=(("dout", do), ("out", out), ("lse", lse)), **opts)
    return prob, (do, q, k, v, out, lse)


def _bits(x):
    return x.view(cp.uint16)


@pytest.mark.parametrize("config", ["tma", "tma2", "plain"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", sorted(CASES))
def test_edge_rows_equal_the_shipped_masking_bitwise(switched, case, d, config):
    # The build that masks this head dim the other way from the shipped one.
    value = 128 if d > 64 else 0
    window = CASES[case][5].get("window") is not None
    if config == "plain" and window:
        pytest.skip("config='plain' on a window is the cp.async window entry (per-score rules)")
    prob, args = _inputs(case, d)
    det_ok = config != "plain"  # the cp.async plain entry has no dK/dV-only twin
    ref = k90b.backward(prob, *args, config=config)
    ref_det = k90b.backward(prob, *args, config=config, deterministic=True) if det_ok else None
    switched([("XATTN90_BWD_EDGE_ROWS", value)])
    assert ("XATTN90_BWD_EDGE_ROWS", value) in instances.bwd_sm90("f16", d).extra
    got = k90b.backward(prob, *args, config=config)
    for label, x, y in zip(("dk", "dv"), got[1:], ref[1:], strict=True):
        nbad = int((_bits(x) != _bits(y)).sum())
        assert nbad == 0, f"[{case} d={d} {config}] {label}: {nbad} entries differ"
    dq, dq_ref = got[0].astype(cp.float32), ref[0].astype(cp.float32)
    bound = 1e-3 * float(cp.abs(dq_ref).max()) + 1e-6
    assert float(cp.abs(dq - dq_ref).max()) <= bound, f"[{case} d={d} {config}] dq"
    if det_ok:
        det = k90b.backward(prob, *args, config=config, deterministic=True)
        for label, x, y in zip(("dq", "dk", "dv"), det, ref_det, strict=True):
            nbad = int((_bits(x) != _bits(y)).sum())
            assert nbad == 0, f"[{case} d={d} {config} deterministic] {label}: {nbad} differ"
