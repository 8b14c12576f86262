"""Reprojection comparison on simulated data with a known truth: projection matching,
scores, outliers and the ranking of candidate volumes."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from scalign.images import make_stack
from scalign.kernels.ctf import ctf_half_plane
from scalign.kernels.euler import euler_to_matrix
from scalign.kernels.matching import match_images
from scalign.kernels.orientations import orientation_grid, symmetry_distance, symmetry_matrices
from scalign.reprojection import assign_images, compare_reprojections, rank_volumes
from scalign.synthetic_em import (
    Blobs,
    blob_projections,
    blob_volume,
    random_blobs,
    simulate_particles,
)

N = 32
ANGLE_NAMES = ("rot", "tilt", "psi", "shift_x", "shift_y")
BLOBS = random_blobs(10, radius=8.0, sigma=1.8, seed=1)


@pytest.fixture(scope="module")
def volumes():
    """The true volume, a perturbed one (blobs moved by ~1 voxel) and a different one."""
    rng = np.random.default_rng(3)
    moved = BLOBS._replace(centers=BLOBS.centers + rng.normal(0, 1.0, BLOBS.centers.shape))
    other = random_blobs(10, radius=8.0, sigma=1.8, seed=5)
    return [blob_volume(b, N) for b in (BLOBS, moved, other)]


def angles_of(result, volume=0):
    r = result.isel(volume=volume)
    return euler_to_matrix(r["rot"].values, r["tilt"].values, r["psi"].values)


@pytest.mark.parametrize("kind", ["shifts", "ctf"])
def test_matching_recovers_orientations_and_shifts(kind):
    parts = simulate_particles(
        BLOBS, N, 8, max_shift=2.0 if kind == "shifts" else 0.0, ctf=kind == "ctf", seed=2
    )
    st = parts.stack
    H = None
    if kind == "ctf":
        H = ctf_half_plane(N, 3.0, st.defocus_u, st.defocus_v, st.defocus_angle)
    gallery = euler_to_matrix(*orientation_grid(15.0))
    coarse = match_images(
        blob_volume(BLOBS, N),
        st.images.values,
        gallery,
        ctf=H,
        step=15.0,
        max_shift=4,
        refine=False,
    )
    assert symmetry_distance(coarse.A, parts.A, "C1").max() < 15.0
    fit = match_images(
        blob_volume(BLOBS, N), st.images.values, gallery, ctf=H, step=15.0, max_shift=4
    )
    assert symmetry_distance(fit.A, parts.A, "C1").max() < 0.2
    truth = np.stack([st.shift_x.values, st.shift_y.values], axis=1)
    assert np.abs(fit.shifts - truth).max() < 0.02
    assert np.all(fit.score > 0.99)


def test_matching_in_sub_batches_equals_one_batch(monkeypatch):
    """A memory budget that fits one image of the search and three candidates of the
    refinement at a time splits both into sub-batches; the results are the same numbers."""
    from scalign.kernels import matching

    parts = simulate_particles(BLOBS, N, 5, max_shift=2.0, ctf=True, seed=6)
    st = parts.stack
    H = ctf_half_plane(N, 3.0, st.defocus_u, st.defocus_v, st.defocus_angle)
    gallery = euler_to_matrix(*orientation_grid(20.0))
    args = (blob_volume(BLOBS, N), st.images.values, gallery)
    whole = match_images(*args, ctf=H, step=20.0, max_shift=4)
    # three refinement candidates at a time, one image at a time in the search
    monkeypatch.setattr(matching, "_CORRELATION_BUDGET", 7 * matching._REFINE_BYTES * N * N * 3)
    assert len(matching._parts(20, 7 * matching._REFINE_BYTES * N * N)) == 7
    assert len(matching._parts(5, matching._SEARCH_BYTES * N * N * len(gallery[:256]))) == 5
    split = match_images(*args, ctf=H, step=20.0, max_shift=4)
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert symmetry_distance(split.A, parts.A, "C1").max() < 0.2


def test_given_angles_rank_the_true_volume_first_in_both_directions(volumes):
    parts = simulate_particles(BLOBS, N, 24, noise=0.3, max_shift=2.0, ctf=True, seed=4, chunks=8)
    for gray in (False, True):
        result = compare_reprojections(
            parts.stack, volumes, angles="stack", ctf=True, gray=gray, covariance=False
        ).compute()
        by_correlation = rank_volumes(result, "correlation")  # higher is better
        by_cost = rank_volumes(result, "cost")  # lower is better
        assert list(by_correlation["volume"]) == ["0", "1", "2"]
        assert list(by_cost["volume"]) == ["0", "1", "2"]
        assert by_cost.attrs == {
            "score": "cost",
            "better": "lower",
            "best": "0",
            "images": 24,
            "excluded": 0,
        }
        assert by_correlation["assigned"][0] == 24
        # the cost is maximal... at the wrong volumes: every image prefers the true one
        cost = result["cost"].values
        assert np.all(cost[0] < cost[1]) and np.all(cost[0] < cost[2])
        assert result["cost"].attrs["better"] == "lower"
        assert np.all(assign_images(result, "cost").values == 0)


def test_z_scores_cannot_rank_and_non_finite_images_are_left_out_for_every_volume(volumes):
    """z-scores are normalised per volume (their means are alike for every map); an image
    without a finite score for one map is ranked for none and assigned to none."""
    parts = simulate_particles(BLOBS, N, 12, noise=0.3, ctf=False, seed=4, chunks=6)
    result = compare_reprojections(parts.stack, volumes, angles="stack").compute()
    for score in ("z_score_res_mean", "z_score_res_std", "z_score_res_cov"):
        with pytest.raises(ValueError, match=f"{score}' cannot rank volumes"):
            rank_volumes(result, score)
        with pytest.raises(ValueError, match="cannot rank volumes"):
            assign_images(result, score)
    with pytest.raises(ValueError, match="unknown score"):
        rank_volumes(result, "residual_std")
    full = rank_volumes(result, "correlation")
    correlation = result["correlation"].values.copy()
    correlation[1, 3] = np.nan  # image 3 has no correlation with volume 1
    holed = result.assign(correlation=(("volume", "image"), correlation))
    table = rank_volumes(holed, "correlation")
    assert (table.attrs["images"], table.attrs["excluded"]) == (11, 1)
    assert table["assigned"].sum() == 11
    kept = np.delete(result["correlation"].values, 3, axis=1)
    np.testing.assert_allclose(table.set_index("volume")["mean"].values, kept.mean(axis=1))
    assert list(table["volume"]) == list(full["volume"])
    assert assign_images(holed, "correlation").values[3] == -1
    with pytest.raises(ValueError, match="no image has a finite correlation"):
        rank_volumes(holed.assign(correlation=holed["correlation"] * np.nan), "correlation")


def test_a_lazy_result_is_matched_and_ranked_in_one_pass():
    """With the JBLD score the op matches once (the result is scored at the matched
    angles), and ranking a lazy result computes it once."""
    calls = []

    def counted(key, dsk, state):
        name = key[0] if isinstance(key, tuple) else key
        if name.startswith("compare_chunk-"):  # the chunk kernel, not its output getters
            calls.append(name)

    parts = simulate_particles(BLOBS, N, 8, noise=0.2, seed=5, chunks=4)
    V = blob_volume(BLOBS, N)
    with dask.callbacks.Callback(pretask=counted):
        result = compare_reprojections(parts.stack, V, angular_sampling=20.0)
    assert len(calls) == 2  # the matching: one task per chunk
    calls.clear()
    with dask.callbacks.Callback(pretask=counted):
        computed = result.compute()
        table = rank_volumes(result, "cost")
    assert len(calls) == 4  # result.compute() and rank_volumes: one task per chunk each
    assert table["mean"][0] == pytest.approx(float(computed["cost"].mean()))
    fresh = compare_reprojections(parts.stack, V, angular_sampling=20.0, covariance=False)
    np.testing.assert_allclose(computed["rot"].values, fresh["rot"].values, atol=1e-9)
    np.testing.assert_allclose(computed["cost"].values, fresh["cost"].values, atol=1e-9)
    in_memory = compare_reprojections(parts.stack.compute(), V, angular_sampling=20.0)
    xr.testing.assert_allclose(in_memory.compute(), computed)


def test_unknown_angles_are_found_within_the_step_then_refined_below_a_degree():
    parts = simulate_particles(BLOBS, N, 12, noise=0.1, max_shift=1.5, ctf=True, seed=6, chunks=6)
    V = blob_volume(BLOBS, N)
    coarse = compare_reprojections(
        parts.stack, V, ctf=True, angular_sampling=15.0, refine=False, covariance=False
    ).compute()
    assert symmetry_distance(angles_of(coarse), parts.A, "C1").max() < 15.0
    fine = compare_reprojections(
        parts.stack, V, ctf=True, angular_sampling=15.0, covariance=False
    ).compute()
    error = symmetry_distance(angles_of(fine), parts.A, "C1")
    assert error.max() < 1.0, error
    assert np.abs(fine["shift_x"].values[0] - parts.stack["shift_x"].values).max() < 0.1
    assert fine.attrs["angles"] == "matched"


def symmetric_blobs(symmetry: str) -> Blobs:
    """Blobs on the orbits of three points under the group: an exactly symmetric volume."""
    S = symmetry_matrices(symmetry)
    seeds = np.array([[5.0, 1.5, 2.0], [-2.0, 4.0, -3.5], [1.0, -6.0, 4.5]])
    centers = np.concatenate([seeds @ s.T for s in S])  # V(S x) = V(x) for every S
    return Blobs(centers, 1.8, np.tile([1.0, 0.7, 1.3], len(S)))


def test_symmetric_volume_orientations_are_recovered_modulo_symmetry():
    blobs = symmetric_blobs("C4")
    parts = simulate_particles(blobs, N, 8, noise=0.05, seed=7, chunks=4)
    result = compare_reprojections(
        parts.stack,
        blob_volume(blobs, N),
        symmetry="C4",
        angular_sampling=15.0,
        covariance=False,
    ).compute()
    assert symmetry_distance(angles_of(result), parts.A, "C4").max() < 1.0
    # a C4 search grid is about a quarter of C1's
    assert len(orientation_grid(15.0, "C4")[0]) < 0.35 * len(orientation_grid(15.0)[0])


def test_planted_outliers_get_the_top_residual_scores():
    parts = simulate_particles(BLOBS, N, 30, noise=0.3, max_shift=2.0, seed=2, chunks=10)
    st = parts.stack
    images = st["images"].values.copy()
    rng = np.random.default_rng(9)
    wrong = random_blobs(10, radius=8.0, sigma=1.8, seed=5)
    images[3] = blob_projections(wrong, N, parts.A[3:4])[0]  # another particle
    images[7] = simulate_particles(BLOBS, N, 1, seed=77).stack["images"].values[0]  # wrong view
    y, x = np.indices((N, N))
    images[11] = ((x // 4 + y // 4) % 2) * 2 * images[11].std()  # a checkerboard
    images[[3, 7, 11]] += 0.3 * images.std() * rng.normal(size=(3, N, N))
    noisy = make_stack(images.astype(np.float32), chunks=10, attrs=dict(st.attrs))
    noisy = noisy.assign({k: st[k] for k in ("rot", "tilt", "psi", "shift_x", "shift_y")})
    result = compare_reprojections(noisy, blob_volume(BLOBS, N), angles="stack").compute()
    planted = {3, 7, 11}
    for score in ("z_score_res_std", "z_score_res_cov"):
        top = np.argsort(-result[score].values[0])[:3]
        assert set(top) == planted, (score, top)
        assert result[score].attrs["better"] == "lower"
    assert set(np.argsort(result["correlation"].values[0])[:3]) == planted


def test_downsampling_to_a_target_pixel_size_keeps_angles_and_input_pixel_shifts():
    big = random_blobs(10, radius=16.0, sigma=3.6, seed=1)
    parts = simulate_particles(big, 64, 6, max_shift=3.0, pixel_size=1.5, seed=8, chunks=3)
    result = compare_reprojections(
        parts.stack,
        blob_volume(big, 64),
        angular_sampling=15.0,
        downsample_to=3.0,
        covariance=False,
    ).compute()
    assert result.attrs["box_size"] == 32 and result.attrs["pixel_size"] == 3.0
    assert symmetry_distance(angles_of(result), parts.A, "C1").max() < 1.0
    shift = parts.stack["shift_x"].values
    assert np.abs(result["shift_x"].values[0] - shift).max() < 0.1  # input (1.5 Å) pixels


def test_lazy_and_identical_on_a_cluster(volumes, client):
    parts = simulate_particles(BLOBS, N, 12, noise=0.3, seed=10, chunks=4)

    def forbid(*args, **kwargs):
        raise RuntimeError("computed")

    with dask.config.set(scheduler=forbid):
        lazy = compare_reprojections(parts.stack, volumes, angles="stack", covariance=False)
    assert lazy["correlation"].chunks == ((1, 1, 1), (4, 4, 4))
    threaded = lazy.compute(scheduler="threads")
    distributed = client.compute(lazy).result()
    xr.testing.assert_allclose(threaded, distributed)


@pytest.mark.parametrize(
    ("change", "exc", "message"),
    [
        ("nan_angle", ValueError, "missing \\(NaN\\) for 1 image"),
        ("no_psi", ValueError, "missing \\['psi'\\]"),
        ("box", ValueError, "box size 24 but the images 32"),
        ("symmetry", ValueError, "symmetry"),
        ("sampling", ValueError, "angular_sampling"),
        ("ctf", ValueError, "ctf=True needs"),
        ("angles", ValueError, "unknown angles option"),
        ("nan_volume", ValueError, "non-finite"),
        ("nan_defocus", ValueError, "defocus_v is not finite for 1 image"),
        ("voltage", ValueError, "voltage must be positive"),
        ("percent", ValueError, "amplitude_contrast must be a fraction in"),
        ("pixel_size", ValueError, "images' pixel_size must be positive"),
        ("pixel_text", TypeError, "images' pixel_size must be a number"),
        (
            "volume_pixel",
            ValueError,
            "volumes' pixel size \\(2.5 Å\\) differs from the images' \\(3 Å",
        ),
        ("downsample", ValueError, "downsample_to must be positive"),
        ("downsample_text", TypeError, "downsample_to must be a number"),
        ("max_shift", TypeError, "max_shift must be a number"),
    ],
)
def test_bad_input_gets_a_clear_error(volumes, change, exc, message):
    st = simulate_particles(BLOBS, N, 4, ctf=True, seed=11).stack
    V, kwargs = volumes[0], {"angles": "stack", "ctf": change != "ctf"}
    if change == "nan_angle":
        st["tilt"][2] = np.nan
    elif change == "no_psi":
        st = st.drop_vars("psi")
    elif change == "box":
        V = np.zeros((24, 24, 24))
    elif change == "symmetry":
        kwargs["symmetry"] = "C0"
    elif change == "sampling":
        kwargs["angular_sampling"] = 0
    elif change == "ctf":
        kwargs["ctf"] = True
        st = st.drop_vars("defocus_u")
    elif change == "angles":
        kwargs["angles"] = "header"
    elif change == "nan_volume":
        V = V.copy()
        V[1, 2, 3] = np.nan
    elif change == "nan_defocus":
        st["defocus_v"][1] = np.nan
    elif change in ("voltage", "percent", "pixel_size", "pixel_text"):
        attr, value = {
            "voltage": ("voltage", 0.0),
            "percent": ("amplitude_contrast", 10.0),
            "pixel_size": ("pixel_size", 0.0),
            "pixel_text": ("pixel_size", "3 A"),
        }[change]
        st.attrs[attr] = value
    elif change == "volume_pixel":
        V = xr.DataArray(V, dims=("z", "y", "x"), attrs={"pixel_size": 2.5})
    elif change == "downsample":
        kwargs["downsample_to"] = 0
    elif change == "downsample_text":
        kwargs["downsample_to"] = "3"
    elif change == "max_shift":
        kwargs["max_shift"] = "a"
    with pytest.raises(exc, match=message):
        compare_reprojections(st, V, covariance=False, **kwargs)


@pytest.mark.parametrize("flag", ["refine", "ctf", "gray", "covariance", "reprojections"])
def test_flags_must_be_booleans(volumes, flag):
    """ctf="no" applied the CTF (and gray="no" scored by the L1 cost) without a word, and
    once computed failed in int(ctf) with "invalid literal for int()"."""
    st = simulate_particles(BLOBS, N, 2, ctf=True, seed=11).stack
    kwargs = {"angles": "stack", "covariance": False, flag: "no"}
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        compare_reprojections(st, volumes[0], **kwargs)
    if flag == "ctf":
        with pytest.raises(TypeError, match="ctf must be True or False"):
            simulate_particles(BLOBS, N, 2, ctf="no")


@pytest.mark.parametrize(
    ("eps", "exc"),
    [(float("nan"), ValueError), (1.0, ValueError), (0.0, ValueError), ("1e-4", TypeError)],
)
def test_projector_accuracy_must_be_in_zero_one(volumes, eps, exc):
    """eps=NaN or >= 1 was passed to finufft, which projected ~5% off without a word."""
    from scalign.reprojection import reproject

    st = simulate_particles(BLOBS, N, 2, seed=11).stack
    with pytest.raises(exc, match="eps must be"):
        compare_reprojections(st, volumes[0], angles="stack", covariance=False, eps=eps)
    with pytest.raises(exc, match="eps must be"):
        reproject(volumes[0], st[["rot", "tilt", "psi"]], eps=eps)


def test_pixel_sizes_are_read_where_a_dataset_or_a_bare_array_holds_them(volumes):
    """A volume Dataset with its pixel size in the Dataset's attrs (as save_zarr keeps it,
    and as the CLI reads it), or images given as a DataArray with theirs, had it ignored:
    a 2.5 Å map was compared with 3 Å images without a word, and the images were not
    downsampled."""
    st = simulate_particles(BLOBS, N, 2, seed=11, pixel_size=3.0).stack
    mapped = xr.Dataset({"volume": (("z", "y", "x"), volumes[0])}, attrs={"pixel_size": 2.5})
    with pytest.raises(ValueError, match="volumes' pixel size \\(2.5 Å\\) differs"):
        compare_reprojections(st, mapped, angles="stack", covariance=False)
    images = st["images"].assign_attrs(pixel_size=1.5)
    with pytest.raises(ValueError, match="volumes' pixel size \\(2.5 Å\\) differs"):
        compare_reprojections(images, mapped, covariance=False)
    found = compare_reprojections(images[:1], volumes[0], angular_sampling=30.0, covariance=False)
    assert found.attrs["pixel_size"] == pytest.approx(3.0)
    assert found.attrs["box_size"] == 16


def test_a_bare_array_of_images_carries_its_ctf_like_a_stack(volumes):
    """A DataArray of images with the microscope's constants in its attrs and the
    per-image defoci and angles as coordinates compares as the Dataset does: ctf=True
    asked for the constants it held ("ctf=True needs the stack's ['voltage', ...]")."""
    st = simulate_particles(BLOBS, N, 4, ctf=True, seed=12).stack
    per_image = [v for v in st.data_vars if v != "images"]
    images = st["images"].assign_coords({v: st[v] for v in per_image}).assign_attrs(st.attrs)
    options = {"angles": "stack", "ctf": True, "covariance": False, "downsample_to": None}
    bare = compare_reprojections(images, volumes[:2], **options)
    whole = compare_reprojections(st, volumes[:2], **options)
    assert bare.attrs["ctf"] == 1
    for name in ("correlation", "cost", "residual_mean"):
        np.testing.assert_array_equal(bare[name].values, whole[name].values)
    without = compare_reprojections(st, volumes[:2], **(options | {"ctf": False}))
    assert not np.allclose(bare["correlation"].values, without["correlation"].values)


def test_nan_pixels_and_empty_stacks():
    st = simulate_particles(BLOBS, N, 4, seed=12).stack
    images = st["images"].values.copy()
    images[1, 3, 3] = np.nan
    lazy = make_stack(da.from_array(images, chunks=2)).assign(
        {k: st[k] for k in ("rot", "tilt", "psi")}
    )
    result = compare_reprojections(lazy, blob_volume(BLOBS, N), angles="stack", covariance=False)
    with pytest.raises(ValueError, match="non-finite"):
        result.compute()
    with pytest.raises(ValueError, match="empty"):
        make_stack(np.zeros((0, N, N), dtype=np.float32))


def test_reproject_is_lazy_and_equals_the_simulated_images():
    from scalign.reprojection import reproject

    parts = simulate_particles(BLOBS, N, 10, max_shift=2.0, seed=13)
    P = reproject(blob_volume(BLOBS, N), parts.stack, chunks=4)
    assert P.dims == ("image", "y", "x") and P.chunks[0] == (4, 4, 2)
    images = parts.stack["images"].values
    assert np.abs(P.values - images).max() < 1e-4 * np.abs(images).max()
    with pytest.raises(ValueError, match="one volume"):
        reproject(np.zeros((2, N, N, N)), parts.stack)


def test_reprojections_are_returned_on_request():
    parts = simulate_particles(BLOBS, N, 6, max_shift=2.0, ctf=True, seed=14, chunks=3)
    result = compare_reprojections(
        parts.stack,
        blob_volume(BLOBS, N),
        angles="stack",
        ctf=True,
        reprojections=True,
        covariance=False,
    ).compute()
    assert result["reprojection"].dims == ("volume", "image", "y", "x")
    images = parts.stack["images"].values
    assert np.abs(result["reprojection"].values[0] - images).max() < 1e-3 * np.abs(images).max()
    big = simulate_particles(BLOBS, 64, 2, pixel_size=1.5, seed=15)
    down = compare_reprojections(
        big.stack, blob_volume(BLOBS, 64), angles="stack", reprojections=True, covariance=False
    )
    assert down["reprojection"].dims == ("volume", "image", "y_down", "x_down")
    assert down["reprojection"].shape == (1, 2, 32, 32)


def test_image_labels_are_kept_by_reproject_and_assign_images(volumes):
    """reproject kept the angles' coordinates only when they had no shifts (the zeros
    put in for missing shifts carried them); assign_images dropped the image labels that
    compare_reprojections keeps; and angles without shifts whose labels differed from the
    images' were an AlignmentError, while the same angles with shifts were used by
    position."""
    from scalign.reprojection import reproject

    parts = simulate_particles(BLOBS, N, 6, max_shift=2.0, seed=16, chunks=4)
    labels = {"image": np.arange(6) * 7, "micrograph": ("image", list("aabbcc"))}
    stack = parts.stack.assign_coords(labels)
    for variables in (["rot", "tilt", "psi"], list(ANGLE_NAMES)):
        P = reproject(volumes[0], stack[variables], chunks=4)
        np.testing.assert_array_equal(P["image"], stack["image"])
        assert list(P["micrograph"].values) == list("aabbcc")
        # angles labelled otherwise than the images are taken by position, shifts or not
        renamed = stack[variables].assign_coords(image=np.arange(6))
        result = compare_reprojections(stack, volumes, angles=renamed, covariance=False)
        np.testing.assert_array_equal(result["image"], stack["image"])
    result = compare_reprojections(stack, volumes, angles="stack", covariance=False).compute()
    picked = assign_images(result)
    np.testing.assert_array_equal(picked["image"], stack["image"])
    assert list(picked["micrograph"].values) == list("aabbcc")
    np.testing.assert_array_equal(picked.values, np.zeros(6))


def test_scores_and_reprojections_do_not_take_the_inputs_attrs(volumes):
    """The images' attrs went to every score (a correlation "in" the images' units) and
    the angles' to reproject's images (projections "in" degrees)."""
    from scalign.reprojection import reproject

    parts = simulate_particles(BLOBS, N, 4, seed=17, chunks=2)
    stack = parts.stack
    stack["images"].attrs = {"units": "e/A^2"}
    stack["rot"].attrs = {"units": "degrees"}
    result = compare_reprojections(
        stack, volumes[0], angles="stack", covariance=False, reprojections=True
    )
    assert result["correlation"].attrs == {"better": "higher"}
    assert result["gain"].attrs == {} and result["reprojection"].attrs == {}
    assert reproject(volumes[0], stack[["rot", "tilt", "psi"]]).attrs == {}
