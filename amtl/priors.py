"""The per-pixel training-mean prior: the bar a trained model must clear to have learned anything.

It predicts, at every pixel position, the training split's most frequent class, mean valid depth and
mean (renormalised) valid normal, whatever the image shows.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from amtl.data import collate
from amtl.tasks import Task

DENSE_PRIOR_TASKS = ("segmentation", "depth", "normal")


@torch.no_grad()
def fit_pixel_prior(train: Dataset, tasks: Sequence[Task], batch_size: int = 64) -> dict[str, Tensor]:
    """Per-pixel predictions ``{task: [C, H, W]}`` in the form each task's metric expects."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for batch in DataLoader(train, batch_size=batch_size, collate_fn=collate):
        for task in tasks:
            if task.name not in DENSE_PRIOR_TASKS:
                continue
            target = batch[task.name]
            if task.name == "segmentation":
                num_classes = task.num_classes  # type: ignore[attr-defined]
                onehot = F.one_hot(target.clamp(min=0), num_classes).permute(0, 3, 1, 2).float()
                value, valid = onehot, (target >= 0).unsqueeze(1).float()
            elif task.name == "depth":
                value, valid = target, (target > 0).float()
            else:
                value, valid = target, (target.abs().sum(1, keepdim=True) > 0).float()
            sums[task.name] = sums.get(task.name, 0) + (value * valid).sum(0)
            counts[task.name] = counts.get(task.name, 0) + valid.sum(0)
    prior = {}
    for name, total in sums.items():
        mean = total / counts[name].clamp(min=1)
        if name == "segmentation":
            prior[name] = F.one_hot(mean.argmax(0), mean.shape[0]).permute(2, 0, 1).float()
        elif name == "normal":
            prior[name] = F.normalize(mean, dim=0)
        else:
            prior[name] = mean
    return prior


@torch.no_grad()
def evaluate_prior(prior: dict[str, Tensor], split: Dataset, tasks: Sequence[Task],
                   batch_size: int = 64) -> dict[str, float]:
    """Metrics ``{"task/metric": value}`` of the prior on ``split``."""
    metrics = {t.name: t.metric() for t in tasks if t.name in prior}
    for batch in DataLoader(split, batch_size=batch_size, collate_fn=collate):
        n = batch["image"].shape[0]
        for name, metric in metrics.items():
            metric.update(prior[name].expand(n, *prior[name].shape), batch[name])
    return {f"{t}/{k}": float(v) for t, m in metrics.items() for k, v in m.compute().items()}
