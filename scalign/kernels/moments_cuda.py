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
#: Threads per block of the warp-per-item kernel (8 items per block).
WARP_BLOCK = 256

_SOURCE = r"""
// The 13 sums of a point with coordinates (x0, x1, x2), centred target row (y0, y1, y2) =
// p_k (y_k - ybar) and probability pk: H (9), p x (3), p |x|^2, in float64.
__device__ __forceinline__ void add_point(
    double acc[13], const double x0, const double x1, const double x2,
    const double y0, const double y1, const double y2, const double pk)
{{
    acc[0] += x0 * y0; acc[1] += x0 * y1; acc[2] += x0 * y2;
    acc[3] += x1 * y0; acc[4] += x1 * y1; acc[5] += x1 * y2;
    acc[6] += x2 * y0; acc[7] += x2 * y1; acc[8] += x2 * y2;
    acc[9] += pk * x0; acc[10] += pk * x1; acc[11] += pk * x2;
    acc[12] += pk * (x0 * x0 + x1 * x1 + x2 * x2);
}}

// Point k's row of q (3, n), one component per row so that a warp's 32 consecutive points
// read 256 contiguous bytes per component (q interleaved (n, 3) was 3 times the L1
// traffic, more than the structures' own), and its probability.
struct Target {{
    double y0, y1, y2, pk;
}};

__device__ __forceinline__ Target target_point(
    const double* __restrict__ q, const double* __restrict__ p, const int n, const int k)
{{
    return {{q[k], q[n + k], q[2 * n + k], p[k]}};
}}

__device__ __forceinline__ void accumulate_{name}(
    double acc[13], const {ctype}* __restrict__ x, const Target t, const int k)
{{
    add_point(acc, (double)x[3 * k], (double)x[3 * k + 1], (double)x[3 * k + 2],
              t.y0, t.y1, t.y2, t.pk);
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

// The sums of item b over its warp, written by lane 0.
__device__ __forceinline__ void store_warp_sums(
    double acc[13], double* __restrict__ out, const long long b)
{{
    warp_sum(acc);
    if ((threadIdx.x & 31) == 0) {{
        #pragma unroll
        for (int j = 0; j < 13; ++j) out[b * 13 + j] = acc[j];
    }}
}}

// A warp per item: this warp's first item, and the stride of the grid-stride item loop.
__device__ __forceinline__ long long warp_first()
{{
    return ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}}

__device__ __forceinline__ long long warp_stride()
{{
    return ((long long)gridDim.x * blockDim.x) >> 5;
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
        for (int k = threadIdx.x; k < n; k += blockDim.x)
            accumulate_{name}(acc, x, target_point(q, p, n, k), k);
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
    for (long long b = warp_first(); b < B; b += warp_stride()) {{
        const {ctype}* x = X + b * (long long)n * 3;
        double acc[13] = {{}};
        #pragma unroll 4
        for (int k = lane; k < n; k += 32) accumulate_{name}(acc, x, target_point(q, p, n, k), k);
        store_warp_sums(acc, out, b);
    }}
}}

// One warp per two items (b, b + 1), each point's row of q and p read once for both: half
// the target's share of the loads. An odd last item is summed twice, stored once.
extern "C" __global__ void pair_moments_{name}({params})
{{
    const int lane = threadIdx.x & 31;
    const long long pairs = (B + 1) >> 1;
    for (long long g = warp_first(); g < pairs; g += warp_stride()) {{
        const long long b = 2 * g;
        const bool second = b + 1 < B;
        const {ctype}* x = X + b * (long long)n * 3;
        const {ctype}* y = second ? x + (long long)n * 3 : x;
        double acc[13] = {{}}, bcc[13] = {{}};
        #pragma unroll 2
        for (int k = lane; k < n; k += 32) {{
            const Target t = target_point(q, p, n, k);
            accumulate_{name}(acc, x, t, k);
            accumulate_{name}(bcc, y, t, k);
        }}
        store_warp_sums(acc, out, b);
        if (second) store_warp_sums(bcc, out, b + 1);
    }}
}}
"""

_VEC4_SOURCE = r"""
// One warp per item, each lane taking four points per step from three 16-byte loads:
// a quarter of the load instructions of warp_moments (float32 items of n % 4 == 0 points,
// 16-byte aligned).
extern "C" __global__ void vec4_moments_float32({params})
{{
    const int lane = threadIdx.x & 31;
    const int groups = n >> 2;
    for (long long b = warp_first(); b < B; b += warp_stride()) {{
        const float4* x = reinterpret_cast<const float4*>(X + b * (long long)n * 3);
        double acc[13] = {{}};
        #pragma unroll 2
        for (int g = lane; g < groups; g += 32) {{
            const float4 a = x[3 * g], c = x[3 * g + 1], d = x[3 * g + 2];
            const int k = 4 * g;
            Target t = target_point(q, p, n, k);
            add_point(acc, a.x, a.y, a.z, t.y0, t.y1, t.y2, t.pk);
            t = target_point(q, p, n, k + 1);
            add_point(acc, a.w, c.x, c.y, t.y0, t.y1, t.y2, t.pk);
            t = target_point(q, p, n, k + 2);
            add_point(acc, c.z, c.w, d.x, t.y0, t.y1, t.y2, t.pk);
            t = target_point(q, p, n, k + 3);
            add_point(acc, d.y, d.z, d.w, t.y0, t.y1, t.y2, t.pk);
        }}
        store_warp_sums(acc, out, b);
    }}
}}
"""

#: Every kernel's parameters: X (B, n, 3) C order; q (3, n) = p (Y - ybar)^T, ybar = p Y;
#: p (n,) probabilities; out (B, 13).
_PARAMS = (
    "const {ctype}* __restrict__ X, const double* __restrict__ q, "
    "const double* __restrict__ p, const long long B, const int n, double* __restrict__ out"
)

_CTYPES = {"float32": "float", "float64": "double"}
#: The kernels by layout (:func:`moment_sums`).
LAYOUTS = {
    "warp": "warp_moments",
    "pair": "pair_moments",
    "block": "shared_moments",
    "vec4": "vec4_moments",
}


def source(dtype_name: str) -> str:
    """CUDA C source of the kernels (``<layout>_moments_<dtype_name>``) for
    float32/float64; the ``vec4`` one for float32 only."""
    ctype = _CTYPES[dtype_name]
    params = _PARAMS.format(ctype=ctype)
    code = _SOURCE.format(name=dtype_name, ctype=ctype, params=params)
    return code + _VEC4_SOURCE.format(params=params) if dtype_name == "float32" else code


@functools.cache
def _kernel(dtype_name: str, per: str):
    import cupy

    return cupy.RawKernel(source(dtype_name), f"{LAYOUTS[per]}_{dtype_name}")


def vec4_fits(X: Array) -> bool:
    """Whether the ``vec4`` kernel can read ``X``: float32, ``n % 4 == 0`` (every item
    16-byte aligned) and the data 16-byte aligned."""
    return X.dtype.name == "float32" and X.shape[1] % 4 == 0 and X.data.ptr % 16 == 0


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
    the kernel ``per`` item (``"warp"``, ``"pair"`` (a warp per two items), ``"block"`` or
    ``"vec4"`` (a warp per item reading 16 bytes at a time, where :func:`vec4_fits`);
    default :func:`layout`)."""
    import cupy

    B, n, _ = X.shape
    per = layout(n) if per is None else per
    if per not in LAYOUTS or (per == "vec4" and not vec4_fits(X)):
        raise ValueError(f"no {per!r} moments kernel for {X.dtype} items of {n} points")
    q = cupy.ascontiguousarray((p[:, None] * Yc).T)
    out = cupy.empty((B, SUMS), dtype=cupy.float64)
    if B:
        resident = 32 * _multiprocessors(cupy.cuda.Device().id)
        if per != "block":
            warps = (B + 1) // 2 if per == "pair" else B
            threads = WARP_BLOCK
            blocks = min(math.ceil(warps * 32 / threads), resident)
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
