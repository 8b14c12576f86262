"""ZYZ Euler angles of cryo-EM metadata (RELION / Xmipp) and their rotation matrices.

Convention (RELION's ``Euler_angles2matrix``, Xmipp's ``Euler_angles2matrix``): the angles
``(rot, tilt, psi)`` in degrees give the matrix

.. math::  A = R_z(\\psi)\\, R_y(\\theta)\\, R_z(\\varphi), \\qquad
           R_z(a) = \\begin{pmatrix} \\cos a & \\sin a & 0 \\\\ -\\sin a & \\cos a & 0 \\\\
           0 & 0 & 1 \\end{pmatrix},\\;
           R_y(a) = \\begin{pmatrix} \\cos a & 0 & -\\sin a \\\\ 0 & 1 & 0 \\\\
           \\sin a & 0 & \\cos a \\end{pmatrix}

(``φ = rot``, ``θ = tilt``, ``ψ = psi``; passive, "rotate the axes" matrices). ``A`` takes
the volume's coordinates ``(x, y, z)`` into the projection frame: the projection of a
volume ``V`` at ``(rot, tilt, psi)`` is ``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz``, and its Fourier
transform is the central slice ``P̂(k) = V̂(Aᵀ (k_x, k_y, 0))``. The viewing direction (the
projection axis in the volume's frame) is ``Aᵀ e_z = (cos rot sin tilt, sin rot sin tilt,
cos tilt)``. In scipy's terms ``A = Rotation.from_euler("ZYZ", [rot, tilt, psi],
degrees=True).as_matrix().T``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

Array = Any


def euler_to_matrix(rot: ArrayLike, tilt: ArrayLike, psi: ArrayLike) -> np.ndarray:
    """Matrices ``A (..., 3, 3)`` of ZYZ Euler angles in degrees (module docstring).

    The angles broadcast against each other; each may be a scalar or an array.

    Parameters
    ----------
    rot, tilt, psi : float or array_like
        ZYZ Euler angles, degrees.

    Returns
    -------
    numpy.ndarray
        float64 ``(..., 3, 3)`` over the angles' broadcast shape (``(3, 3)`` for scalars).
    """
    a, b, g = (np.radians(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty(a.shape + (3, 3))
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def matrix_to_euler(A: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ZYZ angles ``(rot, tilt, psi)`` in degrees of rotation matrices ``A (..., 3, 3)``.

    ``tilt`` is in ``[0, 180]``, ``rot`` and ``psi`` in ``(-180, 180]``. At ``tilt = 0`` or
    ``180`` only ``rot ± psi`` is defined: ``rot`` is then set to 0. The round trip
    ``euler_to_matrix(*matrix_to_euler(A)) == A`` holds to rounding for every rotation.

    Parameters
    ----------
    A : array_like, shape ``(..., 3, 3)``
        Rotation matrices (not checked to be orthogonal).

    Returns
    -------
    rot, tilt, psi : numpy.ndarray
        float64 angles in degrees over ``A``'s batch shape (NumPy scalars for one matrix).

    Raises
    ------
    ValueError
        ``A`` is not ``(..., 3, 3)``.
    """
    A = np.asarray(A, dtype=np.float64)
    if A.shape[-2:] != (3, 3):
        raise ValueError(f"A must have shape (..., 3, 3), got {A.shape}")
    sb = np.sqrt(A[..., 2, 0] ** 2 + A[..., 2, 1] ** 2)
    # atan2, not arccos(A_22): cos is flat near 0 and 180, where arccos lost the tilt
    # (1e-7° came back as 0, the matrix 1.7e-9 off)
    tilt = np.arctan2(sb, A[..., 2, 2])
    regular = sb > 1e-9
    rot = np.where(regular, np.arctan2(A[..., 2, 1], A[..., 2, 0]), 0.0)
    psi = np.where(
        regular,
        np.arctan2(A[..., 1, 2], -A[..., 0, 2]),
        # A = Rz(psi ± rot) (tilt 0) or diag(-1, 1, -1)-like (tilt 180): rot = 0 leaves psi
        np.arctan2(-A[..., 1, 0], A[..., 1, 1]) * np.where(A[..., 2, 2] > 0, 1.0, -1.0),
    )
    return np.degrees(rot), np.degrees(tilt), np.degrees(psi)


def viewing_direction(rot: ArrayLike, tilt: ArrayLike) -> np.ndarray:
    """Unit projection directions ``Aᵀ e_z`` in the volume's ``(x, y, z)``, ``(..., 3)``."""
    a, b = np.radians(np.asarray(rot, dtype=np.float64)), np.radians(np.asarray(tilt, float))
    a, b = np.broadcast_arrays(a, b)
    return np.stack([np.cos(a) * np.sin(b), np.sin(a) * np.sin(b), np.cos(b)], axis=-1)
