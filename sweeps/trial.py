"""One Tune trial = one Ray Train ``TorchTrainer`` run of :class:`amtl.trainer.Trainer`.

Ray 2.60 runs Train V2 by default, where ``Tuner(TorchTrainer(...))`` no longer works; the supported
pattern is a Tune *function* trainable that launches a ``TorchTrainer`` per trial and forwards the
rank-0 reports to Tune with ``TuneReportCallback``. Naming the Train run after the trial id makes a
restored trial resume its Train run from the last epoch checkpoint.

Everything a trial needs travels in its config under ``TRIAL_KEY`` (a plain dict), so this module
holds no training math: it turns a config into a ``Trainer`` call and epochs into reports.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from amtl import plugins
from amtl.trainer import CHECKPOINT, NonFiniteLossError, TrainConfig, Trainer
from sweeps.tracking import flatten_record

#: Key of the Tune config entry that carries the fixed part of a trial (not searched).
TRIAL_KEY = "trial"
#: Metric set only in a trial's last report (test metrics after training finished).
FINAL_KEY = "final"
#: Metric of a final report that ends the trial as failed: the reason, one line.
FAILED_KEY = "failed"


class _RayReporter:
    """Reports each epoch to Ray Train with a checkpoint (all ranks report; rank 0 attaches it)."""

    def __init__(self, logger: Any | None) -> None:
        self.logger = logger
        self.train_seconds = 0.0

    def on_epoch(self, record: dict[str, Any], trainer: Trainer) -> None:
        import ray.train

        self.train_seconds += record["train_seconds"]
        metrics: dict[str, Any] = flatten_record(record)
        metrics["train_seconds_total"] = self.train_seconds
        metrics["node_id"] = _node_id()  # the final report adds the IP and every worker's node
        if self.logger is not None:
            self.logger.log_epoch(record)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if trainer.rank == 0:
                trainer.save_checkpoint(Path(tmp) / CHECKPOINT)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


def _placement() -> dict[str, str]:
    """Where this trial ran: rank 0's node and IP, and every worker's node in rank order.

    A collective, so every rank calls it; with one worker there is nothing to gather.
    """
    import ray
    from torch import distributed as dist

    from amtl.distributed import is_distributed

    node = _node_id()
    nodes = [node]
    if is_distributed():
        nodes = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, node)
    return {"node_id": nodes[0], "node_ip": ray.util.get_node_ip_address(), "worker_node_ids": ",".join(nodes)}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker (torch.distributed is already initialised for N > 1)."""
    import ray.train

    spec = loop_config
    threads = max(1, int(spec.get("threads", 1)))
    torch.set_num_threads(threads)
    config = TrainConfig.from_dict({**spec["train"], "threads": threads})
    rank = ray.train.get_context().get_world_rank()
    logger = _make_logger(spec) if rank == 0 else None
    reporter = _RayReporter(logger)
    trainer = Trainer(config, None, callbacks=[reporter], progress=None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(Path(directory) / CHECKPOINT)
        reporter.train_seconds = sum(r["train_seconds"] for r in trainer.history)
    baselines = spec.get("baselines") or {}
    try:
        result = trainer.fit(resume=False, baselines=baselines.get("val"), test_baselines=baselines.get("test"))
    except NonFiniteLossError as err:
        # Deterministic: a retry from the last checkpoint would diverge again, so end the trial now
        # (an exception would be retried max_failures times by Ray Train: Ray 2.60 has no
        # per-exception "do not retry"). Every rank sees the same global loss, so all ranks get here.
        _report_failed(trainer, config, f"non-finite loss: {err}", logger, reporter.train_seconds)
        return
    # "final", not "done": Tune adds its own "done" key to every result.
    final: dict[str, Any] = {FINAL_KEY: True, "epoch": trainer.epoch, "step": trainer.step,
                             "train_seconds_total": reporter.train_seconds, **_placement()}
    for split in ("val", "test"):
        for key, value in result[split].items():
            final[f"{split}/{key}"] = value
    for key in ("val_delta_m", "test_delta_m"):
        if key in result:
            final[key] = result[key]
    for task, value in trainer.kpis(result["val"]).items():
        final[f"kpi/{task}"] = value
    for task, value in result["weights"].items():
        final[f"weight/{task}"] = value
    if logger is not None:
        logger.set_summary({k: v for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        logger.finish()
    ray.train.report(final)


def failed_report(reason: str, tasks: Sequence[str]) -> dict[str, Any]:
    """A trial's last report when it cannot succeed: the reason, and NaN objectives.

    Tune requires the objective in every result, so it is NaN (Optuna records the trial as failed,
    ASHA ignores NaN); ``sweeps.runner.collect`` turns the reason into status ERROR and its error.
    """
    return {FINAL_KEY: True, FAILED_KEY: reason, "val_delta_m": math.nan, "test_delta_m": math.nan,
            **{f"kpi/{task}": math.nan for task in tasks}}


def _report_failed(trainer: Trainer, config: TrainConfig, reason: str, logger: Any | None,
                   train_seconds: float) -> None:
    """Ray Train's last report of a trial that cannot succeed (see :func:`failed_report`)."""
    import ray.train

    final = {**failed_report(reason, config.tasks), "epoch": trainer.epoch, "step": trainer.step,
             "node_id": _node_id(), "train_seconds_total": train_seconds}
    if logger is not None:
        logger.set_summary({FAILED_KEY: reason})
        logger.finish()
    ray.train.report(final)


def _make_logger(spec: Mapping[str, Any]) -> Any | None:
    wandb_spec = spec.get("wandb")
    if not wandb_spec:
        return None
    from sweeps.tracking import TrialLogger
    return TrialLogger(**wandb_spec)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: launch a ``TorchTrainer`` for this trial and wait for it."""
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = dict(config[TRIAL_KEY])
    plugins.load_all(spec["train"].get("plugins", ()))  # the trial's method may be a plugin's
    trial_id = ray.tune.get_context().get_trial_id()
    train, method, _, _ = resolve_trial(config)
    workers, gpus = int(spec.get("workers", 1)), float(spec.get("gpus_per_worker", 0))
    if spec.get("wandb"):
        spec["wandb"] = {**spec["wandb"], "run_id": trial_id, "name": trial_id,
                         "tags": [method],
                         "config": {"balancer": method, **_loggable(train["hparams"]),
                                    **_loggable({"potentials": train.get("potentials") or {}}),
                                    **{k: train[k] for k in ("lr", "weight_decay", "batch_size", "seed") if k in train}}}
    loop_config = {**spec, "train": train}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": float(spec.get("cpus_per_worker", 1)),
                                                           **({"GPU": gpus} if gpus > 0 else {})}),
        run_config=RunConfig(name=f"train-{trial_id}", storage_path=spec["train_storage"],
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=int(spec.get("max_failures", 2)))),
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


def resolve_trial(config: Mapping[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]:
    """A trial's Tune config -> ``(train options, method, its hyperparameters, searched values)``.

    The config holds the fixed spec under ``TRIAL_KEY`` plus, depending on the phase, the values
    Optuna suggested (search), ``override`` (potentials: one task, EW) or ``seeded``
    (``{"searched": ..., "seed": s}``: a search winner rerun with another seed).
    """
    from amtl.balancers import context_keys
    from sweeps.space import split_config

    spec = config[TRIAL_KEY]
    train = {**spec["train"], **config.get("override", {})}
    seeded = config.get("seeded")
    if seeded:
        searched = dict(seeded["searched"] if not isinstance(seeded["searched"], str) else json.loads(seeded["searched"]))
        train["seed"] = seeded["seed"]
    else:
        searched = {k: v for k, v in config.items() if k not in (TRIAL_KEY, "override", "seeded")}
    if searched:
        method, hparams, shared = split_config(searched)
        train.update(shared)
        train["balancer"] = method
        train["hparams"] = {**train.get("hparams", {}), **hparams}
    method = train.get("balancer", "ew")
    hparams = dict(train.get("hparams", {}))
    if spec.get("potentials") and "potentials" in context_keys(method):
        train["potentials"] = spec["potentials"]
    train["hparams"] = hparams
    return train, method, hparams, searched


def _loggable(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as W&B config values (a mapping, e.g. the potentials, becomes one entry per key)."""
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if isinstance(value, Mapping):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


