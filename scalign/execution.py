"""Where the work runs: always Dask's schedulers, never one of our own.

* no argument: the embedded default, Dask's threaded scheduler (or a Client the caller
  already made), unless ``$SCALIGN_SCHEDULER`` names a scheduler;
* ``threads=True``: the threaded scheduler, whatever ``$SCALIGN_SCHEDULER`` says;
* ``local=True``: a ``distributed.LocalCluster`` on this machine;
* ``address`` or ``$SCALIGN_SCHEDULER``: any running Dask scheduler (dask-jobqueue,
  dask-kubernetes, dask-gateway, ``dask scheduler`` ...); an explicit choice (``local``,
  ``gpu``, ``threads``) wins over the environment variable;
* ``gpu=True``: a ``dask_cuda.LocalCUDACluster`` (one worker per GPU), or, with an
  ``address``, that scheduler's workers, which must have GPUs; the ops then take
  ``device="gpu"`` (CuPy chunks).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import dask
import dask.array
import dask.threaded
import xarray as xr
from dask.base import get_scheduler, unpack_collections
from threadpoolctl import threadpool_limits

from scalign._array import is_gpu_backed, move
from scalign.validation import check_count, check_option

SCHEDULER_ENV = "SCALIGN_SCHEDULER"
#: Seconds to wait for a scheduler named by address to answer (distributed waits 30 s and
#: retries; a wrong address should fail fast).
CONNECT_TIMEOUT = 10
#: glibc malloc settings for the worker processes of the clusters started here.
#: distributed sets ``MALLOC_TRIM_THRESHOLD_=65536`` so that workers hand freed memory back
#: to the OS; setting it also fixes glibc's mmap threshold at 128 KiB, so every NumPy
#: temporary above that is a fresh ``mmap`` whose pages fault in again on every use. The
#: align kernel ran 2.2x slower on such workers than in the threaded scheduler (264 vs
#: 120 ms per 43,690-structure chunk, measured on 2 cores); with both thresholds at 64 MiB
#: (temporaries reused from the heap, at most 64 MiB of free heap kept per arena) a
#: 2-worker LocalCluster ran the zarr -> align -> zarr job at 1.05x the threaded scheduler.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 64 * 2**20, "MALLOC_TRIM_THRESHOLD_": 64 * 2**20}
#: distributed's own default, replaced by :data:`WORKER_MALLOC` (a value set by the user
#: in Dask's configuration is kept).
_DISTRIBUTED_TRIM = 65536
#: Bytes per chunk that an op's data moved to the GPU is merged up to, along its batch
#: dimension (:func:`gpu_batches`). A GPU streams a 32 MiB chunk (the host default) in
#: ~10 us, so Dask's ~1 ms per task and the kernels' launch latencies would dominate it
#: (and a batched image registration runs ~100 iterations of ~100 small kernels per chunk
#: whatever its size); at 256 MiB the host-to-device copy, ~10 ms at 25 GB/s, is the
#: largest cost of a task.
GPU_CHUNK_BYTES = 256 * 2**20
T = TypeVar("T", xr.Dataset, xr.DataArray)


def gpu_available() -> bool:
    """True when CuPy imports *and* a CUDA device can allocate (import alone proves nothing).

    Parameters
    ----------
    None

    Returns
    -------
    bool
        ``cupy.is_available()``; False when CuPy is missing or the check raises.
    """
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


def _cuda_cluster(n_workers: int | None, rmm_pool_size: str | None):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise RuntimeError("--gpu needs dask-cuda and CuPy: pip install 'scalign[gpu]'") from exc
    if not gpu_available():
        raise RuntimeError("--gpu: no usable CUDA device (cupy.is_available() is False)")
    if rmm_pool_size is None:
        return LocalCUDACluster(n_workers=n_workers)
    # a pool that CuPy does not allocate from would only hold memory beside CuPy's own
    # pool: dask-cuda points CuPy at RMM only when told to
    return LocalCUDACluster(
        n_workers=n_workers,
        rmm_pool_size=rmm_pool_size,
        rmm_allocator_external_lib_list=["cupy"],
    )


@contextlib.contextmanager
def scheduler(
    address: str | None = None,
    *,
    local: bool = False,
    gpu: bool = False,
    threads: bool = False,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    rmm_pool_size: str | None = None,
) -> Iterator[Any]:
    """Context in which ``.compute()`` and ``to_zarr`` run on the chosen scheduler.

    Yields the ``distributed.Client`` (or ``None`` for the threaded scheduler, during which
    BLAS is held to one thread per Dask thread). Clusters started here are closed on exit;
    an existing scheduler named by ``address`` is not. Their worker processes get
    :data:`WORKER_MALLOC` (see there: 2x faster kernels than distributed's defaults); for
    workers started elsewhere, set ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` in their environment the same way. ``rmm_pool_size``
    (e.g. ``"24GB"``) gives each worker of a local CUDA cluster an RMM memory pool of that
    size (fewer ``cudaMalloc`` calls when chunks come and go).

    ``$SCALIGN_SCHEDULER`` is the address only when none of ``address``, ``local``,
    ``gpu`` and ``threads`` is given (``threads=True``: the threaded scheduler whatever it
    says). A scheduler that does not answer within :data:`CONNECT_TIMEOUT` seconds is a
    ``ConnectionError``; ``n_workers`` and ``threads_per_worker`` must be positive.

    Parameters
    ----------
    address : str, optional
        Address of a running Dask scheduler to connect to.
    local : bool
        Start a ``distributed.LocalCluster`` of worker processes.
    gpu : bool
        Start a ``dask_cuda.LocalCUDACluster`` (one worker per GPU); with ``address``, the
        remote workers hold the GPUs and CuPy must import here.
    threads : bool
        The threaded scheduler, ignoring ``$SCALIGN_SCHEDULER``; excludes the others.
    n_workers : int, optional
        Workers of a cluster started here (the cluster's default when None).
    threads_per_worker : int, optional
        Threads per worker of a ``local`` cluster.
    rmm_pool_size : str, optional
        RMM pool per worker of a ``gpu`` cluster started here (not with ``address``).

    Yields
    ------
    distributed.Client or None
        The client, set as default for the duration; None for the threaded scheduler.

    Raises
    ------
    ValueError
        ``threads`` with another choice, ``rmm_pool_size`` without a local ``gpu``
        cluster, ``n_workers`` without a cluster started here (``threads_per_worker``
        without a ``local`` one), or a non-positive worker/thread count (``TypeError``
        for a non-integer).
    RuntimeError
        ``gpu`` without CuPy (or dask-cuda, or a usable device for a local cluster).
    ConnectionError
        No scheduler answered at the address.
    """
    if threads and (address or local or gpu):
        raise ValueError("threads=True (--threads) excludes a scheduler address, local and gpu")
    if local and address:
        # the address would win and the local cluster be silently dropped
        raise ValueError(
            "local=True (--local) starts a cluster here: it excludes a scheduler address"
        )
    if not (address or local or gpu or threads):
        address = os.environ.get(SCHEDULER_ENV) or None
    if address is not None:
        _check_address(address)
    for name, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
        if value is not None:
            check_count(name, value)
    if rmm_pool_size is not None and not (gpu and not address):
        raise ValueError("rmm_pool_size needs gpu=True without a scheduler address (--gpu)")
    # counts for a cluster that is not started here would be silently ignored
    if n_workers is not None and not ((local or gpu) and not address):
        raise ValueError(
            "n_workers (--workers) sizes a cluster started here: it needs local=True "
            "(--local) or gpu=True (--gpu) without a scheduler address"
        )
    if threads_per_worker is not None and not (local and not (gpu or address)):
        raise ValueError("threads_per_worker needs local=True without a scheduler address")
    if gpu and address:
        # the workers hold the GPUs, but graphs of CuPy chunks are built here
        _import_cupy()
    if not (address or local or gpu):
        # Dask runs one chunk per thread: BLAS threads on top oversubscribe the cores (the
        # threaded zarr->zarr op ran 40% faster on 2 cores with BLAS held to one thread).
        # Workers of a distributed cluster already start with one (distributed's nanny).
        with threadpool_limits(limits=1, user_api="blas"):
            yield None
        return
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if not address:
            stack.enter_context(_worker_malloc())
        if address:
            target = address
        elif gpu:
            target = stack.enter_context(_cuda_cluster(n_workers, rmm_pool_size))
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
        if address:
            client = stack.enter_context(_connect(address))
        else:
            client = stack.enter_context(Client(target, set_as_default=True))
        yield client


def _check_address(address: Any) -> None:
    """``ValueError`` unless ``address`` reads as a scheduler address (``host:port`` or
    ``scheme://...``): a word such as ``"threads"`` or ``"local"`` otherwise reaches
    distributed as a host name and fails there as a missing port."""
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, got {type(address).__name__}")
    if "://" not in address and ":" not in address:
        source = f" (from ${SCHEDULER_ENV})" if os.environ.get(SCHEDULER_ENV) == address else ""
        raise ValueError(
            f"address {address!r}{source} is not a scheduler address (host:port or "
            "tcp://host:port); the threaded scheduler is threads=True (--threads), a local "
            "cluster local=True (--local), a GPU cluster gpu=True (--gpu)"
        )


def _connect(address: str) -> Any:
    """A client of the scheduler at ``address``, or ``ConnectionError`` naming it after
    :data:`CONNECT_TIMEOUT` seconds without an answer."""
    from distributed import Client

    try:
        return Client(address, set_as_default=True, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"no Dask scheduler answered at {address} within {CONNECT_TIMEOUT} s"
            + (f" (from ${SCHEDULER_ENV})" if os.environ.get(SCHEDULER_ENV) == address else "")
        ) from exc


@contextlib.contextmanager
def _worker_malloc() -> Iterator[None]:
    """Give the worker processes started in this context :data:`WORKER_MALLOC`, except
    a setting the user made (in Dask's configuration or in the environment).

    distributed's nanny takes these variables from ``os.environ`` before its own
    configuration, and copies its configuration into ``os.environ`` when it starts a
    worker (so after any cluster, this process's environment holds that cluster's
    values): both are set here for the duration, and the environment restored after.
    """
    prefix = "distributed.nanny.pre-spawn-environ"
    config = dask.config.get(prefix, default={}) or {}
    defaults = (None, str(_DISTRIBUTED_TRIM))
    chosen, saved = {}, {}
    for name, ours in WORKER_MALLOC.items():
        in_env, in_config = os.environ.get(name), config.get(name)
        if in_env not in (*defaults, str(ours)) and in_env != _as_str(in_config):
            continue  # the user's environment
        user_config = _as_str(in_config) not in (*defaults, str(ours))
        chosen[name] = _as_str(in_config) if user_config else str(ours)
        saved[name] = in_env
    with dask.config.set({f"{prefix}.{k}": v for k, v in chosen.items()}):
        os.environ.update(chosen)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


#: Where an op's chunks are computed (the ``device`` argument of every op).
DEVICES = ("auto", "cpu", "gpu")


def _client_present() -> bool:
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return False
    return True


def _import_cupy() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "GPU execution needs CuPy (and dask-cuda on a cluster): pip install 'scalign[gpu]'"
        ) from exc


def require_gpu() -> None:
    """Raise a clear error unless CuPy imports and a CUDA device is usable here, or a
    distributed client is active (its workers, not this process, hold the GPUs)."""
    _import_cupy()
    if not (gpu_available() or _client_present()):
        raise RuntimeError(
            "device='gpu': no usable CUDA device (cupy.is_available() is False) and no "
            "distributed client with GPU workers"
        )


def to_device(obj: T, device: str) -> T:
    """``obj`` (Dataset or DataArray) with every data variable's chunks on ``device``.

    ``"gpu"``: CuPy chunks (their dask ``meta`` a CuPy array, so every op mapped over them
    builds a CuPy graph and its results stay on the GPU); ``"cpu"``: NumPy chunks (the
    results come back, chunk by chunk, when computed); ``"auto"``: unchanged, each chunk
    stays where it is (ops chained on GPU data keep it there). Coordinates stay on the host.

    Parameters
    ----------
    obj : Dataset or DataArray
        Dask-backed variables are converted lazily, chunk by chunk; in-memory ones at once.
    device : {"auto", "cpu", "gpu"}

    Returns
    -------
    Dataset or DataArray
        A copy of ``obj`` with the moved data (``obj`` itself for ``"auto"``).

    Raises
    ------
    ValueError
        An unknown ``device``.
    RuntimeError
        ``"gpu"`` without CuPy, or without a usable CUDA device or a distributed client.
    """
    check_option("device", device, DEVICES)
    if device == "auto":
        return obj
    if device == "gpu":
        require_gpu()
    if isinstance(obj, xr.DataArray):
        return obj.copy(data=move(obj.data, device))
    out = obj.copy()
    for name, var in obj.data_vars.items():
        out[name] = var.copy(data=move(var.data, device))
    return out


def gpu_batches(ds: xr.Dataset, device: str, chunk_bytes: int = GPU_CHUNK_BYTES) -> xr.Dataset:
    """``ds`` with its host chunks merged for the GPU when ``device == "gpu"``.

    The batch dimension is the first of the largest dask-backed variable; every dask
    variable along it gets chunks of ``k`` times its current first chunk, the smallest
    ``k`` that makes the largest variable's chunks at least ``chunk_bytes`` (so chunks
    are only merged, never split, and the variables stay aligned). Unchanged for
    ``"cpu"``/``"auto"``, for data already on the GPU (its chunks are the caller's
    choice) and for chunks already that large.
    """
    lazy = {n: v for n, v in ds.data_vars.items() if v.chunks is not None and v.ndim}
    if device != "gpu" or not lazy:
        return ds
    main = max(lazy.values(), key=lambda v: v.nbytes)
    if is_gpu_backed(main.data):
        return ds
    dim = main.dims[0]
    current = main.chunks[0][0]
    per_item = main.nbytes // max(1, main.shape[0])
    factor = -(-chunk_bytes // max(1, current * per_item))
    size = min(main.shape[0], current * factor)
    if factor <= 1 or size == current:
        return ds
    out = ds.copy()
    for name, var in lazy.items():
        if var.dims[0] == dim:
            out[name] = var.chunk({dim: size})
    return out


def run(obj: Any, *, progress: bool = False) -> Any:
    """Compute a dask/xarray object (or a Delayed) with an optional progress bar.

    Under a ``distributed`` client the bar is ``distributed.progress`` (Dask's local
    ``ProgressBar`` prints nothing there); otherwise ``dask.diagnostics.ProgressBar``.

    Parameters
    ----------
    obj : dask collection, xarray object or Delayed
        What to compute (on the default ``distributed`` client when there is one, else on
        Dask's current scheduler).
    progress : bool
        Show a progress bar (locally only for computations over 0.5 s).

    Returns
    -------
    Any
        The computed result, as ``dask.compute(obj)[0]`` (an in-memory xarray object for
        an xarray input).
    """
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        if not progress:
            return _compute_local(obj)
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=0.5):
            return _compute_local(obj)
    future = client.compute(obj)
    if progress:
        from distributed import progress as show

        show(future)
        print()
    return future.result()


def _compute_local(obj: Any) -> Any:
    """``dask.compute(obj)[0]`` on Dask's current local scheduler; the threaded one (unless
    configured with a pool of its own) gets a pool for this computation alone, shut down
    before this returns, interrupted or not. Dask's shared pool goes on with the tasks it
    had started after a Ctrl-C: a block write each, into a partial store that the next job
    at the same destination may already be writing."""
    collections, _ = unpack_collections(obj)
    # dask.compute's choice: the configured scheduler, else the collections' default
    chosen = get_scheduler(collections=collections or None)
    if chosen not in (None, dask.threaded.get) or dask.config.get("pool", None):
        return dask.compute(obj)[0]
    pool = _ContextPool(dask.config.get("num_workers", None) or dask.threaded.CPU_COUNT)
    try:
        return dask.compute(obj, pool=pool)[0]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ContextPool(ThreadPoolExecutor):
    """A thread pool whose tasks run in the submitting thread's context, as in Dask's own
    pool (context variables: NumPy's ``errstate``, and warning filters on free-threaded
    Python)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)
