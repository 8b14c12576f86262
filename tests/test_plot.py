"""Plots draw the data they are given (checked on the artists, Agg backend)."""

from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import scalign  # noqa: E402
from scalign import plot  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_rmsd_distribution_counts_every_finite_structure():
    ens = scalign.helix_ensemble(60, 20, noise=0.1, seed=1)
    result = scalign.align(ens, 0, aligned=False).compute()
    rmsd = result["rmsd"].values.copy()
    rmsd[3] = np.nan
    result["rmsd"].values[:] = rmsd
    ax = plot.rmsd_distribution(result, bins=10)
    heights = [patch.get_height() for patch in ax.patches]
    assert sum(heights) == 59 and "1 NaN left out" in ax.get_title()
    counts, _ = np.histogram(rmsd[np.isfinite(rmsd)], bins=10)
    np.testing.assert_array_equal(heights, counts)


def test_point_residuals_draws_residuals_and_irls_weights(tmp_path):
    rng = np.random.default_rng(0)
    Y = scalign.helix(80)
    X = Y + rng.normal(scale=0.01, size=Y.shape)
    X[::10] += 5.0
    aligned, _, _, weights = scalign.iteratively_reweighted_procrustes(X, Y, "tukey")
    ax = plot.point_residuals(aligned, Y, weights)
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), np.linalg.norm(aligned - Y, axis=1))
    twin = [a for a in ax.figure.axes if a is not ax][0]
    np.testing.assert_allclose(twin.get_lines()[0].get_ydata(), weights)
    ax.figure.savefig(tmp_path / "residuals.png")
    assert (tmp_path / "residuals.png").stat().st_size > 0


def test_pairwise_heatmap_shows_the_matrix():
    ens = scalign.helix_ensemble(12, 20, noise=0.3, seed=2)
    D = scalign.pairwise_rmsd(ens).compute()
    ax = plot.pairwise_heatmap(D)
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), D.values)
    assert ax.get_xlabel() == "structure_other"


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="rmsd must be 1-dimensional"):
        plot.rmsd_distribution(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="aligned has shape"):
        plot.point_residuals(np.zeros((3, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="weights has shape"):
        plot.point_residuals(np.zeros((3, 3)), np.zeros((3, 3)), np.ones(2))
    with pytest.raises(ValueError, match="D is empty"):
        plot.pairwise_heatmap(np.zeros((0, 0)))


def test_registration_panels_and_stack_drift():
    from scalign.kernels.affine import build_affine_matrix

    rng = np.random.default_rng(0)
    fixed = rng.random((20, 30))
    moving = np.roll(fixed, 2, axis=1)
    axes = plot.registration_panels(fixed, moving, fixed + 0.1)
    np.testing.assert_allclose(axes[3].get_images()[0].get_array(), 0.1)
    assert [a.get_title() for a in axes][:3] == ["fixed", "moving", "registered"]
    matrices = np.array([build_affine_matrix(t, t / 2, -t, center=(14.5, 9.5)) for t in range(5)])
    import xarray as xr

    result = xr.Dataset(
        {
            "matrix": (("image", "row", "col"), matrices),
            "registered": (("image", "y", "x"), np.zeros((5, 20, 30))),
        }
    )
    top, bottom = plot.stack_drift(result)
    np.testing.assert_allclose(bottom.get_lines()[0].get_ydata(), np.arange(5), atol=1e-12)
    np.testing.assert_allclose(top.get_lines()[0].get_ydata(), np.arange(5) / 2, atol=1e-12)
    np.testing.assert_allclose(top.get_lines()[1].get_ydata(), -np.arange(5), atol=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        plot.registration_panels(fixed, moving[:5], fixed)
    # one NaN pixel must not blank the panels (the limits come from the finite pixels)
    holed = fixed.copy()
    holed[4, 4] = np.nan
    axes = plot.registration_panels(holed, moving, fixed, axes=plt.subplots(2, 2)[1])
    limits = axes[1].get_images()[0].get_clim()
    np.testing.assert_allclose(limits, np.percentile(fixed[np.isfinite(holed)], [1, 99]))
    with pytest.raises(ValueError, match="fixed has no finite pixel"):
        plot.registration_panels(np.full((3, 3), np.nan), fixed[:3, :3], fixed[:3, :3])
    with pytest.raises(ValueError, match="axes must be 2 Axes, got 1"):
        plot.stack_drift(result, axes=plt.subplots()[1])
    with pytest.raises(ValueError, match="result has no 'rmsd'"):
        plot.rmsd_distribution(result)


def test_reprojection_plots(tmp_path):
    import scalign
    from scalign.plot import ranking_bars, reprojection_panels, score_histogram

    blobs = scalign.random_blobs(8, radius=7.0, seed=1)
    parts = scalign.simulate_particles(blobs, 32, 10, noise=0.3, seed=2)
    other = scalign.blob_volume(scalign.random_blobs(8, radius=7.0, seed=3), 32)
    result = scalign.compare_reprojections(
        parts.stack, [scalign.blob_volume(blobs, 32), other], angles="stack"
    ).compute()
    P = scalign.project(scalign.blob_volume(blobs, 32), parts.A[:1])[0]
    axes = reprojection_panels(parts.stack["images"].values[0], P)
    assert [a.get_title() for a in axes] == ["image", "reprojection", "residual"]
    ax = score_histogram(result, "correlation", top=3)
    assert "worst marked" in ax.get_title() and len(ax.lines) == 3
    ax = ranking_bars(scalign.rank_volumes(result, "cost"))
    assert ax.get_title() == "best volume: 0" and len(ax.patches) == 2
    ax.figure.savefig(tmp_path / "ranking.png")
    holed = parts.stack["images"].values[0].copy()
    holed[0, 0] = np.nan
    residual = reprojection_panels(holed, P)[2].get_images()[0]
    assert np.isclose(residual.get_clim()[1], np.nanmax(np.abs(P - holed)))
    with pytest.raises(ValueError, match="unknown score"):
        score_histogram(result, "loss")
    with pytest.raises(TypeError, match="compare_reprojections"):
        score_histogram(result["cost"], "cost")
    with pytest.raises(ValueError, match="volume must be an index below 2, got 5"):
        score_histogram(result, "cost", volume=5)
    with pytest.raises(TypeError, match="rank_volumes"):
        ranking_bars(result)
