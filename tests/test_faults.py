"""Faults a long sweep must survive, on a real local Ray cluster with real Optuna and W&B offline runs.

- a trial whose loss diverges ends at once as failed, with the reason, and is counted per method;
- a Ray Train worker SIGKILLed mid-epoch: the trial resumes from its last checkpoint and finishes;
- the sweep driver SIGKILLed, then ``--resume``: every finished trial kept once, no duplicate history,
  the Optuna study continues, and the Ray processes the dead driver left behind are ended;
- the driver SIGKILLed five times at points chosen from the sweep's progress (a phase change,
  mid-epoch, after a trial finished), each with finished trials at risk: none lost or doubled.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
TASKS = ["segmentation", "depth"]
TINY_TRAIN = dict(tasks=TASKS, image_size=32, n_train=64, n_val=16, n_test=16, batch_size=16, device="cpu",
                  log_every=50, seed=0, data_seed=0)


def _tune_trials(tmp_path: Path, name: str, overrides: list[dict], epochs: int, max_failures: int = 2,
                 scheduler=None, metric: str = "kpi/segmentation", mode: str = "max"):
    """Run ``run_trial`` (the sweep's own trainable) over complete trial specs, one per entry of
    ``overrides`` (training options), as one Tune experiment."""
    from ray import tune

    from amtl.trainer import TrainConfig
    from sweeps.runner import DRIVER_RESOURCES
    from sweeps.trial import TRIAL_KEY, TrialSpec, run_trial

    base = TrialSpec(phase="search", train=TrainConfig(**TINY_TRAIN, epochs=epochs).to_dict(), searched={},
                     workers=1, cpus_per_worker=1, gpus_per_worker=0, train_storage=f"{tmp_path}/{name}/train",
                     max_failures=max_failures)
    specs = [base.with_train(**override).to_dict() for override in overrides]
    tuner = tune.Tuner(
        tune.with_resources(run_trial, DRIVER_RESOURCES),
        param_space={TRIAL_KEY: tune.grid_search(specs)},
        tune_config=tune.TuneConfig(scheduler=scheduler, metric=metric, mode=mode, max_concurrent_trials=2),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def test_diverging_trial_fails_at_once_with_its_reason_and_is_counted(ray_cluster, tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from sweeps.leaderboard import build_leaderboard
    from sweeps.runner import collect

    # lr 1e10 makes both losses non-finite at the first step; the other trial is an ordinary one.
    overrides = [{"balancer": "ew", "lr": 1e10}, {"balancer": "dwa", "lr": 2e-3}]
    asha = ASHAScheduler(time_attr="epoch", max_t=3, grace_period=1, reduction_factor=2)
    start = time.perf_counter()
    grid = _tune_trials(tmp_path, "nan", overrides, epochs=1, max_failures=5, scheduler=asha)
    elapsed = time.perf_counter() - start
    rows, history = collect(grid, "search", f"{tmp_path}/nan/train")
    by_lr = {(r["method"], r["lr"]): r for r in rows}
    failed = by_lr[("ew", 1e10)]
    assert failed["status"] == "ERROR"
    assert failed["error"].startswith("non-finite loss: loss of task(s) segmentation, depth became non-finite")
    assert "lower the learning rate" in failed["error"]
    # Not retried: Ray Train's max_failures=5 would rerun it 5 more times from scratch, each failing
    # the same way, and the error would then be Ray's TrainingFailedError, not the reason itself.
    assert not [h for h in history if h["trial_id"] == failed["trial_id"]]  # it never finished an epoch
    assert by_lr[("dwa", 2e-3)]["status"] == "TERMINATED", by_lr[("dwa", 2e-3)]["error"]  # the sweep went on
    trials = pd.DataFrame(rows).assign(val_delta_m=lambda f: f.get("val_delta_m", float("nan")),
                                       test_delta_m=lambda f: f.get("test_delta_m", float("nan")))
    board = build_leaderboard(trials, ["lr"]).set_index("method")
    assert board.loc["ew", "trials"] == 1 and board.loc["ew", "failed"] == 1
    assert board.loc["dwa", "trials"] == 1 and board.loc["dwa", "failed"] == 0
    print(f"2 trials, one diverging, in {elapsed:.1f}s")


def test_a_trial_failing_on_every_train_attempt_reports_why_and_is_not_retried(ray_cluster, tmp_path):
    """A trial whose own code raises on each of Ray Train's attempts is the trial's failure, reported
    with its reason, not a lost trial: Tune does not retry it and the sweep goes on."""
    from sweeps.runner import collect

    overrides = [{"balancer": "ew", "hparams": {"bogus": 1}}, {"balancer": "ew"}]
    grid = _tune_trials(tmp_path, "bad", overrides, epochs=1, max_failures=1)
    rows, _ = collect(grid, "search", f"{tmp_path}/bad/train")
    assert [r.error for r in grid] == [None, None]  # nothing lost: Tune saw two ended trials
    failed, ok = sorted(rows, key=lambda r: r["error"] is None)
    assert failed["status"] == "ERROR" and failed["error"].startswith("training failed: ")
    assert "has no hyperparameter 'bogus'" in failed["error"], failed["error"]
    assert ok["status"] == "TERMINATED", ok["error"]


def _train_worker_pids() -> set[int]:
    import ray
    from ray.util.state import list_actors
    # The address matters: other Ray clusters may run on this machine.
    return {a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])}


def test_killed_train_worker_resumes_from_its_last_checkpoint(ray_cluster, tmp_path):
    """SIGKILL the trial's Ray Train worker after its first epoch checkpoint: Ray's FailureConfig
    restarts it from that checkpoint, so each epoch is reported exactly once and the trial finishes."""
    import threading

    killed: list[int] = []
    errors: list[BaseException] = []
    train_dir = tmp_path / "killed" / "train"

    def kill_after_first_checkpoint() -> None:
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if list(train_dir.glob("train-*/checkpoint_*")):
                    pids = _train_worker_pids()
                    if pids:
                        pid = pids.pop()
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
                time.sleep(0.1)
        except BaseException as err:  # surfaced by the test body
            errors.append(err)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    # 256 images per epoch: long enough that the kill lands inside the second epoch (or close).
    grid = _tune_trials(tmp_path, "killed", [{"balancer": "ew", "n_train": 256}], epochs=3, max_failures=2)
    watcher.join(timeout=10)
    assert not errors, errors
    assert killed, "the Ray Train worker was never found"
    result = grid[0]
    assert result.error is None, result.error
    assert result.metrics["final"] is True and result.metrics["epoch"] == 3
    # Raw reports, before any deduplication: restarting from scratch would report epoch 1 again.
    epochs = result.metrics_dataframe["epoch"].tolist()
    assert epochs == [1, 2, 3, 3], epochs  # three epochs, then the final report (epoch 3 again)
    assert killed[0] not in _train_worker_pids()


@pytest.fixture(scope="module")
def kill_resume():
    sys.path.insert(0, str(REPO / "scripts"))
    import kill_resume as kr
    yield kr
    sys.path.remove(str(REPO / "scripts"))


# Three drivers, each starting a local cluster, and 6 trials: about 4 minutes on a quiet 2-core
# machine, more than the suite's 600 s default when other jobs share the cores.
@pytest.mark.timeout(1500)
def test_driver_killed_twice_then_resumed_keeps_every_finished_trial_once(kill_resume, tmp_path):
    """SIGKILL the sweep driver once during the search (after a search trial finished) and once
    during the seeds phase; ``--resume`` twice. Nothing finished is lost or counted twice, the
    Optuna study goes on, and no Ray process of a killed driver is left running."""
    import optuna

    kr = kill_resume
    storage, name = tmp_path / "store", "killed"
    sweep_dir = storage / name
    log = tmp_path / "sweep.log"
    sessions: list[int] = []
    leftovers: list[tuple[int, float]] = []
    try:
        first = kr.start_sweep(storage, name, log=log)
        sessions.append(first.pid)
        kr.wait_for(lambda: kr.finished(sweep_dir, "search"), first, 600, "finished search trial")
        kept = kr.finished(sweep_dir, "search") | kr.finished(sweep_dir, "potentials")
        leftovers += kr.kill_driver(first)
        state = json.loads((sweep_dir / "state.json").read_text())
        assert state["done"] == ["potentials"]

        second = kr.start_sweep(storage, name, resume=True, log=log)
        sessions.append(second.pid)
        # As soon as a seeds trial exists: its few-second epochs reach result.json in one burst at
        # the end, so waiting for one would let the whole (one-trial) phase finish first.
        kr.wait_for(lambda: any((sweep_dir / "seeds").glob("*/params.json")), second, 600, "seeds trial")
        # The first driver's leftovers were ended by the second driver's local-cluster start.
        assert not kr.alive(leftovers), f"left running by the killed driver: {kr.alive(leftovers)}"
        kept |= kr.finished(sweep_dir, "search") | kr.finished(sweep_dir, "seeds")
        leftovers += kr.kill_driver(second)
        assert json.loads((sweep_dir / "state.json").read_text())["done"] == ["potentials", "search"]

        third = kr.start_sweep(storage, name, resume=True, log=log)
        sessions.append(third.pid)
        assert third.wait(timeout=900) == 0, log.read_text()[-3000:]
        assert not kr.alive(leftovers)
    finally:
        for session in sessions:
            kr.end_session(session)
    text = log.read_text()
    assert "[search] resuming the experiment" in text and "[seeds] resuming the experiment" in text
    assert "[search] already done" in text
    # A joint search (kill_resume's sweep) says on its leaderboard that the budgets were unequal.
    assert "Joint search (--search joint)" in (sweep_dir / "leaderboard.md").read_text()
    counts = kr.check(sweep_dir, kept)  # each finished trial once, no duplicate history rows
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert trials.groupby("phase").size().to_dict() == {"potentials": 2, "search": 3,
                                                        "seeds": trials.query("phase == 'seeds'")["method"].nunique()}
    assert (trials["status"] == "TERMINATED").all(), trials[["phase", "status", "error"]]
    history = pd.read_parquet(sweep_dir / "history.parquet")
    assert set(history["trial_id"]) == set(trials["trial_id"])
    for trial_id, rows in history.groupby("trial_id"):  # resumed trials too: epochs 1, 2 once each
        assert sorted(rows["epoch"]) == [1, 2], (trial_id, rows["epoch"].tolist())
        task = trials.set_index("trial_id").loc[trial_id, "tasks"].split(",")[0]
        assert rows[f"kpi/{task}"].notna().all()  # real metrics, not placeholders
    # The one Optuna study holds the search trials of both driver lives, with their objectives.
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    values = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for value in trials.query("phase == 'search'")["val_delta_m"]:
        assert value == pytest.approx(min(values, key=lambda v: abs(v - value))), (value, values)
    print(counts, f"{len(leftovers)} process(es) outlived the killed drivers")


# Six drivers (five killed), 6-7 trials, each kill restarting the running ones: 6 minutes on a 2-core
# machine shared with other sweeps (load 20-30); the limit leaves room for one several times slower.
@pytest.mark.timeout(1800)
def test_kills_at_progress_points_each_risk_finished_trials_and_lose_none(kill_resume, tmp_path):
    """SIGKILL the driver 5 times, each at a kill point read from the sweep's progress on disk
    (phase change, mid-epoch, a trial just finished, phase change, mid-epoch), each with finished
    trials at risk; resume after each. Every one of them is in trials.parquet once, history has no
    duplicates, and no process of a killed driver still runs."""
    kr = kill_resume
    start = time.perf_counter()
    outcome = kr.kill_loop(tmp_path / "store", "kills", kills=5, sweep=kr.sweep_args(samples=3, epochs=3),
                           log=tmp_path / "sweep.log")
    report = "\n".join(kr.summary(outcome))
    print(report, f"in {time.perf_counter() - start:.0f}s")
    assert not outcome.problems, report
    assert [k.kind for k in outcome.kills] == ["phase", "mid-epoch", "finished", "phase", "mid-epoch"], report
    assert outcome.kills_at_risk == 5, report  # every kill had finished trials to lose
    assert all(k.stop.status == -signal.SIGKILL for k in outcome.kills)
    assert outcome.final_status == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    assert outcome.lost == set(), report
    assert outcome.check_error is None, report  # each trial once, no duplicate history rows
    assert not outcome.stale, report  # nothing a killed driver started still runs
    trials = pd.read_parquet(tmp_path / "store" / "kills" / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all(), trials[["phase", "status", "error"]]
    assert trials.groupby("phase").size()[["potentials", "search"]].tolist() == [2, 3]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_at_progress_points_stop_cleanly_and_lose_nothing(kill_resume, tmp_path, sig, group):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) or SIGTERM to the driver at
    a phase change, mid-epoch and after a trial finished: each driver exits by itself with 128 + the
    signal, and the resumed sweep keeps every finished trial once."""
    kr = kill_resume
    outcome = kr.kill_loop(tmp_path / "store", "stops", kills=3, sweep=kr.sweep_args(samples=3, epochs=3),
                           sig=sig, group=group, log=tmp_path / "sweep.log")
    report = "\n".join(kr.summary(outcome))
    print(report)
    assert outcome.ok, report + "\n" + (tmp_path / "sweep.log").read_text()[-3000:]
    assert all(k.stop.status == 128 + sig for k in outcome.kills), report
    assert outcome.kills_at_risk == 3 and outcome.lost == set(), report
