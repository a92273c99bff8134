"""The progress lines of a running sweep (sweeps/progress.py); a whole sweep's lines: tests/test_sweep.py."""
from __future__ import annotations

from types import SimpleNamespace

import ray.cloudpickle as cloudpickle

from sweeps import progress
from sweeps.progress import ProgressLines, TableLog, describe
from sweeps.trial import FAILED_KEY, FINAL_KEY, TRIAL_KEY, TrialSpec

SPEC = TrialSpec(phase="search", train={"balancer": "amtl", "hparams": {"focusing": 2.0}, "tasks": ["depth"],
                                        "seed": 3}, searched={"method": "amtl", "amtl:focusing": 2.0, "lr": 0.00123},
                 workers=1, cpus_per_worker=1, gpus_per_worker=0, train_storage="/tmp/x", max_failures=2)


def trial(trial_id: str, status: str = "RUNNING", last: dict | None = None) -> SimpleNamespace:
    """What Tune hands a callback, as far as the progress lines read it."""
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last or {}, config={TRIAL_KEY: SPEC.to_dict()})


def test_describe_names_the_method_its_searched_values_and_the_seed():
    assert describe(SPEC) == "amtl focusing=2 lr=0.00123"
    import dataclasses
    assert describe(dataclasses.replace(SPEC, phase="seeds")) == "amtl focusing=2 lr=0.00123 seed 3"
    assert describe(dataclasses.replace(SPEC, phase="potentials", searched={})) == "depth alone"


def test_each_end_is_said_and_a_resumed_phase_counts_what_it_found_done():
    lines: list[str] = []
    callback = cloudpickle.loads(cloudpickle.dumps(ProgressLines("search", 4, "val_delta_m", "/sweep/search")))
    progress.attach("/sweep/search", lines.append)  # Tune restores its callbacks from a pickle on --resume
    now = [100.0]
    callback.clock = lambda: now[0]
    callback.setup()
    earlier = trial("a", "TERMINATED")  # finished before the driver was stopped
    stopped, failed = trial("b", "RUNNING", {"epoch": 1}), trial("c", "RUNNING", {FINAL_KEY: True, FAILED_KEY: "nan"})
    finished = trial("d", "RUNNING", {FINAL_KEY: True, "epoch": 3, "val_delta_m": 1.5})
    everyone = [earlier, stopped, failed, finished]
    callback.on_trial_start(0, everyone, stopped)
    callback.on_trial_result(0, everyone, stopped, {"epoch": 1, "val_delta_m": -2.25})
    now[0] = 130.0
    callback.on_trial_complete(0, everyone, stopped)
    now[0] = 160.0
    callback.on_trial_complete(0, everyone, failed)
    callback.on_trial_complete(0, everyone, finished)
    assert lines == [
        "[search] b started: amtl focusing=2 lr=0.00123",
        "[search] b epoch 1: val_delta_m -2.25",
        "[search] b stopped early by the scheduler after epoch 1",
        # 2 of 4 done (one found done), 1 ended in this run's 30 s: 2 more take about 60 s
        "[search] 2/4 trials done, 2 running, 30s elapsed, about 1m00s left",
        "[search] c failed: nan",
        "[search] 3/4 trials done, 1 running, 1m00s elapsed, about 30s left",
        "[search] d finished after 3 epochs: val_delta_m 1.5",
        "[search] 4/4 trials done, 0 running, 1m00s elapsed",
    ]


def test_tune_status_tables_are_appended_to_the_log_file(tmp_path):
    log = tmp_path / "sweep" / "tune.log"
    reporter = cloudpickle.loads(cloudpickle.dumps(TableLog(str(log))))
    reporter.report([], True, "== Status ==")
    reporter.report([], True, "second")
    text = log.read_text()
    assert text.index("== Status ==") < text.index("second")


def test_the_log_gets_the_trial_table_whatever_verbosity_an_earlier_run_left(ray_cluster, tmp_path):
    """Each phase's Tuner runs at verbose=1, which Tune keeps in a global; a reporter built after
    the first phase still writes the trial table, not only the counts."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial
    from ray.tune.utils.log import Verbosity, set_verbosity

    set_verbosity(Verbosity.V1_EXPERIMENT)  # as the previous phase's run leaves it
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="search")
    trials = [Trial("run_trial", stub=True, config={"lr": 0.001}, storage=storage)]
    trials[0].storage.trial_dir_name = "run_trial_00000"
    reporter = TableLog(str(tmp_path / "tune.log"))
    reporter.setup(start_time=0, total_samples=1, metric="val_delta_m", mode="min")
    reporter.report(trials, done=False)
    text = (tmp_path / "tune.log").read_text()
    assert "== Status ==" in text and "Trial name" in text and trials[0].trial_id in text
