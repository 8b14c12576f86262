"""Registration of a batch of images as whole-batch array operations (NumPy or CuPy):
:func:`scalign.kernels.register.estimate_motion` for every image of a batch at once, so
that a GPU gets batch-sized work instead of a loop of small kernels.

The steps and conventions are those of :mod:`scalign.kernels.register`; only the loops
are ordered differently. The references are prepared as a batch too
(:func:`prepare_templates`): one shared by every image, or one per image (registering
each image onto the one before it). For a batch of ``B`` images:

1. the pyramids of all the images (:func:`~scalign.kernels.register.downsample` along
   the image axes);
2. the starting motions (:func:`initial_motions`): the log-polar maps, the rotation
   candidates' resampled images, their phase correlations and ZNCC scores for all the
   images at once; only picking each image's candidates from its angle profile runs on
   the host;
3. on every level, coarse to fine, inverse-compositional Gauss–Newton for all the images
   still iterating. Each iteration does one gather of the moving images at their
   reference's ``N`` points ``(B, N)``, the right-hand sides ``b = S e`` ``(B, P)``,
   and the Hessians over each image's valid points ``v_bn`` as one batched product

   .. math:: H_b = \\sum_n v_{bn} s_n s_n^{\\mathsf T} = S \\mathrm{diag}(v_b) S^{\\mathsf T},

   followed by a batched ``P × P`` solve. An image leaves the loop when it converges or
   fails, in the same way as in :func:`~scalign.kernels.register.refine_level`;
4. the cubic B-spline polish of the finest level, for the images that converged there.

The results equal the per-image estimate up to floating-point rounding, because the sums
run in a different order.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np

from scalign._array import clamp, namespace, to_numpy
from scalign.kernels.affine import image_center
from scalign.kernels.register import (
    COARSE_TOL,
    MAX_POINTS,
    RUNNER_UP,
    SEARCH_CANDIDATES,
    _along,
    _bspline_weights,
    _coarse_matrix,
    _log_polar_coords,
    _log_polar_radii,
    _translation,
    downsample,
    hann_window,
    level_map,
    mellin_candidates,
    mellin_profile,
    search_image,
    search_level,
    steepest_descent,
    template_levels,
)


class Level(NamedTuple):
    """One pyramid level of :class:`Templates`: :class:`~scalign.kernels.register.LevelData`
    with a leading template axis ``T``, the point sets padded to a common ``N``."""

    points: Any  # (T, d, N) pixel coordinates x, y[, z], float64
    values: Any  # (T, N) reference values, float32
    sd: Any  # (T, P, N) steepest-descent images, float64; zero on padding
    real: Any  # (T, N) bool: a point, not padding
    center: Any  # (d,) the level centre
    corners: Any  # (2^d, d) the level corners, centred


class Templates(NamedTuple):
    """References prepared for :func:`estimate_motions`: ``T = 1`` shared by every image,
    or one per image (:func:`prepare_templates`)."""

    pyramid: list[Any]  # (T, *shape) float32 levels, finest first
    levels: list[Level]  # finest first
    transform: str
    spectrum: Any  # (T, ...) windowed rfftn of the coarsest level
    search: Any  # (T, n_angles, n_radii) log-polar maps of the search level, or None
    search_level: int


def _pick(a: Any, ids: Any) -> Any:
    """Rows ``ids`` of a per-template array; the one row of a shared (``T = 1``) one."""
    return a[0] if a.shape[0] == 1 else a[ids]


class BatchEstimate(NamedTuple):
    """Result of :func:`estimate_motions` (host arrays, one entry per image)."""

    matrix: np.ndarray  # (B, d+1, d+1) motions, full-resolution pixels
    iterations: np.ndarray  # (B,) Gauss–Newton iterations over all levels and the polish
    converged: np.ndarray  # (B,) the finest level met ``tol``
    loss: np.ndarray  # (B,) last loss on the finest level's points (MSE or 1 - ZNCC)


def _c_strides(shape: tuple[int, ...]) -> list[int]:
    """Element strides of a C-ordered array of ``shape``."""
    return [math.prod(shape[a + 1 :]) for a in range(len(shape))]


def _cell(xp: Any, images: Any, ids: Any, coords: Any) -> tuple[Any, list[Any], list[Any], Any]:
    """Where the points ``coords`` ``(b, d, N)`` (index order) of the images ``ids`` of
    ``images`` ``(B, *shape)`` fall: each image's flat offset ``(b, 1)``, the per-axis
    lower grid indices and fractions ``(b, N)``, and the mask of the points inside every
    axis' ``[0, n - 1)`` (up to ``1e-9``; the others are clamped and must be masked out)."""
    offset = xp.reshape(xp.astype(ids, xp.int64) * math.prod(images.shape[1:]), (-1, 1))
    valid, lows, fracs = None, [], []
    for a, n in enumerate(images.shape[1:]):
        c = coords[:, a]
        cc = clamp(c, 0.0, n - 1 - 1e-9)
        ok = cc == c
        valid = ok if valid is None else valid & ok
        c0 = xp.floor(cc)
        lows.append(xp.astype(c0, xp.int64))
        fracs.append(xp.astype(cc - c0, images.dtype))
    return offset, lows, fracs, valid


def sample_linear(images: Any, ids: Any, coords: Any) -> tuple[Any, Any]:
    """Multilinear interpolation of the images ``images[ids]`` at ``coords`` ``(b, d, N)``
    (index order); ``(values, valid)`` ``(b, N)`` as in
    :func:`scalign.kernels.register.sample_linear`."""
    xp = namespace(images, coords)
    d = images.ndim - 1
    flat = xp.reshape(images, (-1,))
    strides = _c_strides(images.shape[1:])
    offset, lows, fracs, valid = _cell(xp, images, ids, coords)
    base = offset + sum(i0 * st for i0, st in zip(lows, strides, strict=True))
    corners = {
        bits: flat[base + sum(b * s for b, s in zip(bits, strides, strict=True))]
        for bits in itertools.product((0, 1), repeat=d)
    }
    for a in range(d - 1, -1, -1):
        f = fracs[a]
        corners = {
            bits: corners[(*bits, 0)] + (corners[(*bits, 1)] - corners[(*bits, 0)]) * f
            for bits in itertools.product((0, 1), repeat=a)
        }
    return corners[()], valid


def sample_cubic(splines: Any, ids: Any, coords: Any) -> tuple[Any, Any]:
    """Cubic B-spline interpolation of ``splines[ids]`` (coefficients of
    :func:`spline_coefficients`) at ``coords`` ``(b, d, N)``, mirrored taps one beyond the
    edge; ``(values, valid)`` as in :func:`scalign.kernels.register.sample_cubic`."""
    xp = namespace(splines, coords)
    shape = splines.shape[1:]
    d = len(shape)
    flat = xp.reshape(splines, (-1,))
    strides = _c_strides(shape)
    offset, lows, fracs, valid = _cell(xp, splines, ids, coords)
    taps = []
    for a, i0 in enumerate(lows):
        n = shape[a]
        low = xp.where(i0 < 1, 1, i0 - 1)
        high = xp.where(i0 + 2 > n - 1, n - 2, i0 + 2)
        taps.append([t * strides[a] for t in (low, i0, i0 + 1, high)])
    weights = [_bspline_weights(f) for f in fracs]

    def along(a: int, index: Any) -> Any:
        total = None
        for k in range(4):
            at = index + taps[a][k]
            term = (flat[at] if a == d - 1 else along(a + 1, at)) * weights[a][k]
            total = term if total is None else total + term
        return total

    return along(0, offset), valid


# ----------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------


def _gradients(images: Any) -> list[Any]:
    """:func:`scalign.kernels.register._gradient` along every image axis of a batch."""
    xp = namespace(images)
    out = []
    for axis in range(1, images.ndim):
        n = images.shape[axis]
        g = xp.zeros_like(images)
        g[_along(axis, images.ndim, slice(1, n - 1))] = (
            images[_along(axis, images.ndim, slice(2, n))]
            - images[_along(axis, images.ndim, slice(0, n - 2))]
        ) * np.float32(0.5)
        out.append(g)
    return out


def _compact(keep: Any, fill: int) -> tuple[Any, Any]:
    """The column indices of each row's ``True`` entries, in order, padded with ``fill``
    to the longest row: ``(index (T, N), real (T, N))``."""
    xp = namespace(keep)
    slot = xp.cumsum(xp.astype(keep, xp.int64), axis=1) - 1
    width = int(xp.max(slot[:, -1])) + 1
    rows, cols = xp.nonzero(keep)
    index = xp.full((keep.shape[0], width), fill, dtype=xp.int64)
    real = xp.zeros((keep.shape[0], width), dtype=xp.bool)
    index[rows, slot[rows, cols]] = cols
    real[rows, slot[rows, cols]] = True
    return index, real


def _top_pixels(images: Any, k: int) -> tuple[Any, Any]:
    """:func:`scalign.kernels.register._top_pixels` of every image of a batch: the flat
    indices ``(T, N)`` (padded with an interior pixel) and which of them are real."""
    xp = namespace(images)
    shape = images.shape[1:]
    T, d = images.shape[0], len(shape)
    score = None
    for g in _gradients(images):
        score = g * g if score is None else score + g * g
    for a in range(1, d + 1):  # the border samples have no central difference
        score[_along(a, d + 1, [0, images.shape[a] - 1])] = -1.0
    flat = xp.reshape(score, (T, -1))
    interior = sum(_c_strides(shape))
    n_in = math.prod(n - 2 for n in shape)
    if n_in <= k:
        return _compact(flat >= 0, interior)
    sample = flat[:, :: max(1, flat.shape[1] // 16384)]
    j = min(sample.shape[1] - 1, int(sample.shape[1] * (1.0 - k / n_in)))
    threshold = xp.maximum(xp.sort(sample, axis=1)[:, j], 0.0)
    keep = flat >= threshold[:, None]
    count = xp.sum(xp.astype(keep, xp.int64), axis=1)
    # too many ties (at zero): every step-th of them, as the per-image version
    step = xp.where(count > 1.25 * k, (count + k - 1) // k, 1)
    rank = xp.cumsum(xp.astype(keep, xp.int64), axis=1) - 1
    return _compact(keep & (rank % step[:, None] == 0), interior)


def _unravel(flat: Any, shape: tuple[int, ...]) -> list[Any]:
    """Per-axis indices of the C-order flat indices ``flat`` into ``shape``."""
    return [(flat // stride) % n for stride, n in zip(_c_strides(shape), shape, strict=True)]


def prepare_levels(refs: Any, transform: str, max_points: int | None, coarser: Any = None) -> Level:
    """:func:`scalign.kernels.register.prepare_level` of every reference of a batch
    ``(T, *shape)``: the same points (padded to a common number), values and
    steepest-descent images."""
    xp = namespace(refs)
    shape = refs.shape[1:]
    T, d = refs.shape[0], len(shape)
    n_in = math.prod(n - 2 for n in shape)
    if max_points is None or n_in <= max_points or coarser is None:
        sel, real = _top_pixels(refs, n_in if max_points is None else max_points)
        idx = _unravel(sel, shape)
    else:
        csel, creal = _top_pixels(coarser, max(1, max_points >> d))
        cidx = _unravel(csel, coarser.shape[1:])
        n_c = csel.shape[1]
        idx = []
        for a, ci in enumerate(cidx):  # children 2 i + (0, 1) on every axis, child-major
            bit = xp.reshape(
                xp.arange(2), (1,) + tuple(2 if b == a else 1 for b in range(d)) + (1,)
            )
            child = 2 * xp.reshape(ci, (T,) + (1,) * d + (n_c,)) + bit
            idx.append(xp.reshape(xp.broadcast_to(child, (T,) + (2,) * d + (n_c,)), (T, -1)))
        real = xp.reshape(
            xp.broadcast_to(xp.reshape(creal, (T,) + (1,) * d + (n_c,)), (T,) + (2,) * d + (n_c,)),
            (T, -1),
        )
        for a in range(d):
            real = real & (idx[a] >= 1) & (idx[a] <= shape[a] - 2)
        idx = [xp.where(real, i, 1) for i in idx]
    strides = _c_strides(shape)
    sel = sum(i * st for i, st in zip(idx, strides, strict=True))
    sel = sel + xp.reshape(xp.arange(T, dtype=xp.int64) * math.prod(shape), (T, 1))
    flat = xp.reshape(refs, (-1,))
    # rows x, y[, z]: image axis d - 1 - a
    grad = xp.stack(
        [
            xp.astype(flat[sel + strides[d - 1 - a]] - flat[sel - strides[d - 1 - a]], xp.float64)
            for a in range(d)
        ],
        axis=1,
    )
    grad = grad * 0.5
    points = xp.astype(xp.stack(idx[::-1], axis=1), xp.float64)
    center = image_center(shape)
    sd = steepest_descent(grad, points - xp.asarray(center)[:, None], transform)
    sd = xp.where(real[:, None, :], sd, 0.0)
    half = (np.array(shape[::-1], dtype=np.float64) - 1.0) / 2.0
    corners = np.array(list(itertools.product((-1.0, 1.0), repeat=d))) * half
    values = xp.where(real, flat[sel], 0.0)
    return Level(points, values, sd, real, xp.asarray(center), xp.asarray(corners))


def _pyramid(images: Any, levels: int) -> list[Any]:
    """:func:`scalign.kernels.register.build_pyramid` of every image of a batch."""
    pyramid = [namespace(images).astype(images, np.float32)]
    for _ in range(levels - 1):
        pyramid.append(downsample(pyramid[-1], batch=1))
    return pyramid


def prepare_templates(
    refs: Any,
    transform: str = "rigid",
    *,
    rotation_search: bool = True,
    max_points: int | None = MAX_POINTS,
) -> Templates:
    """:func:`scalign.kernels.register.prepare_template` of every reference of a batch
    ``(T, *shape)`` (NumPy or CuPy; ``T = 1``: one reference for every image), with its
    default levels."""
    levels = template_levels(refs.shape[1:])
    pyramid = _pyramid(refs, levels)
    L = levels - 1
    data = [
        prepare_levels(pyramid[lev], transform, max_points, pyramid[lev + 1] if lev < L else None)
        for lev in range(levels)
    ]
    search, k = None, L
    if rotation_search and transform != "translation":
        k = search_level([p.shape[1:] for p in pyramid])
        search = log_polar_maps(search_image(pyramid[k], batch=1))
    return Templates(pyramid, data, transform, windowed_spectra(pyramid[L]), search, k)


# ----------------------------------------------------------------------------------------
# Coarse search
# ----------------------------------------------------------------------------------------


def windowed_spectra(images: Any) -> Any:
    """``rfftn`` over the image axes of each mean-subtracted, Hann-windowed image."""
    xp = namespace(images)
    axes = tuple(range(1, images.ndim))
    mean = xp.mean(xp.astype(images, xp.float64), axis=axes, keepdims=True)
    a = (images - xp.astype(mean, xp.float32)) * xp.asarray(hann_window(images.shape[1:]))
    return xp.fft.rfftn(a, axes=axes)


def log_polar_maps(images: Any, n_angles: int = 128, n_radii: int = 48) -> Any:
    """:func:`scalign.kernels.register.log_polar_map` of each 2-D image of a batch,
    ``(B, n_angles, n_radii)``."""
    xp = namespace(images)
    B, shape = images.shape[0], images.shape[1:]
    spec = xp.fft.fftshift(xp.abs(windowed_spectra(images)), axes=1)
    spec = xp.astype(spec, xp.float32)
    radii = _log_polar_radii(shape, n_radii)
    coords = xp.asarray(_log_polar_coords(shape, n_angles, tuple(radii)))
    ids = xp.arange(B, dtype=xp.int64)
    out, _ = sample_linear(spec, ids, xp.broadcast_to(coords, (B, *coords.shape)))
    m = xp.log1p(xp.reshape(out, (B, n_angles, n_radii)))
    m = m - xp.mean(m, axis=1, keepdims=True)
    norm = xp.sqrt(xp.sum(m * m, axis=1, keepdims=True))
    return m / xp.maximum(norm, 1e-12)


def _integer_peaks(spectrum: Any, spectra: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """Integer motions ``(K, d)`` (``x, y[, z]``) of images relative to a reference from
    their windowed spectra, and the peaks' heights ``(K,)``: the peak of the normalised
    cross-power spectrum, as :func:`scalign.kernels.register.phase_correlation` without
    refinement."""
    xp = namespace(spectra)
    d = len(shape)
    axes = tuple(range(1, d + 1))
    cross = xp.conj(spectrum) * spectra
    mag = xp.abs(cross)
    top = xp.max(xp.reshape(mag, (mag.shape[0], -1)), axis=1)
    floor = xp.maximum(1e-12 * top, np.finfo(np.float32).tiny)  # a flat image: 0, not 0/0
    mag = xp.maximum(mag, xp.reshape(floor, (-1,) + (1,) * d))
    corr = xp.reshape(xp.fft.irfftn(cross / mag, s=shape, axes=axes), (mag.shape[0], -1))
    flat = xp.argmax(corr, axis=1)
    peak = xp.take_along_axis(corr, flat[:, None], axis=1)[:, 0]
    idx = []
    for stride, n in zip(_c_strides(shape), shape, strict=True):
        i = (flat // stride) % n
        idx.append(xp.where(i > n // 2, i - n, i))
    return xp.astype(xp.stack(idx[::-1], axis=1), xp.float64), xp.astype(peak, xp.float64)


def _shifted_zncc(ref: Any, g: Any, valid: Any, shift: Any) -> Any:
    """:func:`scalign.kernels.register._shifted_zncc` of ``ref_k(p)`` and ``g_k(p + t_k)``
    for every row ``k`` of ``g`` and ``valid`` ``(K, *shape)``, with ``ref`` one per row
    ``(K, *shape)`` or one for all ``shape``, and the integer shifts ``t`` ``(K, d)``
    (``x, y[, z]``); ``-inf`` where fewer than 16 points overlap or a side is flat."""
    xp = namespace(g)
    K, shape = g.shape[0], g.shape[1:]
    d, size = len(shape), math.prod(shape)
    grid = np.indices(shape).reshape(d, -1)
    k = xp.astype(xp.flip(shift, axis=1), xp.int64)
    index = xp.reshape(xp.arange(K, dtype=xp.int64) * size, (-1, 1))
    inside = None
    for a, (n, stride) in enumerate(zip(shape, _c_strides(shape), strict=True)):
        q = xp.asarray(grid[a])[None, :] + k[:, a : a + 1]
        ok = (q >= 0) & (q < n)
        inside = ok if inside is None else inside & ok
        index = index + clamp(q, 0, n - 1) * stride
    m = inside & xp.reshape(valid, (-1,))[index]
    w = xp.astype(m, xp.float64)
    count = xp.sum(w, axis=1)
    safe = xp.maximum(count, 1.0)
    a = xp.astype(xp.reshape(ref, (-1, size)), xp.float64)
    b = xp.astype(xp.reshape(g, (-1,))[index], xp.float64)
    az = (a - xp.sum(a * w, axis=1, keepdims=True) / safe[:, None]) * w
    bz = (b - xp.sum(b * w, axis=1, keepdims=True) / safe[:, None]) * w
    den = xp.sqrt(xp.sum(az * az, axis=1) * xp.sum(bz * bz, axis=1))
    good = (count >= 16) & (den > 0.0)
    score = xp.sum(az * bz, axis=1) / xp.where(good, den, 1.0) * xp.sqrt(count / size)
    return xp.where(good, score, -xp.inf)


def initial_motions(templates: Templates, coarse: Any, searched: Any = None) -> Any:
    """:func:`scalign.kernels.register.initial_motion` of every image of a batch onto its
    template: ``coarse`` ``(B, *shape)`` their coarsest levels, ``searched`` ``(B, h, w)``
    what the rotation search sees of their search levels (when the templates have one).
    Returns ``(B, d + 1, d + 1)`` motions in the coarsest level's pixels.

    The log-polar maps, all the candidates' resampled images, their phase correlations
    and ZNCC scores are batch operations; only picking each image's candidates from its
    angle profile (``n_angles`` numbers) runs on the host.
    """
    xp = namespace(coarse)
    B, shape = coarse.shape[0], coarse.shape[1:]
    d = len(shape)
    center = image_center(shape)
    owner, mats = [], []
    found: list[list[tuple[float, float, float]]] = [[] for _ in range(B)]
    if templates.search is not None:
        k = templates.search_level
        use_scale = d == 2 and templates.transform in ("similarity", "affine")
        grid_shape = templates.pyramid[k].shape[-2:]
        profile, lag = mellin_profile(
            templates.search, log_polar_maps(searched), grid_shape, use_scale
        )
        profile, lag = to_numpy(profile), None if lag is None else to_numpy(lag)
        n_radii = templates.search.shape[-1]
        found = [
            mellin_candidates(
                profile[b],
                None if lag is None else lag[b],
                grid_shape,
                n_radii,
                SEARCH_CANDIDATES,
            )
            for b in range(B)
        ]
    for b in range(B):
        cands = [(0.0, 1.0)]
        for theta, s, height in found[b]:
            if height < RUNNER_UP * found[b][0][2]:
                continue
            cands.append((theta, s))
            cands.append((theta + 180.0 if theta < 0 else theta - 180.0, s))
        for theta, s in cands:
            owner.append(b)
            mats.append(_coarse_matrix(d, center, theta, s))
    owner_np = np.asarray(owner)
    mats = np.stack(mats)
    C = xp.asarray(mats)
    ids = xp.asarray(owner_np)
    points = xp.asarray(np.indices(shape).reshape(d, -1)[::-1].astype(np.float64))
    coords = xp.flip(C[:, :d, :d] @ points + C[:, :d, d:], axis=1)
    g, valid = sample_linear(coarse, ids, coords)
    # the identity candidate is the image itself, every pixel valid (sampling would drop
    # the last row and column)
    identity = xp.asarray(np.all(mats == np.eye(d + 1), axis=(1, 2)))
    g = xp.where(identity[:, None], xp.reshape(coarse, (B, -1))[ids], g)
    valid = valid | identity[:, None]
    w = xp.astype(valid, xp.float64)
    n_valid = xp.sum(w, axis=1)
    fill = xp.sum(xp.astype(g, xp.float64) * w, axis=1) / xp.maximum(n_valid, 1.0)
    g = xp.where(valid, g, xp.astype(fill, xp.float32)[:, None])
    g = xp.reshape(g, (-1, *shape))
    valid = xp.reshape(valid, (-1, *shape))
    t, peak = _integer_peaks(_pick(templates.spectrum, ids), windowed_spectra(g), tuple(shape))
    zncc = _shifted_zncc(_pick(templates.pyramid[-1], ids), g, valid, t)
    finite = xp.isfinite(zncc) & (n_valid > 0)
    score = to_numpy(xp.where(finite, xp.where(finite, zncc, 0.0) * peak, -xp.inf))
    t = to_numpy(t)
    start = np.tile(np.eye(d + 1), (B, 1, 1))
    for b in range(B):
        rows = np.flatnonzero(owner_np == b)
        j = rows[int(np.argmax(score[rows]))]
        if np.isfinite(score[j]):
            start[b] = mats[j] @ _translation(t[j])
    return xp.asarray(start)


# ----------------------------------------------------------------------------------------
# Gauss–Newton
# ----------------------------------------------------------------------------------------


def spline_coefficients(images: Any) -> Any:
    """Cubic B-spline coefficients of each image of a batch (mirror boundary, float32):
    :func:`scalign.kernels.register.spline_coefficients` along the image axes."""
    ndimage = _ndimage(images)
    xp = namespace(images)
    out = images
    for axis in range(1, images.ndim):
        out = ndimage.spline_filter1d(out, 3, axis=axis, mode="mirror", output=xp.float32)
    return out


def _ndimage(images: Any) -> Any:
    if namespace(images).__name__.endswith("cupy"):
        from cupyx.scipy import ndimage
    else:
        from scipy import ndimage
    return ndimage


def increment_matrices(dp: Any, transform: str, d: int) -> Any:
    """:func:`scalign.kernels.register.increment_matrix` of every row of ``dp`` ``(b, P)``:
    ``(b, d + 1, d + 1)``."""
    xp = namespace(dp)
    b = dp.shape[0]
    D = xp.zeros((b, d + 1, d + 1), dtype=xp.float64)
    for i in range(d + 1):
        D[:, i, i] = 1.0
    D[:, :d, d] = dp[:, :d]
    rest = dp[:, d:]
    if transform == "rigid" and d == 2:
        c, s = xp.cos(rest[:, 0]), xp.sin(rest[:, 0])
        D[:, 0, 0], D[:, 0, 1], D[:, 1, 0], D[:, 1, 1] = c, -s, s, c
    elif transform == "rigid":
        # Rodrigues, exp([w]x) = I + sin(a)/a K + (1 - cos a)/a^2 K^2 with K = [w]x
        angle = xp.sqrt(xp.sum(rest * rest, axis=1))
        small = angle < 1e-12
        safe = xp.where(small, 1.0, angle)
        c1 = xp.where(small, 1.0, xp.sin(angle) / safe)
        c2 = xp.where(small, 0.0, (1.0 - xp.cos(angle)) / (safe * safe))
        K = xp.zeros((b, 3, 3), dtype=xp.float64)
        K[:, 0, 1], K[:, 0, 2] = -rest[:, 2], rest[:, 1]
        K[:, 1, 0], K[:, 1, 2] = rest[:, 2], -rest[:, 0]
        K[:, 2, 0], K[:, 2, 1] = -rest[:, 1], rest[:, 0]
        D[:, :3, :3] += c1[:, None, None] * K + c2[:, None, None] * (K @ K)
    elif transform == "similarity":
        a, s = rest[:, 0], rest[:, 1]
        D[:, 0, 0], D[:, 0, 1], D[:, 1, 0], D[:, 1, 1] = 1.0 + a, -s, s, 1.0 + a
    elif transform == "affine":
        D[:, :d, :d] += xp.reshape(rest, (b, d, d))
    return D


def _residuals(g: Any, valid: Any, values: Any, loss: str, n_params: int) -> tuple[Any, Any, Any]:
    """Residuals ``e`` ``(b, N)`` (zero off the valid points), losses ``(b,)`` and the mask
    of the images that can take a step (more valid points than parameters; for ``ncc``,
    neither side flat): :func:`scalign.kernels.register._residual` per row."""
    xp = namespace(g)
    n_valid = xp.sum(xp.astype(valid, xp.int64), axis=1)
    ok = n_valid > n_params
    count = xp.astype(xp.where(ok, n_valid, 1), xp.float64)
    w = xp.astype(valid, xp.float32)
    if loss == "mse":
        e = (g - values) * w
        e64 = xp.astype(e, xp.float64)
        return e, xp.sum(e64 * e64, axis=1) / count, ok
    gm = xp.sum(xp.astype(g * w, xp.float64), axis=1) / count
    tm = xp.sum(xp.astype(values * w, xp.float64), axis=1) / count
    gz = (g - xp.astype(gm, xp.float32)[:, None]) * w
    tz = (values - xp.astype(tm, xp.float32)[:, None]) * w
    sg = xp.sqrt(xp.sum(xp.astype(gz * gz, xp.float64), axis=1))
    st = xp.sqrt(xp.sum(xp.astype(tz * tz, xp.float64), axis=1))
    ok = ok & (sg > 0.0) & (st > 0.0)
    sg_safe, st_safe = xp.where(ok, sg, 1.0), xp.where(ok, st, 1.0)
    e = gz * xp.astype(st_safe / sg_safe, xp.float32)[:, None] - tz
    zncc = xp.sum(xp.astype(gz * tz, xp.float64), axis=1) / (sg_safe * st_safe)
    return e, 1.0 - zncc, ok


def _solve(H: Any, b: Any, ok: Any) -> tuple[Any, Any]:
    """``Δp`` with ``H Δp = b`` per row, Jacobi-scaled (``H / (s sᵀ)`` with
    ``s = sqrt(diag H)``), and the mask of the rows that have one: ``ok`` rows with a
    positive diagonal and a finite solution (singular systems fail like
    :func:`numpy.linalg.solve` does in :func:`scalign.kernels.register.refine_level`)."""
    xp = namespace(H)
    P = H.shape[-1]
    diag = xp.stack([H[:, i, i] for i in range(P)], axis=1)
    ok = ok & xp.all(diag > 0.0, axis=1)
    scale = xp.sqrt(xp.where(ok[:, None], diag, 1.0))
    eye = xp.eye(P, dtype=xp.float64)
    A = xp.where(ok[:, None, None], H / (scale[:, :, None] * scale[:, None, :]), eye)
    rhs = xp.where(ok[:, None], b / scale, 0.0)[..., None]
    try:
        x = xp.linalg.solve(A, rhs)[..., 0]
    except np.linalg.LinAlgError:
        # NumPy refuses the whole batch for one singular system: solve one by one
        rows, good = [], to_numpy(ok).copy()
        for k in range(A.shape[0]):
            try:
                rows.append(xp.linalg.solve(A[k], rhs[k])[:, 0])
            except np.linalg.LinAlgError:
                rows.append(xp.zeros(P, dtype=xp.float64))
                good[k] = False
        x = xp.stack(rows)
        ok = xp.asarray(good)
    dp = x / scale
    ok = ok & xp.all(xp.isfinite(dp), axis=1)
    return xp.where(ok[:, None], dp, 0.0), ok


def refine_level(
    images: Any,
    level: Level,
    M: Any,
    ids: Any,
    transform: str,
    loss: str,
    max_iterations: int,
    tol: float,
    spline: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """:func:`scalign.kernels.register.refine_level` for the images ``ids`` of
    ``images`` ``(B, *shape)`` at once, each onto its template's ``level`` (one shared,
    or one per image), starting from their motions in ``M`` ``(B, d + 1, d + 1)``.

    Each iteration works on the images still iterating; one leaves when its increment
    moves no corner of the image by more than ``tol`` (converged), when too few of its
    points stay inside (or, for ``ncc``, its samples are flat), when its system is
    singular, or after ``max_iterations``.

    Returns
    -------
    M : ``(B, d + 1, d + 1)``, updated for ``ids``.
    iterations, converged, loss : ``(B,)``: 0, False and NaN off ``ids``; ``loss`` is the
        last evaluated one.
    """
    xp = namespace(images, M)
    B, d = images.shape[0], images.ndim - 1
    P = level.sd.shape[1]
    Tc = xp.eye(d + 1, dtype=xp.float64)
    Tc[:d, d] = level.center
    Tmc = xp.eye(d + 1, dtype=xp.float64)
    Tmc[:d, d] = -level.center
    source = images if spline is None else spline
    sample = sample_linear if spline is None else sample_cubic
    iterations = xp.zeros(B, dtype=xp.int64)
    converged = xp.zeros(B, dtype=xp.bool)
    losses = xp.full(B, math.nan, dtype=xp.float64)
    for it in range(1, max_iterations + 1):
        if ids.shape[0] == 0:
            break
        Mi = M[ids]
        sd = _pick(level.sd, ids)
        coords = Mi[:, :d, :d] @ _pick(level.points, ids) + Mi[:, :d, d:]
        g, valid = sample(source, ids, xp.flip(coords, axis=1))
        valid = valid & _pick(level.real, ids)
        e, value, ok = _residuals(g, valid, _pick(level.values, ids), loss, P)
        b = (sd @ xp.astype(e, xp.float64)[:, :, None])[:, :, 0]
        H = (sd * xp.astype(valid, xp.float64)[:, None, :]) @ xp.matrix_transpose(sd)
        dp, step = _solve(H, b, ok)
        D = increment_matrices(dp, transform, d)
        moved = level.corners @ xp.matrix_transpose(D[:, :d, :d] - Tc[:d, :d]) + D[:, None, :d, d]
        done = xp.max(xp.sqrt(xp.sum(moved * moved, axis=2)), axis=1) < tol
        M[ids] = xp.where(step[:, None, None], Mi @ (Tc @ xp.linalg.inv(D) @ Tmc), Mi)
        iterations[ids] = it
        losses[ids] = xp.where(ok, value, losses[ids])
        converged[ids] = step & done
        ids = ids[step & ~done]
    return M, iterations, converged, losses


def estimate_motions(
    templates: Templates,
    images: Any,
    loss: str = "mse",
    *,
    max_iterations: int = 50,
    tol: float = 1e-3,
) -> BatchEstimate:
    """Motions ``M_b`` with ``images[b](M_b p) ≈ ref_b(p)`` for every image of ``images``
    ``(B, *shape)`` (NumPy or CuPy; inputs already checked) and its reference in
    ``templates`` (:func:`prepare_templates`: one for all, or one per image).

    The same estimate as :func:`scalign.kernels.register.estimate_motion` with its
    defaults, per image: the coarse search, :func:`refine_level` on every level with
    ``tol`` (full-resolution pixels) on the finest and ``max(COARSE_TOL, tol / 2^l)`` on
    level ``l``, then the cubic polish of the images that converged.
    """
    xp = namespace(images)
    B, d = images.shape[0], images.ndim - 1
    levels = len(templates.pyramid)
    L = levels - 1
    pyramid = _pyramid(images, levels)
    searched = None
    if templates.search is not None:
        searched = search_image(pyramid[templates.search_level], batch=1)
    M = initial_motions(templates, pyramid[L], searched)
    up = xp.asarray(level_map(d, 1))
    up_inv = xp.asarray(np.linalg.inv(level_map(d, 1)))
    everyone = xp.arange(B, dtype=xp.int64)
    total = xp.zeros(B, dtype=xp.int64)
    for lev in range(L, -1, -1):
        if lev < L:
            M = up @ M @ up_inv
        tol_lev = tol if lev == 0 else max(COARSE_TOL, tol / 2.0**lev)
        level = templates.levels[lev]
        M, it, converged, last = refine_level(
            pyramid[lev], level, M, everyone, templates.transform, loss, max_iterations, tol_lev
        )
        total = total + it
    polish = everyone[converged]
    if polish.shape[0]:
        spline = spline_coefficients(pyramid[0])
        M, it, polished, final = refine_level(
            pyramid[0], level, M, polish, templates.transform, loss, max_iterations, tol, spline
        )
        total = total + it
        last = xp.where(converged, final, last)
        converged = polished
    return BatchEstimate(to_numpy(M), to_numpy(total), to_numpy(converged), to_numpy(last))
