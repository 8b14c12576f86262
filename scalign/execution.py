"""Where the work runs: always Dask's schedulers, never one of our own.

* no argument: the embedded default, Dask's threaded scheduler (or a Client the caller
  already made);
* ``local=True``: a ``distributed.LocalCluster`` on this machine;
* ``address`` or ``$SCALIGN_SCHEDULER``: any running Dask scheduler (dask-jobqueue,
  dask-kubernetes, dask-gateway, ``dask scheduler`` ...);
* ``gpu=True``: a ``dask_cuda.LocalCUDACluster`` (one worker per GPU), chunks as CuPy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import dask
import xarray as xr
from threadpoolctl import threadpool_limits

SCHEDULER_ENV = "SCALIGN_SCHEDULER"


def gpu_available() -> bool:
    """True when CuPy imports *and* a CUDA device can allocate (import alone proves nothing)."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


def _cuda_cluster(n_workers: int | None):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise RuntimeError("--gpu needs dask-cuda and CuPy: pip install 'scalign[gpu]'") from exc
    if not gpu_available():
        raise RuntimeError("--gpu: no usable CUDA device (cupy.is_available() is False)")
    return LocalCUDACluster(n_workers=n_workers)


@contextlib.contextmanager
def scheduler(
    address: str | None = None,
    *,
    local: bool = False,
    gpu: bool = False,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
) -> Iterator[Any]:
    """Context in which ``.compute()`` and ``to_zarr`` run on the chosen scheduler.

    Yields the ``distributed.Client`` (or ``None`` for the threaded scheduler, during which
    BLAS is held to one thread per Dask thread). Clusters started here are closed on exit;
    an existing scheduler named by ``address`` is not.
    """
    address = address or os.environ.get(SCHEDULER_ENV) or None
    if gpu and address:
        raise ValueError(
            "give either --gpu (a local CUDA cluster) or a scheduler address, not both"
        )
    if not (address or local or gpu):
        # Dask runs one chunk per thread: BLAS threads on top oversubscribe the cores (the
        # threaded zarr->zarr op ran 40% faster on 2 cores with BLAS held to one thread).
        # Workers of a distributed cluster already start with one (distributed's nanny).
        with threadpool_limits(limits=1, user_api="blas"):
            yield None
        return
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if gpu:
            target = stack.enter_context(_cuda_cluster(n_workers))
        elif address:
            target = address
        else:
            target = stack.enter_context(
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=threads_per_worker,
                    processes=True,
                    # any free port: 8787 may be held by another cluster on the machine
                    dashboard_address=":0",
                )
            )
        client = stack.enter_context(Client(target, set_as_default=True))
        yield client


def to_device(ds: xr.Dataset, device: str) -> xr.Dataset:
    """Move every dask-backed variable's chunks to ``"gpu"`` (CuPy) or ``"cpu"`` (NumPy)."""
    if device == "cpu":
        convert = "asnumpy"
    elif device == "gpu":
        convert = "asarray"
    else:
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'gpu'")
    import cupy

    fn = getattr(cupy, convert)
    out = ds.copy()
    for name, var in ds.data_vars.items():
        if var.chunks is not None:
            out[name] = var.copy(data=var.data.map_blocks(fn, dtype=var.dtype))
    return out


def run(obj: Any, *, progress: bool = False) -> Any:
    """Compute a dask/xarray object (or a Delayed) with an optional progress bar.

    Under a ``distributed`` client the bar is ``distributed.progress`` (Dask's local
    ``ProgressBar`` prints nothing there); otherwise ``dask.diagnostics.ProgressBar``.
    """
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        if not progress:
            return dask.compute(obj)[0]
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=0.5):
            return dask.compute(obj)[0]
    future = client.compute(obj)
    if progress:
        from distributed import progress as show

        show(future)
        print()
    return future.result()
