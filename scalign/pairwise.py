"""Pairwise RMSD matrices of ensembles, computed blockwise on Dask."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from scalign._array import host
from scalign.ensemble import POINT, SPACE, STRUCTURE, ensemble_variable, validate_ensemble
from scalign.execution import DEVICES, to_device
from scalign.kernels.pairwise import centre, rmsd_block
from scalign.mapping import map_pairs
from scalign.validation import as_weights, check_chunks, check_option

OTHER = f"{STRUCTURE}_other"

# Structures per block: a block of c x c pairs holds 9 c^2 float64 cross-covariances
# (75 MB at 1024), and smaller blocks keep both cores busy on moderate ensembles.
_MIN_CHUNK, _MAX_CHUNK = 64, 1024


def _default_chunk(n_structures: int) -> int:
    return max(_MIN_CHUNK, min(_MAX_CHUNK, math.ceil(n_structures / 4)))


def _point_weights(ds: xr.Dataset, weights) -> np.ndarray | None:
    if weights is None:
        return None
    weights = ensemble_variable(ds, weights)
    if isinstance(weights, xr.DataArray) and weights.dims != (POINT,):
        raise ValueError(
            f"pairwise RMSD needs one weight per point, dims ('point',); got {weights.dims}"
        )
    w = as_weights("weights", host(weights), ds.sizes[POINT])
    if w.ndim != 1:
        raise ValueError(f"pairwise RMSD needs one weight per point, shape (point,); got {w.shape}")
    return w


def pairwise_rmsd(
    ensemble: xr.Dataset | xr.DataArray,
    other: xr.Dataset | xr.DataArray | None = None,
    *,
    weights: str | np.ndarray | xr.DataArray | None = None,
    chunks: int | None = None,
    device: str = "auto",
) -> xr.DataArray:
    """RMSD after optimal superposition between every pair of structures, lazily.

    :math:`D_{ij} = \\min_{R, t} \\sqrt{\\sum_k p_k \\lVert R x_{ik} + t - y_{jk}\\rVert^2}`
    over proper rotations (no scaling), for ``x_i`` in ``ensemble`` and ``y_j`` in
    ``other``. The matrix is computed block by block (``chunks`` x ``chunks`` structures
    per task; :mod:`scalign.kernels.pairwise`: each chunk centred once, one GEMM for a
    block's cross-covariances, then a vectorised QCP solve). Without ``other`` it is
    symmetric with a zero diagonal, and only the blocks on and below the diagonal are
    computed. For large ensembles write
    it to zarr (``save_zarr(D.to_dataset(), path)`` or ``scalign rmsd``) rather than
    computing it into memory.

    Parameters
    ----------
    ensemble : Dataset with ``coords (structure, point, space)`` (or that DataArray)
    other : Dataset or DataArray, optional
        A second ensemble with the same points and dimensions.
    weights : str or (point,) array, optional
        Per-point weights (or the name of a ``(point,)`` variable, e.g. masses).
    chunks : int, optional
        Structures per block (default: a quarter of the ensemble, between 64 and 1024).
    device : {"auto", "cpu", "gpu"}
        Where the chunks are computed (:func:`scalign.execution.to_device`): ``"gpu"``
        moves them to the GPU (CuPy) once, ``"cpu"`` brings CuPy chunks back first,
        ``"auto"`` computes each chunk where it already is. The matrix stays where
        it was computed.

    Returns
    -------
    DataArray ``rmsd (structure, structure_other)``, float64, dask-backed. A structure
    with a NaN/inf coordinate gets NaN in its row (column) only.
    """
    check_chunks(chunks)
    check_option("device", device, DEVICES)
    ds = validate_ensemble(ensemble)
    ds_other = None if other is None else validate_ensemble(other, name="other")
    if ds_other is not None:
        for dim in (POINT, SPACE):
            if ds_other.sizes[dim] != ds.sizes[dim]:
                raise ValueError(
                    f"other has {ds_other.sizes[dim]} {dim}s but the ensemble has "
                    f"{ds.sizes[dim]}: pairwise RMSD needs paired points"
                )
    w = _point_weights(ds, weights)
    size = chunks or _default_chunk(max(ds.sizes[STRUCTURE], 1))
    a = to_device(ds["coords"].chunk({STRUCTURE: size}), device)
    b = None if ds_other is None else to_device(ds_other["coords"].chunk({STRUCTURE: size}), device)
    D = map_pairs(
        rmsd_block,
        a,
        b,
        (POINT, SPACE),
        (STRUCTURE, OTHER),
        prepare=centre,
        kwargs={"weights": w},
    )
    D.name = "rmsd"
    D.attrs = {
        "long_name": "RMSD after optimal superposition",
        "scalign_weights": "none"
        if weights is None
        else (weights if isinstance(weights, str) else "array"),
    }
    return D
