"""Robust superposition by iteratively reweighted least squares (IRLS).

Each iteration fits a weighted Kabsch/Umeyama superposition (:func:`superpose`), then
reweights every point from its residual norm :math:`r_k = \\lVert y_k - (s R x_k + t)\\rVert`
scaled by a robust estimate of the residual scale,

.. math::  u_k = r_k / \\hat\\sigma, \\qquad \\hat\\sigma = 1.4826\\,\\mathrm{median}_k\\, r_k

(the median absolute deviation of the residuals about their ideal centre, zero, scaled to
be consistent for Gaussian residuals; the median is over the points of positive prior
weight, those in the fit), with the weight function of an M-estimator:

=========  =====================================================  ===========
loss       weight :math:`w(u)`                                     tuning ``c``
=========  =====================================================  ===========
huber      :math:`1` if :math:`u \\le c`, else :math:`c / u`          1.345
tukey      :math:`(1 - (u/c)^2)^2` if :math:`u < c`, else 0        4.685
welsch     :math:`\\exp(-(u/c)^2)`                                   2.985
=========  =====================================================  ===========

(the constants give 95% efficiency at the Gaussian). The final per-point weight is the
prior weight times :math:`w(u_k)`. Iteration stops for an item when no weight changes by
more than ``tol`` times the item's largest prior weight.

Judge a robust fit by its inlier RMSD and by the error of the recovered rotation, not by
the unweighted R² or RMSD over all points: ordinary Kabsch minimises the unweighted sum
of squares, so it maximises unweighted R² by construction, and a robust fit that ignores
the outliers always looks worse by that score while recovering the motion far better.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from scalign._array import namespace
from scalign.kernels.kabsch import Superposition, apply_transform, superpose

Array = Any

#: Tuning constants of the weight functions (95% Gaussian efficiency).
TUNING = {"huber": 1.345, "tukey": 4.685, "welsch": 2.985}
# 1 / Phi^-1(3/4): makes the median absolute deviation a consistent Gaussian sigma.
_MAD_TO_SIGMA = 1.4826
# A residual scale below this fraction of the target's RMS size about its centroid is
# rounding (float32 data carry ~1e-7 of it), not noise: the floor keeps exact fits at
# weights ~1 instead of weighting points by their rounding errors.
_SIGMA_FLOOR = 1e-6


class RobustSuperposition(NamedTuple):
    """Result of :func:`irls_superpose`, batched over the leading axes of the input.

    Attributes
    ----------
    fit : Superposition with the final weights; its ``rmsd`` is the weighted RMSD
        :math:`\\sqrt{\\sum_k p_k r_k^2}`, :math:`p = w / \\sum w`.
    weights : (..., n) final weights (prior weight times the robust weight, in [0, prior]).
    iterations : (...) reweighting iterations until the weights settled.
    converged : (...) whether they settled within ``max_iterations``.
    """

    fit: Superposition
    weights: Array
    iterations: Array
    converged: Array


def robust_weight(xp, u: Array, loss: str, c: float) -> Array:
    """Weight function :math:`w(u)` of the M-estimator ``loss`` (see the module table)."""
    if loss == "huber":
        return xp.where(u <= c, 1.0, c / xp.where(u <= c, 1.0, u))
    z2 = (u / c) ** 2
    if loss == "tukey":
        return xp.where(z2 < 1.0, (1.0 - z2) ** 2, 0.0)
    return xp.exp(-z2)


def _median(xp, a: Array, mask: Array | None = None) -> Array:
    """Median over the last axis (the array API has ``sort`` but no ``median``), of the
    entries where ``mask`` is true when given (at least one per row)."""
    if mask is None:
        s = xp.sort(a, axis=-1)
        n = s.shape[-1]
        return 0.5 * (s[..., (n - 1) // 2] + s[..., n // 2])
    # the masked-out entries sort last; the median is that of the first k
    s = xp.sort(xp.where(mask, a, xp.inf), axis=-1)
    k = xp.sum(xp.astype(mask, xp.int64), axis=-1, keepdims=True)
    low = xp.take_along_axis(s, xp.maximum(k - 1, 0) // 2, axis=-1)
    high = xp.take_along_axis(s, k // 2, axis=-1)
    return 0.5 * (low + high)[..., 0]


def residual_norms(X: Array, Y: Array, fit: Superposition) -> Array:
    """:math:`\\lVert y_k - (s R x_k + t)\\rVert` per point, float64, shape ``(..., n)``."""
    xp = namespace(X, Y)
    X64 = xp.astype(xp.asarray(X), xp.float64)
    diff = apply_transform(X64, fit.rotation, fit.translation, fit.scale) - xp.astype(
        xp.asarray(Y), xp.float64
    )
    return xp.sqrt(xp.sum(diff * diff, axis=-1))


def irls_superpose(
    X: Array,
    Y: Array,
    weights: Array | None = None,
    *,
    loss: str = "huber",
    scale: bool = False,
    reflection: bool = False,
    max_iterations: int = 50,
    tol: float = 1e-6,
    tuning: float | None = None,
) -> RobustSuperposition:
    """Robust superposition of each ``X[i]`` onto ``Y`` by IRLS (see the module docstring).

    Parameters
    ----------
    X : (..., n, d) array
        Moving point sets.
    Y : (n, d) or (..., n, d) array
        Target.
    weights : (n,) or (..., n) array, optional
        Prior per-point weights (e.g. masses); the robust weights multiply them.
    loss : {"huber", "tukey", "welsch"}
    scale, reflection : bool
        As in :func:`superpose`.
    max_iterations : int
        Reweighting iterations at most (after the initial least-squares fit).
    tol : float
        Convergence: the largest change of any weight over the item's largest prior weight
        (weights are in [0, 1] × prior; masses of 12-32 as priors made an absolute ``tol``
        12-32 times stricter).
    tuning : float, optional
        The constant ``c``; the table's value by default.

    Returns
    -------
    RobustSuperposition
        A non-finite item gives NaN results and weights for that item only.
    """
    xp = namespace(X, Y, weights)
    c = TUNING[loss] if tuning is None else float(tuning)
    X, Y = xp.asarray(X), xp.asarray(Y)
    batch, (n, d) = X.shape[:-2], X.shape[-2:]
    # One float64 copy for all iterations (each fit would cast again); items flattened so
    # that the unsettled ones can be gathered.
    X = xp.reshape(xp.astype(X, xp.float64), (-1, n, d))
    shared = Y.ndim == 2
    Y = xp.astype(Y, xp.float64) if shared else xp.reshape(xp.astype(Y, xp.float64), (-1, n, d))
    B = X.shape[0]
    prior = xp.ones((n,), dtype=xp.float64) if weights is None else xp.asarray(weights)
    prior = xp.reshape(xp.astype(xp.broadcast_to(prior, batch + (n,)), xp.float64), (B, n))
    fit = [
        xp.asarray(a, copy=True)
        for a in superpose(X, Y, weights, scale=scale, reflection=reflection)
    ]
    # the set's RMS size about its centroid: where the set sits must not matter
    Yc = Y - xp.mean(Y, axis=-2, keepdims=True)
    size = xp.sqrt(xp.sum(Yc * Yc, axis=(-2, -1)) / n)
    w = xp.asarray(prior, copy=True)
    top = xp.max(prior, axis=-1)
    iterations = xp.zeros((B,), dtype=xp.int64)
    done = xp.zeros((B,), dtype=xp.bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(max_iterations):
            # Only unsettled items iterate: a settled item keeps its weights and fit, so
            # its result does not depend on how long the rest of its batch iterates.
            idx = xp.nonzero(~done)[0]
            if idx.shape[0] == 0:
                break
            Xa, Ya = X[idx], (Y if shared else Y[idx])
            r = residual_norms(Xa, Ya, Superposition(*(a[idx] for a in fit)))
            scale_a = size if shared else size[idx]
            # The residual scale of the points in the fit: zero-weight points (a mask,
            # e.g. all but the Calpha atoms) would otherwise set it with their residuals.
            inside = None if weights is None else prior[idx] > 0
            sigma = xp.maximum(_MAD_TO_SIGMA * _median(xp, r, inside), _SIGMA_FLOOR * scale_a)
            new = prior[idx] * robust_weight(xp, r / sigma[:, None], loss, c)
            change = xp.max(xp.abs(new - w[idx]), axis=-1) / top[idx]
            iterations[idx] += 1
            done[idx] = (change <= tol) | ~xp.isfinite(change)
            w[idx] = new
            refit = superpose(Xa, Ya, new, scale=scale, reflection=reflection)
            for full, part in zip(fit, refit, strict=True):
                full[idx] = part
    shapes = (batch + (d, d), batch + (d,), batch, batch, batch)
    fit = Superposition(*(xp.reshape(a, shape) for a, shape in zip(fit, shapes, strict=True)))
    finite = xp.isfinite(fit.rmsd)
    w = xp.reshape(w, batch + (n,))
    iterations, done = xp.reshape(iterations, batch), xp.reshape(done, batch)
    converged = done & finite
    return RobustSuperposition(fit, xp.where(finite[..., None], w, xp.nan), iterations, converged)
