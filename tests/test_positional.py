"""RoPE and ALiBi against Hugging Face transformers (golden values) and their defining properties.

tests/data/rope_golden.npz was made by tests/data/make_rope_golden.py with transformers'
modeling_rope_utils, LlamaRotaryEmbedding, the Llama / GPT-NeoX / GPT-J apply_rotary_pos_emb
and BLOOM's build_alibi_tensor (versions inside the file and the script).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
from conftest import BF16, random_array

import xattn
from xattn.positional import _scaled_inv_freq

GOLDEN = np.load(pathlib.Path(__file__).parent / "data" / "rope_golden.npz")
ROPE_CASES = sorted({k.split("/")[0] for k in GOLDEN.files} - {"alibi", "versions", "gptj"})
HF_ONLY_KEYS = ("rope_theta", "partial_rotary_factor", "head_dim", "max_position_embeddings")


def golden(case):
    params = json.loads(str(GOLDEN[f"{case}/params"]))
    g = {k.split("/")[1]: GOLDEN[k] for k in GOLDEN.files if k.startswith(case + "/")}
    return params, g


def xattn_scaling(params):
    """The HF rope parameters dict as a user would pass it, plus the model's context length."""
    scaling = {k: v for k, v in params.items() if k not in ("head_dim",)}
    return scaling


def rotary_dim(params):
    return int(params["head_dim"] * params.get("partial_rotary_factor", 1.0))


def phase_tolerance(positions, inv_freq):
    # transformers computes position * inv_freq and cos/sin in float32: the phase carries a
    # relative error of a few float32 epsilons, so the tolerance grows with the angle.
    phase = np.abs(positions[:, None].astype(np.float64) * inv_freq[None, :])
    return 3e-7 * phase + 3e-7


def test_golden_file_provenance():
    assert str(GOLDEN["versions"]).startswith("transformers ")
    assert {"default", "linear", "dynamic_long", "dynamic_short", "llama3", "partial"} <= set(
        ROPE_CASES
    )


@pytest.mark.parametrize("case", ROPE_CASES)
def test_inv_freq_matches_transformers(case):
    params, g = golden(case)
    seq_len = int(g["positions"].max()) + 1
    inv = _scaled_inv_freq(rotary_dim(params), params["rope_theta"], xattn_scaling(params),
                           seq_len)
    np.testing.assert_allclose(inv, g["inv_freq"], rtol=4e-7, atol=0)


# Cases whose positions are 0..S-1 are also run with the length S instead of the positions.
RANGE_CASES = [
    c for c in ROPE_CASES
    if np.array_equal(GOLDEN[f"{c}/positions"], np.arange(len(GOLDEN[f"{c}/positions"])))
]


@pytest.mark.parametrize(
    "case,as_length",
    [(c, False) for c in ROPE_CASES] + [(c, True) for c in RANGE_CASES],
)
def test_cos_sin_match_transformers(case, as_length):
    params, g = golden(case)
    pos = g["positions"]
    rd = rotary_dim(params)
    cos, sin = xattn.rotary_cos_sin(
        len(pos) if as_length else pos, rd, base=params["rope_theta"],
        scaling=xattn_scaling(params), dtype=np.float64,
    )
    assert cos.shape == sin.shape == (len(pos), rd // 2)
    tol = phase_tolerance(pos, g["inv_freq"].astype(np.float64))
    for name, ours, theirs in (("cos", cos, g["cos"]), ("sin", sin, g["sin"])):
        # HF lays the table out twice, [freqs | freqs], for rotate_half.
        for half in (theirs[:, : rd // 2], theirs[:, rd // 2:]):
            err = np.abs(ours - half)
            assert (err <= tol).all(), f"{name}: max error {err.max():.3g}"


@pytest.mark.parametrize("case", ROPE_CASES)
def test_apply_rotary_matches_transformers(case):
    params, g = golden(case)
    rd = rotary_dim(params)
    cos, sin = xattn.rotary_cos_sin(g["positions"], rd, base=params["rope_theta"],
                                    scaling=xattn_scaling(params), dtype=np.float64)
    q = g["q"].astype(np.float64)
    out = xattn.apply_rotary(q, cos, sin)
    tol = phase_tolerance(g["positions"], g["inv_freq"].astype(np.float64)).max(axis=1)
    err = np.abs(out - g["q_rot"]).max(axis=(0, 1, 3))
    assert (err <= 4 * tol * np.abs(q).max() + 1e-6).all(), err.max()
    np.testing.assert_array_equal(out[..., rd:], q[..., rd:])  # partial rotary passes through
    out32 = xattn.apply_rotary(g["q"], cos.astype(np.float32), sin.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out, atol=2e-6 * max(1.0, float(tol.max()) * 1e6))


def test_gptj_interleaved_matches_transformers():
    params = json.loads(str(GOLDEN["gptj/params"]))
    rd = params["rotary_dim"]
    cos, sin = xattn.rotary_cos_sin(len(GOLDEN["gptj/positions"]), rd, dtype=np.float64)
    np.testing.assert_allclose(cos, GOLDEN["gptj/cos"], atol=2e-6)
    np.testing.assert_allclose(sin, GOLDEN["gptj/sin"], atol=2e-6)
    q = GOLDEN["gptj/q"].astype(np.float64).transpose(0, 2, 1, 3)  # GPT-J stores (B, S, H, D)
    out = xattn.apply_rotary(q, cos, sin, interleaved=True).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out, GOLDEN["gptj/q_rot"], atol=1e-5)


# --- scaling options and errors -------------------------------------------------------------


def test_scaling_accepts_legacy_type_key():
    new = xattn.rotary_cos_sin(50, 16, scaling={"rope_type": "linear", "factor": 2.0})
    old = xattn.rotary_cos_sin(50, 16, scaling={"type": "linear", "factor": 2.0})
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_array_equal(new[1], old[1])


def test_linear_scaling_is_position_interpolation():
    plain = xattn.rotary_cos_sin(np.arange(0, 40, 4), 16, dtype=np.float64)
    scaled = xattn.rotary_cos_sin(np.arange(0, 160, 16), 16, dtype=np.float64,
                                  scaling={"rope_type": "linear", "factor": 4.0})
    np.testing.assert_allclose(scaled[0], plain[0], atol=1e-12)
    np.testing.assert_allclose(scaled[1], plain[1], atol=1e-12)


@pytest.mark.parametrize("key", ["max_position_embeddings", "original_max_position_embeddings"])
def test_dynamic_ntk_context_keys(key):
    # Below the trained context nothing changes; beyond it the base grows.
    scaling = {"rope_type": "dynamic", "factor": 2.0, key: 64}
    short = xattn.rotary_cos_sin(64, 16, scaling=scaling, dtype=np.float64)
    plain = xattn.rotary_cos_sin(64, 16, dtype=np.float64)
    np.testing.assert_array_equal(short[0], plain[0])
    long_ = xattn.rotary_cos_sin(200, 16, scaling=scaling, dtype=np.float64)
    assert np.abs(long_[0][:64] - plain[0]).max() > 1e-3


def test_rope_theta_in_scaling_must_agree_with_base():
    # transformers 5 puts rope_theta inside the rope parameters; never combine it silently
    # with a different base.
    params = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    with pytest.raises(ValueError, match=r"rope_theta=500000.0 disagrees with base=10000.0"):
        xattn.rotary_cos_sin(10, 8, scaling=params)
    a = xattn.rotary_cos_sin(10, 8, base=500000.0, scaling=params)
    b = xattn.rotary_cos_sin(10, 8, base=500000.0, scaling={"rope_type": "linear", "factor": 2.0})
    np.testing.assert_array_equal(a[0], b[0])


def test_default_rope_type_is_no_scaling():
    a = xattn.rotary_cos_sin(20, 8, scaling={"rope_type": "default"})
    b = xattn.rotary_cos_sin(20, 8)
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize(
    "scaling,exc,match",
    [
        ({"rope_type": "yarn", "factor": 2.0}, ValueError, r"rope_type 'yarn' is not supported"),
        ({"rope_type": "linear"}, ValueError, r"needs 'factor'"),
        ({"rope_type": "dynamic", "factor": 2.0}, ValueError, r"max_position_embeddings"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0}, ValueError, r"original_max_position_embeddings"),
        ({"rope_type": "linear", "factor": 0.0}, ValueError, r"factor must be positive"),
        ("linear", TypeError, r"scaling: expected a dict"),
    ],
)
def test_scaling_errors(scaling, exc, match):
    with pytest.raises(exc, match=match):
        xattn.rotary_cos_sin(10, 8, scaling=scaling)


def test_dynamic_needs_more_than_two_channels():
    with pytest.raises(ValueError, match="rotary_dim > 2"):
        xattn.rotary_cos_sin(10, 2, scaling={"rope_type": "dynamic", "factor": 2.0,
                                             "max_position_embeddings": 4})


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((10, 7), {}, ValueError, r"rotary_dim: expected a positive even int, got 7"),
        ((10, 0), {}, ValueError, r"rotary_dim"),
        ((10, 8.0), {}, TypeError, r"rotary_dim: expected an int"),
        ((-1, 8), {}, ValueError, r"positions_or_length: expected >= 0"),
        ((np.arange(4.0), 8), {}, TypeError, r"positions_or_length: expected an int or an integer"),
        (([0, 1, 2], 8), {}, TypeError, r"positions_or_length"),
        # a zero or negative base made NaN tables silently
        ((4, 8), {"base": 0}, ValueError, r"base: expected a positive number, got 0"),
        ((4, 8), {"base": -10000.0}, ValueError, r"base: expected a positive number"),
        ((4, 8), {"base": float("inf")}, ValueError, r"base: expected a finite number"),
        ((4, 8), {"base": "10000"}, TypeError, r"base: expected a real number"),
        # an integer table dtype truncated every cos/sin to 0 or 1
        ((4, 8), {"dtype": np.int32}, TypeError, r"dtype: expected a floating dtype .* int32"),
        ((4, 8), {"dtype": "bogus"}, TypeError, r"dtype: expected a floating dtype"),
    ],
)
def test_rotary_cos_sin_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        xattn.rotary_cos_sin(*args, **kwargs)


@pytest.mark.parametrize(
    "x_shape,cos_shape,exc,match",
    [
        ((5, 8), (5, 5), ValueError, r"rotary_dim 2\*5=10 exceeds x's head dim 8"),
        ((5, 8), (4, 4), ValueError, r"cos: expected \(\.\.\., 5, 4\)"),
        ((8,), (1, 4), ValueError, r"x: expected at least 2 dims"),
        ((3, 5, 8), (2, 5, 4), ValueError, r"does not broadcast against x"),
    ],
)
def test_apply_rotary_errors(x_shape, cos_shape, exc, match):
    x = np.ones(x_shape, np.float32)
    c = np.ones(cos_shape, np.float32)
    with pytest.raises(exc, match=match):
        xattn.apply_rotary(x, c, c)


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_apply_rotary_interleaved_must_be_bool(flag):
    # "no" used to mean True (truthiness).
    x = np.ones((4, 8), np.float32)
    c, s = xattn.rotary_cos_sin(4, 8)
    with pytest.raises(TypeError, match=r"interleaved: expected a bool"):
        xattn.apply_rotary(x, c, s, interleaved=flag)


def test_apply_rotary_dtype_errors():
    x = np.ones((4, 8), np.float32)
    c, s = xattn.rotary_cos_sin(4, 8)
    with pytest.raises(TypeError, match=r"x: expected a floating dtype"):
        xattn.apply_rotary(np.ones((4, 8), np.int32), c, s)
    with pytest.raises(ValueError, match=r"cos and sin must have one shape"):
        xattn.apply_rotary(x, c, s[:, :2])


# --- RoPE properties ------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_is_relative(rng, interleaved):
    # <R(m) q, R(n) k> depends on m - n only: shifting both positions changes nothing.
    d, rd = 24, 16
    q, k = random_array(rng, (1, d)), random_array(rng, (1, d))

    def dot(m, n):
        c, s = xattn.rotary_cos_sin(np.array([m, n]), rd, dtype=np.float64)
        qr = xattn.apply_rotary(q, c[:1], s[:1], interleaved=interleaved)
        kr = xattn.apply_rotary(k, c[1:], s[1:], interleaved=interleaved)
        return float((qr * kr).sum())

    for m, n, shift in [(3, 1, 10), (0, 7, 100), (50, 50, 3)]:
        assert math.isclose(dot(m, n), dot(m + shift, n + shift), rel_tol=1e-10, abs_tol=1e-10)
    assert not math.isclose(dot(3, 1), dot(1, 3), rel_tol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_keeps_norm_and_position_zero(rng, interleaved):
    x = random_array(rng, (2, 3, 30, 20))
    c, s = xattn.rotary_cos_sin(30, 12, dtype=np.float64)
    y = xattn.apply_rotary(x, c, s, interleaved=interleaved)
    assert y.shape == x.shape and y is not x
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-12)
    np.testing.assert_allclose(y[..., 0, :], x[..., 0, :], rtol=1e-14)


def test_interleaved_is_rotate_half_on_permuted_channels(rng):
    d, rd = 12, 8
    x = random_array(rng, (9, d))
    c, s = xattn.rotary_cos_sin(9, rd, dtype=np.float64)
    perm = np.r_[np.arange(0, rd, 2), np.arange(1, rd, 2), np.arange(rd, d)]
    a = xattn.apply_rotary(x, c, s, interleaved=True)
    b = xattn.apply_rotary(x[:, perm], c, s)
    np.testing.assert_allclose(a[:, perm], b, rtol=1e-14, atol=1e-14)


def test_rotary_per_batch_positions(rng):
    # Per-sequence positions (e.g. after a KV-cache offset): cos (B, 1, S, rd/2) for (B, H, S, D).
    x = random_array(rng, (2, 3, 5, 8))
    pos = np.array([np.arange(5), np.arange(10, 15)])
    c, s = xattn.rotary_cos_sin(pos, 8, dtype=np.float64)
    assert c.shape == (2, 5, 4)
    y = xattn.apply_rotary(x, c[:, None], s[:, None])
    for b in range(2):
        cb, sb = xattn.rotary_cos_sin(pos[b], 8, dtype=np.float64)
        np.testing.assert_allclose(y[b], xattn.apply_rotary(x[b], cb, sb), rtol=1e-14)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_rotary_low_precision(rng, dtype_name):
    if dtype_name == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    dt = BF16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    x = random_array(rng, (4, 40, 32), dt)
    c, s = xattn.rotary_cos_sin(40, 32, dtype=np.float32)
    y = xattn.apply_rotary(x, c, s)
    assert y.dtype == dt
    ref = xattn.apply_rotary(x.astype(np.float64), c.astype(np.float64), s.astype(np.float64))
    eps = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}[dtype_name]
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2 * eps, atol=4 * eps)


def test_rotary_table_dtype():
    c, s = xattn.rotary_cos_sin(8, 4, dtype=np.float16)
    assert c.dtype == s.dtype == np.float16
    c, s = xattn.rotary_cos_sin(np.arange(8, dtype=np.int32), 4)
    assert c.dtype == np.float32


# --- ALiBi ----------------------------------------------------------------------------------


def paper_slopes(n):
    """The ALiBi paper's get_slopes (ofirpress/attention_with_linear_biases), transcribed."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", range(1, 34))
def test_alibi_slopes_match_bloom(n):
    ours = xattn.alibi_slopes(n)
    assert ours.shape == (n,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, GOLDEN[f"alibi/{n}"], rtol=1e-6)
    ours64 = xattn.alibi_slopes(n, dtype=np.float64)
    np.testing.assert_allclose(ours64, paper_slopes(n), rtol=1e-14)


def test_alibi_slopes_dtype_must_be_floating():
    with pytest.raises(TypeError, match=r"dtype: expected a floating dtype"):
        xattn.alibi_slopes(8, dtype=np.int64)


@pytest.mark.parametrize("n,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                   (True, TypeError)])
def test_alibi_slopes_errors(n, exc):
    with pytest.raises(exc, match="num_heads"):
        xattn.alibi_slopes(n)


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (4, 4), (3, 7), (7, 3), (0, 5)])
def test_alibi_bias_values(q_len, k_len):
    slopes = np.array([[0.5, 0.25], [1.0, 0.125]])  # (batch, heads)
    bias = xattn.alibi_bias(slopes, q_len, k_len)
    assert bias.shape == (2, 2, q_len, k_len) and bias.dtype == slopes.dtype
    for b, h, i, j in np.ndindex(bias.shape):
        assert bias[b, h, i, j] == -slopes[b, h] * abs(i + k_len - q_len - j)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_alibi_bias_16bit_slopes_exact_distances(dtype_name):
    # Distances used to be computed in the slopes' dtype: float16 rounds integers past 2048
    # (bias[0, 3001, 3000] was -0.0 instead of -0.25), bfloat16 past 256. The bias is now
    # computed and returned in float32, the values flash_attention adds in its kernels.
    if dtype_name == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes missing")
    dt = BF16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    slopes = xattn.alibi_slopes(4).astype(dt)
    bias = xattn.alibi_bias(slopes, 4096, 4096)
    assert bias.dtype == np.float32
    s0 = float(slopes[0])
    assert bias[0, 3001, 3000] == np.float32(-s0)
    assert bias[0, 4000, 3000] == np.float32(-s0 * 1000)
    i = np.arange(4096)
    np.testing.assert_array_equal(bias[0, i, 0], (-np.float32(s0) * i).astype(np.float32))


def test_alibi_bias_errors():
    with pytest.raises(ValueError, match="q_len"):
        xattn.alibi_bias(np.ones(2), -1, 3)
    with pytest.raises(ValueError, match="slopes: expected shape"):
        xattn.alibi_bias(np.ones(()), 2, 3)
    with pytest.raises(TypeError, match="slopes"):
        xattn.alibi_bias(np.ones(2, np.int64), 2, 3)
