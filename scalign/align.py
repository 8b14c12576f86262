"""Ensemble alignment: every structure onto a reference, lazily, chunk by chunk."""

from __future__ import annotations

import logging
import numbers
from typing import Any

import numpy as np
import xarray as xr

from scalign._array import host, namespace
from scalign.ensemble import POINT, SPACE, STRUCTURE, ensemble_variable, validate_ensemble
from scalign.execution import DEVICES, gpu_batches, to_device
from scalign.kernels.coarsen import block_means
from scalign.kernels.kabsch import apply_transform, rmsd, superpose
from scalign.kernels.robust import TUNING, irls_superpose
from scalign.mapping import map_batch
from scalign.validation import (
    as_points,
    as_weights,
    check_enough_points,
    check_factor,
    check_iterations,
    check_option,
    check_spread,
)

log = logging.getLogger(__name__)

REFERENCE_OPTIONS = ("first", "mean")
#: The dim of a coarsened reference's points (``align(..., coarsen=f)``).
BEAD = "bead"
ROBUST_LOSSES = tuple(TUNING)


def _align_chunk(
    X, Y, *weights, scale: bool, reflection: bool, aligned: bool, robust, factor: int | None
):
    w = weights[0] if weights else None
    if w is not None:
        xp = namespace(w)
        # Lazily given per-structure weights cannot be checked up front: an invalid row
        # (negative or non-finite) makes that structure's results NaN, like a NaN coordinate.
        bad = xp.any((w < 0) | ~xp.isfinite(w), axis=-1, keepdims=True)
        w = xp.where(bad, xp.nan, w)
    moving = X
    if factor is not None:
        # Fit the beads, each weighted by its block weight; move the full structure.
        moving, w = block_means(X, factor, w)
    if robust is None:
        fit, extra = superpose(moving, Y, w, scale=scale, reflection=reflection), ()
    else:
        result = irls_superpose(moving, Y, w, loss=robust, scale=scale, reflection=reflection)
        fit, extra = result.fit, (result.weights, result.iterations)
    if not aligned:
        return (*fit, *extra)
    return (apply_transform(X, fit.rotation, fit.translation, fit.scale), *fit, *extra)


def _outputs(dtype, aligned: bool, robust, fitted: str) -> dict[str, tuple[tuple[str, ...], Any]]:
    coordinates = {"aligned": ((POINT, SPACE), dtype)} if aligned else {}
    fit = {
        "rotation": (("row", "col"), np.float64),
        "translation": ((SPACE,), np.float64),
        "scale": ((), np.float64),
        "rmsd": ((), np.float64),
        "r2": ((), np.float64),
    }
    if robust is None:
        return coordinates | fit
    return (
        coordinates
        | fit
        | {"robust_weights": ((fitted,), np.float64), "robust_iterations": ((), np.int64)}
    )


def _fit_to(
    coords: xr.DataArray,
    reference: np.ndarray,
    weights,
    scale,
    reflection,
    aligned=True,
    robust=None,
    factor=None,
):
    fitted = POINT if factor is None else BEAD
    ref = xr.DataArray(reference, dims=(fitted, SPACE))
    inputs, core = [coords, ref], [[POINT, SPACE], [fitted, SPACE]]
    if weights is not None:
        inputs.append(weights)
        core.append([POINT])
    d = coords.sizes[SPACE]
    return map_batch(
        _align_chunk,
        inputs,
        core,
        _outputs(coords.dtype, aligned, robust, fitted),
        sizes={"row": d, "col": d},
        kwargs={
            "scale": scale,
            "reflection": reflection,
            "aligned": aligned,
            "robust": robust,
            "factor": factor,
        },
    )


def _resolve_weights(ds: xr.Dataset, weights) -> xr.DataArray | None:
    n = ds.sizes[POINT]
    if weights is None:
        return None
    weights = ensemble_variable(ds, weights)
    if isinstance(weights, xr.DataArray):
        if weights.dims not in ((POINT,), (STRUCTURE, POINT)):
            raise ValueError(
                f"weights must have dims ('point',) or ('structure', 'point'), got {weights.dims}"
            )
        if weights.sizes[POINT] != n:
            raise ValueError(f"weights has {weights.sizes[POINT]} points but coords has {n}")
        # one weight per point is small enough to check now, even when lazy (a variable of
        # a zarr store): invalid ones would make every structure NaN
        if weights.chunks is None or weights.dims == (POINT,):
            as_weights("weights", host(weights), n)
        return weights.rename("weights")
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


def _resolve_reference(coords: xr.DataArray, reference, expected: str = "") -> np.ndarray:
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
        reference = host(coords.isel({STRUCTURE: int(reference)}))
        name = "reference structure"
    else:
        name = "reference"
    ref = as_points(name, host(reference) if isinstance(reference, xr.DataArray) else reference)
    n, d = coords.sizes[POINT], coords.sizes[SPACE]
    if ref.shape != (n, d):
        raise ValueError(
            f"{name} must have shape {expected} ({n}, {d}) like one structure, got {ref.shape}"
            if expected
            else f"{name} must have shape ({n}, {d}) like one structure, got {ref.shape}"
        )
    check_spread(name, ref)  # a target whose points coincide defines no rotation
    return ref.astype(np.float64)


def _coarse_reference(coords: xr.DataArray, reference, factor: int, weights) -> np.ndarray:
    """The bead-level reference of ``align(..., coarsen=factor)``.

    An array with ``ceil(n / factor)`` points is used as given (a low-resolution
    structure); a structure index or a full-resolution array is coarsened like the
    structures are (block means, with the point weights).
    """
    n, d = coords.sizes[POINT], coords.sizes[SPACE]
    blocks = -(-n // factor)
    if isinstance(reference, np.ndarray | xr.DataArray | list | tuple):
        given = as_points("reference", host(reference))
        if given.shape == (blocks, d):
            check_spread("reference", given)
            return given.astype(np.float64)
    ref = _resolve_reference(coords, reference, expected=f"({blocks}, {d}) beads or")
    if weights is not None and STRUCTURE in weights.dims:
        index = int(reference) if isinstance(reference, numbers.Integral) else 0
        weights = weights.isel({STRUCTURE: index})
    w = None if weights is None else np.asarray(host(weights), dtype=np.float64)
    return block_means(ref, factor, w)[0]


def _centred_size(Y: np.ndarray) -> float:
    return float(np.sqrt(np.sum((Y - Y.mean(axis=0)) ** 2)))


def _mean_structure(fit: dict[str, xr.DataArray]) -> np.ndarray:
    """Mean of the aligned structures; with robust weights, each point's weighted mean."""
    aligned = fit["aligned"]
    if "robust_weights" not in fit:
        return np.asarray(host(aligned.mean(STRUCTURE, skipna=True)), dtype=np.float64)
    w = fit["robust_weights"]
    # NaN-skipping sums, not fillna(0.0): on CuPy chunks xarray's fillna/where puts a NumPy
    # 0-d chunk into the graph, which CuPy refuses (pydata/xarray#7721)
    sums = xr.Dataset(
        {
            "weighted": (aligned * w).sum(STRUCTURE, skipna=True),
            "total": w.sum(STRUCTURE, skipna=True),
            "plain": aligned.mean(STRUCTURE, skipna=True),
        }
    ).compute()
    total = host(sums["total"])[:, None]
    # A point that every structure rejects (an outlier of the starting reference itself)
    # has no weighted mean: it takes the plain mean, and later iterations reweight it.
    mean = np.where(
        total > 0, host(sums["weighted"]) / np.where(total > 0, total, 1.0), host(sums["plain"])
    )
    return np.asarray(mean, dtype=np.float64)


def _gpa_iterations(coords, ref, weights, scale, reflection, tol, max_iterations, robust):
    """Iterate align -> mean from ``ref``; return the last mean and every shift."""
    size = _centred_size(ref)
    shifts: list[float] = []
    for iteration in range(1, max_iterations + 1):
        mean = _mean_structure(_fit_to(coords, ref, weights, scale, reflection, robust=robust))
        if not np.all(np.isfinite(mean)):
            raise ValueError("generalized Procrustes failed: every structure gave NaN")
        mean -= mean.mean(axis=0)
        if scale:
            mean *= size / _centred_size(mean)
        shifts.append(float(rmsd(mean, ref)))
        ref = mean
        log.info("generalized Procrustes iteration %d: mean moved %.3g", iteration, shifts[-1])
        if shifts[-1] <= tol:
            break
    return ref, shifts


def _generalized_reference(coords, weights, scale, reflection, tol, max_iterations, robust):
    """Generalized Procrustes: align to the current mean, average, repeat.

    Starts from the first structure. Each iteration is one pass over the chunks (fit,
    transform and per-chunk sums fuse). The mean is re-centred, and with ``scale``
    rescaled to the first structure's centred size, which fixes the gauge that GPA
    otherwise lets drift (the mean would shrink). With ``robust``, each point of the mean
    is weighted by the structures' robust weights, so outlying points do not drag it; the
    redescending losses (Tukey, Welsch) start from the Huber mean, as they keep the
    outliers of a poor start (the first structure's own) instead of rejecting them; that
    start shares the ``max_iterations`` passes (up to all but one). Stops when the mean
    moves by less than ``tol`` (RMSD between successive means); the report holds every
    iteration's shift.
    """
    ref = _resolve_reference(coords, 0)
    # float64 coordinates (cast per chunk) so the mean is not limited by float32 rounding.
    coords = coords.astype(np.float64)
    args = (weights, scale, reflection, tol)
    shifts: list[float] = []
    if robust in ("tukey", "welsch") and max_iterations > 1:
        ref, shifts = _gpa_iterations(coords, ref, *args, max_iterations - 1, robust="huber")
    ref, more = _gpa_iterations(coords, ref, *args, max_iterations - len(shifts), robust=robust)
    shifts += more
    if not shifts[-1] <= tol:
        log.warning("generalized Procrustes did not converge in %d iterations", len(shifts))
    return ref, {
        "gpa_iterations": len(shifts),
        "gpa_shift": shifts[-1],
        "gpa_shifts": shifts,
        "gpa_converged": shifts[-1] <= tol,
    }


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
    robust: str | None = None,
    coarsen: int | None = None,
    device: str = "auto",
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
        Convergence of ``reference="mean"``: passes until the mean moves by less than
        ``tol``, at most ``max_iterations`` (``gpa_iterations`` counts them). With
        ``robust="tukey"`` or ``"welsch"`` the Huber start they need is part of that
        budget: it takes up to all passes but one, and the loss itself the rest.
    aligned : bool
        Include the aligned coordinates. ``False`` keeps only the fit (rotation,
        translation, scale, rmsd, r2): RMSDs of a large ensemble without writing or
        transforming its coordinates.
    robust : {"huber", "tukey", "welsch"}, optional
        Fit each structure by IRLS with this loss (:mod:`scalign.kernels.robust`): points
        far off the reference are down-weighted. Adds ``robust_weights (structure, point)``
        (prior weights times robust weights) and ``robust_iterations``; ``rmsd`` and ``r2``
        are then weighted by the final weights. With ``reference="mean"`` the mean is
        robust too (each point weighted by the structures' robust weights).
    coarsen : int, optional
        Cross-resolution alignment onto a low-resolution reference: each structure is
        coarsened to ``ceil(n / coarsen)`` beads (block means of consecutive points, a
        shorter last block; :func:`scalign.coarsen`), the fit is made between the beads
        and the reference (each bead weighted by its block weight) and applied to the
        full-resolution structure. ``reference`` is then a ``(beads, space)`` array, or a
        structure index or full-resolution array that is coarsened the same way; the
        output's ``reference`` (and ``robust_weights``) are over ``bead``.
    device : {"auto", "cpu", "gpu"}
        Where the chunks are computed: ``"gpu"`` moves them to the GPU (CuPy) once (host
        chunks merged to ~256 MiB, :func:`scalign.execution.gpu_batches`), and the
        results stay there (chain further GPU ops, or bring them back with
        :func:`scalign.execution.to_device` or by writing them with :func:`save_zarr`);
        ``"cpu"`` brings CuPy chunks back first; ``"auto"`` computes each chunk where it
        already is.

    Returns
    -------
    Dataset
        ``aligned (structure, point, space)`` in the input dtype; float64
        ``rotation (structure, row, col)``, ``translation (structure, space)``,
        ``scale``, ``rmsd`` and ``r2`` over ``structure``; ``reference (point, space)``.
        The input's coordinates and attributes are carried (``coords``' attributes, such
        as its units, by ``aligned``). A structure with a NaN/inf
        coordinate, or with invalid lazily-given per-structure weights, gets NaN results;
        the rest of its chunk is unaffected (per-point weights are checked at once, lazy
        or not).
    """
    check_option("device", device, DEVICES)
    ds = gpu_batches(validate_ensemble(ensemble), device)
    coords = to_device(ds["coords"], device)
    w = _resolve_weights(ds, weights)
    attrs = dict(ds.attrs)
    if isinstance(reference, str):
        check_option("reference", reference, REFERENCE_OPTIONS)
    if robust is not None:
        check_option("robust", robust, ROBUST_LOSSES)
    if coarsen is not None:
        check_factor(coarsen, "coarsen")
        check_enough_points(
            f"each structure coarsened by coarsen={coarsen}",
            -(-coords.sizes[POINT] // coarsen),
            coords.sizes[SPACE],
        )
        if isinstance(reference, str) and reference == "mean":
            raise ValueError(
                "reference='mean' cannot be combined with coarsen: give a low-resolution "
                "reference array or a structure index"
            )
        ref = _coarse_reference(coords, reference, coarsen, w)
    elif isinstance(reference, str) and reference == "mean":
        check_iterations(max_iterations, tol)
        ref, report = _generalized_reference(
            coords, w, scale, reflection, tol, max_iterations, robust
        )
        attrs.update(report)
    else:
        ref = _resolve_reference(coords, reference)
    fit = _fit_to(coords, ref, w, scale, reflection, aligned, robust, coarsen)
    if aligned:
        # the aligned coordinates are coordinates like the input's (units and all)
        fit["aligned"].attrs = dict(coords.attrs)
    out = xr.Dataset(fit, attrs=attrs)
    if coarsen is None:
        # the reference's points are the input's: their labels (an atom name...) stay,
        # with or without the aligned coordinates
        labels = {k: v for k, v in coords.coords.items() if set(v.dims) <= {POINT, SPACE}}
        out["reference"] = xr.DataArray(ref, dims=(POINT, SPACE), coords=labels)
    else:
        out["reference"] = ((BEAD, SPACE), ref)
    out.attrs.update(
        scalign_reference=str(reference)
        if not isinstance(reference, np.ndarray | xr.DataArray)
        else "array",
        scalign_scale=bool(scale),
        scalign_reflection=bool(reflection),
        scalign_robust=robust or "none",
        scalign_coarsen=coarsen or 1,
        scalign_weights=weights
        if isinstance(weights, str)
        else ("none" if weights is None else "array"),
    )
    return out
