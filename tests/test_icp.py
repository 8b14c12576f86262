"""ICP on unpaired clouds: capture range, exactness, trimming, 2-D, scale, quality, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.spatial.transform import Rotation
from scipy.stats import special_ortho_group

import scalign
from scalign.icp import ICPInfo, icp

# (fraction, centre, axes) of anisotropic Gaussian parts: body, head, one ear, tail. No
# part is mirrored, so the shape has no rotational symmetry and one right answer.
_PARTS_3D = [
    (0.55, [0.0, 0.0, 0.0], [3.0, 2.0, 1.5]),
    (0.25, [3.2, 0.8, 1.2], [1.0, 1.0, 1.0]),
    (0.12, [3.6, 1.2, 2.8], [0.3, 0.3, 1.0]),
    (0.08, [-3.2, -0.5, 0.3], [0.6, 0.6, 0.6]),
]
_PARTS_2D = [
    (0.6, [0.0, 0.0], [3.0, 1.5]),
    (0.25, [3.0, 1.5], [0.8, 0.8]),
    (0.15, [-2.5, -1.8], [0.4, 1.0]),
]


def blob(n: int, parts, seed: int) -> np.ndarray:
    """An asymmetric, centred cloud of ``n`` points made of Gaussian parts."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [p[0] for p in parts])
    P = np.concatenate(
        [
            c + rng.standard_normal((k, len(c))) * ax
            for k, (_, c, ax) in zip(counts, parts, strict=True)
        ]
    )
    return P - P.mean(axis=0)


def size(P: np.ndarray) -> float:
    """RMS distance of the points from their centroid."""
    return float(np.sqrt(np.mean(np.sum((P - P.mean(axis=0)) ** 2, axis=1))))


@pytest.fixture(scope="module")
def cloud() -> np.ndarray:
    return blob(1000, _PARTS_3D, seed=12345)


def moved(X, R, t, *, noise, seed, s=1.0):
    """``s X R^T + t`` plus Gaussian noise, rows shuffled (a seed apart from the cloud's)."""
    rng = np.random.default_rng(seed)
    Y = s * X @ R.T + t + noise * rng.standard_normal(X.shape)
    return rng.permutation(Y)


def rotation_about_random_axis(degrees: float, seed: int) -> np.ndarray:
    axis = np.random.default_rng(seed).standard_normal(3)
    return Rotation.from_rotvec(np.radians(degrees) * axis / np.linalg.norm(axis)).as_matrix()


@pytest.mark.parametrize("degrees", [45.0, 90.0, 170.0])
def test_recovers_large_rotations_of_a_shuffled_noisy_cloud(cloud, degrees):
    R = rotation_about_random_axis(degrees, seed=int(degrees))
    t = np.array([4.0, -2.5, 1.5])
    Y = moved(cloud, R, t, noise=0.01 * size(cloud), seed=7 + int(degrees))
    aligned, R_est, t_est, info = icp(cloud, Y)
    assert scalign.rotation_angle(R_est, R) < 0.5
    assert np.abs(t_est - t).max() < 0.02 * size(cloud)
    assert info.converged and info.fitness > 0.99
    np.testing.assert_allclose(aligned, cloud @ R_est.T + t_est, atol=1e-12)
    assert np.linalg.det(R_est) == pytest.approx(1.0)


def test_local_icp_alone_fails_at_170_degrees_so_the_search_matters(cloud):
    R = rotation_about_random_axis(170.0, seed=170)
    Y = moved(cloud, R, np.zeros(3), noise=0.01 * size(cloud), seed=177)
    _, R_local, _, _ = icp(cloud, Y, global_search=False)
    assert scalign.rotation_angle(R_local, R) > 10.0


def test_known_pairs_give_the_pair_level_kabsch(cloud):
    R = rotation_about_random_axis(120.0, seed=3)
    Y = cloud @ R.T + [1.0, 2.0, -3.0]
    aligned, R_est, t_est, info = icp(cloud, Y)
    reference = scalign.kabsch(cloud, Y)
    np.testing.assert_allclose(R_est, reference.rotation, atol=1e-6)
    np.testing.assert_allclose(t_est, reference.translation, atol=1e-6)
    np.testing.assert_allclose(aligned, Y, atol=1e-6)
    np.testing.assert_array_equal(
        info.correspondences, np.repeat(np.arange(len(Y)), 2).reshape(-1, 2)
    )
    assert info.converged and info.rmse < 1e-9 and info.fitness == 1.0


def partial_overlap(cloud, seed):
    """Source: the cloud plus 100 uniform outliers; target: 90% of it, moved and noisy."""
    rng = np.random.default_rng(seed)
    R = Rotation.random(random_state=rng).as_matrix()
    t = 3.0 * rng.standard_normal(3)
    outliers = rng.uniform(cloud.min(axis=0), cloud.max(axis=0), (100, 3))
    source = rng.permutation(np.concatenate([cloud, outliers]))
    kept = cloud[:, 1] < np.quantile(cloud[:, 1], 0.9)
    target = moved(cloud[kept], R, t, noise=0.01 * size(cloud), seed=seed + 1)
    return source, target, R, t


@pytest.mark.parametrize("seed", [50, 53])
def test_trimming_recovers_a_partial_overlap_with_outliers(cloud, seed):
    source, target, R, t = partial_overlap(cloud, seed)
    _, R_trim, t_trim, info = icp(source, target, trim=0.8)
    _, R_all, _, _ = icp(source, target)
    trimmed = scalign.rotation_angle(R_trim, R)
    assert trimmed < 0.5
    assert scalign.rotation_angle(R_all, R) > 2 * trimmed
    assert np.abs(t_trim - t).max() < 0.05
    assert len(info.correspondences) == 880  # ceil(0.8 * 1100)


def test_two_dimensional_cloud():
    X = blob(600, _PARTS_2D, seed=21)
    theta = np.radians(135.0)
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    Y = moved(X, R, np.array([-1.0, 2.0]), noise=0.01 * size(X), seed=22)
    aligned, R_est, t_est, info = icp(X, Y)
    angle = np.degrees(np.arccos(np.clip(np.trace(R_est.T @ R) / 2.0, -1.0, 1.0)))
    assert angle < 0.5
    np.testing.assert_allclose(t_est, [-1.0, 2.0], atol=0.02)
    assert aligned.shape == X.shape and info.transformation.shape == (3, 3)


def test_four_dimensional_anisotropic_cloud():
    rng = np.random.default_rng(31)
    X = rng.standard_normal((500, 4)) * [4.0, 3.0, 2.0, 1.0]
    X[:50] += [6.0, 2.0, 0.0, 1.0]  # a lump breaks the Gaussian's mirror symmetries
    R = special_ortho_group.rvs(4, random_state=32)
    Y = moved(X, R, np.ones(4), noise=0.01 * size(X), seed=33)
    _, R_est, _, info = icp(X, Y)
    np.testing.assert_allclose(R_est, R, atol=0.01)
    assert info.converged


def test_scale_is_recovered(cloud):
    R = rotation_about_random_axis(100.0, seed=41)
    t = np.array([0.5, -1.0, 2.0])
    Y = moved(cloud, R, t, noise=0.005 * size(cloud), seed=42, s=1.7)
    aligned, R_est, t_est, info = icp(cloud, Y, scale=True)
    assert info.scale == pytest.approx(1.7, rel=0.005)
    assert scalign.rotation_angle(R_est, R) < 0.5
    np.testing.assert_allclose(info.transformation[:3, :3], info.scale * R_est, atol=1e-12)
    np.testing.assert_allclose(aligned, 1.7 * cloud @ R.T + t, atol=0.05 * size(cloud))


def test_a_scaled_init_is_refitted_rigid_without_scale(cloud):
    Y = 1.7 * cloud + 1.0  # exact pairs, scaled
    init = np.diag([1.7, 1.7, 1.7, 1.0])
    init[:3, 3] = 1.0
    # The scaled start pairs every point with its copy: the first rigid refit is R = I.
    _, R_rigid, _, rigid = icp(cloud, Y, init=init, max_iterations=1)
    _, _, t_scaled, scaled = icp(cloud, Y, init=init, scale=True)
    assert rigid.iterations == 1 and rigid.scale == 1.0
    np.testing.assert_allclose(R_rigid, np.eye(3), atol=1e-9)
    assert scaled.scale == pytest.approx(1.7, rel=1e-12)
    np.testing.assert_allclose(t_scaled, 1.0, atol=1e-9)


@pytest.mark.parametrize("threshold", [None, 0.15])
def test_fitness_and_inlier_rmse_match_a_brute_force_recount(cloud, threshold):
    source, target, _, _ = partial_overlap(cloud, seed=60)
    aligned, _, _, info = icp(source, target, trim=0.8, max_correspondence_distance=threshold)
    distances = cdist(aligned, target)
    nearest = distances.min(axis=1)
    expected = 3.0 * np.median(nearest) if threshold is None else threshold
    assert info.max_correspondence_distance == pytest.approx(expected, rel=1e-12)
    inlier = nearest <= expected
    assert info.fitness == pytest.approx(np.mean(inlier), abs=1e-12)
    assert 0.75 < info.fitness < 0.9  # outliers and the cut-off part must not count
    assert info.inlier_rmse == pytest.approx(np.sqrt(np.mean(nearest[inlier] ** 2)), rel=1e-9)
    source_index, target_index = info.correspondences.T
    np.testing.assert_array_equal(target_index, distances[source_index].argmin(axis=1))
    # the kept pairs are the closest 80%
    assert nearest[source_index].max() <= np.delete(nearest, source_index).min()
    assert info.rmse == pytest.approx(np.sqrt(np.mean(nearest[source_index] ** 2)), rel=1e-9)


def test_init_as_matrix_or_tuple_starts_the_local_search(cloud):
    R = rotation_about_random_axis(170.0, seed=170)
    t = np.array([1.0, 0.0, -1.0])
    Y = moved(cloud, R, t, noise=0.01 * size(cloud), seed=171)
    near = rotation_about_random_axis(5.0, seed=172) @ R
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = near, t
    _, R_matrix, t_matrix, info = icp(cloud, Y, init=T)
    _, R_tuple, t_tuple, _ = icp(cloud, Y, init=(near, t))
    assert scalign.rotation_angle(R_matrix, R) < 0.5
    np.testing.assert_allclose(R_tuple, R_matrix, atol=1e-12)
    np.testing.assert_allclose(t_tuple, t_matrix, atol=1e-12)
    T_out = info.transformation
    np.testing.assert_allclose(T_out[:3, :3], R_matrix, atol=1e-12)
    np.testing.assert_allclose(T_out[3], [0.0, 0.0, 0.0, 1.0])


def test_iteration_limit_is_respected(cloud):
    R = rotation_about_random_axis(20.0, seed=80)
    Y = moved(cloud, R, np.zeros(3), noise=0.01 * size(cloud), seed=81)
    _, _, _, info = icp(cloud, Y, max_iterations=1, global_search=False)
    assert info.iterations == 1 and not info.converged
    assert isinstance(info, ICPInfo)


def _good():
    X = blob(20, _PARTS_3D, seed=1)
    return X, X + 1.0


_BAD = [
    ({"source": np.r_[np.eye(4, 3), [[0.0, 0.0, np.nan]]]}, ValueError, "source has 1 non-finite"),
    ({"target": np.full((5, 3), np.inf)}, ValueError, "target has 15 non-finite"),
    ({"target": np.ones((5, 2))}, ValueError, "source is 3-dimensional but target is 2"),
    ({"source": np.eye(3)}, ValueError, "source has 3 point.* at least 4"),
    ({"source": np.ones((5, 1)), "target": np.ones((5, 1))}, ValueError, "at least 2-dim"),
    ({"source": np.ones((2, 5, 3))}, ValueError, r"source must have shape \(n_points, d\)"),
    ({"source": np.ones((5, 3))}, ValueError, "source is degenerate"),
    ({"source": "abc"}, TypeError, "source must be a numeric array"),
    ({"trim": 0.0}, ValueError, r"trim must be in \(0, 1\]"),
    ({"trim": 1.5}, ValueError, r"trim must be in \(0, 1\]"),
    ({"trim": "half"}, TypeError, "trim must be a number"),
    ({"tolerance": 0.0}, ValueError, "tolerance must be a positive"),
    ({"tolerance": float("nan")}, ValueError, "tolerance must be a positive"),
    ({"max_iterations": 0}, ValueError, "max_iterations must be a positive"),
    ({"max_iterations": 2.5}, TypeError, "max_iterations must be a positive"),
    ({"max_correspondence_distance": -1.0}, ValueError, "max_correspondence_distance"),
    ({"init": np.eye(3)}, ValueError, r"init must have shape \(4, 4\)"),
    ({"init": np.diag([1.0, 1.0, -1.0, 1.0])}, ValueError, "init's rotation must be a proper"),
    ({"init": np.r_[np.eye(4)[:3], [[1.0, 0, 0, 1]]]}, ValueError, "init's last row"),
    ({"init": (np.eye(3), np.zeros(2))}, ValueError, r"init translation must have shape \(3,\)"),
    ({"init": (np.array([[1.0, 1, 0], [0, 1, 0], [0, 0, 1]]), np.zeros(3))}, ValueError, "orth"),
    ({"scale": "yes"}, TypeError, "scale must be True or False"),
]


@pytest.mark.parametrize(("change", "error", "message"), _BAD)
def test_bad_input_is_rejected_with_the_variable_named(change, error, message):
    source, target = _good()
    kwargs = {"source": source, "target": target, **change}
    with pytest.raises(error, match=message):
        icp(**kwargs)


def test_an_exact_fit_of_float32_clouds_has_fitness_one(cloud):
    """float32 clouds carry ~1e-7 of their extent in round-off: the default inlier distance
    (3 × the median distance of an exact fit, all round-off) left 3.5-18% of an exact
    fit's points out; its floor now follows the clouds' precision."""
    R = rotation_about_random_axis(40.0, seed=5)
    Y = (cloud @ R.T + [5.0, -2.0, 1.0]).astype(np.float32)
    perm = np.random.default_rng(2).permutation(len(Y))
    *_, info = icp(cloud.astype(np.float32), Y[perm])
    assert info.rmse < 1e-5 * np.abs(Y).max()
    assert info.fitness == 1.0
    assert isinstance(info.max_correspondence_distance, float)
    # float64 clouds keep the 1e-9 floor: their round-off is far below it
    Y64 = cloud @ R.T + [5.0, -2.0, 1.0]
    *_, info64 = icp(cloud, Y64[perm])
    assert info64.fitness == 1.0 and info64.max_correspondence_distance < 1e-7
