"""GPU throughput: scalign's CuPy kernels and ops on one CUDA device vs the 2-core CPU path.

On the same data in one run this times, on the GPU (CuPy arrays) and on the CPU (NumPy
copies of the first items: a smaller batch, every figure per item):

* the device's copy bandwidth: a device-to-device copy of a 4 GiB array (CUDA events, best
  of 3 after a warm-up; bytes read + written), the yardstick of the memory-bound rows;
* batched Kabsch, N = 10^6 x n = 1,000 float32 structures (12 GB; fewer when they do not
  fit): ``superpose(X, Y)`` (RMSD + rotation), ``apply_transform`` (aligned coordinates
  written) and both, ``moments_cuda.fused_moments`` alone, and the moments kernel's other
  layout (a block instead of a warp per item) for comparison;
  structures/s, and GB/s of X read as a share of the copy bandwidth (target >= 50%);
  then superpose on 1,000-point helices (rods: every e2 from the explicit residual);
* pairwise RMSD: the op ``pairwise_rmsd`` on 20,000 globules of 200 points moved to the
  GPU (``to_device``), and the kernel on one block of 4,000 structures; pairs/s (matrix
  entries);
* warping 2,000 x 1,024² float32 (``warp_images`` on CuPy), one shared matrix and one
  matrix per image; slices/s and GB/s (read + written);
* registering 512 x 1,024² float32 images (smooth noise moved by random rigid motions)
  onto the unmoved one, rigid, mse: ``estimate_motions`` (the batched estimate that
  ``register_stack`` runs on CuPy chunks, the reference prepared on the GPU per chunk)
  in chunks of 128, and the ``register_stack`` op on a CuPy stack in chunks of 128 (threaded
  Dask), against the per-image
  ``estimate_motion`` on the CPU; images/s;
* projection of a 256³ map at 1,000 orientations (``project(volume, A, eps=1e-3)`` with a
  CuPy volume: cufinufft where installed); projections/s;
* residual scores ``compare(P, images, mask)`` of 10,000 x 128² images; images/s;
* projection matching, ``match_images`` of 512 x 64² noisy CTF-filtered images against a
  64³ map at a 15° step with refinement (max_shift 4); images/s.

Each section checks the GPU result against the CPU one on the CPU's batch, prints its
GPU/CPU ratios at once (a run cut short keeps what it printed), and a section that fails
prints its error while the others still run. The CPU figures are measured on this
machine's own CPUs held to 2 threads, "the 2-core CPU path": the batch split in two halves
on 2 Python threads with BLAS/OpenMP held to 1 thread each (threadpoolctl), and the
pairwise op on Dask's threaded scheduler with 2 workers. Target: every GPU row >= 20x its
CPU row. GPU timings: a warm-up call first (compilation, FFT plans), the device
synchronised before the clock starts and before it stops, best of --repeat.

Without a usable CUDA device (``scalign.execution.gpu_available()`` False) it prints one
line and exits 0. The exit status is 1 when a correctness check or a section failed.

Run:  python benchmarks/bench_gpu.py              # full sizes (~1-3 min on an H200)
      python benchmarks/bench_gpu.py --quick      # smoke run: 20,000 x 200, 200 x 256², 64³
      python benchmarks/bench_gpu.py --only kabsch,warp
      python benchmarks/bench_gpu.py --profile match,project   # + cProfile of their GPU rows
      bash benchmarks/gpu_check.sh                # device machine: GPU tests, then this
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import _report as report
import dask
import numpy as np
from _report import Row, best_time, fmt_rate, status, verdict
from scipy.spatial.transform import Rotation
from threadpoolctl import threadpool_limits

import scalign
from scalign.execution import gpu_available, to_device
from scalign.kernels import moments_cuda
from scalign.kernels.affine import build_affine_matrix, image_center
from scalign.kernels.ctf import ctf_half_plane
from scalign.kernels.euler import euler_to_matrix
from scalign.kernels.kabsch import apply_transform, superpose
from scalign.kernels.matching import match_images
from scalign.kernels.orientations import orientation_grid, symmetry_distance
from scalign.kernels.pairwise import pairwise_rmsd as pairwise_kernel
from scalign.kernels.projection import project
from scalign.kernels.register import estimate_motion, prepare_template
from scalign.kernels.register_batch import estimate_motions, prepare_templates
from scalign.kernels.scores import circular_mask, compare
from scalign.kernels.warp import warp_images

SECTIONS = ("copy", "kabsch", "pairwise", "warp", "register", "project", "scores", "match")
TARGET_SPEEDUP = 20.0  # every GPU row vs the 2-core CPU path
TARGET_BANDWIDTH = 0.5  # superpose: GB/s of X read over the device's copy GB/s
CPU_THREADS = 2
GPU_WORKERS = 4  # Dask threads feeding the one GPU in the pairwise op
EPS = 1e-3  # projection accuracy
MATCH_STEP = 15.0  # degrees, the matching gallery's step
# Kabsch memory per structure, in multiples of X's bytes: X, a float64 copy and a float64
# temporary (the unfused moments path), the aligned output, headroom.
KABSCH_MEMORY = 7.0

FULL = {
    "copy_gib": 4,
    "structures": 1_000_000,
    "points": 1_000,
    "cpu_structures": 20_000,
    "pair_structures": 20_000,
    "pair_points": 200,
    "pair_chunk": 4_000,
    "pair_kernel": 4_000,
    "cpu_pair_structures": 2_000,
    "cpu_pair_kernel": 1_500,
    "slices": 2_000,
    "size": 1_024,
    "cpu_slices": 40,
    "register": 512,
    "register_size": 1_024,
    "register_chunk": 128,
    "cpu_register": 16,
    "volume": 256,
    "orientations": 1_000,
    "cpu_orientations": 1_000,
    "images": 10_000,
    "image_size": 128,
    "cpu_images": 1_000,
    "match_images": 512,
    "match_size": 64,
    "cpu_match_images": 16,
}
QUICK = {
    **FULL,
    "copy_gib": 1,
    "structures": 20_000,
    "points": 200,
    "cpu_structures": 2_000,
    "pair_structures": 2_000,
    "pair_chunk": 500,
    "pair_kernel": 1_000,
    "cpu_pair_structures": 500,
    "cpu_pair_kernel": 500,
    "slices": 200,
    "size": 256,
    "cpu_slices": 20,
    "register": 64,
    "register_size": 256,
    "register_chunk": 32,
    "cpu_register": 8,
    "volume": 64,
    "images": 1_000,
    "cpu_images": 200,
    "match_images": 32,
    "match_size": 32,
    "cpu_match_images": 8,
}

# (label, GPU row, CPU row): the ratios, each held to TARGET_SPEEDUP
PAIRS = [
    ("Kabsch superpose (RMSD + rotation)", "gpu.superpose", "cpu.superpose"),
    ("Kabsch apply_transform", "gpu.apply", "cpu.apply"),
    ("Kabsch superpose + apply_transform", "gpu.superpose_apply", "cpu.superpose_apply"),
    ("Kabsch superpose, rods (explicit e2)", "gpu.superpose_rods", "cpu.superpose_rods"),
    ("pairwise RMSD op", "gpu.pairwise_op", "cpu.pairwise_op"),
    ("pairwise RMSD kernel", "gpu.pairwise_kernel", "cpu.pairwise_kernel"),
    ("warp, one shared matrix", "gpu.warp_shared", "cpu.warp_shared"),
    ("warp, one matrix per image", "gpu.warp_each", "cpu.warp_each"),
    ("stack registration kernel, rigid", "gpu.register", "cpu.register"),
    ("stack registration op, rigid", "gpu.register_op", "cpu.register_op"),
    ("projection", "gpu.project", "cpu.project"),
    ("residual scores compare", "gpu.compare", "cpu.compare"),
    ("projection matching", "gpu.match", "cpu.match"),
]
ANCHOR = {
    "kabsch": "gpu.superpose",
    "pairwise": "gpu.pairwise_op",
    "warp": "gpu.warp_shared",
    "register": "gpu.register",
    "project": "gpu.project",
    "scores": "gpu.compare",
    "match": "gpu.match",
}
CPU_NOTE = f"CPU, {CPU_THREADS} threads"


# --------------------------------------------------------------------------------------
# timing on the device and on the 2-core CPU path
# --------------------------------------------------------------------------------------


def sync() -> None:
    import cupy

    cupy.cuda.Device().synchronize()


def free_gpu() -> None:
    """Wait for the device and hand CuPy's cached blocks back (between sections)."""
    import cupy

    sync()
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def gpu_time(
    fn: Callable[[], object],
    repeat: int,
    *,
    setup: Callable[[], object] | None = None,
    warmup: bool = True,
) -> list[float]:
    """``best_time`` of ``fn`` with the device synchronised before the clock starts (after
    ``setup``) and before it stops."""

    def before():
        if setup is not None:
            setup()
        sync()

    def run():
        fn()
        sync()

    times = best_time(run, repeat, setup=before, warmup=warmup)
    if PROFILE["section"] in PROFILE["sections"]:
        profile_call(run, before)
    return times


#: Sections whose GPU rows are profiled once more after timing (--profile) and the current one.
PROFILE: dict = {"sections": set(), "section": None}


def profile_call(run: Callable[[], object], before: Callable[[], object], top: int = 14) -> None:
    """One more call of ``run`` under cProfile; prints the functions with the most own time
    (where the host waits for the device, the time shows at the synchronising call)."""
    import cProfile
    import pstats

    before()
    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler, stream=sys.stdout)
    print(f"  profile of one more call ({PROFILE['section']}), {top} largest own times:")
    stats.strip_dirs().sort_stats("tottime").print_stats(top)


def halves(n: int) -> list[slice]:
    return [slice(0, n // 2), slice(n // 2, n)]


def cpu_time(
    fn: Callable[[slice], object],
    n: int,
    repeat: int,
    keep: dict | None = None,
    *,
    warmup: bool = True,
) -> list[float]:
    """Seconds of ``fn(half)`` over both halves of ``n`` items on 2 Python threads, BLAS
    and OpenMP held to 1 thread each: the 2-core CPU path. ``keep["cpu"]``: the two
    results of the last run."""
    with threadpool_limits(limits=1), ThreadPoolExecutor(CPU_THREADS) as pool:

        def run():
            out = list(pool.map(fn, halves(n)))
            if keep is not None:
                keep["cpu"] = out

        return best_time(run, repeat, warmup=warmup)


def first_working(call: Callable, variants: list[tuple[str, object]]):
    """``(result, label, value)`` of the first ``call(value)`` that does not raise (the
    argument a function takes as NumPy or CuPy); the first error when none works."""
    first = None
    for label, value in variants:
        try:
            return call(value), label, value
        except Exception as exc:  # try the next form of the argument
            first = first or exc
    raise first


def host(x) -> np.ndarray:
    import cupy

    return cupy.asnumpy(x)


# --------------------------------------------------------------------------------------
# the report as it goes
# --------------------------------------------------------------------------------------


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.checks: dict[str, bool] = {}
        self.errors: dict[str, str] = {}
        self.copy_bps: float | None = None  # device copy, bytes read + written per second

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(
            f"  {row.method}: {fmt_rate(row.rate)}/s  (best {row.seconds:.4f} s, worst "
            f"{max(row.times):.4f} s, {row.timed:,} per run)  {row.note}",
            flush=True,
        )
        return row

    def check(self, label: str, good: bool, text: str) -> None:
        self.checks[label] = bool(good)
        print(f"  check {label}: {text}  {verdict(bool(good))}", flush=True)

    def by_key(self) -> dict[str, Row]:
        return {r.key: r for r in self.rows}

    def ratios(self, keys: set[str] | None = None) -> None:
        """The GPU/CPU lines of the pairs whose rows both ran (``keys``: only those)."""
        rows = self.by_key()
        for label, gpu, cpu in PAIRS:
            if gpu in rows and cpu in rows and (keys is None or gpu in keys):
                r = rows[gpu].rate / rows[cpu].rate
                print(
                    f"  GPU/CPU {label}: {r:,.1f}x (target >= {TARGET_SPEEDUP:.0f}x: "
                    f"{status(r, TARGET_SPEEDUP)})",
                    flush=True,
                )

    def bandwidth(self, nbytes: float, seconds: float, what: str) -> str:
        """``"... GB/s <what>"`` and, once the copy was measured, its share of the copy."""
        gbs = nbytes / seconds / 1e9
        text = f"{gbs:,.0f} GB/s {what}"
        if self.copy_bps:
            text += f" = {nbytes / seconds / self.copy_bps:.0%} of copy"
        return text


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------


def bench_copy(cfg: dict, repeat: int, res: Results) -> None:
    """Device-to-device copy of ``copy_gib`` GiB, CUDA events: the memory's yardstick."""
    import cupy

    free, _ = cupy.cuda.Device().mem_info
    nbytes = min(cfg["copy_gib"] * 2**30, free // 4) // 16 * 16
    src = cupy.empty(nbytes // 4, dtype=cupy.float32)
    src.fill(1.0)
    dst = cupy.empty_like(src)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for i in range(repeat + 1):  # the first is the warm-up
        sync()
        start.record()
        cupy.copyto(dst, src)
        end.record()
        end.synchronize()
        if i:
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    best = min(times)
    res.copy_bps = 2 * nbytes / best
    print(
        f"  device-to-device copy of {nbytes / 2**30:.1f} GiB (cupy.copyto): best "
        f"{best * 1e3:.2f} ms, worst {max(times) * 1e3:.2f} ms = "
        f"{res.copy_bps / 1e12:.2f} TB/s read + written",
        flush=True,
    )


def globule(n: int, seed: int) -> np.ndarray:
    """``n`` points of a compact, protein-sized structure, ``(n, 3)`` float64: uniform in a
    ball whose radius of gyration is a folded protein's, :math:`2.2\\, n^{0.38}` Å.

    Not :func:`scalign.helix`: at n = 1,000 that is a 1,500 Å rod, whose 0.3 Å noise is
    below ``1e-6`` of its second moments, so every fit would take the explicit-residual
    refit of :func:`scalign.kernels.superpose` (and every pair the SVD on the CPU)."""
    rng = np.random.default_rng(seed)
    radius = 2.2 * n**0.38 / np.sqrt(3 / 5)
    u = rng.standard_normal((n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return radius * u * rng.uniform(0, 1, (n, 1)) ** (1 / 3)


def globule_ensemble(N: int, n: int, noise: float, chunks: int, seed: int):
    """An ensemble (float32) of :func:`globule` copies moved by random rotations and
    translations, with Gaussian ``noise`` (Å) on every coordinate."""
    rng = np.random.default_rng(seed)
    Y = globule(n, seed)
    Q = Rotation.random(N, random_state=seed).as_matrix()
    X = (Y + noise * rng.standard_normal((N, n, 3))) @ Q + 10.0 * rng.standard_normal((N, 1, 3))
    return scalign.make_ensemble(X.astype(np.float32), chunks=chunks)


def kabsch_data(N: int, n: int, seed: int, block: int = 50_000, shape=None):
    """``(X (N, n, 3) float32, Y (n, 3) float64)`` on the GPU: a :func:`globule` (or the
    points ``shape``) moved by random rotations and translations with 0.3 Å noise, built
    in blocks of ``block``."""
    import cupy

    Y = cupy.asarray(globule(n, seed) if shape is None else shape)
    X = cupy.empty((N, n, 3), dtype=cupy.float32)
    rs = cupy.random.RandomState(seed)
    Q = Rotation.random(N, random_state=seed).as_matrix()
    for start in range(0, N, block):
        b = min(block, N - start)
        P = Y + 0.3 * rs.standard_normal((b, n, 3))
        t = 10.0 * rs.standard_normal((b, 1, 3))
        X[start : start + b] = (P @ cupy.asarray(Q[start : start + b]) + t).astype(cupy.float32)
    return X, Y


def bench_kabsch(cfg: dict, repeat: int, res: Results) -> None:
    import cupy

    n = cfg["points"]
    free, _ = cupy.cuda.Device().mem_info
    fits = int(0.85 * free / (KABSCH_MEMORY * n * 3 * 4))
    N = min(cfg["structures"], fits)
    if N < cfg["structures"]:
        print(f"  only {N:,} of {cfg['structures']:,} structures fit ({free / 2**30:.0f} GiB free)")
    m = min(cfg["cpu_structures"], N)
    X, Y = kabsch_data(N, n, 0)
    print(
        f"  X: {N:,} x {n:,} x 3 float32 = {X.nbytes / 1e9:.2f} GB on the GPU (globule, random "
        f"rotations, 0.3 A noise); CPU: the first {m:,}",
        flush=True,
    )
    out: dict = {}

    def fit():
        out["fit"] = superpose(X, Y)

    t = gpu_time(fit, repeat)
    res.add(
        Row(
            "gpu.superpose",
            "GPU superpose (RMSD + rotation)",
            "kabsch",
            t,
            N,
            res.bandwidth(X.nbytes, min(t), "of X read"),
        )
    )
    f = out["fit"]

    def apply():
        out["aligned"] = apply_transform(X, f.rotation, f.translation, f.scale)

    t = gpu_time(apply, repeat, setup=lambda: out.pop("aligned", None))
    res.add(
        Row(
            "gpu.apply",
            "GPU apply_transform (aligned written)",
            "kabsch",
            t,
            N,
            res.bandwidth(2 * X.nbytes, min(t), "read + written"),
        )
    )

    def both():
        g = superpose(X, Y)
        out["aligned"] = apply_transform(X, g.rotation, g.translation, g.scale)

    t = gpu_time(both, repeat, setup=lambda: out.pop("aligned", None))
    res.add(
        Row(
            "gpu.superpose_apply",
            "GPU superpose + apply_transform",
            "kabsch",
            t,
            N,
            res.bandwidth(3 * X.nbytes, min(t), "(X read twice, written once)"),
        )
    )
    per = moments_cuda.layout(n)
    t = gpu_time(lambda: moments_cuda.fused_moments(X, Y, None), repeat)
    res.add(
        Row(
            "gpu.fused",
            f"GPU moments_cuda.fused_moments alone (one {per} per item)",
            "kabsch",
            t,
            N,
            res.bandwidth(X.nbytes, min(t), "of X read"),
        )
    )
    centred = cupy.ascontiguousarray(Y - Y.mean(axis=0))
    uniform = cupy.full((n,), 1.0 / n)
    for other in (o for o in moments_cuda.LAYOUTS if o != per):
        t = gpu_time(
            lambda other=other: moments_cuda.moment_sums(X, centred, uniform, per=other), repeat
        )
        res.add(
            Row(
                f"gpu.fused_{other}",
                f"GPU moment sums, {other} layout (another layout, for comparison)",
                "kabsch",
                t,
                N,
                res.bandwidth(X.nbytes, min(t), "of X read"),
            )
        )

    Xc, Yc = host(X[:m]), host(Y)
    t = cpu_time(lambda s: superpose(Xc[s], Yc), m, repeat)
    res.add(Row("cpu.superpose", "CPU superpose", "kabsch", t, m, CPU_NOTE))
    fc = superpose(Xc, Yc)
    aligned_c = apply_transform(Xc, fc.rotation, fc.translation, fc.scale)
    t = cpu_time(
        lambda s: apply_transform(Xc[s], fc.rotation[s], fc.translation[s], fc.scale[s]),
        m,
        repeat,
    )
    res.add(Row("cpu.apply", "CPU apply_transform", "kabsch", t, m, CPU_NOTE))

    def cpu_both(s):
        g = superpose(Xc[s], Yc)
        return apply_transform(Xc[s], g.rotation, g.translation, g.scale)

    t = cpu_time(cpu_both, m, repeat)
    res.add(Row("cpu.superpose_apply", "CPU superpose + apply_transform", "kabsch", t, m, CPU_NOTE))

    r_gpu, r_cpu = host(f.rmsd[:m]), np.asarray(fc.rmsd)
    d = float(np.abs(r_gpu - r_cpu).max() / r_cpu.max())
    res.check("kabsch rmsd", d < 1e-6, f"GPU vs CPU rmsd, max |diff| / max rmsd {d:.1e} (< 1e-6)")
    a_gpu = host(out["aligned"][:m]).astype(np.float64)
    d = float(np.abs(a_gpu - aligned_c).max() / np.abs(aligned_c).max())
    res.check("kabsch aligned", d < 1e-5, f"aligned coordinates, max |diff| / extent {d:.1e}")
    out.clear()

    # rods: a helix of n points is n x 1.5 A long, its noise below 1e-6 of its second
    # moments, so every e2 is taken from the explicit residual (kabsch_cuda.residual)
    N_rods, m_rods = max(1, N // 5), max(1, m // 5)
    X, Y = kabsch_data(N_rods, n, 1, shape=scalign.helix(n))
    t = gpu_time(lambda: superpose(X, Y), repeat)
    res.add(
        Row(
            "gpu.superpose_rods",
            f"GPU superpose, {n:,}-point helices (every e2 explicit)",
            "kabsch",
            t,
            N_rods,
            res.bandwidth(2 * X.nbytes, min(t), "X read twice"),
        )
    )
    Xc, Yc = host(X[:m_rods]), host(Y)
    t = cpu_time(lambda s: superpose(Xc[s], Yc), m_rods, repeat)
    res.add(Row("cpu.superpose_rods", "CPU superpose, helices", "kabsch", t, m_rods, CPU_NOTE))
    r_cpu = superpose(Xc, Yc).rmsd
    d = float(np.abs(host(superpose(X[:m_rods], Y).rmsd) - r_cpu).max() / r_cpu.max())
    note = f"helices: GPU vs CPU rmsd, max |diff| / max rmsd {d:.1e} (< 1e-8)"
    res.check("kabsch rods", d < 1e-8, note)


def bench_pairwise(cfg: dict, repeat: int, res: Results) -> None:
    import cupy

    N, n, c = cfg["pair_structures"], cfg["pair_points"], cfg["pair_chunk"]
    m, k, kc = cfg["cpu_pair_structures"], cfg["pair_kernel"], cfg["cpu_pair_kernel"]
    ens = globule_ensemble(N, n, noise=0.3, chunks=c, seed=0)
    D = scalign.pairwise_rmsd(to_device(ens, "gpu"), chunks=c)
    print(
        f"  {N:,} globules of {n} points, noise 0.3 A, chunks of {c:,}, {GPU_WORKERS} Dask threads "
        f"on the GPU; pairs = matrix entries (the op computes one triangle)",
        flush=True,
    )
    out: dict = {}

    def op():
        out["D"] = D.data.compute(scheduler="threads", num_workers=GPU_WORKERS)

    t = gpu_time(op, repeat, setup=out.clear)
    res.add(
        Row(
            "gpu.pairwise_op",
            f"GPU pairwise_rmsd op, to_device(ens, 'gpu'), chunks {c:,}",
            "pairwise",
            t,
            N * N,
            "result left on the GPU",
        )
    )

    # as the register section: do Dask's threads help or contend on one GPU?
    def op1():
        out["D"] = D.data.compute(scheduler="threads", num_workers=1)

    t = gpu_time(op1, repeat, setup=out.clear)
    res.add(Row("gpu.pairwise_op1", "GPU pairwise_rmsd op, 1 thread", "pairwise", t, N * N, ""))
    coords = ens["coords"].values
    A = cupy.asarray(coords[:k])
    t = gpu_time(lambda: pairwise_kernel(A), repeat)
    res.add(
        Row(
            "gpu.pairwise_kernel",
            f"GPU kernel pairwise_rmsd, one {k:,}-structure block",
            "pairwise",
            t,
            k * k,
            "full square",
        )
    )

    Dc = scalign.pairwise_rmsd(ens.isel(structure=slice(m)), chunks=max(64, m // 4))
    cpu_out: dict = {}

    def cpu_op():
        cpu_out["D"] = Dc.data.compute(scheduler="threads", num_workers=CPU_THREADS)

    with scalign.scheduler():  # BLAS at 1 thread per Dask thread
        t = best_time(cpu_op, repeat)
    res.add(
        Row(
            "cpu.pairwise_op",
            f"CPU pairwise_rmsd op, chunks {max(64, m // 4)}",
            "pairwise",
            t,
            m * m,
            f"{CPU_NOTE} (Dask threaded, 2 workers)",
        )
    )
    Ac = coords[:kc]
    t = cpu_time(lambda s: pairwise_kernel(Ac[s], Ac), kc, repeat)
    res.add(
        Row("cpu.pairwise_kernel", "CPU kernel pairwise_rmsd", "pairwise", t, kc * kc, CPU_NOTE)
    )

    d = float(np.abs(host(out["D"][:m, :m]) - cpu_out["D"]).max())
    res.check("pairwise", d < 1e-6, f"GPU op vs CPU op on {m:,}², max |diff| {d:.1e} A (< 1e-6)")


def inner_mask(shape, M: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Output pixels whose source ``M^-1 p`` lies at least ``margin`` px inside the input
    (per image for a stack of matrices): where every boundary rule agrees."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    p = np.stack([xx.ravel(), yy.ravel(), np.ones(H * W)])
    src = np.linalg.inv(M) @ p
    x, y = src[..., 0, :], src[..., 1, :]
    inside = (x >= margin) & (x <= W - 1 - margin) & (y >= margin) & (y <= H - 1 - margin)
    return inside.reshape(*M.shape[:-2], H, W)


def bench_warp(cfg: dict, repeat: int, res: Results) -> None:
    import cupy

    B, S, m = cfg["slices"], cfg["size"], cfg["cpu_slices"]
    Xg = cupy.random.RandomState(0).random_sample((B, S, S), dtype=cupy.float32)
    M = build_affine_matrix(7.0, 3.5, -2.25, 1.03, 1.03, center=image_center((S, S)))
    rng = np.random.default_rng(1)
    c = image_center((S, S))
    Ms = np.stack(
        [
            build_affine_matrix(rng.uniform(-5, 5), *rng.uniform(-3, 3, 2), center=c)
            for _ in range(B)
        ]
    )
    print(
        f"  {B:,} x {S:,}² float32 = {Xg.nbytes / 1e9:.1f} GB (uniform noise), order 1, mode "
        f"constant; shared: 7° + shift + 1.03 scale; per image: random rigid (±5°, ±3 px); "
        f"CPU: the first {m}",
        flush=True,
    )
    traffic = 2 * Xg.nbytes
    out: dict = {}
    for key, label, matrix in (
        ("shared", "one shared matrix", M),
        ("each", "one matrix per image", Ms),
    ):

        def gpu_warp(matrix=matrix, key=key):
            out[key] = warp_images(Xg, matrix)

        t = gpu_time(gpu_warp, repeat, setup=lambda key=key: out.pop(key, None))
        res.add(
            Row(
                f"gpu.warp_{key}",
                f"GPU warp_images, {label}",
                "warp",
                t,
                B,
                res.bandwidth(traffic, min(t), "read + written"),
            )
        )

    Xc = host(Xg[:m])
    cpu: dict = {}
    t = cpu_time(lambda s: warp_images(Xc[s], M), m, repeat, cpu)
    res.add(
        Row(
            "cpu.warp_shared",
            "CPU warp_images, one shared matrix",
            "warp",
            t,
            m,
            CPU_NOTE + ", operator cached",
        )
    )
    shared_c = np.concatenate(cpu["cpu"])
    t = cpu_time(lambda s: warp_images(Xc[s], Ms[s]), m, repeat, cpu)
    res.add(
        Row(
            "cpu.warp_each",
            "CPU warp_images, one matrix per image",
            "warp",
            t,
            m,
            CPU_NOTE + ", scipy loop",
        )
    )
    each_c = np.concatenate(cpu["cpu"])

    # cupyx interpolates float32 images at float32 coordinates (scipy: float64), which round
    # by up to ~S 2^-24 px; on noise in [0, 1) (slopes up to 1 per px) the values then differ
    # by that much: 1.1e-4 at 1,024² on the H200.
    tol = 4 * S * float(np.finfo(np.float32).eps)
    inside = inner_mask((S, S), M)
    d = float(np.abs(host(out["shared"][:m])[:, inside] - shared_c[:, inside]).max())
    note = f"GPU vs CPU, 1 px inside the source, max |diff| {d:.1e} (< {tol:.1e})"
    res.check("warp shared", d < tol, note)
    inside = inner_mask((S, S), Ms[:m])
    d = float(np.abs(host(out["each"][:m]) - each_c)[inside].max())
    note = f"GPU vs CPU, 1 px inside the source, max |diff| {d:.1e} (< {tol:.1e})"
    res.check("warp per image", d < tol, note)


def bench_register(cfg: dict, repeat: int, res: Results) -> None:
    import cupy
    from cupyx.scipy import ndimage as cndi

    B, S, chunk, m = (
        cfg["register"],
        cfg["register_size"],
        cfg["register_chunk"],
        cfg["cpu_register"],
    )
    noise = cupy.random.RandomState(2).standard_normal((S, S), dtype=cupy.float32)
    ref = cndi.gaussian_filter(noise, S / 128)
    rng = np.random.default_rng(3)
    c = image_center((S, S))
    truth = np.stack(
        [
            build_affine_matrix(rng.uniform(-5, 5), *rng.uniform(-S / 64, S / 64, 2), center=c)
            for _ in range(B)
        ]
    )
    images = warp_images(cupy.broadcast_to(ref, (B, S, S)), truth, order=3, mode="nearest")
    ref_host = host(ref)
    print(
        f"  {B:,} x {S:,}² float32 = {images.nbytes / 1e9:.1f} GB (smooth noise, random rigid "
        f"±5°, ±{S / 64:.0f} px), rigid, mse; GPU in chunks of {chunk}; CPU: the first {m}",
        flush=True,
    )
    out: dict = {}

    def gpu_register():
        fits = [
            # the template once per chunk, as in the op
            estimate_motions(prepare_templates(ref[None], "rigid"), images[i : i + chunk])
            for i in range(0, B, chunk)
        ]
        out["matrix"] = np.concatenate([f.matrix for f in fits])

    t = gpu_time(gpu_register, repeat)
    res.add(
        Row(
            "gpu.register", "GPU estimate_motions (batched)", "register", t, B, f"chunks of {chunk}"
        )
    )
    Xc = host(images[:m])
    cpu: dict = {}

    def cpu_register(s):
        template = prepare_template(ref_host, "rigid")
        return np.stack([estimate_motion(template, im).matrix for im in Xc[s]])

    t = cpu_time(cpu_register, m, repeat, cpu)
    res.add(Row("cpu.register", "CPU estimate_motion (per image)", "register", t, m, CPU_NOTE))
    d = float(np.abs(out["matrix"][:m] - np.concatenate(cpu["cpu"])).max())
    res.check("register", d < 1e-4, f"GPU vs CPU motions, max |diff| {d:.1e}")

    # the op as users call it: the reference first in the stack, chunks on the GPU
    stack = scalign.make_stack(cupy.concatenate([ref[None], images]), chunks=chunk)

    def gpu_op():
        out["op"] = host(scalign.register_stack(stack, "first")["matrix"].data.compute())

    t = gpu_time(gpu_op, repeat)
    res.add(Row("gpu.register_op", "GPU register_stack op", "register", t, B + 1, "threaded Dask"))
    # the chunks of one GPU share its stream: Dask's threads (one per core) only contend
    # for the GIL while launching this launch-bound estimate's kernels (the op ran at half
    # the kernel's rate on the H200's 16 threads); one thread, for comparison
    with dask.config.set(num_workers=1):
        t = gpu_time(gpu_op, repeat)
    res.add(
        Row("gpu.register_op1", "GPU register_stack op, 1 thread", "register", t, B + 1, "Dask")
    )
    host_stack = scalign.make_stack(np.concatenate([ref_host[None], Xc]), chunks=(m + 2) // 2)

    def cpu_op():
        out["cpu_op"] = scalign.register_stack(host_stack, "first")["matrix"].values

    with dask.config.set(scheduler="threads", num_workers=CPU_THREADS), threadpool_limits(1):
        t = best_time(cpu_op, repeat)
    res.add(Row("cpu.register_op", "CPU register_stack op", "register", t, m + 1, CPU_NOTE))
    d = float(np.abs(out["op"][: m + 1] - out["cpu_op"]).max())
    res.check("register op", d < 1e-4, f"GPU vs CPU op motions, max |diff| {d:.1e}")
    E = np.einsum("bij,bjk->bik", out["matrix"], np.linalg.inv(truth))
    err = float(np.abs(E[:, :2, :2] @ c + E[:, :2, 2] - c).max())
    res.check("register truth", err < 0.05, f"centre error vs the true motions, max {err:.3f} px")


def blob_volume_gpu(blobs, n: int):
    """``scalign.blob_volume`` computed on the GPU, float32 (a 256³ map takes seconds on
    the CPU)."""
    import cupy

    ax = cupy.arange(n, dtype=cupy.float32) - n // 2
    z, y, x = ax[:, None, None], ax[None, :, None], ax[None, None, :]
    V = cupy.zeros((n, n, n), dtype=cupy.float32)
    for (cx, cy, cz), a in zip(blobs.centers, blobs.amplitudes, strict=True):
        r2 = (x - float(cx)) ** 2 + (y - float(cy)) ** 2 + (z - float(cz)) ** 2
        V += float(a) * cupy.exp(-r2 / float(2 * blobs.sigma**2))
    return V


def bench_project(cfg: dict, repeat: int, res: Results) -> None:
    import cupy

    n, k, m = cfg["volume"], cfg["orientations"], min(cfg["cpu_orientations"], cfg["orientations"])
    Vg = blob_volume_gpu(scalign.random_blobs(40, radius=0.3 * n, sigma=0.03 * n, seed=0), n)
    rng = np.random.default_rng(3)
    A = euler_to_matrix(
        rng.uniform(-180, 180, k),
        np.degrees(np.arccos(rng.uniform(-1, 1, k))),
        rng.uniform(-180, 180, k),
    )
    has_cufinufft = importlib.util.find_spec("cufinufft") is not None
    # project's "auto" method on a CuPy volume: cufinufft where it imports, else the
    # trilinear interpolation of the padded spectrum (~2% off the exact slices)
    label = "cufinufft" if has_cufinufft else "interpolation: cufinufft NOT installed"
    print(
        f"  {n}³ float32 map of 40 Gaussian blobs, {k:,} random orientations, eps {EPS:g}; "
        f"GPU method: {label}",
        flush=True,
    )
    # the warm-up: A as NumPy (as euler_to_matrix gives it) or, if refused, as CuPy
    t0 = time.perf_counter()
    P, form, A_arg = first_working(
        lambda a: project(Vg, a, eps=EPS), [("numpy", A), ("cupy", cupy.asarray(A))]
    )
    sync()
    on_gpu = isinstance(P, cupy.ndarray)
    print(
        f"  warm-up {time.perf_counter() - t0:.1f} s; A passed as {form}; out "
        f"{type(P).__module__}.{type(P).__name__} {P.dtype}",
        flush=True,
    )
    out = {"P": P}

    def gpu_project():
        out["P"] = project(Vg, A_arg, eps=EPS)

    # the warm-up above is the untimed first call; a NumPy result (a CPU fallback) once
    t = gpu_time(gpu_project, repeat if on_gpu else 1, setup=out.clear, warmup=False)
    note = "cupy out" if on_gpu else "NumPy out: not the GPU path"
    res.add(Row("gpu.project", f"GPU project ({label[:13]})", "project", t, k, note))
    interp: dict = {}
    if has_cufinufft:  # the other GPU method too, for comparison
        try:

            def gpu_interp():
                interp["P"] = project(Vg, A_arg, eps=EPS, method="interpolate")

            t = gpu_time(gpu_interp, repeat, setup=interp.clear)
            res.add(Row("gpu.project_interp", "GPU project, method='interpolate'", "project", t, k))
        except Exception as exc:  # an optional row
            print(f"  (no method='interpolate' row: {type(exc).__name__}: {exc})")

    Vc = host(Vg)
    cpu: dict = {}
    # one run of the full batch: the volume's FFT is paid once per call, so a smaller
    # batch would understate the CPU per projection
    t = cpu_time(lambda s: project(Vc, A[s], eps=EPS), m, 1, cpu, warmup=False)
    res.add(Row("cpu.project", "CPU project", "project", t, m, CPU_NOTE + ", 1 run, no warm-up"))
    Pc = np.concatenate(cpu["cpu"])
    scale = np.abs(Pc).max()
    tol = 2e-3 if has_cufinufft else 5e-2
    d = float(np.abs(host(out["P"][:m]) - Pc).max() / scale)
    res.check(
        "projection",
        d < tol,
        f"GPU ({label[:13]}) vs CPU finufft, max |diff| / max |P| {d:.1e} (< {tol:g})",
    )
    if "P" in interp:
        d = float(np.abs(host(interp["P"][:m]) - Pc).max() / scale)
        print(f"  (GPU interpolation vs CPU finufft: max |diff| / max |P| {d:.1e})")


def bench_scores(cfg: dict, repeat: int, res: Results) -> None:
    import cupy

    B, S, m = cfg["images"], cfg["image_size"], cfg["cpu_images"]
    rs = cupy.random.RandomState(4)
    Pg = rs.standard_normal((B, S, S), dtype=cupy.float32)
    Ig = 0.8 * Pg + 0.5 * rs.standard_normal((B, S, S), dtype=cupy.float32) + 0.1
    mask = circular_mask(S)
    print(f"  {B:,} x {S}² float32 projections and images, disc mask; CPU: the first {m:,}")
    got, form, mask_arg = first_working(
        lambda mk: compare(Pg, Ig, mk), [("cupy", cupy.asarray(mask)), ("numpy", mask)]
    )
    print(f"  mask passed as {form}; out {type(got.correlation).__module__}", flush=True)
    out = {"C": got}

    def gpu_compare():
        out["C"] = compare(Pg, Ig, mask_arg)

    t = gpu_time(gpu_compare, repeat, setup=out.clear)
    read = res.bandwidth(2 * Pg.nbytes, min(t), "of P and images read")
    res.add(Row("gpu.compare", "GPU scores.compare", "scores", t, B, read))
    Pc, Ic = host(Pg[:m]), host(Ig[:m])
    cpu: dict = {}
    t = cpu_time(lambda s: compare(Pc[s], Ic[s], mask), m, repeat, cpu)
    res.add(Row("cpu.compare", "CPU scores.compare", "scores", t, m, CPU_NOTE))
    worst = 0.0
    for name in ("correlation", "cost", "residual_mean", "residual_std"):
        ref = np.concatenate([getattr(c, name) for c in cpu["cpu"]])
        worst = max(worst, float(np.abs(host(getattr(out["C"], name)[:m]) - ref).max()))
    res.check(
        "scores", worst < 1e-9, f"correlation, cost, residual mean/std max |diff| {worst:.1e}"
    )


def bench_match(cfg: dict, repeat: int, res: Results) -> None:
    import cupy

    B, n, m = cfg["match_images"], cfg["match_size"], cfg["cpu_match_images"]
    blobs = scalign.random_blobs(40, radius=0.3 * n, sigma=0.03 * n, seed=0)
    V = scalign.blob_volume(blobs, n)
    st = scalign.simulate_particles(blobs, n, B, noise=0.3, max_shift=2, ctf=True, seed=2)
    s = st.stack.compute()
    images = s["images"].values
    H = ctf_half_plane(n, float(s.attrs["pixel_size"]), s.defocus_u, s.defocus_v, s.defocus_angle)
    gallery = euler_to_matrix(*orientation_grid(MATCH_STEP))
    options = {"step": MATCH_STEP, "max_shift": 4.0}
    print(
        f"  {B:,} x {n}² images (noise 0.3, CTF), {n}³ map, gallery of {len(gallery):,} "
        f"({MATCH_STEP:g}° step) with refinement; CPU: the first {m}",
        flush=True,
    )
    Vg, Ig, Hg = cupy.asarray(V), cupy.asarray(images), cupy.asarray(H)
    out: dict = {}

    def gpu_match():
        out["M"] = match_images(Vg, Ig, gallery, ctf=Hg, **options)

    t = gpu_time(gpu_match, repeat, setup=out.clear)
    res.add(Row("gpu.match", "GPU match_images", "match", t, B))
    cpu: dict = {}
    t = cpu_time(
        lambda h: match_images(V, images[h], gallery, ctf=H[h], **options), m, 1, cpu, warmup=False
    )
    res.add(Row("cpu.match", "CPU match_images", "match", t, m, CPU_NOTE + ", 1 run"))
    A_cpu = np.concatenate([r.A for r in cpu["cpu"]])
    to_cpu = symmetry_distance(out["M"].A[:m], A_cpu, "C1")
    to_truth = symmetry_distance(out["M"].A, st.A, "C1")
    res.check(
        "match",
        float(np.median(to_cpu)) < 0.5 and float(np.median(to_truth)) < 1.0,
        f"GPU vs CPU orientations: median {np.median(to_cpu):.2f}°, max {to_cpu.max():.2f}°; "
        f"GPU vs the truth: median {np.median(to_truth):.2f}° (< 0.5°, < 1°)",
    )


BENCHES = {
    "copy": bench_copy,
    "kabsch": bench_kabsch,
    "pairwise": bench_pairwise,
    "warp": bench_warp,
    "register": bench_register,
    "project": bench_project,
    "scores": bench_scores,
    "match": bench_match,
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def print_device() -> None:
    import cupy

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    free, total = dev.mem_info
    rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
    print(
        f"GPU {dev.id}: {name}, compute capability {dev.compute_capability}, "
        f"{props['multiProcessorCount']} SMs, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free); "
        f"CUDA runtime {rt // 1000}.{rt % 1000 // 10}, driver {drv // 1000}.{drv % 1000 // 10}; "
        f"cupy {cupy.__version__}"
    )


def print_summary(res: Results, cfg: dict) -> None:
    if not res.rows:
        return
    print(f"\n{'=' * 100}")
    titles = {
        "kabsch": f"batched Kabsch, n = {cfg['points']:,} points, float32 (structures/s)",
        "pairwise": f"pairwise RMSD, n = {cfg['pair_points']} points (pairs/s: matrix entries)",
        "warp": f"warp {cfg['size']:,}² float32 slices, order 1 (slices/s)",
        "register": f"stack registration of {cfg['register_size']:,}² images, rigid (images/s)",
        "project": f"projection of a {cfg['volume']}³ map, eps {EPS:g} (projections/s)",
        "scores": f"residual scores of {cfg['image_size']}² images (images/s)",
    }
    report.print_table(
        res.rows,
        titles,
        ANCHOR,
        "GPU/this = rate of the section's first GPU row / rate of this row. CPU rows: this "
        f"machine's CPUs held to {CPU_THREADS} threads (halves on 2 threads, BLAS at 1 each),"
        "\nmeasured on a smaller batch (the 'per run' column), figures per item.",
        rate=("items/s", 9),
        count=("per run", 13, ","),
        ratio=("GPU/this", 9),
    )
    rows = res.by_key()
    report.print_ratios(res.rows, PAIRS, "items/s", 36)
    print(f"\ntargets (GPU >= {TARGET_SPEEDUP:.0f}x the {CPU_THREADS}-core CPU path):")
    met = total = 0
    for label, gpu, cpu in PAIRS:
        if gpu in rows and cpu in rows:
            r = rows[gpu].rate / rows[cpu].rate
            total += 1
            met += r >= TARGET_SPEEDUP
            print(f"  {label:<36} {r:9.1f}x  {status(r, TARGET_SPEEDUP)}")
        else:
            print(f"  {label:<36} {'-':>9}   not measured")
    if res.copy_bps:
        labels = {
            "gpu.superpose": "superpose",
            "gpu.fused": "fused_moments alone",
            **{f"gpu.fused_{o}": f"moments, {o} layout" for o in moments_cuda.LAYOUTS},
        }
        for key, name in labels.items():
            if key in rows:
                share = cfg["points"] * 12 * rows[key].rate / res.copy_bps
                # the other layouts are for comparison, not targets of their own
                if key in ("gpu.superpose", "gpu.fused"):
                    total += 1
                    met += share >= TARGET_BANDWIDTH
                print(
                    f"  {name + ': X read / copy rate':<36} {share:9.0%}   "
                    f"{status(share, TARGET_BANDWIDTH)} (target >= {TARGET_BANDWIDTH:.0%} of "
                    f"{res.copy_bps / 1e12:.2f} TB/s)"
                )
    print(f"  {met} of {total} targets met")


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="GPU timings: best of --repeat after a warm-up, device synchronised.",
    )
    p.add_argument("--quick", action="store_true", help="smoke sizes (20,000 x 200, 256², 64³)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per row, best kept (3)")
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated sections whose GPU rows get one more call under cProfile",
    )
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    args.profile = {s.strip() for s in args.profile.split(",") if s.strip()}
    unknown = sorted((set(args.sections) | args.profile) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}: expected some of {SECTIONS}")
    report.require(p, args, {"repeat": 1})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not gpu_available():
        print("bench_gpu: no usable CUDA device (gpu_available() is False): nothing timed")
        return 0
    cfg = QUICK if args.quick else FULL
    t_start = report.start()
    print_device()
    print(
        f"CPU rows: this machine's CPUs held to {CPU_THREADS} threads, on a smaller batch, per "
        f"item; {'quick' if args.quick else 'full'} sizes; best of {args.repeat}",
        flush=True,
    )
    res = Results()
    PROFILE["sections"] = args.profile
    for name in args.sections:
        PROFILE["section"] = name
        before = {r.key for r in res.rows}
        print(f"\n[{name}] ...", flush=True)
        t0 = time.perf_counter()
        try:
            BENCHES[name](cfg, args.repeat, res)
        except Exception as exc:  # report it, run the other sections
            res.errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"  [{name}] FAILED: {res.errors[name]}")
            traceback.print_exc(limit=-8, file=sys.stdout)
        finally:
            try:
                free_gpu()
            except Exception as exc:  # a broken context: say so, go on
                print(f"  (could not free the GPU after [{name}]: {exc})")
        res.ratios({r.key for r in res.rows} - before)
        print(f"  ([{name}]: {time.perf_counter() - t0:.1f} s in all)")
        sys.stdout.flush()

    print_summary(res, cfg)
    for name, err in res.errors.items():
        print(f"section {name} FAILED: {err}")
    failed = [k for k, good in res.checks.items() if not good]
    if failed:
        print(f"checks failed: {', '.join(failed)}")
    return report.finish(not failed and not res.errors, t_start)


if __name__ == "__main__":
    sys.exit(main())
