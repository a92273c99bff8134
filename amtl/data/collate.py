"""Batch collation that keeps variable-length targets (detection boxes) as lists."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

#: Targets that differ in size between samples; collated as lists instead of stacked.
LIST_KEYS = frozenset({"detection"})


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep ``LIST_KEYS`` targets as per-sample lists, and ``has`` as bool tensors."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in LIST_KEYS:
            batch[key] = values
        elif key == "has":
            batch[key] = {t: torch.tensor([bool(v[t]) for v in values]) for t in values[0]}
        else:
            batch[key] = default_collate(values)
    return batch
