"""What the benchmarks share: timing, data, environment, the command line and the report.

``bench_align.py``, ``bench_pairwise.py`` and ``bench_warp.py`` import this module (their
own directory is on ``sys.path`` when they run as scripts, from any working directory).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

import scalign

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "adk_dims.npz"


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str  # stable id used by the ratio lines
    method: str  # label printed in the table
    kind: str  # the table group; rows are compared with the anchor of their kind
    times: list[float]  # seconds of each timed run
    timed: int  # units (structures, matrix entries) per timed run
    note: str = ""
    seconds: float = field(init=False)
    rate: float = field(init=False)  # units/s from the best run

    def __post_init__(self):
        self.seconds = min(self.times)
        self.rate = self.timed / self.seconds


def best_time(
    fn: Callable[[], object],
    repeat: int,
    *,
    setup: Callable[[], object] | None = None,
    warmup: bool = True,
) -> list[float]:
    """Wall times (``time.perf_counter``) of ``repeat`` calls of ``fn``, after one untimed
    warm-up call; ``setup`` runs, untimed, before each call (warm-up included)."""
    times = []
    for i in range(repeat + (1 if warmup else 0)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i > 0 or not warmup:
            times.append(dt)
    return times


@contextlib.contextmanager
def section(label: str):
    """Print ``label ...`` and, when the block ends, its wall time."""
    print(f"{label} ...", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"  ({label}: {time.perf_counter() - t0:.1f} s in all)", flush=True)


def within_budget(run_on: Callable[[int], float], N: int, budget: float, probe: int) -> int:
    """How many of ``N`` items (frames, matrix rows) to time so that one run takes at most
    about ``budget`` seconds, for a method whose cost is proportional to the items.

    ``run_on(m)`` runs the method on ``m`` items and returns its seconds; this probe run
    doubles as the warm-up.
    """
    m = min(N, probe)
    rate = m / max(run_on(m), 1e-9)
    return N if rate * budget >= N else max(m, int(rate * budget))


def timed_within(
    run_on: Callable[[int], float],
    N: int,
    budget: float,
    probe: int,
    repeat: int,
    within: Callable[..., int] = within_budget,
) -> tuple[int, list[float]]:
    """``(m, seconds of repeat runs on m items)``, ``m`` chosen by ``within`` (its probe
    run is the warm-up)."""
    m = within(run_on, N, budget, probe)
    return m, [run_on(m) for _ in range(repeat)]


def subset_note(m: int, N: int, note: str, what: str = "frames") -> str:
    return note if m >= N else f"{note}; SUBSET: {m:,} of {N:,} {what}"


def fmt_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f}k"
    return f"{rate:.0f}"


def status(rate: float, target: float) -> str:
    return "met" if rate >= target else "not met"


def verdict(good: bool, tol: float | None = None) -> str:
    """``OK``/``FAIL``, with ``(< tol)`` when a tolerance is given."""
    word = "OK" if good else "FAIL"
    return word if tol is None else f"{word} (< {tol:g})"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_input_store(ds, path: Path, detail: str) -> None:
    """``scalign.save_zarr(ds, path)``, untimed, and the line that says so (``detail``
    follows the size in MiB)."""
    t0 = time.perf_counter()
    scalign.save_zarr(ds, path, overwrite=True)
    print(
        f"  wrote the input store ({dir_size(path) / 2**20:.0f} MiB{detail}) "
        f"in {time.perf_counter() - t0:.1f} s (untimed)"
    )


# --------------------------------------------------------------------------------------
# data, environment and the other codes' inputs
# --------------------------------------------------------------------------------------


def load_data(path: Path, n_structures: int, n_points: int, noise: float, seed: int):
    """``(X (N, n, 3) float32, masses (n,), frames in the file)``."""
    with np.load(path) as data:
        frames = np.asarray(data["coords"], dtype=np.float32)  # (98, 3341, 3) Angstrom
        masses = np.asarray(data["masses"], dtype=np.float64)
    if n_points > frames.shape[1]:
        raise SystemExit(f"--points {n_points}: the trajectory has {frames.shape[1]} atoms")
    frames = frames[:, :n_points]
    reps = -(-n_structures // frames.shape[0])
    X = np.tile(frames, (reps, 1, 1))[:n_structures]
    rng = np.random.default_rng(seed)
    X += rng.normal(0.0, noise, size=X.shape).astype(np.float32)
    return np.ascontiguousarray(X), masses[:n_points], frames.shape[0]


def load_and_describe(args: argparse.Namespace, detail: str):
    """``load_data`` with the command line's settings, and the line that says what was
    loaded (``detail`` goes between the seed and the repeats)."""
    X, masses, n_frames = load_data(args.data, args.structures, args.points, args.noise, args.seed)
    N, n = X.shape[:2]
    print(
        f"data: {args.data.name}: first {n:,} atoms of its {n_frames} frames tiled to "
        f"N = {N:,} structures ({X.nbytes / 2**20:.0f} MiB float32) + {args.noise} A noise "
        f"(seed {args.seed}); {detail}; best of {args.repeat} after a warm-up\n"
    )
    return X, masses, n_frames


def print_environment() -> None:
    import dask
    import zarr

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?"
            )
    except OSError:
        pass
    print(
        f"python {platform.python_version()} on {platform.machine()}, {cpu}, "
        f"{os.cpu_count()} logical CPUs (affinity: {len(os.sched_getaffinity(0))})"
    )
    print(
        f"numpy {np.__version__}, scalign {scalign.__version__}, dask {dask.__version__}, "
        f"xarray {xr.__version__}, zarr {zarr.__version__}"
    )
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        print("  BLAS: (threadpoolctl not installed)")
        return
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            print(
                f"  BLAS: {info.get('internal_api')} {info.get('version')} "
                f"({info.get('architecture', '?')}, {info.get('threading_layer', '?')}), "
                f"{info.get('num_threads')} threads  [{Path(info['filepath']).name}]"
            )


def mdtraj_trajectory(X: np.ndarray):
    """An ``md.Trajectory`` of a copy of ``X`` (one CA per GLY residue, one chain).

    mdtraj works in nm; the Angstrom values are passed as they are (md.rmsd returns the
    units of its xyz, so its RMSDs compare with scalign's directly).
    """
    import mdtraj as md

    top = md.Topology()
    chain = top.add_chain()
    for _ in range(X.shape[1]):
        top.add_atom("CA", md.element.carbon, top.add_residue("GLY", chain))
    return md.Trajectory(X.copy(), top)


def mda_universe(coords: np.ndarray, masses: np.ndarray):
    """An in-memory MDAnalysis Universe over ``coords`` (the reader keeps the array, and
    AlignTraj edits it); rms.RMSD reads masses even when unweighted."""
    import MDAnalysis as mda
    from MDAnalysis.coordinates.memory import MemoryReader

    u = mda.Universe.empty(coords.shape[1], trajectory=True)
    u.add_TopologyAttr("masses", masses)
    u.load_new(coords, format=MemoryReader)
    return u


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def base_parser(
    doc: str,
    sizes: Iterable[tuple[tuple[str, ...], int, str]],
    *,
    chunk: dict,
    quick: str,
    noise: str,
    data: bool = False,
) -> argparse.ArgumentParser:
    """The options every benchmark takes, up to ``--seed``: the integer ``(flags, default,
    help)`` of ``sizes``, ``--repeat``, ``--chunk`` (``chunk``: its ``add_argument``
    keywords), ``--quick`` (``quick``: its help), ``--data`` when ``data``, ``--noise``
    (``noise``: its help) and ``--seed``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog="Timings: best of --repeat runs after an untimed warm-up (time.perf_counter).",
    )
    for flags, default, text in sizes:
        p.add_argument(*flags, type=int, default=default, help=text)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per row, best kept (3)")
    p.add_argument("--chunk", type=int, **chunk)
    p.add_argument("--quick", action="store_true", help=quick)
    if data:
        p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="adk_dims.npz")
    p.add_argument("--noise", type=float, default=0.01, help=noise)
    p.add_argument("--seed", type=int, default=0)
    return p


def make_parser(doc: str, *, structures: int, chunk: dict, quick: str) -> argparse.ArgumentParser:
    """``base_parser`` for the benchmarks on ``adk_dims.npz`` (align, pairwise): sizes
    ``--structures`` and ``--points``, with ``--data``."""
    sizes = [
        (("--structures", "-N"), structures, f"default {structures}"),
        (("--points", "-n"), 1_000, "default 1000"),
    ]
    return base_parser(
        doc, sizes, chunk=chunk, quick=quick, noise="Angstrom added to the tiles", data=True
    )


def add_skips(
    p: argparse.ArgumentParser,
    tmpdir: str,
    skips: Iterable[tuple[str, str]],
    peers: Iterable[str] = ("--skip-mdtraj", "--skip-mdanalysis"),
):
    """``--tmpdir``, the ``peers`` flags (no help) and the ``(flag, help)`` skips of the
    benchmark's own rows."""
    p.add_argument("--tmpdir", type=Path, default=None, help=tmpdir)
    for flag in peers:
        p.add_argument(flag, action="store_true")
    for flag, text in skips:
        p.add_argument(flag, action="store_true", help=text)


def require(p: argparse.ArgumentParser, args: argparse.Namespace, *groups: dict[str, int]):
    """``p.error("need --name >= minimum, ...")`` for the first group (``{name: minimum}``)
    in which an option is below its minimum; an option left at ``None`` passes."""
    for group in groups:
        values = {name: getattr(args, name) for name in group}
        if any(v is not None and v < group[name] for name, v in values.items()):
            p.error("need " + ", ".join(f"--{name} >= {m}" for name, m in group.items()))


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def print_table(
    rows: list[Row],
    titles: dict[str, str],
    anchors: dict[str, str],
    footer: str,
    *,
    rate: tuple[str, int],
    count: tuple[str, int, str],
    ratio: tuple[str, int],
) -> None:
    """One group of rows per ``titles`` kind; the ratio column is the rate of the kind's
    anchor row (``anchors[kind]``, a row key) over the row's. ``rate``, ``ratio``:
    ``(header, width)``; ``count``: ``(header, width, thousands separator or "")``."""
    by_key = {r.key: r for r in rows}
    (rate_h, rate_w), (count_h, count_w, sep), (ratio_h, ratio_w) = rate, count, ratio
    w = max(len(r.method) for r in rows)
    head = (
        f"{'method':<{w}}  {rate_h:>{rate_w}}  {'best s':>8}  {'worst s':>8}  "
        f"{count_h:>{count_w}}  {ratio_h:>{ratio_w}}  note"
    )
    print(head)
    print("-" * len(head))
    for kind, title in titles.items():
        group = [r for r in rows if r.kind == kind]
        if not group:
            continue
        print(f"[{title}]")
        anchor = by_key.get(anchors.get(kind, ""))
        for r in group:
            cell = "anchor" if r is anchor else (f"{anchor.rate / r.rate:.2f}x" if anchor else "")
            print(
                f"{r.method:<{w}}  {fmt_rate(r.rate):>{rate_w}}  {r.seconds:>8.4f}  "
                f"{max(r.times):>8.4f}  {r.timed:>{count_w}{sep}}  {cell:>{ratio_w}}  {r.note}"
            )
    print(footer)


def print_ratios(rows: list[Row], pairs: list[tuple[str, str, str]], unit: str, width: int):
    """``label  rate(a) / rate(b)`` for each ``(label, a, b)`` whose rows both ran."""
    by_key = {r.key: r for r in rows}
    print(f"\nratios ({unit} over {unit}; > 1: the first is faster):")
    for label, a, b in pairs:
        if a in by_key and b in by_key:
            print(f"  {label:<{width}} {by_key[a].rate / by_key[b].rate:8.2f}x")


def print_versions(labels: dict[str, str], hint: str = "") -> None:
    """``label version`` of each module (``{module name: label}``), or the ImportError
    (``hint`` after it) when one of them is missing."""
    try:
        modules = {name: importlib.import_module(name) for name in labels}
    except ImportError as exc:
        print(f"({exc}{hint})")
        return
    print(", ".join(f"{label} {modules[name].__version__}" for name, label in labels.items()))


def print_load() -> None:
    load = os.getloadavg()
    print(
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start "
        f"(other processes on the {os.cpu_count()} CPUs slow every row)"
    )


def start(versions: dict[str, str] | None = None, hint: str = "") -> float:
    """Print the environment and, with ``versions`` (the peers: ``print_versions``), their
    versions and the load average; the start time for ``finish``."""
    t_start = time.perf_counter()
    print_environment()
    if versions is not None:
        print_versions(versions, hint)
        print_load()
    return t_start


def print_size(N: int, n: int, repeat: int) -> None:
    print(f"\nN = {N:,} structures x n = {n:,} points, float32 in; best of {repeat}")


def finish(ok: bool, t_start: float) -> int:
    """The last line, and the exit status (1 when a correctness check failed)."""
    total = time.perf_counter() - t_start
    print(f"correctness: {'all OK' if ok else 'FAILED'}; total {total:.0f} s")
    return 0 if ok else 1
