"""Fused CUDA finish of a CuPy superposition: from the moments to the fit in one kernel.

After :func:`scalign.kernels.moments_cuda.fused_moments`, what
:func:`scalign.kernels.kabsch.superpose` computes per item (the rotation from Horn's
matrix, the scale, :math:`e^2 = \\sigma_y^2 - 2 s \\lambda_{max} + s^2 \\sigma_x^2`, the
translation :math:`t = \\bar y - s R \\bar x`, :math:`r^2` and the NaN of a non-finite item)
is some forty array operations over the batch on a GPU, a third of the time of reading the
structures once. Here one thread per item does all of it, with the Jacobi solve of
:mod:`scalign.kernels.qcp_cuda`, and flags the items the general path must redo: those
whose rotation is ill-determined (``unsure``, re-solved by SVD there) and those far from
the origin relative to their size (beyond ``_FAR_FROM_ORIGIN``: their moments are taken
again, centred first). Items whose closed-form :math:`e^2` has cancelled (below
``_CANCELLATION`` of the second moments: near-perfect fits, and every fit of a long rod)
get the explicit residual from :func:`residual`, one thread per item.
"""

from __future__ import annotations

from typing import Any

from scalign._array import namespace
from scalign.kernels.elementwise import Elementwise, compiled
from scalign.kernels.kabsch import _CANCELLATION, _FAR_FROM_ORIGIN
from scalign.kernels.qcp_cuda import _R, _S, _entries, source

Array = Any

_CX = ("cx0", "cx1", "cx2")
_CY = ("cy0", "cy1", "cy2")

_FINISH = rf"""
const double s[9] = {{{", ".join(_S)}}};
const double cx[3] = {{{", ".join(_CX)}}};
const double cy[3] = {{{", ".join(_CY)}}};
bool ok = isfinite(gx) && isfinite(gy);
for (int k = 0; k < 9; ++k) ok = ok && isfinite(s[k]);
// a non-finite item is solved for the identity (NaN results below), as the general path
const double eye[9] = {{1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0}};
double h[9];
for (int k = 0; k < 9; ++k) h[k] = ok ? s[k] : eye[k];
const double bound = ok ? 0.5 * (gx + gy) : 1.5;
double q[4], gaps, error;
const double lam = qcp_solve(h, bound, q, &gaps, &error);
const bool unsure = qcp_unsure(gaps, error, lam, bound);
double R[9];
qcp_quaternion_matrix(q, R);
const double sc = (scaled && gx > 0.0) ? lam / gx : 1.0;
const double e2 = gy - 2.0 * sc * lam + sc * sc * gx;
const double norm2 = cx[0] * cx[0] + cx[1] * cx[1] + cx[2] * cx[2];
const double size = sc * sc * gx + gy + norm2;
const bool close = ok && e2 < {_CANCELLATION!r} * size;
const bool far = ok && norm2 > {_FAR_FROM_ORIGIN!r} * gx;
redo = ok && (unsure || far);
refit = ok && close && !redo;
const double nan_ = nan("");
const double e2c = e2 < 0.0 ? 0.0 : e2;
double t[3];
for (int a = 0; a < 3; ++a)
    t[a] = cy[a] - sc * (R[3 * a] * cx[0] + R[3 * a + 1] * cx[1] + R[3 * a + 2] * cx[2]);
// straight into the (B, 3, 3) and (B, 3) results: stacking nine columns took longer than
// the arithmetic of the whole kernel (0.26 of 0.66 ms per million items on an H200)
// (CuPy's index i is 32-bit for arrays of under 2^31 elements)
const long long item = i;
for (int k = 0; k < 9; ++k) rotation[9 * item + k] = ok ? R[k] : nan_;
for (int a = 0; a < 3; ++a) translation[3 * item + a] = ok ? t[a] : nan_;
scale = ok ? sc : nan_;
rmsd = ok ? sqrt(e2c) : nan_;
r2 = (ok && gy > 0.0) ? 1.0 - e2c / gy : nan_;
"""


_FINISH_INPUTS = ", ".join(f"float64 {v}" for v in (*_S, *_CX, *_CY, "gx", "gy"))
_FINISH_OUTPUTS = "raw float64 rotation, raw float64 translation, float64 scale, float64 rmsd"
#: A batch's fits from its moments, flagging the items for the general path or the residual.
FINISH = Elementwise(
    _FINISH_INPUTS + ", bool scaled",
    _FINISH_OUTPUTS + ", float64 r2, bool redo, bool refit",
    _FINISH,
    "scalign_superpose_finish",
    preamble=source(),
)


def finish(cx: Array, cy: Array, H: Array, gx: Array, gy: Array, scale: bool):
    """``(rotation, translation, scale, rmsd, r2, redo, refit)`` of a batch from its
    float64 CuPy moments (``cx (B, 3)``, ``cy (3,)`` or ``(B, 3)``, ``H (B, 3, 3)``,
    ``gx``, ``gy`` ``(B,)``; any strides), as :func:`scalign.kernels.kabsch.superpose`
    returns them for proper rotations; ``redo (B,)`` flags the items the general path must
    compute again, ``refit (B,)`` those whose rotation is right but whose ``rmsd`` and
    ``r2`` need :func:`residual` (module docstring)."""
    import cupy

    B = H.shape[0]
    rotation = cupy.empty((B, 3, 3))
    translation = cupy.empty((B, 3))
    scale_, rmsd, r2 = (cupy.empty(B) for _ in range(3))
    redo, refit = cupy.empty(B, dtype=bool), cupy.empty(B, dtype=bool)
    # raw arguments are indexed flat: 1-D views of the C-contiguous results
    flat = rotation.reshape(-1), translation.reshape(-1)
    columns = _columns(H, cx, cy)
    compiled(FINISH)(*columns, gx, gy, bool(scale), *flat, scale_, rmsd, r2, redo, refit)
    return rotation, translation, scale_, rmsd, r2, redo, refit


def _columns(M: Array, cx: Array, cy: Array) -> list[Array]:
    """The per-item arguments of :data:`FINISH` and :data:`RESIDUAL`: the nine entries of
    ``M (m, 3, 3)``, then the coordinates of ``cx (m, 3)`` and of ``cy`` (``(3,)`` stands
    for every item), each an ``(m,)`` view."""
    cy = namespace(cx).broadcast_to(cy, cx.shape)
    return [*_entries(M), *(cx[:, a] for a in range(3)), *(cy[:, a] for a in range(3))]


_RESIDUAL = rf"""
// e^2 = sum_k p_k |s R (x_k - cx) - (y_k - cy)|^2 of item `item`, in float64
const double R[9] = {{{", ".join(_R)}}};
const double cx[3] = {{{", ".join(_CX)}}};
const double cy[3] = {{{", ".join(_CY)}}};
const long long first = item * n * 3;
double sum = 0.0;
for (long long k = 0; k < n; ++k) {{
    double x[3], sq = 0.0;
    for (int a = 0; a < 3; ++a) x[a] = (double)X[first + 3 * k + a] - cx[a];
    for (int a = 0; a < 3; ++a) {{
        const double r = sc * (R[3 * a] * x[0] + R[3 * a + 1] * x[1] + R[3 * a + 2] * x[2])
                         - (Y[3 * k + a] - cy[a]);
        sq += r * r;
    }}
    sum += p[k] * sq;
}}
e2 = sum;
"""


_PER_ITEM = ", ".join(f"float64 {v}" for v in (*_R, *_CX, *_CY, "sc"))
#: The explicit residual of chosen items, one thread per item.
RESIDUAL = Elementwise(
    f"int64 item, raw T X, raw float64 Y, raw float64 p, int64 n, {_PER_ITEM}",
    "float64 e2",
    _RESIDUAL,
    "scalign_superpose_residual",
)


def residual(X: Array, Y: Array, p: Array, items: Array, R: Array, cx: Array, cy: Array, s):
    """The explicit mean squared residual :math:`\\sum_k p_k \\lVert s R (x_k - \\bar
    x) - (y_k - \\bar y)\\rVert^2` of the ``items`` of a C-contiguous CuPy batch ``X (B,
    n, 3)`` against ``Y (n, 3)`` with probabilities ``p (n,)``, given their fits (``R (m,
    3, 3)``, ``cx (m, 3)``, ``cy (3,)``, ``s (m,)``): one thread per item, for those whose
    closed-form :math:`e^2` has cancelled (the general path's ~40 array operations over
    float64 copies of them; with the unfused solve, superpose on 1,000-point helices ran
    at 3.5M/s on an H200, 0.29 s per million, 40 times its moments pass)."""
    import cupy

    n = X.shape[1]
    columns = _columns(R, cx, cy)
    # raw arguments are indexed flat: C-contiguous 1-D views
    X, Y, p = (cupy.ascontiguousarray(a).reshape(-1) for a in (X, Y, p))
    return compiled(RESIDUAL)(items, X, Y, p, n, *columns, s)
