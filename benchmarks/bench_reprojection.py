"""Projection of a 128³ volume and the comparison of images with reprojections, in one run.

On a volume of Gaussian blobs (whose projections are exact, so every row's accuracy is
measured against the truth) at 1,000 random orientations, this times

* scalign ``reproject`` (the lazy op: finufft Fourier slices, one task per chunk of
  orientations, threaded scheduler, 2 threads) and ``project`` on one thread;
* finufft direct: one ``nufft3d2`` call (2 threads, its default upsampling 2) on the same
  slice points, then the inverse FFTs (a plain Fourier-slice projector on finufft);
* a real-space rotate-and-sum: ``scipy.ndimage.map_coordinates`` (order 1) of the volume
  on the rotated grid, summed along z (on a subset, extrapolated);

and the comparison per volume: ``compare_reprojections`` with given angles (images/s,
CTF on) and with projection matching at a 15° step with refinement (images/s, 200 images
of 32² in two chunks, the default shift range of a quarter box). Prints projections/s,
the ratios, the relative error of each projector (max |P - exact| / max |exact|) and
whether the target is met: >= 800 projections/s at <= 1e-3 relative error on 2 cores.

Run:  python benchmarks/bench_reprojection.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from _report import Row, best_time, finish, print_ratios, print_table, start
from scipy import ndimage
from threadpoolctl import threadpool_limits

import scalign
from scalign.kernels.projection import centering_phase, half_plane_frequencies

TARGET = 800.0  # projections/s of a 128³ volume on 2 cores
TOLERANCE = 1e-3


def relative_error(P: np.ndarray, exact: np.ndarray) -> float:
    return float(np.abs(P - exact).max() / np.abs(exact).max())


def finufft_direct(V: np.ndarray, A: np.ndarray, eps: float) -> np.ndarray:
    """The same slices by one plain finufft call on 2 threads, then the inverse FFTs."""
    import finufft

    n = V.shape[0]
    ky, kx = half_plane_frequencies(n)
    omega = (
        kx[None, ..., None] * A[:, None, None, 0, :] + ky[None, ..., None] * A[:, None, None, 1, :]
    )
    w = [
        np.ascontiguousarray(omega[..., a].reshape(-1) * (2 * np.pi / n), np.float32)
        for a in range(3)
    ]
    F = finufft.nufft3d2(
        w[2], w[1], w[0], V.astype(np.complex64), eps=eps, isign=-1, nthreads=2, upsampfac=2.0
    )
    F = F.reshape(len(A), n, -1) * centering_phase(n) * ((kx**2 + ky**2) <= (n / 2) ** 2)
    return np.fft.irfft2(F, s=(n, n))


def real_space(V: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Rotate the volume onto each projection frame (trilinear) and sum along z."""
    n = V.shape[0]
    c = n // 2
    grid = (np.indices((n, n, n)).reshape(3, -1)[::-1] - c).astype(np.float32)
    out = []
    for a in A:
        coords = (a.T.astype(np.float32) @ grid + c)[::-1]
        out.append(ndimage.map_coordinates(V, coords, order=1).reshape(n, n, n).sum(axis=0))
    return np.array(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--orientations", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=1e-3, help="finufft accuracy")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64³, 200 orientations")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.orientations, args.repeat = 64, 200, 1
    t_start = start({"finufft": "finufft", "scipy": "scipy"})
    n, m = args.size, args.orientations
    blobs = scalign.random_blobs(40, radius=0.3 * n, sigma=0.03 * n, seed=0)
    V = scalign.blob_volume(blobs, n)
    parts = scalign.simulate_particles(blobs, n, m, seed=1)
    A = parts.A
    exact = parts.stack["images"].values
    print(f"\n{n}³ volume of 40 Gaussian blobs, {m} random orientations; best of {args.repeat}")
    rows, errors = [], {}
    angles = parts.stack.drop_vars("images")

    lazy = scalign.reproject(V, angles, eps=args.eps, chunks=-(-m // 4))
    with scalign.scheduler():
        rows.append(
            Row(
                "op",
                "scalign reproject (lazy op), 2 threads",
                "proj",
                best_time(lambda: lazy.values, args.repeat),
                m,
                f"eps {args.eps:g}, 4 chunks",
            )
        )
        errors["op"] = relative_error(lazy.values, exact)
    with threadpool_limits(1):
        rows.append(
            Row(
                "kernel",
                "scalign project, 1 thread",
                "proj",
                best_time(lambda: scalign.project(V, A, eps=args.eps), args.repeat),
                m,
            )
        )
        errors["kernel"] = relative_error(scalign.project(V, A, eps=args.eps), exact)
    rows.append(
        Row(
            "finufft",
            "finufft nufft3d2 direct, 2 threads (+ inverse FFTs)",
            "proj",
            best_time(lambda: finufft_direct(V, A, args.eps), args.repeat),
            m,
        )
    )
    errors["finufft"] = relative_error(finufft_direct(V, A, args.eps), exact)
    k = max(2, m // 100)
    t0 = time.perf_counter()
    P = real_space(V, A[:k])
    rows.append(
        Row(
            "real",
            "real-space rotate (trilinear) and sum, 1 thread",
            "proj",
            [time.perf_counter() - t0],
            k,
            f"SUBSET: {k} orientations",
        )
    )
    errors["real"] = relative_error(P, exact[:k])

    # the comparison, per volume
    small = max(32, n // 4)
    st = scalign.simulate_particles(
        blobs._replace(centers=blobs.centers * small / n, sigma=blobs.sigma * small / n),
        small,
        200,
        noise=0.3,
        max_shift=2,
        ctf=True,
        seed=2,
        chunks=50,
    )
    V_small = scalign.blob_volume(
        blobs._replace(centers=blobs.centers * small / n, sigma=blobs.sigma * small / n), small
    )
    given = scalign.compare_reprojections(
        st.stack, V_small, angles="stack", ctf=True, covariance=False
    )
    with scalign.scheduler():
        rows.append(
            Row(
                "given",
                f"compare, given angles, {small}², CTF, 2 threads",
                "cmp",
                best_time(lambda: given.compute(), args.repeat),
                200,
            )
        )
    # two chunks of 100 images: each chunk projects the gallery once
    search = scalign.compare_reprojections(
        st.stack.chunk({"image": 100}), V_small, ctf=True, angular_sampling=15.0, covariance=False
    )
    with scalign.scheduler():
        t0 = time.perf_counter()
        found = search.compute()
        rows.append(
            Row(
                "search",
                f"compare, matching at 15° + refinement, {small}², 2 threads",
                "cmp",
                [time.perf_counter() - t0],
                200,
            )
        )
    est = scalign.euler_to_matrix(found.rot.values[0], found.tilt.values[0], found.psi.values[0])
    angle_error = scalign.symmetry_distance(est, st.A, "C1")

    print_table(
        rows,
        {"proj": f"projections of a {n}³ volume", "cmp": "comparison of images, one volume"},
        {"proj": "op", "cmp": "given"},
        "op/this = rate of the anchor row / rate of this row (> 1: the anchor is faster).",
        rate=("items/s", 9),
        count=("items", 6, ","),
        ratio=("op/this", 8),
    )
    print_ratios(
        rows,
        [
            ("scalign op / finufft direct", "op", "finufft"),
            ("scalign op / real-space rotate-and-sum", "op", "real"),
        ],
        "projections/s",
        40,
    )
    print("\nrelative error vs the exact blob projections (max |P - exact| / max |exact|):")
    ok = True
    for key, err in errors.items():
        good = err <= TOLERANCE or key == "real"
        ok &= good
        print(f"  {key:<10} {err:.2e}  {'OK' if good else 'FAILED'}")
    print(
        f"matched orientations: median error {np.median(angle_error):.3f}°, "
        f"max {angle_error.max():.3f}° (noise 0.3, CTF)"
    )
    op = next(r for r in rows if r.key == "op")
    met = op.rate >= TARGET and errors["op"] <= TOLERANCE
    verdict = ("met" if met else "not met") if n == 128 else f"not judged: a {n}³ volume"
    print(
        f"\ntarget: >= {TARGET:.0f} projections/s of a 128³ volume at <= {TOLERANCE:g} "
        f"relative error on 2 cores: {op.rate:.0f}/s ({verdict})"
    )
    return finish(ok, t_start)


if __name__ == "__main__":
    sys.exit(main())
