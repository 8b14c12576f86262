"""Synthetic cryo-EM data with a known truth: volumes of Gaussian blobs, whose
projections are exact in closed form, and particle images at known orientations.

A blob volume is :math:`V(r) = \\sum_j a_j \\exp(-\\lVert r - \\mu_j\\rVert^2 / 2\\sigma^2)`
(``r`` in voxels about the box centre ``n // 2``); its projection at the orientation ``A``
(:mod:`scalign.kernels.euler`) is the sum of 2-D Gaussians
:math:`P(q) = \\sum_j a_j \\sqrt{2\\pi}\\,\\sigma \\exp(-\\lVert q - (A\\mu_j)_{xy}\\rVert^2 /
2\\sigma^2)`, exact for the continuous volume and, for ``σ`` of about 1.5 voxels or more,
equal to the sampled volume's Fourier-slice projection to ~1e-5.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import xarray as xr

from scalign.images import make_stack
from scalign.kernels.ctf import ctf_half_plane
from scalign.kernels.euler import euler_to_matrix
from scalign.kernels.projection import box_center
from scalign.validation import check_flag


class Blobs(NamedTuple):
    """Gaussian blobs: centres ``(J, 3)`` in voxels ``(x, y, z)`` about the box centre,
    a common width ``sigma`` (voxels) and amplitudes ``(J,)``."""

    centers: np.ndarray
    sigma: float
    amplitudes: np.ndarray


def random_blobs(
    n_blobs: int = 12, radius: float = 8.0, sigma: float = 1.8, seed: int = 0
) -> Blobs:
    """Blobs at random places within ``radius`` voxels of the centre, amplitudes 0.5-1.5.

    Parameters
    ----------
    n_blobs : int
        Number of blobs ``J``.
    radius : float
        Largest distance of a centre from the box centre, voxels (the distances are drawn
        in ``[0.2^(1/3), 1] × radius``, in random directions).
    sigma : float
        The blobs' common width, voxels.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    Blobs
        ``centers (J, 3)``, ``sigma`` and ``amplitudes (J,)``, float64.
    """
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n_blobs, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    centers = d * radius * rng.uniform(0.2, 1.0, (n_blobs, 1)) ** (1 / 3)
    return Blobs(centers, sigma, rng.uniform(0.5, 1.5, n_blobs))


def blob_volume(blobs: Blobs, size: int, dtype=np.float32) -> np.ndarray:
    """The blobs sampled on a ``size³`` grid ``V[z, y, x]``, origin at ``size // 2``.

    Parameters
    ----------
    blobs : Blobs
        From :func:`random_blobs`.
    size : int
        Box size, voxels.
    dtype : numpy dtype
        Of the result (computed in float64; default float32).

    Returns
    -------
    numpy.ndarray
        ``(size, size, size)`` in ``dtype``.
    """
    z, y, x = np.indices((size,) * 3, dtype=np.float64) - box_center(size)
    V = np.zeros((size,) * 3)
    for (cx, cy, cz), a in zip(blobs.centers, blobs.amplitudes, strict=True):
        V += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * blobs.sigma**2))
    return V.astype(dtype)


def blob_projections(
    blobs: Blobs, size: int, A: np.ndarray, shifts: np.ndarray | None = None
) -> np.ndarray:
    """Exact projections ``(B, size, size)`` at orientations ``A (B, 3, 3)``, moved by
    ``shifts (B, 2)`` pixels (module docstring).

    Parameters
    ----------
    blobs : Blobs
        From :func:`random_blobs`.
    size : int
        Box size, pixels.
    A : (B, 3, 3) array
        Orientations (:func:`scalign.euler_to_matrix`).
    shifts : (B, 2) array, optional
        Shifts ``(x, y)`` in pixels; none by default.

    Returns
    -------
    numpy.ndarray
        float64 ``(B, size, size)``.
    """
    A = np.asarray(A, dtype=np.float64)
    q = np.einsum("bij,kj->bki", A, blobs.centers)[..., :2]  # (B, J, 2): x, y
    if shifts is not None:
        q = q + np.asarray(shifts, dtype=np.float64)[:, None, :]
    y, x = np.indices((size, size), dtype=np.float64) - box_center(size)
    s2 = 2 * blobs.sigma**2
    out = np.zeros((A.shape[0], size, size))
    # one blob at a time: (B, size, size) temporaries, not (B, J, size, size)
    for j, a in enumerate(blobs.amplitudes * np.sqrt(2 * np.pi) * blobs.sigma):
        dx = x[None] - q[:, j, 0, None, None]
        dy = y[None] - q[:, j, 1, None, None]
        out += a * np.exp(-(dx * dx + dy * dy) / s2)
    return out


class Particles(NamedTuple):
    """:func:`simulate_particles`: the stack and its truth."""

    stack: xr.Dataset  # images (image, y, x) + angles, shifts, CTF variables and attrs
    A: np.ndarray  # (B, 3, 3) true orientations


def simulate_particles(
    blobs: Blobs,
    size: int,
    n_images: int,
    *,
    noise: float = 0.0,
    max_shift: float = 0.0,
    ctf: bool = False,
    pixel_size: float = 3.0,
    defocus_range: tuple[float, float] = (8000.0, 20000.0),
    seed: int = 0,
    chunks: int | None = None,
) -> Particles:
    """Particle images of a blob volume at uniformly random orientations.

    Each image is the exact projection, moved by a random shift (uniform in
    ``[-max_shift, max_shift]`` per axis), multiplied by a random astigmatic CTF when
    ``ctf`` (defocus U/V in ``defocus_range`` Å, 300 kV, Cs 2.7 mm, amplitude contrast
    0.1), plus white Gaussian noise of standard deviation ``noise`` times the clean
    images' standard deviation. The stack carries the true ``rot, tilt, psi, shift_x,
    shift_y`` (and ``defocus_u, defocus_v, defocus_angle`` with the CTF attrs).

    Parameters
    ----------
    blobs : Blobs
        From :func:`random_blobs`.
    size : int
        Box size, pixels.
    n_images : int
        Number of particle images ``B``.
    noise : float
        Noise standard deviation relative to the clean images' (0: no noise).
    max_shift : float
        Largest shift per axis, pixels.
    ctf : bool
        Apply a random CTF to each image.
    pixel_size : float
        Å per pixel (the stack's ``pixel_size`` attr, and the CTF's).
    defocus_range : (float, float)
        Range of defocus U, Å (V is U minus up to 500 Å; the angle is in [-90, 90]°).
    seed : int
        Seed of ``numpy.random.default_rng``.
    chunks : int, optional
        Images per chunk (:func:`scalign.make_stack`).

    Returns
    -------
    Particles
        ``stack``: ``images (image, y, x)`` float32 with the float64 truth variables over
        ``image`` and attrs ``pixel_size`` (and ``voltage``, ``cs``,
        ``amplitude_contrast`` with ``ctf``); ``A``: the true orientations ``(B, 3, 3)``.
    """
    check_flag("ctf", ctf)  # ctf="no" would count as true
    rng = np.random.default_rng(seed)
    # uniform rotations: the viewing direction uniform on the sphere, psi uniform
    rot = rng.uniform(-180, 180, n_images)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n_images)))
    psi = rng.uniform(-180, 180, n_images)
    A = euler_to_matrix(rot, tilt, psi)
    shifts = rng.uniform(-max_shift, max_shift, (n_images, 2))
    clean = blob_projections(blobs, size, A, shifts)
    data = {
        "rot": ("image", rot),
        "tilt": ("image", tilt),
        "psi": ("image", psi),
        "shift_x": ("image", shifts[:, 0]),
        "shift_y": ("image", shifts[:, 1]),
    }
    attrs = {"pixel_size": pixel_size}
    if ctf:
        du = rng.uniform(*defocus_range, n_images)
        dv = du - rng.uniform(0, 500, n_images)
        angle = rng.uniform(-90, 90, n_images)
        H = ctf_half_plane(size, pixel_size, du, dv, angle)
        # a real, even filter: the same about the box centre as about pixel 0
        clean = np.fft.irfft2(np.fft.rfft2(clean) * H, s=(size, size))
        data |= {
            "defocus_u": ("image", du),
            "defocus_v": ("image", dv),
            "defocus_angle": ("image", angle),
        }
        attrs |= {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}
    images = clean + noise * clean.std() * rng.normal(size=clean.shape)
    stack = make_stack(images.astype(np.float32), chunks=chunks, attrs=attrs)
    return Particles(stack.assign(data), A)
