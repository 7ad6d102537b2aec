"""The Hopper forward's compile-time switches (flash_fwd_sm90.cu), each built beside the shipped
kernel, so that a switch is tested before tools/gpu_fwd_variants.py's timings may turn it on or
off (needs CuPy and a cc 9.0 GPU):

- ``XATTN90_LAZY`` (off in the shipped build): the running max moves only by more than 2^t.
  Other roundings, so the output is checked against the float64 oracle with the usual 16-bit
  tolerance.
- ``XATTN90_NWG1_BLOCKS`` (3 in the shipped build, since 2026-12-06): thread blocks an SM for the
  one-consumer D = 64 entry with 64-key tiles (80 registers a thread at launch and 136 for the
  consumer at three). The two-block build does the same arithmetic, so bit for bit; the shipped
  entry must reach an occupancy of 3.

The edge tiles' masking by each row's interval of visible keys (``mask_rows``) was a third
switch, compared bit for bit with the per-score rule on these cases before it replaced it
(H100, 2026-12-06); the float64-oracle tests of tests/gpu/ check it now.
"""

from __future__ import annotations

import dataclasses

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

from xattn._backends.cupy_ import _compile, flash_sm90, instances  # noqa: E402

CASES = {  # name: (sq, sk, hq, hkv, options)
    "causal": (200, 333, 4, 2, {"causal": True}),
    "causal_sq_gt_sk": (333, 200, 4, 2, {"causal": True}),
    "window": (300, 300, 4, 4, {"window": (37, 70)}),
    "window_left": (257, 400, 4, 1, {"window": (100, None)}),
    "window_right": (130, 61, 2, 2, {"window": (None, 5)}),
    "causal_window": (400, 400, 4, 2, {"causal": True, "window": (65, 0)}),
    "window_0_0": (150, 150, 2, 2, {"window": (0, 0)}),
    "full_ragged": (77, 150, 4, 2, {}),
}
# The configurations a switch reaches: the defaults and the short-span / persistent ones.
CONFIGS = sorted({(d, tuple(cfg)) for d in (64, 128)
                  for cfg in (flash_sm90.CONFIGS[d], *instances.SM90_SHORT[d][1:], (64, 1, 235))
                  if (d, *cfg) in flash_sm90.BUILT})


@pytest.fixture
def switched(monkeypatch):
    """A function that makes every sm90 forward entry loaded afterwards carry the defines (the
    shipped entries are set aside and put back)."""
    saved = dict(_compile._functions)

    def use(extra):
        monkeypatch.setattr(flash_sm90, "_instance", lambda *a: dataclasses.replace(
            instances.sm90(*a), extra=instances.sm90(*a).extra + tuple(extra)))
        for key in [k for k in _compile._functions if k[1].startswith("flash_fwd_sm90")]:
            del _compile._functions[key]
        monkeypatch.setattr(_compile, "_cubins", {})

    yield use
    _compile._functions.clear()
    _compile._functions.update(saved)


def _run(case, d, config, dtype="float16", seed=0):
    sq, sk, hq, hkv, opts = CASES[case]
    rng = np.random.default_rng(seed)
    q = cupy_array(rng.standard_normal((2, hq, sq, d)), dtype)
    k = cupy_array(rng.standard_normal((2, hkv, sk, d)), dtype)
    v = cupy_array(rng.standard_normal((2, hkv, sk, d)), dtype)
    prob = validate_attention(q, k, v, **opts)
    out, lse = flash_sm90.forward(prob, q, k, v, config=config)
    return (q, k, v, opts), out, lse


@pytest.mark.parametrize("d,config", CONFIGS)
@pytest.mark.parametrize("case", ["causal", "window", "causal_window", "full_ragged"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lazy_rescale_against_the_oracle(switched, case, d, config, dtype):
    switched([("XATTN90_LAZY", 8)])
    (q, k, v, opts), out, lse = _run(case, d, config, dtype)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive_attention(q, k, v, **opts),
                 name="out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3, name="lse")


def test_lazy_rescale_with_growing_scores(switched):
    """Scores that rise along the keys by more than 2^8 between tiles: the max must move, and
    rows whose early tiles are all far below the late ones keep their precision."""
    rng = np.random.default_rng(1)
    sk, d = 700, 64
    q = cupy_array(np.ones((1, 2, 130, d)) + 0.1 * rng.standard_normal((1, 2, 130, d)),
                   "float16")
    ramp = np.linspace(0, 6, sk)[None, None, :, None]
    k = cupy_array(ramp + 0.1 * rng.standard_normal((1, 2, sk, d)), "float16")
    v = cupy_array(rng.standard_normal((1, 2, sk, d)), "float16")
    switched([("XATTN90_LAZY", 8)])
    prob = validate_attention(q, k, v, causal=True)
    out, lse = flash_sm90.forward(prob, q, k, v)
    ref, ref_lse, _ = reference_attention(q, k, v, causal=True)
    assert_close(out, ref, xp=cp, dtype=q.dtype, naive=naive_attention(q, k, v, causal=True),
                 name="out")
    assert_close(lse, ref_lse, xp=cp, dtype=np.float32, atol=2e-3, rtol=1e-3, name="lse")


def _blocks_an_sm(config):
    fn = flash_sm90.get_kernel("f16", 64, config)
    return cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
        fn.kernel.ptr, flash_sm90.threads(config), flash_sm90.smem_bytes(64, config))


@pytest.mark.parametrize("case", sorted(CASES))
def test_three_blocks_an_sm_equal_the_two_block_build_bitwise(switched, case):
    config = (64, 1, 203)
    _, out0, lse0 = _run(case, 64, config)
    assert _blocks_an_sm(config) == 3
    switched([("XATTN90_NWG1_BLOCKS", 2)])
    _, out1, lse1 = _run(case, 64, config)
    assert _blocks_an_sm(config) == 2
    assert cp.array_equal(out0, out1), case
    assert cp.array_equal(lse0, lse1, equal_nan=True), case
