"""Pairwise RMSD: the blockwise kernel and the lazy op against a scipy brute force."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.spatial.transform import Rotation

import scalign
from scalign import helix_ensemble, make_ensemble, pairwise_rmsd
from scalign.kernels.pairwise import pairwise_rmsd as pairwise_kernel


def brute_force(A, B, weights=None):
    """float64, one scipy ``align_vectors`` per pair with weighted centroids."""
    w = np.ones(A.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    p = w / w.sum()
    out = np.empty((len(A), len(B)))
    for i, a in enumerate(np.asarray(A, dtype=np.float64)):
        for j, b in enumerate(np.asarray(B, dtype=np.float64)):
            ac, bc = a - p @ a, b - p @ b
            rot, _ = Rotation.align_vectors(bc, ac, weights=w)
            out[i, j] = np.sqrt(p @ np.sum((rot.apply(ac) - bc) ** 2, axis=1))
    return out


@pytest.fixture(scope="module")
def ens():
    return helix_ensemble(45, 30, noise=0.4, chunks=10, seed=8)


def test_kernel_equals_brute_force_and_is_symmetric(ens):
    X = ens["coords"].values
    D = pairwise_kernel(X)
    np.testing.assert_allclose(D, brute_force(X, X), atol=1e-9)
    assert np.all(np.diag(D) == 0.0)
    np.testing.assert_allclose(D, D.T, atol=1e-12)


def test_kernel_handles_near_duplicates_and_2d():
    rng = np.random.default_rng(0)
    X = scalign.helix(50)
    Q = Rotation.random(random_state=rng).as_matrix()
    A = np.stack([X, X @ Q + 3.0, X + rng.normal(scale=1e-7, size=X.shape)])
    D = pairwise_kernel(A)
    np.testing.assert_allclose(D, brute_force(A, A), atol=1e-10)
    P = rng.normal(size=(6, 20, 2))
    expected = [[scalign.procrustes_rmse(a, b) for b in P] for a in P]
    np.testing.assert_allclose(pairwise_kernel(P), expected, atol=1e-12)


def svd_kabsch_rmsd(A, B):
    """float64 SVD Kabsch (proper rotations) for every pair, explicit residual."""
    out = np.empty((len(A), len(B)))
    for i, a in enumerate(A):
        for j, b in enumerate(B):
            ac, bc = a - a.mean(0), b - b.mean(0)
            U, _, Vt = np.linalg.svd(ac.T @ bc)
            D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
            out[i, j] = np.sqrt(np.mean(np.sum((ac @ U @ D @ Vt - bc) ** 2, axis=1)))
    return out


@pytest.mark.parametrize("noise", [0.0, 1e-9, 1e-6, 1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("shape", ["line", "plane"])
def test_kernel_matches_svd_for_collinear_and_planar_sets(shape, noise):
    """For collinear sets λmax is a (nearly) repeated root of the QCP quartic: Newton pins
    it down to ~sqrt(eps) only (RMSD 3e-3 instead of 0 for a rod against itself moved),
    and rounding can throw it onto the smallest root (a rod against its mirror image: 43
    instead of 0). Mirror images are in the batch. Tolerance 2e-9 of the size: with an
    RMSD ~1e-7 of the size (noise 1e-6), rounding of H alone moves any float64 fit, the
    SVD reference included, by ~1e-9 of the size (both checked against 50-digit mpmath)."""
    rng = np.random.default_rng(3)
    if shape == "line":
        base = np.outer(np.arange(20.0), [1.0, 2.0, 3.0])
    else:
        base = np.c_[rng.normal(size=(20, 2)) * 5, np.zeros(20)]
    X = np.stack([base @ Rotation.random(random_state=s).as_matrix().T + s for s in range(6)])
    X = np.concatenate([X, X[:, ::-1] * [1.0, 1.0, -1.0]])
    X = X + rng.normal(scale=noise, size=X.shape)
    c = X - X.mean(1, keepdims=True)
    g = np.mean(np.sum(c * c, axis=2), axis=1)
    size = np.sqrt(g[:, None] + g[None, :])
    D = pairwise_kernel(X)
    np.testing.assert_array_less(np.abs(D - svd_kabsch_rmsd(X, X)), 2e-9 * size)
    if shape == "line" and noise == 0.0:
        np.testing.assert_array_less(D, 1e-13 * size)  # every pair superposes exactly
    D_other = pairwise_kernel(X[:5], X)
    np.testing.assert_array_less(np.abs(D_other - svd_kabsch_rmsd(X[:5], X)), 2e-9 * size[:5])


def test_op_equals_brute_force_and_computes_one_triangle(ens):
    D = pairwise_rmsd(ens, chunks=10)
    assert D.dims == ("structure", "structure_other") and D.chunks == ((10,) * 4 + (5,),) * 2
    graph = dict(D.data.__dask_graph__())
    names = [str(k[0] if isinstance(k, tuple) else k) for k in graph]
    assert sum(name.startswith("rmsd_block") for name in names) == 5 * 6 // 2  # one triangle
    assert sum(name.startswith("centre") for name in names) == 5  # each chunk centred once
    X = ens["coords"].values
    np.testing.assert_allclose(D.values, brute_force(X, X), atol=1e-9)


def test_op_against_another_ensemble_with_weights(ens):
    other = helix_ensemble(13, 30, noise=0.4, chunks=5, seed=9)
    w = np.linspace(0.5, 3.0, 30)
    D = pairwise_rmsd(ens, other, weights=w, chunks=16)
    assert D.shape == (45, 13)
    expected = brute_force(ens["coords"].values, other["coords"].values, w)
    np.testing.assert_allclose(D.values, expected, atol=1e-9)


def test_threaded_and_cluster_agree_and_zarr_round_trip(ens, client, tmp_path):
    D = pairwise_rmsd(ens, chunks=10)
    threaded = D.compute(scheduler="threads")
    on_cluster = client.compute(D).result()
    np.testing.assert_allclose(on_cluster.values, threaded.values, atol=1e-13)
    path = scalign.save_zarr(D.to_dataset(), tmp_path / "rmsd.zarr")
    back = xr.open_zarr(path, consolidated=False)["rmsd"]
    np.testing.assert_array_equal(back.values, threaded.values)


def test_nan_structure_gives_nan_row_and_column_only(ens):
    X = ens["coords"].values.copy()
    X[4, 2, 1] = np.nan
    D = pairwise_rmsd(make_ensemble(da.from_array(X, chunks=10)), chunks=10).values
    assert np.all(np.isnan(D[4])) and np.all(np.isnan(D[:, 4]))
    keep = np.delete(np.arange(45), 4)
    assert np.all(np.isfinite(D[np.ix_(keep, keep)]))


def test_is_lazy(ens):
    def forbid(*args, **kwargs):
        raise RuntimeError("computed")

    with dask.config.set(scheduler=forbid):
        D = pairwise_rmsd(ens)
    assert D.data.npartitions >= 1


def test_adk_calpha_pairwise_matches_brute_force(adk):
    ca = adk["coords"][::10][:, adk["ca_indices"]]
    D = pairwise_rmsd(make_ensemble(ca), chunks=4).values
    np.testing.assert_allclose(D, brute_force(ca, ca), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"chunks": 0}, ValueError, "chunks must be a positive integer"),
        ({"weights": "masses"}, ValueError, "weights variable 'masses' is not in the ensemble"),
        ({"weights": np.ones(29)}, ValueError, r"shape \(\.\.\., 30\)"),
        ({"weights": np.ones((45, 30))}, ValueError, r"one weight per point"),
        ({"other": helix_ensemble(3, 31)}, ValueError, "other has 31 points"),
    ],
)
def test_bad_input_gets_clear_errors(ens, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        pairwise_rmsd(ens, **kwargs)


def test_item_labels_are_kept_on_both_axes_lazy_ones_lazily(ens):
    """A frame time over structure (lazy here) labels both axes: ``time`` and
    ``time_other``; the index labels too. They were dropped."""
    n = ens.sizes["structure"]
    labelled = ens.assign_coords(
        structure=np.arange(n) * 10,
        time=("structure", da.arange(n, chunks=10) * 0.5),
    )
    other = labelled.isel(structure=slice(5, 20))

    def forbid(*args, **kwargs):
        raise RuntimeError("computed")

    with dask.config.set(scheduler=forbid):
        D = pairwise_rmsd(labelled)
        E = pairwise_rmsd(labelled, other)
    assert isinstance(D["time"].data, da.Array)
    np.testing.assert_array_equal(D["time"].values, np.arange(n) * 0.5)
    np.testing.assert_array_equal(D["time_other"].values, np.arange(n) * 0.5)
    np.testing.assert_array_equal(D["structure_other"].values, np.arange(n) * 10)
    np.testing.assert_array_equal(E["time_other"].values, np.arange(5, 20) * 0.5)
    np.testing.assert_array_equal(E["structure"].values, np.arange(n) * 10)
    assert E["time_other"].dims == ("structure_other",)
    np.testing.assert_allclose(E.values, D.values[:, 5:20], atol=1e-12)
