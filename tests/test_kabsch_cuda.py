"""The fused finish of CuPy superpositions (scalign.kernels.kabsch_cuda): compiled with
NVRTC wherever CuPy is installed, and in a CPU emulation of its source and on a CUDA
device (``pytest -m gpu``) equal to the NumPy superposition, with the items it cannot
finish handed to the general path."""

from __future__ import annotations

import cuda_emulation
import numpy as np
import pytest
from array_api_compat import numpy as np_compat
from conftest import assert_compiles_with_nvrtc
from scipy.spatial.transform import Rotation

from scalign.execution import gpu_available
from scalign.kernels import kabsch_cuda, qcp_cuda
from scalign.kernels.kabsch import _shared_moments, superpose

gpu = pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")
emulated = pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ (C++20)")

NAN, CLOSE, FAR, LINE = 3, 5, 7, 9


def batch():
    """Noisy moved copies of a cloud, with a NaN item, an exact copy (e2 cancels), one
    1e6 Å from the origin (beyond ``_FAR_FROM_ORIGIN`` for its size, yet 0.06 Å apart in
    float32: at 1e9 Å float32 rounds the whole set to one point, where every rotation is
    optimal) and a collinear set (ill-determined rotation)."""
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((50, 3)) * 5
    Q = Rotation.random(400, random_state=1).as_matrix()
    X = (Y + 0.3 * rng.standard_normal((400, 50, 3))) @ Q + 10 * rng.standard_normal((400, 1, 3))
    X[NAN, 4, 1] = np.nan
    X[CLOSE] = Y @ Q[CLOSE] + 1.0
    X[FAR] += 1e6
    X[LINE] = np.outer(np.arange(50.0), [1.0, 2.0, 3.0])
    return X, Y, rng.uniform(0.5, 2.0, 50)


def test_kernel_source_compiles_with_nvrtc():
    names = (*qcp_cuda._S, *kabsch_cuda._CX, *kabsch_cuda._CY, "gx", "gy")
    inputs = ", ".join(f"double {v}" for v in names) + ", bool scaled"
    outputs = "double* rotation, double* translation, " + ", ".join(
        f"double& {v}" for v in ("scale", "rmsd", "r2")
    )
    source = (
        qcp_cuda.source()
        + f"\n__device__ void finish(long long i, {inputs}, {outputs}, bool& redo, bool& refit)"
        + "\n{\n"
        + kabsch_cuda._FINISH
        + "}\n"
    )
    assert_compiles_with_nvrtc(source, "finish.cu")


@emulated
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("scale", [False, True])
def test_finish_and_residual_in_a_cpu_emulation_equal_numpy(weighted, scale):
    """The kernels' own source run on the CPU (:mod:`cuda_emulation`) on the NumPy
    moments: the fits of the items it finishes equal NumPy's, it hands over exactly the
    hard ones, and the residual kernel gives NumPy's rmsd² from NumPy's fits."""
    X, Y, w = batch()
    w = w if weighted else None
    p = None if w is None else w / w.sum()
    cx, cy, H, gx, gy = _shared_moments(np_compat, X, Y, p)
    B = len(X)
    outputs = [np.empty((B, 3, 3)), np.empty((B, 3)), *(np.empty(B) for _ in range(3))]
    *out, redo, refit = cuda_emulation.elementwise(
        kabsch_cuda.FINISH,
        *kabsch_cuda._columns(H, cx, cy),
        gx,
        np.broadcast_to(gy, gx.shape),
        np.bool_(scale),
        *outputs,
        np.empty(B, dtype=bool),
        np.empty(B, dtype=bool),
    )
    assert np.flatnonzero(redo).tolist() == [FAR, LINE]
    assert np.flatnonzero(refit).tolist() == [CLOSE]
    want = superpose(X, Y, w, scale=scale)
    done = ~(redo | refit)
    got = dict(zip(("rotation", "translation", "scale", "rmsd", "r2"), out, strict=True))
    for name, value in got.items():
        b = getattr(want, name)
        assert np.array_equal(np.isnan(value[done]), np.isnan(b[done])), name
        np.testing.assert_allclose(value[done], b[done], rtol=1e-9, atol=1e-9, err_msg=name)
    items = np.flatnonzero(np.isfinite(want.rmsd))
    (e2,) = cuda_emulation.elementwise(
        kabsch_cuda.RESIDUAL,
        items.astype(np.int64),
        X,
        Y,
        np.full(len(Y), 1 / len(Y)) if p is None else p,
        np.int64(len(Y)),
        *kabsch_cuda._columns(want.rotation[items], cx[items], cy),
        want.scale[items],
    )
    np.testing.assert_allclose(np.sqrt(e2), want.rmsd[items], rtol=1e-9, atol=1e-12)


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
