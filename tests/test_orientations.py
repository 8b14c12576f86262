"""Point groups, asymmetric units, orientation grids and distances modulo symmetry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import trapezoid
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from scalign.kernels.euler import euler_to_matrix, matrix_to_euler, viewing_direction
from scalign.kernels.orientations import (
    ASU_REFERENCE,
    PACKING,
    asymmetric_unit,
    orientation_grid,
    orientation_to_asymmetric_unit,
    sphere_directions,
    symmetry_distance,
    symmetry_matrices,
    to_asymmetric_unit,
)

TAU = (1 + np.sqrt(5)) / 2
ORDERS = {
    "C1": 1,
    "C2": 2,
    "C5": 5,
    "C17": 17,
    "D2": 4,
    "D3": 6,
    "D7": 14,
    "T": 12,
    "O": 24,
    "I": 60,
    "I1": 60,
    "I2": 60,
    "I3": 60,
    "I4": 60,
}
GROUPS = list(ORDERS)


def _rotation(axis, degrees: float) -> np.ndarray:
    return Rotation.from_rotvec(
        np.radians(degrees) * np.asarray(axis, float) / np.linalg.norm(axis)
    ).as_matrix()


def _member(G: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Distance (max abs entry) from each matrix of ``R (..., 3, 3)`` to the nearest of G."""
    return np.abs(R[..., None, :, :] - G).max(axis=(-2, -1)).min(axis=-1)


def _same_set(G: np.ndarray, H: np.ndarray, atol: float = 1e-9) -> bool:
    return len(G) == len(H) and _member(G, H).max() < atol and _member(H, G).max() < atol


def _closure(generators: list[np.ndarray]) -> np.ndarray:
    """Independent closure for reference groups: multiply until nothing new appears."""
    G = np.concatenate([np.eye(3)[None], np.asarray(generators)])
    while True:
        P = (G[:, None] @ G[None, :]).reshape(-1, 3, 3)
        new = P[_member(G, P) > 1e-9]
        if len(new) == 0:
            return G
        keep = [0]
        for i in range(1, len(new)):  # dedupe the few new elements
            if np.abs(new[keep] - new[i]).max(axis=(1, 2)).min() > 1e-9:
                keep.append(i)
        G = np.concatenate([G, new[keep]])


def _angles(G: np.ndarray) -> np.ndarray:
    return np.round(np.degrees(Rotation.from_matrix(G).magnitude()), 6)


def _unit(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n, 3))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _angle_to_nearest(points: np.ndarray, queries: np.ndarray) -> np.ndarray:
    chord, _ = cKDTree(points).query(queries)
    return np.degrees(2 * np.arcsin(np.minimum(chord / 2, 1.0)))


# ------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", GROUPS)
def test_group_is_a_closed_rotation_group_of_the_right_order(name):
    G = symmetry_matrices(name)
    assert G.shape == (ORDERS[name], 3, 3)
    np.testing.assert_array_equal(G[0], np.eye(3))
    np.testing.assert_allclose(
        G @ np.swapaxes(G, 1, 2), np.broadcast_to(np.eye(3), G.shape), atol=1e-13
    )
    np.testing.assert_allclose(np.linalg.det(G), 1.0, atol=1e-13)
    # distinct elements, closed under products (hence a group: inverses are powers)
    off = np.abs(G[:, None] - G[None]).max(axis=(2, 3)) + np.eye(len(G))
    assert off.min() > 1e-6
    assert _member(G, G[:, None] @ G[None]).max() < 1e-12


def test_names_are_case_insensitive_and_i_is_i2():
    np.testing.assert_array_equal(symmetry_matrices("c4"), symmetry_matrices("C4"))
    np.testing.assert_array_equal(symmetry_matrices("d3"), symmetry_matrices("D3"))
    np.testing.assert_array_equal(symmetry_matrices("i"), symmetry_matrices("I2"))
    G = symmetry_matrices("O")
    G[0, 0, 0] = 5.0  # a copy: the cached group is untouched
    assert symmetry_matrices("O")[0, 0, 0] == 1.0


@pytest.mark.parametrize("bad", ["C0", "X5", "D1", "D0", "", "I5", "C", "D", "C-2", "TT", "C 4"])
def test_bad_symmetry_names_raise_value_error(bad):
    with pytest.raises(ValueError, match=r"symmetry must be one of .*'Dn' \(n >= 2\)"):
        symmetry_matrices(bad)


@pytest.mark.parametrize("bad", [4, None, b"C1", ("C", 2)])
def test_non_string_symmetry_raises_type_error(bad):
    with pytest.raises(TypeError, match=r"symmetry must be a str.*'I1'"):
        symmetry_matrices(bad)
    with pytest.raises(TypeError, match="symmetry"):
        asymmetric_unit(np.eye(3), bad)


a, b = 1 / np.sqrt(1 + TAU**2), TAU / np.sqrt(1 + TAU**2)  # 0.5257, 0.8507
# (axis, fold) that each group must hold; the 1e-10-accurate ones are exact, "relion" are
# RELION's rot_axis literals (symmetries.cpp, fill_symmetry_class), checked to their digits
AXES = {
    "D2": [((0, 0, 1), 2), ((1, 0, 0), 2), ((0, 1, 0), 2)],
    "D3": [((0, 0, 1), 3)] + [((np.cos(t), np.sin(t), 0), 2) for t in np.pi * np.arange(3) / 3],
    "D7": [((0, 0, 1), 7)] + [((np.cos(t), np.sin(t), 0), 2) for t in np.pi * np.arange(7) / 7],
    "T": [((1, 0, 0), 2), ((0, 1, 0), 2), ((0, 0, 1), 2), ((1, 1, 1), 3), ((1, -1, -1), 3)],
    "O": [((1, 0, 0), 4), ((0, 1, 0), 4), ((0, 0, 1), 4), ((1, 1, 1), 3), ((1, 1, 0), 2)],
    "I2": [
        ((1, 0, 0), 2),
        ((0, 1, 0), 2),
        ((0, 0, 1), 2),
        ((1, 0, TAU), 5),
        ((0, TAU, 1), 5),
        ((0, 1 / TAU, TAU), 3),
        ((1, 1, 1), 3),
    ],
    "I1": [((1, 0, 0), 2), ((0, 1, 0), 2), ((0, 0, 1), 2), ((0, 1, TAU), 5), ((TAU, 0, -1), 5)],
    "I3": [((0, 0, 1), 5), ((-a, 0, b), 2)],
    "I4": [((0, 0, 1), 5), ((a, 0, b), 2)],
}
RELION = {
    "D2": [((0, 0, 1), 2), ((1, 0, 0), 2)],
    "O": [((0.5773502, 0.5773502, 0.5773502), 3), ((0, 0, 1), 4)],
    "I2": [((0, 0, 1), 2), ((0.525731114, 0, 0.850650807), 5), ((0, 0.356822076, 0.934172364), 3)],
    "I1": [
        ((1, 0, 0), 2),
        ((0.85065080702670, 0, -0.5257311142635), 5),
        ((0.9341723640, 0.3568220765, 0), 3),
    ],
    "I3": [
        ((-0.5257311143, 0, 0.8506508070), 2),
        ((0, 0, 1), 5),
        ((-0.4911234778630044, 0.3568220764705179, 0.7946544753759428), 3),
    ],
    "I4": [
        ((0.5257311143, 0, 0.8506508070), 2),
        ((0.8944271932547096, 0, 0.4472135909903704), 5),
        ((0.4911234778630044, 0.3568220764705179, 0.7946544753759428), 3),
    ],
}


@pytest.mark.parametrize("name", list(AXES))
def test_group_contains_its_stated_axes(name):
    G = symmetry_matrices(name)
    for axis, fold in AXES[name]:
        assert _member(G, _rotation(axis, 360 / fold)) < 1e-10, (axis, fold)
    for axis, fold in RELION.get(name, []):
        # RELION's literals carry 7-10 digits (its I3/I4 three-fold is off by ~1e-7)
        assert _member(G, _rotation(axis, 360 / fold)) < 1e-6, (axis, fold)


@pytest.mark.parametrize(
    ("name", "histogram"),
    [
        ("C5", {0: 1, 72: 2, 144: 2}),
        ("D3", {0: 1, 120: 2, 180: 3}),
        ("T", {0: 1, 120: 8, 180: 3}),
        ("O", {0: 1, 90: 6, 120: 8, 180: 9}),
        ("I", {0: 1, 72: 12, 120: 20, 144: 12, 180: 15}),
        ("I3", {0: 1, 72: 12, 120: 20, 144: 12, 180: 15}),
    ],
)
def test_rotation_angle_census(name, histogram):
    values, counts = np.unique(_angles(symmetry_matrices(name)), return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == histogram


def test_cyclic_and_dihedral_axes_are_z_and_x():
    for n in (2, 3, 6, 11):
        G = symmetry_matrices(f"C{n}")
        np.testing.assert_allclose(G[:, :, 2], np.broadcast_to([0, 0, 1], (n, 3)), atol=0)
        D = symmetry_matrices(f"D{n}")
        assert _member(D, np.diag([1.0, -1.0, -1.0])) < 1e-15  # two-fold about x
        # the n two-folds lie in the x-y plane at azimuths 180° k / n
        rotvec = Rotation.from_matrix(D[n:]).as_rotvec()
        assert np.allclose(rotvec[:, 2], 0, atol=1e-12)
        azimuth = np.sort(np.mod(np.degrees(np.arctan2(rotvec[:, 1], rotvec[:, 0])), 180) % 180)
        want = 180 * np.arange(n) / n
        assert np.abs((azimuth[:, None] - want + 90) % 180 - 90).min(axis=0).max() < 1e-9


def test_relation_to_scipy_groups():
    for n in (1, 2, 3, 5, 8):
        assert _same_set(symmetry_matrices(f"C{n}"), Rotation.create_group(f"C{n}").as_matrix())
    for n in (2, 3, 5, 8):
        assert _same_set(symmetry_matrices(f"D{n}"), Rotation.create_group(f"D{n}").as_matrix())
    for name in ("T", "O"):
        assert _same_set(symmetry_matrices(name), Rotation.create_group(name).as_matrix())
    scipy_i = Rotation.create_group("I").as_matrix()
    assert _same_set(symmetry_matrices("I1"), scipy_i)
    Q = _rotation([0, 0, 1], -90)
    assert _same_set(symmetry_matrices("I2"), Q @ scipy_i @ Q.T)
    assert not _same_set(symmetry_matrices("I2"), scipy_i)


def test_t_is_relions_t_rotated_by_the_stated_q():
    # RELION's T: rot_axis 3 0 0 1, rot_axis 2 0 √(2/3) 1/√3
    w = np.array([0, np.sqrt(2 / 3), 1 / np.sqrt(3)])
    relion_t = _closure([_rotation([0, 0, 1], 120), _rotation(w, 180)])
    assert len(relion_t) == 12

    def frame(u, v):  # orthonormal frame with u first and v in the span of the first two
        u = u / np.linalg.norm(u)
        v = v - (v @ u) * u
        v /= np.linalg.norm(v)
        return np.stack([u, v, np.cross(u, v)], axis=1)

    Q = frame(np.array([0, 0, 1.0]), w) @ frame(np.array([1, 1, 1.0]), np.array([1, 0, 0.0])).T
    np.testing.assert_allclose(Q @ np.array([1, 1, 1]) / np.sqrt(3), [0, 0, 1], atol=1e-15)
    np.testing.assert_allclose(Q @ [1, 0, 0], w, atol=1e-15)
    T = symmetry_matrices("T")
    assert _same_set(Q @ T @ Q.T, relion_t)
    assert not _same_set(T, relion_t)


# --------------------------------------------------- projections of a symmetric volume

SIGMA = 0.08


def _blob_centres(name: str) -> np.ndarray:
    """Gaussian centres on the orbit of a generic point: V is exactly symmetric."""
    return symmetry_matrices(name) @ np.array([0.43, -0.21, 0.27])


def _volume(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d2 = ((x[..., None, :] - centres) ** 2).sum(-1)
    return np.exp(-d2 / (2 * SIGMA**2)).sum(-1)


def _projection(A: np.ndarray, centres: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Analytic ``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz``: V(Aᵀu) is a sum of Gaussians centred
    at ``A c``, each integrating over z to ``√(2π) σ`` times a 2-D Gaussian at ``(A c)_xy``."""
    c = (centres @ np.swapaxes(A, -1, -2))[..., None, :, :2]  # (..., 1, J, 2)
    d2 = ((xy[:, None, :] - c) ** 2).sum(-1)
    return np.sqrt(2 * np.pi) * SIGMA * np.exp(-d2 / (2 * SIGMA**2)).sum(-1)


XY = np.stack(np.meshgrid(np.linspace(-0.8, 0.8, 17), np.linspace(-0.8, 0.8, 17)), -1).reshape(
    -1, 2
)


def test_blob_volume_is_symmetric_and_projection_is_the_line_integral():
    centres = _blob_centres("O")
    x = _unit(np.random.default_rng(1), 50) * 0.5
    G = symmetry_matrices("O")
    np.testing.assert_allclose(
        _volume(x @ np.swapaxes(G, 1, 2), centres),
        np.broadcast_to(_volume(x, centres), (24, 50)),
        rtol=1e-12,
    )
    # quadrature along z of V(Aᵀ (x, y, z)) against the analytic projection
    A = euler_to_matrix(37.0, 64.0, -112.0)
    z = np.linspace(-2, 2, 4001)
    u = np.concatenate(
        [
            np.repeat(XY[::7, None, :], len(z), 1),
            np.broadcast_to(z[None, :, None], (len(XY[::7]), len(z), 1)),
        ],
        -1,
    )
    numeric = trapezoid(_volume(u @ A, centres), z, axis=1)  # u @ A = (Aᵀ u) row-wise
    np.testing.assert_allclose(numeric, _projection(A, centres, XY[::7]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["C5", "D3", "T", "O", "I", "I3"])
def test_projection_at_a_s_equals_projection_at_a(name):
    centres, G = _blob_centres(name), symmetry_matrices(name)
    A = euler_to_matrix(-23.0, 71.0, 148.0)
    P = _projection(A, centres, XY)
    assert P.max() > 0.1  # the blobs are in the field of view
    np.testing.assert_allclose(
        _projection(A @ G, centres, XY), np.broadcast_to(P, (len(G), len(P))), atol=1e-10
    )
    # left multiplication S A is not a symmetry of the projections (for I and I3 an in-plane
    # turn S = Rz(180°) or Rz(72°) of the near-round 60-blob image differs least: ~4%)
    worst = np.abs(_projection(G[1:] @ A, centres, XY) - P).max(axis=1)
    assert worst.min() > 1e-2 * P.max()
    # the canonical equivalent orientation projects the same, its direction is in the unit
    rot, tilt, psi = np.meshgrid([-150.0, -20.0, 95.0], [10.0, 80.0, 160.0], [0.0, 200.0])
    B = euler_to_matrix(rot.ravel(), tilt.ravel(), psi.ravel())
    B2 = orientation_to_asymmetric_unit(B, name)
    np.testing.assert_allclose(
        _projection(B2, centres, XY), _projection(B, centres, XY), atol=1e-10
    )
    assert asymmetric_unit(B2[:, 2, :], name).all()
    np.testing.assert_allclose(symmetry_distance(B, B2, name), 0.0, atol=1e-9)


# ------------------------------------------------------------------- asymmetric unit


@pytest.mark.parametrize("name", ["T", "O", "I", "I1", "I3", "I4", "D2", "D7"])
def test_reference_direction_is_generic(name):
    G = symmetry_matrices(name)
    axes = Rotation.from_matrix(G[1:]).as_rotvec()
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    assert np.degrees(np.arccos(np.abs(axes @ ASU_REFERENCE).max())) > 10.0
    # its orbit has |G| distinct points, so the cells are fundamental domains
    orbit = G @ ASU_REFERENCE
    dist = np.linalg.norm(orbit[:, None] - orbit[None], axis=-1) + 10 * np.eye(len(G))
    assert dist.min() > 0.1


@pytest.mark.parametrize("name", ["C1", "C4", "C17", "D3", "T", "O", "I", "I4"])
def test_every_direction_has_exactly_one_equivalent_in_the_unit(name):
    G = symmetry_matrices(name)
    d = _unit(np.random.default_rng(2), 5000)
    reps, idx = to_asymmetric_unit(d, name)
    np.testing.assert_allclose(reps, np.einsum("nij,nj->ni", G[idx], d), atol=1e-15)
    assert asymmetric_unit(reps, name).all()
    reps2, idx2 = to_asymmetric_unit(reps, name)  # idempotent
    assert (idx2 == 0).all()
    np.testing.assert_array_equal(reps2, reps)
    in_unit = asymmetric_unit(d @ np.swapaxes(G, 1, 2), name)  # (G, N): is S d in the unit?
    assert (in_unit.sum(axis=0) == 1).all()  # random directions are interior w.p. 1
    # the unit's area is 4π/|G| (counted on a fine, near-uniform lattice)
    assert abs(asymmetric_unit(sphere_directions(0.6), name).mean() * len(G) - 1) < 0.02


def test_cyclic_unit_is_a_lune_around_the_reference_azimuth():
    d = _unit(np.random.default_rng(3), 5000)
    az0 = np.degrees(np.arctan2(ASU_REFERENCE[1], ASU_REFERENCE[0]))
    offset = (np.degrees(np.arctan2(d[:, 1], d[:, 0])) - az0 + 180) % 360 - 180
    for n in (2, 5, 12):
        np.testing.assert_array_equal(asymmetric_unit(d, f"C{n}"), np.abs(offset) < 180 / n)
        assert asymmetric_unit([[0, 0, 1], [0, 0, -1], [0, 0, 2.5]], f"C{n}").all()


@pytest.mark.parametrize("name", ["D3", "T", "O", "I", "I3"])
def test_rotation_axes_are_kept_on_the_closed_unit(name):
    # an axis point lies on cell boundaries; the tie rule keeps at least one of its orbit
    G = symmetry_matrices(name)
    axes = Rotation.from_matrix(G[1:]).as_rotvec()
    axes = np.concatenate([axes, -axes])
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    orbits = axes @ np.swapaxes(G, 1, 2)  # (G, axes, 3)
    assert asymmetric_unit(orbits, name).any(axis=0).all()


def test_shapes_and_chunks():
    d = _unit(np.random.default_rng(4), 70000)  # more than one block of 2**16 rows
    reps, idx = to_asymmetric_unit(d.reshape(2, 35000, 3), "D5")
    assert reps.shape == (2, 35000, 3) and idx.shape == (2, 35000)
    G = symmetry_matrices("D5")
    want = np.argmax(np.einsum("gij,nj,i->ng", G, d, ASU_REFERENCE), axis=1)  # (S d)·r0
    np.testing.assert_array_equal(idx.ravel(), want)
    assert asymmetric_unit(d[0], "C3").shape == ()
    with pytest.raises(ValueError, match="directions"):
        asymmetric_unit(np.ones((4, 2)), "C3")


# ---------------------------------------------------------------------------- grids


def test_sphere_directions_count_and_norm():
    for step in (3.0, 7.5, 20.0):
        d = sphere_directions(step)
        assert len(d) == int(np.ceil(4 * np.pi / (PACKING * np.radians(step) ** 2)))
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-15)
    assert len(sphere_directions(180.0)) >= 1
    for bad in (0.0, -2.0, np.nan, np.inf, 181.0):
        with pytest.raises(ValueError, match="step"):
            sphere_directions(bad)
    with pytest.raises(ValueError, match="psi_step"):
        orientation_grid(10.0, "C1", psi_step=0.0)


@pytest.mark.parametrize("name", ["C4", "C17", "D2", "D7", "T", "O", "I", "I1", "I3", "I4"])
def test_symmetric_sphere_directions_are_invariant(name):
    d = sphere_directions(6.0, name)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-15)
    moved = (d @ np.swapaxes(symmetry_matrices(name), 1, 2)).reshape(-1, 3)
    assert np.degrees(cKDTree(d).query(moved)[0].max()) < 1e-9


COVER = ["C1", "C4", "C17", "D2", "D7", "T", "O", "I", "I3"]


@pytest.mark.parametrize("name", COVER)
@pytest.mark.parametrize("step", [5.0, 15.0])
def test_grid_covers_the_sphere_modulo_symmetry(name, step):
    rot, tilt, psi = orientation_grid(step, name)
    n_psi = int(np.ceil(360 / step - 1e-9))
    assert len(rot) % n_psi == 0
    np.testing.assert_array_equal(psi[:n_psi], 360 * np.arange(n_psi) / n_psi)
    dirs = viewing_direction(rot[::n_psi], tilt[::n_psi])
    np.testing.assert_array_equal(rot.reshape(-1, n_psi), rot[::n_psi, None].repeat(n_psi, 1))
    assert asymmetric_unit(dirs, name).all()
    # covering radius modulo symmetry: min over S of the angle from S x to the grid
    G = symmetry_matrices(name)
    union = (dirs @ np.swapaxes(G, 1, 2)).reshape(-1, 3)
    x = _unit(np.random.default_rng(5), 30000)
    assert _angle_to_nearest(union, x).max() < 0.8 * step
    # the same through the canonical representative and the symmetric lattice
    assert (
        _angle_to_nearest(sphere_directions(step, name), to_asymmetric_unit(x, name)[0]).max()
        < 0.8 * step
    )


@pytest.mark.parametrize("name", ["C2", "C4", "D2", "D7", "T", "O", "I"])
def test_direction_count_scales_like_one_over_group_order(name):
    n_c1 = len(sphere_directions(5.0))
    rot, _, _ = orientation_grid(5.0, name, psi_step=360.0)
    assert abs(len(rot) * len(symmetry_matrices(name)) / n_c1 - 1) < 0.15


@pytest.mark.parametrize("name", ["C1", "D3", "O"])
def test_grid_orientations_cover_so3_modulo_symmetry(name):
    step = 20.0
    grid = euler_to_matrix(*orientation_grid(step, name))
    R = Rotation.random(200, random_state=6).as_matrix()
    dist = symmetry_distance(R[:, None], grid[None], name).min(axis=1)
    assert dist.max() < 0.9 * step  # measured 0.70-0.76 step with 1000 rotations


def test_psi_step_and_ordering():
    rot, tilt, psi = orientation_grid(30.0, "C2", psi_step=50.0)
    n_psi = 8  # ceil(360/50); spacing 45 ≤ 50
    np.testing.assert_allclose(psi[:n_psi], 45.0 * np.arange(8))
    assert (psi >= 0).all() and (psi < 360).all()
    assert ((tilt >= 0) & (tilt <= 180)).all() and ((rot > -180) & (rot <= 180)).all()
    assert len(orientation_grid(30.0, "C2", psi_step=120.0)[2]) == 3 * len(rot) // n_psi


# ----------------------------------------------------------------- distance modulo G


@pytest.mark.parametrize("name", ["C1", "C4", "D3", "T", "O", "I", "I4"])
def test_symmetry_distance_matches_brute_force(name):
    A = Rotation.random(200, random_state=7)
    B = Rotation.random(200, random_state=8)
    G = symmetry_matrices(name)
    brute = np.full(200, np.inf)
    for S in G:
        brute = np.minimum(brute, (A.inv() * Rotation.from_matrix(B.as_matrix() @ S)).magnitude())
    got = symmetry_distance(A.as_matrix(), B.as_matrix(), name)
    np.testing.assert_allclose(got, np.degrees(brute), atol=1e-9)
    np.testing.assert_allclose(
        symmetry_distance(B.as_matrix(), A.as_matrix(), name), got, atol=1e-9
    )


@pytest.mark.parametrize("name", ["C7", "D2", "O", "I"])
def test_symmetry_mates_have_distance_zero(name):
    G = symmetry_matrices(name)
    rot, tilt, psi = (
        np.array([12.0, -140.0, 77.0]),
        np.array([33.0, 90.0, 171.0]),
        np.array([5.0, 250.0, -60.0]),
    )
    A = euler_to_matrix(rot, tilt, psi)
    mates = A[:, None] @ G  # (3, G, 3, 3)
    np.testing.assert_allclose(symmetry_distance(A[:, None], mates, name), 0.0, atol=1e-9)
    # the same through Euler angles of the mates (what a STAR file would hold)
    again = euler_to_matrix(*matrix_to_euler(mates))
    np.testing.assert_allclose(symmetry_distance(A[:, None], again, name), 0.0, atol=1e-6)
    # S A is not a mate: without symmetry the distance is the plain angle
    if len(G) > 1:
        assert symmetry_distance(A[:, None], G[1:] @ A[:, None], name).min() > 1.0


def test_symmetry_distance_accuracy_shapes_and_errors():
    eps = [1e-7, 0.3, 90.0, 179.9999, 180.0]
    A = np.broadcast_to(np.eye(3), (5, 3, 3))
    B = np.stack([_rotation([0.3, -0.5, 0.8], e) for e in eps])
    np.testing.assert_allclose(symmetry_distance(A, B, "C1"), eps, rtol=1e-9)
    # C2 about z: a 170° turn about z is 10° from the two-fold
    np.testing.assert_allclose(symmetry_distance(np.eye(3), _rotation([0, 0, 1], 170), "C2"), 10.0)
    R = Rotation.random(12, random_state=9).as_matrix()
    assert symmetry_distance(R.reshape(3, 1, 4, 3, 3), R.reshape(1, 3, 4, 3, 3), "T").shape == (
        3,
        3,
        4,
    )
    big = Rotation.random(70000, random_state=10).as_matrix()  # more than one block
    np.testing.assert_allclose(
        symmetry_distance(big, np.eye(3), "C2"),
        np.degrees(
            np.minimum(
                Rotation.from_matrix(big).magnitude(),
                Rotation.from_matrix(big @ np.diag([-1.0, -1, 1])).magnitude(),
            )
        ),
        atol=1e-9,
    )
    with pytest.raises(ValueError, match="A must"):
        symmetry_distance(np.eye(2), np.eye(3), "C1")
    with pytest.raises(ValueError, match="B must"):
        symmetry_distance(np.eye(3), np.ones(3), "C1")
    with pytest.raises(ValueError, match="symmetry"):
        symmetry_distance(np.eye(3), np.eye(3), "C0")
