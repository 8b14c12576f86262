"""Fused CUDA kernel for the superposition moments of a batch against one reference.

For a batch ``X (B, n, 3)`` (float32 or float64), one target ``Y (n, 3)`` and one
probability vector ``p (n,)``, :func:`fused_moments` returns what
:func:`scalign.kernels.kabsch._shared_moments` returns,

.. math::  \\bar x_b = \\sum_k p_k x_{bk}, \\quad
           H_b = \\sum_k p_k\\, x_{bk} (y_k - \\bar y)^T, \\quad
           \\sigma^2_{x,b} = \\sum_k p_k \\lVert x_{bk}\\rVert^2 - \\lVert \\bar x_b\\rVert^2,

(``H`` needs no centring of ``X`` because ``Y - ȳ`` sums to zero under ``p``) in one read of
``X``: one CUDA block per item, each thread accumulating the 13 sums of its points in
float64, then a warp-shuffle and shared-memory reduction. The NumPy path does the same with
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
#: Points each thread takes before the block grows by one warp (up to MAX_THREADS).
POINTS_PER_THREAD = 4
MAX_THREADS = 256

_SOURCE = r"""
extern "C" __global__ void shared_moments_{name}(
    const {ctype}* __restrict__ X,     // (B, n, 3), C order
    const double* __restrict__ Yc,     // (n, 3): the target minus its weighted centroid
    const double* __restrict__ p,      // (n,): probabilities
    const long long B,
    const int n,
    double* __restrict__ out)          // (B, 13)
{{
    __shared__ double partial[13][32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (long long b = blockIdx.x; b < B; b += gridDim.x) {{
        const {ctype}* x = X + b * (long long)n * 3;
        double acc[13];
        #pragma unroll
        for (int j = 0; j < 13; ++j) acc[j] = 0.0;
        for (int k = threadIdx.x; k < n; k += blockDim.x) {{
            const double x0 = (double)x[3 * k];
            const double x1 = (double)x[3 * k + 1];
            const double x2 = (double)x[3 * k + 2];
            const double pk = p[k];
            const double y0 = pk * Yc[3 * k];
            const double y1 = pk * Yc[3 * k + 1];
            const double y2 = pk * Yc[3 * k + 2];
            acc[0] += x0 * y0; acc[1] += x0 * y1; acc[2] += x0 * y2;
            acc[3] += x1 * y0; acc[4] += x1 * y1; acc[5] += x1 * y2;
            acc[6] += x2 * y0; acc[7] += x2 * y1; acc[8] += x2 * y2;
            acc[9] += pk * x0; acc[10] += pk * x1; acc[11] += pk * x2;
            acc[12] += pk * (x0 * x0 + x1 * x1 + x2 * x2);
        }}
        #pragma unroll
        for (int j = 0; j < 13; ++j) {{
            #pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                acc[j] += __shfl_down_sync(0xffffffffu, acc[j], offset);
        }}
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
"""

_CTYPES = {"float32": "float", "float64": "double"}


def source(dtype_name: str) -> str:
    """CUDA C source of the kernel ``shared_moments_<dtype_name>`` for float32/float64."""
    return _SOURCE.format(name=dtype_name, ctype=_CTYPES[dtype_name])


@functools.cache
def _kernel(dtype_name: str):
    import cupy

    return cupy.RawKernel(source(dtype_name), f"shared_moments_{dtype_name}")


def threads_per_item(n: int) -> int:
    """Block size for ``n`` points: whole warps, ~:data:`POINTS_PER_THREAD` points per
    thread, at most :data:`MAX_THREADS`."""
    warps = math.ceil(n / (32 * POINTS_PER_THREAD))
    return int(min(MAX_THREADS, 32 * max(1, warps)))


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
    out = cupy.empty((B, SUMS), dtype=cupy.float64)
    if B:
        blocks = int(min(B, 32 * _multiprocessors(cupy.cuda.Device().id)))
        _kernel(X.dtype.name)(
            (blocks,),
            (threads_per_item(n),),
            (X, Yc, cupy.ascontiguousarray(p), cupy.int64(B), cupy.int32(n), out),
        )
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
