"""Batched affine warping of images ``(B, H, W)`` and volumes ``(B, D, H, W)``.

Convention (:mod:`scalign.kernels.affine`): a homogeneous matrix ``M`` states the forward
motion of the moving object in pixel ``(x, y[, z])``; warping pulls with the inverse,
``out(p) = in(M^{-1} p)``. Every result equals, image by image,
``scipy.ndimage.affine_transform(img, *pull_matrix(M), order=order, mode=mode, cval=cval)``
— the same sampling, the same boundary rules — whichever way it is computed.

How it is computed (NumPy), chosen automatically by :func:`choose_method`:

* ``"operator"`` — one matrix shared by the batch, ``order <= 1``: the warp is a fixed
  linear operator with at most 4 (2-D) or 8 (3-D) non-zeros per output pixel. It is built
  once as a ``scipy.sparse`` CSR matrix holding exactly scipy's interpolation weights and
  tap indices (its coordinate arithmetic, its boundary mapping of every mode, see
  :func:`axis_taps`), cached per ``(shape, matrix, order, mode, dtype)`` (threads that
  need it at once share the building), and applied to groups of 8 float32 (4 float64)
  images at a time: ``W @ X`` with ``X`` the group transposed to ``(pixels, 8)`` so each
  non-zero reads 32 contiguous bytes (SpMM, GIL released), in row blocks so the result
  is transposed back while it is in cache. Pixels that scipy
  fills with ``cval`` get ``cval`` (exactly; ``NaN`` too). Building the operator costs
  about 3 scipy warps of one image, applying it about a tenth of one (measured on 512²
  float32, order 1: 6-10x the scipy loop on one core once built), so it is used when the
  operator is cached or the images sharing the matrix are at least
  :data:`MIN_IMAGES` (2-D: 4, 3-D: 5), and when it fits :data:`MAX_OPERATOR_BYTES`.
* ``"scipy"`` — everything else (one matrix per image, ``order >= 2`` with scipy's
  spline prefilter, images of a single pixel along an axis, huge images): a loop of
  ``scipy.ndimage.affine_transform`` over the images, written into the output in place.

CuPy input is warped with ``cupyx.scipy.ndimage.affine_transform``: for a shared matrix
and ``order <= 1`` in one call over the whole batch (identity along the batch axis, where
the coordinates are integers and the second tap has weight 0); otherwise image by image.
cupyx interpolates float32 images at float32 coordinates, which round by up to
:math:`\\sim S\\, 2^{-24}` px on an image of side :math:`S`: its values differ from scipy's
(float64 coordinates) by that times the image's slope (up to 1.1e-4 on 1,024² uniform
noise in [0, 1), measured on an H200).

An image whose matrix is exactly the identity is copied (any order and path; every mode
but ``grid-constant``).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from numbers import Integral, Real
from typing import Any

import numpy as np
import scipy.sparse as sp
from array_api_compat import is_cupy_array
from scipy import ndimage as ndi

from scalign.kernels.affine import check_matrix, invert, pull_matrix

Array = Any

#: Boundary modes (scipy.ndimage's names and meanings).
MODES = (
    "constant",
    "grid-constant",
    "nearest",
    "reflect",
    "grid-mirror",
    "mirror",
    "wrap",
    "grid-wrap",
)
#: Spline orders (scipy.ndimage: 0 nearest, 1 (bi/tri)linear, 2..5 B-splines).
ORDERS = (0, 1, 2, 3, 4, 5)
METHODS = ("auto", "operator", "scipy")

#: Images sharing one matrix from which building the sparse operator pays off against
#: the scipy loop (measured, order 1: building cost ~3.4 scipy warps of a 512² image,
#: ~4.2 of a 96³ volume, net of what applying it costs).
MIN_IMAGES = {2: 4, 3: 5}
#: Largest sparse operator built (data + indices), and all cached operators together.
MAX_OPERATOR_BYTES = 256 * 2**20
MAX_CACHE_BYTES = 512 * 2**20

# Images per SpMM group (8 float32 = 32 bytes per non-zero read) and non-zeros per row
# block (the block's output is transposed back while in cache); measured on 512² images.
_GROUP_BYTES = 32
_BLOCK_NNZ = 65536

# scipy maps the taps of a spline that straddle an edge with this mode (order <= 1).
_SPLINE_MODE = {
    "constant": "mirror",
    "mirror": "mirror",
    "wrap": "mirror",
    "grid-wrap": "grid-wrap",
    "nearest": "reflect",
    "reflect": "reflect",
    "grid-mirror": "reflect",
}


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def check_order(order: Any) -> int:
    """A spline order 0..5 (an integer, not a bool)."""
    if isinstance(order, bool) or not isinstance(order, Integral):
        raise TypeError(f"order must be an integer 0..5, got {order!r}")
    if int(order) not in ORDERS:
        raise ValueError(f"order must be an integer 0..5, got {order}")
    return int(order)


def check_mode(mode: Any) -> str:
    """One of :data:`MODES`."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(map(repr, MODES))}")
    return mode


def check_cval(cval: Any) -> float:
    """The fill value: a real number."""
    if isinstance(cval, bool | np.bool_) or not isinstance(cval, Real):
        raise TypeError(f"cval must be a real number, got {cval!r}")
    return float(cval)


def output_dtype(dtype: Any, out_dtype: Any = None) -> np.dtype:
    """The result's dtype: ``out_dtype`` (floating), or the smallest float that holds the
    input exactly: float32 for float32/float16/(u)int8/(u)int16/bool, else float64."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"images must be real numbers, got dtype {dtype}")
    if out_dtype is None:
        return np.result_type(dtype, np.float32)
    out = np.dtype(out_dtype)
    if out.kind != "f":
        raise TypeError(f"out_dtype must be a floating dtype, got {out}")
    return out


def _check_images(images: Array) -> int:
    if not hasattr(images, "ndim") or not hasattr(images, "shape"):
        raise TypeError(f"images must be an array, got {type(images).__name__}")
    if images.ndim not in (3, 4):
        raise ValueError(
            "images must be a batch of images (B, H, W) or of volumes (B, D, H, W), "
            f"got shape {tuple(images.shape)}"
        )
    return images.ndim - 1


def check_invertible(name: str, M: np.ndarray) -> None:
    """Every homogeneous matrix of ``M`` ``(..., d+1, d+1)`` invertible (the test of
    :func:`scalign.kernels.affine.invert`); the error names the first one that is not."""
    try:
        invert(M)
    except ValueError:
        if M.ndim == 2:
            raise ValueError(f"{name} is not invertible (its linear part is singular)") from None
        for i in np.ndindex(M.shape[:-2]):
            try:
                invert(M[i])
            except ValueError:
                where = ", ".join(map(str, i))
                raise ValueError(
                    f"{name}[{where}] is not invertible (its linear part is singular)"
                ) from None
        raise


def _check_matrices(matrix: Any, d: int, n: int) -> np.ndarray:
    if is_cupy_array(matrix):
        matrix = matrix.get()
    M = check_matrix("matrix", matrix, d)
    if M.ndim not in (2, 3):
        raise ValueError(
            f"matrix must be ({d + 1}, {d + 1}) or (B, {d + 1}, {d + 1}), got shape {M.shape}"
        )
    if M.ndim == 3 and M.shape[0] != n:
        raise ValueError(f"matrix has {M.shape[0]} per-image matrices but there are {n} images")
    check_invertible("matrix", M)
    return M


# --------------------------------------------------------------------------------------
# scipy's sampling, per axis
# --------------------------------------------------------------------------------------


def _map_coordinate(c: np.ndarray, n: int, mode: str) -> np.ndarray:
    """scipy's ``map_coordinate`` (ni_interpolation.c) for ``n >= 2``: a coordinate
    outside ``[0, n - 1]`` mapped back inside, with the same double arithmetic
    (``(npy_intp)`` casts are truncations)."""
    c = np.array(c, dtype=np.float64)
    lo, hi = c < 0, c > n - 1
    a, b = c[lo], c[hi]
    if mode == "mirror":
        s = 2 * n - 2
        a = s * np.trunc(-a / s) + a
        a = np.where(a <= 1 - n, a + s, -a)
        b = b - s * np.trunc(b / s)
        b = np.where(b >= n, s - b, b)
    elif mode in ("reflect", "grid-mirror"):
        s = 2 * n
        a = np.where(a < -s, s * np.trunc(-a / s) + a, a)
        a = np.where(a < -n, a + s, np.where(a > -1e-15, 1e-15, -a) - 1)
        b = b - s * np.trunc(b / s)
        b = np.where(b >= n, s - b - 1, b)
    elif mode == "wrap":
        s = n - 1
        a = a + s * (np.trunc(-a / s) + 1)
        b = b - s * np.trunc(b / s)
    elif mode == "grid-wrap":
        a = a + n * (np.trunc((-1 - a) / n) + 1)
        b = b - n * np.trunc(b / n)
    elif mode == "nearest":
        a = np.zeros_like(a)
        b = np.full_like(b, n - 1)
    else:  # constant: scipy marks the point as outside (-1) and fills it with cval
        a = np.full_like(a, -1.0)
        b = np.full_like(b, -1.0)
    c[lo], c[hi] = a, b
    return c


def _map_index(idx: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Tap indices outside ``[0, n)`` mapped like scipy maps a spline's edge taps."""
    return _map_coordinate(idx.astype(np.float64), n, mode).astype(np.int64)


def axis_taps(
    c: np.ndarray, n: int, order: int, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """scipy's interpolation along one axis of length ``n >= 2`` at coordinates ``c``.

    Returns ``(index, weight, inside, fill)``: ``index`` and ``weight`` are
    ``(order + 1, len(c))`` (tap indices in ``[0, n)`` and their weights, scipy's
    ``w0 = 1 - t``, ``w1 = 1 - w0``); ``inside`` is False where scipy returns ``cval``
    for the whole point (mode ``constant``: ``c < 0`` or ``c > n - 1``, no tolerance);
    ``fill`` (mode ``grid-constant`` only, else None) marks the taps outside the input,
    which contribute ``cval`` times their weight.
    """
    if order not in (0, 1):
        raise ValueError("axis_taps replicates orders 0 and 1 only")
    c = np.asarray(c, dtype=np.float64)
    if mode == "grid-constant":
        cc = np.clip(c, -2.0, n + 1.0)  # further out every tap is a cval tap anyway
        inside = np.ones(c.shape, dtype=bool)
    else:
        cc = _map_coordinate(c, n, mode)
        inside = cc > -1.0
        cc = np.where(inside, cc, 0.0)
    base = np.floor(cc) if order == 1 else np.floor(cc + 0.5)
    index = base.astype(np.int64)[None, :] + np.arange(order + 1)[:, None]
    if order == 1:
        w0 = 1.0 - (cc - np.floor(cc))
        weight = np.stack([w0, 1.0 - w0])
    else:
        weight = np.ones((1, c.size))
    outside = (index < 0) | (index >= n)
    fill = None
    if mode == "grid-constant":
        fill = outside
        index = np.clip(index, 0, n - 1)
    elif outside.any():
        index[outside] = _map_index(index[outside], n, _SPLINE_MODE[mode])
    return index, weight, inside, fill


# --------------------------------------------------------------------------------------
# the sparse operator
# --------------------------------------------------------------------------------------


class _Operator:
    """A shared-matrix warp as row blocks of CSR matrices, with its ``cval`` weights."""

    def __init__(self, blocks: list, fills: list, nbytes: int):
        self.blocks = blocks  # [(r0, r1, csr (r1 - r0, P))]
        self.fills = fills  # per block: (cval weight, reads cval) per output pixel, or None
        self.nbytes = nbytes

    def apply(self, images: np.ndarray, out: np.ndarray, cval: float) -> None:
        B = images.shape[0]
        flat = images.reshape(B, -1)
        dst = out.reshape(B, -1)
        dtype = out.dtype
        # cval times each pixel's cval weight, added only where scipy reads cval (so a NaN
        # cval reaches exactly the pixels it reaches in scipy)
        fills = [
            None
            if f is None or cval == 0
            else np.where(f[1], cval * f[0], 0.0).astype(dtype)[:, None]
            for f in self.fills
        ]
        group = max(1, _GROUP_BYTES // dtype.itemsize)
        for i in range(0, B, group):
            # (pixels, g): each non-zero of the operator reads g contiguous values
            xt = np.asarray(flat[i : i + group].T, dtype=dtype, order="C")
            o = dst[i : i + group]
            for (r0, r1, block), fill in zip(self.blocks, fills, strict=True):
                y = block @ xt
                if fill is not None:
                    y += fill
                o[:, r0:r1] = y.T


def _output_grid(shape: tuple[int, ...], rows: slice) -> list[np.ndarray]:
    """Index-order output coordinates ``(z, y, x)`` of the flat pixels ``rows``."""
    flat = np.arange(rows.start, rows.stop)
    return [a.astype(np.float64) for a in np.unravel_index(flat, shape)]


class _Plan:
    """How to build an operator block by block: ``len(plan)`` blocks of output rows,
    ``plan.block(i)`` builds block ``i`` (independent of the others)."""

    def __init__(
        self, shape: tuple[int, ...], M: np.ndarray, order: int, mode: str, dtype: np.dtype
    ):
        self.mat, self.off = pull_matrix(M)  # index order: c = mat @ o + off
        self.shape, self.order, self.mode, self.dtype = shape, order, mode, np.dtype(dtype)
        self.P = int(np.prod(shape))
        self.taps = (order + 1) ** len(shape)
        self.strides = np.cumprod((1,) + shape[::-1])[:-1][::-1]
        self.rows = max(1, _BLOCK_NNZ // self.taps)

    def __len__(self) -> int:
        return -(-self.P // self.rows)

    def block(self, i: int) -> tuple[tuple[int, int, Any], Any, int]:
        """``((r0, r1, csr), fill, nbytes)`` for output rows ``r0:r1``."""
        shape, mat, off, d, P = self.shape, self.mat, self.off, len(self.shape), self.P
        r0 = i * self.rows
        r1 = min(P, r0 + self.rows)
        n = r1 - r0
        o = _output_grid(shape, slice(r0, r1))
        index = np.zeros((1, n), dtype=np.int64)
        weight = np.ones((1, n))
        inside = np.ones(n, dtype=bool)
        filled = np.zeros((1, n), dtype=bool)
        for h in range(d):
            # scipy's double arithmetic, in its order: c = shift[h], then c += o[l] * m[h, l]
            # (matched bit for bit; summing the products first moves ties of order 0)
            c = off[h] + o[0] * mat[h, 0]
            for ll in range(1, d):
                c = c + o[ll] * mat[h, ll]
            idx, w, ins, fill = axis_taps(c, shape[h], self.order, self.mode)
            # taps of the axes so far (outer) x taps of this axis (inner), scipy's order
            index = (index[:, None, :] + idx[None, :, :] * self.strides[h]).reshape(-1, n)
            weight = (weight[:, None, :] * w[None, :, :]).reshape(-1, n)
            inside &= ins
            f = np.zeros_like(idx, dtype=bool) if fill is None else fill
            filled = (filled[:, None, :] | f[None, :, :]).reshape(-1, n)
        # scipy: an outside point is cval; a grid-constant tap beyond the edge reads cval
        # (even with weight 0, so a NaN cval reaches the point)
        reads_cval = ~inside | filled.any(axis=0)
        fill = None
        if reads_cval.any():
            fill = (np.where(inside, (weight * filled).sum(axis=0), 1.0), reads_cval)
        entries = (inside[None, :] & ~filled).T  # (rows, taps), row-major like CSR
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(entries.sum(axis=1), out=indptr[1:])
        cols = index.T[entries]
        vals = weight.T[entries].astype(self.dtype)
        itype = np.int32 if max(P, indptr[-1]) < 2**31 else np.int64
        csr = sp.csr_array(
            (vals, cols.astype(itype), indptr.astype(itype)), shape=(n, P), copy=False
        )
        nbytes = vals.nbytes + csr.indices.nbytes + csr.indptr.nbytes
        return (r0, r1, csr), fill, nbytes


def _build_operator(
    shape: tuple[int, ...], M: np.ndarray, order: int, mode: str, dtype: np.dtype
) -> _Operator:
    """The operator, built block after block by this thread alone."""
    plan = _Plan(shape, M, order, mode, dtype)
    parts = [plan.block(i) for i in range(len(plan))]
    return _Operator([b for b, _, _ in parts], [f for _, f, _ in parts], sum(n for *_, n in parts))


class _Build:
    """An operator being built: every thread that needs it takes the next unbuilt block
    (the chunks of one op start together on the threaded scheduler, so the threads share
    the build instead of waiting for one of them)."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.parts: list = [None] * len(plan)
        self.next = 0
        self.done = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.finished = threading.Event()

    def work(self) -> bool:
        """Build blocks until none is left; True for the thread that built the last one."""
        while True:
            with self.lock:
                if self.error is not None or self.next >= len(self.parts):
                    return False
                i = self.next
                self.next += 1
            try:
                part = self.plan.block(i)
            except BaseException as exc:
                with self.lock:
                    self.error = exc
                self.finished.set()
                raise
            with self.lock:
                self.parts[i] = part
                self.done += 1
                if self.done == len(self.parts):
                    return True

    def operator(self) -> _Operator:
        parts = self.parts
        return _Operator(
            [b for b, _, _ in parts], [f for _, f, _ in parts], sum(n for *_, n in parts)
        )


class _Cache:
    """Built operators by ``(shape, matrix, order, mode, dtype)``, least recently used
    first out (within :data:`MAX_CACHE_BYTES`); threads asking for one being built help
    build it (:class:`_Build`) and all get the same operator."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple, _Operator] = OrderedDict()
        self.building: dict[tuple, _Build] = {}
        self.lock = threading.Lock()

    def has(self, key: tuple) -> bool:
        with self.lock:
            return key in self.items

    def get(self, key: tuple, plan) -> _Operator:
        """The operator for ``key``; ``plan()`` makes its :class:`_Plan` when it must be
        built."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            build = self.building.get(key)
            if build is None:
                build = self.building[key] = _Build(plan())
        try:
            last = build.work()
        except BaseException:
            with self.lock:
                if self.building.get(key) is build:
                    del self.building[key]
            raise
        if last:
            op = build.operator()
            with self.lock:
                self.items[key] = op
                total = sum(v.nbytes for v in self.items.values())
                while total > self.max_bytes and len(self.items) > 1:
                    _, old = self.items.popitem(last=False)
                    total -= old.nbytes
                del self.building[key]
            build.finished.set()
            return op
        build.finished.wait()
        if build.error is not None:
            raise RuntimeError("building the warp operator failed in another thread") from (
                build.error
            )
        with self.lock:
            return self.items.get(key) or build.operator()

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_CACHE = _Cache(MAX_CACHE_BYTES)


def clear_cache() -> None:
    """Drop the cached operators (they are rebuilt on demand)."""
    _CACHE.clear()


def _key(shape, M, order, mode, dtype) -> tuple:
    return (
        tuple(shape),
        np.ascontiguousarray(M, dtype=np.float64).tobytes(),
        order,
        mode,
        np.dtype(dtype).str,
    )


def operator_nbytes(shape: tuple[int, ...], order: int, dtype: Any) -> int:
    """Upper bound of a sparse operator's memory: data + column index per non-zero."""
    taps = (order + 1) ** len(shape)
    nnz = int(np.prod(shape)) * taps
    return nnz * (np.dtype(dtype).itemsize + 4) + 4 * (int(np.prod(shape)) + 1)


def choose_method(
    shape: tuple[int, ...],
    n_images: int,
    *,
    shared: bool,
    order: int,
    mode: str,
    dtype: Any = np.float32,
    matrix: Any = None,
) -> str:
    """``"operator"`` or ``"scipy"``: how ``n_images`` images of ``shape`` (spatial,
    index order) are warped on the CPU.

    The sparse operator when the matrix is shared, ``order <= 1``, every axis has at least
    2 pixels, the operator fits :data:`MAX_OPERATOR_BYTES`, and either it is already cached
    (``matrix`` given) or ``n_images >= MIN_IMAGES[ndim]`` images repay building it; the
    scipy loop otherwise.
    """
    d = len(shape)
    if not shared or order > 1 or mode not in MODES or min(shape) < 2:
        return "scipy"
    if operator_nbytes(shape, order, dtype) > MAX_OPERATOR_BYTES:
        return "scipy"
    if matrix is not None and _CACHE.has(_key(shape, matrix, order, mode, dtype)):
        return "operator"
    return "operator" if n_images >= MIN_IMAGES[d] else "scipy"


# --------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------


def _identity(M: np.ndarray, mode: str) -> np.ndarray:
    """Which matrices are exactly the identity: those images are copied, not resampled
    (scipy's spline prefilter returns an image only to rounding for ``order >= 2``).
    Not with ``grid-constant``, where scipy reads ``cval`` at the weight-0 taps beyond
    the last pixel (a NaN ``cval`` reaches the edge pixels even then)."""
    return np.all(M == np.eye(M.shape[-1]), axis=(-2, -1)) & (mode != "grid-constant")


def _cast_for_prefilter(images: Array, order: int, mode: str) -> bool:
    """Whether integer ``images`` go to scipy's (or cupyx's) ``affine_transform`` cast to
    the output's float dtype: for its spline prefilter with ``grid-constant`` it pads the
    input with ``cval`` in the input's own dtype, so a negative, fractional, NaN or too
    large ``cval`` wraps or truncates (uint16, order 3, ``cval=-1``: edge pixels off by
    7e4; ``cval=NaN``: no NaN at all). The cast is exact and the prefilter works in
    float64 either way, so nothing else changes."""
    return order > 1 and mode == "grid-constant" and images.dtype.kind in "biu"


def _warp_scipy(images, M, order, mode, cval, out) -> None:
    mats, offs = pull_matrix(M)
    per_image = M.ndim == 3
    identity = np.broadcast_to(_identity(M, mode), images.shape[:1])
    cast = _cast_for_prefilter(images, order, mode)
    for b in range(images.shape[0]):
        if identity[b]:
            out[b] = images[b]
            continue
        mat, off = (mats[b], offs[b]) if per_image else (mats, offs)
        img = images[b].astype(out.dtype) if cast else images[b]
        ndi.affine_transform(img, mat, off, order=order, mode=mode, cval=cval, output=out[b])


def _warp_cupy(images, M, order, mode, cval, dtype):
    import cupy
    from cupyx.scipy import ndimage as cndi

    # cupyx writes cval into its kernel's source and spells NaN right only for the object
    # numpy.nan itself (any other NaN, e.g. float("nan") or one unpickled on a worker,
    # becomes "(float)nan", which NVRTC rejects: cupy#4082)
    if math.isnan(cval):
        cval = np.nan
    out = cupy.empty(images.shape, dtype=dtype)
    mats, offs = pull_matrix(M)
    d = mats.shape[-1]
    identity = _identity(M, mode)
    if M.ndim == 2 and identity:
        out[...] = images
        return out
    if M.ndim == 2 and order <= 1:
        # one call: identity along the batch axis (integer coordinates, exact)
        full = np.eye(d + 1)
        full[1:, 1:] = mats
        offset = [0.0, *map(float, offs)]
        cndi.affine_transform(
            images,
            cupy.asarray(full),
            offset=offset,
            order=order,
            mode=mode,
            cval=cval,
            output=out,
        )
        return out
    per_image = M.ndim == 3
    # every matrix uploaded at once, not one host-to-device copy per image
    on_device = cupy.asarray(mats)
    cast = _cast_for_prefilter(images, order, mode)
    for b in range(images.shape[0]):
        if per_image and identity[b]:
            out[b] = images[b]
            continue
        mat, off = (on_device[b], offs[b]) if per_image else (on_device, offs)
        cndi.affine_transform(
            images[b].astype(dtype) if cast else images[b],
            mat,
            offset=[float(v) for v in off],
            order=order,
            mode=mode,
            cval=cval,
            output=out[b],
        )
    return out


def warp_images(
    images: Array,
    matrix: Any,
    *,
    order: int = 1,
    mode: str = "constant",
    cval: float = 0.0,
    out_dtype: Any = None,
    method: str = "auto",
    out: np.ndarray | None = None,
) -> Array:
    """Warp a batch of images by their forward motions: ``out(p) = in(M^{-1} p)``.

    Parameters
    ----------
    images : (B, H, W) or (B, D, H, W) array, NumPy or CuPy
        Images (or volumes), batch first, spatial axes in index order ``([z,] y, x)``.
    matrix : (3, 3) / (4, 4), or (B, 3, 3) / (B, 4, 4)
        Homogeneous forward motion in pixel ``(x, y[, z])`` (:mod:`scalign.kernels.affine`),
        one for the whole batch or one per image; finite and invertible.
    order : int 0..5
        Spline order, as scipy's (0 nearest, 1 linear; >= 2 with scipy's prefilter).
    mode : one of :data:`MODES`
        Boundary handling, exactly scipy.ndimage's: ``constant`` fills points whose source
        coordinate lies outside ``[0, n - 1]`` (no tolerance) with ``cval``;
        ``grid-constant`` also interpolates across the edge with ``cval`` beyond it.
    cval : float
        Fill value.
    out_dtype : floating dtype, optional
        Default: the input's float dtype (float32 stays float32), or for integer input the
        smallest float that holds it exactly (:func:`output_dtype`).
    method : {"auto", "operator", "scipy"}
        ``"auto"`` picks with :func:`choose_method` (for this batch alone); the others force
        a path (``"operator"`` needs a shared matrix and ``order <= 1``). CuPy input
        ignores it.
    out : NumPy array, optional
        Where to write the result (C-contiguous, the images' shape, a floating dtype, which
        replaces ``out_dtype``); e.g. a slice of a larger array, to warp it batch by batch.

    Returns
    -------
    The warped batch, same shape, ``out_dtype``, same array type as ``images``.
    Equal to ``scipy.ndimage.affine_transform(images[b], *pull_matrix(M_b), order=order,
    mode=mode, cval=cval)`` for every ``b`` (to float rounding: the operator accumulates
    float32 input in float32; integer images as floats, which scipy's ``grid-constant``
    prefilter needs to pad them with ``cval`` rather than its integer cast).
    """
    d = _check_images(images)
    order, mode, cval = check_order(order), check_mode(mode), check_cval(cval)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    dtype = output_dtype(images.dtype, out_dtype if out is None else out.dtype)
    M = _check_matrices(matrix, d, images.shape[0])
    if is_cupy_array(images):
        return _warp_cupy(images, M, order, mode, cval, dtype)
    images = np.asarray(images)
    shape = images.shape[1:]
    if out is None:
        out = np.empty(images.shape, dtype=dtype)
    elif not isinstance(out, np.ndarray) or out.shape != images.shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous NumPy array of shape {images.shape}")
    if images.shape[0] == 0 or 0 in shape:
        return out
    if method == "auto":
        method = choose_method(
            shape,
            images.shape[0],
            shared=M.ndim == 2,
            order=order,
            mode=mode,
            dtype=dtype,
            matrix=M,
        )
    if method == "operator":
        if M.ndim != 2 or order > 1 or min(shape) < 2:
            raise ValueError(
                "method='operator' needs one shared matrix, order <= 1 and at least 2 pixels "
                "along every axis"
            )
        if _identity(M, mode):
            out[...] = images
            return out
        op = _CACHE.get(
            _key(shape, M, order, mode, dtype),
            lambda: _Plan(shape, M, order, mode, dtype),
        )
        op.apply(images, out, cval)
    else:
        _warp_scipy(images, M, order, mode, cval, out)
    return out
