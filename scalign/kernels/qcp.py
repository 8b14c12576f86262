"""Batched quaternion characteristic polynomial (QCP) solve of the 3-D rotation.

For the cross-covariance :math:`S = \\sum_k p_k (x_k - \\bar x)(y_k - \\bar y)^T`, the best
proper rotation is given by the unit quaternion that maximises :math:`q^T K q`, where
:math:`K` is Horn's (1987) symmetric traceless 4×4 matrix built from ``S``. Its largest
eigenvalue is :math:`\\lambda_{max} = \\mathrm{tr}(\\Sigma D)`, the quantity the RMSD and
the Umeyama scale need.

Theobald (2005) finds :math:`\\lambda_{max}` as the largest root of the characteristic
polynomial :math:`\\lambda^4 + c_2 \\lambda^2 + c_1 \\lambda + c_0` with
:math:`c_2 = -2 \\lVert S\\rVert_F^2`, :math:`c_1 = -8 \\det S`, :math:`c_0 = \\det K`, by
Newton's method from the upper bound :math:`(\\sigma_x^2 + \\sigma_y^2)/2`; Liu, Agrafiotis
& Theobald (2010) take the eigenvector from a column of :math:`\\mathrm{adj}(K - \\lambda
I)`. Here both steps are vectorised over the batch (no Python loop over items); the
column of largest norm is used, and items whose best column is tiny (a nearly repeated
:math:`\\lambda_{max}`, where the rotation is ill-determined) are flagged so the caller
can solve them by SVD instead.
"""

from __future__ import annotations

from typing import Any

Array = Any

# Newton stops when every step is below this fraction of lambda (Theobald's evalprec);
# convergence is quadratic, so the last step leaves an error far below float64 rounding.
_NEWTON_RTOL = 1e-11
_NEWTON_MAX_ITERATIONS = 50
# adj(K - lambda I) scales as the product of the three eigen-gaps; below this fraction of
# lambda^3 the quaternion has lost too many digits and the item is re-solved by SVD.
_ADJUGATE_RTOL = 1e-6

# (row, col) of the 3x3 minor left when row i and column j of a 4x4 matrix are removed.
_KEEP = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))


def horn_matrix(xp, S: Array) -> Array:
    """Horn's symmetric 4×4 matrix ``K`` for cross-covariances ``S (..., 3, 3)``."""
    sxx, sxy, sxz = S[..., 0, 0], S[..., 0, 1], S[..., 0, 2]
    syx, syy, syz = S[..., 1, 0], S[..., 1, 1], S[..., 1, 2]
    szx, szy, szz = S[..., 2, 0], S[..., 2, 1], S[..., 2, 2]
    rows = [
        [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
        [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
        [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
        [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def _det3(m: Array) -> Array:
    """Determinants of ``(..., 3, 3)`` by the rule of Sarrus (vectorised, no LAPACK loop)."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def _det4(xp, m: Array) -> Array:
    """Determinants of ``(..., 4, 4)`` by cofactor expansion along the first row."""
    rows = xp.asarray(_KEEP[0])
    cols = xp.asarray(_KEEP)
    minors = m[..., rows[None, :, None], cols[:, None, :]]
    signs = xp.asarray([1.0, -1.0, 1.0, -1.0], dtype=m.dtype)
    return xp.sum(signs * m[..., 0, :] * _det3(minors), axis=-1)


def largest_eigenvalue(xp, S: Array, bound: Array) -> Array:
    """:math:`\\lambda_{max}` of Horn's matrix by Newton on the QCP polynomial.

    Parameters
    ----------
    S : (B, 3, 3) cross-covariances (finite).
    bound : (B,) upper bound to start from, :math:`(\\sigma_x^2 + \\sigma_y^2) / 2`.
    """
    c2 = -2.0 * xp.sum(S * S, axis=(-2, -1))
    c1 = -8.0 * _det3(S)
    K = horn_matrix(xp, S)
    c0 = _det4(xp, K)
    lam = xp.asarray(bound, copy=True)
    for _ in range(_NEWTON_MAX_ITERATIONS):
        lam2 = lam * lam
        p = (lam2 + c2) * lam2 + c1 * lam + c0
        dp = (4.0 * lam2 + 2.0 * c2) * lam + c1
        step = xp.where(dp != 0, p / xp.where(dp != 0, dp, 1.0), 0.0)
        lam = lam - step
        if not bool(xp.any(xp.abs(step) > _NEWTON_RTOL * xp.abs(lam))):
            break
    return lam, K


def quaternion_rotation(xp, q: Array) -> Array:
    """Rotation matrices ``(B, 3, 3)`` of unit quaternions ``q = (w, x, y, z)``, ``(B, 4)``."""
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    rows = [
        [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (y * x + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
        [2 * (z * x - w * y), 2 * (z * y + w * x), w * w - x * x - y * y + z * z],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def qcp_rotation(xp, S: Array, bound: Array):
    """Proper rotations and :math:`\\lambda_{max}` for a batch of 3-D cross-covariances.

    Returns
    -------
    R : (B, 3, 3) rotation with ``R x ≈ y`` (rows: ``Y ≈ X R^T``).
    lam : (B,) :math:`\\lambda_{max} = \\mathrm{tr}(\\Sigma D)`.
    unsure : (B,) bool, items whose rotation is ill-determined by QCP (re-solve by SVD).
    """
    lam, K = largest_eigenvalue(xp, S, bound)
    A = K - lam[:, None, None] * xp.eye(4, dtype=K.dtype)
    keep = xp.asarray(_KEEP)
    minors = A[:, keep[:, None, :, None], keep[None, :, None, :]]
    sign = xp.asarray([[(-1.0) ** (i + j) for j in range(4)] for i in range(4)], dtype=K.dtype)
    adjugate = sign * _det3(minors)
    norms = xp.sum(adjugate * adjugate, axis=-1)
    best = xp.argmax(norms, axis=-1)
    column = xp.take_along_axis(adjugate, best[:, None, None], axis=1)[:, 0, :]
    norm = xp.sqrt(xp.max(norms, axis=-1))
    scale = xp.abs(lam) + xp.abs(bound)
    unsure = ~(norm > _ADJUGATE_RTOL * scale * scale * scale)
    q = column / xp.where(unsure, 1.0, norm)[:, None]
    return quaternion_rotation(xp, q), lam, unsure
