"""Everything a plugin needs, in one import: the contracts and the calls that register names.

A plugin is a module or ``.py`` file that calls these on import; load it with ``--plugin`` (or an
``amtl_sweep.plugins`` entry point) and use its names like built-in ones. See docs/extending.md and
``benchmarks/multifashion/multifashion.py`` for a complete example.
"""
from amtl.balancers import (Aggregator, HParam, StepInputs, Weighting, register_aggregator, register_alias,
                            register_weighting)
from amtl.data.registry import DataOptions, DatasetConfigError, DataSplits, register_dataset
from amtl.models import ModelOptions, register_model
from amtl.models.base import MultiTaskModel
from amtl.tasks import Task, register_task

__all__ = ["Aggregator", "DataOptions", "DataSplits", "DatasetConfigError", "HParam", "ModelOptions",
           "MultiTaskModel", "StepInputs", "Task", "Weighting", "register_aggregator", "register_alias",
           "register_dataset", "register_model", "register_task", "register_weighting"]
