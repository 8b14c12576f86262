"""The fused Jacobi solve of Horn's matrix (scalign.kernels.qcp_cuda): compiled with NVRTC
wherever CuPy is installed, and checked against LAPACK in a CPU emulation of its source
and on a CUDA device (``pytest -m gpu``)."""

from __future__ import annotations

import cuda_emulation
import numpy as np
import pytest
from conftest import assert_compiles_with_nvrtc
from scipy.spatial.transform import Rotation

from scalign.execution import gpu_available
from scalign.kernels import qcp_cuda
from scalign.kernels.kabsch import _svd_rotation
from scalign.kernels.qcp import horn_matrix
from scalign.synthetic import helix

gpu = pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")
emulated = pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ (C++20)")


def covariances(X, Y):
    Xc = X - X.mean(-2, keepdims=True)
    Yc = Y - Y.mean(-2, keepdims=True)
    n = X.shape[-2]
    bound = 0.5 * ((Xc**2).sum((-2, -1)) + (Yc**2).sum((-2, -1))) / n
    return np.swapaxes(Xc, -1, -2) @ Yc / n, bound


def cases():
    """Random sets, rods (a 300 Å helix of radius 2.3 Å, where Newton on the quartic can pin
    λmax down only to ~1e-8 of it), near-collinear pairs and their mirror images."""
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((300, 30, 3))
    X = Y @ Rotation.random(300, random_state=1).as_matrix() + 0.5 * rng.standard_normal(Y.shape)
    rod = helix(200)
    rods = rod @ Rotation.random(40, random_state=2).as_matrix() + 0.3 * rng.standard_normal(
        (40, 200, 3)
    )
    line = np.outer(np.arange(20.0), [1.0, 2.0, 3.0])
    lines = np.stack([line @ Rotation.random(random_state=s).as_matrix() for s in range(6)])
    lines = np.concatenate([lines, lines[:, ::-1] * [1.0, 1.0, -1.0]])
    lines = lines + 1e-6 * rng.standard_normal(lines.shape)
    i, j = np.triu_indices(40, 1)
    k, m = np.triu_indices(12, 1)
    parts = [covariances(X, Y), covariances(rods[i], rods[j]), covariances(lines[k], lines[m])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_kernel_source_compiles_with_nvrtc():
    inputs = ", ".join(f"double {s}" for s in qcp_cuda._S) + ", double bound"
    source = (
        qcp_cuda.source()
        + f"\n__device__ void rotation(long long i, {inputs}, double& lam, bool& unsure, "
        + "double* rotation)\n{\n"
        + qcp_cuda._ROTATION
        + f"}}\n__device__ void eigenvalue({inputs}, double& lam, double& err)\n{{\n"
        + qcp_cuda._LAMBDA
        + "}\n"
    )
    assert_compiles_with_nvrtc(source, "qcp.cu")


@emulated
def test_kernels_in_a_cpu_emulation_match_lapack_and_the_svd():
    """The kernels' own source run on the CPU (:mod:`cuda_emulation`), as on a GPU below:
    λmax within its bound of LAPACK's, the rotations the SVD's where not flagged."""
    S, bound = cases()
    entries = qcp_cuda._entries(S)
    lam, error = cuda_emulation.elementwise(qcp_cuda.LAMBDA, *entries)
    exact = np.linalg.eigvalsh(horn_matrix(np, S))[:, -1]
    scale = np.abs(exact).max()
    np.testing.assert_allclose(lam, exact, rtol=0, atol=1e-14 * scale)
    assert np.all(np.abs(lam - exact) <= error + 1e-15 * scale)
    B = len(S)
    lam, unsure, R = cuda_emulation.elementwise(
        qcp_cuda.ROTATION,
        *entries,
        bound,
        np.empty(B),
        np.empty(B, dtype=bool),
        np.empty((B, 3, 3)),
    )
    R_svd, trace = _svd_rotation(np, S, reflection=False)
    sure = ~unsure
    assert sure[: 300 + 780].all()
    np.testing.assert_allclose(R[sure], R_svd[sure], atol=1e-9)
    np.testing.assert_allclose(lam, trace, rtol=1e-12)


def test_horn_source_is_horn_matrix():
    """The C assignments, evaluated as Python on one S, give horn_matrix(S)."""
    S = np.random.default_rng(3).standard_normal((3, 3))
    k = np.zeros((4, 4))
    env = {"s": S.reshape(-1), "k": k}
    for line in qcp_cuda._horn_source().splitlines():
        exec(line.strip().rstrip(";"), env)
    np.testing.assert_array_equal(k, horn_matrix(np, S))


@pytest.mark.gpu
@gpu
def test_largest_eigenvalue_matches_lapack_with_a_bound_that_holds():
    import cupy

    S, _ = cases()
    lam, error = qcp_cuda.largest_eigenvalue(cupy.asarray(S))
    lam, error = lam.get(), error.get()
    exact = np.linalg.eigvalsh(horn_matrix(np, S))[:, -1]
    scale = np.abs(exact).max()
    np.testing.assert_allclose(lam, exact, rtol=0, atol=1e-14 * scale)
    assert np.all(np.abs(lam - exact) <= error + 1e-15 * scale)
    assert np.all(error < 1e-12 * scale)


@pytest.mark.gpu
@gpu
def test_rotations_match_the_svd_and_repeated_roots_are_flagged():
    import cupy

    S, bound = cases()
    R, lam, unsure = qcp_cuda.qcp_rotation(cupy.asarray(S), cupy.asarray(bound))
    R, lam, unsure = R.get(), lam.get(), unsure.get()
    R_svd, trace = _svd_rotation(np, S, reflection=False)
    sure = ~unsure
    assert sure[: 300 + 780].all()  # random sets and rods: the rotation is well determined
    np.testing.assert_allclose(R[sure], R_svd[sure], atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(lam, trace, rtol=1e-12)
    line = np.outer(np.arange(5.0), [1.0, 2.0, 3.0])
    S1, b1 = covariances((line @ Rotation.random(random_state=4).as_matrix())[None], line[None])
    assert qcp_cuda.qcp_rotation(cupy.asarray(S1), cupy.asarray(b1))[2].get().all()
    # any batch shape: the first 300 as (20, 15), each item where it was
    R2, lam2, unsure2 = (
        a.get()
        for a in qcp_cuda.qcp_rotation(
            cupy.asarray(S[:300].reshape(20, 15, 3, 3)), cupy.asarray(bound[:300].reshape(20, 15))
        )
    )
    assert R2.shape == (20, 15, 3, 3) and lam2.shape == unsure2.shape == (20, 15)
    np.testing.assert_array_equal(R2.reshape(300, 3, 3), R[:300])
    np.testing.assert_array_equal(lam2.ravel(), lam[:300])


@pytest.mark.gpu
@gpu
def test_strided_batches_of_any_shape():
    """pairwise_rmsd hands the kernel (a, b, 3, 3) views of one GEMM's output."""
    import cupy

    G = np.random.default_rng(5).standard_normal((3, 7, 3, 5))
    H = np.transpose(G, (1, 3, 0, 2))
    lam, _ = qcp_cuda.largest_eigenvalue(cupy.transpose(cupy.asarray(G), (1, 3, 0, 2)))
    assert lam.shape == (7, 5)
    exact = np.linalg.eigvalsh(horn_matrix(np, H))[..., -1]
    np.testing.assert_allclose(lam.get(), exact, rtol=1e-13)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scale", [1e-165, 1e-80, 1e150])
def test_any_scale_of_the_covariances(scale):
    """K is solved as 2^-e K: at 1e-165 the squares in the stopping test underflowed, the
    sweeps stopped at once and lambda came back 67% off with a bound of 0."""
    import cupy

    S, _ = cases()
    S = S[:300] * scale
    lam, error = qcp_cuda.largest_eigenvalue(cupy.asarray(S))
    exact = np.linalg.eigvalsh(horn_matrix(np, S / scale))[:, -1] * scale
    np.testing.assert_allclose(lam.get(), exact, rtol=1e-13)
    assert np.all(np.abs(lam.get() - exact) <= error.get())


@pytest.mark.gpu
@gpu
def test_near_identical_pairs_need_no_svd():
    """Jacobi's own bound (~1e-14 of |K|) sent pairs with e2 between 1e-9 and 1e-8 of g to
    the SVD in pairwise_rmsd; the quartic's bound at the same lambda, also returned, does
    not."""
    import cupy

    from scalign.kernels.pairwise import _CLOSE, _RESOLVE

    rng = np.random.default_rng(0)
    Y = rng.standard_normal((100, 3)) * 10
    X = Y @ Rotation.random(40, random_state=1).as_matrix()
    X = X + rng.uniform(1e-4, 6e-4, (40, 1, 1)) * rng.standard_normal(X.shape)
    i, j = np.triu_indices(40, 1)
    S, bound = covariances(X[i], X[j])
    lam, error = (a.get() for a in qcp_cuda.largest_eigenvalue(cupy.asarray(S)))
    g = 2 * bound
    e2 = g - 2 * lam
    decided = e2 >= _CLOSE * g  # the rest are refitted whole
    assert decided.sum() > 500
    assert np.all((error * error <= _RESOLVE * _RESOLVE * e2 * g)[decided])
