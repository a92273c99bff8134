"""The per-worker side of a trial: the loop each Ray Train worker runs (see :mod:`sweeps.trial`)."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from amtl.trainer import CHECKPOINT, NonFiniteLossError, TrainConfig, Trainer
from sweeps.tracking import flatten_record
from sweeps.trial import FAILED_KEY, FINAL_KEY, TASK_DELTA_PREFIX, TrialSpec, failed_report


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

    spec = TrialSpec(**loop_config)
    config = TrainConfig.from_dict(spec.train)
    torch.set_num_threads(config.threads or 1)
    rank = ray.train.get_context().get_world_rank()
    logger = _make_logger(spec.wandb) if rank == 0 else None
    reporter = _RayReporter(logger)
    trainer = Trainer(config, None, callbacks=[reporter], progress=None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(Path(directory) / CHECKPOINT)
        reporter.train_seconds = sum(r["train_seconds"] for r in trainer.history)
    baselines = spec.baselines or {}
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
    for task, value in result.get("test_task_delta", {}).items():
        final[f"{TASK_DELTA_PREFIX}{task}"] = value
    for task, value in trainer.kpis(result["val"]).items():
        final[f"kpi/{task}"] = value
    for task, value in result["weights"].items():
        final[f"weight/{task}"] = value
    if logger is not None:
        logger.set_summary({k: v for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        logger.finish()
    ray.train.report(final)


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


def _make_logger(wandb_options: Mapping[str, Any] | None) -> Any | None:
    if not wandb_options:
        return None
    from sweeps.tracking import TrialLogger
    return TrialLogger(**wandb_options)
