"""The one bridge between batched kernels and chunked xarray data.

Every op maps its kernel through :func:`map_batch` (one batch of items in, one result per
item out) or :func:`map_pairs` (every item of one batch against every item of another):
chunks stay along the batch dimension, core dimensions are whole in every chunk, results
stay lazy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.array.utils import meta_from_array

from scalign._array import is_gpu_backed, move


def _whole_core_dims(arr: xr.DataArray, core: Sequence[str]) -> xr.DataArray:
    if arr.chunks is None:
        return arr
    # a label opened from zarr (a frame time) has its own chunks, often one for all the
    # items: xarray refuses the array's chunk sizes until they agree with the data's
    arr = arr.unify_chunks()
    split = [dim for dim in core if len(arr.chunksizes.get(dim, (0,))) > 1]
    return arr.chunk(dict.fromkeys(split, -1)) if split else arr


def _on_gpu(arrays: Sequence[xr.DataArray]) -> bool:
    return any(is_gpu_backed(a.data) for a in arrays)


def _to_gpu(data: Any) -> da.Array:
    """``data`` as a dask array of CuPy chunks (an in-memory array as one shared chunk),
    so a kernel never gets NumPy and CuPy arrays together."""
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=-1, name=False)
    return move(data, "gpu")


def _gpu_options(options: dict[str, Any]) -> dict[str, Any]:
    import cupy

    return {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}


def map_batch(
    kernel: Callable[..., Any],
    inputs: Sequence[xr.DataArray],
    core_dims: Sequence[Sequence[str]],
    outputs: Mapping[str, tuple[Sequence[str], Any]],
    *,
    sizes: Mapping[str, int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, xr.DataArray]:
    """Map ``kernel`` over the chunks of the batch dimension(s), lazily.

    Parameters
    ----------
    kernel : callable
        ``kernel(*arrays, **kwargs)`` returning one array per output (a tuple when there
        are several); every array has the broadcast batch axes first and its core dims
        last, in the order given.
    inputs : DataArrays
        Inputs; dims not listed as core are batch dims (chunked or not).
    core_dims : one list of core dims per input
    outputs : {name: (core dims, dtype)}
        One entry per array the kernel returns, in order.
    sizes : {dim: size}, optional
        Sizes of output core dims that no input has (e.g. ``row``, ``col``).
    kwargs : dict, optional
        Keyword arguments for the kernel (flags, not arrays).

    Returns
    -------
    dict of DataArray, keyed like ``outputs``; dask-backed when any input is. They
    carry the inputs' coordinates (with their attributes) but no attributes of their own.

    Notes
    -----
    The kernel is never called to guess output types: dask derives each output's
    ``meta`` from ``outputs``' dtypes and the first input's chunk type, so graphs of
    CuPy chunks get CuPy metas. When any input has CuPy chunks, every other input is
    moved to the GPU too (in-memory ones once, as one shared chunk).
    """
    inputs = [_whole_core_dims(a, c) for a, c in zip(inputs, core_dims, strict=True)]
    _check_labels(inputs)
    if _on_gpu(inputs):
        inputs = [a.copy(data=_to_gpu(a.data)) for a in inputs]
    out_core = [list(dims) for dims, _ in outputs.values()]
    dtypes = [dtype for _, dtype in outputs.values()]
    result = xr.apply_ufunc(
        kernel,
        *inputs,
        input_core_dims=[list(c) for c in core_dims],
        output_core_dims=out_core,
        dask="parallelized",
        output_dtypes=dtypes,
        dask_gufunc_kwargs={"output_sizes": dict(sizes or {})},
        kwargs=dict(kwargs or {}),
        # the first input's attrs (say ``units``) do not describe every output (a
        # rotation, an r2, a correlation): each op sets those its outputs should carry
        keep_attrs=False,
    )
    if len(outputs) == 1:
        result = (result,)
    # keep_attrs=False drops the coordinates' attrs too (a time axis's units), though the
    # outputs' labels are the inputs' own
    labels: dict[Any, dict] = {}
    for arr in inputs:
        for name, coord in arr.coords.items():
            labels.setdefault(name, coord.attrs)
    result = [
        out.assign_coords({k: out[k].assign_attrs(labels[k]) for k in out.coords if labels.get(k)})
        for out in result
    ]
    return dict(zip(outputs, result, strict=True))


def _check_labels(inputs: Sequence[xr.DataArray]) -> None:
    """``ValueError`` naming the two inputs whose labels along a shared dim differ
    (weights or matrices labelled for other items): xarray's own error names neither."""
    seen: dict[str, tuple[Any, Any]] = {}
    for arr in inputs:
        for dim, index in arr.indexes.items():
            if dim not in seen:
                seen[dim] = (arr.name, index)
            elif not seen[dim][1].equals(index):
                first, labels = seen[dim]
                raise ValueError(
                    f"{arr.name or 'an input'} and {first or 'another input'} have different "
                    f"{dim} labels ({_preview(index)} vs {_preview(labels)}): give them "
                    "for the same items, in the same order (or as plain arrays)"
                )


def _preview(index: Any) -> str:
    values = list(index[:3])
    return f"[{', '.join(map(str, values))}{', ...' if len(index) > 3 else ''}]"


def _chunked(arr: xr.DataArray, core: Sequence[str]) -> da.Array:
    arr = _whole_core_dims(arr, core)
    return arr.data if arr.chunks is not None else da.from_array(arr.data, chunks=-1)


def map_pairs(
    kernel: Callable[..., Any],
    a: xr.DataArray,
    b: xr.DataArray | None,
    core_dims: Sequence[str],
    dims: tuple[str, str],
    *,
    prepare: Callable[..., Any] | None = None,
    dtype: Any = np.float64,
    kwargs: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Map ``kernel(A, B)`` over every pair of chunks of two batches, lazily.

    Parameters
    ----------
    kernel : callable
        ``kernel(A_chunk, B_chunk_or_None) -> (len(A_chunk), len(B_chunk))``;
        ``B_chunk`` is ``None`` for a diagonal block of the symmetric case (``A`` against
        itself), so the kernel can use the symmetry.
    prepare : callable, optional
        ``prepare(chunk, **kwargs)``, run once per chunk (one task each); the kernel gets
        its result instead of the chunk. Work that depends on one structure only (e.g.
        centring) is then done once, not once per block the chunk enters.
    a, b : DataArrays with the batch dim first and ``core_dims`` after it
        With ``b is None`` the result is ``a`` against itself and symmetric: only the
        blocks on and below the diagonal are computed; each block above it is the
        transpose of its mirror (the same task, computed once).
    core_dims : dims whole in every chunk (e.g. ``point, space``)
    dims : names of the two output dims
    dtype : dtype of the result
    kwargs : dict, optional
        Keyword arguments for ``prepare`` (or, without it, for the kernel). With CuPy
        chunks in ``a`` or ``b``, NumPy arrays among them go to the GPU (once).

    Returns
    -------
    DataArray over ``dims``, one dask task per block (chunk of ``a`` x chunk of ``b``),
    with the batch coordinates of ``a`` and ``b`` and their attributes (the index as
    ``dims``; another label
    ``name`` of ``a``'s items as ``name``, of ``b``'s as ``name`` + the suffix that makes
    ``dims[1]`` of ``dims[0]``, e.g. ``time_other``).
    """
    A = _chunked(a, core_dims)
    B = A if b is None else _chunked(b, core_dims)
    options = dict(kwargs or {})
    if is_gpu_backed(A) or is_gpu_backed(B):
        A = _to_gpu(A)
        B = A if b is None else _to_gpu(B)
        options = _gpu_options(options)
    meta = meta_from_array(A, ndim=2, dtype=dtype)
    call = dask.delayed(kernel, pure=True)

    def prepared(arr: da.Array) -> list:
        chunks = list(arr.to_delayed().reshape(-1))
        if prepare is None:
            return chunks
        step = dask.delayed(prepare, pure=True)
        return [step(chunk, **options) for chunk in chunks]

    blocks_a = prepared(A)
    blocks_b = blocks_a if b is None else prepared(B)
    kernel_options = options if prepare is None else {}
    rows, cols = A.chunks[0], B.chunks[0]
    computed: dict[tuple[int, int], da.Array] = {}

    def block(i: int, j: int) -> da.Array:
        if b is None and j > i:
            return block(j, i).T
        if (i, j) not in computed:
            other = None if b is None and i == j else blocks_b[j]
            value = call(blocks_a[i], other, **kernel_options)
            computed[i, j] = da.from_delayed(value, (rows[i], cols[j]), dtype=dtype, meta=meta)
        return computed[i, j]

    data = da.block([[block(i, j) for j in range(len(cols))] for i in range(len(rows))])
    coords = {}
    for axis, (dim, src) in enumerate(zip(dims, (a, a if b is None else b), strict=True)):
        batch = src.dims[0]
        for name, coord in src.coords.items():
            if coord.dims != (batch,):
                continue
            if name == batch:
                coords[dim] = (dim, coord.values, coord.attrs)
            else:
                # other labels of the items (a frame time, say), lazy ones kept lazy; the
                # second axis's get the suffix of its dim
                label = name if axis == 0 else f"{name}{dim[len(dims[0]) :]}"
                coords[label] = (dim, coord.data, coord.attrs)
    return xr.DataArray(data, dims=dims, coords=coords)
