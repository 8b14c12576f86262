"""Real cryo-EM file formats: MRC volumes and stacks, RELION STAR particle files.

Conventions (those of RELION, Xmipp and SPIDER):

* A particle stack is a stack Dataset (:func:`scalign.images.make_stack`): ``images``
  float32 over ``(image, y, x)``, chunked along ``image``; optional per-image variables
  ``rot, tilt, psi`` (ZYZ Euler angles, degrees), ``shift_x, shift_y`` (pixels),
  ``defocus_u, defocus_v`` (Å), ``defocus_angle`` (degrees) and, where given,
  ``phase_shift`` (degrees), ``bfactor`` (Å²) and ``ctf_scale``; attrs ``pixel_size``
  (Å/px), ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast`` (fraction).
* Shifts: an image is its projection moved by ``(+shift_x, +shift_y)`` pixels: where
  the particle's centre lies relative to the box centre, pixel ``(N//2, N//2)``.
  RELION's origin offsets are the opposite, the shift that brings the image back onto
  the projection (``relion_project`` moves each projection by ``-rlnOriginX``), so
  ``shift_x = -rlnOriginXAngst / pixel_size`` (RELION ≥ 3.1) or ``-rlnOriginX`` (older
  files, in pixels).
* A volume is a DataArray over ``(z, y, x)`` with attr ``pixel_size``.
* ``rlnImageName`` entries are ``INDEX@STACK``: a 1-based index into an MRC stack whose
  path is relative to the STAR file's folder (or ``root``).

Reads are lazy: headers are parsed up front (so a missing, corrupt or truncated file is
reported at once, naming it), pixels only when a chunk is computed; each chunk is one
dask task that reads only its own images from the stacks it needs. Writes are
atomic: files are written beside their destination and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import mrcfile
import numpy as np
import pandas as pd
import starfile
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from mrcfile.mrcfile import MrcFile

from scalign._array import to_numpy
from scalign.images import IMAGE, STACK_DIMS, X, Y, Z, default_chunk, make_stack
from scalign.validation import check_chunks, check_flag

ANGLES = {"rot": "rlnAngleRot", "tilt": "rlnAngleTilt", "psi": "rlnAnglePsi"}
CTF = {
    "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV",
    "defocus_angle": "rlnDefocusAngle",
    "phase_shift": "rlnPhaseShift",
    "bfactor": "rlnCtfBfactor",
    "ctf_scale": "rlnCtfScalefactor",
}
SHIFTS_ANGST = {"shift_x": "rlnOriginXAngst", "shift_y": "rlnOriginYAngst"}
SHIFTS_PIXELS = {"shift_x": "rlnOriginX", "shift_y": "rlnOriginY"}
# dataset attr -> STAR column, in the optics block (RELION >= 3.1) or per particle (older)
OPTICS = {
    "pixel_size": "rlnImagePixelSize",
    "voltage": "rlnVoltage",
    "cs": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
}
# 9 significant digits: float32 values round-trip exactly, float64 to ~5e-9 relative,
# and ordinary values stay short (300, 2.7, 0.1) where RELION's %.6f pads and truncates.
STAR_FLOAT_FORMAT = "%.9g"


# --------------------------------------------------------------------------------------
# MRC: headers and lazy reading
# --------------------------------------------------------------------------------------


def _header_float(value: Any) -> float:
    """A header value as the decimal it was written from: MRC headers hold float32
    (1.3 Å reads back as 1.2999999523), and the shortest float32 repr undoes that."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class _MrcSource:
    """Where the images of one MRC file lie: enough to read any of them in a task.

    Plain data (no open file) so it pickles to distributed workers.
    """

    path: str
    offset: int
    dtype: str
    shape: tuple[int, int, int]  # (images, y, x); a single 2-D image is (1, y, x)
    stamp: tuple[int, int]  # (size, mtime_ns): a rewritten file gets new dask keys

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` (sorted, distinct, 0-based) in the file's own dtype.

        One positioned read per run of consecutive images: a whole slab is a single
        sequential read, and scattered particles cost a syscall each rather than a
        memory map per stack (1.8 s against 3.2 s for ``np.memmap`` on a shuffled STAR
        file of 100,000 particles from 500 stacks, measured on a 2-core machine).
        """
        out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        raw = out.reshape(len(indices), -1).view(np.uint8)
        size = raw.shape[1]
        cuts = (np.flatnonzero(np.diff(indices) != 1) + 1).tolist()
        try:
            with open(self.path, "rb", buffering=0) as f:
                for a, b in zip([0, *cuts], [*cuts, len(indices)], strict=True):
                    f.seek(self.offset + int(indices[a]) * size)
                    if f.readinto(memoryview(raw[a:b]).cast("B")) != (b - a) * size:
                        raise ValueError("it is shorter than its header says")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.path} disappeared after it was opened") from exc
        except (OSError, ValueError) as exc:  # e.g. truncated since it was opened
            raise ValueError(f"{self.path} changed after it was opened: {exc}") from exc
        return out


@dataclass(frozen=True)
class _MrcHeader:
    source: _MrcSource
    ndim: int  # of the data as mrcfile sees it: 2 (image), 3 (stack or volume), 4
    voxel_size: float  # Å; 0 when the header leaves it unset


def _probe_mrc(path: Path) -> _MrcHeader:
    """Parse an MRC header and check that the file holds the data it announces.

    Reads 1 KiB (plus any extended header), never the pixels.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no MRC file at {path}")
    try:
        with mrcfile.open(path, header_only=True, permissive=False) as mrc:
            # gzip/bzip2 files open as subclasses: their pixels are not at fixed offsets
            if type(mrc) is not MrcFile:
                raise ValueError("compressed MRC files cannot be read lazily; decompress it")
            header = mrc.header
            shape = tuple(int(s) for s in mrcfile.utils.data_shape_from_header(header))
            dtype = np.dtype(mrcfile.utils.data_dtype_from_header(header))
            offset = int(header.nbytes) + int(header.nsymbt)
            voxel_size = _header_float(mrc.voxel_size.x)
            mode = int(header.mode)
    except ValueError as exc:  # mrcfile's word for a bad map ID, short header, bad mode
        raise ValueError(f"{path} is not a readable MRC file: {exc}") from exc
    if mode == 101 or dtype.kind not in "iuf":
        raise ValueError(f"{path} has MRC mode {mode} ({dtype}): only real pixels are supported")
    stat = path.stat()
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if stat.st_size < expected:
        raise ValueError(
            f"{path} is truncated: its header announces {' × '.join(map(str, shape))} "
            f"{dtype.name} pixels ({expected:,} bytes with the header) but the file has "
            f"{stat.st_size:,} bytes"
        )
    # a single image reads as a stack of one; 4-D shapes stay, for callers to reject
    stack_shape = (1, *shape) if len(shape) == 2 else shape
    source = _MrcSource(str(path), offset, dtype.str, stack_shape, (stat.st_size, stat.st_mtime_ns))
    return _MrcHeader(source, len(shape), voxel_size)


@dataclass(frozen=True)
class _Chunk:
    """One chunk's worth of images: row ``r`` is image ``index[r]`` of ``sources[which[r]]``.

    Only the sources this chunk uses travel with its task.
    """

    sources: tuple[_MrcSource, ...]
    which: np.ndarray  # int64, into sources
    index: np.ndarray  # int64, 0-based image numbers
    box: tuple[int, int]


def _read_chunk(chunk: _Chunk) -> np.ndarray:
    """Read one chunk's images as float32 (the task body of every lazy read)."""
    # one sort of (stack, image) keys: each stack's images in file order, each image
    # read once even if the STAR file lists it twice, and no per-stack scans of the rows
    key = (chunk.which << 32) | chunk.index
    unique, back = np.unique(key, return_inverse=True)
    stack, image = unique >> 32, unique & 0xFFFFFFFF
    cuts = (np.flatnonzero(np.diff(stack)) + 1).tolist()
    images = np.empty((len(unique), *chunk.box), dtype=np.float32)
    for a, b in zip([0, *cuts], [*cuts, len(unique)], strict=True):
        # assigning converts the file's dtype (and byte order) to float32
        images[a:b] = chunk.sources[stack[a]].read(image[a:b])
    return images[back.ravel()]


def _lazy_images(
    sources: list[_MrcSource], which: np.ndarray, index: np.ndarray, chunks: int
) -> da.Array:
    """A float32 dask array ``(len(which), y, x)``, one task per chunk of rows.

    Built as a single graph layer of plain tasks: no per-image tasks, no shared key
    holding the whole row table.
    """
    box = sources[0].shape[1:]
    n = len(which)
    stamps = [(s.path, s.offset, s.dtype, s.shape, s.stamp) for s in sources]
    name = "read-mrc-" + tokenize(stamps, which, index, chunks, box)
    dsk = {}
    for k, start in enumerate(range(0, n, chunks)):
        used, local = np.unique(which[start : start + chunks], return_inverse=True)
        chunk = _Chunk(
            tuple(sources[u] for u in used),
            local.astype(np.int64).ravel(),
            np.asarray(index[start : start + chunks], dtype=np.int64).copy(),
            box,
        )
        dsk[(name, k, 0, 0)] = (_read_chunk, chunk)
    sizes = tuple(min(chunks, n - start) for start in range(0, n, chunks))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks=(sizes, (box[0],), (box[1],)), dtype=np.float32)


def open_mrc_stack(path: str | os.PathLike, chunks: int | None = None) -> xr.Dataset:
    """Open an MRC image stack (``.mrcs``) lazily as a stack Dataset.

    Parameters
    ----------
    path : str or path-like
        An MRC file of images: a stack (any space group: RELION reads the sections of
        any 3-D file as images) or a single 2-D image (a stack of one).
    chunks : int, optional
        Images per dask chunk; default about 32 MiB (:func:`scalign.images.default_chunk`).

    Returns
    -------
    xarray.Dataset
        ``images`` float32 over ``(image, y, x)``, dask-backed: only the header is read
        now; each chunk reads its own slab (one sequential read) when computed
        (other MRC modes are converted chunk by chunk). Attrs: ``pixel_size`` (Å, when
        the header sets it) and ``source`` (the file name).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not an MRC file, truncated, complex or 4-bit pixels, or a stack of volumes.
    """
    check_chunks(chunks)
    path = Path(path)
    header = _probe_mrc(path)
    if header.ndim == 4:
        raise ValueError(f"{path} is a stack of volumes, not of images")
    source = header.source
    n = source.shape[0]
    if chunks is None:
        chunks = default_chunk(source.shape[1:])
    images = _lazy_images([source], np.zeros(n, dtype=np.intp), np.arange(n), chunks)
    attrs: dict[str, Any] = {"source": path.name}
    if header.voxel_size > 0:
        attrs["pixel_size"] = header.voxel_size
    return make_stack(images, chunks=chunks, attrs=attrs)


def read_volume(path: str | os.PathLike) -> xr.DataArray:
    """Read an MRC volume into memory.

    Parameters
    ----------
    path : str or path-like
        An MRC file holding one 3-D volume.

    Returns
    -------
    xarray.DataArray
        float32 over ``(z, y, x)`` (whatever the header's axis order ``mapc, mapr,
        maps``: the file's axes are transposed to it), named ``volume``; attrs
        ``pixel_size`` (Å, from the
        header's ``voxel_size.x``; absent when the header leaves it unset, rather than a
        misleading 0) and ``source`` (the file name).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not an MRC file, truncated or corrupt, a 2-D image, an image stack or a stack of
        volumes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MRC file at {path}")
    try:
        with mrcfile.open(path, permissive=False) as mrc:
            data = mrc.data
            stack = mrc.is_image_stack()
            voxel_size = _header_float(mrc.voxel_size.x)
            axes = tuple(int(a) for a in (mrc.header.mapc, mrc.header.mapr, mrc.header.maps))
    except ValueError as exc:  # mrcfile raises ValueError on a short data block, bad ID
        raise ValueError(f"{path} is truncated or not a valid MRC file: {exc}") from exc
    if data is None or data.ndim != 3:
        shape = "no data" if data is None else f"{data.ndim}-D data {data.shape}"
        raise ValueError(f"{path} is not a volume: it holds {shape}")
    if stack:
        raise ValueError(
            f"{path} is an image stack of {data.shape[0]} images (space group 0), not a "
            "volume: open it with open_mrc_stack"
        )
    if data.dtype.kind not in "iuf":
        raise ValueError(f"{path} has {data.dtype} voxels: only real voxels are supported")
    if sorted(axes) != [1, 2, 3]:
        raise ValueError(f"{path} has axis order (mapc, mapr, maps) = {axes}: not a permutation")
    # the file's (sections, rows, columns) hold the axes (maps, mapr, mapc); 3 = z, 1 = x
    data = data.transpose([2 - axes.index(a) for a in (3, 2, 1)])
    attrs: dict[str, Any] = {"source": path.name}
    if voxel_size > 0:
        attrs["pixel_size"] = voxel_size
    return xr.DataArray(data.astype(np.float32), dims=(Z, Y, X), name="volume", attrs=attrs)


# --------------------------------------------------------------------------------------
# MRC: atomic writing
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def written_beside(path: Path) -> Iterator[Path]:
    """A hidden sibling of ``path`` to write into, moved onto ``path`` when the block
    completes (in the same folder ``os.replace`` is an atomic rename) and removed in any
    case: an interrupted or failed write leaves the old file, or nothing. The sibling
    keeps the suffix, for libraries that look at it."""
    tmp = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_target(path: Path, overwrite: bool) -> None:
    check_flag("overwrite", overwrite)  # "no" would count as true and replace the file
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no folder {path.parent} to write {path.name} into")


def _pixel_size(value: Any, attrs: dict, name: str) -> float | None:
    """The explicit pixel size, else ``attrs['pixel_size']``, else None; positive, finite."""
    if value is None:
        value = attrs.get("pixel_size")
    if value is None:
        return None
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"pixel_size of {name} must be a positive number, got {value}")
    return value


def _image_array(images: Any) -> tuple[Any, dict]:
    """``(array, attrs)`` from a stack Dataset, a DataArray, or a NumPy/dask array."""
    if isinstance(images, xr.Dataset):
        if "images" not in images.data_vars:
            raise ValueError(f"stack has no 'images' variable (variables: {list(images)})")
        attrs = {**images["images"].attrs, **images.attrs}
        return images["images"].data, attrs
    if isinstance(images, xr.DataArray):
        return images.data, dict(images.attrs)
    if isinstance(images, da.Array):
        return images, {}
    return np.asarray(images), {}


@dataclass(frozen=True)
class _MrcPixels:
    """Where an MRC file's pixels lie. Each task maps the file by its path to write its
    images: a task on a cluster's worker process holds no handle of ours."""

    path: str
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]


def _write_slab(pixels: _MrcPixels, start: int, slab: Any) -> tuple:
    """Write ``slab`` (NumPy or CuPy) as images ``start, start + 1, ...`` of the file;
    return ``(start, images, non-finite pixels, min, max, sum, sum of squares)`` for the
    header (a slab with non-finite pixels is not written: the file is discarded)."""
    slab = np.asarray(to_numpy(slab), dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(slab)))
    if bad:
        return start, len(slab), bad, 0.0, 0.0, 0.0, 0.0
    data = np.memmap(
        pixels.path, dtype=pixels.dtype, mode="r+", offset=pixels.offset, shape=pixels.shape
    )
    data[start : start + len(slab)] = slab
    data.flush()
    return (
        start,
        len(slab),
        0,
        float(slab.min()),
        float(slab.max()),
        float(slab.sum(dtype=np.float64)),
        float(np.square(slab, dtype=np.float64).sum()),
    )


def _write_mrc_stack(path: Path, arr: Any, pixel_size: float | None) -> None:
    """Write ``(n, y, x)`` images as a float32 MRC image stack (space group 0), slab by
    slab, with header statistics accumulated on the way (no second pass).

    A dask array is written by one computation, a task per chunk (unoptimised: the
    writes share the tasks that make the chunks): the chunks of a scan (the motions of
    ``register_stack(..., "previous")``) need every chunk before them, and computed a
    few at a time each batch computed all the earlier chunks again. A NumPy array is
    converted to float32 about 32 MiB at a time.
    """
    n = arr.shape[0]
    with mrcfile.new_mmap(path, shape=tuple(arr.shape), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        if pixel_size is not None:
            mrc.voxel_size = pixel_size
        pixels = _MrcPixels(str(path), mrc.data.dtype, int(mrc.data.offset), mrc.data.shape)
        if isinstance(arr, da.Array):
            arr = arr.rechunk({1: -1, 2: -1})
            starts = np.cumsum((0, *arr.chunks[0][:-1])).tolist()
            blocks = arr.to_delayed(optimize_graph=False).ravel()
            write = dask.delayed(_write_slab, pure=False)
            writes = [write(pixels, s, b) for s, b in zip(starts, blocks, strict=True)]
            stats = dask.compute(*writes)
        else:
            step = default_chunk(arr.shape[1:])
            stats = [_write_slab(pixels, s, arr[s : s + step]) for s in range(0, n, step)]
        for start, images, bad, *_ in stats:
            if bad:
                raise ValueError(
                    f"images {start}..{start + images - 1} hold {bad} non-finite pixel(s)"
                )
        _, _, _, lo, hi, total, squares = zip(*stats, strict=True)
        count = n * arr.shape[1] * arr.shape[2]
        mean = sum(total) / count
        header = mrc.header
        header.dmin, header.dmax, header.dmean = min(lo), max(hi), mean
        header.rms = np.sqrt(max(sum(squares) / count - mean * mean, 0.0))


def write_stack(
    path: str | os.PathLike,
    images: Any,
    pixel_size: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write images to an MRC image stack (``.mrcs``), atomically.

    Parameters
    ----------
    path : str or path-like
        Destination, conventionally ``*.mrcs``.
    images : Dataset, DataArray, NumPy or dask array
        A stack Dataset (its ``images``), or ``(image, y, x)`` / one ``(y, x)`` image of
        real numbers. Written as float32 (MRC mode 2), space group 0; a dask array is
        computed a few chunks at a time, never whole.
    pixel_size : float, optional
        Å per pixel for the header; default the ``pixel_size`` attr, else left unset.
    overwrite : bool
        Replace an existing file (only once the new one is complete).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    TypeError
        Pixels that are not real numbers, or an ``overwrite`` that is not a boolean.
    ValueError
        Not 2-D/3-D, empty, or non-finite pixels (nothing is left behind).
    """
    path = Path(path)
    arr, attrs = _image_array(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"images must have shape (image, y, x), got {tuple(arr.shape)}")
    if np.dtype(arr.dtype).kind not in "iuf":
        raise TypeError(f"images must be real numbers, got dtype {arr.dtype}")
    pixel_size = _pixel_size(pixel_size, attrs, str(path))
    _check_target(path, overwrite)
    with written_beside(path) as tmp:
        _write_mrc_stack(tmp, arr, pixel_size)
    return path


def write_volume(
    path: str | os.PathLike,
    volume: Any,
    pixel_size: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a volume to an MRC file (mode 2, float32, space group 1), atomically.

    Parameters
    ----------
    path : str or path-like
        Destination, conventionally ``*.mrc``.
    volume : DataArray or array-like
        ``(z, y, x)`` real numbers, finite.
    pixel_size : float, optional
        Å per voxel; default the ``pixel_size`` attr of a DataArray, else left unset.
    overwrite : bool
        Replace an existing file (only once the new one is complete).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    attrs = dict(volume.attrs) if isinstance(volume, xr.DataArray) else {}
    # dask and CuPy volumes are brought into host memory: a volume fits there
    arr = to_numpy(volume.data if isinstance(volume, xr.DataArray) else volume)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"volume must have shape (z, y, x), got {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"volume must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"volume has {np.count_nonzero(~np.isfinite(arr))} non-finite voxel(s)")
    pixel_size = _pixel_size(pixel_size, attrs, str(path))
    _check_target(path, overwrite)
    with written_beside(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(arr)  # also sets the header statistics and space group 1
        if pixel_size is not None:
            mrc.voxel_size = pixel_size
    return path


# --------------------------------------------------------------------------------------
# STAR: reading
# --------------------------------------------------------------------------------------


def _as_table(block: Any) -> pd.DataFrame:
    # a key/value block (no loop_) comes back as a dict: one row
    return block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])


def _read_tables(star: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(particles, optics or None)`` from a RELION ≥ 3.1 or an older STAR file."""
    if not star.is_file():
        raise FileNotFoundError(f"no STAR file at {star}")
    try:
        blocks = starfile.read(star, always_dict=True)
    except Exception as exc:  # the parser's errors vary by input: name the file whatever
        raise ValueError(f"{star} could not be parsed as a STAR file: {exc}") from exc
    tables = {name: _as_table(block) for name, block in blocks.items()}
    if not tables:
        raise ValueError(f"{star} holds no data blocks")
    if "particles" in tables:
        particles = tables["particles"]
    else:  # older files: one unnamed (or differently named) table of particles
        found = [t for name, t in tables.items() if name != "optics" and "rlnImageName" in t]
        particles = found[0] if found else next(iter(tables.values()))
    if "rlnImageName" not in particles:
        raise ValueError(
            f"{star} has no rlnImageName column, so no images to read "
            f"(blocks: {list(tables)}; columns: {list(particles.columns)})"
        )
    if len(particles) == 0:
        raise ValueError(f"{star} lists no particles")
    return particles.reset_index(drop=True), tables.get("optics")


def _row(star: Path, entries: np.ndarray, r: int) -> str:
    return f"{star}: row {r + 1} (rlnImageName {entries[r]!r})"


def _numeric(table: pd.DataFrame, column: str, where) -> np.ndarray:
    """A column as finite float64; ``where(r)`` names row ``r`` in the error."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        r = int(bad[0])
        raw = table[column].iloc[r]
        shown = repr(raw) if isinstance(raw, str) else str(raw)  # not "np.float64(nan)"
        raise ValueError(
            f"{where(r)}: {column} is {shown}, not a finite number"
            + (f" ({bad.size} such rows)" if bad.size > 1 else "")
        )
    return values


def _parse_image_names(star: Path, particles: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """``(entries, stack strings, 0-based indices)`` from ``INDEX@STACK`` entries."""
    entries = particles["rlnImageName"].astype(str).to_numpy(dtype=object)
    parts = pd.Series(entries, dtype=object).str.partition("@")
    number = pd.to_numeric(parts[0], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    stacks = parts[2].to_numpy(dtype=object)
    with np.errstate(invalid="ignore"):
        bad = (
            (parts[1] != "@").to_numpy()
            | (stacks == "")
            | ~np.isfinite(number)
            | (number < 1)
            | (number != np.floor(number))
        )
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{_row(star, entries, r)}: expected INDEX@STACK with a 1-based integer index"
        )
    return entries, stacks, number.astype(np.int64) - 1


def _open_stacks(
    star: Path, entries: np.ndarray, stacks: np.ndarray, index: np.ndarray, root: Path
) -> tuple[list[_MrcHeader], np.ndarray]:
    """Probe each referenced stack once; ``(headers, stack number of each row)``."""
    codes, names = pd.factorize(pd.Series(stacks, dtype=object))
    _, first = np.unique(codes, return_index=True)  # a row naming each stack, for errors
    headers = []
    for k, name in enumerate(names):
        path = Path(name)
        path = path if path.is_absolute() else root / path
        where = _row(star, entries, int(first[k]))
        try:
            header = _probe_mrc(path)
        except FileNotFoundError as exc:
            hint = (
                f" (stack paths are resolved from {root}; for a STAR file inside a RELION "
                "project, pass the project folder as root / --root)"
                if not Path(name).is_absolute()
                else ""
            )
            raise FileNotFoundError(f"{where}: the stack {path} does not exist{hint}") from exc
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if header.ndim == 4:
            raise ValueError(f"{where}: {path} is a stack of volumes, not of images")
        headers.append(header)
    lengths = np.array([h.source.shape[0] for h in headers])
    beyond = np.flatnonzero(index >= lengths[codes])
    if beyond.size:
        r = int(beyond[0])
        h = headers[codes[r]]
        raise ValueError(
            f"{_row(star, entries, r)}: index {index[r] + 1} is beyond the "
            f"{h.source.shape[0]} image(s) of {h.source.path}"
        )
    boxes = {h.source.shape[1:] for h in headers}
    if len(boxes) > 1:
        sizes = ", ".join(f"{Path(h.source.path).name} {h.source.shape[1:]}" for h in headers)
        raise ValueError(f"{star}: the stacks hold images of different sizes: {sizes}")
    return headers, codes


def _constant(values: np.ndarray, what: str, star: Path, groups: str) -> float:
    """The one value of an optics setting, or a clear error for mixed optics."""
    distinct = np.unique(values)
    if np.ptp(distinct) > 1e-6 * np.max(np.abs(distinct)):
        shown = ", ".join(f"{v:g}" for v in distinct[:5])
        raise ValueError(
            f"{star}: mixed optics groups are not supported yet: {groups} have different "
            f"{what} ({shown})"
        )
    return float(distinct[0])


def _optics_table(
    star: Path, particles: pd.DataFrame, optics: pd.DataFrame | None, entries: np.ndarray
) -> tuple[pd.DataFrame, str, Any]:
    """The rows holding the optics settings: the optics groups the particles use
    (RELION ≥ 3.1), or the particles themselves (older files)."""
    if optics is None or len(optics) == 0:
        return particles, "the particles", lambda r: _row(star, entries, r)
    optics = optics.reset_index(drop=True)
    if "rlnOpticsGroup" not in particles or "rlnOpticsGroup" not in optics:
        if len(optics) > 1:
            raise ValueError(
                f"{star}: {len(optics)} optics groups but no rlnOpticsGroup column to say "
                "which one each particle belongs to"
            )
        return optics, "the optics groups", lambda r: f"{star}: optics group row {r + 1}"
    wanted = pd.to_numeric(particles["rlnOpticsGroup"], errors="coerce").to_numpy()
    known = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce").to_numpy()
    missing = np.flatnonzero(~np.isin(wanted, known))
    if missing.size:
        r = int(missing[0])
        raise ValueError(
            f"{_row(star, entries, r)}: optics group {particles['rlnOpticsGroup'].iloc[r]!r} "
            f"is not in the optics block (groups: {list(optics['rlnOpticsGroup'])})"
        )
    used = optics[np.isin(known, wanted)].reset_index(drop=True)
    label = "optics groups " + ", ".join(str(g) for g in used["rlnOpticsGroup"])
    return used, label, lambda r: f"{star}: optics group {used['rlnOpticsGroup'].iloc[r]}"


def _optics_attrs(
    star: Path, particles: pd.DataFrame, optics: pd.DataFrame | None, entries: np.ndarray
) -> dict[str, float]:
    """``pixel_size``, ``voltage``, ``cs``, ``amplitude_contrast``: those the file has."""
    table, label, where = _optics_table(star, particles, optics, entries)
    # settings may also sit on the particles of a RELION >= 3.1 file
    places = [(table, label, where), (particles, "the particles", lambda r: _row(star, entries, r))]
    attrs = {}
    for attr, column in OPTICS.items():
        for source, what, at in places:
            if column in source:
                attrs[attr] = _constant(_numeric(source, column, at), column, star, what)
                break
    if "pixel_size" not in attrs:
        # older files: rlnPixelSize, or detector pixel (µm) over magnification
        if "rlnPixelSize" in table:
            values = _numeric(table, "rlnPixelSize", where)
            attrs["pixel_size"] = _constant(values, "rlnPixelSize", star, label)
        elif "rlnDetectorPixelSize" in table and "rlnMagnification" in table:
            values = (
                _numeric(table, "rlnDetectorPixelSize", where)
                * 1e4
                / _numeric(table, "rlnMagnification", where)
            )
            attrs["pixel_size"] = _constant(values, "pixel sizes", star, label)
    if "pixel_size" in attrs and attrs["pixel_size"] <= 0:
        raise ValueError(f"{star}: the pixel size must be positive, got {attrs['pixel_size']}")
    return attrs


def import_star(
    star_path: str | os.PathLike,
    chunks: int | None = None,
    *,
    require_angles: bool = False,
    root: str | os.PathLike | None = None,
) -> xr.Dataset:
    """Read a RELION particle STAR file and its image stacks as a lazy stack Dataset.

    Parameters
    ----------
    star_path : str or path-like
        A RELION ≥ 3.1 STAR file (``optics`` and ``particles`` blocks) or an older one
        (a single particles table carrying ``rlnVoltage``, ``rlnSphericalAberration``,
        ``rlnAmplitudeContrast`` and ``rlnDetectorPixelSize``/``rlnMagnification`` or
        ``rlnPixelSize``).
    chunks : int, optional
        Images per dask chunk; default about 32 MiB.
    require_angles : bool
        Fail unless the file has ``rlnAngleRot``, ``rlnAngleTilt`` and ``rlnAnglePsi``.
    root : str or path-like, optional
        Folder the stack paths of ``rlnImageName`` are relative to; default the STAR
        file's folder. (RELION resolves them from its project folder: pass that for files
        written inside a RELION project.)

    Returns
    -------
    xarray.Dataset
        In STAR row order: ``images`` float32 ``(image, y, x)``, lazy (headers are read
        now, pixels when computed: one task per chunk of rows, reading only that chunk's
        images from each stack it draws on). Per-image float64 variables, each only when
        its columns exist: ``rot, tilt, psi`` (degrees), ``shift_x, shift_y`` (pixels:
        ``-rlnOriginX/YAngst / pixel_size``, or older ``-rlnOriginX/Y``; module
        docstring), ``defocus_u, defocus_v`` (Å), ``defocus_angle`` (degrees),
        ``phase_shift`` (degrees, ``rlnPhaseShift``), ``bfactor`` (Å², ``rlnCtfBfactor``),
        ``ctf_scale`` (``rlnCtfScalefactor``). Attrs: ``pixel_size`` (from the
        STAR file, else the stacks' headers), ``voltage``, ``cs``,
        ``amplitude_contrast`` where given; ``source`` (the STAR file's name) and
        ``n_stacks``.

    Raises
    ------
    FileNotFoundError
        No STAR file, or a referenced stack does not exist (naming the row).
    ValueError
        No ``rlnImageName``, a malformed entry, an index beyond its stack, a corrupt or
        truncated stack, stacks of different box sizes, a non-finite angle/shift/CTF
        value, optics groups that differ in pixel size, voltage, Cs or amplitude
        contrast, or no angle columns with ``require_angles``.
    """
    check_chunks(chunks)
    check_flag("require_angles", require_angles)  # "no" would count as true
    star = Path(star_path)
    particles, optics = _read_tables(star)
    entries, stacks, index = _parse_image_names(star, particles)

    def row(r: int) -> str:
        return _row(star, entries, r)

    present = [c for c in ANGLES.values() if c in particles]
    if require_angles and len(present) < len(ANGLES):
        missing = [c for c in ANGLES.values() if c not in present]
        raise ValueError(
            f"{star} has no angle columns ({', '.join(ANGLES.values())})"
            + (f": missing {', '.join(missing)}" if present else "")
        )
    attrs: dict[str, Any] = _optics_attrs(star, particles, optics, entries)
    variables = {
        var: _numeric(particles, col, row) for var, col in ANGLES.items() if col in particles
    }

    if any(c in particles for c in SHIFTS_ANGST.values()):
        if "pixel_size" not in attrs:
            raise ValueError(
                f"{star} gives origins in Å (rlnOriginXAngst/YAngst) but no pixel size "
                "(rlnImagePixelSize) to convert them to pixels"
            )
        for var, col in SHIFTS_ANGST.items():
            if col in particles:
                variables[var] = -_numeric(particles, col, row) / attrs["pixel_size"]
    else:
        for var, col in SHIFTS_PIXELS.items():
            if col in particles:
                variables[var] = -_numeric(particles, col, row)
    for var, col in CTF.items():
        if col in particles:
            variables[var] = _numeric(particles, col, row)

    headers, which = _open_stacks(
        star, entries, stacks, index, star.parent if root is None else Path(root)
    )
    if "pixel_size" not in attrs:  # fall back on the stacks' headers when they agree
        sizes = {h.voxel_size for h in headers if h.voxel_size > 0}
        if len(sizes) == 1:
            attrs["pixel_size"] = sizes.pop()
    sources = [h.source for h in headers]
    if chunks is None:
        chunks = default_chunk(sources[0].shape[1:])
    images = _lazy_images(sources, which, index, chunks)
    ds = make_stack(
        images, chunks=chunks, attrs={**attrs, "source": star.name, "n_stacks": len(sources)}
    )
    for var, values in variables.items():
        ds[var] = (IMAGE, values)
    return ds


# --------------------------------------------------------------------------------------
# STAR: writing
# --------------------------------------------------------------------------------------


def _metadata(ds: xr.Dataset, var: str) -> np.ndarray:
    values = ds[var]
    if values.dims != (IMAGE,):
        raise ValueError(f"{var} must be a per-image variable over ('image',), got {values.dims}")
    values = np.asarray(values.values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        r = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"{var} of image {r} is {values[r]}: RELION needs finite values")
    return values


def export_star(
    ds: xr.Dataset,
    star_path: str | os.PathLike,
    stack_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a stack Dataset as a RELION 3.1 STAR file and an ``.mrcs`` image stack.

    Parameters
    ----------
    ds : xarray.Dataset
        A stack: ``images (image, y, x)`` and attr ``pixel_size``; the per-image
        variables ``rot, tilt, psi, shift_x, shift_y, defocus_u, defocus_v,
        defocus_angle, phase_shift, bfactor, ctf_scale`` and attrs ``voltage, cs,
        amplitude_contrast`` are written where present.
    star_path : str or path-like
        The STAR file to write (``optics`` and ``particles`` blocks, one optics group).
    stack_path : str or path-like, optional
        The image stack; default beside the STAR file with the same stem and ``.mrcs``.
        ``rlnImageName`` refers to it relative to the STAR file's folder.
    overwrite : bool
        Replace existing files (only once both new ones are complete).

    Returns
    -------
    pathlib.Path
        ``star_path``. ``import_star`` of it gives back ``ds``: images bit for bit (as
        float32), origins as ``rlnOriginX/YAngst = -shift × pixel_size``, and floats to
        9 significant digits.
    """
    if not isinstance(ds, xr.Dataset) or "images" not in ds.data_vars:
        raise ValueError("export_star needs a stack Dataset with an 'images' variable")
    images = ds["images"]
    if images.dims != STACK_DIMS:
        raise ValueError(f"images must have dims {STACK_DIMS}, got {images.dims}")
    star = Path(star_path)
    stack = star.with_suffix(".mrcs") if stack_path is None else Path(stack_path)
    if stack.resolve() == star.resolve():
        raise ValueError(f"the stack and the STAR file cannot both be {star}")
    pixel_size = _pixel_size(None, ds.attrs, "the stack")
    if pixel_size is None:
        raise ValueError("the stack has no pixel_size attr: RELION 3.1 needs rlnImagePixelSize")
    for path in (star, stack):
        _check_target(path, overwrite)

    n, ny, nx = images.shape
    optics: dict[str, list] = {
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnImagePixelSize": [pixel_size],
        "rlnImageDimensionality": [2],
    }
    if ny == nx:  # RELION boxes are square; leave the size out rather than misstate it
        optics["rlnImageSize"] = [nx]
    for attr in ("voltage", "cs", "amplitude_contrast"):
        if attr in ds.attrs:
            optics[OPTICS[attr]] = [float(ds.attrs[attr])]
    relative = Path(os.path.relpath(stack.resolve(), star.resolve().parent)).as_posix()
    particles: dict[str, Any] = {
        "rlnImageName": [f"{i:06d}@{relative}" for i in range(1, n + 1)],
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    }
    for var, col in ANGLES.items():
        if var in ds:
            particles[col] = _metadata(ds, var)
    for var, col in SHIFTS_ANGST.items():
        if var in ds:
            particles[col] = -_metadata(ds, var) * pixel_size
    for var, col in CTF.items():
        if var in ds:
            particles[col] = _metadata(ds, var)

    # the stack is moved into place first (the inner block exits first): a STAR file
    # never points at a stack that is not there yet
    with written_beside(star) as tmp_star, written_beside(stack) as tmp_stack:
        _write_mrc_stack(tmp_stack, images.data, pixel_size)
        starfile.write(
            {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(particles)},
            tmp_star,
            float_format=STAR_FLOAT_FORMAT,
        )
    return star
