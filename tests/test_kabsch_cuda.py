"""The fused finish of CuPy superpositions (scalign.kernels.kabsch_cuda): compiled with
NVRTC wherever CuPy is installed, and on a CUDA device (``pytest -m gpu``) equal to the
NumPy superposition, with the items it cannot finish handed to the general path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_compiles_with_nvrtc
from scipy.spatial.transform import Rotation

from scalign.execution import gpu_available
from scalign.kernels import kabsch_cuda, qcp_cuda
from scalign.kernels.kabsch import superpose

gpu = pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")

NAN, CLOSE, FAR, LINE = 3, 5, 7, 9


def batch():
    """Noisy moved copies of a cloud, with a NaN item, an exact copy (e2 cancels), one
    1e9 Å from the origin and a collinear set (ill-determined rotation)."""
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((50, 3)) * 5
    Q = Rotation.random(400, random_state=1).as_matrix()
    X = (Y + 0.3 * rng.standard_normal((400, 50, 3))) @ Q + 10 * rng.standard_normal((400, 1, 3))
    X[NAN, 4, 1] = np.nan
    X[CLOSE] = Y @ Q[CLOSE] + 1.0
    X[FAR] += 1e9
    X[LINE] = np.outer(np.arange(50.0), [1.0, 2.0, 3.0])
    return X, Y, rng.uniform(0.5, 2.0, 50)


def test_kernel_source_compiles_with_nvrtc():
    names = (*qcp_cuda._S, *kabsch_cuda._CX, *kabsch_cuda._CY, "gx", "gy")
    inputs = ", ".join(f"double {v}" for v in names) + ", bool scaled"
    outputs = ", ".join(
        f"double& {v}" for v in (*qcp_cuda._R, *kabsch_cuda._T, "scale", "rmsd", "r2")
    )
    source = (
        qcp_cuda.source()
        + f"\n__device__ void finish({inputs}, {outputs}, bool& redo)\n{{\n"
        + kabsch_cuda._FINISH
        + "}\n"
    )
    assert_compiles_with_nvrtc(source, "finish.cu")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_superpose_equals_numpy(weighted, scale, dtype):
    import cupy

    X, Y, w = batch()
    X = X.astype(dtype)
    w = w if weighted else None
    got = superpose(
        cupy.asarray(X), cupy.asarray(Y), None if w is None else cupy.asarray(w), scale=scale
    )
    want = superpose(X, Y, w, scale=scale)
    # any spin about the line is optimal: compare the line's fit by its residual only
    unique = np.arange(len(X)) != LINE
    extent = np.abs(X[np.isfinite(X)]).max()
    for name, a, b in zip(got._fields, got, want, strict=True):
        a = a.get()
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        atol = 1e-15 * extent if name == "translation" else 1e-10
        np.testing.assert_allclose(a[unique], b[unique], rtol=1e-9, atol=atol, err_msg=name)
    for name in ("scale", "rmsd", "r2"):
        np.testing.assert_allclose(getattr(got, name).get()[LINE], getattr(want, name)[LINE])
    assert np.isnan(got.rmsd.get()[NAN])
    # the exact copy, to the rounding of its coordinates
    assert got.rmsd.get()[CLOSE] < (1e-12 if dtype == np.float64 else 1e-6)


@pytest.mark.gpu
@gpu
def test_finish_hands_over_exactly_the_hard_items():
    import cupy

    from scalign.kernels.moments_cuda import fused_moments

    X, Y, _ = batch()
    moments = fused_moments(cupy.asarray(X), cupy.asarray(Y), None)
    *_, redo, refit = kabsch_cuda.finish(*moments, False)
    assert np.flatnonzero(redo.get()).tolist() == [FAR, LINE]
    assert np.flatnonzero(refit.get()).tolist() == [CLOSE]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("weighted", [False, True])
def test_rods_get_the_explicit_residual_on_the_gpu(weighted):
    """A 1,500 A helix with 0.3 A noise: e2 is below 1e-6 of the second moments for every
    fit, which took the general path's refit (280 ms per million on an H200); now one
    thread per item sums the explicit residual."""
    import cupy

    from scalign.kernels.moments_cuda import fused_moments
    from scalign.synthetic import helix

    rng = np.random.default_rng(3)
    Y = helix(1000)
    Q = Rotation.random(50, random_state=4).as_matrix()
    X = (Y + 0.3 * rng.standard_normal((50, 1000, 3))) @ Q + 10 * rng.standard_normal((50, 1, 3))
    X = X.astype(np.float32)
    w = rng.uniform(0.5, 2.0, 1000) if weighted else None
    *_, redo, refit = kabsch_cuda.finish(
        *fused_moments(
            cupy.asarray(X), cupy.asarray(Y), None if w is None else cupy.asarray(w / w.sum())
        ),
        False,
    )
    assert refit.get().all() and not redo.get().any()
    got = superpose(cupy.asarray(X), cupy.asarray(Y), None if w is None else cupy.asarray(w))
    want = superpose(X, Y, w)
    np.testing.assert_allclose(got.rmsd.get(), want.rmsd, rtol=1e-12)
    np.testing.assert_allclose(got.r2.get(), want.r2, rtol=1e-12)
