"""BlockMask constructors, combinators, and the sparse attention functions.

Every constructor's ``to_dense()`` is compared with a mask written directly from its
definition; every attention function with the float64 oracle under that dense mask, forward
and backward, once per CPU backend (a backend that refuses block masks is skipped with its
reason; the numpy backend serves everything).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import random_array

import xattn
from xattn import BlockMask
from xattn._blockmask import RULE_CAUSAL, RULE_DENSE, RULE_DOCUMENTS, RULE_GLOBAL, RULE_WINDOW
from xattn.sparse import block_plan
from xattn.testing import assert_close, reference_attention, reference_attention_backward

# --- masks written directly from their definitions ------------------------------------------


def window_mask(sq, sk, *, causal=False, window=None):
    i = np.arange(sq)[:, None] + (sk - sq)
    j = np.arange(sk)[None, :]
    m = np.ones((sq, sk), bool)
    if causal:
        m &= j <= i
    if window is not None:
        left, right = window
        if left is not None:
            m &= j >= i - left
        if right is not None:
            m &= j <= i + right
    return m


def documents_mask(cu, causal=False):
    total = cu[-1]
    doc = np.zeros(total, int)
    for d in range(len(cu) - 1):
        doc[cu[d]:cu[d + 1]] = d
    m = doc[:, None] == doc[None, :]
    if causal:
        m &= np.tri(total, dtype=bool)
    return m


def longformer_mask(s, window, is_global):
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    return (np.abs(i - j) <= window // 2) | is_global[:, None] | is_global[None, :]


def check_tight(bm, dense):
    """Full blocks hold only visible pairs; partial blocks hold both kinds (no wasted
    element tests); invisible blocks hold none (to_dense checks that)."""
    bq, bk = bm.block_size
    for ptr, col, full in ((bm.full_row_ptr, bm.full_col_idx, True),
                           (bm.partial_row_ptr, bm.partial_col_idx, False)):
        assert ptr.dtype == np.int32 and col.dtype == np.int32
        assert ptr[0] == 0 and ptr[-1] == len(col) and (np.diff(ptr) >= 0).all()
        for i in range(bm.n_blocks[0]):
            cols = col[ptr[i]:ptr[i + 1]]
            assert (np.diff(cols) > 0).all()
            for j in cols.tolist():
                tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                if full:
                    assert tile.all(), (i, j)
                else:
                    assert tile.any() and not tile.all(), (i, j)


# --- constructors ---------------------------------------------------------------------------

SHAPES = [(300, 300, 128), (100, 250, 32), (250, 100, (32, 16)), (7, 7, 3), (129, 1000, 64)]


@pytest.mark.parametrize("sq,sk,bs", SHAPES)
def test_causal(sq, sk, bs):
    bm = BlockMask.causal(sq, sk, block_size=bs)
    dense = window_mask(sq, sk, causal=True)
    np.testing.assert_array_equal(bm.to_dense(), dense)
    check_tight(bm, dense)
    assert bm.rule_kind in (RULE_CAUSAL, 0)
    assert bm.rule_data.get("offset", sk - sq) == sk - sq


@pytest.mark.parametrize("sq,sk,bs", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(10, 5), (0, 0), (50, None), (None, 20), (300, 300)])
def test_sliding_window(sq, sk, bs, causal, window):
    bm = BlockMask.sliding_window(sq, sk, window=window, causal=causal, block_size=bs)
    dense = window_mask(sq, sk, causal=causal, window=window)
    np.testing.assert_array_equal(bm.to_dense(), dense)
    check_tight(bm, dense)


def test_sliding_window_rule_data():
    bm = BlockMask.sliding_window(1000, 1200, window=(300, 40), causal=True, block_size=64)
    assert bm.rule_kind == RULE_WINDOW
    assert bm.rule_data == {"offset": 200, "left": 300, "right": 0}


@pytest.mark.parametrize("cu", [[0, 300], [0, 10, 100, 100, 300], [0, 1, 2, 3, 200, 257],
                                [0, 128, 256]])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bs", [64, 50])
def test_documents(cu, causal, bs):
    bm = BlockMask.documents(cu, causal=causal, block_size=bs)
    dense = documents_mask(cu, causal)
    np.testing.assert_array_equal(bm.to_dense(), dense)
    check_tight(bm, dense)
    if bm.num_partial_blocks:
        assert bm.rule_kind == RULE_DOCUMENTS
        np.testing.assert_array_equal(bm.rule_data["cu_seqlens"], cu)


@pytest.mark.parametrize("s,window,glob,bs", [
    (300, 40, [3, 150], 64),
    (300, 40, [], 64),
    (257, 2, [0, -1], 32),
    (500, 100, list(range(0, 500, 7)), 64),  # many globals: blocks with only global rows
    (100, 400, [5], 16),  # window longer than the sequence
    (200, 10, list(range(64, 128)), 64),  # a whole block of global tokens
])
def test_longformer(s, window, glob, bs):
    is_global = np.zeros(s, bool)
    is_global[glob] = True
    bm = BlockMask.longformer(s, window=window, global_tokens=glob, block_size=bs)
    dense = longformer_mask(s, window, is_global)
    np.testing.assert_array_equal(bm.to_dense(), dense)
    check_tight(bm, dense)
    # The boolean form gives the same (cached) mask.
    assert BlockMask.longformer(s, window=window, global_tokens=is_global, block_size=bs) is bm
    if bm.num_partial_blocks:
        assert bm.rule_kind == RULE_GLOBAL and bm.rule_data["half_window"] == window // 2


def test_longformer_per_batch(rng):
    flags = rng.random((2, 3, 200)) < 0.02
    bm = BlockMask.longformer(200, window=16, global_tokens=flags, block_size=32)
    assert bm.batch_shape == (2, 3)
    dense = bm.to_dense()
    assert dense.shape == (2, 3, 200, 200)
    for idx in np.ndindex(2, 3):
        np.testing.assert_array_equal(dense[idx], longformer_mask(200, 16, flags[idx]))
        np.testing.assert_array_equal(bm[idx].to_dense(), dense[idx])
    with pytest.raises(AttributeError, match="index it first"):
        bm.full_row_ptr  # noqa: B018


def bigbird_blocks(bm):
    nb = bm.n_blocks[0]
    grid = np.zeros((nb, nb), bool)
    rows = np.repeat(np.arange(nb), np.diff(bm.full_row_ptr))
    grid[rows, bm.full_col_idx] = True
    return grid


@pytest.mark.parametrize("s,bs,w,g,r", [
    (2048, 64, 3, 1, 3), (1000, 64, 3, 1, 3), (1000, 50, 5, 2, 2), (640, 64, 1, 0, 4),
    (3000, 64, 3, 1, 0),
])
def test_bigbird_invariants(s, bs, w, g, r):
    bm = BlockMask.bigbird(s, block_size=bs, window_blocks=w, global_blocks=g,
                           random_blocks=r, seed=7)
    nb = -(-s // bs)
    assert bm.n_blocks == (nb, nb) and bm.num_partial_blocks == 0
    grid = bigbird_blocks(bm)
    glob = np.zeros(nb, bool)
    glob[:g] = glob[nb - g:] = True
    assert grid[glob].all() and grid[:, glob].all()  # global rows and columns full
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    band = np.abs(i - j) <= w // 2
    assert grid[band].all()
    extra = grid & ~band & ~glob[None, :]
    n_cand = (~band & ~glob[None, :]).sum(axis=1)
    expected = np.minimum(r, n_cand)
    np.testing.assert_array_equal(extra.sum(axis=1)[~glob], expected[~glob])
    # Element level: exactly the block pattern.
    dense = np.repeat(np.repeat(grid, bs, 0), bs, 1)[:s, :s]
    np.testing.assert_array_equal(bm.to_dense(), dense)


def test_bigbird_seed():
    a = BlockMask.bigbird(4096, seed=1)
    assert BlockMask.bigbird(4096, seed=1) is a  # cached
    np.testing.assert_array_equal(a.to_dense(), BlockMask.bigbird(4096, seed=1).to_dense())
    b = BlockMask.bigbird(4096, seed=2)
    assert not np.array_equal(bigbird_blocks(a), bigbird_blocks(b))
    c, d = BlockMask.bigbird(4096), BlockMask.bigbird(4096)  # fresh patterns
    assert not np.array_equal(bigbird_blocks(c), bigbird_blocks(d))


def test_bigbird_clamps_random_blocks():
    # 4 blocks: 2 global, band of 3 -> at most 0 or 1 candidate per row.
    bm = BlockMask.bigbird(256, block_size=64, random_blocks=5, seed=0)
    assert bm.density == 1.0


@pytest.mark.parametrize("shape,bs", [((300, 300), 64), ((130, 77), (32, 16)), ((5, 7), 4)])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.97, 1.0])
def test_from_dense(rng, shape, bs, p):
    m = rng.random(shape) < p
    m[: shape[0] // 2, : shape[1] // 2] = True  # some full blocks
    bm = BlockMask.from_dense(m, block_size=bs)
    np.testing.assert_array_equal(bm.to_dense(), m)
    check_tight(bm, m)
    if bm.num_partial_blocks:
        assert bm.rule_kind == RULE_DENSE
        assert bm.rule_data["tiles"].shape == (bm.num_partial_blocks, *bm.block_size)


def test_from_mask_mod():
    def dilated_causal(q, k):
        return (k <= q) & ((q - k) % 3 == 0)

    bm = BlockMask.from_mask_mod(dilated_causal, 200, 230, block_size=32)
    i, j = np.arange(200)[:, None], np.arange(230)[None, :]
    dense = (j <= i) & ((i - j) % 3 == 0)
    np.testing.assert_array_equal(bm.to_dense(), dense)
    check_tight(bm, dense)
    assert BlockMask.from_mask_mod(dilated_causal, 200, 230, block_size=32) is bm


def test_partial_tiles_lowering():
    bm = BlockMask.longformer(300, window=40, global_tokens=[5, 200], block_size=64)
    low = BlockMask.from_dense(bm.to_dense(), block_size=64)
    np.testing.assert_array_equal(bm.partial_tiles(), low.partial_tiles())
    np.testing.assert_array_equal(bm.partial_col_idx, low.partial_col_idx)


# --- combinators, summary -------------------------------------------------------------------


def combinator_masks(s, bs):
    return [
        BlockMask.causal(s, block_size=bs),
        BlockMask.documents([0, 150, s], block_size=bs),
        BlockMask.sliding_window(s, window=(70, 30), block_size=bs),
        BlockMask.from_dense(np.random.default_rng(3).random((s, s)) < 0.3, block_size=bs),
        BlockMask.bigbird(s, block_size=bs, seed=0),
    ]


@pytest.mark.parametrize("op", ["&", "|"])
@pytest.mark.parametrize("a,b", [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (2, 2)])
def test_combinators(op, a, b):
    s, bs = 400, 64
    masks = combinator_masks(s, bs)
    ma, mb = masks[a], masks[b]
    combined = (ma & mb) if op == "&" else (ma | mb)
    da, db = ma.to_dense(), mb.to_dense()
    dense = (da & db) if op == "&" else (da | db)
    np.testing.assert_array_equal(combined.to_dense(), dense)
    # Combined blocks are full only where every pair is visible.
    for i in range(combined.n_blocks[0]):
        for j in combined.full_col_idx[combined.full_row_ptr[i]:combined.full_row_ptr[i + 1]]:
            assert dense[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].all()


def test_nested_combinators():
    m = combinator_masks(400, 64)
    nested = (m[0] & m[1]) | m[2]
    np.testing.assert_array_equal(
        nested.to_dense(), (m[0].to_dense() & m[1].to_dense()) | m[2].to_dense()
    )


def test_combinator_errors():
    a = BlockMask.causal(100, block_size=32)
    with pytest.raises(ValueError, match="share q_len"):
        a & BlockMask.causal(101, block_size=32)  # noqa: B018
    with pytest.raises(ValueError, match="share q_len"):
        a | BlockMask.causal(100, block_size=16)  # noqa: B018
    with pytest.raises(TypeError):
        a & np.ones((100, 100), bool)  # noqa: B018
    with pytest.raises(TypeError):
        np.ones((100, 100), bool) | a  # noqa: B018


def test_summary():
    bm = BlockMask.sliding_window(1000, window=(100, 100), block_size=100)
    assert bm.nnz_blocks == bm.num_full_blocks + bm.num_partial_blocks == 28
    assert bm.density == pytest.approx(28 / 100)
    assert bm.visible_pairs == int(window_mask(1000, 1000, window=(100, 100)).sum())
    text = repr(bm)
    assert "nnz_blocks=28" in text and "rule='window'" in text and "\n" in text
    # Two summary lines, and no picture when the mask is large.
    assert repr(BlockMask.causal(10_000, block_size=64)).count("\n") == 1


def test_cached_and_immutable():
    a = BlockMask.sliding_window(5000, window=(100, 0), block_size=64)
    assert BlockMask.sliding_window(5000, window=(100, 0), block_size=64) is a
    assert BlockMask.documents(np.array([0, 10, 20]), block_size=8) is BlockMask.documents(
        [0, 10, 20], block_size=8
    )
    with pytest.raises(ValueError):
        a.full_col_idx[0] = 3


def test_build_is_linear_in_blocks():
    # A 2^18 sliding window would be a 64 GiB dense mask; the BlockMask is O(blocks).
    tracemalloc.start()
    bm = BlockMask.sliding_window(2**18, window=(256, 256), block_size=128)
    plan, _ = block_plan(bm, False, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert bm.nnz_blocks <= 5 * bm.n_blocks[0]
    assert sum(len(t) for _, _, t in plan) <= 3 * bm.n_blocks[0]
    assert peak < 16 * 2**20


@pytest.mark.parametrize("causal", [False, True])
def test_flash_window_plan_is_linear(causal):
    # flash_attention(window=...) takes the block-sparse plan of its window: the visited
    # pairs grow as S * w, and only the band's two edges (one key block each) are masked.
    from xattn._array import validate_attention
    from xattn.sparse import window_plan

    for s in (2**14, 2**16):
        x = np.zeros((s, 8), np.float32)
        prob = validate_attention(x, x, x, window=(256, 256), causal=causal)
        stripped, kwargs = window_plan(prob)
        assert stripped.window is None and not stripped.causal
        plan, rule = kwargs["plan"], kwargs["element_rule"]
        assert [q0 for q0, _, _ in plan] == list(range(0, s, 128))
        visited = sum((k1 - k0) * (q1 - q0) for q0, q1, t in plan for k0, k1, _ in t)
        masked = sum((k1 - k0) * (q1 - q0) for q0, q1, t in plan for k0, k1, f in t if not f)
        assert visited <= s * (256 + 128 + (0 if causal else 256))
        assert masked <= s * 256
        q0, q1, (k0, k1, full) = plan[10][0], plan[10][1], plan[10][2][0]
        assert not full
        i, j = np.arange(q0, q1)[:, None], np.arange(k0, k1)[None, :]
        expected = (np.abs(i - j) <= 256) & ((j <= i) if causal else True)
        np.testing.assert_array_equal(rule(q0, q1, k0, k1), expected)


# --- bad inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("call,exc,match", [
    (lambda: BlockMask.causal(100, block_size=0), ValueError, "block_size"),
    (lambda: BlockMask.causal(100, block_size=(64, -1)), ValueError, "block_size"),
    (lambda: BlockMask.causal(0), ValueError, "q_len"),
    (lambda: BlockMask.sliding_window(100, window=None), ValueError, "window"),
    (lambda: BlockMask.sliding_window(100, window=(-1, 2)), ValueError, "window"),
    (lambda: BlockMask.longformer(100, window=5, global_tokens=[0]), ValueError, "even"),
    (lambda: BlockMask.longformer(100, window=0, global_tokens=[0]), ValueError, "even"),
    (lambda: BlockMask.longformer(100, window=4, global_tokens=[100]), ValueError, "out of range"),
    (lambda: BlockMask.longformer(100, window=4, global_tokens=[-101]), ValueError,
     "out of range"),
    (lambda: BlockMask.longformer(100, window=4, global_tokens=np.ones(99, bool)), ValueError,
     "global_tokens"),
    (lambda: BlockMask.longformer(100, window=4, global_tokens=[0.5]), ValueError,
     "global_tokens"),
    (lambda: BlockMask.documents([0, 50, 40, 100]), ValueError, "non-decreasing"),
    (lambda: BlockMask.documents([1, 50, 100]), ValueError, "starting at 0"),
    (lambda: BlockMask.documents([0, 50, 100], seq_len=120), ValueError, "seq_len=120"),
    (lambda: BlockMask.documents([[0, 50]]), ValueError, "1-D"),
    (lambda: BlockMask.bigbird(100, block_size=0), ValueError, "block_size"),
    (lambda: BlockMask.bigbird(100, window_blocks=2), ValueError, "odd"),
    (lambda: BlockMask.bigbird(100, random_blocks=-1), ValueError, "random_blocks"),
    (lambda: BlockMask.from_dense(np.ones((3, 4, 5), bool)), ValueError, "2-D"),
    (lambda: BlockMask.from_dense(np.ones((3, 4))), TypeError, "boolean"),
    (lambda: BlockMask.from_mask_mod(lambda q, k: q - k, 10, 10), TypeError, "boolean"),
    (lambda: BlockMask.from_mask_mod(3, 10, 10), TypeError, "callable"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_block_mask_shape_mismatch(make_qkv):
    q, k, v = make_qkv((2, 100, 16), (2, 120, 16))
    with pytest.raises(ValueError, match="block_mask: built for q_len=100, k_len=100"):
        xattn.flash_attention(q, k, v, block_mask=BlockMask.causal(100))
    with pytest.raises(TypeError, match="block_mask"):
        xattn.block_sparse_attention(q, k, v, np.ones((100, 120), bool))
    with pytest.raises(ValueError, match="self-attention"):
        xattn.longformer_attention(q, k, v, window=4, global_tokens=[0])
    q, k, v = make_qkv((2, 3, 50, 8), (2, 3, 50, 8))
    with pytest.raises(ValueError, match="global_tokens"):
        xattn.longformer_attention(q, k, v, window=4, global_tokens=np.ones((3, 50), bool))


def test_block_mask_is_checked_once_at_validation(make_qkv):
    # validate_attention checks a block mask with the other options, once, and the problem
    # carries it (prob.block_mask): every public function raises the same message before any
    # backend is asked, and nothing below checks it again.
    import re

    from xattn._array import validate_attention

    q, k, v = make_qkv((2, 100, 16), (2, 120, 16))
    wrong = BlockMask.causal(100)
    msg = re.escape("block_mask: built for q_len=100, k_len=100, but q has Sq=100 and k has "
                    "Sk=120")
    out = np.zeros((2, 100, 16))
    lse = np.zeros((2, 100))
    calls = [
        lambda bm: validate_attention(q, k, v, block_mask=bm),
        lambda bm: xattn.flash_attention(q, k, v, block_mask=bm),
        lambda bm: xattn.flash_attention_backward(out, q, k, v, out, lse, block_mask=bm),
        lambda bm: xattn.block_sparse_attention(q, k, v, bm),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call(wrong)
        with pytest.raises(TypeError, match="block_mask: expected an xattn.BlockMask, got "
                                            "ndarray"):
            call(np.ones((100, 120), bool))
    with pytest.raises(TypeError, match="block_mask: expected an xattn.BlockMask, got None"):
        xattn.block_sparse_attention(q, k, v, None)
    flags = np.zeros((3, 100), bool)
    flags[[0, 1, 2], [0, 50, 99]] = True  # one global token per element: a batched mask
    batched = BlockMask.longformer(100, window=4, global_tokens=flags)
    x = np.zeros((2, 1, 100, 8))
    with pytest.raises(ValueError, match=re.escape("block_mask: its batch_shape (3,) must "
                                                   "equal the inputs' leading batch dims (2,)")):
        validate_attention(x, x, x, block_mask=batched)
    with pytest.raises(ValueError, match=re.escape("leading batch dims ()")):
        validate_attention(x[0, 0], x[0, 0], x[0, 0], block_mask=batched)

    good = BlockMask.causal(100, 120, block_size=32)
    prob = validate_attention(q, k, v, block_mask=good)
    assert prob.block_mask is good
    assert prob == validate_attention(q, k, v) and "block_mask" not in repr(prob)


def test_block_mask_travels_in_the_problem(backend, make_qkv, monkeypatch):
    # One check per public call (validate_attention's); the backend reads prob.block_mask.
    from xattn import _array

    q, k, v = make_qkv((2, 100, 16), (2, 120, 16))
    good = BlockMask.causal(100, 120, block_size=32)
    seen = []
    check = _array.check_block_mask
    monkeypatch.setattr(_array, "check_block_mask",
                        lambda prob, bm: (seen.append(bm), check(prob, bm))[1])
    o, s = xattn.flash_attention(q, k, v, block_mask=good, return_lse=True, backend=backend)
    xattn.flash_attention_backward(o, q, k, v, o, s, block_mask=good, backend=backend)
    assert len(seen) == 2 and all(bm is good for bm in seen)
    ref = reference_attention(q, k, v, mask=good.to_dense())[0]
    assert_close(o, ref, dtype=q.dtype, name=f"{backend} forward")


# --- attention against the oracle -----------------------------------------------------------


def run_or_skip(backend, fn, *args, **kwargs):
    """Call ``fn`` forced to ``backend``; a backend other than numpy may decline block masks
    (the test then skips with its reason). The numpy backend must serve everything."""
    if backend == "numpy":
        return fn(*args, backend=backend, **kwargs)
    try:
        return fn(*args, backend=backend, **kwargs)
    except NotImplementedError as exc:
        pytest.skip(str(exc))


def check_forward_backward(backend, rng, q, k, v, dense, fn, *fn_args, block_mask,
                           dtype=np.float64, **options):
    out, lse = run_or_skip(backend, fn, q, k, v, *fn_args, return_lse=True, **options)
    mask = dense if options.get("mask") is None else dense & options["mask"]
    ref_opts = {**options, "mask": mask}
    ref, ref_lse, _ = reference_attention(q, k, v, **ref_opts)
    assert_close(out, ref, xp=np, dtype=dtype, name="out")
    assert_close(lse, ref_lse, xp=np, dtype=dtype, name="lse")
    dout = random_array(rng, out.shape, dtype)
    grads = run_or_skip(backend, xattn.flash_attention_backward, dout, q, k, v, out, lse,
                        block_mask=block_mask, **options)
    ref_grads = reference_attention_backward(dout, q, k, v, **ref_opts)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(g, r, xp=np, dtype=dtype, name=name)


MASKS = {
    "causal": lambda s: BlockMask.causal(s, block_size=64),
    "window": lambda s: BlockMask.sliding_window(s, window=(70, 20), block_size=64),
    "causal_window_bs": lambda s: BlockMask.sliding_window(s, window=(90, None), causal=True,
                                                           block_size=(32, 48)),
    "documents": lambda s: BlockMask.documents([0, 33, 33, 150, s], causal=True, block_size=64),
    "longformer": lambda s: BlockMask.longformer(s, window=50, global_tokens=[0, 111],
                                                 block_size=64),
    "bigbird": lambda s: BlockMask.bigbird(s, block_size=32, random_blocks=2, seed=4),
    "dense": lambda s: BlockMask.from_dense(
        np.random.default_rng(5).random((s, s)) < 0.4, block_size=64
    ),
    "composite": lambda s: BlockMask.documents([0, 150, s], block_size=64)
    & BlockMask.sliding_window(s, window=(40, 40), block_size=64),
}
OPTIONS = {
    "plain": {},
    "gqa_alibi": dict(alibi_slopes=np.array([0.1, 0.3])),
    "softcap_scale": dict(softcap=2.0, scale=0.3),
    "causal_call": dict(causal=True),
    "window_call": dict(window=(60, 60)),
    "mask_bias": dict(mask=np.random.default_rng(6).random((201, 201)) < 0.8,
                      bias=np.random.default_rng(7).standard_normal((2, 1, 201))),
}


# Every mask without options, and every option under three masks of different rule kinds.
CASES = [(m, "plain") for m in MASKS] + [
    (m, o) for o in OPTIONS if o != "plain" for m in ("causal_window_bs", "longformer", "composite")
]


@pytest.mark.parametrize("mask_name,opt_name", CASES)
def test_block_sparse_attention(backend, rng, mask_name, opt_name):
    s = 201  # not a multiple of any block size
    bm = MASKS[mask_name](s)
    q, k, v = (random_array(rng, (2, h, s, 16)) for h in (2, 1, 1))
    options = OPTIONS[opt_name]
    call_dense = bm.to_dense()
    if "causal" in options or "window" in options:
        call_dense = call_dense & window_mask(s, s, causal=options.get("causal", False),
                                              window=options.get("window"))
        ref_opts = {k_: v_ for k_, v_ in options.items() if k_ not in ("causal", "window")}
        out = run_or_skip(backend, xattn.block_sparse_attention, q, k, v, bm, **options)
        ref, _, _ = reference_attention(q, k, v, mask=call_dense, **ref_opts)
        assert_close(out, ref, xp=np, dtype=np.float64)
        return
    check_forward_backward(backend, rng, q, k, v, call_dense, xattn.block_sparse_attention, bm,
                           block_mask=bm, **options)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(60, 10))],
                         ids=["causal", "window"])
def test_block_mask_with_call_rules_backward(backend, rng, options):
    s = 300
    bm = BlockMask.longformer(s, window=64, global_tokens=[7, 250], block_size=64)
    q, k, v = (random_array(rng, (3, s, 16)) for _ in range(3))
    out, lse = run_or_skip(backend, xattn.flash_attention, q, k, v, block_mask=bm,
                           return_lse=True, **options)
    dense = bm.to_dense() & window_mask(s, s, **options)
    ref, ref_lse, _ = reference_attention(q, k, v, mask=dense)
    assert_close(out, ref, xp=np, dtype=np.float64)
    dout = random_array(rng, out.shape)
    grads = run_or_skip(backend, xattn.flash_attention_backward, dout, q, k, v, out, lse,
                        block_mask=bm, **options)
    for g, r in zip(grads, reference_attention_backward(dout, q, k, v, mask=dense), strict=True):
        assert_close(g, r, xp=np, dtype=np.float64)


def test_empty_rows(backend, rng):
    # Query block 1 sees nothing: zeros and lse = -inf.
    m = np.ones((200, 200), bool)
    m[64:128] = False
    bm = BlockMask.from_dense(m, block_size=64)
    q, k, v = (random_array(rng, (2, 200, 8), np.float32) for _ in range(3))
    out, lse = run_or_skip(backend, xattn.block_sparse_attention, q, k, v, bm, return_lse=True)
    assert (out[:, 64:128] == 0).all() and np.isneginf(lse[:, 64:128]).all()
    ref, ref_lse, _ = reference_attention(q, k, v, mask=m)
    assert_close(out, ref, xp=np, dtype=np.float32)
    assert_close(lse, ref_lse, xp=np, dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_block_sparse_dtypes(backend, rng, dtype):
    s = 260
    bm = BlockMask.sliding_window(s, window=(50, 50), block_size=64)
    q, k, v = (random_array(rng, (2, s, 32), dtype) for _ in range(3))
    out = run_or_skip(backend, xattn.block_sparse_attention, q, k, v, bm)
    ref, _, _ = reference_attention(q, k, v, mask=bm.to_dense())
    naive = xattn.testing.naive_attention(q, k, v, mask=bm.to_dense()) \
        if dtype == np.float16 else None
    assert_close(out, ref, xp=np, dtype=dtype, naive=naive)


@pytest.mark.parametrize("glob", ["indices", "bool_shared", "bool_per_batch"])
def test_longformer_attention(backend, rng, glob):
    s, window = 300, 40
    q, k, v = (random_array(rng, (2, h, s, 16)) for h in (2, 1, 1))
    if glob == "indices":
        global_tokens = np.array([0, 17, -1])
        flags = np.zeros((2, s), bool)
        flags[:, global_tokens] = True
    else:
        flags = rng.random((2, s)) < 0.03
        if glob == "bool_shared":
            flags[1] = flags[0]
        global_tokens = flags if glob == "bool_per_batch" else flags[0]
    out, lse = run_or_skip(backend, xattn.longformer_attention, q, k, v, window=window,
                           global_tokens=global_tokens, return_lse=True, block_size=64)
    dense = np.stack([longformer_mask(s, window, f) for f in flags])[:, None]
    ref, ref_lse, _ = reference_attention(q, k, v, mask=dense)
    assert_close(out, ref, xp=np, dtype=np.float64)
    assert_close(lse, ref_lse, xp=np, dtype=np.float64)
    bm = BlockMask.longformer(s, window=window, global_tokens=global_tokens, block_size=64)
    assert bm.batch_shape == ((2,) if glob == "bool_per_batch" else ())
    dout = random_array(rng, out.shape)
    grads = run_or_skip(backend, xattn.flash_attention_backward, dout, q, k, v, out, lse,
                        block_mask=bm)
    for g, r in zip(grads, reference_attention_backward(dout, q, k, v, mask=dense), strict=True):
        assert_close(g, r, xp=np, dtype=np.float64)


def test_longformer_per_batch_options(backend, rng):
    # Per-batch masks combine with per-batch ALiBi slopes and a broadcast bias.
    s = 150
    q, k, v = (random_array(rng, (2, 2, s, 8), np.float32) for _ in range(3))
    flags = rng.random((2, s)) < 0.05
    slopes = rng.uniform(0.01, 0.2, (2, 2)).astype(np.float32)
    bias = random_array(rng, (2, 1, 1, s), np.float32)
    out = run_or_skip(backend, xattn.longformer_attention, q, k, v, window=20,
                      global_tokens=flags, alibi_slopes=slopes, bias=bias, block_size=32)
    dense = np.stack([longformer_mask(s, 20, f) for f in flags])[:, None]
    ref, _, _ = reference_attention(q, k, v, mask=dense, alibi_slopes=slopes, bias=bias)
    assert_close(out, ref, xp=np, dtype=np.float32)


@pytest.mark.parametrize("s,bs", [(512, 64), (333, 50)])
def test_bigbird_attention(backend, rng, s, bs):
    q, k, v = (random_array(rng, (2, 2, s, 16)) for _ in range(3))
    out, lse = run_or_skip(backend, xattn.bigbird_attention, q, k, v, block_size=bs, seed=3,
                           return_lse=True)
    bm = BlockMask.bigbird(s, block_size=bs, seed=3)
    dense = bm.to_dense()
    ref, ref_lse, _ = reference_attention(q, k, v, mask=dense)
    assert_close(out, ref, xp=np, dtype=np.float64)
    assert_close(lse, ref_lse, xp=np, dtype=np.float64)
    dout = random_array(rng, out.shape)
    grads = run_or_skip(backend, xattn.flash_attention_backward, dout, q, k, v, out, lse,
                        block_mask=bm)
    for g, r in zip(grads, reference_attention_backward(dout, q, k, v, mask=dense), strict=True):
        assert_close(g, r, xp=np, dtype=np.float64)


def test_full_blocks_skip_element_rule():
    # The element rule is asked only about partial tiles; full tiles never reach it.
    bm = BlockMask.sliding_window(1024, window=(200, 200), block_size=128)
    plan, partial = block_plan(bm, False, None)
    full_tiles = [(q0, k0) for q0, _, t in plan for k0, _, f in t if f]
    part_tiles = [(q0, k0) for q0, _, t in plan for k0, _, f in t if not f]
    assert full_tiles and set(part_tiles) == set(partial)
    for q0, q1, tiles in plan:
        for k0, k1, full in tiles:
            vis = bm.exact(q0, q1, k0, k1)
            assert (vis is None or vis.all()) == full


@pytest.mark.parametrize("glob", [np.arange(16), np.arange(0, 3000, 97), np.array([5, 6, 2999])])
def test_longformer_plan_is_exact(glob):
    # Rows split into runs of global / other rows: the plan visits exactly the visible pairs
    # plus the masked pairs of the band's two edges, and covers every query once.
    s, window = 3000, 256
    bm = BlockMask.longformer(s, window=window, global_tokens=glob, block_size=128)
    plan, partial = block_plan(bm, False, None)
    assert [q0 for q0, _, _ in plan] == [0] + [q1 for _, q1, _ in plan[:-1]]
    assert plan[-1][1] == s
    dense = bm.to_dense()
    visited = edges = 0
    for q0, q1, tiles in plan:
        for k0, k1, full in tiles:
            visited += (q1 - q0) * (k1 - k0)
            if full:
                assert dense[q0:q1, k0:k1].all()
            else:
                assert (q0, k0) in partial
                edges += (q1 - q0) * (k1 - k0)
    assert visited - edges + int(sum(dense[q0:q1, k0:k1].sum() for q0, q1, t in plan
                                     for k0, k1, f in t if not f)) == bm.visible_pairs
    assert edges <= s * window
