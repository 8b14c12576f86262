"""The ``scalign`` command line: zarr in, zarr out, progress bars, a summary at the end."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import mrcfile
import numpy as np
import xarray as xr

from scalign.align import align
from scalign.ensemble import STRUCTURE
from scalign.execution import SCHEDULER_ENV, run, scheduler
from scalign.formats import import_star, read_volume, written_beside
from scalign.icp import icp
from scalign.images import validate_stack, warp_stack
from scalign.io import (
    check_destination,
    load_ensemble,
    load_points,
    open_ensemble,
    open_store,
    save_zarr,
)
from scalign.pairwise import pairwise_rmsd
from scalign.procrustes import ROBUST_LOSSES, rotation_angle
from scalign.reprojection import RANKING_SCORES, compare_reprojections, rank_volumes
from scalign.stack_registration import LOSSES as REGISTRATION_LOSSES
from scalign.stack_registration import TRANSFORMS as REGISTRATION_TRANSFORMS
from scalign.stack_registration import register_stack
from scalign.synthetic import helix_ensemble
from scalign.validation import check_chunks

# Matrices up to this many entries are read back for the summary's statistics.
_SUMMARY_ENTRIES = 25_000_000


def _table(title: str, rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 30)]
    lines += [f"{key:<{width}}  {value}" for key, value in rows]
    return "\n".join(lines)


def _stats(values: np.ndarray, unit: str = "") -> str:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return "all NaN"
    q = np.percentile(v, [50, 95])
    return f"median {q[0]:.4g}{unit}, p95 {q[1]:.4g}{unit}, max {v.max():.4g}{unit}"


def _parse_reference(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _cluster_args(parser: argparse.ArgumentParser, local_default: bool) -> None:
    group = parser.add_argument_group("execution")
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help=f"address of a running Dask scheduler (default: ${SCHEDULER_ENV} if set)",
    )
    if local_default:
        group.add_argument(
            "--threads",
            action="store_true",
            help="use the threaded scheduler instead of a LocalCluster",
        )
    else:
        group.add_argument("--local", action="store_true", help="start a distributed LocalCluster")
    group.add_argument(
        "--gpu",
        action="store_true",
        help="compute on GPUs with CuPy chunks: a dask-cuda LocalCUDACluster, or the "
        "GPU workers of the scheduler given by --scheduler",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers of the cluster started here ("
        + ("the LocalCluster or --gpu" if local_default else "with --local or --gpu")
        + "; an error otherwise)",
    )
    group.add_argument(
        "--rmm-pool",
        metavar="SIZE",
        default=None,
        help="with --gpu: an RMM memory pool of SIZE (e.g. 24GB) per GPU worker",
    )


def _zarr_output_args(parser: argparse.ArgumentParser, func) -> None:
    """The options every zarr-to-zarr command shares, and its handler."""
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.zarr if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _cluster_args(parser, local_default=False)
    parser.set_defaults(func=func)


def _scheduler(args, local_default: bool):
    threads = local_default and args.threads
    # demo's LocalCluster default gives way to --scheduler, --gpu and $SCALIGN_SCHEDULER
    chosen = threads or args.scheduler or args.gpu or os.environ.get(SCHEDULER_ENV)
    local = not chosen if local_default else args.local
    return scheduler(
        args.scheduler,
        local=local,
        gpu=args.gpu,
        threads=threads,
        n_workers=args.workers,
        rmm_pool_size=args.rmm_pool,
    )


def _device(args) -> str:
    return "gpu" if args.gpu else "auto"


def _describe(client) -> str:
    if client is None:
        return "threaded (embedded default)"
    n = len(client.scheduler_info().get("workers", {}))
    return f"distributed, {n} worker(s) at {client.scheduler.address}"


def _align_and_write(ds, out: Path, args, *, reference, progress: bool) -> tuple[xr.Dataset, float]:
    t0 = time.perf_counter()
    result = align(
        ds,
        reference,
        weights=args.weights,
        scale=args.scale,
        reflection=args.reflection,
        aligned=not args.fit_only,
        robust=args.robust,
        device=_device(args),
    )
    save_zarr(
        result,
        out,
        overwrite=args.overwrite,
        compress=args.compress,
        compute=lambda d: run(d, progress=progress),
    )
    return result, time.perf_counter() - t0


def _summary_rows(out: Path, seconds: float, client) -> tuple[xr.Dataset, list]:
    written = xr.open_zarr(out, consolidated=False)
    rmsd = written["rmsd"].values
    n = written.sizes[STRUCTURE]
    chunks = written["rmsd"].chunks[0]
    rows = [
        ("structures", f"{n:,} × {written.sizes['point']} points × {written.sizes['space']}-D"),
        ("chunks", f"{len(chunks)} of ≤ {max(chunks):,} structures"),
        ("scheduler", _describe(client)),
        ("time", f"{seconds:.2f} s ({n / seconds:,.0f} structures/s, read + align + write)"),
        ("rmsd", _stats(rmsd)),
        ("r2", _stats(written["r2"].values)),
        ("failed (NaN)", f"{int(np.count_nonzero(~np.isfinite(rmsd)))} structure(s)"),
    ]
    attrs = written.attrs
    if "gpa_iterations" in attrs:
        gpa = f"{attrs['gpa_iterations']} iteration(s), last shift {attrs['gpa_shift']:.3g}"
        rows.append(("generalized Procrustes", gpa))
    if "robust_weights" in written:
        # a reduction over the store's chunks: the weights are one float64 per point of
        # every structure, as large as the aligned coordinates (too large for memory)
        low = float((written["robust_weights"] < 0.5).mean().compute())
        rows.append(
            (
                f"robust ({attrs['scalign_robust']})",
                f"{low:.1%} of points weighted < 0.5, "
                f"median {np.median(written['robust_iterations'].values):.0f} iteration(s)",
            )
        )
    return written, rows


def cmd_demo(args) -> int:
    where = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="scalign-demo-"))
    where.mkdir(parents=True, exist_ok=True)
    source, target = where / "ensemble.zarr", where / "aligned.zarr"
    print(f"scalign demo: {args.structures:,} synthetic helices of {args.points} points → {where}")
    ds = helix_ensemble(
        args.structures, args.points, noise=args.noise, chunks=args.chunks, seed=args.seed
    )
    print("writing the synthetic ensemble ...")
    save_zarr(ds, source, overwrite=True, compute=lambda d: run(d, progress=True))
    with _scheduler(args, local_default=True) as client:
        print(f"scheduler: {_describe(client)}")
        print("aligning every structure onto the reference helix ...")
        lazy = open_ensemble(source)
        _, seconds = _align_and_write(
            lazy, target, args, reference=lazy["reference"].values, progress=True
        )
        written, rows = _summary_rows(target, seconds, client)
    angle = rotation_angle(written["rotation"].values, ds["true_rotation"].values)
    rows.insert(5, ("rotation error", _stats(angle, "°") + " (vs. the known rotations)"))
    rows += [("input", str(source)), ("output", str(target))]
    print()
    print(_table("scalign demo: summary", rows))
    return 0


def cmd_align(args) -> int:
    out = check_destination(args.output, args.overwrite)
    ds = open_ensemble(args.input, chunks=args.chunks)
    with _scheduler(args, local_default=False) as client:
        _, seconds = _align_and_write(
            ds, out, args, reference=_parse_reference(args.reference), progress=not args.quiet
        )
        _, rows = _summary_rows(out, seconds, client)
    rows += [("input", args.input), ("output", str(out))]
    print(_table("scalign align: summary", rows))
    return 0


def cmd_rmsd(args) -> int:
    out = check_destination(args.output, args.overwrite)
    ds = open_ensemble(args.input)
    other = None if args.other is None else open_ensemble(args.other)
    t0 = time.perf_counter()
    with _scheduler(args, local_default=False) as client:
        D = pairwise_rmsd(ds, other, weights=args.weights, chunks=args.chunks, device=_device(args))
        save_zarr(
            D.to_dataset(),
            out,
            overwrite=args.overwrite,
            compute=lambda d: run(d, progress=not args.quiet),
        )
        seconds = time.perf_counter() - t0
        written = xr.open_zarr(out, consolidated=False)["rmsd"]
        values = written.values if written.size <= _SUMMARY_ENTRIES else None
        rows = [
            ("matrix", f"{written.shape[0]:,} × {written.shape[1]:,} structures"),
            (
                "blocks",
                f"{len(written.chunks[0])} × {len(written.chunks[1])} ("
                + ("lower triangle computed)" if other is None else "all computed)"),
            ),
            ("scheduler", _describe(client)),
            ("time", f"{seconds:.2f} s ({written.size / seconds:,.0f} pairs/s)"),
        ]
    if values is not None:
        off = values[~np.eye(*values.shape, dtype=bool)] if other is None else values.ravel()
        rows.append(("rmsd", _stats(off)))
    rows += [("input", args.input), ("output", str(out))]
    print(_table("scalign rmsd: summary", rows))
    return 0


def cmd_icp(args) -> int:
    out = None if args.out is None else Path(args.out)
    if out is not None and out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    source, target = load_points(args.source, args.key), load_points(args.target, args.key)
    t0 = time.perf_counter()
    aligned, R, t, info = icp(
        source,
        target,
        max_iterations=args.max_iterations,
        tolerance=args.tolerance,
        trim=args.trim,
        scale=args.scale,
    )
    seconds = time.perf_counter() - t0
    rows = [
        ("points", f"{len(source):,} source, {len(target):,} target, {source.shape[1]}-D"),
        ("rotation", f"{float(rotation_angle(np.eye(len(R)), R)):.4g}° from the identity"),
        ("translation", np.array2string(t, precision=4)),
        ("scale", f"{info.scale:.6g}"),
        ("fitness", f"{info.fitness:.4f} (within {info.max_correspondence_distance:.4g})"),
        ("inlier rmse", f"{info.inlier_rmse:.4g}"),
        ("iterations", f"{info.iterations} ({'converged' if info.converged else 'not converged'})"),
        ("time", f"{seconds:.2f} s"),
    ]
    if out is not None:
        # an interrupted write leaves the old file
        with written_beside(out) as partial, open(partial, "wb") as f:
            np.savez(
                f,
                aligned=aligned,
                rotation=R,
                translation=t,
                scale=info.scale,
                transformation=info.transformation,
                correspondences=info.correspondences,
                fitness=info.fitness,
                inlier_rmse=info.inlier_rmse,
            )
        rows.append(("output", str(out)))
    print(_table("scalign icp: summary", rows))
    return 0


def _open_stack(path: str) -> xr.Dataset:
    """A stack store read in its own chunks (a corrupt one then names itself:
    :func:`scalign.io.open_store`), merged along its first dim up to Dask's chunk size."""
    ds = validate_stack(open_store(path, chunks={}), name=str(path))
    return ds.chunk({ds["images"].dims[0]: "auto"})


def cmd_warp(args) -> int:
    out = check_destination(args.output, args.overwrite)
    ds = _open_stack(args.input)
    matrix = args.matrix
    if Path(matrix).suffix == ".npy":
        matrix = np.load(matrix, allow_pickle=False)
    t0 = time.perf_counter()
    with _scheduler(args, local_default=False) as client:
        warped = warp_stack(
            ds, matrix, order=args.order, mode=args.mode, cval=args.cval, device=_device(args)
        )
        result = ds.drop_vars("images").assign(images=warped)
        save_zarr(
            result, out, overwrite=args.overwrite, compute=lambda d: run(d, progress=not args.quiet)
        )
        seconds = time.perf_counter() - t0
        n = ds["images"].shape[0]
        rows = [
            ("images", f"{n:,} × {' × '.join(map(str, ds['images'].shape[1:]))}"),
            ("order, mode", f"{args.order}, {args.mode}"),
            ("scheduler", _describe(client)),
            ("time", f"{seconds:.2f} s ({n / seconds:,.0f} images/s, read + warp + write)"),
            ("input", args.input),
            ("output", str(out)),
        ]
    print(_table("scalign warp: summary", rows))
    return 0


def cmd_register(args) -> int:
    check_chunks(args.chunks)
    out = check_destination(args.output, args.overwrite)
    ds = _open_stack(args.input)
    if args.chunks is not None:
        ds = ds.chunk({ds["images"].dims[0]: args.chunks})
    t0 = time.perf_counter()
    with _scheduler(args, local_default=False) as client:
        result = register_stack(
            ds,
            _parse_reference(args.reference),
            transform=args.transform,
            loss=args.loss,
            device=_device(args),
        )
        save_zarr(
            result, out, overwrite=args.overwrite, compute=lambda d: run(d, progress=not args.quiet)
        )
        seconds = time.perf_counter() - t0
        written = xr.open_zarr(out, consolidated=False)
        M = written["matrix"].values
        n = M.shape[0]
        centre = (np.array(written["registered"].shape[1:][::-1], dtype=float) - 1) / 2
        shift = np.linalg.norm(M[:, :-1, :-1] @ centre + M[:, :-1, -1] - centre, axis=1)
        rows = [
            ("images", f"{n:,} × {' × '.join(map(str, written['registered'].shape[1:]))}"),
            ("reference", f"{args.reference} ({args.transform}, {args.loss})"),
            ("scheduler", _describe(client)),
            ("time", f"{seconds:.2f} s ({n / seconds:,.1f} images/s)"),
            ("drift of the centre", _stats(shift, " px")),
            ("loss", _stats(written["loss"].values)),
            ("converged", _converged(written["converged"].values)),
            ("input", args.input),
            ("output", str(out)),
        ]
    print(_table("scalign register: summary", rows))
    return 0


def _converged(flags: np.ndarray) -> str:
    """``"all N"``, or how many did not and which (the first few)."""
    missed = np.flatnonzero(~flags)
    if missed.size == 0:
        return f"all {flags.size:,}"
    which = ", ".join(map(str, missed[:5])) + (", ..." if missed.size > 5 else "")
    return f"{flags.size - missed.size:,} of {flags.size:,} (not: image {which})"


def cmd_import(args) -> int:
    ds = load_ensemble(args.file, key=args.key, weights=args.weights, chunks=args.chunks)
    save_zarr(
        ds,
        args.output,
        overwrite=args.overwrite,
        compress=args.compress,
        compute=lambda d: run(d, progress=True),
    )
    print(
        _table(
            "scalign import: summary",
            [
                (
                    "structures",
                    f"{ds.sizes[STRUCTURE]:,} × {ds.sizes['point']} points × {ds.sizes['space']}-D",
                ),
                ("variables", ", ".join(ds.data_vars)),
                ("output", args.output),
            ],
        )
    )
    return 0


def _found(ds: xr.Dataset, names: tuple[str, ...]) -> str:
    present = [n for n in names if n in ds]
    return ", ".join(present) if present else "none"


def cmd_import_star(args) -> int:
    out = check_destination(args.output, args.overwrite)
    ds = import_star(args.star, chunks=args.chunks, root=args.root)
    save_zarr(ds, out, overwrite=args.overwrite, compute=lambda d: run(d, progress=True))
    n, ny, nx = ds["images"].shape
    attrs = ds.attrs
    optics = [
        form.format(attrs[key])
        for key, form in (
            ("voltage", "{:g} kV"),
            ("cs", "Cs {:g} mm"),
            ("amplitude_contrast", "amplitude contrast {:g}"),
        )
        if key in attrs
    ]
    chunks = ds["images"].chunks[0]
    rows = [
        ("images", f"{n:,} from {attrs['n_stacks']} stack file(s)"),
        ("box", f"{ny} × {nx} px"),
        (
            "pixel size",
            f"{attrs['pixel_size']:g} Å" if "pixel_size" in attrs else "unknown (not in the file)",
        ),
        ("angles", _found(ds, ("rot", "tilt", "psi"))),
        ("shifts (px)", _found(ds, ("shift_x", "shift_y"))),
        ("ctf", _found(ds, ("defocus_u", "defocus_v", "defocus_angle"))),
        ("optics", ", ".join(optics) if optics else "none"),
        ("chunks", f"{len(chunks)} of ≤ {max(chunks):,} images"),
        ("input", args.star),
        ("output", str(out)),
    ]
    print(_table("scalign import-star: summary", rows))
    return 0


def _read_volumes(paths: list[str]) -> xr.DataArray:
    """MRC volumes (or zarr stores holding ``volume``/``volumes``), stacked along volume,
    with the pixel size their headers or attrs give (they must agree), each named by its
    file name, or by its path as given where two files in different folders share one."""
    if len(set(paths)) < len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"the volume {twice} is given twice")
    arrays, sources, pixels = [], [], {}
    for path in paths:
        if Path(path).suffix == ".zarr":
            ds = open_store(path)
            name = next((v for v in ("volume", "volumes") if v in ds.data_vars), None)
            if name is None:
                raise ValueError(f"{path} has no 'volume' or 'volumes' variable")
            data = ds[name].values
            pixel = ds[name].attrs.get("pixel_size", ds.attrs.get("pixel_size"))
            if data.ndim == 3:
                arrays.append(data)
                sources.append((path, None))
            else:
                # the store's own labels of its volumes, else their positions
                first = ds[name].dims[0]
                labels = ds[first].values if first in ds[name].coords else range(len(data))
                arrays.extend(data)
                sources.extend((path, label) for label in labels)
        else:
            volume = read_volume(path)
            arrays.append(volume.values)
            sources.append((path, None))
            pixel = volume.attrs.get("pixel_size")
        if pixel is not None:
            pixels[path] = float(pixel)
    stems = [Path(path).stem for path, _ in sources]
    # a/map.mrc and b/map.mrc would both be "map" in the ranking
    files = stems if len(set(stems)) == len(set(paths)) else [path for path, _ in sources]
    names = [f if k is None else f"{f}[{k}]" for f, (_, k) in zip(files, sources, strict=True)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"the volumes differ in shape: {sorted(shapes)}")
    if len({round(p, 4) for p in pixels.values()}) > 1:
        raise ValueError(f"the volumes differ in pixel size (Å): {pixels}")
    attrs = {"pixel_size": next(iter(pixels.values()))} if pixels else {}
    return xr.DataArray(
        np.stack(arrays), dims=("volume", "z", "y", "x"), coords={"volume": names}, attrs=attrs
    )


def cmd_compare(args) -> int:
    out = check_destination(args.output, args.overwrite)
    ds = _open_stack(args.images)
    volumes = _read_volumes(args.volumes)
    t0 = time.perf_counter()
    with _scheduler(args, local_default=False) as client:
        result = compare_reprojections(
            ds,
            volumes,
            angles="stack" if args.angles else None,
            symmetry=args.symmetry,
            angular_sampling=args.sampling,
            refine=not args.no_refine,
            ctf=args.ctf,
            downsample_to=args.downsample,
            gray=args.gray,
            covariance=not args.no_covariance,
            device=_device(args),
        )
        save_zarr(
            result, out, overwrite=args.overwrite, compute=lambda d: run(d, progress=not args.quiet)
        )
        seconds = time.perf_counter() - t0
        written = xr.open_zarr(out, consolidated=False)
        table = rank_volumes(written, "cost")
        n = written.sizes["image"]
        rows = [
            ("images × volumes", f"{n:,} × {written.sizes['volume']}"),
            ("angles", f"{written.attrs['angles']} (symmetry {args.symmetry})"),
            ("box, pixel size", f"{written.attrs['box_size']} px, {written.attrs['pixel_size']} Å"),
            ("scheduler", _describe(client)),
            ("time", f"{seconds:.2f} s ({n * written.sizes['volume'] / seconds:,.1f} images/s)"),
            ("best volume (cost)", f"{table.attrs['best']}"),
            ("input", args.images),
            ("output", str(out)),
        ]
    print(_table("scalign compare: summary", rows))
    print(table.to_string(index=False))
    return 0


def cmd_rank(args) -> int:
    result = open_store(args.result)
    table = rank_volumes(result, args.score)
    print(
        f"ranking by {table.attrs['score']} ({table.attrs['better']} is better) over "
        f"{table.attrs['images']:,} images"
        + (
            f" ({table.attrs['excluded']:,} without a finite score left out)"
            if table.attrs["excluded"]
            else ""
        )
        + f"; best volume: {table.attrs['best']}"
    )
    print(table.to_string(index=False))
    return 0


def _npy_header(f) -> str:
    """``dtype shape`` from a .npy header, without reading the array."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return f"{dtype} {shape}"


def _file_rows(path: Path) -> list[tuple[str, str]]:
    """What a .npy, .npz, MRC or STAR file holds, from its headers (no pixels read)."""
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            return [("(array)", _npy_header(f))]
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as z:
            rows = []
            for member in z.namelist():
                with z.open(member) as f:
                    rows.append((member.removesuffix(".npy"), _npy_header(f)))
            return rows
    if path.suffix == ".star":
        ds = import_star(path)
        n, ny, nx = ds["images"].shape
        rows = [("images", f"{n:,} of {ny} × {nx} from {ds.attrs['n_stacks']} stack(s)")]
        rows += [("variables", ", ".join(v for v in ds.data_vars if v != "images"))]
        return rows + [(f"attr {k}", v) for k, v in ds.attrs.items()]
    with mrcfile.open(path, header_only=True, permissive=False) as mrc:
        h = mrc.header
        # MRC2014: space group 0 marks a stack of images, 1 (and others) a volume
        kind = "image" if h.nz == 1 else "image stack" if h.ispg == 0 else "volume"
        return [
            ("kind", kind),
            ("shape (z, y, x)", f"{int(h.nz)} × {int(h.ny)} × {int(h.nx)}"),
            ("mode", f"{int(h.mode)} ({np.dtype(mrcfile.utils.data_dtype_from_header(h))})"),
            ("voxel size", f"{float(mrc.voxel_size.x):g} Å"),
        ]


def cmd_info(args) -> int:
    path = Path(args.path)
    if path.suffix in (".npy", ".npz", ".mrc", ".mrcs", ".map", ".star") and path.is_file():
        try:
            rows = _file_rows(path)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path} is not a readable {path.suffix} file: {exc}") from exc
        print(_table(f"{path}", rows))
        return 0
    if not path.exists():
        raise FileNotFoundError(f"no file or zarr store at {path}")
    ds = open_store(path)
    rows = [("dims", ", ".join(f"{k}={v:,}" for k, v in ds.sizes.items()))]
    for name, var in ds.data_vars.items():
        chunks = "" if var.chunks is None else f" chunks {tuple(max(c) for c in var.chunks)}"
        rows.append((name, f"{var.dtype} {var.dims}{chunks}"))
    rows += [(f"attr {k}", v) for k, v in ds.attrs.items()]
    print(_table(f"{path}", rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="align a synthetic ensemble of 100,000 structures end to end"
    )
    demo.add_argument("--structures", type=int, default=100_000)
    demo.add_argument("--points", type=int, default=64)
    demo.add_argument("--chunks", type=int, default=10_000, help="structures per chunk")
    demo.add_argument("--noise", type=float, default=0.1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="directory for the stores (default: a new temporary directory)")
    _cluster_args(demo, local_default=True)
    # the demo's fixed choices for what `align` takes as options
    demo.set_defaults(
        func=cmd_demo,
        weights=None,
        scale=False,
        reflection=False,
        overwrite=True,
        compress=False,
        fit_only=False,
        robust=None,
    )

    al = sub.add_parser(
        "align", help="align every structure of IN.zarr onto a reference, write OUT.zarr"
    )
    al.add_argument("input", metavar="IN.zarr")
    al.add_argument("output", metavar="OUT.zarr")
    al.add_argument(
        "--reference", default="first", help="first | N (a structure index) | mean (default: first)"
    )
    al.add_argument("--scale", action="store_true", help="fit an isotropic scale (Umeyama)")
    al.add_argument("--reflection", action="store_true", help="allow improper rotations")
    al.add_argument(
        "--weights", metavar="VAR", help="name of a per-point weights variable (e.g. masses)"
    )
    al.add_argument(
        "--chunks", type=int, metavar="K", help="structures per chunk (default: the store's)"
    )
    al.add_argument(
        "--fit-only",
        action="store_true",
        help="write the fit (rotation, translation, scale, rmsd, r2), not aligned coordinates",
    )
    al.add_argument(
        "--compress", action="store_true", help="zstd-compress float variables (default: raw)"
    )
    al.add_argument(
        "--robust",
        choices=ROBUST_LOSSES,
        help="robust IRLS fit with this loss; adds robust_weights (outliers near 0)",
    )
    _zarr_output_args(al, cmd_align)

    rm = sub.add_parser(
        "rmsd", help="pairwise RMSD matrix of IN.zarr (or IN.zarr vs --other), written blockwise"
    )
    rm.add_argument("input", metavar="IN.zarr")
    rm.add_argument("output", metavar="OUT.zarr")
    rm.add_argument("--other", metavar="OTHER.zarr", help="compare against this ensemble")
    rm.add_argument("--weights", metavar="VAR", help="name of a (point,) weights variable")
    rm.add_argument("--chunks", type=int, metavar="K", help="structures per block")
    _zarr_output_args(rm, cmd_rmsd)

    ic = sub.add_parser(
        "icp", help="register an unpaired point cloud SRC onto TGT (global search + ICP)"
    )
    ic.add_argument("source", metavar="SRC", help=".npy, .npz or text file of (n, d) points")
    ic.add_argument("target", metavar="TGT")
    ic.add_argument("--key", help="array name in .npz files")
    ic.add_argument("--trim", type=float, help="fraction of closest pairs kept (trimmed ICP)")
    ic.add_argument("--scale", action="store_true", help="fit an isotropic scale")
    ic.add_argument("--max-iterations", type=int, default=50)
    ic.add_argument("--tolerance", type=float, default=1e-7)
    ic.add_argument("--out", metavar="FILE.npz", help="write the aligned cloud and transform")
    ic.add_argument("--overwrite", action="store_true", help="replace FILE.npz if it exists")
    ic.set_defaults(func=cmd_icp)

    wp = sub.add_parser("warp", help="warp every image of IN.zarr by a motion, write OUT.zarr")
    wp.add_argument("input", metavar="IN.zarr", help="a stack: variable images (image, y, x)")
    wp.add_argument("output", metavar="OUT.zarr")
    wp.add_argument(
        "--matrix",
        required=True,
        metavar="FILE|VAR",
        help="a .npy forward motion (3×3 / 4×4, or one per image) or a variable of IN.zarr",
    )
    wp.add_argument("--order", type=int, default=1, help="spline order (default 1: linear)")
    wp.add_argument("--mode", default="constant", help="scipy.ndimage boundary mode")
    wp.add_argument("--cval", type=float, default=0.0, help="fill value of constant modes")
    _zarr_output_args(wp, cmd_warp)

    rg = sub.add_parser(
        "register", help="register every image of IN.zarr to a reference, write OUT.zarr"
    )
    rg.add_argument("input", metavar="IN.zarr", help="a stack: variable images (image, y, x)")
    rg.add_argument("output", metavar="OUT.zarr")
    rg.add_argument(
        "--reference", default="first", help="first | previous | mean | N (default: first)"
    )
    rg.add_argument("--transform", default="rigid", choices=REGISTRATION_TRANSFORMS)
    rg.add_argument("--loss", default="mse", choices=REGISTRATION_LOSSES)
    rg.add_argument("--chunks", type=int, metavar="K", help="images per chunk")
    _zarr_output_args(rg, cmd_register)

    imp = sub.add_parser("import", help="convert a .npy/.npz ensemble into a zarr store")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("output", metavar="OUT.zarr")
    imp.add_argument("--key", help="coordinates array in an .npz (default: coords/xyz/...)")
    imp.add_argument(
        "--weights", help="weights array in an .npz (default: weights/masses if present)"
    )
    imp.add_argument("--chunks", type=int, metavar="K", help="structures per chunk")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--compress", action="store_true", help="zstd-compress the coordinates")
    imp.set_defaults(func=cmd_import)

    ist = sub.add_parser(
        "import-star", help="convert a RELION particle STAR file and its stacks into zarr"
    )
    ist.add_argument("star", metavar="particles.star")
    ist.add_argument("output", metavar="OUT.zarr")
    ist.add_argument("--chunks", type=int, metavar="K", help="images per chunk")
    ist.add_argument(
        "--root",
        metavar="DIR",
        help="folder the rlnImageName stack paths are relative to (the RELION project "
        "folder; default the STAR file's folder)",
    )
    ist.add_argument("--overwrite", action="store_true", help="replace OUT.zarr if it exists")
    ist.set_defaults(func=cmd_import_star)

    cmp = sub.add_parser(
        "compare",
        help="compare IMAGES.zarr with reprojections of candidate volumes, write OUT.zarr",
    )
    cmp.add_argument("images", metavar="IMAGES.zarr", help="a particle stack (import-star)")
    cmp.add_argument("volumes", metavar="VOLUME", nargs="+", help=".mrc volumes (or .zarr)")
    cmp.add_argument("output", metavar="OUT.zarr")
    cmp.add_argument("--symmetry", default="C1", help="Cn, Dn, T, O or I (default C1)")
    cmp.add_argument("--sampling", type=float, default=5.0, help="search step, degrees")
    cmp.add_argument("--angles", action="store_true", help="use the stack's angles (no search)")
    cmp.add_argument("--no-refine", action="store_true", help="no local refinement")
    cmp.add_argument("--ctf", action="store_true", help="apply each image's CTF")
    cmp.add_argument(
        "--downsample", type=float, default=3.0, metavar="Å", help="target pixel size (3 Å)"
    )
    cmp.add_argument("--gray", action="store_true", help="gray-level fit, L1 cost")
    cmp.add_argument("--no-covariance", action="store_true", help="skip the JBLD score")
    _zarr_output_args(cmp, cmd_compare)

    rk = sub.add_parser("rank", help="rank the volumes of a compare result")
    rk.add_argument("result", metavar="OUT.zarr")
    rk.add_argument("--score", default="cost", choices=RANKING_SCORES)
    rk.set_defaults(func=cmd_rank)

    info = sub.add_parser(
        "info", help="describe a zarr store, a .npy/.npz file, an MRC file or a STAR file"
    )
    info.add_argument("path", metavar="PATH")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scalign`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("scalign")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except (
        ValueError,
        TypeError,
        OSError,  # missing, unreadable or unwritable files; a scheduler that does not answer
        EOFError,  # np.load of an empty file
        zipfile.BadZipFile,  # a corrupt .npz
        RuntimeError,
        KeyError,
    ) as exc:
        print(f"scalign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # outputs are renamed into place only when complete: nothing half-written is left
        print("scalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
