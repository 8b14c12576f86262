"""scalign: align, score and rank scientific objects at scale, lazily, on Dask.

Conventions: points are rows; a fit maps ``X`` onto ``Y`` as ``Y ≈ s X R^T + t``;
RMSD = Frobenius norm of the residual / sqrt(n_points).
"""

from scalign.align import align
from scalign.ensemble import make_ensemble, validate_ensemble
from scalign.execution import gpu_available, run, scheduler
from scalign.icp import ICPInfo, icp
from scalign.io import load_ensemble, open_ensemble, save_zarr
from scalign.kernels.kabsch import Superposition, apply_transform, rmsd, superpose
from scalign.pairwise import pairwise_rmsd
from scalign.procrustes import (
    Transform,
    coarsen,
    iteratively_reweighted_procrustes,
    kabsch,
    multiscale_procrustes,
    procrustes_align,
    procrustes_distance,
    procrustes_r2,
    procrustes_rmse,
    rotation_angle,
    umeyama,
    weighted_procrustes,
)
from scalign.synthetic import helix, helix_ensemble

__version__ = "0.1.0"

__all__ = [
    "ICPInfo",
    "Superposition",
    "Transform",
    "align",
    "apply_transform",
    "coarsen",
    "gpu_available",
    "helix",
    "helix_ensemble",
    "icp",
    "iteratively_reweighted_procrustes",
    "kabsch",
    "load_ensemble",
    "make_ensemble",
    "multiscale_procrustes",
    "open_ensemble",
    "pairwise_rmsd",
    "procrustes_align",
    "procrustes_distance",
    "procrustes_r2",
    "procrustes_rmse",
    "rmsd",
    "rotation_angle",
    "run",
    "save_zarr",
    "scheduler",
    "superpose",
    "umeyama",
    "validate_ensemble",
    "weighted_procrustes",
]
