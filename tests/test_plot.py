"""xattn.plot: the picture of a BlockMask or a dense mask."""

from __future__ import annotations

import numpy as np
import pytest

import xattn
from xattn.plot import FULL, INVISIBLE, MASKED, VISIBLE, mask_image

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def test_image_of_block_mask():
    bm = xattn.BlockMask.sliding_window(100, window=(20, 5), block_size=32)
    img, cell = mask_image(bm)
    assert cell == (1, 1) and img.shape == (100, 100)
    dense = bm.to_dense()
    np.testing.assert_array_equal(np.isin(img, (VISIBLE, FULL)), dense)
    bq, bk = bm.block_size
    for i in range(bm.n_blocks[0]):
        rows = slice(i * bq, (i + 1) * bq)
        for j in bm.full_col_idx[bm.full_row_ptr[i]:bm.full_row_ptr[i + 1]]:
            assert (img[rows, j * bk:(j + 1) * bk] == FULL).all()
        for j in bm.partial_col_idx[bm.partial_row_ptr[i]:bm.partial_row_ptr[i + 1]]:
            tile = img[rows, j * bk:(j + 1) * bk]
            assert np.isin(tile, (VISIBLE, MASKED)).all() and (tile == MASKED).any()
    assert (img[:32, 64:] == INVISIBLE).all()


def test_image_per_block_when_large():
    bm = xattn.BlockMask.causal(5000, block_size=128)
    img, cell = mask_image(bm, max_pixels=1000)
    assert cell == (128, 128) and img.shape == bm.n_blocks
    np.testing.assert_array_equal(np.diag(img), np.full(bm.n_blocks[0], VISIBLE))
    assert (img[np.tril_indices(bm.n_blocks[0], -1)] == FULL).all()
    assert (img[np.triu_indices(bm.n_blocks[0], 1)] == INVISIBLE).all()


def test_image_of_dense_mask():
    m = np.random.default_rng(0).random((7, 9)) < 0.5
    img, _ = mask_image(m)
    np.testing.assert_array_equal(img == VISIBLE, m)


@pytest.mark.parametrize("make", [
    lambda: xattn.BlockMask.bigbird(1000, seed=0),
    lambda: xattn.BlockMask.documents([0, 100, 250, 300], causal=True, block_size=64),
    lambda: np.tril(np.ones((50, 60), bool)),
])
def test_plot_mask(make):
    import matplotlib.pyplot as plt

    from xattn.plot import plot_mask

    fig, ax = plt.subplots()
    out = plot_mask(make(), ax=ax, title="t")
    assert out is ax and ax.get_title() == "t" and len(ax.images) == 1
    plt.close(fig)


def test_bad_input():
    with pytest.raises(TypeError, match="boolean"):
        mask_image(np.ones((3, 3)))
    flags = np.zeros((2, 50), bool)
    flags[0, 3] = True
    with pytest.raises(ValueError, match="batched"):
        mask_image(xattn.BlockMask.longformer(50, window=4, global_tokens=flags))
