"""Every benchmark script still starts: its imports resolve and its arguments parse (`--help`)."""

from __future__ import annotations

import os
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


def test_gpu_prepare_finds_what_the_gpu_machine_lacks():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_prepare
    finally:
        sys.path.remove(str(REPO / "bench"))
    lacking = {pin.split("==")[0].lower().replace("_", "-") for pin in gpu_prepare.beyond_gpu_machine()}
    # The two the GPU machine's list lacks, and what jsonargparse's `signatures` extra pulls in.
    assert {"jsonargparse", "torchdata", "typeshed-client", "docstring-parser"} <= lacking
    assert not lacking & {"torch", "pytorch-lightning", "numpy", "pyyaml", "typing-extensions"}  # there already


@pytest.mark.slow
def test_gpu_check_rehearsal_installs_from_wheels_and_trains(tmp_path, image_folder):
    # The GPU machine's situation: a venv of its packages alone, the rest from wheels prepared here.
    venv, prepared = tmp_path / "venv", tmp_path / "prepared"
    env = {**os.environ, "GPU_CHECK_DIR": str(prepared), "DATA_ROOT": str(image_folder), "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--rehearse", str(venv)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    installed = next(line for line in result.stdout.splitlines() if line.startswith("installed from the wheels"))
    assert "jsonargparse" in installed and "torchdata" in installed
    assert "test/acc =" in result.stdout and "rehearsal passed" in result.stdout
    bare = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, pytorch_lightning; import jsonargparse"],
                          capture_output=True, text=True, env={k: v for k, v in env.items() if k != "PYTHONPATH"})
    assert "No module named 'jsonargparse'" in bare.stderr  # the venv itself holds only the GPU machine's list
