"""Does a volume explain these images? Reprojection comparison and ranking of candidate
volumes, lazily over chunks of images (the third domain; Xmipp's "compare
reprojections", done consistently).

For every volume and image: the reprojection at the image's angles (given, or found by
projection matching, :mod:`scalign.kernels.matching`), its CTF and shift applied, compared
inside the circular mask of radius ``n / 2`` (:mod:`scalign.kernels.scores`): Pearson
correlation (higher is better), the cost (``1 - r``, or the gray-level L1 cost with
``gray=True``; lower is better), and the residual's mean and standard deviation. Over all
images of a volume (global reductions): ``z_score_res_mean``, ``z_score_res_std`` and, with
``covariance=True``, ``z_score_res_cov``, the JBLD divergence of each residual covariance
from the set's JBLD centroid. Unlike the protocol, every volume is scored on the same
images (no image is dropped for a non-positive correlation) and each score carries its
direction (``attrs["better"]``: ``"higher"`` or ``"lower"``) for :func:`rank_volumes`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from scalign._array import host, namespace, to_numpy
from scalign.execution import DEVICES, gpu_batches, to_device
from scalign.images import IMAGE, X, Y, check_finite, default_chunk, validate_stack
from scalign.kernels.ctf import (
    check_ctf_constants,
    ctf_half_plane,
    fourier_crop,
    fourier_crop_volume,
)
from scalign.kernels.euler import euler_to_matrix, matrix_to_euler
from scalign.kernels.matching import match_images
from scalign.kernels.orientations import orientation_grid
from scalign.kernels.projection import project
from scalign.kernels.scores import (
    circular_mask,
    compare,
    jbld,
    jbld_fixed_point,
    residual_covariance,
    ridge,
)
from scalign.mapping import map_batch
from scalign.validation import check_chunks, check_flag, check_option

VOLUME = "volume"
ANGLES = ("rot", "tilt", "psi", "shift_x", "shift_y")
CTF_VARIABLES = ("defocus_u", "defocus_v", "defocus_angle")
#: Optional per-image CTF variables (RELION's rlnPhaseShift, rlnCtfBfactor,
#: rlnCtfScalefactor) and their values when a stack has none.
CTF_OPTIONAL = {"phase_shift": 0.0, "bfactor": 0.0, "ctf_scale": 1.0}
CTF_ATTRS = ("voltage", "cs", "amplitude_contrast")
#: Each score's direction: which way is better.
DIRECTIONS = {
    "correlation": "higher",
    "cost": "lower",
    "z_score_res_mean": "lower",
    "z_score_res_std": "lower",
    "z_score_res_cov": "lower",
}
#: The scores that can rank volumes: each image's fit to each map on the same footing.
RANKING_SCORES = ("correlation", "cost")
_PER_IMAGE = (
    "rot",
    "tilt",
    "psi",
    "shift_x",
    "shift_y",
    "correlation",
    "cost",
    "gain",
    "offset",
    "residual_mean",
    "residual_std",
)


#: Core dims of the arrays every task shares (a volume, the search's orientations).
VOLUME_DIMS = ("vz", "vy", "vx")
GALLERY_DIMS = ("orientation", "mrow", "mcol")


def _shared(array: np.ndarray, dims: tuple[str, ...]) -> xr.DataArray:
    """``array`` as one dask chunk that every task of a map reads: on a cluster it is
    sent to each worker once, not embedded in every task."""
    return xr.DataArray(da.from_array(array, chunks=array.shape), dims=dims)


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def _volumes(volumes: Any) -> tuple[np.ndarray, list[str], float | None]:
    """``(V, names, pixel_size)`` with ``V (n_volumes, n, n, n)`` float32; the pixel size
    is the volumes' attr, else (a Dataset) the Dataset's, as ``save_zarr`` of a volume
    Dataset and the CLI's ``_read_volumes`` place it."""
    pixel = None
    if isinstance(volumes, xr.Dataset):
        names = [v for v in ("volumes", "volume") if v in volumes.data_vars]
        if not names:
            raise ValueError(
                f"volumes has no 'volumes' or 'volume' variable: {list(volumes.data_vars)}"
            )
        pixel = volumes.attrs.get("pixel_size")
        volumes = volumes[names[0]]
    if isinstance(volumes, xr.DataArray):
        pixel = volumes.attrs.get("pixel_size", pixel)
        labels = (
            [str(v) for v in volumes[VOLUME].values]
            if VOLUME in volumes.coords and volumes.ndim == 4
            else None
        )
        volumes = host(volumes)
    else:
        labels = None
    if isinstance(volumes, list | tuple):
        arrays = [to_numpy(v) for v in volumes]
        if not arrays:
            raise ValueError("volumes is empty: no volume to compare")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"volumes must all have the same shape, got {sorted(shapes)}")
        V = np.stack(arrays)
    else:
        V = to_numpy(volumes)
        if V.ndim == 3:
            V = V[None]
    if V.dtype.kind not in "iuf":
        raise TypeError(f"volumes must be real numbers, got dtype {V.dtype}")
    if V.ndim != 4 or len(set(V.shape[1:])) != 1:
        raise ValueError(
            f"volumes must be cubic, (z, y, x) or (volume, z, y, x), got shape {V.shape}"
        )
    if V.shape[0] == 0:
        raise ValueError("volumes is empty: no volume to compare")
    if not np.all(np.isfinite(V)):
        raise ValueError("volumes has non-finite (NaN or inf) voxels")
    names = labels or [str(i) for i in range(V.shape[0])]
    return V.astype(np.float32), names, pixel


def _pixel_size(images: Any, volumes: Any) -> float | None:
    """The pixel size (Å) the images and the volumes share: either one where the other
    is not known; an error where they differ (a map must be resampled to the images'
    pixel size before its projections can be compared with them)."""
    sizes = {}
    for name, value in (("images", images), ("volumes", volumes)):
        if value is None:
            continue
        try:
            sizes[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"the {name}' pixel_size must be a number, got {value!r}") from None
        if not (math.isfinite(sizes[name]) and sizes[name] > 0):
            raise ValueError(f"the {name}' pixel_size must be positive (Å/px), got {value}")
    if len(sizes) == 2 and not math.isclose(sizes["images"], sizes["volumes"], rel_tol=1e-3):
        raise ValueError(
            f"the volumes' pixel size ({sizes['volumes']:g} Å) differs from the images' "
            f"({sizes['images']:g} Å): resample the volumes to the images' pixel size first"
        )
    return sizes.get("images", sizes.get("volumes"))


def _angles(ds: xr.Dataset, angles: Any) -> xr.Dataset | None:
    """The given angles as a Dataset over ``image`` (or None: search)."""
    if angles is None:
        return None
    source = ds if isinstance(angles, str) and angles == "stack" else angles
    if isinstance(angles, str) and angles != "stack":
        raise ValueError(f"unknown angles option {angles!r}: expected None, 'stack' or a Dataset")
    if not isinstance(source, xr.Dataset):
        raise TypeError(f"angles must be None, 'stack' or a Dataset, got {type(angles).__name__}")
    missing = [v for v in ANGLES[:3] if v not in source.variables]
    if missing:
        raise ValueError(f"angles are missing {missing} (need rot, tilt, psi; shifts optional)")
    out = {}
    for name in ANGLES:
        if name not in source.variables:
            # plain zeros, like the given angles: no labels of ``source`` to be aligned
            # with the images' (a missing shift made other labels an AlignmentError)
            out[name] = xr.DataArray(np.zeros(ds.sizes[IMAGE]), dims=(IMAGE,))
            continue
        var = source[name]
        if var.dims != (IMAGE,) or var.size != ds.sizes[IMAGE]:
            raise ValueError(
                f"angles.{name} must be over ('image',) with {ds.sizes[IMAGE]} values, "
                f"got dims {var.dims} and size {var.size}"
            )
        values = np.asarray(host(var), dtype=np.float64)
        if not np.all(np.isfinite(values)):
            bad = np.flatnonzero(~np.isfinite(values))
            raise ValueError(
                f"angles.{name} is missing (NaN) for {bad.size} image(s), e.g. image {bad[0]}"
            )
        out[name] = xr.DataArray(values, dims=(IMAGE,))
    return xr.Dataset(out)


def _ctf_inputs(
    ds: xr.Dataset, ctf: bool, like: xr.DataArray, pixel: float | None
) -> tuple[dict | None, list]:
    """The CTF's constants (None without ``ctf``) and its per-image variables, in memory
    and chunked like ``like`` (``CTF_VARIABLES`` then ``CTF_OPTIONAL``; placeholders
    without ``ctf``), every value checked; ``pixel`` is the pixel size already checked by
    :func:`_pixel_size`."""
    if not ctf:
        zeros = _chunked_like(xr.DataArray(np.zeros(like.shape[0]), dims=(IMAGE,)), like)
        return None, [zeros] * (len(CTF_VARIABLES) + len(CTF_OPTIONAL))
    missing = [v for v in CTF_VARIABLES if v not in ds.variables]
    missing += [a for a in CTF_ATTRS if _stack_attr(ds, a) is None]
    missing += ["pixel_size"] if pixel is None else []
    if missing:
        raise ValueError(f"ctf=True needs the stack's {missing} (variables over image / attrs)")
    constants = {}
    for a in CTF_ATTRS:
        value = _stack_attr(ds, a)
        try:
            constants[a] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"the stack's {a} attr must be a number, got {value!r}") from None
    check_ctf_constants(pixel, **constants)
    values = []
    for name in (*CTF_VARIABLES, *CTF_OPTIONAL):
        if name not in ds.variables:
            values.append(xr.DataArray(np.full(like.shape[0], CTF_OPTIONAL[name]), dims=(IMAGE,)))
            continue
        var = ds[name]
        if var.dims != (IMAGE,):
            raise ValueError(f"{name} must be a per-image variable over ('image',), got {var.dims}")
        v = host(var).astype(np.float64)
        if not np.all(np.isfinite(v)):
            bad = np.flatnonzero(~np.isfinite(v))
            raise ValueError(f"{name} is not finite for {bad.size} image(s), e.g. image {bad[0]}")
        values.append(xr.DataArray(v, dims=(IMAGE,)))
    return constants, [_chunked_like(v, like) for v in values]


def _stack_attr(ds: xr.Dataset, name: str) -> Any:
    """The stack's attr ``name``, else its images' (a bare DataArray of images, taken as
    a stack's ``images``, carries its attrs there); None if neither has it."""
    return ds.attrs.get(name, ds["images"].attrs.get(name))


def _check_eps(eps: Any) -> None:
    """The projector's relative accuracy: a number in (0, 1). finufft takes anything
    without a word: NaN and values of 1 or more gave projections ~5% off."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {eps!r}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be a relative accuracy in (0, 1), got {eps}")


def _chunked_like(values: Any, like: xr.DataArray) -> Any:
    """Per-image ``values`` (a DataArray or Dataset over ``image``) in the chunks of the
    stack ``like`` (in memory where it is)."""
    return values.chunk({IMAGE: like.chunks[0]}) if like.chunks else values


def _target_size(n: int, pixel_size: float | None, downsample_to: float | None) -> int:
    """Box size after Fourier cropping to ``downsample_to`` Å/px (even, never larger)."""
    if downsample_to is None or pixel_size is None or pixel_size >= downsample_to:
        return n
    m = int(round(n * pixel_size / downsample_to / 2)) * 2
    return max(8, min(n, m))


# --------------------------------------------------------------------------------------
# the per-chunk kernel
# --------------------------------------------------------------------------------------


def _prepared(images, size, ctf, pixel_size, ctf_values) -> tuple[Any, Any]:
    """A chunk's images, checked and Fourier-cropped to ``size``, and their CTFs, on the
    images' device (the CTFs are computed on the host, then moved)."""
    xp = namespace(images)
    images = xp.astype(images, xp.float64)
    check_finite("images", images)
    if size != images.shape[-1]:
        images = fourier_crop(images, size)
    if ctf is None:
        return images, None
    du, dv, dang, phase, bfactor, scale = (to_numpy(v) for v in ctf_values)
    H = ctf_half_plane(
        size, pixel_size, du, dv, dang, phase_shift=phase, bfactor=bfactor, scale=scale, **ctf
    )
    return images, xp.asarray(H)


def _compare_chunk(
    images,
    rot,
    tilt,
    psi,
    shift_x,
    shift_y,
    defocus_u,
    defocus_v,
    defocus_angle,
    phase_shift,
    bfactor,
    ctf_scale,
    volume,
    gallery,
    *,
    size,
    search,
    step,
    max_shift,
    refine,
    gray,
    ctf,
    pixel_size,
    eps,
    reprojections,
):
    """Per image of a chunk: the angles (given or matched), the comparison scores and,
    with ``reprojections``, the reprojections. CuPy chunks are matched, projected and
    compared on the GPU (the search's bookkeeping stays on the host)."""
    xp = namespace(images)
    scale = size / images.shape[-1]
    ctf_values = (defocus_u, defocus_v, defocus_angle, phase_shift, bfactor, ctf_scale)
    images, H = _prepared(images, size, ctf, pixel_size, ctf_values)
    if search:
        match = match_images(
            volume,
            images,
            gallery,
            ctf=H,
            step=step,
            max_shift=max_shift * scale,
            refine=refine,
            eps=eps,
        )
        rot, tilt, psi = matrix_to_euler(match.A)
        shift_x, shift_y = match.shifts.T / scale
    P = _project_chunk(rot, tilt, psi, shift_x, shift_y, volume, eps=eps, scale=scale, ctf=H)
    c = compare(P, images, circular_mask(size), gray=gray)
    return (
        *(xp.asarray(a, dtype=xp.float64) for a in (rot, tilt, psi, shift_x, shift_y)),
        c.correlation,
        c.cost,
        c.gain,
        c.offset,
        c.residual_mean,
        c.residual_std,
        *((xp.astype(P, xp.float32),) if reprojections else ()),
    )


# --------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------


def compare_reprojections(
    images: xr.Dataset | xr.DataArray,
    volumes: Any,
    angles: Any = None,
    *,
    symmetry: str = "C1",
    angular_sampling: float = 5.0,
    refine: bool = True,
    ctf: bool = False,
    downsample_to: float | None = 3.0,
    gray: bool = False,
    max_shift: float | None = None,
    covariance: bool = True,
    reprojections: bool = False,
    eps: float = 1e-4,
    device: str = "auto",
) -> xr.Dataset:
    """Compare every image with the reprojection of every volume; lazy over image chunks
    (see the module docstring).

    Parameters
    ----------
    images : stack Dataset ``images (image, y, x)`` (square images), chunked along
        ``image``; its attrs ``pixel_size`` and, for ``ctf=True``, ``voltage``, ``cs``,
        ``amplitude_contrast`` and variables ``defocus_u, defocus_v, defocus_angle``
        (optional: ``phase_shift`` (degrees), ``bfactor`` (Å²), ``ctf_scale``; RELION's
        ``rlnPhaseShift``, ``rlnCtfBfactor``, ``rlnCtfScalefactor``).
    volumes : ``(z, y, x)`` / ``(volume, z, y, x)`` array or DataArray, a list of
        volumes, or a Dataset with ``volumes``/``volume``; cubic, the images' box size.
    angles : None (find them by projection matching), ``"stack"`` (the stack's ``rot,
        tilt, psi[, shift_x, shift_y]``), or a Dataset with those variables over image.
    symmetry : point group of the volumes for the search grid (``C1``, ``Cn``, ``Dn``,
        ``T``, ``O``, ``I``; :mod:`scalign.kernels.orientations`).
    angular_sampling : grid step of the search, degrees.
    refine : refine the matched angles and shifts locally (to < 0.1° steps).
    ctf : apply each image's CTF to its reprojections. This and the other flags
        (``refine``, ``gray``, ``covariance``, ``reprojections``) must be booleans.
    downsample_to : Fourier-crop images and volumes to this pixel size (Å/px, > 0) first
        when they are finer (None: never); shifts are reported in the input's pixels.
        The images' and the volumes' pixel sizes (attrs ``pixel_size``: the stack's or
        else its ``images``'; the volumes' or else their Dataset's) must agree where
        both are given.
    gray : fit a gray-level gain and offset; the cost is then the mean L1 residual.
    max_shift : largest shift searched (input pixels; default a quarter of the box), as
        a radius: the shifts with sx² + sy² <= max_shift² (``simulate_particles`` draws each
        axis within ±max_shift, so its shifts reach √2 times that).
    covariance : compute ``z_score_res_cov`` (the JBLD score). It needs every image's
        angles and a few passes over the images, so it computes the matching first
        (like ``align(reference="mean")``); without it the result stays fully lazy.
    reprojections : also return each image's reprojection (angles, shift and CTF
        applied, as compared): ``reprojection (volume, image, y, x)``, or over
        ``(y_down, x_down)`` when the images were downsampled.
    eps : accuracy of the projector's non-uniform FFT, in (0, 1).
    device : {"auto", "cpu", "gpu"}
        Where the chunks are computed (:func:`scalign.execution.to_device`): ``"gpu"``
        moves them to the GPU (CuPy) once (host chunks merged to ~256 MiB,
        :func:`scalign.execution.gpu_batches`), ``"cpu"`` brings CuPy chunks back first,
        ``"auto"`` computes each chunk where it already is. On the GPU the images are
        matched, projected (:func:`scalign.kernels.projection.project`) and scored
        there. The results come back to the host.

    Returns
    -------
    Dataset over ``(volume, image)``: ``rot, tilt, psi, shift_x, shift_y`` (the angles
    used), ``correlation``, ``cost``, ``gain``, ``offset``, ``residual_mean``,
    ``residual_std``, ``z_score_res_mean``, ``z_score_res_std`` (and
    ``z_score_res_cov``); each score's ``attrs["better"]`` says which way is better.
    """
    check_option("device", device, DEVICES)
    # a string such as "no" would count as true: ctf="no" applied the CTF
    for name, flag in (
        ("refine", refine),
        ("ctf", ctf),
        ("gray", gray),
        ("covariance", covariance),
        ("reprojections", reprojections),
    ):
        check_flag(name, flag)
    _check_eps(eps)
    ds = gpu_batches(validate_stack(images), device)
    stack = to_device(ds["images"], device)
    if stack.dims != (IMAGE, Y, X):
        raise ValueError(f"images must be 2-D images (image, y, x), got dims {stack.dims}")
    n = stack.shape[-1]
    if stack.shape[-2] != n:
        raise ValueError(f"images must be square, got {stack.shape[-2]} x {n}")
    V, names, volume_pixel = _volumes(volumes)
    if V.shape[-1] != n:
        raise ValueError(f"volumes have box size {V.shape[-1]} but the images {n}: they must match")
    pixel = _pixel_size(_stack_attr(ds, "pixel_size"), volume_pixel)
    if isinstance(angular_sampling, bool) or not isinstance(angular_sampling, numbers.Real):
        raise TypeError(f"angular_sampling must be a number of degrees, got {angular_sampling!r}")
    if not 0 < angular_sampling <= 90:
        raise ValueError(f"angular_sampling must be in (0, 90] degrees, got {angular_sampling}")
    for name, value in (("downsample_to", downsample_to), ("max_shift", max_shift)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number or None, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive (or None), got {value}")
    given = _angles(ds, angles)
    ctf_params, ctf_values = _ctf_inputs(ds, ctf, stack, pixel)
    size = _target_size(n, pixel, downsample_to)
    small = V if size == n else fourier_crop_volume(V, size).astype(np.float32)
    if given is None:
        gallery = euler_to_matrix(*orientation_grid(angular_sampling, symmetry))
    else:
        orientation_grid(90.0, symmetry)  # validates the symmetry string
        gallery = np.eye(3)[None]  # unused: the angles are given
    shift_limit = n / 4 if max_shift is None else float(max_shift)
    zeros = xr.zeros_like(stack.isel({Y: 0, X: 0}), dtype=np.float64)
    gallery = _shared(gallery, GALLERY_DIMS)
    outputs = {name: ((), np.float64) for name in _PER_IMAGE}
    sizes = {}
    if reprojections:
        dims = (Y, X) if size == n else (f"{Y}_down", f"{X}_down")
        outputs["reprojection"] = (dims, np.float32)
        sizes = dict.fromkeys(dims, size)
    options = {
        "size": size,
        "search": given is None,
        "step": float(angular_sampling),
        "max_shift": shift_limit,
        "refine": refine,
        "gray": gray,
        "ctf": ctf_params,
        "pixel_size": None if pixel is None else float(pixel) * n / size,
        "eps": eps,
    }

    def compared(per_volume: list[xr.Dataset], search: bool, out: dict) -> xr.Dataset:
        """The per-image outputs for every volume, lazily: one map over the chunks per
        volume, with that volume's angles (searched for when ``search``)."""
        results = []
        for volume, per in zip(small, per_volume, strict=True):
            inputs = [stack, *(per[a] for a in ANGLES), *ctf_values]
            mapped = map_batch(
                _compare_chunk,
                [*inputs, _shared(volume, VOLUME_DIMS), gallery],
                [[Y, X]] + [[]] * (len(inputs) - 1) + [list(VOLUME_DIMS), list(GALLERY_DIMS)],
                out,
                sizes=sizes if "reprojection" in out else {},
                kwargs=options | {"search": search, "reprojections": "reprojection" in out},
            )
            results.append(xr.Dataset(mapped))
        return xr.concat(results, dim=VOLUME)

    if given is not None:
        result = compared([given] * len(small), False, outputs)
    elif not covariance:
        result = compared([xr.Dataset({a: zeros for a in ANGLES})] * len(small), True, outputs)
    else:
        # the JBLD passes need every image's angles: match once, then score (and reproject)
        # at the matched angles, so that computing the result does not match again
        matched = compared(
            [xr.Dataset({a: zeros for a in ANGLES})] * len(small),
            True,
            {a: ((), np.float64) for a in _PER_IMAGE},
        )[list(ANGLES)].compute()
        chunked = [
            matched.isel({VOLUME: j}).drop_vars(VOLUME, errors="ignore").pipe(_chunked_like, stack)
            for j in range(len(small))
        ]
        result = compared(chunked, False, outputs)
    # names as an attr: zarr v3 has no stable fixed-width string type for a coordinate
    result = result.assign_coords({VOLUME: np.arange(len(names))})
    if IMAGE in stack.coords:
        result = result.assign_coords({IMAGE: stack[IMAGE].values})
    # global scores: reductions over all the images of each volume
    for name in ("mean", "std"):
        v = result[f"residual_{name}"]
        sd = v.std(IMAGE)
        result[f"z_score_res_{name}"] = abs(v - v.mean(IMAGE)) / sd.where(sd > 0)
    if covariance:
        angles_used = matched if given is None else given.compute()
        result = result.assign(
            z_score_res_cov=_covariance_scores(stack, ctf_values, angles_used, small, options)
        )
    for name, better in DIRECTIONS.items():
        if name in result:
            result[name].attrs["better"] = better
    result.attrs = {
        "symmetry": symmetry,
        "angular_sampling": float(angular_sampling),
        "angles": "matched" if given is None else "given",
        "box_size": size,
        "pixel_size": options["pixel_size"] if pixel is not None else "unknown",
        "gray": int(gray),
        "ctf": int(ctf),
        "volume_names": names,
    }
    return to_device(result, "cpu")


def _covariance_scores(stack, ctf_values, angles, volumes, options) -> xr.DataArray:
    """``z_score_res_cov`` per (volume, image): the JBLD divergence of each residual
    covariance from the JBLD centroid of the volume's images (a few passes over them).
    ``angles``: in memory, over ``image`` (the same for every volume) or ``(volume,
    image)``."""
    keep = ("size", "gray", "ctf", "pixel_size", "eps")
    base = {k: options[k] for k in keep}
    size = options["size"]
    scores = []
    for j, volume in enumerate(volumes):
        per = angles.isel({VOLUME: j}) if VOLUME in angles.dims else angles
        inputs = [stack, *(_chunked_like(per[a], stack) for a in ANGLES), *ctf_values]
        inputs.append(_shared(volume, VOLUME_DIMS))
        core = [[Y, X]] + [[]] * (len(inputs) - 2) + [list(VOLUME_DIMS)]

        def mapped(R, delta, inputs=inputs, core=core):
            return map_batch(
                _covariance_chunk,
                inputs,
                core,
                {"value": (("row", "col"), np.float64)},
                sizes={"row": size, "col": size},
                kwargs=base | {"R": R, "delta": delta, "mode": "inverse"},
            )["value"]

        C_mean = host(mapped(None, 0.0).mean(IMAGE))
        delta = ridge(C_mean[None])
        R, _ = jbld_fixed_point(
            lambda R, mapped=mapped, delta=delta: host(mapped(R, delta).mean(IMAGE)),
            C_mean + delta * np.eye(size),
            max_iterations=20,
            tol=1e-8,
        )
        div = map_batch(
            _covariance_chunk,
            inputs,
            core,
            {"value": ((), np.float64)},
            kwargs=base | {"R": R, "delta": delta, "mode": "jbld"},
        )["value"]
        scores.append(div)
    return xr.concat(scores, dim=VOLUME)


def _covariance_chunk(
    images,
    rot,
    tilt,
    psi,
    shift_x,
    shift_y,
    du,
    dv,
    dang,
    phase_shift,
    bfactor,
    ctf_scale,
    volume,
    *,
    size,
    gray,
    ctf,
    pixel_size,
    eps,
    R,
    delta,
    mode,
):
    """Residual covariances of a chunk (``R is None``), ``((C + R)/2)^-1`` (``inverse``)
    or the JBLD divergence ``J(C, R)`` (``jbld``), with the ridge ``delta``."""
    scale = size / images.shape[-1]
    ctf_values = (du, dv, dang, phase_shift, bfactor, ctf_scale)
    images, H = _prepared(images, size, ctf, pixel_size, ctf_values)
    P = _project_chunk(rot, tilt, psi, shift_x, shift_y, volume, eps=eps, scale=scale, ctf=H)
    C = residual_covariance(compare(P, images, circular_mask(size), gray=gray).residual)
    if R is None:
        return C
    xp = namespace(C)
    R = xp.asarray(R)
    C = C + delta * xp.eye(size, dtype=C.dtype)
    if mode == "inverse":
        return xp.linalg.inv(0.5 * (C + R))
    return jbld(C, R[None])


def _project_chunk(rot, tilt, psi, shift_x, shift_y, volume, *, eps, scale=1.0, ctf=None):
    """Reprojections at ZYZ angles and shifts (input pixels; ``scale`` converts them to
    the volume's box after downsampling), with the CTFs ``ctf`` on the half plane."""
    rot, tilt, psi, shift_x, shift_y = (to_numpy(a) for a in (rot, tilt, psi, shift_x, shift_y))
    shifts = np.stack([shift_x, shift_y], axis=-1) * scale
    return project(volume, euler_to_matrix(rot, tilt, psi), shifts=shifts, ctf=ctf, eps=eps)


def reproject(
    volume: Any,
    angles: xr.Dataset,
    *,
    eps: float = 1e-4,
    chunks: int | None = None,
    device: str = "auto",
) -> xr.DataArray:
    """Projections of one volume at the angles of ``angles`` (``rot, tilt, psi`` and
    optionally ``shift_x, shift_y`` over ``image``), lazily, one task per chunk of angles
    (:func:`scalign.kernels.projection.project`: Fourier slices by a non-uniform FFT of
    accuracy ``eps``, one transform of the volume per chunk).

    ``chunks``: orientations per task (default: the angles' chunks, or about 32 MiB of
    images). ``device="gpu"``: the volume goes to the GPU once and the projections are
    computed and kept there (CuPy chunks; see :func:`scalign.execution.to_device`).

    Parameters
    ----------
    volume : ``(z, y, x)`` array or DataArray (or one volume in the forms
        :func:`compare_reprojections` takes); cubic, finite.
    angles : Dataset
        ``rot, tilt, psi`` (degrees) and optionally ``shift_x, shift_y`` (pixels) over
        one dim (taken as ``image``).
    eps : float
        Accuracy of the projector's non-uniform FFT.
    chunks : int, optional
        Orientations per task (see above).
    device : {"auto", "cpu", "gpu"}

    Returns
    -------
    DataArray
        ``images (image, y, x)``, lazy, float32 (the volume is taken as float32), with
        the angles' coordinates over their dim (renamed ``image``).

    Raises
    ------
    ValueError
        More than one volume, an invalid volume, NaN angles, or an ``eps`` outside
        (0, 1).
    TypeError
        ``angles`` not a Dataset with a 1-D ``rot``, or an ``eps`` that is no number.
    """
    check_option("device", device, DEVICES)
    check_chunks(chunks)
    _check_eps(eps)
    V, _, _ = _volumes(volume)
    if V.shape[0] != 1:
        raise ValueError(f"reproject takes one volume, got {V.shape[0]}")
    if not isinstance(angles, xr.Dataset) or "rot" not in angles or angles["rot"].ndim != 1:
        raise TypeError("angles must be a Dataset with rot, tilt, psi over one dim (image)")
    angles = angles.rename({angles["rot"].dims[0]: IMAGE})
    given = _angles(angles, "stack")
    n = V.shape[-1]
    if chunks is None:
        chunks = angles["rot"].chunks[0] if angles["rot"].chunks else default_chunk((n, n))
    given = given.chunk({IMAGE: chunks})
    out = map_batch(
        _project_chunk,
        [*(given[a] for a in ANGLES), to_device(_shared(V[0], VOLUME_DIMS), device)],
        [[]] * len(ANGLES) + [list(VOLUME_DIMS)],
        {"images": ((Y, X), V.dtype)},
        sizes={Y: n, X: n},
        kwargs={"eps": eps},
    )["images"]
    # the angles' labels of each orientation (its index and other coordinates over it)
    labels = {k: v.variable for k, v in angles.coords.items() if v.dims == (IMAGE,)}
    return out.assign_coords(labels).rename("images")


# --------------------------------------------------------------------------------------
# ranking
# --------------------------------------------------------------------------------------


def _ranking_scores(result: xr.Dataset, score: str) -> xr.DataArray:
    """``result[score]`` over ``(volume, image)``, computed once, for a score that can rank
    volumes."""
    if not isinstance(result, xr.Dataset) or VOLUME not in result.dims:
        raise TypeError("result must be the Dataset returned by compare_reprojections")
    if score in DIRECTIONS and score not in RANKING_SCORES:
        raise ValueError(
            f"score {score!r} cannot rank volumes: each volume's z-scores are normalised over "
            "its own images, so they flag outlier images within a volume and their means "
            f"are alike for every map; rank by one of {RANKING_SCORES}"
        )
    check_option("score", score, tuple(k for k in RANKING_SCORES if k in result))
    return result[score].transpose(VOLUME, IMAGE).compute()


def _assign(values: np.ndarray, higher: bool) -> np.ndarray:
    """Per image (column), the row of the best value; -1 where any value is not finite."""
    valid = np.all(np.isfinite(values), axis=0)
    pick = np.argmax(values, axis=0) if higher else np.argmin(values, axis=0)
    return np.where(valid, pick, -1)


def rank_volumes(result: xr.Dataset, score: str = "correlation") -> pd.DataFrame:
    """Rank the volumes of :func:`compare_reprojections` by one score, best first.

    Every volume is scored on the same images: all of them but those whose score is not
    finite for some volume (e.g. a flat image has no correlation), which are left out for
    every volume. The table has, per volume, its name (``attrs["volume_names"]``), the
    score's mean, standard deviation and standard error over those images, its rank, and
    how many images it explains best (``assigned``: the images whose best score over the
    volumes is this volume's, as for 3-D classes; see :func:`assign_images`).
    ``table.attrs`` holds ``best`` (the best volume's name), ``images`` (how many images
    were ranked on) and ``excluded`` (how many were left out).

    Only the scores that compare volumes on the same footing rank them
    (``RANKING_SCORES``: ``correlation``, ``cost``); the z-scores are normalised per
    volume, so asking for one raises ``ValueError``. A lazy ``result`` is computed once.

    Parameters
    ----------
    result : Dataset
        The output of :func:`compare_reprojections`.
    score : {"correlation", "cost"}
        The score to rank by (it must be in ``result``); higher correlation, lower cost
        is better.

    Returns
    -------
    pandas.DataFrame
        One row per volume, best first: ``rank`` (from 1), ``volume``, ``mean``, ``std``,
        ``sem``, ``assigned``; ``attrs`` ``score``, ``better``, ``best``, ``images``,
        ``excluded``.

    Raises
    ------
    TypeError
        ``result`` is not a Dataset over ``volume``.
    ValueError
        A z-score or unknown ``score``, or no image with a finite score for every volume.
    """
    values = _ranking_scores(result, score)
    higher = DIRECTIONS[score] == "higher"
    v = np.asarray(values.values, dtype=np.float64)
    pick = _assign(v, higher)
    valid = pick >= 0
    used = v[:, valid]
    count = int(valid.sum())
    if count == 0:
        raise ValueError(f"no image has a finite {score} for every volume: nothing to rank")
    std = used.std(axis=1)
    table = pd.DataFrame(
        {
            "volume": result.attrs.get("volume_names", list(result[VOLUME].values)),
            "mean": used.mean(axis=1),
            "std": std,
            "sem": std / math.sqrt(count),
            "assigned": np.bincount(pick[valid], minlength=v.shape[0]),
        }
    )
    table = table.sort_values("mean", ascending=not higher, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.attrs = {
        "score": score,
        "better": DIRECTIONS[score],
        "best": table["volume"][0],
        "images": count,
        "excluded": v.shape[1] - count,
    }
    return table


def assign_images(result: xr.Dataset, score: str = "correlation") -> xr.DataArray:
    """Per image, the index of the volume with the best ``score`` (3-D classification);
    -1 for an image whose score is not finite for some volume. ``score`` as for
    :func:`rank_volumes`.

    Parameters
    ----------
    result : Dataset
        The output of :func:`compare_reprojections` (computed here if lazy).
    score : {"correlation", "cost"}

    Returns
    -------
    DataArray
        ``volume_index (image)``, int64 positions along ``volume`` (-1: unassigned),
        with the result's coordinates over ``image``.

    Raises
    ------
    TypeError, ValueError
        As for :func:`rank_volumes`.
    """
    values = _ranking_scores(result, score)
    pick = _assign(np.asarray(values.values, dtype=np.float64), DIRECTIONS[score] == "higher")
    # each image keeps its labels (its index and the other coordinates over image)
    labels = {k: v.variable for k, v in values.coords.items() if v.dims == (IMAGE,)}
    return xr.DataArray(pick, dims=(IMAGE,), coords=labels, name="volume_index")
