"""Ensemble alignment: every structure onto a reference, lazily, chunk by chunk."""

from __future__ import annotations

import logging
import numbers
from typing import Any

import numpy as np
import xarray as xr

from scalign._array import namespace
from scalign.ensemble import POINT, SPACE, STRUCTURE, validate_ensemble
from scalign.kernels.kabsch import apply_transform, rmsd, superpose
from scalign.mapping import map_batch
from scalign.validation import as_points, as_weights, check_option

log = logging.getLogger(__name__)

REFERENCE_OPTIONS = ("first", "mean")


def _align_chunk(X, Y, *weights, scale: bool, reflection: bool, aligned: bool):
    w = weights[0] if weights else None
    if w is not None:
        xp = namespace(w)
        # Lazily given per-structure weights cannot be checked up front: an invalid row
        # (negative or non-finite) makes that structure's results NaN, like a NaN coordinate.
        bad = xp.any((w < 0) | ~xp.isfinite(w), axis=-1, keepdims=True)
        w = xp.where(bad, xp.nan, w)
    fit = superpose(X, Y, w, scale=scale, reflection=reflection)
    if not aligned:
        return tuple(fit)
    return (apply_transform(X, fit.rotation, fit.translation, fit.scale), *fit)


def _outputs(dtype, aligned: bool) -> dict[str, tuple[tuple[str, ...], Any]]:
    coordinates = {"aligned": ((POINT, SPACE), dtype)} if aligned else {}
    return coordinates | {
        "rotation": (("row", "col"), np.float64),
        "translation": ((SPACE,), np.float64),
        "scale": ((), np.float64),
        "rmsd": ((), np.float64),
        "r2": ((), np.float64),
    }


def _fit_to(coords: xr.DataArray, reference: np.ndarray, weights, scale, reflection, aligned=True):
    ref = xr.DataArray(reference, dims=(POINT, SPACE))
    inputs, core = [coords, ref], [[POINT, SPACE], [POINT, SPACE]]
    if weights is not None:
        inputs.append(weights)
        core.append([POINT])
    d = coords.sizes[SPACE]
    return map_batch(
        _align_chunk,
        inputs,
        core,
        _outputs(coords.dtype, aligned),
        sizes={"row": d, "col": d},
        kwargs={"scale": scale, "reflection": reflection, "aligned": aligned},
    )


def _resolve_weights(ds: xr.Dataset, weights) -> xr.DataArray | None:
    n = ds.sizes[POINT]
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights not in ds.variables:
            raise ValueError(
                f"weights variable {weights!r} is not in the ensemble ({list(ds.data_vars)})"
            )
        weights = ds[weights]
    if isinstance(weights, xr.DataArray):
        if weights.dims not in ((POINT,), (STRUCTURE, POINT)):
            raise ValueError(
                f"weights must have dims ('point',) or ('structure', 'point'), got {weights.dims}"
            )
        if weights.sizes[POINT] != n:
            raise ValueError(f"weights has {weights.sizes[POINT]} points but coords has {n}")
        if weights.chunks is None:
            as_weights("weights", weights.values, n)
        return weights
    w = as_weights("weights", weights, n)
    if w.ndim == 1:
        return xr.DataArray(w, dims=(POINT,))
    if w.shape != (ds.sizes[STRUCTURE], n):
        raise ValueError(
            f"weights must have shape ({n},) or ({ds.sizes[STRUCTURE]}, {n}), got {w.shape}"
        )
    return xr.DataArray(w, dims=(STRUCTURE, POINT)).chunk(
        {STRUCTURE: ds.chunksizes.get(STRUCTURE, -1)}
    )


def _resolve_reference(coords: xr.DataArray, reference) -> np.ndarray:
    n_structures = coords.sizes[STRUCTURE]
    if isinstance(reference, bool):
        raise TypeError("reference must be an index, an array, 'first' or 'mean', not a bool")
    if isinstance(reference, str) and reference == "first":
        reference = 0
    if isinstance(reference, numbers.Integral):
        if not -n_structures <= reference < n_structures:
            raise ValueError(
                f"reference index {reference} is out of range for {n_structures} structures"
            )
        reference = coords.isel({STRUCTURE: int(reference)}).values
        name = "reference structure"
    else:
        name = "reference"
    ref = as_points(name, reference.values if isinstance(reference, xr.DataArray) else reference)
    n, d = coords.sizes[POINT], coords.sizes[SPACE]
    if ref.shape != (n, d):
        raise ValueError(f"{name} must have shape ({n}, {d}) like one structure, got {ref.shape}")
    return ref.astype(np.float64)


def _centred_size(Y: np.ndarray) -> float:
    return float(np.sqrt(np.sum((Y - Y.mean(axis=0)) ** 2)))


def _generalized_reference(coords, weights, scale, reflection, tol, max_iterations):
    """Generalized Procrustes: align to the current mean, average, repeat.

    Each iteration is one pass over the chunks (fit, transform and per-chunk sums fuse).
    The mean is re-centred, and with ``scale`` rescaled to the first structure's centred
    size, which fixes the gauge that GPA otherwise lets drift (the mean would shrink).
    Stops when the mean moves by less than ``tol`` (RMSD between successive means).
    """
    ref = _resolve_reference(coords, 0)
    size = _centred_size(ref)
    shift = np.inf
    # float64 coordinates (cast per chunk) so the mean is not limited by float32 rounding.
    coords = coords.astype(np.float64)
    for iteration in range(1, max_iterations + 1):
        aligned = _fit_to(coords, ref, weights, scale, reflection)["aligned"]
        mean = np.asarray(aligned.mean(STRUCTURE, skipna=True).values, dtype=np.float64)
        if not np.all(np.isfinite(mean)):
            raise ValueError("generalized Procrustes failed: every structure gave NaN")
        mean -= mean.mean(axis=0)
        if scale:
            mean *= size / _centred_size(mean)
        shift = float(rmsd(mean, ref))
        ref = mean
        log.info("generalized Procrustes iteration %d: mean moved %.3g", iteration, shift)
        if shift <= tol:
            return ref, {"gpa_iterations": iteration, "gpa_shift": shift, "gpa_converged": True}
    log.warning("generalized Procrustes did not converge in %d iterations", max_iterations)
    return ref, {"gpa_iterations": max_iterations, "gpa_shift": shift, "gpa_converged": False}


def align(
    ensemble: xr.Dataset | xr.DataArray,
    reference: int | str | np.ndarray | xr.DataArray = 0,
    *,
    weights: str | np.ndarray | xr.DataArray | None = None,
    scale: bool = False,
    reflection: bool = False,
    tol: float = 1e-6,
    max_iterations: int = 100,
    aligned: bool = True,
) -> xr.Dataset:
    """Superpose every structure of an ensemble onto a reference, lazily.

    Each structure ``X_i`` is fitted as ``Y ≈ s_i X_i R_i^T + t_i`` (Kabsch, or Umeyama
    with ``scale``); the work is mapped over the ``structure`` chunks and nothing is
    computed until the result is (``.compute()``, ``.to_zarr()``), except the small
    reference and, for ``reference="mean"``, one pass per generalized-Procrustes iteration.

    Parameters
    ----------
    ensemble : Dataset with ``coords (structure, point, space)`` (or that DataArray)
    reference : int, "first", "mean", or (point, space) array
        A structure index, an explicit reference, or ``"mean"`` for generalized
        Procrustes (iterate align → mean until the mean moves less than ``tol``).
    weights : str, array or DataArray, optional
        Per-point weights ``(point,)`` or ``(structure, point)``, or the name of an
        ensemble variable holding them (e.g. masses). Centroids are weighted too.
    scale : bool
        Fit an isotropic scale per structure (the structure is scaled, not the reference).
    reflection : bool
        Allow improper rotations (det -1).
    tol, max_iterations :
        Convergence of ``reference="mean"``.
    aligned : bool
        Include the aligned coordinates. ``False`` keeps only the fit (rotation,
        translation, scale, rmsd, r2): RMSDs of a large ensemble without writing or
        transforming its coordinates.

    Returns
    -------
    Dataset
        ``aligned (structure, point, space)`` in the input dtype; float64
        ``rotation (structure, row, col)``, ``translation (structure, space)``,
        ``scale``, ``rmsd`` and ``r2`` over ``structure``; ``reference (point, space)``.
        The input's coordinates and attributes are carried. A structure with a NaN/inf
        coordinate, or with invalid lazily-given weights, gets NaN results; the rest of
        its chunk is unaffected.
    """
    ds = validate_ensemble(ensemble)
    coords = ds["coords"]
    w = _resolve_weights(ds, weights)
    attrs = dict(ds.attrs)
    if isinstance(reference, str):
        check_option("reference", reference, REFERENCE_OPTIONS)
    if isinstance(reference, str) and reference == "mean":
        ref, report = _generalized_reference(coords, w, scale, reflection, tol, max_iterations)
        attrs.update(report)
    else:
        ref = _resolve_reference(coords, reference)
    out = xr.Dataset(_fit_to(coords, ref, w, scale, reflection, aligned), attrs=attrs)
    out["reference"] = ((POINT, SPACE), ref)
    out.attrs.update(
        scalign_reference=str(reference)
        if not isinstance(reference, np.ndarray | xr.DataArray)
        else "array",
        scalign_scale=bool(scale),
        scalign_reflection=bool(reflection),
        scalign_weights=weights
        if isinstance(weights, str)
        else ("none" if weights is None else "array"),
    )
    return out
