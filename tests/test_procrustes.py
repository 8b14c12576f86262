"""The seeds' pair-level functions: conventions, consistency and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from reference_fits import horn
from scipy.spatial import procrustes as scipy_procrustes
from scipy.spatial.transform import Rotation

import scalign
from scalign import (
    kabsch,
    procrustes_align,
    procrustes_distance,
    procrustes_r2,
    procrustes_rmse,
    umeyama,
    weighted_procrustes,
)


@pytest.fixture
def pair():
    rng = np.random.default_rng(11)
    Y = rng.standard_normal((30, 3)) * [4, 2, 1]
    R = Rotation.random(random_state=12).as_matrix()
    X = (Y - [1, 2, 3]) @ R / 1.7 + 0.05 * rng.standard_normal((30, 3))
    return X, Y


def test_procrustes_align_returns_what_its_transform_produces(pair):
    X, Y = pair
    aligned, R, error = procrustes_align(X, Y)
    T = kabsch(X, Y)
    np.testing.assert_allclose(R, T.rotation)
    np.testing.assert_allclose(aligned, X @ R.T + T.translation, atol=1e-12)
    assert error == pytest.approx(np.linalg.norm(aligned - Y) / np.sqrt(len(X)))
    assert isinstance(error, float)


def test_scores_follow_the_conventions(pair):
    X, Y = pair
    aligned, _, error = procrustes_align(X, Y, scale=True)
    residual = np.linalg.norm(aligned - Y)
    assert procrustes_distance(X, Y, scale=True) == pytest.approx(residual)
    assert procrustes_rmse(X, Y, scale=True) == pytest.approx(residual / np.sqrt(len(X)))
    assert procrustes_rmse(X, Y, scale=True) == pytest.approx(error)
    ss_tot = np.sum((Y - Y.mean(0)) ** 2)
    assert procrustes_r2(X, Y, scale=True) == pytest.approx(1 - residual**2 / ss_tot)
    assert procrustes_rmse(X, Y, scale=True) == pytest.approx(horn(X, Y, scale=True)[3])


def test_scaled_fit_moves_X_and_matches_scipy_disparity_after_normalisation(pair):
    """scipy.spatial.procrustes standardises both sets; its disparity is our SS_res/SS_tot."""
    X, Y = pair
    _, _, disparity = scipy_procrustes(Y, X)
    assert 1 - procrustes_r2(X, Y, scale=True) == pytest.approx(disparity, rel=1e-9)
    T = umeyama(X, Y)
    assert T.scale == pytest.approx(1.7, rel=0.05)


def test_weighted_procrustes_uses_weighted_centroids(pair):
    X, Y = pair
    w = np.linspace(0.1, 3, len(X))
    aligned, R, error = weighted_procrustes(X, Y, w)
    Rh, th, _, eh = horn(X, Y, w)
    np.testing.assert_allclose(R, Rh, atol=1e-10)
    assert error == pytest.approx(eh)
    p = w / w.sum()
    assert error == pytest.approx(np.sqrt(np.sum(p * np.sum((aligned - Y) ** 2, axis=1))))


def test_works_in_2d():
    rng = np.random.default_rng(3)
    Y = rng.standard_normal((8, 2))
    a = np.deg2rad(33)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    X = (Y - [0.5, -1]) @ R
    aligned, Rf, error = procrustes_align(X, Y)
    np.testing.assert_allclose(Rf, R, atol=1e-12)
    assert error < 1e-12


def test_rotation_angle_in_2d_and_3d_against_scipy():
    """The geodesic angle of 2-D rotations (the library fits them) is |theta|: the 3-D
    formula arccos((tr - 1) / 2) gave 60 degrees for the 2-D identity."""
    theta = np.deg2rad([0.0, 33.0, -120.0, 180.0])
    c, s = np.cos(theta), np.sin(theta)
    R2 = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    np.testing.assert_allclose(
        scalign.rotation_angle(np.eye(2), R2), [0.0, 33.0, 120.0, 180.0], atol=1e-6
    )
    R3 = Rotation.random(5, random_state=3)
    np.testing.assert_allclose(
        scalign.rotation_angle(np.eye(3), R3.as_matrix()), np.degrees(R3.magnitude()), rtol=1e-9
    )
    with pytest.raises(ValueError, match=r"R1 and R2 must be 2-D or 3-D rotations.*\(4, 4\)"):
        scalign.rotation_angle(np.eye(4), np.eye(4))
    with pytest.raises(ValueError, match=r"R1 and R2 must be 2-D or 3-D rotations.*\(3, 3\)"):
        scalign.rotation_angle(np.eye(2), np.eye(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_coordinates_are_not_called_coincident(dtype):
    """Localisation-microscopy points in metres (a 200 nm cloud 5 µm from the origin, as
    float32): the coincidence tolerance was relative to 1 + max|x|, i.e. absolute below
    unit coordinates, and called the cloud degenerate (all points coincide)."""
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(200, 3)) * [200e-9, 200e-9, 50e-9] + [5e-6, 3e-6, 0.0]
    Q = Rotation.random(random_state=1).as_matrix()
    X = ((Y - Y.mean(0)) @ Q + Y.mean(0)).astype(dtype)
    aligned, R, error = procrustes_align(X, Y.astype(dtype))
    np.testing.assert_allclose(R, Q, atol=1e-5 if dtype == np.float32 else 1e-9)
    assert error < (1e-12 if dtype == np.float32 else 1e-18)
    torch = pytest.importorskip("torch")
    from scalign.differentiable import torch_procrustes_align

    _, R_t, _ = torch_procrustes_align(torch.from_numpy(X), torch.from_numpy(Y.astype(dtype)))
    np.testing.assert_allclose(R_t.numpy(), Q, atol=1e-4 if dtype == np.float32 else 1e-9)
    with pytest.raises(ValueError, match="X is degenerate"):  # still: truly coincident points
        procrustes_align(np.broadcast_to(X[:1], X.shape), Y)
    with pytest.raises(ValueError, match="X is degenerate"):  # squares subnormal: RMSD 0
        procrustes_align(X.astype(np.float64) * 1e-150, Y * 1e-150)


def test_collinear_points_give_a_defined_rmsd_and_alignment():
    """The rotation about the line is not unique: test RMSD and coordinates, not R."""
    Y = np.outer(np.arange(6.0), [1, 2, 2])
    R = Rotation.from_euler("xyz", [10, 20, 30], degrees=True).as_matrix()
    X = Y @ R + 3
    aligned, Rf, error = procrustes_align(X, Y)
    assert error < 1e-12
    np.testing.assert_allclose(aligned, Y, atol=1e-10)
    assert np.linalg.det(Rf) == pytest.approx(1)


BAD = [
    (
        "nan",
        lambda X, Y: (np.where(np.arange(X.size).reshape(X.shape) == 4, np.nan, X), Y),
        ValueError,
        "X has 1 non-finite",
    ),
    (
        "inf",
        lambda X, Y: (X, np.where(np.arange(Y.size).reshape(Y.shape) == 0, np.inf, Y)),
        ValueError,
        "Y has 1 non-finite",
    ),
    ("points", lambda X, Y: (X[:-1], Y), ValueError, "X has 9 points but Y has 10"),
    ("dims", lambda X, Y: (X[:, :2], Y), ValueError, "X is 2-dimensional but Y is 3-dimensional"),
    ("too few", lambda X, Y: (X[:2], Y[:2]), ValueError, "at least 3 are needed"),
    # numpy's broadcasting error ("operands could not be broadcast ...") before
    (
        "batches",
        lambda X, Y: (np.stack([X] * 5), np.stack([Y] * 4)),
        ValueError,
        r"Y has 4 sets \(batch shape \(4,\)\) but X has batch shape \(5,\)",
    ),
    (
        "batch of targets",
        lambda X, Y: (X, np.stack([Y] * 4)),
        ValueError,
        r"Y has 4 sets \(batch shape \(4,\)\) but X has batch shape \(\)",
    ),
    ("1-D", lambda X, Y: (X.ravel(), Y), ValueError, "X must have shape"),
    ("empty", lambda X, Y: (X[:0], Y[:0]), ValueError, "X is empty"),
    ("strings", lambda X, Y: (X.astype(str), Y), TypeError, "X must be a numeric array"),
    ("coincident", lambda X, Y: (np.ones_like(X), Y), ValueError, "X is degenerate"),
]


@pytest.mark.parametrize(
    "fit",
    [
        scalign.procrustes_align,
        scalign.kabsch,
        scalign.umeyama,
        scalign.procrustes_rmse,
        scalign.procrustes_distance,
        scalign.procrustes_r2,
        lambda X, Y: weighted_procrustes(X, Y, np.ones(len(X))),
        lambda X, Y: scalign.iteratively_reweighted_procrustes(X, Y, "tukey"),
    ],
)
def test_a_target_whose_points_coincide_is_an_error(fit):
    """Before: an arbitrary rotation, r2 NaN, an Umeyama scale of 0, no error."""
    X = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(ValueError, match="Y is degenerate: all of its points coincide"):
        fit(X, np.ones((5, 3)))


@pytest.mark.parametrize(("case", "make", "exc", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(case, make, exc, message):
    rng = np.random.default_rng(0)
    X, Y = make(rng.standard_normal((10, 3)), rng.standard_normal((10, 3)))
    with pytest.raises(exc, match=message):
        procrustes_align(X, Y)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.zeros(10), "all zero"),
        (-np.ones(10), "negative"),
        (np.r_[np.nan, np.ones(9)], "non-finite"),
        (np.ones(9), r"shape \(\.\.\., 10\)"),
        # a broadcasting error from numpy before
        (np.ones((2, 10)), r"weights must have shape \(10,\) \(one per point\), got \(2, 10\)"),
    ],
)
def test_bad_weights_get_a_clear_error(weights, message):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=f"weights.*{message}|{message}"):
        weighted_procrustes(rng.standard_normal((10, 3)), rng.standard_normal((10, 3)), weights)


def test_public_api_is_exported():
    for name in scalign.__all__:
        assert hasattr(scalign, name), name


@pytest.mark.parametrize(
    "fit",
    [
        lambda X, Y, flag: scalign.procrustes_align(X, Y, scale=flag),
        lambda X, Y, flag: scalign.procrustes_rmse(X, Y, flag),
        lambda X, Y, flag: scalign.iteratively_reweighted_procrustes(X, Y, scale=flag),
    ],
)
def test_flags_are_booleans(fit):
    """scale="no" is a non-empty string, so it fitted a scale."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((10, 3)), rng.standard_normal((10, 3))
    with pytest.raises(TypeError, match="scale must be True or False, got 'no'"):
        fit(X, Y, "no")


def test_rmsd_kernel_refuses_unpaired_sets():
    """scalign.rmsd(X, Y[:1]) broadcast the one target point: 1.67, no error."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((10, 3)), rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match="X and Y must be paired point sets"):
        scalign.rmsd(X, Y[:1])
    with pytest.raises(ValueError, match=r"weights must have one value per point \(10\)"):
        scalign.rmsd(X, Y, np.ones(9))
    assert scalign.rmsd(X, Y, np.full(10, 2.0)) == pytest.approx(scalign.rmsd(X, Y))
