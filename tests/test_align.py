"""The lazy ensemble op: laziness, references, weights, GPA, schedulers, real data."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from reference_fits import horn
from scipy.spatial.transform import Rotation

import scalign
from scalign import align, helix_ensemble, make_ensemble


class ComputeForbidden(RuntimeError):
    pass


def forbid_compute(dsk, keys, **kwargs):
    raise ComputeForbidden("the op computed something while it should stay lazy")


@pytest.fixture
def ens():
    return helix_ensemble(300, 24, noise=0.05, chunks=64, scale_range=(0.5, 2.0), seed=3)


def test_align_is_lazy_and_chunked_along_structure(ens):
    with dask.config.set(scheduler=forbid_compute):
        out = align(ens, ens["reference"], scale=True)
        with pytest.raises(ComputeForbidden):
            out["rmsd"].values  # noqa: B018
    assert out["aligned"].chunks == ens["coords"].chunks
    assert out["rotation"].dims == ("structure", "row", "col")
    assert out["translation"].dims == ("structure", "space")
    for name in ("scale", "rmsd", "r2"):
        assert out[name].dims == ("structure",)
    assert out["aligned"].dtype == np.float32 and out["rotation"].dtype == np.float64


def test_declared_meta_matches_computed_type(ens):
    out = align(ens, 0)
    for name, var in out.data_vars.items():
        if var.chunks is None:
            continue
        computed = var.data.compute()
        assert type(var.data._meta) is type(computed), name
        assert var.data._meta.dtype == computed.dtype, name


def test_recovers_known_transforms_and_matches_brute_force(ens):
    out = align(ens, ens["reference"], scale=True).compute()
    assert np.abs(out["rotation"] - ens["true_rotation"]).max() < 0.02
    np.testing.assert_allclose(out["scale"], ens["true_scale"], rtol=0.01)
    X = ens["coords"].values.astype(np.float64)
    Y = ens["reference"].values
    for i in range(0, 300, 37):
        R, t, s, e = horn(X[i], Y, scale=True)
        np.testing.assert_allclose(out["rotation"][i], R, atol=1e-9)
        np.testing.assert_allclose(out["translation"][i], t, atol=1e-8)
        assert out["rmsd"][i] == pytest.approx(e, rel=1e-9)


def test_noise_free_recovery_to_1e_6():
    ens = helix_ensemble(200, 30, chunks=50, scale_range=(0.3, 3.0), dtype=np.float64, seed=5)
    out = align(ens, ens["reference"], scale=True).compute()
    assert np.abs(out["rotation"] - ens["true_rotation"]).max() < 1e-6
    assert np.abs(out["translation"] - ens["true_translation"]).max() < 1e-6
    assert np.abs(out["scale"] - ens["true_scale"]).max() < 1e-6
    assert out["rmsd"].max() < 1e-6


def test_reference_by_index_array_and_first(ens):
    by_first = align(ens, "first").compute()
    by_zero = align(ens, 0).compute()
    by_array = align(ens, ens["coords"][0].values).compute()
    by_negative = align(ens, -300).compute()
    for other in (by_zero, by_array, by_negative):
        xr.testing.assert_allclose(by_first[["rmsd", "rotation"]], other[["rmsd", "rotation"]])
    assert by_first["rmsd"][0] < 1e-6


def test_carries_coords_and_attrs():
    ens = helix_ensemble(40, 10, chunks=16).assign_coords(structure=np.arange(100, 140))
    ens.attrs["experiment"] = "demo"
    out = align(ens, 0)
    assert out.attrs["experiment"] == "demo"
    np.testing.assert_array_equal(out["structure"], np.arange(100, 140))


def test_coords_attrs_go_to_aligned_only():
    """The coordinates' attrs (units, long_name) went to every output, so ``r2``, the
    rotation and the scale said they were in nm (and xarray's plots labelled them so)."""
    ens = helix_ensemble(6, 10, chunks=4)
    ens["coords"].attrs = {"units": "nm", "long_name": "atom positions"}
    for kwargs in ({}, {"robust": "huber"}, {"reference": "mean"}):
        out = align(ens, **{"reference": 0} | kwargs)
        assert out["aligned"].attrs == {"units": "nm", "long_name": "atom positions"}
        for name in set(out.data_vars) - {"aligned"}:
            assert out[name].attrs == {}, name


def test_the_reference_keeps_the_point_labels_without_aligned_coordinates():
    """With aligned=False the result had no point coordinates at all, though its
    reference is over point."""
    ens = helix_ensemble(6, 10, chunks=4).assign_coords(
        point=np.arange(10) + 100, atom=("point", [f"CA{i}" for i in range(10)])
    )
    for aligned in (True, False):
        out = align(ens, reference=0, aligned=aligned)
        assert out["reference"].dims == ("point", "space")
        np.testing.assert_array_equal(out["point"].values, np.arange(10) + 100)
        assert out["atom"].values.tolist() == [f"CA{i}" for i in range(10)]


def test_generalized_procrustes_converges_to_the_shape_mean():
    ens = helix_ensemble(120, 20, noise=0.05, chunks=32, seed=9)
    out = align(ens, "mean", tol=1e-8)
    assert out.attrs["gpa_converged"] and out.attrs["gpa_iterations"] >= 2
    assert out.attrs["gpa_shift"] <= 1e-8
    done = out.compute()
    mean = done["aligned"].mean("structure").values
    np.testing.assert_allclose(mean - mean.mean(0), done["reference"].values, atol=1e-5)
    to_first = align(ens, 0).compute()
    assert done["rmsd"].mean() < to_first["rmsd"].mean()


def test_generalized_procrustes_with_scale_keeps_the_size():
    ens = helix_ensemble(60, 16, noise=0.02, chunks=20, scale_range=(0.5, 2), seed=2)
    out = align(ens, "mean", scale=True)
    first = ens["coords"][0].values.astype(np.float64)
    size = np.linalg.norm(first - first.mean(0))
    assert np.linalg.norm(out["reference"].values) == pytest.approx(size, rel=1e-9)
    assert out.attrs["gpa_converged"]


def test_weights_by_name_array_and_per_structure(ens):
    w = np.linspace(0.2, 2.0, ens.sizes["point"])
    named = align(ens.assign(masses=("point", w)), 0, weights="masses").compute()
    as_array = align(ens, 0, weights=w).compute()
    per_structure = align(ens, 0, weights=np.tile(w, (300, 1))).compute()
    xr.testing.assert_allclose(named[["rmsd", "rotation"]], as_array[["rmsd", "rotation"]])
    xr.testing.assert_allclose(named[["rmsd", "rotation"]], per_structure[["rmsd", "rotation"]])
    X = ens["coords"].values.astype(np.float64)
    R, _, _, e = horn(X[5], X[0], w)
    assert named["rmsd"][5] == pytest.approx(e, rel=1e-9)


def test_nan_structure_gives_nan_for_itself_only(ens):
    coords = ens["coords"].values.copy()
    coords[7, 3, 0] = np.nan
    out = align(make_ensemble(da.from_array(coords), chunks=64), 0).compute()
    assert np.isnan(out["rmsd"][7]) and np.isnan(out["aligned"][7]).all()
    assert np.isfinite(out["rmsd"].drop_sel(structure=7)).all()


def test_lazy_per_structure_weights_invalid_row_gives_nan_for_that_structure(ens):
    w = np.ones((300, ens.sizes["point"]))
    w[4] = -1
    lazy = xr.DataArray(w, dims=("structure", "point")).chunk({"structure": 64})
    out = align(ens, 0, weights=lazy).compute()
    assert np.isnan(out["rmsd"][4]) and np.isfinite(out["rmsd"][5])


@pytest.mark.parametrize(
    ("values", "message"),
    [(-np.ones(24), "negative"), (np.zeros(24), "all zero"), (np.full(24, np.nan), "non-finite")],
)
def test_stored_point_weights_are_checked_though_lazy(ens, tmp_path, capsys, values, message):
    """Per-point weights read lazily from a zarr store (``--weights masses``) were not
    checked: invalid ones made every structure NaN, and the command exited 0."""
    from scalign.cli import main

    source = tmp_path / "in.zarr"
    scalign.save_zarr(ens.assign(masses=("point", values)), source)
    with pytest.raises(ValueError, match=message):
        align(scalign.open_ensemble(source), 0, weights="masses")
    out = tmp_path / "out.zarr"
    assert main(["align", str(source), str(out), "--weights", "masses", "--quiet"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_threaded_and_cluster_results_are_identical(ens, client):
    threaded = align(ens, "mean", scale=True).compute(scheduler="threads")
    on_cluster = align(ens, "mean", scale=True).compute()
    assert client.scheduler_info()["workers"]
    xr.testing.assert_allclose(threaded, on_cluster, rtol=1e-12, atol=1e-12)


def test_zarr_to_zarr_on_the_cluster(ens, client, tmp_path):
    scalign.save_zarr(ens, tmp_path / "in.zarr")
    lazy = scalign.open_ensemble(tmp_path / "in.zarr")
    assert lazy["coords"].chunks[0][0] == 64
    scalign.save_zarr(align(lazy, 0), tmp_path / "out.zarr")
    written = xr.open_zarr(tmp_path / "out.zarr", consolidated=False)
    expected = align(ens, 0).compute(scheduler="threads")
    xr.testing.assert_allclose(
        written[["rmsd", "rotation", "aligned"]].compute(),
        expected[["rmsd", "rotation", "aligned"]],
    )


def test_adk_calpha_rmsd_to_frame_0(adk):
    ca = adk["coords"][:, adk["ca_indices"]]
    out = align(make_ensemble(ca, chunks=25), 0).compute()
    want = np.array([horn(x, ca[0].astype(np.float64))[3] for x in ca.astype(np.float64)])
    np.testing.assert_allclose(out["rmsd"], want, rtol=1e-7, atol=1e-9)
    assert out["rmsd"][0] < 1e-6
    assert 6.0 < out["rmsd"].max() < 7.5
    assert out["rmsd"][-1] > 0.99 * out["rmsd"].max()


def test_adk_generalized_procrustes_mean_and_rmsd_to_it(adk):
    """GPA of the C-alpha ensemble against an independent float64 loop over scipy fits."""
    ca = adk["coords"][:, adk["ca_indices"]].astype(np.float64)
    out = align(make_ensemble(ca, chunks=25), "mean", tol=1e-10).compute()
    mean = ca[0] - ca[0].mean(axis=0)
    for _ in range(200):
        fitted = []
        for x in ca:
            rot, _ = Rotation.align_vectors(mean, x - x.mean(axis=0))
            fitted.append(rot.apply(x - x.mean(axis=0)))
        new = np.mean(fitted, axis=0)
        new -= new.mean(axis=0)
        shift = np.sqrt(np.mean(np.sum((new - mean) ** 2, axis=1)))
        mean = new
        if shift < 1e-10:
            break
    rmsd_to_mean = np.sqrt(np.mean(np.sum((np.array(fitted) - mean) ** 2, axis=2), axis=1))
    assert out.attrs["gpa_converged"] and out.attrs["gpa_shift"] <= 1e-10
    np.testing.assert_allclose(out["reference"].values, mean, atol=1e-8)
    np.testing.assert_allclose(out["rmsd"].values, rmsd_to_mean, atol=1e-8)
    assert out["rmsd"].max() < 4.5  # the mean sits between the closed and open states (6-7.5 apart)


def test_adk_mass_weighted_all_atom_alignment(adk):
    ens = make_ensemble(adk["coords"], adk["masses"], chunks=20)
    out = align(ens, 0, weights="weights").compute()
    X = adk["coords"].astype(np.float64)
    for i in (1, 40, 97):
        R, t, _, e = horn(X[i], X[0], adk["masses"])
        np.testing.assert_allclose(out["rotation"][i], R, atol=1e-9)
        np.testing.assert_allclose(out["translation"][i], t, atol=1e-7)
        assert out["rmsd"][i] == pytest.approx(e, rel=1e-8)
    unweighted = align(ens, 0).compute()
    assert not np.allclose(out["rmsd"][1:], unweighted["rmsd"][1:])


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"reference": "median"}, ValueError, "unknown reference 'median'"),
        ({"reference": 300}, ValueError, "out of range"),
        ({"reference": True}, TypeError, "not a bool"),
        ({"reference": np.zeros((5, 3))}, ValueError, r"shape \(24, 3\)"),
        ({"reference": np.zeros((24, 2))}, ValueError, r"shape \(24, 3\)"),
        ({"reference": np.full((24, 3), np.nan)}, ValueError, "non-finite"),
        ({"weights": "masses"}, ValueError, "'masses' is not in the ensemble"),
        ({"weights": np.zeros(24)}, ValueError, "all zero"),
        ({"weights": -np.ones(24)}, ValueError, "negative"),
        ({"weights": np.ones(23)}, ValueError, "one per point"),
        # generalized Procrustes' budget and tolerance (IndexError / silently kept before)
        ({"reference": "mean", "max_iterations": 0}, ValueError, "max_iterations must be"),
        ({"reference": "mean", "max_iterations": 2.5}, TypeError, "max_iterations must be"),
        ({"reference": "mean", "tol": -1.0}, ValueError, "tol must be a positive"),
        ({"reference": "mean", "tol": float("nan")}, ValueError, "tol must be a positive"),
    ],
)
def test_bad_arguments_get_clear_errors(ens, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        align(ens, **kwargs)


def test_bad_ensembles_get_clear_errors(ens):
    with pytest.raises(ValueError, match="empty"):
        align(ens.isel(structure=slice(0, 0)))
    with pytest.raises(ValueError, match="dims"):
        align(ens["coords"].transpose("point", "structure", "space").to_dataset(name="coords"))
    with pytest.raises(ValueError, match="no 'coords'"):
        align(ens.rename(coords="xyz"))
    with pytest.raises(ValueError, match="at least 3 are needed"):
        align(ens.isel(point=slice(0, 2)))
    with pytest.raises(ValueError, match=r"reference structure has \d+ non-finite"):
        coords = ens["coords"].values.copy()
        coords[0, 0, 0] = np.nan
        align(make_ensemble(da.from_array(coords)))
    # a reference whose points coincide defines no rotation (any answer was returned)
    with pytest.raises(ValueError, match="reference is degenerate: all of its points coincide"):
        align(ens, np.ones((ens.sizes["point"], 3)))
    flat = ens["coords"].values.copy()
    flat[2] = flat[2, :1]
    with pytest.raises(ValueError, match="reference structure is degenerate"):
        align(make_ensemble(flat), 2)
    with pytest.raises(ValueError, match="reference is degenerate"):
        align(ens, np.ones((-(-ens.sizes["point"] // 4), 3)), coarsen=4)


def test_make_ensemble_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        make_ensemble(np.full((2, 5, 3), np.nan))
    with pytest.raises(ValueError, match="empty"):
        make_ensemble(np.zeros((0, 5, 3)))
    with pytest.raises(ValueError, match=r"shape \(structure, point, space\)"):
        make_ensemble(np.zeros((4, 5, 3, 1)))
    # one structure: the dims it needs, not "(..., n_points, d)"
    for one in (np.ones((5, 3)), da.ones((5, 3))):
        with pytest.raises(ValueError, match=r"\(structure, point, space\), got \(5, 3\) \(one"):
            make_ensemble(one)
    with pytest.raises(ValueError, match="weights.*all zero"):
        make_ensemble(np.ones((2, 5, 3)), np.zeros(5))


def test_fit_only_skips_the_aligned_coordinates(ens):
    full = align(ens, 0, scale=True).compute()
    fit = align(ens, 0, scale=True, aligned=False)
    assert "aligned" not in fit and fit["rmsd"].chunks == ens["coords"].chunks[:1]
    xr.testing.assert_identical(fit.compute(), full.drop_vars("aligned"))
