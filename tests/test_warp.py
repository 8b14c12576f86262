"""Warping images and volumes: the kernel against scipy and scikit-image, the lazy op.

Every comparison is against an independent reference: ``scipy.ndimage.affine_transform``
image by image (the definition), ``skimage.transform.warp`` (its own code for orders 0/1),
``scipy.ndimage.map_coordinates`` (scipy's boundary rules at adversarial coordinates),
torch's ``grid_sample`` (normalized coordinates), and where a pixel must land.
"""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

import scalign
from scalign.execution import gpu_available
from scalign.images import make_stack, validate_stack, warp_stack, warp_volume_xy_batched
from scalign.kernels.affine import (
    build_affine_matrix,
    image_center,
    pixel_to_normalized,
    pull_matrix,
    torch_theta,
)
from scalign.kernels.warp import (
    MIN_IMAGES,
    MODES,
    axis_taps,
    choose_method,
    clear_cache,
    warp_images,
)

# scipy's boundary mode <-> skimage.transform.warp's mode (orders 0/1 and callables).
SKIMAGE_MODE = {
    "grid-constant": "constant",
    "grid-wrap": "wrap",
    "nearest": "edge",
    "reflect": "symmetric",
    "mirror": "reflect",
}
SHAPES = [(17, 24), (24, 17), (16, 16), (9, 13)]  # H != W, odd and even


class ComputeForbidden(RuntimeError):
    pass


def forbid_compute(dsk, keys, **kwargs):
    raise ComputeForbidden("the op computed something while it should stay lazy")


def scipy_warp(images, M, order=1, mode="constant", cval=0.0, dtype=None):
    """The definition: scipy.ndimage.affine_transform image by image."""
    M = np.asarray(M)
    out = []
    for b, img in enumerate(images):
        mat, off = pull_matrix(M[b] if M.ndim == 3 else M)
        out.append(
            ndi.affine_transform(
                img, mat, off, order=order, mode=mode, cval=cval, output=dtype or img.dtype
            )
        )
    return np.stack(out)


def motions(shape, rng, n=4):
    """Random motions about the centre plus exact cases: 90° turns (integer and half-integer
    coordinates, ties of order 0), a flip, shifts to the very last pixel and beyond."""
    H, W = shape
    c = image_center(shape)
    out = [
        np.eye(3),
        build_affine_matrix(90, center=c),
        build_affine_matrix(-90, center=(0.0, 0.0)),
        build_affine_matrix(180, tx=0.5, ty=-0.5, center=c),
        np.diag([-1.0, 1.0, 1.0]) @ build_affine_matrix(tx=-(W - 1)),
        build_affine_matrix(tx=W - 1.0, ty=1.0),
        build_affine_matrix(tx=-2.0 * W, ty=3.0 * H),
        build_affine_matrix(7, 3.5, -2.25, 1.03, 1.03, center=c),
    ]
    for _ in range(n):
        theta, tx, ty = rng.uniform(-180, 180), *rng.uniform(-4, 4, 2)
        sx, sy, shx = *rng.uniform(0.6, 1.6, 2), rng.uniform(-0.3, 0.3)
        out.append(build_affine_matrix(theta, tx, ty, sx, sy, shx, center=c))
    return out


def random_rigid(shape, rng, n):
    c = image_center(shape)
    return np.stack(
        [
            build_affine_matrix(rng.uniform(-20, 20), *rng.uniform(-3, 3, 2), center=c)
            for _ in range(n)
        ]
    )


def source_coordinates(shape, M):
    """``(x, y)`` source coordinates ``M^-1 p`` of every output pixel."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    src = np.linalg.inv(M) @ np.stack([xx.ravel(), yy.ravel(), np.ones(H * W)])
    return src[0].reshape(shape), src[1].reshape(shape)


def source_inside(shape, M, margin=0.0):
    """Output pixels whose source coordinate ``M^-1 p`` lies inside the input extent."""
    H, W = shape
    x, y = source_coordinates(shape, M)
    return (x >= margin) & (x <= W - 1 - margin) & (y >= margin) & (y <= H - 1 - margin)


def no_ties(shape, M):
    """Output pixels whose source coordinates are no half-integers: where nearest-neighbour
    sampling is defined without a tie-breaking rule (skimage breaks ties otherwise)."""
    x, y = source_coordinates(shape, M)
    return (np.abs(x % 1 - 0.5) > 1e-9) & (np.abs(y % 1 - 0.5) > 1e-9)


def motion_3d(shape, rng, angle=25.0):
    M = np.eye(4)
    M[:3, :3] = Rotation.from_rotvec(np.radians(angle) * rng.normal(size=3) / 1.7).as_matrix()
    M[:3, :3] *= rng.uniform(0.8, 1.25)
    c = image_center(shape)
    M[:3, 3] = c - M[:3, :3] @ c + rng.uniform(-2, 2, 3)
    return M


# --------------------------------------------------------------------------------------
# scipy's boundary rules, one axis at a time
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("n", [2, 3, 6, 17])
def test_axis_taps_reproduce_scipy_at_adversarial_coordinates(mode, order, n):
    rng = np.random.default_rng(n)
    a = rng.random(n) + 1.0
    edges = [0, n - 1, -1, n, -n, 2 * n, -2 * n, 2 * n - 2, 2 - 2 * n, 1, 3 * n, -3 * n - 1]
    tiny = [0, 1e-17, -1e-17, 4e-16, -4e-16, 2e-15, -2e-15, 1e-12, -1e-12, 0.5, -0.5]
    tiny += [0.49999999999999994, -0.49999999999999994]
    c = np.concatenate(
        [
            np.add.outer(np.array(edges, float), tiny).ravel(),
            rng.uniform(-4 * n, 5 * n, 2000),
            rng.integers(-4 * n, 5 * n, 200).astype(float),
        ]
    )
    for cval in (0.0, 7.5):
        ref = ndi.map_coordinates(a, c[None], order=order, mode=mode, cval=cval)
        index, weight, inside, fill = axis_taps(c, n, order, mode)
        assert index.min() >= 0 and index.max() < n
        value = (weight * a[index] * (1 if fill is None else ~fill)).sum(axis=0)
        if fill is not None:
            value += cval * (weight * fill).sum(axis=0)
        value = np.where(inside, value, cval)
        np.testing.assert_allclose(value, ref, rtol=0, atol=1e-12)


def test_constant_mode_has_no_tolerance_at_the_last_pixel():
    """scipy fills a point whose source coordinate exceeds n - 1 by one ulp; so do we."""
    img = np.arange(1.0, 1.0 + 6 * 7, dtype=np.float64).reshape(6, 7)
    for tx, column in ((-5e-16 * 8, -1), (1e-12, 0)):
        # moving by -eps pulls from x + eps: the last column's source is 6 + eps > 6
        M = build_affine_matrix(tx=tx)
        ref = scipy_warp(img[None], M, cval=-9.0)
        for method in ("operator", "scipy"):
            out = warp_images(img[None], M, cval=-9.0, method=method)
            np.testing.assert_array_equal(out, ref)
            assert np.all(out[0, :, column] == -9.0)
            assert np.all(out[0, :, 1:-1] != -9.0)


# --------------------------------------------------------------------------------------
# the kernel against scipy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
def test_operator_equals_scipy_every_mode_and_fill(shape, order):
    rng = np.random.default_rng(sum(shape) + order)
    X = (rng.random((3, *shape)) + 0.5).astype(np.float32)
    for M in motions(shape, rng, n=3):
        for mode in MODES:
            for cval in (0.0, -3.0, np.nan):
                ref = scipy_warp(X, M, order, mode, cval)
                out = warp_images(X, M, order=order, mode=mode, cval=cval, method="operator")
                assert out.dtype == np.float32
                np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
                np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("order", [0, 1, 3, 5])
def test_an_identity_matrix_returns_the_images_exactly(order):
    """scipy's spline prefilter returns a float64 image only to rounding (order >= 2):
    an image whose motion is exactly the identity is copied, on every path."""
    X = np.random.default_rng(3).random((5, 13, 21))
    M = np.stack([np.eye(3), build_affine_matrix(0.5, 1.0), np.eye(3), np.eye(3), np.eye(3)])
    for mode in MODES:
        if mode == "grid-constant":  # scipy reads cval at weight-0 taps beyond the edge
            continue
        methods = ("auto", "scipy", "operator") if order <= 1 else ("auto", "scipy")
        for method in methods:
            np.testing.assert_array_equal(
                warp_images(X, np.eye(3), order=order, mode=mode, method=method), X
            )
        out = warp_images(X, M, order=order, mode=mode)
        np.testing.assert_array_equal(out[[0, 2, 3, 4]], X[[0, 2, 3, 4]])
        np.testing.assert_array_equal(out[1], scipy_warp(X[1:2], M[1], order, mode)[0])


def test_operator_equals_scipy_in_float64_to_rounding():
    rng = np.random.default_rng(1)
    X = rng.random((4, 13, 21))
    for M in motions((13, 21), rng):
        for mode in MODES:
            ref = scipy_warp(X, M, 1, mode, 0.25)
            out = warp_images(X, M, mode=mode, cval=0.25, method="operator")
            assert out.dtype == np.float64
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("mode", ["constant", "nearest", "reflect", "mirror", "wrap"])
def test_kernel_auto_equals_scipy_shared_matrix(shape, order, mode):
    rng = np.random.default_rng(3)
    X = rng.random((MIN_IMAGES[2] + 1, *shape), dtype=np.float32)
    M = build_affine_matrix(11, 1.5, -2.0, 1.1, 0.9, 0.05, center=image_center(shape))
    out = warp_images(X, M, order=order, mode=mode, cval=0.5)
    np.testing.assert_allclose(out, scipy_warp(X, M, order, mode, 0.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_per_image_matrices_equal_scipy(order, shape):
    rng = np.random.default_rng(4)
    X = rng.random((6, *shape), dtype=np.float32)
    Ms = random_rigid(shape, rng, 6)
    out = warp_images(X, Ms, order=order, mode="reflect")
    np.testing.assert_allclose(out, scipy_warp(X, Ms, order, "reflect"), rtol=0, atol=1e-5)


def test_methods_agree_and_auto_choice_is_documented():
    rng = np.random.default_rng(5)
    X = rng.random((10, 20, 30), dtype=np.float32)
    M = build_affine_matrix(30, 2, 1, center=image_center((20, 30)))
    a = warp_images(X, M, method="operator")
    b = warp_images(X, M, method="scipy")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    clear_cache()
    shape = (20, 30)
    assert choose_method(shape, 10, shared=True, order=1, mode="constant") == "operator"
    assert choose_method(shape, 10, shared=True, order=0, mode="wrap") == "operator"
    assert choose_method(shape, 1, shared=True, order=1, mode="constant") == "scipy"
    assert choose_method(shape, 10, shared=False, order=1, mode="constant") == "scipy"
    assert choose_method(shape, 10, shared=True, order=3, mode="constant") == "scipy"
    assert choose_method((1, 30), 10, shared=True, order=1, mode="constant") == "scipy"
    assert choose_method((8192, 8192), 10, shared=True, order=1, mode="constant") == "scipy"
    # once built, the operator is reused, even for a single image
    warp_images(X[: MIN_IMAGES[2]], M)
    assert choose_method(shape, 1, shared=True, order=1, mode="constant", matrix=M) == "operator"
    np.testing.assert_allclose(warp_images(X[:1], M), b[:1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="method='operator' needs one shared matrix"):
        warp_images(X[:2], np.stack([M, M]), method="operator")
    with pytest.raises(ValueError, match="unknown method"):
        warp_images(X, M, method="fast")


def test_threads_sharing_a_new_operator_get_the_same_result():
    rng = np.random.default_rng(6)
    X = rng.random((16, 40, 33), dtype=np.float32)
    M = build_affine_matrix(-17, 0.3, 0.7, center=image_center((40, 33)))
    clear_cache()
    results = [None] * 4

    def work(i):
        results[i] = warp_images(X, M, method="operator")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ref = scipy_warp(X, M)
    for r in results:
        np.testing.assert_allclose(r, ref, rtol=0, atol=1e-6)


def test_integer_images_become_float_equal_to_scipy():
    rng = np.random.default_rng(7)
    X = rng.integers(0, 255, (5, 15, 22), dtype=np.uint8)
    M = build_affine_matrix(9, 1.25, 0.5, center=image_center((15, 22)))
    out = warp_images(X, M)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, scipy_warp(X, M, dtype=np.float32), rtol=0, atol=1e-4)
    assert warp_images(X.astype(np.int32), M).dtype == np.float64
    assert warp_images(X, M, out_dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("cval", [-1.0, 0.5, 70000.0])
def test_integer_images_pad_with_cval_itself_in_grid_constant_splines(cval):
    """scipy pads integer input with ``cval`` cast to the input's dtype before its spline
    prefilter: uint16 projections warped at order 3 with ``grid-constant`` and
    ``cval=-1`` (or 70000) came out 7e4 off at the edges, 0.55 off with ``cval=0.5``."""
    y, x = np.mgrid[:40, :48]
    counts = 1000 + 500 * np.exp(-((x - 20.0) ** 2 + (y - 22.0) ** 2) / 80)
    X = np.stack([counts, counts[::-1]]).astype(np.uint16)
    M = build_affine_matrix(3, 2.5, -1.5, center=image_center((40, 48)))
    stack = make_stack(X, chunks=1)
    for matrix in (M, np.stack([M, np.linalg.inv(M)])):
        out = warp_stack(stack, matrix, order=3, mode="grid-constant", cval=cval).values
        ref = scipy_warp(X.astype(np.float32), matrix, 3, "grid-constant", cval=cval)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------
# the kernel against scikit-image, and where pixels go
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", [0, 1])
def test_equals_skimage_warp(shape, order):
    """skimage's own 2-D code (a matrix inverse map): equal in the interior for mode
    constant (skimage interpolates towards cval up to 1 px outside), and everywhere for
    the modes that mean the same (order 0: except exact ties, which skimage breaks the
    other way)."""
    from skimage.transform import warp

    rng = np.random.default_rng(8)
    X = rng.random((5, *shape))
    for M in motions(shape, rng, n=2):
        ours = warp_images(X, M, order=order)
        defined = np.ones(shape, dtype=bool) if order else no_ties(shape, M)
        inside = source_inside(shape, M) & defined
        for img, out in zip(X, ours, strict=True):
            sk = warp(img, np.linalg.inv(M), order=order, preserve_range=True)
            np.testing.assert_allclose(out[inside], sk[inside], rtol=0, atol=1e-5)
        for mode, sk_mode in SKIMAGE_MODE.items():
            ours = warp_images(X, M, order=order, mode=mode, cval=0.3)[2][defined]
            sk = warp(
                X[2], np.linalg.inv(M), order=order, mode=sk_mode, cval=0.3, preserve_range=True
            )
            np.testing.assert_allclose(ours, sk[defined], rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_order_3_equals_skimage_spline_path(shape):
    """skimage's order 3 with a matrix is bicubic convolution (not a B-spline); with a
    callable inverse map it is scipy's prefiltered B-spline: equal, unclipped."""
    from skimage.transform import warp

    rng = np.random.default_rng(9)
    X = rng.random((3, *shape))
    Ms = random_rigid(shape, rng, 3)
    for mode, sk_mode in SKIMAGE_MODE.items():
        ours = warp_images(X, Ms, order=3, mode=mode, cval=0.2)
        for img, out, M in zip(X, ours, Ms, strict=True):
            Minv = np.linalg.inv(M)

            def inverse_map(xy, Minv=Minv):
                return (np.c_[xy, np.ones(len(xy))] @ Minv.T)[:, :2]

            sk = warp(
                img, inverse_map, order=3, mode=sk_mode, cval=0.2, preserve_range=True, clip=False
            )
            np.testing.assert_allclose(out, sk, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["operator", "scipy"])
def test_a_bright_pixel_moves_from_p_to_M_p(method):
    H, W = 31, 40
    p = np.array([12.0, 9.0, 1.0])  # (x, y)
    img = np.zeros((1, H, W))
    img[0, int(p[1]), int(p[0])] = 1.0
    # exact: a quarter turn about an integer centre plus an integer shift
    M = build_affine_matrix(90, tx=3, ty=-2, center=(15.0, 14.0))
    q = M @ p
    out = warp_images(img, M, method=method)[0]
    assert np.unravel_index(np.argmax(out), out.shape) == (round(q[1]), round(q[0]))
    assert out.max() == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)
    # sub-pixel: the centroid of the warped blob is M p
    blob = np.zeros((1, H, W))
    yy, xx = np.mgrid[0:H, 0:W]
    blob[0] = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 1.5**2))
    M = build_affine_matrix(23, 2.3, 3.7, 1.1, 0.9, center=image_center((H, W)))
    q = M @ p
    out = warp_images(blob, M, method=method)[0]
    centroid = np.array([(out * xx).sum(), (out * yy).sum()]) / out.sum()
    np.testing.assert_allclose(centroid, q[:2], atol=0.05)


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shape", [(7, 10, 9), (8, 8, 8)])
def test_volumes_equal_scipy_3d(order, shape):
    rng = np.random.default_rng(10)
    V = rng.random((MIN_IMAGES[3] + 1, *shape), dtype=np.float32)
    M = motion_3d(shape, rng)
    for mode in ("constant", "nearest", "grid-constant", "mirror"):
        out = warp_images(V, M, order=order, mode=mode, cval=0.1)
        np.testing.assert_allclose(out, scipy_warp(V, M, order, mode, 0.1), rtol=0, atol=1e-5)
    Ms = np.stack([motion_3d(shape, rng) for _ in V])
    np.testing.assert_allclose(
        warp_images(V, Ms, order=order), scipy_warp(V, Ms, order), rtol=0, atol=1e-5
    )


def test_a_bright_voxel_moves_from_p_to_M_p():
    shape = (12, 15, 14)
    p = np.array([4.0, 6.0, 3.0, 1.0])  # (x, y, z)
    V = np.zeros((1, *shape))
    V[0, 3, 6, 4] = 1.0
    M = np.eye(4)
    M[:3, :3] = Rotation.from_euler("z", 90, degrees=True).as_matrix().round()
    M[:3, 3] = [9.0, 1.0, 5.0]
    q = M @ p
    for method in ("operator", "scipy"):
        out = warp_images(V, M, method=method)[0]
        assert np.unravel_index(np.argmax(out), shape) == (q[2], q[1], q[0])
        assert out.sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# the data model and the lazy op
# --------------------------------------------------------------------------------------


@pytest.fixture
def stack():
    rng = np.random.default_rng(11)
    X = rng.random((23, 18, 25), dtype=np.float32)
    ds = make_stack(X, chunks=6, attrs={"source": "test"})
    ds = ds.assign_coords(image=np.arange(23) * 10, x=np.linspace(0.0, 2.4, 25))
    ds["images"].attrs["units"] = "counts"
    ds["matrix"] = (("image", "row", "col"), random_rigid((18, 25), rng, 23))
    return ds


def test_make_and_validate_stack():
    rng = np.random.default_rng(12)
    ds = make_stack(rng.random((10, 8, 9)), chunks=4)
    assert ds["images"].dims == ("image", "y", "x")
    assert ds["images"].chunks == ((4, 4, 2), (8,), (9,))
    vol = make_stack(rng.random((3, 5, 6, 7)).astype(np.float32))
    assert vol["images"].dims == ("volume", "z", "y", "x")
    assert vol["images"].chunks[0] == (3,)
    assert validate_stack(ds["images"])["images"].dims == ("image", "y", "x")
    lazy = make_stack(da.zeros((7, 4, 4), chunks=2), chunks=3)
    assert lazy["images"].chunks[0] == (3, 3, 1)


def test_warp_stack_is_lazy_and_keeps_structure(stack):
    M = build_affine_matrix(5, 1, 2, center=image_center((18, 25)))
    with dask.config.set(scheduler=forbid_compute):
        outs = [
            warp_stack(stack, M),
            warp_stack(stack, "matrix", order=3),
            warp_stack(stack["images"], stack["matrix"]),
            warp_stack(stack, stack["matrix"].values, mode="nearest"),
        ]
        with pytest.raises(ComputeForbidden):
            outs[0].values  # noqa: B018
    for out in outs:
        assert out.name == "images"
        assert out.dims == ("image", "y", "x")
        assert out.chunks == stack["images"].chunks
        assert out.dtype == np.float32
        assert out.attrs == {"units": "counts"}
        np.testing.assert_array_equal(out["image"], stack["image"])
        np.testing.assert_array_equal(out["x"], stack["x"])
        assert type(out.data._meta) is np.ndarray


def test_warp_stack_stays_lazy_with_chunked_labels_on_both_sides(stack):
    """A non-index coordinate over ``image`` that is chunked (``Dataset.chunk`` chunks
    them) on the stack or on the matrices: merging the outputs' coordinates compared the
    two by computing them, so warp_stack computed before it returned."""
    time = ("image", np.linspace(0.0, 1.0, 23))
    labelled = stack.assign_coords(time=time)
    matrices = labelled["matrix"]
    with dask.config.set(scheduler=forbid_compute):
        for images, matrix in (
            (labelled.chunk(image=5), matrices),
            (labelled, matrices.chunk(image=4)),
        ):
            out = warp_stack(images, matrix)
            assert "time" in out.coords
    np.testing.assert_array_equal(out.values, warp_stack(stack, stack["matrix"].values).values)


def test_warp_stack_equals_scipy(stack):
    X = stack["images"].values
    Ms = stack["matrix"].values
    M = build_affine_matrix(-8, 0.5, 1.5, 1.05, 1.05, center=image_center((18, 25)))
    np.testing.assert_allclose(warp_stack(stack, M).values, scipy_warp(X, M), atol=1e-5)
    for order in (0, 1, 3):
        out = warp_stack(stack, "matrix", order=order, mode="mirror")
        np.testing.assert_allclose(out.values, scipy_warp(X, Ms, order, "mirror"), atol=1e-5)
    as_array = warp_stack(stack, Ms, mode="wrap").values
    np.testing.assert_allclose(as_array, scipy_warp(X, Ms, 1, "wrap"), atol=1e-5)
    ints = make_stack((X * 1000).astype(np.uint16), chunks=5)
    out = warp_stack(ints, M)
    assert out.dtype == np.float32
    ref = scipy_warp((X * 1000).astype(np.uint16), M, dtype=np.float32)
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=1e-3)


def test_warp_stack_of_volumes_equals_scipy():
    rng = np.random.default_rng(13)
    V = rng.random((7, 6, 9, 8), dtype=np.float32)
    ds = make_stack(V, chunks=3)
    M = motion_3d(V.shape[1:], rng)
    out = warp_stack(ds, M, mode="nearest")
    assert out.dims == ("volume", "z", "y", "x") and out.chunks == ds["images"].chunks
    np.testing.assert_allclose(out.values, scipy_warp(V, M, 1, "nearest"), atol=1e-5)
    Ms = np.stack([motion_3d(V.shape[1:], rng) for _ in V])
    ds["matrix"] = (("volume", "row", "col"), Ms)
    np.testing.assert_allclose(warp_stack(ds, "matrix").values, scipy_warp(V, Ms), atol=1e-5)


def test_threaded_and_distributed_are_identical(stack, client):
    M = build_affine_matrix(12, 1.0, -1.0, center=image_center((18, 25)))
    for out in (warp_stack(stack, M), warp_stack(stack, "matrix")):
        threaded = out.compute(scheduler="threads")
        distributed = out.compute()
        assert client.scheduler_info()["workers"]
        np.testing.assert_array_equal(threaded.values, distributed.values)


def test_zarr_round_trip_and_lazy_matrices_from_a_store(stack, tmp_path):
    M = build_affine_matrix(3, 2.0, 0.5, center=image_center((18, 25)))
    out = warp_stack(stack, M)
    path = scalign.save_zarr(out.to_dataset(), tmp_path / "warped.zarr")
    back = xr.open_zarr(path, consolidated=False)
    np.testing.assert_array_equal(back["images"].values, out.values)
    assert back["images"].attrs == {"units": "counts"}
    assert back["images"].dtype == np.float32
    # a stack read from zarr: the per-image matrices stay lazy until computed
    src = scalign.save_zarr(stack, tmp_path / "stack.zarr")
    opened = xr.open_zarr(src, consolidated=False)
    with dask.config.set(scheduler=forbid_compute):
        lazy = warp_stack(opened, "matrix")
    np.testing.assert_allclose(
        lazy.values, scipy_warp(stack["images"].values, stack["matrix"].values), atol=1e-5
    )
    as_dask = da.from_array(stack["matrix"].values, chunks=(7, 3, 3))
    with dask.config.set(scheduler=forbid_compute):
        lazy = warp_stack(opened, as_dask)
    np.testing.assert_allclose(
        lazy.values, scipy_warp(stack["images"].values, stack["matrix"].values), atol=1e-5
    )
    bad = opened.copy()
    bad["matrix"] = bad["matrix"] * xr.DataArray([0.0, 0.0, 1.0], dims="row")  # singular
    with pytest.raises(ValueError, match="not invertible"):
        warp_stack(bad, "matrix").compute()


# --------------------------------------------------------------------------------------
# the seed's function
# --------------------------------------------------------------------------------------


def test_warp_volume_xy_batched_equals_warp_stack_and_batches():
    rng = np.random.default_rng(14)
    X = rng.random((11, 19, 14), dtype=np.float32)
    M = build_affine_matrix(-12, 1.5, 2.5, 0.9, 1.1, center=image_center((19, 14)))
    clear_cache()
    ref = warp_stack(make_stack(X, chunks=4), M).values
    results = [warp_volume_xy_batched(X, M, batch_size=b) for b in (None, 1, 3, 11, 100)]
    for r in results:
        assert r.dtype == np.float32 and r.shape == X.shape
        np.testing.assert_array_equal(r, results[0])
    np.testing.assert_allclose(results[0], ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(results[0], scipy_warp(X, M), rtol=0, atol=1e-5)
    few = warp_volume_xy_batched(X[:2], M, order=3, mode="reflect", batch_size=1)
    np.testing.assert_allclose(few, scipy_warp(X[:2], M, 3, "reflect"), atol=1e-5)


def test_normalized_matrix_is_converted_exactly():
    rng = np.random.default_rng(15)
    H, W = 12, 19  # H != W: a normalized rotation is not a pixel rotation
    X = rng.random((4, H, W), dtype=np.float32)
    M = build_affine_matrix(21, 1.3, -0.8, 1.05, 0.95, center=image_center((H, W)))
    Mn = pixel_to_normalized(M, (H, W), align_corners=False)
    pixel = warp_volume_xy_batched(X, M)
    normalized = warp_volume_xy_batched(X, Mn, is_pixel_space=False)
    np.testing.assert_allclose(normalized, pixel, rtol=0, atol=1e-5)
    # independent: torch's grid_sample on u = (2i + 1)/W - 1, bilinear, zeros beyond
    torch = pytest.importorskip("torch")
    theta = torch.as_tensor(torch_theta(M, (H, W), align_corners=False))[None]
    grid = torch.nn.functional.affine_grid(theta, (1, 1, H, W), align_corners=False)
    ref = torch.nn.functional.grid_sample(
        torch.as_tensor(X)[:, None].double(), grid.expand(4, H, W, 2), align_corners=False
    )[:, 0].numpy()
    inside = source_inside((H, W), M)
    np.testing.assert_allclose(normalized[:, inside], ref[:, inside], rtol=0, atol=1e-5)
    grid_constant = warp_volume_xy_batched(X, Mn, is_pixel_space=False, mode="grid-constant")
    np.testing.assert_allclose(grid_constant, ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_bad_matrices(stack):
    singular = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="matrix is not invertible"):
        warp_stack(stack, singular)
    Ms = stack["matrix"].values.copy()
    Ms[5, :2, :2] = 0.0
    with pytest.raises(ValueError, match=r"matrix\[5\] is not invertible"):
        warp_stack(stack, Ms)
    with pytest.raises(ValueError, match=r"3×3 for 2-D images"):
        warp_stack(stack, np.eye(4))
    with pytest.raises(ValueError, match=r"3×3 for 2-D images"):
        warp_stack(stack, np.eye(2))
    with pytest.raises(ValueError, match="matrix must be"):
        warp_stack(stack, np.eye(3)[None, None])
    nan = np.eye(3)
    nan[0, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        warp_stack(stack, nan)
    Ms = stack["matrix"].values.copy()
    Ms[3, 1, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        warp_stack(stack, Ms)
    with pytest.raises(ValueError, match="22 per-image matrices but the stack has 23 images"):
        warp_stack(stack, stack["matrix"].values[:22])
    with pytest.raises(ValueError, match="not homogeneous"):
        warp_stack(stack, np.ones((3, 3)))
    with pytest.raises(TypeError, match="must hold real numbers"):
        warp_stack(stack, np.eye(3) * 1j)
    with pytest.raises(TypeError, match="matrix must be an array of numbers"):
        warp_stack(stack, [[1.0, 0.0], [0.0]])
    with pytest.raises(ValueError, match="'nope' is not in the stack"):
        warp_stack(stack, "nope")
    with pytest.raises(ValueError, match="names a variable, but stack is a DataArray"):
        warp_stack(stack["images"], "matrix")
    with pytest.raises(ValueError, match="must have dims"):
        warp_stack(stack, xr.DataArray(np.eye(3), dims=("a", "b")))
    vol = make_stack(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"4×4 for 3-D volumes"):
        warp_stack(vol, np.eye(3))
    with pytest.raises(ValueError, match="not invertible"):
        warp_images(np.zeros((2, 5, 5)), singular)


def test_bad_options(stack):
    M = np.eye(3)
    with pytest.raises(ValueError, match="unknown mode 'edge'"):
        warp_stack(stack, M, mode="edge")
    with pytest.raises(ValueError, match="order must be an integer 0..5"):
        warp_stack(stack, M, order=6)
    with pytest.raises(TypeError, match="order must be an integer"):
        warp_stack(stack, M, order=1.5)
    with pytest.raises(TypeError, match="order must be an integer"):
        warp_stack(stack, M, order=True)
    with pytest.raises(TypeError, match="cval must be a real number"):
        warp_stack(stack, M, cval="0")
    with pytest.raises(TypeError, match="out_dtype must be a floating dtype"):
        warp_images(np.zeros((1, 4, 4)), M, out_dtype=np.int16)
    with pytest.raises(ValueError, match="batch of images"):
        warp_images(np.zeros((4, 4)), M)


def test_bad_images():
    with pytest.raises(ValueError, match="images has 1 non-finite"):
        make_stack(np.array([[[0.0, np.nan], [1.0, 2.0]]]))
    with pytest.raises(ValueError, match="images is empty: 0 images"):
        make_stack(np.zeros((0, 4, 4)))
    with pytest.raises(ValueError, match="images is empty"):
        make_stack(np.zeros((3, 0, 4)))
    with pytest.raises(ValueError, match=r"images must have shape \(image, y, x\)"):
        make_stack(np.zeros((4, 4)))
    with pytest.raises(TypeError, match="images must be real numbers"):
        make_stack(np.zeros((2, 4, 4), dtype=complex))
    with pytest.raises(TypeError, match="chunks must be a positive integer"):
        make_stack(np.zeros((2, 4, 4)), chunks=1.5)
    with pytest.raises(ValueError, match="no 'images' variable"):
        validate_stack(xr.Dataset({"other": (("image", "y", "x"), np.zeros((1, 2, 2)))}))
    with pytest.raises(ValueError, match="must have dims"):
        validate_stack(xr.DataArray(np.zeros((2, 3, 3)), dims=("a", "y", "x")))
    with pytest.raises(TypeError, match="must be an xarray Dataset"):
        validate_stack(np.zeros((2, 3, 3)))
    M = np.eye(3)
    inf = np.zeros((2, 3, 3))
    inf[1, 1, 1] = np.inf
    with pytest.raises(ValueError, match="stack has 1 non-finite"):
        warp_volume_xy_batched(inf, M)
    with pytest.raises(ValueError, match=r"stack must have shape \(N, H, W\)"):
        warp_volume_xy_batched(np.zeros((2, 3, 3, 3)), M)
    with pytest.raises(ValueError, match="affine_matrix must be 3×3"):
        warp_volume_xy_batched(np.zeros((2, 3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="affine_matrix is not invertible"):
        warp_volume_xy_batched(np.zeros((2, 3, 3)), np.diag([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        warp_volume_xy_batched(np.zeros((2, 3, 3)), M, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be a positive integer"):
        warp_volume_xy_batched(np.zeros((2, 3, 3)), M, batch_size=2.0)
    with pytest.raises(TypeError, match="is_pixel_space must be a bool"):
        warp_volume_xy_batched(np.zeros((2, 3, 3)), M, is_pixel_space="yes")


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")
@pytest.mark.parametrize("order", [0, 1, 3])
def test_cupy_kernel_matches_numpy(order):
    import cupy

    rng = np.random.default_rng(16)
    X = rng.random((6, 33, 40), dtype=np.float32)
    M = build_affine_matrix(17, 2.0, -1.0, 1.1, 0.9, center=image_center((33, 40)))
    Ms = random_rigid((33, 40), rng, 6)
    for matrix in (M, Ms):
        for mode in ("nearest", "constant"):
            out = warp_images(cupy.asarray(X), matrix, order=order, mode=mode)
            assert isinstance(out, cupy.ndarray) and out.dtype == np.float32
            ref = scipy_warp(X, matrix, order, mode)
            for b in range(len(X)):
                inside = source_inside((33, 40), matrix if matrix.ndim == 2 else matrix[b], 1.0)
                np.testing.assert_allclose(out[b].get()[inside], ref[b][inside], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")
def test_cupy_kernel_takes_any_nan_as_cval():
    """cupyx writes cval into its kernel source and spells NaN right only for numpy.nan
    itself: float("nan") (the CLI's --cval nan), math.nan or a NaN unpickled on a worker
    failed to compile (cupy#4082)."""
    import math
    import pickle

    import cupy

    X = np.random.default_rng(3).random((4, 20, 24), dtype=np.float32)
    M = build_affine_matrix(20, 3.0, -2.0, center=image_center((20, 24)))
    ref = scipy_warp(X, M, 1, "constant", cval=np.nan)
    for cval in (float("nan"), math.nan, pickle.loads(pickle.dumps(np.nan)), np.float32("nan")):
        out = warp_images(cupy.asarray(X), M, order=1, mode="constant", cval=cval).get()
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        inside = ~np.isnan(ref)
        np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)
