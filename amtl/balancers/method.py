"""A method = a weighting + an optional aggregator + a gradient source; the registry builds one by name.

The engine in :meth:`Method.backward` fills ``.grad`` of every trainable parameter:

- weighting only: one backward of ``sum(terms)``; no extra cost over plain summation.
- with an aggregator, ``source`` picks the gradients the aggregator sees:
  ``shared`` (all shared parameters; exact), ``last`` (the last shared layer's parameters) or
  ``representation`` (the shared representation; the "UB" variants). The aggregator turns their
  Gramian into task weights ``alpha``. Task-specific heads always receive their own plain task
  gradients; shared parameters receive ``sum_t alpha_t grad(term_t)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from amtl.balancers.base import Aggregator, HParam, HParamError, StepInputs, Weighting, gramian_of

SOURCES = ("shared", "last", "representation")
#: Keyword arguments of :func:`make` that describe the run rather than the method.
CONTEXT_KEYS = ("num_instances",)
SOURCE_HPARAM = HParam("source", "str", "shared", choices=SOURCES,
                       doc="gradients the aggregator sees: all shared parameters, the last shared "
                           "layer, or the shared representation (UB)")

_WEIGHTINGS: dict[str, type[Weighting]] = {}
_AGGREGATORS: dict[str, type[Aggregator]] = {}
#: Names that stand for a fixed weighting+aggregator pair (e.g. ``imtl`` = IMTL-L + IMTL-G).
_ALIASES: dict[str, tuple[str, str | None]] = {}


def register_weighting(cls: type[Weighting]) -> type[Weighting]:
    if not cls.name or cls.name in _WEIGHTINGS or cls.name in _AGGREGATORS:
        raise ValueError(f"weighting name {cls.name!r} is empty or taken")
    _WEIGHTINGS[cls.name] = cls
    return cls


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    if not cls.name or cls.name in _WEIGHTINGS or cls.name in _AGGREGATORS:
        raise ValueError(f"aggregator name {cls.name!r} is empty or taken")
    _AGGREGATORS[cls.name] = cls
    return cls


def register_alias(name: str, weighting: str, aggregator: str | None) -> None:
    _ALIASES[name] = (weighting, aggregator)


@dataclass
class StepReport:
    """What one balancer step tells the trainer: task weights and gradient diagnostics."""

    weights: dict[str, float]
    cosines: dict[str, float] = field(default_factory=dict)  # "a|b" -> cosine of task gradients
    condition_number: float | None = None                    # of the Gramian G G^T


def _resolve(name: str) -> tuple[str, str | None]:
    """``amtl`` -> (amtl, None); ``pcgrad`` -> (ew, pcgrad); ``amtl+pcgrad`` -> (amtl, pcgrad)."""
    name = name.strip().lower()
    if name in _ALIASES:
        return _ALIASES[name]
    if "+" in name:
        left, _, right = name.partition("+")
        if left not in _WEIGHTINGS:
            raise HParamError(f"unknown weighting '{left}' in '{name}' (weightings: {', '.join(sorted(_WEIGHTINGS))})")
        if right not in _AGGREGATORS:
            raise HParamError(f"unknown aggregator '{right}' in '{name}' (aggregators: {', '.join(sorted(_AGGREGATORS))})")
        return left, right
    if name in _WEIGHTINGS:
        return name, None
    if name in _AGGREGATORS:
        return "ew", name
    raise HParamError(f"unknown balancer '{name}' (known: {', '.join(names())}, or weighting+aggregator)")


def names() -> list[str]:
    """Every single method name (combinations ``weighting+aggregator`` are also accepted)."""
    return sorted(set(_WEIGHTINGS) | set(_AGGREGATORS) | set(_ALIASES))


def hparam_specs(name: str) -> dict[str, HParam]:
    """Hyperparameters of a method name, including ``source`` when it has an aggregator."""
    weighting, aggregator = _resolve(name)
    specs = {h.name: h for h in _WEIGHTINGS[weighting].hparams}
    if aggregator is not None:
        for h in _AGGREGATORS[aggregator].hparams:
            if h.name in specs:
                raise TypeError(f"hyperparameter {h.name!r} declared by both {weighting} and {aggregator}")
            specs[h.name] = h
        specs["source"] = SOURCE_HPARAM
    return specs


def registry() -> dict[str, dict[str, HParam]]:
    """Every method name with its hyperparameter specs."""
    return {n: hparam_specs(n) for n in names()}


def make(name: str, tasks: Sequence[str], **hparams: Any) -> "Method":
    """Build a method by name, e.g. ``make("amtl+pcgrad", tasks=["segmentation", "depth"], focusing=2)``.

    Each hyperparameter goes to the component that declares it; an unknown one is an error.
    Keyword arguments that are not hyperparameters but context (``num_instances`` for instance-level
    methods) are passed to weightings that accept them.
    """
    weighting_name, aggregator_name = _resolve(name)
    specs = hparam_specs(name)
    source = hparams.pop("source", "shared")
    w_cls = _WEIGHTINGS[weighting_name]
    # Context (facts about the run, not searchable) is offered to every method; only methods that
    # declare a key in ``context`` receive it.
    offered = {k: hparams.pop(k) for k in CONTEXT_KEYS if k in hparams}
    context = {k: v for k, v in offered.items() if k in getattr(w_cls, "context", ())}
    unknown = sorted(set(hparams) - set(specs))
    if unknown:
        raise HParamError(f"'{name}' has no hyperparameter {', '.join(map(repr, unknown))} "
                          f"(valid: {', '.join(specs) or 'none'})")
    w_kwargs = {k: v for k, v in hparams.items() if k in {h.name for h in w_cls.hparams}}
    weighting = w_cls(tasks, **w_kwargs, **context)
    aggregator = None
    if aggregator_name is not None:
        a_cls = _AGGREGATORS[aggregator_name]
        aggregator = a_cls(**{k: v for k, v in hparams.items() if k in {h.name for h in a_cls.hparams}})
        source = SOURCE_HPARAM.validate(source, name)
    elif source != "shared":
        raise HParamError(f"'{name}' has no gradient aggregator, so 'source' does not apply")
    return Method(name, weighting, aggregator, source)


class Method:
    """A weighting, an optional aggregator and the gradient source the aggregator reads."""

    def __init__(self, name: str, weighting: Weighting, aggregator: Aggregator | None = None,
                 source: str = "shared") -> None:
        self.name = name
        self.weighting = weighting
        self.aggregator = aggregator
        self.source = source
        self.tasks = weighting.tasks
        self._last_alpha: dict[str, float] | None = None
        #: Hook applied to the per-task gradient matrix before aggregation (DDP all-reduce goes here).
        self.reduce_task_grads: Callable[[Tensor], Tensor] | None = None

    # -- events forwarded to the weighting ---------------------------------------------------
    def parameters(self) -> list[Tensor]:
        return self.weighting.parameters()

    def after_step(self, step: StepInputs) -> None:
        self.weighting.after_step(step)

    def on_epoch_end(self, mean_train_losses: Mapping[str, float]) -> None:
        self.weighting.on_epoch_end(mean_train_losses)

    def on_validation(self, kpis: Mapping[str, float]) -> None:
        self.weighting.on_validation(kpis)

    @property
    def weights(self) -> dict[str, float]:
        """Effective task weights: the weighting's weights times the aggregator's alphas."""
        w = self.weighting.weights
        if self._last_alpha is None:
            return dict(w)
        return {t: w[t] * self._last_alpha.get(t, 0.0) for t in w}

    @property
    def needs_kpis(self) -> bool:
        return self.weighting.needs_kpis

    @property
    def needs_potentials(self) -> bool:
        return self.weighting.needs_potentials

    def state_dict(self) -> dict[str, Any]:
        state = {"weighting": self.weighting.state_dict()}
        if self.aggregator is not None:
            state["aggregator"] = self.aggregator.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weighting.load_state_dict(state.get("weighting", {}))
        if self.aggregator is not None:
            self.aggregator.load_state_dict(state.get("aggregator", {}))

    # -- the engine ------------------------------------------------------------------------
    def backward(self, step: StepInputs, diagnose: bool = False) -> StepReport:
        """Fill ``.grad`` of model and weighting parameters for one step.

        ``diagnose`` asks for gradient cosines and the Gramian's condition number even when the
        method has no aggregator (then measured on the representation: cheap, heads only).
        """
        terms = self.weighting.terms(step)
        tasks = list(terms)
        if self.aggregator is None:
            report = StepReport(weights=self.weights)
            if diagnose and step.representation is not None and len(tasks) > 1:
                grads = _flat_grads(terms, [step.representation], retain_graph=True)
                _fill_diagnostics(report, tasks, gramian_of(grads))
            torch.stack(list(terms.values())).sum().backward()
            return report

        own = step.task_params + [p for p in self.weighting.parameters() if p.requires_grad]
        objective = torch.stack(list(terms.values())).sum()
        if self.source == "shared":
            grads = _flat_grads(terms, step.shared_params, retain_graph=True)
        elif self.source == "last":
            grads = _flat_grads(terms, step.last_shared_params, retain_graph=True)
        else:
            if step.representation is None:
                raise ValueError("source='representation' needs StepInputs.representation")
            grads = _flat_grads(terms, [step.representation], retain_graph=True)
        if self.reduce_task_grads is not None:
            grads = self.reduce_task_grads(grads)
        gramian = gramian_of(grads)
        alpha = self.aggregator.weights(gramian).to(grads.dtype)
        self._last_alpha = {t: float(a) for t, a in zip(tasks, alpha)}
        report = StepReport(weights=self.weights)
        _fill_diagnostics(report, tasks, gramian)

        # Heads (and the weighting's own parameters) get their plain gradients.
        if own:
            torch.autograd.backward(objective, inputs=own, retain_graph=True)
        if self.source == "shared":
            _assign_flat(step.shared_params, alpha @ grads)
        else:
            weighted = torch.stack([a * terms[t] for a, t in zip(alpha, tasks)]).sum()
            torch.autograd.backward(weighted, inputs=step.shared_params)
        return report


def _flat_grads(terms: Mapping[str, Tensor], inputs: list[Tensor], retain_graph: bool) -> Tensor:
    """Per-task gradients of ``terms`` w.r.t. ``inputs``, flattened into ``[T, D]``."""
    rows = []
    for term in terms.values():
        grads = torch.autograd.grad(term, inputs, retain_graph=retain_graph, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(x) if g is None else g).reshape(-1)
                               for g, x in zip(grads, inputs)]))
    return torch.stack(rows)


def _assign_flat(params: list[Tensor], flat: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)
        offset += n


def _fill_diagnostics(report: StepReport, tasks: list[str], gramian: Tensor) -> None:
    norms = gramian.diagonal().clamp(min=1e-30).sqrt()
    cos = gramian / (norms[:, None] * norms[None, :])
    report.cosines = {f"{a}|{b}": float(cos[i, j])
                      for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j}
    eig = torch.linalg.eigvalsh(gramian)
    report.condition_number = float(eig[-1] / eig[0].clamp(min=1e-30))
