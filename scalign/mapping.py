"""The one bridge between batched kernels and chunked xarray data.

Every op maps its kernel through :func:`map_batch`: chunks stay along the batch
dimension, core dimensions are whole in every chunk, results stay lazy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import xarray as xr


def _whole_core_dims(arr: xr.DataArray, core: Sequence[str]) -> xr.DataArray:
    if arr.chunks is None:
        return arr
    split = [dim for dim in core if len(arr.chunksizes.get(dim, (0,))) > 1]
    return arr.chunk(dict.fromkeys(split, -1)) if split else arr


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
    dict of DataArray, keyed like ``outputs``; dask-backed when any input is.

    Notes
    -----
    The kernel is never called to guess output types: dask derives each output's
    ``meta`` from ``outputs``' dtypes and the first input's chunk type, so graphs of
    CuPy chunks get CuPy metas.
    """
    inputs = [_whole_core_dims(a, c) for a, c in zip(inputs, core_dims, strict=True)]
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
        keep_attrs=True,
    )
    if len(outputs) == 1:
        result = (result,)
    return dict(zip(outputs, result, strict=True))
