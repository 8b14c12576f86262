"""Reading and writing ensembles: zarr v3 stores, .npy and .npz files.

Writes are atomic and resumable: a store is written beside its destination and renamed
into place only when complete, so an interrupted or failed run leaves the previous output
(or nothing), never a half-written store at the destination; rerunning an interrupted
job writes only the blocks it had not finished.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from scalign._array import to_numpy
from scalign.ensemble import STRUCTURE, make_ensemble, validate_ensemble
from scalign.validation import check_chunks

log = logging.getLogger(__name__)

NPZ_COORD_KEYS = ("coords", "coordinates", "xyz", "positions")
NPZ_WEIGHT_KEYS = ("weights", "masses")


def open_store(path: str | os.PathLike, **kwargs: Any) -> xr.Dataset:
    """``xarray.open_zarr`` of a zarr v3 store, lazily, with clear errors: a missing store
    is a ``FileNotFoundError`` and an unreadable one (corrupt metadata, not zarr) a
    ``ValueError``, both naming the path. ``kwargs`` go to ``open_zarr``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no zarr store at {path}")
    try:
        return xr.open_zarr(path, consolidated=False, **kwargs)
    except Exception as exc:  # zarr and json raise many kinds; all mean "cannot read it"
        raise ValueError(f"{path} is not a readable zarr store: {exc}") from exc


def open_ensemble(path: str | os.PathLike, *, chunks: int | None = None) -> xr.Dataset:
    """Open a zarr store lazily as an ensemble, chunked along ``structure``.

    Parameters
    ----------
    path : zarr store (directory)
    chunks : int, optional
        Structures per dask chunk; default: the store's own chunking.
    """
    check_chunks(chunks)
    ds = open_store(path, chunks={} if chunks is None else None)
    if chunks is not None:
        ds = ds.chunk({STRUCTURE: chunks})
    return validate_ensemble(ds, name=str(path))


def _json_attrs(attrs: dict) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


#: Inside a partial store: the job's fingerprint and one empty file per written block.
PROGRESS = ".scalign-progress"


def _write_blocks(store: str, blocks: list[tuple[Any, str, tuple, str]]) -> None:
    """Write computed blocks ``(block, name, region, marker)`` into their regions of the
    store's arrays, each marked done after it is written (the marker comes last: a block
    cut off mid-write is rewritten on resume)."""
    group = zarr.open_group(store=store, mode="r+")
    for block, name, region, marker in blocks:
        array = group[name]
        array[region] = np.asarray(to_numpy(block), dtype=array.dtype)
        Path(marker).touch()


def _write_group(var: xr.Variable, loc: tuple[int, ...]) -> tuple:
    """Blocks written by one task: those of every variable at the same chunk of the same
    leading dim (an op's outputs for one chunk of items), when the variable is whole
    along its other dims; other blocks on their own. One task per chunk instead of one
    per variable and chunk: a distributed task costs milliseconds, as does opening the
    store."""
    if var.ndim and all(len(c) == 1 for c in var.chunks[1:]):
        return (var.dims[0], var.chunks[0], loc[0])
    return (id(var), loc)


def to_zarr_delayed(ds: xr.Dataset, path: str | os.PathLike, *, compress: bool = False):
    """Start an atomic, resumable write: return ``(delayed, commit)``.

    With ``compress=False`` floating-point variables are stored raw: zstd shrank float32
    coordinates by ~7% but tripled the write time (measured on a 2-core machine); other
    variables keep zarr's default codecs.

    The data go into a hidden sibling store, ``.NAME.partial``, which records the job's
    fingerprint (dask's token of the dataset and the options) and, for each dask block
    written, an empty marker file. ``delayed`` writes every block without a marker when
    computed (on whichever scheduler the caller runs it, with its own progress display):
    when a run of the same job was killed, the next one finds its partial store and
    writes only the missing blocks; a partial store of another job is discarded.
    ``commit()`` then renames the store into ``path``, replacing any previous one, so a
    store at ``path`` is always complete. If the computation fails with an error, call
    ``commit(success=False)`` to remove the partial store.
    """
    if isinstance(ds, xr.DataArray):
        raise TypeError(
            "ds must be an xarray Dataset, got a DataArray: write da.to_dataset(name=...)"
        )
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray Dataset, got {type(ds).__name__}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    ds = ds.copy()
    ds.attrs = _json_attrs(ds.attrs)
    for var in ds.variables.values():
        var.encoding = {}
    encoding = {
        name: {"compressors": None}
        for name, var in ds.data_vars.items()
        if not compress and np.issubdtype(var.dtype, np.floating)
    }
    progress = tmp / PROGRESS
    job = tokenize(ds, compress)
    fingerprint = progress / "job"
    if fingerprint.is_file() and fingerprint.read_text() == job:
        done = {p.name for p in progress.iterdir()}
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        # metadata, and the variables already in memory; the dask blocks follow
        ds.to_zarr(
            tmp, mode="w-", zarr_format=3, consolidated=False, compute=False, encoding=encoding
        )
        progress.mkdir()
        fingerprint.write_text(job)
        done = set()
    groups: dict[tuple, list] = {}
    for name, var in ds.variables.items():
        if not isinstance(var.data, da.Array):
            continue
        # unoptimised: every variable keeps the shared keys of the tasks that make its
        # blocks (an op computes all its outputs in one task per chunk)
        blocks = var.data.to_delayed(optimize_graph=False)
        starts = [np.cumsum((0, *c[:-1])) for c in var.data.chunks]
        for loc in np.ndindex(blocks.shape):
            marker = ".".join([str(name), *map(str, loc)])
            if marker in done:
                continue
            region = tuple(
                slice(int(st[i]), int(st[i]) + c[i])
                for st, c, i in zip(starts, var.data.chunks, loc, strict=True)
            )
            groups.setdefault(_write_group(var, loc), []).append(
                (blocks[loc], str(name), region, str(progress / marker))
            )
    write = dask.delayed(_write_blocks, pure=False)
    writes = [write(str(tmp), items) for items in groups.values()]
    pending = sum(map(len, groups.values()))
    if done:
        log.info(
            "resuming the interrupted write of %s: %d block(s) already written, %d to go",
            path,
            len(done) - 1,
            pending,
        )
    delayed = dask.delayed(len, pure=False)(writes)

    def commit(success: bool = True) -> None:
        if not success:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(progress)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is None:
            return
        # what was replaced may be a store (a directory) or a plain file or link
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()

    return delayed, commit


def save_zarr(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    compress: bool = False,
    compute: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``ds`` to a zarr v3 store at ``path`` atomically and resumably: the store
    appears at ``path`` only when complete, and a run of the same job that was
    interrupted is resumed, writing only its missing blocks (:func:`to_zarr_delayed`).

    Parameters
    ----------
    overwrite : bool
        Replace an existing store (only once the new one is complete).
    compress : bool
        zstd-compress floating-point variables too (default: raw, see
        :func:`to_zarr_delayed`).
    compute : callable, optional
        How to run the write (e.g. with a progress bar); default ``delayed.compute()``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    delayed, commit = to_zarr_delayed(ds, path, compress=compress)
    try:
        (compute or (lambda d: d.compute()))(delayed)
    except Exception:
        # an error would recur on a rerun: nothing to resume. An interrupt (Ctrl-C, a
        # killed process) keeps the partial store for the next run of the same job.
        commit(success=False)
        raise
    commit()
    return path


def _pick(
    data: Any, key: str | None, candidates: tuple[str, ...], required: bool, path
) -> str | None:
    if key is not None:
        if key not in data:
            raise ValueError(f"{path} has no array {key!r} (arrays: {list(data)})")
        return key
    found = [k for k in candidates if k in data]
    if required and not found:
        raise ValueError(
            f"{path} has none of {candidates} (arrays: {list(data)}): name it with key="
        )
    return found[0] if found else None


def load_ensemble(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    weights: str | None = None,
    chunks: int | None = None,
) -> xr.Dataset:
    """Read an ensemble from ``.npy`` (the coordinates) or ``.npz`` (named arrays).

    In an ``.npz``, coordinates are taken from ``key`` or the first of
    ``coords, coordinates, xyz, positions``; weights from ``weights`` or the first of
    ``weights, masses``; other arrays of length ``n_points`` become ``point`` variables.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}")
    if path.suffix == ".npy":
        return make_ensemble(
            np.load(path, allow_pickle=False), chunks=chunks, attrs={"source": path.name}
        )
    if path.suffix != ".npz":
        raise ValueError(f"cannot import {path}: expected a .npy or .npz file")
    with np.load(path, allow_pickle=False) as data:
        ckey = _pick(data, key, NPZ_COORD_KEYS, True, path)
        wkey = _pick(data, weights, NPZ_WEIGHT_KEYS, False, path)
        coords = data[ckey]
        ds = make_ensemble(
            coords,
            None if wkey is None else data[wkey],
            chunks=chunks,
            attrs={"source": path.name, "weights_from": wkey or "none"},
        )
        n = coords.shape[1] if coords.ndim == 3 else None
        for name in data.files:
            arr = data[name]
            if (
                name not in (ckey, wkey)
                and arr.ndim == 1
                and arr.shape[0] == n
                and arr.dtype.kind in "biuf"
            ):
                ds[name] = ("point", arr)
    return ds


def load_points(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """One point cloud ``(n, d)`` from ``.npy``, ``.npz`` (array ``key``, or the only 2-D
    one), or a text file of one point per row (``.csv``: commas; otherwise whitespace)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no point file at {path}")
    if path.suffix == ".npy":
        points = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if key is None:
                planar = [k for k in data.files if data[k].ndim == 2]
                if len(planar) != 1:
                    raise ValueError(
                        f"{path} holds {len(planar)} 2-D arrays ({planar}): name one with --key"
                    )
                key = planar[0]
            if key not in data.files:
                raise ValueError(f"{path} has no array {key!r} (arrays: {data.files})")
            points = data[key]
    else:
        points = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
    if points.ndim != 2:
        raise ValueError(f"{path}: a point cloud must have shape (n_points, d), got {points.shape}")
    return points
