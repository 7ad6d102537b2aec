"""DLPack interop: PyTorch tensors and JAX arrays in, the same type out, without copies;
ndarray subclasses and arrays of other libraries refused with a clear error.

Each library's tests skip themselves where it is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BF16

import xattn
from xattn import _array

RNG = np.random.default_rng(0)
Q = RNG.standard_normal((2, 4, 24, 8)).astype(np.float32)
K = RNG.standard_normal((2, 2, 24, 8)).astype(np.float32)
V = RNG.standard_normal((2, 2, 24, 8)).astype(np.float32)
DOUT = RNG.standard_normal((2, 4, 24, 8)).astype(np.float32)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def jnp():
    pytest.importorskip("jax")
    import jax.numpy

    return jax.numpy


def _calls():
    """Public functions called on (q, k, v, dout) of any one library: name -> fn."""
    bm = xattn.BlockMask.causal(24, block_size=8)

    def backward(q, k, v, dout):
        out, lse = xattn.flash_attention(q, k, v, causal=True, return_lse=True)
        return xattn.flash_attention_backward(dout, q, k, v, out, lse, causal=True)

    return {
        "standard": lambda q, k, v, d: xattn.standard_attention(q, k, v, causal=True,
                                                                 return_lse=True),
        "flash": lambda q, k, v, d: xattn.flash_attention(q, k, v, window=(5, 0),
                                                          return_lse=True),
        "flash_backward": backward,
        "linear": lambda q, k, v, d: xattn.linear_attention(q, k, v, causal=True),
        "linear_backward": lambda q, k, v, d: xattn.linear_attention_backward(d, q, k, v),
        "performer": lambda q, k, v, d: xattn.performer_attention(q, k, v, seed=0),
        "block_sparse": lambda q, k, v, d: xattn.block_sparse_attention(q, k, v, bm),
        "longformer": lambda q, k, v, d: xattn.longformer_attention(
            q, k, v, window=4, global_tokens=[0], block_size=8),
        "bigbird": lambda q, k, v, d: xattn.bigbird_attention(q, k, v, block_size=8, seed=0),
        "apply_rotary": lambda q, k, v, d: xattn.apply_rotary(q, *xattn.rotary_cos_sin(24, 8)),
    }


CALLS = list(_calls())


def _flat(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("name", CALLS)
def test_torch_in_torch_out(torch, name):
    fn = _calls()[name]
    args = [torch.from_numpy(a.copy()) for a in (Q, K, V, DOUT)]
    before = [a.clone() for a in args]
    got = _flat(fn(*args))
    want = _flat(fn(Q, K, V, DOUT))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g) is torch.Tensor
        assert g.dtype == getattr(torch, w.dtype.name) and tuple(g.shape) == w.shape
        np.testing.assert_array_equal(g.numpy(), w)  # same computation on the same data
    for a, b in zip(args, before, strict=True):  # inputs never written
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CALLS)
def test_jax_in_jax_out(jnp, name):
    import jax

    fn = _calls()[name]
    got = _flat(fn(*(jnp.asarray(a) for a in (Q, K, V, DOUT))))
    want = _flat(fn(Q, K, V, DOUT))
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, jax.Array)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), w)


def test_no_copies_either_way(torch):
    t = torch.randn(3, 5, 8)
    view, lib = _array._import_foreign("q", t)
    assert isinstance(view, np.ndarray) and view.ctypes.data == t.data_ptr()
    result = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = _array._give_back((result, [result]), lib)
    assert back[0].data_ptr() == result.ctypes.data
    assert back[1][0].data_ptr() == result.ctypes.data


def test_jax_no_copy_in(jnp):
    a = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    view, _ = _array._import_foreign("q", a)
    assert view.ctypes.data == a.unsafe_buffer_pointer()


def test_torch_strided_and_expanded(torch):
    # A transposed (non-contiguous) q and stride-0 (expanded) k/v are viewed with their strides.
    q = torch.from_numpy(Q.copy()).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q.is_contiguous()
    k = torch.from_numpy(K[:, :, :1].copy()).expand(2, 2, 24, 8)
    v = torch.from_numpy(V.copy())
    got = xattn.flash_attention(q, k, v, causal=True)
    want = xattn.flash_attention(Q, np.broadcast_to(K[:, :, :1], K.shape), V, causal=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_torch_requires_grad_is_refused(torch):
    q = torch.from_numpy(Q.copy()).requires_grad_()
    with pytest.raises(TypeError, match=r"q: a torch.Tensor that requires grad.*q.detach\(\)"):
        xattn.flash_attention(q, torch.from_numpy(K), torch.from_numpy(V))
    out = xattn.flash_attention(q.detach(), torch.from_numpy(K), torch.from_numpy(V))
    assert not out.requires_grad


def test_torch_with_numpy_options(torch):
    # NumPy arrays (e.g. xattn's own alibi_slopes) may accompany one foreign library.
    mask = RNG.random((24, 24)) < 0.7
    slopes = xattn.alibi_slopes(4)
    tq, tk, tv = (torch.from_numpy(a) for a in (Q, K, V))
    got = xattn.flash_attention(tq, tk, tv, mask=torch.from_numpy(mask), alibi_slopes=slopes)
    want = xattn.flash_attention(Q, K, V, mask=mask, alibi_slopes=slopes)
    assert type(got) is torch.Tensor
    np.testing.assert_array_equal(got.numpy(), want)


def test_torch_positions_and_bfloat16(torch):
    cos, sin = xattn.rotary_cos_sin(torch.arange(6), 8)
    assert type(cos) is torch.Tensor and cos.dtype == torch.float32
    if BF16 is None:
        pytest.skip("ml_dtypes missing")
    qb = torch.from_numpy(Q).to(torch.bfloat16)
    got = xattn.flash_attention(qb, qb, qb)
    assert got.dtype == torch.bfloat16
    want = xattn.flash_attention(*(Q.astype(BF16),) * 3)
    np.testing.assert_array_equal(got.view(torch.uint16).numpy(), want.view(np.uint16))


def test_mixing_libraries_is_refused(torch, jnp):
    with pytest.raises(TypeError, match=r"inputs mix array libraries \(q is a torch array, "
                                        r"k is a jax array\)"):
        xattn.flash_attention(torch.from_numpy(Q), jnp.asarray(K), jnp.asarray(V))


def test_jax_bfloat16_refused_clearly(jnp):
    a = jnp.asarray(Q, dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match=r"q: a bfloat16 JAX array cannot be shared"):
        xattn.flash_attention(a, a, a)


def test_array_api_strict_names_from_dlpack():
    xps = pytest.importorskip("array_api_strict")
    q = xps.asarray(Q)
    with pytest.raises(TypeError, match=r"q: expected a numpy.ndarray .* numpy.from_dlpack\(q\)"):
        xattn.flash_attention(q, q, q)
    # The conversion the message names works.
    out = xattn.flash_attention(np.from_dlpack(q), K, V)
    assert type(xps.from_dlpack(out)) is type(q)


@pytest.mark.parametrize("where", ["q", "mask", "from_dense"])
def test_masked_array_refused(where):
    m = np.ma.masked_less(np.ones((24, 24)), 0.5)
    with pytest.raises(TypeError, match=r"expected a plain numpy.ndarray, got the subclass "
                                        r"numpy.ma.MaskedArray"):
        if where == "q":
            xattn.flash_attention(np.ma.array(Q), K, V)
        elif where == "mask":
            xattn.standard_attention(Q, K, V, mask=m.astype(bool))
        else:
            xattn.BlockMask.from_dense(m.astype(bool), block_size=8)


def test_memmap_accepted(tmp_path):
    mm = np.memmap(tmp_path / "q.bin", dtype=np.float32, mode="w+", shape=Q.shape)
    mm[:] = Q
    np.testing.assert_array_equal(xattn.flash_attention(mm, K, V), xattn.flash_attention(Q, K, V))


def test_decorated_functions_keep_signature_and_doc():
    import inspect

    for fn in (xattn.flash_attention, xattn.standard_attention, xattn.apply_rotary):
        assert fn.__doc__ and "Examples" in fn.__doc__
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].kind == inspect.Parameter.POSITIONAL_ONLY


def test_torch_flex(torch):
    pytest.importorskip("numba")

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    got = xattn.flex_attention(*(torch.from_numpy(a) for a in (Q, K, V)), mask_mod=mask_mod)
    assert type(got) is torch.Tensor
    np.testing.assert_allclose(got.numpy(), xattn.flash_attention(Q, K, V, causal=True),
                               rtol=1e-5, atol=1e-6)
