"""The search phase's searcher: Ray Tune's ``OptunaSearch``, its suggestions made complete trial specs.

:class:`SpecSearcher` turns each suggestion (the method, its hyperparameters, shared trainer options)
into the trial's whole :class:`~sweeps.trial.TrialSpec`, so a search trial arrives as complete as
the trials of the other phases, and the trial never merges anything itself.

:class:`ResumableOptunaSearch` is ``OptunaSearch`` for a study that outlives its driver.

A driver killed after Optuna stored a trial's result but before Tune saved its experiment state
restarts that trial on ``--resume``: Tune still lists it as running, while the study (SQLite or
PostgreSQL) already holds it as finished. Optuna then refuses the restarted trial's reports and
Tune, in turn, aborts the whole resumed sweep. The study keeps the first result and the rerun only
refreshes ``trials.parquet``, so such a report is dropped here. (Tune's ``OptunaSearch`` already
tolerates the matching refused completion.)

Module-level because Tune pickles the searcher into its experiment checkpoints.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.trial import TRIAL_KEY, TrialSpec

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that ignores results for trials the study already finished."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            log.info("trial %s already finished in the Optuna study (driver restarted); result not re-reported",
                     trial_id)


class SpecSearcher(Searcher):
    """Wraps ``searcher``: each suggestion becomes ``{TRIAL_KEY: base.with_search(suggestion)}``.

    A search wrapper the way Tune's ``ConcurrencyLimiter`` is one (``.searcher``, ``get_state``), so
    Tune saves and restores the searcher under it as usual.
    """

    def __init__(self, searcher: Searcher, base: TrialSpec, potentials: Mapping[str, float] | None) -> None:
        self.searcher = searcher
        self.base = base
        self.potentials = dict(potentials) if potentials else None
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        suggestion = self.searcher.suggest(trial_id)
        if suggestion is None or suggestion == Searcher.FINISHED:
            return suggestion
        return {TRIAL_KEY: self.base.with_search(suggestion, self.potentials).to_dict()}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict[str, Any]:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "searcher"})

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
