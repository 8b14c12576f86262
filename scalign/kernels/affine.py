"""Homogeneous affine matrices for images and volumes: the one convention.

* A matrix ``M`` states the **physical (forward) motion of the moving object** in pixel
  coordinates ``(x, y[, z])``, as a homogeneous column-vector map ``p' = M p``; ``x`` is
  the column index, ``y`` the row index, ``z`` the plane index, pixel centres at integers.
  An image moved by ``M`` shows at ``M p`` what it showed at ``p``.
* Warping an image by ``M`` samples it with the inverse (pull): ``out(p) = in(M^{-1} p)``.
  scipy's ``affine_transform`` takes exactly that pull map, in array-index order
  ``(z, y, x)``: :func:`to_index_order` reverses the axes and :func:`pull_matrix` gives
  scipy's ``(matrix, offset)``.
* ``build_affine_matrix`` composes, about ``center`` ``c`` (default: the origin, pixel
  ``(0, 0)``; pass :func:`image_center` for the centre ``((W - 1)/2, (H - 1)/2)`` of an
  image), ``M = T(c + t) R(θ) Sh(shx, shy) S(sx, sy) T(-c)`` with
  ``R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]`` acting on ``(x, y)`` (θ in degrees; with
  ``y`` pointing down the rows, a positive θ turns the image clockwise on screen),
  ``Sh = [[1, shx], [shy, 1]]`` and ``S = diag(sx, sy)``.
* ``build_affine_matrix_3d`` composes ``M = T(c + t) R Sh S T(-c)`` with
  ``R = Rz(rz) Ry(ry) Rx(rx)`` (right-handed rotations about the ``x``, ``y``, ``z`` axes
  acting on column vectors ``(x, y, z)``; ``Rx`` is applied first), ``Sh`` unit upper
  triangular (default: identity) and ``S = diag(sx, sy, sz)``. ``R`` equals
  ``scipy.spatial.transform.Rotation.from_euler("xyz", [rx, ry, rz], degrees=True)``
  (extrinsic ``xyz``).
* :func:`compose` lists motions in the order they happen: ``compose(A, B) = B @ A``.
* Normalised coordinates (torch ``affine_grid`` / ``grid_sample``) map a pixel index ``i``
  along an axis of ``n`` samples to ``u = (2i + 1)/n - 1`` (``align_corners=False``) or
  ``u = 2i/(n - 1) - 1`` (``align_corners=True``); :func:`torch_theta` gives the
  ``theta`` that makes torch warp by a pixel-space motion.

All functions return ``numpy.float64`` arrays and never import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np

Array = Any

# A matrix whose linear part has |det| below this (relative to its scale) is singular.
_SINGULAR = 1e-12
# Below this, cos(ry) is treated as zero in the 3-D Euler-angle extraction (gimbal lock).
_GIMBAL = 1e-12


# --------------------------------------------------------------------------- validation


def _real(name: str, value: Any) -> float:
    """A finite real scalar, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a real number, got a bool ({value!r})")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from exc
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    out = float(arr)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _vector(name: str, value: Any, d: int) -> np.ndarray:
    """A finite real vector of length ``d``, or a TypeError/ValueError naming ``name``."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of {d} real numbers: {exc}") from exc
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape != (d,):
        raise ValueError(f"{name} must have {d} entries, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr}")
    return arr


def check_matrix(name: str, M: Any, d: int | None = None) -> np.ndarray:
    """Validate homogeneous matrices ``(..., d+1, d+1)`` and return them as float64.

    Parameters
    ----------
    name : str
        The variable's name, used in error messages.
    M : array_like, shape ``(..., 3, 3)`` or ``(..., 4, 4)``
        Homogeneous 2-D or 3-D affine matrices (leading axes are a batch).
    d : int, optional
        Required spatial dimension (2 or 3); any of the two when omitted.

    Returns
    -------
    numpy.ndarray
        ``M`` as float64 (no copy when it already is).

    Raises
    ------
    TypeError
        ``M`` is not numeric (strings, objects, complex numbers, booleans).
    ValueError
        Wrong shape, non-finite entries, or a last row other than ``(0, ..., 0, 1)``.
    """
    try:
        arr = np.asarray(M)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not a rectangular array: {exc}") from exc
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
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
        row = ", ".join(f"{v:g}" for v in last)
        raise ValueError(f"{name} is not homogeneous: its last row must be ({row})")
    return arr


def _singular(M: np.ndarray) -> np.ndarray:
    """Boolean mask (over the batch) of matrices whose linear part is singular."""
    d = M.shape[-1] - 1
    linear = M[..., :d, :d]
    det = np.linalg.det(linear)
    size = np.max(np.abs(linear), axis=(-2, -1)) ** d
    return np.abs(det) <= _SINGULAR * np.maximum(size, np.finfo(np.float64).tiny)


def _check_shape(
    name: str, shape: Any, d: int, align_corners: bool, *, min_size: int = 1
) -> tuple[int, ...]:
    """An index-order shape of ``d`` positive integers."""
    try:
        dims = tuple(shape)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of {d} integers, got {shape!r}") from exc
    if len(dims) != d:
        what = "(H, W)" if d == 2 else "(D, H, W)"
        raise ValueError(f"{name} must be {what} for a {d}-D matrix, got {dims}")
    out = []
    for n in dims:
        if isinstance(n, bool | np.bool_) or not isinstance(n, int | np.integer):
            raise TypeError(f"{name} must hold integers, got {dims}")
        if n < min_size:
            raise ValueError(f"{name} must hold sizes >= {min_size}, got {dims}")
        out.append(int(n))
    if align_corners and min(out) < 2:
        raise ValueError(
            f"{name} = {dims}: align_corners=True needs every size >= 2 "
            "(u = 2i/(n-1) - 1 is undefined for n = 1)"
        )
    return tuple(out)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


# --------------------------------------------------------------------------- builders


def _translation(t: Sequence[float]) -> np.ndarray:
    d = len(t)
    T = np.eye(d + 1)
    T[:d, d] = t
    return T


def image_center(shape: Sequence[int]) -> np.ndarray:
    """Centre of an array, in ``(x, y[, z])`` pixel coordinates.

    Parameters
    ----------
    shape : sequence of int
        The array's shape in index order ``([D,] H, W)``.

    Returns
    -------
    numpy.ndarray
        ``((W-1)/2, (H-1)/2[, (D-1)/2])``: the midpoint between the first and last pixel
        centres (an integer for odd sizes, a half-integer for even ones).
    """
    return (np.asarray(shape[::-1], dtype=np.float64) - 1.0) / 2.0


def rotation_2d(theta: float) -> np.ndarray:
    """2-D rotation ``[[cos θ, -sin θ], [sin θ, cos θ]]`` acting on ``(x, y)``.

    Parameters
    ----------
    theta : float
        Angle in degrees. It turns ``+x`` towards ``+y``; with ``y`` pointing down the rows
        that is clockwise on screen.

    Returns
    -------
    numpy.ndarray, shape (2, 2)
    """
    t = np.radians(_real("theta", theta))
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s], [s, c]])


def rotation_3d(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """3-D rotation ``R = Rz(rz) Ry(ry) Rx(rx)`` acting on column vectors ``(x, y, z)``.

    Each factor is a right-handed rotation about the named axis, angles in degrees::

        Rx(a) = [[1, 0, 0], [0, cos a, -sin a], [0, sin a, cos a]]
        Ry(b) = [[cos b, 0, sin b], [0, 1, 0], [-sin b, 0, cos b]]
        Rz(g) = [[cos g, -sin g, 0], [sin g, cos g, 0], [0, 0, 1]]

    ``Rx`` is applied first, then ``Ry``, then ``Rz`` (all about the fixed axes). This is
    ``scipy.spatial.transform.Rotation.from_euler("xyz", [rx, ry, rz], degrees=True)``
    (lower-case: extrinsic). ``Rz(rz)`` restricted to ``(x, y)`` is :func:`rotation_2d`.

    Returns
    -------
    numpy.ndarray, shape (3, 3)
    """
    a, b, g = (np.radians(_real(n, v)) for n, v in (("rx", rx), ("ry", ry), ("rz", rz)))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    Rx = np.array([[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]])
    Ry = np.array([[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]])
    Rz = np.array([[cg, -sg, 0.0], [sg, cg, 0.0], [0.0, 0.0, 1.0]])
    return Rz @ Ry @ Rx


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

    Read right to left: move the centre ``c`` to the origin, scale, shear, rotate, move
    back, translate by ``t``. The linear part ``L = R Sh S`` keeps ``c`` fixed, then
    ``c`` moves to ``c + t``.

    Parameters
    ----------
    theta : float
        Rotation in degrees, ``R = [[cos, -sin], [sin, cos]]`` on ``(x, y)`` (turns ``+x``
        towards ``+y``: clockwise on screen with ``y`` down).
    tx, ty : float
        Translation in pixels (``x`` = columns, ``y`` = rows).
    sx, sy : float
        Scales along ``x`` and ``y``, ``S = diag(sx, sy)``; a negative one reflects.
    shx, shy : float
        Shears, ``Sh = [[1, shx], [shy, 1]]``.
    center : (cx, cy)
        The fixed point of the linear part, in pixels; use :func:`image_center` for the
        centre of an image.

    Returns
    -------
    numpy.ndarray, shape (3, 3)
    """
    theta, tx, ty, sx, sy, shx, shy = (
        _real(n, v)
        for n, v in (
            ("theta", theta),
            ("tx", tx),
            ("ty", ty),
            ("sx", sx),
            ("sy", sy),
            ("shx", shx),
            ("shy", shy),
        )
    )
    c = _vector("center", center, 2)
    linear = rotation_2d(theta) @ np.array([[1.0, shx], [shy, 1.0]]) @ np.diag([sx, sy])
    M = np.eye(3)
    M[:2, :2] = linear
    return _translation(c + (tx, ty)) @ M @ _translation(-c)


def build_affine_matrix_3d(
    rx: float = 0.0,
    ry: float = 0.0,
    rz: float = 0.0,
    tx: float = 0.0,
    ty: float = 0.0,
    tz: float = 0.0,
    sx: float = 1.0,
    sy: float = 1.0,
    sz: float = 1.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    shxy: float = 0.0,
    shxz: float = 0.0,
    shyz: float = 0.0,
) -> np.ndarray:
    """3-D motion ``M = T(c + t) R Sh S T(-c)`` (4×4, float64).

    Parameters
    ----------
    rx, ry, rz : float
        Rotation angles in degrees, ``R = Rz(rz) Ry(ry) Rx(rx)`` (see :func:`rotation_3d`:
        right-handed rotations about the fixed ``x``, ``y``, ``z`` axes on column vectors
        ``(x, y, z)``, ``x`` first; scipy's ``from_euler("xyz", ...)``).
    tx, ty, tz : float
        Translation in pixels (``x`` = columns, ``y`` = rows, ``z`` = planes).
    sx, sy, sz : float
        Scales, ``S = diag(sx, sy, sz)``; a negative one reflects.
    center : (cx, cy, cz)
        The fixed point of the linear part, in pixels (:func:`image_center`).
    shxy, shxz, shyz : float
        Optional shears, ``Sh = [[1, shxy, shxz], [0, 1, shyz], [0, 0, 1]]`` (``x`` gains
        ``shxy·y + shxz·z``, ``y`` gains ``shyz·z``); zero by default, so the default
        model is ``M = T(c + t) R S T(-c)``. With them every invertible 3-D affine map is
        reachable (see :func:`decompose_affine_3d`).

    Returns
    -------
    numpy.ndarray, shape (4, 4)
    """
    tx, ty, tz, sx, sy, sz, shxy, shxz, shyz = (
        _real(n, v)
        for n, v in (
            ("tx", tx),
            ("ty", ty),
            ("tz", tz),
            ("sx", sx),
            ("sy", sy),
            ("sz", sz),
            ("shxy", shxy),
            ("shxz", shxz),
            ("shyz", shyz),
        )
    )
    c = _vector("center", center, 3)
    shear = np.array([[1.0, shxy, shxz], [0.0, 1.0, shyz], [0.0, 0.0, 1.0]])
    M = np.eye(4)
    M[:3, :3] = rotation_3d(rx, ry, rz) @ shear @ np.diag([sx, sy, sz])
    return _translation(c + (tx, ty, tz)) @ M @ _translation(-c)


# --------------------------------------------------------------------------- algebra


def compose(*matrices: Array) -> np.ndarray:
    """Motions in the order they happen: ``compose(A, B, C) = C @ B @ A``.

    The **first argument is applied first**: ``compose(A, B)`` is "move by ``A``, then by
    ``B``", i.e. the point ``p`` goes to ``B (A p)``.

    Parameters
    ----------
    *matrices : array_like, each ``(..., d+1, d+1)``
        Homogeneous matrices, all of the same ``d``; leading axes broadcast (a batch).

    Returns
    -------
    numpy.ndarray
        The product, float64.

    Raises
    ------
    ValueError
        No matrices, mixed dimensions, or an invalid matrix (see :func:`check_matrix`).
    """
    if not matrices:
        raise ValueError("compose needs at least one matrix")
    checked = [check_matrix(f"matrices[{i}]", m) for i, m in enumerate(matrices)]
    size = checked[0].shape[-1]
    for i, m in enumerate(checked):
        if m.shape[-1] != size:
            raise ValueError(
                f"matrices[{i}] is {m.shape[-1]}×{m.shape[-1]} but matrices[0] is "
                f"{size}×{size}: compose needs matrices of one dimension"
            )
    out = checked[0]
    for m in checked[1:]:
        out = m @ out
    return np.array(out, dtype=np.float64)  # a copy: never alias the input


def is_invertible(M: Array) -> np.ndarray | bool:
    """Whether each homogeneous matrix has a non-singular linear part.

    The test is ``|det L| > 1e-12 · max|L|^d`` (scale-relative), the same that
    :func:`invert` uses. Returns a bool for one matrix, a boolean array for a batch.
    """
    M = check_matrix("M", M)
    ok = ~_singular(M)
    return bool(ok) if ok.ndim == 0 else ok


def invert(M: Array) -> np.ndarray:
    """Inverse of homogeneous matrices ``(..., d+1, d+1)``.

    Parameters
    ----------
    M : array_like, shape ``(..., 3, 3)`` or ``(..., 4, 4)``
        Homogeneous 2-D or 3-D affine matrices (leading axes are a batch).

    Returns
    -------
    numpy.ndarray
        The inverses, float64, shaped like ``M``.

    Raises
    ------
    ValueError
        Some matrix is singular (see :func:`is_invertible`) or invalid.
    """
    M = check_matrix("M", M)
    if np.any(_singular(M)):
        raise ValueError("M is not invertible (its linear part is singular)")
    return np.linalg.inv(M)


def to_index_order(M: Array) -> np.ndarray:
    """The same map with the spatial axes reversed: ``(x, y[, z])`` ↔ ``(z, y, x)``.

    Its own inverse. ``P M P`` with ``P`` the axis-reversing permutation (the homogeneous
    coordinate stays last). Works on batches ``(..., d+1, d+1)``.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim < 2 or M.shape[-1] != M.shape[-2] or M.shape[-1] < 2:
        raise ValueError(f"M must be square homogeneous matrices, got shape {M.shape}")
    d = M.shape[-1] - 1
    order = list(range(d))[::-1] + [d]
    return M[..., order, :][..., :, order]


def pull_matrix(M: Array) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` for ``scipy.ndimage.affine_transform`` warping by motion ``M``.

    scipy computes ``out[o] = in[matrix @ o + offset]`` in index order: that is the
    inverse motion, with the axes reversed. ``affine_transform(img, *pull_matrix(M))``
    shows at ``M p`` what ``img`` showed at ``p``.
    """
    pull = to_index_order(invert(M))
    d = pull.shape[-1] - 1
    return pull[..., :d, :d], pull[..., :d, d]


# --------------------------------------------------------------------------- decomposition


class AffineParams2D(TypedDict):
    """Keyword arguments of :func:`build_affine_matrix` (``shy`` is always 0)."""

    theta: float
    tx: float
    ty: float
    sx: float
    sy: float
    shx: float
    shy: float
    center: tuple[float, float]


class AffineParams3D(TypedDict):
    """Keyword arguments of :func:`build_affine_matrix_3d`."""

    rx: float
    ry: float
    rz: float
    tx: float
    ty: float
    tz: float
    sx: float
    sy: float
    sz: float
    center: tuple[float, float, float]
    shxy: float
    shxz: float
    shyz: float


def _rotation_times_upper(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``L = Q U``: ``Q`` a proper rotation, ``U`` upper triangular, ``U[i, i] > 0`` for
    ``i < d-1``; a reflection (``det L < 0``) leaves ``U[-1, -1] < 0``."""
    Q, U = np.linalg.qr(L)
    signs = np.where(np.diag(U) < 0, -1.0, 1.0)
    Q = Q * signs
    U = signs[:, None] * U
    if np.linalg.det(Q) < 0:
        Q[:, -1] *= -1.0
        U[-1, :] *= -1.0
    return Q, np.triu(U)


def _translation_about(M: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``t`` in ``M = T(c + t) L T(-c)``: ``b = c + t - L c``."""
    d = M.shape[-1] - 1
    L, b = M[:d, :d], M[:d, d]
    return b - c + L @ c


def _single_invertible(name: str, M: Any, d: int) -> np.ndarray:
    M = check_matrix(name, M, d)
    if M.shape != (d + 1, d + 1):
        raise ValueError(f"{name} must be one {d + 1}×{d + 1} matrix, got shape {M.shape}")
    if _singular(M):
        raise ValueError(f"{name} is singular: it has no decomposition into scales and angles")
    return M


def decompose_affine(M: Array, center: Sequence[float] | None = None) -> AffineParams2D:
    """Parameters of :func:`build_affine_matrix` that reproduce a 2-D motion ``M``.

    A 2-D affine map has 6 degrees of freedom and the builder 7 parameters besides the
    centre: **``shy`` is fixed at 0**. Then ``L = R(θ) Sh S`` with
    ``Sh S = [[sx, shx·sy], [0, sy]]`` upper triangular is the QR decomposition of the
    linear part ``L``: ``sx = |L[:, 0]| > 0``, ``θ = atan2(L[1, 0], L[0, 0])`` in
    ``(-180°, 180°]``, ``sy`` and ``shx`` from ``R(θ)ᵀ L``. A reflection (``det L < 0``)
    comes out as ``sy < 0``. The translation is that of ``M = T(c + t) L T(-c)``:
    ``t = b - c + L c`` with ``b = M[:2, 2]``.

    Parameters
    ----------
    M : array_like, shape (3, 3)
        One invertible homogeneous 2-D matrix.
    center : (cx, cy), optional
        The centre the parameters are expressed about; the origin when omitted.

    Returns
    -------
    AffineParams2D
        A dict with ``theta, tx, ty, sx, sy, shx, shy (= 0), center``:
        ``build_affine_matrix(**params)`` equals ``M`` to rounding.

    Raises
    ------
    ValueError
        ``M`` is not one valid 3×3 matrix, or it is singular.
    """
    M = _single_invertible("M", M, 2)
    c = np.zeros(2) if center is None else _vector("center", center, 2)
    Q, U = _rotation_times_upper(M[:2, :2])
    theta = math.degrees(math.atan2(Q[1, 0], Q[0, 0]))
    sx, sy = U[0, 0], U[1, 1]
    t = _translation_about(M, c)
    return AffineParams2D(
        theta=theta,
        tx=float(t[0]),
        ty=float(t[1]),
        sx=float(sx),
        sy=float(sy),
        shx=float(U[0, 1] / sy),
        shy=0.0,
        center=(float(c[0]), float(c[1])),
    )


def euler_angles(R: Array) -> tuple[float, float, float]:
    """Angles ``(rx, ry, rz)`` in degrees with ``R = Rz(rz) Ry(ry) Rx(rx)``.

    Same convention as :func:`rotation_3d`; ``ry ∈ [-90°, 90°]``, ``rx, rz ∈ (-180°, 180°]``.
    At gimbal lock (``|cos ry| < 1e-12``) ``rx`` is set to 0. ``rz`` is read from
    ``R Rx(rx)ᵀ Ry(ry)ᵀ``, so that ``rotation_3d(*euler_angles(R))`` equals ``R`` to
    rounding everywhere, gimbal lock included.

    Parameters
    ----------
    R : array_like, shape (3, 3)
        A proper rotation matrix (orthogonal, ``det = +1``).
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3):
        raise ValueError(f"R must be a 3×3 rotation, got shape {R.shape}")
    cos_ry = math.hypot(R[2, 1], R[2, 2])
    ry = math.degrees(math.atan2(-R[2, 0], cos_ry))
    rx = math.degrees(math.atan2(R[2, 1], R[2, 2])) if cos_ry > _GIMBAL else 0.0
    Rz = R @ rotation_3d(rx, ry, 0.0).T
    rz = math.degrees(math.atan2(Rz[1, 0], Rz[0, 0]))
    return rx, ry, rz


def decompose_affine_3d(M: Array, center: Sequence[float] | None = None) -> AffineParams3D:
    """Parameters of :func:`build_affine_matrix_3d` that reproduce a 3-D motion ``M``.

    The linear part is factored (QR) as ``L = R U`` with ``R`` a proper rotation and::

        U = Sh S = [[sx, shxy·sy, shxz·sz],
                    [0,  sy,      shyz·sz],
                    [0,  0,       sz     ]]

    upper triangular, ``sx, sy > 0``; a reflection (``det L < 0``) comes out as ``sz < 0``.
    ``R = Rz(rz) Ry(ry) Rx(rx)`` gives the angles (:func:`euler_angles`). The translation
    is that of ``M = T(c + t) L T(-c)``: ``t = b - c + L c`` with ``b = M[:3, 3]``.

    Parameters
    ----------
    M : array_like, shape (4, 4)
        One invertible homogeneous 3-D matrix.
    center : (cx, cy, cz), optional
        The centre the parameters are expressed about; the origin when omitted.

    Returns
    -------
    AffineParams3D
        A dict with ``rx, ry, rz, tx, ty, tz, sx, sy, sz, center, shxy, shxz, shyz``:
        ``build_affine_matrix_3d(**params)`` equals ``M`` to rounding.

    Raises
    ------
    ValueError
        ``M`` is not one valid 4×4 matrix, or it is singular.
    """
    M = _single_invertible("M", M, 3)
    c = np.zeros(3) if center is None else _vector("center", center, 3)
    Q, U = _rotation_times_upper(M[:3, :3])
    rx, ry, rz = euler_angles(Q)
    sx, sy, sz = U[0, 0], U[1, 1], U[2, 2]
    t = _translation_about(M, c)
    return AffineParams3D(
        rx=rx,
        ry=ry,
        rz=rz,
        tx=float(t[0]),
        ty=float(t[1]),
        tz=float(t[2]),
        sx=float(sx),
        sy=float(sy),
        sz=float(sz),
        center=(float(c[0]), float(c[1]), float(c[2])),
        shxy=float(U[0, 1] / sy),
        shxz=float(U[0, 2] / sz),
        shyz=float(U[1, 2] / sz),
    )


def polar_rotation(M: Array) -> np.ndarray:
    """Orthogonal factor ``Q`` of the polar decomposition ``L = Q P`` of the linear part.

    ``P`` is symmetric positive definite and ``Q = U Vᵀ`` from the SVD ``L = U Σ Vᵀ``: the
    orthogonal matrix nearest to ``L`` (Frobenius). ``det Q = sign(det L)``.

    Parameters
    ----------
    M : array_like, shape (..., d+1, d+1)
        Homogeneous matrices (batched).

    Returns
    -------
    numpy.ndarray, shape (..., d, d)
    """
    M = check_matrix("M", M)
    d = M.shape[-1] - 1
    U, _, Vt = np.linalg.svd(M[..., :d, :d])
    return U @ Vt


def _proper_polar(M: Any, d: int | None) -> np.ndarray:
    M = check_matrix("M", M, d)
    if np.any(_singular(M)):
        raise ValueError("M is singular: its rotation part is undefined")
    Q = polar_rotation(M)
    if np.any(np.linalg.det(Q) < 0):
        raise ValueError("M reflects (det < 0): it has no rotation angle")
    return Q


def rotation_angle_2d(M: Array) -> np.ndarray | float:
    """Signed rotation angle (degrees, ``(-180, 180]``) of a 2-D motion's polar rotation.

    The angle of ``Q`` in ``L = Q P`` (:func:`polar_rotation`), positive when it turns
    ``+x`` towards ``+y`` (:func:`rotation_2d`). Unlike ``decompose_affine(M)["theta"]``
    (the QR angle) it does not depend on how shear is attributed; it equals ``θ`` for a
    rotation times an isotropic scale. Handy in tests: ``rotation_angle_2d(A @ invert(B))``
    is the angular error of ``A`` against ``B``.

    Raises
    ------
    ValueError
        ``M`` is singular or reflects.
    """
    Q = _proper_polar(M, 2)
    out = np.degrees(np.arctan2(Q[..., 1, 0], Q[..., 0, 0]))
    return float(out) if out.ndim == 0 else out


def rotation_angle(M: Array) -> np.ndarray | float:
    """Geodesic angle (degrees, ``[0, 180]``) of the polar rotation of a 2-D or 3-D motion.

    For 3-D, ``φ = atan2(|v|, tr Q - 1)`` with ``v = (Q32 - Q23, Q13 - Q31, Q21 - Q12)``
    (``|v| = 2 sin φ``, ``tr Q - 1 = 2 cos φ``), accurate near 0° and 180°; for 2-D,
    ``|rotation_angle_2d(M)|``. ``rotation_angle(A @ invert(B))`` is the angular distance
    between the motions ``A`` and ``B`` (batched).

    Raises
    ------
    ValueError
        ``M`` is singular or reflects.
    """
    M = check_matrix("M", M)
    if M.shape[-1] == 3:
        return np.abs(rotation_angle_2d(M))
    Q = _proper_polar(M, 3)
    v = np.stack(
        [Q[..., 2, 1] - Q[..., 1, 2], Q[..., 0, 2] - Q[..., 2, 0], Q[..., 1, 0] - Q[..., 0, 1]],
        axis=-1,
    )
    trace = np.trace(Q, axis1=-2, axis2=-1)
    out = np.degrees(np.arctan2(np.linalg.norm(v, axis=-1), trace - 1.0))
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------- normalised


def normalization_matrix(shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """Homogeneous map from pixel ``(x, y[, z])`` to torch's normalised coordinates.

    Along an axis of ``n`` samples, pixel index ``i`` goes to

    * ``u = (2i + 1)/n - 1`` with ``align_corners=False`` (pixel *edges* at ±1), or
    * ``u = 2i/(n - 1) - 1`` with ``align_corners=True`` (first/last *centres* at ±1).

    ``u`` is ``x`` normalised by ``W``, ``v`` is ``y`` by ``H``, ``w`` is ``z`` by ``D``.
    Anisotropic when ``H ≠ W``: a rotation in normalised space is not one in pixels.

    Parameters
    ----------
    shape : (H, W) or (D, H, W)
        Array shape in index order.
    align_corners : bool
        As in ``torch.nn.functional.affine_grid`` / ``grid_sample``.

    Returns
    -------
    numpy.ndarray, shape (d+1, d+1)
    """
    align_corners = _check_flag("align_corners", align_corners)
    try:
        d = len(shape)
    except TypeError as exc:
        raise TypeError(f"shape must be a sequence of integers, got {shape!r}") from exc
    if d not in (2, 3):
        raise ValueError(f"shape must be (H, W) or (D, H, W), got {tuple(shape)}")
    dims = _check_shape("shape", shape, d, align_corners)
    n = np.asarray(dims[::-1], dtype=np.float64)  # (W, H[, D]) for (x, y[, z])
    N = np.eye(d + 1)
    if align_corners:
        N[:d, :d] = np.diag(2.0 / (n - 1.0))
        N[:d, d] = -1.0
    else:
        N[:d, :d] = np.diag(2.0 / n)
        N[:d, d] = 1.0 / n - 1.0
    return N


def _normalization_inverse(N: np.ndarray) -> np.ndarray:
    d = N.shape[-1] - 1
    a = np.diag(N)[:d]
    inv = np.eye(d + 1)
    inv[:d, :d] = np.diag(1.0 / a)
    inv[:d, d] = -N[:d, d] / a
    return inv


def _normalizers(
    M: np.ndarray, shape: Sequence[int], align_corners: bool
) -> tuple[np.ndarray, np.ndarray]:
    d = M.shape[-1] - 1
    align_corners = _check_flag("align_corners", align_corners)
    _check_shape("shape", shape, d, align_corners)
    N = normalization_matrix(shape, align_corners)
    return N, _normalization_inverse(N)


def pixel_to_normalized(M: Array, shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """A pixel-space motion expressed in normalised coordinates: ``Mn = N M N⁻¹``.

    ``N`` is :func:`normalization_matrix`; ``Mn`` maps the normalised coordinates of
    ``p`` to those of ``M p``. Exact inverse of :func:`normalized_to_pixel`.

    Parameters
    ----------
    M : array_like, shape (..., d+1, d+1)
        Motions in pixels ``(x, y[, z])`` (batched).
    shape : (H, W) for d = 2, (D, H, W) for d = 3
        The array shape (index order) that defines the normalisation.
    align_corners : bool
        torch's flag (see :func:`normalization_matrix`).

    Returns
    -------
    numpy.ndarray, shape (..., d+1, d+1)
    """
    M = check_matrix("M", M)
    N, N_inv = _normalizers(M, shape, align_corners)
    return N @ M @ N_inv


def normalized_to_pixel(Mn: Array, shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """A normalised-coordinate map expressed in pixels: ``M = N⁻¹ Mn N``.

    Exact inverse of :func:`pixel_to_normalized` (same ``shape`` and ``align_corners``).

    Parameters
    ----------
    Mn : array_like, shape (..., d+1, d+1)
        Maps in torch's normalised ``(x, y[, z])`` coordinates (batched).
    shape : (H, W) for d = 2, (D, H, W) for d = 3
    align_corners : bool

    Returns
    -------
    numpy.ndarray, shape (..., d+1, d+1)
    """
    Mn = check_matrix("Mn", Mn)
    N, N_inv = _normalizers(Mn, shape, align_corners)
    return N_inv @ Mn @ N


def torch_theta(
    M: Array,
    shape: Sequence[int],
    align_corners: bool = False,
    out_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """``theta`` for ``torch.nn.functional.affine_grid`` that warps by the motion ``M``.

    ``affine_grid`` maps *output* normalised coordinates to *input* normalised
    coordinates (a pull), so ``theta`` is the top ``d`` rows of
    ``N_in M⁻¹ N_out⁻¹`` (:func:`normalization_matrix`). Then::

        grid = affine_grid(torch.as_tensor(theta)[None], (1, C, *out_shape), align_corners=ac)
        out = grid_sample(img, grid, align_corners=ac)

    shows at ``M p`` what ``img`` showed at ``p``: the same as
    ``scipy.ndimage.affine_transform(img, *pull_matrix(M), order=1)``.

    Parameters
    ----------
    M : array_like, shape (..., d+1, d+1)
        Forward motions in pixels ``(x, y[, z])`` (batched).
    shape : (H, W) or (D, H, W)
        Shape of the input image (index order).
    align_corners : bool
        The flag passed to both ``affine_grid`` and ``grid_sample``.
    out_shape : (H, W) or (D, H, W), optional
        Shape of the output grid; ``shape`` when omitted. Output pixels share the input's
        pixel frame (pixel ``(0, 0)`` at the same place).

    Returns
    -------
    numpy.ndarray, shape (..., 2, 3) or (..., 3, 4)
        float64; convert with ``torch.as_tensor(theta, dtype=img.dtype)``.
    """
    M = check_matrix("M", M)
    d = M.shape[-1] - 1
    N_in, _ = _normalizers(M, shape, align_corners)
    if out_shape is None:
        N_out_inv = _normalization_inverse(N_in)
    else:
        _check_shape("out_shape", out_shape, d, bool(align_corners))
        N_out_inv = _normalization_inverse(normalization_matrix(out_shape, align_corners))
    pull = N_in @ invert(M) @ N_out_inv
    return np.ascontiguousarray(pull[..., :d, :])
