"""Input checks shared by the pair-level functions, the ops and the CLI.

Every check raises ``ValueError`` or ``TypeError`` naming the variable and what is wrong.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

from scalign._array import to_numpy


def as_points(name: str, X: Any, *, min_ndim: int = 2) -> np.ndarray:
    """``X`` as a finite floating array of point sets ``(..., n, d)``, in host memory (a
    CuPy array is copied): float32 and float64 as they are, integers as float64, float16
    as float32 (its 11-bit significand holds a 100 Å coordinate to 0.06 Å); booleans are
    no coordinates."""
    try:
        arr = to_numpy(X)
    except Exception as exc:  # ragged lists and other objects numpy cannot hold
        raise TypeError(f"{name} must be an array of points, got {type(X).__name__}") from exc
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have shape (..., n_points, d), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} has {bad} non-finite (NaN or inf) coordinate(s)")
    return arr


def check_enough_points(name: str, n: int, d: int) -> None:
    """A d-dimensional fit needs at least d points."""
    if n < d:
        raise ValueError(f"{name} has {n} point(s) in {d} dimensions: at least {d} are needed")


def check_pair(X: np.ndarray, Y: np.ndarray, x_name: str = "X", y_name: str = "Y") -> None:
    """``X`` and ``Y`` are paired point sets: same number of points and dimensions."""
    if X.shape[-1] != Y.shape[-1]:
        raise ValueError(
            f"{x_name} is {X.shape[-1]}-dimensional but {y_name} is {Y.shape[-1]}-dimensional"
        )
    if X.shape[-2] != Y.shape[-2]:
        raise ValueError(
            f"{x_name} has {X.shape[-2]} points but {y_name} has {Y.shape[-2]}: "
            "paired point sets need the same number of points"
        )
    check_enough_points(x_name, X.shape[-2], X.shape[-1])


COINCIDENCE_FLOOR = float(np.sqrt(np.finfo(np.float64).tiny))


def coincidence_rtol(eps: float) -> float:
    """Points coincide when every centred coordinate is within this fraction of ``max|x|``
    (per item), or below the square root of the smallest normal number of the precision
    the fit sums squares in (their squares lose their digits): ``1e-12``, raised
    to a few of the dtype's ``eps`` (points equal to the dtype's precision coincide).
    Relative to ``1 + max|x|``, as it was, the tolerance was absolute below unit
    coordinates: a 200 nm float32 cloud in metres was called coincident."""
    return max(1e-12, 8 * eps)


def raise_if_coincident(name: str, same: np.ndarray) -> None:
    """``ValueError`` naming the first item whose points all coincide (``same``: one flag
    per item)."""
    if np.any(same):
        item = np.argwhere(same)[0] if same.ndim else ()
        where = f" (item {item[0] if len(item) == 1 else tuple(item)})" if len(item) else ""
        raise ValueError(f"{name} is degenerate: all of its points coincide{where}")


def check_spread(name: str, X: np.ndarray) -> None:
    """At least two distinct points per item, or no rotation is defined at all (the
    tolerance is relative to each item's own magnitude: :func:`coincidence_rtol`)."""
    # centred in float64: the float32 mean of equal values is off by several ulps
    centred = X - X.mean(axis=-2, keepdims=True, dtype=np.float64)
    eps = np.finfo(X.dtype).eps if np.issubdtype(X.dtype, np.floating) else 0.0
    # the fits accumulate in float64 whatever the input dtype
    magnitude = np.abs(X).max(axis=(-2, -1), keepdims=True)
    tol = np.maximum(coincidence_rtol(eps) * magnitude, COINCIDENCE_FLOOR)
    raise_if_coincident(name, np.all(np.abs(centred) <= tol, axis=(-2, -1)))


def as_weights(name: str, w: Any, n: int) -> np.ndarray:
    """Per-point weights ``(..., n)``: finite, non-negative, not all zero; in host memory
    (a CuPy array is copied)."""
    arr = to_numpy(w)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim < 1 or arr.shape[-1] != n:
        raise ValueError(f"{name} must have shape (..., {n}) (one per point), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite (NaN or inf) values")
    if np.any(arr < 0):
        raise ValueError(f"{name} has negative values: weights must be >= 0")
    if np.any(np.all(arr == 0, axis=-1)):
        raise ValueError(f"{name} are all zero: at least one point needs a positive weight")
    return arr


def check_option(name: str, value: Any, allowed: tuple) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(
            f"unknown {name} {value!r}: expected one of {', '.join(map(repr, allowed))}"
        )


def check_count(name: str, value: int) -> None:
    """A count such as an iteration budget or a chunk size: a positive integer (not a
    bool)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def check_chunks(chunks: int | None) -> None:
    """Structures per chunk: a positive integer (or None for the default)."""
    if chunks is not None:
        check_count("chunks", chunks)


def check_iterations(max_iterations: int, tol: float, tol_name: str = "tol") -> None:
    """An iteration budget (a positive integer) and a tolerance (positive, finite)."""
    check_count("max_iterations", max_iterations)
    if isinstance(tol, bool | np.bool_) or not isinstance(tol, Real):
        raise TypeError(f"{tol_name} must be a positive number, got {tol!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"{tol_name} must be a positive finite number, got {tol!r}")


def check_factor(factor: int, name: str = "factor") -> None:
    """A coarsening factor: a positive integer."""
    check_count(name, factor)


def check_flag(name: str, value: Any) -> None:
    """``value`` is a boolean: a string such as ``"no"`` would count as true."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
