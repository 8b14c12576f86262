"""MRC volumes and stacks, RELION STAR files: real files in tmp_path, no mocks."""

from __future__ import annotations

import pickle

import dask.array as da
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import xarray as xr
from scipy import ndimage

from scalign import (
    blob_projections,
    blob_volume,
    compare_reprojections,
    euler_to_matrix,
    random_blobs,
)
from scalign.cli import main
from scalign.formats import (
    export_star,
    import_star,
    open_mrc_stack,
    read_volume,
    write_stack,
    write_volume,
)
from scalign.images import make_stack
from scalign.kernels.ctf import ctf_half_plane

PER_IMAGE = ("rot", "tilt", "psi", "shift_x", "shift_y", "defocus_u", "defocus_v", "defocus_angle")


def _mrcs(path, images, voxel_size=None):
    """An image stack written with mrcfile itself (independent of scalign's writer)."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(images))
        mrc.set_image_stack()
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path


def _labelled(n, base, box=(6, 5)):
    """Images whose pixels all equal ``base + i``: easy to recognise after reordering."""
    return (base + np.arange(n, dtype=np.float32))[:, None, None] * np.ones(box, np.float32)


def _particle_stack(n=12, chunks=5, seed=0):
    rng = np.random.default_rng(seed)
    ds = make_stack(
        rng.standard_normal((n, 8, 8)).astype(np.float32),
        chunks=chunks,
        attrs={"pixel_size": 1.3, "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1},
    )
    values = {
        "rot": rng.uniform(-180, 180, n),
        "tilt": rng.uniform(0, 180, n),
        "psi": rng.uniform(-180, 180, n),
        "shift_x": rng.normal(0, 3, n),
        "shift_y": rng.normal(0, 3, n),
        "defocus_u": rng.uniform(8000, 30000, n),
        "defocus_v": rng.uniform(8000, 30000, n),
        "defocus_angle": rng.uniform(-180, 180, n),
    }
    return ds.assign({k: ("image", v) for k, v in values.items()})


def _star(path, particles, optics=None):
    blocks = {"particles": pd.DataFrame(particles)}
    if optics is not None:
        blocks = {"optics": pd.DataFrame(optics), **blocks}
    starfile.write(blocks if optics is not None else pd.DataFrame(particles), path)
    return path


OPTICS_31 = {
    "rlnOpticsGroup": [1],
    "rlnOpticsGroupName": ["opticsGroup1"],
    "rlnImagePixelSize": [1.25],
    "rlnVoltage": [300.0],
    "rlnSphericalAberration": [2.7],
    "rlnAmplitudeContrast": [0.1],
}


def _n_tasks(arr: da.Array) -> int:
    return len(arr.__dask_graph__())


# --------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------


def test_overwrite_must_be_a_boolean(tmp_path):
    """overwrite="no" counted as true: the stack, the volume and the STAR file were
    replaced."""
    ones = np.ones((2, 8, 8), dtype=np.float32)
    stack = make_stack(ones, attrs={"pixel_size": 2.0})
    write_stack(tmp_path / "a.mrcs", ones)
    write_volume(tmp_path / "v.mrc", np.ones((8, 8, 8)))
    export_star(stack, tmp_path / "p.star")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for write in (
        lambda: write_stack(tmp_path / "a.mrcs", 0 * ones, overwrite="no"),
        lambda: write_volume(tmp_path / "v.mrc", np.zeros((8, 8, 8)), overwrite="no"),
        lambda: export_star(stack.isel(image=[0]), tmp_path / "p.star", overwrite="no"),
    ):
        with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
            write()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # require_angles="no" required the angles
    with pytest.raises(TypeError, match="require_angles must be True or False, got 'no'"):
        import_star(tmp_path / "p.star", require_angles="no")


def test_volume_round_trip_and_atomic_overwrite(tmp_path):
    vol = np.random.default_rng(1).standard_normal((6, 7, 8)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_volume(path, xr.DataArray(vol, dims=("z", "y", "x"), attrs={"pixel_size": 1.3}))
    back = read_volume(path)
    assert back.dims == ("z", "y", "x") and back.dtype == np.float32
    np.testing.assert_array_equal(back.values, vol)
    assert back.attrs["pixel_size"] == 1.3
    with pytest.raises(FileExistsError, match="exists"):
        write_volume(path, vol)
    write_volume(path, vol.astype(np.float64) * 2, pixel_size=2.5, overwrite=True)
    back = read_volume(path)
    np.testing.assert_array_equal(back.values, vol * 2)
    assert back.attrs["pixel_size"] == 2.5
    with pytest.raises(ValueError, match="non-finite"):
        write_volume(path, np.full((2, 2, 2), np.nan), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.mrc"]  # nothing half-written


def test_read_volume_rejects_bad_files_naming_them(tmp_path):
    missing = tmp_path / "missing.mrc"
    with pytest.raises(FileNotFoundError, match="missing.mrc"):
        read_volume(missing)
    with mrcfile.new(tmp_path / "image.mrc") as mrc:
        mrc.set_data(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"image\.mrc is not a volume.*2-D"):
        read_volume(tmp_path / "image.mrc")
    _mrcs(tmp_path / "stack.mrcs", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"stack\.mrcs is an image stack"):
        read_volume(tmp_path / "stack.mrcs")
    write_volume(tmp_path / "cut.mrc", np.ones((8, 8, 8)))
    with open(tmp_path / "cut.mrc", "r+b") as f:
        f.truncate(1024 + 8 * 8 * 8 * 4 - 100)
    with pytest.raises(ValueError, match=r"cut\.mrc is truncated or not a valid MRC"):
        read_volume(tmp_path / "cut.mrc")
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file" * 100)
    with pytest.raises(ValueError, match=r"junk\.mrc"):
        read_volume(tmp_path / "junk.mrc")


# --------------------------------------------------------------------------------------
# stacks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [(3, 2, 1), (1, 3, 2), (2, 3, 1)])
def test_volumes_in_another_axis_order_are_read_as_z_y_x(tmp_path, order):
    """The header's (mapc, mapr, maps) say which of x, y, z (1, 2, 3) the file's columns,
    rows and sections hold; the volume comes back over (z, y, x) whatever they are."""
    vol = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)  # (z, y, x)
    on_disk = vol.transpose([3 - a for a in order[::-1]])  # (sections, rows, columns)
    with mrcfile.new(tmp_path / "v.mrc") as mrc:
        mrc.set_data(np.ascontiguousarray(on_disk))
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = order
    np.testing.assert_array_equal(read_volume(tmp_path / "v.mrc").values, vol)


def test_stack_round_trip_from_numpy_and_dask(tmp_path):
    images = np.random.default_rng(2).standard_normal((9, 6, 5)).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", images, pixel_size=1.1)
    ds = open_mrc_stack(tmp_path / "a.mrcs", chunks=4)
    assert ds["images"].dims == ("image", "y", "x") and ds["images"].dtype == np.float32
    assert ds["images"].chunks[0] == (4, 4, 1)
    np.testing.assert_array_equal(ds["images"].values, images)
    assert ds.attrs["pixel_size"] == 1.1
    with mrcfile.open(tmp_path / "a.mrcs", header_only=True) as mrc:  # a real image stack
        assert mrc.header.ispg == 0
        assert mrc.header.dmax == pytest.approx(images.max())
        assert mrc.header.rms == pytest.approx(images.std(), rel=1e-5)
    # a dask-backed stack Dataset is written chunk by chunk, its pixel size taken along
    write_stack(tmp_path / "b.mrcs", ds.assign(images=ds["images"] * 2))
    back = open_mrc_stack(tmp_path / "b.mrcs")
    np.testing.assert_array_equal(back["images"].values, images * 2)
    assert back.attrs["pixel_size"] == 1.1
    with pytest.raises(ValueError, match="non-finite"):
        write_stack(tmp_path / "c.mrcs", np.full((3, 4, 4), np.nan))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrcs", "b.mrcs"]


def test_a_stack_whose_chunks_build_on_each_other_is_computed_once(tmp_path):
    """Each chunk of a scan (register_stack's "previous" motions, a running sum) needs
    every chunk before it: written a few chunks per computation, the early chunks were
    computed again for every later batch (162 pair fits for a 48-image "previous" stack
    of 24 chunks, 47 when computed once)."""
    computed = []

    def source(block, block_info=None):
        computed.append(block_info[0]["chunk-location"][0])
        return block

    ones = da.ones((24, 4, 3), chunks=(1, 4, 3), dtype=np.float32)
    scan = ones.map_blocks(source, dtype=np.float32).cumsum(axis=0)
    write_stack(tmp_path / "scan.mrcs", scan)
    assert sorted(computed) == list(range(24))
    expected = np.cumsum(np.ones((24, 4, 3), np.float32), axis=0)
    np.testing.assert_array_equal(open_mrc_stack(tmp_path / "scan.mrcs")["images"].values, expected)
    with mrcfile.open(tmp_path / "scan.mrcs", header_only=True) as mrc:
        assert (mrc.header.dmin, mrc.header.dmax) == (1, 24)
        assert mrc.header.dmean == pytest.approx(12.5)
        assert mrc.header.rms == pytest.approx(expected.std())
    # a non-finite chunk among them is still an error naming its images, and leaves nothing
    with pytest.raises(ValueError, match=r"images 6\.\.6 hold 12 non-finite"):
        write_stack(tmp_path / "bad.mrcs", da.where(scan == 7, np.nan, scan))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.mrcs"]


def test_other_modes_are_converted_chunk_wise_and_one_image_is_a_stack(tmp_path):
    ints = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3) - 30
    _mrcs(tmp_path / "i.mrcs", ints)
    ds = open_mrc_stack(tmp_path / "i.mrcs", chunks=2)
    assert ds["images"].dtype == np.float32
    np.testing.assert_array_equal(ds["images"].values, ints.astype(np.float32))
    assert "pixel_size" not in ds.attrs  # the header leaves it unset
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(np.ones((4, 4), np.float32))
    assert open_mrc_stack(tmp_path / "one.mrc")["images"].shape == (1, 4, 4)


def test_opening_a_stack_reads_no_pixels_until_computed(tmp_path):
    n, box = 400, (64, 64)
    path = write_stack(tmp_path / "big.mrcs", np.zeros((n, *box), np.float32))
    ds = open_mrc_stack(path, chunks=100)
    assert isinstance(ds["images"].data, da.Array)
    assert _n_tasks(ds["images"].data) == 4  # one task per chunk, not per image
    # change the pixels on disk after opening: a read at open time would miss this
    with mrcfile.mmap(path, mode="r+") as mrc:
        mrc.data[150:250] = 7.0
    chunk = ds["images"][100:200].values
    assert chunk.shape == (100, *box)
    assert np.all(chunk[:50] == 0) and np.all(chunk[50:] == 7)


def test_open_mrc_stack_rejects_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mrcs"):
        open_mrc_stack(tmp_path / "nope.mrcs")
    path = _mrcs(tmp_path / "cut.mrcs", np.ones((10, 8, 8), np.float32))
    with open(path, "r+b") as f:
        f.truncate(1024 + 9 * 8 * 8 * 4)
    with pytest.raises(ValueError, match=r"cut\.mrcs is truncated.*10 × 8 × 8"):
        open_mrc_stack(path)


# --------------------------------------------------------------------------------------
# STAR files
# --------------------------------------------------------------------------------------


def test_star_round_trip_is_exact(tmp_path):
    ds = _particle_stack()
    star = export_star(ds, tmp_path / "particles.star")
    assert (tmp_path / "particles.mrcs").is_file()
    blocks = starfile.read(star, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["particles"]["rlnImageName"].iloc[2] == "000003@particles.mrcs"
    np.testing.assert_allclose(
        blocks["particles"]["rlnOriginXAngst"], -ds["shift_x"].values * 1.3, rtol=1e-8
    )
    back = import_star(star, chunks=5)
    assert isinstance(back["images"].data, da.Array)
    np.testing.assert_array_equal(back["images"].values, ds["images"].values)  # bit for bit
    for var in PER_IMAGE:
        np.testing.assert_allclose(back[var].values, ds[var].values, rtol=1e-7, err_msg=var)
    for attr in ("pixel_size", "voltage", "cs", "amplitude_contrast"):
        assert back.attrs[attr] == ds.attrs[attr]
    with pytest.raises(FileExistsError, match="exists"):
        export_star(ds, star)
    # a stack elsewhere is referred to relative to the STAR file's folder
    (tmp_path / "sub").mkdir()
    export_star(ds.isel(image=slice(3)), star, tmp_path / "sub" / "s.mrcs", overwrite=True)
    assert starfile.read(star)["particles"]["rlnImageName"].iloc[0] == "000001@sub/s.mrcs"
    np.testing.assert_array_equal(import_star(star)["images"].values, ds["images"].values[:3])
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_rows_from_two_interleaved_stacks_keep_the_star_order(tmp_path):
    (tmp_path / "Particles").mkdir()
    _mrcs(tmp_path / "Particles" / "a.mrcs", _labelled(7, 100.0), voxel_size=1.25)
    _mrcs(tmp_path / "Particles" / "b.mrcs", _labelled(5, 200.0), voxel_size=1.25)
    order = [("b", 3), ("a", 1), ("a", 2), ("b", 1), ("a", 7), ("a", 5), ("b", 5), ("b", 2)]
    order += [("a", 3), ("a", 4), ("b", 4), ("a", 2)]  # a particle listed twice, too
    names = [f"{i:06d}@Particles/{s}.mrcs" for s, i in order]
    star = _star(
        tmp_path / "p.star",
        {"rlnImageName": names, "rlnOpticsGroup": [1] * len(names)},
        OPTICS_31,
    )
    ds = import_star(star, chunks=3)
    expected = [(100.0 if s == "a" else 200.0) + i - 1 for s, i in order]
    np.testing.assert_array_equal(ds["images"].values[:, 0, 0], expected)
    np.testing.assert_array_equal(ds["images"].values[4], np.full((6, 5), 106.0))
    assert ds["images"].chunks[0] == (3, 3, 3, 3)
    assert _n_tasks(ds["images"].data) == 4  # one per chunk of rows, whatever the stacks
    assert ds.attrs["n_stacks"] == 2 and ds.attrs["pixel_size"] == 1.25
    assert not set(PER_IMAGE) & set(ds.data_vars)  # no such columns: no variables


def test_star_stacks_relative_to_another_root_and_pickled_tasks(tmp_path, capsys):
    """``root`` resolves RELION project paths; the hand-built tasks survive pickling (as
    they must to reach distributed workers)."""
    (tmp_path / "Extract").mkdir()
    _mrcs(tmp_path / "Extract" / "m1.mrcs", _labelled(4, 10.0))
    (tmp_path / "Select").mkdir()
    star = _star(
        tmp_path / "Select" / "p.star",
        {"rlnImageName": ["3@Extract/m1.mrcs", "1@Extract/m1.mrcs"], "rlnOpticsGroup": [1, 1]},
        OPTICS_31,
    )
    with pytest.raises(FileNotFoundError, match="Select/Extract/m1.mrcs does not exist.*--root"):
        import_star(star)
    ds = import_star(star, root=tmp_path)
    shipped = pickle.loads(pickle.dumps(ds["images"].data))
    np.testing.assert_array_equal(shipped.compute()[:, 0, 0], [12.0, 10.0])
    # the CLI: the error says how, and --root does it
    out = tmp_path / "p.zarr"
    assert main(["import-star", str(star), str(out)]) == 2
    assert "--root" in capsys.readouterr().err
    assert not out.exists()
    assert main(["import-star", str(star), str(out), "--root", str(tmp_path)]) == 0
    images = xr.open_zarr(out, consolidated=False)["images"].values
    np.testing.assert_array_equal(images[:, 0, 0], [12.0, 10.0])


def test_legacy_star_with_pixel_origins_and_no_optics_block(tmp_path):
    _mrcs(tmp_path / "s.mrcs", _labelled(4, 0.0))
    n = 4
    star = _star(
        tmp_path / "legacy.star",
        {
            "rlnImageName": [f"{i}@s.mrcs" for i in (4, 3, 2, 1)],
            "rlnAngleRot": [10.0, 20.0, 30.0, 40.0],
            "rlnAngleTilt": [90.0] * n,
            "rlnAnglePsi": [-5.0] * n,
            "rlnOriginX": [1.5, -2.0, 0.0, 3.25],
            "rlnOriginY": [0.5, 0.0, -1.0, 2.0],
            "rlnDefocusU": [12000.0] * n,
            "rlnDefocusV": [11000.0] * n,
            "rlnDefocusAngle": [30.0] * n,
            "rlnVoltage": [200.0] * n,
            "rlnSphericalAberration": [2.0] * n,
            "rlnAmplitudeContrast": [0.07] * n,
            "rlnDetectorPixelSize": [14.0] * n,  # µm
            "rlnMagnification": [100000.0] * n,
        },
    )
    assert list(starfile.read(star, always_dict=True)) == [""]  # one unnamed block
    ds = import_star(star, require_angles=True)
    np.testing.assert_array_equal(ds["images"].values[:, 0, 0], [3, 2, 1, 0])
    np.testing.assert_array_equal(ds["shift_x"].values, [-1.5, 2.0, 0.0, -3.25])  # pixels
    np.testing.assert_array_equal(ds["shift_y"].values, [-0.5, 0.0, 1.0, -2.0])
    np.testing.assert_array_equal(ds["rot"].values, [10.0, 20.0, 30.0, 40.0])
    assert ds.attrs["pixel_size"] == pytest.approx(1.4)
    assert (ds.attrs["voltage"], ds.attrs["cs"], ds.attrs["amplitude_contrast"]) == (
        200.0,
        2.0,
        0.07,
    )


def test_angstrom_origins_are_divided_by_the_pixel_size(tmp_path):
    _mrcs(tmp_path / "s.mrcs", _labelled(2, 0.0))
    star = _star(
        tmp_path / "p.star",
        {
            "rlnImageName": ["1@s.mrcs", "2@s.mrcs"],
            "rlnOpticsGroup": [1, 1],
            "rlnOriginXAngst": [2.5, -1.25],
            "rlnOriginYAngst": [0.0, 5.0],
        },
        OPTICS_31,
    )
    ds = import_star(star)
    np.testing.assert_allclose(ds["shift_x"].values, [-2.0, 1.0])  # RELION's sign flipped
    np.testing.assert_allclose(ds["shift_y"].values, [0.0, -4.0])


def test_relion_origins_bring_the_image_back_onto_its_projection(tmp_path):
    """RELION's convention, independently of scalign's projector shifts: the image is the
    centred projection moved by ``-rlnOriginX/YAngst / pixel size`` (``relion_project``),
    done here with scipy's Fourier shift. The imported shifts reproduce the images; the
    opposite sign does not."""
    rng = np.random.default_rng(3)
    n, px, b = 32, 2.0, 5
    blobs = random_blobs(10, radius=8.0, seed=1)
    rot, tilt, psi = rng.uniform(-180, 180, b), rng.uniform(10, 170, b), rng.uniform(-180, 180, b)
    origin = rng.uniform(-3, 3, (b, 2))  # rlnOriginX/Y in pixels
    centred = blob_projections(blobs, n, euler_to_matrix(rot, tilt, psi))
    images = np.stack(
        [
            np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(p), (-oy, -ox))).real
            for p, (ox, oy) in zip(centred, origin, strict=True)
        ]
    ).astype(np.float32)
    _mrcs(tmp_path / "p.mrcs", images, voxel_size=px)
    star = _star(
        tmp_path / "p.star",
        {
            "rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(b)],
            "rlnOpticsGroup": [1] * b,
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": origin[:, 0] * px,
            "rlnOriginYAngst": origin[:, 1] * px,
        },
        {**OPTICS_31, "rlnImagePixelSize": [px]},
    )
    ds = import_star(star)
    np.testing.assert_allclose(ds["shift_x"].values, -origin[:, 0], rtol=1e-5)
    volume = blob_volume(blobs, n)
    options = {"angles": "stack", "downsample_to": None, "covariance": False}
    r = compare_reprojections(ds, volume, **options).compute()["correlation"].values
    assert r.min() > 0.999
    flipped = ds.assign(shift_x=-ds["shift_x"], shift_y=-ds["shift_y"])
    r = compare_reprojections(flipped, volume, **options).compute()["correlation"].values
    assert r.max() < 0.95


def test_phase_plate_and_envelope_columns_reach_the_ctf(tmp_path):
    """rlnPhaseShift, rlnCtfBfactor and rlnCtfScalefactor are imported, exported and
    applied: images made with them are explained by the true map only with them."""
    rng = np.random.default_rng(0)
    n, px, b = 32, 3.0, 6
    blobs = random_blobs(10, radius=8.0, seed=1)
    rot, tilt, psi = rng.uniform(-180, 180, b), rng.uniform(10, 170, b), rng.uniform(-180, 180, b)
    du = rng.uniform(8000, 12000, b)
    dv, angle = du - 300, rng.uniform(-90, 90, b)
    phase, bfactor, scale = np.full(b, 90.0), rng.uniform(50, 150, b), rng.uniform(0.5, 1, b)
    P = blob_projections(blobs, n, euler_to_matrix(rot, tilt, psi))
    H = ctf_half_plane(n, px, du, dv, angle, phase_shift=phase, bfactor=bfactor, scale=scale)
    _mrcs(tmp_path / "p.mrcs", np.fft.irfft2(np.fft.rfft2(P) * H, s=(n, n)).astype(np.float32))
    columns = {
        "rlnImageName": [f"{i + 1}@p.mrcs" for i in range(b)],
        "rlnOpticsGroup": [1] * b,
        "rlnAngleRot": rot,
        "rlnAngleTilt": tilt,
        "rlnAnglePsi": psi,
        "rlnDefocusU": du,
        "rlnDefocusV": dv,
        "rlnDefocusAngle": angle,
        "rlnPhaseShift": phase,
        "rlnCtfBfactor": bfactor,
        "rlnCtfScalefactor": scale,
    }
    star = _star(tmp_path / "p.star", columns, {**OPTICS_31, "rlnImagePixelSize": [px]})
    ds = import_star(star)
    np.testing.assert_allclose(ds["bfactor"].values, bfactor, rtol=1e-5)
    np.testing.assert_allclose(ds["ctf_scale"].values, scale, rtol=1e-5)
    V = blob_volume(blobs, n)
    options = {"angles": "stack", "ctf": True, "downsample_to": None, "covariance": False}
    r = compare_reprojections(ds, V, **options).compute()
    assert r["correlation"].values.min() > 0.999
    # gray-level fit: the scale factor is then matched too (gain = 1 where it is applied)
    gray = compare_reprojections(ds, V, gray=True, **options).compute()
    np.testing.assert_allclose(gray["gain"].values[0], 1.0, rtol=2e-3)
    without = compare_reprojections(ds.drop_vars("phase_shift"), V, **options).compute()
    assert without["correlation"].values.max() < 0.9
    back = import_star(export_star(ds, tmp_path / "out.star"))
    for var in ("phase_shift", "bfactor", "ctf_scale"):
        np.testing.assert_allclose(back[var].values, ds[var].values, rtol=1e-7, err_msg=var)


def test_missing_angle_columns(tmp_path):
    _mrcs(tmp_path / "s.mrcs", _labelled(2, 0.0))
    star = _star(
        tmp_path / "p.star",
        {"rlnImageName": ["1@s.mrcs", "2@s.mrcs"], "rlnOpticsGroup": [1, 1]},
        OPTICS_31,
    )
    assert not {"rot", "tilt", "psi"} & set(import_star(star).data_vars)
    message = "p.star has no angle columns (rlnAngleRot, rlnAngleTilt, rlnAnglePsi)"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_star(star, require_angles=True)


def _bad_star(tmp_path, case):
    """A STAR file (with its stack) that is wrong in one way."""
    _mrcs(tmp_path / "s.mrcs", _labelled(3, 0.0), voxel_size=1.25)
    particles = {
        "rlnImageName": ["1@s.mrcs", "2@s.mrcs", "3@s.mrcs"],
        "rlnOpticsGroup": [1, 1, 1],
        "rlnAngleRot": [1.0, 2.0, 3.0],
    }
    optics = dict(OPTICS_31)
    if case == "no image names":
        del particles["rlnImageName"]
    elif case == "missing stack":
        particles["rlnImageName"][1] = "2@gone.mrcs"
    elif case == "index out of range":
        particles["rlnImageName"][2] = "4@s.mrcs"
    elif case == "malformed entry":
        particles["rlnImageName"][0] = "s.mrcs"
    elif case == "NaN angle":
        particles["rlnAngleRot"][1] = np.nan
    elif case == "mixed optics":
        optics = {k: v * 2 for k, v in OPTICS_31.items()}
        optics["rlnOpticsGroup"] = [1, 2]
        optics["rlnVoltage"] = [300.0, 200.0]
        particles["rlnOpticsGroup"] = [1, 2, 1]
    elif case == "truncated stack":
        with open(tmp_path / "s.mrcs", "r+b") as f:
            f.truncate(1024 + 100)
    return _star(tmp_path / "bad.star", particles, optics)


BAD_STARS = [
    ("no image names", ValueError, r"bad\.star has no rlnImageName column"),
    ("missing stack", FileNotFoundError, r"bad\.star: row 2 \(rlnImageName '2@gone\.mrcs'\)"),
    ("index out of range", ValueError, r"row 3 .*index 4 is beyond the 3 image\(s\) of"),
    ("malformed entry", ValueError, r"row 1 \(rlnImageName 's\.mrcs'\): expected INDEX@STACK"),
    ("NaN angle", ValueError, r"bad\.star: row 2 .*rlnAngleRot is nan"),
    ("mixed optics", ValueError, r"mixed optics groups are not supported yet.*rlnVoltage"),
    ("truncated stack", ValueError, r"bad\.star: row 1 .*s\.mrcs is truncated"),
]


@pytest.mark.parametrize(("case", "error", "message"), BAD_STARS, ids=[c[0] for c in BAD_STARS])
def test_bad_star_files_are_clear_errors(tmp_path, case, error, message):
    star = _bad_star(tmp_path, case)
    with pytest.raises(error, match=message):
        import_star(star)


def test_missing_star_file_and_export_without_pixel_size(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no STAR file at .*nope\.star"):
        import_star(tmp_path / "nope.star")
    ds = make_stack(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="no pixel_size"):
        export_star(ds, tmp_path / "p.star")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def test_cli_import_star_writes_the_store_and_a_summary(tmp_path, capsys):
    ds = _particle_stack(n=10)
    star = export_star(ds, tmp_path / "particles.star")
    out = tmp_path / "out.zarr"
    assert main(["import-star", str(star), str(out), "--chunks", "4"]) == 0
    text = capsys.readouterr().out
    assert "scalign import-star: summary" in text
    for expected in (
        "10 from 1 stack file(s)",
        "8 × 8 px",
        "1.3 Å",
        "rot, tilt, psi",
        "shift_x, shift_y",
        "defocus_u, defocus_v, defocus_angle",
        "300 kV, Cs 2.7 mm, amplitude contrast 0.1",
        str(out),
    ):
        assert expected in text, expected
    written = xr.open_zarr(out, consolidated=False)
    assert written["images"].chunks[0] == (4, 4, 2)
    np.testing.assert_array_equal(written["images"].values, ds["images"].values)
    np.testing.assert_allclose(written["psi"].values, ds["psi"].values, rtol=1e-7)
    assert written.attrs["pixel_size"] == 1.3 and written.attrs["source"] == "particles.star"


def test_cli_import_star_bad_input_is_one_line_and_no_store(tmp_path, capsys):
    star = _bad_star(tmp_path, "missing stack")
    assert main(["import-star", str(star), str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scalign: error:") and "gone.mrcs" in err and "\n" not in err
    assert not (tmp_path / "o.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
