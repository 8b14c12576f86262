"""The affine convention (scalign.kernels.affine): builders, algebra, decompositions,
normalised coordinates, and agreement with scipy.ndimage and torch's affine_grid."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import affine_transform
from scipy.spatial.transform import Rotation

from scalign.kernels.affine import (
    build_affine_matrix,
    build_affine_matrix_3d,
    check_matrix,
    compose,
    decompose_affine,
    decompose_affine_3d,
    euler_angles,
    image_center,
    invert,
    is_invertible,
    normalization_matrix,
    normalized_to_pixel,
    pixel_to_normalized,
    polar_rotation,
    pull_matrix,
    rotation_2d,
    rotation_3d,
    rotation_angle,
    rotation_angle_2d,
    to_index_order,
    torch_theta,
)

TOL = 1e-12
# (H, W) and (D, H, W) with H != W, odd and even sizes.
SHAPES_2D = [(7, 10), (8, 5), (9, 13), (6, 12)]
SHAPES_3D = [(5, 8, 11), (6, 7, 4)]
# Larger ones for warps, so that the interior is most of the image.
WARP_2D = [(17, 24), (24, 15), (19, 31), (20, 26)]
WARP_3D = [(9, 12, 15), (12, 11, 8)]


def _hom(p):
    return np.append(np.asarray(p, dtype=np.float64), 1.0)


def _random_2d(rng, center=(0.0, 0.0)):
    return build_affine_matrix(
        theta=rng.uniform(-180, 180),
        tx=rng.uniform(-20, 20),
        ty=rng.uniform(-20, 20),
        sx=rng.uniform(0.5, 2.0) * rng.choice([-1, 1]),
        sy=rng.uniform(0.5, 2.0) * rng.choice([-1, 1]),
        shx=rng.uniform(-0.5, 0.5),
        shy=rng.uniform(-0.5, 0.5),
        center=center,
    )


def _random_3d(rng, center=(0.0, 0.0, 0.0)):
    return build_affine_matrix_3d(
        rx=rng.uniform(-180, 180),
        ry=rng.uniform(-90, 90),
        rz=rng.uniform(-180, 180),
        tx=rng.uniform(-20, 20),
        ty=rng.uniform(-20, 20),
        tz=rng.uniform(-20, 20),
        sx=rng.uniform(0.5, 2.0),
        sy=rng.uniform(0.5, 2.0),
        sz=rng.uniform(0.5, 2.0) * rng.choice([-1, 1]),
        center=center,
        shxy=rng.uniform(-0.5, 0.5),
        shxz=rng.uniform(-0.5, 0.5),
        shyz=rng.uniform(-0.5, 0.5),
    )


def _hat(u):
    return np.clip(1.0 - np.abs(u), 0.0, None)


# --------------------------------------------------------------------------- 2-D builder


def test_builder_moves_points_forward():
    M = build_affine_matrix(tx=3.0, ty=-2.0)
    np.testing.assert_allclose(M @ _hom((1, 1)), _hom((4, -1)), atol=TOL)
    # +90° turns +x into +y (clockwise on screen with y down the rows).
    np.testing.assert_allclose(rotation_2d(90.0) @ [1.0, 0.0], [0.0, 1.0], atol=TOL)
    c = np.array([4.5, 3.0])
    R = build_affine_matrix(theta=90.0, center=c)
    np.testing.assert_allclose(R @ _hom(c), _hom(c), atol=TOL)
    np.testing.assert_allclose(R @ _hom(c + (1, 0)), _hom(c + (0, 1)), atol=TOL)


def test_builder_formula_and_centre():
    rng = np.random.default_rng(0)
    for _ in range(20):
        th, tx, ty = rng.uniform(-180, 180), *rng.uniform(-9, 9, 2)
        sx, sy, shx, shy = *rng.uniform(0.5, 2, 2), *rng.uniform(-0.5, 0.5, 2)
        c = rng.uniform(-10, 10, 2)
        M = build_affine_matrix(th, tx, ty, sx, sy, shx, shy, center=c)

        def T(v):
            out = np.eye(3)
            out[:2, 2] = v
            return out

        lin = np.eye(3)
        t = np.radians(th)
        lin[:2, :2] = (
            np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
            @ np.array([[1, shx], [shy, 1]])
            @ np.diag([sx, sy])
        )
        np.testing.assert_allclose(M, T(c + (tx, ty)) @ lin @ T(-c), atol=TOL)
        # the centre goes to c + t; without translation it is fixed
        np.testing.assert_allclose(M @ _hom(c), _hom(c + (tx, ty)), atol=1e-11)
        M0 = build_affine_matrix(th, 0, 0, sx, sy, shx, shy, center=c)
        np.testing.assert_allclose(M0 @ _hom(c), _hom(c), atol=1e-11)


def test_builder_bad_input_names_the_variable():
    with pytest.raises(TypeError, match="theta"):
        build_affine_matrix(theta="ten")
    with pytest.raises(ValueError, match="tx"):
        build_affine_matrix(tx=np.nan)
    with pytest.raises(ValueError, match="center"):
        build_affine_matrix(center=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="sz"):
        build_affine_matrix_3d(sz=np.inf)
    with pytest.raises(ValueError, match="center"):
        build_affine_matrix_3d(center=(1.0, 2.0))


@pytest.mark.parametrize("shape", SHAPES_2D)
def test_scipy_pull_moves_a_bright_pixel_to_Mp(shape):
    H, W = shape
    c = image_center(shape)
    p = np.array([2.0, H - 3.0])  # (x, y), at least 2 px from the border
    img = np.zeros(shape)
    img[int(p[1]), int(p[0])] = 1.0

    # An integer translation: the pixel lands exactly at M p.
    M = build_affine_matrix(tx=1.0, ty=-1.0)
    out = affine_transform(img, *pull_matrix(M), order=1, mode="constant")
    q = (M @ _hom(p))[:2]
    assert out[int(q[1]), int(q[0])] == pytest.approx(1.0, abs=TOL)
    assert out.sum() == pytest.approx(1.0, abs=TOL)

    # A general motion: out(q) = hat(M⁻¹q - p) (bilinear pull) everywhere, so the peak is
    # at M p, not M⁻¹ p.
    M = build_affine_matrix(theta=23.0, tx=0.7, ty=-0.4, sx=1.2, sy=0.9, shx=0.1, center=c)
    out = affine_transform(img, *pull_matrix(M), order=1, mode="constant")
    ys, xs = np.mgrid[0:H, 0:W]
    src = np.einsum("ij,jhw->ihw", invert(M), np.stack([xs, ys, np.ones_like(xs)]))
    expected = _hat(src[0] - p[0]) * _hat(src[1] - p[1])
    np.testing.assert_allclose(out, expected, atol=TOL)
    q = (M @ _hom(p))[:2]
    iy, ix = np.unravel_index(np.argmax(out), shape)
    assert abs(ix - q[0]) <= 1.0 and abs(iy - q[1]) <= 1.0


@pytest.mark.parametrize("shape", [(7, 9), (6, 10)])
def test_quarter_turn_about_image_centre_lands_on_the_grid(shape):
    # With H + W even, a 90° turn about the image centre maps pixels onto pixels.
    H, W = shape
    M = build_affine_matrix(theta=90.0, center=image_center(shape))
    p = np.array([W // 2 + 1.0, H // 2 - 1.0])
    img = np.zeros(shape)
    img[int(p[1]), int(p[0])] = 1.0
    out = affine_transform(img, *pull_matrix(M), order=1, mode="constant")
    q = np.rint((M @ _hom(p))[:2]).astype(int)
    np.testing.assert_allclose((M @ _hom(p))[:2], q, atol=1e-12)
    assert out[q[1], q[0]] == pytest.approx(1.0, abs=1e-12)
    assert out.sum() == pytest.approx(1.0, abs=1e-12)


def test_scipy_pull_moves_a_bright_voxel_3d():
    shape = (7, 8, 11)
    D, H, W = shape
    p = np.array([4.0, 3.0, 3.0])  # (x, y, z)
    img = np.zeros(shape)
    img[3, 3, 4] = 1.0
    M = build_affine_matrix_3d(
        rx=12.0, ry=-7.0, rz=20.0, tx=0.6, ty=-0.3, tz=0.2, sx=1.1, center=image_center(shape)
    )
    out = affine_transform(img, *pull_matrix(M), order=1, mode="constant")
    zs, ys, xs = np.mgrid[0:D, 0:H, 0:W]
    pts = np.stack([xs, ys, zs, np.ones_like(xs)]).astype(float)
    src = np.einsum("ij,jdhw->idhw", invert(M), pts)
    expected = _hat(src[0] - p[0]) * _hat(src[1] - p[1]) * _hat(src[2] - p[2])
    np.testing.assert_allclose(out, expected, atol=TOL)


# --------------------------------------------------------------------------- 3-D builder


def test_rotation_3d_matches_scipy_extrinsic_xyz():
    rng = np.random.default_rng(1)
    for _ in range(20):
        rx, ry, rz = rng.uniform(-180, 180, 3)
        ref = Rotation.from_euler("xyz", [rx, ry, rz], degrees=True).as_matrix()
        np.testing.assert_allclose(rotation_3d(rx, ry, rz), ref, atol=TOL)
        # extrinsic xyz == Rz @ Ry @ Rx, each a single-axis scipy rotation
        Rx = Rotation.from_euler("x", rx, degrees=True).as_matrix()
        Ry = Rotation.from_euler("y", ry, degrees=True).as_matrix()
        Rz = Rotation.from_euler("z", rz, degrees=True).as_matrix()
        np.testing.assert_allclose(ref, Rz @ Ry @ Rx, atol=TOL)
        np.testing.assert_allclose(build_affine_matrix_3d(rx=rx)[:3, :3], Rx, atol=TOL)
        np.testing.assert_allclose(build_affine_matrix_3d(ry=ry)[:3, :3], Ry, atol=TOL)
        np.testing.assert_allclose(build_affine_matrix_3d(rz=rz)[:3, :3], Rz, atol=TOL)
    # right-handed: +90° about x takes y to z, about y takes z to x, about z takes x to y
    e = np.eye(3)
    np.testing.assert_allclose(rotation_3d(rx=90) @ e[1], e[2], atol=TOL)
    np.testing.assert_allclose(rotation_3d(ry=90) @ e[2], e[0], atol=TOL)
    np.testing.assert_allclose(rotation_3d(rz=90) @ e[0], e[1], atol=TOL)


def test_builder_3d_centre_scale_translation():
    rng = np.random.default_rng(2)
    for _ in range(10):
        c = rng.uniform(-10, 10, 3)
        t = rng.uniform(-5, 5, 3)
        s = rng.uniform(0.5, 2, 3)
        angles = rng.uniform(-180, 180, 3)
        M = build_affine_matrix_3d(*angles, *t, *s, center=c)
        np.testing.assert_allclose(M @ _hom(c), _hom(c + t), atol=1e-11)
        np.testing.assert_allclose(M[:3, :3], rotation_3d(*angles) @ np.diag(s), atol=TOL)
        M0 = build_affine_matrix_3d(*angles, sx=s[0], sy=s[1], sz=s[2], center=c)
        np.testing.assert_allclose(M0 @ _hom(c), _hom(c), atol=1e-11)


def test_builder_3d_rz_embeds_the_2d_builder():
    th, tx, ty, sx, sy = 37.0, 2.5, -1.5, 1.3, 0.8
    M3 = build_affine_matrix_3d(rz=th, tx=tx, ty=ty, sx=sx, sy=sy, center=(3.0, 4.0, 5.0))
    M2 = build_affine_matrix(th, tx, ty, sx, sy, center=(3.0, 4.0))
    idx = [0, 1, 3]
    np.testing.assert_allclose(M3[np.ix_(idx, idx)], M2, atol=TOL)
    np.testing.assert_allclose(M3[2], [0, 0, 1, 0], atol=TOL)
    np.testing.assert_allclose(M3[:, 2], [0, 0, 1, 0], atol=TOL)


# --------------------------------------------------------------------------- algebra


def test_compose_order_and_round_trips():
    rng = np.random.default_rng(3)
    A = build_affine_matrix(theta=30.0, tx=5.0)
    B = build_affine_matrix(sx=2.0, sy=0.5, ty=-1.0)
    p = _hom((1.5, -2.0))
    # "A then B"
    np.testing.assert_allclose(compose(A, B) @ p, B @ (A @ p), atol=TOL)
    np.testing.assert_allclose(compose(A, B), B @ A, atol=TOL)
    assert not np.allclose(compose(A, B), compose(B, A))
    C = build_affine_matrix(theta=-12.0, shx=0.2, center=(3, 4))
    np.testing.assert_allclose(compose(A, B, C), C @ B @ A, atol=TOL)
    single = compose(A)
    np.testing.assert_array_equal(single, A)
    assert single is not A
    for make in (lambda: _random_2d(rng, rng.uniform(-9, 9, 2)), lambda: _random_3d(rng)):
        M = make()
        eye = np.eye(M.shape[-1])
        np.testing.assert_allclose(compose(M, invert(M)), eye, atol=TOL)
        np.testing.assert_allclose(compose(invert(M), M), eye, atol=TOL)
        np.testing.assert_allclose(invert(invert(M)), M, atol=1e-11)
    # batched over leading axes
    batch = np.stack([_random_2d(rng) for _ in range(4)])
    out = compose(batch, A)
    assert out.shape == (4, 3, 3)
    np.testing.assert_allclose(out, A @ batch, atol=TOL)
    np.testing.assert_allclose(
        compose(batch, invert(batch)), np.broadcast_to(np.eye(3), (4, 3, 3)), atol=TOL
    )


def test_compose_and_invert_errors():
    with pytest.raises(ValueError, match="at least one"):
        compose()
    with pytest.raises(ValueError, match=r"matrices\[1\]"):
        compose(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match=r"matrices\[1\]"):
        compose(np.eye(3), np.full((3, 3), np.nan))
    singular = build_affine_matrix(sx=0.0)
    assert not is_invertible(singular)
    assert is_invertible(build_affine_matrix(sx=1e-3))
    with pytest.raises(ValueError, match="not invertible"):
        invert(singular)
    with pytest.raises(ValueError, match="not invertible"):
        invert(np.stack([np.eye(4), build_affine_matrix_3d(sy=0.0)]))
    np.testing.assert_array_equal(is_invertible(np.stack([np.eye(3), singular])), [True, False])


def test_check_matrix_errors_name_the_variable():
    with pytest.raises(ValueError, match=r"^moving .*shape \(2, 2\)"):
        check_matrix("moving", np.eye(2))
    with pytest.raises(ValueError, match="moving"):
        check_matrix("moving", np.zeros((3, 4)))
    with pytest.raises(ValueError, match="moving .*4×4"):
        check_matrix("moving", np.eye(3), d=3)
    bad = np.eye(3)
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="moving has non-finite"):
        check_matrix("moving", bad)
    bad = np.eye(4)
    bad[3, 0] = 0.5
    with pytest.raises(ValueError, match="moving is not homogeneous"):
        check_matrix("moving", bad)
    with pytest.raises(TypeError, match="moving"):
        check_matrix("moving", [["a", "b", "c"]] * 3)
    with pytest.raises(TypeError, match="moving"):
        check_matrix("moving", np.eye(3) * 1j)
    with pytest.raises(ValueError, match="moving"):
        check_matrix("moving", [[1, 0], [0, 1, 0]])
    out = check_matrix("moving", [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert out.dtype == np.float64


def test_to_index_order_involution_and_hand_swap():
    rng = np.random.default_rng(4)
    M2 = _random_2d(rng)
    P2 = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(to_index_order(M2), P2 @ M2 @ P2)
    M3 = _random_3d(rng)
    P3 = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(to_index_order(M3), P3 @ M3 @ P3)
    for M in (M2, M3, np.stack([_random_3d(rng) for _ in range(3)])):
        np.testing.assert_array_equal(to_index_order(to_index_order(M)), M)
    # the same map on (z, y, x) points
    p = np.array([1.0, 2.0, 3.0])  # (x, y, z)
    q = (M3 @ _hom(p))[:3]
    np.testing.assert_allclose((to_index_order(M3) @ _hom(p[::-1]))[:3], q[::-1], atol=TOL)
    # a batch of index-order maps equals the batched swap
    batch = np.stack([M2, _random_2d(rng)])
    np.testing.assert_array_equal(to_index_order(batch), P2 @ batch @ P2)


# --------------------------------------------------------------------------- decomposition


def test_decompose_2d_round_trip():
    rng = np.random.default_rng(5)
    for i in range(200):
        M = _random_2d(rng, center=rng.uniform(-30, 30, 2))
        c = rng.uniform(-30, 30, 2) if i % 2 else None
        params = decompose_affine(M, center=c)
        assert params["shy"] == 0.0
        assert params["sx"] > 0
        assert (params["sy"] < 0) == (np.linalg.det(M[:2, :2]) < 0)
        if c is not None:
            np.testing.assert_array_equal(params["center"], c)
        np.testing.assert_allclose(build_affine_matrix(**params), M, rtol=0, atol=TOL)


def test_decompose_2d_recovers_identifiable_parameters():
    rng = np.random.default_rng(6)
    for _ in range(50):
        truth = dict(
            theta=rng.uniform(-179, 179),
            tx=rng.uniform(-9, 9),
            ty=rng.uniform(-9, 9),
            sx=rng.uniform(0.5, 2),
            sy=rng.uniform(0.5, 2) * rng.choice([-1, 1]),
            shx=rng.uniform(-0.5, 0.5),
            shy=0.0,
            center=tuple(rng.uniform(-9, 9, 2)),
        )
        params = decompose_affine(build_affine_matrix(**truth), center=truth["center"])
        for key, value in truth.items():
            np.testing.assert_allclose(params[key], value, atol=1e-9, err_msg=key)


def test_decompose_3d_round_trip_and_recovery():
    rng = np.random.default_rng(7)
    for i in range(200):
        M = _random_3d(rng, center=rng.uniform(-30, 30, 3))
        c = rng.uniform(-30, 30, 3) if i % 2 else None
        params = decompose_affine_3d(M, center=c)
        assert params["sx"] > 0 and params["sy"] > 0
        assert (params["sz"] < 0) == (np.linalg.det(M[:3, :3]) < 0)
        np.testing.assert_allclose(build_affine_matrix_3d(**params), M, rtol=0, atol=TOL)
    for _ in range(30):
        truth = dict(
            rx=rng.uniform(-179, 179),
            ry=rng.uniform(-89, 89),
            rz=rng.uniform(-179, 179),
            tx=1.0,
            ty=-2.0,
            tz=3.0,
            sx=rng.uniform(0.5, 2),
            sy=rng.uniform(0.5, 2),
            sz=rng.uniform(0.5, 2),
            center=(4.0, 5.0, 6.0),
            shxy=rng.uniform(-0.5, 0.5),
            shxz=rng.uniform(-0.5, 0.5),
            shyz=rng.uniform(-0.5, 0.5),
        )
        params = decompose_affine_3d(build_affine_matrix_3d(**truth), center=truth["center"])
        for key, value in truth.items():
            np.testing.assert_allclose(params[key], value, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("ry", [90.0, -90.0, 89.9999999])
def test_decompose_3d_gimbal_lock(ry):
    M = build_affine_matrix_3d(rx=30.0, ry=ry, rz=-50.0, sx=1.5, shyz=0.3, tz=2.0)
    params = decompose_affine_3d(M)
    np.testing.assert_allclose(build_affine_matrix_3d(**params), M, rtol=0, atol=TOL)
    if abs(ry) == 90.0:  # gimbal lock: rx is set to 0, rz absorbs it
        assert params["rx"] == 0.0
    R = rotation_3d(30.0, ry, -50.0)
    np.testing.assert_allclose(rotation_3d(*euler_angles(R)), R, atol=TOL)


def test_decompose_rejects_singular_and_batches():
    with pytest.raises(ValueError, match="singular"):
        decompose_affine(build_affine_matrix(sy=0.0))
    with pytest.raises(ValueError, match="singular"):
        decompose_affine_3d(build_affine_matrix_3d(sz=0.0))
    with pytest.raises(ValueError, match="one 3×3"):
        decompose_affine(np.stack([np.eye(3)] * 2))
    with pytest.raises(ValueError, match="4×4"):
        decompose_affine_3d(np.eye(3))
    with pytest.raises(ValueError, match="center"):
        decompose_affine(np.eye(3), center=(1.0, 2.0, 3.0))


def test_rotation_angles():
    # polar rotation of R(θ) P (P symmetric positive definite) is R(θ)
    a = np.radians(25.0)
    Ra = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    M = np.eye(3)
    M[:2, :2] = rotation_2d(40.0) @ (Ra @ np.diag([2.0, 0.5]) @ Ra.T)
    assert rotation_angle_2d(M) == pytest.approx(40.0, abs=1e-10)
    assert rotation_angle(M) == pytest.approx(40.0, abs=1e-10)
    np.testing.assert_allclose(polar_rotation(M), rotation_2d(40.0), atol=TOL)
    assert rotation_angle_2d(build_affine_matrix(theta=-170.0, sx=3, sy=3)) == pytest.approx(
        -170.0, abs=1e-10
    )
    # angular error between two motions, batched
    A = build_affine_matrix(theta=33.0, tx=4.0, center=(5, 5))
    B = build_affine_matrix(theta=30.0, sx=1.2, sy=1.2)
    np.testing.assert_allclose(rotation_angle_2d(np.stack([A @ invert(B), B])), [3.0, 30.0])
    # 3-D geodesic angle, including near 0 and 180 degrees
    rng = np.random.default_rng(8)
    for angle in (1e-6, 0.5, 45.0, 120.0, 179.999, 180.0):
        axis = rng.normal(size=3)
        R = Rotation.from_rotvec(np.radians(angle) * axis / np.linalg.norm(axis)).as_matrix()
        M = np.eye(4)
        M[:3, :3] = 1.7 * R
        M[:3, 3] = 5.0
        assert rotation_angle(M) == pytest.approx(angle, abs=1e-9)
    with pytest.raises(ValueError, match="reflects"):
        rotation_angle_2d(build_affine_matrix(sy=-1.0))
    with pytest.raises(ValueError, match="reflects"):
        rotation_angle(build_affine_matrix_3d(sz=-1.0))
    with pytest.raises(ValueError, match="singular"):
        rotation_angle(build_affine_matrix_3d(sz=0.0))


# --------------------------------------------------------------------------- normalised


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D)
def test_normalization_matrix_formula(shape, align_corners):
    N = normalization_matrix(shape, align_corners)
    sizes = shape[::-1]  # (W, H[, D]) for (x, y[, z])
    rng = np.random.default_rng(9)
    for _ in range(5):
        idx = np.array([rng.integers(0, n) for n in sizes], dtype=float)
        u = (N @ _hom(idx))[:-1]
        n = np.array(sizes, dtype=float)
        expected = 2 * idx / (n - 1) - 1 if align_corners else (2 * idx + 1) / n - 1
        np.testing.assert_allclose(u, expected, atol=TOL)
    first = (N @ _hom(np.zeros(len(shape))))[:-1]
    last = (N @ _hom(np.array(sizes) - 1.0))[:-1]
    if align_corners:
        np.testing.assert_allclose([first, last], [-np.ones_like(first), np.ones_like(last)])
    else:
        np.testing.assert_allclose(first, 1.0 / np.array(sizes) - 1, atol=TOL)
        np.testing.assert_allclose(last, 1 - 1.0 / np.array(sizes), atol=TOL)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D)
def test_pixel_normalized_round_trip(shape, align_corners):
    rng = np.random.default_rng(10)
    d = len(shape)
    make = _random_2d if d == 2 else _random_3d
    N = normalization_matrix(shape, align_corners)
    for _ in range(10):
        M = make(rng, center=image_center(shape))
        Mn = pixel_to_normalized(M, shape, align_corners)
        np.testing.assert_allclose(normalized_to_pixel(Mn, shape, align_corners), M, atol=TOL)
        # Mn maps normalised p to normalised M p
        p = _hom(rng.uniform(0, 10, d))
        np.testing.assert_allclose(Mn @ (N @ p), N @ (M @ p), atol=TOL)
        Mn2 = make(rng)
        back = pixel_to_normalized(
            normalized_to_pixel(Mn2, shape, align_corners), shape, align_corners
        )
        np.testing.assert_allclose(back, Mn2, atol=TOL)
    eye = np.eye(d + 1)
    np.testing.assert_allclose(pixel_to_normalized(eye, shape, align_corners), eye, atol=TOL)
    # one pixel along x is 2/W (or 2/(W-1)) in normalised units
    shift = np.eye(d + 1)
    shift[0, d] = 1.0
    W = shape[-1]
    expected = 2.0 / (W - 1) if align_corners else 2.0 / W
    assert pixel_to_normalized(shift, shape, align_corners)[0, d] == pytest.approx(expected)
    # batched
    batch = np.stack([make(rng) for _ in range(3)])
    Mn = pixel_to_normalized(batch, shape, align_corners)
    assert Mn.shape == batch.shape
    np.testing.assert_allclose(normalized_to_pixel(Mn, shape, align_corners), batch, atol=TOL)


def test_normalized_errors():
    with pytest.raises(ValueError, match="shape"):
        pixel_to_normalized(np.eye(3), (4, 5, 6))
    with pytest.raises(ValueError, match="shape"):
        normalized_to_pixel(np.eye(4), (4, 5))
    with pytest.raises(ValueError, match="align_corners"):
        pixel_to_normalized(np.eye(3), (1, 5), align_corners=True)
    with pytest.raises(TypeError, match="align_corners"):
        pixel_to_normalized(np.eye(3), (4, 5), align_corners="yes")
    with pytest.raises(TypeError, match="shape"):
        normalization_matrix((4.5, 5))
    with pytest.raises(ValueError, match="Mn"):
        normalized_to_pixel(np.zeros((3, 3)), (4, 5))
    with pytest.raises(ValueError, match="out_shape"):
        torch_theta(np.eye(3), (4, 5), out_shape=(4, 5, 6))
    with pytest.raises(ValueError, match="not invertible"):
        torch_theta(build_affine_matrix(sx=0.0), (4, 5))


# --------------------------------------------------------------------------- torch


def _torch_warp(img, M, align_corners, out_shape=None):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    out_shape = img.shape if out_shape is None else out_shape
    theta = torch.as_tensor(torch_theta(M, img.shape, align_corners, out_shape=out_shape))
    grid = F.affine_grid(theta[None], (1, 1, *out_shape), align_corners=align_corners)
    out = F.grid_sample(
        torch.as_tensor(img)[None, None],
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=align_corners,
    )
    return out[0, 0].numpy()


def _interior(M, in_shape, out_shape):
    """Output pixels whose source lies at least 1 px inside the input."""
    d = len(in_shape)
    grids = np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij")  # (z,) y, x
    pts = np.stack([*grids[::-1], np.ones_like(grids[0])]).astype(float)
    src = np.einsum("ij,j...->i...", invert(M), pts)[:d]
    mask = np.ones(out_shape, dtype=bool)
    for k, n in enumerate(in_shape[::-1]):
        mask &= (src[k] >= 1.0) & (src[k] <= n - 2.0)
    return mask


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", WARP_2D)
def test_torch_affine_grid_matches_scipy_2d(shape, align_corners):
    rng = np.random.default_rng(11)
    img = rng.random(shape)
    M = build_affine_matrix(
        theta=17.0, tx=1.5, ty=-0.8, sx=1.1, sy=0.9, shx=0.1, center=image_center(shape)
    )
    ref = affine_transform(img, *pull_matrix(M), order=1, mode="constant")
    out = _torch_warp(img, M, align_corners)
    mask = _interior(M, shape, shape)
    assert mask.sum() >= 0.3 * mask.size
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-5)
    # the push (M instead of its inverse) would not agree
    wrong = _torch_warp(img, invert(M), align_corners)
    assert np.max(np.abs(wrong[mask] - ref[mask])) > 1e-2
    # an output grid of another shape, same pixel frame
    out_shape = (shape[0] + 3, shape[1] - 2)
    ref = affine_transform(img, *pull_matrix(M), output_shape=out_shape, order=1, mode="constant")
    out = _torch_warp(img, M, align_corners, out_shape=out_shape)
    mask = _interior(M, shape, out_shape)
    assert mask.sum() >= 0.3 * mask.size
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", WARP_3D)
def test_torch_affine_grid_matches_scipy_3d(shape, align_corners):
    rng = np.random.default_rng(12)
    img = rng.random(shape)
    M = build_affine_matrix_3d(
        rx=8.0, ry=-11.0, rz=15.0, tx=0.4, ty=-0.6, tz=0.3, sx=1.05, sz=0.95,
        center=image_center(shape),
    )  # fmt: skip
    ref = affine_transform(img, *pull_matrix(M), order=1, mode="constant")
    out = _torch_warp(img, M, align_corners)
    mask = _interior(M, shape, shape)
    assert mask.sum() >= 0.3 * mask.size
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", [(7, 10), (4, 6, 5)])
def test_torch_identity_grid_is_the_normalization(shape, align_corners):
    torch = pytest.importorskip("torch")
    d = len(shape)
    theta = torch.as_tensor(np.eye(d + 1)[:d])[None]
    grid = torch.nn.functional.affine_grid(theta, (1, 1, *shape), align_corners=align_corners)
    grid = grid[0].numpy()  # (..., d) in (x, y[, z]) at index (z,) y, x
    N = normalization_matrix(shape, align_corners)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1], axis=-1)
    expected = idx @ N[:d, :d].T + N[:d, d]
    np.testing.assert_allclose(grid, expected, atol=1e-12)
