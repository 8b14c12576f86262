"""scalign: align, score and rank scientific objects at scale, lazily, on Dask.

Conventions: points are rows; a fit maps ``X`` onto ``Y`` as ``Y ≈ s X R^T + t``;
RMSD = Frobenius norm of the residual / sqrt(n_points).
"""

from scalign.align import align
from scalign.ensemble import make_ensemble, validate_ensemble
from scalign.execution import gpu_available, run, scheduler, to_device
from scalign.formats import (
    export_star,
    import_star,
    open_mrc_stack,
    read_volume,
    write_stack,
    write_volume,
)
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
from scalign.kernels.ctf import ctf_half_plane, fourier_crop, fourier_crop_volume
from scalign.kernels.euler import euler_to_matrix, matrix_to_euler
from scalign.kernels.kabsch import Superposition, apply_transform, rmsd, superpose
from scalign.kernels.orientations import orientation_grid, symmetry_distance, symmetry_matrices
from scalign.kernels.projection import project
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
from scalign.reprojection import assign_images, compare_reprojections, rank_volumes, reproject
from scalign.stack_registration import register_stack
from scalign.synthetic import helix, helix_ensemble
from scalign.synthetic_em import blob_projections, blob_volume, random_blobs, simulate_particles

__version__ = "0.1.0"

__all__ = [
    "ICPInfo",
    "RegistrationInfo",
    "Superposition",
    "Transform",
    "align",
    "apply_transform",
    "assign_images",
    "blob_projections",
    "blob_volume",
    "build_affine_matrix",
    "build_affine_matrix_3d",
    "coarsen",
    "compare_reprojections",
    "compose",
    "ctf_half_plane",
    "decompose_affine",
    "decompose_affine_3d",
    "euler_to_matrix",
    "export_star",
    "fourier_crop",
    "fourier_crop_volume",
    "gpu_available",
    "helix",
    "helix_ensemble",
    "icp",
    "import_star",
    "invert",
    "iteratively_reweighted_procrustes",
    "kabsch",
    "load_ensemble",
    "make_ensemble",
    "make_stack",
    "matrix_to_euler",
    "multiscale_procrustes",
    "normalized_to_pixel",
    "open_ensemble",
    "open_mrc_stack",
    "orientation_grid",
    "pairwise_rmsd",
    "pixel_to_normalized",
    "procrustes_align",
    "procrustes_distance",
    "procrustes_r2",
    "procrustes_rmse",
    "project",
    "random_blobs",
    "rank_volumes",
    "reproject",
    "read_volume",
    "register_affine_2d",
    "register_affine_3d",
    "register_stack",
    "rmsd",
    "rotation_angle",
    "run",
    "save_zarr",
    "scheduler",
    "simulate_particles",
    "superpose",
    "symmetry_distance",
    "symmetry_matrices",
    "to_device",
    "umeyama",
    "validate_ensemble",
    "validate_stack",
    "warp_stack",
    "warp_volume_xy_batched",
    "weighted_procrustes",
    "write_stack",
    "write_volume",
]
