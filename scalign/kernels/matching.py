"""Projection matching: the orientation and shift of each image against one volume.

1. **Global search** over a gallery of projections at the orientations of a grid (every
   ``step`` degrees over the asymmetric unit, with in-plane angles): for each image and
   gallery projection the cross-correlation over all shifts up to ``max_shift`` pixels is
   one FFT product, :math:`c(s) = \\mathrm{IDFT}[\\hat I\\, \\mathrm{CTF}\\, \\overline{\\hat
   P}](s) / (\\lVert I \\rVert \\lVert P \\rVert)` (the CTF, when given, filters the image
   side: :math:`\\sum \\hat I \\overline{\\mathrm{CTF}\\, \\hat P} = \\sum \\mathrm{CTF}\\,
   \\hat I\\, \\overline{\\hat P}` as the CTF is real); the best gallery entry and its
   integer shift start the refinement (the ``candidates`` best entries, each refined).
   The search compares images and projections low-passed to the band its grid can tell
   apart (:func:`_search_radius`: ~11 cycles per box at a 15° step), which makes it
   cheaper (fewer points in every product and every gallery projection) and no worse:
   beyond that band a projection and its grid neighbours no longer correlate, and only
   noise is compared there.
   When ``max_shift`` is small (the usual case: images are centred to a few pixels) the
   correlation is evaluated only at the integer shifts that can matter, as one real
   matrix product over the whole gallery block (:func:`_shift_grid`), instead of an
   inverse FFT per image and projection: the same numbers, several times faster.
2. **Local refinement** of the three angles and two shifts: pattern search over small
   rotations ``R_a(±δ) A`` about the projection frame's ``x``, ``y``, ``z`` axes (no Euler
   singularity at ``tilt = 0``), each candidate's shift from its cross-correlation peak
   (parabolic sub-pixel refinement within one pixel of the peak), plus the optimum of the
   last round's quadratic model of the score (a parabola per axis through its probes:
   :func:`_model_optimum`); ``δ`` starts at half the grid step and halves whenever no
   candidate improves or a model optimum that its probes bracketed wins, down to
   ``final_step`` (about 9 rounds instead of the 17 of the probes alone, at the same
   scores and orientations). The
   shift's sub-pixel optimum is found by Newton steps on the correlation's trigonometric
   interpolant, whose value, gradient and Hessian are six bilinear forms of its spectrum
   (:func:`_newton_shift`). An image's candidates that come within the step of each other
   search the same basin: only the better one goes on.

All projections of one call share one non-uniform FFT of the volume per batch
(:func:`scalign.kernels.projection.slice_spectra`). With a CuPy volume and CuPy images the
projections, FFTs and correlation peaks are computed on the GPU; the bookkeeping of the
search (orientations, candidates, steps: a few numbers per image) stays on the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import scipy.fft

from scalign._array import clamp, namespace, to_numpy
from scalign.kernels.projection import (
    centering_phase,
    half_plane_disk,
    half_plane_frequencies,
    slice_spectra,
)

# Gallery projections per cross-correlation block.
_GALLERY_BLOCK = 256
# Peak bytes of the temporaries per image and projection, in units of n², of a global
# search step and of a refinement step (the projections' maps, the products with the
# images' spectra, the correlation maps; the refinement adds the candidates' spectra,
# their CTF products and the Newton step's terms). Measured with tracemalloc: 12.5-16
# and 45-50 (+8 for the spectra) at n = 64 and 128.
_SEARCH_BYTES = 16
_REFINE_BYTES = 56
# At most this many bytes of such temporaries at once: the images (and the refinement's
# candidates) are taken in sub-batches under it, so a chunk's memory does not grow with
# its number of images. 2,048 images of 64² in one chunk went past 24 GB without it and
# stay at 1.3 GB with it; 96 images: 1.67 -> 1.14 GB, the same results and time.
_CORRELATION_BUDGET = 2**30
# The global search compares the images low-passed to the band its grid can tell apart:
# a projection and its neighbour on the grid (up to ~0.8 step away) correlate at
# frequencies up to ~1 / (radius × step) and not beyond, so higher ones only add noise and
# cost (points of every product, and of every gallery projection). SEARCH_BAND sets the
# band's edge at that many radians per cycle of the step. Measured on 100 CTF images of
# 64² (noise 0.3 and 1.0; steps 10°, 15°, 25°) and 60 of 128²: the same orientations as
# the whole band, to the last digit, except at 25° where the whole band lost one image
# (153° off) and the band none; 1.5-1.9x faster. 2 and 1.5 lost accuracy at 32².
_SEARCH_BAND = 3.0
_SEARCH_MIN_RADIUS = 8.0
# The direct search's projections moved by every shift are made this many bytes at a
# time: the matrix product then reads them from cache-sized blocks of fresh memory.
_MOVED_BUDGET = 2**25


def _parts(count: int, item_bytes: int, budget: int | None = None) -> list[slice]:
    """Consecutive slices of ``count`` items, each under ``budget`` bytes (default
    :data:`_CORRELATION_BUDGET`)."""
    budget = _CORRELATION_BUDGET if budget is None else budget
    step = max(1, budget // max(1, item_bytes))
    return [slice(lo, min(lo + step, count)) for lo in range(0, count, step)]


def _axis_rotations(axis: int, angles: np.ndarray) -> np.ndarray:
    """Active rotations ``(B, 3, 3)`` by ``angles`` (degrees) about coordinate axis ``axis``
    (0 x, 1 y, 2 z)."""
    c, s = np.cos(np.radians(angles)), np.sin(np.radians(angles))
    i, j = [a for a in range(3) if a != axis]
    R = np.broadcast_to(np.eye(3), angles.shape + (3, 3)).copy()
    R[..., i, i], R[..., i, j], R[..., j, i], R[..., j, j] = c, -s, s, c
    return R


class Match(NamedTuple):
    """Result of :func:`match_images`: per image, the orientation and shift found."""

    A: np.ndarray  # (B, 3, 3) orientation matrices
    shifts: np.ndarray  # (B, 2) (x, y) pixels: the image is the projection moved by these
    score: np.ndarray  # (B,) normalised cross-correlation at the optimum
    iterations: np.ndarray  # (B,) refinement rounds


def _image_spectra(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-plane spectra of the mean-subtracted images and their norms."""
    xp = namespace(images)
    x = images - xp.mean(images, axis=(-2, -1), keepdims=True)
    return xp.fft.rfft2(x), xp.sqrt(xp.sum(x * x, axis=(-2, -1)))


def _half_plane_weights(n: int) -> np.ndarray:
    """``w_k / n²`` on the half plane ``(n, n // 2 + 1)``, ``w_k`` = 2 for the columns that
    stand for a conjugate pair too and 1 for the DC and (``n`` even) Nyquist columns: the
    inverse real DFT is :math:`c(s) = \\sum_k w_k \\mathrm{Re}(G_k e^{2\\pi i k \\cdot s
    / n}) / n^2` and Parseval :math:`\\sum_p c(p)^2 = \\sum_k w_k |G_k|^2 / n^2` (for
    spectra that are Hermitian along those two columns, as real images' are)."""
    w = np.full(n // 2 + 1, 2.0)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return np.broadcast_to(w / (n * n), (n, w.size))


def _power(S: np.ndarray) -> np.ndarray:
    """:math:`|S|^2` of half-plane spectra ``S (..., n, m)`` as the inverse real DFT sees
    them: on the columns that stand for themselves only (``kx = 0`` and, ``n`` even,
    ``n / 2``) a real image's spectrum is Hermitian, :math:`S(-k_y) = \\overline{S(k_y)}`,
    and the real image is that of their Hermitian part. A projection's slice is not, there:
    its lone Nyquist entries (``k_y = -n / 2``; ``k_x = n / 2, k_y = 0``) are complex, and
    their imaginary parts in the norms lowered the normalised scores (an exact projection
    of a white-noise volume at n = 32 scored 1 - 1.1e-3)."""
    xp = namespace(S)
    power = xp.real(S * xp.conj(S))
    n = S.shape[-2]
    for col in (0, n // 2) if n % 2 == 0 else (0,):
        C = S[..., col]
        H = 0.5 * (C + xp.conj(xp.roll(xp.flip(C, axis=-1), 1, axis=-1)))
        power[..., col] = xp.real(H * xp.conj(H))
    return power


def _spectrum_norms(S: np.ndarray) -> np.ndarray:
    """Norms of the real images whose half-plane spectra are ``S (..., n, m)`` (Parseval,
    on :func:`_power`)."""
    xp = namespace(S)
    w = xp.asarray(_half_plane_weights(S.shape[-2]), dtype=np.finfo(S.dtype).dtype)
    return xp.sqrt(xp.sum(w * _power(S), axis=(-2, -1)))


def _real_view(S: np.ndarray) -> np.ndarray:
    """A C-contiguous complex array ``(..., n, m)`` seen as reals ``(..., 2 n m)``, real and
    imaginary parts interleaved: the dot product of two such rows is
    :math:`\\mathrm{Re} \\sum_k a_k \\bar b_k`."""
    return _real_rows(S).reshape(S.shape[:-2] + (-1,))


def _real_rows(S: np.ndarray) -> np.ndarray:
    """A complex array ``(..., K)`` seen as reals ``(..., 2 K)``, real and imaginary parts
    interleaved (a C-ordered copy first if it is not: a broadcast product may come out in
    its inputs' order)."""
    if not S.flags.c_contiguous:
        S = S.copy(order="C")
    return S.view(np.finfo(S.dtype).dtype)


class _ShiftGrid(NamedTuple):
    """Integer shifts at which correlations are evaluated directly (:func:`_shift_grid`)."""

    shifts: np.ndarray  # (S, 2) (x, y) pixels
    allowed: np.ndarray  # (S,) indices of the shifts within max_shift
    neighbours: np.ndarray  # (S, 4) indices of (x - 1, x + 1, y - 1, y + 1); -1 outside


# Direct evaluation costs ~0.11 ns per shift and spectrum point (a matrix product near the
# core's peak), an inverse FFT per pair ~2.5 ns × n² log2(n) (with the product spectrum
# and the window's peak). Measured on one core (OpenBLAS, scipy's pocketfft; 100-200
# images against 256 CTF-filtered projections in the band of a 15° step), µs per pair,
# direct vs FFT: 32², 245 shifts: 5.2 vs 15; 64², 889 shifts: 21 vs 50-77; 128², 3,393
# shifts: 230 vs 200-300. Direct it is while shifts × points <= DIRECT_COST n² log2(n).
_DIRECT_COST = 20.0


def _shift_grid(
    n: int, max_shift: float, square: bool = False, radius: float | None = None
) -> _ShiftGrid | None:
    """The integer shifts within ``max_shift`` and their four neighbours (the sub-pixel
    parabola's), or None when they would wrap around the box or cost more than an inverse
    FFT per pair (:data:`_DIRECT_COST`, for spectra within ``radius`` cycles per box,
    default Nyquist). With ``square``, every shift of the square around them, in row-major
    order (a window cut from such an inverse FFT), however many."""
    r = int(np.floor(max_shift)) + 1
    if 2 * r >= n:
        return None
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    within = x**2 + y**2 <= max_shift**2
    near = within.copy()
    near[:, 1:] |= within[:, :-1]
    near[:, :-1] |= within[:, 1:]
    near[1:, :] |= within[:-1, :]
    near[:-1, :] |= within[1:, :]
    if square:
        near[:] = True
    elif near.sum() * _band_points(n, radius) > _DIRECT_COST * n * n * np.log2(n):
        return None
    index = np.full(near.shape, -1)
    index[near] = np.arange(near.sum())
    padded = np.pad(index, 1, constant_values=-1)
    rows, cols = np.nonzero(near)
    neighbours = np.stack(
        [
            padded[rows + 1, cols],
            padded[rows + 1, cols + 2],
            padded[rows, cols + 1],
            padded[rows + 2, cols + 1],
        ],
        axis=1,
    )
    return _ShiftGrid(np.stack([x[near], y[near]], axis=1).astype(float), index[within], neighbours)


def _band_points(n: int, radius: float | None) -> int:
    """Points of the half plane within ``radius`` cycles per box (and Nyquist)."""
    return int(
        np.count_nonzero(half_plane_disk(n, n / 2 if radius is None else min(radius, n / 2)))
    )


def _shift_phases(n: int, shifts: np.ndarray) -> np.ndarray:
    """:math:`e^{2\\pi i k \\cdot s / n}` on the half plane, ``(S, n, n // 2 + 1)``."""
    ky, kx = half_plane_frequencies(n)
    sx, sy = shifts[:, 0, None, None], shifts[:, 1, None, None]
    return np.exp(2j * np.pi * (kx * sx + ky * sy) / n)


def _grid_peak(c: np.ndarray, grid: _ShiftGrid) -> tuple[np.ndarray, np.ndarray]:
    """Best shift (x, y) of correlations ``c (..., S)`` sampled on ``grid`` and its value,
    refined by the parabola through the peak and its neighbours along each axis (as
    :func:`_peak`)."""
    xp = namespace(c)
    allowed = xp.asarray(grid.allowed)
    j = allowed[xp.argmax(c[..., allowed], axis=-1)]
    best = xp.take_along_axis(c, j[..., None], axis=-1)[..., 0]
    shift = xp.asarray(grid.shifts)[j]
    neighbours = xp.asarray(grid.neighbours)[j]
    for axis in range(2):
        vm = xp.take_along_axis(c, neighbours[..., 2 * axis, None], axis=-1)[..., 0]
        vp = xp.take_along_axis(c, neighbours[..., 2 * axis + 1, None], axis=-1)[..., 0]
        den = vm - 2.0 * best + vp
        frac = xp.where(den < 0, 0.5 * (vm - vp) / xp.where(den < 0, den, -1.0), 0.0)
        shift[..., axis] += clamp(frac, -0.5, 0.5)
    return shift, best


def _irfft2(G: np.ndarray, n: int) -> np.ndarray:
    """Inverse real DFT of half-plane spectra ``(..., n, m)``: :mod:`scipy.fft` for NumPy
    arrays (1.6x numpy.fft's speed at 32² and 128² here), CuPy's for CuPy arrays."""
    if isinstance(G, np.ndarray):
        return scipy.fft.irfft2(G, s=(n, n), workers=1)
    return namespace(G).fft.irfft2(G, s=(n, n))


def _peak(cc: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Best shift (x, y) within ``max_shift`` of cross-correlations ``(..., n, n)`` (DFT
    order: index ``j`` is the shift ``j`` or ``j - n``), refined by a parabola through the
    peak and its neighbours along each axis, and the peak value. Only the window of the
    shifts that can matter is read (:func:`_grid_peak`), unless it wraps around the box."""
    xp = namespace(cc)
    n = cc.shape[-1]
    window = _shift_grid(n, max_shift, square=True)
    if window is not None:
        rows = xp.asarray(np.unique(window.shifts[:, 1]).astype(int) % n)
        cols = xp.asarray(np.unique(window.shifts[:, 0]).astype(int) % n)
        cut = cc[..., rows[:, None], cols[None, :]]
        return _grid_peak(xp.reshape(cut, cut.shape[:-2] + (-1,)), window)
    # whole numbers: fftfreq(n) * n is 38.00000000000001 at n = 77, outside max_shift 38
    k_host = np.round(np.fft.fftfreq(n) * n)
    allowed = xp.asarray(((k_host[:, None] ** 2 + k_host[None, :] ** 2) <= max_shift**2).ravel())
    k = xp.asarray(k_host)
    flat = xp.reshape(cc, cc.shape[:-2] + (n * n,))
    j = xp.argmax(xp.where(allowed, flat, -xp.inf), axis=-1)
    iy, ix = j // n, j % n

    def value(dy: int, dx: int) -> np.ndarray:
        index = ((iy + dy) % n) * n + (ix + dx) % n
        return xp.take_along_axis(flat, index[..., None], axis=-1)[..., 0]

    best = value(0, 0)
    shift = xp.stack([k[ix], k[iy]], axis=-1)
    for axis, (dy, dx) in enumerate(((0, 1), (1, 0))):
        vm, vp = value(-dy, -dx), value(dy, dx)
        den = vm - 2.0 * best + vp
        frac = xp.where(den < 0, 0.5 * (vm - vp) / xp.where(den < 0, den, -1.0), 0.0)
        shift[..., axis] += clamp(frac, -0.5, 0.5)
    return shift, best


class _Refinement(NamedTuple):
    """What every correlation of the refinement reuses, made once per call
    (:func:`_refinement`): on the GPU, host-computed tables copied once instead of per
    call."""

    phases: np.ndarray | None  # (2 n m, S) the grid's phase matrix (:func:`_grid_phases`)
    weights: np.ndarray  # (n, m) w_k / n² (:func:`_half_plane_weights`)
    fx: np.ndarray  # (m,) ω_x = 2π k_x / n
    fy: np.ndarray  # (n,) ω_y
    px: np.ndarray  # (m, 3) 1, ω_x, ω_x²
    py: np.ndarray  # (3, n) 1, ω_y, ω_y²


def _refinement(n: int, grid: _ShiftGrid | None, xp: Any, dtype: Any) -> _Refinement:
    """:class:`_Refinement` for images of ``n²`` in the array library ``xp``, the phases in
    the real precision of the correlations' complex ``dtype``."""
    ky, kx = half_plane_frequencies(n)
    fx, fy = kx[0] * (2 * np.pi / n), ky[:, 0] * (2 * np.pi / n)
    return _Refinement(
        None if grid is None else _grid_phases(grid, n, xp, np.finfo(dtype).dtype),
        xp.asarray(_half_plane_weights(n)),
        xp.asarray(fx),
        xp.asarray(fy),
        xp.asarray(np.stack([np.ones_like(fx), fx, fx**2], axis=-1)),
        xp.asarray(np.stack([np.ones_like(fy), fy, fy**2], axis=0)),
    )


def _newton_shift(G: np.ndarray, shift: np.ndarray, basis: _Refinement, steps: int = 2) -> tuple:
    """Maximise the trigonometric interpolant of a cross-correlation,
    :math:`c(s) = \\frac{1}{n^2} \\sum_k w_k \\mathrm{Re}(G_k e^{i \\omega_k \\cdot s})`
    (``G`` its half-plane spectrum, :func:`_half_plane_weights`, :math:`\\omega_k = 2\\pi
    k / n`), by Newton steps from ``shift``; returns the shift and ``c`` there.

    The phase factors separably, :math:`e^{i \\omega_k \\cdot s} = e^{i \\omega_y s_y}
    e^{i \\omega_x s_x}`, so the value, gradient and Hessian are the bilinear forms
    :math:`M_{lj} = \\sum_k \\omega_y^l \\omega_x^j (w G)_k e^{i \\omega_k \\cdot s}
    = (\\omega_y^l e_y)^T (w G) (\\omega_x^j e_x)` for :math:`l + j \\le 2`: ``c = Re M00``,
    ``∂c/∂s_x = -Im M01``, ``∂²c/∂s_x ∂s_y = -Re M11``, and so on, two small matrix
    products per step instead of a pass over the spectrum per term. In float64 however
    ``G`` comes: the refinement compares scores that differ by ~1e-6 near its end."""
    xp = namespace(G)
    Gw = xp.astype(G, xp.complex128) * basis.weights
    fx, fy, px, py = basis.fx, basis.fy, basis.px, basis.py
    s = xp.asarray(shift, dtype=xp.float64, copy=True)
    for step in range(steps + 1):
        ex = xp.exp(1j * s[..., 0, None] * fx)[..., :, None] * px  # (..., m, 3)
        ey = xp.exp(1j * s[..., 1, None] * fy)[..., None, :] * py  # (..., 3, n)
        M = ey @ (Gw @ ex)  # (..., 3, 3): M[l, j] pairs the powers of ω_y and ω_x
        value = xp.real(M[..., 0, 0])
        if step == steps:
            break
        gx, gy = -xp.imag(M[..., 0, 1]), -xp.imag(M[..., 1, 0])
        hxx, hxy, hyy = -xp.real(M[..., 0, 2]), -xp.real(M[..., 1, 1]), -xp.real(M[..., 2, 0])
        det = hxx * hyy - hxy**2
        ok = (hxx < 0) & (det > 0)
        safe = xp.where(ok, det, 1.0)
        dx = (hyy * gx - hxy * gy) / safe
        dy = (hxx * gy - hxy * gx) / safe
        move = xp.where(ok[..., None], -xp.stack([dx, dy], axis=-1), 0.0)
        s = s + clamp(move, -0.5, 0.5)
    return s, value


def _correlate(
    spectra_img: np.ndarray,
    norms_img: np.ndarray,
    P_spectra: np.ndarray,
    n: int,
    max_shift: float,
    grid: _ShiftGrid | None,
    basis: _Refinement,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cross-correlations of images ``(B, ...)`` with projections given by their
    centred half-plane spectra ``(B, K, ...)`` (mean removed), at the continuous optimum of
    the shift (Newton steps on the correlation's trigonometric interpolant from the
    integer peak), so that candidates compare at their best sub-pixel alignment: shifts
    ``(B, K, 2)`` and scores ``(B, K)``. The integer peak comes from the correlation on
    ``grid`` (:func:`_shift_grid`, its phases in ``basis``) or, without one, an inverse
    FFT."""
    xp = namespace(P_spectra)
    # the image is P moved by s: c(s) = sum_p I(p) P(p - s) = IDFT[Î conj(P̂)](s)
    G = spectra_img[:, None] * xp.conj(P_spectra)
    if grid is None:
        shift, _ = _peak(_irfft2(G, n), max_shift)
    else:
        shift, _ = _grid_peak(_real_view(G) @ basis.phases, grid)
    shift, peak = _newton_shift(G, shift, basis)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = peak / (norms_img[:, None] * _spectrum_norms(P_spectra))
    # the search's bookkeeping is on the host: a few numbers per image and candidate
    score = to_numpy(score)
    return to_numpy(shift), np.where(np.isnan(score), -np.inf, score)


def _grid_phases(grid: _ShiftGrid, n: int, xp: Any, real: Any) -> np.ndarray:
    """The real matrix ``(2 n m, S)`` (in ``xp``, of dtype ``real``) that maps a spectrum
    seen by :func:`_real_view` to its inverse real DFT at the grid's shifts: rows ``w cos``
    and ``-w sin`` of the phase."""
    E = _half_plane_weights(n) * _shift_phases(n, grid.shifts)  # (S, n, m)
    E = np.stack([E.real, -E.imag], axis=-1).reshape(len(E), -1).T
    return xp.asarray(np.ascontiguousarray(E), dtype=real)


class _SearchImages(NamedTuple):
    """A chunk's images as every gallery block of the search reads them
    (:func:`_search_images`)."""

    F: np.ndarray  # (B, n, m) spectra times the CTFs (for the inverse FFTs)
    norms: np.ndarray  # (B,) norms of the images low-passed to the band
    ctf_power: np.ndarray | None  # (B, n m) w CTF²: the projections' norms under each CTF
    Fw: np.ndarray | None  # (B, K) w CTF F at the band's K points (with a grid)
    inside: np.ndarray | None  # (K,) flat indices of those points (host)
    phases: np.ndarray | None  # (S, K) e^{i ω_k · s} there, for the grid's S shifts


def _search_images(
    F: np.ndarray, ctf: np.ndarray | None, n: int, radius: float, grid: _ShiftGrid | None
) -> _SearchImages:
    """What :func:`_search` needs of the images (spectra ``F``, CTFs), once per call rather
    than once per gallery block: the images' norms over the band, their CTF-filtered
    spectra and, with a ``grid``, those spectra at the band's points and the grid's phases
    there (the band within Nyquist: beyond it the projections are zero)."""
    xp = namespace(F)
    w = xp.asarray(_half_plane_weights(n), dtype=xp.float32)
    norms = _spectrum_norms(F * xp.asarray(half_plane_disk(n, radius), dtype=xp.float32))
    ctf_power = None if ctf is None else _flat(w * ctf * ctf)
    if ctf is not None:
        F = F * ctf
    if grid is None:
        return _SearchImages(F, norms, ctf_power, None, None, None)
    inside = np.flatnonzero(half_plane_disk(n, min(radius, n / 2)))
    ky, kx = half_plane_frequencies(n)
    k_x, k_y = kx.reshape(-1)[inside], ky.reshape(-1)[inside]
    sx, sy = grid.shifts[:, :1], grid.shifts[:, 1:]
    phases = xp.asarray(np.exp(2j * np.pi * (sx * k_x + sy * k_y) / n), dtype=xp.complex64)
    Fw = _flat(F * w)[:, xp.asarray(inside)]
    return _SearchImages(F, norms, ctf_power, Fw, inside, phases)


def _search(
    images: _SearchImages,
    P: np.ndarray,
    n: int,
    max_shift: float,
    grid: _ShiftGrid | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Integer-peak shifts ``(B, G, 2)`` and normalised scores ``(B, G)`` of the images
    (:func:`_search_images`) against the projections ``P (G, ...)`` of a gallery block, for
    the global search (which only ranks): the normalised cross-correlations of the images
    and projections low-passed to the band (:func:`_search_radius`; ``P`` is zero beyond
    it).

    With a ``grid`` the correlations at its shifts are one real matrix product,
    :math:`c_{bgs} = \\mathrm{Re} \\sum_k (w\\,\\mathrm{CTF}_b \\hat I_b)_k
    \\overline{(\\hat P_g e^{-i \\omega_k \\cdot s})_k}`, and the projections' norms
    under each CTF another, :math:`\\lVert \\mathrm{CTF}_b P_g \\rVert^2 = \\sum_k w_k
    \\mathrm{CTF}_{bk}^2 |\\hat P_{gk}|^2`."""
    xp = namespace(P)
    B, G = images.F.shape[0], P.shape[0]
    P = xp.astype(P, xp.complex64)
    if images.ctf_power is None:
        norms_p = xp.broadcast_to(_spectrum_norms(P), (B, G))
    else:
        # the CTF is even, so the Hermitian part of CTF P is CTF times P's
        norms_p = xp.sqrt(xp.clip(images.ctf_power @ _flat(_power(P)).T, 0.0, None))
    shift = np.empty((B, G, 2))
    score = np.empty((B, G))

    def scored(rows, cols, s, peak):
        with np.errstate(invalid="ignore", divide="ignore"):
            sc = to_numpy(peak / (images.norms[rows, None] * norms_p[rows, cols]))
        shift[rows, cols], score[rows, cols] = to_numpy(s), np.where(np.isnan(sc), -np.inf, sc)

    if grid is None:
        for part in _parts(B, _SEARCH_BYTES * n * n * G):
            cc = _irfft2(images.F[part, None] * xp.conj(P[None]), n)
            scored(part, slice(None), *_peak(cc, max_shift))
        return shift, score
    Fw, phases = images.Fw, images.phases
    K = images.inside.size
    Pb = _flat(P)[:, xp.asarray(images.inside)]
    S, row = len(grid.shifts), 2 * K
    if B < G:
        # fewer images than projections: the images are moved by every shift (by e^{+iks},
        # the same products) and their rows meet the projections'
        for part in _parts(B, 8 * S * K, _MOVED_BUDGET):
            moved = xp.reshape(_real_rows(Fw[part, None] * phases), (-1, row))
            c = xp.reshape(moved @ _real_rows(Pb).T, (-1, S, G))
            scored(part, slice(None), *_grid_peak(xp.moveaxis(c, 1, 2), grid))
        return shift, score
    for gpart in _parts(G, 8 * S * K, _MOVED_BUDGET):
        # the projections moved by every shift: their rows meet the images' in one product
        moved = xp.reshape(_real_rows(Pb[gpart, None] * xp.conj(phases)), (-1, row))
        g = gpart.stop - gpart.start
        for part in _parts(B, 4 * g * S):
            c = xp.reshape(_real_rows(Fw[part]) @ moved.T, (-1, g, S))
            scored(part, gpart, *_grid_peak(c, grid))
    return shift, score


def _search_radius(n: int, step: float) -> float:
    """The band of the global search, cycles per box: :data:`_SEARCH_BAND` radians over
    the grid's step (in radians), at least :data:`_SEARCH_MIN_RADIUS`, at most Nyquist."""
    return float(min(n / 2, max(_SEARCH_MIN_RADIUS, _SEARCH_BAND / np.radians(step))))


def _flat(x: np.ndarray) -> np.ndarray:
    """``(..., n, m)`` as ``(..., n m)`` (the size spelled out: ``-1`` is ambiguous for an
    empty batch)."""
    return namespace(x).reshape(x, x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _centred_projection_spectra(
    volume: np.ndarray, A: np.ndarray, eps: float, radius: float | None = None
) -> np.ndarray:
    """Half-plane spectra of the projections at ``A``, origin at pixel 0 (no shift), with
    the mean (DC term) removed and frequencies beyond Nyquist (or ``radius``) cut."""
    n = volume.shape[0]
    S = slice_spectra(volume, A, eps, radius=radius)
    S *= namespace(S).asarray(centering_phase(n), dtype=S.dtype)
    S[..., 0, 0] = 0.0
    return S


def match_images(
    volume: np.ndarray,
    images: np.ndarray,
    gallery: np.ndarray,
    *,
    ctf: np.ndarray | None = None,
    step: float,
    max_shift: float,
    refine: bool = True,
    candidates: int = 4,
    final_step: float = 0.1,
    max_rounds: int = 60,
    eps: float = 1e-4,
) -> Match:
    """Orientations and shifts of ``images (B, n, n)`` against ``volume (n, n, n)``
    (NumPy, or CuPy for both; see the module docstring); the results are NumPy arrays.

    Parameters
    ----------
    gallery : (G, 3, 3) orientations of the global search (a grid every ``step`` degrees).
    ctf : (B, n, n // 2 + 1), optional; the images' CTFs on the half plane.
    max_shift : largest shift searched, pixels.
    refine : refine angles and shifts locally (module docstring) after the search.
    candidates : the best gallery entries of each image that are refined (the highest
        refined score wins): the nearest grid orientation is not always the best-scoring
        one when the step is coarse, the CTF strong or the noise high.
    final_step : the refinement stops when its angular step falls below this (degrees).
    eps : accuracy of the projections' non-uniform FFT.

    Raises
    ------
    ValueError
        A gallery that is not ``(G >= 1, 3, 3)``, a non-positive ``step`` or
        ``final_step``, a negative ``max_shift`` (or any of them NaN).
    """
    xp = namespace(volume, images)
    B, n = images.shape[0], images.shape[-1]
    gallery = to_numpy(gallery)
    if gallery.ndim != 3 or gallery.shape[1:] != (3, 3) or len(gallery) == 0:
        raise ValueError(f"gallery must be (G >= 1, 3, 3) rotations, got shape {gallery.shape}")
    for name, value in (("step", step), ("final_step", final_step)):
        if not value > 0:  # NaN fails too
            raise ValueError(f"{name} must be a positive number of degrees, got {value!r}")
    if not max_shift >= 0:
        raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift!r}")
    radius = _search_radius(n, step)
    # the search's products run over its band, the refinement's over the whole spectrum
    search_grid = _shift_grid(n, max_shift, radius=radius)
    grid = _shift_grid(n, max_shift)
    # single precision: the search ranks candidates and locates peaks, where float32's
    # 1e-7 is ample, at about 1.6x the FFT speed of float64
    F, norms = _image_spectra(xp.astype(xp.asarray(images), xp.float32))
    if ctf is not None:
        ctf = xp.astype(xp.asarray(ctf), xp.float32)
    K = max(1, min(candidates, len(gallery)))
    best_score = np.full((B, K), -np.inf)
    best_g = np.zeros((B, K), dtype=int)
    best_shift = np.zeros((B, K, 2))
    rows = np.arange(B)[:, None]
    prepared = _search_images(F, ctf, n, radius, search_grid)
    for start in range(0, len(gallery), _GALLERY_BLOCK):
        block = gallery[start : start + _GALLERY_BLOCK]
        P = _centred_projection_spectra(volume, block, eps, radius)
        shift, score = _search(prepared, P, n, max_shift, search_grid)
        # keep the K best gallery entries of each image so far
        pool = np.concatenate([best_score, score], axis=1)
        top = np.argsort(-pool, axis=1, kind="stable")[:, :K]
        g = np.concatenate([best_g, start + np.broadcast_to(np.arange(len(block)), score.shape)], 1)
        sh = np.concatenate([best_shift, shift], axis=1)
        best_score, best_g, best_shift = pool[rows, top], g[rows, top], sh[rows, top]
    # every candidate is refined; each image keeps its best refined candidate
    owner = np.repeat(np.arange(B), K)
    A = gallery[best_g.reshape(-1)]
    shifts = best_shift.reshape(-1, 2)
    scores = best_score.reshape(-1)
    rounds = np.zeros(B * K, dtype=int)
    if refine:
        # in the correlations' precision: float32 spectra times a float32 or float64
        # volume's projections (slice_spectra)
        basis = _refinement(n, grid, xp, xp.result_type(F.dtype, volume.dtype))
        on_device = xp.asarray(owner)
        Fc, normc = F[on_device], norms[on_device]
        ctfc = None if ctf is None else ctf[on_device]
        delta = np.full(B * K, step / 2.0)
        active = np.isfinite(scores)
        # the quadratic model's optimum proposed by each candidate's last round, and
        # whether the model bracketed it on every axis
        model = A.copy()
        bracketed = np.zeros(B * K, dtype=bool)
        for round_ in range(max_rounds):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            rounds[idx] += 1
            # columns: the current orientation, six small rotations about the frame axes
            # (x-, x+, y-, y+, z-, z+) and the last round's model optimum; seven are scored,
            # the current orientation only in the first round (its score so far is the
            # search's, at an integer shift; later it is the one it was picked with), the
            # model optimum from the second on
            cand = [A[idx]]
            for axis in range(3):
                for sign in (-1.0, 1.0):
                    cand.append(_axis_rotations(axis, sign * delta[idx]) @ A[idx])
            cand.append(model[idx])
            cand = np.stack(cand, axis=1)
            shift = np.empty((idx.size, 8, 2))
            score = np.full((idx.size, 8), -np.inf)
            shift[:, 0], score[:, 0] = shifts[idx], scores[idx]
            cols = slice(0, 7) if round_ == 0 else slice(1, 8)
            for part in _parts(idx.size, 7 * _REFINE_BYTES * n * n):
                P = _centred_projection_spectra(volume, cand[part, cols].reshape(-1, 3, 3), eps)
                P = xp.reshape(P, (-1, 7, n, n // 2 + 1))
                rows_idx = xp.asarray(idx[part])
                if ctfc is not None:
                    P = P * ctfc[rows_idx, None]
                shift[part, cols], score[part, cols] = _correlate(
                    Fc[rows_idx], normc[rows_idx], P, n, max_shift, grid, basis
                )
            r = np.arange(idx.size)
            k = np.argmax(score, axis=1)
            improved = (k > 0) & (score[r, k] > score[:, 0])
            pick = np.where(improved, k, 0)
            # a taken model optimum that its model bracketed is within a fraction of the
            # step of the true one: the step halves as after a round without improvement
            halve = ~improved | ((pick == 7) & bracketed[idx])
            model[idx], bracketed[idx] = _model_optimum(A[idx], score[:, :7], delta[idx])
            A[idx] = cand[r, pick]
            shifts[idx] = shift[r, pick]
            scores[idx] = score[r, pick]
            # below final_step the candidate is done
            delta[idx[halve]] /= 2.0
            active[idx[halve & (delta[idx] < final_step)]] = False
            active &= ~_overtaken(A, scores, delta, active, K)
    best = np.argmax(scores.reshape(B, K), axis=1) + np.arange(B) * K
    return Match(A[best], shifts[best], scores[best], rounds[best])


def _model_optimum(
    A: np.ndarray, score: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The optimum of a separable quadratic model of the score around orientations
    ``A (N, 3, 3)`` from their scores ``(N, 7)`` there and at the rotations by ``∓delta``
    about the frame's x, y and z axes (in that order), and whether every axis's parabola
    has its vertex within the probes (bracketed).

    Per axis, :math:`c = f_+ + f_- - 2 f_0` and :math:`g = (f_+ - f_-) / 2` place the
    vertex at :math:`t = -g / c` steps (clipped to ±1; where the parabola opens upwards,
    one step towards the better side), and the optimum is
    :math:`R_z(t_z \\delta) R_y(t_y \\delta) R_x(t_x \\delta) A`."""
    f0, fm, fp = score[:, :1], score[:, 1::2], score[:, 2::2]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        c = fp + fm - 2.0 * f0
        g = 0.5 * (fp - fm)
        vertex = -g / c
    # a probe that scored -inf (a NaN projection) makes its axis unusable: no move there
    usable = np.isfinite(c) & np.isfinite(g)
    t = np.where(c < 0, np.clip(np.nan_to_num(vertex), -1.0, 1.0), np.sign(g))
    t = np.where(usable, t, 0.0)
    optimum = A
    for axis in range(3):
        optimum = _axis_rotations(axis, t[:, axis] * delta) @ optimum
    bracketed = np.all(usable & (c < 0) & (np.abs(vertex) <= 1.0), axis=1)
    return optimum, bracketed


def _overtaken(
    A: np.ndarray, scores: np.ndarray, delta: np.ndarray, active: np.ndarray, K: int
) -> np.ndarray:
    """The active refinement candidates ``(B K,)`` (``K`` per image, in order) that have
    an active candidate of the same image with a higher score (or the same, and before it)
    within the smaller of their two steps: the pattern search around both now probes the
    same neighbourhood, so only the better one is worth going on with."""
    if K == 1:
        return np.zeros_like(active)
    B = len(scores) // K
    R = A.reshape(B, K, 3, 3)
    # rotation angle between candidates j and k: arccos((tr(R_j^T R_k) - 1) / 2)
    trace = np.einsum("bjxy,bkxy->bjk", R, R)
    angle = np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
    d, s, on = delta.reshape(B, K), scores.reshape(B, K), active.reshape(B, K)
    order = np.arange(K)
    better = (s[:, :, None] > s[:, None, :]) | (
        (s[:, :, None] == s[:, None, :]) & (order[:, None] < order[None, :])
    )  # better[b, j, k]: j beats k
    close = angle < np.minimum(d[:, :, None], d[:, None, :])
    beaten = np.any(better & close & on[:, :, None], axis=1)
    return (beaten & on).reshape(-1)
