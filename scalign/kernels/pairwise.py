"""RMSD after optimal superposition between every structure of one batch and every
structure of another, without one fit per pair.

For centred structures :math:`A_i, B_j` (weighted centroids, :math:`p = w / \\sum w`) the
RMSD after the best proper rotation is

.. math::  e_{ij}^2 = g_i + g_j - 2\\lambda_{max}(H_{ij}), \\qquad
           H_{ij} = \\sum_k p_k a_{ik} b_{jk}^T, \\quad g_i = \\sum_k p_k \\lVert a_{ik}\\rVert^2

(Theobald 2005). All :math:`H_{ij}` of a block come from one GEMM,
``(A * p).transpose(0, 2, 1).reshape(a*d, n) @ B.transpose(1, 0, 2).reshape(n, b*d)``, in
float64; :math:`\\lambda_{max}` from the vectorised QCP Newton solve (d = 3) or the batched
SVD (other d), in cache-sized blocks of pairs. Pairs whose :math:`\\lambda_{max}` Newton
cannot pin down well enough (a nearly repeated root: collinear and near-collinear
structures) take the SVD's instead, as :func:`scalign.kernels.kabsch.superpose` does.
Pairs whose :math:`e^2` is below ``1e-9`` of :math:`g_i + g_j` (where the closed form has
lost digits to cancellation) are refitted explicitly by
:func:`scalign.kernels.kabsch.superpose`; a structure against itself is 0.
A structure with a NaN/inf coordinate gets NaN in its row (or column) only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from array_api_compat import is_numpy_namespace

from scalign._array import clamp, namespace
from scalign.kernels.kabsch import _svd_rotation, resolve_by_svd, superpose
from scalign.kernels.qcp import largest_eigenvalue

Array = Any

# The closed-form e^2 carries an absolute error of a few float64 ulps of g_i + g_j
# (measured: relative RMSD error ~2.5e-16 g / e^2); below 1e-9 g that exceeds ~1e-7
# relative, and the pair is refitted explicitly.
_CLOSE = 1e-9
# A pair whose lambda_max is uncertain enough to move its RMSD by more than this fraction of
# the structures' size gets the SVD's lambda_max (ten times below the 1e-9 the kernel is
# tested to against a float64 SVD Kabsch).
_RESOLVE = 1e-10
_SOLVE_BLOCK = 32768


def _block_pairs(xp, n_pairs: int) -> int:
    """Pairs per solve: the Newton iterations' temporaries stay in cache (2x faster than
    one pass over a 250k-pair block on a 2-core EPYC); on a GPU, all pairs at once."""
    return _SOLVE_BLOCK if is_numpy_namespace(xp) else max(n_pairs, 1)


def _trace(xp, H: Array, bound: Array, g: Array) -> Array:
    """:math:`\\mathrm{tr}(\\Sigma D) = \\lambda_{max}` for proper rotations, any ``d``.

    For ``d = 3`` the QCP Newton solve; near a repeated root (collinear and near-collinear
    structures) it pins :math:`\\lambda_{max}` down only to about
    :math:`\\sqrt{\\epsilon}\\,\\lambda`, and :math:`e = \\sqrt{g - 2\\lambda}` moves by
    :math:`\\delta\\lambda / e`: pairs where that could exceed ``_RESOLVE`` of the
    structures' size :math:`\\sqrt{g}` get the SVD's trace instead (pairs below ``_CLOSE``
    are refitted whole by the caller). Other ``d``: the SVD.
    """
    d = H.shape[-1]
    if d != 3:
        trace = _svd_rotation(xp, xp.reshape(H, (-1, d, d)), reflection=False)[1]
        return xp.reshape(trace, H.shape[:-2])
    lam, error = largest_eigenvalue(xp, H, bound)
    e2 = g - 2.0 * lam
    unsure = (e2 >= _CLOSE * g) & (error * error > _RESOLVE * _RESOLVE * e2 * g)
    resolve_by_svd(xp, H, unsure, lam)
    return lam


class Centred(NamedTuple):
    """A batch prepared for :func:`rmsd_block`: each structure centred once.

    Attributes
    ----------
    coords : (d, a, n) float64, :math:`x_k - \\bar x`, coordinate-major with the points
        last: a block's cross-covariances are one GEMM with the other batch's transpose,
        and each entry :math:`H[p, q]` of all pairs is a contiguous (a, b) plane of it.
    g : (a,) :math:`\\sum_k p_k \\lVert x_k - \\bar x\\rVert^2`.
    p : (n,) the normalised weights.
    """

    coords: Array
    g: Array
    p: Array


def centre(X: Array, weights: Array | None = None) -> Centred:
    """Centre every structure of ``X (a, n, d)`` on its (weighted) centroid, in float64."""
    xp = namespace(X, weights)
    a, n, d = X.shape
    if weights is None:
        p = xp.full((n,), 1.0 / n, dtype=xp.float64)
    else:
        w = xp.astype(xp.asarray(weights), xp.float64)
        p = w / xp.sum(w)
    C = xp.astype(xp.permute_dims(xp.asarray(X), (2, 0, 1)), xp.float64)
    C = C - xp.reshape(xp.reshape(C, (d * a, n)) @ p, (d, a, 1))
    g = xp.sum(xp.reshape(xp.reshape(C * C, (d * a, n)) @ p, (d, a)), axis=0)
    return Centred(C, g, p)


def rmsd_block(A: Centred, B: Centred | None = None) -> Array:
    """RMSD after optimal superposition for every pair of two centred batches.

    ``B = None`` means ``A`` against itself: a symmetric block with a zero diagonal, whose
    cross-covariances come from a symmetric rank-k product (``L Lᵀ`` with ``L = A √p``,
    half the GEMM) and whose :math:`\\lambda_{max}` are solved on and below the diagonal
    only, then mirrored.
    """
    xp = namespace(A.coords)
    same = B is None
    B = A if same else B
    (d, a, n), b = A.coords.shape, B.coords.shape[1]
    if same:
        left = xp.reshape(A.coords * xp.sqrt(A.p), (d * a, n))
        right = left
    else:
        left = xp.reshape(A.coords * A.p, (d * a, n))
        right = xp.reshape(B.coords, (d * b, n))
    G = xp.reshape(left @ xp.matrix_transpose(right), (d, a, d, b))
    # A view, not a copy: H[i, j, p, q] = G[p, i, q, j], each (p, q) plane contiguous.
    H = xp.permute_dims(G, (1, 3, 0, 2))
    g = A.g[:, None] + B.g[None, :]
    # a non-finite coordinate makes its structure's g non-finite (and only its H entries)
    ok = xp.isfinite(g)
    if not bool(xp.all(ok)):
        H = xp.where(ok[..., None, None], H, xp.eye(d, dtype=xp.float64))
    e2 = xp.zeros_like(g)
    step = max(1, _block_pairs(xp, a * b) // b)
    with np.errstate(invalid="ignore"):
        for start in range(0, a, step):
            stop = min(a, start + step)
            cols = slice(0, stop if same else b)
            pair = (slice(start, stop), cols)
            bound = xp.where(ok[pair], 0.5 * g[pair], 1.5)
            e2[pair] = g[pair] - 2.0 * _trace(xp, H[pair], bound, g[pair])
    e2 = clamp(e2, 0.0)
    close = ok & (e2 < _CLOSE * g)
    if same:
        # solved below the diagonal only; a structure against itself is exactly 0
        i = xp.arange(a)
        close = close & (i[:, None] > i[None, :])
    close = xp.reshape(close, (-1,))
    if bool(xp.any(close)):
        idx = xp.nonzero(close)[0]
        i, j = idx // b, idx % b
        moving = xp.permute_dims(A.coords[:, i, :], (1, 2, 0))
        target = xp.permute_dims(B.coords[:, j, :], (1, 2, 0))
        fit = superpose(moving, target, A.p[None, :])
        e2 = xp.reshape(e2, (-1,))
        e2[idx] = fit.rmsd * fit.rmsd
        e2 = xp.reshape(e2, (a, b))
    if same:
        i = xp.arange(a)
        lower = i[:, None] > i[None, :]
        e2 = xp.where(lower, e2, xp.matrix_transpose(e2))
        e2 = xp.where(i[:, None] == i[None, :], 0.0, e2)
    return xp.where(ok, xp.sqrt(e2), xp.nan)


def pairwise_rmsd(A: Array, B: Array | None = None, weights: Array | None = None) -> Array:
    """RMSD after optimal superposition for every pair ``(A[i], B[j])``.

    Parameters
    ----------
    A : (a, n, d) array
    B : (b, n, d) array, optional
        Defaults to ``A`` (the matrix is then symmetric with a zero diagonal).
    weights : (n,) array, optional
        Per-point weights; centroids are weighted too.

    Returns
    -------
    (a, b) float64 array of :math:`e_{ij}` (proper rotations, no scaling).
    """
    return rmsd_block(centre(A, weights), None if B is None else centre(B, weights))
