"""Instance-level task parameters (ILTP): a learned weight per training instance and task.

Vasu, Saxena & Tuzel, "Instance-Level Task Parameters: A Robust Multi-task Weighting Framework",
arXiv 2106.06129, 2021 (no public code; the design below is ours, after the paper's description
and the authors' earlier "Data Parameters", NeurIPS 2019).

Design:

- Every instance i and task t has a parameter ``s_it`` (initialised to 0) and weight
  ``exp(-s_it)``: an instance-level uncertainty weighting. The per-instance objective is
  ``exp(-s_it) l_it + s_it + (weight_decay / 2) s_it^2``; for fixed loss its minimiser solves
  ``exp(-s) l = 1 + weight_decay * s``, so persistently high-loss instances (typically corrupt labels)
  are down-weighted, well-fitted ones mildly up-weighted, and the quadratic pull toward the initial
  value bounds the up-weighting (``s >= -1/weight_decay``).
- The model sees the task term ``mean_{i valid} exp(-s_it) l_it`` (weights detached), so its gradient
  is exactly the instance-weighted task loss. ``step.sample_losses``/``step.valid``/``step.sample_ids``
  are required; the task term is the mean over valid samples of the per-sample losses. Under data
  parallelism each rank gathers the global batch's ids and losses, and updates every instance in it,
  so the tables of all ranks stay identical.
- The parameters live in an ``nn.Embedding(num_instances, T, sparse=True)`` with its own
  :class:`torch.optim.SparseAdam` (lr ``w_lr``): :meth:`after_step` updates only the rows of the
  instances in the batch (the regulariser too, so unseen instances stay at their initial value).
  Adam makes the step size independent of each task's loss scale. They are not in
  :meth:`parameters`: the trainer's optimizer must not touch them.
- ``num_instances`` (the training-set size; ``sample_ids`` index it) is a context keyword.

After training :meth:`instance_scores` gives each instance's weight for a task; low weights flag
likely corrupt labels.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from amtl.balancers.base import HParam, HParamError, StepInputs, Weighting
from amtl.balancers.method import register_weighting
from amtl.balancers.weightings._common import move_optimizer_state


@register_weighting
class InstanceLevelTaskParameters(Weighting):
    name = "iltp"
    context = ("num_instances",)
    hparams = (
        HParam("w_lr", "float", 0.1, low=1e-4, high=10.0, log=True,
               doc="SparseAdam learning rate of the instance parameters"),
        HParam("weight_decay", "float", 1.0, low=0.0, high=100.0,
               doc="strength of the quadratic pull of each instance parameter toward 0 (weight 1)"),
    )

    def __init__(self, tasks: Sequence[str], num_instances: int | None = None, **hparams: Any) -> None:
        super().__init__(tasks, **hparams)
        if num_instances is None or int(num_instances) < 1:
            raise HParamError(f"'{self.name}' needs the context keyword num_instances "
                              f"(training-set size, >= 1), got {num_instances!r}")
        self.num_instances = int(num_instances)
        self._table = nn.Embedding(self.num_instances, len(self.tasks), sparse=True)
        nn.init.zeros_(self._table.weight)
        self._opt = torch.optim.SparseAdam(list(self._table.parameters()), lr=self.w_lr)
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (task index, ids, detached losses)
        self._batch_weights: dict[str, float] = {}

    def _to(self, device: torch.device) -> None:
        if self._table.weight.device != device:
            self._table.to(device)
            move_optimizer_state(self._opt, device)

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        if step.sample_ids is None:
            raise ValueError("'iltp' needs StepInputs.sample_ids (dataset instance indices)")
        tasks = list(step.losses)
        if not tasks:
            return {}
        for t in tasks:
            if t not in step.sample_losses:
                raise ValueError(f"'iltp' needs StepInputs.sample_losses[{t!r}] (per-sample losses)")
        local = [(step.sample_losses[t].reshape(-1), self._valid(step, t)) for t in tasks]
        self._to(local[0][0].device)
        ids, losses, valid = self._global_batch(step.sample_ids, local, step)
        out: dict[str, Tensor] = {}
        self._pending, self._batch_weights = [], {}
        own_ids = step.sample_ids.reshape(-1).to(local[0][0].device)
        for k, (t, (per, ok)) in enumerate(zip(tasks, local)):
            j = self.tasks.index(t)
            with torch.no_grad():
                w = torch.exp(-self._table.weight[own_ids[ok], j]).to(per.dtype)
            # The mean over the global batch's valid samples, scaled like the trainer's losses (this
            # rank's share times the number of ranks); invalid entries may hold garbage (nan), so
            # they are dropped, not multiplied by 0.
            count = valid[:, k].sum().clamp_min(1).to(per.dtype)
            out[t] = (w * per[ok]).sum() * step.ranks.size / count
            if per.requires_grad:
                self._pending.append((j, ids[valid[:, k]], losses[valid[:, k], k]))
            with torch.no_grad():
                self._batch_weights[t] = torch.exp(-self._table.weight[ids[valid[:, k]], j])
        return out

    @staticmethod
    def _valid(step: StepInputs, task: str) -> Tensor:
        per = step.sample_losses[task].reshape(-1)
        valid = step.valid.get(task)
        return torch.ones_like(per, dtype=torch.bool) if valid is None else valid.reshape(-1).bool()

    @staticmethod
    def _global_batch(sample_ids: Tensor, local: list[tuple[Tensor, Tensor]],
                      step: StepInputs) -> tuple[Tensor, Tensor, Tensor]:
        """Instance ids ``[B]``, detached losses ``[B, T]`` and validity ``[B, T]`` of the global batch.

        Every rank updates the instances of *all* ranks, with identical inputs, so the tables stay
        identical (one gather of a ``[b, 1 + 2T]`` float64 buffer; ids are exact in float64).
        """
        device = local[0][0].device
        rows = [sample_ids.reshape(-1, 1).to(device, torch.float64)]
        rows += [torch.where(ok, per.detach(), 0).to(torch.float64)[:, None] for per, ok in local]
        rows += [ok.to(torch.float64)[:, None] for _, ok in local]
        gathered = step.ranks.cat(torch.cat(rows, dim=1))
        t = len(local)
        return (gathered[:, 0].long(), gathered[:, 1:1 + t].to(local[0][0].dtype),
                gathered[:, 1 + t:] > 0.5)

    def after_step(self, step: StepInputs) -> None:
        if not self._pending:
            return
        self._opt.zero_grad()
        objective = 0.0
        for j, ids, per in self._pending:
            s = self._table(ids)[:, j]
            # Summed, not averaged: each instance's gradient does not depend on the batch size.
            objective = objective + (torch.exp(-s) * per.to(s.dtype) + s + 0.5 * self.weight_decay * s * s).sum()
        objective.backward()
        self._opt.step()
        self._pending = []

    @property
    def weights(self) -> dict[str, float]:
        """Mean instance weight ``exp(-s)`` of each task over the last batch (over all instances
        for tasks absent from it)."""
        out = {}
        for j, t in enumerate(self.tasks):
            w = self._batch_weights.get(t)
            if w is None or w.numel() == 0:
                w = torch.exp(-self._table.weight.detach()[:, j])
            out[t] = float(w.mean())
        return out

    def instance_scores(self, task: str) -> Tensor:
        """Per-instance weight ``exp(-s_it)`` ``[num_instances]`` (CPU); low = likely corrupt label."""
        return torch.exp(-self._table.weight.detach()[:, self.tasks.index(task)]).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"table": self._table.weight.detach().cpu().clone(), "optimizer": self._opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["table"].shape) != tuple(self._table.weight.shape):
            raise ValueError(f"'iltp' state has table shape {tuple(state['table'].shape)}, "
                             f"expected {tuple(self._table.weight.shape)}")
        with torch.no_grad():
            self._table.weight.copy_(state["table"])
        self._opt.load_state_dict(state["optimizer"])
        move_optimizer_state(self._opt, self._table.weight.device)
        self._batch_weights = {}
