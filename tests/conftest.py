"""Shared fixtures: a real distributed LocalCluster, the AdK data, hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ADK = Path(
    os.environ.get(
        "SCALIGN_ADK", Path(__file__).resolve().parents[2] / "shared" / "data" / "adk_dims.npz"
    )
)


@pytest.fixture(scope="session")
def cluster():
    """One real LocalCluster (2 worker processes) for the whole session."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cl:
        yield cl


@pytest.fixture
def client(cluster):
    """A Client on the session cluster, the default scheduler for the test's duration."""
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=True) as c:
        yield c


@pytest.fixture(scope="session")
def adk():
    """The real AdK closed→open trajectory (98 frames × 3341 atoms, Å)."""
    if not ADK.exists():
        # CI always has shared/ beside the checkout: there a missing file is a failure.
        if os.environ.get("CI"):
            pytest.fail(f"AdK data not found at {ADK} (set SCALIGN_ADK)")
        pytest.skip(f"AdK data not found at {ADK} (set SCALIGN_ADK)")
    with np.load(ADK, allow_pickle=False) as data:
        return {k: data[k] for k in ("coords", "masses", "ca_indices")}


def assert_compiles_with_nvrtc(source: str, name: str) -> None:
    """``source`` compiles with NVRTC for compute_90 (Hopper), wherever CuPy is installed;
    no GPU needed. Skips without CuPy or its NVRTC library."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy")
    try:
        program = nvrtc.createProgram(source, name, [], [])
    except Exception as exc:  # the NVRTC library itself is missing
        pytest.skip(f"NVRTC unavailable: {exc}")
    try:
        nvrtc.compileProgram(program, ["-arch=compute_90"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(program))
