"""Projector, Euler angles, CTF and Fourier cropping against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from scalign.kernels.ctf import (
    ctf_half_plane,
    electron_wavelength,
    fourier_crop,
    fourier_crop_volume,
)
from scalign.kernels.euler import euler_to_matrix, matrix_to_euler, viewing_direction
from scalign.kernels.projection import half_plane_frequencies, project, slice_spectra
from scalign.synthetic_em import blob_projections, blob_volume, random_blobs


def random_angles(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)


def ncc(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_euler_round_trip_holds_to_rounding_next_to_the_poles():
    """tilt was arccos(A_22), flat next to 0 and 180: 1e-7° came back as 0 and the
    matrix 1.7e-9 off, not to rounding as documented."""
    tilt = np.array([1e-7, 1e-5, 1e-3, 180 - 1e-7, 180 - 1e-5])
    A = euler_to_matrix(25.0, tilt, -40.0)
    rot, back, psi = matrix_to_euler(A)
    np.testing.assert_allclose(back, tilt, rtol=1e-9)
    np.testing.assert_allclose(euler_to_matrix(rot, back, psi), A, rtol=0, atol=1e-15)


def test_euler_matches_scipy_and_round_trips():
    rot, tilt, psi = random_angles(500)
    tilt[:5], tilt[5:10] = 0.0, 180.0  # the gimbal-locked ends
    A = euler_to_matrix(rot, tilt, psi)
    ref = Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], 1), degrees=True).as_matrix()
    np.testing.assert_allclose(A, np.swapaxes(ref, 1, 2), atol=1e-14)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(A)), A, atol=1e-12)
    np.testing.assert_allclose(viewing_direction(rot, tilt), A[:, 2, :], atol=1e-15)
    # RELION's matrix entries, written out (Euler_angles2matrix)
    a, b, g = np.radians([30.0, 50.0, -70.0])
    assert A.shape == (500, 3, 3)
    B = euler_to_matrix(30.0, 50.0, -70.0)
    assert B[0, 2] == pytest.approx(-np.cos(g) * np.sin(b))
    assert B[2, 0] == pytest.approx(np.sin(b) * np.cos(a))


def test_slice_spectra_equal_a_direct_fourier_sum():
    n, c = 12, 6
    rng = np.random.default_rng(1)
    V = rng.random((n, n, n))
    A = euler_to_matrix(*random_angles(3, seed=2))
    S = slice_spectra(V, A, eps=1e-13)
    ky, kx = half_plane_frequencies(n)
    z, y, x = np.indices(V.shape) - c
    assert S[1, 5, 6] == 0  # |k| > n / 2: beyond Nyquist, not evaluated
    for b, i, j in [(0, 1, 2), (1, 5, 3), (2, 11, 3), (2, 6, 0)]:
        w = A[b].T @ np.array([kx[i, j], ky[i, j], 0.0])  # (x, y, z) cycles per box
        direct = (V * np.exp(-2j * np.pi * (w[0] * x + w[1] * y + w[2] * z) / n)).sum()
        assert abs(direct - S[b, i, j]) < 1e-9 * np.abs(V).sum()


@pytest.mark.parametrize("n", [32, 33])
def test_blob_projections_are_exact(n):
    blobs = random_blobs(8, radius=7.0, sigma=1.8, seed=3)
    A = euler_to_matrix(*random_angles(6, seed=4))
    P = project(blob_volume(blobs, n, np.float64), A, eps=1e-9)
    exact = blob_projections(blobs, n, A)
    assert np.abs(P - exact).max() < 1e-4 * exact.max()
    # shifted: the image is the projection moved by +s (blobs kept inside the box)
    s = np.array([[2.5, -1.25]] * 6)
    P = project(blob_volume(blobs, n, np.float64), A, shifts=s, eps=1e-9)
    assert np.abs(P - blob_projections(blobs, n, A, s)).max() < 5e-4 * exact.max()


@pytest.mark.parametrize("n", [32, 33])
def test_interpolating_projector_is_within_its_documented_error(n):
    """RELION's padded-FFT trilinear projector (the CuPy path without cufinufft): ~1%
    with the gridding correction, shifts and all, against exact blob projections, and
    every projection's mean exact (its k = 0 term is the volume's sum)."""
    blobs = random_blobs(8, radius=7.0, sigma=1.8, seed=3)
    A = euler_to_matrix(*random_angles(6, seed=4))
    s = np.array([[2.5, -1.25]] * 6)
    V = blob_volume(blobs, n, np.float64)
    exact = blob_projections(blobs, n, A, s)
    P = project(V, A, shifts=s, method="interpolate")
    assert P.dtype == np.float64
    error = np.linalg.norm(P - exact) / np.linalg.norm(exact)
    assert error < 0.015
    np.testing.assert_allclose(P.mean(axis=(1, 2)), V.sum() / n**2, rtol=1e-9)
    single = project(V.astype(np.float32), A, shifts=s, method="interpolate")
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, P, atol=1e-5 * np.abs(P).max())


def test_interpolating_projector_transforms_each_volume_once(monkeypatch):
    """Projection matching projects one volume hundreds of times per chunk: its padded
    (2n)³ spectrum is computed once and reused for that array, never for another."""
    from scalign.kernels import projection

    calls = []
    original = projection.padded_spectrum

    def counted(volume, padding=projection.PADDING):
        calls.append(volume.shape)
        return original(volume, padding)

    monkeypatch.setattr(projection, "padded_spectrum", counted)
    blobs = random_blobs(6, radius=6.0, seed=5)
    V = blob_volume(blobs, 16, np.float64)
    W = blob_volume(random_blobs(6, radius=6.0, seed=6), 16, np.float64)
    A = euler_to_matrix(*random_angles(3, seed=7))
    first = project(V, A, method="interpolate")
    again = project(V, A[::-1], method="interpolate")
    assert len(calls) == 1
    np.testing.assert_array_equal(again, first[::-1])
    other = project(W, A, method="interpolate")
    assert len(calls) == 2
    exact = project(W, A, method="nufft")  # W's own projections (~3% at n = 16), not V's
    assert np.linalg.norm(other - exact) / np.linalg.norm(exact) < 0.05
    assert np.linalg.norm(first - exact) / np.linalg.norm(exact) > 0.5


def test_unknown_projection_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        project(np.zeros((8, 8, 8)), np.eye(3)[None], method="fast")


@pytest.mark.parametrize(
    ("volume", "A", "shifts", "message"),
    [
        ((16, 16, 15), (1, 3, 3), None, "volume must be a cubic"),
        ((16, 16), (1, 3, 3), None, "volume must be a cubic"),
        ((16, 16, 16), (3, 3), None, "A must be \\(B, 3, 3\\)"),
        ((16, 16, 16), (2, 3, 3), (2,), "shifts must be \\(B, 2\\) = \\(2, 2\\)"),
    ],
)
def test_bad_shapes_are_clear_errors(volume, A, shifts, message):
    """A (16, 16, 15) map was projected as if cubic (off-centre along x), one (3, 3)
    matrix or (2,) shifts failed inside with IndexError."""
    A = np.broadcast_to(np.eye(3), A)
    shifts = None if shifts is None else np.zeros(shifts)
    with pytest.raises(ValueError, match=message):
        project(np.ones(volume), A, shifts)


def test_identity_orientation_is_the_sum_along_z():
    blobs = random_blobs(6, radius=6.0, sigma=2.0, seed=5)
    V = blob_volume(blobs, 32, np.float64)
    P = project(V, np.eye(3)[None], eps=1e-10)[0]
    np.testing.assert_allclose(P, V.sum(axis=0), atol=1e-6 * V.sum(axis=0).max())


def test_agrees_with_real_space_rotate_and_sum():
    n, c = 32, 16
    V = blob_volume(random_blobs(10, radius=8.0, sigma=1.6, seed=6), n, np.float64)
    A = euler_to_matrix(*random_angles(4, seed=7))
    P = project(V, A)
    grid = (np.indices((n, n, n)).reshape(3, -1)[::-1] - c).astype(float)  # frame (x, y, z)
    for a, p in zip(A, P, strict=True):
        coords = (a.T @ grid + c)[::-1]  # volume (z, y, x) index order
        ref = ndimage.map_coordinates(V, coords, order=3).reshape(n, n, n).sum(axis=0)
        assert ncc(p, ref) > 0.9999


def test_float32_volumes_project_in_float32():
    A = euler_to_matrix(*random_angles(2, seed=9))
    P = project(blob_volume(random_blobs(seed=8), 32), A, eps=1e-4)
    assert P.dtype == np.float32
    exact = blob_projections(random_blobs(seed=8), 32, A)
    assert np.abs(P - exact).max() < 1e-3 * exact.max()


def test_ctf_formula_first_zero_and_astigmatism():
    n, px = 64, 2.0
    lam = electron_wavelength(300.0)
    assert lam == pytest.approx(0.019687, abs=1e-6)  # 300 kV
    H = ctf_half_plane(n, px, [10000.0], [10000.0], [0.0], cs=0.0, amplitude_contrast=0.0)[0]
    ky, kx = half_plane_frequencies(n)
    u2 = (kx**2 + ky**2) / (n * px) ** 2
    np.testing.assert_allclose(H, np.sin(np.pi * lam * 10000.0 * u2), atol=1e-12)
    # positive at low frequency (amplitude contrast) and astigmatic: written out per pixel
    du, dv, angle, w = 15000.0, 9000.0, 30.0, 0.1
    H = ctf_half_plane(n, px, [du], [dv], [angle], amplitude_contrast=w)[0]
    assert H[0, 0] == pytest.approx(w)
    expected = np.empty_like(H)
    for (r, k), _ in np.ndenumerate(H):
        ux, uy = kx[r, k] / (n * px), ky[r, k] / (n * px)
        d = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * (np.arctan2(uy, ux) - np.radians(30)))
        q = ux * ux + uy * uy
        chi = np.pi * lam * d * q - 0.5 * np.pi * 2.7e7 * lam**3 * q * q + np.arcsin(w)
        expected[r, k] = np.sin(chi)
    np.testing.assert_allclose(H, expected, atol=1e-12)


def test_ctf_phase_shift_bfactor_and_scale_per_image_as_relion_writes_them():
    """RELION's ctf.h: ``scale · exp(-B u²/4) · sin χ`` with the phase shift inside χ,
    written out here per pixel, each parameter one per image."""
    n, px = 32, 1.5
    lam = electron_wavelength(200.0)
    du, dv, angle = [12000.0, 9000.0], [11000.0, 9500.0], [10.0, -40.0]
    phase, bfactor, scale = [0.0, 90.0], [0.0, 120.0], [1.0, 0.6]
    H = ctf_half_plane(
        n, px, du, dv, angle, voltage=200.0, cs=2.0, amplitude_contrast=0.07,
        phase_shift=phase, bfactor=bfactor, scale=scale,
    )  # fmt: skip
    ky, kx = half_plane_frequencies(n)
    for i in range(2):
        ux, uy = kx / (n * px), ky / (n * px)
        q = ux * ux + uy * uy
        azimuth = np.arctan2(uy, ux) - np.radians(angle[i])
        d = 0.5 * (du[i] + dv[i]) + 0.5 * (du[i] - dv[i]) * np.cos(2 * azimuth)
        chi = np.pi * lam * d * q - 0.5 * np.pi * 2e7 * lam**3 * q * q
        chi += np.radians(phase[i]) + np.arctan(0.07 / np.sqrt(1 - 0.07**2))
        expected = scale[i] * np.exp(-bfactor[i] / 4 * q) * np.sin(chi)
        np.testing.assert_allclose(H[i], expected, atol=1e-12)
    assert H[1, 0, 0] == pytest.approx(0.6 * np.cos(np.arcsin(0.07)))  # 90°: sin → cos


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("voltage", 0.0, "voltage must be positive"),
        ("amplitude_contrast", 10.0, r"amplitude_contrast must be a fraction in \[0, 1\)"),
        ("amplitude_contrast", 1.0, "amplitude_contrast must be a fraction"),
        ("pixel_size", 0.0, "pixel_size must be positive"),
        ("cs", float("nan"), "cs must be finite"),
    ],
)
def test_ctf_constants_no_microscope_has_are_errors(name, value, message):
    kwargs = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1} | {name: value}
    px = kwargs.pop("pixel_size", 1.0)
    with pytest.raises(ValueError, match=message):
        ctf_half_plane(16, px, [1e4], [1e4], [0.0], **kwargs)


def test_ctf_values_of_different_lengths_are_a_clear_error():
    """Three defocus_u and two defocus_v gave numpy's broadcasting error, naming neither."""
    with pytest.raises(ValueError, match=r"one B: \{'defocus_u': \(3,\), 'defocus_v': \(2,\)"):
        ctf_half_plane(16, 1.0, [1e4, 2e4, 3e4], [1e4, 2e4], 0.0)
    # numbers and (B,) arrays mix as before
    one = ctf_half_plane(16, 1.0, [1e4, 2e4], 1.5e4, 10.0, bfactor=[0.0, 50.0])
    two = ctf_half_plane(16, 1.0, [1e4, 2e4], [1.5e4, 1.5e4], [10.0, 10.0], bfactor=[0.0, 50.0])
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize(("n", "m"), [(64, 32), (63, 21), (48, 40)])
def test_fourier_crop_samples_the_band_limited_image(n, m):
    y, x = np.indices((n, n)) - n // 2
    sigma, q = 4.0, (3.0, -5.0)
    img = np.exp(-((x - q[0]) ** 2 + (y - q[1]) ** 2) / (2 * sigma**2))
    f = n / m
    y2, x2 = np.indices((m, m)) - m // 2
    expected = np.exp(-((x2 - q[0] / f) ** 2 + (y2 - q[1] / f) ** 2) / (2 * (sigma / f) ** 2))
    out = fourier_crop(img[None], m)[0]
    assert np.abs(out - expected).max() < 1e-3
    assert out.mean() * m * m == pytest.approx(img.mean() * n * n / f**2, rel=1e-6)


def test_fourier_crop_volume_of_blobs():
    blobs = random_blobs(6, radius=10.0, sigma=3.0, seed=10)
    big = blob_volume(blobs, 48, np.float64)
    half = blobs._replace(centers=blobs.centers / 2, sigma=1.5)
    np.testing.assert_allclose(
        fourier_crop_volume(big, 24), blob_volume(half, 24, float), atol=2e-3
    )
