"""One-process multi-task trainer: fixed step budget, validation each epoch, checkpoint and resume.

The trainer talks to a balancer only through :class:`amtl.balancers.Method`: task losses in
(:class:`~amtl.balancers.StepInputs`), gradients out (``Method.backward``), plus the events
``on_epoch_end`` (mean training losses) and ``on_validation`` (val KPIs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from amtl import balancers, plugins
from amtl.data import collate
from amtl.data.labels import SAMPLERS, describe_counts, task_balanced_weights, task_labels
from amtl.distributed import (Collectives, GlobalBatchSampler, ShardSampler, all_reduce_mean_, all_reduce_sum_,
                              broadcast_, world)
from amtl.data.registry import DATASETS, DataSplits, build_datasets, delta_m_directions
from amtl.models import MODELS_REGISTRY, build_model
from amtl.models.base import MultiTaskModel
from amtl.options import option
from amtl.tasks import Task, delta_m, directions, make_task, task_deltas, task_names

OPTIMIZERS = ("adam", "adamw", "sgd")
AMP_DTYPES = ("bfloat16", "float16")
SCHEDULES = ("cosine", "poly", "constant")
CHECKPOINT = "checkpoint.pt"
# Config fields that may change between a run and its resume without changing the results' meaning.
_RUNTIME_FIELDS = {"epochs", "num_workers", "threads", "device", "cache_dir", "data_root", "log_every"}


class ConfigError(ValueError):
    """A training option is invalid; the message names it and the fix."""


class NonFiniteLossError(RuntimeError):
    """A task loss became NaN or infinite; the run stops rather than train on garbage."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Budgets are in epochs/steps, never wall-clock."""

    # fingerprint=True: changes what a single-task model can reach (the potentials' cache key);
    # searchable=True: a search space may search it for every method (with bounds in sweeps/space.py).
    plugins: list[str] = option(help="user code to load first: a .py file or a module name that registers tasks, "
                                     "datasets, models or balancers (repeatable; see docs/extending.md)",
                                factory=list, flag="--plugin", repeatable=True)
    tasks: tuple[str, ...] = option(("segmentation", "depth", "normal"), help="tasks to train")
    dataset: str = option("scenes", fingerprint=True,
                          help="scenes (rendered), nyuv2, voc, partial (sources labelled for different tasks), "
                               "or a plugin's dataset")
    data_root: str | None = option(None, fingerprint=True,
                                   help="dataset root for real datasets; partial: voc=DIR,nyuv2=DIR")
    image_size: int = option(64, fingerprint=True, help="image side in pixels")
    n_train: int = option(1000, fingerprint=True, help="training samples")
    n_val: int = option(200, fingerprint=True, help="validation samples")
    n_test: int = option(200, fingerprint=True, help="test samples")
    augment: bool = option(False, fingerprint=True, searchable=True, help="random scale-crop and flip (NYUv2)")
    model: str = option("small", fingerprint=True, help="small, a torchvision backbone name, or a plugin's model")
    width: int | None = option(None, fingerprint=True, help="channel width of the small model")
    weights_path: str | None = option(None, fingerprint=True,
                                      help="local backbone state dict (nothing is downloaded)")
    balancer: str = option("ew", help="method name, or weighting+aggregator")
    hparams: dict[str, Any] = option(factory=dict, cli=False, help="balancer hyperparameters")
    potentials: dict[str, float] | None = option(None, cli=False,
                                                 help="single-task KPI of each task (run context of AMTL)")
    epochs: int = option(3, fingerprint=True, help="training budget in epochs (of every trial of a sweep)")
    steps_per_epoch: int | None = option(None, fingerprint=True,
                                         help="cap on steps per epoch (default: one pass over the training set)")
    batch_size: int = option(32, fingerprint=True, searchable=True, help="global batch size")
    sampler: str = option("random", choices=SAMPLERS, help="task-balanced: every task's labels about equally "
                                                           "often (partially labelled data)")
    lr: float = option(2e-3, fingerprint=True, searchable=True, help="learning rate")
    weight_decay: float = option(0.0, fingerprint=True, searchable=True, help="weight decay")
    optimizer: str = option("adam", choices=OPTIMIZERS, fingerprint=True, searchable=True, help="optimizer")
    schedule: str = option("cosine", choices=SCHEDULES, fingerprint=True, searchable=True,
                           help="learning-rate schedule")
    device: str = option("auto", how_only=True, help="auto, cpu, cuda or cuda:N")
    amp: bool = option(True, help="disable autocast on CUDA (ignored on CPU)")
    amp_dtype: str = option("bfloat16", choices=AMP_DTYPES,
                            help="autocast dtype on CUDA: bfloat16, or float16 (adds a gradient scaler)")
    seed: int = option(0, help="initialisation, data order and stochastic balancers (a sweep: also the "
                                        "searcher's seed, and the first of --seeds)")
    data_seed: int = option(0, fingerprint=True, help="which rendered dataset (kept across --seed, so seeds "
                                                      "compare like with like)")
    num_workers: int = option(0, how_only=True, help="data-loader worker processes")
    threads: int | None = option(None, how_only=True, help="torch CPU threads")
    diagnose_every: int = option(0, help="gradient cosines/condition number every N steps (0: only for aggregators)")
    log_every: int = option(20, how_only=True, help="steps between log lines")
    cache_dir: str | None = option(None, how_only=True, help="where rendered datasets are cached")

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = tuple(t for t in self.tasks.split(",") if t)
        self.tasks = tuple(self.tasks)

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "image_size", "n_train", "n_val", "n_test", "log_every"):
            positive(name)
        if self.steps_per_epoch is not None:
            positive("steps_per_epoch")
        plugins.load_all(self.plugins)  # first: their names are used below
        if not self.tasks:
            raise ConfigError("no tasks given; pass e.g. --tasks segmentation,depth,normal")
        DATASETS.get(self.dataset), MODELS_REGISTRY.get(self.model)  # UnknownNameError lists the known names
        unknown = [t for t in self.tasks if t not in task_names()]
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(task_names())})")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks repeat: {','.join(self.tasks)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"unknown amp_dtype '{self.amp_dtype}' (known: {', '.join(AMP_DTYPES)})")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{self.optimizer}' (known: {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{self.schedule}' (known: {', '.join(SCHEDULES)})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got '{self.device}'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device '{self.device}' asked for but CUDA is not available; use --device cpu")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{self.sampler}' (known: {', '.join(SAMPLERS)})")
        if self.num_workers < 0 or self.diagnose_every < 0:
            raise ConfigError("num_workers and diagnose_every must be >= 0")
        context = sorted(set(self.hparams) & set(balancers.CONTEXT_KEYS))
        if context:
            raise ConfigError(f"balancer hyperparameter(s) {', '.join(context)} are set by the run, not by hand "
                              f"(give the training seed as --seed, the potentials as --potentials); remove them")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        return cls(**values)


class Callback(Protocol):
    """Receives records while training (a Ray Train reporter is one)."""

    def on_epoch(self, record: dict[str, Any], trainer: "Trainer") -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Trains one multi-task model with one balancer; see :meth:`fit`."""

    def __init__(self, config: TrainConfig, out_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), data: DataSplits | None = None,
                 progress: Callable[[str], None] | None = print) -> None:
        config.validate()
        self.config = config
        self.rank, self.world_size = world()
        if config.batch_size % self.world_size:
            raise ConfigError(f"batch_size {config.batch_size} is the global batch and must be divisible by "
                              f"the {self.world_size} workers")
        # Only rank 0 writes files and prints; every rank computes.
        self.out_dir = Path(out_dir) if out_dir is not None and self.rank == 0 else None
        self.callbacks = list(callbacks)
        self.progress = (progress if self.rank == 0 else None) or (lambda _msg: None)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)

        self.data = data or build_datasets(
            config.dataset, config.tasks, root=config.data_root, image_size=config.image_size,
            n_train=config.n_train, n_val=config.n_val, n_test=config.n_test, seed=config.data_seed,
            cache_dir=config.cache_dir, augment=config.augment)
        self.tasks: list[Task] = [make_task(t, num_classes=self.data.num_classes,
                                             num_detection_classes=self.data.num_detection_classes)
                                   for t in config.tasks]
        labels = task_labels(self.data.train, config.tasks)
        self.label_counts = {t: int(v.sum()) for t, v in labels.items()}
        unlabelled = [t for t, n in self.label_counts.items() if n == 0]
        if unlabelled:
            raise ConfigError(f"no training sample carries a label of task(s) {', '.join(unlabelled)}; "
                              f"drop them from --tasks or use a dataset that labels them")
        self._sample_weights = task_balanced_weights(labels) if config.sampler == "task-balanced" else None
        self.model: MultiTaskModel = build_model(config.model, self.tasks, width=config.width,
                                                 weights_path=config.weights_path).to(self.device)
        broadcast_([*self.model.parameters(), *self.model.buffers()])
        # The training seed reaches stochastic methods (RLW's draws, PCGrad's order): each seed of the
        # seeds phase then samples its own randomness, and DDP ranks share it.
        self.method = balancers.make(config.balancer, tasks=list(config.tasks), seed=config.seed,
                                     num_instances=self.data.num_instances, potentials=config.potentials,
                                     **config.hparams)
        self._move_method_state()
        self.collectives = Collectives(self.world_size)
        self.optimizer = self._make_optimizer()
        self.scaler = self._make_scaler()
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.epoch = 0  # epochs completed
        self.step = 0   # optimizer steps taken
        self.history: list[dict[str, Any]] = []
        self._val_loader = self._loader(self.data.val, shuffle=False)
        self._test_loader = self._loader(self.data.test, shuffle=False)

    # -- set-up ----------------------------------------------------------------------------
    def _move_method_state(self) -> None:
        for p in self.method.parameters():
            p.data = p.data.to(self.device)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": c.weight_decay}]
        own = [p for p in self.method.parameters() if p.requires_grad]
        if own:  # balancer parameters (e.g. UW log-variances) are never decayed
            groups.append({"params": own, "weight_decay": 0.0})
        if c.optimizer == "adam":
            return torch.optim.Adam(groups, lr=c.lr)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=c.lr)
        return torch.optim.SGD(groups, lr=c.lr, momentum=0.9)

    def _make_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for float16 autocast on CUDA (float16's small range underflows gradients)."""
        c = self.config
        if c.amp and c.amp_dtype == "float16" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def _lr_factor(self, step: int) -> float:
        t = min(step / max(1, self.total_steps), 1.0)
        if self.config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if self.config.schedule == "poly":
            return (1 - t) ** 0.9
        return 1.0

    def _steps_per_epoch(self) -> int:
        n = len(self.data.train)
        if n == 0:
            raise ConfigError("the training split is empty")
        if n < self.config.batch_size and self.world_size > 1:
            raise ConfigError(f"the training split has {n} samples, fewer than one global batch "
                              f"({self.config.batch_size}); lower batch_size")
        full = n // self.config.batch_size if n >= self.config.batch_size else 1
        return min(full, self.config.steps_per_epoch or full)

    def _loader(self, dataset: Dataset, shuffle: bool, epoch: int = 0) -> DataLoader:
        """Training: this rank's slice of each global batch. Evaluation: a disjoint shard."""
        common = dict(collate_fn=collate, num_workers=self.config.num_workers,
                      pin_memory=self.device.type == "cuda")
        n = len(dataset)
        if shuffle:
            sampler = GlobalBatchSampler(n, self.config.batch_size, self.rank, self.world_size,
                                         seed=self.config.seed, epoch=epoch, drop_last=n >= self.config.batch_size,
                                         weights=self._sample_weights if dataset is self.data.train else None)
            return DataLoader(dataset, batch_sampler=sampler, **common)
        return DataLoader(dataset, batch_size=self.config.batch_size, sampler=ShardSampler(n, self.rank, self.world_size),
                          **common)

    # -- one step --------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(self.device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x
        return move(batch)

    def _autocast(self):
        enabled = self.config.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=getattr(torch, self.config.amp_dtype), enabled=enabled)

    def compute_losses(self, batch: dict[str, Any]) -> balancers.StepInputs:
        """Forward pass and masked task losses for a batch already on the device."""
        with self._autocast():
            images = batch["image"]
            representation = self.model.encode(images)
            preds = self.model.decode(representation, tuple(images.shape[-2:]))
        per_task = []
        for task in self.tasks:
            per_sample, ok = task.sample_losses(preds[task.name], batch[task.name])
            ok = ok & batch["has"][task.name]
            # An unlabelled sample contributes exactly 0 and no gradient, even if its loss is nan.
            per_task.append((task.name, torch.where(ok, per_sample, 0.0), ok))
        sums = torch.stack([p.sum() for _, p, _ in per_task])
        counts = torch.stack([ok.sum() for _, _, ok in per_task]).to(sums.dtype)
        # With several workers the loss is that of the global batch: sums and label counts are
        # all-reduced (one small collective), and each rank's loss is scaled so that averaging the
        # gradients across ranks gives the global gradient. Its *value* is the global loss, so every
        # rank's balancer sees identical numbers.
        totals = all_reduce_sum_(torch.cat([sums.detach(), counts.detach()]))
        global_sums, global_counts = totals[:len(per_task)], totals[len(per_task):]
        # The one device-to-host copy of the step: which tasks are present, and whether any loss is
        # non-finite (a sum is finite exactly when the mean loss is).
        host = totals.tolist()
        host_sums, host_counts = host[:len(per_task)], host[len(per_task):]
        bad = [name for (name, _, _), s, n in zip(per_task, host_sums, host_counts) if n > 0 and not math.isfinite(s)]
        if bad:
            raise NonFiniteLossError(
                f"loss of task(s) {', '.join(bad)} became non-finite at epoch {self.epoch + 1}, step {self.step}; "
                f"lower the learning rate (now {self.config.lr}) or check the balancer's hyperparameters")
        present = [n > 0 for n in host_counts]
        losses, sample_losses, valid = {}, {}, {}
        for i, (name, per_sample, ok) in enumerate(per_task):
            if not present[i]:
                continue  # no label for this task anywhere in the batch: it contributes nothing
            local = sums[i] * self.world_size / global_counts[i]
            value = global_sums[i] / global_counts[i]
            losses[name] = local + (value - local).detach() if self.world_size > 1 else local
            sample_losses[name], valid[name] = per_sample, ok
        return balancers.StepInputs(
            losses=losses, sample_losses=sample_losses, valid=valid, sample_ids=batch["index"],
            shared_params=self.model.shared_parameters(), task_params=self.model.task_parameters(),
            last_shared_params=self.model.last_shared_parameters(), representation=representation,
            step=self.step, epoch=self.epoch, ranks=self.collectives)

    def train_step(self, batch: dict[str, Any]) -> tuple[balancers.StepInputs, balancers.StepReport]:
        step = self.compute_losses(batch)
        if not step.losses:
            raise RuntimeError("a training batch carries no label of any task")
        self.optimizer.zero_grad(set_to_none=True)
        diagnose = self.config.diagnose_every > 0 and self.step % self.config.diagnose_every == 0
        report = self.method.backward(step, diagnose=diagnose, loss_scale=self._loss_scale())
        self._sync_gradients()
        stepped = self._optimizer_step()
        self.scheduler.step()
        if stepped:
            # A step the scaler skipped taught nothing; the balancer's pending update (GradNorm,
            # ILTP) is dropped too, and the next ``terms`` call replaces it.
            self.method.after_step(step)
        self.step += 1
        return step, report

    def _loss_scale(self) -> Tensor | None:
        # ``scale`` of a one is the current scale as a device tensor: no host sync, and it
        # initialises the scaler's state lazily as scaling a loss would.
        return None if self.scaler is None else self.scaler.scale(torch.ones((), device=self.device))

    def _optimizer_step(self) -> bool:
        """The optimizer step, through the loss scaler if any; False when the scaler skipped it.

        Every gradient has been through a cross-rank reduction by now (task gradients before
        aggregation, the rest in :meth:`_sync_gradients`), so an inf/nan on any rank is on every
        rank: all ranks skip together and lower the scale alike, as GradScaler does under DDP.
        """
        if self.scaler is None:
            self.optimizer.step()
            return True
        # ``step`` syncs with the host anyway (to read its inf flag), so reading the scale is cheap.
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # unscales; skips the step if any gradient is inf/nan
        self.scaler.update()
        return self.scaler.get_scale() >= before  # update() lowers the scale exactly when it skipped

    def _sync_gradients(self) -> None:
        """Average gradients across workers; shared ones are skipped when the aggregator already
        saw globally reduced task gradients (a second all-reduce would be redundant)."""
        if self.world_size == 1:
            return
        params = self.model.task_parameters() + [p for p in self.method.parameters() if p.requires_grad]
        if not (self.method.aggregator is not None and self.method.source == "shared"):
            params = self.model.shared_parameters() + params
        for p in params:  # every rank must contribute the same buffer layout to the collective
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_mean_([p.grad for p in params])

    # -- loops -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Metrics ``{"task/metric": value}`` over the whole split."""
        loader = {"val": self._val_loader, "test": self._test_loader}[split]
        self.model.eval()
        metrics = {t.name: t.metric().to(self.device) for t in self.tasks}
        for batch in loader:
            batch = self._to_device(batch)
            with self._autocast():
                preds = self.model(batch["image"])
            for task in self.tasks:
                has = batch["has"][task.name]
                if bool(has.any()):
                    metrics[task.name].update(_select(preds[task.name], has), _select(batch[task.name], has))
        self.model.train()
        return {f"{t}/{k}": float(v) for t, m in metrics.items() for k, v in m.compute().items()}

    def kpis(self, val_metrics: Mapping[str, float]) -> dict[str, float]:
        return {t.name: val_metrics[f"{t.name}/{t.kpi}"] for t in self.tasks}

    def train_epoch(self) -> dict[str, Any]:
        c = self.config
        _set_epoch(self.data.train, self.epoch)
        loader = self._loader(self.data.train, shuffle=True, epoch=self.epoch)
        sums = {t: torch.zeros((), device=self.device) for t in c.tasks}
        counts = dict.fromkeys(c.tasks, 0)
        pending: list[tuple[Tensor, dict[str, Any]]] = []
        step_log = self._open_log("steps.jsonl")
        start = time.perf_counter()
        images = 0
        for i, batch in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            batch = self._to_device(batch)
            step, report = self.train_step(batch)
            images += batch["image"].shape[0]
            nan = torch.full((), math.nan, device=self.device)
            losses = torch.stack([step.losses[t].detach() if t in step.losses else nan for t in c.tasks])
            pending.append((losses, {"step": self.step, "epoch": self.epoch + 1, "weights": report.weights,
                                     "cosines": report.cosines, "condition_number": report.condition_number}))
            for t, loss in step.losses.items():
                sums[t] += loss.detach()
                counts[t] += 1
            if len(pending) >= c.log_every or i + 1 == self.steps_per_epoch:
                # One device sync per `log_every` steps, not one per step.
                block = torch.stack([p[0] for p in pending]).tolist()
                if step_log is not None:
                    for values, (_, row) in zip(block, pending):
                        row["losses"] = {t: v for t, v in zip(c.tasks, values) if not math.isnan(v)}
                        step_log.write(json.dumps(row) + "\n")
                pending.clear()
                self.progress(f"  epoch {self.epoch + 1}/{c.epochs} step {i + 1}/{self.steps_per_epoch} "
                              + " ".join(f"{t}={v:.4f}" for t, v in zip(c.tasks, block[-1])))
        if step_log is not None:
            step_log.close()
        seconds = time.perf_counter() - start
        means = {t: float(sums[t]) / counts[t] for t in c.tasks if counts[t]}
        return {"train_loss": means, "train_seconds": seconds, "images_per_second": images / max(seconds, 1e-9)}

    def fit(self, resume: bool = True, baselines: Mapping[str, float] | None = None,
            test_baselines: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Train for the configured epochs (continuing from a checkpoint when ``resume``).

        Returns (and writes to ``out_dir/metrics.json``) ``{"val": {...}, "test": {...}, ...}`` with
        keys ``task/metric``; with ``baselines`` (single-task val metrics; ``test_baselines`` for
        test, default the same) also Delta-m for val and test.
        """
        c = self.config
        if resume and self.out_dir is not None and (self.out_dir / CHECKPOINT).exists():
            self.load_checkpoint(self.out_dir / CHECKPOINT)
            self.progress(f"resumed from {self.out_dir / CHECKPOINT} after epoch {self.epoch}")
        self.progress(f"training labels per task ({c.sampler} sampler): "
                      f"{describe_counts(self.label_counts, len(self.data.train))}")
        dirs = delta_m_directions(c.dataset, directions(self.tasks))
        val: dict[str, float] = self.history[-1]["val"] if self.history else {}
        while self.epoch < c.epochs:
            train = self.train_epoch()
            self.method.on_epoch_end(train["train_loss"])
            val = self.evaluate("val")
            kpis = self.kpis(val)
            self.method.on_validation(kpis)
            self.epoch += 1
            record = {"epoch": self.epoch, "step": self.step, **train, "val": val, "kpis": kpis,
                      "weights": self.method.weights, "lr": self.scheduler.get_last_lr()[0]}
            if baselines:
                record["val_delta_m"] = delta_m(val, baselines, dirs)
            self.history.append(record)
            self.progress(f"epoch {self.epoch}/{c.epochs} ({train['train_seconds']:.1f}s, "
                          f"{train['images_per_second']:.0f} img/s) val "
                          + " ".join(f"{k}={v:.4f}" for k, v in kpis.items()))
            if self.out_dir is not None:
                self.save_checkpoint(self.out_dir / CHECKPOINT)
                self._append_json("epochs.jsonl", record)
            for cb in self.callbacks:
                cb.on_epoch(record, self)
        test = self.evaluate("test")
        result: dict[str, Any] = {"val": val, "test": test, "epochs": self.epoch, "steps": self.step,
                                  "balancer": c.balancer, "weights": self.method.weights}
        if baselines:
            result["val_delta_m"] = delta_m(val, baselines, dirs)
            result["test_delta_m"] = delta_m(test, test_baselines or baselines, dirs)
            result["test_task_delta"] = task_deltas(test, test_baselines or baselines, dirs)
        if self.out_dir is not None:
            _atomic_write_text(self.out_dir / "metrics.json", json.dumps(result, indent=2, sort_keys=True))
        return result

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "epoch": self.epoch, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "method": self.method.state_dict(),
                "history": self.history, "torch_rng": torch.get_rng_state(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Options added since the checkpoint was written take their defaults (what the run used).
        saved = {**TrainConfig().to_dict(), **state["config"]}
        saved = {k: v for k, v in saved.items() if k not in _RUNTIME_FIELDS}
        now = {k: v for k, v in self.config.to_dict().items() if k not in _RUNTIME_FIELDS}
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(f"checkpoint was made with different options ({', '.join(diff)}); "
                              f"use a new output directory or the original options")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a crash mid-save never leaves a half-written checkpoint

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))

    # -- files -----------------------------------------------------------------------------
    def _open_log(self, name: str):
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return open(self.out_dir / name, "a")

    def _append_json(self, name: str, record: Mapping[str, Any]) -> None:
        with open(self.out_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    """Let datasets with per-epoch augmentation draws (NYUv2) know the epoch, through Subsets too."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _select(x: Any, mask: Tensor) -> Any:
    """The samples of ``x`` where ``mask`` holds: a tensor, a dict of tensors (e.g. detection heads) or a list."""
    if isinstance(x, Tensor):
        return x[mask]
    if isinstance(x, dict):
        return {k: _select(v, mask) for k, v in x.items()}
    return [v for v, m in zip(x, mask.tolist()) if m]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(config: TrainConfig, out_dir: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Convenience: build a :class:`Trainer` and run :meth:`Trainer.fit`."""
    return Trainer(config, out_dir, **kwargs).fit()


__all__ = ["Callback", "ConfigError", "NonFiniteLossError", "TrainConfig", "Trainer", "train"]
