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

from amtl.registry import Registry

TASKS: Registry[Callable[..., Task]] = Registry("task")


class TaskContractError(ValueError):
    """A task object breaks the :class:`Task` contract; the message says which part."""


def register_task(name: str, factory: Callable[..., Task]) -> Callable[..., Task]:
    """Register a task under ``name``: ``factory(**dataset_facts)`` returns a :class:`Task` whose
    ``name`` is ``name``. Dataset facts (``num_classes``, ``num_detection_classes``) arrive as
    keywords; a factory takes what it needs and ``**_`` for the rest. A class is a factory too."""
    return TASKS.add(name, factory)


def task_names() -> list[str]:
    return TASKS.names()


def make_task(name: str, **dataset_facts: Any) -> Task:
    """Build a task by name, e.g. ``make_task("segmentation", num_classes=13)``."""
    try:
        task = TASKS.get(name)(**dataset_facts)
    except TypeError as e:  # an abstract Task subclass, or a factory that rejects the facts
        raise TaskContractError(f"task '{name}' cannot be built: {e}") from e
    check_task(name, task)
    return task


def check_task(name: str, task: Any) -> None:
    """Raise :class:`TaskContractError` unless ``task`` keeps the :class:`Task` contract."""
    if not isinstance(task, Task):
        raise TaskContractError(f"task '{name}': its factory returned {type(task).__name__}, not an amtl Task")
    if getattr(task, "name", None) != name:
        raise TaskContractError(f"task '{name}': the object's name is {getattr(task, 'name', None)!r}; "
                                f"set name = {name!r} on the class")
    directions_ = getattr(task, "higher_is_better", None)
    if not isinstance(directions_, dict) or not directions_:
        raise TaskContractError(f"task '{name}': higher_is_better must map every metric to its direction")
    if getattr(task, "kpi", None) not in directions_:
        raise TaskContractError(f"task '{name}': its kpi {getattr(task, 'kpi', None)!r} is not one of its metrics "
                                f"({', '.join(directions_)}); set kpi to one of them")
    if not directions_[task.kpi]:
        raise TaskContractError(f"task '{name}': its kpi '{task.kpi}' must be higher-is-better "
                                f"(AMTL and DTP read it as an achievement)")


register_task("segmentation", lambda num_classes, **_: Segmentation(num_classes))
register_task("depth", lambda **_: Depth())
register_task("normal", lambda **_: Normal())
register_task("detection", lambda num_detection_classes=0, **_: Detection(num_detection_classes))


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


def task_deltas(metrics: Mapping[str, float], baselines: Mapping[str, float],
                higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    """Each task's own Delta-m (over its metrics in ``higher_is_better``, keys ``task/metric``): where a
    multi-task model's Delta-m comes from. The metric-count-weighted mean of these is :func:`delta_m`."""
    by_task: dict[str, dict[str, bool]] = {}
    for key, hib in higher_is_better.items():
        by_task.setdefault(key.split("/", 1)[0], {})[key] = hib
    return {task: delta_m(metrics, baselines, keys) for task, keys in by_task.items()}


__all__ = ["Depth", "Detection", "Normal", "Segmentation", "TASKS", "Task", "TaskContractError", "check_task",
           "delta_m", "directions", "make_task", "register_task", "task_deltas", "task_names"]
