"""Pair-level Procrustes functions on plain arrays.

These are the kernels of :mod:`scalign.kernels.kabsch` called on one item (or a batch,
since every argument may carry leading batch axes), with the inputs checked first.
Convention: ``X`` is moved onto ``Y``, ``Y ≈ s X R^T + t``; ``error`` is the RMSD
``||Y - X_aligned||_F / sqrt(n_points)`` (weighted: ``sqrt(sum_k p_k |r_k|^2)``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from scalign.kernels.coarsen import block_means
from scalign.kernels.kabsch import apply_transform, superpose
from scalign.kernels.robust import TUNING, irls_superpose
from scalign.validation import (
    as_points,
    as_weights,
    check_enough_points,
    check_factor,
    check_flag,
    check_iterations,
    check_option,
    check_pair,
    check_spread,
)

ROBUST_LOSSES = tuple(TUNING)
MULTISCALE_METHODS = ("standard", "weighted", "robust")


class Transform(NamedTuple):
    """A similarity transform ``y = s R x + t`` (rows: ``Y = s X R^T + t``)."""

    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray | float


def _checked(X, Y, weights=None):
    X = as_points("X", X)
    Y = as_points("Y", Y)
    check_pair(X, Y)
    if Y.ndim > 2 and Y.shape[:-2] != X.shape[:-2]:
        # the results have X's batch shape: one target for all, or one per set of X
        raise ValueError(
            f"Y has {int(np.prod(Y.shape[:-2]))} sets (batch shape {Y.shape[:-2]}) but X has "
            f"batch shape {X.shape[:-2]}: Y must be one set (n, d) or one per set of X"
        )
    check_spread("X", X)
    check_spread("Y", Y)
    w = None if weights is None else as_weights("weights", weights, X.shape[-2])
    if w is not None and w.ndim > 1 and w.shape[:-1] != X.shape[:-2]:
        n, batch = X.shape[-2], X.shape[:-2]
        rows = f" or {batch + (n,)} (one row per set of X)" if batch else ""
        raise ValueError(f"weights must have shape ({n},) (one per point){rows}, got {w.shape}")
    return X, Y, w


def _fit(X, Y, weights=None, *, scale=False, reflection=False):
    check_flag("scale", scale)
    check_flag("reflection", reflection)
    X, Y, w = _checked(X, Y, weights)
    return X, superpose(X, Y, w, scale=scale, reflection=reflection)


def _scalar(a: np.ndarray):
    return float(a) if a.ndim == 0 else a


def kabsch(
    X: ArrayLike, Y: ArrayLike, weights: ArrayLike | None = None, *, reflection: bool = False
) -> Transform:
    """Rigid fit of ``X`` onto ``Y`` (Kabsch): rotation, translation and ``scale = 1``.

    Minimises :math:`\\sum_k p_k \\lVert R x_k + t - y_k \\rVert^2` over proper rotations
    (det +1) unless ``reflection`` is set; ``p = weights / sum(weights)``, uniform by default.

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    weights : (n,) or (..., n) array, optional
        Non-negative per-point weights (not all zero); one row per set of ``X`` when
        batched. Centroids are weighted too.
    reflection : bool
        Allow improper rotations (det -1).

    Returns
    -------
    Transform
        float64 ``rotation (..., d, d)`` and ``translation (..., d)``; ``scale`` is 1.0
        (a float for one pair, an array of ones over the batch shape otherwise).

    Raises
    ------
    ValueError
        ``X`` and ``Y`` differ in points or dimensions, fewer than ``d`` points, all
        points of a set coincide, a non-finite coordinate, or invalid weights.
    TypeError
        A non-numeric or complex input.
    """
    _, fit = _fit(X, Y, weights, reflection=reflection)
    return Transform(fit.rotation, fit.translation, _scalar(fit.scale))


def umeyama(
    X: ArrayLike, Y: ArrayLike, weights: ArrayLike | None = None, *, reflection: bool = False
) -> Transform:
    """Similarity fit of ``X`` onto ``Y`` (Umeyama 1991): ``Y ≈ s X R^T + t``.

    ``s = tr(Sigma D) / sigma_x^2`` scales the moving set ``X``; it is not the inverse of
    the scale fitted the other way round when the data are noisy.

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    weights : (n,) or (..., n) array, optional
        Non-negative per-point weights (not all zero); one row per set of ``X`` when
        batched. Centroids are weighted too.
    reflection : bool
        Allow improper rotations (det -1).

    Returns
    -------
    Transform
        float64 ``rotation (..., d, d)``, ``translation (..., d)`` and ``scale`` ``s``
        (a float for one pair, an array over the batch shape otherwise).

    Raises
    ------
    ValueError
        ``X`` and ``Y`` differ in points or dimensions, fewer than ``d`` points, all
        points of a set coincide, a non-finite coordinate, or invalid weights.
    TypeError
        A non-numeric or complex input.
    """
    _, fit = _fit(X, Y, weights, scale=True, reflection=reflection)
    return Transform(fit.rotation, fit.translation, _scalar(fit.scale))


def procrustes_align(
    X: ArrayLike, Y: ArrayLike, scale: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Align ``X`` onto ``Y``; return ``(X_aligned, R, error)``.

    ``X_aligned = s X R^T + t`` exactly (the returned transform applied to ``X``) and
    ``error = ||Y - X_aligned||_F / sqrt(n_points)``, the RMSD.

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    scale : bool
        Also fit an isotropic scale ``s`` of ``X`` (Umeyama); ``s = 1`` otherwise.

    Returns
    -------
    X_aligned : (..., n, d) array
        ``s X R^T + t``, in ``X``'s floating dtype (float64 for integer input).
    R : (..., d, d) float64 array
        The rotation.
    error : float or (...) array
        The RMSD; a float for one pair.

    Raises
    ------
    ValueError
        ``X`` and ``Y`` differ in points or dimensions, fewer than ``d`` points, all
        points of a set coincide, or a non-finite coordinate.
    TypeError
        A non-numeric or complex input.
    """
    X, fit = _fit(X, Y, scale=scale)
    aligned = apply_transform(X, fit.rotation, fit.translation, fit.scale)
    return aligned, fit.rotation, _scalar(fit.rmsd)


def weighted_procrustes(
    X: ArrayLike, Y: ArrayLike, weights: ArrayLike, scale: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted alignment of ``X`` onto ``Y``; return ``(X_aligned, R, error)``.

    Minimises :math:`\\sum_k p_k \\lVert s R x_k + t - y_k \\rVert^2`, ``p = w / sum(w)``,
    with weighted centroids; ``error = sqrt(sum_k p_k |r_k|^2)`` (the weighted RMSD).

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    weights : (n,) or (..., n) array
        Non-negative per-point weights (not all zero); one row per set of ``X`` when
        batched.
    scale : bool
        Also fit an isotropic scale ``s`` of ``X`` (Umeyama); ``s = 1`` otherwise.

    Returns
    -------
    X_aligned : (..., n, d) array
        ``s X R^T + t``, in ``X``'s floating dtype (float64 for integer input).
    R : (..., d, d) float64 array
        The rotation.
    error : float or (...) array
        The weighted RMSD; a float for one pair.

    Raises
    ------
    ValueError
        ``X`` and ``Y`` differ in points or dimensions, fewer than ``d`` points, all
        points of a set coincide, a non-finite coordinate, or invalid weights.
    TypeError
        A non-numeric or complex input.
    """
    X, fit = _fit(X, Y, weights, scale=scale)
    aligned = apply_transform(X, fit.rotation, fit.translation, fit.scale)
    return aligned, fit.rotation, _scalar(fit.rmsd)


def procrustes_rmse(X: ArrayLike, Y: ArrayLike, scale: bool = False) -> float:
    """RMSD after optimal alignment: ``||Y - X_aligned||_F / sqrt(n_points)``.

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    scale : bool
        Also fit an isotropic scale ``s`` of ``X`` (Umeyama); ``s = 1`` otherwise.

    Returns
    -------
    float or (...) array
        The RMSD; a float for one pair, float64 over the batch shape otherwise.
    """
    return _scalar(_fit(X, Y, scale=scale)[1].rmsd)


def procrustes_distance(X: ArrayLike, Y: ArrayLike, scale: bool = False) -> float:
    """Frobenius norm of the residual after optimal alignment, ``||Y - X_aligned||_F``.

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    scale : bool
        Also fit an isotropic scale ``s`` of ``X`` (Umeyama); ``s = 1`` otherwise.

    Returns
    -------
    float or (...) array
        The Frobenius norm of the residual; a float for one pair, float64 over the batch
        shape otherwise.
    """
    X, fit = _fit(X, Y, scale=scale)
    return _scalar(fit.rmsd * np.sqrt(X.shape[-2]))


def procrustes_r2(X: ArrayLike, Y: ArrayLike, scale: bool = False) -> float:
    """``1 - SS_res / SS_tot`` after optimal alignment; SS_tot is taken about Y's centroid.

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    scale : bool
        Also fit an isotropic scale ``s`` of ``X`` (Umeyama); ``s = 1`` otherwise.

    Returns
    -------
    float or (...) array
        R²; a float for one pair, float64 over the batch shape otherwise.
    """
    return _scalar(_fit(X, Y, scale=scale)[1].r2)


def rotation_angle(R1: ArrayLike, R2: ArrayLike, *, degrees: bool = True) -> np.ndarray:
    """Angle of the rotation ``R1^T R2`` (batched), 2-D or 3-D.

    The geodesic distance between two rotations; use it to compare a fitted rotation with a
    known one. 3-D: ``arccos((tr(R1^T R2) - 1) / 2)``, whose precision near 0 is limited to
    about 1e-8 rad by the arccos; 2-D: ``|theta|`` of ``R1^T R2`` (by ``atan2``, exact near
    0).

    Parameters
    ----------
    R1, R2 : (..., 2, 2) or (..., 3, 3) array
        Rotation matrices of the same dimension; the batch shapes broadcast. Not checked
        to be rotations.
    degrees : bool
        Return degrees (default) rather than radians.

    Returns
    -------
    ndarray
        float64 angles in [0, 180] degrees (or [0, π] rad) over the broadcast batch shape
        (a NumPy scalar for two single matrices).

    Raises
    ------
    ValueError
        ``R1`` or ``R2`` not of shape ``(..., 2, 2)`` or ``(..., 3, 3)``, or of different
        dimensions.
    """
    R1, R2 = np.asarray(R1, dtype=np.float64), np.asarray(R2, dtype=np.float64)
    d = R1.shape[-1] if R1.ndim else 0
    if d not in (2, 3) or R1.shape[-2:] != (d, d) or R2.shape[-2:] != (d, d):
        raise ValueError(
            "R1 and R2 must be 2-D or 3-D rotations of one dimension, shape (..., 2, 2) or "
            f"(..., 3, 3); got {R1.shape} and {R2.shape}"
        )
    M = np.swapaxes(R1, -1, -2) @ R2
    if d == 2:
        # the 3-D formula gave 60 degrees for the 2-D identity (tr I = 2, not 3)
        angle = np.abs(np.arctan2(M[..., 1, 0] - M[..., 0, 1], M[..., 0, 0] + M[..., 1, 1]))
    else:
        cos = (np.trace(M, axis1=-2, axis2=-1) - 1.0) / 2.0
        angle = np.arccos(np.clip(cos, -1.0, 1.0))
    return np.degrees(angle) if degrees else angle


def iteratively_reweighted_procrustes(
    X: ArrayLike,
    Y: ArrayLike,
    robust_loss: str = "huber",
    max_iterations: int = 50,
    tol: float = 1e-6,
    scale: bool = False,
    weights: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Robust alignment of ``X`` onto ``Y`` by IRLS; return ``(X_aligned, R, error, weights)``.

    Iterates a weighted fit and a reweighting of each point from its residual norm
    :math:`r_k` over the robust scale :math:`\\hat\\sigma = 1.4826\\,\\mathrm{median}\\,
    r_k` (over the points of positive prior weight): Huber (c = 1.345), Tukey's bisquare
    (c = 4.685) or Welsch (c = 2.985); see :mod:`scalign.kernels.robust`. Stops when no
    weight changes by more than ``tol``.

    Parameters
    ----------
    X : (..., n, d) array
        Moving point set(s), points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one set, or one per set of ``X`` (its batch shape); paired point by point.
    robust_loss : {"huber", "tukey", "welsch"}
    max_iterations : int
        Reweighting iterations at most (after the initial least-squares fit).
    tol : float
        Convergence: the largest change of any weight.
    scale : bool
        Also fit an isotropic scale ``s`` of ``X`` (Umeyama); ``s = 1`` otherwise.
    weights : (n,) or (..., n) array, optional
        Prior per-point weights (e.g. masses); the robust weights multiply them.

    Returns
    -------
    X_aligned : ``s X R^T + t`` with the final transform.
    R : rotation.
    error : weighted RMSD :math:`\\sqrt{\\sum_k p_k r_k^2}` under the final weights
        (``p = weights / sum(weights)``), the quantity the fit minimises at convergence.
    weights : final per-point weights, prior ``weights`` times the robust weight, so that
        outliers show as weights near 0.

    Raises
    ------
    ValueError
        An unknown ``robust_loss``, a non-positive ``max_iterations`` or ``tol``, or the
        input errors of :func:`kabsch`.

    Notes
    -----
    Judge a robust fit by its inlier RMSD and the error of the rotation, not by the
    unweighted R² or RMSD over all points, which plain Kabsch maximises (minimises) by
    construction.
    """
    check_option("robust_loss", robust_loss, ROBUST_LOSSES)
    check_iterations(max_iterations, tol)
    check_flag("scale", scale)
    X, Y, prior = _checked(X, Y, weights)
    result = irls_superpose(
        X,
        Y,
        prior,
        loss=robust_loss,
        scale=scale,
        max_iterations=max_iterations,
        tol=tol,
    )
    fit = result.fit
    aligned = apply_transform(X, fit.rotation, fit.translation, fit.scale)
    return aligned, fit.rotation, _scalar(fit.rmsd), result.weights


def coarsen(X: ArrayLike, factor: int, weights: ArrayLike | None = None):
    """Block means of ``factor`` consecutive points; return ``(coarse, block_weights)``.

    Block ``j`` holds points ``j*factor ... (j+1)*factor - 1``; when ``n`` is not a
    multiple of ``factor`` the last block holds the remaining ``n mod factor`` points.
    Each block's position is the (weighted) mean of its points and its weight is the sum
    of their weights (their count without weights), so a short last block weighs less. A
    block whose weights are all zero sits at the plain mean of its points, with weight 0.

    Parameters
    ----------
    X : (..., n, d) array
        Point set(s), points as rows.
    factor : int
        Points per block, ``>= 1``.
    weights : (n,) or (..., n) array, optional
        Non-negative per-point weights (not all zero).

    Returns
    -------
    coarse : (..., ceil(n / factor), d) float64 array
        The block means (beads).
    block_weights : (..., ceil(n / factor)) float64 array
        Each block's summed weight (point count without weights).
    """
    X = as_points("X", X)
    check_factor(factor)
    w = None if weights is None else as_weights("weights", weights, X.shape[-2])
    return block_means(X, factor, w)


def multiscale_procrustes(
    low_res: ArrayLike,
    high_res: ArrayLike,
    scale_factor: int,
    method: str = "standard",
    *,
    scale: bool = False,
    weights: ArrayLike | None = None,
    robust_loss: str = "huber",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Align a high-resolution structure onto a low-resolution one; ``(aligned, R, error)``.

    ``high_res`` (``n`` points) is the set that is **moved**; ``low_res`` (``ceil(n /
    scale_factor)`` points, bead ``j`` standing for high-resolution points ``j*f ...
    (j+1)*f - 1``) stays fixed. ``high_res`` is coarsened to the low-resolution beads
    (:func:`coarsen`: the mean of each block of ``scale_factor`` points, a shorter last
    block when ``n`` is not a multiple), the transform is fitted between the beads, and
    applied to every point of ``high_res``:

    * ``"standard"``: Kabsch/Umeyama on the beads, every bead weighted equally;
    * ``"weighted"``: beads weighted by their block weight (the count of points, or the
      sum of ``weights`` over the block), so a short last block counts less;
    * ``"robust"``: IRLS (``robust_loss``) on the block-weighted beads.

    Parameters
    ----------
    low_res : (ceil(n / scale_factor), d) array
        The fixed low-resolution target.
    high_res : (n, d) array
        The moved high-resolution structure.
    scale_factor : int
        High-resolution points per bead, ``>= 1``.
    method : {"standard", "weighted", "robust"}
        How the beads are fitted (above).
    scale : bool
        Also fit an isotropic scale of ``high_res``.
    weights : (n,) array, optional
        Per-point weights of ``high_res``, used in the bead means and block weights.
    robust_loss : {"huber", "tukey", "welsch"}
        The IRLS loss of ``method="robust"``.

    Returns
    -------
    aligned : (n, d) ``s high_res R^T + t``, at full resolution.
    R : (d, d) rotation.
    error : RMSD between the transformed beads and ``low_res`` (weighted for "weighted"
        and "robust", with the final weights).

    Raises
    ------
    ValueError
        An unknown ``method`` or ``robust_loss``, ``low_res`` of the wrong number of
        points or dimensions, fewer than ``d`` beads, or coinciding beads.
    """
    check_option("method", method, MULTISCALE_METHODS)
    check_factor(scale_factor, "scale_factor")
    low = as_points("low_res", low_res)
    high = as_points("high_res", high_res)
    n, d = high.shape[-2:]
    w = None if weights is None else as_weights("weights", weights, n)
    if low.shape[-1] != d:
        raise ValueError(f"low_res is {low.shape[-1]}-dimensional but high_res is {d}-dimensional")
    blocks = -(-n // scale_factor)
    if low.shape[-2] != blocks:
        raise ValueError(
            f"low_res has {low.shape[-2]} points but high_res has {n}: with scale_factor "
            f"{scale_factor} it needs ceil({n}/{scale_factor}) = {blocks}"
        )
    check_enough_points("low_res", blocks, d)
    check_spread("low_res", low)
    beads, block_weights = block_means(high, scale_factor, w)
    check_spread("coarsened high_res", beads)
    if method == "robust":
        check_option("robust_loss", robust_loss, ROBUST_LOSSES)
        fit = irls_superpose(beads, low, block_weights, loss=robust_loss, scale=scale).fit
    else:
        bead_weights = block_weights if method == "weighted" else None
        fit = superpose(beads, low, bead_weights, scale=scale)
    aligned = apply_transform(high, fit.rotation, fit.translation, fit.scale)
    return aligned, fit.rotation, _scalar(fit.rmsd)
