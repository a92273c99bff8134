"""Multi-task models by name: a shared encoder and one head per task (``register_model`` for more)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from amtl.models.backbones import BACKBONES, TorchvisionEncoder
from amtl.models.base import MultiTaskModel
from amtl.models.small import SmallEncoderDecoder
from amtl.registry import Registry
from amtl.tasks.base import Task


@dataclass(frozen=True)
class ModelOptions:
    """What a model builder is told besides the tasks (the training options of the same names)."""

    width: int | None = None                  # --width; None: the model's own default
    weights_path: str | Path | None = None    # --weights-path: pretrained trunk weights


#: ``build(tasks, options) -> MultiTaskModel``: the tasks' heads sit on the model's shared encoder.
ModelBuilder = Callable[[Sequence[Task], ModelOptions], MultiTaskModel]

MODELS_REGISTRY: Registry[ModelBuilder] = Registry("model")


class ModelContractError(ValueError):
    """A model builder broke the :class:`MultiTaskModel` contract; the message says how."""


def register_model(name: str, build: ModelBuilder) -> ModelBuilder:
    """Register ``build(tasks, options: ModelOptions) -> MultiTaskModel`` under ``name``."""
    return MODELS_REGISTRY.add(name, build)


def build_model(name: str, tasks: Sequence[Task], width: int | None = None,
                weights_path: str | Path | None = None) -> MultiTaskModel:
    """``small`` (default, CPU-friendly), a torchvision trunk from ``BACKBONES``, or a registered model."""
    model = MODELS_REGISTRY.get(name)(tasks, ModelOptions(width, weights_path))
    if not isinstance(model, MultiTaskModel):
        raise ModelContractError(f"model '{name}': its builder returned {type(model).__name__}; return an "
                                 f"amtl MultiTaskModel(encoder, heads, last_shared)")
    wanted = [t.name for t in tasks]
    if sorted(model.tasks) != sorted(wanted):
        raise ModelContractError(f"model '{name}' has heads for {', '.join(model.tasks) or 'no task'}, the run "
                                 f"trains {', '.join(wanted)}; build one head per task (task.head(channels))")
    if not model.shared_parameters():
        raise ModelContractError(f"model '{name}' has no trainable shared parameters; its encoder is what the "
                                 f"tasks share")
    return model


def with_heads(encoder: SmallEncoderDecoder | TorchvisionEncoder, tasks: Sequence[Task]) -> MultiTaskModel:
    """``encoder`` with every task's head on its representation (``encoder.out_channels`` wide)."""
    return MultiTaskModel(encoder, {t.name: t.head(encoder.out_channels) for t in tasks}, last_shared=encoder.last)


def _small(tasks: Sequence[Task], o: ModelOptions) -> MultiTaskModel:
    if o.weights_path is not None:
        raise ValueError("the 'small' model has no pretrained weights; drop weights_path")
    return with_heads(SmallEncoderDecoder(o.width or 32), tasks)


def _torchvision(name: str) -> ModelBuilder:
    return lambda tasks, o: with_heads(TorchvisionEncoder(name, o.width or 64, o.weights_path), tasks)


register_model("small", _small)
for _name in BACKBONES:
    register_model(_name, _torchvision(_name))
MODELS = ("small", *BACKBONES)  # the built-in models

__all__ = ["BACKBONES", "MODELS", "MODELS_REGISTRY", "ModelContractError", "ModelOptions", "MultiTaskModel",
           "build_model", "register_model", "with_heads"]
