"""The projection-matching kernel's parts: correlations at a few shifts as one matrix
product, Newton's sub-pixel shift, and the refinement's pruning of candidates."""

from __future__ import annotations

import numpy as np
import pytest

from scalign.kernels import matching
from scalign.kernels.ctf import ctf_half_plane
from scalign.kernels.euler import euler_to_matrix
from scalign.kernels.matching import match_images
from scalign.kernels.orientations import orientation_grid, symmetry_distance
from scalign.kernels.projection import centering_phase, project
from scalign.synthetic_em import blob_volume, random_blobs, simulate_particles

N = 32
BLOBS = random_blobs(10, radius=8.0, sigma=1.8, seed=1)


@pytest.mark.parametrize(("n", "max_shift"), [(32, 0.0), (32, 2.0), (33, 3.5), (64, 6.0)])
def test_the_shift_grid_holds_the_disk_and_its_neighbours(n, max_shift):
    grid = matching._shift_grid(n, max_shift)
    x, y = grid.shifts.T
    within = x**2 + y**2 <= max_shift**2
    # every integer shift of the disk, once, and only those are allowed
    r = int(max_shift)
    disk = sum(
        1 for i in range(-r, r + 1) for j in range(-r, r + 1) if i * i + j * j <= max_shift**2
    )
    assert np.flatnonzero(within).tolist() == sorted(grid.allowed.tolist())
    assert len(grid.allowed) == disk == len({tuple(s) for s in grid.shifts[grid.allowed]})
    # each allowed shift's four neighbours are in the grid, at the right offsets
    units = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])
    for j in grid.allowed:
        assert np.all(grid.neighbours[j] >= 0)
        np.testing.assert_array_equal(grid.shifts[grid.neighbours[j]] - grid.shifts[j], units)
    # and nothing else: every grid shift is allowed or next to one
    near = np.abs(grid.shifts[:, None] - grid.shifts[None, grid.allowed]).sum(-1).min(1) <= 1
    assert near.all()


def test_no_shift_grid_where_shifts_would_wrap_or_an_fft_is_cheaper():
    assert matching._shift_grid(8, 3.0) is None  # ±4 reaches the other side of an 8² box
    # ~1,300 shifts over the whole spectrum of 256²: one inverse FFT wins ...
    assert matching._shift_grid(256, 20.0) is None
    assert matching._shift_grid(256, 2.0) is not None
    # ... but not over the search's band of a 15° step (222 points)
    assert matching._band_points(256, 11.5) == matching._band_points(32, 11.5) == 222
    assert matching._shift_grid(256, 20.0, radius=11.5) is not None


@pytest.mark.parametrize("max_shift", [0.0, 3.2, 7.5])
def test_the_correlation_peak_is_the_best_allowed_shift(max_shift):
    """The peak read from a window of the inverse FFT (or, where the window would wrap, the
    whole map) is the brute-force best over the shifts within max_shift, and the parabola
    moves it by at most half a pixel."""
    n = 16
    cc = np.random.default_rng(4).normal(size=(6, n, n))
    shift, peak = matching._peak(cc, max_shift)
    for b in range(6):
        best = max(
            (cc[b, y % n, x % n], x, y)
            for x in range(-n // 2, n // 2)
            for y in range(-n // 2, n // 2)
            if x * x + y * y <= max_shift**2
        )
        assert peak[b] == best[0]
        assert np.abs(shift[b] - best[1:]).max() <= 0.5


def _spectra(n=N, count=3, seed=0):
    """Half-plane spectra of projections, a CTF per image and noisy shifted images."""
    rng = np.random.default_rng(seed)
    A = euler_to_matrix(*rng.uniform(-180, 180, (3, count)))
    P = matching._centred_projection_spectra(blob_volume(BLOBS, n), A, 1e-6)
    H = ctf_half_plane(n, 3.0, *rng.uniform(8000, 20000, (2, count)), rng.uniform(0, 90, count))
    images = np.fft.irfft2(P * centering_phase(n, rng.uniform(-2, 2, (count, 2))), s=(n, n))
    images += rng.normal(0, 0.05 * images.std(), images.shape)
    F, norms = matching._image_spectra(images.astype(np.float32))
    return F, norms, H.astype(np.float32), P


@pytest.mark.parametrize("radius", [np.inf, 6.0])
def test_grid_correlations_equal_the_inverse_fft_at_every_shift(radius):
    """The search's matrix product gives the inverse FFT's correlation, its peak, shift and
    normalised score, for every image × projection, with and without a CTF, over the
    whole spectrum or a band (the projections zero beyond it)."""
    F, norms, H, P = _spectra()
    ky, kx = np.meshgrid(np.fft.fftfreq(N) * N, np.fft.rfftfreq(N) * N, indexing="ij")
    P = np.where(kx**2 + ky**2 <= radius**2, P, 0)
    grid = matching._shift_grid(N, 2.5)
    for ctf in (None, H):
        direct = matching._search(matching._search_images(F, ctf, N, radius, grid), P, N, 2.5, grid)
        fft = matching._search(matching._search_images(F, ctf, N, radius, None), P, N, 2.5, None)
        np.testing.assert_allclose(direct[1], fft[1], rtol=2e-5)
        # the sub-pixel parabola divides round-off by the peak's curvature
        np.testing.assert_allclose(direct[0], fft[0], atol=2e-3)
        # fewer images than projections: the images are the side moved by every shift
        few = matching._search_images(F[:2], None if ctf is None else ctf[:2], N, radius, grid)
        two = matching._search(few, P, N, 2.5, grid)
        np.testing.assert_allclose(two[1], direct[1][:2], rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(two[0], direct[0][:2], atol=2e-3)
        # and against float64 brute force: the best of sum_p I(p) P(p - s) / norms over the
        # integer shifts within 2.5 pixels, the images low-passed to the band too
        Pp = P if ctf is None else P[None] * ctf[:, None]
        low = np.where(kx**2 + ky**2 <= radius**2, F.astype(np.complex128), 0)
        images = np.fft.irfft2(low, s=(N, N))
        proj = np.fft.irfft2(np.broadcast_to(Pp, (3, 3) + P.shape[1:]), s=(N, N))
        disk = [(x, y) for x in range(-2, 3) for y in range(-2, 3) if x * x + y * y <= 6.25]
        for b in range(3):
            for g in range(3):
                c = max(np.sum(images[b] * np.roll(proj[b, g], (y, x), (0, 1))) for x, y in disk)
                c /= np.linalg.norm(images[b]) * np.linalg.norm(proj[b, g])
                assert direct[1][b, g] == pytest.approx(c, rel=1e-4, abs=1e-6)


def test_the_search_band_follows_the_step_within_its_limits():
    """3 radians per cycle of the step: 11.5 cycles at 15°, Nyquist at 5° on 64², never
    below 8 cycles; and the band's slices are the whole slices low-passed."""
    assert matching._search_radius(64, 15.0) == pytest.approx(3 / np.radians(15.0))
    assert matching._search_radius(64, 5.0) == 32.0
    assert matching._search_radius(32, 30.0) == 8.0
    A = euler_to_matrix(*np.random.default_rng(1).uniform(-180, 180, (3, 4)))
    V = blob_volume(BLOBS, N)
    whole = matching._centred_projection_spectra(V, A, 1e-6)
    band = matching._centred_projection_spectra(V, A, 1e-6, 6.0)
    ky, kx = np.meshgrid(np.fft.fftfreq(N) * N, np.fft.rfftfreq(N) * N, indexing="ij")
    inside = kx**2 + ky**2 <= 36.0
    np.testing.assert_allclose(band, np.where(inside, whole, 0), atol=1e-6 * np.abs(whole).max())
    assert np.all(band[:, ~inside] == 0)


def test_newton_finds_a_known_sub_pixel_shift():
    """An image's spectrum against itself moved by s0: the correlation's interpolant peaks
    at exactly s0, with the image's squared norm there."""
    F, norms, _, _ = _spectra(count=4, seed=3)
    F = F.astype(np.complex128)
    s0 = np.array([[0.3, -0.45], [-1.7, 2.2], [0.0, 0.49], [2.5, -2.5]])
    ky, kx = np.meshgrid(np.fft.fftfreq(N) * N, np.fft.rfftfreq(N) * N, indexing="ij")
    ramp = np.exp(-2j * np.pi * (kx * s0[:, 0, None, None] + ky * s0[:, 1, None, None]) / N)
    moved = F * ramp  # the image moved by +s0
    G = moved[:, None] * np.conj(F[:, None])  # c(s) = sum_p moved(p) I(p - s): peak at s0
    s, value = matching._newton_shift(
        G, np.round(s0)[:, None], matching._refinement(N, None, np, G.dtype), steps=6
    )
    np.testing.assert_allclose(s[:, 0], s0, atol=1e-7)
    np.testing.assert_allclose(value[:, 0], norms.astype(np.float64) ** 2, rtol=1e-6)


def test_the_model_optimum_is_the_vertex_of_each_axis_parabola():
    """Scores from an exact separable quadratic: the model optimum is its vertex, bracketed
    when every vertex lies within the probes; clipped to one step (not bracketed) beyond
    them; one step to the better side where a parabola opens upwards; no move along an
    axis whose probe scored -inf."""
    A = euler_to_matrix(np.array([30.0, -100.0]), np.array([40.0, 120.0]), np.array([5.0, 60.0]))
    delta = np.array([2.0, 0.5])
    tau = np.array([[0.3, -0.2, 0.7], [1.5, 0.4, 0.0]])  # the vertex, in steps

    def f(t):
        return 0.9 - 0.01 * np.sum((t - tau) ** 2, axis=-1)

    probes = [np.zeros(3)] + [s * np.eye(3)[a] for a in range(3) for s in (-1.0, 1.0)]
    score = np.stack([f(p) for p in probes], axis=1)
    optimum, bracketed = matching._model_optimum(A, score, delta)
    t = np.clip(tau, -1, 1)
    for i in range(2):
        R = A[i]
        for axis in range(3):
            R = matching._axis_rotations(axis, np.array(t[i, axis] * delta[i])) @ R
        np.testing.assert_allclose(optimum[i], R, atol=1e-12)
    assert bracketed.tolist() == [True, False]
    # upwards along y (a minimum there): one step towards the better probe; -inf along z
    score[0, 3:5] = [0.95, 0.91]
    score[0, 6] = -np.inf
    optimum, bracketed = matching._model_optimum(A[:1], score[:1], delta[:1])
    R = (
        matching._axis_rotations(1, np.array(-2.0))
        @ matching._axis_rotations(0, np.array(0.6))
        @ A[0]
    )
    np.testing.assert_allclose(optimum[0], R, atol=1e-12)
    assert not bracketed[0]


def test_candidates_within_each_others_step_keep_only_the_better():
    """Image 0: candidates 0 and 1 are 0.3° apart with steps of 0.5° (1 is worse: dropped);
    2 is 40° away (kept); 3 is inactive. Image 1: 0 and 1 are 0.3° apart but 1's step is
    0.2° (both kept); its 3 and 4 are inactive."""
    R = euler_to_matrix(np.array([10.0, 10.3, 50.0, 10.1] * 2), np.zeros(8), np.zeros(8))
    scores = np.array([0.9, 0.8, 0.95, 0.99, 0.8, 0.9, 0.1, 0.1])
    delta = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.5, 0.5])
    active = np.array([True, True, True, False, True, True, False, False])
    dropped = matching._overtaken(R, scores, delta, active, 4)
    assert dropped.tolist() == [False, True, False, False, False, False, False, False]
    # equal scores: the first is kept
    same = np.array([0.9, 0.9, 0.5, 0.5])
    assert matching._overtaken(R[:4], same, delta[:4], active[:4], 4).tolist() == [
        False,
        True,
        False,
        False,
    ]


def test_direct_and_fft_correlations_match_the_same_orientations(monkeypatch):
    """The whole matcher with the direct correlations and with inverse FFTs only finds the
    same orientations and shifts (to float32 round-off in the peaks), both near the truth."""
    parts = simulate_particles(BLOBS, N, 6, noise=0.2, max_shift=2.0, ctf=True, seed=8)
    st = parts.stack
    H = ctf_half_plane(N, 3.0, st.defocus_u, st.defocus_v, st.defocus_angle)
    gallery = euler_to_matrix(*orientation_grid(20.0))
    args = (blob_volume(BLOBS, N), st.images.values, gallery)
    direct = match_images(*args, ctf=H, step=20.0, max_shift=3)
    monkeypatch.setattr(matching, "_DIRECT_COST", 0.0)
    fft = match_images(*args, ctf=H, step=20.0, max_shift=3)
    assert symmetry_distance(direct.A, fft.A, "C1").max() < 0.05
    np.testing.assert_allclose(direct.shifts, fft.shifts, atol=5e-3)
    np.testing.assert_allclose(direct.score, fft.score, rtol=1e-5)
    # at this noise on 32² images the matches are within ~1°
    assert symmetry_distance(direct.A, parts.A, "C1").max() < 1.5


def test_an_exact_projection_of_an_even_box_scores_one():
    """A volume with content up to Nyquist (white noise) in an even box: its slices' lone
    Nyquist entries are complex, which no real image's spectrum is. The images are the
    volume's own projections at gallery orientations: their normalised correlation at the
    search's integer shift is 1, as the real projections' norms are the ones that count
    (with the slices' imaginary parts in the norms: 1 - 1.1e-3). Refined, the sub-pixel
    interpolant moves it by a few 1e-6."""
    n = 32
    volume = np.random.default_rng(7).normal(size=(n, n, n)).astype(np.float32)
    gallery = euler_to_matrix(*orientation_grid(30.0))[::50]
    images = project(volume, gallery[:4])
    for refine, atol in ((False, 5e-7), (True, 1e-5)):
        fit = match_images(volume, images, gallery, step=30.0, max_shift=1, refine=refine)
        assert symmetry_distance(fit.A, gallery[:4], "C1").max() < 0.1
        np.testing.assert_allclose(fit.score, 1.0, atol=atol)


@pytest.mark.parametrize(("n", "shift"), [(77, 38), (93, 46), (28, 13)])
def test_the_whole_map_peak_reaches_a_shift_of_exactly_max_shift(n, shift):
    """Where the window would wrap, the whole map is searched: a peak exactly max_shift
    away along an axis is inside, and its shift is a whole number."""
    cc = np.zeros((2, n, n))
    cc[0, 0, shift] = 1.0  # x = shift
    cc[1, n - shift, 0] = 1.0  # y = -shift
    assert matching._shift_grid(n, float(shift), square=True) is None
    found, peak = matching._peak(cc, float(shift))
    np.testing.assert_array_equal(found, [[shift, 0], [0, -shift]])
    np.testing.assert_array_equal(peak, 1.0)


@pytest.mark.parametrize(("ctf", "max_shift"), [(False, 3.0), (True, 3.0), (True, 15.5)])
def test_an_empty_batch_matches_to_empty_results(ctf, max_shift):
    """No images, no matches (as before the rewrite): the direct search's flattened spectra
    of an empty batch were reshaped with -1, which NumPy cannot infer for size 0."""
    images = np.zeros((0, N, N), dtype=np.float32)
    H = np.zeros((0, N, N // 2 + 1), dtype=np.float32) if ctf else None
    gallery = euler_to_matrix(*orientation_grid(30.0))
    fit = match_images(
        blob_volume(BLOBS, N), images, gallery, ctf=H, step=30.0, max_shift=max_shift
    )
    assert [a.shape for a in fit] == [(0, 3, 3), (0, 2), (0,), (0,)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gallery": np.zeros((0, 3, 3))}, r"gallery must be \(G >= 1, 3, 3\)"),
        ({"gallery": np.eye(3)}, r"gallery must be \(G >= 1, 3, 3\)"),
        ({"step": 0.0}, "step must be a positive number of degrees"),
        ({"final_step": float("nan")}, "final_step must be a positive number of degrees"),
        ({"max_shift": -1.0}, "max_shift must be >= 0 pixels"),
    ],
)
def test_bad_search_settings_are_clear_errors(change, message):
    """The kernel is public through scalign.kernels: a negative max_shift made a shift
    grid without the peak's neighbours (read as index -1), an empty gallery failed deep
    inside numpy."""
    V = blob_volume(BLOBS, 16)
    images = np.random.default_rng(0).normal(size=(2, 16, 16))
    args = {"gallery": euler_to_matrix(*orientation_grid(30.0)), "step": 30.0, "max_shift": 2.0}
    args |= change
    gallery = args.pop("gallery")
    with pytest.raises(ValueError, match=message):
        match_images(V, images, gallery, **args)
