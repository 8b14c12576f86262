"""Superposition throughput: scalign (kernel and zarr->zarr op) vs mdtraj and MDAnalysis.

On the same data in one run this times

* scalign's batched kernel: RMSD to a reference (``superpose``: RMSD + rotation), and the
  superposition with the aligned coordinates written (``superpose`` + ``apply_transform``);
* scalign's op from zarr to zarr (``open_ensemble`` -> ``align`` -> ``save_zarr``) on the
  threaded scheduler and on a ``LocalCluster``;
* mdtraj: ``md.rmsd`` (plain and ``precentered=True``) and ``Trajectory.superpose``;
* MDAnalysis: a per-frame ``lib.qcprot.CalcRMSDRotationalMatrix`` loop,
  ``analysis.rms.RMSD`` and ``analysis.align.AlignTraj`` (in memory);

prints structures/s and the ratios, checks that the RMSDs and aligned coordinates agree,
and says whether the targets (RMSD kernel >= 1.5M structures/s, superposition with the
aligned coordinates written >= 500k structures/s) are met.

Data: the real AdK trajectory (``adk_dims.npz``: 98 frames x 3341 atoms, Angstrom); the
first ``--points`` atoms, frames tiled to ``--structures`` with seeded 0.01 A float32 noise
so that no two structures are identical. The reference is structure 0.

Run:  python benchmarks/bench_align.py            # N = 10,000 x n = 1,000 (~1-2 min)
      python benchmarks/bench_align.py --quick    # smoke run, N = 500 x n = 200
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _report as report
import dask.array as da
import numpy as np
import xarray as xr
from _report import Row, best_time, fmt_rate, status

import scalign
from scalign.kernels.kabsch import apply_transform, superpose

TARGET_RMSD = 1.5e6  # structures/s, RMSD-to-reference kernel
TARGET_SUPERPOSE = 5e5  # structures/s, superposition with aligned coordinates written

# The two anchors: every other row of the same kind is compared with these.
ANCHOR = {"rmsd": "scalign.rmsd", "superpose": "scalign.superpose"}

# The --skip-* flags of this benchmark's own rows (with --skip-mdtraj, --skip-mdanalysis).
SKIPS = [
    ("--skip-op", "skip the zarr->zarr op rows"),
    ("--skip-local", "skip the LocalCluster row"),
    ("--skip-context", "skip the memory-floor and op-part rows"),
]


# --------------------------------------------------------------------------------------
# scalign
# --------------------------------------------------------------------------------------


def bench_scalign_kernel(X, Y, repeat, chunk, rows, checks) -> None:
    N = X.shape[0]
    res = {}

    def rmsd_kernel():
        res["fit"] = superpose(X, Y)

    t = best_time(rmsd_kernel, repeat)
    rows.append(Row("scalign.rmsd", "scalign kernel superpose (RMSD + rotation)", "rmsd", t, N))

    def superpose_kernel():
        fit = superpose(X, Y)
        res["aligned"] = apply_transform(X, fit.rotation, fit.translation, fit.scale)

    t = best_time(superpose_kernel, repeat)
    rows.append(
        Row(
            "scalign.superpose",
            "scalign kernel superpose + apply_transform",
            "superpose",
            t,
            N,
            note="new output array per call",
        )
    )

    # the same, serially over the chunks the op uses: what its dask tasks do in all
    out = np.empty_like(X)

    def chunked():
        for i in range(0, N, chunk):
            Xi = X[i : i + chunk]
            fit = superpose(Xi, Y)
            out[i : i + chunk] = apply_transform(Xi, fit.rotation, fit.translation, fit.scale)

    t = best_time(chunked, repeat)
    rows.append(
        Row(
            "scalign.chunked",
            f"scalign kernel superpose + apply, {chunk}-chunk loop",
            "superpose",
            t,
            N,
            note="serial loop over op-sized chunks",
        )
    )
    # the op in memory on both cores (Dask threads, BLAS held to one thread each), fit only:
    # what md.rmsd's two OpenMP threads compete with
    ens = scalign.make_ensemble(da.from_array(X, chunks=(2500, -1, -1)), chunks=2500)

    def op_fit_only():
        with scalign.scheduler():
            res["op_rmsd"] = scalign.align(ens, Y, aligned=False)["rmsd"].values

    t = best_time(op_fit_only, repeat)
    rows.append(
        Row(
            "scalign.op_rmsd",
            "scalign align(aligned=False), in memory, 2 threads",
            "rmsd",
            t,
            N,
            note="the op on dask chunks of 2500",
        )
    )
    checks["scalign_fit"] = res["fit"]
    checks["scalign_aligned"] = res["aligned"]
    checks["scalign_op_rmsd"] = res["op_rmsd"]


def bench_floors(X, repeat, rows) -> None:
    """Memory-traffic floors on this machine: one read of X, one read + write of X."""
    N = X.shape[0]
    t = best_time(lambda: X.sum(dtype=np.float32), repeat)
    rows.append(
        Row(
            "floor.read",
            "  floor: X.sum() (one read pass)",
            "context",
            t,
            N,
            note="numpy, 1 thread",
        )
    )
    out = np.empty_like(X)
    t = best_time(lambda: np.copyto(out, X), repeat)
    rows.append(
        Row(
            "floor.copyto",
            "  floor: np.copyto(out, X)",
            "context",
            t,
            N,
            note="read + write into a reused array",
        )
    )
    t = best_time(X.copy, repeat)
    rows.append(
        Row(
            "floor.copy",
            "  floor: X.copy()",
            "context",
            t,
            N,
            note="read + write into a new array (page faults)",
        )
    )


def bench_scalign_op(X, repeat, chunk, tmp: Path, rows, checks, *, local: bool, parts: bool):
    """open_ensemble -> align(reference=0) -> save_zarr, to a fresh output store per run."""
    N = X.shape[0]
    label = "LocalCluster" if local else "threaded"
    src = tmp / "input.zarr"
    if not src.exists():
        ens = scalign.make_ensemble(X, chunks=chunk)
        report.write_input_store(ens, src, f" on disk, chunks of {chunk} structures")
    runs = iter(range(10**6))
    state = {}

    def fresh_path():
        state["dst"] = tmp / f"aligned-{next(runs)}.zarr"

    def op():
        ds = scalign.open_ensemble(src)
        scalign.save_zarr(scalign.align(ds, reference=0), state["dst"], overwrite=True)

    t0 = time.perf_counter()
    with scalign.scheduler(local=local) as client:
        if client is not None:
            workers = client.scheduler_info().get("workers", {})
            threads = sum(w.get("nthreads", 0) for w in workers.values())
            print(
                f"  LocalCluster: {len(workers)} workers, {threads} threads in all "
                f"(started in {time.perf_counter() - t0:.1f} s, untimed)"
            )
        times = []
        for i in range(repeat + 1):  # the first run is the warm-up
            fresh_path()
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
            if i < repeat:
                shutil.rmtree(state["dst"], ignore_errors=True)
    last = state["dst"]
    out_mib = report.dir_size(last) / 2**20
    rows.append(
        Row(
            f"op.{label}",
            f"scalign op zarr->zarr, {label}",
            "superpose",
            times[1:],
            N,
            note=f"read + align + write ({out_mib:.0f} MiB out)",
        )
    )
    with xr.open_zarr(last, consolidated=False) as out:
        checks[f"op_{label}"] = (out["rmsd"].values, out["aligned"].values)
    shutil.rmtree(last, ignore_errors=True)
    if not parts:
        return

    # where the op's time goes (threaded scheduler): read only; align without the write
    t = best_time(lambda: scalign.open_ensemble(src)["coords"].values, repeat)
    rows.append(
        Row(
            "op.read",
            "  op part: open_ensemble + read coords",
            "context",
            t,
            N,
            note="zarr read + decompress only",
        )
    )
    t = best_time(lambda: scalign.align(scalign.open_ensemble(src), reference=0).compute(), repeat)
    rows.append(
        Row(
            "op.nowrite",
            "  op part: open + align + .compute()",
            "context",
            t,
            N,
            note="the op without the zarr write",
        )
    )


# --------------------------------------------------------------------------------------
# mdtraj
# --------------------------------------------------------------------------------------


def bench_mdtraj(X, repeat, rows, checks) -> None:
    import mdtraj as md

    N = X.shape[0]
    # mdtraj works in nm; the Angstrom values are just taken as nm (no effect on timing).
    # md.rmsd(traj, traj, 0) centres traj.xyz IN PLACE (documented) and superpose edits it
    # too, so every timed call gets a fresh copy of the pristine coordinates (untimed).
    pristine = report.mdtraj_trajectory(X)
    out, state = {}, {}

    def fresh():
        state["t"] = pristine.slice(slice(None), copy=True)

    def plain():
        out["rmsd"] = md.rmsd(state["t"], state["t"], 0)

    t = best_time(plain, repeat, setup=fresh)
    rows.append(
        Row(
            "mdtraj.rmsd",
            "mdtraj md.rmsd(traj, traj, 0)",
            "rmsd",
            t,
            N,
            note="like-for-like (raw coordinates)",
        )
    )

    centred = pristine.slice(slice(None), copy=True)
    t0 = time.perf_counter()
    centred.center_coordinates()
    t_center = time.perf_counter() - t0

    def pre():
        out["rmsd_pre"] = md.rmsd(centred, centred, 0, precentered=True)

    t = best_time(pre, repeat)
    rows.append(
        Row(
            "mdtraj.rmsd_pre",
            "mdtraj md.rmsd(..., precentered=True)",
            "rmsd",
            t,
            N,
            note=f"NOT like-for-like: center_coordinates() untimed ({t_center:.3f} s)",
        )
    )

    def sup():
        state["t"].superpose(state["t"], 0)

    t = best_time(sup, repeat, setup=fresh)
    rows.append(
        Row(
            "mdtraj.superpose",
            "mdtraj traj.superpose(traj, 0)",
            "superpose",
            t,
            N,
            note="in place (the copy is untimed)",
        )
    )
    checks["mdtraj_rmsd"] = out["rmsd"]
    checks["mdtraj_rmsd_pre"] = out["rmsd_pre"]
    checks["mdtraj_aligned"] = state["t"].xyz


# --------------------------------------------------------------------------------------
# MDAnalysis
# --------------------------------------------------------------------------------------


def bench_mdanalysis(X, masses, repeat, budget, rows, checks) -> None:
    from MDAnalysis.analysis import align as mda_align
    from MDAnalysis.analysis import rms as mda_rms
    from MDAnalysis.lib import qcprot

    N, n, _ = X.shape
    probe = min(N, 500)
    ref_u = report.mda_universe(X[:1].copy(), masses)

    def timed_row(run_on, key: str, label: str, kind: str, note: str) -> None:
        m, times = report.timed_within(run_on, N, budget, probe, repeat)
        rows.append(Row(key, label, kind, times, m, note=report.subset_note(m, N, note)))

    # lib.qcprot per frame; it expects centred coordinates (centred in float64 here, as
    # MDAnalysis.analysis.rms.rmsd does) and returns the RMSD and the rotation.
    ref_c = X[0].astype(np.float64)
    ref_c -= ref_c.mean(axis=0)
    rot = np.empty(9, dtype=np.float64)
    state = {}

    def qcp_loop(m):
        t0 = time.perf_counter()
        r = np.empty(m)
        calc = qcprot.CalcRMSDRotationalMatrix
        for i in range(m):
            c = X[i].astype(np.float64)
            c -= c.mean(axis=0)
            r[i] = calc(ref_c, c, n, rot, None)
        state["qcp"] = r
        return time.perf_counter() - t0

    timed_row(
        qcp_loop,
        "mda.qcprot",
        "MDAnalysis lib.qcprot.CalcRMSDRotationalMatrix loop",
        "rmsd",
        "per frame: centre + RMSD + rotation",
    )
    checks["mda_qcprot_rmsd"] = state["qcp"]

    def rmsd_run(m):
        u = report.mda_universe(X[:m].copy(), masses)
        t0 = time.perf_counter()
        state["R"] = mda_rms.RMSD(u, ref_u, select="all").run()
        return time.perf_counter() - t0

    timed_row(
        rmsd_run,
        "mda.rms",
        "MDAnalysis analysis.rms.RMSD(u, ref).run()",
        "rmsd",
        "in-memory Universe",
    )
    checks["mda_rms_rmsd"] = state["R"].results.rmsd[:, 2]

    def align_run(m):
        u = report.mda_universe(X[:m].copy(), masses)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = mda_align.AlignTraj(u, ref_u, select="all", in_memory=True).run()
        dt = time.perf_counter() - t0
        state["A"] = (a.results.rmsd, u.trajectory.coordinate_array)
        return dt

    timed_row(
        align_run,
        "mda.align",
        "MDAnalysis analysis.align.AlignTraj(in_memory=True)",
        "superpose",
        "in-memory Universe",
    )
    checks["mda_align"] = state["A"]


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


TITLES = {
    "rmsd": "RMSD to the reference (scalign: superpose, i.e. RMSD + rotation)",
    "superpose": "superposition with the aligned coordinates written",
    "context": "context (not compared): memory floors and parts of the zarr op",
}
FOOTER = (
    "scalign/this = rate of the scalign kernel row of the same kind (anchor) / rate of this "
    "row (> 1: the kernel is faster).\nworst s = slowest timed repeat (run-to-run noise)."
)
RATIOS = [
    (
        "scalign op RMSD, 2 threads / mdtraj md.rmsd (like-for-like)",
        "scalign.op_rmsd",
        "mdtraj.rmsd",
    ),
    ("scalign kernel RMSD / mdtraj md.rmsd (like-for-like)", "scalign.rmsd", "mdtraj.rmsd"),
    ("scalign kernel RMSD / mdtraj md.rmsd precentered", "scalign.rmsd", "mdtraj.rmsd_pre"),
    ("scalign kernel RMSD / MDAnalysis qcprot loop", "scalign.rmsd", "mda.qcprot"),
    ("scalign kernel RMSD / MDAnalysis rms.RMSD", "scalign.rmsd", "mda.rms"),
    (
        "scalign kernel superpose+apply / mdtraj superpose",
        "scalign.superpose",
        "mdtraj.superpose",
    ),
    ("scalign kernel superpose+apply / MDAnalysis AlignTraj", "scalign.superpose", "mda.align"),
    ("scalign op zarr->zarr threaded / mdtraj superpose", "op.threaded", "mdtraj.superpose"),
    (
        "scalign op zarr->zarr LocalCluster / mdtraj superpose",
        "op.LocalCluster",
        "mdtraj.superpose",
    ),
    ("scalign op zarr->zarr threaded / MDAnalysis AlignTraj", "op.threaded", "mda.align"),
    (
        "scalign op zarr->zarr threaded / scalign kernel superpose+apply",
        "op.threaded",
        "scalign.superpose",
    ),
]


def print_report(rows: list[Row]) -> None:
    """The table (structures/s) and the ratio lines."""
    table = {"rate": ("structures/s", 12), "count": ("timed", 6, ""), "ratio": ("scalign/this", 12)}
    report.print_table(rows, TITLES, ANCHOR, FOOTER, **table)
    report.print_ratios(rows, RATIOS, "structures/s", 66)


def print_checks(checks: dict) -> bool:
    """Agreement of the RMSDs and aligned coordinates; True when all pass."""
    ok = True
    print("\ncorrectness (same data, same run):")
    r = np.asarray(checks["scalign_fit"].rmsd)
    top = float(r.max())
    print(
        f"  scalign rmsd: min {r.min():.4f}, median {np.median(r):.4f}, max {top:.4f} "
        "(input units, Angstrom)"
    )

    def rmsd_check(label, other, tol=1e-3):
        # relative to the largest RMSD: float32 codes (mdtraj) lose absolute, not
        # relative, accuracy, so near-zero RMSDs have no meaningful relative error
        nonlocal ok
        other = np.asarray(other, dtype=np.float64)
        ref = r[: other.shape[0]]
        diff = np.abs(ref - other)
        big = ref > 0.1 * top
        rel_each = float(np.max(diff[big] / ref[big])) if np.any(big) else 0.0
        good = bool(diff.max() / top < tol)
        ok &= good
        print(
            f"  rmsd vs {label:<28} max |diff| {diff.max():.2e} = {diff.max() / top:.1e} of "
            f"max rmsd (max relative where rmsd > 10% of max: {rel_each:.1e})  "
            f"{report.verdict(good, tol)}"
        )

    for key, label in (
        ("scalign_op_rmsd", "scalign align(aligned=False)"),
        ("mdtraj_rmsd", "mdtraj md.rmsd"),
        ("mdtraj_rmsd_pre", "mdtraj md.rmsd precentered"),
        ("mda_qcprot_rmsd", "MDAnalysis qcprot"),
        ("mda_rms_rmsd", "MDAnalysis rms.RMSD"),
    ):
        if key in checks:
            rmsd_check(label, checks[key])
    if "mda_align" in checks:
        rmsd_check("MDAnalysis AlignTraj", checks["mda_align"][0])

    aligned = checks["scalign_aligned"]
    extent = float(np.abs(aligned).max())

    def coord_check(label, other, tol=1e-5):
        nonlocal ok
        d = float(np.abs(aligned[: other.shape[0]].astype(np.float64) - other).max())
        good = d / extent < tol
        ok &= good
        print(
            f"  aligned coords vs {label:<22} max |diff| {d:.2e} = {d / extent:.1e} of max "
            f"|coordinate|  {report.verdict(good, tol)}"
        )

    if "mdtraj_aligned" in checks:
        coord_check("mdtraj superpose", checks["mdtraj_aligned"])
    if "mda_align" in checks:
        coord_check("MDAnalysis AlignTraj", checks["mda_align"][1])
    for key in [k for k in checks if k.startswith("op_")]:
        op_r, op_x = checks[key]
        dr = float(np.abs(op_r - r).max())
        dx = float(np.abs(op_x - aligned).max())
        good = dr <= 1e-9 * top and dx <= 1e-6 * extent
        ok &= good
        print(
            f"  zarr op ({key[3:]}) output vs kernel: rmsd max |diff| {dr:.1e}, aligned "
            f"max |diff| {dx:.1e}  {report.verdict(good)}"
        )
    return ok


# --------------------------------------------------------------------------------------


def parse_args(argv):
    p = report.make_parser(
        __doc__,
        structures=10_000,
        chunk={"default": 1_000, "help": "structures per zarr chunk (1000)"},
        quick="smoke run: N=500, n=200, chunk=100",
    )
    p.add_argument(
        "--mda-budget",
        type=float,
        default=20.0,
        help="seconds per MDAnalysis run; beyond it a subset of frames is timed (20)",
    )
    report.add_skips(p, "where the zarr stores go", SKIPS)
    args = p.parse_args(argv)
    if args.quick:
        args.structures, args.points, args.chunk = 500, 200, min(args.chunk, 100)
    report.require(p, args, {"structures": 1, "points": 3, "repeat": 1, "chunk": 1})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = report.start()
    X, masses, _ = report.load_and_describe(args, "reference = structure 0")
    Y = X[0]
    N, n = X.shape[:2]
    rows: list[Row] = []
    checks: dict = {}

    print("scalign kernel ...", flush=True)
    bench_scalign_kernel(X, Y, args.repeat, args.chunk, rows, checks)
    if not args.skip_context:
        bench_floors(X, args.repeat, rows)

    if not args.skip_op:
        with tempfile.TemporaryDirectory(prefix="scalign-bench-", dir=args.tmpdir) as tmp:
            op_args = (X, args.repeat, args.chunk, Path(tmp), rows, checks)
            print("scalign op zarr->zarr, threaded scheduler ...", flush=True)
            bench_scalign_op(*op_args, local=False, parts=not args.skip_context)
            if not args.skip_local:
                print("scalign op zarr->zarr, LocalCluster ...", flush=True)
                bench_scalign_op(*op_args, local=True, parts=False)

    if not args.skip_mdtraj:
        print("mdtraj ...", flush=True)
        bench_mdtraj(X, args.repeat, rows, checks)
    if not args.skip_mdanalysis:
        print("MDAnalysis ...", flush=True)
        bench_mdanalysis(X, masses, args.repeat, args.mda_budget, rows, checks)

    report.print_size(N, n, args.repeat)
    print_report(rows)
    ok = print_checks(checks)

    by_key = {r.key: r for r in rows}
    k_rmsd, k_sup = by_key["scalign.rmsd"], by_key["scalign.superpose"]
    print("\ntargets:")
    print(
        f"  RMSD kernel >= 1.5M/s: {fmt_rate(k_rmsd.rate)}/s ({status(k_rmsd.rate, TARGET_RMSD)})"
    )
    line = (
        f"  superposition+write >= 500k/s: kernel {fmt_rate(k_sup.rate)}/s "
        f"({status(k_sup.rate, TARGET_SUPERPOSE)})"
    )
    for key in ("op.threaded", "op.LocalCluster"):
        if key in by_key:
            r = by_key[key]
            line += (
                f"; zarr->zarr {key[3:]} {fmt_rate(r.rate)}/s ({status(r.rate, TARGET_SUPERPOSE)})"
            )
    print(line)
    if (N, n) != (10_000, 1_000):
        print("  (the targets are stated for N = 10,000 x n = 1,000)")
    return report.finish(ok, t_start)


if __name__ == "__main__":
    sys.exit(main())
