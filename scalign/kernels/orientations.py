"""Point-group symmetry, asymmetric units and orientation grids for projection matching.

Conventions
-----------
Orientations are the ZYZ matrices ``A = Rz(psi) Ry(tilt) Rz(rot)`` of
:mod:`scalign.kernels.euler` (RELION / Xmipp): ``A`` takes the volume's coordinates
``(x, y, z)`` into the projection frame, the projection is ``P_A(x, y) = ∫ V(Aᵀ u) dz`` with
``u = (x, y, z)``, and the viewing direction is ``d = Aᵀ e_z`` (the third row of ``A``).

**Symmetry.** A point group ``G`` is a set of rotation matrices ``S`` acting on the volume's
coordinates: a volume with that symmetry satisfies ``V(S x) = V(x)`` for every ``S`` in
``G``. Every group here is closed under transposition (``Sᵀ = S⁻¹``), so ``V(Sᵀ x) = V(x)``
as well and the "active or passive" reading of ``S`` does not matter.

**How A and S combine.** For ``S`` in ``G``,

.. math::  P_{AS}(x, y) = \\int V(S^T A^T u)\\, dz = \\int V(A^T u)\\, dz = P_A(x, y),

because ``Sᵀ`` is in ``G``. The orientations that give identical projections of a symmetric
volume are therefore the right coset ``A G = {A S : S ∈ G}`` (right multiplication; ``S A``
is *not* equivalent in general). Their viewing directions are ``(A S)ᵀ e_z = Sᵀ d``; since
``Sᵀ`` runs over ``G`` as ``S`` does, the group acts on viewing directions as ``d → S d``
and the orbit of ``d`` is ``{S d : S ∈ G}``. The distance between orientations "modulo
symmetry" is ``min_S angle(A, B S)`` (:func:`symmetry_distance`).

**Groups** (:func:`symmetry_matrices`; golden ratio ``τ = (1 + √5) / 2``):

* ``Cn`` (n ≥ 1): rotations by ``360° k / n`` about ``z``, ``k = 0 … n-1``.
* ``Dn`` (n ≥ 2): ``Cn`` and the ``n`` two-fold axes in the x-y plane at azimuths
  ``180° k / n``, which include ``x`` (RELION / Xmipp: ``rot_axis n 0 0 1``,
  ``rot_axis 2 1 0 0``). Order ``2n``.
* ``T`` (12): two-fold axes along ``x``, ``y``, ``z`` and three-folds along the body
  diagonals ``(±1, ±1, ±1)/√3``: the signed even-permutation matrices of determinant +1.
  *Not* RELION's ``T``, which puts a three-fold on ``z`` (``rot_axis 3 0 0 1``,
  ``rot_axis 2 0 √(2/3) 1/√3``): RELION's ``T`` is ``Q T Qᵀ`` for the rotation ``Q`` that
  takes ``(1, 1, 1)/√3`` to ``z`` and ``x`` to ``(0, √(2/3), 1/√3)``.
* ``O`` (24): four-folds along ``x``, ``y``, ``z``, three-folds along the body diagonals,
  two-folds along ``(±1, 1, 0)/√2`` and permutations: all signed permutation matrices of
  determinant +1 (RELION: ``rot_axis 4 0 0 1``, ``rot_axis 3 1 1 1``; the same group).
* ``I`` = ``I2`` (60, RELION's default, Crowther's "222" setting): two-folds along ``x``,
  ``y``, ``z``; five-folds along the cyclic permutations of ``(±1, 0, ±τ)`` (so one is
  ``(1, 0, τ)/√(1+τ²) = (0.5257, 0, 0.8507)``, in the x-z plane, 31.72° from ``z``);
  three-folds along ``(±1, ±1, ±1)/√3`` and the cyclic permutations of ``(0, ±1/τ, ±τ)/√3``
  (one is RELION's ``(0, 0.3568, 0.9342)``).
* ``I1`` (RELION's "no-Crowther 222"): ``Rz(90°) I2 Rz(90°)ᵀ``, two-folds along ``x``,
  ``y``, ``z``, five-folds along the cyclic permutations of ``(0, ±1, ±τ)`` (one is RELION's
  ``(0.8507, 0, -0.5257)``).
* ``I3`` (RELION's "52" setting): ``Ry(-θ) I2 Ry(-θ)ᵀ`` with ``θ = atan(1/τ) = 31.72°``:
  a five-fold along ``z`` and a two-fold along ``(-sin θ, 0, cos θ) = (-0.5257, 0, 0.8507)``.
* ``I4``: ``Ry(θ) I2 Ry(θ)ᵀ``: a five-fold along ``z`` and a two-fold along
  ``(0.5257, 0, 0.8507)`` (RELION's other five-fold is ``(2/√5, 0, 1/√5)``).

``Ry(t)`` and ``Rz(t)`` above are the active (counter-clockwise) rotations. Relation to
scipy: ``Rotation.create_group`` gives the same sets for ``"Cn"``, ``"Dn"`` (``axis="Z"``),
``"T"`` and ``"O"``, and its ``"I"`` is our ``I1`` (so ``I2 = Rz(-90°) I_scipy Rz(-90°)ᵀ``).
The groups are built here from their axes, independently of scipy.

**Asymmetric unit.** Fix the generic reference direction :data:`ASU_REFERENCE`
``r0 = (0.15, 0.10, 1)/‖·‖`` (tilt 10.3°, rot 33.7°): off the z axis and off the x-y plane,
so on no axis of any ``Cn`` or ``Dn``, and at least 10.2° from every rotation axis of the
polyhedral groups. The canonical representative of a direction ``d`` is the ``S d``
(``S ∈ G``) closest to ``r0``, i.e. with the largest ``(S d)·r0``; scores within
``1e-12 |d|`` of the largest count as tied and ties go to the first ``S`` in the order of
:func:`symmetry_matrices` (identity first). ``d`` is in the asymmetric unit iff the
identity is (one of) the best, i.e. ``d·r0 ≥ max_S (S d)·r0 - 1e-12 |d|``. Since
``(S d)·r0 = d·(Sᵀ r0)``, the unit is the closed spherical Voronoi (Dirichlet) cell of
``r0`` among its orbit ``{S r0}``: a convex spherical polygon of area ``4π/|G|`` (for
``Cn`` a lune of width ``360°/n`` centred on ``r0``'s azimuth, poles included). Interior
directions have exactly one equivalent in the unit; a direction on the cell's boundary is
kept together with its boundary mates (on the paired edge), so a grid that is invariant
under the group never loses its points on rotation axes (which lie on cell boundaries).

**Grids.** :func:`sphere_directions` ``(step, symmetry)`` gives near-uniform unit
directions with the density of a hexagonal lattice of spacing ``step``:
``N ≈ 4π / (PACKING · s²)``, ``s = radians(step)``, ``PACKING = √3/2`` (the area per point
of that lattice is ``(√3/2) s²``; its covering radius is ``s/√3 ≈ 0.58 s``). For ``C1``
it is a Fibonacci (golden-spiral) lattice; for the other groups it is a lattice mapped
onto itself by every ``S`` of the group, so that restricting it to the asymmetric unit
loses nothing at the seams: the union of ``{S d}`` over the group and over the retained
directions is the whole lattice again. ``Cn``, ``Dn``: iso-latitude rings (HEALPix-like)
with a multiple of ``n`` points per ring; ``T`` and ``I1`` … ``I4``: the geodesic
(barycentric) subdivision of the icosahedron whose vertices are the five-fold axes of the
``I`` setting (``T`` is a subgroup of ``I2``); ``O``: that of the tetrakis hexahedron
(vertices on the four- and three-fold axes). Measured covering radii (largest angle from
2·10⁵ random directions to the nearest grid direction): 0.62-0.70 ``step`` for ``step``
from 1° to 5°, at most 0.72 ``step`` up to 30° and at most 0.83 ``step`` for any ``step``.
:func:`orientation_grid` keeps the directions in the asymmetric unit (about ``N/|G|``) and
adds in-plane angles ``psi``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import combinations, permutations, product

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "ASU_REFERENCE",
    "PACKING",
    "asymmetric_unit",
    "orientation_grid",
    "orientation_to_asymmetric_unit",
    "sphere_directions",
    "symmetry_distance",
    "symmetry_matrices",
    "to_asymmetric_unit",
]

TAU = (1.0 + np.sqrt(5.0)) / 2.0
# Reference direction of the asymmetric unit (module docstring): generic for every group.
ASU_REFERENCE = np.array([0.15, 0.10, 1.0]) / np.linalg.norm([0.15, 0.10, 1.0])
# Area per direction of sphere_directions as a fraction of step²: a hexagonal lattice with
# nearest-neighbour spacing s has (√3/2) s² per point (covering radius s/√3 ≈ 0.58 s).
PACKING = np.sqrt(3.0) / 2.0
# Relative tolerance under which two asymmetric-unit scores count as tied: far above the
# rounding of a 3-vector dot product (~1e-16), far below any meaningful angle.
_TIE = 1e-12
# Rows per block when scoring N items against G group elements: bounds the (rows, G)
# float64 temporaries to ~32 MiB for G = 60 whatever N is.
_BLOCK = 2**16

_ACCEPTED = (
    "'C1', 'Cn' (n >= 1), 'Dn' (n >= 2), 'T', 'O', 'I' (= 'I2'), 'I1', 'I2', 'I3', 'I4' "
    "(case-insensitive)"
)
_PATTERN = re.compile(r"(?:([CD])(\d+)|(T|O|I[1-4]?))")


def _rotation(axis: ArrayLike, degrees: float) -> np.ndarray:
    """Active rotation matrix by ``degrees`` about ``axis`` (Rodrigues, right-handed)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    a = np.radians(degrees)
    K = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(a) * K + (1.0 - np.cos(a)) * (K @ K)


def _closure(generators: list[np.ndarray]) -> np.ndarray:
    """The group generated by ``generators``, identity first (breadth-first products).

    Only used for the icosahedral group (60 elements, built once and cached), so a plain
    loop is fine; products equal to an existing element within 1e-9 are the same element.
    """
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new: list[np.ndarray] = []
        for a in frontier:
            for g in generators:
                m = a @ g
                known = np.asarray(elements + new)
                if not np.any(np.max(np.abs(known - m), axis=(1, 2)) < 1e-9):
                    new.append(m)
        elements += new
        frontier = new
    return np.asarray(elements)


def _cyclic(n: int) -> np.ndarray:
    a = 2.0 * np.pi * np.arange(n) / n
    c, s = np.cos(a), np.sin(a)
    G = np.zeros((n, 3, 3))
    G[:, 0, 0], G[:, 0, 1], G[:, 1, 0], G[:, 1, 1], G[:, 2, 2] = c, -s, s, c, 1.0
    return G


def _signed_permutations(even_only: bool) -> np.ndarray:
    """Signed permutation matrices of determinant +1 (O), or those of even permutations (T)."""
    out = []
    for perm in permutations(range(3)):  # (0, 1, 2) first: the identity leads
        for signs in product((1.0, -1.0), repeat=3):
            M = np.zeros((3, 3))
            M[np.arange(3), perm] = signs
            if round(np.linalg.det(M)) != 1:
                continue
            if even_only and round(np.linalg.det(np.abs(M))) != 1:
                continue
            out.append(M)
    return np.asarray(out)


def _icosahedral_i2() -> np.ndarray:
    # A two-fold on z and the five-fold (1, 0, τ) 31.7° from it generate I (a²=b⁵=(ab)³=1).
    return _closure([_rotation([0.0, 0.0, 1.0], 180.0), _rotation([1.0, 0.0, TAU], 72.0)])


def _conjugate(Q: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``Q S Qᵀ`` for each S: the same group with every axis ``u`` moved to ``Q u``."""
    return Q @ G @ Q.T


def _canonical_name(symmetry: object) -> str:
    if not isinstance(symmetry, str):
        raise TypeError(
            f"symmetry must be a str, one of {_ACCEPTED}; got {type(symmetry).__name__}"
        )
    name = symmetry.upper()
    m = _PATTERN.fullmatch(name)
    if m is None:
        raise ValueError(f"symmetry must be one of {_ACCEPTED}; got {symmetry!r}")
    if m.group(1):
        n = int(m.group(2))
        if n < (1 if m.group(1) == "C" else 2):
            raise ValueError(f"symmetry must be one of {_ACCEPTED}; got {symmetry!r}")
        return f"{m.group(1)}{n}"
    return "I2" if name == "I" else name


def _frame(name: str) -> np.ndarray:
    """Rotation ``Q`` taking the ``I2`` setting to setting ``name`` (identity if not I1/3/4)."""
    theta = np.degrees(np.arctan(1.0 / TAU))  # I2's five-fold (1, 0, τ) is θ from z
    if name == "I1":
        return _rotation([0.0, 0.0, 1.0], 90.0)
    if name == "I3":
        return _rotation([0.0, 1.0, 0.0], -theta)
    if name == "I4":
        return _rotation([0.0, 1.0, 0.0], theta)
    return np.eye(3)


@lru_cache(maxsize=64)
def _group(name: str) -> np.ndarray:
    if name[0] == "C":
        G = _cyclic(int(name[1:]))
    elif name[0] == "D":
        C = _cyclic(int(name[1:]))
        # Rx(180°) Rz(360° k/n) is the two-fold about the in-plane axis at azimuth -180° k/n
        G = np.concatenate([C, np.diag([1.0, -1.0, -1.0]) @ C])
    elif name == "T":
        G = _signed_permutations(even_only=True)
    elif name == "O":
        G = _signed_permutations(even_only=False)
    else:
        G = _conjugate(_frame(name), _icosahedral_i2())
    # rounding leaves ~1e-17 where the exact entry is 0 (cos 90°, conjugation): snap those,
    # and make the identity exact, so that exact structure (axes on z, ties) survives
    G = np.where(np.abs(G) < 1e-15, 0.0, G)
    G[0] = np.eye(3)
    G.setflags(write=False)
    return G


def symmetry_matrices(symmetry: str) -> np.ndarray:
    """Rotation matrices of a point group acting on the volume's coordinates.

    A volume with this symmetry satisfies ``V(S x) = V(x)`` for each returned ``S``; the
    axis conventions (``z`` the n-fold axis of ``Cn``/``Dn``, ``x`` a two-fold of ``Dn``,
    two-folds of ``T``/``I`` and four-folds of ``O`` along ``x``, ``y``, ``z``, RELION's
    ``I1`` … ``I4`` settings) are listed in the module docstring.

    Parameters
    ----------
    symmetry : str
        ``"C1"``, ``"Cn"`` (n ≥ 1), ``"Dn"`` (n ≥ 2), ``"T"``, ``"O"``, ``"I"`` (= ``"I2"``),
        ``"I1"`` … ``"I4"``; case-insensitive.

    Returns
    -------
    (G, 3, 3) float64 array, the identity first; ``G`` = n, 2n, 12, 24 or 60. A fresh
    copy: the groups are built once and cached.

    Raises
    ------
    TypeError
        ``symmetry`` is not a ``str``.
    ValueError
        ``symmetry`` is not one of the accepted names (e.g. ``"C0"``, ``"D1"``, ``""``).
    """
    return _group(_canonical_name(symmetry)).copy()


def _as_directions(directions: ArrayLike) -> tuple[np.ndarray, tuple[int, ...]]:
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim == 0 or d.shape[-1] != 3:
        raise ValueError(f"directions must have shape (..., 3), got {d.shape}")
    return d.reshape(-1, 3), d.shape[:-1]


def _representative_index(d: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Index of the ``S`` maximising ``(S d)·r0 = d·(Sᵀ r0)`` for each row of ``d`` (N, 3).

    Scores within ``_TIE · |d|`` of the best are tied and the first index among them wins:
    exact ties in exact arithmetic (points on the cell's boundary, e.g. rotation axes) then
    go to the identity whatever the rounding of the products.
    """
    orbit = np.einsum("gji,j->gi", G, ASU_REFERENCE)  # Sᵀ r0, (G, 3)
    idx = np.empty(len(d), dtype=np.intp)
    for start in range(0, len(d), _BLOCK):  # blocks bound the (N, G) score array
        block = d[start : start + _BLOCK]
        scores = block @ orbit.T
        tol = _TIE * np.linalg.norm(block, axis=1, keepdims=True)
        near_best = scores >= scores.max(axis=1, keepdims=True) - tol
        idx[start : start + _BLOCK] = np.argmax(near_best, axis=1)  # first True
    return idx


def to_asymmetric_unit(directions: ArrayLike, symmetry: str) -> tuple[np.ndarray, np.ndarray]:
    """Canonical representatives of viewing directions under a point group.

    The representative of ``d`` is ``S_k d`` with ``k = argmax_g (S_g d)·r0`` over the
    group of :func:`symmetry_matrices` and ``r0`` = :data:`ASU_REFERENCE`, ``k`` the first
    index whose score is within ``1e-12 |d|`` of the best (so the identity wins ties). The
    representative lies in the asymmetric unit and is its own representative (module
    docstring). Only the direction of ``d`` matters (a positive scale keeps ``k``; the
    norm is kept).

    Parameters
    ----------
    directions : (..., 3) array_like
        Viewing directions ``d = Aᵀ e_z`` in the volume's frame.
    symmetry : str
        Point group, see :func:`symmetry_matrices`.

    Returns
    -------
    representatives : (..., 3) float64 array, ``S_k d``.
    index : (...) int array, ``k``: the row of :func:`symmetry_matrices` used. The
        orientation ``A S_kᵀ`` (equivalent to ``A``) has viewing direction ``S_k d``.
    """
    G = _group(_canonical_name(symmetry))
    d, shape = _as_directions(directions)
    idx = _representative_index(d, G)
    reps = np.einsum("nij,nj->ni", G[idx], d)
    return reps.reshape(shape + (3,)), idx.reshape(shape)


def asymmetric_unit(directions: ArrayLike, symmetry: str) -> np.ndarray:
    """Mask of the viewing directions that lie in the asymmetric unit of a point group.

    ``d`` is in the unit iff ``d·r0 ≥ max_S (S d)·r0 - 1e-12 |d|`` over the group, i.e.
    iff ``d`` is its own representative under :func:`to_asymmetric_unit`: the closed
    Voronoi cell of ``r0`` = :data:`ASU_REFERENCE` among ``{S r0}``. A direction inside
    the cell has no other equivalent in it; one on the cell's boundary (measure zero) is
    in it together with its equivalents on the paired boundary edge.

    Parameters
    ----------
    directions : (..., 3) array_like
    symmetry : str
        Point group, see :func:`symmetry_matrices`.

    Returns
    -------
    (...) bool array.
    """
    G = _group(_canonical_name(symmetry))
    d, shape = _as_directions(directions)
    return (_representative_index(d, G) == 0).reshape(shape)


def orientation_to_asymmetric_unit(A: ArrayLike, symmetry: str) -> np.ndarray:
    """The orientation equivalent to ``A`` whose viewing direction is in the asymmetric unit.

    Returns ``A S_kᵀ`` with ``S_k`` from :func:`to_asymmetric_unit` applied to the viewing
    direction ``Aᵀ e_z``: ``(A S_kᵀ)ᵀ e_z = S_k Aᵀ e_z`` is the canonical representative,
    and ``A S_kᵀ`` gives the same projections of a symmetric volume as ``A`` (module
    docstring).

    Parameters
    ----------
    A : (..., 3, 3) array_like
        Rotation matrices (``euler_to_matrix`` convention).
    symmetry : str

    Returns
    -------
    (..., 3, 3) float64 array.
    """
    A = np.asarray(A, dtype=np.float64)
    if A.ndim < 2 or A.shape[-2:] != (3, 3):
        raise ValueError(f"A must have shape (..., 3, 3), got {A.shape}")
    G = _group(_canonical_name(symmetry))
    _, idx = to_asymmetric_unit(A[..., 2, :], symmetry)  # row 2 of A is Aᵀ e_z
    return A @ np.swapaxes(G[idx], -1, -2)


def _check_step(step: float, name: str, upper: float = 180.0) -> float:
    step = float(step)
    if not (np.isfinite(step) and 0.0 < step <= upper):
        raise ValueError(f"{name} must be a finite angle in (0, {upper:g}] degrees, got {step}")
    return step


def _fibonacci(n: int) -> np.ndarray:
    """Golden-spiral lattice: ``z_i = 1 - (2i + 1)/n``, azimuth ``i · π(3 - √5)``."""
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = np.mod(i * (np.pi * (3.0 - np.sqrt(5.0))), 2.0 * np.pi)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def _rings(s: float, n: int) -> np.ndarray:
    """Iso-latitude rings invariant under ``Dn`` (hence ``Cn``) for spacing ``s`` radians.

    ``K`` tilt steps of about the row spacing ``(√3/2) s`` of a hexagonal lattice, the
    poles, and on ring ``k`` (tilt ``πk/K``) ``m_k`` points at azimuths
    ``2π (j + (k mod 2)/2) / m_k``, ``m_k`` the smallest multiple of ``n`` with spacing
    ``≤ s``. A multiple of ``n`` makes each ring invariant under ``Rz(360°/n)``; with ``K``
    even, ring ``K - k`` equals ring ``k`` reflected through the x axis (same ``m``, same
    half-step offset, negated azimuths), which is the two-fold about ``x`` of ``Dn``.
    """
    K = int(np.ceil(np.pi / (np.sqrt(3.0) / 2.0 * s)))
    K += K % 2
    k = np.arange(1, K)
    # sin from min(k, K - k) so mirrored rings get bit-identical radii and counts
    radius = np.sin(np.pi * np.minimum(k, K - k) / K)
    m = n * np.ceil(2.0 * np.pi * radius / (n * s) - 1e-9).astype(np.intp)
    ring = np.repeat(np.arange(K - 1), m)
    j = np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)  # index within its ring
    phi = 2.0 * np.pi * (j + 0.5 * (k[ring] % 2)) / m[ring]
    rings = np.stack(
        [radius[ring] * np.cos(phi), radius[ring] * np.sin(phi), np.cos(np.pi * k[ring] / K)],
        axis=-1,
    )
    return np.concatenate([[[0.0, 0.0, 1.0]], rings, [[0.0, 0.0, -1.0]]])


def _icosahedron() -> tuple[np.ndarray, np.ndarray]:
    """Vertices (the five-fold axes of ``I2``: cyclic permutations of ``(0, ±τ, ±1)``) and
    the 20 faces (vertex triples pairwise 63.4° apart, the edge length)."""
    base = np.array([[0.0, a * TAU, b] for a in (1.0, -1.0) for b in (1.0, -1.0)])
    V = np.concatenate([np.roll(base, r, axis=1) for r in range(3)])
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    adjacent = V @ V.T > 1.0 / np.sqrt(5.0) - 1e-9  # cos of the edge, or the vertex itself
    F = [t for t in combinations(range(12), 3) if adjacent[np.ix_(t, t)].all()]
    return V, np.asarray(F)


def _tetrakis_hexahedron() -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``±x, ±y, ±z`` (four-folds) and ``(±1, ±1, ±1)/√3`` (three-folds); each of
    the 24 faces joins a cube-face centre to the two ends of one edge of that cube face."""
    centres = np.concatenate([np.eye(3), -np.eye(3)])
    corners = np.array(list(product((1.0, -1.0), repeat=3)))
    F = []
    for c in range(6):
        on_face = [v for v in range(8) if corners[v] @ centres[c] > 0]
        for a, b in combinations(on_face, 2):
            if np.count_nonzero(corners[a] != corners[b]) == 1:  # a cube edge
                F.append((c, 6 + a, 6 + b))
    return np.concatenate([centres, corners / np.sqrt(3.0)]), np.asarray(F)


def _geodesic(V: np.ndarray, F: np.ndarray, f: int) -> np.ndarray:
    """Points ``(i a + j b + k c)/f`` (``i + j + k = f``) of every face ``(a, b, c)``,
    projected onto the sphere, each vertex and edge point generated once.

    The points of an edge depend only on its two ends (symmetrically), so any rotation that
    maps the polyhedron onto itself maps this point set onto itself.
    """
    E = np.unique(np.sort(np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [0, 2]]]), 1), axis=0)
    t = np.arange(1, f)[:, None] / f
    edges = V[E[:, 0], None] * (1.0 - t) + V[E[:, 1], None] * t  # (edges, f - 1, 3)
    i, j = np.meshgrid(np.arange(1, f), np.arange(1, f), indexing="ij")
    inner = i + j < f
    w = np.stack([i[inner], j[inner], f - i[inner] - j[inner]], axis=-1) / f  # interior
    faces = np.einsum("pw,fwd->fpd", w, V[F])
    P = np.concatenate([V, edges.reshape(-1, 3), faces.reshape(-1, 3)])
    return P / np.linalg.norm(P, axis=1, keepdims=True)


def sphere_directions(step: float, symmetry: str = "C1") -> np.ndarray:
    """Near-uniform unit directions over the whole sphere with spacing about ``step``.

    The target count is ``N = ceil(4π / (PACKING · s²))``, ``s = radians(step)``,
    ``PACKING = √3/2``: the density of a hexagonal lattice with nearest-neighbour spacing
    ``step``. ``C1`` (the default): a Fibonacci lattice of exactly ``N`` points, ``z_i =
    1 - (2i + 1)/N`` and azimuth ``i · π(3 - √5)`` (the golden angle). Other groups: a
    lattice mapped onto itself by every matrix of :func:`symmetry_matrices` (module
    docstring): iso-latitude rings for ``Cn`` / ``Dn`` (a few % above ``N``, more for large
    ``n``: each ring holds a multiple of ``n``), the ``f``-fold geodesic icosahedron for
    ``T`` / ``I*`` (``10 f² + 2`` points) and tetrakis hexahedron for ``O`` (``12 f² + 2``)
    with ``f`` the nearest to ``N``. Measured covering radii: 0.62-0.70 ``step`` for
    ``step`` from 1° to 5°, at most 0.72 ``step`` up to 30°, 0.83 ``step`` at worst.

    Parameters
    ----------
    step : float
        Angular spacing in degrees, in ``(0, 180]``.
    symmetry : str
        Point group the lattice must be invariant under, see :func:`symmetry_matrices`.

    Returns
    -------
    (N, 3) float64 array of unit vectors.
    """
    s = np.radians(_check_step(step, "step"))
    name = _canonical_name(symmetry)
    n = max(1, int(np.ceil(4.0 * np.pi / (PACKING * s * s))))
    if name == "C1":
        return _fibonacci(n)
    if name[0] in "CD":
        return _rings(s, int(name[1:]))
    if name == "O":
        return _geodesic(*_tetrakis_hexahedron(), max(1, round(np.sqrt((n - 2) / 12))))
    V, F = _icosahedron()
    V = V @ _frame(name).T  # T uses I2's icosahedron: T is a subgroup of I2
    return _geodesic(V, F, max(1, round(np.sqrt((n - 2) / 10))))


def orientation_grid(
    step: float, symmetry: str = "C1", psi_step: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ZYZ orientations covering SO(3) modulo a point group, about ``step`` degrees apart.

    The viewing directions are those of :func:`sphere_directions` ``(step, symmetry)`` in
    the asymmetric unit (:func:`asymmetric_unit`; about ``N / |G|`` of them; never none,
    as the lattice is invariant under the group). Each is combined with
    ``n_psi = ceil(360 / psi_step)`` in-plane angles ``psi = 360° j / n_psi`` (spacing
    ``≤ psi_step``). Because ``A ~ A S`` and the direction of ``A S`` is ``Sᵀ d``,
    directions in the unit with all ``psi`` reach every orientation modulo the group;
    interior directions once, directions on the unit's boundary (measure zero: rotation
    axes and cell edges) with their boundary mates too.

    Parameters
    ----------
    step : float
        Angular spacing of the viewing directions in degrees, in ``(0, 180]``.
    symmetry : str
        Point group, see :func:`symmetry_matrices`.
    psi_step : float, optional
        In-plane spacing in degrees, in ``(0, 360]`` (360: ``psi = 0`` only); default
        ``step``.

    Returns
    -------
    rot, tilt, psi : (M,) float64 arrays in degrees, ``M = n_dirs · n_psi``, direction-major
        (``psi`` varies fastest). ``rot`` in ``(-180, 180]``, ``tilt`` in ``[0, 180]``,
        ``psi`` in ``[0, 360)``; ``viewing_direction(rot, tilt)`` is the grid direction.
    """
    psi_step = _check_step(step if psi_step is None else psi_step, "psi_step", 360.0)
    dirs = sphere_directions(step, symmetry)
    dirs = dirs[asymmetric_unit(dirs, symmetry)]
    rot = np.degrees(np.arctan2(dirs[:, 1], dirs[:, 0]))
    tilt = np.degrees(np.arccos(np.clip(dirs[:, 2], -1.0, 1.0)))
    n_psi = int(np.ceil(360.0 / psi_step - 1e-9))  # 1e-9: 360/120 must stay 3, not 4
    psi = 360.0 * np.arange(n_psi) / n_psi
    return np.repeat(rot, n_psi), np.repeat(tilt, n_psi), np.tile(psi, len(dirs))


def symmetry_distance(A: ArrayLike, B: ArrayLike, symmetry: str) -> np.ndarray:
    """Smallest rotation angle between orientations modulo a point group, in degrees.

    .. math::  d(A, B) = \\min_{S \\in G} \\angle(A, B S), \\qquad
               \\angle(A, B S) = \\arccos\\frac{\\operatorname{tr}(S^T B^T A) - 1}{2}

    (``A ~ A S``, module docstring). It is symmetric in ``A`` and ``B`` and zero iff
    ``A = B S`` for some ``S``. The best ``S`` maximises ``tr(Sᵀ M) = Σ S_ij M_ij`` with
    ``M = Bᵀ A`` (one matrix product against the whole group); its angle is then taken as
    ``atan2(|vee(R - Rᵀ)|, tr R - 1)``, ``R = Sᵀ M``, accurate near 0° and 180° where
    ``arccos`` is not.

    Parameters
    ----------
    A, B : (..., 3, 3) array_like
        Rotation matrices; the batch shapes broadcast.
    symmetry : str
        Point group, see :func:`symmetry_matrices`.

    Returns
    -------
    (...) float64 array of angles in ``[0, 180]`` degrees.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    for name, X in (("A", A), ("B", B)):
        if X.ndim < 2 or X.shape[-2:] != (3, 3):
            raise ValueError(f"{name} must have shape (..., 3, 3), got {X.shape}")
    G = _group(_canonical_name(symmetry))
    M = np.swapaxes(B, -1, -2) @ A
    shape = M.shape[:-2]
    M = M.reshape(-1, 3, 3)
    flat_G = G.reshape(len(G), 9)
    best = np.empty(len(M), dtype=np.intp)
    for start in range(0, len(M), _BLOCK):  # blocks bound the (N, G) trace array
        block = M[start : start + _BLOCK].reshape(-1, 9)
        best[start : start + _BLOCK] = np.argmax(block @ flat_G.T, axis=1)
    R = np.swapaxes(G[best], -1, -2) @ M
    vee = np.stack(
        [R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]], axis=-1
    )
    # |vee| = 2 sin(angle) and tr R - 1 = 2 cos(angle)
    angle = np.arctan2(np.linalg.norm(vee, axis=-1), np.trace(R, axis1=-2, axis2=-1) - 1.0)
    return np.degrees(angle).reshape(shape)
