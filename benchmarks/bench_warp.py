"""Warping an image stack: scalign (kernel and lazy op) vs scipy, dask, dask-image, skimage.

On the same data in one run this times, for one matrix shared by every slice,

* scalign's kernel ``scalign.kernels.warp.warp_images(X, M)`` on the in-memory stack, one
  thread: with its sparse operator cached (the steady state of a long stack or of an op's
  later chunks) and built in every run;
* scalign's op ``warp_stack(make_stack(X), M)`` on the threaded scheduler inside
  ``scalign.scheduler()`` (2 threads here), computed into memory, and zarr -> zarr
  (``xr.open_zarr`` -> ``warp_stack`` -> ``save_zarr``); the operator cache is cleared
  before every run, so each run builds it once;
* the peers: a scipy ``ndimage.affine_transform`` loop over the slices (1 thread); dask
  ``map_blocks`` of that loop (threaded scheduler, 2 threads); dask-image's
  ``ndinterp.affine_transform`` (a 3-D matrix with the identity along the image axis,
  2 threads); a skimage ``transform.warp`` loop (1 thread);

and, with one random small rigid matrix per slice, scalign's kernel and op against the
scipy loop. It prints slices/s, the ratios, checks every result against scipy in the
interior (pixels whose source lies inside the input, where the peers' boundary rules
agree; max |diff| < 1e-4) and says whether the target (the scalign op on 2 cores >= 2x the
fastest peer) is met.

Data: ``skimage.data.camera()`` (512 x 512) tiled to the slice size, as float32 in [0, 1]
with seeded N(0, 0.01) noise per slice; order 1, mode constant; the shared matrix is a 7°
rotation about the centre, a (3.5, -2.25) px shift and a 1.03 scale.

Run:  python benchmarks/bench_warp.py            # 200 slices of 512 x 512 (~1 min)
      python benchmarks/bench_warp.py --quick    # smoke run, 20 slices of 256 x 256
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from pathlib import Path

import _report as report
import dask.array as da
import numpy as np
import xarray as xr
from _report import Row, best_time, fmt_rate, section, status
from threadpoolctl import threadpool_limits

import scalign
from scalign.images import make_stack, warp_stack
from scalign.kernels.affine import build_affine_matrix, image_center, pull_matrix
from scalign.kernels.warp import choose_method, clear_cache, warp_images

TARGET_FACTOR = 2.0  # the scalign op on 2 cores over the fastest peer
PEERS = ("scipy.loop", "dask.map_blocks", "dask_image", "skimage.loop")
VERSIONS = {"scipy": "scipy", "skimage": "scikit-image"}  # module: label, printed first
ANCHOR = {"shared": "op.memory", "per-slice": "per.op"}

SIZES = [(("--slices", "-N"), 200, "default 200"), (("--size",), 512, "slice height = width (512)")]
SKIPS = [
    ("--skip-op", "skip the scalign op rows"),
    ("--skip-zarr", "skip the zarr -> zarr op row"),
    ("--skip-dask-image", "skip the dask-image row"),
    ("--skip-skimage", "skip the skimage row"),
    ("--skip-per-slice", "skip the per-slice-matrices rows"),
]


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def one_thread():
    return threadpool_limits(limits=1)


def time_row(
    rows, repeat, N, key, method, kind, fn, *, note="", setup=None, within=contextlib.nullcontext
):
    """Time ``fn`` (``best_time``; ``setup`` untimed before each call) inside ``within()``
    (``one_thread``, ``scalign.scheduler``; nothing by default) and add its row."""
    with within():
        t = best_time(fn, repeat, setup=setup)
    rows.append(Row(key, method, kind, t, N, note=note))


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def make_data(n: int, size: int, noise: float, seed: int) -> np.ndarray:
    """``(n, size, size)`` float32: camera() tiled/cropped to ``size`` plus noise."""
    from skimage.data import camera

    base = camera().astype(np.float32) / 255.0
    reps = -(-size // base.shape[0])
    tile = np.tile(base, (reps, reps))[:size, :size]
    rng = np.random.default_rng(seed)
    X = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        X[i] = tile + rng.normal(0.0, noise, tile.shape).astype(np.float32)
    return X


def shared_matrix(size: int) -> np.ndarray:
    return build_affine_matrix(7.0, 3.5, -2.25, 1.03, 1.03, center=image_center((size, size)))


def per_slice_matrices(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    c = image_center((size, size))
    return np.stack(
        [
            build_affine_matrix(rng.uniform(-5, 5), *rng.uniform(-3, 3, 2), center=c)
            for _ in range(n)
        ]
    )


def scipy_loop(X: np.ndarray, M: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    from scipy import ndimage as ndi

    out = np.empty_like(X) if out is None else out
    mats, offs = pull_matrix(M)
    for i in range(X.shape[0]):
        mat, off = (mats[i], offs[i]) if M.ndim == 3 else (mats, offs)
        ndi.affine_transform(X[i], mat, off, order=1, output=out[i])
    return out


# --------------------------------------------------------------------------------------
# scalign
# --------------------------------------------------------------------------------------


def bench_scalign_kernel(X, M, repeat, rows, checks) -> None:
    N = X.shape[0]
    res = {}
    method = choose_method(X.shape[1:], N, shared=True, order=1, mode="constant")

    def kernel():
        res["out"] = warp_images(X, M)

    label = "scalign kernel warp_images, 1 thread"
    row = functools.partial(time_row, rows, repeat, N, kind="shared", fn=kernel, within=one_thread)
    row("scalign.kernel", label, note=f"method {method!r}, operator cached (built in the warm-up)")
    row(
        "scalign.kernel_cold",
        f"{label}, cold",
        note="the operator built in every run",
        setup=clear_cache,
    )
    checks["scalign kernel"] = res["out"]


def bench_scalign_op(X, M, repeat, chunk, tmp: Path, rows, checks, *, zarr: bool) -> None:
    N = X.shape[0]
    stack = make_stack(X, chunks=chunk)
    c = stack["images"].chunks[0][0]
    threads = len(os.sched_getaffinity(0))
    res = {}
    row = functools.partial(time_row, rows, repeat, N, kind="shared", within=scalign.scheduler)

    def op_memory():
        res["memory"] = warp_stack(stack, M).values

    row(
        "op.memory",
        f"scalign op warp_stack .values, {threads} threads",
        fn=op_memory,
        note=f"threaded scheduler, chunks of {c}; builds the operator once per run",
        setup=clear_cache,
    )
    checks["scalign op"] = res["memory"]
    if not zarr:
        return
    src = tmp / "input.zarr"
    report.write_input_store(stack, src, f", chunks of {c}")
    runs = iter(range(10**6))
    state = {}

    def fresh():
        clear_cache()
        state["dst"] = tmp / f"warped-{next(runs)}.zarr"

    def op_zarr():
        ds = xr.open_zarr(src, consolidated=False)
        scalign.save_zarr(warp_stack(ds, M).to_dataset(), state["dst"])

    row(
        "op.zarr",
        f"scalign op zarr -> zarr, {threads} threads",
        fn=op_zarr,
        note="open_zarr -> warp_stack -> save_zarr, fresh store per run",
        setup=fresh,
    )
    checks["scalign op zarr -> zarr"] = xr.open_zarr(state["dst"], consolidated=False)[
        "images"
    ].values


# --------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------


def bench_peers(X, M, repeat, chunk, rows, checks, *, dask_image: bool, skimage: bool) -> None:
    N = X.shape[0]
    res = {}
    out = np.empty_like(X)
    row = functools.partial(time_row, rows, repeat, N, kind="shared")

    def loop():
        res["scipy"] = scipy_loop(X, M, out)

    row("scipy.loop", "scipy ndimage.affine_transform loop, 1 thread", fn=loop, within=one_thread)
    checks["scipy loop"] = res["scipy"].copy()

    dX = da.from_array(X, chunks=(chunk, -1, -1))
    threads = len(os.sched_getaffinity(0))

    def map_blocks():
        loop = functools.partial(scipy_loop, M=M)
        res["map_blocks"] = dX.map_blocks(loop, dtype=X.dtype).compute(
            scheduler="threads", num_workers=threads
        )

    row(
        "dask.map_blocks",
        f"dask map_blocks + scipy loop, {threads} threads",
        fn=map_blocks,
        note=f"chunks of {chunk}",
    )
    checks["dask map_blocks"] = res["map_blocks"]

    if dask_image:
        try:
            from dask_image.ndinterp import affine_transform as di_affine
        except ImportError as exc:
            print(f"  (dask-image skipped: {exc})")
        else:
            mat, off = pull_matrix(M)
            mat3 = np.eye(3)
            mat3[1:, 1:] = mat
            off3 = np.array([0.0, *off])

            def dask_image_run():
                res["dask_image"] = di_affine(
                    dX, mat3, off3, order=1, output_chunks=dX.chunks
                ).compute(scheduler="threads", num_workers=threads)

            row(
                "dask_image",
                f"dask-image ndinterp.affine_transform, {threads} threads",
                fn=dask_image_run,
                note="3-D matrix, identity along the image axis",
            )
            checks["dask-image"] = res["dask_image"]

    if skimage:
        from skimage.transform import warp

        inverse = np.linalg.inv(M)
        sk_out = np.empty_like(X)

        def sk_loop():
            for i in range(N):
                sk_out[i] = warp(X[i], inverse, order=1, preserve_range=True)

        row("skimage.loop", "skimage transform.warp loop, 1 thread", fn=sk_loop, within=one_thread)
        checks["skimage loop"] = sk_out


def bench_per_slice(X, Ms, repeat, chunk, rows, checks) -> None:
    N = X.shape[0]
    res = {}
    row = functools.partial(time_row, rows, repeat, N, kind="per-slice")

    def kernel():
        res["kernel"] = warp_images(X, Ms)

    row(
        "per.kernel",
        "scalign kernel warp_images, 1 thread",
        fn=kernel,
        note="method 'scipy' (one matrix per slice)",
        within=one_thread,
    )
    stack = make_stack(X, chunks=chunk)

    def op():
        res["op"] = warp_stack(stack, Ms).values

    threads = len(os.sched_getaffinity(0))
    row(
        "per.op",
        f"scalign op warp_stack .values, {threads} threads",
        fn=op,
        within=scalign.scheduler,
    )
    out = np.empty_like(X)

    def loop():
        res["scipy"] = scipy_loop(X, Ms, out)

    row("per.scipy", "scipy ndimage.affine_transform loop, 1 thread", fn=loop, within=one_thread)
    checks["per-slice"] = (
        res["scipy"].copy(),
        {"scalign kernel": res["kernel"], "scalign op": res["op"]},
    )


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


TITLES = {
    "shared": "one matrix for every slice (order 1, mode constant)",
    "per-slice": "one random small rigid matrix per slice (order 1, mode constant)",
}
FOOTER = (
    "op/this = rate of the scalign op row of the same group (anchor) / rate of this row "
    "(> 1: the op is faster).\nworst s = slowest timed repeat (run-to-run noise)."
)
RATIOS = [
    ("scalign op, 2 threads / scipy loop", "op.memory", "scipy.loop"),
    ("scalign op, 2 threads / dask map_blocks + scipy", "op.memory", "dask.map_blocks"),
    ("scalign op, 2 threads / dask-image", "op.memory", "dask_image"),
    ("scalign op, 2 threads / skimage loop", "op.memory", "skimage.loop"),
    ("scalign op zarr -> zarr / scipy loop", "op.zarr", "scipy.loop"),
    ("scalign kernel, 1 thread / scipy loop (same cores)", "scalign.kernel", "scipy.loop"),
    ("scalign kernel cold, 1 thread / scipy loop", "scalign.kernel_cold", "scipy.loop"),
    ("scalign kernel, 1 thread / skimage loop (same cores)", "scalign.kernel", "skimage.loop"),
    ("per-slice: scalign op, 2 threads / scipy loop", "per.op", "per.scipy"),
    ("per-slice: scalign kernel / scipy loop", "per.kernel", "per.scipy"),
]


def interior_mask(shape, M) -> np.ndarray:
    """Output pixels whose source ``M^-1 p`` lies inside the input (per slice if ``M`` is
    a stack of matrices)."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    p = np.stack([xx.ravel(), yy.ravel(), np.ones(H * W)])
    src = np.linalg.inv(M) @ p
    x, y = src[..., 0, :], src[..., 1, :]
    inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    return inside.reshape(*M.shape[:-2], H, W)


def print_checks(checks: dict, M: np.ndarray, Ms: np.ndarray | None, tol: float = 1e-4) -> bool:
    ok = True
    print(f"\ncorrectness (max |diff| vs the scipy loop where the source is inside; < {tol:g}):")
    ref = checks.pop("scipy loop")
    inside = interior_mask(ref.shape[1:], M)
    for label, out in checks.items():
        if label == "per-slice":
            continue
        d = float(np.abs(out[:, inside] - ref[:, inside]).max())
        good = d < tol
        ok &= good
        print(f"  {label:<26} {d:.1e}  {report.verdict(good)}")
    if "per-slice" in checks:
        ref, outs = checks["per-slice"]
        inside = interior_mask(ref.shape[1:], Ms)
        for label, out in outs.items():
            d = float(np.abs(out - ref)[inside].max())
            good = d < tol
            ok &= good
            print(f"  per-slice: {label:<15} {d:.1e}  {report.verdict(good)}")
    return ok


def parse_args(argv):
    p = report.base_parser(
        __doc__,
        SIZES,
        chunk={"default": None, "help": "slices per chunk (default: make_stack's)"},
        quick="smoke run: 20 slices of 256 x 256, chunks of 10",
        noise="sd of the noise (0.01)",
    )
    report.add_skips(p, "where the zarr stores go", SKIPS, peers=())
    args = p.parse_args(argv)
    if args.quick:
        args.slices, args.size = 20, 256
        args.chunk = args.chunk or 10  # one chunk per thread (2 threads)
    report.require(p, args, {"slices": 1, "size": 2, "repeat": 1}, {"chunk": 1})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = report.start(VERSIONS)
    X = make_data(args.slices, args.size, args.noise, args.seed)
    N = X.shape[0]
    chunk = args.chunk or make_stack(X)["images"].chunks[0][0]
    M = shared_matrix(args.size)
    print(
        f"data: skimage camera() tiled to {args.size} x {args.size}, {N} slices "
        f"({X.nbytes / 2**20:.0f} MiB float32) + N(0, {args.noise}) noise (seed {args.seed}); "
        f"order 1, mode constant; best of {args.repeat} after a warm-up\n"
    )
    rows: list[Row] = []
    checks: dict = {}
    with section("scalign kernel"):
        bench_scalign_kernel(X, M, args.repeat, rows, checks)
    if not args.skip_op:
        with (
            section("scalign op (in memory, and zarr -> zarr)"),
            tempfile.TemporaryDirectory(prefix="scalign-bench-", dir=args.tmpdir) as tmp,
        ):
            bench_scalign_op(
                X, M, args.repeat, chunk, Path(tmp), rows, checks, zarr=not args.skip_zarr
            )
    with section("peers: scipy loop, dask map_blocks, dask-image, skimage"):
        bench_peers(
            X,
            M,
            args.repeat,
            chunk,
            rows,
            checks,
            dask_image=not args.skip_dask_image,
            skimage=not args.skip_skimage,
        )
    Ms = None
    if not args.skip_per_slice:
        Ms = per_slice_matrices(N, args.size, args.seed)
        with section("per-slice matrices: scalign kernel and op, scipy loop"):
            bench_per_slice(X, Ms, args.repeat, chunk, rows, checks)

    print(f"\n{N} slices of {args.size} x {args.size} float32; best of {args.repeat}")
    table = {"rate": ("slices/s", 9), "count": ("slices", 6, ""), "ratio": ("op/this", 8)}
    report.print_table(rows, TITLES, ANCHOR, FOOTER, **table)
    report.print_ratios(rows, RATIOS, "slices/s", 52)
    ok = print_checks(checks, M, Ms)

    by_key = {r.key: r for r in rows}
    peers = [by_key[k] for k in PEERS if k in by_key]
    print(f"\ntarget: the scalign op on 2 cores >= {TARGET_FACTOR:g}x the fastest peer")
    if peers:
        fastest = max(peers, key=lambda r: r.rate)
        goal = TARGET_FACTOR * fastest.rate
        print(f"  fastest peer: {fastest.method}: {fmt_rate(fastest.rate)} slices/s")
        for key in ("op.memory", "op.zarr", "scalign.kernel"):
            if key in by_key:
                r = by_key[key]
                print(
                    f"  {r.method:<48} {fmt_rate(r.rate):>6} slices/s = "
                    f"{r.rate / fastest.rate:5.2f}x  ({status(r.rate, goal)})"
                )
    if (N, args.size) != (200, 512):
        print("  (the target is stated for 200 slices of 512 x 512)")
    return report.finish(ok, t_start)


if __name__ == "__main__":
    sys.exit(main())
