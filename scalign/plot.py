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


def registration_panels(fixed: ArrayLike, moving: ArrayLike, registered: ArrayLike, *, axes=None):
    """Four panels of one slice: fixed, moving, registered and ``|registered - fixed|``.

    ``axes``: four Axes to draw on (default: a new 1×4 figure). Returns them.
    """
    images = [
        _values(name, a, 2)
        for name, a in (("fixed", fixed), ("moving", moving), ("registered", registered))
    ]
    if len({im.shape for im in images}) != 1:
        raise ValueError(
            f"fixed, moving and registered differ in shape: {[im.shape for im in images]}"
        )
    if axes is None:
        import matplotlib.pyplot as plt

        _axes(None)
        _, axes = plt.subplots(1, 4, figsize=(16, 4))
    if len(axes) != 4:
        raise ValueError(f"axes must be 4 Axes, got {len(axes)}")
    lo, hi = np.percentile(images[0], [1, 99])
    titles = ("fixed", "moving", "registered", "|registered − fixed|")
    panels = [*images, np.abs(images[2] - images[0])]
    for ax, image, title in zip(axes, panels, titles, strict=True):
        limits = {} if title.startswith("|") else {"vmin": lo, "vmax": hi}
        ax.imshow(image, cmap="gray", **limits)
        ax.set_title(title)
        ax.set_axis_off()
    return axes


def stack_drift(result: xr.Dataset | ArrayLike, *, axes=None):
    """Per-slice translation (of the image centre, px) and rotation (°) of a registered
    stack (``matrix (image, 3, 3)`` of :func:`scalign.register_stack`).

    The rotation is the angle of the polar factor of each linear part; the translation is
    where the motion takes the image centre, minus the centre (``M c - c``), so a pure
    rotation about the centre shows no translation. ``result`` carries the image shape in
    ``registered``; plain matrices are taken about the origin.
    """
    from scalign.kernels.affine import rotation_angle_2d

    if isinstance(result, xr.Dataset):
        M = _values("matrix", result["matrix"], 3)
        shape = result["registered"].shape[1:] if "registered" in result else (1, 1)
    else:
        M, shape = _values("matrix", result, 3), (1, 1)
    if M.shape[1:] != (3, 3):
        raise ValueError(f"matrix must be (image, 3, 3) 2-D motions, got {M.shape}")
    c = np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2, 1.0])
    moved = M @ c
    if axes is None:
        import matplotlib.pyplot as plt

        _axes(None)
        _, axes = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    index = np.arange(len(M))
    axes[0].plot(index, moved[:, 0] - c[0], label="x")
    axes[0].plot(index, moved[:, 1] - c[1], label="y")
    axes[0].set_ylabel("translation (px)")
    axes[0].legend()
    axes[1].plot(index, [rotation_angle_2d(m) for m in M])
    axes[1].set_ylabel("rotation (°)")
    axes[1].set_xlabel("image")
    return axes
