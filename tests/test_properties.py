"""Property tests of the ops (hypothesis): what must not change the answer."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

import scalign
from scalign.kernels.affine import build_affine_matrix, invert
from scalign.kernels.orientations import symmetry_matrices
from scalign.kernels.scores import circular_mask, compare
from scalign.kernels.warp import warp_images

seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, chunks=st.integers(1, 13), permute=st.booleans())
def test_align_is_invariant_to_chunking_batch_order_and_rigid_moves(seed, chunks, permute):
    """Per structure, the RMSD does not depend on the chunking, on the order of the batch,
    or on a rigid motion of the structure; the recovered motion composes with it."""
    rng = np.random.default_rng(seed)
    ens = scalign.helix_ensemble(13, 24, noise=0.2, seed=seed % 1000)
    X = ens["coords"].values.astype(np.float64)
    reference = X[0]
    base = scalign.align(scalign.make_ensemble(X, chunks=13), reference).compute()
    order = rng.permutation(13) if permute else np.arange(13)
    Q = Rotation.random(random_state=rng).as_matrix()
    t = rng.uniform(-50, 50, 3)
    moved = X[order] @ Q.T + t
    other = scalign.align(scalign.make_ensemble(moved, chunks=chunks), reference).compute()
    np.testing.assert_allclose(other["rmsd"].values, base["rmsd"].values[order], atol=1e-9)
    # R_other Q = R_base: the fit undoes the extra rotation
    R = other["rotation"].values @ Q
    np.testing.assert_allclose(R, base["rotation"].values[order], atol=1e-7)
    np.testing.assert_allclose(other["aligned"].values, base["aligned"].values[order], atol=1e-7)


@given(
    seed=seeds,
    theta=st.floats(-40, 40),
    shift=st.tuples(st.floats(-5, 5), st.floats(-5, 5)),
    shape=st.sampled_from([(40, 52), (41, 41), (33, 48)]),
)
def test_warp_then_inverse_warp_is_the_identity_in_the_interior(seed, theta, shift, shape):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng.random(shape), 3)
    img = (img - img.min()) / (img.max() - img.min())  # smooth, in [0, 1]
    c = ((shape[1] - 1) / 2, (shape[0] - 1) / 2)
    M = build_affine_matrix(theta, *shift, center=c)
    back = warp_images(warp_images(img[None], M, order=3), invert(M), order=3)[0]
    # the interior: pixels whose samples stay inside the image both ways (a rotation about
    # the centre keeps the radius; the shift adds to it) and 6 px from the zero-filled
    # border the second warp's spline prefilter sees (its influence decays 0.27x per px)
    y, x = np.indices(shape)
    radius = min(shape) / 2 - np.hypot(*shift) - 6
    inner = np.hypot(x - c[0], y - c[1]) < radius
    # two cubic resamplings of content with a 3 px correlation length: ~0.3% each way
    assert np.abs(back - img)[inner].max() < 1e-2


@given(seed=seeds, symmetry=st.sampled_from(["C3", "D2", "T"]))
def test_symmetry_equivalent_orientations_give_equal_scores(seed, symmetry):
    """For a volume with V(S x) = V(x), the orientations A and A S project the same image,
    so every score of an image is the same at either."""
    S = symmetry_matrices(symmetry)
    points = np.array([[5.0, 1.5, 2.0], [-2.0, 4.0, -3.5]])
    blobs = scalign.synthetic_em.Blobs(
        np.concatenate([points @ s.T for s in S]), 1.8, np.tile([1.0, 0.6], len(S))
    )
    rng = np.random.default_rng(seed)
    A = Rotation.random(random_state=rng).as_matrix().T[None]
    k = rng.integers(1, len(S))
    V = scalign.blob_volume(blobs, 32, np.float64)
    image = scalign.blob_projections(blobs, 32, A) + 0.1 * rng.normal(size=(1, 32, 32))
    mask = circular_mask(32)
    first = compare(scalign.project(V, A, eps=1e-9), image, mask, gray=True)
    mate = compare(scalign.project(V, A @ S[k], eps=1e-9), image, mask, gray=True)
    np.testing.assert_allclose(mate.correlation, first.correlation, atol=1e-7)
    np.testing.assert_allclose(mate.cost, first.cost, atol=1e-7)
