"""The differentiable PyTorch Procrustes: agreement with NumPy, gradients, bad input."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from scipy.stats import special_ortho_group

from scalign import procrustes_align, weighted_procrustes

torch = pytest.importorskip("torch")

from scalign.differentiable import torch_procrustes_align  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
CUBE = np.array(list(itertools.product([-1.0, 1.0], repeat=3)))


def _rotation(d: int, seed: int) -> np.ndarray:
    if d == 3:
        return Rotation.random(random_state=seed).as_matrix()
    angle = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _polygon(corners: int) -> np.ndarray:
    """A regular polygon in the z = 0 plane of 3-D space: in-plane covariance isotropic."""
    angle = 2 * np.pi * np.arange(corners) / corners
    return np.stack([np.cos(angle), np.sin(angle), np.zeros(corners)], axis=1)


def _singular_values(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    H = (X - X.mean(0)).T @ (Y - Y.mean(0)) / len(X)
    return np.linalg.svd(H, compute_uv=False)


def _batch(d: int, items: int = 4, n: int = 25, seed: int = 0):
    """Moving sets that are rotated, shifted, scaled, noisy copies of a target."""
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((n, d)) * np.array([3.0, 2.0, 1.0])[:d]
    X = np.stack(
        [
            (Y - rng.standard_normal(d)) @ _rotation(d, seed + i) / 1.7
            + 0.05 * rng.standard_normal((n, d))
            for i in range(items)
        ]
    )
    return X, Y


def _t(a: np.ndarray, dtype=torch.float64, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_numpy_item_by_item(d, dtype, scale, weighted):
    X, Y = _batch(d)
    rng = np.random.default_rng(1)
    X = X.astype(NUMPY_DTYPE[dtype])
    Ys = Y + 0.1 * rng.standard_normal(X.shape)
    w = rng.uniform(0.2, 2.0, X.shape[:2]) if weighted else None
    # One target shared by the batch, then one target (and weight vector) per item.
    for target, weights in ((Y, None if w is None else w[0]), (Ys, w)):
        aligned, R, error = torch_procrustes_align(
            _t(X, dtype), _t(target, dtype), scale, None if weights is None else _t(weights, dtype)
        )
        assert aligned.dtype == R.dtype == error.dtype == dtype
        for i in range(len(X)):
            Yi = target if target.ndim == 2 else target[i]
            if weights is None:
                expected = procrustes_align(X[i], Yi, scale=scale)
            else:
                wi = weights if weights.ndim == 1 else weights[i]
                expected = weighted_procrustes(X[i], Yi, wi, scale=scale)
            got = (aligned[i], R[i], error[i])
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("d", [4, 5])
def test_higher_dimensions_match_numpy_and_pass_gradcheck(d):
    rng = np.random.default_rng(d)
    Y = rng.standard_normal((9, d))
    X = (Y + 0.1 * rng.standard_normal((9, d))) @ special_ortho_group.rvs(d, random_state=d)
    aligned, R, error = torch_procrustes_align(_t(X), _t(Y), True)
    for a, b in zip((aligned, R, error), procrustes_align(X, Y, scale=True), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b, rtol=0, atol=1e-10)

    def fit(X, Y):
        return torch_procrustes_align(X, Y, True)

    assert torch.autograd.gradcheck(fit, (_t(X, grad=True), _t(Y, grad=True)))


def test_batch_axes_broadcast_and_unbatched_input_gives_scalars():
    X, Y = _batch(3, items=6)
    X = X.reshape(2, 3, *X.shape[1:])
    w = np.random.default_rng(2).uniform(0.5, 1.5, (3, X.shape[-2]))
    aligned, R, error = torch_procrustes_align(_t(X), _t(Y), weights=_t(w))
    assert aligned.shape == X.shape and R.shape == (2, 3, 3, 3) and error.shape == (2, 3)
    one = torch_procrustes_align(_t(X[1, 2]), _t(Y), weights=_t(w[2]))
    assert one[2].shape == ()
    for a, b in zip((aligned[1, 2], R[1, 2], error[1, 2]), one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("scale", [False, True])
def test_recovers_a_known_transform(d, scale):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3, 12, d))
    R_true = np.stack([_rotation(d, seed) for seed in (4, 5, 6)])
    s_true = np.array([1.7, 0.4, 2.5]) if scale else np.ones(3)
    t_true = rng.standard_normal((3, 1, d)) * 10
    Y = s_true[:, None, None] * X @ np.swapaxes(R_true, -1, -2) + t_true
    aligned, R, error = torch_procrustes_align(_t(X), _t(Y), scale)
    np.testing.assert_allclose(R.numpy(), R_true, atol=1e-6)
    np.testing.assert_allclose(aligned.numpy(), Y, atol=1e-6)
    np.testing.assert_allclose(error.numpy(), 0, atol=1e-6)
    centred = aligned - aligned.mean(dim=-2, keepdim=True)
    s = centred.norm(dim=(-2, -1)) / _t(X - X.mean(-2, keepdims=True)).norm(dim=(-2, -1))
    np.testing.assert_allclose(s.numpy(), s_true, rtol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_mirror_image_gives_a_proper_rotation(d):
    X, _ = _batch(d, items=1)
    Y = X[0] * np.r_[-1.0, np.ones(d - 1)]
    aligned, R, error = torch_procrustes_align(_t(X[0]), _t(Y))
    assert torch.linalg.det(R).item() == pytest.approx(1.0, abs=1e-12)
    assert error.item() > 0.1
    expected = procrustes_align(X[0], Y)
    np.testing.assert_allclose(R.numpy(), expected[1], atol=1e-10)
    np.testing.assert_allclose(aligned.numpy(), expected[0], atol=1e-10)


def _gradcheck_case(case: str):
    """``(X, Y, weights, scale)`` in float64 and the singular values of ``H`` that are meant
    to tie (None for the generic cases)."""
    rng = np.random.default_rng(7)
    if case.startswith("generic"):
        X, Y = _batch(3, items=1, n=7)
        if case == "generic":
            return X[0], Y, None, False, None
        return X[0], Y, rng.uniform(0.5, 2.0, 7), True, None
    shape, tie = case.split(", ")
    # A cube's covariance is isotropic (three singular values tie); a hexagon's is isotropic
    # in its plane (two tie, the third is ~0). A scale mismatch keeps the residual nonzero.
    X = CUBE if shape == "cube" else _polygon(6)
    noise = 0.0 if tie == "exact tie" else 1e-13 * rng.standard_normal(X.shape)
    Y = 1.5 * X @ _rotation(3, 8).T + [1.0, -2.0, 0.5] + noise
    return X, Y, None, False, _singular_values(X, Y)[:2]


@pytest.mark.parametrize(
    "case",
    [
        "generic",
        "generic, weighted and scaled",
        "cube, exact tie",
        "cube, near tie",
        "hexagon, exact tie",
        "hexagon, near tie",
    ],
)
def test_gradcheck_of_aligned_rotation_and_error(case):
    X, Y, w, scale, tied = _gradcheck_case(case)
    if tied is not None:
        # Below ~1e-12 torch.linalg.svd's own backward no longer passes this gradcheck.
        assert np.ptp(tied) < 1e-11
    inputs = [_t(X, grad=True), _t(Y, grad=True)]
    if w is not None:
        inputs.append(_t(w, grad=True))

    def fit(X, Y, w=None):
        return torch_procrustes_align(X, Y, scale, w)

    assert torch.autograd.gradcheck(fit, tuple(inputs))


@pytest.mark.parametrize("scale", [False, True])
def test_seed_example_gradients_are_finite_nonzero_and_consistent(scale):
    rng = np.random.default_rng(9)
    Xn = rng.standard_normal((100, 3)) * [3.0, 2.0, 1.0]
    Yn = 1.2 * Xn @ _rotation(3, 10).T + [1.0, 2.0, 3.0] + 0.1 * rng.standard_normal((100, 3))
    grads = []
    for loss_of in (
        lambda aligned, Y, error: error,
        lambda aligned, Y, error: ((aligned - Y) ** 2).mean(),
        lambda aligned, Y, error: error**2 / 3,
    ):
        X, Y = _t(Xn, grad=True), _t(Yn)
        aligned, _, error = torch_procrustes_align(X, Y, scale)
        loss_of(aligned, Y, error).backward()
        assert torch.isfinite(X.grad).all() and (X.grad != 0).all()
        grads.append(X.grad)
    # mean((aligned - Y)^2) = error^2 / d: one goes through the rotation's backward, the
    # other through the envelope theorem, so they agree only if both are right.
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-9, atol=1e-14)


def _symmetric_case(case: str) -> tuple[np.ndarray, np.ndarray]:
    R0 = _rotation(3, 11)
    if case == "cube onto its rotated double":
        return CUBE, 2.0 * CUBE @ R0.T + 1.0
    if case == "cube onto its mirror image":
        return CUBE, CUBE * [1.0, 1.0, -1.0]
    if case == "cube onto itself":
        return CUBE, CUBE.copy()
    return _polygon(5), 0.5 * _polygon(5) @ R0.T


@pytest.mark.parametrize(
    "case",
    [
        "cube onto its rotated double",
        "cube onto its mirror image",
        "cube onto itself",
        "pentagon onto its rotated half",
    ],
)
@pytest.mark.parametrize("scale", [False, True])
def test_exactly_symmetric_sets_have_finite_gradients(case, scale):
    Xn, Yn = _symmetric_case(case)
    sigma = _singular_values(Xn, Yn)
    assert sigma[0] - sigma[1] < 1e-12
    for loss_of in (
        lambda aligned, Y, error: error,
        lambda aligned, Y, error: ((aligned - Y) ** 2).mean(),
    ):
        X, Y = _t(Xn, grad=True), _t(Yn, grad=True)
        aligned, R, error = torch_procrustes_align(X, Y, scale)
        loss_of(aligned, Y, error).backward()
        assert torch.isfinite(X.grad).all() and torch.isfinite(Y.grad).all()
        assert torch.linalg.det(R).item() == pytest.approx(1.0)


def test_mirror_cube_tie_is_regularised_not_infinite():
    """Mirror cube: lambda = (1, 1, -1) up to 1e-12, so the optimal rotation is barely
    unique and 1 / (lambda_i + lambda_3) ~ 1e12; the regularised reciprocal bounds it."""
    noise = 1e-12 * np.random.default_rng(13).standard_normal(CUBE.shape)
    Yn = CUBE * [1.0, 1.0, -1.0] + noise
    lam = _singular_values(CUBE, Yn)
    assert 0 < lam[1] - lam[2] < 1e-10
    X = _t(CUBE, grad=True)
    aligned, _, _ = torch_procrustes_align(X, _t(Yn))
    (aligned * torch.arange(24.0, dtype=torch.float64).reshape(8, 3)).sum().backward()
    assert torch.isfinite(X.grad).all() and X.grad.abs().max() < 1e9


def test_second_derivatives_are_refused_rather_than_wrong():
    X, Y = _batch(3, items=1, n=6)
    Xt = _t(X[0], grad=True)
    aligned, _, _ = torch_procrustes_align(Xt, _t(Y))
    (g,) = torch.autograd.grad(aligned.square().sum(), Xt, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_dtype_follows_the_inputs():
    X, Y = _batch(2, items=1, n=5)
    out32 = torch_procrustes_align(_t(X[0], torch.float32), _t(Y, torch.float32))
    assert all(a.dtype == torch.float32 for a in out32)
    mixed = torch_procrustes_align(_t(X[0], torch.float32), _t(Y, torch.float64))
    assert all(a.dtype == torch.float64 for a in mixed)
    ints = torch_procrustes_align(torch.tensor([[0, 0], [1, 0], [0, 2]]), _t(Y[:3]))
    assert ints[0].dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cuda_tensors_stay_on_the_device_and_match_cpu(dtype):
    X, Y = _batch(3, items=64, n=40)
    w = np.random.default_rng(12).uniform(0.5, 2.0, 40)
    cpu = torch_procrustes_align(_t(X, dtype), _t(Y, dtype), True, _t(w, dtype))
    Xg = _t(X, dtype).cuda().requires_grad_()
    gpu = torch_procrustes_align(Xg, _t(Y, dtype).cuda(), True, _t(w, dtype).cuda())
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda and b.dtype == dtype
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=TOL[dtype] * 10)
    (gpu[2].sum() + gpu[0].square().mean()).backward()
    assert Xg.grad.is_cuda and torch.isfinite(Xg.grad).all()


def _bad_inputs():
    X = torch.randn(5, 3, dtype=torch.float64)
    Y = torch.randn(5, 3, dtype=torch.float64)
    w = torch.ones(5, dtype=torch.float64)
    nan = X.clone()
    nan[2, 1] = float("nan")
    inf = Y.clone()
    inf[0, 0] = float("inf")
    return [
        ((X.numpy(), Y), TypeError, "X must be a torch.Tensor, got ndarray"),
        ((X, [[0.0] * 3] * 5), TypeError, "Y must be a torch.Tensor, got list"),
        ((X.to(torch.complex128), Y), TypeError, "X must be real"),
        ((X[0], Y), ValueError, r"X must have shape \(\.\.\., n_points, d\)"),
        ((X[:0], Y[:0]), ValueError, "X is empty"),
        ((X, Y[:, :2]), ValueError, "X is 3-dimensional but Y is 2-dimensional"),
        ((X, Y[:4]), ValueError, "X has 5 points but Y has 4"),
        ((X[:2], Y[:2]), ValueError, "X has 2 point.s. in 3 dimensions: at least 3"),
        ((X, torch.empty(5, 3, device="meta")), ValueError, "Y is on meta but X is on cpu"),
        ((X.expand(2, 5, 3), Y.expand(3, 5, 3)), ValueError, "batch shapes do not broadcast"),
        ((nan, Y), ValueError, r"X has 1 non-finite \(NaN or inf\) coordinate"),
        ((X, inf), ValueError, r"Y has 1 non-finite \(NaN or inf\) coordinate"),
        ((X[:1].expand(5, 3), Y), ValueError, "X is degenerate: all of its points coincide"),
        ((X, Y[:1].expand(5, 3)), ValueError, "Y is degenerate: all of its points coincide"),
        ((X.half(), Y), TypeError, "X has dtype torch.float16: the SVD needs float32"),
        ((X, Y.bfloat16()), TypeError, "Y has dtype torch.bfloat16"),
        ((X, Y, False, w.numpy()), TypeError, "weights must be a torch.Tensor"),
        ((X, Y, False, w[:4]), ValueError, r"weights must have shape \(\.\.\., 5\)"),
        ((X, Y, False, -w), ValueError, "weights has negative values"),
        ((X, Y, False, 0 * w), ValueError, "weights are all zero"),
        ((X, Y, False, w * float("nan")), ValueError, "weights has non-finite"),
    ]


@pytest.mark.parametrize(("args", "error", "match"), _bad_inputs())
def test_bad_input_is_refused_with_a_message_naming_it(args, error, match):
    with pytest.raises(error, match=match):
        torch_procrustes_align(*args)


def test_coinciding_points_are_judged_per_item_as_in_numpy():
    """The tolerance is relative to each item's magnitude: a small, valid item beside one
    far from the origin was refused (the batch's largest coordinate set the tolerance)."""
    rng = np.random.default_rng(0)
    small = rng.normal(size=(6, 3)) * 1e-3
    far = rng.normal(size=(6, 3)) * 10 + 2000.0
    X = torch.from_numpy(np.stack([far, small]).astype(np.float32))
    _, _, error = torch_procrustes_align(X, X)  # a set onto itself: float32 rounding only
    assert error[0] < 1e-6 * 2000 and error[1] < 1e-6 * 1e-3
    flat = X.clone()
    flat[1] = flat[1, :1]
    with pytest.raises(ValueError, match=r"X is degenerate: all of its points coincide \(item 1\)"):
        torch_procrustes_align(flat, X)
    with pytest.raises(ValueError, match=r"X is degenerate: .* \(item 1\)"):
        procrustes_align(flat.numpy(), X.numpy())


@pytest.mark.parametrize("scale", [False, True])
def test_float32_sets_far_from_the_origin_fit_as_in_numpy(scale):
    """The centroids were float32 sums: 1e4 Å from the origin the RMSD came out 4% off
    NumPy's (0.0177 vs 0.0170 Å); NumPy's float64 centroids are the reference."""
    rng = np.random.default_rng(3)
    Y = rng.standard_normal((40, 3)) * 5.0
    X = np.stack([Y @ _rotation(3, i) + 0.01 * rng.standard_normal(Y.shape) for i in range(4)])
    X32, Y32 = (X + 1e4).astype(np.float32), (Y + 1e4).astype(np.float32)
    for w in (None, np.random.default_rng(1).uniform(0.5, 2.0, len(Y))):
        ref = weighted_procrustes(X32, Y32, w, scale=scale)[-1]
        tw = None if w is None else _t(w, torch.float32)
        _, _, error = torch_procrustes_align(
            _t(X32, torch.float32), _t(Y32, torch.float32), scale, tw
        )
        np.testing.assert_allclose(error.numpy(), ref, rtol=1e-4)


@pytest.mark.parametrize("size", [1e-20, 1e20])
@pytest.mark.parametrize("scale", [False, True])
def test_float32_sets_of_any_size_fit_and_differentiate_like_unit_ones(size, scale):
    """The fit is homogeneous: scaling both sets by c scales the aligned set and the error
    by c and leaves R and the error's gradient. Float32 sets of size 1e20 made the SVD fail
    (the covariance overflowed) and those of size 1e-20 were called coincident."""
    X, Y = _batch(3, seed=4)
    Xu = _t(X, torch.float32, True)
    unit = torch_procrustes_align(Xu, _t(Y, torch.float32), scale)
    unit[2].sum().backward()
    Xb = _t(X * size, torch.float32, True)
    aligned, R, error = torch_procrustes_align(Xb, _t(Y * size, torch.float32), scale)
    error.sum().backward()
    np.testing.assert_allclose(R.detach().numpy(), unit[1].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(error.detach().numpy() / size, unit[2].detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(aligned.detach().numpy() / size, unit[0].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(Xb.grad.numpy(), Xu.grad.numpy(), rtol=1e-3, atol=1e-5)
    ref = procrustes_align(X * size, Y * size, scale=scale)[-1]
    np.testing.assert_allclose(error.detach().numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize(("x_size", "y_size"), [(1e10, 1e-30), (1e19, 1e-19), (1e-30, 1e10)])
def test_float32_sets_of_very_different_sizes_fit_without_scale_as_in_numpy(x_size, y_size):
    """Without scale the residual was taken in Y's unit, X's being b / a = 2^(e_x - e_y)
    times it: infinite in float32 for sets 1e40 apart (aligned and error inf)."""
    X, Y = _batch(3, seed=5)
    X32, Y32 = (X * x_size).astype(np.float32), (Y * y_size).astype(np.float32)
    aligned, _, error = torch_procrustes_align(_t(X32, torch.float32), _t(Y32, torch.float32))
    assert torch.isfinite(aligned).all()
    np.testing.assert_allclose(error.numpy(), procrustes_align(X32, Y32)[-1], rtol=1e-5)


def test_scalign_imports_without_torch_and_the_module_says_what_to_install():
    # A finder that refuses torch makes `import torch` fail as if it were not installed.
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import scalign\n"
        "try:\n"
        "    import scalign.differentiable\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install 'scalign[torch]'" in out.stdout
