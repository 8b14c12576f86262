"""Execution contexts: the embedded default, clusters, and their BLAS thread policy."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import scalign
from scalign.execution import run, scheduler


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_threaded_default_holds_blas_to_one_thread_and_restores_it():
    before = blas_threads()
    with scheduler() as client:
        assert client is None
        assert set(blas_threads()) == {1}
        assert dask.config.get("scheduler", None) in (None, "threads")
    assert blas_threads() == before


def test_local_cluster_is_started_and_closed():
    with scheduler(local=True, n_workers=1) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        ens = scalign.helix_ensemble(50, 8, chunks=25)
        out = run(scalign.align(ens, 0)["rmsd"], progress=True)
        assert np.all(out.values < 1e-4)
    assert client.status == "closed"


def test_gpu_with_an_address_joins_only_with_cupy_here():
    """``gpu=True`` with an address joins that scheduler's GPU workers; the graphs of CuPy
    chunks are built in this process, so CuPy must import here (checked before
    connecting)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed")
    with pytest.raises(RuntimeError, match="needs CuPy"), scheduler("tcp://127.0.0.1:1", gpu=True):
        pass
