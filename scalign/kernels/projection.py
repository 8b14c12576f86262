"""Projections of a volume by the Fourier-slice theorem, batched over orientations.

Conventions (:mod:`scalign.kernels.euler`): a volume ``V[z, y, x]`` and its images have
their origin at voxel / pixel ``N // 2`` on every axis (RELION, Xmipp, SPIDER). The
projection at the orientation ``A`` (3×3, volume ``(x, y, z)`` into the projection frame)
and shifted by ``s = (s_x, s_y)`` pixels is

.. math::  I(p) = P(p - s), \\qquad P(x, y) = \\int V(A^T (x, y, z))\\, dz,

so ``I`` shows the particle moved by ``+s`` (RELION's origin offsets). By the central
slice theorem :math:`\\hat P(k) = \\hat V(A^T (k_x, k_y, 0))` with
:math:`\\hat V(\\omega) = \\sum_n V_n e^{-2\\pi i\\, \\omega \\cdot (n - c) / N}` on the
continuous frequencies ``ω`` (cycles per box): the volume's Fourier transform is evaluated
on every slice at once by a type-2 non-uniform FFT (finufft; its ``eps`` is the accuracy
knob), the half-plane of a real image only, then the image is
:math:`I = \\mathrm{IDFT}[\\hat P(k)\\, \\mathrm{CTF}(k)\\, e^{-2\\pi i k\\cdot(c + s)/N}]`.
The non-uniform FFT holds the volume's (upsampled) Fourier transform once per call, so a
batch of orientations costs one transform of the volume.

Two ways to evaluate :math:`\\hat V` on the slices (``method``):

* ``"nufft"`` — finufft's type-2 transform (cufinufft for CuPy volumes, when installed):
  accurate to ``eps``;
* ``"interpolate"`` — RELION's way: the volume, divided by the Fourier transform of the
  trilinear kernel (:math:`\\prod_a \\mathrm{sinc}^2(x_a / N)`, the gridding correction),
  padded :data:`PADDING` times to ``N``, transformed once by an FFT, and its spectrum
  interpolated trilinearly at every slice point: plain array code (NumPy or CuPy, one
  gather per corner), the ``k = 0`` term exact (``Σ V``): 0.7-1.2% relative error at the
  default padding of 2 (measured on blob maps, the sharper the worse; 0.9-1.8% with the
  ``k = 0`` term interpolated too, which biased every mean by ~2%; padding 3 and 4 divide
  the error by about 2 and 4, and without the gridding correction it doubles). CuPy volumes
  use it when cufinufft is not installed (its wheel alone is over 100 MB).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import is_cupy_array

from scalign._array import namespace, to_numpy

Array = Any

#: Default relative accuracy of the non-uniform FFT (finufft's ``eps``).
EPS = 1e-6
#: finufft's upsampling of the volume's grid: 1.25 instead of 2 makes its FFT 4x smaller
#: and, measured on a 128³ map, was 1.3-1.6x faster at the same ``eps`` and more accurate;
#: below ``eps`` 1e-8 it cannot reach the accuracy and 2 is used. So is it where a call has
#: more than DENSE_POINTS points per voxel: then the interpolation at the points, whose
#: kernel is narrower with 2, costs more than the FFT (measured at eps 1e-4, one thread:
#: 75 points per voxel (32³, 3,000 slices) 2x faster with 2, 12 (64³, 1,000 slices)
#: 1.3x, 1.8 (128³, 300 slices) 1.6x slower).
UPSAMPLING = 1.25
DENSE_POINTS = 4.0
#: Padding of the volume before its FFT in the ``"interpolate"`` method (RELION: 2).
PADDING = 2
METHODS = ("auto", "nufft", "interpolate")


def box_center(n: int) -> int:
    """The origin of an ``n``-sized box: ``n // 2`` (RELION, Xmipp, SPIDER)."""
    return n // 2


def half_plane_frequencies(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer frequencies ``(k_y, k_x)`` of ``numpy.fft.rfft2`` of an ``n × n`` image,
    each ``(n, n // 2 + 1)`` (cycles per box)."""
    ky = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    return np.broadcast_to(ky[:, None], (n, kx.size)), np.broadcast_to(kx[None, :], (n, kx.size))


def half_plane_disk(n: int, radius: float) -> np.ndarray:
    """The points of the half plane ``(n, n // 2 + 1)`` within ``radius`` cycles per box
    (a bool mask; every point for an infinite radius)."""
    ky, kx = half_plane_frequencies(n)
    return kx * kx + ky * ky <= radius * radius


def centering_phase(n: int, shifts: Array | None = None, xp=np) -> Array:
    """``exp(-2πi k·(c + s)/n)`` on the half plane: moves the origin from pixel 0 (the
    DFT's) to ``c = n // 2``, and the content by ``s``; ``(B, n, n // 2 + 1)`` or
    ``(n, n // 2 + 1)`` without shifts, complex128 in the namespace ``xp`` (computed there:
    ``B`` shifted phases are as large as the projections' spectra)."""
    ky, kx = half_plane_frequencies(n)
    c = box_center(n)
    if shifts is None:
        return xp.asarray(np.exp(-2j * np.pi * (kx * c + ky * c) / n))
    ky, kx = xp.asarray(ky), xp.asarray(kx)
    s = xp.asarray(shifts, dtype=xp.float64)
    sx, sy = s[:, 0, None, None], s[:, 1, None, None]
    return xp.exp(-2j * np.pi * (kx * (c + sx) + ky * (c + sy)) / n)


def _slice_frequencies(
    n: int, A: np.ndarray, real, radius: float | None = None, xp=np
) -> tuple[np.ndarray, tuple]:
    """The half plane's points within Nyquist (or ``radius`` cycles per box, if smaller; a
    bool ``(n, n // 2 + 1)`` mask) and, for every orientation, their 3-D frequencies
    ``ω = Aᵀ (k_x, k_y, 0)`` in cycles per box, ``(ω_x, ω_y, ω_z)`` each flat
    ``(B * points,)`` in the namespace ``xp``: on the device that uses them (computed on
    the host and copied, they cost a CuPy projection more than the projection itself)."""
    ky, kx = half_plane_frequencies(n)
    inside = half_plane_disk(n, n / 2 if radius is None else min(radius, n / 2))
    fy, fx = (xp.asarray(k[inside].astype(real)) for k in (ky, kx))
    A = xp.asarray(A, dtype=real)
    return inside, tuple(
        (fx * A[:, 0, a, None] + fy * A[:, 1, a, None]).reshape(-1) for a in range(3)
    )


def _nufft_values(volume: Array, w: tuple, eps: float) -> Array:
    r""":math:`\hat V(ω)` by a type-2 non-uniform FFT (finufft, or cufinufft on CuPy)."""
    n = volume.shape[0]
    single = volume.dtype == np.float32
    complex_dtype = np.complex64 if single else np.complex128
    # finufft's modes are indexed from -n/2 (its default ordering): V[n] is mode n - n//2,
    # exactly the transform about the centre c = n // 2; points in radians per voxel
    scale = 2.0 * math.pi / n
    dense = w[0].size > DENSE_POINTS * n**3
    options = {
        "eps": eps,
        "isign": -1,
        "upsampfac": UPSAMPLING if eps >= 1e-8 and not dense else 2.0,
    }
    if is_cupy_array(volume):
        import cufinufft
        import cupy

        wz, wy, wx = (cupy.asarray(c * scale) for c in w[::-1])
        data = cupy.ascontiguousarray(volume.astype(complex_dtype))
        return cufinufft.nufft3d2(wz, wy, wx, data, **options)
    import finufft

    wz, wy, wx = (c * c.dtype.type(scale) for c in w[::-1])
    data = np.ascontiguousarray(volume, dtype=complex_dtype)
    return finufft.nufft3d2(wz, wy, wx, data, nthreads=1, **options)


def padded_spectrum(volume: Array, padding: int = PADDING) -> Array:
    r"""The centred spectrum ``G (N, N, N)``, ``N = padding · n``, of the gridding-corrected
    volume (module docstring): ``G[C + q] = \sum_m V_m / g(m - c) e^{-2πi q·(m - c)/N}``
    with ``C = N // 2``, ``c = n // 2`` and ``g(x) = \prod_a \mathrm{sinc}^2(x_a / N)``, so
    that :math:`\hat V(ω) ≈` the trilinear interpolation of ``G`` at ``C + padding · ω``."""
    xp = namespace(volume)
    n = volume.shape[0]
    N = padding * n
    real = volume.dtype
    x = xp.asarray(np.sinc((np.arange(n) - box_center(n)) / N) ** 2, dtype=real)
    corrected = volume / (x[:, None, None] * x[None, :, None] * x[None, None, :])
    box = xp.zeros((N, N, N), dtype=real)
    start = N // 2 - box_center(n)
    box[start : start + n, start : start + n, start : start + n] = corrected
    return xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(box)))


#: The last volume's padded spectrum: projection matching projects the same volume
#: hundreds of times per chunk, and the (2n)³ FFT (1 GiB for n = 256) would dominate.
_SPECTRUM: dict[tuple, tuple[Array, Array]] = {}


def _spectrum_of(volume: Array, padding: int) -> Array:
    """:func:`padded_spectrum` of ``volume``, reused while the same array object is
    projected again (volumes are never modified in place here)."""
    key = (id(volume), volume.shape, str(volume.dtype), padding)
    hit = _SPECTRUM.get(key)
    if hit is not None and hit[0] is volume:
        return hit[1]
    G = padded_spectrum(volume, padding)
    _SPECTRUM.clear()
    _SPECTRUM[key] = (volume, G)  # holding the volume keeps its id from being reused
    return G


def _interpolated_values(volume: Array, w: tuple, padding: int = PADDING) -> Array:
    r""":math:`\hat V(ω)` by trilinear interpolation of :func:`padded_spectrum`."""
    xp = namespace(volume)
    G = _spectrum_of(volume, padding)
    if is_cupy_array(G):
        from scalign.kernels import projection_cuda

        return projection_cuda.trilinear(G, w, padding, xp.sum(volume))
    N = G.shape[0]
    flat = xp.reshape(G, (-1,))
    # grid coordinates (z, y, x) of every point; |ω| <= n/2 keeps them in [0, N], and the
    # spectrum of a sampled map is periodic, so the corner at N is the corner at 0
    coords = [xp.asarray(c * padding + N // 2) for c in w[::-1]]
    base = [xp.floor(c) for c in coords]
    frac = [c - b for c, b in zip(coords, base, strict=True)]
    index = [xp.astype(b, xp.int64) for b in base]
    out = xp.zeros(coords[0].shape, dtype=G.dtype)
    for corner in np.ndindex(2, 2, 2):
        weight = 1.0
        linear = 0
        for axis, bit in enumerate(corner):
            weight = weight * (frac[axis] if bit else 1.0 - frac[axis])
            linear = linear * N + (index[axis] + bit) % N
        out += xp.astype(weight, G.dtype) * xp.take(flat, linear)
    # ω = 0 (every slice's k = 0) lands exactly on the grid, where the gridding correction
    # (right on average between grid points) overshoots by Σ V (1/g - 1), ~2% of the mean:
    # that term is Σ V itself
    origin = (w[0] == 0) & (w[1] == 0) & (w[2] == 0)
    return xp.where(xp.asarray(origin), xp.astype(xp.sum(volume), G.dtype), out)


def slice_spectra(
    volume: Array,
    A: np.ndarray,
    eps: float = EPS,
    method: str = "auto",
    radius: float | None = None,
) -> Array:
    r""":math:`\hat P(k) = \hat V(A^T (k_x, k_y, 0))` on the half plane of every orientation,
    ``(B, n, n // 2 + 1)`` complex (origin at ``n // 2``, see the module docstring), within
    Nyquist (``|k| <= n / 2``; 0 beyond, where a slice through the cube's corners would
    read aliased content); a CuPy array for a CuPy volume.

    Parameters
    ----------
    volume : (n, n, n) real array ``V[z, y, x]`` (NumPy or CuPy).
    A : (B, 3, 3) rotation matrices (:func:`scalign.kernels.euler.euler_to_matrix`).
    eps : relative accuracy of the non-uniform FFT.
    method : {"auto", "nufft", "interpolate"}
        See the module docstring; ``"auto"`` is ``"nufft"`` except for a CuPy volume
        without cufinufft installed.
    radius : float, optional
        Only frequencies up to this many cycles per box (0 beyond): a low-pass slice at
        the cost of its points.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    xp = namespace(volume)
    n = volume.shape[0]
    real = np.float32 if volume.dtype == np.float32 else np.float64
    inside, w = _slice_frequencies(n, A, real, radius, xp)
    if method == "auto":
        method = "nufft" if not is_cupy_array(volume) or _has_cufinufft() else "interpolate"
    values = _nufft_values(volume, w, eps) if method == "nufft" else _interpolated_values(volume, w)
    B = np.shape(A)[0]
    out = xp.zeros((B, inside.size), dtype=values.dtype)
    # integer indices, not a boolean mask: CuPy counts a mask's entries with a device sync
    out[:, xp.asarray(np.flatnonzero(inside))] = xp.reshape(values, (B, -1))
    return xp.reshape(out, (B, *inside.shape))


def _has_cufinufft() -> bool:
    try:
        import cufinufft  # noqa: F401
    except ImportError:
        return False
    return True


def project(
    volume: Array,
    A: np.ndarray,
    shifts: np.ndarray | None = None,
    ctf: Array | None = None,
    eps: float = EPS,
    method: str = "auto",
) -> Array:
    """Projections ``I (B, n, n)`` of ``volume`` at the orientations ``A`` (module
    docstring), shifted by ``shifts (B, 2)`` pixels ``(x, y)``, limited to the frequencies
    within Nyquist (``|k| <= n / 2``) and multiplied in Fourier space by ``ctf``
    (``(B, n, n // 2 + 1)`` on the half plane, e.g.
    :func:`scalign.kernels.ctf.ctf_half_plane`); in the volume's float dtype, on the
    volume's device (NumPy or CuPy). ``method``: see :func:`slice_spectra`.

    Parameters
    ----------
    volume : (n, n, n) real array ``V[z, y, x]``
        NumPy or CuPy; float32 stays float32, other dtypes are computed in float64.
    A : (B, 3, 3) array
        Rotation matrices (:func:`scalign.kernels.euler.euler_to_matrix`).
    shifts : (B, 2) array, optional
        Shifts ``(x, y)`` in pixels; none by default.
    ctf : (B, n, n // 2 + 1) array, optional
        Multiplies each projection's half-plane spectrum.
    eps : float
        Relative accuracy of the non-uniform FFT (default :data:`EPS`, 1e-6).
    method : {"auto", "nufft", "interpolate"}
        See :func:`slice_spectra`.

    Returns
    -------
    array
        ``(B, n, n)`` projections, float32 or float64 (as ``volume``), NumPy or CuPy.

    Raises
    ------
    ValueError
        An unknown ``method``, a volume that is not cubic, ``A`` not ``(B, 3, 3)`` or
        ``shifts`` not ``(B, 2)``.
    """
    xp = namespace(volume)
    volume = xp.asarray(volume)
    # the transform takes n = shape[0] for every axis: a (16, 16, 15) map was projected
    # off-centre without a word, and one (3, 3) matrix failed deep inside with IndexError
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"volume must be a cubic (n, n, n) array, got shape {volume.shape}")
    if volume.dtype not in (xp.float32, xp.float64):
        volume = xp.astype(volume, xp.float64)
    n = volume.shape[0]
    A = to_numpy(A)
    if A.ndim != 3 or A.shape[1:] != (3, 3):
        raise ValueError(f"A must be (B, 3, 3) rotation matrices, got shape {A.shape}")
    shifts = None if shifts is None else to_numpy(shifts)
    if shifts is not None and shifts.shape != (len(A), 2):
        raise ValueError(f"shifts must be (B, 2) = ({len(A)}, 2) pixels, got shape {shifts.shape}")
    spectra = slice_spectra(volume, A, eps, method)
    spectra *= xp.astype(centering_phase(n, shifts, xp), spectra.dtype)
    if ctf is not None:
        spectra *= xp.asarray(ctf)
    return xp.astype(xp.fft.irfft2(spectra, s=(n, n)), volume.dtype, copy=False)
