"""bench/gpu_check.sh and bench/gpu_check.py, the CUDA checks, kept working where no GPU is."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_shell_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_script_refuses_with_one_line(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == ["no CUDA device: run this on a machine with a GPU"]


def test_the_checks_run_on_cpu():
    """Every check on CPU for a method of each kind: the engine engages and agrees, training works."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--methods", "ew,mgda,nash,graddrop,amtl"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for label in ("engine small mgda", "engine resnet18 nash", "train float32 graddrop", "train float16 amtl"):
        assert any(line.startswith("ok") and label in line for line in lines), done.stdout
    # MatrixAggregators (GradDrop) and weightings (EW, AMTL) have no layer-wise engine to check
    assert not any("engine" in line and ("graddrop" in line or " ew" in line) for line in lines)
    assert lines[-1] == "0 failed"
