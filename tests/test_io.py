"""zarr v3 stores, .npy/.npz import, atomic writes."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
import zarr

from scalign import align, helix_ensemble, load_ensemble, make_ensemble, open_ensemble, save_zarr


def test_zarr_v3_round_trip_is_lazy_and_chunked(tmp_path):
    ens = helix_ensemble(100, 12, chunks=30)
    save_zarr(ens, tmp_path / "e.zarr")
    assert zarr.open_group(tmp_path / "e.zarr", mode="r").metadata.zarr_format == 3
    back = open_ensemble(tmp_path / "e.zarr")
    assert back["coords"].chunks[0] == (30, 30, 30, 10)
    np.testing.assert_array_equal(back["coords"].values, ens["coords"].values)
    assert back.attrs["seed"] == 0
    rechunked = open_ensemble(tmp_path / "e.zarr", chunks=50)
    assert rechunked["coords"].chunks[0] == (50, 50)


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    ens = helix_ensemble(10, 5)
    save_zarr(ens, tmp_path / "e.zarr")
    with pytest.raises(FileExistsError, match="exists"):
        save_zarr(ens, tmp_path / "e.zarr")
    save_zarr(ens.isel(structure=slice(0, 4)), tmp_path / "e.zarr", overwrite=True)
    assert xr.open_zarr(tmp_path / "e.zarr", consolidated=False).sizes["structure"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.zarr"]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_overwriting_a_plain_file_leaves_nothing_behind(tmp_path, kind):
    """The replaced file was renamed to .NAME.old-XXXX and never removed (rmtree of a
    file fails, silently)."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("kept")
    path = tmp_path / "out.zarr"
    if kind == "file":
        path.write_text("not a store")
    else:
        path.symlink_to(target)
    ens = helix_ensemble(4, 5)
    save_zarr(ens, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "out.zarr"]
    assert path.is_dir() and not path.is_symlink()
    assert target.read_text() == "kept"  # a link is replaced, not what it points to
    np.testing.assert_array_equal(open_ensemble(path)["coords"].values, ens["coords"].values)


def test_saving_a_dataarray_asks_for_a_dataset(tmp_path):
    """An AttributeError ('DataArray' object has no attribute 'variables') before."""
    coords = helix_ensemble(10, 5)["coords"]
    with pytest.raises(TypeError, match=r"Dataset, got a DataArray: .*to_dataset\(name="):
        save_zarr(coords, tmp_path / "c.zarr")
    with pytest.raises(TypeError, match="ds must be an xarray Dataset, got dict"):
        save_zarr({"coords": coords}, tmp_path / "c.zarr")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_the_previous_output_and_no_partial_store(tmp_path):
    ens = helix_ensemble(50, 8, chunks=10)
    save_zarr(ens, tmp_path / "out.zarr")

    def explode(block):
        raise RuntimeError("worker died")

    broken = ens.copy()
    broken["coords"] = broken["coords"].copy(
        data=broken["coords"].data.map_blocks(explode, dtype=np.float32)
    )
    with pytest.raises(RuntimeError, match="worker died"):
        save_zarr(broken, tmp_path / "out.zarr", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    kept = open_ensemble(tmp_path / "out.zarr")
    np.testing.assert_array_equal(kept["coords"].values, ens["coords"].values)


def test_write_of_an_aligned_result_reads_back_identical(tmp_path):
    ens = helix_ensemble(64, 10, noise=0.1, chunks=16)
    result = align(ens, 0)
    save_zarr(result, tmp_path / "r.zarr")
    back = xr.open_zarr(tmp_path / "r.zarr", consolidated=False).compute()
    xr.testing.assert_identical(back, result.compute())


def test_import_npy_and_npz(tmp_path):
    coords = np.random.default_rng(0).standard_normal((20, 7, 3)).astype(np.float32)
    np.save(tmp_path / "c.npy", coords)
    ds = load_ensemble(tmp_path / "c.npy", chunks=8)
    np.testing.assert_array_equal(ds["coords"].values, coords)
    assert ds["coords"].chunks[0] == (8, 8, 4)
    masses = np.arange(1.0, 8.0)
    np.savez(
        tmp_path / "c.npz",
        xyz=coords,
        masses=masses,
        resids=np.arange(7),
        names=np.array(["CA"] * 7),
    )
    ds = load_ensemble(tmp_path / "c.npz")
    np.testing.assert_array_equal(ds["weights"].values, masses)
    assert "resids" in ds and "names" not in ds
    other = load_ensemble(tmp_path / "c.npz", key="xyz", weights="resids")
    assert other["weights"].values[0] == 0


def test_import_the_real_adk_npz(adk, tmp_path):
    from conftest import ADK

    ds = load_ensemble(ADK, chunks=49)
    assert ds.sizes == {"structure": 98, "point": 3341, "space": 3}
    np.testing.assert_array_equal(ds["weights"].values, adk["masses"])
    assert ds.attrs["weights_from"] == "masses"


def test_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_ensemble(tmp_path / "missing.npz")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="expected a .npy or .npz"):
        load_ensemble(tmp_path / "x.txt")
    np.savez(tmp_path / "k.npz", other=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="has none of"):
        load_ensemble(tmp_path / "k.npz")
    with pytest.raises(ValueError, match="no array 'nope'"):
        load_ensemble(tmp_path / "k.npz", key="nope")
    np.save(tmp_path / "bad.npy", np.full((2, 4, 3), np.nan))
    with pytest.raises(ValueError, match="non-finite"):
        load_ensemble(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError):
        open_ensemble(tmp_path / "nothing.zarr")


def test_make_ensemble_keeps_dask_input_lazy():
    import dask.array as da

    lazy = da.random.random((40, 6, 3), chunks=(10, 6, 3))
    with dask.config.set(scheduler="sync"):
        ds = make_ensemble(lazy, chunks=20)
    assert ds["coords"].chunks[0] == (20, 20)


def test_float_variables_are_raw_unless_compression_is_asked(tmp_path):
    ens = helix_ensemble(40, 8, noise=0.1, chunks=20)
    save_zarr(ens, tmp_path / "raw.zarr")
    save_zarr(ens, tmp_path / "z.zarr", compress=True)
    raw = zarr.open_array(tmp_path / "raw.zarr" / "coords", mode="r")
    packed = zarr.open_array(tmp_path / "z.zarr" / "coords", mode="r")
    assert raw.compressors == () and packed.compressors != ()
    np.testing.assert_array_equal(raw[:], packed[:])
    assert zarr.open_array(tmp_path / "raw.zarr" / "outlier", mode="r").compressors != ()
