"""Bad input across every CLI command: one line on stderr, exit status 2, no traceback,
and nothing written at the output (not even a hidden partial store)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import scalign
from scalign.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs of every kind, written once."""
    d = tmp_path_factory.mktemp("inputs")
    ens = scalign.helix_ensemble(60, 12, noise=0.05, chunks=20)
    scalign.save_zarr(ens, d / "ens.zarr")
    coords = ens["coords"].values.copy()
    coords[5, 3, 1] = np.nan
    xr.Dataset({"coords": (("structure", "point", "space"), coords)}).to_zarr(
        d / "nan.zarr", consolidated=False
    )
    xr.Dataset({"coords": (("structure", "atom", "space"), ens["coords"].values)}).to_zarr(
        d / "dims.zarr", consolidated=False
    )
    xr.Dataset({"coords": (("structure", "point", "space"), coords[:0])}).to_zarr(
        d / "empty.zarr", consolidated=False
    )
    complex_coords = ens["coords"].values.astype(np.complex64)
    xr.Dataset({"coords": (("structure", "point", "space"), complex_coords)}).to_zarr(
        d / "complex.zarr", consolidated=False
    )
    scalign.save_zarr(ens, d / "bad_chunk.zarr")
    (d / "bad_chunk.zarr" / "coords" / "c" / "1" / "0" / "0").write_bytes(b"garbage")
    (d / "corrupt.zarr").mkdir()
    (d / "corrupt.zarr" / "zarr.json").write_text("{not json")
    images = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    scalign.save_zarr(scalign.make_stack(images, chunks=3), d / "stack.zarr")
    scalign.save_zarr(scalign.make_stack(images, chunks=3), d / "bad_stack.zarr")
    (d / "bad_stack.zarr" / "images" / "c" / "1" / "0" / "0").write_bytes(b"\0" * 12)
    bad = images.copy()
    bad[2, 4, 4] = np.inf
    xr.Dataset({"images": (("image", "y", "x"), bad)}).to_zarr(d / "inf.zarr", consolidated=False)
    np.save(d / "singular.npy", np.diag([0.0, 1.0, 1.0]))
    np.save(d / "shape.npy", np.eye(4))
    np.save(d / "shift.npy", np.array([[1.0, 0.0, 1.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    np.save(d / "three.npy", np.random.default_rng(1).random((5, 3)))
    np.save(d / "ints.npy", np.arange(60).reshape(5, 4, 3))
    np.save(d / "flat.npy", np.zeros((5, 3)))
    blobs = scalign.random_blobs(seed=1)
    parts = scalign.simulate_particles(blobs, 32, 6, seed=2)
    scalign.export_star(parts.stack, d / "particles.star")
    scalign.save_zarr(parts.stack, d / "particles.zarr")
    scalign.write_volume(d / "map.mrc", scalign.blob_volume(blobs, 32), pixel_size=3.0)
    scalign.write_volume(d / "small.mrc", np.zeros((24, 24, 24), np.float32), pixel_size=3.0)
    scalign.write_volume(d / "finer.mrc", scalign.blob_volume(blobs, 32), pixel_size=2.0)
    (d / "truncated.mrc").write_bytes((d / "map.mrc").read_bytes()[:2000])
    import starfile

    table = starfile.read(d / "particles.star")
    table["particles"] = table["particles"].drop(
        columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    )
    starfile.write(table, d / "no_angles.star")
    return d


CASES = [
    # align: NaN handled per structure (documented), so the bad ones are structural
    (["align", "{d}/dims.zarr", "{out}"], "dims"),
    (["align", "{d}/empty.zarr", "{out}"], "empty"),
    (["align", "{d}/complex.zarr", "{out}"], "float32 or float64, got complex64"),
    (["align", "{d}/corrupt.zarr", "{out}"], "corrupt.zarr is not a readable zarr store"),
    (["align", "{d}/missing.zarr", "{out}"], "no zarr store"),
    (["align", "{d}/bad_chunk.zarr", "{out}"], "bad_chunk.zarr: cannot read variable 'coords'"),
    (["rmsd", "{d}/bad_chunk.zarr", "{out}"], "bad_chunk.zarr: cannot read variable 'coords'"),
    (["align", "{d}/ens.zarr", "{out}", "--robust", "cauchy"], "invalid choice"),
    (["align", "{d}/ens.zarr", "{out}", "--reference", "-100"], "out of range"),
    (["rmsd", "{d}/ens.zarr", "{out}", "--other", "{d}/dims.zarr"], "dims"),
    (["rmsd", "{d}/missing.zarr", "{out}"], "no zarr store"),
    (["icp", "{d}/three.npy", "{d}/flat.npy"], "degenerate"),
    (["icp", "{d}/three.npy", "{d}/missing.npy"], "no point file"),
    (["warp", "{d}/stack.zarr", "{out}", "--matrix", "{d}/singular.npy"], "not invertible"),
    (["warp", "{d}/stack.zarr", "{out}", "--matrix", "{d}/shape.npy"], "3×3"),
    (["warp", "{d}/stack.zarr", "{out}", "--matrix", "nope"], "nope"),
    (["warp", "{d}/stack.zarr", "{out}", "--matrix", "{d}/singular.npy", "--order", "7"], "order"),
    (["warp", "{d}/ens.zarr", "{out}", "--matrix", "{d}/shape.npy"], "images"),
    (["register", "{d}/inf.zarr", "{out}"], "non-finite"),
    (["register", "{d}/bad_stack.zarr", "{out}"], "cannot read variable 'images' at [3:6"),
    (
        ["warp", "{d}/bad_stack.zarr", "{out}", "--matrix", "{d}/shift.npy"],
        "bad_stack.zarr: cannot",
    ),
    (["register", "{d}/stack.zarr", "{out}", "--reference", "last"], "reference"),
    (["import", "{d}/ints.npy", "{out}", "--chunks", "-1"], "chunks"),
    (["import-star", "{d}/missing.star", "{out}"], "missing.star"),
    (["compare", "{d}/particles.zarr", "{d}/small.mrc", "{out}", "--angles"], "box size"),
    (["compare", "{d}/particles.zarr", "{d}/truncated.mrc", "{out}"], "truncated.mrc"),
    (["compare", "{d}/particles.zarr", "{d}/map.mrc", "{out}", "--ctf", "--angles"], "ctf"),
    (["compare", "{d}/particles.zarr", "{d}/map.mrc", "{out}", "--symmetry", "D1"], "symmetry"),
    (["compare", "{d}/particles.zarr", "{d}/map.mrc", "{out}", "--sampling", "0"], "sampling"),
    (["compare", "{d}/stack.zarr", "{d}/map.mrc", "{out}", "--angles"], "rot"),
    (["compare", "{d}/particles.zarr", "{d}/finer.mrc", "{out}", "--angles"], "resample"),
    (["compare", "{d}/particles.zarr", "{d}/map.mrc", "{d}/finer.mrc", "{out}"], "pixel size"),
    (["compare", "{d}/particles.zarr", "{d}/map.mrc", "{out}", "--downsample", "0"], "downsample"),
    (["rank", "{d}/ens.zarr", "--score", "z_score_res_mean"], "invalid choice"),
    (["rank", "{d}/ens.zarr"], "compare_reprojections"),
    (["info", "{d}/missing.zarr"], "no file or zarr store"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(c[0][:1]) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(files, tmp_path, capsys, args, message):
    out = tmp_path / "out.zarr"
    argv = [a.format(d=files, out=out) for a in args]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors: usage, then the error line
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("scalign") and "error:" in last, err
    assert message.lower() in last.lower(), last
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_a_star_file_without_angles_imports_and_compare_asks_for_them(files, tmp_path, capsys):
    stack = tmp_path / "p.zarr"
    assert main(["import-star", str(files / "no_angles.star"), str(stack)]) == 0
    capsys.readouterr()
    out = tmp_path / "out.zarr"
    assert main(["compare", str(stack), str(files / "map.mrc"), str(out), "--angles"]) == 2
    assert "missing ['rot', 'tilt', 'psi']" in capsys.readouterr().err
    assert not out.exists()


def test_weights_or_matrices_labelled_for_other_items_name_themselves():
    """xarray's "cannot align objects with join='exact'" named neither input."""

    ens = scalign.helix_ensemble(20, 12, noise=0.3, chunks=10, seed=1).assign_coords(
        structure=np.arange(20)
    )
    w = xr.DataArray(
        np.ones((20, 12)), dims=("structure", "point"), coords={"structure": np.arange(20) + 1}
    )
    with pytest.raises(
        ValueError,
        match=r"weights and coords have different structure labels "
        r"\(\[1, 2, 3, \.\.\.\] vs \[0, 1, 2, \.\.\.\]\)",
    ):
        scalign.align(ens, reference=0, weights=w)
    stack = scalign.simulate_particles(scalign.random_blobs(4, seed=0), 16, 6).stack
    stack = stack.assign_coords(image=np.arange(6))
    eye = np.broadcast_to(np.eye(3), (6, 3, 3)).copy()
    M = xr.DataArray(eye, dims=("image", "row", "col"), coords={"image": np.arange(6) + 3})
    with pytest.raises(ValueError, match="matrix and images have different image labels"):
        scalign.warp_stack(stack, M)
    # the same labels (or none) are fine
    scalign.warp_stack(stack, M.assign_coords(image=np.arange(6)))
    scalign.align(ens, reference=0, weights=w.assign_coords(structure=np.arange(20)))
