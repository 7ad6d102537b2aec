"""flex_attention with NaN/inf in hidden positions (issue #9 item 6, docs/numerics.rst).

A key hidden by ``mask_mod`` (or by a ``score_mod`` that returns -inf) never contributes,
whatever its values; a query that sees no key gets no gradient into any key. Visible non-finite
values propagate as IEEE says, exactly as in ``flash_attention`` with the equivalent boolean
mask. Checked forward and backward against flash and the float64 oracle, on the CPU kernel and
(in a subprocess, tiny shapes) the Numba CUDA kernels under the simulator.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xattn
from xattn.testing import assert_close, reference_attention, reference_attention_backward

pytest.importorskip("numba")

B, HQ, HKV, SQ, SK, D, DV = 2, 4, 2, 150, 170, 16, 8
PADK, PADQ = 37, 12  # left-padded keys, right-padded queries
DOCS = np.repeat(np.arange(5), 34)[:SK]  # document ids of the keys (and of queries + 20)
TABLE = np.linspace(-1.0, 1.0, HQ)


def causal(b, h, q_idx, kv_idx):
    return kv_idx + 10 <= q_idx  # the first 10 queries and the last 10 + 20 keys: hidden


def padded(b, h, q_idx, kv_idx):
    return kv_idx >= PADK and q_idx < SQ - PADQ


def documents(b, h, q_idx, kv_idx):
    return DOCS[q_idx + 20] == DOCS[kv_idx] and kv_idx >= PADK


def hide_by_score(score, b, h, q_idx, kv_idx):
    if kv_idx >= PADK and q_idx < SQ - PADQ:
        return score + TABLE[h]
    return -math.inf


def _dense(rule):
    i = np.arange(SQ)[:, None]
    j = np.arange(SK)[None, :]
    if rule is causal:
        return j + 10 <= i
    if rule is documents:
        return (DOCS[i + 20] == DOCS[j]) & (j >= PADK)
    return (j >= PADK) & (i < SQ - PADQ)


RULES = {
    "causal": (None, causal),
    "padding": (None, padded),
    "documents": (None, documents),
    "score_mod -inf": (hide_by_score, None),
}


def _problem(seed, rule, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, HQ, SQ, D)).astype(dtype)
    k = rng.standard_normal((B, HKV, SK, D)).astype(dtype)
    v = rng.standard_normal((B, HKV, SK, DV)).astype(dtype)
    dout = rng.standard_normal((B, HQ, SQ, DV)).astype(dtype)
    vis = _dense(rule)
    keys, rows = ~vis.any(axis=0), ~vis.any(axis=1)
    # Padding filled with garbage: every kind of non-finite value in hidden keys and rows.
    k[..., keys, :] = np.inf
    k[0, 1, np.flatnonzero(keys)[::2], 3] = np.nan
    v[..., keys, :] = np.nan
    v[1, 0, np.flatnonzero(keys)[::3], :] = -np.inf
    q[..., rows, :] = np.nan
    dout[..., rows, :] = np.inf
    return q, k, v, dout, vis


def _flex(q, k, v, dout, rule_name):
    smod, mmod = RULES[rule_name]
    out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod, return_lse=True)
    grads = xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=smod,
                                          mask_mod=mmod)
    return out, lse, grads


def _flash_opts(rule_name, vis):
    opts = {"mask": vis}
    if rule_name == "score_mod -inf":
        opts["bias"] = np.broadcast_to(TABLE[:, None, None], (HQ, SQ, SK))
    return opts


def _same_nans(got, want, name, tol=1e-9):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, name
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN pattern")
    fin = ~np.isnan(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize("rule_name", list(RULES))
def test_hidden_garbage_reaches_nothing(rule_name):
    """Garbage only where hidden: flex equals flash with the boolean mask and the oracle,
    every result is finite, hidden keys get dk = dv = 0 and hidden rows dq = 0."""
    rule = RULES[rule_name][0] or RULES[rule_name][1]
    q, k, v, dout, vis = _problem(1, rule)
    out, lse, (dq, dk, dv, _) = _flex(q, k, v, dout, rule_name)
    opts = _flash_opts(rule_name, vis)
    fo, fl = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    flash_grads = xattn.flash_attention_backward(dout, q, k, v, fo, fl, **opts)
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    refs = reference_attention_backward(dout, q, k, v, **opts)
    grads = zip(("dq", "dk", "dv"), (dq, dk, dv), flash_grads, refs, strict=True)
    for name, got, fl_, r in (("out", out, fo, ref), ("lse", lse, fl, ref_lse), *grads):
        assert not np.isnan(got).any(), name
        _same_nans(got, fl_, name)
        assert_close(got, r, xp=np, dtype=np.float64, name=name)
    keys, rows = ~vis.any(axis=0), ~vis.any(axis=1)
    assert not dk[..., keys, :].any() and not dv[..., keys, :].any()
    assert not dq[..., rows, :].any() and not out[..., rows, :].any()


@pytest.mark.parametrize("rule_name", ["causal", "documents", "score_mod -inf"])
def test_visible_non_finite_values_spread_as_in_flash(rule_name):
    """Besides the hidden garbage, NaN/inf in visible positions (a value, a key, a query):
    the same NaN pattern and values as flash forward and as the oracle backward."""
    rule = RULES[rule_name][0] or RULES[rule_name][1]
    q, k, v, dout, vis = _problem(2, rule)
    v[0, 1, 120, 3] = np.nan  # visible to the rows that see key 120: column 3 NaN
    k[1, 0, 140, 5] = np.nan  # NaN score: the rows that see key 140 turn NaN
    q[0, 2, 60, 0] = np.nan  # a visible query: its row turns NaN
    out, lse, grads = _flex(q, k, v, dout, rule_name)
    opts = _flash_opts(rule_name, vis)
    fo, fl = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    assert np.isnan(out).any()
    _same_nans(out, fo, "out")
    _same_nans(lse, fl, "lse")
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    _same_nans(out, ref, "out vs oracle", tol=1e-9)
    # The oracle holds hidden pairs at exactly 0 even in a NaN row (p = exp(-inf - NaN));
    # flash_attention_backward's exact tiles do not for dv/dk of keys hidden from a NaN row.
    refs = reference_attention_backward(dout, q, k, v, **opts)
    for name, got, r in zip(("dq", "dk", "dv"), grads[:3], refs, strict=True):
        _same_nans(got, r, name, tol=1e-8)


def t5_bias(score, b, h, q_idx, kv_idx, table):
    if kv_idx < PADK:
        return -math.inf
    return score + table[h, min(abs(q_idx + 20 - kv_idx), 7)]


def test_table_gradient_ignores_hidden_garbage():
    # dargs of a score_mod table: garbage in keys the score_mod hides, in keys a mask_mod
    # hides and in rows that see nothing leaves the table's gradient as with clean inputs.
    q, k, v, dout, _ = _problem(3, causal)
    clean = [x.copy() for x in (q, k, v, dout)]
    for x in clean:
        x[~np.isfinite(x)] = 0.5
    table = np.random.default_rng(4).standard_normal((HQ, 8))

    def run(q, k, v, dout):
        out, lse = xattn.flex_attention(q, k, v, score_mod=t5_bias, mask_mod=causal,
                                        score_mod_args=(table,), return_lse=True)
        return out, *xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=t5_bias,
                                                   mask_mod=causal, score_mod_args=(table,))

    k[..., :PADK, :] = np.nan  # hidden by the score_mod
    got, want = run(q, k, v, dout), run(*clean)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got[:4], want[:4], strict=True):
        vis = np.isfinite(w) & np.isfinite(g)
        assert vis.all(), name
        np.testing.assert_allclose(g, w, atol=1e-10, err_msg=name)
    assert np.isfinite(got[4][0]).all()
    np.testing.assert_allclose(got[4][0], want[4][0], atol=1e-10)


def test_float32_hidden_value_nan():
    # The case in float32 through flex: v[650] = NaN behind the mask_mod; under a
    # causal mask_mod, NaN exactly in the 50 rows that see key 650.
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 700, 16)).astype(np.float32) for _ in range(3))
    v[0, 650] = np.nan
    out = xattn.flex_attention(q, k, v, mask_mod=lambda b, h, i, j: j != 650)
    assert np.isfinite(out).all()
    out = xattn.flex_attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i)
    assert np.flatnonzero(np.isnan(out).any(-1)).tolist() == list(range(650, 700))


# --- property: random shapes, random masks, garbage where hidden ---------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def keep_mask(b, h, q_idx, kv_idx, keep):
    return keep[q_idx, kv_idx]


@st.composite
def problems(draw):
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    sq, sk = draw(st.integers(1, 90)), draw(st.integers(1, 130))
    d, dv = draw(st.sampled_from([1, 8])), draw(st.sampled_from([3, 8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keep = rng.random((sq, sk)) < draw(st.floats(0.05, 1.0))
    if draw(st.booleans()):
        keep &= np.tri(sq, sk, draw(st.integers(-5, 40)), dtype=bool)
    keep[:, : draw(st.integers(0, 20))] = False
    keep[sq - draw(st.integers(0, min(10, sq))):, :] = False
    q = rng.standard_normal((2, hq, sq, d))
    k = rng.standard_normal((2, hkv, sk, d))
    v = rng.standard_normal((2, hkv, sk, dv))
    dout = rng.standard_normal((2, hq, sq, dv))
    keys, rows = ~keep.any(axis=0), ~keep.any(axis=1)
    junk = np.array([np.nan, np.inf, -np.inf])
    for x, where in ((k, keys), (v, keys), (q, rows), (dout, rows)):
        x[..., where, :] = rng.choice(junk, size=x[..., where, :].shape)
    return q, k, v, dout, keep


@settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 25)), deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_random_masks_with_garbage_match_the_oracle(problem):
    q, k, v, dout, keep = problem
    out, lse = xattn.flex_attention(q, k, v, mask_mod=keep_mask, score_mod_args=(keep,),
                                    return_lse=True)
    dq, dk, dv, _ = xattn.flex_attention_backward(dout, q, k, v, out, lse, mask_mod=keep_mask,
                                                  score_mod_args=(keep,))
    ref, ref_lse, _ = reference_attention(q, k, v, mask=keep)
    refs = reference_attention_backward(dout, q, k, v, mask=keep)
    grads = zip(("dq", "dk", "dv"), (dq, dk, dv), refs, strict=True)
    for name, got, want in (("out", out, ref), ("lse", lse, ref_lse), *grads):
        assert not np.isnan(got).any(), name
        assert_close(got, want, xp=np, dtype=np.float64, name=name)


# --- the Numba CUDA kernels, under the simulator --------------------------------------------

SIM_SCRIPT = textwrap.dedent(
    """
    import math
    import numpy as np, xattn
    def window(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= 3 and kv_idx >= 4
    def hide(score, b, h, q_idx, kv_idx):
        return score if kv_idx >= 4 else -math.inf
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, 12, 4)) for _ in range(4))
    k[..., :4, :] = np.inf
    v[..., :4, :] = np.nan
    v[0, 1, 9, 2] = np.nan  # visible
    for smod, mmod in ((None, window), (hide, None)):
        res = []
        for be in ("numba", "numba_cuda"):
            with np.errstate(invalid="ignore"):  # the simulator computes in NumPy
                out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=mmod,
                                                return_lse=True, backend=be)
                g = xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=smod,
                                                  mask_mod=mmod, backend=be)
            res.append((out, *g[:3]))
        for a, b in zip(*res, strict=True):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_allclose(b[~np.isnan(b)], a[~np.isnan(a)], atol=1e-10)
        assert not np.isnan(res[0][2][..., :4, :]).any()  # dk of the hidden keys
        assert np.isnan(res[0][0]).any()
    print("SIMULATOR HIDDEN OK")
    """
)


def test_numba_cuda_hidden_garbage_under_simulator(tmp_path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    script = tmp_path / "sim.py"
    script.write_text(SIM_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIMULATOR HIDDEN OK" in done.stdout
