"""Image stacks and volumes: the data model and the lazy warping op.

A stack is an :class:`xarray.Dataset` with

* ``images`` — real numbers over ``(image, y, x)`` (a stack of 2-D images) or
  ``(volume, z, y, x)`` (a batch of volumes), chunked along the first dim only;
* transforms (optional) — e.g. ``matrix`` over ``(image, row, col)``: homogeneous 3×3
  (2-D) or 4×4 (3-D) forward motions in pixel ``(x, y[, z])``
  (:mod:`scalign.kernels.affine`).

:func:`warp_stack` maps :func:`scalign.kernels.warp.warp_images` over the chunks with
:func:`scalign.mapping.map_batch`: lazy, one task per chunk, NumPy or CuPy chunks.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from array_api_compat import is_cupy_array

from scalign._array import batch_chunked, host, to_numpy
from scalign.execution import DEVICES, gpu_batches, to_device
from scalign.kernels.affine import check_matrix, normalized_to_pixel
from scalign.kernels.warp import (
    check_cval,
    check_invertible,
    check_mode,
    check_order,
    choose_method,
    output_dtype,
    warp_images,
)
from scalign.mapping import map_batch
from scalign.validation import check_chunks, check_count, check_option

IMAGE, Y, X = "image", "y", "x"
VOLUME, Z = "volume", "z"
ROW, COL = "row", "col"
STACK_DIMS = (IMAGE, Y, X)
VOLUME_DIMS = (VOLUME, Z, Y, X)


def default_chunk(shape: tuple[int, ...], itemsize: int = 4) -> int:
    """Images (or volumes) per chunk: about 32 MiB, as for ensembles (tasks well over
    100 ms of work, several chunks per worker)."""
    return max(1, (32 * 2**20) // max(1, int(np.prod(shape)) * itemsize))


def _check_pixels(name: str, arr: Any) -> None:
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers (integer or float), got dtype {dtype}")
    if arr.ndim not in (3, 4):
        raise ValueError(
            f"{name} must have shape (image, y, x) or (volume, z, y, x), got shape "
            f"{tuple(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: 0 images")
    if 0 in arr.shape:
        raise ValueError(f"{name} is empty: shape {tuple(arr.shape)}")


def check_finite(name: str, arr: np.ndarray) -> None:
    """A ValueError naming ``name`` and the count when ``arr`` has NaN/inf pixels."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} has {bad} non-finite (NaN or inf) pixel(s)")


def check_not_constant(name: str, arr: Any, d: int) -> None:
    """A ValueError naming ``name`` and the count when images (the last ``d`` axes) of
    ``arr`` have every pixel equal: a registration has nothing to go by and would return
    an arbitrary motion (NumPy or CuPy)."""
    axes = tuple(range(arr.ndim - d, arr.ndim))
    bad = int((arr.max(axis=axes) == arr.min(axis=axes)).sum())
    if bad:
        raise ValueError(
            f"{name} has {bad} constant image(s) (every pixel the same): nothing to register"
        )


def make_stack(images: Any, chunks: int | None = None, attrs: dict | None = None) -> xr.Dataset:
    """Build a stack Dataset from ``(image, y, x)`` images or ``(volume, z, y, x)`` volumes.

    Parameters
    ----------
    images : array-like, 3-D or 4-D
        Real numbers. NumPy input is checked for NaN/inf here; dask arrays stay lazy.
    chunks : int, optional
        Images (volumes) per chunk; default :func:`default_chunk` (about 32 MiB).
    attrs : dict, optional
        Dataset attributes (JSON-serialisable to survive zarr).

    Returns
    -------
    Dataset
        ``images (image, y, x)`` or ``(volume, z, y, x)``: a dask array in the input's
        dtype, chunked along the first dim only (CuPy input keeps CuPy chunks).

    Raises
    ------
    TypeError
        Not an array of real numbers, or a non-integer ``chunks``.
    ValueError
        Not 3-D or 4-D, empty, or NaN/inf pixels in in-memory input.
    """
    check_chunks(chunks)
    if isinstance(images, da.Array):
        arr = images
        _check_pixels("images", arr)
    else:
        try:
            # CuPy images stay on the GPU (their chunks are CuPy)
            arr = images if is_cupy_array(images) else np.asarray(images)
        except Exception as exc:  # ragged lists and other objects numpy cannot hold
            raise TypeError(f"images must be an array, got {type(images).__name__}") from exc
        _check_pixels("images", arr)
        check_finite("images", arr)
    dims = STACK_DIMS if arr.ndim == 3 else VOLUME_DIMS
    if chunks is None:
        chunks = default_chunk(arr.shape[1:], arr.dtype.itemsize)
    data = batch_chunked(arr, chunks)
    return xr.Dataset({"images": (dims, data)}, attrs=dict(attrs or {}))


def validate_stack(stack: xr.Dataset | xr.DataArray, name: str = "stack") -> xr.Dataset:
    """Check a stack's structure (not its values, which may be lazy) and return it.

    ``images`` must exist with dims ``(image, y, x)`` or ``(volume, z, y, x)``, real
    numbers, and at least one pixel. A bare DataArray is taken as ``images``.

    Parameters
    ----------
    stack : Dataset or DataArray
        The stack, or its ``images``.
    name : str
        How the stack is named in error messages.

    Returns
    -------
    Dataset
        ``stack`` unchanged (a DataArray wrapped as the Dataset's ``images``).

    Raises
    ------
    TypeError
        Not an xarray object, or ``images`` not real numbers.
    ValueError
        No ``images``, wrong dims, or an empty axis.
    """
    if isinstance(stack, xr.DataArray):
        stack = stack.to_dataset(name="images")
    if not isinstance(stack, xr.Dataset):
        raise TypeError(
            f"{name} must be an xarray Dataset or DataArray, got {type(stack).__name__}"
        )
    if "images" not in stack.data_vars:
        raise ValueError(f"{name} has no 'images' variable (variables: {list(stack.data_vars)})")
    images = stack["images"]
    if images.dims not in (STACK_DIMS, VOLUME_DIMS):
        raise ValueError(
            f"{name}.images must have dims {STACK_DIMS} or {VOLUME_DIMS}, got {images.dims}"
        )
    if np.dtype(images.dtype).kind not in "iuf":
        raise TypeError(f"{name}.images must be real numbers, got dtype {images.dtype}")
    if 0 in images.shape:
        raise ValueError(f"{name}.images is empty: sizes {dict(images.sizes)}")
    return stack


# --------------------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------------------


def _check_values(name: str, M: Any, d: int) -> np.ndarray:
    M = check_matrix(name, M, d)
    check_invertible(name, M)
    return M


def _resolve_matrix(
    ds: xr.Dataset, matrix: Any, from_dataset: bool
) -> tuple[np.ndarray | None, xr.DataArray | None]:
    """``(shared (d+1, d+1) array, None)`` or ``(None, per-item DataArray (batch, row,
    col))`` chunked like the images."""
    images = ds["images"]
    batch, d, n = images.dims[0], images.ndim - 1, images.shape[0]
    kind = f"{d}-D {'images' if d == 2 else 'volumes'} {images.dims}"
    if isinstance(matrix, str):
        if not from_dataset:
            raise ValueError(f"matrix {matrix!r} names a variable, but stack is a DataArray")
        if matrix not in ds.variables:
            raise ValueError(
                f"matrix variable {matrix!r} is not in the stack (variables: {list(ds.data_vars)})"
            )
        matrix = ds[matrix]
    if isinstance(matrix, da.Array):  # lazy matrices: wrapped, checked when computed
        if matrix.ndim not in (2, 3):
            raise ValueError(
                f"matrix must be ({d + 1}, {d + 1}) or ({n}, {d + 1}, {d + 1}) for {kind}, "
                f"got shape {matrix.shape}"
            )
        matrix = xr.DataArray(matrix, dims=(batch, ROW, COL)[-matrix.ndim :])
    name = (
        f"matrix {matrix.name!r}" if isinstance(matrix, xr.DataArray) and matrix.name else "matrix"
    )
    if isinstance(matrix, xr.DataArray):
        if matrix.dims not in ((ROW, COL), (batch, ROW, COL)):
            raise ValueError(
                f"{name} must have dims ('{ROW}', '{COL}') or ('{batch}', '{ROW}', '{COL}'), "
                f"got {matrix.dims}"
            )
        data = matrix
    else:
        try:
            data = to_numpy(matrix)
        except (TypeError, ValueError) as exc:  # ragged lists and other objects
            raise TypeError(
                f"matrix must be an array of numbers, got {type(matrix).__name__}"
            ) from exc
        if data.ndim not in (2, 3):
            raise ValueError(
                f"matrix must be ({d + 1}, {d + 1}) or ({n}, {d + 1}, {d + 1}) for {kind}, "
                f"got shape {data.shape}"
            )
    shape = tuple(data.shape)
    if shape[-2:] != (d + 1, d + 1):
        raise ValueError(
            f"{name} must be homogeneous {d + 1}×{d + 1} for {kind}, got shape {shape}"
        )
    if len(shape) == 3 and shape[0] != n:
        raise ValueError(
            f"{name} has {shape[0]} per-{batch} matrices but the stack has {n} {batch}s"
        )
    lazy = isinstance(data, xr.DataArray) and data.chunks is not None
    if len(shape) == 2:
        if lazy:  # checked by the kernel, when computed
            return None, data
        return _check_values(name, host(data), d), None
    if not lazy:
        values = _check_values(name, host(data), d)
        data = xr.DataArray(values, dims=(batch, ROW, COL))
        if isinstance(matrix, xr.DataArray):
            data = data.assign_coords(
                {k: v for k, v in matrix.coords.items() if set(v.dims) <= {batch}}
            )
    if images.chunks is not None:
        data = data.chunk({batch: images.chunks[0], ROW: -1, COL: -1})
    return None, data.rename("matrix")


# --------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------


def _warp_chunk(images, matrix, *, order, mode, cval, method):
    return warp_images(images, matrix, order=order, mode=mode, cval=cval, method=method)


def warp_stack(
    stack: xr.Dataset | xr.DataArray,
    matrix: Any,
    *,
    order: int = 1,
    mode: str = "constant",
    cval: float = 0.0,
    device: str = "auto",
) -> xr.DataArray:
    """Warp every image (volume) of a stack by its forward motion, lazily.

    ``out(p) = in(M^{-1} p)`` for each image:
    ``scipy.ndimage.affine_transform(img, *pull_matrix(M), order=order, mode=mode,
    cval=cval)`` to 1 ulp, bit for bit with one matrix per image
    (:func:`scalign.kernels.warp.warp_images`, which picks its fastest path: a cached
    sparse operator for a shared matrix and ``order <= 1``, else scipy's loop).

    Parameters
    ----------
    stack : Dataset with ``images`` (or that DataArray)
        ``(image, y, x)`` or ``(volume, z, y, x)``, chunked along the first dim.
    matrix : array, DataArray, or the name of a variable of ``stack``
        Homogeneous forward motion(s) in pixel ``(x, y[, z])``: one ``3×3`` (2-D) / ``4×4``
        (3-D) for every image, or one per image, ``(n, 3, 3)`` / ``(n, 4, 4)`` or a
        DataArray over ``(image, row, col)`` (``(volume, row, col)``), chunked like the
        stack (re-chunked if not). Finite and invertible: checked here unless the matrices
        are lazy (then a bad one fails the computation with a ValueError).
    order : int 0..5
        Spline order (1: linear).
    mode : str
        scipy.ndimage's boundary mode (``constant``, ``grid-constant``, ``nearest``,
        ``reflect``, ``grid-mirror``, ``mirror``, ``wrap``, ``grid-wrap``).
    cval : float
        Fill value for the constant modes.
    device : {"auto", "cpu", "gpu"}
        Where the chunks are computed (:func:`scalign.execution.to_device`): ``"gpu"``
        moves them to the GPU (CuPy) once (host chunks merged to ~256 MiB,
        :func:`scalign.execution.gpu_batches`), ``"cpu"`` brings CuPy chunks back first,
        ``"auto"`` computes each chunk where it already is. CuPy chunks are warped
        by ``cupyx.scipy.ndimage.affine_transform`` and stay on the GPU.

    Returns
    -------
    DataArray ``images`` with the stack's dims, coordinates, attributes and chunks (host
    chunks moved to the GPU are merged first: :func:`scalign.execution.gpu_batches`); the
    input's float dtype (integer images: the smallest float that holds them exactly).
    Nothing is computed until the result is.
    """
    from_dataset = isinstance(stack, xr.Dataset)
    ds = validate_stack(stack)
    order, mode, cval = check_order(order), check_mode(mode), check_cval(cval)
    check_option("device", device, DEVICES)
    ds = gpu_batches(ds, device)
    images = to_device(ds["images"], device)
    spatial = images.dims[1:]
    shared, per_item = _resolve_matrix(ds, matrix, from_dataset)
    if per_item is not None:
        # the output has the stack's coordinates; the matrices' other labels (lazy ones
        # too, e.g. a chunked time coordinate) would be compared with the stack's by
        # computing them when xarray merges the outputs' coordinates
        per_item = per_item.reset_coords(drop=True)
    dtype = output_dtype(images.dtype)
    if per_item is not None and per_item.ndim == 3:
        method = "scipy"
        mat = per_item
    else:
        # the total number of images decides: the operator is cached across chunks
        method = choose_method(
            images.shape[1:],
            images.shape[0],
            shared=True,
            order=order,
            mode=mode,
            dtype=dtype,
        )
        mat = per_item if per_item is not None else xr.DataArray(shared, dims=(ROW, COL))
    out = map_batch(
        _warp_chunk,
        [images, mat],
        [list(spatial), [ROW, COL]],
        {"images": (spatial, dtype)},
        kwargs={"order": order, "mode": mode, "cval": cval, "method": method},
    )["images"]
    out.attrs = dict(images.attrs)
    return out.rename("images")


# --------------------------------------------------------------------------------------
# the seed's function, on plain arrays
# --------------------------------------------------------------------------------------


def warp_volume_xy_batched(
    stack: Any,
    affine_matrix: Any,
    is_pixel_space: bool = True,
    batch_size: int | None = None,
    *,
    order: int = 1,
    mode: str = "constant",
    cval: float = 0.0,
) -> np.ndarray:
    """Warp every ``(y, x)`` slice of ``stack`` ``(N, H, W)`` by the same 2-D motion.

    Parameters
    ----------
    stack : (N, H, W) array-like
        Slices (a volume's z-slices, or a stack of images); finite real numbers.
    affine_matrix : (3, 3)
        Homogeneous forward motion in pixel ``(x, y)`` (:mod:`scalign.kernels.affine`), or,
        with ``is_pixel_space=False``, in normalized ``[-1, 1]`` coordinates with
        ``align_corners=False`` (pixel centres at ``u = (2i + 1)/W - 1``), converted
        exactly. Finite and invertible.
    batch_size : int, optional
        Slices warped per call (bounds the temporary memory); default all at once. The
        result does not depend on it.
    order, mode, cval :
        As :func:`warp_stack` (scipy.ndimage's sampling and boundary rules).

    Returns
    -------
    (N, H, W) NumPy array, the input's float dtype (integers: the smallest float that
    holds them); equal to ``warp_stack(make_stack(stack), M)``.
    """
    try:
        arr = np.asarray(stack)
    except Exception as exc:
        raise TypeError(f"stack must be an array, got {type(stack).__name__}") from exc
    if arr.ndim != 3:
        raise ValueError(f"stack must have shape (N, H, W), got shape {arr.shape}")
    _check_pixels("stack", arr)
    check_finite("stack", arr)
    if not isinstance(is_pixel_space, bool | np.bool_):
        raise TypeError(f"is_pixel_space must be a bool, got {is_pixel_space!r}")
    M = check_matrix("affine_matrix", affine_matrix, 2)
    if M.ndim != 2:
        raise ValueError(f"affine_matrix must be one 3×3 matrix, got shape {M.shape}")
    if not is_pixel_space:
        M = normalized_to_pixel(M, arr.shape[1:], align_corners=False)
    check_invertible("affine_matrix", M)
    n = arr.shape[0]
    if batch_size is None:
        batch_size = n
    check_count("batch_size", batch_size)
    order, mode, cval = check_order(order), check_mode(mode), check_cval(cval)
    dtype = output_dtype(arr.dtype)
    # decided for the whole stack: the operator built for the first batch serves the rest
    method = choose_method(arr.shape[1:], n, shared=True, order=order, mode=mode, dtype=dtype)
    out = np.empty(arr.shape, dtype=dtype)
    for i in range(0, n, int(batch_size)):
        warp_images(
            arr[i : i + batch_size],
            M,
            order=order,
            mode=mode,
            cval=cval,
            method=method,
            out=out[i : i + batch_size],
        )
    return out
