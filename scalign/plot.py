"""Plots of alignment results (needs matplotlib: ``pip install scalign[plot]``).

Every function draws on the given Axes (a new figure when ``ax`` is None) and returns it,
so plots compose into the caller's figures and can be checked in tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike


def _axes(ax):
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # an optional extra
        raise ImportError("scalign.plot needs matplotlib: pip install 'scalign[plot]'") from exc
    if ax is None:
        _, ax = plt.subplots()
    return ax


def _values(name: str, data: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(data.values if isinstance(data, xr.DataArray) else data, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def rmsd_distribution(result: xr.Dataset | ArrayLike, *, bins: int = 50, ax=None, **hist_kwargs):
    """Histogram of the per-structure RMSD of an aligned ensemble.

    ``result`` is the Dataset of :func:`scalign.align` (its ``rmsd``) or the RMSDs
    themselves; NaN structures are left out and counted in the title.
    """
    rmsd = result["rmsd"] if isinstance(result, xr.Dataset) else result
    values = _values("rmsd", rmsd, 1)
    finite = values[np.isfinite(values)]
    ax = _axes(ax)
    ax.hist(finite, bins=bins, **hist_kwargs)
    ax.set_xlabel("RMSD to the reference")
    ax.set_ylabel("structures")
    dropped = values.size - finite.size
    ax.set_title(
        f"{finite.size} structures, median {np.median(finite):.3g}"
        + (f" ({dropped} NaN left out)" if dropped else "")
    )
    return ax


def point_residuals(
    aligned: ArrayLike, reference: ArrayLike, weights: ArrayLike | None = None, *, ax=None
):
    """Residual norm :math:`\\lVert x_k - y_k\\rVert` of each point after the fit.

    With ``weights`` (e.g. the final IRLS weights of
    :func:`scalign.iteratively_reweighted_procrustes`), they are drawn on a second axis:
    outliers show as large residuals with weights near 0.
    """
    A = _values("aligned", aligned, 2)
    Y = _values("reference", reference, 2)
    if A.shape != Y.shape:
        raise ValueError(f"aligned has shape {A.shape} but reference has {Y.shape}")
    residual = np.linalg.norm(A - Y, axis=1)
    ax = _axes(ax)
    ax.plot(residual, color="C0", label="residual")
    ax.set_xlabel("point")
    ax.set_ylabel("residual norm", color="C0")
    if weights is not None:
        w = _values("weights", weights, 1)
        if w.shape != residual.shape:
            raise ValueError(f"weights has shape {w.shape}, expected ({residual.size},)")
        twin = ax.twinx()
        twin.plot(w, color="C1", label="weight")
        twin.set_ylabel("weight", color="C1")
        twin.set_ylim(0.0, max(1.05, 1.05 * float(np.max(w))))
    return ax


def pairwise_heatmap(D: xr.DataArray | ArrayLike, *, ax=None, cmap: str = "viridis"):
    """Heat map of a pairwise RMSD matrix (:func:`scalign.pairwise_rmsd`), with a colour bar."""
    values = _values("D", D, 2)
    ax = _axes(ax)
    image = ax.imshow(values, cmap=cmap, interpolation="nearest", origin="upper")
    ax.figure.colorbar(image, ax=ax, label="RMSD")
    dims = D.dims if isinstance(D, xr.DataArray) else ("structure", "structure")
    ax.set_xlabel(dims[1])
    ax.set_ylabel(dims[0])
    return ax
