"""Image registration numerics: phase correlation, a coarse rotation search and
inverse-compositional Gauss–Newton on a pyramid (NumPy/SciPy only).

Conventions are those of :mod:`scalign.kernels.affine`: a homogeneous matrix ``M`` is the
forward motion in pixel coordinates ``(x, y[, z])`` (``x`` the column index, pixel centres
at integers). Registering ``mov`` onto ``ref`` estimates the motion ``M`` with

.. math:: \\mathrm{mov}(M p) \\approx \\mathrm{ref}(p),

i.e. ``mov`` is ``ref`` moved by ``M``: warping ``ref`` by ``M`` (pull with ``M^{-1}``)
reproduces ``mov``, and ``mov`` pulled with ``M`` (warped by ``M^{-1}``) lies on ``ref``.

Pipeline (:func:`prepare_template` once per reference, then :func:`estimate_motion` per
moving image):

1. a pyramid of each image, halving every axis with the binomial filter
   ``[1, 3, 3, 1] / 8`` (:func:`downsample`); coarse pixel ``i`` sits at fine ``2 i + 0.5``;
2. on a coarse level, the starting motion: translation by :func:`phase_correlation`; for
   ``rigid`` / ``similarity`` / ``affine`` in 2-D, rotation (and scale) candidates from the
   log-polar Fourier magnitude (:func:`fourier_mellin`), each checked by phase-correlating
   the translation and scoring the zero-normalised cross-correlation (:func:`initial_motion`);
3. on every level, coarse to fine, inverse-compositional Gauss–Newton (Baker & Matthews
   2004) with bilinear sampling, restricted to in-bounds pixels (:func:`refine_level`);
   the finest level is then polished with cubic B-spline sampling (:func:`sample_cubic`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from scalign._array import namespace
from scalign.kernels.affine import image_center, rotation_2d

TRANSFORMS_2D = ("translation", "rigid", "similarity", "affine")
TRANSFORMS_3D = ("translation", "rigid", "affine")
LOSSES = ("mse", "ncc")

# Default number of pixels the Gauss–Newton step uses on a level (the strongest gradients).
MAX_POINTS = 32768
# Coarse levels stop once an update moves no image corner by more than this (level pixels).
COARSE_TOL = 0.02


# ----------------------------------------------------------------------------------------
# Phase correlation
# ----------------------------------------------------------------------------------------


def hann_window(shape: Sequence[int]) -> np.ndarray:
    """Separable Hann window ``w(i) = prod_a 0.5 (1 - cos(2 pi i_a / (n_a - 1)))`` (float32)."""
    w = np.ones((), dtype=np.float32)
    for n in shape:
        w = np.multiply.outer(w, np.hanning(n).astype(np.float32))
    return w


def _dft_kernel(n: int, positions: np.ndarray, half: bool) -> np.ndarray:
    """``exp(2 pi i k s / n)`` for shifts ``s`` (rows) and frequencies ``k`` (columns).

    ``half``: the frequencies of a real FFT's last axis ``k = 0 .. n // 2``, weighted 2
    for the ones standing for a conjugate pair too (all but 0 and an even ``n``'s Nyquist).
    """
    if half:
        k = np.arange(n // 2 + 1, dtype=np.float64)
        weight = np.full(k.shape, 2.0)
        weight[0] = 1.0
        if n % 2 == 0:
            weight[-1] = 1.0
    else:
        k = sfft.fftfreq(n) * n
        weight = np.ones(n)
    return weight * np.exp(2j * np.pi * np.outer(positions, k) / n)


def _upsampled_correlation(
    spectrum: np.ndarray, shape: Sequence[int], grids: Sequence[np.ndarray]
) -> np.ndarray:
    """Inverse real DFT of ``spectrum`` (an ``rfftn`` half-spectrum of ``shape``), evaluated
    at the shifts ``grids[a]`` along each axis ``a`` (matrix DFT, Guizar-Sicairos 2008)."""
    d = len(shape)
    out = spectrum
    # the half (real-FFT) axis first: its weights fold the conjugate half in (take Re last)
    out = np.tensordot(out, _dft_kernel(shape[-1], grids[-1], half=True), axes=([d - 1], [1]))
    # contracting the leading axis appends its shifts last: (m_{d-1}, m_0, ..., m_{d-2})
    for a in range(d - 1):
        out = np.tensordot(out, _dft_kernel(shape[a], grids[a], half=False), axes=([0], [1]))
    return np.moveaxis(out, 0, -1).real / math.prod(shape)


def phase_correlation(
    ref: Any,
    mov: Any,
    upsample: int = 20,
    *,
    window: bool = True,
    workers: int | None = None,
) -> tuple[np.ndarray, float]:
    """Translation of ``mov`` relative to ``ref`` by phase correlation (2-D or 3-D).

    With ``a``, ``b`` the mean-subtracted images, multiplied by a separable Hann window
    (:func:`hann_window`) when ``window`` is set (it suppresses the wrap-around edges of
    the FFT; ``window=False`` matches ``skimage.registration.phase_cross_correlation``),
    the normalised cross-power spectrum ``R = conj(A) B / |conj(A) B|`` has an inverse
    transform peaking at the motion ``s``: if ``mov(p + s) = ref(p)`` (``mov`` is ``ref``
    moved by ``s``) then ``B = A exp(-2 pi i k·s / n)`` and ``IDFT(R)`` is a delta at ``s``.

    Sub-pixel refinement (Guizar-Sicairos, Thurman & Fienup 2008): around the integer peak
    the correlation is evaluated on a grid of step ``1 / upsample`` spanning 1.5 pixels by a
    matrix DFT, and the maximum is refined by a 3-point parabola along each axis.

    Parameters
    ----------
    ref, mov : (H, W) or (D, H, W) real arrays of the same shape.
    upsample : int
        Upsampling factor of the refinement (``1``: integer shifts only).
    window : bool
        Multiply both (mean-subtracted) images by the Hann window first.
    workers : int, optional
        Passed to :mod:`scipy.fft`.

    Returns
    -------
    shift : (d,) float64
        The motion of ``mov`` relative to ``ref`` in ``(x, y[, z])`` pixels (the opposite of
        scikit-image's shift, which is in index order and moves ``mov`` back onto ``ref``).
    peak : float
        Height of the normalised correlation at the shift: 1 for a circular shift of
        the same image, near 0 for unrelated images.
    """
    a = np.asarray(ref, dtype=np.float32)
    b = np.asarray(mov, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"ref and mov differ in shape: {a.shape} vs {b.shape}")
    fa = _windowed_spectrum(a, window, workers)
    fb = _windowed_spectrum(b, window, workers)
    return _cross_power_peak(fa, fb, a.shape, upsample, workers)


def _windowed_spectrum(img: np.ndarray, window: bool, workers: int | None) -> np.ndarray:
    """``rfftn`` of the mean-subtracted (and Hann-windowed) image."""
    a = img - np.float32(img.mean(dtype=np.float64))
    if window:
        a *= hann_window(a.shape)
    return sfft.rfftn(a, workers=workers)


def _cross_power_peak(
    fa: np.ndarray, fb: np.ndarray, shape: Sequence[int], upsample: int, workers: int | None
) -> tuple[np.ndarray, float]:
    """Peak of ``IDFT(conj(fa) fb / |conj(fa) fb|)``: see :func:`phase_correlation`."""
    d = len(shape)
    cross = np.conj(fa)
    cross *= fb
    mag = np.abs(cross)
    np.maximum(mag, max(1e-12 * float(mag.max()), np.finfo(np.float32).tiny), out=mag)
    cross /= mag
    corr = sfft.irfftn(cross, s=shape, workers=workers)
    flat = int(np.argmax(corr))
    idx = np.array(np.unravel_index(flat, shape), dtype=np.float64)
    n = np.array(shape, dtype=np.float64)
    shift = np.where(idx > n // 2, idx - n, idx)
    peak = float(corr.flat[flat])
    if upsample > 1:
        half = math.ceil(0.75 * upsample)
        offsets = np.arange(-half, half + 1) / upsample
        grids = [s + offsets for s in shift]
        up = _upsampled_correlation(cross, shape, grids)
        j = np.array(np.unravel_index(int(np.argmax(up)), up.shape))
        peak = float(up[tuple(j)])
        refined = np.array([g[k] for g, k in zip(grids, j, strict=True)])
        for ax in range(d):
            if 0 < j[ax] < up.shape[ax] - 1:
                lo, hi = j.copy(), j.copy()
                lo[ax] -= 1
                hi[ax] += 1
                vm, v0, vp = up[tuple(lo)], peak, up[tuple(hi)]
                den = vm - 2.0 * v0 + vp
                if den < 0:
                    refined[ax] += float(np.clip(0.5 * (vm - vp) / den, -0.5, 0.5)) / upsample
        shift = refined
    return shift[::-1].copy(), peak


# ----------------------------------------------------------------------------------------
# Pyramid
# ----------------------------------------------------------------------------------------


def _along(ax: int, ndim: int, sl: slice | int) -> tuple:
    index = [slice(None)] * ndim
    index[ax] = sl
    return tuple(index)


def downsample(img: Any, batch: int = 0) -> Any:
    """Halve every axis: ``out[i] = (x[2i-1] + 3 x[2i] + 3 x[2i+1] + x[2i+2]) / 8``.

    A binomial (Gaussian-like) low-pass and decimation; the ends repeat the edge sample and
    an odd length drops its last sample. Coarse pixel ``i`` is centred on fine ``2 i + 0.5``
    (:func:`level_map`). Float32 in, float32 out; no padded copies (large temporaries
    cost page faults). The first ``batch`` axes are a batch and kept; NumPy or CuPy.
    """
    out = img
    nd = img.ndim
    for ax in range(batch, nd):
        x = out
        n = x.shape[ax]
        m = n // 2
        if m < 2:
            raise ValueError(f"cannot halve an axis of length {n}")
        out = x[_along(ax, nd, slice(0, 2 * m, 2))] + x[_along(ax, nd, slice(1, 2 * m, 2))]
        out *= np.float32(3.0)
        out[_along(ax, nd, slice(1, m))] += x[_along(ax, nd, slice(1, 2 * m - 2, 2))]
        out[_along(ax, nd, 0)] += x[_along(ax, nd, 0)]
        out[_along(ax, nd, slice(0, m - 1))] += x[_along(ax, nd, slice(2, 2 * m - 1, 2))]
        out[_along(ax, nd, m - 1)] += x[_along(ax, nd, min(2 * m, n - 1))]
        out *= np.float32(0.125)
    return out


def level_map(d: int, levels_down: int = 1) -> np.ndarray:
    """``S`` with ``p_fine = S p_coarse`` between levels ``levels_down`` apart:
    ``p_fine = 2^L p_coarse + (2^L - 1) / 2`` on every axis; a motion converts as
    ``M_fine = S M_coarse S^-1``."""
    f = 2.0**levels_down
    S = np.eye(d + 1)
    S[:d, :d] *= f
    S[:d, d] = (f - 1.0) / 2.0
    return S


def auto_levels(shape: Sequence[int], min_size: int) -> int:
    """Number of pyramid levels (``1``: the image alone): halve while the smallest side of
    the next level stays ``>= min_size``."""
    levels = 1
    side = min(shape)
    while side // 2 >= min_size:
        side //= 2
        levels += 1
    return levels


def template_levels(shape: Sequence[int]) -> int:
    """Default pyramid levels of a template: :func:`auto_levels` with the coarsest side
    >= 64 in 2-D, >= 24 in 3-D."""
    return auto_levels(shape, 64 if len(shape) == 2 else 24)


def search_level(shapes: Sequence[Sequence[int]]) -> int:
    """The pyramid level (of ``shapes``, finest first) the rotation search looks at: in
    2-D the coarsest one of >= 96 px (more angular detail than a smaller one), else the
    finest; in 3-D the coarsest."""
    k = len(shapes) - 1
    if len(shapes[0]) == 2:
        while k > 0 and min(shapes[k]) < 96:
            k -= 1
    return k


def build_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    """``[img, downsample(img), ...]`` (finest first), ``levels`` arrays, float32."""
    pyr = [np.ascontiguousarray(img, dtype=np.float32)]
    for _ in range(levels - 1):
        pyr.append(downsample(pyr[-1]))
    return pyr


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def _inside(coords: np.ndarray, shape: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """``coords`` (``(d, N)``, index order) clipped to ``[0, n_a - 1)`` (up to ``1e-9``) on
    every axis, and the mask of the points that needed no clipping."""
    clipped, valid = [], None
    for a, n in enumerate(shape):
        c = coords[a]
        cc = np.clip(c, 0.0, n - 1 - 1e-9)
        ok = cc == c
        valid = ok if valid is None else np.logical_and(valid, ok, out=valid)
        clipped.append(cc)
    return clipped, valid


def sample_linear(img: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multilinear interpolation of ``img`` at ``coords`` (``(d, N)``, index order).

    Returns ``(values, valid)`` with ``valid`` marking the points inside the image,
    ``0 <= c_a < n_a - 1`` on every axis (up to ``1e-9``); the others are sampled at
    clamped coordinates and must be masked out. Equivalent to
    ``scipy.ndimage.map_coordinates(img, coords, order=1)`` on the valid points and about
    2x faster on scattered points (no spline set-up; gathers on the flat array).
    """
    d = img.ndim
    flat = img.reshape(-1)
    strides = [s // img.itemsize for s in img.strides]
    clipped, valid = _inside(coords, img.shape)
    base = None
    fracs = []
    for a, cc in enumerate(clipped):
        c0 = np.floor(cc)
        fracs.append(np.subtract(cc, c0, dtype=img.dtype))
        i0 = c0.astype(np.intp)
        if strides[a] != 1:
            i0 *= strides[a]
        base = i0 if base is None else np.add(base, i0, out=base)
    # gather the 2^d corners, then interpolate axis by axis from the last one
    corners = {}
    for bits in itertools.product((0, 1), repeat=d):
        off = sum(b * s for b, s in zip(bits, strides, strict=True))
        corners[bits] = np.take(flat, base + off if off else base)
    for a in range(d - 1, -1, -1):
        f = fracs[a]
        nxt = {}
        for bits in itertools.product((0, 1), repeat=a):
            v0 = corners[(*bits, 0)]
            v1 = corners[(*bits, 1)]
            v1 -= v0
            v1 *= f
            v1 += v0
            nxt[bits] = v1
        corners = nxt
    return corners[()], valid


def _bspline_weights(f: np.ndarray) -> list[np.ndarray]:
    """Cubic B-spline weights of the taps ``i - 1, i, i + 1, i + 2`` at fractions
    ``f = c - i`` in ``[0, 1)``."""
    g = 1.0 - f
    f2 = f * f
    f3 = f2 * f
    return [
        g * g * g / 6.0,
        (3.0 * f3 - 6.0 * f2 + 4.0) / 6.0,
        (3.0 * (f2 - f3 + f) + 1.0) / 6.0,
        f3 / 6.0,
    ]


def spline_coefficients(img: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients of ``img`` for :func:`sample_cubic` (mirror boundary,
    float32): ``scipy.ndimage.spline_filter(img, 3, mode="mirror")``."""
    return ndimage.spline_filter(img, order=3, mode="mirror", output=np.float32)


def sample_cubic(spline: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline interpolation at ``coords`` (``(d, N)``, index order) from the
    coefficients ``spline`` of :func:`spline_coefficients`; ``(values, valid)`` as in
    :func:`sample_linear`.

    On the valid points it equals ``scipy.ndimage.map_coordinates(img, coords, order=3,
    mode="mirror")``: ``4^d`` gathered taps per point with the cubic B-spline weights,
    a tap one beyond the edge mirrored (``-1 → 1``, ``n → n - 2``). The spline
    reproduces a spline-interpolated motion of an image far better than bilinear
    interpolation, whose smoothing pulls sub-pixel shifts towards whole pixels.
    """
    flat = spline.reshape(-1)
    d = spline.ndim
    strides = [s // spline.itemsize for s in spline.strides]
    clipped, valid = _inside(coords, spline.shape)
    taps, weights = [], []
    for a, cc in enumerate(clipped):
        c0 = np.floor(cc)
        weights.append(_bspline_weights(np.subtract(cc, c0, dtype=spline.dtype)))
        i0 = c0.astype(np.intp)
        n = spline.shape[a]
        low = i0 - 1
        low[low < 0] = 1
        high = i0 + 2
        high[high > n - 1] = n - 2
        taps.append([t * strides[a] for t in (low, i0, i0 + 1, high)])

    def along(a: int, base: np.ndarray | None) -> np.ndarray:
        # separable: the weighted sum over the taps of axis a of the sums over the later axes
        total = None
        for k in range(4):
            index = taps[a][k] if base is None else base + taps[a][k]
            term = np.take(flat, index) if a == d - 1 else along(a + 1, index)
            term *= weights[a][k]
            total = term if total is None else np.add(total, term, out=total)
        return total

    return along(0, None), valid


# ----------------------------------------------------------------------------------------
# Warp parameterisations (increments about the level centre)
# ----------------------------------------------------------------------------------------


def n_params(transform: str, d: int) -> int:
    """Number of parameters of ``transform`` in ``d`` dimensions."""
    if transform == "translation":
        return d
    if transform == "rigid":
        return 3 if d == 2 else 6
    if transform == "similarity":
        return 4
    return d * (d + 1)


def steepest_descent(grad: np.ndarray, q: np.ndarray, transform: str) -> np.ndarray:
    """Rows ``∇T · ∂W/∂p`` at ``p = 0`` for points ``q`` (centred ``(x, y[, z])``).

    ``grad`` and ``q`` are ``(..., d, N)`` (rows ``x, y[, z]``; NumPy or CuPy); returns
    ``(..., n_params, N)``.
    Parameters (all about the level centre, see :func:`increment_matrix`):

    * translation: ``(tx, ty[, tz])``;
    * rigid 2-D: ``(tx, ty, θ)`` in radians, ``∂W/∂θ = (-y, x)``; 3-D: ``(t, ω)`` with the
      rotation vector ``ω``, ``∂W/∂ω · ω = ω × q`` so the rows are ``q × ∇T``;
    * similarity 2-D: ``(tx, ty, a, b)`` with linear part ``[[1 + a, -b], [b, 1 + a]]``;
    * affine: ``(t, A)`` with linear part ``I + A``, ``A`` row-major.
    """
    xp = namespace(grad, q)
    d = q.shape[-2]
    g = [grad[..., i, :] for i in range(d)]
    x = [q[..., i, :] for i in range(d)]
    rows = list(g)
    if transform == "rigid":
        if d == 2:
            rows.append(g[1] * x[0] - g[0] * x[1])
        else:  # q × ∇T
            rows.append(x[1] * g[2] - x[2] * g[1])
            rows.append(x[2] * g[0] - x[0] * g[2])
            rows.append(x[0] * g[1] - x[1] * g[0])
    elif transform == "similarity":
        rows.append(g[0] * x[0] + g[1] * x[1])
        rows.append(g[1] * x[0] - g[0] * x[1])
    elif transform == "affine":
        rows.extend(g[i] * x[j] for i in range(d) for j in range(d))
    return xp.stack(rows, axis=-2)


def _rotation_vector_matrix(w: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation ``exp([w]_×)`` of the rotation vector ``w`` (radians)."""
    angle = float(np.linalg.norm(w))
    K = np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
    if angle < 1e-12:
        return np.eye(3) + K
    K /= angle
    return np.eye(3) + math.sin(angle) * K + (1.0 - math.cos(angle)) * (K @ K)


def increment_matrix(dp: np.ndarray, transform: str, d: int) -> np.ndarray:
    """The warp ``W(q; Δp)`` of :func:`steepest_descent`'s parameters, as a homogeneous
    matrix about the level centre (rigid increments are exact rotations)."""
    D = np.eye(d + 1)
    D[:d, d] = dp[:d]
    rest = dp[d:]
    if transform == "rigid":
        D[:d, :d] = rotation_2d(math.degrees(rest[0])) if d == 2 else _rotation_vector_matrix(rest)
    elif transform == "similarity":
        a, b = rest
        D[:2, :2] = [[1.0 + a, -b], [b, 1.0 + a]]
    elif transform == "affine":
        D[:d, :d] += rest.reshape(d, d)
    return D


def _translation(t: np.ndarray) -> np.ndarray:
    T = np.eye(len(t) + 1)
    T[:-1, -1] = t
    return T


# ----------------------------------------------------------------------------------------
# Inverse-compositional Gauss–Newton on one level
# ----------------------------------------------------------------------------------------


class LevelData(NamedTuple):
    """What the inverse-compositional step precomputes from the reference on one level."""

    points: np.ndarray  # (d, N) pixel coordinates, rows x, y[, z]; float64
    values: np.ndarray  # (N,) reference values there, float32
    sd: np.ndarray  # (P, N) steepest-descent images, float64
    hessian: np.ndarray  # (P, P) sd @ sd.T over all the points
    center: np.ndarray  # (d,) the level centre (x, y[, z])
    corners: np.ndarray  # (2^d, d) the level corners, centred


def _gradient(img: np.ndarray, axis: int) -> np.ndarray:
    """Central difference ``(x[i+1] - x[i-1]) / 2`` (zero on the two border samples)."""
    g = np.empty_like(img)  # (zeros_like: calloc'd pages fault on first touch, slower)
    n = img.shape[axis]
    inner = [slice(None)] * img.ndim
    hi = [slice(None)] * img.ndim
    lo = [slice(None)] * img.ndim
    edge = [slice(None)] * img.ndim
    inner[axis] = slice(1, n - 1)
    hi[axis] = slice(2, n)
    lo[axis] = slice(0, n - 2)
    edge[axis] = [0, n - 1]
    np.subtract(img[tuple(hi)], img[tuple(lo)], out=g[tuple(inner)])
    g[tuple(edge)] = 0.0
    g *= np.float32(0.5)
    return g


def _top_pixels(img: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of about ``k`` pixels of ``img`` (not on its border) with the largest
    ``|∇img|^2`` (central differences; the threshold is a quantile of a strided sample,
    ties at zero thinned evenly), or all such pixels when there are no more than ``k``."""
    d = img.ndim
    grads = [_gradient(img, a) for a in range(d)]
    score = grads[0]
    score *= score
    for g in grads[1:]:
        score += g * g
    for a in range(d):  # the border samples have no central difference
        score[_along(a, d, [0, img.shape[a] - 1])] = -1.0
    flat = score.reshape(-1)
    n_in = math.prod(n - 2 for n in img.shape)
    if n_in <= k:
        return np.flatnonzero(flat >= 0)
    sample = flat[:: max(1, flat.size // 16384)]
    j = min(len(sample) - 1, int(len(sample) * (1.0 - k / n_in)))
    thr = max(float(np.partition(sample, j)[j]), 0.0)
    sel = np.flatnonzero(flat >= thr)
    if len(sel) > 1.25 * k:
        sel = sel[:: math.ceil(len(sel) / k)]
    return sel


def prepare_level(
    ref: np.ndarray,
    transform: str,
    max_points: int | None,
    coarser: np.ndarray | None = None,
) -> LevelData:
    """Points, values and steepest-descent images of the reference ``ref`` on one level.

    The pixels one sample in from the border (where the central differences
    ``∂T/∂x ≈ (T[x+1] - T[x-1]) / 2`` exist) are used. When there are more than
    ``max_points``, only those with strong gradients: the ``max_points / 2^d`` pixels of
    the next coarser level ``coarser`` (this pyramid's) with the largest ``|∇|^2``, each
    expanded to its ``2^d`` children (or, without ``coarser``, the strongest pixels of
    ``ref`` itself). Flat pixels carry little information for the step, so the choice
    mostly saves time at full resolution.
    """
    d = ref.ndim
    center = image_center(ref.shape)
    n_in = math.prod(n - 2 for n in ref.shape)
    if max_points is None or n_in <= max_points or coarser is None:
        sel = _top_pixels(ref, n_in if max_points is None else max_points)
        idx = np.unravel_index(sel, ref.shape)
    else:
        csel = _top_pixels(coarser, max(1, max_points >> d))
        cidx = np.unravel_index(csel, coarser.shape)
        idx = []
        for a, ci in enumerate(cidx):  # children 2 i + (0, 1) on every axis
            shape = [1] * d + [len(ci)]
            shape[a] = 2
            child = 2 * ci + np.arange(2).reshape(shape[:d] + [1])
            idx.append(np.broadcast_to(child, [2] * d + [len(ci)]).reshape(-1))
        keep = np.ones(len(idx[0]), dtype=bool)
        for a in range(d):
            keep &= (idx[a] >= 1) & (idx[a] <= ref.shape[a] - 2)
        idx = [i[keep] for i in idx]
        sel = np.ravel_multi_index(idx, ref.shape)
    flat = ref.reshape(-1)
    strides = [st // ref.itemsize for st in ref.strides]
    grad = np.empty((d, len(sel)), dtype=np.float64)
    for a in range(d):  # rows x, y[, z]: axis d-1-a
        st = strides[d - 1 - a]
        grad[a] = np.take(flat, sel + st) - np.take(flat, sel - st)
    grad *= 0.5
    points = np.stack(idx[::-1]).astype(np.float64)  # rows x, y[, z]
    values = np.take(flat, sel)
    sd = steepest_descent(grad, points - center[:, None], transform)
    half = (np.array(ref.shape[::-1], dtype=np.float64) - 1.0) / 2.0
    corners = np.array(list(itertools.product((-1.0, 1.0), repeat=d))) * half
    return LevelData(points, values, sd, sd @ sd.T, center, corners)


class _TooFewPoints(Exception):
    """The overlap left too few (or flat) points to take a Gauss–Newton step."""


def _residual(
    mov: np.ndarray, data: LevelData, M: np.ndarray, loss: str, spline: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Residual ``e`` (zero off the valid points), the valid mask, their number and the
    loss (MSE, or ``1 - ZNCC``) at the motion ``M``; ``mov`` sampled bilinearly, or
    from its cubic B-spline coefficients ``spline`` when given."""
    d = mov.ndim
    coords = (M[:d, :d] @ data.points + M[:d, d, None])[::-1]
    g, valid = sample_linear(mov, coords) if spline is None else sample_cubic(spline, coords)
    n_valid = int(np.count_nonzero(valid))
    if n_valid <= data.sd.shape[0]:
        raise _TooFewPoints
    t = data.values
    if loss == "mse":
        e = g - t
        e *= valid
        return e, valid, n_valid, float(np.dot(e, e)) / n_valid
    # zero-normalised residual over the valid points
    w = valid.astype(np.float32)
    gm = float(np.dot(g, w)) / n_valid
    tm = float(np.dot(t, w)) / n_valid
    gz = (g - np.float32(gm)) * w
    tz = (t - np.float32(tm)) * w
    sg = math.sqrt(float(np.dot(gz, gz)))
    st = math.sqrt(float(np.dot(tz, tz)))
    if sg == 0.0 or st == 0.0:
        raise _TooFewPoints
    e = gz * np.float32(st / sg) - tz
    return e, valid, n_valid, 1.0 - float(np.dot(gz, tz)) / (sg * st)


def refine_level(
    mov: np.ndarray,
    data: LevelData,
    M: np.ndarray,
    transform: str,
    loss: str,
    max_iterations: int,
    tol: float,
    spline: np.ndarray | None = None,
) -> tuple[np.ndarray, int, bool, float]:
    """Inverse-compositional Gauss–Newton on one level (Baker & Matthews 2004).

    Each iteration samples ``g(p) = mov(M p)`` at the reference points (bilinearly, or
    from the cubic B-spline coefficients ``spline`` of ``mov``), forms
    the residual ``e = g - T`` (``mse``) or ``e = (g - ḡ) σ_T / σ_g - (T - T̄)`` (``ncc``,
    the zero-normalised residual of Pan et al. 2013; means and norms over the valid
    points), solves ``H Δp = SD e`` with ``H = SD SDᵀ`` summed over the valid points
    only (in-bounds samples, so the border does not bias the fit; Jacobi-scaled), and
    composes ``M ← M · D(Δp)^-1`` with ``D`` the increment about the level centre.
    Converged when the increment moves no corner of the image by more than ``tol``
    (level pixels).

    Returns ``(M, iterations, converged, loss)``; ``loss`` (MSE, or ``1 - ZNCC``) is the
    last one evaluated.
    """
    d = mov.ndim
    c = data.center
    Tc = _translation(c)
    Tmc = _translation(-c)
    sd = data.sd
    n = sd.shape[1]
    loss_value = math.nan
    it = 0
    for it in range(1, max_iterations + 1):
        try:
            e, valid, n_valid, loss_value = _residual(mov, data, M, loss, spline)
        except _TooFewPoints:
            return M, it, False, loss_value
        b = sd @ e
        if n_valid == n:
            H = data.hessian
        elif 2 * n_valid > n:  # remove the few points that left the image
            out = np.take(sd, np.flatnonzero(~valid), axis=1)
            H = data.hessian - out @ out.T
        else:
            inside = np.take(sd, np.flatnonzero(valid), axis=1)
            H = inside @ inside.T
        scale = np.sqrt(np.diag(H))
        if not np.all(scale > 0):
            return M, it, False, loss_value
        try:
            dp = np.linalg.solve(H / np.outer(scale, scale), b / scale) / scale
        except np.linalg.LinAlgError:
            return M, it, False, loss_value
        D = increment_matrix(dp, transform, d)
        M = M @ (Tc @ np.linalg.inv(D) @ Tmc)
        moved = data.corners @ (D[:d, :d] - np.eye(d)).T + D[:d, d]
        if float(np.sqrt((moved**2).sum(axis=1)).max()) < tol:
            return M, it, True, loss_value
    return M, it, False, loss_value


# ----------------------------------------------------------------------------------------
# Coarse search
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _log_polar_coords(shape: tuple[int, int], n_angles: int, radii: tuple[float, ...]):
    """Index coordinates (rows of the ``fftshift``-ed real spectrum, columns) of the
    log-polar samples, angles ``φ_j = -90° + j 180° / n_angles``, ``(n_angles, n_radii)``."""
    H, W = shape
    r = np.asarray(radii)
    phi = np.radians(np.arange(n_angles) * (180.0 / n_angles) - 90.0)
    rows = np.outer(np.sin(phi), r) * H + H // 2
    cols = np.outer(np.cos(phi), r) * W
    coords = np.stack([rows.ravel(), cols.ravel()])
    coords.flags.writeable = False
    return coords


def _log_polar_radii(shape: Sequence[int], n_radii: int) -> np.ndarray:
    """Geometric radii (cycles/pixel) from 2 cycles per image to 0.45 cycles/pixel."""
    return np.geomspace(2.0 / min(shape), 0.45, n_radii)


def log_polar_map(
    img: np.ndarray, n_angles: int = 128, n_radii: int = 48, workers: int | None = None
) -> np.ndarray:
    """The normalised log-polar Fourier magnitude of a 2-D image, ``(n_angles, n_radii)``.

    ``log(1 + |FFT|)`` of the Hann-windowed, mean-subtracted image (the logarithm tempers
    the dominant low frequencies) at angles ``[-90°, 90°)`` (from ``x`` towards ``y``) and
    the radii of :func:`_log_polar_radii`; each radius zero-mean and unit-norm along the
    angle, ready for :func:`fourier_mellin`.
    """
    a = np.asarray(img, dtype=np.float32)
    a = (a - np.float32(a.mean(dtype=np.float64))) * hann_window(a.shape)
    spec = np.fft.fftshift(np.abs(sfft.rfft2(a, workers=workers)), axes=0)
    radii = _log_polar_radii(a.shape, n_radii)
    coords = _log_polar_coords(a.shape, n_angles, tuple(radii))
    out, _ = sample_linear(np.ascontiguousarray(spec, dtype=np.float32), coords)
    m = np.log1p(out.reshape(n_angles, n_radii))
    m -= m.mean(axis=0)
    m /= np.maximum(np.linalg.norm(m, axis=0), 1e-12)
    return m


#: Rotation candidates the coarse search scores (each with its 180° twin), and how close
#: to the highest a runner-up's log-polar correlation must be to be scored.
SEARCH_CANDIDATES = 2
RUNNER_UP = 0.9


def fourier_mellin(
    A: np.ndarray,
    B: np.ndarray,
    shape: Sequence[int],
    scale: bool = False,
    n_candidates: int = 2,
    max_log_scale: float = math.log(2.0),
) -> list[tuple[float, float, float]]:
    """Rotation (and scale) candidates of ``mov`` relative to ``ref`` (2-D) from their
    log-polar maps ``A = log_polar_map(ref)``, ``B = log_polar_map(mov)`` (Reddy &
    Chatterji 1996), each up to the 180° ambiguity; ``shape`` is the images' shape.

    If ``mov`` is ``ref`` moved by ``M = s R(θ)`` (plus any translation, which the
    magnitude ignores), ``|F_mov|(k) ∝ |F_ref|(R(θ)^-1 k / s)``: in log-polar coordinates
    ``(φ, ρ = log|k|)`` the spectrum shifts by ``(θ, -log s)``. The maps are
    cross-correlated along ``φ`` (circular, period 180°) and, for ``scale``, along ``ρ``
    (zero-padded, ``|log s| <= max_log_scale``); the local maxima over ``φ`` are the
    candidates, the angle refined by a parabola.

    Returns up to ``n_candidates`` ``(θ°, s, height)``, highest correlation first, ``θ``
    in ``[-90, 90)``: ``θ ± 180°`` is as likely, the caller checks both.
    """
    profile, lag = mellin_profile(A, B, shape, scale, max_log_scale)
    return mellin_candidates(profile, lag, shape, A.shape[1], n_candidates)


def mellin_profile(
    A: Any, B: Any, shape: Sequence[int], scale: bool, max_log_scale: float = math.log(2.0)
) -> tuple[Any, Any]:
    """The correlation of log-polar maps over the angle lag (:func:`fourier_mellin`).

    ``B`` may be a batch of maps ``(..., n_angles, n_radii)`` (NumPy or CuPy, ``A`` on
    the same device). Returns ``profile (..., n_angles)``: the correlation at each angle
    lag (for ``scale``, at its best admissible log-radius lag), and, for ``scale``, that
    lag in radius samples (else ``None``).
    """
    xp = namespace(A, B)
    n_angles, n_radii = A.shape[-2:]
    if scale:
        pad = 2 * n_radii
        fa = xp.fft.fft2(A, s=(n_angles, pad))
        fb = xp.fft.fft2(B, s=(n_angles, pad))
        corr = xp.real(xp.fft.ifft2(xp.conj(fa) * fb))  # corr[..., Δφ, Δρ]
        lags = np.fft.fftfreq(pad) * pad
        radii = _log_polar_radii(shape, n_radii)
        barred = np.abs(lags * math.log(radii[1] / radii[0])) > max_log_scale
        corr = xp.where(xp.asarray(barred), -xp.inf, corr)
        best = xp.argmax(corr, axis=-1)
        return xp.max(corr, axis=-1), xp.take(xp.asarray(lags), best)
    fa = xp.fft.rfft(A, axis=-2)
    fb = xp.fft.rfft(B, axis=-2)
    return xp.sum(xp.fft.irfft(xp.conj(fa) * fb, n=n_angles, axis=-2), axis=-1), None


def mellin_candidates(
    profile: np.ndarray,
    lag: np.ndarray | None,
    shape: Sequence[int],
    n_radii: int,
    n_candidates: int = 2,
) -> list[tuple[float, float, float]]:
    """The ``(θ°, s, height)`` candidates of :func:`fourier_mellin` from one image's
    :func:`mellin_profile`: its local maxima over the angle lag, highest first, the angle
    refined by a parabola."""
    n_angles = profile.shape[0]
    step = 180.0 / n_angles
    radii = _log_polar_radii(shape, n_radii)
    dlog = math.log(radii[1] / radii[0])
    is_max = (profile >= np.roll(profile, 1)) & (profile > np.roll(profile, -1))
    order = np.argsort(-np.where(is_max, profile, -np.inf))[:n_candidates]
    out = []
    for j in order:
        if not (is_max[j] and np.isfinite(profile[j])):
            continue
        vm, v0, vp = profile[j - 1], profile[j], profile[(j + 1) % n_angles]
        den = vm - 2.0 * v0 + vp
        frac = 0.5 * (vm - vp) / den if den < 0 and np.isfinite(den) else 0.0
        theta = ((j + frac) * step + 90.0) % 180.0 - 90.0
        s = 1.0 if lag is None else math.exp(-lag[j] * dlog)
        out.append((float(theta), s, float(profile[j])))
    return out


def _coarse_matrix(d: int, center: np.ndarray, theta: float, s: float) -> np.ndarray:
    """Rotation ``θ`` (degrees) in the ``x``-``y`` plane (about ``z`` in 3-D) and
    isotropic scale ``s``, about ``center``."""
    M = np.eye(d + 1)
    M[:2, :2] = s * rotation_2d(theta)
    if d == 3:
        M[2, 2] = s
    return _translation(center) @ M @ _translation(-center)


def _shifted_zncc(ref: np.ndarray, g: np.ndarray, valid: np.ndarray, shift: np.ndarray) -> float:
    """ZNCC of ``ref(p)`` and ``g(p + shift)`` (integer ``shift``, ``(x, y[, z])``) over
    the overlap where ``valid``, times the square root of the overlap fraction (a small
    overlap is not trusted)."""
    sl_r, sl_g = [], []
    for n, k in zip(ref.shape, shift[::-1].astype(int), strict=True):
        lo, hi = max(0, -k), min(n, n - k)
        if hi <= lo:
            return -math.inf
        sl_r.append(slice(lo, hi))
        sl_g.append(slice(lo + k, hi + k))
    m = valid[tuple(sl_g)]
    count = int(np.count_nonzero(m))
    if count < 16:
        return -math.inf
    a = ref[tuple(sl_r)][m]
    b = g[tuple(sl_g)][m]
    a = a - a.mean(dtype=np.float64)
    b = b - b.mean(dtype=np.float64)
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    if den == 0.0:
        return -math.inf
    return float(np.dot(a, b)) / den * math.sqrt(count / ref.size)


class Template(NamedTuple):
    """A reference prepared once for registering any number of images onto it
    (:func:`prepare_template`)."""

    pyramid: list[np.ndarray]  # float32 levels, finest first
    levels: list[LevelData]  # the Gauss–Newton data of each level, finest first
    transform: str
    spectrum: np.ndarray  # windowed rfftn of the coarsest level (initial translation)
    search: np.ndarray | None  # log-polar map of the search level (rotation search)
    search_level: int  # the level the rotation search looks at

    @property
    def ndim(self) -> int:
        return self.pyramid[0].ndim


def search_image(img: Any, batch: int = 0) -> Any:
    """What the rotation search sees: the image, or a volume's mean projection along
    ``z`` (a rotation about ``z``); ``batch`` leading axes are a batch of them."""
    return img.mean(axis=batch) if img.ndim - batch == 3 else img


def prepare_template(
    ref: np.ndarray,
    transform: str = "rigid",
    *,
    levels: int | None = None,
    rotation_search: bool = True,
    max_points: int | None = MAX_POINTS,
    workers: int | None = None,
) -> Template:
    """Everything :func:`estimate_motion` needs from the reference, computed once.

    Levels: ``levels`` pyramid levels (default :func:`template_levels`) with each level's
    points and steepest-descent images (:func:`prepare_level`); the coarsest level's
    windowed spectrum; for the rotation search (``rotation_search`` and a transform
    beyond ``translation``), the log-polar map of the :func:`search_level`.
    """
    if levels is None:
        levels = template_levels(ref.shape)
    pyramid = build_pyramid(ref, levels)
    L = levels - 1
    data = [
        prepare_level(pyramid[lev], transform, max_points, pyramid[lev + 1] if lev < L else None)
        for lev in range(levels)
    ]
    search, k = None, L
    if rotation_search and transform != "translation":
        k = search_level([p.shape for p in pyramid])
        search = log_polar_map(search_image(pyramid[k]), workers=workers)
    spectrum = _windowed_spectrum(pyramid[L], True, workers)
    return Template(pyramid, data, transform, spectrum, search, k)


def initial_motion(
    template: Template,
    coarse: np.ndarray,
    searched: np.ndarray | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Starting motion on the coarsest level: rotation/scale candidates, then translation.

    Without a rotation search (``translation``, or ``rotation_search=False``): the
    phase-correlation shift alone. Otherwise the candidates ``θ`` and ``θ ± 180°`` of
    :func:`fourier_mellin` on the template's search level (in 3-D on the mean projections
    along ``z``, for a rotation about ``z``), with a scale for ``similarity``/``affine`` in
    2-D, and the identity. For each candidate ``C`` the image ``g(p) = mov(C p)`` is
    sampled, its remaining translation ``t`` (integer, level pixels) found by
    :func:`phase_correlation`, and ``M = C T(t)`` scored by the ZNCC of ``ref(p)`` and
    ``g(p + t) = mov(M p)`` times the square root of the overlap fraction, times the
    height of the phase-correlation peak. (The ZNCC alone is fooled by a smooth envelope:
    an object on a flat background under a window correlates with itself at any angle,
    and 6 of 78 rotations of windowed smooth noise came out near 0°; the whitened peak
    is high only at the right angle.) Returns the best ``M`` in the coarsest level's
    pixels.

    ``coarse`` is the moving image's coarsest level; ``searched`` what the rotation search
    sees of its search level (:func:`search_image`), needed when the template has one.
    """
    ref, mov = template.pyramid[-1], coarse
    d = ref.ndim
    center = image_center(ref.shape)
    cands = [(0.0, 1.0)]
    if template.search is not None:
        k = template.search_level
        moving_map = log_polar_map(searched, workers=workers)
        use_scale = d == 2 and template.transform in ("similarity", "affine")
        shape = template.pyramid[k].shape[-2:]
        found = fourier_mellin(
            template.search, moving_map, shape, scale=use_scale, n_candidates=SEARCH_CANDIDATES
        )
        for theta, s, height in found:
            if height < RUNNER_UP * found[0][2]:
                continue
            cands.append((theta, s))
            cands.append((theta + 180.0 if theta < 0 else theta - 180.0, s))
    pts = None
    best, best_score = np.eye(d + 1), -math.inf
    for theta, s in cands:
        C = _coarse_matrix(d, center, theta, s)
        if theta == 0.0 and s == 1.0:
            g, valid = mov, np.ones(mov.shape, dtype=bool)
        else:
            if pts is None:
                pts = np.indices(ref.shape).reshape(d, -1)[::-1].astype(np.float64)
            g, valid = sample_linear(mov, (C[:d, :d] @ pts + C[:d, d, None])[::-1])
            if not valid.any():
                continue
            g = np.where(valid, g, g[valid].mean()).reshape(ref.shape)
            valid = valid.reshape(ref.shape)
        fg = _windowed_spectrum(np.asarray(g, dtype=np.float32), True, workers)
        t, peak = _cross_power_peak(template.spectrum, fg, ref.shape, 1, workers)
        score = _shifted_zncc(ref, g, valid, t) * peak
        if score > best_score:
            best, best_score = C @ _translation(t), score
    return best


# ----------------------------------------------------------------------------------------
# The whole estimate
# ----------------------------------------------------------------------------------------


class MotionEstimate(NamedTuple):
    """Result of :func:`estimate_motion`."""

    matrix: np.ndarray  # (d+1, d+1) motion, full-resolution pixels
    iterations: tuple[int, ...]  # per level, coarsest first
    converged: bool  # the finest level met ``tol``
    loss: float  # last loss on the finest level's points (MSE or 1 - ZNCC)
    levels: int


def estimate_motion(
    template: Template,
    mov: np.ndarray,
    loss: str = "mse",
    *,
    max_iterations: int = 50,
    tol: float = 1e-3,
    initial: np.ndarray | None = None,
    workers: int | None = None,
) -> MotionEstimate:
    """Motion ``M`` with ``mov(M p) ≈ ref(p)`` for the reference of ``template`` (inputs
    already checked, same shape, float).

    The start is ``initial`` (full-resolution motion) or :func:`initial_motion` on the
    coarsest level; then :func:`refine_level` on every level, coarse to fine, with ``tol``
    (full-resolution pixels) on the finest and ``max(COARSE_TOL, tol)`` level pixels on
    the others. The finest level converges with bilinear sampling, then is polished with
    cubic B-spline sampling (:func:`sample_cubic`): bilinear interpolation biases
    sub-pixel shifts towards whole pixels ("pixel locking", ~0.015 px at a quarter pixel
    on a natural image); the spline leaves ~1e-3 px.
    """
    d = mov.ndim
    levels = len(template.pyramid)
    pm = build_pyramid(mov, levels)
    L = levels - 1
    if initial is not None:
        S = level_map(d, L)
        M = np.linalg.inv(S) @ np.asarray(initial, dtype=np.float64) @ S
    else:
        searched = None if template.search is None else search_image(pm[template.search_level])
        M = initial_motion(template, pm[L], searched, workers=workers)
    iterations = []
    converged = False
    last = math.nan
    up = level_map(d, 1)
    up_inv = np.linalg.inv(up)
    transform = template.transform
    for lev in range(L, -1, -1):
        if lev < L:
            M = up @ M @ up_inv
        data = template.levels[lev]
        tol_lev = tol if lev == 0 else max(COARSE_TOL, tol / 2.0**lev)
        M, it, converged, last = refine_level(
            pm[lev], data, M, transform, loss, max_iterations, tol_lev
        )
        iterations.append(it)
    if converged:
        M, it, converged, last = refine_level(
            pm[0], data, M, transform, loss, max_iterations, tol, spline_coefficients(pm[0])
        )
        iterations[-1] += it
    return MotionEstimate(M, tuple(iterations), converged, last, levels)
