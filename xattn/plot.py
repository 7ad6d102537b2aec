"""Pictures of attention masks (optional extra: ``pip install 'xattn[plot]'``).

Not imported by ``import xattn``; matplotlib is imported when a picture is drawn.
"""

from __future__ import annotations

import numpy as np

from ._blockmask import BlockMask

__all__ = ["mask_image", "plot_mask"]

# Status codes of the picture, and their colours: what a kernel does with each pair.
INVISIBLE, MASKED, VISIBLE, FULL = 0, 1, 2, 3
_COLORS = ("#ffffff", "#f3d9b1", "#e07b39", "#2b5d8a")
_LABELS = ("skipped block", "masked in a partial block", "visible in a partial block",
           "full block")

# Above this many pairs the picture is drawn per block instead of per pair.
MAX_PIXELS = 2048 * 2048


def mask_image(mask, /, *, max_pixels=MAX_PIXELS):
    """The integer picture that :func:`plot_mask` draws, and the size of one of its cells.

    For a :class:`~xattn.BlockMask`: per pair ``FULL`` (3) in full blocks, ``VISIBLE`` (2) or
    ``MASKED`` (1) in partial blocks, ``INVISIBLE`` (0) in skipped blocks. When
    ``q_len * k_len > max_pixels`` the picture has one cell per block (``FULL``, ``VISIBLE``
    for partial, ``INVISIBLE``) and the cell size is the block size. For a boolean array:
    ``VISIBLE`` or ``INVISIBLE`` per pair.

    Examples
    --------
    >>> import xattn
    >>> from xattn.plot import mask_image
    >>> img, cell = mask_image(xattn.BlockMask.causal(4, block_size=2))
    >>> img.tolist(), cell
    ([[2, 1, 0, 0], [2, 2, 0, 0], [3, 3, 2, 1], [3, 3, 2, 2]], (1, 1))
    """
    if isinstance(mask, BlockMask):
        if mask.batch_shape:
            raise ValueError(
                f"mask: a batched BlockMask (batch_shape {mask.batch_shape}); pick one "
                "element first, e.g. bm[0]"
            )
        if mask.q_len * mask.k_len > max_pixels:
            grid = mask._grid(0, mask.n_blocks[0], 0, mask.n_blocks[1])[0]
            img = np.choose(grid, [INVISIBLE, FULL, VISIBLE])
            return img.astype(np.int8), mask.block_size
        bq, bk = mask.block_size
        grid = mask._grid(0, mask.n_blocks[0], 0, mask.n_blocks[1])[0]
        cells = np.repeat(np.repeat(grid, bq, 0), bk, 1)[:mask.q_len, :mask.k_len]
        dense = mask.to_dense()
        img = np.where(cells == 1, FULL,
                       np.where(cells == 2, np.where(dense, VISIBLE, MASKED), INVISIBLE))
        return img.astype(np.int8), (1, 1)
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != np.bool_:
        raise TypeError(
            "mask: expected an xattn.BlockMask or a boolean (q_len, k_len) array, got "
            f"{type(mask).__name__} with shape {getattr(m, 'shape', None)} dtype {m.dtype}"
        )
    return np.where(m, VISIBLE, INVISIBLE).astype(np.int8), (1, 1)


def plot_mask(mask, /, *, ax=None, title=None, legend=True, max_pixels=MAX_PIXELS):
    """Draw a :class:`~xattn.BlockMask` or a boolean ``(q_len, k_len)`` mask.

    Queries run down, keys across. Full blocks, the visible and masked pairs of partial
    blocks, and skipped blocks get one colour each, and block boundaries are drawn, so the
    picture shows the work a kernel does. Large masks are drawn one cell per block (see
    :func:`mask_image`).

    Parameters
    ----------
    mask : BlockMask or bool array ``(q_len, k_len)``
    ax : matplotlib Axes, optional
        Drawn into a new figure when omitted.
    title : str, optional
        Defaults to the mask's description.
    legend : bool
        Add a legend of the colours in use.
    max_pixels : int
        Pairs above which a BlockMask is drawn per block.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import xattn
    >>> from xattn.plot import plot_mask
    >>> ax = plot_mask(xattn.BlockMask.sliding_window(512, window=(64, 64), block_size=64))
    >>> ax.get_xlabel(), ax.get_ylabel()
    ('key', 'query')
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise ImportError("xattn.plot needs matplotlib: pip install 'xattn[plot]'") from exc
    img, (cq, ck) = mask_image(mask, max_pixels=max_pixels)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4 * img.shape[0] / max(img.shape[1], 1) + 0.6))
    cmap = ListedColormap(_COLORS)
    norm = BoundaryNorm(np.arange(-0.5, 4.5), cmap.N)
    is_bm = isinstance(mask, BlockMask)
    q_len, k_len = (mask.q_len, mask.k_len) if is_bm else img.shape
    ax.imshow(img, cmap=cmap, norm=norm, interpolation="nearest",
              extent=(0, k_len, q_len, 0), aspect="auto")
    if is_bm:
        bq, bk = mask.block_size
        nq, nk = mask.n_blocks
        if nq <= 64 and nk <= 64:  # block boundaries, while they stay readable
            ax.hlines(np.arange(1, nq) * bq, 0, k_len, colors="#999999", linewidths=0.4)
            ax.vlines(np.arange(1, nk) * bk, 0, q_len, colors="#999999", linewidths=0.4)
        if title is None:
            title = f"{mask._description}: {mask.nnz_blocks} blocks, density {mask.density:.2f}"
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        used = sorted(set(np.unique(img).tolist()) - {INVISIBLE})
        handles = [Patch(facecolor=_COLORS[c], edgecolor="#666666", label=_LABELS[c])
                   for c in used]
        if is_bm:
            handles.append(Patch(facecolor=_COLORS[INVISIBLE], edgecolor="#666666",
                                 label=_LABELS[INVISIBLE]))
        ax.legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.9)
    return ax
