"""flex_attention: user score/mask functions against the float64 oracle.

The CPU kernel (numba.njit) runs in-process; the Numba CUDA kernel runs under Numba's CUDA
simulator in a subprocess (the simulator is chosen when numba is first imported), and on a
real GPU in the ``gpu``-marked test. Gradients: tests/test_flex_grad.py.
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


def sink_and_band(b, h, q_idx, kv_idx):
    return kv_idx < 40 or abs(q_idx + 600 - kv_idx) <= 150 or kv_idx % 301 < 9


def test_cpu_gaps_and_long_rows():
    # Rows whose visible keys have gaps (a sink, a band and a comb: keys between the
    # segments of a chunk must stay hidden) and rows longer than one chunk of keys (the
    # online softmax across chunks), GQA, against the oracle.
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, (2, 4, 700, 16), (2, 2, 2600, 16), 8, np.float64)
    i, j = np.arange(700)[:, None], np.arange(2600)[None, :]
    mask = (j < 40) | (np.abs(i + 600 - j) <= 150) | (j % 301 < 9)
    out, lse = xattn.flex_attention(q, k, v, mask_mod=sink_and_band, return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, mask=mask)
    assert_close(out, ref_out, xp=np, dtype=np.float64)
    assert_close(lse, ref_lse, xp=np)
    out = xattn.flex_attention(q, k, v)  # 2600 keys: three chunks per row
    ref_out, _, _ = reference_attention(q, k, v)
    assert_close(out, ref_out, xp=np, dtype=np.float64)
    # Garbage in keys hidden from every row, in later chunks: no effect (#9 item 6).
    k[..., 2000, :] = np.inf
    v[..., 2500, :] = np.nan
    assert not mask[:, [2000, 2500]].any()
    garbage = xattn.flex_attention(q, k, v, mask_mod=sink_and_band)
    ref_out, _, _ = reference_attention(q, k, v, mask=mask)
    assert np.isfinite(garbage).all()
    assert_close(garbage, ref_out, xp=np, dtype=np.float64)


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
    with pytest.raises(TypeError, match=r"score_mod_args\[0\]"):
        xattn.flex_attention(q, q, q, score_mod_args=(1.0,))
    with pytest.raises(TypeError, match="score_mod: expected a function of 6 arguments"):
        xattn.flex_attention(q, q, q, score_mod=alibi, score_mod_args=(SLOPES,))
    with pytest.raises(TypeError, match="return_lse"):
        xattn.flex_attention(q, q, q, return_lse="no")


def _forgot_return(b, h, q_idx, kv_idx):
    kv_idx <= q_idx  # noqa: B015 - the defect under test


LOOKUP = {0: 1.0}


def _reads_dict(score, b, h, q_idx, kv_idx):
    return score + LOOKUP[0]


def _bad_attribute(score, b, h, q_idx, kv_idx):
    return score.real_part


def test_unusable_functions_are_named():
    # A forgotten `return` would make every pair hidden; a dict is not compilable.
    q = np.zeros((1, 8, 4), np.float32)
    with pytest.raises(TypeError, match=r"mask_mod: _forgot_return .*forgotten `return`"):
        xattn.flex_attention(q, q, q, mask_mod=_forgot_return)
    with pytest.raises(TypeError, match=r"score_mod: _reads_dict reads 'LOOKUP', a dict"):
        xattn.flex_attention(q, q, q, score_mod=_reads_dict)
    with pytest.raises(TypeError, match=r"score_mod \(_bad_attribute\): Numba could not"):
        xattn.flex_attention(q, q, q, score_mod=_bad_attribute)


def _poison(score, b, h, q_idx, kv_idx):
    # +inf scores on query row 3, a NaN score at key 5 (one compiled function for both)
    if q_idx == 3:
        return math.inf
    return math.nan if kv_idx == 5 else score


def test_nan_propagates_like_flash():
    # NaN in q, or a score made NaN/+inf, gives NaN in that row (lse NaN), never an empty
    # row (0, -inf); other rows are untouched.
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, (2, 40, 8), (2, 40, 8), 8)
    q[1, 7, 2] = np.nan
    out, lse = xattn.flex_attention(q, k, v, mask_mod=causal, return_lse=True)
    ref, ref_lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    assert np.isnan(out[1, 7]).all() and np.isnan(lse[1, 7]) and np.isfinite(np.delete(
        out.reshape(80, 8), 47, axis=0)).all()
    q[1, 7, 2] = 0
    out, lse = xattn.flex_attention(q, k, v, score_mod=_poison, mask_mod=causal,
                                    return_lse=True)
    nan_rows = np.isnan(out).all(axis=-1)
    assert np.array_equal(nan_rows, np.isnan(lse))
    expect = np.zeros(40, bool)
    expect[3] = True  # +inf scores
    expect[5:] = True  # rows that see key 5
    assert np.array_equal(nan_rows, np.broadcast_to(expect, (2, 40)))
    assert np.isfinite(out[:, [0, 1, 2, 4]]).all()


@pytest.mark.parametrize(
    ("shape_q", "shape_kv"),
    [((2, 0, 8, 4), (2, 2, 8, 4)),  # Hq = 0
     ((0, 2, 8, 4), (0, 2, 8, 4)),  # B = 0
     ((2, 2, 0, 4), (2, 2, 8, 4)),  # Sq = 0
     ((2, 2, 8, 4), (2, 2, 0, 4))],  # Sk = 0: every row is empty
    ids=["Hq=0", "B=0", "Sq=0", "Sk=0"],
)
def test_zero_sized_inputs(shape_q, shape_kv):
    q = np.ones(shape_q, np.float32)
    k = np.ones(shape_kv, np.float32)
    out, lse = xattn.flex_attention(q, k, k, mask_mod=causal, return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:-1]
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    dq, dk, dv, dargs = xattn.flex_attention_backward(out, q, k, k, out, lse, mask_mod=causal)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dargs == ()
    assert not dq.any() and not dk.any() and not dv.any()


def window_by_head(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= 8 * (h + 1)


DOC = np.zeros((2, 150), np.int32)  # document ids, captured by the mask below


def documents(b, h, q_idx, kv_idx):
    return DOC[b, q_idx] == DOC[b, kv_idx]


def test_block_mask_per_head_and_per_batch():
    # The derived block mask is per head when mask_mod reads h (GQA groups mix them), per
    # batch element when it reads b; lengths that cut the 32-key blocks and GQA rows.
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, (2, 4, 150, 16), (2, 2, 150, 16), 8)
    out = xattn.flex_attention(q, k, v, mask_mod=window_by_head)
    i = np.arange(150)
    mask = np.stack([np.abs(i[:, None] - i[None]) <= 8 * (h + 1) for h in range(4)])
    ref, _, _ = reference_attention(q, k, v, mask=mask)
    assert_close(out, ref, xp=np, dtype=np.float32)
    # Document ids captured by the mask: read at call time, so new ids (in place) give a new
    # block mask with the same compiled kernel.
    from xattn._backends.numpy_ import flex_njit

    for n, doc in enumerate((np.sort(rng.integers(0, 4, size=(2, 150)), axis=1),
                             np.repeat([[0], [1]], 150, axis=1) + (i >= 75))):
        DOC[...] = doc
        out = xattn.flex_attention(q, k, v, mask_mod=documents)
        if n == 0:
            compiled = len(flex_njit._modules)
        mask = (DOC[:, None, :, None] == DOC[:, None, None, :])
        ref, _, _ = reference_attention(q, k, v, mask=mask)
        assert_close(out, ref, xp=np, dtype=np.float32)
    assert len(flex_njit._modules) == compiled


def test_args_and_lambdas_reuse_the_compiled_kernel(monkeypatch):
    from xattn._backends.numpy_ import _pool, flex_njit

    calls = []
    run_jobs = _pool.run_jobs
    monkeypatch.setattr(_pool, "run_jobs", lambda fn, jobs: calls.append(1) or run_jobs(fn, jobs))
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, (2, 50, 8), (2, 50, 8), 8)
    tables = [rng.standard_normal(2, dtype=np.float32) for _ in range(3)]
    outs = []
    for t in tables:  # a new lambda object each time, with new argument values
        outs.append(xattn.flex_attention(
            q, k, v, score_mod=lambda s, b, h, i, j, t: s + t[h], score_mod_args=(t,)))
        if len(outs) == 1:
            compiled = len(flex_njit._modules)
    assert len(flex_njit._modules) == compiled
    for t, out in zip(tables, outs, strict=True):
        ref, _, _ = reference_attention(q, k, v, bias=t[:, None, None])
        assert_close(out, ref, xp=np, dtype=np.float32)
    assert calls  # the jobs ran on xattn's one pool (XATTN_NUM_THREADS, affinity)
    # A captured array is passed to the kernel too: new contents are seen.
    cap = np.zeros(2, np.float32)
    f = lambda s, b, h, i, j: s + cap[h]  # noqa: E731
    before = xattn.flex_attention(q, k, v, score_mod=f)
    cap[1] = 5.0
    after = xattn.flex_attention(q, k, v, score_mod=f)
    assert np.array_equal(before[0], after[0]) and not np.allclose(before[1], after[1])


CACHE_SCRIPT = textwrap.dedent(
    """
    import sys, time, numpy as np
    t = time.perf_counter()
    import xattn
    from xattn._backends.numpy_ import flex_njit
    def softcap(score, b, h, q_idx, kv_idx):
        return 20.0 * np.tanh(score / 20.0)
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx
    q = np.ones((2, 64, 16), np.float32)
    xattn.flex_attention(q, q, q, score_mod=softcap, mask_mod=causal)
    mod = next(iter(flex_njit._modules.values()))
    misses = sum(mod.forward_job.stats.cache_misses.values())
    print("SECONDS", time.perf_counter() - t, "MISSES", misses)
    """
)


@pytest.mark.slow
def test_fresh_process_loads_compiled_kernels_from_disk(tmp_path):
    env = dict(os.environ, XATTN_CACHE_DIR=str(tmp_path))
    script = tmp_path / "use_flex.py"
    script.write_text(CACHE_SCRIPT)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(done.stdout.split())
    assert runs[0][3] == "1" and runs[1][3] == "0"  # compiled once, then loaded
    assert float(runs[1][1]) < float(runs[0][1])


SIM_SCRIPT = textwrap.dedent(
    """
    import math
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
    # NaN in q and a score_mod returning +inf give NaN rows, as on the CPU and in flash.
    q[1, 0, 5, 0] = np.nan
    out, lse = xattn.flex_attention(q, k, v, return_lse=True, backend="numba_cuda")
    assert np.isnan(out[1, 0, 5]).all() and np.isnan(lse[1, 0, 5])
    assert np.isfinite(np.delete(out.reshape(-1, 4), 2 * 66 + 5, axis=0)).all()
    q[1, 0, 5, 0] = 0
    inf7 = lambda s, b, h, i, j: math.inf if i == 7 else s
    with np.errstate(invalid="ignore"):  # the simulator computes inf - inf in NumPy
        out = xattn.flex_attention(q, k, v, score_mod=inf7, backend="numba_cuda")
    assert np.isnan(out[:, :, 7]).all() and np.isfinite(out[:, :, 8:]).all()
    # score_mod_args reach the GPU kernel as arguments.
    t = np.array([0.5, -1.0])
    out = xattn.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j, t: s + t[h],
                               score_mod_args=(t,), backend="numba_cuda")
    ref, _, _ = reference_attention(q, k, v, bias=t[:, None, None])
    assert_close(out, ref, xp=np, dtype=np.float32)
    # The backward kernel against the CPU one (float64, a table, a learned slope, a helper-
    # free score_mod with a captured array, GQA, Sk > Sq).
    q, k, v = q[:, :, :9].astype(np.float64), k[:, :, :11].astype(np.float64), v[:, :, :11]
    v = v.astype(np.float64)
    dout = rng.standard_normal((2, 2, 9, 4))
    fix = np.array([0.3, 0.1])
    def smod(score, b, h, q_idx, kv_idx, table, slopes):
        x = score + table[h, min(abs(q_idx + 2 - kv_idx), 4)]
        return 2.0 * math.tanh((x - (slopes[h] + fix[h]) * abs(q_idx + 2 - kv_idx)) / 2.0)
    def causal2(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + 2
    targs = (rng.standard_normal((2, 5)), np.array([0.5, 0.2]))
    res = []
    for be in ("numba", "numba_cuda"):
        out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=causal2,
                                        score_mod_args=targs, return_lse=True, backend=be)
        g = xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=smod,
                                          mask_mod=causal2, score_mod_args=targs, backend=be)
        res.append((out, *g[:3], *g[3]))
    for a, b in zip(*res, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-10)
    print("SIMULATOR OK")
    """
)


def test_numba_cuda_kernel_under_simulator(tmp_path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    script = tmp_path / "sim.py"
    script.write_text(SIM_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIMULATOR OK" in done.stdout


NO_SOURCE = textwrap.dedent(
    """
    import numpy as np, xattn
    from xattn.testing import assert_close, reference_attention
    table = np.array([0.5, -1.0])
    def smod(score, b, h, q_idx, kv_idx):
        return score + table[h]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 30, 8)).astype(np.float32)
    out, lse = xattn.flex_attention(q, q, q, score_mod=smod, return_lse=True)
    ref, _, _ = reference_attention(q, q, q, bias=table[:, None, None])
    assert_close(out, ref, xp=np, dtype=np.float32)
    try:
        xattn.flex_attention_backward(out, q, q, q, out, lse, score_mod=smod)
    except TypeError as exc:
        assert "source" in str(exc) and "score_mod" in str(exc), exc
        print("NO SOURCE OK")
    """
)


def test_function_without_source():
    # `python -c`: no source to translate. The forward compiles the function object (numba
    # freezes what it captured); the backward, which needs the source, says so.
    done = subprocess.run([sys.executable, "-c", NO_SOURCE], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NO SOURCE OK" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numba_cuda_kernel_on_gpu(dtype):
    cp = pytest.importorskip("cupy")
    if cp.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, (2, 4, 300, 64), (2, 2, 300, 64), 64, np.dtype(dtype))
    out = xattn.flex_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), score_mod=alibi,
                               mask_mod=causal, backend="numba_cuda")
    ref, _, _ = reference_attention(q, k, v, causal=True, alibi_slopes=SLOPES)
    naive = None if dtype == "float32" else naive_attention(q, k, v, causal=True,
                                                            alibi_slopes=SLOPES)
    assert_close(out, ref, xp=cp, dtype=np.dtype(dtype), naive=naive)
