"""Bad input to ``run_sweep.py``: exit 2, one stderr line naming the problem and the fix, no
traceback, and nothing already written is touched. Every case is found before Ray starts.

Most cases call ``run_sweep.main`` in this process (fast); the ones marked ``subprocess`` run the
real script, as a user would.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import run_sweep
from amtl.data.nyuv2 import write_nyuv2_tree
from amtl.data.voc import write_voc_tree

REPO = Path(__file__).resolve().parent.parent
# Words a message uses when it tells the user what to do.
FIX_WORDS = re.compile(r"\b(pass|give|use|remove|check|choose|delete|fix|drop|set|see --help|must|need|list|"
                       r"lower|make|expected|known|one of|at least|put|rename|write|narrow|searchable|hint|"
                       r"aggregators|weightings)\b", re.I)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Storage with an earlier sweep and cached potentials, data trees and space files, good and bad."""
    root = tmp_path_factory.mktemp("bad-input")
    store = root / "store"
    (store / "old").mkdir(parents=True)
    (store / "old" / "state.json").write_text('{"done": ["potentials", "search"], '
                                              '"options": {"samples": 99, "train": {"epochs": 7}}}')
    pd.DataFrame({"trial_id": ["a"], "phase": ["search"], "status": ["TERMINATED"]}).to_parquet(
        store / "old" / "trials.parquet")
    (store / "old" / "notes.txt").write_text("hours of work")
    (store / "empty-state").mkdir()  # a state.json emptied (e.g. a disk that filled up), no backup
    (store / "empty-state" / "state.json").write_bytes(b"")
    (store / "truncated-state").mkdir()  # cut short by a partial copy; the backup is whole
    (store / "truncated-state" / "state.json").write_text('{"done": ["potentials", "sea')
    (store / "truncated-state" / "state.json.bak").write_text('{"done": ["potentials"], "options": {}}')
    corrupt = root / "corrupt-potentials"
    corrupt.mkdir()
    (corrupt / "potentials.parquet").write_bytes(b"PAR1 this is not parquet")
    foreign = root / "foreign-potentials"
    foreign.mkdir()
    pd.DataFrame({"task": ["depth"], "value": [0.5]}).to_parquet(foreign / "potentials.parquet")
    as_file = root / "a-file"
    as_file.write_text("not a directory")

    rng = np.random.default_rng(0)
    def nyu(path: Path, n_train: int = 4) -> Path:
        for split, n in (("train", n_train), ("val", 2)):
            write_nyuv2_tree(path, split, rng.random((n, 8, 8, 3), dtype=np.float32),
                             rng.integers(0, 13, (n, 8, 8)).astype(np.float32),
                             rng.random((n, 8, 8, 1), dtype=np.float32) + 0.5, None)
        return path
    nyu_missing = nyu(root / "nyu-missing")
    (nyu_missing / "train" / "depth" / "2.npy").unlink()  # indices 0, 1, 3: a hole
    nyu_ragged = nyu(root / "nyu-ragged")
    np.save(nyu_ragged / "train" / "label" / "4.npy", np.zeros((8, 8), np.float32))  # 5 labels, 4 images
    nyu_no_depth = nyu(root / "nyu-no-depth")
    for p in (nyu_no_depth / "val" / "depth").glob("*.npy"):
        p.unlink()
    (nyu_no_depth / "val" / "depth").rmdir()
    voc = root / "voc-no-imagesets"
    img = np.full((3, 8, 8), 128, np.uint8)
    write_voc_tree(voc, {"train": {"images": {"a": img, "b": img}, "segmentation": {"a": np.zeros((8, 8), np.int64),
                                                                                     "b": np.zeros((8, 8), np.int64)}}})
    import shutil
    shutil.rmtree(voc / "VOCdevkit" / "VOC2012" / "ImageSets")

    spaces = _yaml_files(root / "spaces", {
        "malformed": "method: amtl\nparams: {focusing: {distribution: uniform, low: 1\n",
        "unknown-hparam": "method: amtl\nparams:\n  focus: {distribution: uniform, low: 1, high: 2}\n",
        "wrong-type": "method: amtl\nparams:\n  focusing: {distribution: uniform, low: one, high: 2}\n",
        "empty-range": "method: amtl\nparams:\n  focusing: {distribution: uniform, low: 2, high: 2}\n",
        "inverted": "method: amtl\nparams:\n  margin: {distribution: uniform, low: 0.2, high: 0.1}\n",
        "log-zero": "method: amtl\nparams:\n  margin: {distribution: loguniform, low: 0.0, high: 0.1}\n",
        "unknown-distribution": "method: amtl\nparams:\n  margin: {distribution: normal, low: 0.0, high: 0.1}\n",
        "empty-choices": "method: amtl\nparams:\n  margin: {distribution: categorical, choices: []}\n",
        "method-mismatch": "method: dwa\nparams:\n  focusing: {distribution: uniform, low: 1, high: 2}\n",
        "searched-potentials": "method: amtl\nparams:\n  potentials: {distribution: categorical, choices: [1]}\n",
        "shared-epochs": "methods: [amtl]\nshared:\n  epochs: {distribution: int, low: 1, high: 3}\n",
        "not-a-mapping": "- just\n- a list\n",
        "out-of-range": "methods: [amtl]\nshared:\n  lr: {distribution: loguniform, low: 1.0e-3, high: 10.0}\n",
    })
    (spaces / "latin1.yaml").write_bytes("method: amtl\n# réglages\nparams: {}\n".encode("latin-1"))
    configs = _yaml_files(root / "configs", {
        "typo": "method: [ew]\nsampels: 4\n",
        "wrong-type": "samples: six\n",
        "bad-choice": "scheduler: pbt\n",
        "malformed": "samples: [4\n",
        "a-list": "- samples\n",
        "checked": "epochs: -1\n",  # a valid file: its options get the usual checks
    })
    header = ("from amtl.extend import Task, register_task, register_weighting\n"
              "from amtl.balancers.weightings import _dwa\n")
    plugins = root / "plugins"
    plugins.mkdir()
    for name, body in {
        "broken": "x = 1 / 0\n",
        "abstract": "class Half(Task):\n    name = 'half'\n    kpi = 'acc'\n    higher_is_better = {'acc': True}\n"
                    "register_task('half', Half)\n",
        "taken": "register_task('novel', lambda **_: None)\nregister_task('depth', lambda **_: None)\n",
        "taken_balancer": "class Again(_dwa.DynamicWeightAverage):\n    name = 'dwa'\nregister_weighting(Again)\n",
        "bad_kpi": "class Scored(Task):\n    name = 'scored'\n    kpi = 'loss'\n    higher_is_better = {'acc': True}\n"
                   "    head = sample_losses = metric = None\nregister_task('scored', Scored)\n",
    }.items():
        (plugins / f"bad_plugin_{name}.py").write_text(header + body)
    return {"root": root, "store": store, "plugins": plugins,
            "corrupt": corrupt, "foreign": foreign, "as_file": as_file,
            "nyu_missing": nyu_missing, "nyu_ragged": nyu_ragged, "nyu_no_depth": nyu_no_depth, "voc": voc,
            "spaces": spaces, "configs": configs}


def _yaml_files(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir()
    for name, text in texts.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (id, argv with {placeholders} from the world fixture, regex the one line must match)
CASES = [
    ("unknown-method", "--method nosuch", r"nosuch"),
    ("unknown-combination", "--method amtl+nosuch", r"nosuch"),
    ("negative-epochs", "--epochs -1", r"--epochs must be at least 1, got -1"),
    ("zero-seeds", "--seeds 0", r"--seeds must be at least 1, got 0"),
    ("zero-samples", "--samples 0", r"--samples must be at least 1"),
    ("zero-workers", "--workers-per-trial 0", r"--workers-per-trial must be at least 1"),
    ("epochs-not-int", "--epochs three", r"--epochs: invalid int value"),
    ("unknown-scheduler", "--scheduler pbt", r"--scheduler: invalid choice"),
    ("unknown-option", "--epcohs 3", r"unrecognized arguments: --epcohs"),
    ("zero-cpus", "--cpus-per-trial 0", r"--cpus-per-trial must be > 0"),
    ("negative-gpus", "--gpus-per-trial -0.5", r"--gpus-per-trial"),
    ("zero-concurrency", "--max-concurrent 0", r"--max-concurrent must be at least 1"),
    ("zero-batch", "--batch-size 0", r"batch"),
    ("negative-lr", "--lr -0.1", r"lr"),
    ("unknown-task", "--tasks segmentation,colour", r"colour"),
    ("task-dataset-lacks", "--tasks segmentation,detection_x", r"detection_x"),
    ("kpi-not-a-task", "--tasks segmentation,depth --kpi normal", r"--kpi 'normal' is not one of"),
    ("bad-name", "--name ../elsewhere", r"--name '../elsewhere' must be a plain folder name"),
    ("unknown-dataset", "--dataset imagenet", r"imagenet"),
    ("nyu-without-root", "--dataset nyuv2 --tasks segmentation,depth", r"needs a data root; pass --data-root"),
    ("nyu-missing-root", "--dataset nyuv2 --tasks segmentation,depth --data-root {root}/nowhere",
     r"does not exist"),
    ("nyu-missing-file", "--dataset nyuv2 --tasks segmentation,depth --data-root {nyu_missing}", r"2\.npy is missing"),
    ("nyu-ragged", "--dataset nyuv2 --tasks segmentation,depth --data-root {nyu_ragged}", r"has 5 files"),
    ("nyu-missing-modality", "--dataset nyuv2 --tasks segmentation,depth --data-root {nyu_no_depth}",
     r"depth directory does not exist"),
    ("voc-without-imagesets", "--dataset voc --tasks segmentation --data-root {voc}", r"ImageSets"),
    ("space-missing", "--space {root}/nowhere.yaml", r"--space file .* does not exist"),
    ("space-malformed", "--space {spaces}/malformed.yaml", r"malformed\.yaml"),
    ("space-unknown-hparam", "--space {spaces}/unknown-hparam.yaml", r"focus"),
    ("space-wrong-type", "--space {spaces}/wrong-type.yaml", r"low"),
    ("space-empty-range", "--space {spaces}/empty-range.yaml", r"focusing"),
    ("space-inverted-range", "--space {spaces}/inverted.yaml", r"margin"),
    ("space-log-touching-zero", "--space {spaces}/log-zero.yaml", r"margin"),
    ("space-unknown-distribution", "--space {spaces}/unknown-distribution.yaml", r"normal"),
    ("space-empty-choices", "--space {spaces}/empty-choices.yaml", r"choices"),
    ("space-method-mismatch", "--method dwa --space {spaces}/method-mismatch.yaml", r"focusing|method"),
    ("space-searches-potentials", "--space {spaces}/searched-potentials.yaml", r"potentials"),
    ("space-searches-budget", "--space {spaces}/shared-epochs.yaml", r"epochs"),
    ("space-not-a-mapping", "--space {spaces}/not-a-mapping.yaml", r"not-a-mapping\.yaml"),
    ("space-out-of-range", "--space {spaces}/out-of-range.yaml", r"lr"),
    ("optuna-url", "--optuna-storage not-a-url", r"--optuna-storage is not a SQLAlchemy URL"),
    ("storage-is-a-file", "--storage {as_file}/sub", r"cannot write to storage"),
    ("existing-sweep-other-options", "--name old",
     r"sweep 'old' in '.*' was run with other options \(samples: 99 -> 6; epochs: 7 -> 3\); run it with its "
     r"own \(--config .*/old/sweep\.yaml\), or choose another --name for these$"),
    ("nothing-to-resume", "--name never-ran --resume", r"no sweep 'never-ran' to resume"),
    ("pareto-and-kpi", "--objective pareto --kpi depth", r"--objective pareto and --kpi depth both choose .* drop one"),
    ("pareto-one-task", "--objective pareto --tasks depth", r"--objective pareto needs two or more --tasks"),
    ("nothing-to-report", "--name never-ran --report", r"no sweep 'never-ran' in '.*' to report on; check --name"),
    ("corrupt-potentials", "--storage {corrupt}", r"potentials file .* is unreadable .* --recompute-potentials"),
    ("foreign-potentials", "--storage {foreign}", r"potentials file .* lacks columns .* --recompute-potentials"),
    ("nan-cpus", "--cpus-per-trial nan", r"--cpus-per-trial must be > 0 and finite, got nan"),
    ("inf-cpus", "--cpus-per-trial inf", r"--cpus-per-trial must be > 0 and finite, got inf"),
    ("nan-gpus", "--gpus-per-trial nan", r"--gpus-per-trial must be >= 0 and finite, got nan"),
    ("inf-gpus", "--gpus-per-trial inf", r"--gpus-per-trial must be >= 0 and finite, got inf"),
    ("nan-lr", "--lr nan", r"--lr must be > 0 and finite, got nan"),
    ("inf-lr", "--lr inf", r"--lr must be > 0 and finite, got inf"),
    ("zero-lr", "--lr 0", r"--lr must be > 0 and finite, got 0"),
    # Names with spaces or control characters: given as argv lists, not split on whitespace.
    ("blank-name", ("--name", " "), r"--name ' ' must be a plain folder name"),
    ("whitespace-name", ("--name", "\t \n"), r"--name '\\t \\n' must be a plain folder name"),
    ("padded-name", ("--name", "sweep "), r"--name 'sweep ' must be a plain folder name .*trailing spaces"),
    ("control-name", ("--name", "a\x1b[31mb"), r"--name 'a\\x1b\[31mb' must be a plain folder name"),
    ("space-is-a-directory", "--space {spaces}", r"--space '.*spaces' is a directory; give one YAML file"),
    ("space-not-utf8", "--space {spaces}/latin1.yaml", r"latin1\.yaml: is not UTF-8 text \(byte 0xe9 at line 2\)"),
    ("config-missing", "--config {root}/nowhere.yaml", r"config file '.*nowhere\.yaml' does not exist; check the path"),
    ("config-unknown-option", "--config {configs}/typo.yaml", r"unknown option 'sampels' \(did you mean 'samples'\?\)"),
    ("config-wrong-type", "--config {configs}/wrong-type.yaml", r"'samples' must be an integer, got 'six'"),
    ("config-bad-choice", "--config {configs}/bad-choice.yaml", r"'scheduler' must be one of asha, fifo, got 'pbt'"),
    ("config-malformed", "--config {configs}/malformed.yaml", r"malformed\.yaml' is not valid YAML at line \d+; fix the syntax"),
    ("config-not-a-mapping", "--config {configs}/a-list.yaml", r"must be a mapping of option names to values"),
    ("config-checked", "--config {configs}/checked.yaml", r"--epochs must be at least 1, got -1"),
    ("plugin-missing-file", "--plugin {root}/nowhere.py", r"plugin file '.*nowhere\.py' does not exist; check the"),
    ("plugin-unknown-module", "--plugin no_such_plugin_module",
     r"plugin module 'no_such_plugin_module' is not installed"),
    ("plugin-import-error", "--plugin {plugins}/bad_plugin_broken.py",
     r"plugin '.*bad_plugin_broken\.py' failed to import: ZeroDivisionError: division by zero; fix the plugin"),
    ("plugin-abstract-task", "--plugin {plugins}/bad_plugin_abstract.py",
     r"task 'half' \(Half\) does not implement head, metric, sample_losses"),
    ("plugin-task-name-taken", "--plugin {plugins}/bad_plugin_taken.py", r"task name 'depth' is taken; choose another"),
    ("plugin-balancer-name-taken", "--plugin {plugins}/bad_plugin_taken_balancer.py", r"weighting name 'dwa'"),
    ("plugin-kpi-not-a-metric", "--plugin {plugins}/bad_plugin_bad_kpi.py",
     r"task 'scored' has kpi 'loss', which is not one of its metrics \(acc\); set kpi"),
    ("state-empty", "--name empty-state --resume",
     r"state file '.*empty-state/state\.json' is unreadable \(the file is empty\); it has no usable backup, so "
     r"write \{\"done\": \[\]\} into it and rerun with --resume"),
    ("state-empty-no-resume", "--name empty-state", r"state file '.*empty-state/state\.json' is unreadable"),
    ("state-truncated", "--name truncated-state --resume",
     r"state file '.*truncated-state/state\.json' is unreadable \(not JSON: .*\); put its backup in its place "
     r"\(cp '.*truncated-state/state\.json\.bak' '.*truncated-state/state\.json'\) and rerun with --resume"),
]
assert len({c[0] for c in CASES}) == len(CASES), "case names are test ids: keep them unique"
SUBPROCESS = {"unknown-method", "existing-sweep-other-options"}


def _argv(template: str | tuple[str, ...], world: dict, *extra: str) -> list[str]:
    if isinstance(template, tuple):  # already split: arguments holding whitespace
        argv = [a.format(**world) for a in template]
    else:
        argv = template.format(**{k: v for k, v in world.items()}).split()
    defaults = {"--storage": str(world["store"]), "--name": "new"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    return argv + ["--no-wandb", *extra]


def _check_one_line(err: str, pattern: str) -> str:
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line:\n{err}"
    line = err.strip()
    assert line.startswith("run_sweep.py: error: "), line
    assert re.search(pattern, line), f"{pattern!r} not in: {line}"
    assert FIX_WORDS.search(line.split("error: ", 1)[1]), f"no fix named: {line}"
    return line


@pytest.mark.parametrize("case, template, pattern", [c for c in CASES if c[0] not in SUBPROCESS],
                         ids=[c[0] for c in CASES if c[0] not in SUBPROCESS])
def test_bad_input_in_process(world, capsys, case, template, pattern):
    before = _snapshot(world["root"])
    # A case that wrongly passed every check would start a sweep; an unreachable --address (the
    # last check) stops it in seconds instead, and then the pattern does not match.
    argv = _argv(template, world, "--address", f"127.0.0.1:{_closed_port()}")
    try:
        code = run_sweep.main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    _check_one_line(captured.err, pattern)
    assert _snapshot(world["root"]) == before  # nothing written is lost or changed
    import ray
    assert not ray.is_initialized()  # found before Ray started


def _spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run_sweep.py"), *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_bad_input_as_real_processes(world):
    """The script itself, run as a user would, one process at a time. An unreachable --address must
    fail in seconds: ``ray.init`` alone waits about two minutes for a GCS that never answers."""
    before = _snapshot(world["root"])
    cases = [c for c in CASES if c[0] in SUBPROCESS]
    cases.append(("refused-address", f"--address 127.0.0.1:{_closed_port()}",
                  r"cannot reach the Ray cluster at '127\.0\.0\.1:\d+'.*check the address"))
    cases.append(("silent-address", "--address 192.0.2.1:6379", r"cannot reach the Ray cluster at '192\.0\.2\.1"))
    seconds = {}
    for case, template, pattern in cases:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), *_argv(template, world)], cwd=REPO,
                              text=True, capture_output=True, timeout=300)
        seconds[case] = time.perf_counter() - start
        assert done.returncode == 2, (case, done.stderr)
        assert done.stdout == ""
        _check_one_line(done.stderr, pattern)
    # Interpreter start and imports dominate (and vary with the machine's load): compare with the
    # case that fails without any network, measured beside them. The connect timeout is 3 s.
    baseline = seconds["unknown-method"]
    for case in ("refused-address", "silent-address"):
        assert seconds[case] < baseline + 10, seconds
    print({k: round(v, 1) for k, v in seconds.items()})
    assert _snapshot(world["root"]) == before


# Requests no node of the embedded cluster (this machine) can hold: without --address, so no
# unreachable address stops a case that wrongly passed; "--name old" (an existing sweep run with other
# options) does instead, later in the checks, with another message.
EMBEDDED_CASES = [
    ("cpus-beyond-machine", "--cpus-per-trial 1000",
     r"one trial needs 1000 CPU on one node, but this machine \(the embedded Ray cluster's only node\) has \d+; "
     r"lower --cpus-per-trial to at most \d+, or pass --address"),
    ("workers-beyond-machine", "--workers-per-trial 500 --cpus-per-trial 1000",
     r"one trial needs 500 worker\(s\) x 2 CPU = 1000 CPU on one node, but this machine .* has \d+"),
    ("gpus-beyond-machine", "--gpus-per-trial 1000", r"one trial needs 1000 GPU on one node, but this machine"),
    ("share-below-ray-unit", "--workers-per-trial 1000 --cpus-per-trial 0.001",
     r"--cpus-per-trial 0\.001 over 1000 worker\(s\) gives each worker 1e-06 CPU, below Ray's smallest unit"),
]


@pytest.mark.parametrize("case, template, pattern", EMBEDDED_CASES, ids=[c[0] for c in EMBEDDED_CASES])
def test_request_beyond_the_embedded_cluster(world, capsys, case, template, pattern):
    before = _snapshot(world["root"])
    argv = _argv(template + " --name old", world)
    code = run_sweep.main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    _check_one_line(captured.err, pattern)
    assert _snapshot(world["root"]) == before
    import ray
    assert not ray.is_initialized()


def test_recompute_replaces_an_unreadable_potentials_file(tmp_path):
    """With --recompute-potentials the new single-task results are saved; the truncated file they
    replace is kept aside, and the move is said."""
    from sweeps import potentials as pot
    from sweeps.runner import SweepOptions
    from sweeps.storage import Storage

    storage = Storage(tmp_path)
    train = SweepOptions().trial_train.to_dict()
    pot.save(storage, train, [{"task": "depth", "potential": 0.5, "val/depth/abs_err": 0.2}])
    whole = (tmp_path / pot.FILE).read_bytes()
    (tmp_path / pot.FILE).write_bytes(whole[: len(whole) // 2])  # truncated, e.g. a disk that filled up
    with pytest.raises(pot.PotentialsError, match="--recompute-potentials"):
        pot.load(storage, train, ["depth"])
    said: list[str] = []
    pot.save(storage, train, [{"task": "depth", "potential": 0.7, "val/depth/abs_err": 0.1}], say=said.append)
    result, missing = pot.load(storage, train, ["depth"])
    assert missing == [] and result.potentials == {"depth": 0.7}
    aside = list(tmp_path.glob(f"{pot.FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == whole[: len(whole) // 2]
    assert len(said) == 1 and aside[0].name in said[0] and "unreadable" in said[0]


def test_state_backup_replaces_a_damaged_state(world, tmp_path, capsys):
    """Every save keeps the previous state as state.json.bak; the error for a damaged state.json
    names that copy, and copying it back as told is a state --resume accepts."""
    import shlex

    from sweeps.runner import STATE, Sweep, SweepOptions, check_resume
    from sweeps.storage import Storage

    options = SweepOptions(storage=str(tmp_path), name="s", no_wandb=True)
    sweep = Sweep(options)
    sweep.save_state()
    sweep.state["done"].append("potentials")
    sweep.save_state()
    state = tmp_path / "s" / STATE
    assert '"potentials"' in state.read_text()
    state.write_text(state.read_text()[:20])
    argv = ["--storage", str(tmp_path), "--name", "s", "--resume", "--no-wandb",
            "--address", f"127.0.0.1:{_closed_port()}"]
    assert run_sweep.main(argv) == 2
    line = _check_one_line(capsys.readouterr().err, r"put its backup in its place \(cp .*\) and rerun with --resume")
    command = re.search(r"\(cp (.*?)\)", line).group(1)
    subprocess.run(["cp", *shlex.split(command)], check=True)
    options.resume = True
    assert check_resume(options, Storage(tmp_path))  # the fix works: the state is readable again
    assert "potentials" not in json.loads(state.read_text())["done"]  # the previous save's
