"""The fused trilinear interpolation of CuPy projections (scalign.kernels.projection_cuda)
equals the array version on the host: its source in a CPU emulation, and on a CUDA device
(``pytest -m gpu``)."""

from __future__ import annotations

import cuda_emulation
import numpy as np
import pytest

from scalign.execution import gpu_available
from scalign.kernels import projection, projection_cuda
from scalign.kernels.euler import euler_to_matrix
from scalign.kernels.projection import project, slice_spectra


@pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [31, 32])
def test_trilinear_source_in_a_cpu_emulation_equals_numpy(dtype, n):
    """The kernel's own source run on the CPU (:mod:`cuda_emulation`) against the array
    version, at random orientations, the identity (points on the grid and the origin) and a
    half turn (points at the spectrum's periodic edge)."""
    rng = np.random.default_rng(n)
    V = rng.standard_normal((n, n, n)).astype(dtype)
    A = np.concatenate([euler_to_matrix(*rng.uniform(0, 360, (3, 12))), np.eye(3)[None]])
    A = np.concatenate([A, np.diag([1.0, -1.0, -1.0])[None]])
    _, w = projection._slice_frequencies(n, A, dtype, None, np)
    want = projection._interpolated_values(V, w)
    G = projection.padded_spectrum(V)
    N = G.shape[0]
    real = np.dtype(dtype).type
    (got,) = cuda_emulation.elementwise(
        projection_cuda.TRILINEAR,
        w[2],
        w[1],
        w[0],
        G.reshape(-1),
        np.int64(N),
        real(projection.PADDING),
        real(N // 2),
        np.asarray(V.sum(), dtype=G.dtype),
    )
    assert got.dtype == want.dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [31, 32])
def test_interpolated_slices_on_cupy_equal_numpy(dtype, n):
    import cupy

    rng = np.random.default_rng(n)
    V = rng.standard_normal((n, n, n)).astype(dtype)
    # random orientations, the identity (points on the grid and the origin) and a half turn
    A = np.concatenate([euler_to_matrix(*rng.uniform(0, 360, (3, 12))), np.eye(3)[None]])
    A = np.concatenate([A, np.diag([1.0, -1.0, -1.0])[None]])
    want = slice_spectra(V, A, method="interpolate")
    got = slice_spectra(cupy.asarray(V), A, method="interpolate")
    assert got.dtype == want.dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got.get(), want, rtol=0, atol=tol * np.abs(want).max())
    shifts = rng.uniform(-3, 3, (len(A), 2))
    want = project(V, A, shifts, method="interpolate")
    got = project(cupy.asarray(V), A, shifts, method="interpolate").get()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
