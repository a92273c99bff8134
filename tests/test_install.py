"""A regular (non-editable) install of the project works outside the checkout: commands, package data, a sweep."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding a wheel install of a copy of this working tree. Its dependencies (torch,
    Ray, ...) come from this environment through a path file, which does not run this environment's
    own editable install of the project: every import of amtl/sweeps must come from the wheel."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # building writes build/ and *.egg-info next to the sources: not in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "build",
                                                                  "*.egg-info", ".pytest_cache"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-build-isolation", "--no-index", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {"venv": venv, "site": site, "cwd": root, "env": {**env, "RAY_USAGE_STATS_ENABLED": "0"}}


def _run(installed, *argv, timeout=120):
    return subprocess.run([str(installed["venv"] / "bin" / argv[0]), *argv[1:]], cwd=installed["cwd"],
                          env=installed["env"], capture_output=True, text=True, timeout=timeout)


def test_commands_and_package_data_come_from_the_wheel(installed):
    where = _run(installed, "python", "-c", "import amtl, sweeps, run_sweep, sweeps.space as s; "
                 "print(amtl.__file__, sweeps.__file__, run_sweep.__file__, s.SPACE_DIR, sep='\\n')")
    assert where.returncode == 0, where.stderr
    paths = where.stdout.split()
    assert all(p.startswith(str(installed["site"])) for p in paths), paths
    assert {"amtl.yaml", "all.yaml", "README.md"} <= {p.name for p in Path(paths[-1]).iterdir()}
    for command in ("amtl-sweep", "amtl-train"):
        shown = _run(installed, command, "--help")
        assert shown.returncode == 0 and "--config" * (command == "amtl-sweep") in shown.stdout, shown.stderr


@pytest.mark.timeout(900)
def test_a_tiny_sweep_runs_from_the_installed_command(installed, ray_cluster):
    """``ray_cluster``: the session's cluster runs meanwhile; the sweep starts its own embedded one."""
    storage = installed["cwd"] / "sweeps"
    done = _run(installed, "amtl-sweep", "--method", "dwa,pcgrad", "--samples", "2", "--seeds", "1", "--epochs", "1",
                "--tasks", "segmentation,depth", "--image-size", "32", "--n-train", "32", "--n-val", "8",
                "--n-test", "8", "--batch-size", "16", "--max-concurrent", "1", "--scheduler", "fifo", "--no-wandb",
                "--storage", str(storage), "--name", "wheel", timeout=840)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    trials = pd.read_parquet(storage / "wheel" / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all() and set(trials["phase"]) == {"potentials", "search", "seeds"}
    # The defaults: EW joins as the reference row, and the per-method search gives each of the three
    # methods --samples trials and the same epochs, whatever TPE would prefer.
    search = trials[trials["phase"] == "search"]
    assert search["method"].value_counts().to_dict() == {"dwa": 2, "ew": 2, "pcgrad": 2}
    assert search.groupby("method")["epochs"].sum().to_dict() == {"dwa": 2, "ew": 2, "pcgrad": 2}
    board = pd.read_parquet(storage / "wheel" / "leaderboard.parquet")
    assert sorted(board["method"]) == ["dwa", "ew", "pcgrad"] and set(board["trials"]) == {3}
    assert (storage / "wheel" / "sweep.yaml").is_file()
