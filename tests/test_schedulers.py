"""Per-method ASHA in a real Ray Tune run: early stopping never judges one method by another's trials."""
from __future__ import annotations

import sys

from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from sweeps.schedulers import PerMethodASHA
from sweeps.trial import TRIAL_KEY, TrialSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not have tests/ on their path
EPOCHS = 4
ASHA = {"time_attr": "epoch", "max_t": EPOCHS + 1, "grace_period": 1, "reduction_factor": 2}


def curve(config: dict) -> None:
    """A 'late' method is far worse in every epoch (like AMTL before it has acted), an 'early' one good."""
    spec = TrialSpec.of(config)
    offset = 10.0 if spec.method == "late" else 0.0
    for epoch in range(1, EPOCHS + 1):
        tune.report({"epoch": epoch, "loss": offset + spec.searched["noise"] + 1.0 / epoch})


def _spec(method: str, noise: float) -> dict:
    """A trial's config as the sweep's searcher gives it: a complete spec naming its method."""
    spec = TrialSpec(phase="search", train={"balancer": method}, searched={"method": method, "noise": noise},
                     workers=1, cpus_per_worker=1, gpus_per_worker=0, train_storage="", max_failures=0)
    return {TRIAL_KEY: spec.to_dict()}


def _epochs_reached(scheduler, tmp_path, name: str) -> dict[str, list[int]]:
    # The early method's trials first, one at a time, so they fill every rung before 'late' arrives.
    configs = [_spec(m, n / 100) for m in ("early", "late") for n in range(3)]
    tuner = tune.Tuner(curve, param_space={TRIAL_KEY: tune.grid_search([c[TRIAL_KEY] for c in configs])},
                       tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler,
                                                   search_alg=BasicVariantGenerator(max_concurrent=1)),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
    reached: dict[str, list[int]] = {"early": [], "late": []}
    for result in tuner.fit():
        reached[TrialSpec.of(result.config).method].append(int(result.metrics["epoch"]))
    return reached


def test_one_asha_over_all_methods_stops_the_late_method_before_it_acts(ray_cluster, tmp_path):
    """The bias the per-method scheduler removes, shown on the same runs."""
    reached = _epochs_reached(ASHAScheduler(**ASHA), tmp_path, "global")
    assert reached["late"] == [1, 1, 1], reached  # every 'late' trial judged at epoch 1 against 'early' ones
    assert max(reached["early"]) == EPOCHS, reached


def test_per_method_asha_races_each_method_only_against_itself(ray_cluster, tmp_path):
    reached = _epochs_reached(PerMethodASHA(**ASHA), tmp_path, "per-method")
    # Each method's first trial sets its own rungs and runs to the end; the later ones of the same
    # method fall behind it (by their noise) and stop at the first rung: both methods alike.
    assert {m: sorted(epochs) for m, epochs in reached.items()} == {"early": [1, 1, EPOCHS], "late": [1, 1, EPOCHS]}
