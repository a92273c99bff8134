"""A sweep never hangs and every interruption is resumable (real drivers, signals, Ray and disks).

- two sweeps at once on one machine, with ASHA stopping trials: both finish;
- Ctrl-C (SIGINT to the process group) and SIGTERM stop the driver cleanly (exit 130/143, one
  line saying how to resume), the phase is not recorded as done, and ``--resume`` loses nothing;
- a killed trial process is retried from its last checkpoint; a phase whose trials were lost is
  not done, and ``--resume`` finishes them;
- a full disk: one line naming it; after space is freed, ``--resume`` finishes;
- resources no node offers on an ``--address`` cluster: said once, then a bounded wait ends it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import kill_resume as kr  # noqa: E402

TINY = ["--seeds", "1", "--epochs", "2", "--tasks", "segmentation,depth", "--image-size", "32", "--n-val", "16",
        "--n-test", "16", "--batch-size", "16", "--max-concurrent", "2", "--no-wandb"]


def _sweep(*extra: str, n_train: int = 64, samples: int = 3, method: str = "ew,dwa") -> list[str]:
    # A joint search: ``samples`` trials in all, the budgets these tests are sized for.
    return ["--method", method, "--search", "joint", "--samples", str(samples), "--n-train", str(n_train), *TINY,
            *extra]


def _state(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "state.json").read_text())


def _wait_exit(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kr.end_session(proc.pid)
        raise AssertionError(f"the driver did not exit within {timeout:.0f}s:\n{log.read_text()[-3000:]}") from None


def _last_error_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("run_sweep.py:")]
    return lines[-1] if lines else ""


def _trial_processes(session_id: int, name: str = "ImplicitFunc") -> list[int]:
    """PIDs of the Tune trial processes (``ray::ImplicitFunc``) a driver's local cluster runs."""
    psutil = kr.processes.psutil()
    found = []
    for pid, _ in kr.session_processes(session_id):
        try:
            if name in " ".join(psutil.Process(pid).cmdline()):
                found.append(pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(1500)
def test_two_sweeps_at_once_with_asha_stopping_trials_both_finish(tmp_path):
    """Before: Ray Train's placement-group cleaner resolved the address "auto", found two clusters,
    died, and the next trials waited forever for the CPUs of the trials ASHA had stopped."""
    args = _sweep("--scheduler", "asha", samples=4)
    started = time.time()
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    procs = {name: kr.start_sweep(tmp_path / name, name, args=args, log=logs[name]) for name in logs}
    try:
        for name, proc in procs.items():
            assert _wait_exit(proc, 1200, logs[name]) == 0, logs[name].read_text()[-3000:]
    finally:
        for proc in procs.values():
            kr.end_session(proc.pid)
    stopped = 0
    for name in procs:
        trials = pd.read_parquet(tmp_path / name / name / "trials.parquet")
        assert set(trials["phase"]) == {"potentials", "search", "seeds"}
        stopped += int((trials["status"] == "STOPPED").sum())
    assert stopped >= 1, "ASHA stopped no trial, so no trial waited for a stopped trial's resources"
    # Whether a stopped trial's leaked placement group then blocks a later trial depends on timing;
    # the cause is not: the cleaner's state-API lookup fails and its monitor thread dies.
    confused = [str(path) for path in _ray_logs_since(started) if b"Found multiple active Ray" in path.read_bytes()]
    assert not confused, f"a Ray process resolved 'auto' to several clusters: {confused[:3]}"


def _ray_logs_since(started: float) -> list[Path]:
    """Log files of the Ray sessions (local clusters) started on this machine since ``started``."""
    import tempfile
    sessions = [d for d in (Path(tempfile.gettempdir()) / "ray").glob("session_2*")
                if d.is_dir() and not d.is_symlink() and d.stat().st_mtime >= started - 1]
    return [f for d in sessions for f in (d / "logs").rglob("*") if f.is_file()]


@pytest.mark.timeout(1800)
def test_ctrl_c_and_sigterm_stop_cleanly_and_resume_loses_nothing(tmp_path):
    """Ctrl-C to the process group during the search, SIGTERM to the driver during the seeds phase,
    a killed trial process in the last run: each stop exits by itself with one line, and ``--resume``
    finishes with every finished trial once and the Optuna study agreeing with trials.parquet."""
    import optuna

    storage, name = tmp_path / "store", "signals"
    sweep_dir = storage / name
    log = tmp_path / "sweep.log"
    # FIFO: ASHA may stop a search trial, and this test asks that every trial finish.
    args = _sweep("--scheduler", "fifo", n_train=256)
    sessions: list[int] = []
    try:
        first = kr.start_sweep(storage, name, args=args, log=log)
        sessions.append(first.pid)
        kr.wait_for(lambda: kr.finished(sweep_dir, "search"), first, 900, "finished search trial")
        kept = kr.finished(sweep_dir, "search") | kr.finished(sweep_dir, "potentials")
        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert _wait_exit(first, 180, log) == 130, log.read_text()[-3000:]
        line = _last_error_line(log)
        assert line.startswith("run_sweep.py: stopped by SIGINT") and "--resume" in line, line
        assert "Traceback" not in log.read_text().split("[search]")[-1]
        assert _state(sweep_dir)["done"] == ["potentials"]

        second = kr.start_sweep(storage, name, args=args, resume=True, log=log)
        sessions.append(second.pid)
        kr.wait_for(lambda: any((sweep_dir / "seeds").glob("*/params.json")), second, 900, "seeds trial")
        kept |= kr.finished(sweep_dir, "search")
        second.send_signal(signal.SIGTERM)  # what kill and batch schedulers send
        assert _wait_exit(second, 180, log) == 143, log.read_text()[-3000:]
        assert _last_error_line(log).startswith("run_sweep.py: stopped by SIGTERM")
        assert _state(sweep_dir)["done"] == ["potentials", "search"]

        third = kr.start_sweep(storage, name, args=args, resume=True, log=log)
        sessions.append(third.pid)
        # SIGKILL the seeds trial's Tune process once its Train run has a checkpoint: Tune retries it.
        kr.wait_for(lambda: list((sweep_dir / "seeds" / "train").glob("train-*/checkpoint_*"))
                    and _trial_processes(third.pid), third, 900, "seeds checkpoint")
        killed = _trial_processes(third.pid)[0]
        os.kill(killed, signal.SIGKILL)
        assert _wait_exit(third, 900, log) == 0, log.read_text()[-3000:]
    finally:
        for session in sessions:
            kr.end_session(session)
    text = log.read_text()
    assert "[search] resuming the experiment" in text and "[seeds] resuming the experiment" in text
    kr.check(sweep_dir, kept)
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all(), trials[["phase", "status", "error"]]
    assert trials.groupby("phase").size().to_dict()["search"] == 3
    history = pd.read_parquet(sweep_dir / "history.parquet")
    for trial_id, rows in history.groupby("trial_id"):  # the killed seeds trial too: epochs 1, 2 once
        assert sorted(rows["epoch"]) == [1, 2], (trial_id, rows["epoch"].tolist())
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states, states
    complete = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert complete == pytest.approx(sorted(trials.query("phase == 'search'")["val_delta_m"]))


@pytest.mark.timeout(1200)
def test_a_phase_with_lost_trials_is_not_done_and_resume_finishes_it(ray_cluster, tmp_path):
    """A trial whose process dies with no retries left is lost: the phase is not recorded as done (it
    was, before), the finished trials are saved, and ``--resume`` continues the lost one."""
    from sweeps.runner import Sweep, SweepOptions, TrialsLost

    options = SweepOptions.of(methods=["ew"], samples=2, seeds=1, epochs=2, tasks=["segmentation", "depth"],
                           image_size=32, n_train=256, n_val=16, n_test=16, batch_size=16, max_concurrent=1,
                           scheduler="fifo", no_wandb=True, storage=str(tmp_path), name="lost", max_failures=0)
    sweep_dir = tmp_path / "lost"
    killed: list[int] = []

    def kill_first_search_trial() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list((sweep_dir / "search" / "train").glob("train-*/checkpoint_*")):
                for pid in _trial_processes(os.getsid(0)):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_first_search_trial, daemon=True)
    watcher.start()
    with pytest.raises(TrialsLost, match=r"1 search trial\(s\) lost"):
        Sweep(options, say=lambda _: None).run()
    watcher.join(timeout=5)
    assert killed
    assert _state(sweep_dir)["done"] == ["potentials"]
    saved = pd.read_parquet(sweep_dir / "trials.parquet").query("phase == 'search'")
    assert sorted(saved["status"]) == ["ERROR", "TERMINATED"], saved[["status", "error"]]

    options.resume, options.max_failures = True, 2
    board = Sweep(options, say=lambda _: None).run()
    assert list(board["method"]) == ["ew"]
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all(), trials[["phase", "status", "error"]]
    assert set(saved["trial_id"]) == set(trials.query("phase == 'search'")["trial_id"])
    history = pd.read_parquet(sweep_dir / "history.parquet")
    assert not history.duplicated(subset=["trial_id", "epoch"]).any()


def _mount_tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _fill(directory: Path) -> Path:
    """Write zeros into ``directory`` until its file system is full; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(bytes(1 << 20))
                out.flush()
        except OSError:
            pass
    return filler


@pytest.mark.timeout(1500)
def test_full_disk_says_so_and_resume_finishes_after_space_is_freed(tmp_path):
    """The storage's file system fills while search trials run (a tmpfs the test fills): one line
    names it; once space is freed, ``--resume`` finishes with every finished trial kept once."""
    storage = tmp_path / "disk"
    if not _mount_tmpfs(storage, 400):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    name, log = "full", tmp_path / "sweep.log"
    sweep_dir = storage / name
    args = _sweep(n_train=512)
    sessions: list[int] = []
    try:
        first = kr.start_sweep(storage, name, args=args, log=log)
        sessions.append(first.pid)
        kr.wait_for(lambda: kr.finished(sweep_dir, "search"), first, 900, "finished search trial")
        filler = _fill(storage)
        status = _wait_exit(first, 900, log)
        line = _last_error_line(log)
        assert status == 1 and "out of space" in line and "--resume" in line, log.read_text()[-3000:]
        kept = set().union(*(kr.finished(sweep_dir, phase) for phase in ("potentials", "search", "seeds")))
        assert kept
        # Ray Train writes its run snapshot in place; the run written last when the disk filled is the
        # one a full disk can leave with an empty snapshot (seen in the issue): make sure one is.
        snapshots = sorted(sweep_dir.glob("*/train/train-*/checkpoint_manager_snapshot.json"),
                           key=lambda path: path.stat().st_mtime)
        assert snapshots, "no Ray Train run was written"
        snapshots[-1].write_bytes(b"")
        filler.unlink()
        second = kr.start_sweep(storage, name, args=args, resume=True, log=log)
        sessions.append(second.pid)
        assert _wait_exit(second, 1200, log) == 0, log.read_text()[-3000:]
        assert "its Ray Train snapshot was damaged" in log.read_text()
        kr.check(sweep_dir, kept)
        trials = pd.read_parquet(sweep_dir / "trials.parquet")
        assert set(trials["status"]) <= {"TERMINATED", "STOPPED"}, trials[["phase", "status", "error"]]  # ASHA
        assert set(trials["phase"]) == {"potentials", "search", "seeds"}
    finally:
        for session in sessions:
            kr.end_session(session)
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)


@pytest.mark.timeout(600)
def test_resources_no_node_offers_are_said_once_and_end_after_the_stall_timeout(ray_cluster, tmp_path):
    """On an ``--address`` cluster (which might grow) the sweep waits, but not forever."""
    address = ray_cluster.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS"):
        env.pop(key, None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), *_sweep(), "--address", address,
                           "--cpus-per-trial", "1000", "--stall-timeout", "20", "--storage", str(tmp_path),
                           "--name", "stalled"], env=env, capture_output=True, text=True, timeout=500)
    elapsed = time.monotonic() - start
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert out.count("which no node offers") >= 1 and "CPU: 1000" in out, out[-3000:]
    assert out.count("no node of the cluster offers") == 1, out[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "nothing progressed for" in last and "--resume" in last, last
    assert "Traceback" not in done.stderr
    print(f"stalled sweep ended after {elapsed:.0f}s")


def test_damaged_ray_snapshots_are_repaired_from_the_last_good_copy(tmp_path):
    """Tune and Ray Train write their snapshots into the storage in place: a full disk truncates them.
    The keeper's whole copy replaces Tune's damaged state; a damaged Train snapshot is set aside."""
    import pickle

    from sweeps.snapshots import GOOD_COPY, TRAIN_SNAPSHOT, keep_good_copy, repair_phase
    from sweeps.storage import Storage

    phase_dir = tmp_path / "search"
    (phase_dir / "train" / "train-a").mkdir(parents=True)
    trials = [[json.dumps({"trial_id": trial_id}), "{}"] for trial_id in ("a1", "b2", "c3")]
    state = {"experiment_state-1.json": json.dumps({"trial_data": trials}).encode(),
             # a pickle, whatever its name says
             "search_gen_state-1.json": pickle.dumps({"counter": 3, "name:ConcurrencyLimiter": {"live_trials": {"c3"}}}),
             "searcher-state-1.pkl": pickle.dumps({"_ot_trials": {"a1": 0, "b2": 1, "c3": 2}, "study": list(range(100))})}
    for name, data in state.items():
        (phase_dir / name).write_bytes(data)
    phase = Storage(phase_dir)
    assert keep_good_copy(phase)
    for name, data in state.items():  # truncated as a full disk leaves them
        (phase_dir / name).write_bytes(data[: len(data) // 2])
    assert not keep_good_copy(phase)  # a damaged state never replaces the good copy
    (phase_dir / "train" / "train-a" / TRAIN_SNAPSHOT).write_bytes(b"")
    said: list[str] = []
    repair_phase(phase, said.append)
    for name, data in state.items():
        assert (phase_dir / name).read_bytes() == data
        assert (phase_dir / GOOD_COPY / name).read_bytes() == data
    assert len(list(phase_dir.glob("*.damaged-*"))) == 3
    assert not (phase_dir / "train" / "train-a" / TRAIN_SNAPSHOT).exists()
    assert list((phase_dir / "train" / "train-a").glob(f"{TRAIN_SNAPSHOT}.damaged-*"))
    assert len(said) == 2 and "last good copy" in said[0] and "starts its training over" in said[1]
    repair_phase(phase, said.append)  # nothing damaged any more: nothing done, nothing said
    assert len(said) == 2
    # Whole files from two moments: the experiment lists a trial the searcher never suggested.
    torn = json.dumps({"trial_data": [*trials, [json.dumps({"trial_id": "d4"}), "{}"]]}).encode()
    (phase_dir / "experiment_state-1.json").write_bytes(torn)
    assert not keep_good_copy(phase)
    repair_phase(phase, said.append)
    assert "written at two moments" in said[-1]
    assert (phase_dir / "experiment_state-1.json").read_bytes() == state["experiment_state-1.json"]


def _tune_files(phase_dir: Path) -> dict[str, bytes]:
    """Tune's driver-state files of a phase as they are now (a file being written may read torn)."""
    from sweeps.snapshots import TUNE_STATE_PREFIXES
    return {p.name: p.read_bytes() for p in phase_dir.glob("*") if p.is_file()
            and p.name.startswith(TUNE_STATE_PREFIXES) and p.suffix in (".json", ".pkl")}


def _experiment_trials(files: dict[str, bytes]) -> int:
    """Trials in the newest experiment state of ``files``; 0 while it is missing or being written."""
    names = sorted(n for n in files if n.startswith("experiment_state-"))
    try:
        return len(json.loads(files[names[-1]])["trial_data"]) if names else 0
    except ValueError:
        return 0


@pytest.mark.timeout(1200)
def test_a_snapshot_torn_by_a_kill_is_replaced_by_its_last_good_copy(tmp_path):
    """Tune copies its snapshot into the storage file by file: a driver killed during the copy leaves an
    experiment state with a trial its searcher never heard of (here made on purpose, by putting the
    searcher's files of the first snapshot back). Unrepaired, that trial's first result fails the
    driver on every resume (KeyError in OptunaSearch); repaired, the sweep finishes with its 3 trials."""
    import optuna

    from sweeps.snapshots import agrees

    storage, name = tmp_path / "store", "torn"
    sweep_dir, log = storage / name, tmp_path / "sweep.log"
    search = sweep_dir / "search"
    args = _sweep("--scheduler", "fifo")
    first = kr.start_sweep(storage, name, args=args, log=log)
    try:
        early: dict[str, bytes] = {}

        def first_snapshot() -> bool:  # the two first trials, the searcher knowing them
            files = _tune_files(search)
            if _experiment_trials(files) == 2 and agrees(files):
                early.update({n: d for n, d in files.items() if not n.startswith("experiment_state-")})
                return True
            return False

        kr.wait_for(first_snapshot, first, 900, "first search snapshot")
        kr.wait_for(lambda: _experiment_trials(_tune_files(search)) == 3, first, 900, "third search trial")
        kept = kr.finished(sweep_dir, "search") | kr.finished(sweep_dir, "potentials")
        kr.kill_driver(first)
    finally:
        kr.end_session(first.pid)
    for file_name, data in early.items():  # the searcher's files as the first snapshot left them
        (search / file_name).write_bytes(data)
    assert not agrees(_tune_files(search))

    second = kr.start_sweep(storage, name, args=args, resume=True, log=log)
    try:
        assert _wait_exit(second, 900, log) == 0, log.read_text()[-3000:]
    finally:
        kr.end_session(second.pid)
    text = log.read_text()
    assert "written at two moments" in text and "replaced by the last good copy" in text, text[-3000:]
    kr.check(sweep_dir, kept)
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    search_trials = trials[trials["phase"] == "search"]
    assert len(search_trials) == 3 and (search_trials["status"] == "TERMINATED").all(), search_trials
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3, [(t.number, t.state) for t in study.trials]


def test_a_driver_failure_is_one_line_naming_its_root_cause_with_the_traceback_kept(tmp_path):
    """Tune wraps a driver-side failure in a TuneError whose message is a whole traceback: the line
    printed names the exception at its end, and the full traceback is kept next to the sweep."""
    import run_sweep
    from ray.tune.error import TuneError

    try:
        try:
            {}["abc123"]
        except KeyError:
            raise TuneError(__import__("traceback").format_exc()) from None
    except TuneError as err:
        assert run_sweep._root_cause(err) == "KeyError: 'abc123'"
        said = run_sweep._save_traceback(str(tmp_path), "sweep")
    saved = (tmp_path / "sweep" / "driver-error.txt").read_text()
    assert str(tmp_path / "sweep" / "driver-error.txt") in said and "TuneError" in saved and "abc123" in saved
    try:
        raise RuntimeError("phase failed") from OSError(28, "No space left on device")
    except RuntimeError as err:
        assert run_sweep._root_cause(err) == "OSError: [Errno 28] No space left on device"
