"""Synthetic ensembles with known transforms, for demos, tests and benchmarks."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.spatial.transform import Rotation

from scalign.ensemble import COORD_DIMS, POINT, SPACE, STRUCTURE, make_ensemble


def helix(n_points: int, *, radius: float = 2.3, rise: float = 1.5, turn: float = 100.0):
    """An alpha-helix-like curve: ``(r cos k·turn, r sin k·turn, k·rise)``, centred, (n, 3).

    Parameters
    ----------
    n_points : int
        Points ``k = 0 ... n_points - 1``.
    radius : float
        ``r``, the helix radius.
    rise : float
        Rise per point along ``z``.
    turn : float
        Turn per point, degrees.

    Returns
    -------
    numpy.ndarray
        float64 ``(n_points, 3)``, its centroid at the origin.
    """
    k = np.arange(n_points, dtype=np.float64)
    phi = np.deg2rad(turn) * k
    pts = np.stack([radius * np.cos(phi), radius * np.sin(phi), rise * k], axis=1)
    return pts - pts.mean(axis=0)


def helix_ensemble(
    n_structures: int,
    n_points: int = 64,
    *,
    noise: float = 0.0,
    outlier_fraction: float = 0.0,
    outlier_size: float = 20.0,
    scale_range: tuple[float, float] | None = None,
    offset: float = 10.0,
    dtype=np.float32,
    chunks: int | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """Copies of one helix moved by known random similarity transforms.

    Structure ``i`` is ``X_i = ((Y + noise_i + outliers_i) - t_i) Q_i / s_i``, so the fit
    of ``X_i`` onto the reference ``Y`` is ``Y ≈ s_i X_i Q_i^T + t_i``: the variables
    ``true_rotation`` (``Q_i``), ``true_translation`` (``t_i``) and ``true_scale``
    (``s_i``) are directly comparable to what :func:`scalign.align` returns.

    Parameters
    ----------
    n_structures, n_points : int
    noise : float
        Standard deviation of Gaussian noise added to every coordinate.
    outlier_fraction, outlier_size : float
        Fraction of points per structure displaced by ``outlier_size`` in a random
        direction (the indices are in the boolean variable ``outlier``).
    scale_range : (float, float), optional
        Draw ``s_i`` log-uniformly in this range (default: all 1).
    offset : float
        Standard deviation of the translations.
    dtype : numpy dtype
        Of ``coords`` (default float32).
    chunks : int, optional
        Structures per chunk (:func:`scalign.make_ensemble`).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    Dataset
        An ensemble with ``coords (structure, point, space)`` in ``dtype``; float64
        ``reference (point, space)`` (the helix ``Y``), ``true_rotation (structure, row,
        col)``, ``true_translation (structure, space)``, ``true_scale (structure)``; bool
        ``outlier (structure, point)``; attrs ``generator``, ``seed`` and ``noise``.
    """
    rng = np.random.default_rng(seed)
    Y = helix(n_points)
    Q = Rotation.random(n_structures, random_state=rng).as_matrix()
    t = offset * rng.standard_normal((n_structures, 3))
    if scale_range is None:
        s = np.ones(n_structures)
    else:
        lo, hi = np.log(scale_range)
        s = np.exp(rng.uniform(lo, hi, n_structures))
    P = np.broadcast_to(Y, (n_structures, n_points, 3)) + noise * rng.standard_normal(
        (n_structures, n_points, 3)
    )
    outlier = rng.random((n_structures, n_points)) < outlier_fraction
    direction = rng.standard_normal((n_structures, n_points, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    P = P + outlier[..., None] * outlier_size * direction
    X = ((P - t[:, None, :]) @ Q) / s[:, None, None]
    ds = make_ensemble(
        X.astype(dtype),
        chunks=chunks,
        attrs={"generator": "scalign.synthetic.helix_ensemble", "seed": seed, "noise": noise},
    )
    ds["reference"] = ((POINT, SPACE), Y)
    ds["true_rotation"] = ((STRUCTURE, "row", "col"), Q)
    ds["true_translation"] = ((STRUCTURE, SPACE), t)
    ds["true_scale"] = ((STRUCTURE,), s)
    ds["outlier"] = (COORD_DIMS[:2], outlier)
    return ds
