"""The command line, run as a user would: exit codes, summaries, files written."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from scalign import helix_ensemble, procrustes_rmse, save_zarr
from scalign.cli import main


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "in.zarr"
    ens = helix_ensemble(500, 16, noise=0.05, chunks=100).assign(
        masses=("point", np.linspace(1, 2, 16))
    )
    save_zarr(ens, path)
    return path


def test_ctrl_c_is_one_line_and_leaves_no_store(tmp_path):
    """SIGINT mid-write: exit status 130, one line, nothing at OUT (only the hidden
    partial store that a rerun resumes)."""
    import os
    import signal
    import time

    source = tmp_path / "in.zarr"
    save_zarr(helix_ensemble(150_000, 64, noise=0.1, chunks=5_000), source)
    out = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "scalign.cli", "align", str(source), str(out), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # the job's own partial store: .out.zarr.<its fingerprint>.partial
    while not (
        (found := list(tmp_path.glob(".out.zarr.*.partial/.scalign-progress")))
        and len(list(found[0].iterdir())) > 3
    ):
        assert proc.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "scalign: interrupted"
    assert "Traceback" not in err
    assert not out.exists()


def test_demo_end_to_end_as_a_subprocess(tmp_path):
    """The README's main job, shrunk: a LocalCluster, a progress bar, a summary, stores."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalign",
            "demo",
            "--structures",
            "3000",
            "--chunks",
            "1000",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scalign demo: summary" in proc.stdout
    assert "distributed, 2 worker(s)" in proc.stdout
    assert "rotation error" in proc.stdout
    out = xr.open_zarr(tmp_path / "aligned.zarr", consolidated=False)
    assert out.sizes["structure"] == 3000
    assert float(out["rmsd"].max()) < 0.2


def test_align_writes_the_result_and_a_summary(store, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    assert (
        main(
            [
                "align",
                str(store),
                str(out),
                "--reference",
                "mean",
                "--scale",
                "--weights",
                "masses",
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "scalign align: summary" in text and "generalized Procrustes" in text
    result = xr.open_zarr(out, consolidated=False)
    assert set(result.data_vars) >= {
        "aligned",
        "rotation",
        "translation",
        "scale",
        "rmsd",
        "r2",
        "reference",
    }
    assert result.attrs["scalign_weights"] == "masses" and result.attrs["gpa_converged"]


def test_align_on_an_existing_scheduler_by_flag_and_env(
    store, tmp_path, cluster, capsys, monkeypatch
):
    assert (
        main(
            [
                "align",
                str(store),
                str(tmp_path / "a.zarr"),
                "--scheduler",
                cluster.scheduler_address,
                "--quiet",
            ]
        )
        == 0
    )
    assert f"2 worker(s) at {cluster.scheduler_address}" in capsys.readouterr().out
    monkeypatch.setenv("SCALIGN_SCHEDULER", cluster.scheduler_address)
    assert (
        main(
            [
                "align",
                str(store),
                str(tmp_path / "b.zarr"),
                "--reference",
                "3",
                "--chunks",
                "250",
                "--quiet",
            ]
        )
        == 0
    )
    assert "distributed" in capsys.readouterr().out
    b = xr.open_zarr(tmp_path / "b.zarr", consolidated=False)
    assert b["aligned"].chunks[0] == (250, 250)
    assert float(b["rmsd"][3]) < 1e-6


def test_import_and_info(tmp_path, capsys):
    coords = np.random.default_rng(1).standard_normal((30, 5, 3))
    np.savez(tmp_path / "e.npz", coords=coords, masses=np.ones(5))
    assert (
        main(["import", str(tmp_path / "e.npz"), str(tmp_path / "e.zarr"), "--chunks", "10"]) == 0
    )
    assert main(["info", str(tmp_path / "e.zarr")]) == 0
    text = capsys.readouterr().out
    assert "structure=30" in text and "weights" in text and "chunks (10, 5, 3)" in text
    assert main(["info", str(tmp_path / "e.npz")]) == 0
    assert "(30, 5, 3)" in capsys.readouterr().out
    np.save(tmp_path / "c.npy", coords.astype(np.float32))
    assert main(["info", str(tmp_path / "c.npy")]) == 0  # np.load gives no context manager
    assert "float32 (30, 5, 3)" in capsys.readouterr().out
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "bad.npz").write_bytes(b"PK not a zip")
    for name in ("empty.npy", "bad.npz"):
        assert main(["info", str(tmp_path / name)]) == 2
        assert f"{name} is not a readable" in capsys.readouterr().err


def test_info_describes_mrc_and_star_files_from_their_headers(tmp_path, capsys):
    from scalign.formats import export_star, write_stack, write_volume
    from scalign.synthetic_em import random_blobs, simulate_particles

    write_volume(tmp_path / "v.mrc", np.zeros((8, 8, 8), np.float32), pixel_size=1.5)
    write_stack(tmp_path / "s.mrcs", np.zeros((5, 6, 6), np.float32), pixel_size=2.0)
    parts = simulate_particles(random_blobs(seed=1), 32, 4, ctf=True, seed=2)
    export_star(parts.stack, tmp_path / "p.star")
    expected = {
        "v.mrc": ["volume", "8 × 8 × 8", "1.5 Å"],
        "s.mrcs": ["image stack", "5 × 6 × 6", "2 Å"],
        "p.star": ["4 of 32 × 32 from 1 stack(s)", "defocus_u", "voltage"],
    }
    for name, words in expected.items():
        assert main(["info", str(tmp_path / name)]) == 0
        printed = capsys.readouterr().out
        assert all(w in printed for w in words), printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["align", "{store}", "{tmp}/o.zarr", "--reference", "median"],
            "unknown reference 'median'",
        ),
        (["align", "{store}", "{tmp}/o.zarr", "--reference", "999"], "out of range"),
        (
            ["align", "{store}", "{tmp}/o.zarr", "--weights", "nope"],
            "'nope' is not in the ensemble",
        ),
        (["align", "{tmp}/missing.zarr", "{tmp}/o.zarr"], "no zarr store"),
        (["align", "{store}", "{tmp}/o.zarr", "--chunks", "0"], "chunks must be a positive"),
        (["align", "{store}", "{store}"], "exists"),
        (["info", "{tmp}/missing"], "no file or zarr store"),
        (["import", "{tmp}/missing.npy", "{tmp}/o.zarr"], "no file"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(store, tmp_path, capsys, args, message):
    argv = [a.format(store=store, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scalign: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_gpu_flag_without_a_gpu_is_a_clear_error(store, tmp_path, capsys):
    from scalign.execution import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    assert main(["align", str(store), str(tmp_path / "o.zarr"), "--gpu"]) == 2
    err = capsys.readouterr().err
    assert "--gpu" in err and ("dask-cuda" in err or "CUDA device" in err)


def test_fit_only_writes_no_coordinates(store, tmp_path, capsys):
    assert main(["align", str(store), str(tmp_path / "f.zarr"), "--fit-only", "--quiet"]) == 0
    written = xr.open_zarr(tmp_path / "f.zarr", consolidated=False)
    assert "aligned" not in written and written.sizes["structure"] == 500


def test_align_robust_writes_the_final_weights(tmp_path, capsys):
    source = tmp_path / "corrupted.zarr"
    ens = helix_ensemble(120, 40, noise=0.02, outlier_fraction=0.2, outlier_size=10, chunks=40)
    save_zarr(ens, source)
    out = tmp_path / "robust.zarr"
    code = main(["align", str(source), str(out), "--robust", "huber", "--quiet"])
    assert code == 0
    assert "robust (huber)" in capsys.readouterr().out
    written = xr.open_zarr(out, consolidated=False)
    assert written["robust_weights"].dims == ("structure", "point")
    assert written.attrs["scalign_robust"] == "huber"


def test_the_robust_summary_reads_the_weights_chunk_by_chunk(tmp_path):
    """The final weights (structure x point, float64) are as large as the aligned
    coordinates: the summary of `scalign align --robust` read them whole (twice their
    size, with its mask), so a job on an ensemble larger than memory ran out of memory
    once written. Here on a store of the op's output variables (a robust fit this size
    takes seconds)."""
    import tracemalloc

    import dask.array as da

    from scalign.cli import _summary_rows

    n, points = 64_000, 128
    weights = da.ones((n, points), chunks=(1_000, points))
    weights[::4, :32] = 0.25  # a quarter of the structures, a quarter of their points
    out = tmp_path / "robust.zarr"
    result = xr.Dataset(
        {
            "rmsd": ("structure", np.ones(n)),
            "r2": ("structure", np.ones(n)),
            "robust_weights": (("structure", "point"), weights),
            "robust_iterations": ("structure", np.full(n, 3)),
        },
        attrs={"scalign_robust": "huber"},
    ).chunk(structure=1_000)
    save_zarr(result.assign(space=[0, 1, 2]), out)  # the summary names the dims
    tracemalloc.start()
    try:
        _, rows = _summary_rows(out, 1.0, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert dict(rows)["robust (huber)"].startswith("6.2% of points weighted < 0.5, median 3")
    assert peak < weights.nbytes / 4, f"{peak / 2**20:.1f} MiB for {weights.nbytes / 2**20} MiB"


def test_rmsd_writes_the_pairwise_matrix(store, tmp_path, capsys):
    out = tmp_path / "rmsd.zarr"
    assert main(["rmsd", str(store), str(out), "--chunks", "128", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "500 × 500 structures" in text and "lower triangle computed" in text
    D = xr.open_zarr(out, consolidated=False)["rmsd"]
    assert D.dims == ("structure", "structure_other") and D.chunks[0][0] == 128
    coords = xr.open_zarr(store, consolidated=False)["coords"].values
    assert D.values[3, 17] == pytest.approx(procrustes_rmse(coords[3], coords[17]), abs=1e-10)
    assert main(["rmsd", str(store), str(out)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    other = tmp_path / "other.zarr"
    save_zarr(helix_ensemble(7, 16, seed=4), other)
    out2 = tmp_path / "cross.zarr"
    assert main(["rmsd", str(store), str(out2), "--other", str(other), "--weights", "masses"]) == 0
    assert xr.open_zarr(out2, consolidated=False)["rmsd"].shape == (500, 7)


def test_icp_registers_point_files(tmp_path, capsys):
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(300, 3)) * [3, 1, 0.5], rng.normal(size=(200, 3)) + 4])
    R = Rotation.from_rotvec([0.3, -0.2, 2.5]).as_matrix()
    np.save(tmp_path / "src.npy", X[rng.permutation(len(X))] @ R.T + 5.0)
    np.savetxt(tmp_path / "tgt.csv", X, delimiter=",")
    out = tmp_path / "reg.npz"
    args = ["icp", str(tmp_path / "src.npy"), str(tmp_path / "tgt.csv"), "--out", str(out)]
    assert main(args) == 0
    assert "fitness      1.0000" in capsys.readouterr().out
    with np.load(out) as reg:
        np.testing.assert_allclose(reg["rotation"], R.T, atol=1e-8)
    assert main(args) == 2  # exists, no --overwrite
    assert main(["icp", str(tmp_path / "src.npy"), str(tmp_path / "tgt.csv"), "--trim", "2"]) == 2
    assert "trim must be in (0, 1]" in capsys.readouterr().err
    # --overwrite writes beside and moves into place (it opened the old file and wrote into
    # it: an interrupted write destroyed it); nothing is left beside
    out.write_bytes(b"old")
    assert main([*args, "--overwrite"]) == 0
    with np.load(out) as reg:
        np.testing.assert_allclose(reg["rotation"], R.T, atol=1e-8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg.npz", "src.npy", "tgt.csv"]


def test_icp_summary_gives_the_angle_of_a_2d_rotation(tmp_path, capsys):
    """A pure translation of 2-D points was reported as a 60° rotation (the 3-D formula)."""
    P = np.random.default_rng(2).normal(size=(100, 2)) * [5, 2]
    np.save(tmp_path / "src.npy", P)
    np.save(tmp_path / "tgt.npy", P + 1.0)
    assert main(["icp", str(tmp_path / "src.npy"), str(tmp_path / "tgt.npy")]) == 0
    angle = re.search(r"rotation +(\S+)° from the identity", capsys.readouterr().out)
    assert abs(float(angle.group(1))) < 1e-6


def test_warp_and_register_stacks(tmp_path, capsys):
    from scipy import ndimage

    from scalign.images import make_stack
    from scalign.kernels.affine import build_affine_matrix, pull_matrix

    rng = np.random.default_rng(0)
    base = ndimage.gaussian_filter(rng.random((128, 144)), 3) * 100
    # shifted, then cropped: no empty border that would not move with the content
    stack = np.stack([ndimage.shift(base, (0, 0.7 * k), order=3)[16:-16, 16:-16] for k in range(6)])
    source = tmp_path / "stack.zarr"
    save_zarr(make_stack(stack.astype(np.float32), chunks=2), source)
    M = build_affine_matrix(5, 1.5, -2, center=(55.5, 47.5))
    np.save(tmp_path / "m.npy", M)
    warped = tmp_path / "warped.zarr"
    assert main(["warp", str(source), str(warped), "--matrix", str(tmp_path / "m.npy")]) == 0
    assert "scalign warp: summary" in capsys.readouterr().out
    got = xr.open_zarr(warped, consolidated=False)["images"].values
    np.testing.assert_allclose(
        got[2],
        ndimage.affine_transform(stack[2].astype(np.float32), *pull_matrix(M), order=1),
        atol=1e-3,
    )
    out = tmp_path / "reg.zarr"
    args = [
        "register",
        str(source),
        str(out),
        "--reference",
        "previous",
        "--transform",
        "translation",
    ]
    assert main(args) == 0
    assert "drift of the centre" in capsys.readouterr().out
    matrix = xr.open_zarr(out, consolidated=False)["matrix"].values
    np.testing.assert_allclose(matrix[:, 0, 2], 0.7 * np.arange(6), atol=0.02)
    assert main(args) == 2  # exists
    assert main(["warp", str(source), str(tmp_path / "w2.zarr"), "--matrix", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("chunks", ["0", "-1"])
def test_register_rejects_chunks_below_one(tmp_path, capsys, chunks):
    """--chunks 0 was a ZeroDivisionError traceback, -1 was accepted."""
    from scalign.images import make_stack

    source = tmp_path / "stack.zarr"
    save_zarr(make_stack(np.random.default_rng(0).random((4, 32, 32)).astype("f4")), source)
    out = tmp_path / "o.zarr"
    assert main(["register", str(source), str(out), "--chunks", chunks, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"scalign: error: chunks must be a positive integer, got {chunks}"
    assert not out.exists()


def test_compare_and_rank_candidate_volumes(tmp_path, capsys):
    from scalign.formats import export_star, write_volume
    from scalign.synthetic_em import blob_volume, random_blobs, simulate_particles

    blobs = random_blobs(10, radius=8.0, sigma=1.8, seed=1)
    parts = simulate_particles(blobs, 32, 12, noise=0.3, max_shift=2.0, ctf=True, seed=2)
    export_star(parts.stack, tmp_path / "particles.star")
    write_volume(tmp_path / "true.mrc", blob_volume(blobs, 32), pixel_size=3.0)
    other = blob_volume(random_blobs(10, radius=8.0, sigma=1.8, seed=5), 32)
    write_volume(tmp_path / "other.mrc", other, pixel_size=3.0)
    stack, out = tmp_path / "p.zarr", tmp_path / "out.zarr"
    assert main(["import-star", str(tmp_path / "particles.star"), str(stack)]) == 0
    args = ["compare", str(stack), str(tmp_path / "other.mrc"), str(tmp_path / "true.mrc")]
    assert main([*args, str(out), "--angles", "--ctf", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "best volume (cost)  true" in printed and "12 × 2" in printed
    assert main(["rank", str(out), "--score", "correlation"]) == 0
    printed = capsys.readouterr().out
    assert "higher is better" in printed and "best volume: true" in printed
    # OUT forgotten: the last map would be taken as the output; it is not a store, so
    # even --overwrite leaves it alone
    before = (tmp_path / "true.mrc").read_bytes()
    assert main([*args, "--angles", "--overwrite"]) == 2
    assert "true.mrc exists and is not a zarr store" in capsys.readouterr().err
    assert (tmp_path / "true.mrc").read_bytes() == before
    # bad input: one line, exit 2, nothing written
    bad = tmp_path / "bad.zarr"
    assert main([*args, str(bad), "--symmetry", "X3"]) == 2
    assert "symmetry" in capsys.readouterr().err and not bad.exists()
    assert main(["rank", str(tmp_path / "missing.zarr")]) == 2


def test_coordinate_attrs_survive_every_command(tmp_path, capsys):
    """Every mapped op dropped the attrs of the coordinates (a time axis in ns, pixel
    positions in µm): the outputs of align, rmsd, warp and register lost their units."""
    from scalign import align
    from scalign.images import make_stack

    ens = helix_ensemble(40, 8, chunks=20).assign_coords(
        structure=("structure", np.arange(40) * 0.5, {"units": "ns"})
    )
    save_zarr(ens, tmp_path / "ens.zarr")
    frames = np.random.default_rng(0).random((4, 24, 24)).astype(np.float32)
    stack = make_stack(frames, chunks=2).assign_coords(
        image=("image", np.arange(4) * 2.0, {"units": "s"}),
        y=("y", np.arange(24) * 1.5, {"units": "um"}),
        x=("x", np.arange(24) * 1.5, {"units": "um"}),
    )
    save_zarr(stack, tmp_path / "stack.zarr")
    np.save(tmp_path / "m.npy", np.eye(3))
    runs = [
        (["align", "ens.zarr", "a.zarr"], {"structure": "ns"}),
        (["rmsd", "ens.zarr", "r.zarr"], {"structure": "ns", "structure_other": "ns"}),
        (["warp", "stack.zarr", "w.zarr", "--matrix", "m.npy"], {"image": "s", "x": "um"}),
        (["register", "stack.zarr", "g.zarr"], {"image": "s", "y": "um"}),
    ]
    for args, units in runs:
        argv = [str(tmp_path / a) if a.endswith((".zarr", ".npy")) else a for a in args]
        assert main([*argv, "--quiet"]) == 0
        written = xr.open_zarr(tmp_path / args[2], consolidated=False)
        for name, unit in units.items():
            assert written[name].attrs == {"units": unit}, (args[0], name)
    # other labels of the items too, in the Python API
    labelled = ens.assign_coords(frame=("structure", np.arange(40), {"long_name": "frame"}))
    assert align(labelled, "mean")["frame"].attrs == {"long_name": "frame"}


def test_labels_stored_in_their_own_chunks_do_not_stop_a_command(tmp_path, capsys):
    """A label over the items written from memory (a frame number) is one zarr chunk
    while the data has several: align, warp and register failed with xarray's
    "inconsistent chunks along dimension structure ... call unify_chunks()"."""
    from scalign.images import make_stack

    ens = helix_ensemble(40, 8, chunks=10).assign_coords(frame=("structure", np.arange(40)))
    save_zarr(ens, tmp_path / "ens.zarr")
    frames = np.random.default_rng(0).random((4, 24, 24)).astype(np.float32)
    stack = make_stack(frames, chunks=2).assign_coords(time=("image", np.arange(4) * 2.0))
    save_zarr(stack, tmp_path / "stack.zarr")
    np.save(tmp_path / "m.npy", np.eye(3))
    runs = [
        (["align", "ens.zarr", "a.zarr"], "frame", np.arange(40)),
        (["warp", "stack.zarr", "w.zarr", "--matrix", "m.npy"], "time", np.arange(4) * 2.0),
        (["register", "stack.zarr", "g.zarr"], "time", np.arange(4) * 2.0),
    ]
    for args, label, values in runs:
        argv = [str(tmp_path / a) if a.endswith((".zarr", ".npy")) else a for a in args]
        assert main([*argv, "--quiet"]) == 0, capsys.readouterr().err
        written = xr.open_zarr(tmp_path / args[2], consolidated=False)
        np.testing.assert_array_equal(written[label].values, values)


def test_compare_tells_apart_maps_of_the_same_file_name(tmp_path, capsys):
    """a/map.mrc and b/map.mrc were both ranked as "map": which one won was lost."""
    from scalign.formats import write_volume
    from scalign.synthetic_em import blob_volume, random_blobs, simulate_particles

    blobs = random_blobs(10, radius=8.0, sigma=1.8, seed=1)
    parts = simulate_particles(blobs, 32, 6, noise=0.3, seed=2)
    save_zarr(parts.stack, tmp_path / "p.zarr")
    for folder, seed in (("a", 5), ("b", 1)):
        (tmp_path / folder).mkdir()
        volume = blob_volume(random_blobs(10, radius=8.0, sigma=1.8, seed=seed), 32)
        write_volume(tmp_path / folder / "map.mrc", volume, pixel_size=3.0)
    maps = [str(tmp_path / "a" / "map.mrc"), str(tmp_path / "b" / "map.mrc")]
    out = tmp_path / "out.zarr"
    args = ["compare", str(tmp_path / "p.zarr"), *maps, str(out), "--angles", "--quiet"]
    assert main(args) == 0
    assert f"best volume (cost)  {maps[1]}" in capsys.readouterr().out
    assert xr.open_zarr(out, consolidated=False).attrs["volume_names"] == maps
    assert main(["rank", str(out)]) == 0
    assert f"best volume: {maps[1]}" in capsys.readouterr().out
    twice = ["compare", str(tmp_path / "p.zarr"), maps[0], maps[0], str(tmp_path / "t.zarr")]
    assert main([*twice, "--angles"]) == 2
    assert "is given twice" in capsys.readouterr().err


def test_compare_names_a_stores_volumes_by_its_own_labels(tmp_path, capsys):
    """A zarr store of several volumes with a ``volume`` label ("class1", ...): its maps
    were named ``maps[0]``, ``maps[1]``, the labels ignored."""
    from scalign.synthetic_em import blob_volume, random_blobs, simulate_particles

    blobs = random_blobs(10, radius=8.0, sigma=1.8, seed=1)
    parts = simulate_particles(blobs, 32, 6, noise=0.3, seed=2)
    save_zarr(parts.stack, tmp_path / "p.zarr")
    volumes = np.stack(
        [blob_volume(random_blobs(10, radius=8.0, sigma=1.8, seed=s), 32) for s in (5, 1)]
    )
    labelled = xr.Dataset(
        {"volumes": (("volume", "z", "y", "x"), volumes, {"pixel_size": 3.0})},
        coords={"volume": np.array(["class1", "class2"], dtype=object)},
    )
    labelled.to_zarr(tmp_path / "maps.zarr", consolidated=False)
    out = tmp_path / "out.zarr"
    args = ["compare", str(tmp_path / "p.zarr"), str(tmp_path / "maps.zarr"), str(out)]
    assert main([*args, "--angles", "--quiet"]) == 0
    assert "best volume (cost)  maps[class2]" in capsys.readouterr().out
    names = xr.open_zarr(out, consolidated=False).attrs["volume_names"]
    assert names == ["maps[class1]", "maps[class2]"]
