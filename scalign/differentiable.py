"""Differentiable Procrustes alignment in PyTorch.

Import it explicitly, ``from scalign.differentiable import torch_procrustes_align``: it
needs PyTorch (``pip install 'scalign[torch]'``), which ``import scalign`` does not.

Convention (as :func:`scalign.procrustes_align` and :mod:`scalign.kernels.kabsch`; rows
are points): the moving set ``X`` is mapped onto the target ``Y`` as

.. math::  Y \\approx s\\, X R^T + t \\qquad (\\text{column form } y = s R x + t)

with weights :math:`p_k = w_k / \\sum_j w_j`, centroids :math:`\\bar x = \\sum_k p_k x_k`,
:math:`\\bar y = \\sum_k p_k y_k`, cross-covariance :math:`H = \\sum_k p_k (x_k - \\bar x)
(y_k - \\bar y)^T = U \\Sigma V^T`, :math:`R = V D U^T` with :math:`D = \\mathrm{diag}(1,
\\dots, 1, \\operatorname{sign}\\det(V U^T))` (proper rotations only),
:math:`s = \\mathrm{tr}(\\Sigma D) / \\sigma_x^2` (Umeyama) or 1, :math:`t = \\bar y - s R
\\bar x`, and the error is the weighted RMSD :math:`e = \\sqrt{\\sum_k p_k \\lVert y_k -
(s R x_k + t) \\rVert^2}`.

Gradients
---------
``torch.linalg.svd``'s backward has :math:`1 / (\\sigma_i^2 - \\sigma_j^2)` terms, infinite
for the repeated singular values of symmetric point sets, although ``R`` itself is smooth
there. The rotation therefore has its own backward (:class:`_ProperPolarRotation`), that of
the special polar factor: with :math:`\\lambda = \\mathrm{diag}(\\Sigma D)`,
:math:`R^T H^T = U\\,\\mathrm{diag}(\\lambda)\\,U^T` is symmetric, and differentiating that
condition gives :math:`dR = R\\,\\Omega`, :math:`\\Omega = U \\Omega' U^T` with

.. math::  \\Omega'_{ij} = \\frac{[U^T (R^T dH^T - dH\\, R) U]_{ij}}{\\lambda_i + \\lambda_j}.

The denominators are :math:`\\lambda_i + \\lambda_j = \\sigma_i \\pm \\sigma_j`, not
differences of squares: they vanish only where the optimal rotation itself is not unique
(two singular values both zero, e.g. a collinear set, or :math:`\\sigma_{d-1} = \\sigma_d`
with a flipped sign, e.g. a mirror image of a cube). There :math:`1/g` is replaced by
:math:`g / (g^2 + \\epsilon^2)`, :math:`\\epsilon = \\sqrt{\\varepsilon_{mach}}\\,\\sigma_1`,
which bounds the gradient by :math:`1/(2\\epsilon)` and is zero at an exact tie; elsewhere
it changes :math:`1/g` by the relative amount :math:`(\\epsilon/g)^2`. This holds in any
dimension ``d``, unlike Horn's quaternion eigenproblem (``d = 3`` only), whose eigenvalue
gaps are twice these sums.

The error and the scale need no rotation derivative at all (Danskin's envelope theorem:
the value of an optimisation changes, to first order, only through its explicit arguments
at the optimum). :math:`\\mathrm{tr}(\\Sigma D) = \\max_R \\mathrm{tr}(R H)` has gradient
:math:`R^T = U D V^T` with respect to ``H``, and :math:`e^2 = \\min_{R, s, t} \\sum_k p_k
\\lVert s R x_k + t - y_k \\rVert^2` has the gradient of the explicit residual with ``R``
and ``s`` held fixed, so both are computed with the fitted ``R`` (and ``s``) detached: the
gradients are exact even at the ties above. The error is summed from the explicit residual
rather than from the moments :math:`\\sigma_y^2 - 2 s\\,\\mathrm{tr}(\\Sigma D) + s^2
\\sigma_x^2`, which cancel for good fits (in float32 they leave an RMSD floor of about
:math:`3 \\cdot 10^{-4}` of the size of the set); its gradient is the same.
"""

from __future__ import annotations

import math

try:
    import torch
except ImportError as exc:
    raise ImportError("scalign.differentiable needs PyTorch: pip install 'scalign[torch]'") from exc
from torch.autograd.function import once_differentiable

from scalign.validation import (
    COINCIDENCE_FLOOR,
    check_pair,
    coincidence_rtol,
    raise_if_coincident,
)


class _ProperPolarRotation(torch.autograd.Function):
    """``R = V D U^T`` for ``H = U Sigma V^T`` with a backward free of singular-value gaps.

    See the module docstring for the derivation and the regularisation of ties.
    """

    @staticmethod
    def forward(ctx, H: torch.Tensor) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(H)
        # Singular values come sorted descending, so flipping the last one flips the
        # direction of least covariance, the right one for planar (rank d-1) sets.
        sign = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
        D = torch.cat([torch.ones_like(S[..., :-1]), sign[..., None]], dim=-1)
        R = (Vh.mT * D[..., None, :]) @ U.mT
        ctx.save_for_backward(U, S * D, R)
        return R

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_R: torch.Tensor) -> torch.Tensor:
        U, lam, R = ctx.saved_tensors
        B = R.mT @ grad_R
        B = U.mT @ (B - B.mT) @ U / 2
        gap = lam[..., :, None] + lam[..., None, :]
        finfo = torch.finfo(lam.dtype)
        eps2 = finfo.eps * lam.abs().amax(dim=-1)[..., None, None] ** 2 + finfo.tiny
        C = U @ (B * gap / (gap * gap + eps2)) @ U.mT
        return -2 * C @ R.mT


def _as_points(name: str, X: object) -> torch.Tensor:
    """``X`` as a real floating tensor of point sets ``(..., n, d)`` (finiteness later)."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if X.is_complex():
        raise TypeError(f"{name} must be real, got dtype {X.dtype}")
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape (..., n_points, d), got shape {tuple(X.shape)}")
    if X.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(X.shape)}")
    if X.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{name} has dtype {X.dtype}: the SVD needs float32 or float64 (convert with .float())"
        )
    return X if X.is_floating_point() else X.to(torch.get_default_dtype())


def _as_weights(name: str, w: object, n: int) -> torch.Tensor:
    """Per-point weights ``(..., n)`` as a real tensor (values checked later)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.is_complex():
        raise TypeError(f"{name} must be real numbers, got dtype {w.dtype}")
    if w.ndim < 1 or w.shape[-1] != n:
        raise ValueError(f"{name} must have shape (..., {n}) (one per point), got {tuple(w.shape)}")
    return w


def _check_device(name: str, a: torch.Tensor, X: torch.Tensor) -> None:
    if a.device != X.device:
        raise ValueError(f"{name} is on {a.device} but X is on {X.device}")


def _check_batch(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None) -> None:
    shapes = {"X": X.shape[:-2], "Y": Y.shape[:-2]}
    if w is not None:
        shapes["weights"] = w.shape[:-1]
    try:
        torch.broadcast_shapes(*shapes.values())
    except RuntimeError as exc:
        listed = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch shapes do not broadcast: {listed}") from exc


def _check_finite(name: str, X: torch.Tensor) -> None:
    bad = int((~torch.isfinite(X.detach())).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite (NaN or inf) coordinate(s)")


def _check_spread(name: str, X: torch.Tensor) -> None:
    """At least two distinct points per item, or no rotation (nor scale) is defined; the
    tolerance is NumPy's (:func:`scalign.validation.check_spread`), floor included: the fit
    sums squares in units of each item's size (:func:`_unit_scale`), so they underflow no
    sooner than NumPy's float64 sums."""
    X = X.detach()
    magnitude = X.abs().amax(dim=(-2, -1), keepdim=True)
    tol = (coincidence_rtol(torch.finfo(X.dtype).eps) * magnitude).clamp(min=COINCIDENCE_FLOOR)
    centred = X.double() - X.mean(dim=-2, keepdim=True, dtype=torch.float64)
    same = (centred.abs() <= tol).flatten(-2).all(dim=-1)
    raise_if_coincident(name, same.cpu().numpy())


def _check_weight_values(name: str, w: torch.Tensor) -> None:
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} has non-finite (NaN or inf) values")
    if bool((w < 0).any()):
        raise ValueError(f"{name} has negative values: weights must be >= 0")
    if bool((w == 0).all(dim=-1).any()):
        raise ValueError(f"{name} are all zero: at least one point needs a positive weight")


def _checked(
    X: object, Y: object, weights: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated ``X, Y`` in one floating dtype and the probabilities ``p (..., n)`` in
    float64 (for the centroids, :func:`_centred`)."""
    X = _as_points("X", X)
    Y = _as_points("Y", Y)
    _check_device("Y", Y, X)
    check_pair(X, Y)
    w = None if weights is None else _as_weights("weights", weights, X.shape[-2])
    if w is not None:
        _check_device("weights", w, X)
    _check_batch(X, Y, w)
    _check_finite("X", X)
    _check_finite("Y", Y)
    dtype = torch.promote_types(X.dtype, Y.dtype)
    X, Y = X.to(dtype), Y.to(dtype)
    _check_spread("X", X)
    _check_spread("Y", Y)
    if w is None:
        n = X.shape[-2]
        return X, Y, torch.full((n,), 1.0 / n, dtype=torch.float64, device=X.device)
    _check_weight_values("weights", w)
    w = w.double()
    return X, Y, w / w.sum(dim=-1, keepdim=True)


def _centred(X: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X - x̄`` and ``x̄ = p X`` (``p`` float64) in ``X``'s dtype, both from float64
    sums, as NumPy's: a float32 centroid of coordinates ~1e4 Å is off by ~1e-3 Å (an
    RMSD of 0.0170 Å came out 0.0177 Å), and so is one from float32 probabilities, which
    sum to 1 only within ~1e-7."""
    wide = X.double()
    c = p[..., None, :] @ wide
    return (wide - c).to(X.dtype), c.to(X.dtype)


def _unit_scale(Xc: torch.Tensor) -> torch.Tensor:
    """:math:`2^{-e}` per item, ``e`` the binary exponent of :math:`\\max |x|` (``(..., 1,
    1)``, no gradient): an exact scaling under which the fit's sums of squares neither
    overflow (float32 sets spread beyond ~1e19: the SVD failed on infinities) nor underflow
    (spread below ~1e-19)."""
    _, e = torch.frexp(Xc.detach().abs().amax(dim=(-2, -1), keepdim=True))
    limit = int(math.log2(torch.finfo(Xc.dtype).max)) - 1
    return torch.ldexp(torch.ones_like(Xc[..., :1, :1]), -e.clamp(-limit, limit))


def _safe_sqrt(a: torch.Tensor) -> torch.Tensor:
    """``sqrt(a)`` for ``a >= 0`` whose gradient at a perfect fit (``a = 0``) is 0, not NaN."""
    positive = a > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, a, 1.0)), 0.0)


def torch_procrustes_align(
    X: torch.Tensor,
    Y: torch.Tensor,
    scale: bool = False,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable alignment of ``X`` onto ``Y``; return ``(X_aligned, R, error)``.

    Minimises :math:`\\sum_k p_k \\lVert s R x_k + t - y_k \\rVert^2` over proper rotations
    ``R`` (det +1), translations ``t`` and, with ``scale``, the isotropic scale ``s`` of
    ``X`` (otherwise ``s = 1``), with :math:`p = w / \\sum w` (uniform by default):
    :math:`H = \\sum_k p_k (x_k - \\bar x)(y_k - \\bar y)^T = U \\Sigma V^T`,
    :math:`R = V D U^T`, :math:`D = \\mathrm{diag}(1, \\dots, 1, \\operatorname{sign}
    \\det(V U^T))`, :math:`s = \\mathrm{tr}(\\Sigma D) / \\sigma_x^2`,
    :math:`t = \\bar y - s R \\bar x`. The same numbers as
    :func:`scalign.procrustes_align` / :func:`scalign.weighted_procrustes`, computed in
    the inputs' dtype on their device (the centroids from float64 sums, the fit in units
    of each set's size: float32 sets from 1e-30 to 1e30 fit alike), differentiable
    with respect to ``X``, ``Y`` and ``weights`` (first order; see the module docstring
    for the gradients and their behaviour when singular values of ``H`` tie).

    Parameters
    ----------
    X : (..., n, d) tensor
        Moving point sets, points as rows; any leading batch shape, any ``d``.
    Y : (n, d) or (..., n, d) tensor
        Target: one shared by the batch, or one per item (batch axes broadcast).
    scale : bool
        Fit the scale ``s`` of ``X`` (Umeyama).
    weights : (n,) or (..., n) tensor, optional
        Non-negative per-point weights, not all zero; the centroids are weighted too.

    Returns
    -------
    X_aligned : (..., n, d) tensor
        :math:`s X R^T + t`.
    R : (..., d, d) tensor
        Proper rotation.
    error : (...) tensor
        Weighted RMSD :math:`\\sqrt{\\sum_k p_k \\lVert y_k - (s R x_k + t)\\rVert^2}`;
        with uniform weights :math:`\\lVert Y - X_{aligned} \\rVert_F / \\sqrt{n}`. A
        square root: its gradient is 0 where the error is exactly 0, but near a perfect
        fit rounding leaves an error of ~1e-16 (float64) or ~1e-7 (float32) whose
        gradient has an arbitrary direction and a magnitude of order 0.1; a loss that
        may reach 0 should use ``error ** 2``, whose gradient vanishes there.

    Raises
    ------
    TypeError
        If an input is not a tensor, or is complex.
    ValueError
        On mismatched shapes or devices, fewer than ``d`` points, NaN/inf coordinates,
        coinciding points in ``X``, or negative, non-finite or all-zero weights.
    """
    X, Y, p = _checked(X, Y, weights)
    Xc, _ = _centred(X, p)
    Yc, cy = _centred(Y, p)
    p = p.to(X.dtype)
    # the fit in units of each set's size: a Xc and b Yc, a and b exact powers of two
    a, b = _unit_scale(Xc), _unit_scale(Yc)
    Xs, Ys = a * Xc, b * Yc
    H = Xs.mT @ (p[..., :, None] * Ys)  # a b H: the same rotation
    R = _ProperPolarRotation.apply(H)
    if scale:
        # tr(Sigma D) = max_R tr(R H): R held fixed gives its exact gradient, U D V^T.
        trace = (R.detach() * H.mT).sum(dim=(-2, -1))[..., None, None]
        s_units = trace / (p * Xs.square().sum(dim=-1)).sum(dim=-1)[..., None, None]
        s = s_units * a / b
        # Envelope theorem: e^2 = min over (R, s, t) changes only through X, Y, p.
        residual = s_units.detach() * (Xs @ R.detach().mT) - Ys  # b times the residual
        unit = b
    else:
        s = torch.ones((), dtype=X.dtype, device=X.device)
        # in the unit of the larger set: sets of very different sizes (X 1e10, Y 1e-30)
        # would overflow the ratio b / a
        unit = torch.minimum(a, b)
        residual = (unit * Xc) @ R.detach().mT - unit * Yc
    aligned = s * (Xc @ R.mT) + cy
    error = _safe_sqrt((p * residual.square().sum(dim=-1)).sum(dim=-1)) / unit[..., 0, 0]
    return aligned, R, error
