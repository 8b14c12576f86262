"""The vectorised QCP solver against LAPACK eigen/SVD solutions, hard cases included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from scalign.kernels import superpose
from scalign.kernels.kabsch import _svd_rotation
from scalign.kernels.qcp import horn_matrix, qcp_rotation


def covariances(X, Y):
    Xc = X - X.mean(-2, keepdims=True)
    Yc = Y - Y.mean(-2, keepdims=True)
    n = X.shape[-2]
    return np.swapaxes(Xc, -1, -2) @ Yc / n, 0.5 * (
        (Xc**2).sum((-2, -1)) + (Yc**2).sum((-2, -1))
    ) / n


def test_largest_eigenvalue_and_rotation_match_lapack():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((200, 30, 3))
    X = Y @ Rotation.random(200, random_state=1).as_matrix() + 0.5 * rng.standard_normal(
        (200, 30, 3)
    )
    S, bound = covariances(X, Y)
    R, lam, unsure = qcp_rotation(np, S, bound)
    assert not unsure.any()
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(horn_matrix(np, S))[:, -1], rtol=1e-12)
    R_svd, trace = _svd_rotation(np, S, reflection=False)
    np.testing.assert_allclose(R, R_svd, atol=1e-10)
    np.testing.assert_allclose(lam, trace, rtol=1e-12)


@pytest.mark.parametrize("axis", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
def test_half_turns_have_zero_scalar_quaternion_part(axis):
    rng = np.random.default_rng(2)
    Y = rng.standard_normal((25, 3))
    Q = Rotation.from_rotvec(np.pi * np.array(axis) / np.linalg.norm(axis)).as_matrix()
    fit = superpose((Y @ Q)[None], Y)
    np.testing.assert_allclose(fit.rotation[0], Q, atol=1e-10)
    assert fit.rmsd[0] < 1e-10


def test_repeated_eigenvalue_is_flagged_and_solved_by_svd():
    """Collinear sets: any spin about the line is optimal, so λmax is a repeated root."""
    line = np.outer(np.arange(5.0), [1, 2, 3])
    moved = line @ Rotation.random(random_state=3).as_matrix() + 2.0
    S, bound = covariances(moved[None], line[None])
    _, _, unsure = qcp_rotation(np, S, bound)
    assert unsure.all()
    fit = superpose(moved[None], line)
    assert np.linalg.det(fit.rotation[0]) == pytest.approx(1.0)
    assert fit.rmsd[0] < 1e-10
    np.testing.assert_allclose(moved @ fit.rotation[0].T + fit.translation[0], line, atol=1e-10)


@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-3, 1.0])
def test_newton_error_bound_holds_near_repeated_roots(noise):
    """Near-collinear pairs, mirror images included: Newton stays on λmax (rounding threw
    it onto the smallest root), its error bound covers the distance to the SVD's λmax,
    and the items it cannot pin down are flagged for the SVD."""
    from scalign.kernels.qcp import largest_eigenvalue

    rng = np.random.default_rng(7)
    line = np.outer(np.arange(20.0), [1.0, 2.0, 3.0])
    X = np.stack([line @ Rotation.random(random_state=s).as_matrix() + s for s in range(8)])
    X = np.concatenate([X, X[:, ::-1] * [1.0, 1.0, -1.0]])
    X = X + noise * rng.standard_normal(X.shape)
    i, j = np.triu_indices(len(X))
    S, bound = covariances(X[i], X[j])
    lam, error = largest_eigenvalue(np, S, bound)
    trace = _svd_rotation(np, S, reflection=False)[1]
    np.testing.assert_array_less(np.abs(lam - trace), error + 1e-14 * trace)
    _, _, unsure = qcp_rotation(np, S, bound)
    assert np.all(unsure[error > 1e-10 * 2 * bound])
    if noise == 0.0:  # every pair is one rod: RMSD 0 (43 on the mirror images before)
        assert np.all(superpose(X[i], X[j]).rmsd < 1e-12 * bound)
        assert all(superpose(x[None], x).rmsd[0] < 1e-12 * bound[0] for x in X)


def test_identity_and_tiny_residuals():
    rng = np.random.default_rng(4)
    Y = rng.standard_normal((50, 3)) * 10
    X = np.stack([Y, Y + 1e-9 * rng.standard_normal((50, 3))])
    fit = superpose(X, Y)
    np.testing.assert_allclose(fit.rotation, np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-9)
    assert fit.rmsd[0] < 1e-12 and fit.rmsd[1] < 1e-8


def test_vectorised_invariants_match_lapack():
    """|S|², det S, and det K = |S|⁴ - 4 |cof S|² (Horn's matrix) against LAPACK."""
    from scalign.kernels.qcp import _invariants

    m = np.random.default_rng(5).standard_normal((50, 3, 3))
    norm2, det, cof2 = _invariants(m)
    np.testing.assert_allclose(norm2, np.sum(m * m, axis=(1, 2)), rtol=1e-14)
    np.testing.assert_allclose(det, np.linalg.det(m), rtol=1e-12, atol=1e-14)
    det_k = np.linalg.det(horn_matrix(np, m))
    np.testing.assert_allclose(norm2 * norm2 - 4.0 * cof2, det_k, rtol=1e-11, atol=1e-12)


def test_vectorised_adjugate_matches_lapack():
    from scalign.kernels.qcp import _adjugate

    m = np.random.default_rng(6).standard_normal((20, 4, 4))
    adj = np.stack(
        [
            np.stack(row, -1)
            for row in _adjugate([[m[:, i, j] for j in range(4)] for i in range(4)])
        ],
        -2,
    )
    want = np.linalg.inv(m) * np.linalg.det(m)[:, None, None]
    np.testing.assert_allclose(adj, want, rtol=1e-10, atol=1e-12)


def test_elongated_pairs_need_no_svd():
    """Pairs of noisy 70 Å helices of radius 10 Å (a DNA-like shape): the bound at the
    returned λ (not the last step's size) pins λmax down well enough for pairwise_rmsd, so
    none goes to the SVD (nearly all did), and it still holds against LAPACK."""
    from scalign.kernels.pairwise import _RESOLVE
    from scalign.kernels.qcp import largest_eigenvalue

    rng = np.random.default_rng(8)
    k = np.arange(200)
    Y = np.stack([10 * np.cos(1.745 * k), 10 * np.sin(1.745 * k), 0.35 * k], axis=1)
    X = (Y + 0.3 * rng.standard_normal((40, 200, 3))) @ Rotation.random(
        40, random_state=9
    ).as_matrix()
    i, j = np.triu_indices(40, 1)
    S, bound = covariances(X[i], X[j])
    lam, error = largest_eigenvalue(np, S, bound)
    exact = np.linalg.eigvalsh(horn_matrix(np, S))[:, -1]
    assert np.all(np.abs(lam - exact) <= error + 1e-14 * exact)
    g = 2 * bound
    e2 = g - 2 * lam
    assert np.all(error * error <= _RESOLVE * _RESOLVE * e2 * g)


@pytest.mark.parametrize("unit", [1e-10, 1.0, 1e26, 1e30, 1e40])
def test_rotation_does_not_depend_on_the_unit_of_the_coordinates(unit):
    """Horn's adjugate grows as the cube of the covariances and its squared norm as their
    sixth power: from coordinates of ~1e26 (galaxy positions in metres) it overflowed and
    the quaternion, and the rotation, came out 0 while the RMSD stayed right; from ~1e38
    the quartic overflowed and pairwise RMSDs came out NaN."""
    from scalign.kernels.pairwise import pairwise_rmsd

    rng = np.random.default_rng(10)
    Q = Rotation.random(random_state=11).as_matrix()
    X = rng.standard_normal((30, 3))
    Y = X @ Q.T + 0.01 * rng.standard_normal((30, 3))
    want = superpose(X, Y)
    with np.errstate(over="raise"):
        fit = superpose(X * unit, Y * unit)
    np.testing.assert_allclose(fit.rotation, want.rotation, atol=1e-12)
    np.testing.assert_allclose(fit.rmsd / unit, want.rmsd, rtol=1e-9)
    np.testing.assert_allclose(fit.translation / unit, want.translation, atol=1e-12)
    with np.errstate(over="raise"):
        D = pairwise_rmsd(np.stack([X, Y]) * unit)
    np.testing.assert_allclose(D[0, 1] / unit, want.rmsd, rtol=1e-9)
