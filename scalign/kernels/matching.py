"""Projection matching: the orientation and shift of each image against one volume.

1. **Global search** over a gallery of projections at the orientations of a grid (every
   ``step`` degrees over the asymmetric unit, with in-plane angles): for each image and
   gallery projection the cross-correlation over all shifts up to ``max_shift`` pixels is
   one FFT product, :math:`c(s) = \\mathrm{IDFT}[\\hat I\\, \\mathrm{CTF}\\, \\overline{\\hat
   P}](s) / (\\lVert I \\rVert \\lVert P \\rVert)` (the CTF, when given, filters the image
   side: :math:`\\sum \\hat I \\overline{\\mathrm{CTF}\\, \\hat P} = \\sum \\mathrm{CTF}\\,
   \\hat I\\, \\overline{\\hat P}` as the CTF is real); the best gallery entry and its
   integer shift start the refinement (the ``candidates`` best entries, each refined).
2. **Local refinement** of the three angles and two shifts: pattern search over small
   rotations ``R_a(±δ) A`` about the projection frame's ``x``, ``y``, ``z`` axes (no Euler
   singularity at ``tilt = 0``), each candidate's shift from its cross-correlation peak
   (parabolic sub-pixel refinement within one pixel of the peak); ``δ`` starts at half
   the grid step and halves whenever no candidate improves, down to ``final_step``.

All projections of one call share one non-uniform FFT of the volume per batch
(:func:`scalign.kernels.projection.slice_spectra`). With a CuPy volume and CuPy images the
projections, FFTs and correlation peaks are computed on the GPU; the bookkeeping of the
search (orientations, candidates, steps: a few numbers per image) stays on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scalign._array import clamp, namespace, to_numpy
from scalign.kernels.projection import centering_phase, half_plane_frequencies, slice_spectra

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


def _parts(count: int, item_bytes: int) -> list[slice]:
    """Consecutive slices of ``count`` items, each under :data:`_CORRELATION_BUDGET`."""
    step = max(1, _CORRELATION_BUDGET // max(1, item_bytes))
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


def _peak(cc: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Best shift (x, y) within ``max_shift`` of cross-correlations ``(..., n, n)`` (DFT
    order: index ``j`` is the shift ``j`` or ``j - n``), refined by a parabola through the
    peak and its neighbours along each axis, and the peak value."""
    xp = namespace(cc)
    n = cc.shape[-1]
    k_host = np.fft.fftfreq(n) * n
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


def _newton_shift(G: np.ndarray, shift: np.ndarray, n: int, steps: int = 2) -> tuple:
    """Maximise the trigonometric interpolant of a cross-correlation,
    :math:`c(s) = \\frac{1}{n^2} \\sum_k w_k \\mathrm{Re}(G_k e^{2\\pi i k \\cdot s / n})`
    (``G`` its half-plane spectrum, ``w_k`` = 2 for the columns that stand for a conjugate
    pair too), by Newton steps from ``shift``; returns the shift and ``c`` there."""
    xp = namespace(G)
    ky, kx = half_plane_frequencies(n)
    w = np.full(kx.shape[1], 2.0)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    k_host = np.stack([kx, ky]) * (2 * np.pi / n)  # (2, n, m) radians per pixel
    k = xp.asarray(k_host)
    # the separable axes: (m,) and (n,)
    fx, fy = xp.asarray(k_host[0, 0]), xp.asarray(np.ascontiguousarray(k_host[1, :, 0]))
    Gw = G * xp.asarray(w / (n * n))
    s = xp.asarray(shift, copy=True)
    for _ in range(steps + 1):
        # exp(i (k_x s_x + k_y s_y)) as the product of two 1-D phase ramps
        ex = xp.exp(1j * fx * s[..., 0, None])[..., None, :]
        ey = xp.exp(1j * fy * s[..., 1, None])[..., :, None]
        e = Gw * ey * ex
        value = xp.sum(xp.real(e), axis=(-2, -1))
        if _ == steps:
            break
        ie = 1j * e
        grad = xp.stack([xp.sum(xp.real(ie * k[a]), axis=(-2, -1)) for a in range(2)], axis=-1)
        hess = xp.empty(s.shape + (2,), dtype=value.dtype)
        for a in range(2):
            for b in range(2):
                hess[..., a, b] = -xp.sum(xp.real(e * k[a] * k[b]), axis=(-2, -1))
        det = hess[..., 0, 0] * hess[..., 1, 1] - hess[..., 0, 1] ** 2
        ok = (hess[..., 0, 0] < 0) & (det > 0)
        safe = xp.where(ok, det, 1.0)
        dx = (hess[..., 1, 1] * grad[..., 0] - hess[..., 0, 1] * grad[..., 1]) / safe
        dy = (hess[..., 0, 0] * grad[..., 1] - hess[..., 0, 1] * grad[..., 0]) / safe
        step = xp.where(ok[..., None], -xp.stack([dx, dy], axis=-1), 0.0)
        s = s + clamp(step, -0.5, 0.5)
    return s, value


def _correlate(
    spectra_img: np.ndarray,
    norms_img: np.ndarray,
    P_spectra: np.ndarray,
    n: int,
    max_shift: float,
    subpixel: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cross-correlation peaks of images ``(B, ...)`` with projections given by
    their centred half-plane spectra ``(B, K, ...)`` (mean removed): shifts ``(B, K, 2)``
    and scores ``(B, K)``. With ``subpixel`` both are at the continuous optimum of the
    shift (Newton steps on the correlation's trigonometric interpolant from the integer
    peak), so that candidates compare at their best sub-pixel alignment; without, the
    score is the integer peak's (the global search, which only ranks candidates)."""
    xp = namespace(P_spectra)
    P = xp.fft.irfft2(P_spectra, s=(n, n))
    norms_p = xp.sqrt(xp.sum(P * P, axis=(-2, -1)))
    # the image is P moved by s: c(s) = sum_p I(p) P(p - s) = IDFT[Î conj(P̂)](s)
    G = spectra_img[:, None] * xp.conj(P_spectra)
    shift, peak = _peak(xp.fft.irfft2(G, s=(n, n)), max_shift)
    if subpixel:
        shift, peak = _newton_shift(G, shift, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = peak / (norms_img[:, None] * norms_p)
    # the search's bookkeeping is on the host: a few numbers per image and candidate
    score = to_numpy(score)
    return to_numpy(shift), np.where(np.isnan(score), -np.inf, score)


def _centred_projection_spectra(volume: np.ndarray, A: np.ndarray, eps: float) -> np.ndarray:
    """Half-plane spectra of the projections at ``A``, origin at pixel 0 (no shift), with
    the mean (DC term) removed and frequencies beyond Nyquist cut."""
    n = volume.shape[0]
    S = slice_spectra(volume, A, eps)
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
    """
    xp = namespace(volume, images)
    B, n = images.shape[0], images.shape[-1]
    gallery = to_numpy(gallery)
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
    for start in range(0, len(gallery), _GALLERY_BLOCK):
        block = gallery[start : start + _GALLERY_BLOCK]
        P = _centred_projection_spectra(volume, block, eps)
        shift = np.empty((B, len(block), 2))
        score = np.empty((B, len(block)))
        for part in _parts(B, _SEARCH_BYTES * n * n * len(block)):
            Pp = P[None] if ctf is None else P[None] * ctf[part, None]
            shift[part], score[part] = _correlate(
                F[part], norms[part], Pp, n, max_shift, subpixel=False
            )
        # keep the K best gallery entries of each image so far
        pool = np.concatenate([best_score, score], axis=1)
        top = np.argsort(-pool, axis=1)[:, :K]
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
        on_device = xp.asarray(owner)
        Fc, normc = F[on_device], norms[on_device]
        ctfc = None if ctf is None else ctf[on_device]
        delta = np.full(B * K, step / 2.0)
        active = np.isfinite(scores)
        for _ in range(max_rounds):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            rounds[idx] += 1
            # the current orientation and six small rotations about the frame axes
            cand = [A[idx]]
            for axis in range(3):
                for sign in (-1.0, 1.0):
                    cand.append(_axis_rotations(axis, sign * delta[idx]) @ A[idx])
            cand = np.stack(cand, axis=1)
            shift = np.empty((idx.size, 7, 2))
            score = np.empty((idx.size, 7))
            for part in _parts(idx.size, 7 * _REFINE_BYTES * n * n):
                P = _centred_projection_spectra(volume, cand[part].reshape(-1, 3, 3), eps)
                P = xp.reshape(P, (-1, 7, n, n // 2 + 1))
                rows_idx = xp.asarray(idx[part])
                if ctfc is not None:
                    P = P * ctfc[rows_idx, None]
                shift[part], score[part] = _correlate(
                    Fc[rows_idx], normc[rows_idx], P, n, max_shift
                )
            r = np.arange(idx.size)
            k = np.argmax(score, axis=1)
            improved = (k > 0) & (score[r, k] > score[:, 0])
            pick = np.where(improved, k, 0)
            A[idx] = cand[r, pick]
            shifts[idx] = shift[r, pick]
            scores[idx] = score[r, pick]
            # no better neighbour: halve the step; below final_step the candidate is done
            delta[idx[~improved]] /= 2.0
            active[idx[~improved & (delta[idx] < final_step)]] = False
    best = np.argmax(scores.reshape(B, K), axis=1) + np.arange(B) * K
    return Match(A[best], shifts[best], scores[best], rounds[best])
