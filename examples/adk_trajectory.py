"""The real AdK closed→open trajectory: C-alpha RMSD to frame 0, mass-weighted alignment.

Run: python examples/adk_trajectory.py [path/to/adk_dims.npz]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import scalign

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adk_dims.npz"


def main(path: Path = DEFAULT) -> None:
    ens = scalign.load_ensemble(path, chunks=49)  # coords (98, 3341, 3) Å, weights = masses
    with np.load(path) as data:
        ca = data["ca_indices"]

    ca_fit = scalign.align(ens.isel(point=ca), reference=0).compute()
    rmsd = ca_fit["rmsd"].values
    print(f"C-alpha RMSD to frame 0: first {rmsd[0]:.3f} Å, last {rmsd[-1]:.3f} Å")
    print("every 10th frame:", np.array2string(rmsd[::10], precision=2))

    heavy = scalign.align(ens, reference=0, weights="weights").compute()
    print(f"mass-weighted all-atom RMSD of the last frame: {float(heavy['rmsd'][-1]):.3f} Å")
    gpa = scalign.align(ens.isel(point=ca), "mean")
    print(f"C-alpha generalized Procrustes: {gpa.attrs['gpa_iterations']} iterations")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
