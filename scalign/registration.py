"""Registration of one image (or volume) onto a reference, on plain arrays.

Conventions (:mod:`scalign.kernels.affine`): the returned ``matrix`` is the forward motion
``M`` of the moving image relative to the reference in pixel ``(x, y[, z])``,
``mov(M p) ≈ ref(p)``: warping ``ref`` by ``M`` reproduces ``mov``, and ``warped`` is
``mov`` pulled back onto ``ref``, ``warped(p) = mov(M p)``. The pipeline is
:func:`scalign.kernels.register.estimate_motion`: translation by phase correlation,
a log-polar rotation (and scale) search in 2-D so that any angle is in the capture range,
then inverse-compositional Gauss–Newton on a pyramid until the update moves no image
corner by more than ``tol`` pixels, polished on the finest level with cubic B-spline
sampling.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from scalign._array import to_numpy
from scalign.kernels.affine import (
    check_matrix,
    decompose_affine,
    decompose_affine_3d,
    image_center,
    invert,
)
from scalign.kernels.register import (
    LOSSES,
    TRANSFORMS_2D,
    TRANSFORMS_3D,
    auto_levels,
    estimate_motion,
    prepare_template,
)
from scalign.kernels.warp import check_invertible, check_order, warp_images
from scalign.validation import check_iterations, check_option

# Fewer pixels than this along an axis leave no room for a pyramid or a rotation search.
MIN_SIZE = 8


class RegistrationInfo(NamedTuple):
    """What :func:`register_affine_2d` / :func:`register_affine_3d` report.

    Attributes
    ----------
    loss : final loss on the finest level (MSE, or ``1 - NCC``).
    iterations : Gauss–Newton iterations per pyramid level, coarsest first.
    converged : whether the finest level met ``tol``.
    levels : pyramid levels used.
    parameters : ``M`` decomposed about the image centre ``c`` as ``T(c + t) R Sh S
        T(-c)`` (:func:`scalign.kernels.affine.decompose_affine`: ``theta`` in degrees,
        ``tx, ty, sx, sy, shx`` with ``shy = 0``; in 3-D
        :func:`~scalign.kernels.affine.decompose_affine_3d`: ``rx, ry, rz`` with
        ``R = Rz Ry Rx``, translation, scales and shears).
    """

    loss: float
    iterations: tuple[int, ...]
    converged: bool
    levels: int
    parameters: dict[str, Any]


def _as_image(name: str, image: Any, d: int) -> np.ndarray:
    """``image`` checked, as a float64 host array (a CuPy image is copied: one pair is
    registered on the host; stacks go to the GPU with ``register_stack``)."""
    arr = to_numpy(image)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != d:
        kind = "an image (y, x)" if d == 2 else "a volume (z, y, x)"
        raise ValueError(f"{name} must be {kind}, got shape {arr.shape}")
    if min(arr.shape) < MIN_SIZE:
        raise ValueError(f"{name} is too small to register: shape {arr.shape} (>= {MIN_SIZE})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite (NaN or inf) pixels")
    return arr.astype(np.float64, copy=False)


def _check_levels(levels: Any, shape: tuple[int, ...]) -> None:
    """Pyramid levels: a positive integer, at most as many as halving the smallest side
    down to 2 px allows."""
    if isinstance(levels, bool) or not isinstance(levels, Integral):
        raise TypeError(f"levels must be a positive integer, got {levels!r}")
    most = auto_levels(shape, 2)
    if not 1 <= levels <= most:
        raise ValueError(
            f"levels must be an integer from 1 to {most} for shape {shape} (each level "
            f"halves the image down to at least 2 px), got {levels}"
        )


def _register(
    ref,
    mov,
    d,
    transform,
    loss,
    transforms,
    *,
    max_iterations,
    tol,
    levels,
    initial,
    rotation_search,
    order,
):
    ref, mov = _as_image("ref", ref, d), _as_image("mov", mov, d)
    if ref.shape != mov.shape:
        raise ValueError(f"ref has shape {ref.shape} but mov has {mov.shape}")
    check_option("transform", transform, transforms)
    check_option("loss", loss, LOSSES)
    check_iterations(max_iterations, tol)
    order = check_order(order)
    if levels is not None:
        _check_levels(levels, ref.shape)
    if initial is not None:
        initial = check_matrix("initial", initial, d)
        check_invertible("initial", initial)
    for name, arr in (("ref", ref), ("mov", mov)):
        # nothing to go by: the fit would return an arbitrary motion
        if arr.max() == arr.min():
            raise ValueError(
                f"{name} is constant (every pixel {arr.flat[0]:g}): nothing to register"
            )
    template = prepare_template(
        ref, transform, levels=levels, rotation_search=rotation_search and initial is None
    )
    fit = estimate_motion(
        template, mov, loss, max_iterations=max_iterations, tol=tol, initial=initial
    )
    M = fit.matrix
    # warped(p) = mov(M p): warped by M^-1 (an exact identity copies mov)
    warped = warp_images(mov[None], invert(M), order=order)[0]
    decompose = decompose_affine if d == 2 else decompose_affine_3d
    parameters = dict(decompose(M, center=image_center(ref.shape)))
    info = RegistrationInfo(
        float(fit.loss), fit.iterations, bool(fit.converged), fit.levels, parameters
    )
    return warped, M, info


def register_affine_2d(
    ref: ArrayLike,
    mov: ArrayLike,
    transform: str = "rigid",
    loss: str = "mse",
    *,
    max_iterations: int = 50,
    tol: float = 1e-3,
    levels: int | None = None,
    initial: ArrayLike | None = None,
    rotation_search: bool = True,
    order: int = 1,
) -> tuple[np.ndarray, np.ndarray, RegistrationInfo]:
    """Register a 2-D image ``mov`` onto ``ref``; return ``(warped, matrix, info)``.

    Parameters
    ----------
    ref, mov : (H, W) real arrays of the same shape, finite, not constant, each side >= 8.
    transform : {"translation", "rigid", "similarity", "affine"}
    loss : {"mse", "ncc"}
        Mean squared error, or zero-normalised cross-correlation (insensitive to a gain
        and an offset of the intensities).
    max_iterations : Gauss–Newton iterations per pyramid level at most.
    tol : convergence on the finest level: no image corner moves by more than ``tol`` px.
    levels : pyramid levels (default: halve until the coarsest side is about 64 px; at
        most as many as halving the smallest side down to 2 px allows).
    initial : (3, 3) invertible starting motion, optional (then no global search).
    rotation_search : search every rotation angle (log-polar) before refining.
    order : interpolation order of ``warped``.

    Returns
    -------
    warped : ``mov`` pulled back onto ``ref``, ``warped(p) = mov(M p)`` (``mov`` itself
        when ``M`` is exactly the identity).
    matrix : (3, 3) forward motion ``M`` with ``mov(M p) ≈ ref(p)``.
    info : :class:`RegistrationInfo`.
    """
    return _register(
        ref,
        mov,
        2,
        transform,
        loss,
        TRANSFORMS_2D,
        max_iterations=max_iterations,
        tol=tol,
        levels=levels,
        initial=initial,
        rotation_search=rotation_search,
        order=order,
    )


def register_affine_3d(
    ref: ArrayLike,
    mov: ArrayLike,
    transform: str = "rigid",
    loss: str = "mse",
    *,
    max_iterations: int = 50,
    tol: float = 1e-3,
    levels: int | None = None,
    initial: ArrayLike | None = None,
    order: int = 1,
) -> tuple[np.ndarray, np.ndarray, RegistrationInfo]:
    """Register a volume ``mov (D, H, W)`` onto ``ref``; return ``(warped, matrix, info)``.

    As :func:`register_affine_2d` with 4×4 motions in ``(x, y, z)`` and transforms
    ``"translation"``, ``"rigid"`` or ``"affine"``; the start is the phase-correlation
    translation (no rotation search in 3-D: rotations up to ~20° are in the capture range
    of the pyramid).

    Parameters
    ----------
    ref, mov : (D, H, W) real arrays of the same shape, finite, not constant, each side >= 8.
    transform : {"translation", "rigid", "affine"}
    loss : {"mse", "ncc"}
        As in :func:`register_affine_2d`.
    max_iterations : Gauss–Newton iterations per pyramid level at most.
    tol : convergence on the finest level: no volume corner moves by more than ``tol`` px.
    levels : pyramid levels (default: halve while the coarsest side stays >= 24 px; at
        most as many as halving the smallest side down to 2 px allows).
    initial : (4, 4) invertible starting motion, optional.
    order : interpolation order of ``warped``.

    Returns
    -------
    warped : ``mov`` pulled back onto ``ref``, ``warped(p) = mov(M p)``.
    matrix : (4, 4) forward motion ``M`` with ``mov(M p) ≈ ref(p)``, in ``(x, y, z)``.
    info : :class:`RegistrationInfo` (``parameters`` from
        :func:`~scalign.kernels.affine.decompose_affine_3d`).

    Raises
    ------
    ValueError, TypeError
        Invalid arrays (shape, dtype, NaN/inf, constant, too small), options or ``initial``.
    """
    return _register(
        ref,
        mov,
        3,
        transform,
        loss,
        TRANSFORMS_3D,
        max_iterations=max_iterations,
        tol=tol,
        levels=levels,
        initial=initial,
        rotation_search=False,
        order=order,
    )
