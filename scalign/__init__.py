"""scalign: align, score and rank scientific objects at scale, lazily, on Dask.

Conventions: points are rows; a fit maps ``X`` onto ``Y`` as ``Y ≈ s X R^T + t``;
RMSD = Frobenius norm of the residual / sqrt(n_points).
"""

from scalign.align import align
from scalign.ensemble import make_ensemble, validate_ensemble
from scalign.execution import gpu_available, run, scheduler
from scalign.icp import ICPInfo, icp
from scalign.images import make_stack, validate_stack, warp_stack, warp_volume_xy_batched
from scalign.io import load_ensemble, open_ensemble, save_zarr
from scalign.kernels.affine import (
    build_affine_matrix,
    build_affine_matrix_3d,
    compose,
    decompose_affine,
    decompose_affine_3d,
    invert,
    normalized_to_pixel,
    pixel_to_normalized,
)
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
from scalign.registration import RegistrationInfo, register_affine_2d, register_affine_3d
from scalign.stack_registration import register_stack
from scalign.synthetic import helix, helix_ensemble

__version__ = "0.1.0"

__all__ = [
    "ICPInfo",
    "RegistrationInfo",
    "Superposition",
    "Transform",
    "align",
    "apply_transform",
    "build_affine_matrix",
    "build_affine_matrix_3d",
    "coarsen",
    "compose",
    "decompose_affine",
    "decompose_affine_3d",
    "gpu_available",
    "helix",
    "helix_ensemble",
    "icp",
    "invert",
    "iteratively_reweighted_procrustes",
    "kabsch",
    "load_ensemble",
    "make_ensemble",
    "make_stack",
    "multiscale_procrustes",
    "normalized_to_pixel",
    "open_ensemble",
    "pairwise_rmsd",
    "pixel_to_normalized",
    "procrustes_align",
    "procrustes_distance",
    "procrustes_r2",
    "procrustes_rmse",
    "register_affine_2d",
    "register_affine_3d",
    "register_stack",
    "rmsd",
    "rotation_angle",
    "run",
    "save_zarr",
    "scheduler",
    "superpose",
    "umeyama",
    "validate_ensemble",
    "validate_stack",
    "warp_stack",
    "warp_volume_xy_batched",
    "weighted_procrustes",
]
