"""A sweep: single-task potentials, then the Optuna search, then the best configs rerun over seeds.

Each phase is a Ray Tune experiment under ``<storage>/<name>/<phase>``; ``state.json`` records the
phases that finished, so ``--resume`` skips them and restores the one in progress (completed trials
are kept, running ones continue from their last epoch checkpoint). Results: ``trials.parquet`` (one
row per trial), ``history.parquet`` (per-epoch rows), the leaderboard files, and W&B runs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from amtl.plugins import absolute as plugin_paths
from amtl.options import names_with, option, with_values
from amtl.trainer import TrainConfig
from sweeps import potentials as pot
from sweeps.interrupts import Interrupted, StopSignals
from sweeps.storage import Storage
from sweeps.trial import FAILED_KEY, FINAL_KEY, TASK_DELTA_PREFIX, TRIAL_KEY, TrialSpec, run_trial

PHASES = ("potentials", "search", "seeds")
OBJECTIVES = ("delta-m", "pareto")
SEARCHES = ("per-method", "joint")
STATE = "state.json"
#: The Tune trial itself only waits on its TorchTrainer; a token of memory is its whole request
#: (Ray rejects an empty one, and a CPU fraction would stop N one-CPU workers fitting on N cores).
DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}


class SweepError(ValueError):
    """Bad sweep input; the message names the problem and the fix."""


class TrialsLost(RuntimeError):
    """Trials of a phase ended in errors after their retries; the phase is not done."""


#: TrainConfig options a sweep sets for each trial itself (from the search, the phase and the
#: resources), so they are neither flags nor config-file keys of a sweep.
SET_BY_SWEEP = ("balancer", "hparams", "potentials", "device", "threads")


@dataclass
class SweepOptions:
    """Everything ``run_sweep.py`` accepts: its flags and ``--config`` file keys come from these fields,
    and from those of ``train`` (every :class:`TrainConfig` option but :data:`SET_BY_SWEEP`)."""

    methods: list[str] = option(help="balancer names, weighting+aggregator combinations, or 'all'",
                                factory=lambda: ["amtl"], flag="--method", aliases=("--methods",))
    reference: str = option("ew", help="baseline every sweep compares with, added to --method (equal weighting: the "
                                       "row every paper reports); 'none' leaves it out")
    space: str | None = option(None, help="search-space YAML overriding the built-in ones (sweeps/search_spaces/)")
    samples: int = option(6, help="search trials of each method (per-method search), or in all (joint)")
    seeds: int = option(3, help="seeds for each method's best config")
    train: TrainConfig = option(factory=TrainConfig, hide=SET_BY_SWEEP,
                                help="what every trial trains: data, model, tasks, budget, optimiser")
    scheduler: str = option("asha", choices=("asha", "fifo"), help="Tune's trial scheduler for the search "
                                                                   "(per-method search: one ASHA per method)")
    search: str = option("per-method", choices=SEARCHES,
                         help="per-method: every method gets --samples trials, its own search and its own ASHA "
                              "(equal budgets, a fair verdict); joint: the method is one more searched choice "
                              "over --samples trials in all (one best config fast; budgets differ)")
    max_concurrent: int | None = option(None, how_only=True, help="trials at once (default: CPUs / cpus-per-trial)")
    workers_per_trial: int = option(1, help="DDP workers per trial")
    cpus_per_trial: float = option(1.0, help="CPUs of one trial, over its workers")
    gpus_per_trial: float = option(0.0, help="GPUs of one trial, over its workers; may be fractional")
    address: str | None = option(None, how_only=True, help="an existing Ray cluster (default: a local embedded one)")
    storage: str = option("runs/sweeps", help="results root: a local dir or a URI pyarrow understands")
    name: str = option("amtl-sweep", help="sweep name (a folder under --storage)")
    resume: bool = option(False, how_only=True, help="continue the sweep --name in --storage")
    recompute_potentials: bool = option(False, how_only=True, help="retrain single-task models even if cached")
    wandb_project: str = option("amtl-sweep", how_only=True, help="W&B project")
    wandb_entity: str | None = option(None, how_only=True, help="W&B entity (team or user)")
    no_wandb: bool = option(False, how_only=True, help="no W&B runs")
    optuna_storage: str | None = option(None, how_only=True,
                                        help="SQLAlchemy URL of the Optuna study (default: SQLite file)")
    kpi: str | None = option(None, help="optimise this task's validation KPI instead of Delta-m")
    objective: str = option("delta-m", choices=OBJECTIVES,
                            help="the search's objective. delta-m: val Delta-m (or --kpi's KPI). pareto: every task's "
                                 "val KPI at once (Optuna's multi-objective TPE; FIFO, since ASHA needs one number); "
                                 "the seeds phase reruns, of each method's Pareto set, the config with the best val "
                                 "Delta-m, and the leaderboard lists the Pareto set")
    max_failures: int = option(2, how_only=True,
                               help="restarts of a trial whose process dies, from its last checkpoint")
    stall_timeout: float = option(3600.0, how_only=True,
                                  help="seconds a phase may go without any trial progress (trials waiting for "
                                       "resources, a stuck trial) before the sweep ends with an error saying what it "
                                       "waited for; longer than one epoch")
    report: bool = option(False, how_only=True,
                          help="rebuild the report and every other output of sweep --name in --storage from its "
                               "stored results (its own saved options apply); trains nothing")
    verbose: bool = option(False, how_only=True,
                           help="print Ray Tune's own status tables (default: one line per trial event, the tables "
                                "go to tune.log in the sweep's folder)")

    @classmethod
    def of(cls, **values: Any) -> "SweepOptions":
        """The defaults with ``values`` by option name, training options included:
        ``SweepOptions.of(methods=["amtl"], n_train=500)``."""
        return with_values(cls(), **values)

    @property
    def compared(self) -> list[str]:
        """The methods the sweep compares: ``methods`` and the ``reference`` row (unless 'none', or
        the methods come from a space file's list: ``all`` or none named)."""
        if self.reference.lower() == "none" or not self.methods or "all" in self.methods:
            return list(self.methods)
        return list(self.methods) + ([self.reference] if self.reference not in self.methods else [])

    @property
    def metric(self) -> tuple[str, str]:
        """Tune's objective: validation Delta-m (min) unless a task's KPI is named (max)."""
        return (f"kpi/{self.kpi}", "max") if self.kpi else ("val_delta_m", "min")

    @property
    def objectives(self) -> tuple[list[str], list[str]]:
        """What the search optimises, as metric and mode lists: one of each unless ``objective`` is pareto."""
        if self.objective == "pareto":
            return [f"kpi/{task}" for task in self.train.tasks], ["max"] * len(self.train.tasks)
        metric, mode = self.metric
        return [metric], [mode]

    @property
    def trial_train(self) -> TrainConfig:
        """``train`` as every trial of this sweep starts from: the device and CPU threads from the
        trial's resources; plugin files by absolute path (trial processes do not run in the driver's
        working directory). A phase sets the method, its hyperparameters and the seed."""
        per_worker = self.cpus_per_trial / self.workers_per_trial
        return replace(self.train, plugins=plugin_paths(self.train.plugins), tasks=tuple(self.train.tasks),
                       device="cuda" if self.gpus_per_trial > 0 else "cpu", threads=max(1, int(per_worker)))


#: Options that change how a sweep runs, not what it computes: a rerun may change them.
RUN_OPTIONS = set(names_with(SweepOptions, "how_only")) | set(names_with(TrainConfig, "how_only"))


def _flat(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def option_differences(recorded: Mapping[str, Any], options: SweepOptions) -> list[str]:
    """``name: old -> new`` for every option that changes what sweep ``recorded`` (its state's
    options) computes; an option the recorded sweep did not know yet is not a difference."""
    old, new = _flat(recorded), _flat(_recorded_options(options))
    return [f"{key.removeprefix('train.')}: {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if key.rsplit(".", 1)[-1] not in RUN_OPTIONS and old[key] != new[key]]


def check_resume(o: SweepOptions, storage: Storage) -> bool:
    """Whether sweep ``o.name`` exists in ``storage``. Running an existing sweep again with the same
    options continues it (a finished one only shows its results); SweepError when the options differ
    without ``--resume`` (naming each difference: a rerun never mixes two configurations by
    accident), when ``--resume`` names no sweep (a typo never starts afresh), or when its
    ``state.json`` is unreadable (found here, before Ray starts, not in the middle of a run)."""
    exists = storage.exists(o.name, STATE)
    if exists:
        state = read_state(Storage(storage.uri_of(o.name)))
        changed = [] if o.resume else option_differences(state.get("options") or {}, o)
        if changed:
            raise SweepError(f"sweep '{o.name}' in '{storage.uri}' was run with other options ({'; '.join(changed)}); "
                             f"run it with its own (--config {storage.uri_of(o.name, CONFIG_FILE)}), or choose "
                             f"another --name for these")
    if o.resume and not exists:
        raise SweepError(f"no sweep '{o.name}' to resume in '{storage.uri}'; check --name and --storage, "
                         f"or drop --resume to start it")
    return exists


#: The state of the previous save, kept beside ``state.json`` to replace it should it be damaged.
STATE_BACKUP = "state.json.bak"


def _parse_state(data: bytes) -> dict[str, Any]:
    """A sweep state from ``data``; ValueError with a short reason when it is not one."""
    if not data.strip():
        raise ValueError("the file is empty")
    try:
        state = json.loads(data)
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        raise ValueError(f"not JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("done"), list) \
            or not set(map(str, state["done"])) <= set(PHASES):
        raise ValueError("not a sweep state: no 'done' list of phases")
    return state


def read_state(sweep: Storage) -> dict[str, Any]:
    """``state.json`` of the sweep in ``sweep``; SweepError naming the file and a fix that works
    when it is damaged: copy the backup over it, or, without a usable backup, an empty state, which
    makes each phase restore its Tune experiment on disk (finished ones return their trials)."""
    try:
        return _parse_state(sweep.read_bytes(STATE))
    except (OSError, ValueError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
    path, backup = sweep.uri_of(STATE), sweep.uri_of(STATE_BACKUP)
    try:
        _parse_state(sweep.read_bytes(STATE_BACKUP))
        fix = f"put its backup in its place (cp '{backup}' '{path}') and rerun with --resume"
    except (OSError, ValueError):
        fix = (f"it has no usable backup, so write {{\"done\": []}} into it and rerun with --resume (each phase "
               f"then restores its Tune experiment in '{sweep.uri}')")
    raise SweepError(f"sweep state file '{path}' is unreadable ({problem}); {fix}")


def _recorded_options(options: SweepOptions) -> dict[str, Any]:
    """The options as written to ``state.json``: a database URL keeps no password."""
    from sweeps.secrets import redact_url
    recorded = asdict(options)
    if recorded["optuna_storage"]:
        recorded["optuna_storage"] = redact_url(recorded["optuna_storage"])
    return recorded


#: The sweep's resolved options, beside its results: ``run_sweep.py --config`` takes the file.
CONFIG_FILE = "sweep.yaml"
#: Ray Tune's status tables, beside the results (unless ``--verbose`` prints them).
TUNE_LOG = "tune.log"


def config_yaml(options: SweepOptions) -> str:
    """``sweep.yaml``: every option of the sweep (a database URL keeps no password), ``resume`` left out."""
    from amtl.options import to_yaml
    recorded = replace(options, optuna_storage=_recorded_options(options)["optuna_storage"])
    return to_yaml(recorded, skip=("resume",), header=(
        f"Options of sweep '{options.name}', as run. To run it again: python run_sweep.py --config <this file> "
        f"(with --resume to continue it,\nor --name NEW for a new sweep with the same options; flags override "
        f"this file)."))


class Sweep:
    """Runs the phases of one sweep; see :func:`run`."""

    def __init__(self, options: SweepOptions, say: Callable[[str], None] = print) -> None:
        self.o = options
        self.say = say
        self.storage = Storage(options.storage)
        self.dir = Storage(self.storage.uri_of(options.name))
        self.local_dir = Path(tempfile.mkdtemp(prefix="amtl-sweep-")) if not self.dir.is_local else Path(self.dir.root)
        self.state: dict[str, Any] = {"done": [], "options": _recorded_options(options)}
        self.rows: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.signals = StopSignals()
        self._saved_state: bytes | None = None  # what the last save wrote: the next save's backup
        self._told_table_log = False
        self.shown_only = False  # a finished sweep run again: nothing new to log

    # -- state -----------------------------------------------------------------------------
    def load_state(self) -> None:
        if not check_resume(self.o, self.storage):
            return
        self.state = read_state(self.dir)
        if set(PHASES) <= set(self.state["done"]):
            self.shown_only = True  # W&B has this leaderboard already
            self.say(f"[sweep] '{self.o.name}' is finished with these options: its results, from {self.dir.uri} "
                     f"(--name NEW starts another)")
        elif not self.o.resume:
            self.say(f"[sweep] '{self.o.name}' exists with these options and is unfinished: continuing it")
        self._saved_state = json.dumps(self.state, indent=2, default=str).encode()
        self.load_results()

    def load_results(self) -> None:
        if self.dir.exists("trials.parquet"):
            self.rows = self.dir.read_parquet("trials.parquet").to_dict("records")
        if self.dir.exists("history.parquet"):
            self.history = self.dir.read_parquet("history.parquet").to_dict("records")

    def save_state(self) -> None:
        """Rows first, ``state.json`` last: a phase is recorded as done only once its rows are saved,
        whenever the driver is stopped (a signal waits for the save to end)."""
        data = json.dumps(self.state, indent=2, default=str).encode()
        with self.signals.deferred():
            if self.rows:
                self.dir.write_parquet(pd.DataFrame(self.rows), "trials.parquet")
            if self.history:
                self.dir.write_parquet(pd.DataFrame(self.history), "history.parquet")
            # The backup is the previous save (the first save's own state at first): written before the
            # new state, so that one of the two is whole whatever happens to the other (see read_state).
            self.dir.write_bytes(self._saved_state or data, STATE_BACKUP)
            self.dir.write_bytes(data, STATE)
        self._saved_state = data

    # -- trial specs ------------------------------------------------------------------------
    def trial_spec(self, phase: str, potentials: pot.Potentials | None = None) -> TrialSpec:
        """What every trial of ``phase`` shares: the phase completes it per trial (its task, its search
        values, its seed); the method's hyperparameters start empty."""
        o = self.o
        wandb = None
        if not o.no_wandb:
            from sweeps.tracking import resolve_mode
            wandb = {"project": o.wandb_project, "entity": o.wandb_entity, "group": o.name,
                     "job_type": phase, "tags": [], "directory": str(self.local_dir / "wandb"), "mode": resolve_mode()}
        return TrialSpec(phase=phase, train={**o.trial_train.to_dict(), "hparams": {}}, searched={},
                         workers=o.workers_per_trial, cpus_per_worker=o.cpus_per_trial / o.workers_per_trial,
                         gpus_per_worker=o.gpus_per_trial / o.workers_per_trial,
                         train_storage=self.dir.uri_of(phase, "train"), max_failures=o.max_failures,
                         baselines=potentials.baselines if potentials is not None else None, wandb=wandb)

    def tuner(self, phase: str, param_space: dict[str, Any], tune_config: Any, total: int) -> Any:
        """Tune's experiment for ``phase`` of ``total`` trials: a new one, or the one ``--resume`` restores."""
        from ray import tune

        from sweeps import progress
        from sweeps.snapshots import SnapshotKeeper, has_tune_snapshot, repair_phase
        from sweeps.watchdog import Watchdog

        path = self.dir.uri_of(phase)
        progress.attach(path, self.say)
        # Tune's new output engine ignores a progress reporter; the legacy one takes TableLog.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if self.o.verbose else "0"
        # What --resume restores after a driver crash is Tune's last experiment snapshot; Tune's
        # "auto" period is at least 10 s, and a trial finished after it is rerun. Snapshots of a
        # sweep's few dozen trials take milliseconds, so take them every 2 s.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
        if not self.o.verbose:  # a line per trial (a tasks list TensorBoard cannot take), two per phase: noise here
            for name in ("ray.tune.logger.tensorboardx", "ray.tune.tune"):
                logging.getLogger(name).setLevel(logging.WARNING)
        trainable = tune.with_resources(run_trial, DRIVER_RESOURCES)
        # can_restore only looks for tuner.pkl, written before Tune's first experiment snapshot; a
        # restore without a snapshot "restarts" the experiment without the phase's fixed config.
        if phase not in self.state["done"] and tune.Tuner.can_restore(path) and has_tune_snapshot(Storage(path)):
            self.say(f"[{phase}] resuming the experiment in {path}")
            repair_phase(Storage(path), lambda text: self.say(f"[{phase}] {text}"))
            # Errored trials are the lost ones (a trial that fails for a reason of its own reports it
            # and ends TERMINATED): they continue from their last epoch checkpoint.
            return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                      restart_errored=False)
        # max_failures: a trial whose Tune process dies (killed, its node lost) is restarted, and its
        # Ray Train run resumes from the last epoch checkpoint.
        table_log = self.local_dir / TUNE_LOG
        if not self.o.verbose and not self._told_table_log:
            self.say(f"[sweep] Ray Tune's status tables go to {table_log} (--verbose prints them)")
            self._told_table_log = True
        run_config = tune.RunConfig(name=phase, storage_path=self.dir.uri, verbose=1,
                                    failure_config=tune.FailureConfig(max_failures=self.o.max_failures),
                                    progress_reporter=None if self.o.verbose else progress.TableLog(str(table_log)),
                                    callbacks=[Watchdog(phase, self.o.stall_timeout), SnapshotKeeper(path),
                                               progress.ProgressLines(phase, total, self.o.metric[0], path)])
        return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)

    def fit(self, phase: str, tuner: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Run ``tuner`` and record its trials; raises when the phase did not finish.

        The phase's rows replace earlier ones and are saved even then, so nothing finished is lost.
        A signal (Ctrl-C, SIGTERM) raises :class:`Interrupted`; trials lost after their retries raise
        :class:`TrialsLost`. Either way the phase stays undone and ``--resume`` restores it.
        """
        with self.signals.tune_fit():
            grid = tuner.fit()
        rows, history = collect(grid, phase, self.dir.uri_of(phase, "train"))
        self.rows = [r for r in self.rows if r["phase"] != phase] + rows
        self.history = [h for h in self.history if h.get("phase") != phase] + history
        lost = [result for result in grid if result.error is not None]
        if lost:
            self.save_state()
            raise TrialsLost(f"{len(lost)} {phase} trial(s) lost after {self.o.max_failures} retries "
                             f"({_one_line(lost[0].error)}); rerun with --resume to continue them from their "
                             f"last checkpoints")
        return rows, history

    def check_cluster_fits(self) -> None:
        """Say once when no node of an existing cluster can hold one trial worker (it may autoscale:
        the watchdog bounds the wait)."""
        from sweeps.watchdog import resources_text, largest_node, no_node_fits

        o = self.o
        worker = {"CPU": o.cpus_per_trial / o.workers_per_trial, "GPU": o.gpus_per_trial / o.workers_per_trial}
        if no_node_fits(worker):
            self.say(f"[cluster] no node of the cluster offers {resources_text(worker)} for one trial worker "
                     f"(largest node: {resources_text(largest_node())}); waiting up to --stall-timeout "
                     f"{o.stall_timeout:.0f}s for the cluster to grow")

    def concurrency(self) -> int:
        import ray
        if self.o.max_concurrent:
            return self.o.max_concurrent
        cpus = ray.cluster_resources().get("CPU", 1)
        return max(1, int(cpus // max(self.o.cpus_per_trial, 1e-9)))

    # -- phases ----------------------------------------------------------------------------
    def run_potentials(self) -> pot.Potentials:
        from ray import tune

        train = self.o.trial_train.to_dict()
        tasks = self.o.train.tasks
        cached, missing = (None, list(tasks)) if self.o.recompute_potentials else pot.load(self.storage, train, tasks)
        if cached is not None:
            self.say(f"[potentials] reusing single-task results for {', '.join(tasks)} from "
                     f"{self.storage.uri_of(pot.FILE)}")
            return cached
        self.say(f"[potentials] training single-task models for {', '.join(missing)}")
        base = self.trial_spec("potentials")
        specs = [base.with_train(tasks=[task], balancer="ew").to_dict() for task in missing]
        tuner = self.tuner("potentials", {TRIAL_KEY: tune.grid_search(specs)},
                           tune.TuneConfig(max_concurrent_trials=self.concurrency()), total=len(specs))
        rows, history = self.fit("potentials", tuner)
        failed = [r for r in rows if r["status"] != "TERMINATED"]
        if failed:
            raise RuntimeError(f"single-task trial(s) for {', '.join(str(r['method']) for r in failed)} failed: "
                               f"{failed[0].get('error')}; fix the cause and rerun with --resume")
        saved = []
        for row in rows:
            task = row["tasks"]
            best_kpi = max([h[f"kpi/{task}"] for h in history if h["trial_id"] == row["trial_id"]
                            and f"kpi/{task}" in h and _finite(h[f"kpi/{task}"])] or [row[f"kpi/{task}"]])
            saved.append({"task": task, "potential": best_kpi,
                          **{k: v for k, v in row.items() if k.startswith((f"val/{task}/", f"test/{task}/"))}})
        pot.save(self.storage, train, saved)
        result, still_missing = pot.load(self.storage, train, tasks)
        if result is None:
            raise RuntimeError(f"potentials for {still_missing} were not saved")
        return result

    def run_search(self, potentials: pot.Potentials) -> None:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
        from ray.tune.search import ConcurrencyLimiter

        from sweeps.optuna_search import SpecSearcher
        from sweeps.schedulers import PerMethodASHA
        from sweeps.space import default_storage_url, load_space, make_searcher

        per_method = self.o.search == "per-method"
        space = replace(load_space(self.o.compared, Path(self.o.space) if self.o.space else None),
                        per_method=per_method)
        metrics, modes = self.o.objectives
        pareto = len(metrics) > 1
        storage_url = self.o.optuna_storage or (default_storage_url(self.storage.root, self.o.name)
                                                if self.storage.is_local else None)
        optuna = make_searcher(space, metrics if pareto else metrics[0], modes if pareto else modes[0],
                               self.o.train.seed, storage_url, study_name=self.o.name)
        searcher = ConcurrencyLimiter(SpecSearcher(optuna, self.trial_spec("search", potentials),
                                                   potentials.potentials), max_concurrent=self.concurrency())
        # max_t one past the budget: ASHA stops a trial that *reaches* max_t, which would cut off
        # its final report (the test metrics), sent after the last epoch with the same epoch number.
        asha = {"time_attr": "epoch", "max_t": self.o.train.epochs + 1, "grace_period": 1, "reduction_factor": 2}
        if self.o.scheduler == "fifo" or pareto:  # ASHA compares trials by one number
            scheduler = FIFOScheduler()
        elif per_method:
            scheduler = PerMethodASHA(**asha)
        else:
            scheduler = ASHAScheduler(**asha)
        samples = self.o.samples * (len(space.methods) if per_method else 1)
        each = f"{self.o.samples} per method, " if per_method and len(space.methods) > 1 else ""
        objective = (f"Pareto front of {', '.join(metrics)} (max)" if pareto else f"{metrics[0]} {modes[0]}")
        self.say(f"[search] {samples} trial(s) ({each}{self.o.search}) over {', '.join(space.methods)} "
                 f"({'fifo' if pareto else self.o.scheduler}, objective {objective})")
        # Several objectives: the searcher holds them; Tune itself then has no single metric to sort by.
        tuner = self.tuner("search", {}, tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples,
                                                         metric=None if pareto else metrics[0],
                                                         mode=None if pareto else modes[0]), total=samples)
        self.fit("search", tuner)

    def run_seeds(self, potentials: pot.Potentials) -> None:
        from ray import tune

        best = best_configs(self.rows, self.o)
        if not best:
            raise RuntimeError("no search trial finished; nothing to rerun over seeds (see trials.parquet errors)")
        base = self.trial_spec("seeds", potentials)
        first = self.o.train.seed
        # Seed s is the same s for every method: the same initial weights and data order (paired runs).
        specs = [base.with_search(json.loads(row["searched"]), potentials.potentials).with_train(seed=seed).to_dict()
                 for row in best.values() for seed in range(first, first + self.o.seeds)]
        self.say(f"[seeds] best config of {', '.join(best)} x {self.o.seeds} seed(s)")
        tuner = self.tuner("seeds", {TRIAL_KEY: tune.grid_search(specs)},
                           tune.TuneConfig(max_concurrent_trials=self.concurrency()), total=len(specs))
        self.fit("seeds", tuner)

    def run(self) -> pd.DataFrame:
        with self.signals:
            try:
                return self._run_phases()
            except Exception as err:  # a signal to the whole process group also ends Ray's own processes
                if self.signals.received is None:
                    raise
                raise Interrupted(self.signals.received) from err

    def _run_phases(self) -> pd.DataFrame:
        self.load_state()
        if self.o.address:
            self.check_cluster_fits()
        self.storage.check_writable()
        self.save_state()
        self.dir.write_bytes(config_yaml(self.o).encode(), CONFIG_FILE)
        steps = [("potentials", self.run_potentials), ("search", self.run_search), ("seeds", self.run_seeds)]
        potentials = None
        for phase, step in steps:
            if phase == "potentials":
                potentials = step()
                pot.check_usable(potentials)
                self.state["potentials"] = potentials.as_spec()
            elif phase in self.state["done"]:
                self.say(f"[{phase}] already done; skipping")
                continue
            else:
                step(potentials)
            if phase not in self.state["done"]:
                self.state["done"].append(phase)
            self.save_state()
        return self.finish()

    def finish(self) -> pd.DataFrame:
        from sweeps.leaderboard import to_markdown, write_outputs
        from sweeps.space import load_space

        trials = trials_frame(self.rows)
        history = pd.DataFrame(self.history) if self.history else None
        out = self.local_dir if self.dir.is_local else Path(tempfile.mkdtemp(prefix="amtl-lb-"))
        hparams = hparam_columns(trials)
        space = load_space(self.o.compared, Path(self.o.space) if self.o.space else None)
        methods = space.methods
        note = ("Joint search (--search joint): the method was one more searched choice, so the methods received "
                "unequal budgets (see trials, epochs); --search per-method gives each the same."
                if self.o.search == "joint" and len(methods) > 1 else "")
        compared = trials[trials["phase"] != "potentials"]
        board = write_outputs(compared, history, out, hparams, methods=methods, note=note)
        self.write_report(out, trials, history, board, hparams, space, note)
        text = to_markdown(board, note)
        if self.o.objective == "pareto":  # the search's answer is a set: the leaderboard lists it
            from sweeps.leaderboard import atomic_write
            from sweeps.report import pareto_markdown
            text += "\n" + pareto_markdown(pd.read_parquet(out / "pareto.parquet"))
            atomic_write(out / "leaderboard.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.dir.upload_dir(out)
        self.say("\n" + text)
        self.say(f"results in {self.dir.uri}")
        if not self.o.no_wandb and not self.shown_only:
            self.log_leaderboard(board, out)
        return board

    def write_report(self, out: Path, trials: pd.DataFrame, history: pd.DataFrame | None, board: pd.DataFrame,
                     hparams: list[str], space: Any, note: str) -> None:
        from sweeps.report import winner_commands, write_report

        compared = trials[trials["phase"] != "potentials"]
        potentials = (self.state.get("potentials") or {}).get("potentials")
        # The saved options as they are (a --report shows the file the sweep ran with).
        options_text = (self.dir.read_bytes(CONFIG_FILE).decode() if self.dir.exists(CONFIG_FILE)
                        else config_yaml(self.o))
        winner = winner_commands(board, compared, self.o.train, self.dir.uri_of(CONFIG_FILE), potentials,
                                 skip=SET_BY_SWEEP)
        pairs = pd.read_parquet(out / "significance.parquet")  # write_outputs' paired tests, not run again
        path = write_report(out, trials, history, board, pairs, hparams, space, f"Sweep '{self.o.name}'",
                            options_text, winner, note)
        self.say(f"[sweep] report: {self.dir.uri_of(path.name)}")

    def log_leaderboard(self, board: pd.DataFrame, out: Path) -> None:
        from sweeps.tracking import log_leaderboard, resolve_mode
        from sweeps.report import PLOTS, TABLES

        def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(frame.to_json(orient="records"))

        images = {Path(name).stem: out / name for name in (*PLOTS, "weights.png") if (out / name).exists()}
        tables = {Path(name).stem: records(pd.read_parquet(out / name)) for name in TABLES if (out / name).exists()}
        log_leaderboard(project=self.o.wandb_project, entity=self.o.wandb_entity, group=self.o.name,
                        directory=str(self.local_dir / "wandb"), mode=resolve_mode(), rows=records(board),
                        images=images, tables=tables, page=out / "report.html")


#: Trainer options a search may change for every method: a column each in ``trials.parquet``.
SHARED_COLUMNS = names_with(TrainConfig, "searchable")


def best_configs(rows: Sequence[dict[str, Any]], o: SweepOptions) -> dict[str, dict[str, Any]]:
    """Each method's best finished search trial, the one its seeds phase reruns: by the objective;
    with ``--objective pareto``, of the method's trials that none of its others beats on every task's
    val KPI, the one with the best val Delta-m (ties: the earlier trial)."""
    metrics, modes = o.objectives
    metric, mode = ("val_delta_m", "min") if len(metrics) > 1 else (metrics[0], modes[0])
    done = [r for r in rows if r["phase"] == "search" and r["status"] == "TERMINATED" and _finite(r.get(metric))
            and all(_finite(r.get(m)) for m in metrics)]
    best: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in done):
        mine = [r for r in done if r["method"] == method]
        if len(metrics) > 1:
            from sweeps.report import pareto_mask
            on_front = pareto_mask(np.array([[r[m] for m in metrics] for r in mine], dtype=float))
            mine = [r for r, keep in zip(mine, on_front) if keep]
        sign = 1.0 if mode == "min" else -1.0
        best[method] = min(mine, key=lambda r: sign * r[metric])
    return best


def hparam_columns(trials: pd.DataFrame) -> list[str]:
    """Columns of ``trials`` that are hyperparameters (balancer ones and shared trainer options)."""
    from amtl.balancers import registry
    names = {h for specs in registry().values() for h in specs} | set(SHARED_COLUMNS)
    return [c for c in trials.columns if c in names]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def collect(grid: Any, phase: str, train_storage: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of ``trials.parquet`` and ``history.parquet`` from a Tune ResultGrid.

    Per-epoch rows come from each trial's Ray Train run under ``train_storage`` (every epoch report
    carries a checkpoint, and Train keeps each checkpoint's metrics): Tune's own ``result.json`` of a
    trial restored after a driver crash starts empty, because Tune sees no *Tune* checkpoint of it.
    """
    rows, history = [], []
    for result in grid:
        metrics = dict(result.metrics or {})
        spec = TrialSpec.of(result.config)
        train, method, hparams, searched = spec.train, spec.method, spec.train["hparams"], spec.searched
        trial_id = metrics.get("trial_id") or Path(result.path).name
        # STOPPED: ended early by the scheduler (ASHA), so it has no test metrics. A trial that
        # reported FAILED_KEY (e.g. its loss diverged) ended on purpose but is a failure all the same.
        error = _one_line(result.error) if result.error else metrics.get(FAILED_KEY)
        status = "ERROR" if error else ("TERMINATED" if metrics.get(FINAL_KEY) else "STOPPED")
        row: dict[str, Any] = {
            "trial_id": trial_id, "phase": phase, "method": method, "seed": train.get("seed"),
            "status": status, "error": error,
            "tasks": ",".join(train["tasks"]), "searched": json.dumps(searched, sort_keys=True, default=str),
            "node_id": metrics.get("node_id"), "node_ip": metrics.get("node_ip"),
            "worker_node_ids": metrics.get("worker_node_ids"), "train_seconds": metrics.get("train_seconds_total"),
            "epochs": metrics.get("epoch"),  # trained: the budget, an early stop's included
        }
        # Hyperparameters keep their registry/trainer names as columns (metric columns contain "/").
        for key, value in hparams.items():
            row[key] = value
        for key in SHARED_COLUMNS:
            row[key] = train.get(key)
        for key, value in metrics.items():
            if key in ("val_delta_m", "test_delta_m") or key.startswith(("val/", "test/", "kpi/", "weight/",
                                                                           TASK_DELTA_PREFIX)):
                row[key] = value
        rows.append(row)
        frame = _train_history(train_storage, trial_id)
        if frame is None:
            frame = result.metrics_dataframe
        if frame is not None and not frame.empty:
            keep = [c for c in frame.columns if c in ("epoch", "val_delta_m") or c.startswith(("weight/", "kpi/", "val/"))]
            epochs = frame[frame[FINAL_KEY].isna()] if FINAL_KEY in frame.columns else frame
            # A trial restored after a driver crash re-reports the epoch of its last checkpoint when
            # that report outlived the experiment snapshot: one row per epoch, the last one wins.
            if "epoch" in epochs.columns:
                epochs = epochs.drop_duplicates(subset="epoch", keep="last")
            for record in epochs[keep].to_dict("records"):
                history.append({"trial_id": trial_id, "phase": phase, "method": method, **record})
    return rows, history


def _train_history(train_storage: str | None, trial_id: str) -> pd.DataFrame | None:
    """Metrics of every checkpoint of the trial's Ray Train run (one per epoch), None without one."""
    if train_storage is None:
        return None
    from ray.train import Result
    train_log = logging.getLogger("ray.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)  # reading a run logs a paragraph about resuming it, per trial
    try:
        result = Result.from_path(f"{train_storage.rstrip('/')}/train-{trial_id}")
    except RuntimeError:  # no Train run (the trial never started) or no checkpoint yet
        return None
    finally:
        train_log.setLevel(level)
    frame = result.metrics_dataframe
    if frame is None or "epoch" not in frame.columns:
        return None
    return frame.sort_values("epoch", kind="stable")


def trials_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial; a trial id seen twice (a resumed phase) keeps its last row."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.drop_duplicates(subset=["phase", "trial_id"], keep="last").reset_index(drop=True)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:500]


def stored_options(options: SweepOptions) -> SweepOptions:
    """The options sweep ``options.name`` was run with (its ``sweep.yaml``), with this call's storage,
    name and W&B options; ``options`` itself for a sweep saved before it kept the file."""
    from amtl.options import OptionsError, read_yaml
    sweep = Storage(Storage(options.storage).uri_of(options.name))
    if not sweep.exists(CONFIG_FILE):
        return options
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_FILE
        path.write_bytes(sweep.read_bytes(CONFIG_FILE))
        try:
            values = read_yaml(path, SweepOptions)
        except OptionsError as err:
            raise SweepError(f"the saved options '{sweep.uri_of(CONFIG_FILE)}' are unreadable ({err}); restore the "
                             f"file, or run --report with the sweep's options on the command line") from None
    kept = {k: getattr(options, k) for k in ("storage", "name", "no_wandb", "wandb_project", "wandb_entity", "verbose")}
    return replace(SweepOptions.of(**values), **kept, report=True)


def report(options: SweepOptions, say: Callable[[str], None] = print) -> pd.DataFrame:
    """``--report``: rebuild every output of sweep ``options.name`` from its stored results and return
    its leaderboard. No Ray, no training; its own saved options say what it compared."""
    from amtl import plugins
    from sweeps import lock

    storage = Storage(options.storage)
    if not storage.exists(options.name, STATE):
        raise SweepError(f"no sweep '{options.name}' in '{storage.uri}' to report on; check --name and --storage")
    o = stored_options(options)
    plugins.load_all(o.train.plugins)  # its methods and tasks may be a plugin's
    held = lock.acquire(storage, o.name)  # not while a driver writes the same files
    try:
        sweep = Sweep(o, say)
        sweep.state = read_state(sweep.dir)
        sweep.load_results()
        if not sweep.rows:
            raise SweepError(f"sweep '{o.name}' has no finished trial yet; run it (the same command continues it)")
        say(f"[report] rebuilding the outputs of '{o.name}' from its stored results")
        return sweep.finish()
    finally:
        held.release()


def run(options: SweepOptions, say: Callable[[str], None] = print) -> pd.DataFrame:
    """Run (or ``--resume``) a sweep and return its leaderboard."""
    start = time.perf_counter()
    board = Sweep(options, say).run()
    say(f"sweep finished in {time.perf_counter() - start:.0f}s")
    return board
