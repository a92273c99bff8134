"""User code through the public contract: a plugin file, an installed entry point, in-process loads.

The plugin (``tests/plugin_points.py``) is copied into a temporary folder that is on nobody's path,
as a user's file would be. The two-node cluster case is in ``test_cluster.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from amtl import plugins
from amtl.balancers import names as balancer_names
from amtl.data.registry import DATASETS
from amtl.models import MODELS_REGISTRY
from amtl.tasks import TASKS
from sweeps.space import load_space

REPO = Path(__file__).resolve().parent.parent
PLUGIN_SOURCE = Path(__file__).with_name("plugin_points.py")
PLUGIN_NAMES = {"dataset": "points", "tasks": ("first", "second"), "model": "mlp", "balancer": "tilted"}


def write_plugin(folder: Path, module: str = "points_plugin") -> Path:
    """The test plugin as a file ``<folder>/<module>.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    shutil.copy(PLUGIN_SOURCE, path)
    return path


def _train(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "amtl.train", "--dataset", "points", "--tasks", "first,second", "--model", "mlp",
            "--balancer", "tilted", "--hparams", '{"tilt": 0.3}', "--epochs", "2", "--n-train", "1000",
            "--n-val", "100", "--n-test", "400", "--lr", "0.01", "--device", "cpu", "--threads", "1",
            "--out", str(out), *extra]
    return subprocess.run(argv, cwd=REPO, text=True, capture_output=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def loaded(tmp_path):
    """The plugin loaded in this process, and unloaded after the test (other tests list every name)."""
    path = write_plugin(tmp_path / "elsewhere")
    plugins.load(str(path))
    yield path
    plugins.unload(str(path))


def test_a_plugin_file_brings_its_task_dataset_model_and_balancer(tmp_path):
    path = write_plugin(tmp_path / "elsewhere")
    done = _train(tmp_path / "run", "--plugin", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    # The signs of x and y are learnable almost perfectly; chance is 0.5.
    assert test["first/acc"] > 0.9 and test["second/acc"] > 0.9, test
    without = _train(tmp_path / "run-without")
    assert without.returncode == 2
    assert without.stderr.count("\n") == 1 and "unknown dataset 'points'" in without.stderr, without.stderr


def test_an_installed_entry_point_plugin_is_found_without_a_flag(tmp_path):
    """A real package (built and installed by pip) declaring the ``amtl_sweep.plugins`` entry point."""
    package = tmp_path / "pkg"
    write_plugin(package / "points_ep", "__init__")
    (package / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "points-ep"
        version = "0.1"
        [project.entry-points."{plugins.ENTRY_POINT_GROUP}"]
        points = "points_ep"
        [tool.setuptools]
        packages = ["points_ep"]
        """))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(package)], text=True, capture_output=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert list(target.glob("points_ep-0.1.dist-info/entry_points.txt"))
    done = _train(tmp_path / "run", env={"PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_loaded_names_work_like_built_in_ones_and_unload_cleanly(loaded):
    assert "points" in DATASETS and "mlp" in MODELS_REGISTRY and {"first", "second"} <= set(TASKS)
    assert "tilted" in balancer_names()
    space = load_space(["tilted"])  # no search-space file: the declared range is searched
    tilt = space.params["tilted"]["tilt"]
    assert (tilt.distribution, tilt.low, tilt.high) == ("uniform", 0.2, 0.8)
    assert plugins.load(str(loaded)) is plugins.load(str(loaded))  # imported once
    plugins.unload(str(loaded))
    assert "points" not in DATASETS and "tilted" not in balancer_names() and "first" not in TASKS
    plugins.load(str(loaded))  # loads again after an unload (the fixture unloads it once more)
    assert "tilted" in balancer_names()


def test_a_plugin_that_fails_half_way_leaves_no_name_behind(tmp_path):
    bad = tmp_path / "half_way_plugin.py"
    bad.write_text("from amtl.extend import register_task\nfrom amtl.tasks import Depth\n"
                   "register_task('novel', lambda **_: Depth())\nregister_task('depth', lambda **_: Depth())\n")
    with pytest.raises(plugins.PluginError, match="task name 'depth' is taken"):
        plugins.load(str(bad))
    assert "novel" not in TASKS and "half_way_plugin" not in sys.modules


def test_a_sweep_hands_its_trials_plugin_files_by_absolute_path(tmp_path, monkeypatch):
    """Trial processes do not run in the driver's working directory (a relative path failed there)."""
    from sweeps.runner import SweepOptions
    monkeypatch.chdir(tmp_path)
    train = SweepOptions.of(plugins=["mine/plugin.py", "installed.module"]).trial_train
    assert train.plugins == [str(tmp_path / "mine" / "plugin.py"), "installed.module"]
