"""The ``device`` argument of every op, and the host/GPU plumbing, on a machine without a
GPU (the GPU side is in ``test_gpu.py``, run with ``pytest -m gpu``)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import scalign
from scalign._array import host, is_gpu_backed
from scalign.cli import main
from scalign.execution import gpu_available, gpu_batches, to_device
from scalign.kernels.euler import euler_to_matrix
from scalign.synthetic_em import blob_projections, blob_volume, random_blobs

no_gpu = pytest.mark.skipif(gpu_available(), reason="a GPU is present")


@pytest.fixture(scope="module")
def ensemble():
    return scalign.helix_ensemble(60, 12, noise=0.2, chunks=20)


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(0)
    return scalign.make_stack(rng.random((6, 24, 24)).astype(np.float32), chunks=3)


@pytest.fixture(scope="module")
def particles():
    blobs = random_blobs(6, radius=5.0, sigma=1.6, seed=1)
    rot, tilt, psi = np.array([10.0, 80.0, -40.0]), np.array([30.0, 90.0, 120.0]), np.zeros(3)
    images = blob_projections(blobs, 24, euler_to_matrix(rot, tilt, psi)).astype(np.float32)
    ds = scalign.make_stack(images, chunks=2)
    ds = ds.assign(rot=("image", rot), tilt=("image", tilt), psi=("image", psi))
    return ds, blob_volume(blobs, 24)


def _ops(ensemble, stack, particles):
    ds, volume = particles
    return {
        "align": lambda device: scalign.align(ensemble, device=device)["rmsd"],
        "pairwise_rmsd": lambda device: scalign.pairwise_rmsd(ensemble, chunks=20, device=device),
        "warp_stack": lambda device: scalign.warp_stack(
            stack, scalign.build_affine_matrix(5.0, 1.5, -0.5), device=device
        ),
        "register_stack": lambda device: scalign.register_stack(stack, device=device)["matrix"],
        "compare_reprojections": lambda device: scalign.compare_reprojections(
            ds, volume, "stack", covariance=False, downsample_to=None, device=device
        )["correlation"],
        "reproject": lambda device: scalign.reproject(volume, ds, device=device),
    }


OPS = [
    "align",
    "pairwise_rmsd",
    "warp_stack",
    "register_stack",
    "compare_reprojections",
    "reproject",
]


@pytest.mark.parametrize("op", OPS)
def test_cpu_and_auto_give_the_default_result(ensemble, stack, particles, op):
    run = _ops(ensemble, stack, particles)[op]
    default = run("auto")
    assert not is_gpu_backed(default.data)
    np.testing.assert_array_equal(run("cpu").values, default.values)


@pytest.mark.parametrize("op", OPS)
def test_unknown_device_is_refused_by_name(ensemble, stack, particles, op):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        _ops(ensemble, stack, particles)[op]("tpu")


@no_gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_without_a_gpu_is_a_clear_error(ensemble, stack, particles, op):
    with pytest.raises(RuntimeError, match="CuPy|CUDA device"):
        _ops(ensemble, stack, particles)[op]("gpu")


def test_to_device_keeps_host_data_and_auto_is_the_identity(ensemble):
    assert to_device(ensemble, "auto") is ensemble
    back = to_device(ensemble, "cpu")
    assert back["coords"].data is ensemble["coords"].data
    arr = to_device(ensemble["coords"], "cpu")
    assert isinstance(arr, xr.DataArray) and arr.data is ensemble["coords"].data


def test_host_computes_lazy_values_into_numpy():
    x = da.arange(10, chunks=3)
    np.testing.assert_array_equal(host(x), np.arange(10))
    np.testing.assert_array_equal(host(xr.DataArray(x)), np.arange(10))
    np.testing.assert_array_equal(host(np.arange(3)), np.arange(3))
    assert not is_gpu_backed(x) and not is_gpu_backed(np.arange(3))


@no_gpu
def test_cli_gpu_with_a_scheduler_address_needs_cupy(tmp_path, capsys):
    pytest.importorskip("distributed")
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed")
    store = tmp_path / "e.zarr"
    scalign.save_zarr(scalign.helix_ensemble(20, 8, chunks=10), store)
    argv = [
        "align",
        str(store),
        str(tmp_path / "o.zarr"),
        "--gpu",
        "--scheduler",
        "tcp://127.0.0.1:1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "CuPy" in err and "\n" not in err.strip()
    assert not (tmp_path / "o.zarr").exists()


def test_rmm_pool_without_a_local_gpu_cluster_is_refused(tmp_path, capsys):
    from scalign.execution import scheduler

    with pytest.raises(ValueError, match="rmm_pool_size needs gpu=True"):
        with scheduler(rmm_pool_size="1GB"):
            pass
    store = tmp_path / "e.zarr"
    scalign.save_zarr(scalign.helix_ensemble(20, 8, chunks=10), store)
    assert main(["align", str(store), str(tmp_path / "o.zarr"), "--rmm-pool", "1GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rmm_pool_size needs gpu=True" in err and "\n" not in err
    assert not (tmp_path / "o.zarr").exists()


def test_gpu_batches_merge_host_chunks_along_the_batch_dim():
    rng = np.random.default_rng(2)
    coords = da.from_array(rng.random((20_000, 64, 3)).astype(np.float32), chunks=(1000, 64, 3))
    weights = da.from_array(rng.random((20_000, 64)), chunks=(1000, 64))
    ds = xr.Dataset(
        {
            "coords": (("structure", "point", "space"), coords),
            "weights": (("structure", "point"), weights),
            "reference": (("point", "space"), da.zeros((64, 3), chunks=(16, 3))),
            "label": ("structure", np.arange(20_000)),
        }
    )
    # 768 kB chunks of coords: 11 of them reach 8 MiB
    out = gpu_batches(ds, "gpu", chunk_bytes=8 * 2**20)
    assert out["coords"].chunks[0] == (11_000, 9_000)
    assert out["weights"].chunks[0] == out["coords"].chunks[0]
    assert out["reference"].chunks == ds["reference"].chunks
    assert isinstance(out["label"].data, np.ndarray)
    xr.testing.assert_identical(out.compute(), ds.compute())
    for device in ("cpu", "auto"):
        assert gpu_batches(ds, device, chunk_bytes=8 * 2**20) is ds
    assert gpu_batches(ds, "gpu", chunk_bytes=2**19) is ds  # chunks already that large
    # whole multiples of the current chunk, never more than the batch
    assert gpu_batches(ds, "gpu", chunk_bytes=2**40)["coords"].chunks[0] == (20_000,)
    in_memory = ds.compute()
    assert gpu_batches(in_memory, "gpu") is in_memory


def test_clamp_equals_numpy_clip_and_keeps_nan():
    from scalign._array import clamp

    x = np.array([-2.0, -0.5, 0.25, 0.7, np.nan, np.inf, -np.inf])
    np.testing.assert_array_equal(clamp(x, -0.5, 0.5), np.clip(x, -0.5, 0.5))
    np.testing.assert_array_equal(clamp(x, 0.0), np.clip(x, 0.0, None))
    np.testing.assert_array_equal(clamp(x, hi=0.0), np.clip(x, None, 0.0))
    q = np.arange(-3, 8)
    assert clamp(q, 0, 5).dtype == q.dtype
    np.testing.assert_array_equal(clamp(q, 0, 5), np.clip(q, 0, 5))


def test_gpu_packages_live_in_the_gpu_extra_only():
    """The base install never pulls CuPy, dask-cuda or RMM (dask-cuda pins its own dask
    release); the ``gpu`` extra holds all three, and the README names it."""
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}

    gpu = {"cupy-cuda12x", "dask-cuda", "rmm-cu12"}
    assert not names(project["dependencies"]) & {*gpu, "cupy"}
    assert names(project["optional-dependencies"]["gpu"]) == gpu
    assert 'pip install -e ".[gpu]"' in (root / "README.md").read_text()
