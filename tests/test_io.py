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


def test_overwrite_must_be_a_boolean(tmp_path):
    """overwrite="no" counted as true and replaced the store."""
    ens = helix_ensemble(6, 5)
    save_zarr(ens, tmp_path / "e.zarr")
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
        save_zarr(ens.isel(structure=slice(0, 2)), tmp_path / "e.zarr", overwrite="no")
    assert xr.open_zarr(tmp_path / "e.zarr", consolidated=False).sizes["structure"] == 6


def test_only_a_zarr_store_is_ever_replaced_and_links_are_followed(tmp_path):
    """overwrite=True replaces a store, never a file or a folder of other things (a
    mistyped output must not destroy an input); a link to a store is written through,
    and nothing is left beside either (a replaced file once stayed as .NAME.old-XXXX)."""
    ens = helix_ensemble(4, 5)
    (tmp_path / "map.mrc").write_text("an input")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("kept")
    for victim in ("map.mrc", "data"):
        with pytest.raises(FileExistsError, match="is not a zarr store: refusing"):
            save_zarr(ens, tmp_path / victim, overwrite=True)
    assert (tmp_path / "map.mrc").read_text() == "an input"
    assert (tmp_path / "data" / "notes.txt").read_text() == "kept"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    save_zarr(ens, scratch / "out.zarr")
    link = tmp_path / "out.zarr"
    link.symlink_to(scratch / "out.zarr")
    save_zarr(ens.isel(structure=slice(2)), link, overwrite=True)
    assert link.is_symlink()
    assert open_ensemble(scratch / "out.zarr").sizes["structure"] == 2
    assert sorted(p.name for p in scratch.iterdir()) == ["out.zarr"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "map.mrc", "out.zarr", "scratch"]
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    save_zarr(ens, empty, overwrite=True)  # an empty folder is fair game
    assert open_ensemble(empty).sizes["structure"] == 4


def test_a_resumed_write_notices_inputs_rewritten_in_place(tmp_path, caplog):
    """An interrupted write is resumed only while its inputs are unchanged: rewriting
    chunks of the input store (an xarray region write leaves the store folder's time,
    and so dask's token of it, alone) restarts the job; an untouched input resumes."""
    from scalign.io import to_zarr_delayed

    source, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    save_zarr(helix_ensemble(400, 8, noise=0.1, chunks=100), source)

    def job():
        return align(open_ensemble(source), 0)

    delayed, _ = to_zarr_delayed(job(), out)
    delayed.compute()  # every block written, then "killed" before the commit
    edited = xr.open_zarr(source, consolidated=False).isel(structure=slice(100, 200)).load()
    edited["coords"] = edited["coords"] * 2.0
    edited[["coords"]].to_zarr(source, region={"structure": slice(100, 200)}, consolidated=False)
    with caplog.at_level("INFO", logger="scalign.io"):
        save_zarr(job(), out)
    assert "resuming" not in caplog.text
    xr.testing.assert_identical(xr.open_zarr(out, consolidated=False).load(), job().compute())
    delayed, _ = to_zarr_delayed(job(), tmp_path / "again.zarr")
    delayed.compute()
    with caplog.at_level("INFO", logger="scalign.io"):
        save_zarr(job(), tmp_path / "again.zarr")
    assert "resuming the interrupted write" in caplog.text


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


def test_uneven_chunks_are_written_and_a_write_that_cannot_start_leaves_nothing(tmp_path):
    """A slice or a concatenation gives chunks zarr cannot store ((5, 10, 10, 7) here):
    the writer rechunks them. A dataset zarr cannot hold fails before any block is
    written and leaves no partial store behind."""
    ens = helix_ensemble(60, 6, chunks=10)
    part = ens.isel(structure=slice(5, 37))
    assert part["coords"].chunks[0] == (5, 10, 10, 7)
    both = xr.concat([part, ens.isel(structure=slice(0, 3))], dim="structure", data_vars="all")
    for name, ds in (("part", part), ("both", both), ("fit", align(part, 0))):
        save_zarr(ds, tmp_path / f"{name}.zarr")
        back = xr.open_zarr(tmp_path / f"{name}.zarr", consolidated=False)
        xr.testing.assert_identical(back.load(), ds.compute())
    bad = ens.assign_attrs(when=object())
    with pytest.raises(TypeError):
        save_zarr(bad, tmp_path / "bad.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.zarr", "fit.zarr", "part.zarr"]


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


def test_a_npy_file_is_read_chunk_by_chunk_in_any_dtype_and_order(tmp_path, monkeypatch):
    """.npy coordinates are read lazily, a slab at a time (files larger than memory),
    with the NaN check in bounded slabs; integers become float64; Fortran order works."""
    import scalign.io

    coords = np.random.default_rng(1).standard_normal((50, 6, 3)).astype(np.float32)
    np.save(tmp_path / "c.npy", coords)
    monkeypatch.setattr(scalign.io, "_SLAB_BYTES", 3 * 6 * 3 * 4)  # 3 structures a slab
    ds = load_ensemble(tmp_path / "c.npy", chunks=16)
    assert isinstance(ds["coords"].data, dask.array.Array)
    assert ds["coords"].chunks[0] == (16, 16, 16, 2)
    np.testing.assert_array_equal(ds["coords"].values, coords)
    np.testing.assert_array_equal(ds["coords"][17:23, 2:5].values, coords[17:23, 2:5])
    ints = np.arange(60).reshape(5, 4, 3)
    np.save(tmp_path / "i.npy", ints)
    back = load_ensemble(tmp_path / "i.npy")["coords"]
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back.values, ints)
    np.save(tmp_path / "f.npy", np.asfortranarray(coords))
    np.testing.assert_array_equal(load_ensemble(tmp_path / "f.npy")["coords"].values, coords)
    coords[47, 1, 2] = np.nan  # in the last slab but one
    np.save(tmp_path / "n.npy", coords)
    with pytest.raises(ValueError, match="coords has 1 non-finite"):
        load_ensemble(tmp_path / "n.npy")


def test_half_floats_become_float32_and_booleans_are_no_coordinates(tmp_path):
    """float16 coordinates were kept (float16 aligned output), booleans imported as 0/1."""
    coords = np.random.default_rng(2).standard_normal((4, 5, 3))
    np.save(tmp_path / "h.npy", coords.astype(np.float16))
    for ds in (load_ensemble(tmp_path / "h.npy"), make_ensemble(coords.astype(np.float16))):
        assert ds["coords"].dtype == np.float32
        np.testing.assert_allclose(ds["coords"].values, coords, atol=2e-3)
    np.save(tmp_path / "b.npy", coords > 0)
    for source in (tmp_path / "b.npy", None):
        with pytest.raises(TypeError, match="coords must be a numeric array, got dtype bool"):
            load_ensemble(source) if source else make_ensemble(coords > 0)


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


@pytest.mark.parametrize(
    ("options", "given"),
    [(["--weights", "masses"], "weights"), (["--key", "xyz"], "key")],
)
def test_import_of_a_npy_file_refuses_npz_options(tmp_path, capsys, options, given):
    """``scalign import coords.npy OUT --weights masses`` wrote an unweighted ensemble
    and exited 0: a .npy holds one array, and --key/--weights were silently ignored."""
    from scalign.cli import main

    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((4, 5, 3)))
    with pytest.raises(ValueError, match=f"^{given} name arrays of an .npz"):
        load_ensemble(tmp_path / "c.npy", **{given: options[1]})
    out = tmp_path / "out.zarr"
    assert main(["import", str(tmp_path / "c.npy"), str(out), *options]) == 2
    assert "is a .npy file" in capsys.readouterr().err and not out.exists()


def test_make_ensemble_keeps_dask_input_lazy():
    import dask.array as da

    lazy = da.random.random((40, 6, 3), chunks=(10, 6, 3))
    with dask.config.set(scheduler="sync"):
        ds = make_ensemble(lazy, chunks=20)
    assert ds["coords"].chunks[0] == (20, 20)


def test_make_ensemble_makes_lazy_integers_float64_like_in_memory_ones():
    """Integer dask coordinates stayed integers (NumPy ones become float64), so the
    ensemble that make_ensemble returned was refused by align."""
    import dask.array as da

    ints = helix_ensemble(6, 8, chunks=6)["coords"].values.round().astype(np.int32)

    def forbid(*args, **kwargs):
        raise RuntimeError("computed")

    with dask.config.set(scheduler=forbid):
        lazy = make_ensemble(da.from_array(ints, chunks=3), chunks=2)
    assert lazy["coords"].dtype == np.float64
    eager = make_ensemble(ints, chunks=2)
    xr.testing.assert_identical(align(lazy, 0).compute(), align(eager, 0).compute())
    with pytest.raises(TypeError, match="real numbers"):
        make_ensemble(da.from_array(ints.astype(complex), chunks=3))


def test_float_variables_are_raw_unless_compression_is_asked(tmp_path):
    ens = helix_ensemble(40, 8, noise=0.1, chunks=20)
    save_zarr(ens, tmp_path / "raw.zarr")
    save_zarr(ens, tmp_path / "z.zarr", compress=True)
    raw = zarr.open_array(tmp_path / "raw.zarr" / "coords", mode="r")
    packed = zarr.open_array(tmp_path / "z.zarr" / "coords", mode="r")
    assert raw.compressors == () and packed.compressors != ()
    np.testing.assert_array_equal(raw[:], packed[:])
    assert zarr.open_array(tmp_path / "raw.zarr" / "outlier", mode="r").compressors != ()


def test_a_corrupt_chunk_names_the_store_variable_and_chunk_on_the_cluster(tmp_path, client):
    """zarr's codec error at compute time ("When changing to a larger dtype...") named
    neither the store nor the variable."""
    path = tmp_path / "ens.zarr"
    save_zarr(helix_ensemble(30, 8, chunks=10), path)
    (path / "coords" / "c" / "2" / "0" / "0").write_bytes(b"garbage")
    ds = open_ensemble(path)
    assert np.isfinite(ds["coords"][:10].values).all()
    with pytest.raises(ValueError, match=r"ens\.zarr: cannot read variable 'coords' at \[20:30,"):
        ds["coords"].compute()
    with pytest.raises(ValueError, match="cannot read variable 'coords'"):
        align(ds).compute()


def test_a_selection_reads_only_the_store_chunks_it_needs(tmp_path):
    """A getter of our own in dask chunks larger than the store's read the whole dask chunk
    for one structure (Dask narrows reads only through its own getters): open_ensemble with
    chunks= keeps Dask's, and a corrupt chunk elsewhere does not stop the selection."""
    path = tmp_path / "ens.zarr"
    ens = helix_ensemble(200, 8, chunks=10)
    save_zarr(ens, path)
    (path / "coords" / "c" / "5" / "0" / "0").write_bytes(b"garbage")
    for chunks in (None, 100):
        got = open_ensemble(path, chunks=chunks)["coords"][0].values
        np.testing.assert_array_equal(got, ens["coords"].values[0])


def test_the_tasks_of_a_job_overtaken_at_its_destination_write_nothing_there(tmp_path):
    """Job A interrupted, job B started at once at the same OUT: A's tasks still running
    wrote their blocks into the partial store B had just made its own (and B, interrupted
    and resumed, trusted A's markers). Each job has a partial store of its own now; B's
    start removes A's, whose tasks then fail, and A's commit cannot replace B's result."""
    from scalign.io import to_zarr_delayed

    out = tmp_path / "out.zarr"
    first, second = helix_ensemble(40, 6, chunks=10, seed=1), helix_ensemble(40, 6, chunks=10)
    late_a, commit_a = to_zarr_delayed(first, out)
    (only_a,) = tmp_path.glob(".out.zarr.*.partial")
    job_b, commit_b = to_zarr_delayed(second, out)
    (only_b,) = tmp_path.glob(".out.zarr.*.partial")
    assert only_b != only_a  # A's late writes go to A's store, never into B's
    with pytest.raises(RuntimeError, match="is gone: another run writing"):
        late_a.compute(scheduler="sync")
    commit_a(success=False)  # not A's store any more: left alone
    job_b.compute(scheduler="sync")
    commit_b()
    with pytest.raises(RuntimeError, match="is gone: another run writing"):
        commit_a()
    np.testing.assert_array_equal(open_ensemble(out)["coords"].values, second["coords"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
