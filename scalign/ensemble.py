"""The ensemble data model: ``coords`` over ``(structure, point, space)``.

An ensemble is an :class:`xarray.Dataset` with

* ``coords`` — float32/float64, dims ``(structure, point, space)``, chunked along
  ``structure`` only;
* ``weights`` (optional) — dims ``(point,)`` or ``(structure, point)``, ``>= 0``.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from scalign._array import batch_chunked
from scalign.validation import as_points, as_weights, check_chunks, check_enough_points

STRUCTURE, POINT, SPACE = "structure", "point", "space"
COORD_DIMS = (STRUCTURE, POINT, SPACE)


def default_chunk(n_points: int, d: int, itemsize: int = 4) -> int:
    """Structures per chunk: about 32 MiB of coordinates, so a task lasts well over 100 ms
    of work on the distributed scheduler but several chunks still fit per worker."""
    return max(1, (32 * 2**20) // max(1, n_points * d * itemsize))


def make_ensemble(
    coords: Any,
    weights: Any | None = None,
    *,
    chunks: int | None = None,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Build an ensemble Dataset from an array of structures.

    Parameters
    ----------
    coords : (structure, point, space) array-like
        Coordinates, points as rows. NumPy arrays are checked for NaN/inf here;
        dask arrays stay lazy (a non-finite structure then gives NaN results for itself).
    weights : (point,) or (structure, point) array-like, optional
        Per-point weights (e.g. masses), ``>= 0`` and not all zero.
    chunks : int, optional
        Structures per chunk; default :func:`default_chunk`.
    attrs : dict, optional
        Dataset attributes (JSON-serialisable to survive zarr).

    Returns
    -------
    Dataset
        ``coords (structure, point, space)`` as a dask array chunked along ``structure``
        (float input keeps its dtype, other numbers become float64; a dask array is
        rechunked as given), and ``weights`` (float64, in memory) when given.

    Raises
    ------
    ValueError
        ``coords`` not 3-D, with no structures or fewer than ``space`` points, a NaN/inf
        in NumPy ``coords``, or invalid ``weights`` (shape, sign, values).
    TypeError
        Non-numeric ``coords`` or ``weights``, or a non-integer ``chunks``.
    """
    if isinstance(coords, da.Array):
        # as for in-memory input (as_points), lazily: the ops take floats only
        if coords.dtype.kind not in "iuf":
            raise TypeError(f"coords must be an array of real numbers, got dtype {coords.dtype}")
        if coords.dtype.kind != "f":
            arr = coords.astype(np.float64)
        else:
            arr = coords.astype(np.float32) if coords.dtype == np.float16 else coords
    else:
        arr = as_points("coords", coords, min_ndim=0)
    if arr.ndim != 3:
        one = " (one structure? pass coords[None])" if arr.ndim == 2 else ""
        raise ValueError(f"coords must have shape (structure, point, space), got {arr.shape}{one}")
    check_chunks(chunks)
    n_structures, n, d = arr.shape
    if n_structures == 0:
        raise ValueError("coords is an empty ensemble: 0 structures")
    check_enough_points("coords", n, d)
    if chunks is None:
        chunks = default_chunk(n, d, arr.dtype.itemsize)
    data = batch_chunked(arr, chunks)
    ds = xr.Dataset({"coords": (COORD_DIMS, data)}, attrs=dict(attrs or {}))
    if weights is not None:
        w = as_weights("weights", weights, n)
        dims = (POINT,) if w.ndim == 1 else (STRUCTURE, POINT)
        if w.ndim == 2 and w.shape[0] != n_structures:
            raise ValueError(
                f"weights has {w.shape[0]} rows but coords has {n_structures} structures"
            )
        if w.ndim > 2:
            raise ValueError(
                f"weights must have shape (point,) or (structure, point), got {w.shape}"
            )
        ds["weights"] = (dims, w)
    return ds


def validate_ensemble(ds: xr.Dataset | xr.DataArray, name: str = "ensemble") -> xr.Dataset:
    """Check an ensemble's structure (not its values, which may be lazy) and return it.

    ``coords`` must exist with dims ``(structure, point, space)``, a floating dtype, at
    least one structure and at least ``d`` points; ``weights``, when present, must have
    dims ``(point,)`` or ``(structure, point)``. A bare DataArray is taken as ``coords``.

    Parameters
    ----------
    ds : Dataset or DataArray
        The ensemble, or its ``coords``.
    name : str
        How the ensemble is named in error messages.

    Returns
    -------
    Dataset
        ``ds`` unchanged (a DataArray wrapped as the Dataset's ``coords``).

    Raises
    ------
    TypeError
        Not an xarray object, or ``coords`` not floating.
    ValueError
        Any other of the conditions above.
    """
    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset(name="coords")
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"{name} must be an xarray Dataset, got {type(ds).__name__}")
    if "coords" not in ds.data_vars:
        raise ValueError(f"{name} has no 'coords' variable (variables: {list(ds.data_vars)})")
    coords = ds["coords"]
    if coords.dims != COORD_DIMS:
        raise ValueError(f"{name}.coords must have dims {COORD_DIMS}, got {coords.dims}")
    if not np.issubdtype(coords.dtype, np.floating):
        raise TypeError(f"{name}.coords must be float32 or float64, got {coords.dtype}")
    if ds.sizes[STRUCTURE] == 0:
        raise ValueError(f"{name} is empty: 0 structures")
    check_enough_points(f"{name}.coords", ds.sizes[POINT], ds.sizes[SPACE])
    if "weights" in ds.data_vars and ds["weights"].dims not in ((POINT,), (STRUCTURE, POINT)):
        raise ValueError(
            f"{name}.weights must have dims ('point',) or ('structure', 'point'), "
            f"got {ds['weights'].dims}"
        )
    return ds


def ensemble_variable(ds: xr.Dataset, value: Any, role: str = "weights") -> Any:
    """``ds[value]`` when ``value`` names a variable of the ensemble, else ``value``."""
    if not isinstance(value, str):
        return value
    if value not in ds.variables:
        raise ValueError(f"{role} variable {value!r} is not in the ensemble ({list(ds.data_vars)})")
    return ds[value]
