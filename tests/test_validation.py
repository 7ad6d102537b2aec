"""Every bad input raises the documented error, with a message naming argument and shapes."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

import xattn
from xattn import _backends

Q_SHAPE, K_SHAPE, V_SHAPE = (2, 4, 8, 16), (2, 2, 10, 16), (2, 2, 10, 12)


class FakeCupyArray:
    """Looks like a CuPy array to xattn's namespace check (CuPy is not installed here)."""

    __module__ = "cupy._core.core"

    def __init__(self, shape):
        self.shape = shape
        self.ndim = len(shape)
        self.dtype = np.dtype(np.float32)


def inputs(**changes):
    a = {
        "q": np.ones(Q_SHAPE, np.float32),
        "k": np.ones(K_SHAPE, np.float32),
        "v": np.ones(V_SHAPE, np.float32),
        "dout": np.ones((*Q_SHAPE[:-1], V_SHAPE[-1]), np.float32),
        "out": np.ones((*Q_SHAPE[:-1], V_SHAPE[-1]), np.float32),
        "lse": np.zeros(Q_SHAPE[:-1], np.float32),
    }
    a.update(changes)
    return a


def call(fn, a, **options):
    if fn == "standard":
        return xattn.standard_attention(a["q"], a["k"], a["v"], **options)
    if fn == "flash":
        return xattn.flash_attention(a["q"], a["k"], a["v"], **options)
    return xattn.flash_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], **options
    )


FUNCTIONS = ["standard", "flash", "backward"]

# (id, array changes, options, exception, regex the message must match)
BAD_INPUTS = [
    # ranks and shapes
    ("q_1d", dict(q=np.ones(16, np.float32)), {}, ValueError,
     r"q: expected at least 2 dims .*\(16,\)"),
    ("k_1d", dict(k=np.ones(16, np.float32)), {}, ValueError, r"k: expected at least 2 dims"),
    ("ranks_differ", dict(k=np.ones((2, 10, 16), np.float32)), {}, ValueError,
     r"same number of dims.*q \(2, 4, 8, 16\), k \(2, 10, 16\)"),
    ("batch_mismatch", dict(k=np.ones((3, 2, 10, 16), np.float32),
                            v=np.ones((3, 2, 10, 12), np.float32)), {}, ValueError,
     r"leading \(batch\) dims.*k \(3, 2, 10, 16\)"),
    ("batch_broadcast_refused", dict(k=np.ones((1, 2, 10, 16), np.float32),
                                     v=np.ones((1, 2, 10, 12), np.float32)), {}, ValueError,
     r"leading \(batch\) dims"),
    ("head_dim_mismatch", dict(k=np.ones((2, 2, 10, 8), np.float32)), {}, ValueError,
     r"k: expected head_dim 16 .*got shape \(2, 2, 10, 8\)"),
    ("heads_not_multiple", dict(k=np.ones((2, 3, 10, 16), np.float32),
                                v=np.ones((2, 3, 10, 12), np.float32)), {}, ValueError,
     r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    ("v_heads", dict(v=np.ones((2, 1, 10, 12), np.float32)), {}, ValueError,
     r"v: expected 2 heads.*\(2, 1, 10, 12\)"),
    ("v_length", dict(v=np.ones((2, 2, 9, 12), np.float32)), {}, ValueError,
     r"v: expected sequence length 10 .*got shape \(2, 2, 9, 12\)"),
    ("zero_head_dim", dict(q=np.ones((2, 4, 8, 0), np.float32),
                           k=np.ones((2, 2, 10, 0), np.float32)), {}, ValueError,
     r"head_dim must be positive"),
    # types and dtypes
    ("q_list", dict(q=[[1.0]]), {}, TypeError, r"q: expected a numpy.ndarray or cupy.ndarray"),
    ("q_none", dict(q=None), {}, TypeError, r"q: expected an array, got None"),
    ("mixed_namespaces", dict(k=FakeCupyArray(K_SHAPE)), {}, TypeError,
     r"mix NumPy and CuPy.*k=cupy"),
    ("int_dtype", dict(q=np.ones(Q_SHAPE, np.int32), k=np.ones(K_SHAPE, np.int32),
                       v=np.ones(V_SHAPE, np.int32)), {}, TypeError,
     r"q: expected a floating dtype.*got int32"),
    ("bool_dtype", dict(v=np.ones(V_SHAPE, bool)), {}, TypeError,
     r"v: expected a floating dtype.*got bool"),
    ("complex_dtype", dict(k=np.ones(K_SHAPE, np.complex64)), {}, TypeError,
     r"k: expected a floating dtype.*got complex64"),
    ("longdouble_dtype", dict(q=np.ones(Q_SHAPE, np.longdouble)), {}, TypeError,
     r"q: expected a floating dtype"),
    ("mixed_dtypes", dict(k=np.ones(K_SHAPE, np.float64)), {}, TypeError,
     r"share one dtype.*k float64"),
    # window
    ("window_negative", {}, dict(window=(-1, 0)), ValueError, r"window: left must be >= 0"),
    ("window_length", {}, dict(window=(1, 2, 3)), ValueError, r"window: expected \(left, right\)"),
    ("window_int", {}, dict(window=5), ValueError, r"window: expected \(left, right\)"),
    ("window_float", {}, dict(window=(1.5, None)), TypeError, r"window: left must be"),
    ("window_bool", {}, dict(window=(None, True)), TypeError, r"window: right must be"),
    ("causal_str", {}, dict(causal="yes"), TypeError, r"causal: expected a bool"),
    # mask / bias / alibi
    ("mask_shape", {}, dict(mask=np.ones((8, 11), bool)), ValueError,
     r"mask: shape \(8, 11\) does not broadcast to the score shape \(2, 4, 8, 10\)"),
    ("mask_too_many_dims", {}, dict(mask=np.ones((1, 2, 4, 8, 10), bool)), ValueError,
     r"mask: shape \(1, 2, 4, 8, 10\)"),
    ("mask_float", {}, dict(mask=np.ones((8, 10), np.float32)), TypeError,
     r"mask: expected a boolean array.*float32"),
    ("mask_foreign", {}, dict(mask=FakeCupyArray((8, 10))), TypeError,
     r"mix NumPy and CuPy.*mask=cupy"),
    ("mask_list", {}, dict(mask=[[True]]), TypeError, r"mask: expected a numpy.ndarray"),
    ("bias_shape", {}, dict(bias=np.ones((4, 8, 9), np.float32)), ValueError,
     r"bias: shape \(4, 8, 9\) does not broadcast"),
    ("bias_int", {}, dict(bias=np.ones((8, 10), np.int64)), TypeError,
     r"bias: expected a floating dtype"),
    ("alibi_shape", {}, dict(alibi_slopes=np.ones(2, np.float32)), ValueError,
     r"alibi_slopes: expected shape \(4,\) or \(2, 4\), got \(2,\)"),
    ("alibi_2d", {}, dict(alibi_slopes=np.ones((4, 1), np.float32)), ValueError,
     r"alibi_slopes: expected shape"),
    ("alibi_int", {}, dict(alibi_slopes=np.ones(4, np.int32)), TypeError,
     r"alibi_slopes: expected a floating dtype"),
    # scalars
    ("scale_nan", {}, dict(scale=float("nan")), ValueError, r"scale: expected a finite number"),
    ("scale_inf", {}, dict(scale=float("inf")), ValueError, r"scale: expected a finite number"),
    ("scale_zero", {}, dict(scale=0.0), ValueError, r"scale: expected a positive number, got 0"),
    ("scale_negative", {}, dict(scale=-0.5), ValueError, r"scale: expected a positive number"),
    ("scale_str", {}, dict(scale="0.5"), TypeError, r"scale: expected a real number"),
    ("softcap_zero", {}, dict(softcap=0), ValueError, r"softcap: expected a positive number"),
    ("softcap_negative", {}, dict(softcap=-30.0), ValueError, r"softcap: expected a positive"),
    ("softcap_nan", {}, dict(softcap=float("nan")), ValueError, r"softcap: expected a finite"),
]


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    "changes,options,exc,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(fn, changes, options, exc, match):
    with pytest.raises(exc, match=match):
        call(fn, inputs(**changes), **options)


BAD_BACKWARD = [
    ("dout_shape", dict(dout=np.ones((2, 4, 8, 16), np.float32)), ValueError,
     r"dout: expected shape \(2, 4, 8, 12\), got \(2, 4, 8, 16\)"),
    ("out_shape", dict(out=np.ones((2, 4, 7, 12), np.float32)), ValueError,
     r"out: expected shape \(2, 4, 8, 12\)"),
    ("lse_shape", dict(lse=np.ones((2, 4, 8, 1), np.float32)), ValueError,
     r"lse: expected shape \(2, 4, 8\), got \(2, 4, 8, 1\)"),
    ("lse_none", dict(lse=None), TypeError, r"lse: expected an array, got None"),
    ("dout_int", dict(dout=np.ones((2, 4, 8, 12), np.int32)), TypeError,
     r"dout: expected a floating dtype.*int32"),
    ("dout_foreign", dict(dout=FakeCupyArray((2, 4, 8, 12))), TypeError,
     r"mix NumPy and CuPy.*dout=cupy"),
]


@pytest.mark.parametrize(
    "changes,exc,match", [c[1:] for c in BAD_BACKWARD], ids=[c[0] for c in BAD_BACKWARD]
)
def test_bad_backward_input(changes, exc, match):
    with pytest.raises(exc, match=match):
        call("backward", inputs(**changes))


def test_valid_baseline_runs():
    # The inputs above differ from this valid call in one thing each.
    for fn in FUNCTIONS:
        call(fn, inputs(), causal=True, window=(3, None), mask=np.ones((8, 10), bool),
             bias=np.zeros((4, 1, 10), np.float32), alibi_slopes=np.ones((2, 4), np.float32),
             scale=np.float32(0.5), softcap=np.int64(20))


# --- backend selection ---------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["flash", "backward"])
def test_unknown_backend(fn):
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of .*'numpy'.*'triton'"):
        call(fn, inputs(), backend="triton")


@pytest.mark.parametrize("fn", ["flash", "backward"])
def test_gpu_backend_on_numpy_inputs(fn):
    with pytest.raises(TypeError, match=r"backend='cupy' runs on the gpu.*numpy"):
        call(fn, inputs(), backend="cupy")


@pytest.mark.parametrize("fn", ["flash", "backward"])
def test_forced_backend_that_cannot_serve(fn, monkeypatch):
    tiled = _backends.BACKENDS["numpy"].load()
    monkeypatch.setattr(tiled, "supports", lambda prob, opts, op: "head_dim 16 is too dull")
    with pytest.raises(NotImplementedError, match=r"backend='numpy' cannot serve.*too dull"):
        call(fn, inputs(), backend="numpy")


@pytest.mark.parametrize("fn", ["flash", "backward"])
def test_auto_with_no_backend_able(fn, monkeypatch):
    for name, why in _backends.available_backends(np).items():
        if why is None:
            mod = _backends.BACKENDS[name].load()
            monkeypatch.setattr(mod, "supports", lambda prob, opts, op, n=name: f"{n} says no")
    with pytest.raises(NotImplementedError, match=r"no cpu backend supports.*numpy says no"):
        call(fn, inputs())


@pytest.mark.parametrize("name", list(_backends.available_backends(np)))
def test_forced_backend_not_installed(name):
    if _backends.available_backends(np)[name] is None:
        pytest.skip(f"backend {name} is installed here")
    with pytest.raises(NotImplementedError, match=rf"backend='{name}' cannot serve.*not installed"):
        call("flash", inputs(), backend=name)


# --- API contract --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "func,n_positional",
    [(xattn.standard_attention, 3), (xattn.flash_attention, 3),
     (xattn.flash_attention_backward, 6)],
)
def test_arrays_positional_only_options_keyword_only(func, n_positional):
    params = list(inspect.signature(func).parameters.values())
    kinds = [p.kind for p in params]
    assert kinds[:n_positional] == [inspect.Parameter.POSITIONAL_ONLY] * n_positional
    assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[n_positional:])


def test_import_loads_neither_cupy_nor_numba():
    code = (
        "import sys, numpy as np, xattn\n"
        "q = np.ones((2, 3, 4), np.float32)\n"
        "xattn.standard_attention(q, q, q)\n"
        "xattn.rotary_cos_sin(4, 4); xattn.alibi_slopes(4)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'numba'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


# --- #9 item 11: every boolean flag is a bool, every integer option named in its error --------

def _small():
    q = np.ones((1, 2, 8, 4), np.float32)
    kv = np.ones((1, 2, 8, 4), np.float32)
    return q, kv


def _public_calls():
    """One valid call per public callable, as ``(name, fn(**options))``; arrays positional."""
    q, kv = _small()
    out, lse = xattn.flash_attention(q, kv, kv, return_lse=True)
    cos, sin = xattn.rotary_cos_sin(8, 4)
    bm = xattn.BlockMask.causal(8, block_size=4)
    bms = xattn.BlockMask

    def cache():
        c = xattn.KVCache(1, 2, 8, 4, dtype=np.float32)
        c.append(kv, kv)
        return c

    return {
        "KVCache.append": lambda **o: xattn.KVCache(1, 2, 8, 4, dtype=np.float32).append(
            kv, kv, rotary=(cos, sin), **o),
        "decode_attention": lambda **o: xattn.decode_attention(
            q[:, :, -1:], cache(), rotary=(cos, sin), **o),
        "standard_attention": lambda **o: xattn.standard_attention(q, kv, kv, **o),
        "flash_attention": lambda **o: xattn.flash_attention(q, kv, kv, **o),
        "flash_attention_backward":
            lambda **o: xattn.flash_attention_backward(out, q, kv, kv, out, lse, **o),
        "flex_attention": lambda **o: xattn.flex_attention(q, kv, kv, **o),
        "linear_attention": lambda **o: xattn.linear_attention(q, kv, kv, **o),
        "linear_attention_backward":
            lambda **o: xattn.linear_attention_backward(out, q, kv, kv, **o),
        "performer_attention": lambda **o: xattn.performer_attention(q, kv, kv, **o),
        "performer_projection": lambda **o: xattn.performer_projection(8, 4, **o),
        "apply_rotary": lambda **o: xattn.apply_rotary(q, cos, sin, **o),
        "block_sparse_attention": lambda **o: xattn.block_sparse_attention(q, kv, kv, bm, **o),
        "longformer_attention": lambda **o: xattn.longformer_attention(
            q, kv, kv, window=2, global_tokens=[0], block_size=4, **o),
        "bigbird_attention": lambda **o: xattn.bigbird_attention(
            q, kv, kv, block_size=4, window_blocks=1, random_blocks=0, **o),
        "BlockMask.documents": lambda **o: bms.documents([0, 3, 8], block_size=4, **o),
        "BlockMask.sliding_window":
            lambda **o: bms.sliding_window(8, window=(2, 0), block_size=4, **o),
    }


def _bool_flags():
    """Every (public callable, parameter) whose default is a bool, found by introspection."""
    found = []
    for name in xattn.__all__:
        obj = getattr(xattn, name)
        members = ([(f"{name}.{m}", getattr(obj, m)) for m in dir(obj) if not m.startswith("_")]
                   if inspect.isclass(obj) else [(name, obj)])
        for label, fn in members:
            if not callable(fn):
                continue
            try:
                params = inspect.signature(fn).parameters.values()
            except (TypeError, ValueError):
                continue
            found += [(label, p.name) for p in params if isinstance(p.default, bool)]
    return found


BOOL_FLAGS = _bool_flags()


def test_every_bool_flag_has_a_call():
    # A new public function with a boolean flag must be added to _public_calls.
    missing = {label for label, _ in BOOL_FLAGS} - set(_public_calls())
    assert not missing, f"add a valid call of {sorted(missing)} to _public_calls"
    assert ("standard_attention", "return_weights") in BOOL_FLAGS


@pytest.mark.parametrize("label,flag", BOOL_FLAGS, ids=[f"{a}-{b}" for a, b in BOOL_FLAGS])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_bool_flags_reject_non_bools(label, flag, value):
    # return_lse="no" used to return a tuple, interleaved="no" meant True (truthiness).
    call = _public_calls()[label]
    with pytest.raises(TypeError, match=rf"{flag}: expected a bool, got"):
        call(**{flag: value})


@pytest.mark.parametrize("label,flag", BOOL_FLAGS, ids=[f"{a}-{b}" for a, b in BOOL_FLAGS])
def test_bool_flags_accept_numpy_bool(label, flag):
    if label == "flex_attention":
        pytest.importorskip("numba")
    call = _public_calls()[label]
    call(**{flag: np.False_})


@pytest.mark.parametrize("seed", [-1, 2.5, "seven"])
def test_performer_seed_named_in_error(seed):
    q, kv = _small()
    exc = ValueError if seed == -1 else TypeError
    with pytest.raises(exc, match=r"seed: expected None, a non-negative int"):
        xattn.performer_attention(q, kv, kv, seed=seed)
    with pytest.raises(exc, match=r"seed: expected None, a non-negative int"):
        xattn.performer_projection(8, 4, seed=seed)


def test_performer_seed_accepts_generators():
    a = xattn.performer_projection(8, 4, seed=np.random.default_rng(3))
    b = xattn.performer_projection(8, 4, seed=np.random.SeedSequence(3))
    c = xattn.performer_projection(8, 4, seed=np.int64(3))
    np.testing.assert_array_equal(a, xattn.performer_projection(8, 4, seed=3))
    np.testing.assert_array_equal(b, c)


@pytest.mark.parametrize(
    "value,exc,match",
    [("lots", TypeError, r"max_score_bytes: expected an int >= 1, got 'lots'"),
     (0, ValueError, r"max_score_bytes: expected an int >= 1, got 0"),
     (1.5e9, TypeError, r"max_score_bytes: expected an int"),
     (True, TypeError, r"max_score_bytes: expected an int")],
)
def test_max_score_bytes_validated(value, exc, match):
    q, kv = _small()
    with pytest.raises(exc, match=match):
        xattn.standard_attention(q, kv, kv, max_score_bytes=value)


def test_from_dense_big_block_allocates_only_the_mask():
    # block_size=20000 on a 5x5 mask allocated a (20000, 20000) buffer and tile (381 MiB).
    import tracemalloc

    m = np.tril(np.ones((5, 5), bool)) | np.eye(5, k=3, dtype=bool)
    tracemalloc.start()
    try:
        bm = xattn.BlockMask.from_dense(m, block_size=20000)
        dense = bm.to_dense()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes"
    assert bm.block_size == (20000, 20000) and bm.n_blocks == (1, 1)
    np.testing.assert_array_equal(dense, m)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(xattn.flash_attention(q, k, v, block_mask=bm),
                               xattn.standard_attention(q, k, v, mask=m), rtol=1e-5, atol=1e-6)
    # It still combines with other masks of the same block_size, as any BlockMask does.
    both = bm & xattn.BlockMask.causal(5, block_size=20000)
    np.testing.assert_array_equal(both.to_dense(), m & np.tril(np.ones((5, 5), bool)))


@pytest.mark.parametrize("func", [xattn.standard_attention, xattn.flash_attention,
                                  xattn.flash_attention_backward, xattn.block_sparse_attention,
                                  xattn.longformer_attention, xattn.bigbird_attention])
def test_score_options_come_from_one_list(func):
    # _array.SCORE_OPTIONS is the one declaration: every signature lists its options, in its
    # order and with its defaults, and refuses any other keyword as Python would.
    from xattn._array import SCORE_OPTIONS

    params = inspect.signature(func).parameters
    # (longformer_attention's own required ``window`` is not the score option)
    listed = [n for n in params if n in SCORE_OPTIONS
              and params[n].default is not inspect.Parameter.empty]
    assert listed == [n for n in SCORE_OPTIONS if n in listed]
    assert {n: params[n].default for n in listed} == {n: SCORE_OPTIONS[n] for n in listed}
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in listed)
    assert set(SCORE_OPTIONS) - set(listed) <= {"causal", "window"}
    with pytest.raises(TypeError, match=f"{func.__name__}\\(\\) got an unexpected keyword "
                                        "argument 'softcapp'"):
        func(*(np.zeros((1, 4, 4), np.float32) for _ in range(3)), softcapp=1.0)
