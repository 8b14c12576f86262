"""The fused CUDA moments kernels: compiled with NVRTC wherever CuPy is installed and run
in a CPU emulation of CUDA's threads wherever g++ is (no GPU needed for either), and
checked against the NumPy moments on a CUDA device (``pytest -m gpu``)."""

from __future__ import annotations

import cuda_emulation
import numpy as np
import pytest
from conftest import assert_compiles_with_nvrtc

from scalign.execution import gpu_available
from scalign.kernels import moments_cuda
from scalign.kernels.kabsch import _shared_moments


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_source_compiles_with_nvrtc(dtype):
    assert_compiles_with_nvrtc(moments_cuda.source(dtype), "moments.cu")


def _reference_sums(X: np.ndarray, Yc: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The kernels' 13 sums per item in float64: H (row-major), Σ p x, Σ p |x|²."""
    x = X.astype(np.float64)
    return np.concatenate(
        [
            np.einsum("bka,kc->bac", x, p[:, None] * Yc).reshape(-1, 9),
            np.einsum("bka,k->ba", x, p),
            np.einsum("bk,k->b", (x * x).sum(-1), p)[:, None],
        ],
        axis=1,
    )


@pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("layout", ["warp", "block"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_source_computes_the_sums_in_a_cpu_emulation(layout, dtype):
    """The kernels' own CUDA source, run on CPU threads (:mod:`cuda_emulation`), against
    float64 sums in NumPy: indexing, grid-stride loops over more items than warps, warp
    shuffles and the block's shared-memory reduction, with no GPU."""
    lib = cuda_emulation.build(
        moments_cuda.source(dtype),
        f"{moments_cuda.LAYOUTS[layout]}_{dtype}",
        [f"const {'float' if dtype == 'float32' else 'double'}*", "const double*"]
        + ["const double*", "long long", "int", "double*"],
    )
    rng = np.random.default_rng(7)
    for n in (1, 33, 300):
        B = 37  # not a multiple of a block's 4 warps; more items than the grid's warps
        X = (rng.standard_normal((B, n, 3)) * 3 + 10).astype(dtype)
        Yc = rng.standard_normal((n, 3))
        p = rng.uniform(0.5, 1.5, n)
        p /= p.sum()
        out = np.full((B, moments_cuda.SUMS), np.nan)
        block = moments_cuda.threads_per_item(n) if layout == "block" else 64
        args = [X, p[:, None] * Yc, p, np.int64(B), np.int32(n), out]
        cuda_emulation.launch(lib, 3, block, args)
        want = _reference_sums(X, Yc, p)
        np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-12, err_msg=f"n = {n}")


@pytest.mark.parametrize(("n", "threads"), [(1, 32), (128, 32), (129, 64), (1000, 256)])
def test_block_size_is_whole_warps(n, threads):
    assert moments_cuda.threads_per_item(n) == threads


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [3, 37, 129, 1000, 5000])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_moments_equal_numpy_moments(dtype, n, weighted):
    import cupy
    from array_api_compat import numpy as np_compat

    rng = np.random.default_rng(n)
    X = (rng.standard_normal((300, n, 3)) * 5 + 40).astype(dtype)
    Y = rng.standard_normal((n, 3)) * 5 + 3
    p = rng.uniform(0.1, 2.0, n) if weighted else None
    p = None if p is None else p / p.sum()
    expected = _shared_moments(np_compat, X, Y, p)
    got = moments_cuda.fused_moments(
        cupy.asarray(X), cupy.asarray(Y), None if p is None else cupy.asarray(p)
    )
    for a, b in zip(expected, got, strict=True):
        assert isinstance(b, cupy.ndarray)
        np.testing.assert_allclose(b.get(), np.broadcast_to(a, b.shape), rtol=1e-10, atol=1e-9)


def test_layout_is_a_warp_per_item_up_to_warp_points():
    assert moments_cuda.layout(moments_cuda.WARP_POINTS) == "warp"
    assert moments_cuda.layout(moments_cuda.WARP_POINTS + 1) == "block"


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())")
@pytest.mark.parametrize("n", [1, 33, 1000])
def test_every_layout_gives_the_same_sums(n):
    """Both layouts on the same items, against float64 sums in NumPy (B not a multiple of
    the 4 items of a warp kernel's block, and more items than resident warps); an unknown
    layout refused."""
    import cupy

    rng = np.random.default_rng(n)
    X = (rng.standard_normal((40_001, n, 3)) * 3 + 10).astype(np.float32)
    Yc = rng.standard_normal((n, 3))
    p = rng.uniform(0.5, 1.5, n)
    p /= p.sum()
    want = _reference_sums(X, Yc, p)
    args = (cupy.asarray(X), cupy.asarray(Yc), cupy.asarray(p))
    for per in moments_cuda.LAYOUTS:
        got = moments_cuda.moment_sums(*args, per=per).get()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9, err_msg=per)
    with pytest.raises(ValueError, match="no 'thread' moments kernel for float32 items"):
        moments_cuda.moment_sums(*args, per="thread")
