"""Batched registration (the GPU path, run here on NumPy): every step equals the per-image
estimate of scalign.kernels.register, and known motions are recovered."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scalign.kernels import register as single
from scalign.kernels import register_batch as batch
from scalign.kernels.affine import build_affine_matrix, image_center, invert, pull_matrix

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def camera():
    img = skimage_data.camera().astype(np.float32)
    return ndimage.zoom(img, 0.5, order=1)  # 256 x 256: three pyramid levels


def moved(img, M):
    return ndimage.affine_transform(img, *pull_matrix(M), order=3, mode="nearest")


def motions(shape, scale=1.0):
    """Rotations on both sides of ±90° (the coarse search's 180° ambiguity), shifts."""
    c = image_center(shape)
    return [
        build_affine_matrix(theta, tx, ty, scale, scale, center=c)
        for theta, tx, ty in [(0, 3.3, -2.6), (25, -6.5, 4.0), (-130, 5.25, 7.5), (160, -2, -9)]
    ]


def assert_same(refs, transform, images, loss, fitted=slice(None)):
    """The batched estimate of ``images`` onto ``refs`` (one, or one per image) against
    the per-image one: the same iterations and outcome per image, the same motions and
    losses for the images ``fitted`` (an unconverged fit of an ill-posed image wanders
    off by rounding)."""
    out = batch.estimate_motions(batch.prepare_templates(refs, transform), images, loss)
    templates = [single.prepare_template(r, transform) for r in refs]
    fits = [
        single.estimate_motion(templates[k % len(refs)], im, loss) for k, im in enumerate(images)
    ]
    matrix = np.stack([f.matrix for f in fits])
    iterations = np.array([sum(f.iterations) for f in fits])
    converged = np.array([f.converged for f in fits])
    losses = np.array([f.loss for f in fits])
    np.testing.assert_array_equal(out.iterations, iterations)
    np.testing.assert_array_equal(out.converged, converged)
    np.testing.assert_allclose(out.matrix[fitted], matrix[fitted], atol=1e-4)
    np.testing.assert_allclose(out.loss[fitted], losses[fitted], rtol=1e-3, atol=1e-9)
    return out


@pytest.mark.parametrize(
    "transform, loss",
    [
        ("translation", "mse"),
        ("rigid", "mse"),
        ("rigid", "ncc"),
        ("similarity", "mse"),
        ("affine", "ncc"),
    ],
)
def test_batch_equals_per_image_and_recovers_the_motions(camera, transform, loss):
    scale = 1.08 if transform in ("similarity", "affine") else 1.0
    truth = motions(camera.shape, scale)
    if transform == "translation":
        truth = [np.eye(3)] + [build_affine_matrix(0, t, -t / 2) for t in (4.25, -7.5, 11.0)]
    images = np.stack([moved(camera, M) for M in truth])
    out = assert_same(camera[None], transform, images, loss)
    c = image_center(camera.shape)
    for M_est, M in zip(out.matrix, truth, strict=True):
        E = M_est @ invert(M)
        # the centre lands within 0.02 px, the corners within 0.05 px (edge-extended warps)
        assert np.abs(E[:2, :2] @ c + E[:2, 2] - c).max() < 0.02
        assert np.abs(E[:2, :2] - np.eye(2)).max() * c.max() < 0.05
    assert out.converged.all()


def test_coarse_search_picks_the_same_candidates(camera):
    template = single.prepare_template(camera, "similarity")
    templates = batch.prepare_templates(camera[None], "similarity")
    images = np.stack([moved(camera, M) for M in motions(camera.shape, 0.9)])
    pyramid = [images]
    for _ in range(len(template.pyramid) - 1):
        pyramid.append(single.downsample(pyramid[-1], batch=1))
    searched = single.search_image(pyramid[template.search_level], batch=1)
    starts = batch.initial_motions(templates, pyramid[-1], searched)
    for k in range(len(images)):
        expected = single.initial_motion(template, pyramid[-1][k], searched[k])
        np.testing.assert_allclose(starts[k], expected, atol=1e-5)  # float32 maps
    # 160° and 0.9x are found (not the 180° twin at -20°; the scale to one log-radius step, 7%)
    angle = np.degrees(np.arctan2(starts[3][1, 0], starts[3][0, 0]))
    assert abs(angle - 160.0) < 2.0
    assert np.sqrt(np.linalg.det(starts[3][:2, :2])) == pytest.approx(0.9, rel=0.075)


def test_volumes_rotated_about_z():
    rng = np.random.default_rng(3)
    vol = ndimage.gaussian_filter(rng.standard_normal((40, 48, 48)), 2.0).astype(np.float32)
    c = image_center(vol.shape)
    truth = []
    for theta, t in [(20.0, (1.5, -2.0, 0.75)), (-35.0, (-2.25, 1.0, -1.0))]:
        M = np.eye(4)
        M[:2, :2] = build_affine_matrix(theta, 0, 0)[:2, :2]
        M[:3, 3] = c - M[:3, :3] @ c + np.array(t)
        truth.append(M)
    images = np.stack([moved(vol, M) for M in truth])
    out = assert_same(vol[None], "rigid", images, "mse")
    for M_est, M in zip(out.matrix, truth, strict=True):
        E = M_est @ invert(M)
        assert np.abs(E[:3, :3] @ c + E[:3, 3] - c).max() < 0.05


def test_images_that_cannot_be_fitted_fail_as_they_do_alone(camera):
    """A flat image (no ZNCC), stripes (a singular system) and an image far outside the
    reference (too few overlapping points) stop unconverged, exactly as per image."""
    stripes = np.tile(np.sin(np.arange(camera.shape[1]) / 3.0).astype(np.float32), (256, 1))
    far = moved(camera, build_affine_matrix(0, 250.0, 250.0))
    good = moved(camera, build_affine_matrix(4, 2.5, 1.0, center=image_center(camera.shape)))
    images = np.stack([np.full_like(camera, 7.0), stripes, good, far])
    for loss in ("mse", "ncc"):
        out = assert_same(camera[None], "rigid", images, loss, fitted=[2])
        assert out.converged[2] and not out.converged[[0, 1, 3]].any()
        assert np.isnan(out.loss[0]) == (loss == "ncc")


def test_samplers_equal_scipy_on_the_valid_points():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, 20, 30)).astype(np.float32)
    coords = rng.uniform(-2, 31, (3, 2, 500))
    coords[:, 0] *= 20 / 30
    ids = np.arange(3)
    linear, ok_linear = batch.sample_linear(images, ids, coords)
    cubic, ok_cubic = batch.sample_cubic(batch.spline_coefficients(images), ids, coords)
    np.testing.assert_array_equal(ok_linear, ok_cubic)
    assert 0 < ok_linear.mean() < 1
    for k in range(3):
        ok = ok_linear[k]
        lin = ndimage.map_coordinates(images[k].astype(np.float64), coords[k], order=1)
        cub = ndimage.map_coordinates(images[k].astype(np.float64), coords[k], mode="mirror")
        np.testing.assert_allclose(linear[k][ok], lin[ok], atol=1e-5)
        np.testing.assert_allclose(cubic[k][ok], cub[ok], atol=1e-4)
    # a subset of the batch: ids address the images, not the rows
    sub, _ = batch.sample_linear(images, np.array([2]), coords[:1])
    lin = ndimage.map_coordinates(images[2].astype(np.float64), coords[0], order=1)
    np.testing.assert_allclose(sub[0][ok_linear[0]], lin[ok_linear[0]], atol=1e-5)


@pytest.mark.parametrize(
    "transform, d", [("rigid", 2), ("rigid", 3), ("similarity", 2), ("affine", 3)]
)
def test_increment_matrices_equal_the_single_ones(transform, d):
    rng = np.random.default_rng(2)
    P = single.n_params(transform, d)
    dp = rng.normal(0, 0.3, (5, P))
    dp[0, d:] = 0.0  # a zero rotation (Rodrigues' small-angle branch)
    out = batch.increment_matrices(dp, transform, d)
    for k in range(5):
        np.testing.assert_allclose(out[k], single.increment_matrix(dp[k], transform, d), atol=1e-12)


@pytest.mark.parametrize("transform", ["translation", "rigid", "affine"])
def test_templates_equal_the_single_ones(camera, transform):
    """Every level's point set (the strongest gradients, or a coarser level's children),
    values and steepest-descent images, and the coarse search's spectrum and log-polar
    map, for a batch of different references."""
    rng = np.random.default_rng(5)
    refs = np.stack([camera, camera[::-1].copy(), camera + rng.normal(0, 30, camera.shape)])
    refs = refs.astype(np.float32)
    # max_points small enough that the two finest levels use their coarser level's pixels
    templates = batch.prepare_templates(refs, transform, max_points=4096)
    for t, ref in enumerate(refs):
        one = single.prepare_template(ref, transform, max_points=4096)
        assert templates.search_level == one.search_level
        scale = np.abs(one.spectrum).max()  # float32 FFTs, batched or not
        np.testing.assert_allclose(templates.spectrum[t], one.spectrum, atol=1e-6 * scale)
        if one.search is not None:
            np.testing.assert_allclose(templates.search[t], one.search, atol=1e-5)
        for level, data in zip(templates.levels, one.levels, strict=True):
            real = level.real[t]
            assert real.sum() == data.points.shape[1]
            key = lambda p: np.lexsort(p[::-1])  # noqa: E731  (points sorted x, then y)
            order, ref_order = key(level.points[t][:, real]), key(data.points)
            np.testing.assert_array_equal(
                level.points[t][:, real][:, order], data.points[:, ref_order]
            )
            np.testing.assert_array_equal(level.values[t][real][order], data.values[ref_order])
            np.testing.assert_allclose(
                level.sd[t][:, real][:, order], data.sd[:, ref_order], rtol=1e-12
            )
            assert not level.sd[t][:, ~real].any()


@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_volume_templates_equal_the_single_ones(transform):
    """3-D: the 2 x 2 x 2 children of a coarser level's strongest voxels, and the
    rotation-vector rows of the steepest-descent images."""
    rng = np.random.default_rng(7)
    vols = ndimage.gaussian_filter(rng.standard_normal((2, 48, 52, 56)), (0, 2, 2, 2))
    vols = vols.astype(np.float32)
    templates = batch.prepare_templates(vols, transform, max_points=2048)
    for t, vol in enumerate(vols):
        one = single.prepare_template(vol, transform, max_points=2048)
        assert len(templates.levels) == len(one.levels) == 2
        for level, data in zip(templates.levels, one.levels, strict=True):
            real = level.real[t]
            assert real.sum() == data.points.shape[1]
            order = np.lexsort(level.points[t][:, real][::-1])
            ref_order = np.lexsort(data.points[::-1])
            np.testing.assert_array_equal(
                level.points[t][:, real][:, order], data.points[:, ref_order]
            )
            np.testing.assert_allclose(
                level.sd[t][:, real][:, order], data.sd[:, ref_order], rtol=1e-12
            )


def test_a_template_per_image_equals_the_single_estimates(camera):
    """reference='previous': image k onto image k - 1, each with its own template."""
    c = image_center(camera.shape)
    drift = [build_affine_matrix(2.0 * k, 1.5 * k, -1.0 * k, center=c) for k in range(5)]
    stack = np.stack([moved(camera, M) for M in drift]).astype(np.float32)
    for transform in ("translation", "rigid"):
        out = assert_same(stack[:-1], transform, stack[1:], "mse")
        for k, M_est in enumerate(out.matrix):
            # the motion of image k + 1 relative to image k: M_{k+1} M_k^-1
            expected = drift[k + 1] @ invert(drift[k])
            E = M_est @ invert(expected)
            assert np.abs(E[:2, :2] @ c + E[:2, 2] - c).max() < (
                0.05 if transform == "rigid" else 2.0
            )
