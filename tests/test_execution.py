"""Execution contexts: the embedded default, clusters, and their BLAS thread policy."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import scalign
from scalign.execution import run, scheduler


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_threaded_default_holds_blas_to_one_thread_and_restores_it():
    before = blas_threads()
    with scheduler() as client:
        assert client is None
        assert set(blas_threads()) == {1}
        assert dask.config.get("scheduler", None) in (None, "threads")
    assert blas_threads() == before


def test_local_cluster_is_started_and_closed():
    with scheduler(local=True, n_workers=1) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        ens = scalign.helix_ensemble(50, 8, chunks=25)
        out = run(scalign.align(ens, 0)["rmsd"], progress=True)
        assert np.all(out.values < 1e-4)
    assert client.status == "closed"


def test_gpu_with_an_address_joins_only_with_cupy_here():
    """``gpu=True`` with an address joins that scheduler's GPU workers; the graphs of CuPy
    chunks are built in this process, so CuPy must import here (checked before
    connecting)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed")
    with pytest.raises(RuntimeError, match="needs CuPy"), scheduler("tcp://127.0.0.1:1", gpu=True):
        pass


def test_local_cluster_workers_get_the_malloc_settings_unless_the_user_set_them(monkeypatch):
    """distributed's MALLOC_TRIM_THRESHOLD_=65536 pins glibc's mmap threshold at 128 KiB
    (every NumPy temporary faults its pages in afresh: 2.2x slower kernels); the workers
    of scalign's clusters get 64 MiB for both, and a user's own value is kept, also after
    a plain LocalCluster has copied distributed's defaults into this process's
    environment (its nanny does)."""
    import os

    from distributed import LocalCluster

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)  # as in a fresh shell
    with LocalCluster(n_workers=1, processes=True, dashboard_address=":0"):
        pass

    def environ():
        return os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_")

    with scheduler(local=True, n_workers=1, threads_per_worker=1) as client:
        (got,) = client.run(environ).values()
    assert got == (str(64 * 2**20), str(64 * 2**20))
    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    with dask.config.set({key: 1000}), scheduler(local=True, n_workers=1) as client:
        (got,) = client.run(environ).values()
    assert got == (str(64 * 2**20), "1000")


def test_explicit_choices_win_over_the_environment_and_a_dead_scheduler_fails_fast(
    monkeypatch, capsys
):
    """$SCALIGN_SCHEDULER replaces only the defaults: threads=True and local=True are
    kept. A scheduler that does not answer is a ConnectionError naming it, within
    CONNECT_TIMEOUT (distributed's own wait is 30 s), and one line from the CLI."""
    import time

    import scalign.execution
    from scalign.cli import main

    monkeypatch.setattr(scalign.execution, "CONNECT_TIMEOUT", 1)
    monkeypatch.setenv("SCALIGN_SCHEDULER", "tcp://127.0.0.1:1")
    with scheduler(threads=True) as client:
        assert client is None
    with scheduler(local=True, n_workers=1) as client:
        assert client.scheduler.address != "tcp://127.0.0.1:1"
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"127.0.0.1:1 within 1 s \(from \$SCALIGN"):
        with scheduler():
            pass
    assert time.perf_counter() - t0 < 15
    assert main(["demo", "--structures", "20", "--points", "6", "--chunks", "10"]) == 2
    assert capsys.readouterr().err.strip().endswith("(from $SCALIGN_SCHEDULER)")
    with pytest.raises(ValueError, match="threads=True .* excludes"):
        with scheduler("tcp://127.0.0.1:1", threads=True):
            pass


@pytest.mark.parametrize(("value", "exc"), [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_worker_counts_must_be_positive_integers(value, exc):
    """--workers 0 used to hang: LocalCluster waits for workers that never come."""
    with pytest.raises(exc, match="n_workers must be a positive integer"):
        with scheduler(local=True, n_workers=value):
            pass
    with pytest.raises(exc, match="threads_per_worker must be a positive integer"):
        with scheduler(local=True, threads_per_worker=value):
            pass


def test_worker_counts_without_a_cluster_started_here_are_an_error(
    cluster, tmp_path, monkeypatch, capsys
):
    """``scalign align IN OUT --workers 4`` (no --local) ran on the threaded scheduler
    and said nothing; with --scheduler or --threads the count was dropped too."""
    from scalign import helix_ensemble, save_zarr
    from scalign.cli import main

    with pytest.raises(ValueError, match=r"n_workers \(--workers\) sizes a cluster"):
        with scheduler(n_workers=2):
            pass
    with pytest.raises(ValueError, match="threads_per_worker needs local=True"):
        with scheduler(cluster.scheduler_address, threads_per_worker=1):
            pass
    # --local --scheduler ADDR: the address won and --local was dropped silently
    with pytest.raises(ValueError, match=r"local=True \(--local\) starts a cluster here"):
        with scheduler(cluster.scheduler_address, local=True):
            pass
    source, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    save_zarr(helix_ensemble(20, 6, chunks=10), source)
    address = cluster.scheduler_address
    for extra in (["--workers", "4"], ["--scheduler", address, "--workers", "4"]):
        assert main(["align", str(source), str(out), "--quiet", *extra]) == 2
        assert "--workers" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("SCALIGN_SCHEDULER", address)
    assert main(["demo", "--structures", "20", "--points", "6", "--workers", "1"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["demo", "--structures", "20", "--threads", "--workers", "1"]) == 2


@pytest.mark.parametrize("word", ["threads", "local", "gpu"])
def test_a_word_for_an_address_is_a_clear_error(word, monkeypatch, capsys):
    """``scheduler("threads")`` reached distributed as a host name and failed there with
    "missing port number in address 'threads'"; from $SCALIGN_SCHEDULER too."""
    from scalign.cli import main

    with pytest.raises(ValueError, match=f"address '{word}' is not a scheduler address"):
        with scheduler(word):
            pass
    monkeypatch.setenv("SCALIGN_SCHEDULER", word)
    with pytest.raises(ValueError, match=r"from \$SCALIGN_SCHEDULER\) is not a scheduler"):
        with scheduler():
            pass
    assert main(["demo", "--structures", "20", "--points", "6", "--chunks", "10"]) == 2
    assert "is not a scheduler address" in capsys.readouterr().err


def test_an_interrupted_threaded_run_returns_once_its_started_tasks_have_ended():
    """Dask's shared thread pool went on with the tasks it had started after Ctrl-C (a
    block write each), into a destination the next job may already be writing."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, signal, threading, time
        import dask
        from scalign.execution import run

        lock, state = threading.Lock(), {"running": 0, "done": 0}

        def task(i):
            with lock:
                state["running"] += 1
            time.sleep(0.5)
            with lock:
                state["running"] -= 1
                state["done"] += 1

        run(dask.delayed(task, pure=False)(-1))  # the pool's threads up
        threading.Timer(0.7, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            run(dask.delayed(list)([dask.delayed(task, pure=False)(i) for i in range(20)]))
        except KeyboardInterrupt:
            at_return = dict(state)
        time.sleep(1.0)
        print(at_return["running"], at_return["done"], state["done"])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    running, done, later = map(int, out.stdout.split())
    assert running == 0 and done == later > 1


def test_run_takes_what_dask_compute_takes_and_keeps_the_callers_context():
    """The pool of its own made run() read the scheduler of a list as a collection's
    (AttributeError) and drop the caller's context variables (NumPy's errstate)."""
    import dask.array as da

    assert run([da.ones(2)])[0].tolist() == [1.0, 1.0]
    assert run((da.ones(2), 3))[1] == 3
    assert run(np.ones(2)).tolist() == [1.0, 1.0]
    with np.errstate(divide="raise"), pytest.raises(FloatingPointError):
        run(da.ones(4, chunks=2) / 0)
    with dask.config.set(scheduler="sync"):
        assert run(da.ones(3).sum()) == 3.0
