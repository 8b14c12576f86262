"""The same zarr → zarr align job on the threaded scheduler and on LocalClusters of 1 and
2 worker processes (one thread each, started by ``scalign.scheduler(local=True)``), in one
run: structures/s, the parallel efficiency of 2 workers over 1, and the ratio of the
2-worker cluster to the threaded scheduler (target: >= 0.8); then the 2-worker cluster
once more as ``distributed.LocalCluster`` starts it, for comparison.

Why the two clusters differ: distributed starts its workers with
``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap threshold at 128 KiB, so
every NumPy temporary of a chunk is a fresh mmap whose pages fault in again (the align
kernel took 264 ms per 43,690-structure chunk on such a worker, 120 ms with
``scalign.execution.WORKER_MALLOC``). With distributed's settings the cluster reached
0.60-0.77x the threaded scheduler here; with scalign's, 1.0x and more.

Run:  python benchmarks/bench_scaling.py [--structures 400000] [--points 64] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr
from _report import Row, best_time, finish, print_table, start
from distributed import Client, LocalCluster

import scalign
from scalign.execution import scheduler

TARGET = 0.8  # 2-worker LocalCluster / threaded scheduler


def job(source: Path, target: Path):
    """open → align to structure 0 → write, atomically, to a fresh store."""

    def run():
        ds = scalign.open_ensemble(source)
        scalign.save_zarr(scalign.align(ds, reference=0), target, overwrite=True)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=400_000)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument(
        "--chunk", type=int, help="structures per chunk (default: scalign's ~32 MiB chunks)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50,000 structures")
    args = parser.parse_args(argv)
    if args.quick:
        args.structures, args.repeat = 50_000, 1
    t_start = start({"distributed": "distributed"})
    n = args.structures
    chunk = args.chunk or scalign.ensemble.default_chunk(args.points, 3)
    ens = scalign.helix_ensemble(n, args.points, noise=0.1, chunks=chunk)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.zarr", Path(tmp) / "out.zarr"
        scalign.save_zarr(ens, source)
        size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) / 2**20
        print(
            f"\n{n:,} structures × {args.points} points ({size:.0f} MiB zarr, chunks of "
            f"{chunk:,}); best of {args.repeat}"
        )
        with scalign.scheduler():
            rows.append(
                Row(
                    "threads",
                    "threaded scheduler, 2 threads",
                    "job",
                    best_time(job(source, target), args.repeat),
                    n,
                )
            )
        reference = xr.open_zarr(target, consolidated=False)["rmsd"].values
        ok = True
        for key, workers, label in [
            ("cluster1", 1, "scalign.scheduler(local=True), 1 worker"),
            ("cluster2", 2, "scalign.scheduler(local=True), 2 workers"),
            ("plain2", 2, "distributed.LocalCluster, 2 workers"),
        ]:
            with _cluster(key, workers):
                rows.append(Row(key, label, "job", best_time(job(source, target), args.repeat), n))
            same = np.array_equal(
                xr.open_zarr(target, consolidated=False)["rmsd"].values, reference
            )
            ok &= same
            print(f"  {label}: result identical to the threaded run: {same}")
    print_table(
        rows,
        {"job": "open_ensemble → align(reference=0) → save_zarr (structures/s)"},
        {"job": "threads"},
        "op/this = rate of the threaded scheduler / rate of this row.",
        rate=("structures/s", 13),
        count=("structures", 11, ","),
        ratio=("op/this", 8),
    )
    by = {r.key: r.rate for r in rows}
    efficiency = by["cluster2"] / (2 * by["cluster1"])
    ratio = by["cluster2"] / by["threads"]
    print(f"\nparallel efficiency, 2 workers over 1: {efficiency:.2f}")
    print(
        f"target: LocalCluster with 2 workers >= {TARGET} x the threaded scheduler: "
        f"{ratio:.2f} ({'met' if ratio >= TARGET else 'not met'}); with distributed's "
        f"own malloc settings: {by['plain2'] / by['threads']:.2f}"
    )
    return finish(ok, t_start)


@contextlib.contextmanager
def _cluster(key: str, workers: int):
    """scalign's local cluster, or (``plain``) distributed's as it comes."""
    if not key.startswith("plain"):
        with scheduler(local=True, n_workers=workers, threads_per_worker=1) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


if __name__ == "__main__":
    sys.exit(main())
