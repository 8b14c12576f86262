"""CuPy code paths: run with ``pytest -m gpu`` on a machine with a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest

from scalign.execution import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="no usable CUDA device (cupy.is_available())"),
]


@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_on_cupy_matches_numpy(weighted):
    import cupy

    from scalign.kernels import apply_transform, superpose

    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 40, 3)).astype(np.float32) + 100
    Y = rng.standard_normal((40, 3))
    w = rng.uniform(0.5, 2, 40) if weighted else None
    cpu = superpose(X, Y, w, scale=True)
    gpu = superpose(
        cupy.asarray(X), cupy.asarray(Y), None if w is None else cupy.asarray(w), scale=True
    )
    for a, b in zip(cpu, gpu, strict=True):
        assert isinstance(b, cupy.ndarray)
        np.testing.assert_allclose(a, b.get(), rtol=1e-9, atol=1e-9)
    aligned = apply_transform(cupy.asarray(X), *gpu[:3])
    np.testing.assert_allclose(aligned.get(), apply_transform(X, *cpu[:3]), atol=1e-4)


def test_align_op_with_cupy_chunks_keeps_cupy_meta():
    import cupy

    from scalign import align, helix_ensemble
    from scalign.execution import to_device

    ens = helix_ensemble(400, 20, noise=0.05, chunks=100)
    out = align(to_device(ens, "gpu"), ens["reference"].values)
    assert isinstance(out["rmsd"].data._meta, cupy.ndarray)
    rmsd = out["rmsd"].data.compute()
    assert isinstance(rmsd, cupy.ndarray)
    np.testing.assert_allclose(
        rmsd.get(), align(ens, ens["reference"].values)["rmsd"].values, rtol=1e-9
    )


def test_robust_kernel_on_cupy_matches_numpy():
    import cupy

    from scalign.kernels.robust import irls_superpose

    rng = np.random.default_rng(1)
    Y = rng.standard_normal((60, 3)) * 5
    X = np.stack([Y + rng.normal(scale=0.05, size=Y.shape) for _ in range(32)])
    X[:, ::5] += 8.0
    cpu = irls_superpose(X, Y, loss="tukey")
    gpu = irls_superpose(cupy.asarray(X), cupy.asarray(Y), loss="tukey")
    assert isinstance(gpu.weights, cupy.ndarray)
    np.testing.assert_allclose(gpu.fit.rotation.get(), cpu.fit.rotation, atol=1e-9)
    np.testing.assert_allclose(gpu.weights.get(), cpu.weights, atol=1e-7)


def test_pairwise_on_cupy_chunks_matches_numpy():
    import cupy

    from scalign import helix_ensemble, pairwise_rmsd
    from scalign.execution import to_device

    ens = helix_ensemble(150, 30, noise=0.3, chunks=50)
    D = pairwise_rmsd(to_device(ens, "gpu"), chunks=50)
    assert isinstance(D.data._meta, cupy.ndarray)
    values = D.data.compute()
    assert isinstance(values, cupy.ndarray)
    np.testing.assert_allclose(values.get(), pairwise_rmsd(ens, chunks=50).values, atol=1e-9)
