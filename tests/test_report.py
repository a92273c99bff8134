"""report.html and its parts: the Pareto set, per-task Delta-m, importance, the winner's command.

The end-to-end checks (a real sweep's report in headless Chromium, ``--report`` rebuilding the same
files) are in test_sweep.py, on its sweep.
"""
from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from amtl.tasks import delta_m, task_deltas
from amtl.train import build_parser, config_from_args
from amtl.trainer import TrainConfig
from sweeps.leaderboard import build_leaderboard, method_scores, paired_tests, write_outputs
from sweeps.report import importances, pareto_mask, pareto_set, winner_commands, write_report
from sweeps.runner import SET_BY_SWEEP
from sweeps.space import load_space

TASKS = ("segmentation", "depth", "normal")


def trial(tid: str, method: str, phase: str, dm: float, *, seed: int = 0, kpis=(0.5, 0.5, 0.5), status="TERMINATED",
          **hp) -> dict:
    row = {"trial_id": tid, "phase": phase, "method": method, "seed": seed, "status": status,
           "error": "boom" if status == "ERROR" else None, "val_delta_m": dm, "test_delta_m": dm,
           "train_seconds": 3.0, "epochs": 2, **hp}
    for task, k in zip(TASKS, kpis):
        row[f"kpi/{task}"] = row[f"val/{task}/kpi"] = k
        row[f"test/{task}/kpi"] = k - 0.05
        row[f"delta/{task}"] = dm + (1.0 if task == "depth" else -0.5)
    return row


# -- Pareto ---------------------------------------------------------------------------------
def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a >= b) and np.any(a > b))


def test_pareto_mask_keeps_exactly_the_non_dominated_points():
    rng = np.random.default_rng(0)
    points = rng.integers(0, 6, size=(150, 3)).astype(float)  # small integers: many ties and duplicates
    points[7] = np.nan
    mask = pareto_mask(points)
    assert not mask[7]
    finite = [i for i in range(len(points)) if i != 7]
    front = [i for i in finite if mask[i]]
    assert 1 <= len(front) < len(finite)
    for i in front:  # nothing beats a point of the front ...
        assert not any(dominates(points[j], points[i]) for j in finite)
    for i in set(finite) - set(front):  # ... and something on the front beats every other point
        assert any(dominates(points[j], points[i]) for j in front)
    twins = pareto_mask(np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]))
    assert twins.tolist() == [True, True, False]


def test_pareto_set_is_finished_trials_no_trial_beats_on_every_task():
    rows = [trial("a", "ew", "search", 1.0, kpis=(0.9, 0.1, 0.5), lr=0.01),
            trial("b", "ew", "search", 1.0, kpis=(0.1, 0.9, 0.5), lr=0.02),
            trial("c", "amtl", "search", 1.0, kpis=(0.5, 0.5, 0.5)),
            trial("d", "amtl", "search", 1.0, kpis=(0.4, 0.4, 0.4)),           # beaten by c
            trial("e", "amtl", "search", math.nan, kpis=(1.0, 1.0, 1.0), status="ERROR"),  # failed: not a point
            trial("p", "segmentation", "potentials", math.nan, kpis=(1.0, 1.0, 1.0))]     # not a method
    front = pareto_set(pd.DataFrame(rows), ["lr"])
    assert sorted(front["trial_id"]) == ["a", "b", "c"]
    assert json.loads(front.set_index("trial_id").loc["b", "config"]) == {"lr": 0.02}


# -- per-task Delta-m -----------------------------------------------------------------------
def test_task_deltas_are_each_tasks_share_of_delta_m():
    directions = {"segmentation/miou": True, "segmentation/acc": True, "depth/abs_err": False}
    baselines = {"segmentation/miou": 0.5, "segmentation/acc": 0.8, "depth/abs_err": 0.2}
    metrics = {"segmentation/miou": 0.55, "segmentation/acc": 0.76, "depth/abs_err": 0.25}
    per_task = task_deltas(metrics, baselines, directions)
    assert per_task["segmentation"] == pytest.approx(100 * (-(0.05 / 0.5) - (-0.04 / 0.8)) / 2)
    assert per_task["depth"] == pytest.approx(100 * 0.05 / 0.2)
    # Delta-m is their mean weighted by the number of metrics each task brings.
    assert delta_m(metrics, baselines, directions) == pytest.approx((2 * per_task["segmentation"]
                                                                     + per_task["depth"]) / 3)


def test_leaderboard_carries_each_tasks_delta_m_with_its_interval():
    rows = [trial(f"ew-{s}", "ew", "seeds", dm, seed=s) for s, dm in enumerate([1.0, 2.0, 3.0])]
    lb = build_leaderboard(pd.DataFrame(rows), []).set_index("method")
    assert lb.loc["ew", "delta/depth"] == pytest.approx(3.0)
    assert lb.loc["ew", "delta/segmentation"] == pytest.approx(1.5)
    assert lb.loc["ew", "delta/depth_ci95"] == pytest.approx(lb.loc["ew", "test_delta_m_ci95"])


# -- what mattered --------------------------------------------------------------------------
def test_importance_finds_the_hyperparameter_that_moves_delta_m():
    """Val Delta-m follows GradNorm's alpha only; w_lr and the shared lr are noise to it."""
    space = load_space(["gradnorm"])
    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        alpha, w_lr, lr = rng.uniform(0, 3), np.exp(rng.uniform(np.log(1e-3), np.log(0.1))), \
            np.exp(rng.uniform(np.log(5e-4), np.log(5e-3)))
        rows.append(trial(f"t{i}", "gradnorm", "search", 10.0 * alpha, alpha=alpha, w_lr=w_lr, lr=lr))
    table = importances(pd.DataFrame(rows), space).set_index("param")["importance"]
    assert set(table.index) == {"alpha", "w_lr", "lr"}
    assert table["alpha"] > 0.8 and table.sum() == pytest.approx(1.0)


# -- the winner's command -------------------------------------------------------------------
def test_the_winners_command_trains_its_best_trial_with_the_sweeps_options():
    train = replace(TrainConfig(), tasks=("segmentation", "depth"), epochs=4, n_train=64, image_size=32)
    rows = [trial(f"amtl-{s}", "amtl", "seeds", dm, seed=s, lr=0.004, focusing=1.5) for s, dm in enumerate([-1.0, -2.0])]
    rows += [trial(f"ew-{s}", "ew", "seeds", dm, seed=s, lr=0.002) for s, dm in enumerate([1.0, 2.0])]
    trials = pd.DataFrame(rows)
    lb = build_leaderboard(trials, ["lr", "focusing"])
    winner = winner_commands(lb, trials, train, "/s/sweep.yaml", {"segmentation": 0.4, "depth": 0.7},
                             skip=SET_BY_SWEEP)
    assert winner["method"] == "amtl" and winner["trial"] == "amtl-1"
    assert winner["tied"] == "ew"  # two seeds: t = -3 with 1 degree of freedom, p = 0.2
    assert winner["sweep"] == "python run_sweep.py --config /s/sweep.yaml"
    argv = shlex.split(winner["train"])
    assert argv[:3] == ["python", "-m", "amtl.train"]
    config = config_from_args(build_parser().parse_args(argv[3:]))
    assert config == replace(train, balancer="amtl", lr=0.004, seed=1, hparams={"focusing": 1.5},
                             potentials={"depth": 0.7, "segmentation": 0.4})


# -- the page -------------------------------------------------------------------------------
def report_of(tmp_path, rows: list[dict], methods=("ew", "amtl")) -> str:
    trials = pd.DataFrame(rows)
    compared = trials[trials["phase"] != "potentials"]
    lb = write_outputs(compared, None, tmp_path, ["lr"], methods=list(methods))
    space = load_space(list(methods))
    winner = winner_commands(lb, compared, TrainConfig(), "/s/sweep.yaml", None, skip=SET_BY_SWEEP)
    pairs = paired_tests(method_scores(compared, ["lr"]))
    return write_report(tmp_path, trials, None, lb, pairs, ["lr"], space, "Sweep 'x'", "samples: 2\n",
                        winner).read_text()


def test_one_seed_says_no_test_is_possible(tmp_path):
    page = report_of(tmp_path, [trial("a", "ew", "seeds", 1.0), trial("b", "amtl", "seeds", 0.5)])
    assert "One seed per method: no pairwise test is possible" in page
    assert "not tested: under 2 shared seeds" in page


def test_ties_are_no_significant_difference_and_failures_are_listed(tmp_path):
    rows = [trial(f"{m}-{s}", m, "seeds", dm, seed=s) for m in ("ew", "amtl") for s, dm in enumerate([1.0, 2.0, 3.0])]
    rows.append(trial("bad", "amtl", "search", math.nan, status="ERROR"))
    rows += [trial(f"ew-search-{i}", "ew", "search", 1.0, kpis=(0.1 * i, 0.5 - 0.1 * i, 0.3)) for i in range(3)]
    page = report_of(tmp_path, rows)
    assert "no significant difference" in page and "better</td>" not in page
    failed = pd.read_html(tmp_path / "report.html", attrs={"id": "failed"})[0]
    assert failed.to_dict("records") == [{"phase": "search", "method": "amtl", "trial": "bad", "seed": 0,
                                          "why": "boom"}]
    board = pd.read_html(tmp_path / "report.html", attrs={"id": "leaderboard"})[0]
    assert list(board["rank"]) == [1, 1]
    assert (tmp_path / "tradeoffs.png").exists() and (tmp_path / "pareto.png").exists()
