"""How well a reprojection explains an image: correlation, gray-level L1 cost, residual
statistics, and the Jensen–Bregman LogDet divergence of residual covariances.

Per image ``I`` and projection ``P`` (``n × n``, origin at ``n // 2``), inside the
circular mask ``M`` of radius ``n / 2`` about the centre:

* ``correlation`` — Pearson's :math:`r = \\frac{\\sum_M (P - \\bar P)(I - \\bar I)}
  {\\sqrt{\\sum_M (P - \\bar P)^2 \\sum_M (I - \\bar I)^2}}` (higher is better);
* ``gray`` — the least-squares gray-level fit :math:`a, b = \\arg\\min \\sum_M (aP + b - I)^2`
  and the cost :math:`\\mathrm{mean}_M |aP + b - I|` (lower is better);
* the residual ``E = P - I`` (or ``aP + b - I`` with the gray-level fit), zero outside the
  mask, with its mean ``m`` and standard deviation ``s`` over the mask.

Scores over a whole set (global, they need every image): ``zScoreResMean_i = |m_i -
mean(m)| / std(m)``, ``zScoreResVar_i = |s_i - mean(s)| / std(s)``, and the covariance
score: the JBLD divergence (Cherian et al., TPAMI 2013)

.. math::  J(X, Y) = \\log\\det\\frac{X + Y}{2} - \\tfrac12 \\log\\det X - \\tfrac12 \\log\\det Y

of each residual's covariance :math:`C_i = E_i E_i^T / n + \\delta I` from the JBLD
centroid of all of them, the fixed point :math:`\\bar R \\leftarrow [\\mathrm{mean}_i
((C_i + \\bar R)/2)^{-1}]^{-1}` started from the arithmetic mean. ``E_i E_i^T / n`` (the
second moments of the residual's rows over its columns) is singular where the mask leaves
rows empty, so a ridge :math:`\\delta = 10^{-3}\\, \\mathrm{tr}(\\bar C) / n` of the set's mean
covariance :math:`\\bar C` is added (the same for every image, so divergences stay
comparable); Xmipp instead truncates to the top half of the eigenvalues of a
non-symmetric product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from scalign._array import namespace, to_numpy
from scalign.kernels.projection import box_center

#: Ridge of the residual covariances, as a fraction of the mean covariance's trace / n.
RIDGE = 1e-3


def circular_mask(n: int, radius: float | None = None) -> np.ndarray:
    """``(n, n)`` bool: pixels within ``radius`` (default ``n / 2``) of ``(n // 2, n // 2)``."""
    r = n / 2 if radius is None else radius
    y, x = np.indices((n, n)) - box_center(n)
    return x * x + y * y <= r * r


class Comparison(NamedTuple):
    """Per-item comparison of projections with images (:func:`compare`)."""

    correlation: np.ndarray  # (B,) Pearson r in the mask
    cost: np.ndarray  # (B,) 1 - r, or the gray-level L1 cost
    gain: np.ndarray  # (B,) a (1 without the gray-level fit)
    offset: np.ndarray  # (B,) b (0 without it)
    residual_mean: np.ndarray  # (B,) m
    residual_std: np.ndarray  # (B,) s
    residual: np.ndarray  # (B, n, n) E, zero outside the mask


def compare(P: np.ndarray, images: np.ndarray, mask: np.ndarray, gray: bool = False) -> Comparison:
    """Correlation, cost and residual of projections ``P`` against ``images`` ``(B, n, n)``
    in ``mask`` (module docstring). Without ``gray`` the cost is ``1 - r`` (lower is
    better, like the L1 cost, so both rank the same way). NumPy or CuPy: every result is
    on the inputs' device, in float64."""
    xp = namespace(P, images)
    B = P.shape[0]
    # integer indices, not a boolean mask: CuPy counts a mask's pixels with a device sync
    inside = xp.asarray(np.flatnonzero(to_numpy(mask)))
    p = xp.astype(xp.take(xp.reshape(P, (B, -1)), inside, axis=1), xp.float64)
    i = xp.astype(xp.take(xp.reshape(images, (B, -1)), inside, axis=1), xp.float64)
    pc = p - xp.mean(p, axis=1, keepdims=True)
    ic = i - xp.mean(i, axis=1, keepdims=True)
    spp = xp.vecdot(pc, pc)
    sii = xp.vecdot(ic, ic)
    spi = xp.vecdot(pc, ic)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = spi / xp.sqrt(spp * sii)
        if gray:
            a = xp.where(spp > 0, spi / xp.where(spp > 0, spp, 1.0), 0.0)
            b = xp.mean(i, axis=1) - a * xp.mean(p, axis=1)
            e = a[:, None] * p + b[:, None] - i
            cost = xp.mean(xp.abs(e), axis=1)
        else:
            a = xp.ones(p.shape[0], dtype=xp.float64)
            b = xp.zeros(p.shape[0], dtype=xp.float64)
            e = p - i
            cost = 1.0 - r
    E = xp.zeros((B, math.prod(P.shape[1:])), dtype=xp.float64)
    E[:, inside] = e
    return Comparison(r, cost, a, b, xp.mean(e, axis=1), xp.std(e, axis=1), xp.reshape(E, P.shape))


def zscores(values: np.ndarray) -> np.ndarray:
    """``|v - mean(v)| / std(v)`` over the last axis (0 where all values are equal)."""
    v = np.asarray(values, dtype=np.float64)
    sd = v.std(axis=-1, keepdims=True)
    return np.abs(v - v.mean(axis=-1, keepdims=True)) / np.where(sd > 0, sd, np.inf)


def residual_covariance(E: np.ndarray) -> np.ndarray:
    """``E Eᵀ / n`` of residuals ``(B, n, n)``: ``(B, n, n)`` symmetric, positive
    semi-definite (the ridge is added by :func:`jbld_scores`); NumPy or CuPy."""
    xp = namespace(E)
    E = xp.astype(E, xp.float64)
    return E @ xp.matrix_transpose(E) / E.shape[-1]


def _logdet(X: np.ndarray) -> np.ndarray:
    """log det of symmetric positive definite matrices, by Cholesky (stable)."""
    xp = namespace(X)
    L = xp.linalg.cholesky(X)
    return 2.0 * xp.sum(xp.log(xp.linalg.diagonal(L)), axis=-1)


def jbld(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Jensen–Bregman LogDet divergence of SPD matrices (broadcast over leading axes;
    NumPy or CuPy)."""
    return _logdet(0.5 * (X + Y)) - 0.5 * _logdet(X) - 0.5 * _logdet(Y)


def jbld_fixed_point(
    mean_inverse: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    max_iterations: int = 50,
    tol: float = 1e-10,
) -> tuple[np.ndarray, int]:
    """Iterate :math:`\\bar R \\leftarrow [\\mathrm{mean}_i ((C_i + \\bar R)/2)^{-1}]^{-1}`
    from ``start`` until the relative change (Frobenius) is below ``tol``; the mean is
    ``mean_inverse(R)``, so the ``C_i`` can live anywhere (in memory, or in chunks that a
    Dask reduction visits once per iteration). Returns ``(R, iterations)``."""
    R = start
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        new = np.linalg.inv(mean_inverse(R))
        new = 0.5 * (new + new.T)
        change = np.linalg.norm(new - R) / np.linalg.norm(R)
        R = new
        if change < tol:
            break
    return R, iterations


def jbld_centroid(C: np.ndarray, max_iterations: int = 50, tol: float = 1e-10) -> tuple:
    """The JBLD centroid of SPD matrices ``C (B, n, n)`` (Cherian et al. 2013): the fixed
    point of :func:`jbld_fixed_point` from the arithmetic mean. Returns ``(R, iterations)``."""
    return jbld_fixed_point(
        lambda R: np.linalg.inv(0.5 * (C + R)).mean(axis=0), C.mean(axis=0), max_iterations, tol
    )


def ridge(C: np.ndarray) -> float:
    """The ridge :math:`\\delta = 10^{-3} \\mathrm{tr}(\\bar C) / n` of a set of covariances."""
    return RIDGE * float(np.trace(C.mean(axis=0))) / C.shape[-1]


def jbld_scores(C: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Each covariance's JBLD divergence from the set's centroid, after the ridge.

    Returns ``(scores (B,), centroid (n, n), iterations)``.
    """
    C = C + ridge(C) * np.eye(C.shape[-1])
    R, it = jbld_centroid(C)
    return jbld(C, R[None]), R, it
