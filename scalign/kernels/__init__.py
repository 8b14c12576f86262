"""Batched kernels: pure array math over a leading batch axis, NumPy or CuPy.

Kernels never import dask or xarray and never loop in Python over the batch.
"""

from scalign.kernels.kabsch import Superposition, apply_transform, rmsd, superpose

__all__ = ["Superposition", "apply_transform", "rmsd", "superpose"]
