"""Cross-resolution (multiscale) alignment and the coarsening it relies on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import scalign
from scalign import coarsen, multiscale_procrustes

METHODS = ("standard", "weighted", "robust")


def chain(n, seed=0):
    """A compact random-walk chain (consecutive points are neighbours, like a polymer)."""
    return np.cumsum(np.random.default_rng(seed).normal(size=(n, 3)), axis=0)


def moved(Y, seed=0, noise=0.0):
    """``Y`` moved by a known rotation ``Q`` and translation: ``Y = X Q^T + t`` recovers it."""
    rng = np.random.default_rng(seed)
    Q = Rotation.random(random_state=rng).as_matrix()
    t = rng.normal(size=3) * 10
    X = (Y - t) @ Q + rng.normal(scale=noise, size=Y.shape)
    return X, Q, t


def test_coarsen_is_the_block_mean_with_a_short_last_block():
    X = np.arange(7 * 3, dtype=float).reshape(7, 3)
    beads, counts = coarsen(X, 3)
    np.testing.assert_array_equal(counts, [3, 3, 1])
    np.testing.assert_allclose(beads, [X[0:3].mean(0), X[3:6].mean(0), X[6]])
    w = np.array([1, 2, 3, 1, 1, 1, 5.0])
    beads_w, sums = coarsen(X, 3, w)
    np.testing.assert_allclose(sums, [6, 3, 5])
    np.testing.assert_allclose(beads_w[0], w[:3] @ X[:3] / 6)


def test_a_block_of_zero_weights_is_left_out_not_nan(adk):
    """AdK's Cα trace with its first 12 residues weighted 0 (a disordered terminus, say):
    a block whose weights are all zero has no weighted mean; it sits at its points' plain
    mean with weight 0 and the weighted fits leave it out. 0 / 0 made every result NaN."""
    ca = adk["ca_indices"]
    target, high = adk["coords"][0][ca], adk["coords"][40][ca]
    w = np.ones(len(ca))
    w[:12] = 0.0
    beads, block_weights = coarsen(high, 4, w)
    np.testing.assert_array_equal(block_weights[:4], [0, 0, 0, 4])
    np.testing.assert_allclose(beads[:3], high[:12].astype(float).reshape(3, 4, 3).mean(1))
    low = coarsen(target, 4)[0]
    keep = block_weights > 0
    _, R_ref, error_ref = scalign.weighted_procrustes(beads[keep], low[keep], block_weights[keep])
    _, R, error = multiscale_procrustes(low, high, 4, "weighted", weights=w)
    np.testing.assert_allclose(R, R_ref, atol=1e-12)
    assert error == pytest.approx(error_ref, rel=1e-12)
    out = scalign.align(scalign.make_ensemble(np.stack([target, high])), 0, weights=w, coarsen=4)
    np.testing.assert_allclose(out["rotation"].values[1], R_ref, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [200, 203])  # a multiple of the factor and not
def test_recovers_a_known_transform_between_resolutions(method, n):
    Y = chain(n)
    high, Q, t = moved(Y, seed=n)
    low = coarsen(Y, 4)[0]  # the fixed low-resolution structure
    aligned, R, error = multiscale_procrustes(low, high, 4, method)
    np.testing.assert_allclose(R, Q, atol=1e-6)
    np.testing.assert_allclose(aligned, Y, atol=1e-6)  # applied at full resolution
    assert aligned.shape == (n, 3) and error < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_recovers_a_known_transform_from_noisy_data_with_scale(method):
    Y = chain(401)
    high, Q, _ = moved(Y, seed=1, noise=0.05)
    high = high / 1.5
    low = coarsen(Y, 4)[0]
    aligned, R, error = multiscale_procrustes(low, high, 4, method, scale=True)
    assert scalign.rotation_angle(R, Q) < 0.05
    assert np.sqrt(np.mean(np.sum((aligned - Y) ** 2, axis=1))) < 0.1
    assert error < 0.05  # the beads average the noise of 4 points


def test_weighted_method_uses_block_counts():
    """With a short last block, "weighted" equals a weighted fit on the block counts."""
    Y = chain(201)
    high, _, _ = moved(Y, seed=2, noise=0.2)
    low = coarsen(Y, 4)[0]
    beads, counts = coarsen(high, 4)
    _, R_weighted, _ = multiscale_procrustes(low, high, 4, "weighted")
    _, R_standard, _ = multiscale_procrustes(low, high, 4, "standard")
    np.testing.assert_allclose(R_weighted, scalign.kabsch(beads, low, counts).rotation, atol=1e-12)
    np.testing.assert_allclose(R_standard, scalign.kabsch(beads, low).rotation, atol=1e-12)
    assert not np.allclose(R_weighted, R_standard, atol=1e-9)


def test_robust_method_ignores_outlying_beads():
    Y = chain(400)
    high, Q, _ = moved(Y, seed=3, noise=0.02)
    low = coarsen(Y, 4)[0]
    low[::7] += 6.0  # 15% of the low-resolution beads are wrong
    _, R_robust, _ = multiscale_procrustes(low, high, 4, "robust", robust_loss="tukey")
    _, R_plain, _ = multiscale_procrustes(low, high, 4, "standard")
    assert scalign.rotation_angle(R_robust, Q) < 0.2 < scalign.rotation_angle(R_plain, Q)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "message"),
    [
        ((np.zeros((50, 3)), chain(200), 4), {"method": "median"}, ValueError, "unknown method"),
        ((np.zeros((49, 3)), chain(200), 4), {}, ValueError, r"needs ceil\(200/4\) = 50"),
        ((chain(2), chain(5), 4), {}, ValueError, "low_res has 2 point"),
        ((chain(50), chain(200), 0), {}, ValueError, "scale_factor must be a positive"),
        ((chain(50), chain(200), 2.0), {}, TypeError, "scale_factor must be a positive"),
        ((chain(50)[:, :2], chain(200), 4), {}, ValueError, "2-dimensional"),
        ((np.full((50, 3), np.nan), chain(200), 4), {}, ValueError, "low_res has 150 non-finite"),
        ((np.ones((50, 3)), chain(200), 4), {}, ValueError, "low_res is degenerate"),
        (
            (chain(50), chain(200), 4),
            {"robust_loss": "l1", "method": "robust"},
            ValueError,
            "unknown robust_loss",
        ),
    ],
)
def test_bad_input_gets_clear_errors(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        multiscale_procrustes(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# the ensemble op: scalign.align(..., coarsen=f)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ens():
    return scalign.helix_ensemble(90, 103, noise=0.0, chunks=40, seed=3, dtype=np.float64)


def test_align_coarsen_recovers_known_transforms_at_full_resolution(ens):
    low = coarsen(ens["reference"].values, 4)[0]
    out = scalign.align(ens, low, coarsen=4).compute()
    assert out["reference"].dims == ("bead", "space") and out.sizes["bead"] == 26
    assert out["aligned"].shape == (90, 103, 3)
    np.testing.assert_allclose(out["rotation"].values, ens["true_rotation"].values, atol=1e-6)
    np.testing.assert_allclose(
        out["aligned"].values, np.broadcast_to(ens["reference"].values, (90, 103, 3)), atol=1e-6
    )


def test_align_coarsen_equals_the_pair_level_weighted_method():
    noisy = scalign.helix_ensemble(30, 103, noise=0.3, chunks=10, seed=4)
    low = coarsen(noisy["reference"].values, 4)[0]
    out = scalign.align(noisy, low, coarsen=4).compute()
    for i in (0, 17):
        aligned, R, error = multiscale_procrustes(low, noisy["coords"].values[i], 4, "weighted")
        np.testing.assert_allclose(out["rotation"].values[i], R, atol=1e-10)
        np.testing.assert_allclose(out["aligned"].values[i], aligned, atol=1e-4)  # float32 out
        assert out["rmsd"].values[i] == pytest.approx(error, rel=1e-6)


def test_align_coarsen_to_a_structure_index_with_robust_weights(ens):
    out = scalign.align(ens, 0, coarsen=5, robust="huber").compute()
    expected = coarsen(ens["coords"].values[0], 5)[0]
    np.testing.assert_allclose(out["reference"].values, expected, atol=1e-12)
    assert out["robust_weights"].dims == ("structure", "bead")
    assert float(out["rmsd"].max()) < 1e-6 and out.attrs["scalign_coarsen"] == 5


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"reference": "mean", "coarsen": 4}, ValueError, "cannot be combined with coarsen"),
        ({"reference": np.zeros((25, 3)), "coarsen": 4}, ValueError, r"\(26, 3\) beads or"),
        ({"reference": 0, "coarsen": 0}, ValueError, "coarsen must be a positive integer"),
        ({"reference": 0, "coarsen": 1.5}, TypeError, "coarsen must be a positive integer"),
        # too few beads for a 3-D fit (fitted anyway before: one bead gave I and RMSD 0)
        (
            {"reference": 0, "coarsen": 52},
            ValueError,
            r"coarsen=52 has 2 point\(s\) in 3 dimensions: at least 3 are needed",
        ),
        ({"reference": 0, "coarsen": 500}, ValueError, "coarsen=500 has 1 point"),
    ],
)
def test_align_coarsen_bad_input(ens, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        scalign.align(ens, **kwargs)
