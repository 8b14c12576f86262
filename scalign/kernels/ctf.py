"""Contrast transfer function (RELION's model) and Fourier-crop downsampling.

CTF (RELION ``ctf.h``): for a spatial frequency ``u`` (1/Å) at azimuth ``α`` (angle of
``(k_x, k_y)`` from ``x``), with the defoci ``ΔU, ΔV`` (Å, positive = underfocus) and the
astigmatism angle ``α_ast`` (degrees),

.. math::
    \\Delta f(\\alpha) = \\tfrac12 (\\Delta U + \\Delta V)
                       + \\tfrac12 (\\Delta U - \\Delta V) \\cos 2(\\alpha - \\alpha_{ast}),

    \\chi(u) = \\pi \\lambda \\Delta f u^2 - \\tfrac{\\pi}{2} C_s \\lambda^3 u^4
               + \\varphi + \\arctan\\frac{w}{\\sqrt{1 - w^2}}, \\qquad
    \\mathrm{CTF}(u) = \\sin \\chi(u)

with the relativistic electron wavelength ``λ = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))``
Å (``V`` in volts), ``C_s`` in Å (mm × 1e7), the amplitude contrast ``w`` and a phase
shift ``φ`` (phase plates). (RELION writes ``-sin(-χ)`` with a negated ``Δf``: the same
function; at ``u = 0`` it is ``+w``, so density keeps its sign.) RELION's per-particle
envelope and scale multiply it: ``s · exp(-B u² / 4) · sin χ(u)``, with the B-factor
``B`` in Å² (``rlnCtfBfactor``) and ``s`` the ``rlnCtfScalefactor``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from scalign._array import namespace
from scalign.kernels.projection import box_center, half_plane_frequencies


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å at an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_half_plane(
    n: int,
    pixel_size: float,
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    defocus_angle: ArrayLike,
    *,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift: ArrayLike = 0.0,
    bfactor: ArrayLike = 0.0,
    scale: ArrayLike = 1.0,
) -> np.ndarray:
    """The CTF (module docstring) on the half plane of ``numpy.fft.rfft2`` of ``n × n``
    images, one per defocus triple: ``(B, n, n // 2 + 1)``.

    Parameters
    ----------
    n : box size (pixels); pixel_size : Å per pixel.
    defocus_u, defocus_v : (B,) Å; defocus_angle : (B,) degrees.
    voltage : kV; cs : mm; amplitude_contrast : fraction in [0, 1).
    phase_shift : degrees; bfactor : Å²; scale : the envelope's factor. Each a number or
        one per image, (B,).

    Returns
    -------
    numpy.ndarray
        float64 ``(B, n, n // 2 + 1)`` (``B = 1`` for scalar defoci), in the layout of
        ``numpy.fft.rfft2`` (unshifted).

    Raises
    ------
    ValueError
        A non-positive ``pixel_size`` or ``voltage``, a non-finite constant, an
        ``amplitude_contrast`` outside [0, 1), or per-image values of different lengths.
    """
    check_ctf_constants(pixel_size, voltage, cs, amplitude_contrast)
    values = {
        "defocus_u": defocus_u,
        "defocus_v": defocus_v,
        "defocus_angle": defocus_angle,
        "phase_shift": phase_shift,
        "bfactor": bfactor,
        "scale": scale,
    }
    values = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in values.items()}
    lengths = {k: v.shape for k, v in values.items() if v.shape != (1,)}
    if len(set(lengths.values())) > 1 or any(len(shape) != 1 for shape in lengths.values()):
        # numpy's broadcasting error named none of them
        raise ValueError(
            f"the per-image CTF values must be numbers or (B,) arrays of one B: {lengths}"
        )
    # one (B, 1, 1) array each: numbers stand for every image
    du, dv, da, phase, b, s = (v[:, None, None] for v in np.broadcast_arrays(*values.values()))
    da = np.radians(da)
    lam = electron_wavelength(voltage)
    ky, kx = half_plane_frequencies(n)
    fx, fy = kx / (n * pixel_size), ky / (n * pixel_size)
    u2 = fx * fx + fy * fy
    azimuth = np.arctan2(fy, fx)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2.0 * (azimuth[None] - da))
    w = amplitude_contrast
    chi = (
        math.pi * lam * defocus * u2
        - 0.5 * math.pi * cs * 1e7 * lam**3 * u2 * u2
        + np.radians(phase)
        + math.atan(w / math.sqrt(1.0 - w * w))
    )
    return s * np.exp(-0.25 * b * u2) * np.sin(chi)


def check_ctf_constants(
    pixel_size: float, voltage: float, cs: float, amplitude_contrast: float
) -> None:
    """Raise ``ValueError`` naming the constant that no microscope has: a pixel size or
    voltage that is not positive, a non-finite Cs, an amplitude contrast outside [0, 1)
    (a percentage passed as 10 rather than 0.1, say)."""
    for name, value in (("pixel_size", pixel_size), ("voltage", voltage), ("cs", cs)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if pixel_size <= 0:
        raise ValueError(f"pixel_size must be positive (Å/px), got {pixel_size}")
    if voltage <= 0:
        raise ValueError(f"voltage must be positive (kV), got {voltage}")
    if not 0 <= amplitude_contrast < 1:
        raise ValueError(
            f"amplitude_contrast must be a fraction in [0, 1), got {amplitude_contrast}"
        )


def fourier_crop(images: np.ndarray, size: int) -> np.ndarray:
    """Downsample ``(..., n, n)`` images to ``size × size`` (``size <= n``) by Fourier
    cropping: the frequencies ``|k| < size / 2`` on each axis are kept (the small grid's
    Nyquist term is zeroed), about the box centre (``n // 2`` maps to ``size // 2``), and
    the mean value is kept. The pixel size grows by ``n / size``. NumPy or CuPy.

    Parameters
    ----------
    images : (..., n, n) array
        Square images, NumPy or CuPy; leading axes are a batch.
    size : int
        The new box size, ``<= n`` (not checked).

    Returns
    -------
    array
        ``(..., size, size)`` in the input's array library and floating dtype (float64 for
        other dtypes); the input itself when ``size == n``.
    """
    return _crop(images, size, 2)


def fourier_crop_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """:func:`fourier_crop` of ``(..., n, n, n)`` volumes.

    Parameters
    ----------
    volume : (..., n, n, n) array
        Cubic volumes, NumPy or CuPy; leading axes are a batch.
    size : int
        The new box size, ``<= n`` (not checked).

    Returns
    -------
    array
        ``(..., size, size, size)`` in the input's array library and floating dtype
        (float64 for other dtypes); the input itself when ``size == n``.
    """
    return _crop(volume, size, 3)


def _crop(x: np.ndarray, size: int, d: int) -> np.ndarray:
    xp = namespace(x)
    n = x.shape[-1]
    if size == n:
        return x
    axes = tuple(range(-d, 0))
    spec = xp.fft.fftn(x, axes=axes)
    kk = np.fft.fftfreq(size) * size
    # about the centres: multiply by exp(+2πi k c/n), take the small grid's frequencies,
    # multiply by exp(-2πi k c'/size)
    factor = xp.asarray(
        np.where(
            np.abs(kk) < size / 2,
            np.exp(2j * np.pi * kk * (box_center(n) / n - box_center(size) / size)),
            0.0,
        )
    )
    index = xp.asarray(np.round(kk).astype(np.int64) % n)
    for a in axes:
        shape = [1] * x.ndim
        shape[a] = size
        spec = xp.take(spec, index, axis=a % x.ndim) * xp.reshape(factor, shape)
    out = xp.real(xp.fft.ifftn(spec, axes=axes)) * (size / n) ** d
    return xp.astype(out, x.dtype if x.dtype.kind == "f" else xp.float64, copy=False)
