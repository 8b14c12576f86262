"""Fused CUDA solve of Horn's 4×4 eigenproblem, one thread per item, for CuPy batches.

:mod:`scalign.kernels.qcp` solves :math:`\\lambda_{max}` by Newton on the QCP quartic with
one array operation per step over the batch, and leaves items it cannot pin down to a
batched SVD. On a GPU that is dozens of kernel launches over the whole batch per step, and
the SVD of the flagged items (most pairs of rod-like structures, where the quartic's
rounding, :math:`\\epsilon \\lambda^4`, over :math:`P'(\\lambda_{max})` is large) costs more
than everything else. Here each thread instead diagonalises its item's
:math:`K` (:func:`scalign.kernels.qcp.horn_matrix`) by cyclic Jacobi rotations in registers:
a few hundred floating-point operations, no launches per step, and eigenvalues accurate
to :math:`O(\\epsilon \\lVert K\\rVert_F)` whether or not they are close (Jacobi's relative
accuracy does not depend on the gaps), so no item needs the SVD for
:math:`\\lambda_{max}`.

The solve works on :math:`2^{-e} K` with entries of at most 1 (an exact scaling, so that
no square over- or underflows). The error bound returned with :math:`\\lambda_{max}` is
the Frobenius norm of what is left off the diagonal (Weyl) plus :math:`8 \\epsilon
\\lVert K\\rVert_F` per sweep of rotations, or the quartic's bound of
:func:`scalign.kernels.qcp.largest_eigenvalue` at that :math:`\\lambda`, whichever is
smaller (the quartic's is often 10-20x smaller: with Jacobi's alone, near-identical pairs
went to the SVD in ``pairwise_rmsd``).

The rotation is the quaternion of :math:`\\lambda_{max}`'s eigenvector. It is ill-determined
when :math:`\\lambda_{max}` is nearly repeated; such items are flagged ``unsure`` by the rule
of :func:`scalign.kernels.qcp.qcp_rotation` (the product of the eigen-gaps, which is the
norm of its adjugate column, below ``_ADJUGATE_RTOL`` of the scale cubed, computed as
the product of each gap over the scale; or the bound above ``_EIGENVALUE_RTOL`` of the
scale) and re-solved by SVD by the caller.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scalign.kernels.elementwise import Elementwise, compiled
from scalign.kernels.qcp import _ADJUGATE_RTOL, _EIGENVALUE_RTOL, _ROUNDING_ULPS, _horn_entries

Array = Any

#: Most sweeps of the six rotations; cyclic Jacobi converges quadratically, in ~5 sweeps.
MAX_SWEEPS = 30

PREAMBLE = r"""
#define QCP_EPS {eps!r}
#define QCP_MAX_SWEEPS {sweeps}

// Eigenvalues w[4] of the symmetric a (destroyed) and eigenvectors as the columns of v, by
// cyclic Jacobi rotations A <- J^T A J (Golub & Van Loan 8.5); returns a bound on the
// eigenvalues' error: the off-diagonal Frobenius norm left plus 8 eps |A|_F per sweep.
__device__ double qcp_jacobi4(double a[4][4], double v[4][4], double w[4])
{{
    // on 2^-e a, whose entries are at most 1 (exact): its squares neither overflow nor
    // underflow (entries of 1e-165 stopped the sweeps at once with a bound of 0)
    double big = 0.0;
    for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) big = fmax(big, fabs(a[r][c]));
    int e = 0;
    if (big > 0.0 && isfinite(big)) {{
        frexp(big, &e);
        for (int r = 0; r < 4; ++r)
            for (int c = 0; c < 4; ++c) a[r][c] = ldexp(a[r][c], -e);
    }}
    double norm2 = 0.0;
    for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) {{
            norm2 += a[r][c] * a[r][c];
            v[r][c] = (r == c) ? 1.0 : 0.0;
        }}
    int sweeps = 0;
    double off2 = 0.0;
    for (; sweeps < QCP_MAX_SWEEPS; ++sweeps) {{
        off2 = 0.0;
        #pragma unroll
        for (int p = 0; p < 3; ++p)
            #pragma unroll
            for (int q = p + 1; q < 4; ++q) off2 += 2.0 * a[p][q] * a[p][q];
        if (!(off2 > QCP_EPS * QCP_EPS * norm2)) break;
        #pragma unroll
        for (int p = 0; p < 3; ++p)
            #pragma unroll
            for (int q = p + 1; q < 4; ++q) {{
                const double apq = a[p][q];
                if (apq == 0.0) continue;
                // hypot keeps theta^2 + 1 from overflowing where a_pq is negligible
                const double theta = (a[q][q] - a[p][p]) / (2.0 * apq);
                const double t = copysign(1.0, theta) / (fabs(theta) + hypot(theta, 1.0));
                const double c = 1.0 / sqrt(t * t + 1.0);
                const double s = t * c;
                #pragma unroll
                for (int k = 0; k < 4; ++k) {{
                    const double akp = a[k][p], akq = a[k][q];
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }}
                #pragma unroll
                for (int k = 0; k < 4; ++k) {{
                    const double apk = a[p][k], aqk = a[q][k];
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }}
                a[p][q] = 0.0;
                a[q][p] = 0.0;
                #pragma unroll
                for (int k = 0; k < 4; ++k) {{
                    const double vkp = v[k][p], vkq = v[k][q];
                    v[k][p] = c * vkp - s * vkq;
                    v[k][q] = s * vkp + c * vkq;
                }}
            }}
    }}
    for (int r = 0; r < 4; ++r) w[r] = ldexp(a[r][r], e);
    return ldexp(sqrt(off2) + 8.0 * QCP_EPS * (sweeps + 1) * sqrt(norm2), e);
}}

// Horn's matrix K of the row-major cross-covariance s[9] (as scalign.kernels.qcp).
__device__ void qcp_horn(const double s[9], double k[4][4])
{{
{horn}
}}

// lambda_max of K(s); its unit eigenvector q (w, x, y, z), the product of its gaps to the
// other three eigenvalues, each over |lambda_max| + |bound| (the product over that cubed
// over- or underflowed beyond 1e+-102), and the error bound. Every array index is a
// compile-time constant once the loops are unrolled, so everything stays in registers.
__device__ double qcp_solve(const double s[9], double bound, double q[4], double* gaps,
                            double* error)
{{
    double k[4][4], v[4][4], w[4];
    qcp_horn(s, k);
    *error = qcp_jacobi4(k, v, w);
    double lam = w[0];
    int best = 0;
    #pragma unroll
    for (int r = 0; r < 4; ++r) q[r] = v[r][0];
    #pragma unroll
    for (int c = 1; c < 4; ++c)
        if (w[c] > lam) {{
            lam = w[c];
            best = c;
            #pragma unroll
            for (int r = 0; r < 4; ++r) q[r] = v[r][c];
        }}
    const double scale = fabs(lam) + fabs(bound);
    double product = 1.0;
    #pragma unroll
    for (int c = 0; c < 4; ++c)
        if (c != best) product *= (lam - w[c]) / scale;
    *gaps = product;
    return lam;
}}

// Whether the rotation of lambda_max is ill-determined (the rule of
// scalign.kernels.qcp.qcp_rotation): gaps from qcp_solve, error its bound.
__device__ bool qcp_unsure(double gaps, double error, double lam, double bound)
{{
    return !(gaps > {adjugate!r}) || !(error <= {eigenvalue!r} * (fabs(lam) + fabs(bound)));
}}

// The rotation matrix R (row-major, R x ~ y) of the unit quaternion q = (w, x, y, z), as
// scalign.kernels.qcp.quaternion_rotation.
__device__ void qcp_quaternion_matrix(const double q[4], double R[9])
{{
    const double w = q[0], x = q[1], y = q[2], z = q[3];
    R[0] = w * w + x * x - y * y - z * z;
    R[1] = 2.0 * (x * y - w * z);
    R[2] = 2.0 * (x * z + w * y);
    R[3] = 2.0 * (y * x + w * z);
    R[4] = w * w - x * x + y * y - z * z;
    R[5] = 2.0 * (y * z - w * x);
    R[6] = 2.0 * (z * x - w * y);
    R[7] = 2.0 * (z * y + w * x);
    R[8] = w * w - x * x - y * y + z * z;
}}

// The bound of scalign.kernels.qcp.largest_eigenvalue at lam: (2 |P| + rounding) / |P'| on
// the QCP quartic, often 10-20x below Jacobi's; -1 where P' is 0 (no bound). Evaluated for
// 2^-e S and 2^-e lam with entries of at most 1, then scaled back: lam^4 of covariances of
// 1e-80 underflowed to a bound of 0.
__device__ double qcp_quartic_bound(const double S[9], double lam)
{{
    double big = 0.0;
    for (int r = 0; r < 9; ++r) big = fmax(big, fabs(S[r]));
    if (!(big > 0.0) || !isfinite(big)) return -1.0;
    int exponent;
    frexp(big, &exponent);
    double s[9];
    for (int r = 0; r < 9; ++r) s[r] = ldexp(S[r], -exponent);
    lam = ldexp(lam, -exponent);
    const double a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5];
    const double g = s[6], h = s[7], k = s[8];
    const double cof[9] = {{e * k - f * h, f * g - d * k, d * h - e * g,
                            c * h - b * k, a * k - c * g, b * g - a * h,
                            b * f - c * e, c * d - a * f, a * e - b * d}};
    const double det = a * cof[0] + b * cof[1] + c * cof[2];
    double norm2 = 0.0, cof2 = 0.0;
    for (int r = 0; r < 9; ++r) {{
        norm2 += s[r] * s[r];
        cof2 += cof[r] * cof[r];
    }}
    const double c2 = -2.0 * norm2, c1 = -8.0 * det, c0 = norm2 * norm2 - 4.0 * cof2;
    const double lam2 = lam * lam;
    const double p = (lam2 + c2) * lam2 + c1 * lam + c0;
    const double dp = fabs((4.0 * lam2 + 2.0 * c2) * lam + c1);
    const double terms = lam2 * (lam2 - c2) + fabs(c1 * lam) + fabs(c0);
    return dp > 0.0 ? ldexp((2.0 * fabs(p) + {rounding!r} * QCP_EPS * terms) / dp, exponent) : -1.0;
}}
"""

_S = ("s00", "s01", "s02", "s10", "s11", "s12", "s20", "s21", "s22")
_R = ("r00", "r01", "r02", "r10", "r11", "r12", "r20", "r21", "r22")
_LOAD = "const double s[9] = {" + ", ".join(_S) + "};\ndouble q[4], gaps, error;\n"

_LAMBDA = (
    _LOAD
    + """lam = qcp_solve(s, 0.0, q, &gaps, &error);
const double quartic = qcp_quartic_bound(s, lam);
err = (quartic >= 0.0 && quartic < error) ? quartic : error;
"""
)

_ROTATION = (
    _LOAD
    + r"""lam = qcp_solve(s, bound, q, &gaps, &error);
unsure = qcp_unsure(gaps, error, lam, bound);
double R[9];
qcp_quaternion_matrix(q, R);
// straight into the (B, 3, 3) result, as the finish of scalign.kernels.kabsch_cuda
const long long item = i;
for (int k = 0; k < 9; ++k) rotation[9 * item + k] = R[k];
"""
)


def _horn_source() -> str:
    """The entries of :func:`scalign.kernels.qcp._horn_entries` as C assignments, written
    by evaluating that function on symbolic entries (one definition of Horn's matrix)."""

    class Term(str):
        def __add__(self, other):
            return Term(f"({self} + {other})")

        def __sub__(self, other):
            return Term(f"({self} - {other})")

        def __neg__(self):
            return Term(f"(-{self})")

    class Symbols:
        def __getitem__(self, key):
            _, r, c = key
            return Term(f"s[{3 * r + c}]")

    rows = _horn_entries(Symbols())
    return "\n".join(f"    k[{r}][{c}] = {rows[r][c]};" for r in range(4) for c in range(4))


def source() -> str:
    """CUDA C of the device functions shared by both kernels (:data:`PREAMBLE` filled in)."""
    return PREAMBLE.format(
        eps=float(np.finfo(np.float64).eps),
        sweeps=MAX_SWEEPS,
        horn=_horn_source(),
        rounding=2.0 * _ROUNDING_ULPS,
        adjugate=_ADJUGATE_RTOL,
        eigenvalue=_EIGENVALUE_RTOL,
    )


_INPUTS = ", ".join(f"float64 {s}" for s in _S)
#: λmax of Horn's matrix and its error bound, per item.
LAMBDA = Elementwise(
    _INPUTS, "float64 lam, float64 err", _LAMBDA, "scalign_qcp_lambda", preamble=source()
)
#: The rotation and λmax, flagged where the bound does not hold it (``unsure``).
ROTATION = Elementwise(
    _INPUTS + ", float64 bound",
    "float64 lam, bool unsure, raw float64 rotation",
    _ROTATION,
    "scalign_qcp_rotation",
    preamble=source(),
)


def _entries(S: Array) -> list[Array]:
    return [S[..., r, c] for r in range(3) for c in range(3)]


def largest_eigenvalue(S: Array) -> tuple[Array, Array]:
    """:math:`\\lambda_{max}` of Horn's matrix and a bound on its error for CuPy
    cross-covariances ``S (..., 3, 3)`` (any strides), as
    :func:`scalign.kernels.qcp.largest_eigenvalue` returns them."""
    import cupy

    S = cupy.asarray(S, dtype=cupy.float64)
    return compiled(LAMBDA)(*_entries(S))


def qcp_rotation(S: Array, bound: Array) -> tuple[Array, Array, Array]:
    """``(R, lam, unsure)`` for CuPy cross-covariances ``S (..., 3, 3)`` and the scale
    ``bound (...)``, as :func:`scalign.kernels.qcp.qcp_rotation` returns them."""
    import cupy

    S = cupy.asarray(S, dtype=cupy.float64)
    batch = S.shape[:-2]
    R, lam, unsure = cupy.empty(S.shape), cupy.empty(batch), cupy.empty(batch, dtype=bool)
    bound = cupy.asarray(bound, dtype=cupy.float64)
    # raw arguments are indexed flat: a 1-D view of the C-contiguous result
    compiled(ROTATION)(*_entries(S), bound, lam, unsure, R.reshape(-1))
    return R, lam, unsure
