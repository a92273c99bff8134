"""Every registered method and every weighting+aggregator combination trains the 3-task model."""
import math

import pytest

from amtl import balancers
from amtl.balancers.method import _AGGREGATORS, _WEIGHTINGS
from amtl.data.registry import build_datasets
from amtl.trainer import TrainConfig, Trainer

TASKS = ("segmentation", "depth", "normal")
POTENTIALS = {"segmentation": 0.5, "depth": 0.6, "normal": 0.4}
CONFIG = dict(tasks=TASKS, image_size=32, n_train=32, n_val=8, n_test=8, batch_size=16, epochs=1, log_every=2)


@pytest.fixture(scope="module")
def data():
    return build_datasets("scenes", TASKS, image_size=32, n_train=32, n_val=8, n_test=8)


def potentials_for(name: str) -> dict | None:
    return POTENTIALS if "potentials" in balancers.context_keys(name) else None


def train_one_epoch(name: str, data, **extra) -> Trainer:
    trainer = Trainer(TrainConfig(balancer=name, hparams=extra, potentials=potentials_for(name), **CONFIG), None,
                      data=data, progress=None)
    before = [p.detach().clone() for p in trainer.model.shared_parameters()]
    result = trainer.fit()
    assert trainer.step == 2
    assert all(math.isfinite(v) for v in result["val"].values())
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(trainer.model.shared_parameters(), before))
    assert moved > 0, f"{name} left the shared parameters unchanged"
    weights = trainer.method.weights
    assert set(weights) == set(TASKS) and all(math.isfinite(w) for w in weights.values())
    return trainer


@pytest.mark.parametrize("name", balancers.names())
def test_every_registered_method_trains(name, data):
    train_one_epoch(name, data)


COMBOS = [f"{w}+{a}" for w in sorted(_WEIGHTINGS) for a in sorted(_AGGREGATORS)]


@pytest.mark.parametrize("name", COMBOS)
def test_every_weighting_aggregator_combination_trains(name, data):
    train_one_epoch(name, data)


@pytest.mark.parametrize("aggregator, source", [(a, s) for a in sorted(_AGGREGATORS) for s in ("last", "representation")
                                                if s in _AGGREGATORS[a].sources])
def test_every_aggregator_trains_from_every_gradient_source(aggregator, source, data):
    trainer = train_one_epoch(aggregator, data, source=source)
    assert trainer.method.source == source
