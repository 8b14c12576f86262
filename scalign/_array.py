"""Array-namespace helpers: one code path for NumPy and CuPy chunks."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from array_api_compat import array_namespace, is_cupy_array


def namespace(*arrays: Any):
    """Array namespace (NumPy or CuPy, array-API compatible) shared by ``arrays``."""
    return array_namespace(*[a for a in arrays if a is not None])


def clamp(x: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """``x`` limited to ``[lo, hi]`` (NaN stays NaN), NumPy or CuPy, in one or two
    elementwise passes. ``array_api_compat``'s ``clip`` copies ``x`` and assigns through
    boolean masks: a device synchronisation and several kernels per call on CuPy."""
    xp = namespace(x)
    if lo is not None:
        x = xp.maximum(x, lo)
    if hi is not None:
        x = xp.minimum(x, hi)
    return x


def to_numpy(x: Any) -> np.ndarray:
    """Copy a NumPy or CuPy array to host memory as a NumPy array."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def is_gpu_backed(data: Any) -> bool:
    """True for a CuPy array, or a dask array whose chunks are CuPy (its ``meta``)."""
    return is_cupy_array(getattr(data, "_meta", data))


def move(data: Any, device: str) -> Any:
    """``data`` on ``"gpu"`` (CuPy) or ``"cpu"`` (NumPy): a dask array by a lazy
    conversion per chunk (its ``meta`` follows), an in-memory array at once; unchanged
    when already there."""
    if is_gpu_backed(data) == (device == "gpu"):
        return data
    import cupy

    fn = cupy.asarray if device == "gpu" else cupy.asnumpy
    if isinstance(data, da.Array):
        return data.map_blocks(fn, dtype=data.dtype, meta=fn(data._meta))
    return fn(data)


def host(arr: Any) -> np.ndarray:
    """The values of a DataArray, dask array or array (NumPy or CuPy chunks; computed if
    lazy) as a NumPy array in host memory. ``DataArray.values`` cannot do this for CuPy
    data (CuPy refuses implicit conversion)."""
    if isinstance(arr, np.ndarray) or is_cupy_array(arr):
        return to_numpy(arr)
    data = getattr(arr, "data", arr)
    if isinstance(data, da.Array):
        data = data.compute()
    return to_numpy(data)


def batch_chunked(arr: Any, chunks: int) -> da.Array:
    """A dask array of ``arr`` in chunks of ``chunks`` items along axis 0, whole along the
    others.

    In-memory input is wrapped without hashing its contents for a graph name (dask's
    default tokenises every byte: ~0.2 s for 200 MiB, as long as warping it); each call
    gets a fresh name instead.
    """
    whole = {k: -1 for k in range(1, arr.ndim)}
    if isinstance(arr, da.Array):
        return arr.rechunk({0: chunks, **whole})
    return da.from_array(arr, chunks=(chunks,) + arr.shape[1:], name=False)
