"""The task contract: one object bundles a task's head, loss, metrics and KPI."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import Metric


class Task(ABC):
    """A prediction task on top of a shared representation.

    Subclasses set ``name`` (also the sample key of its target), ``kpi`` (the metric that
    accuracy-based balancers such as AMTL and DTP read; higher must be better) and
    ``higher_is_better`` (direction of every metric ``metric()`` reports, used by Delta-m).
    """

    name: ClassVar[str]
    kpi: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]]

    @abstractmethod
    def head(self, in_channels: int) -> nn.Module:
        """A fresh head; ``head(representation [B, C, h, w], size (H, W))`` returns predictions at ``size``."""

    @abstractmethod
    def sample_losses(self, pred: Any, target: Any) -> tuple[Tensor, Tensor]:
        """Per-sample losses ``[B]`` and per-sample validity ``[B]`` (bool).

        A sample is valid when its target has at least one valid element; an invalid sample's loss
        is exactly 0 and carries no gradient. Dense tasks average over the valid pixels of each sample.
        """

    @abstractmethod
    def metric(self) -> Metric:
        """A fresh torchmetrics ``Metric`` whose ``compute()`` returns ``{metric_name: tensor}``.

        Its states are sums (confusion matrices, pixel counts) or, for detection, concatenated
        predictions, so they accumulate over a whole split and reduce exactly across DDP ranks.
        """

    def loss(self, pred: Any, target: Any, has: Tensor | None = None) -> Tensor:
        """Scalar task loss: mean of per-sample losses over samples that carry the label.

        Returns a zero tensor (still attached to ``pred``) when no sample in the batch is labelled;
        callers detect that case with :meth:`present`.
        """
        losses, valid = self.sample_losses(pred, target)
        if has is not None:
            valid = valid & has.to(valid.device)
        # where, not multiplication: an unlabelled sample's loss may be nan, and nan * 0 is nan.
        return torch.where(valid, losses, 0.0).sum() / valid.sum().clamp(min=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

