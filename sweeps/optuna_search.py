"""Ray Tune's ``OptunaSearch`` for a study that outlives its driver.

A driver killed after Optuna stored a trial's result but before Tune saved its experiment state
restarts that trial on ``--resume``: Tune still lists it as running, while the study (SQLite or
PostgreSQL) already holds it as finished. Optuna then refuses the restarted trial's reports and
Tune, in turn, aborts the whole resumed sweep. The study keeps the first result and the rerun only
refreshes ``trials.parquet``, so such a report is dropped here. (Tune's ``OptunaSearch`` already
tolerates the matching refused completion.)

Module-level because Tune pickles the searcher into its experiment checkpoints.
"""
from __future__ import annotations

import logging
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that ignores results for trials the study already finished."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            log.info("trial %s already finished in the Optuna study (driver restarted); result not re-reported",
                     trial_id)
