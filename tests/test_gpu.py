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


def test_ops_merge_small_host_chunks_for_the_gpu_and_keep_gpu_chunks():
    from scalign import align, helix_ensemble, make_stack, warp_stack
    from scalign.execution import to_device

    ens = helix_ensemble(2_000, 20, noise=0.05, chunks=100)
    ref = ens["reference"].values
    out = align(ens, ref, device="gpu")
    assert out["rmsd"].chunks[0] == (2_000,)  # 48 kB chunks merged: all of it < 256 MiB
    np.testing.assert_allclose(
        out["rmsd"].data.compute().get(), align(ens, ref)["rmsd"].values, rtol=1e-9
    )
    on_gpu = to_device(ens, "gpu")
    assert align(on_gpu, ref, device="gpu")["rmsd"].chunks == ens["coords"].chunks[:1]
    stack = make_stack(np.zeros((12, 16, 16), dtype=np.float32), chunks=3)
    assert warp_stack(stack, np.eye(3), device="gpu").chunks[0] == (12,)


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


# --------------------------------------------------------------------------------------
# ops with device="gpu": the same results as on the CPU, the chunks on the GPU
# --------------------------------------------------------------------------------------


def _is_cupy_graph(arr) -> bool:
    import cupy

    return isinstance(arr.data._meta, cupy.ndarray)


@pytest.mark.parametrize("reference", [0, "mean"])
def test_align_on_the_gpu_equals_the_cpu_and_stays_there(reference):
    from scalign import align, helix_ensemble

    ens = helix_ensemble(300, 25, noise=0.1, chunks=100)
    gpu = align(ens, reference, device="gpu")
    cpu = align(ens, reference)
    assert _is_cupy_graph(gpu["aligned"]) and _is_cupy_graph(gpu["rmsd"])
    for name in ("aligned", "rmsd", "rotation", "translation"):
        np.testing.assert_allclose(
            gpu[name].data.compute().get(), cpu[name].values, rtol=1e-6, atol=1e-5
        )
    np.testing.assert_allclose(gpu["reference"].values, cpu["reference"].values, atol=1e-9)


def test_gpu_results_written_to_zarr_equal_the_cpu_ones(tmp_path):
    import xarray as xr

    from scalign import align, helix_ensemble, save_zarr

    ens = helix_ensemble(200, 16, noise=0.1, chunks=50)
    save_zarr(align(ens, device="gpu"), tmp_path / "gpu.zarr")
    save_zarr(align(ens), tmp_path / "cpu.zarr")
    gpu = xr.open_zarr(tmp_path / "gpu.zarr", consolidated=False)
    cpu = xr.open_zarr(tmp_path / "cpu.zarr", consolidated=False)
    for name in ("aligned", "rmsd", "rotation"):
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-6, atol=1e-5)


def test_pairwise_on_the_gpu_equals_the_cpu():
    from scalign import helix_ensemble, pairwise_rmsd

    ens = helix_ensemble(120, 30, noise=0.3, chunks=40)
    D = pairwise_rmsd(ens, chunks=40, weights=np.linspace(1, 2, 30), device="gpu")
    assert _is_cupy_graph(D)
    cpu = pairwise_rmsd(ens, chunks=40, weights=np.linspace(1, 2, 30))
    np.testing.assert_allclose(D.data.compute().get(), cpu.values, atol=1e-9)


def test_warp_and_register_stack_on_the_gpu_equal_the_cpu():
    from scalign import build_affine_matrix, make_stack, register_stack, warp_stack
    from scalign.kernels.affine import image_center

    rng = np.random.default_rng(3)
    y, x = np.mgrid[:64, :64]
    base = np.exp(-((x - 30.0) ** 2 + (y - 34.0) ** 2) / 60.0) + 0.5 * np.exp(
        -((x - 20.0) ** 2 + (y - 18.0) ** 2) / 20.0
    )
    stack = make_stack(np.stack([base] * 6).astype(np.float32), chunks=3)
    M = build_affine_matrix(4.0, 1.5, -2.0, center=image_center((64, 64)))
    warped = warp_stack(stack, M, device="gpu")
    assert _is_cupy_graph(warped)
    np.testing.assert_allclose(warped.data.compute().get(), warp_stack(stack, M).values, atol=1e-5)
    moved = make_stack(
        warp_stack(stack, M).values + rng.normal(scale=0.01, size=(6, 64, 64)).astype(np.float32),
        chunks=3,
    )
    for reference in (0, "mean", "previous"):
        gpu = register_stack(moved, reference, device="gpu")
        cpu = register_stack(moved, reference)
        # the GPU estimates a chunk as one batch: the same estimate, summed in another
        # order (a fit at the tolerance's edge may take one iteration more or less)
        np.testing.assert_allclose(gpu["matrix"].values, cpu["matrix"].values, atol=1e-4)
        assert np.abs(gpu["iterations"].values - cpu["iterations"].values).max() <= 2
        assert _is_cupy_graph(gpu["registered"])
        np.testing.assert_allclose(
            gpu["registered"].data.compute().get(), cpu["registered"].values, atol=1e-4
        )


def test_pair_registration_takes_cupy_images():
    import cupy
    from scipy import ndimage

    from scalign import build_affine_matrix, register_affine_2d
    from scalign.kernels.affine import image_center, pull_matrix

    rng = np.random.default_rng(6)
    y, x = np.mgrid[:96, :96]
    ref = np.sin(x / 5.0) * np.cos(y / 7.0) + 0.1 * rng.standard_normal((96, 96))
    M = build_affine_matrix(8.0, 2.5, -1.5, center=image_center(ref.shape))
    mov = ndimage.affine_transform(ref, *pull_matrix(M), mode="nearest")
    _, M_gpu, _ = register_affine_2d(cupy.asarray(ref), cupy.asarray(mov))
    _, M_cpu, _ = register_affine_2d(ref, mov)
    np.testing.assert_array_equal(M_gpu, M_cpu)


@pytest.mark.parametrize("transform, loss", [("rigid", "mse"), ("similarity", "ncc")])
@pytest.mark.parametrize("per_image", [False, True])
def test_batched_registration_on_cupy_equals_numpy(transform, loss, per_image):
    import cupy
    from scipy import ndimage

    from scalign.kernels.affine import build_affine_matrix, image_center, pull_matrix
    from scalign.kernels.register import estimate_motion, prepare_template
    from scalign.kernels.register_batch import estimate_motions, prepare_templates

    rng = np.random.default_rng(4)
    ref = ndimage.gaussian_filter(rng.standard_normal((192, 160)), 3).astype(np.float32)
    c = image_center(ref.shape)
    truth = [
        build_affine_matrix(a, 3.5, -2.25, s, s, center=c)
        for a, s in [(0, 1), (30, 1.05), (-150, 0.95)]
    ]
    images = np.stack(
        [ndimage.affine_transform(ref, *pull_matrix(M), mode="nearest") for M in truth]
    )
    refs = np.stack([ref, images[0], images[1]]) if per_image else ref[None]
    cpu = estimate_motions(prepare_templates(refs, transform), images, loss)
    gpu = estimate_motions(
        prepare_templates(cupy.asarray(refs), transform), cupy.asarray(images), loss
    )
    # float32 sums in another order (cuBLAS, cuFFT): a fit at the tolerance's edge may
    # take one iteration more or less
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=1e-4)
    assert np.abs(gpu.iterations - cpu.iterations).max() <= 2
    np.testing.assert_array_equal(gpu.converged, cpu.converged)
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-3, atol=1e-7)
    for k, image in enumerate(images):
        single = estimate_motion(prepare_template(refs[k % len(refs)], transform), image, loss)
        np.testing.assert_allclose(gpu.matrix[k], single.matrix, atol=1e-4)


# --------------------------------------------------------------------------------------
# reprojection: projector, scores and the op
# --------------------------------------------------------------------------------------


def _blob_setup(n=32, count=5):
    from scalign.kernels.euler import euler_to_matrix
    from scalign.synthetic_em import blob_projections, blob_volume, random_blobs

    rng = np.random.default_rng(5)
    blobs = random_blobs(8, radius=n / 5, sigma=n / 18, seed=2)
    angles = (
        rng.uniform(-180, 180, count),
        rng.uniform(0, 180, count),
        rng.uniform(-180, 180, count),
    )
    A = euler_to_matrix(*angles)
    return blob_volume(blobs, n), A, blob_projections(blobs, n, A), angles


def test_interpolating_projector_on_cupy_equals_numpy():
    import cupy

    from scalign.kernels.projection import project

    V, A, exact, _ = _blob_setup()
    shifts = np.array([[1.5, -0.5]] * len(A))
    gpu = project(cupy.asarray(V), A, shifts=shifts, method="interpolate")
    assert isinstance(gpu, cupy.ndarray) and gpu.dtype == np.float32
    cpu = project(V, A, shifts=shifts, method="interpolate")
    np.testing.assert_allclose(gpu.get(), cpu, atol=1e-5 * np.abs(cpu).max())
    auto = project(cupy.asarray(V), A)
    assert np.linalg.norm(auto.get() - exact) < 0.02 * np.linalg.norm(exact)


def test_cufinufft_projector_equals_finufft_when_installed():
    cufinufft = pytest.importorskip("cufinufft")
    assert cufinufft
    import cupy

    from scalign.kernels.projection import project

    V, A, _, _ = _blob_setup()
    gpu = project(cupy.asarray(V.astype(np.float64)), A, eps=1e-9, method="nufft")
    cpu = project(V.astype(np.float64), A, eps=1e-9, method="nufft")
    np.testing.assert_allclose(gpu.get(), cpu, atol=1e-7 * np.abs(cpu).max())


@pytest.mark.parametrize("gray", [False, True])
def test_scores_on_cupy_equal_numpy(gray):
    import cupy

    from scalign.kernels.ctf import fourier_crop
    from scalign.kernels.scores import circular_mask, compare, jbld, residual_covariance

    rng = np.random.default_rng(7)
    P = rng.random((20, 32, 32))
    images = 0.8 * P + 0.1 + rng.normal(scale=0.2, size=P.shape)
    mask = circular_mask(32)
    cpu = compare(P, images, mask, gray=gray)
    gpu = compare(cupy.asarray(P), cupy.asarray(images), mask, gray=gray)
    for a, b in zip(cpu, gpu, strict=True):
        assert isinstance(b, cupy.ndarray)
        np.testing.assert_allclose(b.get(), a, rtol=1e-10, atol=1e-12)
    C = residual_covariance(cpu.residual) + 1e-3 * np.eye(32)
    Cg = residual_covariance(gpu.residual) + 1e-3 * cupy.eye(32)
    np.testing.assert_allclose(jbld(Cg, Cg[:1]).get(), jbld(C, C[:1]), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        fourier_crop(cupy.asarray(images), 20).get(), fourier_crop(images, 20), atol=1e-10
    )


def test_compare_and_reproject_on_the_gpu_match_the_cpu():
    from scalign import compare_reprojections, make_stack, reproject

    V, _, exact, (rot, tilt, psi) = _blob_setup(count=12)
    ds = make_stack(exact.astype(np.float32), chunks=4)
    ds = ds.assign(rot=("image", rot), tilt=("image", tilt), psi=("image", psi))
    options = {"angles": "stack", "downsample_to": None}
    gpu = compare_reprojections(ds, V, device="gpu", **options)
    cpu = compare_reprojections(ds, V, **options)
    assert isinstance(gpu["correlation"].values, np.ndarray)  # results come back
    # the GPU projects by interpolation (~1%), the CPU by finufft: scores agree closely
    np.testing.assert_allclose(gpu["correlation"].values, cpu["correlation"].values, atol=2e-3)
    assert (gpu["correlation"].values > 0.99).all()
    images = reproject(V, ds, device="gpu")
    assert _is_cupy_graph(images)
    err = np.linalg.norm(images.data.compute().get() - exact) / np.linalg.norm(exact)
    assert err < 0.02


def test_local_cuda_cluster_runs_an_align():
    pytest.importorskip("dask_cuda")
    from scalign import align, helix_ensemble, run, scheduler

    ens = helix_ensemble(200, 20, noise=0.1, chunks=50)
    with scheduler(gpu=True, n_workers=1) as client:
        assert client is not None
        rmsd = run(align(ens, device="gpu")["rmsd"].data)
    # the reference against itself is 0 to rounding (~1e-15 Å): an absolute floor
    np.testing.assert_allclose(rmsd.get(), align(ens)["rmsd"].values, rtol=1e-6, atol=1e-12)


def test_projection_matching_on_cupy_equals_numpy():
    import cupy

    from scalign.kernels.euler import euler_to_matrix
    from scalign.kernels.matching import match_images
    from scalign.kernels.orientations import orientation_grid, symmetry_distance

    V, _, exact, _ = _blob_setup(count=6)
    gallery = euler_to_matrix(*orientation_grid(20.0, "C1"))
    options = {"step": 20.0, "max_shift": 6.0}
    # the GPU projects by interpolation (~1%), the CPU by finufft: the matches agree closely
    cpu = match_images(V, exact, gallery, **options)
    gpu = match_images(cupy.asarray(V), cupy.asarray(exact), gallery, **options)
    assert isinstance(gpu.A, np.ndarray)  # the search's results are on the host
    assert np.max(symmetry_distance(gpu.A, cpu.A, "C1")) < 0.5  # degrees
    np.testing.assert_allclose(gpu.shifts, cpu.shifts, atol=0.1)
    np.testing.assert_allclose(gpu.score, cpu.score, atol=2e-3)


def test_ops_take_a_dataset_moved_to_the_gpu_whole():
    """Every variable on the GPU (to_device of a whole Dataset): the weights, matrices and
    angles the ops read on the host come back through ``_array.host``, and the robust
    mean avoids xarray's fillna (a NumPy 0-d chunk, which CuPy refuses)."""
    from scalign import (
        align,
        build_affine_matrix,
        compare_reprojections,
        helix_ensemble,
        make_stack,
        pairwise_rmsd,
        warp_stack,
    )
    from scalign.execution import to_device

    ens = helix_ensemble(120, 20, noise=0.2, chunks=40)
    ens = ens.assign(masses=("point", np.linspace(1.0, 3.0, 20)))
    gpu_ens = to_device(ens, "gpu")
    robust = align(gpu_ens, "mean", robust="huber")["rmsd"].data.compute().get()
    np.testing.assert_allclose(robust, align(ens, "mean", robust="huber")["rmsd"].values, rtol=1e-6)
    D = pairwise_rmsd(gpu_ens, weights="masses", chunks=40).data.compute().get()
    np.testing.assert_allclose(D, pairwise_rmsd(ens, weights="masses", chunks=40).values, atol=1e-9)

    rng = np.random.default_rng(2)
    stack = make_stack(rng.random((4, 32, 32)).astype(np.float32), chunks=2)
    stack = stack.assign(M=(("row", "col"), build_affine_matrix(3.0, 1.0, -1.0)))
    warped = warp_stack(to_device(stack, "gpu"), "M").data.compute().get()
    np.testing.assert_allclose(warped, warp_stack(stack, "M").values, atol=1e-5)

    V, _, exact, (rot, tilt, psi) = _blob_setup(count=4)
    ds = make_stack(exact.astype(np.float32), chunks=2)
    ds = ds.assign(rot=("image", rot), tilt=("image", tilt), psi=("image", psi))
    options = {"angles": "stack", "downsample_to": None, "covariance": False}
    gpu = compare_reprojections(to_device(ds, "gpu"), V, **options)
    cpu = compare_reprojections(ds, V, **options)
    np.testing.assert_allclose(gpu["correlation"].values, cpu["correlation"].values, atol=2e-3)


def test_small_cupy_inputs_are_taken_and_cupy_stacks_stay_on_the_gpu():
    """References, weights, matrices and volumes given as CuPy arrays are copied to the
    host where the op reads them; a stack made from CuPy images keeps CuPy chunks."""
    import cupy

    from scalign import (
        align,
        build_affine_matrix,
        helix_ensemble,
        make_stack,
        reproject,
        warp_stack,
    )

    ens = helix_ensemble(60, 12, noise=0.1, chunks=20)
    ref, w = ens["coords"].values[3], np.linspace(1.0, 2.0, 12)
    got = align(ens, cupy.asarray(ref), weights=cupy.asarray(w))["rmsd"].values
    np.testing.assert_allclose(got, align(ens, ref, weights=w)["rmsd"].values, rtol=1e-12)
    images = np.random.default_rng(4).random((4, 16, 16)).astype(np.float32)
    stack = make_stack(cupy.asarray(images), chunks=2)
    assert _is_cupy_graph(stack["images"])
    M = build_affine_matrix(2.0, 0.5, 0.5)
    warped = warp_stack(stack, cupy.asarray(M)).data.compute().get()
    np.testing.assert_allclose(warped, warp_stack(make_stack(images), M).values, atol=1e-5)
    V, _, _, (rot, tilt, psi) = _blob_setup(count=3)
    angles = make_stack(np.zeros((3, 32, 32), np.float32)).assign(
        rot=("image", rot), tilt=("image", tilt), psi=("image", psi)
    )
    gpu = reproject(cupy.asarray(V), angles, device="gpu").data.compute().get()
    cpu = reproject(V, angles).values
    assert np.linalg.norm(gpu - cpu) < 0.02 * np.linalg.norm(cpu)
