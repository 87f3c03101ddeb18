"""Every benchmark script still starts: its imports resolve and its arguments parse (`--help`)."""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(path.name for path in (REPO / "bench").glob("*.py"))


def test_every_bench_script_is_covered():
    assert {"accuracy.py", "flowers17.py", "flowers17_data.py", "resume_cost.py", "throughput.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_help(script: str, monkeypatch, capsys):
    # In this process (imports already loaded): what `python bench/SCRIPT --help` runs.
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / script), "--help"])
    # As `python bench/SCRIPT` does, the script's folder comes first (the scripts then add the repository).
    monkeypatch.setattr(sys, "path", [str(REPO / "bench"), *sys.path])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "bench" / script), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
