"""flex_attention: user score/mask functions against the float64 oracle.

The CPU kernel (numba.njit) runs in-process; the Numba CUDA kernel runs under Numba's CUDA
simulator in a subprocess (the simulator is chosen when numba is first imported), and on a
real GPU in the ``gpu``-marked test.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xattn
from xattn.testing import assert_close, naive_attention, reference_attention

pytest.importorskip("numba")

SLOPES = xattn.alibi_slopes(4, dtype=np.float64)
CAP = 2.0


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return CAP * math.tanh(score / CAP)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def nothing_for_even_rows(b, h, q_idx, kv_idx):
    return q_idx % 2 == 1


def _inputs(rng, shape_q, shape_kv, dv, dtype=np.float32):
    q = rng.standard_normal(shape_q).astype(dtype)
    k = rng.standard_normal(shape_kv).astype(dtype)
    v = rng.standard_normal((*shape_kv[:-1], dv)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize(
    ("score_mod", "mask_mod", "ref_opts"),
    [
        (None, None, {}),
        (None, causal, {"causal": True}),
        (alibi, causal, {"causal": True, "alibi_slopes": SLOPES}),
        (softcap, None, {"softcap": CAP}),
    ],
    ids=["plain", "causal", "alibi+causal", "softcap"],
)
@pytest.mark.parametrize("dtype", [np.float32])
def test_cpu_matches_oracle(score_mod, mask_mod, ref_opts, dtype):
    rng = np.random.default_rng(7)
    # Sq = Sk here (the user functions above use raw indices); 70 and 300 cut the 64/256 tiles.
    q, k, v = _inputs(rng, (2, 4, 70, 24), (2, 2, 70, 24), 12, dtype)
    out, lse = xattn.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                    return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
    assert_close(out, ref_out, xp=np, dtype=dtype)
    assert_close(lse, ref_lse, xp=np)


def test_cpu_float64():
    # Each dtype is a separate compilation (seconds): one float64 case covers that path.
    test_cpu_matches_oracle(alibi, causal, {"causal": True, "alibi_slopes": SLOPES}, np.float64)


def test_cpu_empty_rows_and_long_keys():
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, (3, 50, 16), (3, 300, 16), 16)
    out, lse = xattn.flex_attention(q, k, v, mask_mod=nothing_for_even_rows, return_lse=True)
    mask = np.zeros((50, 300), bool)
    mask[1::2] = True
    ref_out, ref_lse, _ = reference_attention(q, k, v, mask=mask)
    assert np.all(out[:, ::2] == 0) and np.all(np.isneginf(lse[:, ::2]))
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


def test_cpu_float16_and_scale():
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, (2, 40, 32), (2, 40, 32), 32, np.float16)
    out = xattn.flex_attention(q, k, v, mask_mod=causal, scale=0.3)
    ref, _, _ = reference_attention(q, k, v, causal=True, scale=0.3)
    assert_close(out, ref, dtype=np.float16,
                 naive=naive_attention(q, k, v, causal=True, scale=0.3), atol=1e-3)


def test_bad_inputs():
    q = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(TypeError, match="score_mod"):
        xattn.flex_attention(q, q, q, score_mod=3)
    with pytest.raises(ValueError, match="backend"):
        xattn.flex_attention(q, q, q, backend="torch")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        with pytest.raises(TypeError, match="CuPy arrays"):
            xattn.flex_attention(q, q, q, backend="numba_cuda")
    with pytest.raises(ValueError, match="head_dim"):
        xattn.flex_attention(q, np.zeros((2, 4, 9), np.float32), q)


SIM_SCRIPT = textwrap.dedent(
    """
    import numpy as np, xattn
    from xattn.testing import assert_close, reference_attention
    slopes = xattn.alibi_slopes(2, dtype=np.float64)
    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * abs(q_idx + 3 - kv_idx)
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + 3
    rng = np.random.default_rng(0)
    # GQA (2 query heads on 1 kv head), Sk = Sq + 3, lengths that cut the 64-row/32-key tiles.
    q = rng.standard_normal((2, 2, 66, 8)).astype(np.float32)
    k = rng.standard_normal((2, 1, 69, 8)).astype(np.float32)
    v = rng.standard_normal((2, 1, 69, 4)).astype(np.float32)
    out, lse = xattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=causal,
                                    return_lse=True, backend="numba_cuda")
    ref, ref_lse, _ = reference_attention(q, k, v, causal=True, alibi_slopes=slopes)
    assert_close(out, ref, xp=np, dtype=np.float32)
    assert_close(lse, ref_lse)
    print("SIMULATOR OK")
    """
)


def test_numba_cuda_kernel_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", SIM_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIMULATOR OK" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numba_cuda_kernel_on_gpu(dtype):
    cp = pytest.importorskip("cupy")
    if cp.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, (2, 4, 300, 64), (2, 2, 300, 64), 64, np.dtype(dtype))
    out = xattn.flex_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), score_mod=alibi,
                               mask_mod=causal)
    ref, _, _ = reference_attention(q, k, v, causal=True, alibi_slopes=SLOPES)
    naive = None if dtype == "float32" else naive_attention(q, k, v, causal=True,
                                                            alibi_slopes=SLOPES)
    assert_close(out, ref, xp=cp, dtype=np.dtype(dtype), naive=naive)
