"""Semantic segmentation: cross-entropy with an ignore label; mIoU and pixel accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from amtl.tasks.base import Task
from amtl.tasks.heads import DenseHead

IGNORE = -1


class SegmentationMetric(Metric):
    """mIoU (mean over classes present in the ground truth or the prediction) and pixel accuracy.

    Accumulates one confusion matrix over the whole split (torchmetrics sums it across DDP ranks), so
    the result is not a mean of batch means.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE, validate_args=False)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.confmat.update(pred.argmax(1), target)

    def compute(self) -> dict[str, Tensor]:
        cm = self.confmat.compute().double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        miou = (tp[present] / union[present]).mean() if present.any() else torch.tensor(0.0)
        pixel_acc = tp.sum() / cm.sum().clamp(min=1)
        return {"miou": miou, "pixel_acc": pixel_acc}

    def reset(self) -> None:
        super().reset()
        self.confmat.reset()


class Segmentation(Task):
    name = "segmentation"
    kpi = "miou"
    higher_is_better = {"miou": True, "pixel_acc": True}

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

    def head(self, in_channels: int) -> nn.Module:
        return DenseHead(in_channels, self.num_classes)

    def sample_losses(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = target != IGNORE
        pixel = F.cross_entropy(pred.float(), target, ignore_index=IGNORE, reduction="none")
        counts = valid.flatten(1).sum(1)
        return pixel.flatten(1).sum(1) / counts.clamp(min=1), counts > 0

    def metric(self) -> Metric:
        return SegmentationMetric(self.num_classes)

    def __repr__(self) -> str:
        return f"Segmentation(num_classes={self.num_classes})"
