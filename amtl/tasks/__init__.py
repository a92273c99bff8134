"""Tasks: each bundles a head, a per-sample loss, split-level metrics and the KPI balancers read.

Metric keys are ``task/metric`` everywhere outside a task (e.g. ``segmentation/miou``,
``depth/abs_err``, ``normal/within_11.25``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from amtl.tasks.base import Task
from amtl.tasks.depth import Depth
from amtl.tasks.detection import Detection
from amtl.tasks.normal import Normal
from amtl.tasks.segmentation import Segmentation

_FACTORIES: dict[str, Callable[..., Task]] = {
    "segmentation": lambda num_classes, **_: Segmentation(num_classes),
    "depth": lambda **_: Depth(),
    "normal": lambda **_: Normal(),
    "detection": lambda num_detection_classes=0, **_: Detection(num_detection_classes),
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Register a task factory; it receives dataset facts such as ``num_classes`` and
    ``num_detection_classes`` as keywords."""
    _FACTORIES[name] = factory


def task_names() -> list[str]:
    return sorted(_FACTORIES)


def make_task(name: str, **dataset_facts: Any) -> Task:
    """Build a task by name, e.g. ``make_task("segmentation", num_classes=13)``."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(task_names())})")
    return _FACTORIES[name](**dataset_facts)


def directions(tasks: Sequence[Task]) -> dict[str, bool]:
    """``{"task/metric": higher_is_better}`` for every metric of ``tasks``."""
    return {f"{t.name}/{m}": hib for t in tasks for m, hib in t.higher_is_better.items()}


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, float],
            higher_is_better: Mapping[str, bool]) -> float:
    """Delta-m (Maninis et al., 2019), in percent; lower is better.

    ``100 / K * sum_k (-1)^{d_k} (M_k - B_k) / B_k`` over the K metrics in ``higher_is_better``,
    with ``d_k = 1`` when higher is better; ``B`` are the single-task baselines. A multi-task model
    that matches every baseline scores 0; improving on them gives a negative value. As in CAGrad and
    Nash-MTL, every metric of every task counts once (so a task with more metrics weighs more).
    """
    keys = list(higher_is_better)
    missing = [k for k in keys if k not in metrics or k not in baselines]
    if missing:
        raise KeyError(f"Delta-m needs metrics and baselines for {missing}")
    if not keys:
        raise ValueError("Delta-m needs at least one metric")
    total = 0.0
    for k in keys:
        base = baselines[k]
        if base == 0:
            raise ValueError(f"baseline for '{k}' is 0; Delta-m divides by it")
        sign = -1.0 if higher_is_better[k] else 1.0
        total += sign * (metrics[k] - base) / abs(base)
    return 100.0 * total / len(keys)


__all__ = ["Depth", "Detection", "Normal", "Segmentation", "Task", "delta_m", "directions", "make_task",
           "register_task", "task_names"]
