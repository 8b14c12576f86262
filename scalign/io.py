"""Reading and writing ensembles: zarr v3 stores, .npy and .npz files.

Writes are atomic and resumable: a store is written beside its destination and renamed
into place only when complete, so an interrupted or failed run leaves the previous output
(or nothing), never a half-written store at the destination; rerunning an interrupted
job writes only the blocks it had not finished.
"""

from __future__ import annotations

import logging
import os
import re
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
from dask.array.core import getter
from dask.base import tokenize

from scalign._array import to_numpy
from scalign.ensemble import STRUCTURE, default_chunk, make_ensemble, validate_ensemble
from scalign.execution import run
from scalign.validation import check_chunks, check_flag

log = logging.getLogger(__name__)

NPZ_COORD_KEYS = ("coords", "coordinates", "xyz", "positions")
NPZ_WEIGHT_KEYS = ("weights", "masses")


class _ChunkReader:
    """Dask's chunk getter for a store's variables, whose errors name the store, the
    variable and the chunk: a corrupt or truncated chunk file otherwise surfaces, at compute
    time, as a bare codec error (``When changing to a larger dtype...``) naming none."""

    def __init__(self, store: str):
        self.store = store

    def __call__(self, a: Any, b: Any, asarray: bool = True, lock: Any = None) -> Any:
        try:
            return getter(a, b, asarray=asarray, lock=lock)
        except MemoryError:
            raise
        except Exception as exc:  # zarr's codecs and stores raise many kinds
            where = ", ".join(
                f"{s.start}:{s.stop}" if isinstance(s, slice) else repr(s)
                for s in (b if isinstance(b, tuple) else (b,))
            )
            raise ValueError(
                f"{self.store}: cannot read variable {_variable_name(a)!r} at [{where}] "
                f"(a corrupt or truncated chunk?): {exc}"
            ) from exc

    def __dask_tokenize__(self) -> str:
        return self.store


def _zarr_array(value: Any) -> zarr.Array | None:
    """The zarr array under xarray's lazy-indexing adapters (``value`` itself, ``.array``,
    ``._array``, ...), if there is one."""
    for _ in range(8):  # the adapters' depth, with room to spare
        if isinstance(value, zarr.Array) or value is None:
            return value
        value = getattr(value, "array", getattr(value, "_array", None))
    return None


def _variable_name(a: Any) -> str:
    """The name of the zarr array read by a chunk getter (``?`` if none)."""
    array = _zarr_array(a)
    return "?" if array is None else array.path


def open_store(path: str | os.PathLike, **kwargs: Any) -> xr.Dataset:
    """``xarray.open_zarr`` of a zarr v3 store, lazily, with clear errors: a missing store
    is a ``FileNotFoundError`` and an unreadable one (corrupt metadata, not zarr) a
    ``ValueError``, both naming the path. In the store's own chunks (``chunks={}``) a chunk
    that cannot be read is, when computed, a ``ValueError`` naming the store, the variable
    and the chunk (:class:`_ChunkReader`); not in others, where that getter would cost the
    reads of a selection: Dask narrows a selection's read only through its own getters.
    ``kwargs`` go to ``open_zarr``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no zarr store at {path}")
    if kwargs.get("chunks") == {}:
        kwargs["from_array_kwargs"] = {"getitem": _ChunkReader(str(path))}
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
        Structures per dask chunk; default: the store's own chunking, in which a corrupt
        chunk is an error naming the store, the variable and the chunk
        (:func:`open_store`).

    Returns
    -------
    Dataset
        The store's variables as dask arrays, checked by :func:`validate_ensemble`.

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    ValueError
        An unreadable store, or not an ensemble.
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


#: The metadata file at the root of a zarr store (v3, v2 group, v2 array).
_ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray")
#: Inside a partial store: the job's fingerprint and one empty file per written block.
PROGRESS = ".scalign-progress"


def _holds(file: Path, job: str) -> bool:
    """Whether ``file`` (a partial store's fingerprint) reads ``job``."""
    try:
        return file.read_text() == job
    except OSError:
        return False


def _partial_store(path: Path, job: str) -> Path:
    """Where job ``job`` (its fingerprint) writes the store for ``path`` until it is
    complete: ``.NAME.<16 hex digits of the job>.partial`` beside it. One per job, so that
    the tasks of an interrupted job still running cannot write into another job's."""
    return path.with_name(f".{path.name}.{job[:16]}.partial")


def _remove_other_partials(path: Path, keep: Path) -> None:
    """Remove the partial stores of other jobs for ``path`` (and the ``.NAME.partial`` of
    earlier versions): a job started at the same destination supersedes them."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"([0-9a-f]{16}\.)?partial")
    if not path.parent.is_dir():
        return
    for other in path.parent.iterdir():
        if other != keep and pattern.fullmatch(other.name) and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def _write_blocks(store: str, job: str, blocks: list[tuple[Any, str, tuple, str]]) -> None:
    """Write computed blocks ``(block, name, region, marker)`` into their regions of the
    store's arrays, each marked done after it is written (the marker comes last: a block
    cut off mid-write is rewritten on resume). A store whose fingerprint is no longer
    ``job``'s (removed by another job at the same destination) is not written: a
    ``RuntimeError``."""
    fingerprint = Path(store) / PROGRESS / "job"
    group = None
    for block, name, region, marker in blocks:
        if not _holds(fingerprint, job):
            raise RuntimeError(
                f"{store} is gone: another run writing the same destination removed or committed it"
            )
        if group is None:
            group = zarr.open_group(store=store, mode="r+")
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


def _regular_chunks(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with chunks zarr can store: equal along each dim but for a smaller last
    one. Selections and concatenations make others ((500, 1000, 200) from a slice of
    1000-chunks): such a dim is rechunked to its largest chunk."""
    ds = ds.unify_chunks()
    uneven = {
        dim: max(chunks)
        for dim, chunks in ds.chunksizes.items()
        if any(c != chunks[0] for c in chunks[:-1]) or chunks[-1] > chunks[0]
    }
    return ds.chunk(uneven) if uneven else ds


def _input_files(ds: xr.Dataset) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of every file of the local zarr arrays that ``ds``'s
    dask graph reads (xarray keeps each opened array as one object in the graph, wrapped
    in its lazy-indexing adapters)."""
    graph = ds.__dask_graph__()
    if graph is None:
        return []
    folders = set()
    for value in dict(graph).values():
        array = _zarr_array(value)
        root = None if array is None else getattr(array.store, "root", None)  # a LocalStore's
        if root is not None:
            folders.add(Path(root) / array.path)
    files = []
    for folder in sorted(folders):
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                st = p.stat()
                files.append((str(p), st.st_size, st.st_mtime_ns))
    return files


def to_zarr_delayed(ds: xr.Dataset, path: str | os.PathLike, *, compress: bool = False):
    """Start an atomic, resumable write: return ``(delayed, commit)``.

    With ``compress=False`` floating-point variables are stored raw: zstd shrank float32
    coordinates by ~7% but tripled the write time (measured on a 2-core machine); other
    variables keep zarr's default codecs.

    The data go into a hidden sibling store of the job's own (:func:`_partial_store`),
    which records the job's fingerprint (dask's token of the dataset and the options, and
    the size and modification time of every file of the zarr stores it reads: dask's token
    of an opened store changes only with the store folder's own time, which a rewrite of
    its chunks leaves alone) and, for each dask block written, an empty marker file.
    ``delayed`` writes every block without a marker when computed (on whichever scheduler
    the caller runs it, with its own progress display): when a run of the same job was
    killed, the next one finds its partial store and writes only the missing blocks; the
    partial stores of other jobs for ``path`` are removed. The tasks of such a job that
    still run (an interrupted job's, or one running at once) write into their own store,
    never this one's, and fail once it is gone. ``commit()`` then renames the store into
    ``path``, replacing any previous one, so a store at ``path`` is always complete. If
    the computation fails with an error, call ``commit(success=False)`` to remove the
    partial store (only if it is still this job's).
    """
    if isinstance(ds, xr.DataArray):
        raise TypeError(
            "ds must be an xarray Dataset, got a DataArray: write da.to_dataset(name=...)"
        )
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray Dataset, got {type(ds).__name__}")
    path = Path(path)
    ds = _regular_chunks(ds.copy())
    ds.attrs = _json_attrs(ds.attrs)
    for var in ds.variables.values():
        var.encoding = {}
    encoding = {
        name: {"compressors": None}
        for name, var in ds.data_vars.items()
        if not compress and np.issubdtype(var.dtype, np.floating)
    }
    job = tokenize(ds, compress, _input_files(ds))
    tmp = _partial_store(path, job)
    progress = tmp / PROGRESS
    fingerprint = progress / "job"
    _remove_other_partials(path, tmp)
    if _holds(fingerprint, job):
        done = {p.name for p in progress.iterdir() if p.name != "job"}
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # metadata, and the variables already in memory; the dask blocks follow
            ds.to_zarr(
                tmp, mode="w-", zarr_format=3, consolidated=False, compute=False, encoding=encoding
            )
        except BaseException:
            # e.g. attrs or dtypes zarr cannot store: nothing to resume
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
    writes = [write(str(tmp), job, items) for items in groups.values()]
    pending = sum(map(len, groups.values()))
    if done:
        log.info(
            "resuming the interrupted write of %s: %d block(s) already written, %d to go",
            path,
            len(done),
            pending,
        )
    delayed = dask.delayed(len, pure=False)(writes)

    def commit(success: bool = True) -> None:
        if not _holds(fingerprint, job):
            if success:
                raise RuntimeError(
                    f"{tmp} is gone: another run writing {path} removed or committed it"
                )
            return
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


def check_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """Where a store for ``path`` is written: ``path``, or what a symbolic link there
    points to. Raise ``FileExistsError`` if something is there and ``overwrite`` is
    false, or if it is not a zarr store (a file, or a non-empty folder without
    ``zarr.json``, ``.zgroup`` or ``.zarray``: a mistyped argument must not destroy an
    input). ``overwrite`` must be a boolean: ``"no"`` would replace the store."""
    check_flag("overwrite", overwrite)
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if not path.exists():
        return path
    if not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    is_store = path.is_dir() and (
        not any(path.iterdir()) or any((path / m).is_file() for m in _ZARR_METADATA)
    )
    if not is_store:
        raise FileExistsError(f"{path} exists and is not a zarr store: refusing to replace it")
    return path


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
    ds : Dataset
        What to write (lazy variables are computed block by block).
    path : the store; a symbolic link there is followed (the store it points to is
        written, the link kept).
    overwrite : bool
        Replace an existing store (only once the new one is complete). Anything at
        ``path`` that is not a zarr store (a file, a folder of other things) is never
        replaced: :func:`check_destination`.
    compress : bool
        zstd-compress floating-point variables too (default: raw, see
        :func:`to_zarr_delayed`).
    compute : callable, optional
        How to run the write (e.g. with a progress bar); default
        :func:`scalign.execution.run` (which, on the threaded scheduler, returns from an
        interrupt only once the tasks it started have ended).

    Returns
    -------
    pathlib.Path
        Where the store was written (a symbolic link's target, resolved).

    Raises
    ------
    FileExistsError
        Something is at ``path`` and ``overwrite`` is false, or it is not a zarr store.
    """
    path = check_destination(path, overwrite)
    delayed, commit = to_zarr_delayed(ds, path, compress=compress)
    try:
        (compute or run)(delayed)
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


#: Bytes of a .npy file read at a time when it is checked for NaN/inf.
_SLAB_BYTES = 32 * 2**20


class _NpyRows:
    """The array of a C-ordered ``.npy`` file, read a slab of rows at a time by
    ``__getitem__`` (what ``dask.array.from_array`` needs): plain reads, so only the rows
    asked for are ever in memory (a memory map would keep every page it touched)."""

    def __init__(self, path: Path, mapped: np.memmap) -> None:
        self.path, self.offset = str(path), int(mapped.offset)
        self.shape, self.dtype, self.ndim = mapped.shape, mapped.dtype, mapped.ndim
        self.row = int(np.prod(self.shape[1:]))

    def __getitem__(self, key: tuple) -> np.ndarray:
        rows = key[0] if isinstance(key, tuple) else key
        start, stop, _ = rows.indices(self.shape[0])
        block = np.fromfile(
            self.path,
            dtype=self.dtype,
            count=max(0, stop - start) * self.row,
            offset=self.offset + start * self.row * self.dtype.itemsize,
        ).reshape((max(0, stop - start), *self.shape[1:]))
        rest = key[1:] if isinstance(key, tuple) else ()
        return block[(slice(None), *rest)]


def _npy_coords(path: Path, chunks: int | None) -> Any:
    """The coordinates of a ``.npy`` file: for a C-ordered ``(structure, point, space)``
    array of numbers, a lazy float dask array read chunk by chunk, after one pass that
    counts non-finite values a slab at a time (bounded memory); otherwise the array."""
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    if mapped.ndim != 3 or mapped.dtype.kind not in "fiu" or not mapped.flags.c_contiguous:
        return np.asarray(mapped)
    rows = _NpyRows(path, mapped)
    n, points, dims = mapped.shape
    step = max(1, _SLAB_BYTES // max(1, rows.row * mapped.itemsize))
    bad = sum(int(np.count_nonzero(~np.isfinite(rows[i : i + step]))) for i in range(0, n, step))
    if bad:
        raise ValueError(f"coords has {bad} non-finite (NaN or inf) coordinate(s)")
    floats = mapped.dtype if mapped.dtype.kind == "f" else np.dtype(np.float64)
    chunk = chunks or default_chunk(points, dims, floats.itemsize)
    data = da.from_array(rows, chunks=(chunk, points, dims), name=False, asarray=True)
    return data.astype(floats, copy=False)


def load_ensemble(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    weights: str | None = None,
    chunks: int | None = None,
) -> xr.Dataset:
    """Read an ensemble from ``.npy`` (the coordinates) or ``.npz`` (named arrays).

    A ``.npy`` file is read chunk by chunk when computed (one pass checks it for NaN/inf
    first, a slab at a time), so it may be larger than memory.

    In an ``.npz``, coordinates are taken from ``key`` or the first of
    ``coords, coordinates, xyz, positions``; weights from ``weights`` or the first of
    ``weights, masses``; other arrays of length ``n_points`` become ``point`` variables.

    Parameters
    ----------
    path : str or path-like
        A ``.npy`` file of ``(structure, point, space)`` coordinates, or an ``.npz``.
    key : str, optional
        The ``.npz`` array holding the coordinates.
    weights : str, optional
        The ``.npz`` array holding per-point weights.
    chunks : int, optional
        Structures per dask chunk; default about 32 MiB (:func:`make_ensemble`).

    Returns
    -------
    Dataset
        An ensemble (:func:`make_ensemble`), attrs ``source`` (the file's name) and, for
        ``.npz``, ``weights_from`` (the weights' array name, or ``"none"``).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Another suffix, ``key`` or ``weights`` for a ``.npy`` file, a missing (named or
        default) array, NaN/inf coordinates, or the errors of :func:`make_ensemble`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}")
    if path.suffix == ".npy":
        if key is not None or weights is not None:
            given = "key" if weights is None else "weights" if key is None else "key and weights"
            raise ValueError(
                f"{given} name arrays of an .npz, but {path} is a .npy file: it holds the "
                "coordinates only"
            )
        coords = _npy_coords(path, chunks)
        return make_ensemble(coords, chunks=chunks, attrs={"source": path.name})
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
