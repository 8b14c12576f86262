"""Fused CUDA kernel for the superposition moments of a batch against one reference.

For a batch ``X (B, n, 3)`` (float32 or float64), one target ``Y (n, 3)`` and one
probability vector ``p (n,)``, :func:`fused_moments` returns what
:func:`scalign.kernels.kabsch._shared_moments` returns,

.. math::  \\bar x_b = \\sum_k p_k x_{bk}, \\quad
           H_b = \\sum_k p_k\\, x_{bk} (y_k - \\bar y)^T, \\quad
           \\sigma^2_{x,b} = \\sum_k p_k \\lVert x_{bk}\\rVert^2 - \\lVert \\bar x_b\\rVert^2,

(``H`` needs no centring of ``X`` because ``Y - ȳ`` sums to zero under ``p``) in one read of
``X``: each thread accumulates the 13 sums of its points in float64, then a warp-shuffle
reduction; items of up to :data:`WARP_POINTS` points take one warp each, larger ones one
block each (the warps' sums then meet in shared memory). The NumPy path does the same with
one GEMM per cache block; on a GPU that GEMM would need a float64 copy of ``X`` first
(three times the memory traffic of reading float32 once), and memory traffic is what bounds
this computation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

Array = Any

#: Sums per item: H (9, row-major ``H[a, c]``), Σ p x (3), Σ p |x|² (1).
SUMS = 13
#: Points each thread of the block-per-item kernel takes before the block grows by one
#: warp (up to MAX_THREADS).
POINTS_PER_THREAD = 4
MAX_THREADS = 256
#: Items up to this many points take one warp each (the block-per-item kernel's barriers
#: and shared-memory reduction cost as much as ~4 points per thread); larger ones a block.
WARP_POINTS = 4096
#: Threads per block of the warp-per-item kernels (4 items per block). At ~70 registers a
#: thread, 7 such blocks fit a Hopper multiprocessor (28 warps) where 3 of 256 threads did
#: (24): 4.55 against 4.80 ms per million 1,000-point float32 items on an H200. Capping the
#: registers at 64 for 32 warps spilled and ran slower (5.85 ms).
WARP_BLOCK = 128

_SOURCE = r"""
// The 13 sums of point k of item x: H (9), p x (3), p |x|^2, in float64; q = p (Y - ybar)
// is precomputed, the products p_k y_k done once, not per item.
__device__ __forceinline__ void accumulate_{name}(
    double acc[13], const {ctype}* __restrict__ x, const double* __restrict__ q,
    const double* __restrict__ p, const int k)
{{
    const double x0 = x[3 * k], x1 = x[3 * k + 1], x2 = x[3 * k + 2];
    const double pk = p[k];
    const double y0 = q[3 * k];
    const double y1 = q[3 * k + 1];
    const double y2 = q[3 * k + 2];
    acc[0] += x0 * y0; acc[1] += x0 * y1; acc[2] += x0 * y2;
    acc[3] += x1 * y0; acc[4] += x1 * y1; acc[5] += x1 * y2;
    acc[6] += x2 * y0; acc[7] += x2 * y1; acc[8] += x2 * y2;
    acc[9] += pk * x0; acc[10] += pk * x1; acc[11] += pk * x2;
    acc[12] += pk * (x0 * x0 + x1 * x1 + x2 * x2);
}}

// Lane 0 ends with the warp's sums.
__device__ __forceinline__ void warp_sum(double acc[13])
{{
    #pragma unroll
    for (int j = 0; j < 13; ++j) {{
        #pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
            acc[j] += __shfl_down_sync(0xffffffffu, acc[j], offset);
    }}
}}

// One block per item (many points): warps' sums meet in shared memory.
extern "C" __global__ void shared_moments_{name}({params})
{{
    __shared__ double partial[13][32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (long long b = blockIdx.x; b < B; b += gridDim.x) {{
        const {ctype}* x = X + b * (long long)n * 3;
        double acc[13] = {{}};
        for (int k = threadIdx.x; k < n; k += blockDim.x) accumulate_{name}(acc, x, q, p, k);
        warp_sum(acc);
        if (lane == 0) {{
            #pragma unroll
            for (int j = 0; j < 13; ++j) partial[j][warp] = acc[j];
        }}
        __syncthreads();
        if (threadIdx.x < 13) {{
            double s = 0.0;
            for (int w = 0; w < warps; ++w) s += partial[threadIdx.x][w];
            out[b * 13 + threadIdx.x] = s;
        }}
        __syncthreads();
    }}
}}

// One warp per item (up to WARP_POINTS points): no shared memory, no block barriers; the
// item loop is uniform across a warp, so the full-mask shuffles see every lane.
extern "C" __global__ void warp_moments_{name}({params})
{{
    const int lane = threadIdx.x & 31;
    const long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long stride = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long b = first; b < B; b += stride) {{
        const {ctype}* x = X + b * (long long)n * 3;
        double acc[13] = {{}};
        #pragma unroll 4
        for (int k = lane; k < n; k += 32) accumulate_{name}(acc, x, q, p, k);
        warp_sum(acc);
        if (lane == 0) {{
            #pragma unroll
            for (int j = 0; j < 13; ++j) out[b * 13 + j] = acc[j];
        }}
    }}
}}
"""

#: Every kernel's parameters: X (B, n, 3) C order; q (n, 3) = p (Y - ybar), ybar = p Y;
#: p (n,) probabilities; out (B, 13). (q as three rows (3, n), each warp's reads of it
#: contiguous, ran slower on an H200: 5.58 against 4.80 ms per million 1,000-point items.)
_PARAMS = (
    "const {ctype}* __restrict__ X, const double* __restrict__ q, "
    "const double* __restrict__ p, const long long B, const int n, double* __restrict__ out"
)

_CTYPES = {"float32": "float", "float64": "double"}
#: The kernels by layout (:func:`moment_sums`).
LAYOUTS = {"warp": "warp_moments", "block": "shared_moments"}


def source(dtype_name: str) -> str:
    """CUDA C source of the kernels (``<layout>_moments_<dtype_name>``) for
    float32/float64."""
    ctype = _CTYPES[dtype_name]
    params = _PARAMS.format(ctype=ctype)
    return _SOURCE.format(name=dtype_name, ctype=ctype, params=params)


@functools.cache
def _kernel(dtype_name: str, per: str):
    import cupy

    return cupy.RawKernel(source(dtype_name), f"{LAYOUTS[per]}_{dtype_name}")


def threads_per_item(n: int) -> int:
    """Block size of the block-per-item kernel for ``n`` points: whole warps,
    ~:data:`POINTS_PER_THREAD` points per thread, at most :data:`MAX_THREADS`."""
    warps = math.ceil(n / (32 * POINTS_PER_THREAD))
    return int(min(MAX_THREADS, 32 * max(1, warps)))


def layout(n: int) -> str:
    """``"warp"`` (one warp per item) up to :data:`WARP_POINTS` points, else ``"block"``."""
    return "warp" if n <= WARP_POINTS else "block"


def moment_sums(X: Array, Yc: Array, p: Array, per: str | None = None) -> Array:
    """The ``(B, 13)`` float64 sums of the module docstring for a C-contiguous CuPy ``X
    (B, n, 3)``, the centred target ``Yc (n, 3)`` and ``p (n,)`` (float64, contiguous), by
    the kernel ``per`` item (``"warp"`` or ``"block"``; default :func:`layout`)."""
    import cupy

    B, n, _ = X.shape
    per = layout(n) if per is None else per
    if per not in LAYOUTS:
        raise ValueError(f"no {per!r} moments kernel for {X.dtype} items of {n} points")
    q = cupy.ascontiguousarray(p[:, None] * Yc)
    out = cupy.empty((B, SUMS), dtype=cupy.float64)
    if B:
        resident = 32 * _multiprocessors(cupy.cuda.Device().id)
        if per != "block":
            threads = WARP_BLOCK
            blocks = min(math.ceil(B * 32 / threads), resident)
        else:
            threads = threads_per_item(n)
            blocks = min(B, resident)
        _kernel(X.dtype.name, per)(
            (int(blocks),), (threads,), (X, q, p, cupy.int64(B), cupy.int32(n), out)
        )
    return out


def fused_moments(X: Array, Y: Array, p: Array | None):
    """``(cx, cy, H, gx, gy)`` of a CuPy batch ``X (B, n, 3)`` against ``Y (n, 3)`` with
    probabilities ``p (n,)`` (``None``: uniform), as
    :func:`scalign.kernels.kabsch._shared_moments` (module docstring); float64."""
    import cupy

    B, n, d = X.shape
    if d != 3 or X.dtype.name not in _CTYPES:
        raise ValueError(f"fused_moments needs float32/float64 (B, n, 3), got {X.dtype} {X.shape}")
    X = cupy.ascontiguousarray(X)
    Y = cupy.asarray(Y, dtype=cupy.float64)
    p = cupy.full((n,), 1.0 / n) if p is None else cupy.asarray(p, dtype=cupy.float64)
    cy = p @ Y
    Yc = cupy.ascontiguousarray(Y - cy)
    out = moment_sums(X, Yc, cupy.ascontiguousarray(p))
    H = out[:, :9].reshape(B, 3, 3)
    cx = out[:, 9:12]
    gx = out[:, 12] - cupy.sum(cx * cx, axis=-1)
    gy = cupy.sum(p * cupy.sum(Yc * Yc, axis=-1))
    return cx, cy, H, gx, cupy.broadcast_to(gy, (B,))


@functools.lru_cache
def _multiprocessors(device: int) -> int:
    """The device's multiprocessor count, once per device (``Device.attributes`` queries
    every attribute on each call)."""
    import cupy

    return int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])
