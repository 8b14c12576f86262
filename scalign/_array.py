"""Array-namespace helpers: one code path for NumPy and CuPy chunks."""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_cupy_array


def namespace(*arrays: Any):
    """Array namespace (NumPy or CuPy, array-API compatible) shared by ``arrays``."""
    return array_namespace(*[a for a in arrays if a is not None])


def to_numpy(x: Any) -> np.ndarray:
    """Copy a NumPy or CuPy array to host memory as a NumPy array."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
