"""Independent float64 references for the superposition kernels (tests only).

``horn`` solves the rigid/similarity fit by Horn's (1987) quaternion method — the
eigenvector of a 4×4 symmetric matrix — one item at a time in float64: a different
algorithm from the SVD-based kernel under test.
"""

from __future__ import annotations

import numpy as np


def horn(X: np.ndarray, Y: np.ndarray, w: np.ndarray | None = None, scale: bool = False):
    """Fit ``Y ≈ s X R^T + t`` for one pair; return ``(R, t, s, rmsd)`` in float64."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    p = np.full(len(X), 1.0 / len(X)) if w is None else np.asarray(w, np.float64) / np.sum(w)
    cx, cy = p @ X, p @ Y
    A, B = X - cx, Y - cy
    S = (A * p[:, None]).T @ B
    (sxx, sxy, sxz), (syx, syy, syz), (szx, szy, szz) = S
    N = np.array(
        [
            [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
            [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
            [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
            [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
        ]
    )
    vals, vecs = np.linalg.eigh(N)
    q0, qx, qy, qz = vecs[:, -1]
    R = np.array(
        [
            [q0**2 + qx**2 - qy**2 - qz**2, 2 * (qx * qy - q0 * qz), 2 * (qx * qz + q0 * qy)],
            [2 * (qy * qx + q0 * qz), q0**2 - qx**2 + qy**2 - qz**2, 2 * (qy * qz - q0 * qx)],
            [2 * (qz * qx - q0 * qy), 2 * (qz * qy + q0 * qx), q0**2 - qx**2 - qy**2 + qz**2],
        ]
    )
    s = vals[-1] / np.sum(p * np.sum(A * A, axis=1)) if scale else 1.0
    t = cy - s * R @ cx
    r = s * X @ R.T + t - Y
    return R, t, s, float(np.sqrt(np.sum(p * np.sum(r * r, axis=1))))
