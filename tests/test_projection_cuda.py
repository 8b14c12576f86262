"""The fused trilinear interpolation of CuPy projections (scalign.kernels.projection_cuda)
equals the array version on the host (``pytest -m gpu``)."""

from __future__ import annotations

import numpy as np
import pytest

from scalign.execution import gpu_available
from scalign.kernels.euler import euler_to_matrix
from scalign.kernels.projection import project, slice_spectra


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
