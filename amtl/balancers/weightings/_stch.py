"""STCH (Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024):
after a warm-up, minimise the smooth maximum of the tasks' log-losses relative to a nadir point,
``T * mu * log sum_t exp(log(L_t / nadir_t) / mu)`` (as ``mu -> 0``, the worst task's; large ``mu``
spreads the weight evenly). During the warm-up the objective is ``sum_t log L_t``; the nadir is each
task's mean training loss over the last warm-up epoch.

Facts from LibMTL's ``STCH`` (adapted from the official code, Xi-L/STCH): ``mu = 1``, the log of
``L + 1e-20``, the factor T. LibMTL counts its ``STCH_warmup_epoch`` from 0 and takes the nadir in
the epoch after it, so its default 4 is ``warmup_epochs = 5`` here; the default here is 1 (a sweep's
budget is a few epochs). A task without a nadir (unlabelled through the whole last warm-up epoch)
uses 1. The objective is written as exact-share terms, so STCH combines with any aggregator.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import HParam, StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import exact_share_terms

LOG_EPS = 1e-20


@register_weighting
class SmoothTchebycheff(Weighting):
    name = "stch"
    hparams = (
        HParam("mu", "float", 1.0, low=1e-3, high=100.0, log=True,
               doc="smoothing: small values follow the worst task (Tchebycheff), large ones weigh all alike"),
        HParam("warmup_epochs", "int", 1, low=1, high=1000,
               doc="epochs of sum-of-log-losses before STCH; the last one's mean losses are the nadir"),
    )
    mu: float
    warmup_epochs: int

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        self._epochs_done = 0
        self._nadir: dict[str, float] | None = None
        # Tensors, read as floats only when asked: float() here would sync the GPU every step.
        self._multipliers: dict[str, Tensor | float] = {t: 1.0 for t in self.tasks}

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        present = list(step.losses)
        if self._nadir is None:
            def objective(losses: Tensor) -> Tensor:
                return torch.log(losses + LOG_EPS).sum()
        else:
            nadir = torch.tensor([self._nadir.get(t, 1.0) for t in present], dtype=torch.float64)

            def objective(losses: Tensor) -> Tensor:
                relative = torch.log(losses / nadir.to(losses.device, losses.dtype) + LOG_EPS)
                return len(self.tasks) * self.mu * torch.logsumexp(relative / self.mu, dim=0)
        terms, coef = exact_share_terms(step.losses, objective)
        self._multipliers = dict(zip(present, coef.detach()))
        return terms

    @property
    def weights(self) -> dict[str, float]:
        """Gradient multipliers ``d obj / d L_t`` of the last step (0 for tasks absent from it)."""
        return {t: float(self._multipliers.get(t, 0.0)) for t in self.tasks}

    def on_epoch_end(self, mean_train_losses: Mapping[str, float]) -> None:
        self._epochs_done += 1
        if self._nadir is None and self._epochs_done >= self.warmup_epochs:
            self._nadir = {t: float(v) for t, v in mean_train_losses.items()
                           if t in self.tasks and math.isfinite(float(v)) and float(v) > 0}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_done": self._epochs_done, "nadir": self._nadir}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._epochs_done = int(state["epochs_done"])
        self._nadir = dict(state["nadir"]) if state["nadir"] is not None else None
