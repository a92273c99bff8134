"""What a running sweep prints: one line per trial event and a phase progress line with an ETA.

Ray Tune's own status tables (every 30 s, as wide as the search space) go to ``tune.log`` in the
sweep's folder instead; ``--verbose`` brings them back to the terminal.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback, CLIReporter

from sweeps.space import split_config
from sweeps.trial import FAILED_KEY, FINAL_KEY, TrialSpec


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe(spec: TrialSpec) -> str:
    """What a trial trains, in a few words: ``amtl focusing=2.1 lr=0.00231`` or ``depth alone``."""
    if spec.phase == "potentials":
        return f"{','.join(spec.train['tasks'])} alone"
    parts = [spec.method]
    if spec.searched:
        _, hparams, shared = split_config(spec.searched)
        parts += [f"{k}={_value(v)}" for k, v in {**hparams, **shared}.items()]
    elif spec.train.get("hparams"):
        parts += [f"{k}={_value(v)}" for k, v in spec.train["hparams"].items()]
    if spec.phase == "seeds":
        parts.append(f"seed {spec.train.get('seed')}")
    return " ".join(parts)


# Where the ProgressLines of each experiment (by its path) say things. Tune pickles its callbacks
# with the experiment and restores them on --resume, so the output is looked up, not stored.
_OUTPUTS: dict[str, Callable[[str], None]] = {}


def attach(experiment: str, say: Callable[[str], None]) -> None:
    """Send the progress lines of ``experiment`` (its path) to ``say`` in this process."""
    _OUTPUTS[experiment] = say


class ProgressLines(Callback):
    """Says each trial's start, epochs (with the objective), end, and the phase's progress.

    ``total`` is the phase's number of trials; ``metric`` the objective its trials report each epoch;
    the lines go where :func:`attach` sent ``experiment``'s (``print`` if nowhere).
    """

    def __init__(self, phase: str, total: int, metric: str, experiment: str) -> None:
        self.phase, self.total, self.metric, self.experiment = phase, total, metric, experiment
        self.clock: Callable[[], float] = time.monotonic
        self.setup()

    def setup(self, **info: Any) -> None:
        """Called by Tune at the start of every run of the experiment, a resumed one included."""
        self.started_at = self.clock()
        self.ended: set[str] = set()  # trials that ended in this run

    def _line(self, trial: Any, text: str) -> None:
        _OUTPUTS.get(self.experiment, print)(f"[{self.phase}] {trial.trial_id} {text}")

    def _objective(self, result: dict[str, Any]) -> str:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            kpis = {k: v for k, v in result.items() if k.startswith("kpi/") and isinstance(v, (int, float))}
            return ", ".join(f"{k} {_value(v)}" for k, v in kpis.items())  # single-task trials: their KPI
        return f"{self.metric} {_value(value)}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, f"started: {describe(TrialSpec.of(trial.config))}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not result.get(FINAL_KEY):
            self._line(trial, f"epoch {result.get('epoch')}: {self._objective(result)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get(FAILED_KEY):
            self._line(trial, f"failed: {last[FAILED_KEY]}")
        elif last.get(FINAL_KEY):
            self._line(trial, f"finished after {last.get('epoch')} epochs: {self._objective(last)}")
        else:
            self._line(trial, f"stopped early by the scheduler after epoch {last.get('epoch')}")
        self._progress(trial, trials)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "lost its process; restarting from its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "lost after its retries (--resume continues it)")
        self._progress(trial, trials)

    def _progress(self, trial: Any, trials: list) -> None:
        self.ended.add(trial.trial_id)
        done = len(self.ended | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")})
        total = max(self.total, len(trials), done)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in self.ended)
        elapsed = self.clock() - self.started_at
        # From this run's pace: trials a resumed run found finished took none of its time.
        eta = "" if done >= total else f", about {_duration(elapsed / len(self.ended) * (total - done))} left"
        _OUTPUTS.get(self.experiment, print)(
            f"[{self.phase}] {done}/{total} trials done, {running} running, {_duration(elapsed)} elapsed{eta}")


class TableLog(CLIReporter):
    """Ray Tune's status table, appended to a file every 30 s (and at the end) instead of printed."""

    def __init__(self, path: str) -> None:
        # Explicitly: by default CLIReporter prints tables only at Tune's highest verbosity, read from
        # a global that the previous run in this process left at our verbose=1 (later phases: no table).
        super().__init__(max_report_frequency=30, print_intermediate_tables=True)
        self.path = path

    def _print(self, msg: str) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as log:
            log.write(msg + "\n")
