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


def _panel_axes(axes: Any, n: int) -> list:
    """``n`` Axes to draw on: the given ones (a list or an array of any shape) or a new
    1×n figure."""
    if axes is None:
        import matplotlib.pyplot as plt

        _axes(None)
        _, axes = plt.subplots(1, n, figsize=(4 * n, 4))
    flat = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(flat) != n:
        raise ValueError(f"axes must be {n} Axes, got {len(flat)}")
    return flat


def _limits(name: str, image: np.ndarray, percentiles: tuple[float, float]) -> tuple:
    """Display limits from the finite pixels (one NaN must not blank the panel)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        raise ValueError(f"{name} has no finite pixel")
    return tuple(np.percentile(finite, percentiles))


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
    if isinstance(result, xr.Dataset) and "rmsd" not in result:
        raise ValueError(f"result has no 'rmsd' (variables: {list(result.data_vars)})")
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
    axes = _panel_axes(axes, 4)
    lo, hi = _limits("fixed", images[0], (1, 99))
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
    axes = _panel_axes(axes, 2)
    index = np.arange(len(M))
    axes[0].plot(index, moved[:, 0] - c[0], label="x")
    axes[0].plot(index, moved[:, 1] - c[1], label="y")
    axes[0].set_ylabel("translation (px)")
    axes[0].legend()
    axes[1].plot(index, [rotation_angle_2d(m) for m in M])
    axes[1].set_ylabel("rotation (°)")
    axes[1].set_xlabel("image")
    return axes


def reprojection_panels(image: ArrayLike, reprojection: ArrayLike, *, axes=None):
    """Three panels of one particle: the image, its reprojection (CTF and shift applied,
    e.g. :func:`scalign.project`) and the residual ``reprojection − image``.

    ``axes``: three Axes to draw on (default: a new 1×3 figure). Returns them.
    """
    image = _values("image", image, 2)
    reprojection = _values("reprojection", reprojection, 2)
    if image.shape != reprojection.shape:
        raise ValueError(f"image {image.shape} and reprojection {reprojection.shape} differ")
    axes = _panel_axes(axes, 3)
    residual = reprojection - image
    finite = np.abs(residual[np.isfinite(residual)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    for ax, data, title, style in zip(
        axes,
        (image, reprojection, residual),
        ("image", "reprojection", "residual"),
        ({"cmap": "gray"}, {"cmap": "gray"}, {"cmap": "RdBu_r", "vmin": -bound, "vmax": bound}),
        strict=True,
    ):
        ax.imshow(data, **style)
        ax.set_title(title)
        ax.set_axis_off()
    return axes


def score_histogram(
    result: xr.Dataset, score: str = "z_score_res_cov", *, volume: int = 0, top: int = 5, ax=None
):
    """Histogram of one score of :func:`scalign.compare_reprojections` over the images of
    one volume, with the ``top`` worst images (by the score's direction) marked and named.
    """
    from scalign.reprojection import DIRECTIONS, VOLUME

    if not isinstance(result, xr.Dataset) or VOLUME not in result.dims:
        raise TypeError("result must be the Dataset returned by scalign.compare_reprojections")
    if score not in result or score not in DIRECTIONS:
        raise ValueError(
            f"unknown score {score!r}: the result has {sorted(set(result) & set(DIRECTIONS))}"
        )
    n = result.sizes[VOLUME]
    if isinstance(volume, bool) or not isinstance(volume, int | np.integer) or not -n <= volume < n:
        raise ValueError(f"volume must be an index below {n}, got {volume!r}")
    values = _values(score, result[score].isel({VOLUME: volume}), 1)
    worst = np.argsort(values if DIRECTIONS[score] == "higher" else -values)[:top]
    ax = _axes(ax)
    ax.hist(values[np.isfinite(values)], bins=40, color="0.6")
    for i in worst:
        ax.axvline(values[i], color="C3", lw=1)
        ax.annotate(str(i), (values[i], ax.get_ylim()[1] * 0.95), color="C3", fontsize=8)
    ax.set_xlabel(f"{score} ({DIRECTIONS[score]} is better)")
    ax.set_ylabel("images")
    ax.set_title(f"{values.size} images; worst marked: {', '.join(map(str, worst))}")
    return ax


def ranking_bars(table, *, ax=None):
    """The ranking of :func:`scalign.rank_volumes` as bars of the mean score ± its
    standard error, best first."""
    if not {"volume", "mean", "sem"} <= set(getattr(table, "columns", ())):
        raise TypeError("table must be the DataFrame returned by scalign.rank_volumes")
    ax = _axes(ax)
    names = [str(v) for v in table["volume"]]
    ax.bar(names, table["mean"], yerr=table["sem"], color=["C2"] + ["0.6"] * (len(names) - 1))
    ax.set_ylabel(
        f"mean {table.attrs.get('score', 'score')} ({table.attrs.get('better', '')} is better)"
    )
    ax.set_title(f"best volume: {table.attrs.get('best', names[0])}")
    return ax
