"""The examples run as scripts (they are documentation that must keep working)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_align_ensemble_example():
    assert "rotation error median" in run_example("align_ensemble.py", "3000")


def test_adk_trajectory_example(adk):
    from conftest import ADK

    out = run_example("adk_trajectory.py", str(ADK))
    assert "C-alpha RMSD to frame 0: first 0.000 Å, last 6.81" in out
