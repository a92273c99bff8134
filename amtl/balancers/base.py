"""The balancer contract: weightings, aggregators and the hyperparameters they declare.

- A :class:`Weighting` turns task losses into per-task *terms*; the training objective is their sum.
  Writing every weighting as a sum of per-task terms (the geometric mean included, see AMTL) is what
  lets any weighting be combined with any gradient aggregator.
- An :class:`Aggregator` turns the per-task gradient matrix ``G`` ``[T, D]`` into one update ``[D]``.
  Most are a function of the Gramian ``G G^T`` only: they return task weights ``alpha`` and the
  update is ``alpha @ G``. That keeps each method a few lines and lets the engine
  (:mod:`amtl.balancers.method`) choose the cheapest way to form the update.
- A :class:`MatrixAggregator` is the one extra capability: it reads the gradient *entries* (sign
  dropout, per-layer blocks, gradients tracked across steps) and returns the update itself. It
  declares it by its base class; the engine then serves it the flat ``[T, D]`` matrix of the shared
  parameters (global under data parallelism) and keeps the Gramian-only path for everyone else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from amtl.distributed import Collectives


class HParamError(ValueError):
    """A hyperparameter value is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class HParam:
    """A hyperparameter declared beside the method that reads it.

    ``low``/``high`` bound the valid range (inclusive); ``log`` says the natural search scale is
    logarithmic; ``choices`` lists valid values of a categorical. ``kind`` is one of
    ``float``, ``int``, ``bool``, ``str`` or ``mapping`` (a ``{task: float}`` dict).
    """

    name: str
    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    def validate(self, value: Any, owner: str = "") -> Any:
        where = f"{owner} hyperparameter '{self.name}'" if owner else f"hyperparameter '{self.name}'"
        if self.kind == "mapping":
            if value is None:
                return None
            if not isinstance(value, Mapping):
                raise HParamError(f"{where} must be a {{task: number}} mapping, got {value!r}")
            return {str(k): float(v) for k, v in value.items()}
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise HParamError(f"{where} must be true or false, got {value!r}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise HParamError(f"{where} must be a string, got {value!r}")
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
                raise HParamError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise HParamError(f"{where} must be a finite number, got {value!r}")
            value = float(value)
        else:  # pragma: no cover - a declaration error, not user input
            raise TypeError(f"unknown hyperparameter kind {self.kind!r}")
        if self.choices is not None and value not in self.choices:
            raise HParamError(f"{where} must be one of {list(self.choices)}, got {value!r}")
        if self.low is not None and value < self.low:
            raise HParamError(f"{where} must be >= {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise HParamError(f"{where} must be <= {self.high}, got {value!r}")
        return value


@dataclass
class StepInputs:
    """Everything a balancer may read in one training step, passed explicitly.

    ``losses`` holds the scalar loss of every task that has at least one label in the batch (tasks
    absent from the batch are left out, so no balancer ever sees a fake zero loss).
    ``sample_losses``/``valid`` give per-sample losses ``[B]`` and label validity ``[B]`` for the
    same tasks; ``sample_ids`` ``[B]`` are dataset instance indices (instance-level methods).
    The parameter lists and ``representation`` are what gradient methods differentiate against.
    ``ranks`` turns this rank's numbers into the global batch's under data parallelism (see
    :class:`~amtl.distributed.Collectives`); in one process its operations are identities.
    """

    losses: dict[str, Tensor]
    sample_losses: dict[str, Tensor] = field(default_factory=dict)
    valid: dict[str, Tensor] = field(default_factory=dict)
    sample_ids: Tensor | None = None
    shared_params: list[nn.Parameter] = field(default_factory=list)
    task_params: list[nn.Parameter] = field(default_factory=list)
    last_shared_params: list[nn.Parameter] = field(default_factory=list)
    representation: Tensor | None = None
    step: int = 0
    epoch: int = 0
    ranks: Collectives = field(default_factory=Collectives)


class _Configurable:
    """Shared hyperparameter handling of weightings and aggregators."""

    name: ClassVar[str] = ""
    hparams: ClassVar[tuple[HParam, ...]] = ()
    #: Facts about the run (:data:`amtl.balancers.method.CONTEXT_KEYS`) the class takes as keyword
    #: arguments of ``__init__``, e.g. the training seed of a stochastic method. Never searched.
    context: ClassVar[tuple[str, ...]] = ()

    def _set_hparams(self, values: Mapping[str, Any]) -> None:
        declared = {h.name: h for h in self.hparams}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            valid = ", ".join(declared) or "none"
            raise HParamError(f"'{self.name}' has no hyperparameter {', '.join(map(repr, unknown))} "
                              f"(valid: {valid})")
        for h in self.hparams:
            setattr(self, h.name, h.validate(values.get(h.name, h.default), self.name))

    def hparam_values(self) -> dict[str, Any]:
        return {h.name: getattr(self, h.name) for h in self.hparams}

    def state_dict(self) -> dict[str, Any]:
        """Learned or accumulated state needed to resume; hyperparameters are not state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"'{self.name}' keeps no state, got keys {sorted(state)}")


class Weighting(_Configurable):
    """Turns task losses into per-task objective terms; subclasses implement :meth:`terms`."""

    #: Whether the method reads validation KPIs (the potentials it needs are run context: ``context``).
    needs_kpis: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[str], **hparams: Any) -> None:
        if not tasks:
            raise HParamError(f"'{self.name}' needs at least one task")
        self.tasks = list(tasks)
        self._set_hparams(hparams)

    def terms(self, step: StepInputs) -> dict[str, Tensor]:
        """Per-task scalar terms whose sum is the objective (keys: the tasks in ``step.losses``)."""
        raise NotImplementedError

    @property
    def weights(self) -> dict[str, float]:
        """Current task weights (the multiplier of each task loss in the objective's gradient)."""
        return {t: 1.0 for t in self.tasks}

    def parameters(self) -> list[Tensor]:
        """Learnable parameters the trainer's optimizer should update (e.g. UW log-variances)."""
        return []

    def after_step(self, step: StepInputs) -> None:
        """Called after the optimizer step (methods with their own update rule act here)."""

    def on_epoch_end(self, mean_train_losses: Mapping[str, float]) -> None:
        """Called with each task's mean training loss over the epoch that just ended."""

    def on_validation(self, kpis: Mapping[str, float]) -> None:
        """Called with each task's validation KPI (higher is better) after every validation."""


class Aggregator(_Configurable):
    """Turns the per-task gradient matrix into one update; subclasses implement :meth:`weights`."""

    #: What the task-specific parameters (heads, and a weighting's own) receive: "plain", each task's
    #: own gradient, or "weighted", alpha_t times it, as back-propagating ``sum_t alpha_t L_t`` gives
    #: (the official Nash-MTL and MGDA code). Aggregators offering both declare :func:`heads_hparam`.
    heads: str = "plain"
    #: The gradient sources (:data:`amtl.balancers.method.SOURCES`) the method can read.
    sources: ClassVar[tuple[str, ...]] = ("shared", "last", "representation")

    def __init__(self, **hparams: Any) -> None:
        self._set_hparams(hparams)

    def weights(self, gramian: Tensor) -> Tensor:
        """Task weights ``alpha`` ``[T]`` from the Gramian ``G G^T`` ``[T, T]``."""
        raise NotImplementedError

    def aggregate(self, grads: Tensor) -> Tensor:
        """The update ``alpha @ G`` ``[D]`` for the gradient matrix ``G`` ``[T, D]``."""
        _check_matrix(grads)
        # The weights come from a float64 Gramian; combine in the gradients' own dtype.
        return self.weights(gramian_of(grads)).to(grads.dtype) @ grads


@dataclass
class GradientMatrix:
    """What a :class:`MatrixAggregator` reads in one step.

    ``grads`` ``[T, D]``: each task's gradient w.r.t. the shared parameters, unscaled, the global
    batch's under data parallelism (every rank holds the same matrix). ``values`` ``[T]``: the terms'
    values (global, detached), e.g. for gradients of ``log L_t``. ``blocks``: the sizes of the
    consecutive parameter tensors that make up ``D`` (per-layer methods). ``batches`` ``[P, T, D]``,
    for aggregators that declare ``independent_batches = P``: each task's gradient on each of P
    disjoint parts of the batch (the mean over the part's labelled samples); ``grads`` is then the
    whole batch's. None elsewhere (and from :meth:`MatrixAggregator.aggregate`). ``gramian``: the
    float64 ``grads @ grads.T`` the engine already formed (None from ``aggregate``), so a method
    that needs it does not multiply the matrix again.
    """

    grads: Tensor
    tasks: list[str]
    values: Tensor
    blocks: list[int]
    batches: Tensor | None = None
    gramian: Tensor | None = None


@dataclass
class Combined:
    """A :class:`MatrixAggregator`'s answer: the update ``[D]`` and the task weights ``[T]`` it reports.

    ``weights`` are what the leaderboard and weight plots show and, for ``heads = "weighted"``, what
    heads are scaled by; ``head_weights`` overrides the latter where the two differ (DB-MTL).
    """

    update: Tensor
    weights: Tensor
    head_weights: Tensor | None = None


class MatrixAggregator(Aggregator):
    """An aggregator that reads gradient entries, not only their Gramian; implements :meth:`combine`.

    It reads all shared parameters (``source='shared'``), as the reference code of every such
    method does. State that follows single tasks is kept per task name, so partially labelled
    batches (a task absent from a step) leave other tasks' state untouched.
    """

    sources = ("shared",)
    #: More than 1: the method needs gradients from that many independent mini-batches (MoDo,
    #: SDMGrad). The engine splits each batch into that many disjoint parts, sample ``i`` going to
    #: part ``(index_i + step) mod P`` (the same on every rank, and a different part every step), and
    #: serves ``GradientMatrix.batches``; it needs per-sample losses and sample ids (amtl's Trainer).
    independent_batches: ClassVar[int] = 1

    def combine(self, matrix: GradientMatrix) -> Combined:
        raise NotImplementedError

    def weights(self, gramian: Tensor) -> Tensor:
        raise TypeError(f"'{self.name}' reads gradient entries, not only their Gramian: call combine() or aggregate()")

    def aggregate(self, grads: Tensor) -> Tensor:
        """``combine`` on ``grads`` as one parameter block, with unit term values."""
        _check_matrix(grads)
        tasks = [f"task{i}" for i in range(grads.shape[0])]
        ones = torch.ones(grads.shape[0], dtype=grads.dtype, device=grads.device)
        return self.combine(GradientMatrix(grads, tasks, ones, [grads.shape[1]])).update


def _check_matrix(grads: Tensor) -> None:
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise ValueError(f"expected a [T, D] gradient matrix with T >= 1, got shape {tuple(grads.shape)}")
    if not torch.isfinite(grads).all():
        raise ValueError("gradient matrix contains inf or nan")


def heads_hparam(default: str) -> HParam:
    """The ``heads`` hyperparameter (see :attr:`Aggregator.heads`) with this method's default."""
    return HParam("heads", "str", default, choices=("plain", "weighted"),
                  doc="task-specific parameters get their task's gradient (plain) or alpha_t times it (weighted)")


def gramian_of(grads: Tensor) -> Tensor:
    """``G G^T`` in float64 for the small T x T solves (the matmul itself stays in G's dtype)."""
    return (grads @ grads.T).double()


Rows = list[list[Tensor]]  # rows[t][i]: task t's gradient w.r.t. parameter i


def pairwise_gramian(rows: Rows) -> Tensor:
    """``G G^T`` in float64 from per-parameter dot products (no ``[T, D]`` copy)."""
    t = len(rows)
    ref = rows[0][0]
    entries = {}
    for i in range(t):
        for j in range(i, t):
            entries[i, j] = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1))
                                         for a, b in zip(rows[i], rows[j])]).sum()
    flat = torch.stack([entries[min(i, j), max(i, j)] for i in range(t) for j in range(t)])
    return flat.reshape(t, t).to(device=ref.device, dtype=torch.float64)


def combine_rows(rows: Rows, alpha: Sequence[float]) -> list[Tensor]:
    """``sum_t alpha_t rows[t]`` per parameter, with fused multi-tensor ops, *in place* in ``rows[0]``.

    The rows are per-step scratch owned by the caller and read for the last time here, so reusing
    the first task's buffers saves one gradient-sized allocation per parameter.
    """
    update = rows[0]
    torch._foreach_mul_(update, alpha[0])
    for row, a in zip(rows[1:], alpha[1:]):
        torch._foreach_add_(update, row, alpha=a)
    return update
