"""Which samples carry which task's label: per-task counts and the task-balanced sampling weights.

Datasets answer ``task_labels(tasks) -> {task: bool [N]}`` from their indexes (no image is loaded);
:func:`task_labels` also looks through ``Subset`` and, for a dataset without that method, reads each
sample's ``has``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

SAMPLERS = ("random", "task-balanced")


def task_labels(dataset: Dataset, tasks: Sequence[str]) -> dict[str, Tensor]:
    """``{task: bool [N]}``: whether sample ``i`` of ``dataset`` carries ``task``'s label."""
    if isinstance(dataset, Subset):
        inner = task_labels(dataset.dataset, tasks)
        positions = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return {t: inner[t][positions] for t in tasks}
    if hasattr(dataset, "task_labels"):
        return dataset.task_labels(tasks)
    rows = [dataset[i]["has"] for i in range(len(dataset))]  # slow path: loads every sample once
    return {t: torch.tensor([bool(r.get(t, False)) for r in rows], dtype=torch.bool) for t in tasks}


def label_counts(dataset: Dataset, tasks: Sequence[str]) -> dict[str, int]:
    """Number of samples of ``dataset`` that carry each task's label."""
    return {t: int(v.sum()) for t, v in task_labels(dataset, tasks).items()}


def task_balanced_weights(labels: Mapping[str, Tensor]) -> Tensor:
    """Sampling weights ``[N]`` under which every task's labels are drawn about equally often.

    A sample weighs ``1 / count`` of the rarest task it labels. When each task's labelled samples
    form one group (the partially annotated setting: a source labels its tasks on all its images),
    every group then gets the same share of the draws, so every task is labelled in the same
    fraction of samples whatever the sources' sizes. Samples without any label get weight 0.
    """
    if not labels:
        raise ValueError("no tasks to balance")
    table = torch.stack([v.bool() for v in labels.values()])  # [T, N]
    counts = table.sum(dim=1, keepdim=True).double()
    inverse = torch.where(table, 1.0 / counts.clamp(min=1), torch.zeros((), dtype=torch.float64))
    weights = inverse.max(dim=0).values
    if not bool((weights > 0).any()):
        raise ValueError("no sample carries a label of any task; nothing to sample")
    return weights


def describe_counts(counts: Mapping[str, int], total: int) -> str:
    """``segmentation 750/1000, depth 250/1000``: per-task label counts of a split."""
    return ", ".join(f"{t} {c}/{total}" for t, c in counts.items())
