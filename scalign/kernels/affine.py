"""Homogeneous affine matrices for images and volumes: the one convention.

* A matrix ``M`` states the **physical (forward) motion of the moving object** in pixel
  coordinates ``(x, y[, z])``, as a homogeneous column-vector map ``p' = M p``; ``x`` is
  the column index, ``y`` the row index, ``z`` the plane index, pixel centres at integers.
  An image moved by ``M`` shows at ``M p`` what it showed at ``p``.
* Warping an image by ``M`` samples it with the inverse (pull): ``out(p) = in(M^{-1} p)``.
  scipy's ``affine_transform`` takes exactly that pull map, in array-index order
  ``(z, y, x)``: :func:`to_index_order` reverses the axes.
* ``build_affine_matrix`` composes, about ``center`` ``c`` (default: the image centre
  ``((W - 1)/2, (H - 1)/2)``), ``M = T(c + t) R(θ) Sh(shx, shy) S(sx, sy) T(-c)`` with
  ``R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]`` acting on ``(x, y)`` (θ in degrees; with
  ``y`` pointing down the rows, a positive θ turns the image clockwise on screen),
  ``Sh = [[1, shx], [shy, 1]]`` and ``S = diag(sx, sy)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Array = Any

# A matrix whose linear part has |det| below this (relative to its scale) is singular.
_SINGULAR = 1e-12


def _translation(t: Sequence[float]) -> np.ndarray:
    d = len(t)
    T = np.eye(d + 1)
    T[:d, d] = t
    return T


def image_center(shape: Sequence[int]) -> np.ndarray:
    """Centre ``((W-1)/2, (H-1)/2[, (D-1)/2])`` in ``(x, y[, z])`` of an array of ``shape``
    given in index order ``([D,] H, W)``."""
    return (np.asarray(shape[::-1], dtype=np.float64) - 1.0) / 2.0


def rotation_2d(theta: float) -> np.ndarray:
    """``[[cos θ, -sin θ], [sin θ, cos θ]]``, θ in degrees."""
    c, s = np.cos(np.radians(theta)), np.sin(np.radians(theta))
    return np.array([[c, -s], [s, c]])


def build_affine_matrix(
    theta: float = 0.0,
    tx: float = 0.0,
    ty: float = 0.0,
    sx: float = 1.0,
    sy: float = 1.0,
    shx: float = 0.0,
    shy: float = 0.0,
    center: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """2-D motion ``M = T(c + t) R(θ) Sh(shx, shy) S(sx, sy) T(-c)`` (3×3, float64).

    Parameters
    ----------
    theta : rotation in degrees, ``R = [[cos, -sin], [sin, cos]]`` on ``(x, y)``.
    tx, ty : translation in pixels.
    sx, sy : scales along ``x`` and ``y``.
    shx, shy : shears, ``Sh = [[1, shx], [shy, 1]]``.
    center : ``(cx, cy)`` the fixed point of the linear part, in pixels; use
        :func:`image_center` for the centre of an image.
    """
    linear = rotation_2d(theta) @ np.array([[1.0, shx], [shy, 1.0]]) @ np.diag([sx, sy])
    c = np.asarray(center, dtype=np.float64)
    if c.shape != (2,):
        raise ValueError(f"center must be (cx, cy), got shape {c.shape}")
    M = np.eye(3)
    M[:2, :2] = linear
    return _translation(c + (tx, ty)) @ M @ _translation(-c)


def invert(M: Array) -> np.ndarray:
    """Inverse of homogeneous matrices ``(..., d+1, d+1)``; singular ones raise ``ValueError``."""
    M = check_matrix("matrix", M)
    d = M.shape[-1] - 1
    linear = M[..., :d, :d]
    det = np.linalg.det(linear)
    size = np.max(np.abs(linear), axis=(-2, -1)) ** d
    if np.any(np.abs(det) <= _SINGULAR * np.maximum(size, np.finfo(float).tiny)):
        raise ValueError("matrix is not invertible (its linear part is singular)")
    return np.linalg.inv(M)


def to_index_order(M: Array) -> np.ndarray:
    """The same map with the spatial axes reversed: ``(x, y[, z])`` ↔ ``(z, y, x)``.

    Its own inverse. ``P M P`` with ``P`` the axis-reversing permutation (the homogeneous
    coordinate stays last).
    """
    M = np.asarray(M, dtype=np.float64)
    d = M.shape[-1] - 1
    order = list(range(d))[::-1] + [d]
    return M[..., order, :][..., :, order]


def pull_matrix(M: Array) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` for ``scipy.ndimage.affine_transform`` warping by motion ``M``.

    scipy computes ``out[o] = in[matrix @ o + offset]`` in index order: that is the
    inverse motion, with the axes reversed.
    """
    pull = to_index_order(invert(M))
    d = pull.shape[-1] - 1
    return pull[..., :d, :d], pull[..., :d, d]


def check_matrix(name: str, M: Any, d: int | None = None) -> np.ndarray:
    """Homogeneous matrices ``(..., d+1, d+1)``: finite, last row ``(0, ..., 0, 1)``."""
    arr = np.asarray(M, dtype=np.float64) if not isinstance(M, np.ndarray) else M
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{name} must be homogeneous 3×3 (2D) or 4×4 (3D), got shape {arr.shape}")
    if d is not None and arr.shape[-1] != d + 1:
        raise ValueError(f"{name} must be {d + 1}×{d + 1} for {d}-D data, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite (NaN or inf) entries")
    last = np.zeros(arr.shape[-1])
    last[-1] = 1.0
    if not np.allclose(arr[..., -1, :], last, atol=1e-12):
        raise ValueError(f"{name} is not homogeneous: its last row must be {tuple(last)}")
    return arr
