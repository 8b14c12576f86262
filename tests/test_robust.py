"""Robust IRLS superposition: pair level, ensemble op, robust GPA; against a scipy IRLS."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import scalign
from scalign import helix, helix_ensemble, iteratively_reweighted_procrustes
from scalign.kernels.robust import TUNING, irls_superpose, robust_weight

LOSSES = ("huber", "tukey", "welsch")


def corrupted_pair(seed=0, n=300, noise=0.02, fraction=0.2, size=8.0):
    """``X`` = ``Y`` moved by a known rotation, with noise and 20% gross outliers."""
    rng = np.random.default_rng(seed)
    Y = helix(n).astype(np.float64)
    Q = Rotation.random(random_state=rng).as_matrix()
    t = rng.normal(size=3) * 5
    X = (Y - t) @ Q + rng.normal(scale=noise, size=Y.shape)
    outlier = rng.random(n) < fraction
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    X[outlier] += size * direction[outlier]
    return X, Y, Q, outlier


def scipy_irls(X, Y, loss, iterations=200):
    """Independent IRLS: weighted centroids + scipy's weighted ``align_vectors`` per step."""
    c = TUNING[loss]
    w = np.ones(len(X))
    for _ in range(iterations):
        cx = w @ X / w.sum()
        cy = w @ Y / w.sum()
        rot, _ = Rotation.align_vectors(Y - cy, X - cx, weights=w)
        R = rot.as_matrix()
        r = np.linalg.norm((X - cx) @ R.T + cy - Y, axis=1)
        u = r / (1.4826 * np.median(r))
        if loss == "huber":
            w = np.where(u <= c, 1.0, c / np.maximum(u, c))
        elif loss == "tukey":
            w = np.where(u < c, (1 - (u / c) ** 2) ** 2, 0.0)
        else:
            w = np.exp(-((u / c) ** 2))
    return R, w


@pytest.mark.parametrize("loss", LOSSES)
def test_robust_loss_recovers_the_rotation_where_kabsch_fails(loss):
    X, Y, Q, outlier = corrupted_pair()
    plain_aligned, R_plain, _ = scalign.procrustes_align(X, Y)
    aligned, R, error, weights = iteratively_reweighted_procrustes(X, Y, loss)
    plain_error = scalign.rotation_angle(R_plain, Q)
    robust_error = scalign.rotation_angle(R, Q)
    assert plain_error > 1.0, plain_error  # plain Kabsch is off by degrees
    assert robust_error < 0.2, robust_error

    def inlier_rmsd(A):
        return np.sqrt(np.mean(np.sum((A - Y)[~outlier] ** 2, axis=1)))

    assert inlier_rmsd(aligned) <= inlier_rmsd(plain_aligned)
    # ... while plain Kabsch has the better unweighted R2, by construction.
    assert scalign.procrustes_r2(X, Y) >= 1 - np.sum((aligned - Y) ** 2) / np.sum(
        (Y - Y.mean(0)) ** 2
    )
    assert weights[outlier].mean() < 0.1 and weights[~outlier].mean() > 0.8
    # error is the weighted RMSD under the final weights
    p = weights / weights.sum()
    assert error == pytest.approx(np.sqrt(p @ np.sum((aligned - Y) ** 2, axis=1)), rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_matches_an_independent_scipy_irls(loss):
    X, Y, _, _ = corrupted_pair(seed=4)
    _, R, _, weights = iteratively_reweighted_procrustes(X, Y, loss, max_iterations=200, tol=1e-13)
    R_ref, w_ref = scipy_irls(X, Y, loss)
    assert scalign.rotation_angle(R, R_ref) < 1e-5
    np.testing.assert_allclose(weights, w_ref, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_fit_does_not_depend_on_where_the_sets_sit(loss):
    """The sigma floor scales with the target's size about its centroid: moved 1e6 or 1e7
    away (georeferenced coordinates), the outliers are down-weighted as at the origin."""
    X, Y, _, outlier = corrupted_pair(seed=5)
    kw = {"max_iterations": 200, "tol": 1e-12}
    _, R0, _, w0 = iteratively_reweighted_procrustes(X, Y, loss, **kw)
    for offset in (1e6, 1e7):  # coordinates keep ~1e-9 of their digits at 1e7
        _, R, _, w = iteratively_reweighted_procrustes(X + offset, Y + offset, loss, **kw)
        np.testing.assert_allclose(R, R0, atol=1e-9)
        np.testing.assert_allclose(w, w0, atol=1e-7)
    assert w0[outlier].mean() < 0.2


def test_weight_functions_match_their_formulas():
    u = np.array([0.0, 0.5, 1.345, 2.0, 4.685, 10.0])
    np.testing.assert_allclose(
        robust_weight(np, u, "huber", 1.345), [1, 1, 1, 0.6725, 1.345 / 4.685, 0.1345]
    )
    z = u / 4.685
    np.testing.assert_allclose(
        robust_weight(np, u, "tukey", 4.685), np.where(z < 1, (1 - z**2) ** 2, 0)
    )
    np.testing.assert_allclose(robust_weight(np, u, "welsch", 2.985), np.exp(-((u / 2.985) ** 2)))


def test_clean_data_gives_the_least_squares_fit_and_scale():
    rng = np.random.default_rng(1)
    Y = helix(80)
    Q = Rotation.random(random_state=rng).as_matrix()
    X = (Y - 1.0) @ Q / 1.7
    aligned, R, error, weights = iteratively_reweighted_procrustes(X, Y, "tukey", scale=True)
    np.testing.assert_allclose(R, Q, atol=1e-9)
    np.testing.assert_allclose(aligned, Y, atol=1e-9)
    assert error < 1e-9
    np.testing.assert_allclose(weights, 1.0, atol=1e-9)


def test_prior_weights_multiply_the_robust_weights():
    X, Y, _, outlier = corrupted_pair(seed=2)
    prior = np.linspace(1.0, 2.0, len(X))
    *_, weights = iteratively_reweighted_procrustes(X, Y, "huber", weights=prior)
    assert np.all(weights <= prior + 1e-12)
    np.testing.assert_allclose(weights[~outlier] / prior[~outlier], 1.0, atol=0.35)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_prior_weights_leave_points_out_of_the_robust_scale(adk, loss):
    """A 0/1 mask (the Cα atoms of AdK) gives the robust fit of the masked subset: the
    residual scale is the median over the points in the fit. Over all points, the other
    atoms' residuals set it (0.07° off the subset's fit on AdK, and a planted outlier
    among the fitted points kept its weight)."""
    X, Y = adk["coords"][60].astype(np.float64), adk["coords"][0].astype(np.float64)
    ca = adk["ca_indices"]
    X[ca[100]] += 15.0  # an outlier among the fitted atoms
    mask = np.zeros(len(X))
    mask[ca] = 1.0
    _, R, error, weights = iteratively_reweighted_procrustes(X, Y, loss, weights=mask)
    _, R_ca, error_ca, weights_ca = iteratively_reweighted_procrustes(X[ca], Y[ca], loss)
    assert scalign.rotation_angle(R, R_ca) < 1e-6
    np.testing.assert_allclose(error, error_ca, rtol=1e-9)
    np.testing.assert_allclose(weights[ca], weights_ca, atol=1e-9)
    assert weights[ca[100]] < 0.25 and np.all(weights[mask == 0] == 0)
    out = scalign.align(scalign.make_ensemble(np.stack([Y, X])), 0, weights=mask, robust=loss)
    assert scalign.rotation_angle(out["rotation"].values[1], R_ca) < 1e-6


def test_batched_kernel_gives_nan_for_a_nan_item_only():
    X, Y, Q, _ = corrupted_pair(seed=3)
    batch = np.stack([X, X, X])
    batch[1, 5, 0] = np.nan
    result = irls_superpose(batch, Y, loss="tukey")
    assert np.isnan(result.fit.rmsd[1]) and np.all(np.isnan(result.weights[1]))
    assert not result.converged[1] and result.converged[0]
    assert scalign.rotation_angle(result.fit.rotation[2], Q) < 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"robust_loss": "cauchy"}, "unknown robust_loss 'cauchy'"),
        ({"max_iterations": 0}, "max_iterations must be a positive integer"),
        ({"tol": -1.0}, "tol must be a positive finite number"),
        ({"weights": -np.ones(300)}, "weights has negative values"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    X, Y, _, _ = corrupted_pair()
    with pytest.raises(ValueError, match=message):
        iteratively_reweighted_procrustes(X, Y, **kwargs)


def test_nan_and_shape_mismatch_get_clear_errors():
    X, Y, _, _ = corrupted_pair()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="X has 1 non-finite"):
        iteratively_reweighted_procrustes(X, Y)
    with pytest.raises(ValueError, match="X has 299 points but Y has 300"):
        iteratively_reweighted_procrustes(Y[1:], Y)


# ---------------------------------------------------------------------------------------
# ensemble op
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupted():
    return helix_ensemble(
        120, 100, noise=0.02, outlier_fraction=0.2, outlier_size=15.0, chunks=40, seed=5
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_align_robust_recovers_every_rotation(corrupted, loss):
    out = scalign.align(corrupted, corrupted["reference"], robust=loss).compute()
    plain = scalign.align(corrupted, corrupted["reference"], aligned=False).compute()
    truth = corrupted["true_rotation"].values
    assert np.median(scalign.rotation_angle(plain["rotation"].values, truth)) > 1.0
    assert np.max(scalign.rotation_angle(out["rotation"].values, truth)) < 0.2
    assert out["robust_weights"].dims == ("structure", "point")
    outlier = corrupted["outlier"].values
    assert out["robust_weights"].values[outlier].mean() < 0.05
    assert out["robust_iterations"].dtype == np.int64 and out.attrs["scalign_robust"] == loss
    # the op runs the pair-level kernel per structure
    X = corrupted["coords"].values[7]
    _, R, error, w = iteratively_reweighted_procrustes(X, corrupted["reference"].values, loss)
    np.testing.assert_allclose(out["rotation"].values[7], R, atol=1e-12)
    np.testing.assert_allclose(out["robust_weights"].values[7], w, atol=1e-12)
    assert out["rmsd"].values[7] == pytest.approx(error, rel=1e-8)


def test_align_robust_on_the_cluster_equals_threaded(corrupted, client):
    threaded = scalign.align(corrupted, 0, robust="huber").compute(scheduler="threads")
    distributed = client.compute(scalign.align(corrupted, 0, robust="huber")).result()
    for name in ("rotation", "robust_weights", "rmsd"):
        np.testing.assert_allclose(distributed[name].values, threaded[name].values, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_robust_generalized_procrustes_finds_the_true_shape(corrupted, loss):
    plain = scalign.align(corrupted, "mean", aligned=False)
    robust = scalign.align(corrupted, "mean", robust=loss, aligned=False)
    truth = corrupted["reference"].values
    plain_error = scalign.procrustes_rmse(plain["reference"].values, truth)
    robust_error = scalign.procrustes_rmse(robust["reference"].values, truth)
    assert robust.attrs["gpa_converged"] and len(robust.attrs["gpa_shifts"]) >= 2
    assert robust_error < 0.01 and plain_error > 0.3


@pytest.mark.parametrize("loss", ["tukey", "welsch"])
@pytest.mark.parametrize("budget", [1, 2, 3])
def test_the_huber_start_shares_the_generalized_procrustes_budget(corrupted, loss, budget):
    """Tukey and Welsch start from the Huber mean, whose passes had a limit of their own:
    max_iterations=3 could make 6 passes."""
    out = scalign.align(
        corrupted, "mean", robust=loss, aligned=False, max_iterations=budget, tol=1e-300
    )
    assert out.attrs["gpa_iterations"] == len(out.attrs["gpa_shifts"]) == budget
    assert not out.attrs["gpa_converged"]


def test_align_rejects_an_unknown_robust_loss(corrupted):
    with pytest.raises(ValueError, match="unknown robust 'l1'"):
        scalign.align(corrupted, robust="l1")


def test_tolerance_is_relative_to_the_prior_weights(adk):
    """Masses (12-32) as priors: the same fit and the same iterations as the masses over
    their largest; tol was absolute on the weights, 12-32 times stricter with masses."""
    X, Y = adk["coords"][60].astype(np.float64), adk["coords"][0].astype(np.float64)
    X[::50] += 8.0  # outliers to reweight
    masses = adk["masses"].astype(np.float64)
    fits = [
        irls_superpose(X, Y, w, loss="huber", tol=1e-3) for w in (masses, masses / masses.max())
    ]
    assert int(fits[0].iterations) == int(fits[1].iterations)
    np.testing.assert_allclose(fits[0].fit.rotation, fits[1].fit.rotation, atol=1e-12)
    np.testing.assert_allclose(fits[0].weights / masses.max(), fits[1].weights, atol=1e-12)
