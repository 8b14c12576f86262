"""Batched Kabsch / Umeyama superposition.

Convention (rows are points): the fit maps the moving set ``X`` onto the target ``Y`` as

.. math::  Y \\approx s\\, X R^T + t \\qquad (\\text{column form } y = s R x + t)

with weights :math:`p_k = w_k / \\sum_j w_j`, centroids :math:`\\bar x = \\sum_k p_k x_k`,
:math:`\\bar y = \\sum_k p_k y_k` and cross-covariance
:math:`H = \\sum_k p_k (x_k - \\bar x)(y_k - \\bar y)^T = U \\Sigma V^T`.
Then :math:`R = V D U^T` with :math:`D = \\mathrm{diag}(1, \\dots, 1, \\operatorname{sign}
\\det(V U^T))` (Kabsch 1976; D = I when reflections are allowed), the scale is
:math:`s = \\mathrm{tr}(\\Sigma D) / \\sigma_x^2` with :math:`\\sigma_x^2 = \\sum_k p_k
\\lVert x_k - \\bar x\\rVert^2` (Umeyama 1991; s = 1 without scaling) and
:math:`t = \\bar y - s R \\bar x`. Note that Umeyama's :math:`s(X \\to Y)` is not
:math:`1/s(Y \\to X)` for noisy data: ``X`` is the set that is moved and scaled.

The weighted mean squared residual is :math:`e^2 = \\sigma_y^2 - 2 s\\,\\mathrm{tr}(\\Sigma D)
+ s^2 \\sigma_x^2`; ``rmsd`` is :math:`e` (with uniform weights, the Frobenius norm of the
residual over :math:`\\sqrt{n}`) and ``r2`` is :math:`1 - e^2 / \\sigma_y^2` (sums of squares
about Y's weighted centroid).

Numerics: everything is accumulated in float64 whatever the input dtype. The closed form
for :math:`e^2` cancels when the fit is nearly perfect, so items whose :math:`e^2` is below
``1e-6`` of the sums of squares are recomputed from the explicit, centred residual. A
non-finite item (NaN/inf coordinate, all-zero weights) gives NaN for that item only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from array_api_compat import is_cupy_namespace, is_numpy_namespace

from scalign._array import clamp, namespace
from scalign.kernels.qcp import qcp_rotation

Array = Any

# Float64 bytes per cache block of the shared-reference moments (see _block_rows).
_BLOCK_BYTES = 4 * 2**20
# Beyond this ratio of |centroid|^2 to sigma_x^2 the shared path's sigma_x^2 has lost
# about 8 of float64's 16 digits (a 1 Å set 10 km from the origin, in Å).
_FAR_FROM_ORIGIN = 1e8
# Below this fraction of the second moments the closed-form e^2 has lost digits to
# cancellation; such items get the explicit residual instead.
_CANCELLATION = 1e-6


class Superposition(NamedTuple):
    """Result of :func:`superpose`, batched over the leading axes of the input.

    Attributes
    ----------
    rotation : (..., d, d) proper rotation (det +1) unless reflections were allowed.
    translation : (..., d)
    scale : (...) isotropic scale ``s`` (1 without scaling).
    rmsd : (...) weighted root-mean-square residual after the fit.
    r2 : (...) ``1 - SS_res / SS_tot``, SS_tot about Y's (weighted) centroid.
    """

    rotation: Array
    translation: Array
    scale: Array
    rmsd: Array
    r2: Array


def _probabilities(xp, weights: Array | None) -> Array | None:
    if weights is None:
        return None
    w = xp.astype(weights, xp.float64)
    return w / xp.sum(w, axis=-1, keepdims=True)


def _block_rows(xp, n_rows: int, row_bytes: int) -> int:
    """Items per cache block: float64 copies of ~4 MiB stay in cache between the GEMM and
    the sum of squares (2.6x faster than one float64 copy of a whole chunk on a 2-core
    EPYC); on a GPU one block is the whole batch."""
    if not is_numpy_namespace(xp):
        return max(n_rows, 1)
    return max(1, min(n_rows, _BLOCK_BYTES // row_bytes))


def _shared_moments(xp, X: Array, Y: Array, p: Array | None):
    """Moments for one target ``Y (n, d)`` and one weight vector shared by the batch.

    All cross-covariances come from one GEMM, ``X.reshape(B, n*d) @ M``: as ``Y`` is
    centred, :math:`\\sum_k p_k x_k (y_k - \\bar y)^T` needs no centring of ``X``, and the
    last ``d`` columns of ``M`` give the centroids of ``X`` in the same pass. ``X`` (any
    float dtype) is copied to float64 one cache block at a time, so every product and sum
    is accumulated in float64 without a float64 copy of the whole batch. CuPy batches of
    3-D points take the fused kernel of :mod:`scalign.kernels.moments_cuda` instead (one
    read of ``X``, the same sums).
    """
    B, n, d = X.shape
    if is_cupy_namespace(xp) and d == 3 and X.dtype.name in ("float32", "float64"):
        from scalign.kernels.moments_cuda import fused_moments

        return fused_moments(X, Y, p)
    uniform = p is None
    if uniform:
        p = xp.full((n,), 1.0 / n, dtype=xp.float64)
    cy = p @ Y
    Yc = Y - cy
    eye = xp.eye(d, dtype=xp.float64)
    cross = (p[:, None, None, None] * eye[None, :, :, None] * Yc[:, None, None, :]).reshape(
        (n * d, d * d)
    )
    mean = (p[:, None, None] * eye[None, :, :]).reshape((n * d, d))
    M = xp.concat([cross, mean], axis=1)
    pd = None if uniform else xp.reshape(xp.broadcast_to(p[:, None], (n, d)), (n * d,))
    flat = xp.reshape(X, (B, n * d))
    moments = xp.empty((B, d * d + d), dtype=xp.float64)
    gx = xp.empty((B,), dtype=xp.float64)
    block = _block_rows(xp, B, n * d * 8)
    for start in range(0, B, block):
        rows = slice(start, min(start + block, B))
        xb = xp.astype(flat[rows], xp.float64)
        moments[rows] = xb @ M
        gx[rows] = xp.vecdot(xb, xb) / n if uniform else xp.vecdot(xb * pd, xb)
    H = xp.reshape(moments[:, : d * d], (B, d, d))
    cx = moments[:, d * d :]
    gx = gx - xp.sum(cx * cx, axis=-1)
    gy = xp.sum(p * xp.sum(Yc * Yc, axis=-1))
    return cx, cy, H, gx, xp.broadcast_to(gy, (B,))


def _batched_moments(xp, X: Array, Y: Array, p: Array | None):
    """Moments when targets or weights differ per item: batched matmuls, centred first."""
    X = xp.astype(X, xp.float64, copy=False)
    B, n, d = X.shape
    if p is None:
        p = xp.full((1, n), 1.0 / n, dtype=xp.float64)
    p = xp.broadcast_to(xp.reshape(p, (-1, n)), (B, n))
    Y = xp.broadcast_to(Y, (B, n, d))
    cx = (p[:, None, :] @ X)[:, 0, :]
    cy = (p[:, None, :] @ Y)[:, 0, :]
    Xc = X - cx[:, None, :]
    Yc = Y - cy[:, None, :]
    H = xp.matrix_transpose(Xc) @ (Yc * p[:, :, None])
    gx = xp.sum(p * xp.sum(Xc * Xc, axis=-1), axis=-1)
    gy = xp.sum(p * xp.sum(Yc * Yc, axis=-1), axis=-1)
    return cx, cy, H, gx, gy


def _svd_rotation(xp, H: Array, reflection: bool):
    """``R = V D U^T`` and ``tr(Sigma D)`` for finite ``H = U Sigma V^T``, any ``d``."""
    U, S, Vt = xp.linalg.svd(H, full_matrices=False)
    if reflection:
        D = xp.ones_like(S)
    else:
        # numpy/cupy sort singular values descending: flipping the last one flips the vector
        # of the smallest singular value, which is the right one for planar (rank d-1) sets.
        sign = xp.sign(xp.linalg.det(U) * xp.linalg.det(Vt))
        D = xp.concat([xp.ones_like(S[:, :-1]), sign[:, None]], axis=1)
    R = (xp.matrix_transpose(Vt) * D[:, None, :]) @ xp.matrix_transpose(U)
    return R, xp.sum(S * D, axis=-1)


def _rotation(xp, H: Array, ok: Array, reflection: bool, bound: Array):
    """Best rotation and ``tr(Sigma D)`` per item; non-finite items get the identity.

    Proper 3-D rotations use the vectorised QCP solve (several times faster than a batched
    SVD); items QCP flags as ill-determined, reflections and other dimensions use the SVD.
    """
    d = H.shape[-1]
    eye = xp.eye(d, dtype=H.dtype)
    H = xp.where(ok[:, None, None], H, eye)
    if d != 3 or reflection:
        return _svd_rotation(xp, H, reflection)
    R, lam, unsure = qcp_rotation(xp, H, xp.where(ok, bound, 1.5))
    resolve_by_svd(xp, H, unsure, lam, R)
    return R, lam


def resolve_by_svd(xp, H: Array, unsure: Array, lam: Array, R: Array | None = None) -> None:
    """Overwrite, in place, the QCP solutions ``lam`` (and ``R``) of the items flagged
    ``unsure`` with the SVD's proper rotation and :math:`\\mathrm{tr}(\\Sigma D)`.

    Parameters
    ----------
    H : (..., 3, 3) cross-covariances.
    unsure : (...) bool, over ``H``'s leading axes.
    lam : (...) :math:`\\lambda_{max}` to correct.
    R : (..., 3, 3) rotations to correct, optional.
    """
    if bool(xp.any(unsure)):
        R_svd, lam_svd = _svd_rotation(xp, H[unsure], reflection=False)
        lam[unsure] = lam_svd
        if R is not None:
            R[unsure] = R_svd


def superpose(
    X: Array,
    Y: Array,
    weights: Array | None = None,
    *,
    scale: bool = False,
    reflection: bool = False,
) -> Superposition:
    """Optimal superposition of each moving set ``X[i]`` onto ``Y`` (Kabsch / Umeyama).

    Parameters
    ----------
    X : (..., n, d) array
        Moving point sets, points as rows; any leading batch shape.
    Y : (n, d) or (..., n, d) array
        Target: one reference shared by the batch, or one per item.
    weights : (n,) or (..., n) array, optional
        Non-negative per-point weights; the centroids are weighted too.
    scale : bool
        Fit an isotropic scale ``s`` of ``X`` (Umeyama).
    reflection : bool
        Allow improper orthogonal matrices (det -1).

    Returns
    -------
    Superposition
        float64 ``rotation, translation, scale, rmsd, r2`` with the batch shape of ``X``;
        see the module docstring for the formulas.
    """
    xp = namespace(X, Y, weights)
    # Non-finite items are expected (they become NaN results): no warnings for them.
    with np.errstate(invalid="ignore", divide="ignore"):
        return _superpose(xp, xp.asarray(X), xp.asarray(Y), weights, scale, reflection)


def _superpose(xp, X, Y, weights, scale, reflection) -> Superposition:
    batch, (n, d) = X.shape[:-2], X.shape[-2:]
    if not xp.isdtype(X.dtype, "real floating"):
        X = xp.astype(X, xp.float64)
    X = xp.reshape(X, (-1, n, d))
    Y = xp.astype(Y, xp.float64, copy=False)
    p = _probabilities(xp, weights)
    shared = Y.ndim == 2 and (p is None or p.ndim == 1)
    fused = shared and d == 3 and not reflection and X.dtype.name in ("float32", "float64")
    if fused and is_cupy_namespace(xp):
        out = _fit_cupy(xp, X, Y, p, scale)
    else:
        out = _fit(xp, X, Y, p, scale, reflection, shared)
    shapes = (batch + (d, d), batch + (d,), batch, batch, batch)
    return Superposition(*(xp.reshape(a, shape) for a, shape in zip(out, shapes, strict=True)))


def _fit_cupy(xp, X, Y, p, scale):
    """A CuPy batch against one target: the fused moments, then the fused finish
    (:mod:`scalign.kernels.kabsch_cuda`); the items whose e2 cancelled get the explicit
    residual, those it flags otherwise go through :func:`_fit`."""
    from scalign.kernels import kabsch_cuda
    from scalign.kernels.moments_cuda import fused_moments

    cx, cy, H, gx, gy = fused_moments(X, Y, p)
    *out, redo, refit = kabsch_cuda.finish(cx, cy, H, gx, gy, scale)
    # one device synchronisation where no item is flagged, the common case
    if not bool(xp.any(redo | refit)):
        return tuple(out)
    if bool(xp.any(refit)):
        # the rotation is right, the closed-form e2 has cancelled: the explicit residual
        idx = xp.nonzero(refit)[0]
        n = X.shape[1]
        probabilities = xp.full((n,), 1.0 / n) if p is None else p
        e2 = kabsch_cuda.residual(X, Y, probabilities, idx, out[0][idx], cx[idx], cy, out[2][idx])
        e2 = clamp(e2, 0.0)
        out[3][idx] = xp.sqrt(e2)
        out[4][idx] = _r2(xp, e2, gy[idx])
    if bool(xp.any(redo)):
        idx = xp.nonzero(redo)[0]
        again = _fit(xp, X[idx], Y, p, scale, False, True)
        for a, b in zip(out, again, strict=True):
            a[idx] = b
    return tuple(out)


def _fit(xp, X, Y, p, scale, reflection, shared):
    """``(rotation, translation, scale, rmsd, r2)`` of ``X (B, n, d)`` onto ``Y`` with
    probabilities ``p``, flat over the batch (module docstring)."""
    d = X.shape[-1]
    n = X.shape[-2]
    moments = _shared_moments if shared else _batched_moments
    cx, cy, H, gx, gy = moments(xp, X, Y if shared else xp.reshape(Y, (-1, n, d)), p)
    B = X.shape[0]
    if shared:
        # sigma_x^2 = E|x|^2 - |cx|^2 loses digits when a set sits far from the origin
        # relative to its size; such items get their moments again, centred first.
        far = xp.sum(cx * cx, axis=-1) > _FAR_FROM_ORIGIN * gx
        if bool(xp.any(far)):
            idx = xp.nonzero(far)[0]
            pf = None if p is None else p[None, :]
            cx[idx], _, H[idx], gx[idx], _ = _batched_moments(xp, X[idx], Y[None], pf)
    cy = xp.broadcast_to(cy, (B, d))
    ok = xp.all(xp.isfinite(H), axis=(-2, -1)) & xp.isfinite(gx) & xp.isfinite(gy)
    R, trace = _rotation(xp, H, ok, reflection, 0.5 * (gx + gy))
    if scale:
        s = xp.where(gx > 0, trace / xp.where(gx > 0, gx, 1.0), 1.0)
    else:
        s = xp.ones_like(trace)
    e2 = gy - 2.0 * s * trace + s * s * gx
    size = s * s * gx + gy + (xp.sum(cx * cx, axis=-1) if shared else 0.0)
    close = ok & (e2 < _CANCELLATION * size)
    if bool(xp.any(close)):
        idx = xp.nonzero(close)[0]
        Yb = xp.broadcast_to(xp.reshape(Y, (-1, n, d)), (B, n, d))
        pb = None if p is None else xp.broadcast_to(xp.reshape(p, (-1, n)), (B, n))
        residual = s[idx, None, None] * (
            (xp.astype(X[idx], xp.float64) - cx[idx, None, :]) @ xp.matrix_transpose(R[idx])
        ) - (Yb[idx] - cy[idx, None, :])
        sq = xp.sum(residual * residual, axis=-1)
        e2_exact = xp.mean(sq, axis=-1) if pb is None else xp.sum(pb[idx] * sq, axis=-1)
        e2 = xp.asarray(e2, copy=True)
        e2[idx] = e2_exact
    e2 = clamp(e2, 0.0)
    t = cy - s[:, None] * (R @ cx[:, :, None])[:, :, 0]
    nan = xp.asarray(float("nan"), dtype=xp.float64)
    r2 = _r2(xp, e2, gy)
    return (
        xp.where(ok[:, None, None], R, nan),
        xp.where(ok[:, None], t, nan),
        xp.where(ok, s, nan),
        xp.where(ok, xp.sqrt(e2), nan),
        xp.where(ok, r2, nan),
    )


def _r2(xp, e2: Array, gy: Array) -> Array:
    """:math:`1 - e^2 / \\sigma_y^2`, NaN where the target has no spread."""
    return xp.where(gy > 0, 1.0 - e2 / xp.where(gy > 0, gy, 1.0), xp.nan)


def apply_transform(X: Array, rotation: Array, translation: Array, scale: Array) -> Array:
    """Apply ``s X R^T + t`` to each item; the result has ``X``'s dtype.

    Parameters
    ----------
    X : (..., n, d) array
    rotation : (..., d, d) array
    translation : (..., d) array
    scale : (...) array

    Returns
    -------
    array
        ``(..., n, d)`` in ``X``'s dtype and array library (NumPy or CuPy).
    """
    xp = namespace(X, rotation)
    s = xp.asarray(scale, dtype=xp.float64)
    A = xp.astype(s[..., None, None] * xp.matrix_transpose(rotation), X.dtype)
    t = xp.astype(translation, X.dtype)
    out = X @ A
    # One add per coordinate: broadcasting t over (..., n, d) in one ufunc call runs an
    # inner loop of length d, several times slower than d loops of length n.
    for axis in range(X.shape[-1]):
        out[..., axis] += t[..., axis, None]
    return out


def rmsd(X: Array, Y: Array, weights: Array | None = None) -> Array:
    """Weighted RMSD without superposition, ``sqrt(sum_k p_k |x_k - y_k|^2)``, in float64.

    Parameters
    ----------
    X : (..., n, d) array
    Y : (n, d) or (..., n, d) array
    weights : (n,) or (..., n) array, optional

    Returns
    -------
    array
        float64 ``(...)``: the batch shape (a NumPy scalar for one pair of NumPy arrays).

    Raises
    ------
    ValueError
        ``X`` and ``Y`` of different numbers of points or dimensions, or ``weights`` not
        one per point (they broadcast silently: a target of one point was the distance to
        it). Weights' values are not checked here (NaN for all-zero ones).
    """
    xp = namespace(X, Y, weights)
    X, Y = xp.asarray(X), xp.asarray(Y)
    if X.ndim < 2 or Y.ndim < 2 or X.shape[-2:] != Y.shape[-2:]:
        raise ValueError(
            f"X and Y must be paired point sets (..., n, d) of the same n and d, got shapes "
            f"{X.shape} and {Y.shape}"
        )
    if weights is not None and (weights.ndim < 1 or weights.shape[-1] != X.shape[-2]):
        raise ValueError(
            f"weights must have one value per point ({X.shape[-2]}), got {weights.shape}"
        )
    diff = xp.astype(X, xp.float64) - xp.astype(Y, xp.float64)
    sq = xp.sum(diff * diff, axis=-1)
    p = _probabilities(xp, weights)
    return xp.sqrt(xp.mean(sq, axis=-1) if p is None else xp.sum(p * sq, axis=-1))
