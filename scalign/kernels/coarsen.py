"""Coarsening of point sets to beads: block means of consecutive points."""

from __future__ import annotations

from typing import Any

from scalign._array import namespace

Array = Any


def block_means(X: Array, factor: int, weights: Array | None = None) -> tuple[Array, Array]:
    """Beads of ``factor`` consecutive points; return ``(beads, block_weights)`` in float64.

    Bead ``j`` is the weighted mean :math:`\\sum_{k \\in B_j} w_k x_k / \\sum_{k \\in B_j}
    w_k` over the block :math:`B_j = \\{j f, \\dots, (j+1) f - 1\\}`; when ``n`` is not a
    multiple of ``f`` the last block holds the remaining ``n mod f`` points. The block
    weight is :math:`\\sum_{k \\in B_j} w_k` (the count without weights), so a short last
    block weighs less. A block whose weights are all zero has no weighted mean: it is
    placed at the plain mean of its points, with block weight 0 (a fit weighted by the
    block weights leaves it out).

    Parameters
    ----------
    X : (..., n, d) array
    factor : int
        Points per block, ``f >= 1``.
    weights : (n,) or (..., n) array, optional
    """
    xp = namespace(X, weights)
    X = xp.astype(xp.asarray(X), xp.float64)
    *batch, n, d = X.shape
    blocks = -(-n // factor)
    pad = blocks * factor - n
    if weights is None:
        w = xp.ones((n,), dtype=xp.float64)
    else:
        w = xp.astype(xp.asarray(weights), xp.float64)
    w = xp.broadcast_to(w, (*batch, n))
    Xw = X * w[..., None]
    if pad:
        Xw = xp.concat([Xw, xp.zeros((*batch, pad, d), dtype=xp.float64)], axis=-2)
        w = xp.concat([w, xp.zeros((*batch, pad), dtype=xp.float64)], axis=-1)
    sums = xp.sum(xp.reshape(Xw, (*batch, blocks, factor, d)), axis=-2)
    block_weights = xp.sum(xp.reshape(w, (*batch, blocks, factor)), axis=-1)
    beads = sums / xp.where(block_weights > 0, block_weights, 1.0)[..., None]
    empty = block_weights == 0
    if bool(xp.any(empty)):
        # 0 / 0 made the bead NaN, and with it every fit that used the beads
        beads = xp.where(empty[..., None], block_means(X, factor)[0], beads)
    return beads, block_weights
