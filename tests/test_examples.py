"""The examples run as scripts (they are documentation that must keep working)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("align_ensemble.py", ["3000"], "rotation error median"),
        ("adk_trajectory.py", [], "C-alpha RMSD to frame 0"),
    ],
)
def test_example_runs(script, args, expect, adk):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout
