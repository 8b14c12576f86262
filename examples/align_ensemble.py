"""Align a synthetic ensemble lazily, from zarr to zarr, and check the known answer.

Run: python examples/align_ensemble.py [N_STRUCTURES]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

import scalign


def main(n_structures: int = 20_000) -> None:
    ens = scalign.helix_ensemble(n_structures, 64, noise=0.05, chunks=5_000, scale_range=(0.5, 2))
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "ensemble.zarr", Path(tmp) / "aligned.zarr"
        scalign.save_zarr(ens, source)

        lazy = scalign.open_ensemble(source)  # nothing read yet
        result = scalign.align(lazy, reference=lazy["reference"].values, scale=True)
        print(result)  # a lazy Dataset: aligned, rotation, translation, scale, rmsd, r2

        # On a local cluster; use scalign.scheduler("tcp://host:8786") for an existing one.
        with scalign.scheduler(local=True, n_workers=2) as client:
            print("dashboard-less cluster:", client.scheduler.address)
            scalign.save_zarr(result, target, compute=lambda d: scalign.run(d, progress=True))

        out = xr.open_zarr(target, consolidated=False)
        angle = scalign.rotation_angle(out["rotation"].values, ens["true_rotation"].values)
        print(f"median RMSD {np.median(out['rmsd'].values):.4f}")
        print(f"scale error max {float(abs(out['scale'] - ens['true_scale']).max()):.2e}")
        print(f"rotation error median {np.median(angle):.3f} deg")

        gpa = scalign.align(lazy, "mean", scale=True)
        print(
            f"generalized Procrustes: {gpa.attrs['gpa_iterations']} iterations, "
            f"mean RMSD to the mean {float(gpa['rmsd'].mean()):.4f}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
