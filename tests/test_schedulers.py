"""Per-method ASHA in a real Ray Tune run: early stopping never judges one method by another's trials."""
from __future__ import annotations

import sys

from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from sweeps.schedulers import PerMethodASHA

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not have tests/ on their path
EPOCHS = 4
ASHA = {"time_attr": "epoch", "max_t": EPOCHS + 1, "grace_period": 1, "reduction_factor": 2}


def curve(config: dict) -> None:
    """A 'late' method is far worse in every epoch (like AMTL before it has acted), an 'early' one good."""
    offset = 10.0 if config["method"] == "late" else 0.0
    for epoch in range(1, EPOCHS + 1):
        tune.report({"epoch": epoch, "loss": offset + config["noise"] + 1.0 / epoch})


def _epochs_reached(scheduler, tmp_path, name: str) -> dict[str, list[int]]:
    # The early method's trials first, one at a time, so they fill every rung before 'late' arrives.
    configs = [{"method": m, "noise": n / 100} for m in ("early", "late") for n in range(3)]
    tuner = tune.Tuner(curve, param_space={"method": tune.choice(["early", "late"]), "noise": tune.uniform(0, 1)},
                       tune_config=tune.TuneConfig(
                           metric="loss", mode="min", scheduler=scheduler, num_samples=len(configs),
                           search_alg=BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=1)),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
    reached: dict[str, list[int]] = {"early": [], "late": []}
    for result in tuner.fit():
        reached[result.config["method"]].append(int(result.metrics["epoch"]))
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
