"""Fused CUDA trilinear interpolation of a padded spectrum, for CuPy projections.

:func:`scalign.kernels.projection._interpolated_values` reads :math:`\\hat V(\\omega)` at
every slice point by trilinear interpolation of the padded, gridding-corrected spectrum
``G (N, N, N)``: per point eight gathered corners, their weights and flat indices. As
array operations that is about a hundred passes over the points (int64 indices included)
per call, the most frequent operations of projection matching on a GPU. Here one thread
per point computes its grid coordinates, the eight weights and indices, and the sum, in
the points' precision (as the array version) and the spectrum's complex type.
"""

from __future__ import annotations

from typing import Any

from scalign.kernels.elementwise import Elementwise, compiled

Array = Any

_TRILINEAR = r"""
// grid coordinates (z, y, x) of the point: |w| <= n/2 keeps them in [0, N], and the
// spectrum of a sampled map is periodic, so the corner at N is the corner at 0
const T c[3] = {wz * padding + centre, wy * padding + centre, wx * padding + centre};
long long base[3];
T frac[3];
for (int a = 0; a < 3; ++a) {
    const T b = floor(c[a]);
    base[a] = (long long)b;
    frac[a] = c[a] - b;
}
C acc = C(0);
for (int corner = 0; corner < 8; ++corner) {
    T weight = 1;
    long long linear = 0;
    for (int a = 0; a < 3; ++a) {
        const int bit = (corner >> (2 - a)) & 1;
        weight *= bit ? frac[a] : T(1) - frac[a];
        linear = linear * N + ((base[a] + bit) % N + N) % N;
    }
    acc += G[linear] * weight;
}
// w = 0 lands exactly on the grid, where the gridding correction overshoots: the
// volume's sum there (see _interpolated_values)
v = (wx == T(0) && wy == T(0) && wz == T(0)) ? total : acc;
"""


#: Trilinear interpolation of a padded spectrum at slice points (T: their real dtype, C:
#: the spectrum's complex one).
TRILINEAR = Elementwise(
    "T wz, T wy, T wx, raw C G, int64 N, T padding, T centre, C total",
    "C v",
    _TRILINEAR,
    "scalign_trilinear",
)


def trilinear(G: Array, w: tuple, padding: int, total: Array) -> Array:
    """:math:`\\hat V(\\omega)` at the points ``w = (ω_x, ω_y, ω_z)`` (flat, cycles per box,
    float32 or float64) by trilinear interpolation of the CuPy spectrum ``G (N, N, N)``
    (:func:`scalign.kernels.projection.padded_spectrum`), ``total`` (the volume's sum, 0-d
    of ``G``'s dtype) at ω = 0; as :func:`scalign.kernels.projection._interpolated_values`."""
    import cupy

    N = G.shape[0]
    real = w[0].dtype
    flat = cupy.ascontiguousarray(G).reshape(-1)
    return compiled(TRILINEAR)(
        w[2],
        w[1],
        w[0],
        flat,
        N,
        real.type(padding),
        real.type(N // 2),
        cupy.asarray(total, dtype=G.dtype),
    )
