"""Gradients: flex_attention_backward (score_mod derived from source) and flash dbias.

The reference is PyTorch autograd (CPU, float64) on the dense scores, written out in each
test: q/k/v, the bias and the score_mod_args arrays are leaves, so every gradient that xattn
returns is compared with what autograd finds for the same function.
"""

import math

import numpy as np
import pytest

import xattn

pytest.importorskip("numba")
torch = pytest.importorskip("torch")

B, HQ, HKV, SQ, SK, D, DV = 2, 4, 2, 70, 90, 8, 6
OFF = SK - SQ
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])


def _inputs(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, HQ, SQ, D)).astype(dtype)
    k = rng.standard_normal((B, HKV, SK, D)).astype(dtype)
    v = rng.standard_normal((B, HKV, SK, DV)).astype(dtype)
    dout = rng.standard_normal((B, HQ, SQ, DV)).astype(dtype)
    return rng, q, k, v, dout


def _torch_attention(q, k, v, dout, scores, mask=None):
    """Autograd through ``softmax(scores(raw) masked) @ v``; returns the leaves' gradients."""
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    kk = tk.repeat_interleave(HQ // HKV, dim=1)
    vv = tv.repeat_interleave(HQ // HKV, dim=1)
    raw = tq @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    s = scores(raw, i, j)
    if mask is not None:
        s = s.masked_fill(~mask(i, j), -math.inf)
    out = torch.softmax(s, dim=-1) @ vv
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()


def _check(got, want, atol=1e-10):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=1e-8)


# The score functions under test, as users write them.


def alibi_captured(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx + OFF - kv_idx)


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx + OFF


def t5_table_softcap_slopes(score, h, q_idx, kv_idx, table, slopes, fixed):
    # T5-style: a learned bias per (head, clipped relative distance), then a tanh cap, and
    # ALiBi for keys in the past with a fixed slope plus a learned one per head.
    rel = min(max(kv_idx - q_idx - OFF, -16), 16)
    x = score + table[h, rel + 16]
    if kv_idx < q_idx + OFF:
        x = x - (fixed[h] + slopes[h]) * (q_idx + OFF - kv_idx)
    return 4.0 * math.tanh(x / 4.0)


@pytest.mark.slow  # the captured-array path is also in the table test below
def test_alibi_captured_slopes_and_causal_mask():
    _, q, k, v, dout = _inputs(0)
    out, lse = xattn.flex_attention(q, k, v, score_mod=alibi_captured, mask_mod=causal,
                                    return_lse=True)
    dq, dk, dv, dargs = xattn.flex_attention_backward(
        dout, q, k, v, out, lse, score_mod=alibi_captured, mask_mod=causal)
    slopes = torch.tensor(SLOPES)[:, None, None]
    want = _torch_attention(q, k, v, dout, lambda s, i, j: s - slopes * (i + OFF - j).abs(),
                            mask=lambda i, j: j <= i + OFF)
    _check((out, dq, dk, dv), want)
    assert dargs == ()


def test_table_softcap_slopes_and_document_mask():
    # One compiled pair covers the table gather (scatter-add), the softcap chain rule, a
    # learned per-head slope inside a branch, and an integer argument (no gradient).
    rng, q, k, v, dout = _inputs(1)
    table = rng.standard_normal((HQ, 33)) * 0.5
    slopes = rng.uniform(-0.05, 0.05, HQ)
    doc = np.zeros((B, SK), np.int64)
    doc[0, 40:] = 1
    doc[1, 25:] = 1
    doc[1, 60:] = 2
    args = (doc, table, slopes)
    mask_q = doc[:, OFF:]  # query i sits at key position i + OFF

    def doc_mask(b, h, q_idx, kv_idx, doc, table, slopes):
        return doc[b, q_idx + OFF] == doc[b, kv_idx]

    def smod(score, b, h, q_idx, kv_idx, doc, table, slopes):
        # a helper function, and a captured array (SLOPES) handed to it
        return t5_table_softcap_slopes(score, h, q_idx, kv_idx, table, slopes, SLOPES)

    out, lse = xattn.flex_attention(q, k, v, score_mod=smod, mask_mod=doc_mask,
                                    score_mod_args=args, return_lse=True)
    dq, dk, dv, (ddoc, dtable, dslopes) = xattn.flex_attention_backward(
        dout, q, k, v, out, lse, score_mod=smod, mask_mod=doc_mask, score_mod_args=args)
    assert ddoc is None
    assert dtable.shape == table.shape and dtable.dtype == table.dtype

    tt = torch.tensor(table, requires_grad=True)
    ts = torch.tensor(slopes, requires_grad=True)
    tdoc = torch.tensor(doc)
    tmq = torch.tensor(mask_q)

    def scores(s, i, j):
        rel = (j - i - OFF).clamp(-16, 16)
        x = s + tt[:, (rel + 16)][None]
        past = (j < i + OFF)
        fixed = torch.tensor(SLOPES)[:, None, None]
        x = torch.where(past, x - (fixed + ts[:, None, None]) * (i + OFF - j), x)
        return 4.0 * torch.tanh(x / 4.0)

    def mask(i, j):
        return (tmq[:, None, :, None] == tdoc[:, None, None, :])

    want = _torch_attention(q, k, v, dout, scores, mask=mask)
    _check((out, dq, dk, dv), want)
    _check((dtable, dslopes), (tt.grad.numpy(), ts.grad.numpy()))


@pytest.mark.slow
def test_float32_gradients():
    rng, q, k, v, dout = _inputs(2, np.float32)
    slopes = SLOPES.astype(np.float32)

    def alibi(score, b, h, q_idx, kv_idx, slopes):
        return score - slopes[h] * abs(q_idx + OFF - kv_idx)

    out, lse = xattn.flex_attention(q, k, v, score_mod=alibi, score_mod_args=(slopes,),
                                    return_lse=True)
    dq, dk, dv, (ds,) = xattn.flex_attention_backward(dout, q, k, v, out, lse, score_mod=alibi,
                                                      score_mod_args=(slopes,))
    assert dq.dtype == ds.dtype == np.float32
    ts = torch.tensor(slopes.astype(np.float64), requires_grad=True)
    want = _torch_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                            dout.astype(np.float64),
                            lambda s, i, j: s - ts[:, None, None] * (i + OFF - j).abs())
    _check((dq, dk, dv, ds), (*want[1:], ts.grad.numpy()), atol=2e-4)


def _loop(score, b, h, q_idx, kv_idx, t):
    for n in range(2):
        score = score + t[n]
    return score


def _unknown_call(score, b, h, q_idx, kv_idx):
    return np.arcsinh(score)


@pytest.mark.parametrize(("fn", "args", "match"), [
    (_loop, (np.ones(2),), r"score_mod: cannot differentiate _loop: loops"),
    (_unknown_call, (), r"_unknown_call: a call to arcsinh\(\)"),
])
def test_non_differentiable_constructs_are_named(fn, args, match):
    q = np.ones((1, 8, 4))
    with pytest.raises(TypeError, match=match):
        xattn.flex_attention_backward(q, q, q, q, q, np.zeros((1, 8)), score_mod=fn,
                                      score_mod_args=args)


# --- flash_attention_backward(return_dbias=True) -----------------------------------------


@pytest.mark.parametrize("bias_shape", [
    (B, HQ, SQ, SK),  # full
    (SQ, SK),  # shared by batch and heads
    (HQ, 1, SK),  # per head and key
    (B, 1, 1, SK),  # key padding bias
    (1, HQ, SQ, 1),  # per query row (no effect on the output: dbias sums to ~0 per row)
])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_dbias_broadcast_shapes(backend, bias_shape, softcap):
    rng, q, k, v, dout = _inputs(3)
    bias = rng.standard_normal(bias_shape)
    opts = dict(bias=bias, causal=True, softcap=softcap, backend=backend)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
    dq, dk, dv, dbias = xattn.flash_attention_backward(dout, q, k, v, out, lse,
                                                       return_dbias=True, **opts)
    tb = torch.tensor(bias, requires_grad=True)

    def scores(s, i, j):
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        return s + tb

    want = _torch_attention(q, k, v, dout, scores, mask=lambda i, j: j <= i + OFF)
    _check((dq, dk, dv, dbias), (*want[1:], tb.grad.numpy()))
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype


def test_dbias_window_block_mask_and_deterministic(backend):
    rng, q, k, v, dout = _inputs(4, np.float32)
    bias = rng.standard_normal((SQ, SK)).astype(np.float32)
    bm = xattn.BlockMask.sliding_window(SQ, SK, window=(20, 20), block_size=16)
    results = []
    for opts in (dict(window=(20, 20)), dict(block_mask=bm)):
        opts = dict(bias=bias, backend=backend, **opts)
        out, lse = xattn.flash_attention(q, k, v, return_lse=True, **opts)
        runs = [xattn.flash_attention_backward(dout, q, k, v, out, lse, return_dbias=True,
                                               deterministic=True, **opts)[3]
                for _ in range(2)]
        np.testing.assert_array_equal(runs[0], runs[1])
        results.append(runs[0])
    tb = torch.tensor(bias.astype(np.float64), requires_grad=True)
    _torch_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                     dout.astype(np.float64), lambda s, i, j: s + tb,
                     mask=lambda i, j: (j - i - OFF).abs() <= 20)
    for got in results:
        np.testing.assert_allclose(got, tb.grad.numpy(), atol=2e-5)


def test_dbias_without_bias_is_none():
    _, q, k, v, dout = _inputs(5)
    out, lse = xattn.flash_attention(q, k, v, return_lse=True)
    res = xattn.flash_attention_backward(dout, q, k, v, out, lse, return_dbias=True)
    assert len(res) == 4 and res[3] is None
    with pytest.raises(TypeError, match="return_dbias"):
        xattn.flash_attention_backward(dout, q, k, v, out, lse, return_dbias="yes")


@pytest.mark.parametrize("bias_shape", [(64, 64), (2, 1, 64, 64), (2, 1, 64)])
def test_dbias_per_batch_block_mask(bias_shape):
    # A BlockMask that differs per batch element runs one call per element; dbias is then
    # summed back to the bias's own shape. Reference: the same mask given densely.
    rng = np.random.default_rng(6)
    q, k, v, dout = (rng.standard_normal((2, 2, 64, 8)) for _ in range(4))
    glob = np.zeros((2, 64), bool)
    glob[0, 3] = glob[1, 40] = True
    bm = xattn.BlockMask.longformer(64, window=8, global_tokens=glob, block_size=16)
    mask = np.stack([bm[i].to_dense() for i in range(2)])[:, None]
    bias = rng.standard_normal(bias_shape)
    got, want = [], []
    for opts, res in ((dict(block_mask=bm), got), (dict(mask=mask), want)):
        out, lse = xattn.flash_attention(q, k, v, bias=bias, return_lse=True, **opts)
        res.extend(xattn.flash_attention_backward(dout, q, k, v, out, lse, bias=bias,
                                                  return_dbias=True, **opts))
    assert got[3].shape == bias.shape
    _check(got, want, atol=1e-12)
