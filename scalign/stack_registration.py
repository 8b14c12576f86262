"""Stack registration: every image of a stack onto a reference, lazily.

Each image ``I_k`` gets the forward motion ``M_k`` with ``I_k(M_k p) ≈ R(p)`` relative to
the reference ``R`` (:mod:`scalign.kernels.affine`'s convention), found by
:func:`scalign.kernels.register.estimate_motion` (on the GPU, a chunk at a time by
:func:`scalign.kernels.register_batch.estimate_motions`); the registered stack is every
image pulled back, ``I_k(M_k p)``, i.e. warped by ``M_k^{-1}``.

References:

* ``"first"`` or an index: one fixed image; independent tasks, one per chunk.
* ``"previous"``: image ``k`` onto image ``k - 1`` (independent pair tasks), then the
  motions are chained along the stack, :math:`M_k = R_k M_{k-1}` with ``R_k`` the motion
  of image ``k`` relative to image ``k - 1`` and ``M_0 = I``: a scan (dask's
  ``cumreduction``), so drift accumulates as it physically does.
* ``"mean"``: registered to the first image, then ``mean_iterations`` times to the mean
  of the registered stack (each round one pass over the chunks), which removes the bias
  of any single reference. Each pixel of the mean averages the images that cover it
  (after a jump an image leaves part of the frame empty).
"""

from __future__ import annotations

import numbers

import dask.array as da
import numpy as np
import xarray as xr
from array_api_compat import is_cupy_array
from dask.array.reductions import cumreduction
from scipy import ndimage

from scalign._array import namespace
from scalign.execution import DEVICES, gpu_batches, to_device
from scalign.images import (
    COL,
    ROW,
    check_finite,
    check_not_constant,
    validate_stack,
    warp_stack,
)
from scalign.kernels.register import estimate_motion, prepare_template
from scalign.kernels.register_batch import estimate_motions, prepare_templates
from scalign.mapping import map_batch
from scalign.registration import MIN_SIZE
from scalign.validation import check_count, check_iterations, check_option

REFERENCES = ("first", "previous", "mean")
TRANSFORMS = ("translation", "rigid", "similarity", "affine")
LOSSES = ("mse", "ncc")


def _register_chunk(images, reference, *, transform, loss, max_iterations, tol):
    """Motions, losses, iterations and convergence of each image of a chunk onto
    ``reference``.

    ``reference`` is one image (broadcast: prepared once for the whole chunk) or one per
    image (the ``previous`` pairs). A CuPy chunk is estimated as one batch on the GPU
    (:func:`scalign.kernels.register_batch.estimate_motions`).
    """
    n, spatial = images.shape[0], images.shape[1:]
    d = len(spatial)
    check_finite("images", images)
    check_finite("the reference", reference)
    check_not_constant("images", images, d)
    check_not_constant("the reference", reference, d)
    shared = reference.ndim == d or reference.shape[0] == 1
    if is_cupy_array(images):
        return _estimate_batch(
            images,
            reference,
            transform=transform,
            loss=loss,
            max_iterations=max_iterations,
            tol=tol,
        )
    template = prepare_template(np.reshape(reference, spatial), transform) if shared else None
    matrix = np.empty((n, d + 1, d + 1))
    losses = np.empty(n)
    iterations = np.empty(n, dtype=np.int64)
    converged = np.empty(n, dtype=bool)
    for k in range(n):
        fit = estimate_motion(
            template if shared else prepare_template(np.asarray(reference[k]), transform),
            np.asarray(images[k]),
            loss,
            max_iterations=max_iterations,
            tol=tol,
        )
        matrix[k], losses[k], iterations[k] = fit.matrix, fit.loss, sum(fit.iterations)
        converged[k] = fit.converged
    return matrix, losses, iterations, converged


def _estimate_batch(images, reference, *, transform, loss, max_iterations, tol):
    """:func:`_register_chunk` as one batched estimate
    (:func:`scalign.kernels.register_batch.estimate_motions`): the GPU's way, and on NumPy
    the same math for tests (on CPUs the per-image loop is faster)."""
    xp = namespace(images)
    refs = xp.reshape(xp.asarray(reference), (-1, *images.shape[1:]))
    fit = estimate_motions(
        prepare_templates(refs, transform), images, loss, max_iterations=max_iterations, tol=tol
    )
    # on the chunk's device, as the graph's meta says; _register brings them back
    return tuple(xp.asarray(a) for a in (fit.matrix, fit.loss, fit.iterations, fit.converged))


def _register(images: xr.DataArray, reference: xr.DataArray, options: dict) -> dict:
    """The motions of ``images`` onto ``reference`` (lazy, on the host)."""
    spatial = list(images.dims[1:])
    d = len(spatial)
    fit = map_batch(
        _register_chunk,
        [images, reference],
        [spatial, spatial],
        {
            "matrix": ((ROW, COL), np.float64),
            "loss": ((), np.float64),
            "iterations": ((), np.int64),
            "converged": ((), bool),
        },
        sizes={ROW: d + 1, COL: d + 1},
        kwargs=options,
    )
    return {name: to_device(value, "cpu") for name, value in fit.items()}


def _pin_reference(fit: dict, index: int) -> dict:
    """The reference's own motion set to exactly the identity (loss 0, no iterations,
    converged):
    fitted onto itself it comes out ~1e-7 off, enough to move its edge pixels outside
    and zero-fill them when it is pulled back."""
    matrix = fit["matrix"]
    dim = matrix.dims[0]
    other = xr.DataArray(np.arange(matrix.sizes[dim]) != index, dims=(dim,))
    eye = xr.DataArray(np.eye(matrix.sizes[ROW]), dims=(ROW, COL))
    return {
        "matrix": matrix.where(other, eye),
        "loss": fit["loss"].where(other, 0.0),
        "iterations": fit["iterations"].where(other, 0),
        "converged": fit["converged"].where(other, True),
    }


def _chain_block(block: np.ndarray, axis: int = 0) -> np.ndarray:
    """Within a block of relative motions ``R_k``: ``C_k = R_k C_{k-1}``, ``C_{-1} = I``."""
    out = np.empty_like(block)
    total = np.eye(block.shape[-1])
    for k in range(block.shape[0]):
        total = block[k] @ total
        out[k] = total
    return out


def _chain_join(carry: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Apply the motion accumulated before a block; a NaN carry is the scan's start."""
    if np.all(np.isnan(carry)):
        return block
    return block @ carry


def chain_motions(relative: da.Array) -> da.Array:
    """Cumulative motions ``M_k = R_k R_{k-1} ... R_0`` along axis 0, lazily (a scan)."""
    # cumreduction seeds the scan with a constant fill: NaN marks "no motion yet"
    return cumreduction(_chain_block, _chain_join, np.nan, relative, axis=0, dtype=np.float64)


def _previous(images: xr.DataArray, options: dict) -> dict:
    dim = images.dims[0]
    if images.chunks is None:
        # in-memory images: one chunk, as the pairs and the scan are laid out by chunks
        images = images.chunk({dim: -1})
    current = images.isel({dim: slice(1, None)})
    before = images.isel({dim: slice(None, -1)}).data
    before = xr.DataArray(before, dims=images.dims).chunk({dim: current.chunks[0]})
    pairs = _register(current.drop_vars(dim, errors="ignore"), before, options)
    d = images.ndim - 1
    first = da.eye(d + 1, dtype=np.float64)[None]
    relative = da.concatenate([first, pairs["matrix"].data], axis=0).rechunk({0: images.chunks[0]})
    zero = da.zeros((1,), dtype=np.float64)
    start = da.zeros((1,), dtype=np.int64)
    return {
        "converged": xr.DataArray(
            da.concatenate([da.ones((1,), dtype=bool), pairs["converged"].data]).rechunk(
                images.chunks[0]
            ),
            dims=(dim,),
        ),
        "matrix": xr.DataArray(chain_motions(relative), dims=(dim, ROW, COL)),
        "loss": xr.DataArray(
            da.concatenate([zero, pairs["loss"].data]).rechunk(images.chunks[0]), dims=(dim,)
        ),
        "iterations": xr.DataArray(
            da.concatenate([start, pairs["iterations"].data]).rechunk(images.chunks[0]),
            dims=(dim,),
        ),
    }


def _pull_back(images: xr.DataArray, matrix: xr.DataArray, order: int) -> xr.DataArray:
    """``I_k(M_k p)``: each image warped by the inverse of its motion."""
    inverse = map_batch(
        np.linalg.inv, [matrix], [[ROW, COL]], {"inverse": ((ROW, COL), np.float64)}
    )["inverse"]
    return warp_stack(images, inverse, order=order)


def _registered_mean(images: xr.DataArray, matrix: xr.DataArray, order: int) -> xr.DataArray:
    """The mean of the registered stack on the host, each pixel over the images that cover
    it; a pixel no image covers takes the value of the nearest covered one.

    Zero-filled corners would drag a plain mean towards 0 and bias every fit near the
    border; edge-extended images smear their last row or column across the mean in
    streaks as long as the drift (with jumps of 20-40 px the fits to that mean were
    0.35 px off, 0.06 px without the jumps or with this mean).
    """
    dim = images.dims[0]
    sums = xr.Dataset(
        {
            "total": _pull_back(images, matrix, order).sum(dim),
            # how much of an image each pixel holds (constant mode: 1 inside, 0 outside)
            "coverage": _pull_back(xr.ones_like(images), matrix, order).sum(dim),
        }
    )
    sums = to_device(sums, "cpu").compute()
    total, coverage = sums["total"].values, sums["coverage"].values
    covered = coverage > 0.5
    mean = np.divide(total, coverage, out=np.zeros_like(total), where=covered)
    nearest = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
    return xr.DataArray(mean[tuple(nearest)], dims=images.dims[1:])


def register_stack(
    stack: xr.Dataset | xr.DataArray,
    reference: str | int = "first",
    *,
    transform: str = "rigid",
    loss: str = "mse",
    max_iterations: int = 50,
    tol: float = 1e-3,
    mean_iterations: int = 2,
    order: int = 1,
    device: str = "auto",
) -> xr.Dataset:
    """Register every image of a stack to a reference; lazy except for ``"mean"``.

    Parameters
    ----------
    stack : Dataset with ``images (image, y, x)`` (or ``(volume, z, y, x)``), or that
        DataArray; chunked along the first dim. Each side >= 8 px; finite pixels and no
        constant image (checked as the chunks are computed: a ValueError).
    reference : "first", "previous", "mean" or an image index
        See the module docstring.
    transform : {"translation", "rigid", "similarity", "affine"}
        ``"similarity"`` is 2-D only.
    loss : {"mse", "ncc"}
    max_iterations, tol :
        Per pyramid level, for :func:`scalign.kernels.register.estimate_motion` (``tol``
        in full-resolution pixels).
    mean_iterations : int
        Rounds of registering to the mean for ``reference="mean"``.
    order : int
        Interpolation order of the registered stack.
    device : {"auto", "cpu", "gpu"}
        Where the chunks are computed (:func:`scalign.execution.to_device`): ``"gpu"``
        moves them to the GPU (CuPy) once (host chunks merged to ~256 MiB,
        :func:`scalign.execution.gpu_batches`), ``"cpu"`` brings CuPy chunks back first,
        ``"auto"`` computes each chunk where it already is. On the GPU each chunk's
        motions are estimated as one batch (the same estimate, to rounding), the
        registered stack is warped there, and the motions, losses, iterations and
        convergence flags come back to the host.

    Returns
    -------
    Dataset
        ``matrix (image, row, col)``: each image's forward motion relative to the
        reference, ``I_k(M_k p) ≈ R(p)`` (exactly the identity for the reference image
        itself, and for the first image with ``"previous"``); ``loss (image)`` (MSE, or
        1 − NCC, of the final fit; 0 for those images); ``iterations (image)`` (0 for
        them); ``converged (image)``: whether the finest level's fit met ``tol`` within
        ``max_iterations`` (True for them; a False motion is the last iterate, worth a
        look: a frame with little to register, or a too small ``max_iterations``);
        ``registered (image, y, x)``: every image pulled back onto the reference (the
        reference image unchanged).
    """
    check_option("device", device, DEVICES)
    ds = gpu_batches(validate_stack(stack), device)
    images = to_device(ds["images"], device)
    check_option("transform", transform, TRANSFORMS)
    check_option("loss", loss, LOSSES)
    check_iterations(max_iterations, tol)
    if min(images.shape[1:]) < MIN_SIZE:
        # as register_affine_2d/3d: no room for a pyramid or a rotation search
        raise ValueError(
            f"stack.images are too small to register: sizes {dict(images.sizes)} "
            f"(each side >= {MIN_SIZE})"
        )
    if transform == "similarity" and images.ndim != 3:
        raise ValueError("transform 'similarity' is 2-D only; use 'rigid' or 'affine' for volumes")
    options = {"transform": transform, "loss": loss, "max_iterations": max_iterations, "tol": tol}
    dim, n = images.dims[0], images.shape[0]
    if isinstance(reference, bool) or not isinstance(reference, numbers.Integral | str):
        raise TypeError(
            f"reference must be 'first', 'previous', 'mean' or an index, got {reference!r}"
        )
    if isinstance(reference, str):
        check_option("reference", reference, REFERENCES)
        if reference == "mean":
            check_count("mean_iterations", mean_iterations)
    elif not -n <= reference < n:
        raise ValueError(f"reference index {reference} is out of range for {n} images")
    if reference == "previous" and n > 1:
        fit = _previous(images, options)
    else:
        index = 0 if isinstance(reference, str) else int(reference) % n
        # the reference without its coordinates: the image's scalar labels would meet the
        # stack's in the merge of the outputs' coordinates, which computes lazy ones
        reference_image = images.isel({dim: index}).reset_coords(drop=True)
        fit = _pin_reference(_register(images, reference_image, options), index)
        if reference == "mean":
            for _ in range(mean_iterations):
                fit = _register(images, _registered_mean(images, fit["matrix"], order), options)
    return xr.Dataset(
        {
            "matrix": fit["matrix"],
            "loss": fit["loss"],
            "iterations": fit["iterations"],
            "converged": fit["converged"],
            "registered": _pull_back(images, fit["matrix"], order),
        },
        attrs=dict(ds.attrs)
        | {
            "scalign_reference": str(reference),
            "scalign_transform": transform,
            "scalign_loss": loss,
        },
    )
