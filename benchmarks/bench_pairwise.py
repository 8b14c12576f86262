"""Pairwise RMSD matrices: scalign (kernel and lazy op) vs mdtraj and MDAnalysis.

On the same data in one run this times

* scalign's kernel ``scalign.kernels.pairwise.pairwise_rmsd(X)`` on the whole in-memory
  array, BLAS held to one thread (it computes the full N x N square);
* scalign's op ``scalign.pairwise_rmsd(ensemble)`` (lazy, blockwise, only the blocks on and
  below the diagonal) computed with ``.compute()`` on the threaded scheduler inside
  ``scalign.scheduler()``, and the same op written to a zarr store with ``save_zarr``;
* mdtraj's row loop ``for i in range(N): D[i] = md.rmsd(traj, traj, i)``, plain and with
  ``precentered=True`` after an untimed ``center_coordinates()``;
* MDAnalysis ``analysis.diffusionmap.DistanceMatrix`` with a superposing RMSD metric;

prints matrix entries per second ("pairs/s" = N*N / seconds for every row, whether the
method computes the square or one triangle), the ratios, checks the matrices against a
float64 SVD Kabsch brute force and against each other, and says whether the target
(>= 10M pairs/s on 2 cores) is met.

Data: the real AdK trajectory (``adk_dims.npz``: 98 frames x 3341 atoms, Angstrom); the
first ``--points`` atoms, frames tiled to ``--structures`` with seeded 0.01 A float32 noise
(``_report.load_data``), so the matrix holds many near-duplicate pairs (the same frame
twice, RMSD ~0.014 A) besides the real conformational spread.

Run:  python benchmarks/bench_pairwise.py            # N = 1,500 x n = 1,000 (~2 min)
      python benchmarks/bench_pairwise.py --quick    # smoke run, N = 200 x n = 200
"""

from __future__ import annotations

import functools
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import _report as report
import dask
import numpy as np
import xarray as xr
from _report import Row, best_time, fmt_rate, section, status
from threadpoolctl import threadpool_limits

import scalign
from scalign.kernels.pairwise import pairwise_rmsd as pairwise_kernel

TARGET = 10e6  # pairs/s on 2 cores
TARGET_TEXT = (
    ">= 10M pairs/s on 2 cores (mdtraj measured 2.5M pairs/s on the issue author's machine)"
)
VERSIONS = {"mdtraj": "mdtraj", "MDAnalysis": "MDAnalysis"}  # module: label, versions printed
ANCHOR = "op.memory"  # the table's ratio column: this row's rate / each row's rate

# The --skip-* flags of this benchmark's own rows (with --skip-mdtraj, --skip-mdanalysis).
SKIPS = [
    ("--skip-op", "skip the scalign op rows"),
    ("--skip-zarr", "skip the op -> zarr row"),
    ("--skip-context", "skip the floor/serial rows"),
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def frames_within(run_on: Callable[[int], float], N: int, budget: float, probe: int) -> int:
    """``_report.within_budget`` for a method whose cost grows as frames squared (a
    triangle of pairs)."""
    m = min(N, probe)
    t = max(run_on(m), 1e-9)
    return N if t * (N / m) ** 2 <= budget else max(m, int(m * math.sqrt(budget / t)))


# --------------------------------------------------------------------------------------
# scalign
# --------------------------------------------------------------------------------------


def bench_scalign_kernel(X, repeat, rows, checks) -> None:
    N = X.shape[0]
    res = {}

    def kernel():
        res["D"] = pairwise_kernel(X)

    with threadpool_limits(limits=1):
        t = best_time(kernel, repeat)
    rows.append(
        Row(
            "scalign.kernel",
            "scalign kernel pairwise_rmsd(X), 1 thread",
            "pairwise",
            t,
            N * N,
            note="full square, float64 GEMM + QCP",
        )
    )
    checks["kernel"] = res["D"]


def bench_gemm_floor(X, repeat, rows) -> None:
    """The kernel's cross-covariance GEMM alone (N*3 x n @ n x N*3), one thread: the floor
    for any method that forms every H_ij from the coordinates."""
    N, n, d = X.shape
    for dtype in (np.float64, np.float32):
        left = np.ascontiguousarray(X.transpose(0, 2, 1).reshape(N * d, n), dtype=dtype)
        right = np.ascontiguousarray(left.T)
        with threadpool_limits(limits=1):
            t = best_time(lambda left=left, right=right: left @ right, repeat)
        rows.append(
            Row(
                f"floor.gemm.{np.dtype(dtype).name}",
                f"  floor: the H_ij GEMM alone, {np.dtype(dtype).name}, 1 thread",
                "context",
                t,
                N * N,
                note=f"({N * d} x {n}) @ ({n} x {N * d}), BLAS",
            )
        )


def bench_scalign_op(
    X, repeat, chunk, tmp: Path, rows, checks, *, zarr: bool, context: bool
) -> None:
    """The lazy op on the in-memory ensemble: .compute(), and -> zarr (``bench_op_zarr``)."""
    N = X.shape[0]
    # the op's own default block when --chunk is not given (the graph only, not computed)
    block = chunk or scalign.pairwise_rmsd(scalign.make_ensemble(X)).chunks[0][0]
    ens = scalign.make_ensemble(X, chunks=block)
    n_blocks = -(-N // block)
    print(
        f"  blocks of {block} x {block} structures: {n_blocks * (n_blocks + 1) // 2} of "
        f"{n_blocks**2} block tasks computed (the lower triangle)"
    )
    res = {}

    def op():
        with scalign.scheduler():
            res["D"] = scalign.pairwise_rmsd(ens, chunks=block).compute().values

    t = best_time(op, repeat)
    rows.append(
        Row(
            ANCHOR,
            "scalign op pairwise_rmsd(ens).compute(), 2 threads",
            "pairwise",
            t,
            N * N,
            note="lower triangle of blocks, threaded scheduler",
        )
    )
    checks["op"] = res["D"]

    if zarr:
        bench_op_zarr(ens, block, repeat, tmp, rows, checks)

    if context:

        def op_serial():
            with threadpool_limits(limits=1), dask.config.set(scheduler="synchronous"):
                scalign.pairwise_rmsd(ens, chunks=block).compute()

        t = best_time(op_serial, repeat)
        rows.append(
            Row(
                "op.serial",
                "  scalign op .compute(), 1 thread (synchronous)",
                "context",
                t,
                N * N,
                note="the op's triangle saving alone, no parallelism",
            )
        )


def bench_op_zarr(ens, block, repeat, tmp: Path, rows, checks) -> None:
    """The op written to a fresh zarr store per run: ``save_zarr(D.to_dataset(), path)``."""
    N = ens.sizes["structure"]
    runs = iter(range(10**6))
    state = {}

    def fresh_path():
        old = state.get("dst")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        state["dst"] = tmp / f"pairwise-{next(runs)}.zarr"

    def op_zarr():
        with scalign.scheduler():
            D = scalign.pairwise_rmsd(ens, chunks=block)
            scalign.save_zarr(D.to_dataset(), state["dst"])

    t = best_time(op_zarr, repeat, setup=fresh_path)
    out_mib = report.dir_size(state["dst"]) / 2**20
    rows.append(
        Row(
            "op.zarr",
            "scalign op -> save_zarr(D.to_dataset()), 2 threads",
            "pairwise",
            t,
            N * N,
            note=f"compute + write ({out_mib:.0f} MiB out, temp dir)",
        )
    )
    with xr.open_zarr(state["dst"], consolidated=False) as ds:
        checks["op_zarr"] = ds["rmsd"].values
    shutil.rmtree(state["dst"], ignore_errors=True)


# --------------------------------------------------------------------------------------
# mdtraj
# --------------------------------------------------------------------------------------


def bench_mdtraj(X, repeat, budget, rows, checks) -> None:
    import mdtraj as md

    N = X.shape[0]
    # mdtraj works in nm; the Angstrom values are passed as they are, and md.rmsd returns
    # the units of its xyz, so its matrix compares with scalign's directly. md.rmsd centres
    # traj.xyz IN PLACE (documented): every plain run gets a fresh copy (untimed).
    pristine = report.mdtraj_trajectory(X)
    centred = pristine.slice(slice(None), copy=True)
    t0 = time.perf_counter()
    centred.center_coordinates()
    t_center = time.perf_counter() - t0
    probe = min(N, 50)

    def row_loop(key, label, note, precentered):
        state = {}

        def run_on(m):
            traj = centred if precentered else pristine.slice(slice(None), copy=True)
            D = np.empty((m, N), dtype=np.float32)
            t0 = time.perf_counter()
            for i in range(m):
                D[i] = md.rmsd(traj, traj, i, precentered=precentered)
            dt = time.perf_counter() - t0
            state["D"] = D
            return dt

        m, times = report.timed_within(run_on, N, budget, probe, repeat)
        note = report.subset_note(m, N, note, "rows, extrapolated")
        rows.append(Row(key, label, "pairwise", times, m * N, note=note))
        checks[key] = state["D"]

    row_loop(
        "mdtraj.rmsd",
        "mdtraj row loop md.rmsd(traj, traj, i)",
        "like-for-like (raw coordinates), full square, OpenMP",
        precentered=False,
    )
    row_loop(
        "mdtraj.rmsd_pre",
        "mdtraj row loop md.rmsd(..., precentered=True)",
        f"center_coordinates() untimed ({t_center:.3f} s), OpenMP",
        precentered=True,
    )


# --------------------------------------------------------------------------------------
# MDAnalysis
# --------------------------------------------------------------------------------------


def bench_mdanalysis(X, masses, repeat, budget, rows, checks) -> None:
    from MDAnalysis.analysis import rms
    from MDAnalysis.analysis.diffusionmap import DistanceMatrix

    N = X.shape[0]
    # DistanceMatrix's default metric is rms.rmsd(a, b) WITHOUT centring or superposition:
    # a different quantity. The superposing metric (float64 centring + qcprot per pair):
    metric = functools.partial(rms.rmsd, center=True, superposition=True)
    state = {}

    def run_on(m):
        u = report.mda_universe(X[:m].copy(), masses)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm = DistanceMatrix(u, select="all", metric=metric).run()
        dt = time.perf_counter() - t0
        state["D"] = dm.results.dist_matrix
        return dt

    m, times = report.timed_within(run_on, N, budget, 40, repeat, within=frames_within)
    rows.append(
        Row(
            "mda.dm",
            "MDAnalysis DistanceMatrix(metric=superposing rmsd)",
            "pairwise",
            times,
            m * m,
            note=report.subset_note(
                m, N, "upper triangle, qcprot per pair", "frames (m x m matrix), extrapolated"
            ),
        )
    )
    checks["mda.dm"] = state["D"]


# --------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------


def kabsch_rmsd64(a: np.ndarray, b: np.ndarray) -> float:
    """float64 SVD Kabsch (proper rotations, centroids removed), one pair."""
    a = a.astype(np.float64) - a.astype(np.float64).mean(axis=0)
    b = b.astype(np.float64) - b.astype(np.float64).mean(axis=0)
    U, S, Vt = np.linalg.svd(a.T @ b)
    if np.linalg.det(U @ Vt) < 0:
        U[:, -1] = -U[:, -1]
    R = U @ Vt  # a @ R ~ b
    return float(np.sqrt(np.mean(np.sum((a @ R - b) ** 2, axis=1))))


def sample_pairs(N: int, n_frames: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random off-diagonal pairs; half of them near-duplicates (the same frame of the file in
    two tiles, i and j = i + k * n_frames) when the tiling made any."""
    rng = np.random.default_rng(seed + 1)
    i = rng.integers(0, N, size=count)
    j = (i + rng.integers(1, N, size=count)) % N  # never i itself
    if N > n_frames:
        for p in range(count // 2, count):
            copies = np.arange(i[p] % n_frames, N, n_frames)
            copies = copies[copies != i[p]]
            if copies.size:
                j[p] = rng.choice(copies)
    return i, j


def print_checks(X, checks: dict, n_frames: int, n_pairs: int, seed: int) -> bool:
    ok = True
    N = X.shape[0]
    D = np.asarray(checks["kernel"])
    off = D[~np.eye(N, dtype=bool)]
    print("\ncorrectness (same data, same run; Angstrom):")
    print(
        f"  scalign matrix: off-diagonal min {off.min():.4f}, median {np.median(off):.4f}, "
        f"max {off.max():.4f}"
    )

    def line(label, value, tol, extra=""):
        nonlocal ok
        good = bool(value < tol)
        ok &= good
        print(f"  {label:<66} {value:.2e}  {report.verdict(good, tol)}{extra}")

    i, j = sample_pairs(N, n_frames, n_pairs, seed)
    t0 = time.perf_counter()
    brute = np.array([kabsch_rmsd64(X[a], X[b]) for a, b in zip(i, j, strict=True)])
    near = int(np.sum(brute < 0.1))
    print(
        f"  float64 SVD Kabsch brute force on {len(i)} pairs ({near} near-duplicates with "
        f"RMSD < 0.1 A; {time.perf_counter() - t0:.2f} s):"
    )
    for key, label in (
        ("kernel", "scalign kernel"),
        ("op", "scalign op .compute()"),
        ("op_zarr", "scalign op read back from zarr"),
    ):
        if key in checks:
            M = np.asarray(checks[key])
            diff = np.abs(M[i, j] - brute)
            rel = float(np.max(diff[brute > 0.1] / brute[brute > 0.1])) if near < len(i) else 0
            line(
                f"{label} vs brute force, max |diff|",
                float(diff.max()),
                1e-6,
                f"  (max relative where RMSD > 0.1 A: {rel:.1e})",
            )

    for key, label in (("op", "scalign op"), ("op_zarr", "scalign op from zarr")):
        if key in checks:
            line(f"{label} vs kernel, whole matrix, max |diff|", _maxdiff(checks[key], D), 1e-9)
    for key, label in (("kernel", "scalign kernel"), ("op", "scalign op")):
        if key in checks:
            M = np.asarray(checks[key])
            line(f"{label}: symmetry, max |D - D.T|", float(np.abs(M - M.T).max()), 1e-9)
            line(f"{label}: diagonal, max |D_ii|", float(np.abs(np.diag(M)).max()), 1e-12)

    for key, label, tol in (
        ("mdtraj.rmsd", "mdtraj row loop", 5e-3),
        ("mdtraj.rmsd_pre", "mdtraj row loop precentered", 5e-3),
        ("mda.dm", "MDAnalysis DistanceMatrix", 1e-5),
    ):
        if key not in checks:
            continue
        M = np.asarray(checks[key], dtype=np.float64)
        ref = D[: M.shape[0], : M.shape[1]]
        diff = np.abs(M - ref)
        where = np.unravel_index(np.argmax(diff), diff.shape)
        far = ref > 0.1
        far_diff = float(diff[far].max()) if np.any(far) else 0.0
        line(
            f"{label} vs scalign ({M.shape[0]} x {M.shape[1]}), max |diff|",
            float(diff.max()),
            tol,
            f"  (at an RMSD of {ref[where]:.4f}; where RMSD > 0.1 A: {far_diff:.1e})",
        )
    if "mdtraj.rmsd" in checks:
        M = np.asarray(checks["mdtraj.rmsd"])
        print(
            f"  (mdtraj's own diagonal: max {float(np.abs(np.diagonal(M)).max()):.1e}; it is "
            "float32, so near-duplicate pairs lose digits to cancellation)"
        )
    return ok


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


TITLES = {
    "pairwise": "pairwise RMSD matrix (pairs = matrix entries, N*N for a full run)",
    "context": "context (not compared): GEMM floors and the op on one thread",
}
FOOTER = (
    "op/this = rate of the scalign op (in memory, 2 threads) / rate of this row (> 1: the "
    "op is faster).\nworst s = slowest timed repeat (run-to-run noise). SUBSET rows time "
    "the first rows/frames only: pairs/s = the pairs they computed / their seconds."
)
RATIOS = [
    ("scalign op, 2 threads / mdtraj row loop (like-for-like)", ANCHOR, "mdtraj.rmsd"),
    ("scalign op, 2 threads / mdtraj row loop precentered", ANCHOR, "mdtraj.rmsd_pre"),
    ("scalign op -> zarr / mdtraj row loop (like-for-like)", "op.zarr", "mdtraj.rmsd"),
    (
        "scalign kernel, 1 thread / mdtraj row loop (like-for-like)",
        "scalign.kernel",
        "mdtraj.rmsd",
    ),
    (
        "scalign kernel, 1 thread / mdtraj row loop precentered",
        "scalign.kernel",
        "mdtraj.rmsd_pre",
    ),
    ("scalign op, 2 threads / MDAnalysis DistanceMatrix", ANCHOR, "mda.dm"),
    ("scalign op, 2 threads / scalign kernel, 1 thread", ANCHOR, "scalign.kernel"),
    ("scalign op -> zarr / scalign op .compute()", "op.zarr", ANCHOR),
]


def print_report(rows: list[Row]) -> None:
    """The table (pairs/s; every row, context included, against the op) and the ratios."""
    table = {"rate": ("pairs/s", 9), "count": ("pairs", 10, ","), "ratio": ("op/this", 8)}
    report.print_table(rows, TITLES, dict.fromkeys(TITLES, ANCHOR), FOOTER, **table)
    report.print_ratios(rows, RATIOS, "pairs/s", 62)


# --------------------------------------------------------------------------------------


def parse_args(argv):
    p = report.make_parser(
        __doc__,
        structures=1_500,
        chunk={"default": None, "help": "structures per block of the op (its default)"},
        quick="smoke run: N=200, n=200, --budget 0.5",
    )
    p.add_argument("--check-pairs", type=int, default=200, help="brute-force pairs (200)")
    p.add_argument(
        "--budget",
        type=float,
        default=15.0,
        help="seconds per timed run of mdtraj and MDAnalysis; beyond it only the first "
        "rows (frames) are timed and the row says SUBSET (15; 'inf' for the full matrix)",
    )
    report.add_skips(p, "where the zarr store goes", SKIPS)
    args = p.parse_args(argv)
    if args.quick:
        args.structures, args.points, args.budget = 200, 200, min(args.budget, 0.5)
    report.require(p, args, {"structures": 2, "points": 3, "repeat": 1}, {"chunk": 1})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = report.start(VERSIONS, hint=": pip install -e '.[bench]'")
    X, masses, n_frames = report.load_and_describe(args, f"{args.structures**2:,} matrix entries")
    N, n = X.shape[:2]
    rows: list[Row] = []
    checks: dict = {}

    with section("scalign kernel"):
        bench_scalign_kernel(X, args.repeat, rows, checks)
        if not args.skip_context:
            bench_gemm_floor(X, args.repeat, rows)
    if not args.skip_op:
        with (
            section("scalign op (in memory, and -> zarr)"),
            tempfile.TemporaryDirectory(prefix="scalign-bench-", dir=args.tmpdir) as tmp,
        ):
            bench_scalign_op(
                X,
                args.repeat,
                args.chunk,
                Path(tmp),
                rows,
                checks,
                zarr=not args.skip_zarr,
                context=not args.skip_context,
            )
    if not args.skip_mdtraj:
        with section("mdtraj row loops"):
            bench_mdtraj(X, args.repeat, args.budget, rows, checks)
    if not args.skip_mdanalysis:
        with section("MDAnalysis DistanceMatrix"):
            bench_mdanalysis(X, masses, args.repeat, args.budget, rows, checks)

    report.print_size(N, n, args.repeat)
    print_report(rows)
    ok = print_checks(X, checks, n_frames, args.check_pairs, args.seed)

    by_key = {r.key: r for r in rows}
    print(f"\ntarget: {TARGET_TEXT}")
    for key, label in (
        (ANCHOR, "scalign op .compute(), 2 threads"),
        ("op.zarr", "scalign op -> zarr, 2 threads"),
        ("scalign.kernel", "scalign kernel, 1 thread (for reference)"),
    ):
        if key in by_key:
            r = by_key[key]
            print(f"  {label:<48} {fmt_rate(r.rate):>7} pairs/s  ({status(r.rate, TARGET)})")
    for key in ("mdtraj.rmsd", "mdtraj.rmsd_pre"):
        if key in by_key:
            print(f"  {by_key[key].method:<48} {fmt_rate(by_key[key].rate):>7} pairs/s  (here)")
    if (N, n) != (1_500, 1_000):
        print("  (the default run is N = 1,500 x n = 1,000)")
    return report.finish(ok, t_start)


if __name__ == "__main__":
    sys.exit(main())
