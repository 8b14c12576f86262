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


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["rmsd"] < 1.0 and (tmp_path / "aligned.zarr").is_dir()
