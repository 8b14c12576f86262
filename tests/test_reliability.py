"""Reliability on a real cluster: a worker process killed in the middle of a job loses
nothing — Dask recomputes its tasks elsewhere and the result equals an undisturbed run."""

from __future__ import annotations

import time

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import scalign
from scalign.synthetic_em import blob_volume, random_blobs, simulate_particles


def _tasks_in_memory(dask_scheduler) -> int:
    return sum(ts.state == "memory" for ts in dask_scheduler.tasks.values())


def compute_while_killing_a_worker(lazy: xr.Dataset | xr.DataArray, min_done: int = 3):
    """Compute ``lazy`` on a 2-process LocalCluster, SIGKILL one worker process once at
    least ``min_done`` tasks have finished (and before the job ends), return the result
    and whether the kill happened mid-job."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        future = client.compute(lazy)
        deadline = time.monotonic() + 60
        while client.run_on_scheduler(_tasks_in_memory) < min_done and not future.done():
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.02)
        killed = not future.done()
        if killed:
            nanny = next(iter(cluster.workers.values()))
            nanny.process.process.kill()  # a hard crash: no goodbye to the scheduler
        result = future.result(timeout=120)
    return result, killed


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: scalign.align(scalign.helix_ensemble(40_000, 64, noise=0.1, chunks=1000), 0),
            id="align",
        ),
        pytest.param(
            lambda: scalign.warp_stack(
                scalign.make_stack(
                    np.random.default_rng(0).random((240, 128, 128)).astype(np.float32),
                    chunks=6,
                ),
                scalign.build_affine_matrix(7, 2.5, -1.5, center=(63.5, 63.5)),
            ),
            id="warp_stack",
        ),
        pytest.param(
            lambda: scalign.compare_reprojections(
                simulate_particles(
                    random_blobs(seed=1), 32, 240, noise=0.3, ctf=True, seed=2, chunks=8
                ).stack,
                blob_volume(random_blobs(seed=1), 32),
                angles="stack",
                ctf=True,
                covariance=False,
            ),
            id="compare_reprojections",
        ),
    ],
)
# the inputs are in memory on purpose (no store to recompute from): their chunks travel
# in the graph, which distributed reports as a large graph
@pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning")
def test_a_killed_worker_loses_nothing(make):
    lazy = make()
    expected = lazy.compute(scheduler="threads")
    result, killed = compute_while_killing_a_worker(lazy)
    assert killed, "the job finished before a worker could be killed: make it longer"
    xr.testing.assert_allclose(result, expected, rtol=0, atol=0)


def test_a_killed_cli_write_resumes_where_it_stopped(tmp_path):
    """`scalign align` killed mid-write leaves no store at OUT (only a hidden partial one);
    the same command again writes only the missing blocks, and the result equals an
    uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys

    source = tmp_path / "in.zarr"
    scalign.save_zarr(scalign.helix_ensemble(150_000, 64, noise=0.1, chunks=5_000), source)
    out, reference = tmp_path / "out.zarr", tmp_path / "reference.zarr"
    command = [sys.executable, "-m", "scalign.cli", "align", str(source), str(out), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # the job's own partial store: .out.zarr.<its fingerprint>.partial
    while not (
        (found := list(tmp_path.glob(".out.zarr.*.partial/.scalign-progress")))
        and len(list(found[0].iterdir())) > 5
    ):
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(found[0].iterdir())) - 1
    assert not out.exists() and written > 0
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming the interrupted write" in rerun.stderr + rerun.stdout
    assert f"{written} block(s) already written" in rerun.stderr + rerun.stdout
    assert not list(tmp_path.glob(".out.zarr.*partial"))
    scalign.save_zarr(scalign.align(scalign.open_ensemble(source), "first"), reference)
    xr.testing.assert_identical(
        xr.open_zarr(out, consolidated=False).load(),
        xr.open_zarr(reference, consolidated=False).load(),
    )


def _synthetic_store(path, n_structures: int, n_points: int, chunk: int):
    """A zarr ensemble written chunk by chunk from a lazy generator (never in memory)."""
    import dask.array as da

    base = scalign.helix(n_points)

    def block(block_info=None):
        start, stop = block_info[None]["array-location"][0]
        rng = np.random.default_rng(start)
        R = np.linalg.qr(rng.normal(size=(stop - start, 3, 3)))[0]
        R *= np.sign(np.linalg.det(R))[:, None, None]
        noise = rng.normal(0, 0.2, (stop - start, n_points, 3))
        return ((base + noise) @ R + rng.normal(0, 5, (stop - start, 1, 3))).astype(np.float32)

    coords = da.map_blocks(
        block, chunks=((chunk,) * (n_structures // chunk), (n_points,), (3,)), dtype=np.float32
    )
    with scalign.scheduler():
        scalign.save_zarr(scalign.make_ensemble(coords, chunks=chunk), path)


@pytest.mark.slow
def test_out_of_core_generalized_procrustes_stays_under_the_memory_limit(tmp_path):
    """2.1 GB of coordinates, over 4x the total worker memory (one worker limited to
    500 MB, of which ~200 MB are the libraries a worker process holds before any data),
    aligned to their generalized-Procrustes mean, zarr to zarr, the aligned coordinates
    written too (another 2.1 GB); the worker's memory is sampled throughout."""
    import threading

    n, points, chunk = 2_750_000, 64, 10_000  # 2.1 GB float32, chunks of 7.3 MiB
    source, out = tmp_path / "big.zarr", tmp_path / "aligned.zarr"
    _synthetic_store(source, n, points, chunk)
    peak = {}
    stop = threading.Event()
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            memory_limit="500MB",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):

        def sample():
            import psutil

            while not stop.is_set():
                for worker, rss in client.run(lambda: psutil.Process().memory_info().rss).items():
                    peak[worker] = max(peak.get(worker, 0), rss)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = scalign.align(scalign.open_ensemble(source), "mean")
        scalign.save_zarr(result, out)
        stop.set()
        sampler.join()
        restarts = client.run_on_scheduler(
            lambda dask_scheduler: sum(
                ws.nanny is not None for ws in dask_scheduler.workers.values()
            )
        )
    assert restarts == 1  # the original worker is still there
    written = xr.open_zarr(out, consolidated=False)
    assert written.sizes["structure"] == n and int(written.attrs["gpa_iterations"]) >= 1
    assert float(written["rmsd"].max()) < 1.0  # every structure aligned to the mean
    # the aligned coordinates were written: spot-check structures against the reference
    sample = written.isel(structure=slice(None, None, 250_000))
    residual = sample["aligned"].values - written["reference"].values
    rms = np.sqrt((residual**2).sum(-1).mean(-1))
    np.testing.assert_allclose(rms, sample["rmsd"].values, rtol=1e-3)
    assert max(peak.values()) < 500e6, {k: f"{v / 1e6:.0f} MB" for k, v in peak.items()}
    print(f"peak worker memory: {max(peak.values()) / 1e6:.0f} MB (limit 500 MB)")
