"""ASHA within each method's own trials, so early stopping never compares methods with each other.

One ASHA over all methods judges them at the same early rungs: a method whose signal starts late
(AMTL and DTP act on validation KPIs, so their first epoch is plain equal weighting; STCH and
GradNorm warm up) loses its trials before it has acted, and may reach the seeds phase with none.
Here every method gets an ASHA of its own (same rungs, same reduction factor), so a trial is stopped
only for being worse than trials *of its own method* at the same epoch: early stopping saves compute
inside each method's search without biasing the verdict between methods.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from sweeps.trial import TrialSpec

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial


class PerMethodASHA(FIFOScheduler):
    """An :class:`AsyncHyperBandScheduler` per method (its :class:`TrialSpec`'s); trials run FIFO."""

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int, reduction_factor: float,
                 metric: str | None = None, mode: str | None = None) -> None:
        super().__init__()
        self._asha_options = {"time_attr": time_attr, "max_t": max_t, "grace_period": grace_period,
                              "reduction_factor": reduction_factor}
        self._metric, self._mode = metric, mode
        self._by_method: dict[str, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric and metric != self._metric) or (self._mode and mode and mode != self._mode):
            return False
        self._metric, self._mode = self._metric or metric, self._mode or mode
        return True

    def asha(self, trial: "Trial") -> AsyncHyperBandScheduler:
        """The ASHA of ``trial``'s method, made on its first trial."""
        method = TrialSpec.of(trial.config).method
        if method not in self._by_method:
            self._by_method[method] = AsyncHyperBandScheduler(metric=self._metric, mode=self._mode,
                                                              **self._asha_options)
        return self._by_method[method]

    def on_trial_add(self, tune_controller: "TuneController", trial: "Trial") -> None:
        self.asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: "TuneController", trial: "Trial", result: dict) -> str:
        return self.asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: "TuneController", trial: "Trial", result: dict) -> None:
        self.asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: "TuneController", trial: "Trial") -> None:
        self.asha(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: "TuneController", trial: "Trial") -> None:
        self.asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "Per-method ASHA: " + "; ".join(f"{m}: {a.debug_string()}" for m, a in sorted(self._by_method.items()))
