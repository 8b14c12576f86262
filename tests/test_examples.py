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


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in readme.split("```python\n")[1:]]
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["rmsd"] < 1.0 and (tmp_path / "aligned.zarr").is_dir()
    assert (tmp_path / "rmsd.zarr").is_dir() and 0 < namespace["info"].fitness <= 1


def test_robust_pairwise_icp_example(tmp_path):
    out = run_example("robust_pairwise_icp.py", "400", "--plot", str(tmp_path / "fig.png"))
    robust = float(out.split("Tukey IRLS: rotation error median ")[1].split("°")[0])
    plain = float(out.split("plain Kabsch: rotation error median ")[1].split("°")[0])
    assert robust < 0.2 < plain
    assert "pairwise RMSD (400, 400)" in out and (tmp_path / "fig.png").stat().st_size > 0
    assert float(out.split("ICP: rotation error ")[1].split("°")[0]) < 0.5


def test_register_drift_example(tmp_path):
    out = run_example("register_drift.py", "12", "--plot", str(tmp_path / "drift.png"))
    rotation = float(out.split("rotation error max ")[1].split("°")[0])
    centre = float(out.split("centre error max ")[1].split(" px")[0])
    assert rotation < 0.05 and centre < 0.05
    assert "single pair at 120°: theta 120.0" in out and (tmp_path / "drift.png").is_file()


def test_rank_volumes_example(tmp_path):
    out = run_example("rank_volumes.py", "40", "--plot", str(tmp_path / "rank.png"))
    ranking = out.split("ranked by cost (lower is better):")[1]
    assert ranking.split("\n")[2].split()[:2] == ["1", "true"]
    assert "residual-covariance scores (true map): images [3, 7, 11]" in out
    assert float(out.split("median error ")[1].split("°")[0]) < 1.0
    assert (tmp_path / "rank.png").is_file()
