"""A complete plugin as a user writes it (tests copy it into a temporary folder and load it there).

Dataset ``points``: 2-D points in [-1, 1]^2; task ``first`` tells the sign of x, ``second`` the sign
of y. Model ``mlp``: a small shared MLP. Balancer ``tilted``: weights ``(tilt, 1 - tilt)`` scaled to
sum to the number of tasks, with a declared range and no search-space file.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics import Metric

from amtl.extend import (DataOptions, DataSplits, HParam, ModelOptions, MultiTaskModel, StepInputs, Task, Weighting,
                         register_dataset, register_model, register_task, register_weighting)

TASKS = ("first", "second")


class Points(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.xy = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.xy[i]
        return {"image": self.xy[i], "index": i, "has": {t: True for t in TASKS},
                "first": int(x > 0), "second": int(y > 0)}


def build_points(tasks: tuple[str, ...], o: DataOptions) -> DataSplits:
    train, val, test = (Points(n, o.seed * 3 + k) for k, n in enumerate((o.n_train, o.n_val, o.n_test)))
    return DataSplits(train, val, test, 2, len(train), TASKS)


class Head(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2)

    def forward(self, representation: Tensor, size: Any) -> Tensor:
        return self.linear(representation)


class Accuracy(Metric):
    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.correct += (pred.argmax(dim=1) == target).sum()
        self.total += target.numel()

    def compute(self) -> dict[str, Tensor]:
        return {"acc": self.correct.float() / self.total.clamp(min=1)}


class Sign(Task):
    kpi = "acc"
    higher_is_better = {"acc": True}

    def __init__(self, **_: Any) -> None:
        pass

    def head(self, in_channels: int) -> nn.Module:
        return Head(in_channels)

    def sample_losses(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return F.cross_entropy(pred, target, reduction="none"), torch.ones_like(target, dtype=torch.bool)

    def metric(self) -> Metric:
        return Accuracy()


class First(Sign):
    name = "first"


class Second(Sign):
    name = "second"


def build_mlp(tasks: Sequence[Task], o: ModelOptions) -> MultiTaskModel:
    width = o.width or 16
    encoder = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    return MultiTaskModel(encoder, {t.name: t.head(width) for t in tasks}, last_shared=encoder[2])


class Tilted(Weighting):
    name = "tilted"
    hparams = (HParam("tilt", "float", 0.5, low=0.2, high=0.8, doc="share of the first task"),)

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        w = self.weights
        return {t: w[t] * loss for t, loss in step.losses.items()}

    @property
    def weights(self) -> dict[str, float]:
        shares = [self.tilt, 1 - self.tilt] + [0.5] * (len(self.tasks) - 2)
        return {t: len(self.tasks) * s / sum(shares) for t, s in zip(self.tasks, shares)}


register_dataset("points", build_points, TASKS)
register_task("first", First)
register_task("second", Second)
register_model("mlp", build_mlp)
register_weighting(Tilted)
