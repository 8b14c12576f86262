"""Comparison scores against brute force: correlation, gray-level fit, z-scores, JBLD."""

from __future__ import annotations

import numpy as np
import pytest

from scalign.kernels.scores import (
    circular_mask,
    compare,
    jbld,
    jbld_centroid,
    jbld_scores,
    residual_covariance,
    zscores,
)


def spd(rng, n, count):
    X = rng.normal(size=(count, n, n))
    return X @ np.swapaxes(X, 1, 2) / n + 0.1 * np.eye(n)


def test_mask_is_the_disc_about_the_box_centre():
    m = circular_mask(8)
    assert m[4, 4] and m[4, 0] and m[0, 4] and not m[0, 0]
    assert circular_mask(9).sum() == np.sum(
        (np.indices((9, 9))[0] - 4) ** 2 + (np.indices((9, 9))[1] - 4) ** 2 <= 20.25
    )


def test_correlation_and_gray_fit_equal_numpy_references():
    rng = np.random.default_rng(0)
    P = rng.normal(size=(5, 16, 16))
    images = 2.5 * P - 0.7 + 0.3 * rng.normal(size=P.shape)
    mask = circular_mask(16)
    c = compare(P, images, mask)
    g = compare(P, images, mask, gray=True)
    for b in range(5):
        p, i = P[b][mask], images[b][mask]
        assert c.correlation[b] == pytest.approx(np.corrcoef(p, i)[0, 1], abs=1e-12)
        assert c.cost[b] == pytest.approx(1 - np.corrcoef(p, i)[0, 1], abs=1e-12)
        a, off = np.polyfit(p, i, 1)
        assert (g.gain[b], g.offset[b]) == pytest.approx((a, off), abs=1e-10)
        assert g.cost[b] == pytest.approx(np.abs(a * p + off - i).mean(), abs=1e-12)
        assert c.residual_mean[b] == pytest.approx((p - i).mean())
        assert c.residual_std[b] == pytest.approx((p - i).std())
    assert np.all(c.residual[:, ~mask] == 0)
    assert np.all(g.correlation == c.correlation)


def test_zscores():
    v = np.array([1.0, 2.0, 3.0, 10.0])
    np.testing.assert_allclose(zscores(v), np.abs(v - v.mean()) / v.std())
    assert np.all(zscores(np.ones(4)) == 0)


def test_jbld_equals_its_formula_and_is_a_divergence():
    rng = np.random.default_rng(1)
    X, Y = spd(rng, 6, 4), spd(rng, 6, 4)
    ld = lambda M: np.linalg.slogdet(M)[1]  # noqa: E731
    expected = [ld((x + y) / 2) - 0.5 * ld(x @ y) for x, y in zip(X, Y, strict=True)]
    np.testing.assert_allclose(jbld(X, Y), expected, atol=1e-10)
    np.testing.assert_allclose(jbld(X, X), 0, atol=1e-12)
    np.testing.assert_allclose(jbld(X, Y), jbld(Y, X), atol=1e-12)
    assert np.all(jbld(X, Y) > 0)


def test_jbld_centroid_of_diagonal_matrices_is_the_geometric_mean():
    # for two commuting matrices the fixed point solves r^2 = c1 c2 entry by entry
    C = np.stack([np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])])
    R, iterations = jbld_centroid(C)
    np.testing.assert_allclose(R, np.diag([2.0, 2.0, 3.0]), atol=1e-8)
    assert iterations < 50


def test_jbld_centroid_is_a_fixed_point_and_scores_flag_the_odd_one():
    rng = np.random.default_rng(2)
    C = spd(rng, 5, 20)
    R, _ = jbld_centroid(C)
    fixed = np.linalg.inv(np.linalg.inv(0.5 * (C + R)).mean(axis=0))
    np.testing.assert_allclose(fixed, R, rtol=1e-8)
    C[7] *= 30.0
    scores, _, _ = jbld_scores(C)
    assert np.argmax(scores) == 7


def test_residual_covariance_is_symmetric_psd():
    E = np.random.default_rng(3).normal(size=(3, 8, 8))
    C = residual_covariance(E)
    np.testing.assert_allclose(C, np.swapaxes(C, 1, 2))
    assert np.all(np.linalg.eigvalsh(C) > -1e-12)
    np.testing.assert_allclose(C[0], E[0] @ E[0].T / 8)
