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

from scalign.kernels.kabsch import apply_transform, superpose
from scalign.validation import as_points, as_weights, check_pair, check_spread


class Transform(NamedTuple):
    """A similarity transform ``y = s R x + t`` (rows: ``Y = s X R^T + t``)."""

    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray | float


def _fit(X, Y, weights=None, *, scale=False, reflection=False):
    X = as_points("X", X)
    Y = as_points("Y", Y)
    check_pair(X, Y)
    check_spread("X", X)
    w = None if weights is None else as_weights("weights", weights, X.shape[-2])
    fit = superpose(X, Y, w, scale=scale, reflection=reflection)
    return X, fit


def _scalar(a: np.ndarray):
    return float(a) if a.ndim == 0 else a


def kabsch(
    X: ArrayLike, Y: ArrayLike, weights: ArrayLike | None = None, *, reflection: bool = False
) -> Transform:
    """Rigid fit of ``X`` onto ``Y`` (Kabsch): rotation, translation and ``scale = 1``.

    Minimises :math:`\\sum_k p_k \\lVert R x_k + t - y_k \\rVert^2` over proper rotations
    (det +1) unless ``reflection`` is set; ``p = weights / sum(weights)``, uniform by default.
    """
    _, fit = _fit(X, Y, weights, reflection=reflection)
    return Transform(fit.rotation, fit.translation, _scalar(fit.scale))


def umeyama(
    X: ArrayLike, Y: ArrayLike, weights: ArrayLike | None = None, *, reflection: bool = False
) -> Transform:
    """Similarity fit of ``X`` onto ``Y`` (Umeyama 1991): ``Y ≈ s X R^T + t``.

    ``s = tr(Sigma D) / sigma_x^2`` scales the moving set ``X``; it is not the inverse of
    the scale fitted the other way round when the data are noisy.
    """
    _, fit = _fit(X, Y, weights, scale=True, reflection=reflection)
    return Transform(fit.rotation, fit.translation, _scalar(fit.scale))


def procrustes_align(
    X: ArrayLike, Y: ArrayLike, scale: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Align ``X`` onto ``Y``; return ``(X_aligned, R, error)``.

    ``X_aligned = s X R^T + t`` exactly (the returned transform applied to ``X``) and
    ``error = ||Y - X_aligned||_F / sqrt(n_points)``, the RMSD.
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
    """
    X, fit = _fit(X, Y, weights, scale=scale)
    aligned = apply_transform(X, fit.rotation, fit.translation, fit.scale)
    return aligned, fit.rotation, _scalar(fit.rmsd)


def procrustes_rmse(X: ArrayLike, Y: ArrayLike, scale: bool = False) -> float:
    """RMSD after optimal alignment: ``||Y - X_aligned||_F / sqrt(n_points)``."""
    return _scalar(_fit(X, Y, scale=scale)[1].rmsd)


def procrustes_distance(X: ArrayLike, Y: ArrayLike, scale: bool = False) -> float:
    """Frobenius norm of the residual after optimal alignment, ``||Y - X_aligned||_F``."""
    X, fit = _fit(X, Y, scale=scale)
    return _scalar(fit.rmsd * np.sqrt(X.shape[-2]))


def procrustes_r2(X: ArrayLike, Y: ArrayLike, scale: bool = False) -> float:
    """``1 - SS_res / SS_tot`` after optimal alignment; SS_tot is taken about Y's centroid."""
    return _scalar(_fit(X, Y, scale=scale)[1].r2)


def rotation_angle(R1: ArrayLike, R2: ArrayLike, *, degrees: bool = True) -> np.ndarray:
    """Angle of the rotation ``R1^T R2`` (batched): ``arccos((tr(R1^T R2) - 1) / 2)``.

    The geodesic distance between two rotations; use it to compare a fitted rotation with a
    known one. Near 0 its precision is limited to about 1e-8 rad by the arccos.
    """
    R1, R2 = np.asarray(R1, dtype=np.float64), np.asarray(R2, dtype=np.float64)
    cos = (np.trace(np.swapaxes(R1, -1, -2) @ R2, axis1=-2, axis2=-1) - 1.0) / 2.0
    angle = np.arccos(np.clip(cos, -1.0, 1.0))
    return np.degrees(angle) if degrees else angle
