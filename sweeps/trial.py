"""One Tune trial = one Ray Train ``TorchTrainer`` run of :class:`amtl.trainer.Trainer`.

Ray 2.60 runs Train V2 by default, where ``Tuner(TorchTrainer(...))`` no longer works; the supported
pattern is a Tune *function* trainable that launches a ``TorchTrainer`` per trial and forwards the
rank-0 reports to Tune with ``TuneReportCallback``. Naming the Train run after the trial id makes a
restored trial resume its Train run from the last epoch checkpoint.

Kept free of torch and the training stack (:mod:`sweeps.train_worker` holds the per-worker loop):
every trial starts a fresh Tune actor that imports this module.

Everything a trial needs travels in its config under ``TRIAL_KEY``: a complete :class:`TrialSpec`
that its phase built (the search phase through :class:`sweeps.optuna_search.SpecSearcher`), so the
trial only reads it, and this module holds no training math: it turns a spec into a ``Trainer`` call
and epochs into reports.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from amtl import plugins

#: Key of the Tune config entry that carries a trial's :class:`TrialSpec` (as a plain dict).
TRIAL_KEY = "trial"
#: Metric set only in a trial's last report (test metrics after training finished).
FINAL_KEY = "final"
#: Metric of a final report that ends the trial as failed: the reason, one line.
FAILED_KEY = "failed"
#: Prefix of a final report's per-task test Delta-m (``delta/<task>``: where the Delta-m comes from).
TASK_DELTA_PREFIX = "delta/"


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial runs with. Its phase builds it whole; the trial only reads it."""

    phase: str
    train: dict[str, Any]            # TrainConfig options, complete: method, hyperparameters, seed, potentials
    searched: dict[str, Any]         # the search's values it was built from ({} for single-task trials)
    workers: int                     # Ray Train workers (DDP ranks)
    cpus_per_worker: float
    gpus_per_worker: float
    train_storage: str               # where its Ray Train run keeps the epoch checkpoints
    max_failures: int                # Ray Train restarts from the last checkpoint
    baselines: dict[str, Any] | None = None  # single-task "val"/"test" metrics: Delta-m's reference
    wandb: dict[str, Any] | None = None      # TrialLogger options; None: no W&B run

    @property
    def method(self) -> str:
        return self.train["balancer"]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, the value of a Tune config's ``TRIAL_KEY`` (Tune stores configs as JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> "TrialSpec":
        """The spec of a trial from its Tune config."""
        return cls(**config[TRIAL_KEY])

    def with_search(self, searched: Mapping[str, Any], potentials: Mapping[str, float] | None) -> "TrialSpec":
        """This spec with a search's values (the method, its hyperparameters, shared trainer options)
        applied, and the potentials given as run context when the method reads them."""
        from amtl.balancers import context_keys
        from sweeps.space import split_config

        method, hparams, shared = split_config(searched)
        reads_potentials = "potentials" in context_keys(method)
        train = {**self.train, **shared, "balancer": method, "hparams": hparams,
                 "potentials": dict(potentials) if reads_potentials and potentials else None}
        return dataclasses.replace(self, train=train, searched=dict(searched))

    def with_train(self, **changes: Any) -> "TrialSpec":
        return dataclasses.replace(self, train={**self.train, **changes})


def failed_report(reason: str, tasks: Sequence[str]) -> dict[str, Any]:
    """A trial's last report when it cannot succeed: the reason, and NaN objectives.

    Tune requires the objective in every result, so it is NaN (Optuna records the trial as failed,
    ASHA ignores NaN); ``sweeps.runner.collect`` turns the reason into status ERROR and its error.
    """
    return {FINAL_KEY: True, FAILED_KEY: reason, "val_delta_m": math.nan, "test_delta_m": math.nan,
            **{f"kpi/{task}": math.nan for task in tasks}}


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry. It imports the training stack only in the worker, so the Tune
    actor that launches a trial never pays for torchvision and torchmetrics."""
    from sweeps.train_worker import train_loop_per_worker
    train_loop_per_worker(loop_config)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: launch a ``TorchTrainer`` for this trial and wait for it."""
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = TrialSpec.of(config)
    train = spec.train
    plugins.load_all(train.get("plugins", ()))  # the trial's method may be a plugin's
    trial_id = ray.tune.get_context().get_trial_id()
    if spec.wandb:  # the run is named after the trial, known only now
        spec = dataclasses.replace(spec, wandb={
            **spec.wandb, "run_id": trial_id, "name": trial_id, "tags": [spec.method],
            "config": {"balancer": spec.method, **_loggable(train["hparams"]),
                       **_loggable({"potentials": train.get("potentials") or {}}),
                       **{k: train[k] for k in ("lr", "weight_decay", "batch_size", "seed") if k in train}}})
    gpus = spec.gpus_per_worker
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=spec.to_dict(),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": spec.cpus_per_worker,
                                                           **({"GPU": gpus} if gpus > 0 else {})}),
        run_config=RunConfig(name=f"train-{trial_id}", storage_path=spec.train_storage,
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    try:
        trainer.fit()
    except WorkerGroupError as err:
        # The trial's own code failed on every one of Ray Train's attempts: report it as this trial's
        # failure (Tune would retry an exception). A full disk is the cluster's fault, not the trial's:
        # raised, so the trial ends lost and --resume retries it once there is space.
        from sweeps.storage import is_out_of_space
        if is_out_of_space(err):
            raise
        _report_train_failure(train["tasks"], err)


def _report_train_failure(tasks: Sequence[str], err: BaseException) -> None:
    """Tune's last report of a trial whose Ray Train run failed (see :func:`failed_report`)."""
    import ray.tune

    lines = [line for line in str(err).splitlines() if line.strip()]
    ray.tune.report(failed_report(f"training failed: {lines[-1] if lines else type(err).__name__}"[:500], tasks))


def _loggable(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as W&B config values (a mapping, e.g. the potentials, becomes one entry per key)."""
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if isinstance(value, Mapping):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


