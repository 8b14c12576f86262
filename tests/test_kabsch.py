"""The batched superposition kernel against independent references and known transforms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference_fits import horn
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.transform import Rotation
from scipy.stats import special_ortho_group

from scalign.kernels import apply_transform, rmsd, superpose
from scalign.synthetic import helix


def moved(Y, R, t, s=1.0):
    """The X for which ``Y = s X R^T + t`` holds exactly."""
    return ((Y - t) @ R) / s


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_recovers_known_rigid_transforms(rng):
    Y = rng.standard_normal((40, 3))
    R = Rotation.random(64, random_state=1).as_matrix()
    t = 5 * rng.standard_normal((64, 3))
    fit = superpose(moved(Y, R, t[:, None, :]), Y)
    assert np.abs(fit.rotation - R).max() < 1e-10
    assert np.abs(fit.translation - t).max() < 1e-10
    assert np.all(fit.scale == 1.0)
    assert fit.rmsd.max() < 1e-10
    np.testing.assert_allclose(fit.r2, 1.0, atol=1e-12)


def test_recovers_known_similarity_transforms(rng):
    Y = rng.standard_normal((25, 3))
    R = Rotation.random(32, random_state=2).as_matrix()
    t = rng.standard_normal((32, 3))
    s = np.exp(rng.uniform(-1, 1, 32))
    X = moved(Y, R, t[:, None, :], s[:, None, None])
    fit = superpose(X, Y, scale=True)
    assert np.abs(fit.rotation - R).max() < 1e-9
    assert np.abs(fit.scale - s).max() < 1e-9
    assert np.abs(fit.translation - t).max() < 1e-9
    assert np.abs(apply_transform(X, *fit[:3]) - Y).max() < 1e-9


def test_matches_scipy_align_vectors_per_item(rng):
    Y = rng.standard_normal((30, 3))
    X = moved(Y, Rotation.random(20, random_state=3).as_matrix(), 0.0) + 0.3 * rng.standard_normal(
        (20, 30, 3)
    )
    w = rng.uniform(0.1, 2.0, 30)
    fit = superpose(X, Y, w)
    for i in range(len(X)):
        p = w / w.sum()
        ref, _ = Rotation.align_vectors(Y - p @ Y, X[i] - p @ X[i], weights=w)
        np.testing.assert_allclose(fit.rotation[i], ref.as_matrix(), atol=1e-10)


def test_matches_orthogonal_procrustes_with_reflection(rng):
    Y = rng.standard_normal((30, 3))
    X = rng.standard_normal((10, 30, 3))
    fit = superpose(X, Y, reflection=True)
    for i in range(len(X)):
        Q, _ = orthogonal_procrustes(X[i] - X[i].mean(0), Y - Y.mean(0))
        np.testing.assert_allclose(fit.rotation[i], Q.T, atol=1e-10)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("scale", [False, True])
def test_matches_float64_quaternion_brute_force(rng, weighted, scale):
    Y = rng.standard_normal((50, 3)) * [3, 2, 1]
    X = rng.standard_normal((16, 50, 3)) * [3, 2, 1] + 10
    w = rng.uniform(0, 3, 50) if weighted else None
    fit = superpose(X.astype(np.float32), Y, w, scale=scale)
    for i in range(len(X)):
        R, t, s, e = horn(X[i].astype(np.float32), Y, w, scale=scale)
        np.testing.assert_allclose(fit.rotation[i], R, atol=1e-9)
        np.testing.assert_allclose(fit.translation[i], t, atol=1e-8)
        np.testing.assert_allclose(fit.scale[i], s, rtol=1e-10)
        np.testing.assert_allclose(fit.rmsd[i], e, rtol=1e-9)


def test_mirror_image_gets_a_proper_rotation_unless_reflection_is_asked(rng):
    Y = rng.standard_normal((20, 3))
    mirror = Y * [-1, 1, 1]
    proper = superpose(mirror, Y)
    assert np.linalg.det(proper.rotation) == pytest.approx(1.0)
    assert proper.rmsd > 0.1
    improper = superpose(mirror, Y, reflection=True)
    assert np.linalg.det(improper.rotation) == pytest.approx(-1.0)
    assert improper.rmsd < 1e-12


def test_planar_sets_flip_the_vector_of_the_zero_singular_value(rng):
    Y = np.c_[rng.standard_normal((15, 2)), np.zeros(15)]
    R = special_ortho_group.rvs(3, random_state=4)
    X = moved(Y, R, np.zeros(3))
    fit = superpose(X[None], Y)
    assert np.linalg.det(fit.rotation[0]) == pytest.approx(1.0)
    assert fit.rmsd[0] < 1e-12
    np.testing.assert_allclose(
        apply_transform(X, fit.rotation[0], fit.translation[0], 1.0), Y, atol=1e-12
    )


@pytest.mark.parametrize("d", [2, 4])
def test_other_dimensions(rng, d):
    Y = rng.standard_normal((12, d))
    R = special_ortho_group.rvs(d, size=5, random_state=5)
    t = rng.standard_normal((5, 1, d))
    X = moved(Y, R, t)
    fit = superpose(X, Y)
    assert np.abs(fit.rotation - R).max() < 1e-10
    assert fit.rmsd.max() < 1e-10
    assert np.allclose(np.linalg.det(fit.rotation), 1.0)


def test_nan_structure_gives_nan_for_itself_only(rng):
    Y = rng.standard_normal((10, 3))
    X = rng.standard_normal((6, 10, 3))
    X[2, 4, 1] = np.nan
    X[4, 0, 0] = np.inf
    fit = superpose(X, Y)
    bad = np.array([False, False, True, False, True, False])
    assert np.all(np.isnan(fit.rmsd[bad])) and np.all(np.isnan(fit.rotation[bad]))
    clean = superpose(X[~bad], Y)
    np.testing.assert_allclose(fit.rmsd[~bad], clean.rmsd)


def test_all_zero_weights_for_one_item_gives_nan_for_that_item(rng):
    Y = rng.standard_normal((10, 3))
    X = rng.standard_normal((3, 10, 3))
    w = np.ones((3, 10))
    w[1] = 0
    fit = superpose(X, Y, w)
    assert np.isnan(fit.rmsd[1]) and np.isfinite(fit.rmsd[[0, 2]]).all()


def test_float32_far_from_origin_small_rmsd_is_accurate(rng):
    """The pitfall: shortcut RMSD without centring in float32 gave 1.06 for a true 0.017."""
    Y = helix(200)
    noise = 0.01 * rng.standard_normal((8, 200, 3))
    X64 = moved(Y, Rotation.random(8, random_state=6).as_matrix(), 0.0) + noise + 1e3
    X32 = X64.astype(np.float32)
    got = superpose(X32, Y).rmsd
    want = np.array([horn(x, Y)[3] for x in X32.astype(np.float64)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0.005 < got.mean() < 0.03


def test_structure_against_itself_is_zero(rng):
    X = (rng.standard_normal((4, 300, 3)) * 10 + 500).astype(np.float32)
    fit = superpose(X, X[0])
    assert fit.rmsd[0] < 1e-9
    same = superpose(X, X)
    assert same.rmsd.max() < 1e-9


def test_shared_and_per_item_paths_agree(rng):
    Y = rng.standard_normal((30, 3))
    X = rng.standard_normal((7, 30, 3)) + 4
    w = rng.uniform(0.5, 1.5, 30)
    shared = superpose(X, Y, w, scale=True)
    batched = superpose(X, np.broadcast_to(Y, X.shape), np.broadcast_to(w, (7, 30)), scale=True)
    for a, b in zip(shared, batched, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_any_leading_batch_shape(rng):
    Y = rng.standard_normal((9, 3))
    X = rng.standard_normal((2, 3, 9, 3))
    fit = superpose(X, Y)
    assert fit.rotation.shape == (2, 3, 3, 3) and fit.rmsd.shape == (2, 3)
    np.testing.assert_allclose(fit.rmsd.ravel(), superpose(X.reshape(6, 9, 3), Y).rmsd)


def test_rmsd_without_superposition_is_plain_rms_distance(rng):
    X = rng.standard_normal((3, 11, 3))
    Y = rng.standard_normal((11, 3))
    want = np.sqrt(((X - Y) ** 2).sum(-1).mean(-1))
    np.testing.assert_allclose(rmsd(X, Y), want)
    w = rng.random(11)
    np.testing.assert_allclose(rmsd(X, Y, w), np.sqrt(((X - Y) ** 2).sum(-1) @ w / w.sum()))


def test_umeyama_scale_is_not_symmetric_with_noise(rng):
    """Documented: s(X→Y) ≠ 1/s(Y→X) when the data are noisy; X is the one scaled."""
    Y = rng.standard_normal((40, 3))
    X = 0.5 * Y + 0.3 * rng.standard_normal((40, 3))
    forward = superpose(X, Y, scale=True).scale
    backward = superpose(Y, X, scale=True).scale
    assert abs(forward * backward - 1) > 0.05


coords = st.floats(-100, 100, allow_nan=False, width=64)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(3, 40),
    shift=st.tuples(coords, coords, coords),
)
def test_invariances(seed, n, shift):
    """RMSD is symmetric, invariant to moving either set rigidly, and ≥ 0."""
    r = np.random.default_rng(seed)
    X = r.standard_normal((n, 3)) * r.uniform(0.1, 10)
    Y = X + r.standard_normal((n, 3))
    e = superpose(X, Y).rmsd
    Q = Rotation.random(random_state=r).as_matrix()
    assert e >= 0
    np.testing.assert_allclose(superpose(Y, X).rmsd, e, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(
        superpose(X @ Q.T + np.array(shift), Y).rmsd, e, rtol=1e-7, atol=1e-9
    )
    np.testing.assert_allclose(superpose(X, Y @ Q.T).rmsd, e, rtol=1e-7, atol=1e-9)


def test_far_from_the_origin_in_float64_keeps_scale_and_rmsd(rng):
    """sigma_x^2 from raw second moments would cancel; such items are re-centred first."""
    Y = rng.standard_normal((30, 3))
    R = Rotation.random(4, random_state=8).as_matrix()
    s = np.array([0.5, 1.0, 2.0, 3.0])
    X = moved(Y, R, 0.0, s[:, None, None]) + 0.01 * rng.standard_normal((4, 30, 3)) + 1e7
    fit = superpose(X, Y, scale=True)
    for i in range(4):
        _, _, s_ref, e_ref = horn(X[i], Y, scale=True)
        assert fit.scale[i] == pytest.approx(s_ref, rel=1e-8)
        assert fit.rmsd[i] == pytest.approx(e_ref, rel=1e-6)
