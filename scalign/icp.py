"""Iterative closest point (ICP) registration of unpaired point clouds.

Convention (rows are points, as in :mod:`scalign.kernels.kabsch`): the source ``X``
(m, d) is moved onto the target ``Y`` (k, d) as

.. math::  Y \\approx s\\, X R^T + t \\qquad (\\text{column form } y = s R x + t),

with no pairing between the rows of ``X`` and ``Y`` and ``m != k`` allowed.

Algorithm (Besl & McKay 1992; trimmed ICP, Chetverikov et al. 2002). Iteration ``k``:

1. move the source, :math:`x_i' = s R x_i + t`, and find each point's nearest target point
   :math:`j(i) = \\arg\\min_j \\lVert x_i' - y_j \\rVert` (a ``cKDTree`` built once on the
   target), at distance :math:`\\delta_i`;
2. trim: keep the :math:`N = \\max(d + 1, \\lceil \\text{trim}\\cdot m \\rceil)` pairs with
   the smallest :math:`\\delta_i` (all ``m`` pairs without trimming);
3. :math:`e_k = \\frac1N \\sum_{\\text{kept}} \\delta_i^2`; stop when :math:`e_k = 0` or
   :math:`|e_{k-1} - e_k| \\le \\text{tolerance}\\cdot e_{k-1}`;
4. refit :math:`(R, t, s)` by Kabsch/Umeyama (:func:`scalign.kernels.kabsch.superpose`)
   on the kept pairs :math:`(x_i, y_{j(i)})`, **from scratch on the original source
   points**. Rigid (similarity) motions form a group, so the best total transform for the
   pairs is the best increment composed with the current transform; refitting gives it
   without accumulating the round-off of many composed increments.

Each step cannot increase :math:`e_k` (for a fixed ``N``), so ICP converges, but only to
the local minimum of its start: its capture range is tens of degrees at best (reported:
10° recovered, 45° not), so a 90° or 170° rotation needs the global start
(``init=None``, ``global_search=True``, see :func:`icp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from scipy.stats import special_ortho_group

from scalign.kernels.kabsch import apply_transform, superpose
from scalign.validation import as_points, check_flag, check_iterations, check_spread

# Global search: a fixed-seed subsample of the source keeps the search at a fixed cost
# (~0.1-0.2 s) whatever the cloud size; the final ICP uses every point. Candidates are
# scored on the first _SCORE_POINTS of it and refined on all _SEARCH_POINTS.
_SEARCH_POINTS = 256
_SCORE_POINTS = 128
# Successive halving of the refinement: (candidates kept, ICP refits) per stage. Most of
# the best-scored candidates are far from the answer and show it within a few refits (5
# were too few for a partial overlap with outliers, where the right one rose slowly).
_SEARCH_STAGES = ((16, 10), (4, 10))
_SEARCH_TOLERANCE = 1e-4
# Rotation grids: 3-D super-Fibonacci set of 512 (every rotation within 29° of one, the
# capture range of the short refinement); 2-D every 5°; d >= 4 random (fixed seed).
_GRID_3D = 512
_GRID_2D = 72
_GRID_ND = 256
# Every principal-axis sign pattern up to 10-D (512); above, 512 drawn ones.
_PCA_ALL_SIGNS = 10
_PCA_SIGNS = 512
# Default inlier distance: this multiple of the median nearest-neighbour distance ...
_INLIER_FACTOR = 3.0
# ... but never below this fraction of the target's extent, nor below _ROUNDOFF units in
# the last place of the clouds' precision times it, so that an exact fit (all distances
# round-off: ~1e-7 of the extent for float32 clouds) does not turn its round-off into
# outliers.
_DISTANCE_FLOOR = 1e-9
_ROUNDOFF = 64
# Tolerance on an ``init`` rotation's orthogonality and homogeneous last row.
_INIT_ATOL = 1e-6


@dataclass(frozen=True)
class ICPInfo:
    """Quality and details of an :func:`icp` fit (after Open3D's ``RegistrationResult``).

    Attributes
    ----------
    fitness : float
        Fraction of the **source** points whose nearest target point, after the fit, lies
        within ``max_correspondence_distance`` (all ``m`` points, trimmed or not).
    inlier_rmse : float
        :math:`\\sqrt{\\operatorname{mean}_{\\text{inliers}} \\delta_i^2}` over those points
        (0.0 when there is none).
    rmse : float
        :math:`\\sqrt{e}` over the final (kept, after trimming) pairs: the objective.
    iterations : int
        Number of refits performed (at least 1, even from an exact start).
    converged : bool
        Whether the relative change of :math:`e` fell to ``tolerance`` (or :math:`e = 0`)
        within ``max_iterations``.
    scale : float
        The scale ``s`` (1.0 unless ``scale=True``).
    transformation : (d + 1, d + 1) ndarray
        Homogeneous matrix ``[[s R, t], [0, 1]]``: ``[y; 1] = T [x; 1]``.
    correspondences : (N, 2) ndarray of int
        ``[source index, target index]`` of the final kept pairs, by source index.
    max_correspondence_distance : float
        The inlier distance used for ``fitness`` (given or default).
    """

    fitness: float
    inlier_rmse: float
    rmse: float
    iterations: int
    converged: bool
    scale: float
    transformation: np.ndarray
    correspondences: np.ndarray
    max_correspondence_distance: float


class _Pose(NamedTuple):
    """A batch of similarity transforms: rotation (B, d, d), translation (B, d), scale (B,)."""

    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray

    def take(self, index) -> _Pose:
        return _Pose(self.rotation[index], self.translation[index], self.scale[index])


class _Pairs(NamedTuple):
    """Nearest-neighbour pairs of a batch of moved sources: all (B, m), kept (B, N)."""

    distance: np.ndarray
    target_index: np.ndarray
    kept: np.ndarray
    mse: np.ndarray


class _Run(NamedTuple):
    pose: _Pose
    pairs: _Pairs
    iterations: np.ndarray
    converged: np.ndarray


def icp(
    source: ArrayLike,
    target: ArrayLike,
    max_iterations: int = 50,
    tolerance: float = 1e-7,
    init: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    trim: float | None = None,
    scale: bool = False,
    *,
    max_correspondence_distance: float | None = None,
    global_search: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, ICPInfo]:
    """Register an unpaired point cloud ``source`` onto ``target`` by (trimmed) ICP.

    Finds :math:`(R, t, s)` minimising :math:`\\frac1N \\sum_{\\text{kept}} \\min_j
    \\lVert s R x_i + t - y_j \\rVert^2`; see the module docstring for the iteration.

    Parameters
    ----------
    source : (m, d) array_like
        Points to move, ``d >= 2``, at least ``d + 1`` of them.
    target : (k, d) array_like
        Fixed points; ``k`` may differ from ``m`` and the rows need not correspond.
    max_iterations : int
        Most refits of the final ICP.
    tolerance : float
        Stop when the relative change of the mean squared pair distance,
        :math:`|e_{k-1} - e_k| / e_{k-1}`, is at most this.
    init : (d + 1, d + 1) array_like or (R, t) tuple, optional
        Starting transform ``[[s R, t], [0, 1]]`` or a rotation ``R`` (d, d), optionally
        times a scale, and a translation ``t`` (d,). Given, no global search is made. With
        ``scale=False`` a scaled ``init`` only sets the first correspondences: the refits
        have ``s = 1``.
    trim : float in (0, 1], optional
        Fraction of the pairs kept at each iteration, the closest ones (trimmed ICP): set
        it at or below the expected overlap when the clouds overlap partially or carry
        outliers. ``None`` (default) keeps them all.
    scale : bool
        Fit an isotropic scale of the source (Umeyama).
    max_correspondence_distance : float, optional
        Inlier distance for ``info.fitness`` and ``info.inlier_rmse`` only (it does not
        change the fit). Default: 3 × the median nearest-neighbour distance of the source
        points after the fit (at least 1e-9, and 64 × the clouds' machine epsilon (7.6e-6
        for float32), × the largest target coordinate: an exact fit's round-off stays in).
    global_search : bool
        With ``init=None``, start from the best of a coarse rotation search (below);
        otherwise start from the identity rotation with the centroids superposed.

    Returns
    -------
    source_aligned : (m, d) ndarray
        ``s source R^T + t`` in float64.
    R : (d, d) ndarray
        Proper rotation.
    t : (d,) ndarray
    info : ICPInfo
        ``fitness``, ``inlier_rmse``, ``rmse``, ``iterations``, ``converged``, ``scale``,
        ``transformation``, ``correspondences``, ``max_correspondence_distance``.

    Notes
    -----
    Global search (``init=None``): candidate rotations are the identity, the principal-axis
    matches :math:`R = E_Y \\operatorname{diag}(\\pm 1) E_X^T` of the centred covariance
    eigenvectors (every sign pattern with :math:`\\det R = +1`: 4 in 3-D, 2 in 2-D) and a
    grid (3-D: 512 super-Fibonacci rotations, Alexa 2022, every rotation within 29° of
    one; 2-D: every 5°; d >= 4: 256 random rotations, fixed seed). Each candidate is
    placed with the centroids superposed (and, with ``scale``, the scale
    :math:`\\sqrt{\\operatorname{tr} C_Y / \\operatorname{tr} C_X}`) and scored by the
    trimmed mean squared nearest-neighbour distance of 128 source points (fixed seed); the
    16 best get a short batched ICP (10 refits) on 256 source points, the 4 best of those 10
    more refits, and the best result (lowest trimmed mean squared distance, divided by
    :math:`s^2` with ``scale`` so that shrinking the source is not rewarded) starts the
    full ICP. This recovers rotations of any angle of clouds without symmetry; a symmetric
    cloud has several equally good answers. Above 10 dimensions 512 of the 2^(d-1)
    principal-axis sign patterns are drawn (fixed seed).

    Only NumPy (CPU) arrays are supported.
    """
    X, Y, eps = _check_clouds(source, target)
    check_iterations(max_iterations, tolerance, "tolerance")
    trim = _check_fraction("trim", trim)
    max_distance = _check_distance(max_correspondence_distance)
    check_flag("scale", scale)
    check_flag("global_search", global_search)
    d = X.shape[1]
    tree = cKDTree(Y)
    keep_fraction = 1.0 if trim is None else trim
    if init is not None:
        start = _parse_init(init, d)
    elif global_search:
        start = _global_start(X, Y, tree, keep_fraction, scale)
    else:
        start = _centroid_pose(X, Y, np.eye(d)[None], 1.0)
    run = _refine(
        X, Y, tree, start, _n_keep(len(X), keep_fraction, d), max_iterations, tolerance, scale
    )
    pose = run.pose.take(0)
    aligned = apply_transform(X, pose.rotation, pose.translation, pose.scale)
    info = _info(run, Y, max_distance, eps)
    return aligned, pose.rotation, pose.translation, info


# --- input checks -------------------------------------------------------------------------


def _check_clouds(source: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray, float]:
    """Two finite (n, d) clouds of the same ``d >= 2`` with at least ``d + 1`` points, in
    float64, and the machine epsilon of the precision they came in (0 for integers)."""
    clouds = []
    eps = 0.0
    for name, cloud in (("source", source), ("target", target)):
        arr = as_points(name, cloud)
        if arr.ndim != 2:
            raise ValueError(f"{name} must have shape (n_points, d), got shape {arr.shape}")
        if arr.shape[1] < 2:
            raise ValueError(f"{name} must be at least 2-dimensional, got d = {arr.shape[1]}")
        if np.issubdtype(arr.dtype, np.floating):
            eps = max(eps, float(np.finfo(arr.dtype).eps))
        clouds.append(arr.astype(np.float64, copy=False))
    X, Y = clouds
    if X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"source is {X.shape[1]}-dimensional but target is {Y.shape[1]}-dimensional"
        )
    d = X.shape[1]
    for name, arr in (("source", X), ("target", Y)):
        if len(arr) < d + 1:
            raise ValueError(
                f"{name} has {len(arr)} point(s) in {d} dimensions: at least {d + 1} are needed"
            )
        check_spread(name, arr)
    return X, Y, eps


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool | np.bool_)


def _check_fraction(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(f"{name} must be a number in (0, 1] or None, got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _check_distance(value: float | None) -> float | None:
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(f"max_correspondence_distance must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"max_correspondence_distance must be positive and finite, got {value!r}")
    return float(value)


def _parse_init(init, d: int) -> _Pose:
    """``init`` as a batch of one pose; the linear part must be ``s R`` with R proper."""
    if isinstance(init, tuple | list) and len(init) == 2:
        A = _finite_matrix("init rotation", init[0], (d, d))
        t = _finite_matrix("init translation", init[1], (d,))
    else:
        M = _finite_matrix("init", init, (d + 1, d + 1))
        bottom = np.r_[np.zeros(d), 1.0]
        if not np.allclose(M[d], bottom, rtol=0, atol=_INIT_ATOL):
            raise ValueError(f"init's last row must be {bottom.tolist()}, got {M[d].tolist()}")
        A, t = M[:d, :d], M[:d, d]
    det = np.linalg.det(A)
    if not det > 0:
        raise ValueError(f"init's rotation must be a proper rotation (det > 0), det = {det:.3g}")
    s = det ** (1.0 / d)
    R = A / s
    if not np.allclose(R.T @ R, np.eye(d), rtol=0, atol=_INIT_ATOL):
        raise ValueError("init's rotation must be orthogonal (optionally times a scale)")
    return _Pose(R[None], t[None], np.array([s]))


def _finite_matrix(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array of shape {shape}") from exc
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite (NaN or inf) values")
    return arr


# --- the ICP iteration --------------------------------------------------------------------


def _n_keep(m: int, fraction: float, d: int) -> int:
    """Pairs kept by trimming: ``ceil(fraction m)``, at least the ``d + 1`` a fit needs."""
    # Rounded first: 0.07 * 100 is 7.000000000000001 in floating point, not 7.
    return min(m, max(d + 1, math.ceil(round(fraction * m, 9))))


def _correspond(tree: cKDTree, X: np.ndarray, pose: _Pose, n_keep: int) -> _Pairs:
    """Nearest target point of every moved source point, for each pose of the batch."""
    B, (m, d) = len(pose.scale), X.shape
    moved = pose.scale[:, None, None] * (X @ np.swapaxes(pose.rotation, -1, -2))
    moved += pose.translation[:, None, :]
    distance, index = tree.query(moved.reshape(-1, d), workers=-1)
    distance, index = distance.reshape(B, m), index.reshape(B, m)
    if n_keep < m:
        kept = np.sort(np.argpartition(distance, n_keep - 1, axis=1)[:, :n_keep], axis=1)
    else:
        kept = np.broadcast_to(np.arange(m), (B, m))
    kept_distance = np.take_along_axis(distance, kept, axis=1)
    return _Pairs(distance, index, kept, np.mean(kept_distance**2, axis=1))


def _fit_pairs(X: np.ndarray, Y: np.ndarray, pairs: _Pairs, scale: bool) -> _Pose:
    """Kabsch/Umeyama of the original source points onto their kept partners (batched)."""
    partners = np.take_along_axis(pairs.target_index, pairs.kept, axis=1)
    fit = superpose(X[pairs.kept], Y[partners], scale=scale)
    return _Pose(fit.rotation, fit.translation, fit.scale)


def _refine(
    X: np.ndarray,
    Y: np.ndarray,
    tree: cKDTree,
    pose: _Pose,
    n_keep: int,
    max_iterations: int,
    tolerance: float,
    scale: bool,
) -> _Run:
    """ICP from each pose of the batch; converged items are frozen while others go on.

    One to ``max_iterations`` refits per item; an item converges when its mean squared
    pair distance ``e`` reaches 0 or changes by at most ``tolerance * e`` in one refit.
    """
    pairs = _correspond(tree, X, pose, n_keep)
    # At least one refit, even from an exact start, so that the result is always a fit of
    # the requested model (a scaled ``init`` with ``scale=False`` comes back rigid).
    converged = np.zeros(len(pairs.mse), dtype=bool)
    iterations = np.zeros(len(converged), dtype=int)
    for _ in range(max_iterations):
        active = ~converged
        if not active.any():
            break
        fit = _fit_pairs(X, Y, pairs, scale)
        pose = _Pose(
            np.where(active[:, None, None], fit.rotation, pose.rotation),
            np.where(active[:, None], fit.translation, pose.translation),
            np.where(active, fit.scale, pose.scale),
        )
        iterations += active
        new = _correspond(tree, X, pose, n_keep)
        change = np.abs(pairs.mse - new.mse)
        converged |= active & ((new.mse == 0) | (change <= tolerance * pairs.mse))
        pairs = new
    return _Run(pose, pairs, iterations, converged)


# --- global start -------------------------------------------------------------------------


def _centroid_pose(X: np.ndarray, Y: np.ndarray, rotations: np.ndarray, s: float) -> _Pose:
    """Each rotation about the source centroid, moved onto the target centroid."""
    cx, cy = X.mean(axis=0), Y.mean(axis=0)
    t = cy - s * (rotations @ cx)
    return _Pose(rotations, t, np.full(len(rotations), s))


def _principal_axes(P: np.ndarray) -> np.ndarray:
    """Covariance eigenvectors as columns, largest variance first."""
    _, vectors = np.linalg.eigh(np.cov(P, rowvar=False))
    return vectors[:, ::-1]


def _principal_rotations(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``E_Y diag(signs) E_X^T`` for every sign pattern giving det +1 (2^(d-1) of them).

    An eigenvector's sign is arbitrary, so each axis of ``X`` may match its axis of ``Y``
    either way round; half of the patterns are reflections and are left out.
    """
    Ex, Ey = _principal_axes(X), _principal_axes(Y)
    d = X.shape[1]
    wanted = np.sign(np.linalg.det(Ex) * np.linalg.det(Ey))
    if d <= _PCA_ALL_SIGNS:
        signs = np.array(np.meshgrid(*[[1.0, -1.0]] * d, indexing="ij")).reshape(d, -1).T
    else:
        signs = np.random.default_rng(0).choice([1.0, -1.0], (2 * _PCA_SIGNS, d))
    signs = signs[np.prod(signs, axis=1) == wanted][:_PCA_SIGNS]
    return (Ey[None] * signs[:, None, :]) @ Ex.T[None]


def _super_fibonacci(n: int) -> np.ndarray:
    """``n`` near-uniform 3-D rotations (super-Fibonacci spiral, Alexa CVPR 2022)."""
    s = np.arange(n) + 0.5
    r, r_c = np.sqrt(s / n), np.sqrt(1.0 - s / n)
    alpha = 2.0 * np.pi * s / np.sqrt(2.0)
    beta = 2.0 * np.pi * s / 1.533751168755204288118041
    quat = np.stack([r * np.sin(alpha), r * np.cos(alpha), r_c * np.sin(beta), r_c * np.cos(beta)])
    return Rotation.from_quat(quat.T).as_matrix()


def _rotation_grid(d: int) -> np.ndarray:
    """The coarse rotation grid of the global search, (n, d, d)."""
    if d == 2:
        angle = 2.0 * np.pi * np.arange(_GRID_2D) / _GRID_2D
        c, s = np.cos(angle), np.sin(angle)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    if d == 3:
        return _super_fibonacci(_GRID_3D)
    return special_ortho_group.rvs(d, size=_GRID_ND, random_state=0)


def _global_start(
    X: np.ndarray, Y: np.ndarray, tree: cKDTree, keep_fraction: float, scale: bool
) -> _Pose:
    """Best start among the principal-axis and grid rotations (see :func:`icp`, Notes)."""
    m, d = X.shape
    # Shuffled even when small: the scored prefix of an ordered cloud (a chain, a scan
    # line) would otherwise be one end of it.
    sample = X[np.random.default_rng(0).permutation(m)[:_SEARCH_POINTS]]
    # sqrt(tr C_Y / tr C_X) matches the clouds' spreads: the overlap-agnostic scale guess.
    s0 = float(np.sqrt(Y.var(axis=0).sum() / X.var(axis=0).sum())) if scale else 1.0
    rotations = np.concatenate([np.eye(d)[None], _principal_rotations(X, Y), _rotation_grid(d)])
    candidates = _centroid_pose(X, Y, rotations, s0)
    score_points = sample[:_SCORE_POINTS]
    score = _correspond(
        tree, score_points, candidates, _n_keep(len(score_points), keep_fraction, d)
    )
    pose = candidates.take(np.argsort(score.mse, kind="stable"))
    n_keep = _n_keep(len(sample), keep_fraction, d)
    for n_candidates, iterations in _SEARCH_STAGES:
        run = _refine(
            sample,
            Y,
            tree,
            pose.take(slice(0, n_candidates)),
            n_keep,
            iterations,
            _SEARCH_TOLERANCE,
            scale,
        )
        # Ranked in source units (divided by s^2): a shrunken source sits close to some
        # target points and would otherwise win.
        pose = run.pose.take(np.argsort(run.pairs.mse / run.pose.scale**2, kind="stable"))
    return pose.take(slice(0, 1))


# --- result -------------------------------------------------------------------------------


def _homogeneous(rotation: np.ndarray, translation: np.ndarray, s: float) -> np.ndarray:
    d = len(translation)
    T = np.eye(d + 1)
    T[:d, :d] = s * rotation
    T[:d, d] = translation
    return T


def _info(run: _Run, Y: np.ndarray, max_distance: float | None, eps: float) -> ICPInfo:
    """Open3D-style quality of the final pose (batch of one); ``eps``: the machine epsilon
    of the clouds as given."""
    pose, pairs = run.pose.take(0), run.pairs
    distance = pairs.distance[0]
    if max_distance is None:
        floor = max(_DISTANCE_FLOOR, _ROUNDOFF * eps) * float(np.abs(Y).max())
        max_distance = max(_INLIER_FACTOR * float(np.median(distance)), floor)
    inlier = distance <= max_distance
    inlier_rmse = float(np.sqrt(np.mean(distance[inlier] ** 2))) if inlier.any() else 0.0
    kept = pairs.kept[0]
    return ICPInfo(
        fitness=float(np.mean(inlier)),
        inlier_rmse=inlier_rmse,
        rmse=float(np.sqrt(pairs.mse[0])),
        iterations=int(run.iterations[0]),
        converged=bool(run.converged[0]),
        scale=float(pose.scale),
        transformation=_homogeneous(pose.rotation, pose.translation, float(pose.scale)),
        correspondences=np.stack([kept, pairs.target_index[0][kept]], axis=1),
        max_correspondence_distance=max_distance,
    )
