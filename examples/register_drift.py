"""Correct the drift of an image stack, from zarr to zarr, and check the known answer.

A stack is made from scikit-image's ``camera`` moved by a random walk of small rotations
and shifts (a tomography-style drift), written to zarr, registered lazily to its first
image on a local cluster, and the recovered motions are compared with the truth as
matrices. A large single rotation shows the capture range of one pair.

Run: python examples/register_drift.py [N_IMAGES] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr
from scipy import ndimage
from skimage import data

import scalign
from scalign.kernels.affine import image_center, pull_matrix


def drifting_stack(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``camera`` (256², cropped to 192 × 224 after moving) and its forward motions."""
    img = data.camera().astype(np.float32)[::2, ::2]
    c = image_center(img.shape)
    rng = np.random.default_rng(seed)
    truth = [np.eye(3)]
    for _ in range(n - 1):
        step = scalign.build_affine_matrix(rng.normal(0, 0.5), *rng.normal(0, 0.8, 2), center=c)
        truth.append(step @ truth[-1])
    window = (slice(32, 224), slice(16, 240))
    frames = [ndimage.affine_transform(img, *pull_matrix(M), order=3)[window] for M in truth]
    # the same motions about the window's corner (16, 32), the frames' own pixel origin
    shift = scalign.build_affine_matrix(tx=16, ty=32)
    return np.stack(frames), np.array([scalign.invert(shift) @ M @ shift for M in truth])


def errors(estimated: np.ndarray, truth: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Rotation (°) and displacement of the centre (px) of each ``M_est M_true⁻¹``."""
    E = estimated @ scalign.invert(truth)
    angles = np.degrees(np.abs(np.arctan2(E[:, 1, 0], E[:, 0, 0])))
    moved = np.einsum("kij,j->ki", E[:, :2, :2], center) + E[:, :2, 2] - center
    return np.stack([angles, np.abs(moved).max(axis=1)], axis=1)


def main(n_images: int = 40, plot: str | None = None) -> None:
    frames, truth = drifting_stack(n_images)
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "stack.zarr", Path(tmp) / "registered.zarr"
        scalign.save_zarr(scalign.make_stack(frames, chunks=10), source)

        stack = xr.open_zarr(source, consolidated=False)  # lazy, chunked along image
        result = scalign.register_stack(stack, reference="first", transform="rigid")
        print(result)  # matrix, loss, iterations, registered: nothing computed yet

        with scalign.scheduler(local=True, n_workers=2):
            scalign.save_zarr(result, target, compute=lambda d: scalign.run(d, progress=True))

        out = xr.open_zarr(target, consolidated=False)
        err = errors(out["matrix"].values, truth, image_center(frames.shape[1:]))
        print(f"drift: up to {np.abs(truth[:, :2, 2]).max():.1f} px over {n_images} images")
        rotation, centre = err.max(axis=0)
        print(f"rotation error max {rotation:.4f}°, centre error max {centre:.4f} px")
        if plot:
            import matplotlib

            matplotlib.use("Agg")
            from scalign.plot import stack_drift

            axes = stack_drift(out)  # where each motion takes the image centre, and its angle
            axes[0].figure.savefig(plot)
            print(f"drift curves written to {plot}")

    # one pair far outside a local optimiser's capture range: 120° and (20, -12) px
    ref = data.camera().astype(np.float32)
    M = scalign.build_affine_matrix(120, 20, -12, center=image_center(ref.shape))
    mov = ndimage.affine_transform(ref, *pull_matrix(M), order=3)
    _, M_est, info = scalign.register_affine_2d(ref, mov, "rigid")
    err = errors(M_est[None], M[None], image_center(ref.shape))[0]
    print(
        f"single pair at 120°: theta {info.parameters['theta']:.4f}°, "
        f"rotation error {err[0]:.4f}°, centre error {err[1]:.4f} px, loss {info.loss:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_images", nargs="?", type=int, default=40)
    parser.add_argument("--plot", help="write the drift curves to this PNG")
    args = parser.parse_args()
    main(args.n_images, args.plot)
