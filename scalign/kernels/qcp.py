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
:math:`\\lambda_{max}`, where the rotation is ill-determined) or whose
:math:`\\lambda_{max}` Newton could not pin down (see :func:`largest_eigenvalue`) are
flagged so the caller can solve them by SVD instead.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import is_cupy_namespace

Array = Any

# Newton stops when every step is below this fraction of lambda (Theobald's evalprec);
# convergence is quadratic, so the last step leaves an error far below float64 rounding.
_NEWTON_RTOL = 1e-11
_NEWTON_MAX_ITERATIONS = 50
# adj(K - lambda I) scales as the product of the three eigen-gaps; below this fraction of
# lambda^3 the quaternion has lost too many digits and the item is re-solved by SVD.
_ADJUGATE_RTOL = 1e-6
# Rounding of the quartic's value, in ulps of its largest term (measured: up to ~2 on
# collinear, near-collinear, planar and random sets).
_ROUNDING_ULPS = 8.0
# A converged Newton pins lambda_max down to ~1e-15 of it unless the root is nearly
# repeated; a larger error bound means Newton stalled or cycled there, and the item is
# re-solved by SVD.
_EIGENVALUE_RTOL = 1e-10


def _horn_entries(S: Array) -> list[list[Array]]:
    """Entries ``K[i][j]`` of Horn's symmetric traceless 4×4 matrix, each of shape (...,)."""
    sxx, sxy, sxz = S[..., 0, 0], S[..., 0, 1], S[..., 0, 2]
    syx, syy, syz = S[..., 1, 0], S[..., 1, 1], S[..., 1, 2]
    szx, szy, szz = S[..., 2, 0], S[..., 2, 1], S[..., 2, 2]
    k01, k02, k03 = syz - szy, szx - sxz, sxy - syx
    k12, k13, k23 = sxy + syx, szx + sxz, syz + szy
    return [
        [sxx + syy + szz, k01, k02, k03],
        [k01, sxx - syy - szz, k12, k13],
        [k02, k12, -sxx + syy - szz, k23],
        [k03, k13, k23, -sxx - syy + szz],
    ]


def horn_matrix(xp, S: Array) -> Array:
    """Horn's symmetric 4×4 matrix ``K`` for cross-covariances ``S (..., 3, 3)``."""
    return xp.stack([xp.stack(row, axis=-1) for row in _horn_entries(S)], axis=-2)


def _pair_minors(m: list[list[Array]]):
    """The 2×2 minors of rows (0, 1) and of rows (2, 3) of a 4×4 matrix (Laplace expansion)."""
    (m00, m01, m02, m03), (m10, m11, m12, m13), (m20, m21, m22, m23), (m30, m31, m32, m33) = m
    top = (
        m00 * m11 - m10 * m01,
        m00 * m12 - m10 * m02,
        m00 * m13 - m10 * m03,
        m01 * m12 - m11 * m02,
        m01 * m13 - m11 * m03,
        m02 * m13 - m12 * m03,
    )
    bottom = (
        m20 * m31 - m30 * m21,
        m20 * m32 - m30 * m22,
        m20 * m33 - m30 * m23,
        m21 * m32 - m31 * m22,
        m21 * m33 - m31 * m23,
        m22 * m33 - m32 * m23,
    )
    return top, bottom


def _invariants(S: Array) -> tuple[Array, Array, Array]:
    """:math:`\\lVert S\\rVert_F^2`, :math:`\\det S` and :math:`\\lVert \\mathrm{cof}\\,
    S\\rVert_F^2` of ``(..., 3, 3)`` arrays, from the nine cofactors (vectorised).

    With :math:`a^2, b^2, c^2` the eigenvalues of :math:`S^T S`, the first is their sum
    and the last the sum of their pairwise products; Horn's matrix has the eigenvalues
    :math:`\\pm a \\pm b \\pm c` (an even number of minus signs when
    :math:`\\det S > 0`), so :math:`\\det K = (a^2 + b^2 + c^2)^2 - 4 (a^2 b^2 + b^2 c^2 +
    c^2 a^2)`: the QCP coefficient :math:`c_0` without the 4×4 determinant.
    """
    a, b, c = S[..., 0, 0], S[..., 0, 1], S[..., 0, 2]
    d, e, f = S[..., 1, 0], S[..., 1, 1], S[..., 1, 2]
    g, h, i = S[..., 2, 0], S[..., 2, 1], S[..., 2, 2]
    cofactors = (
        e * i - f * h,
        f * g - d * i,
        d * h - e * g,
        c * h - b * i,
        a * i - c * g,
        b * g - a * h,
        b * f - c * e,
        c * d - a * f,
        a * e - b * d,
    )
    det = a * cofactors[0] + b * cofactors[1] + c * cofactors[2]
    norm2 = a * a + b * b + c * c + d * d + e * e + f * f + g * g + h * h + i * i
    cof2 = cofactors[0] * cofactors[0]
    for x in cofactors[1:]:
        cof2 = cof2 + x * x
    return norm2, det, cof2


def _adjugate(m: list[list[Array]]) -> list[list[Array]]:
    """``adj(m)`` of a 4×4 matrix from its 2×2 pair minors, entry by entry."""
    (m00, m01, m02, m03), (m10, m11, m12, m13), (m20, m21, m22, m23), (m30, m31, m32, m33) = m
    (s0, s1, s2, s3, s4, s5), (c0, c1, c2, c3, c4, c5) = _pair_minors(m)
    return [
        [
            m11 * c5 - m12 * c4 + m13 * c3,
            -m01 * c5 + m02 * c4 - m03 * c3,
            m31 * s5 - m32 * s4 + m33 * s3,
            -m21 * s5 + m22 * s4 - m23 * s3,
        ],
        [
            -m10 * c5 + m12 * c2 - m13 * c1,
            m00 * c5 - m02 * c2 + m03 * c1,
            -m30 * s5 + m32 * s2 - m33 * s1,
            m20 * s5 - m22 * s2 + m23 * s1,
        ],
        [
            m10 * c4 - m11 * c2 + m13 * c0,
            -m00 * c4 + m01 * c2 - m03 * c0,
            m30 * s4 - m31 * s2 + m33 * s0,
            -m20 * s4 + m21 * s2 - m23 * s0,
        ],
        [
            -m10 * c3 + m11 * c1 - m12 * c0,
            m00 * c3 - m01 * c1 + m02 * c0,
            -m30 * s3 + m31 * s1 - m32 * s0,
            m20 * s3 - m21 * s1 + m22 * s0,
        ],
    ]


def largest_eigenvalue(xp, S: Array, bound: Array):
    """:math:`\\lambda_{max}` of Horn's matrix by Newton on the QCP polynomial, with a
    bound on its error.

    The quartic :math:`P` is evaluated to a few ulps of its largest term,
    :math:`m = \\lambda^4 + |c_2| \\lambda^2 + |c_1 \\lambda| + |c_0|`, so an iterate
    :math:`\\lambda` lies within :math:`2 (|P| + \\epsilon m) / |P'|` of the root (the 2
    covers a double root, where a Newton step only halves the distance); the returned
    bound is that, evaluated at the returned :math:`\\lambda`. As
    :math:`P'(\\lambda_{max}) = \\prod_k (\\lambda_{max} - \\lambda_k)` over the other
    eigenvalues, it grows as :math:`\\lambda_{max}` nears a repeated root (collinear and
    near-collinear sets), where Newton reaches only about :math:`\\sqrt{\\epsilon}\\,
    \\lambda`; callers re-solve such items by SVD.

    Parameters
    ----------
    S : (B, 3, 3) cross-covariances (finite).
    bound : (B,) upper bound to start from, :math:`(\\sigma_x^2 + \\sigma_y^2) / 2`.

    Returns
    -------
    lam : (B,) :math:`\\lambda_{max}`.
    error : (B,) bound on :math:`|\\lambda - \\lambda_{max}|` (inf where :math:`P' = 0`).

    CuPy batches are solved by :mod:`scalign.kernels.qcp_cuda` instead (Jacobi, one thread
    per item; the same outputs).
    """
    if is_cupy_namespace(xp):
        from scalign.kernels import qcp_cuda

        return qcp_cuda.largest_eigenvalue(S)
    unit = _unit(xp, bound)
    lam, error = _newton(xp, S / unit[..., None, None], bound / unit)
    return lam * unit, error * unit


def _unit(xp, bound: Array) -> Array:
    """Per-item unit of the solve: the bound, :math:`|S_{ij}| \\le \\sqrt{\\sigma_x^2
    \\sigma_y^2} \\le` bound. The problem is homogeneous in ``S`` (:math:`\\lambda` scales
    as ``S``, the rotation not at all); solved in these units, the quartic's terms
    (:math:`\\sim S^4`) and the adjugate's squared norm (:math:`\\sim S^6`) cannot overflow.
    In the units of the input they did from coordinates of ~1e26 (galaxy positions in
    metres): the quaternion, hence the rotation, came out 0 and the RMSDs NaN."""
    return xp.where(bound > 0, bound, 1.0)


def _newton(xp, S: Array, bound: Array):
    """:func:`largest_eigenvalue` on the NumPy path, in the units of ``S``."""
    norm2, det, cof2 = _invariants(S)
    c2 = -2.0 * norm2
    c1 = -8.0 * det
    c0 = norm2 * norm2 - 4.0 * cof2
    two_c2 = 2.0 * c2

    def quartic(lam):
        """``P(λ)`` and ``P'(λ)``."""
        lam2 = lam * lam
        return (lam2 + c2) * lam2 + c1 * lam + c0, (4.0 * lam2 + two_c2) * lam + c1

    # lambda_max = sigma_1 + sigma_2 -+ sigma_3 >= sigma_1 >= |S|_F / sqrt(3), and no other
    # root but a near-repeated lambda_2 lies above that. From the upper bound Newton
    # descends monotonically onto lambda_max, but near a repeated root rounding can give
    # P' the wrong sign and throw a step far below, onto the smallest root (a rod against
    # its mirror image: RMSD 43 instead of 0); the floor keeps it on lambda_max.
    floor = xp.sqrt(-c2 / 6.0)
    lam = xp.asarray(bound, copy=True)
    for _ in range(_NEWTON_MAX_ITERATIONS):
        p, dp = quartic(lam)
        nonzero = dp != 0
        step = xp.where(nonzero, p / xp.where(nonzero, dp, 1.0), 0.0)
        lam = xp.maximum(lam - step, floor)
        if not bool(xp.any(xp.abs(step) > _NEWTON_RTOL * lam)):
            break
    # P and P' once more at the returned lambda: the last step left it far closer to the
    # root than that step's size (quadratic convergence), which bounded it before (and
    # sent nearly every pair of 70 A helices of radius 10 A, a DNA-like shape, to the SVD)
    p, dp = quartic(lam)
    dp = xp.abs(dp)
    lam2 = lam * lam
    terms = lam2 * (lam2 - c2) + xp.abs(c1 * lam) + xp.abs(c0)
    rounding = (2.0 * _ROUNDING_ULPS * xp.finfo(lam.dtype).eps) * terms
    error = xp.where(dp > 0, (2.0 * xp.abs(p) + rounding) / xp.where(dp > 0, dp, 1.0), xp.inf)
    return lam, error


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

    CuPy batches: :mod:`scalign.kernels.qcp_cuda` (the same outputs, the same ``unsure`` rule).
    """
    if is_cupy_namespace(xp):
        from scalign.kernels import qcp_cuda

        return qcp_cuda.qcp_rotation(S, bound)
    unit = _unit(xp, bound)
    S, bound = S / unit[..., None, None], bound / unit
    lam, error = _newton(xp, S, bound)
    shifted = _horn_entries(S)
    for i in range(4):
        shifted[i][i] = shifted[i][i] - lam
    # adj(K - lam I) is symmetric: its rows are its columns, each proportional to q.
    adjugate = xp.stack([xp.stack(row, axis=-1) for row in _adjugate(shifted)], axis=-2)
    norms = xp.sum(adjugate * adjugate, axis=-1)
    best = xp.argmax(norms, axis=-1)
    column = xp.take_along_axis(adjugate, best[:, None, None], axis=1)[:, 0, :]
    norm = xp.sqrt(xp.max(norms, axis=-1))
    scale = xp.abs(lam) + xp.abs(bound)
    unsure = ~(norm > _ADJUGATE_RTOL * scale * scale * scale) | ~(error <= _EIGENVALUE_RTOL * scale)
    q = column / xp.where(unsure, 1.0, norm)[:, None]
    return quaternion_rotation(xp, q), lam * unit, unsure
