"""Leaderboard: t-intervals, ranks from paired tests, row selection per phase, markdown, plots, parquet."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scipy import stats

from sweeps.leaderboard import (ALPHA, build_leaderboard, holm, mean_ci95, method_scores, paired_tests,
                                plot_leaderboard, plot_weights, significance_markdown, t_quantile, to_markdown,
                                write_outputs)

HP = ["focusing", "margin", "temperature", "lr"]
TASKS = {"segmentation": "miou", "depth": "delta1"}


def trial(tid: str, method: str, phase: str, test: float | None, val: float | None = None, *,
          status: str = "TERMINATED", seed: int = 0, error: str | None = None, secs: float = 10.0,
          kpi: float = 0.5, **hp: float) -> dict:
    """One trial row shaped like trials.parquet; KPI columns equal their val metric, as the trainer writes."""
    row = {"trial_id": tid, "phase": phase, "method": method, "seed": seed, "status": status, "error": error,
           "val_delta_m": val if val is not None else test, "test_delta_m": test, "node_id": "n0",
           "train_seconds": secs, **{h: hp.get(h, math.nan) for h in HP}}
    if status != "TERMINATED":
        row["val_delta_m"] = row["test_delta_m"] = math.nan
    for task, metric in TASKS.items():
        v = math.nan if status != "TERMINATED" else kpi
        row[f"kpi/{task}"] = v
        row[f"val/{task}/{metric}"] = v
        row[f"val/{task}/other"] = v + 0.25
        row[f"test/{task}/{metric}"] = v - 0.1 if v == v else v
        row[f"test/{task}/other"] = v + 0.3 if v == v else v
    return row


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def lb_row(lb: pd.DataFrame, method: str) -> pd.Series:
    return lb.set_index("method").loc[method]


def seeds(method: str, values: list[float], **hp: float) -> list[dict]:
    return [trial(f"{method}-s{i}", method, "seeds", v, seed=i, **hp) for i, v in enumerate(values)]


# -- statistics --------------------------------------------------------------------------------
def test_t_quantile_matches_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729911275, abs=1e-8)
    assert t_quantile(0.975, 1) == pytest.approx(12.706204736174707, abs=1e-8)
    assert t_quantile(0.975, 10) == pytest.approx(2.228138851986274, abs=1e-8)
    assert t_quantile(0.025, 5) == pytest.approx(-2.570581835636314, abs=1e-8)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.96, abs=1e-3)


def test_ci_is_hand_computed_t_interval():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3), rel=1e-9)
    assert math.isnan(mean_ci95([5.0])[1])
    assert mean_ci95([2.0, 2.0])[1] == 0.0

    lb = build_leaderboard(frame(seeds("ew", [1.0, 2.0, 3.0])), HP)
    r = lb_row(lb, "ew")
    assert r["n_seeds"] == 3
    assert r["test_delta_m_mean"] == pytest.approx(2.0)
    assert r["test_delta_m_ci95"] == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    assert r["test_delta_m_low"] == pytest.approx(2.0 - r["test_delta_m_ci95"])
    assert r["test_delta_m_high"] == pytest.approx(2.0 + r["test_delta_m_ci95"])


def test_every_task_score_has_its_own_interval_over_the_scoring_rows():
    rows = [trial(f"ew-s{i}", "ew", "seeds", 1.0, seed=i, kpi=k) for i, k in enumerate([0.4, 0.5, 0.6])]
    rows.append(trial("ew-search", "ew", "search", 0.5, kpi=0.9))  # not a scoring row
    lb = build_leaderboard(frame(rows), HP)
    r = lb_row(lb, "ew")
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # s = 0.1 over three seeds
    for task, metric in TASKS.items():
        assert r[f"test/{task}/{metric}"] == pytest.approx(0.4)
        assert r[f"test/{task}/{metric}_ci95"] == pytest.approx(half, rel=1e-9)
    assert f"0.4000 ± {half:.4f}" in to_markdown(lb)
    one = build_leaderboard(frame(seeds("gls", [1.0])), HP)
    assert math.isnan(lb_row(one, "gls")["test/depth/delta1_ci95"]) and "± n/a" in to_markdown(one)


def test_every_method_is_listed_with_its_budget_or_the_reason_it_has_no_score():
    rows = [{**r, "epochs": 3} for r in seeds("ew", [1.0, 2.0])]
    rows += [{**trial("dwa-1", "dwa", "search", None, status="ERROR", error="ValueError: loss is nan"), "epochs": 1},
             {**trial("dwa-2", "dwa", "search", None, status="ERROR", error="ValueError: loss is nan"), "epochs": 2}]
    rows += [{**trial("gls-1", "gls", "search", None, status="STOPPED"), "epochs": 1}]
    lb = build_leaderboard(frame(rows), HP, methods=["ew", "dwa", "gls", "cagrad"])
    assert list(lb["method"]) == ["ew", "cagrad", "dwa", "gls"]  # scored first, then by name
    assert lb_row(lb, "ew")[["trials", "epochs", "note"]].tolist() == [2, 6, ""]
    assert lb_row(lb, "dwa")["note"] == "2 of 2 trial(s) failed: ValueError: loss is nan"
    assert lb_row(lb, "dwa")["epochs"] == 3
    assert lb_row(lb, "gls")["note"] == "1 of 1 trial(s) stopped early by the scheduler"
    assert lb_row(lb, "cagrad")["note"] == "never sampled" and lb_row(lb, "cagrad")["trials"] == 0
    text = to_markdown(lb, note="Joint search: unequal budgets")
    assert "(2 of 2 trial(s) failed: ValueError: loss is nan)" in text and "(never sampled)" in text
    assert text.rstrip().endswith("Joint search: unequal budgets")


# -- ranking -----------------------------------------------------------------------------------
def test_a_consistent_paired_gap_ranks_where_the_intervals_overlap():
    # a ~ 2 ± 2.48 and b ~ 3.02 ± 2.4 overlap, but seed by seed b is 0.9-1.1 worse.
    a, b = [1.0, 2.0, 3.0], [2.1, 2.9, 4.05]
    lb = build_leaderboard(frame(seeds("a", a) + seeds("b", b)), HP)
    assert lb_row(lb, "a")["test_delta_m_high"] > lb_row(lb, "b")["test_delta_m_low"]
    assert list(lb["method"]) == ["a", "b"] and list(lb["rank"]) == [1, 2]
    pairs = paired_tests(method_scores(frame(seeds("a", a) + seeds("b", b)), HP))
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))  # by hand: the paired t statistic, 2 degrees of freedom
    row = pairs.iloc[0]
    assert row["pairs"] == 3 and row["t"] == pytest.approx(t) and row["p"] == pytest.approx(2 * stats.t.sf(abs(t), 2))
    assert row["p_holm"] == row["p"] and row["better"] == "a"  # one pair: nothing to correct


def test_an_inconsistent_gap_shares_a_rank():
    # a is better on two seeds by 2 and 0.5 and worse on the third by 1: no significant difference.
    lb = build_leaderboard(frame(seeds("a", [1.0, 2.0, 3.0]) + seeds("b", [3.0, 2.5, 2.0])), HP)
    assert list(lb["method"]) == ["a", "b"] and list(lb["rank"]) == [1, 1]


def test_ranks_count_the_methods_significantly_better():
    rows = (seeds("a", [0.9, 1.0, 1.1]) + seeds("b", [9.9, 10.05, 10.1]) + seeds("c", [10.0, 10.1, 10.25])
            + seeds("d", [50.0, 50.3, 50.1]))
    lb = build_leaderboard(frame(rows), HP)
    assert list(lb["method"]) == ["a", "b", "c", "d"]
    assert list(lb["rank"]) == [1, 2, 2, 4]  # b and c do not differ (p = 0.07); d is beaten by all three
    pairs = paired_tests(method_scores(frame(rows), HP)).set_index(["method_a", "method_b"])
    assert pd.isna(pairs.loc[("b", "c"), "better"]) and pairs.loc[("b", "c"), "p_holm"] > ALPHA


def test_holm_adjusts_over_the_tested_pairs_only():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04, kept monotone: 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    adjusted = holm([math.nan, 0.02, 0.3])
    assert math.isnan(adjusted[0]) and adjusted[1:].tolist() == pytest.approx([0.04, 0.3])


def test_a_raw_p_below_5_percent_can_lose_to_the_correction():
    # b - a: 1.0, 1.5, 2.1 (p = 0.04 alone); with c, three pairs share the correction and none holds.
    rows = seeds("a", [1.0, 2.0, 3.0]) + seeds("b", [2.0, 3.5, 5.1]) + seeds("c", [2.5, 3.0, 5.6])
    pairs = paired_tests(method_scores(frame(rows), HP)).set_index(["method_a", "method_b"])
    assert pairs.loc[("a", "b"), "p"] < ALPHA < pairs.loc[("a", "b"), "p_holm"]
    assert pairs["better"].isna().all()
    assert list(build_leaderboard(frame(rows), HP)["rank"]) == [1, 1, 1]
    assert "no significant difference" in significance_markdown(pairs.reset_index())


def test_single_run_has_no_interval_and_cannot_be_separated():
    rows = seeds("a", [0.9, 1.0, 1.1]) + [trial("z1", "z", "search", 30.0, lr=0.1)]
    lb = build_leaderboard(frame(rows), HP)
    z = lb_row(lb, "z")
    assert z["n_seeds"] == 1 and math.isnan(z["test_delta_m_ci95"]) and math.isnan(z["test_delta_m_low"])
    assert list(lb["rank"]) == [1, 1]


# -- row selection -----------------------------------------------------------------------------
def test_seeds_phase_preferred_over_search():
    rows = [trial("s1", "amtl", "search", -9.0, -9.0, focusing=1.0, lr=0.01),
            trial("s2", "amtl", "search", 5.0, -1.0, focusing=2.0, lr=0.01)]
    rows += seeds("amtl", [1.0, 2.0, 3.0], focusing=2.0, lr=0.01)
    lb = build_leaderboard(frame(rows), HP)
    r = lb_row(lb, "amtl")
    assert r["scored_on"] == "seeds" and r["n_seeds"] == 3
    assert r["test_delta_m_mean"] == pytest.approx(2.0)
    assert json.loads(r["best_config"]) == {"focusing": 2, "lr": 0.01}
    assert r["trials"] == 5


def test_best_search_row_chosen_by_val_when_no_seeds():
    rows = [trial("s1", "dwa", "search", 3.0, 2.0, temperature=1.0, lr=0.01),
            trial("s2", "dwa", "search", 9.0, 1.0, temperature=4.0, lr=0.001, kpi=0.7),
            trial("s3", "dwa", "search", -5.0, 8.0, temperature=2.0, lr=0.01)]  # best test, worse val
    lb = build_leaderboard(frame(rows), HP)
    r = lb_row(lb, "dwa")
    assert r["scored_on"] == "search" and r["n_seeds"] == 1 and r["best_trial_id"] == "s2"
    assert r["test_delta_m_mean"] == 9.0 and r["val_delta_m_mean"] == 1.0
    assert json.loads(r["best_config"]) == {"lr": 0.001, "temperature": 4}
    # Per-task column is the test KPI (metric found by matching kpi/<task> to val/<task>/<metric>).
    assert r["test/segmentation/miou"] == pytest.approx(0.6)
    assert "test/segmentation/other" not in lb.columns


def test_failed_counts_potentials_excluded_and_failed_only_methods_at_bottom():
    rows = [trial("p1", "ew", "potentials", -50.0), trial("p2", "ew", "potentials", None, status="ERROR"),
            trial("p3", "single_task", "potentials", 0.0),
            trial("e1", "ew", "search", 4.0, lr=0.01),
            trial("e2", "ew", "search", None, status="ERROR", error="OOM"),
            trial("e3", "ew", "search", None, status="RUNNING"),
            trial("n1", "nash", "search", None, status="ERROR", error="solver failed", secs=3.0),
            trial("n2", "nash", "search", None, status="ERROR", error="solver failed", secs=4.0),
            trial("g1", "gls", "search", 1.0, lr=0.01)]
    lb = build_leaderboard(frame(rows), HP)
    assert set(lb["method"]) == {"ew", "nash", "gls"}  # "single_task" only ran in potentials
    ew = lb_row(lb, "ew")
    assert ew["failed"] == 1 and ew["trials"] == 3 and ew["test_delta_m_mean"] == 4.0  # not -50
    assert ew["compute_seconds"] == pytest.approx(30.0)
    assert list(lb["method"])[-1] == "nash"
    nash = lb_row(lb, "nash")
    assert nash["failed"] == 2 and nash["n_seeds"] == 0 and nash["compute_seconds"] == pytest.approx(7.0)
    assert math.isnan(nash["test_delta_m_mean"]) and pd.isna(nash["rank"]) and pd.isna(nash["best_config"])


# -- outputs -----------------------------------------------------------------------------------
def sweep_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [trial("p1", "ew", "potentials", 0.0)]
    rows += seeds("amtl", [-2.0, -1.5, -2.5], focusing=2.0, margin=0.1, lr=0.01)
    rows += seeds("ew", [1.0, 1.2, 0.8], lr=0.01)
    rows += [trial("d1", "dwa", "search", 0.5, temperature=2.0, lr=0.01),
             trial("n1", "nash", "search", None, status="ERROR", error="diverged")]
    hist = []
    for tid, base in [("amtl-s0", 1.0), ("ew-s0", 1.0)]:
        for ep in range(1, 9):
            hist.append({"trial_id": tid, "epoch": ep, "weight/segmentation": base + 0.1 * ep,
                         "weight/depth": base - 0.05 * ep, "kpi/segmentation": 0.3 + 0.02 * ep,
                         "kpi/depth": 0.5 + 0.01 * ep, "val_delta_m": 5.0 - ep})
    return frame(rows), pd.DataFrame(hist)


def test_markdown_lists_every_method():
    trials, _ = sweep_tables()
    lb = build_leaderboard(trials, HP)
    md = to_markdown(lb)
    for m in ["amtl", "ew", "dwa", "nash"]:
        assert f" {m} " in md
    assert "± n/a" in md and "±" in md and "segmentation miou" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(lb)
    assert len({line.count("|") for line in table}) == 1  # every row has the same number of cells


def test_png_outputs_non_trivial_and_deterministic(tmp_path):
    trials, hist = sweep_tables()
    lb = build_leaderboard(trials, HP)
    plot_leaderboard(lb, tmp_path / "a.png")
    plot_leaderboard(lb, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    plot_weights(hist, "amtl-s0", tmp_path / "w.png")
    for name in ["a.png", "w.png"]:
        with Image.open(tmp_path / name) as im:
            assert im.width > 400 and im.height > 300
            pixels = np.asarray(im.convert("L"))
            assert pixels.std() > 5  # not a blank canvas
    with pytest.raises(ValueError, match="no task-weight history"):
        plot_weights(hist, "missing", tmp_path / "x.png")
    assert not list(tmp_path.glob(".*tmp"))


def test_write_outputs_round_trip(tmp_path):
    trials, hist = sweep_tables()
    lb = write_outputs(trials, hist, tmp_path / "out", HP)
    out = tmp_path / "out"
    for name in ["leaderboard.parquet", "leaderboard.md", "leaderboard.png", "weights.png", "significance.md",
                 "significance.parquet"]:
        assert (out / name).stat().st_size > 0
    pairs = pd.read_parquet(out / "significance.parquet")
    assert len(pairs) == 6  # every pair of the four methods, tested or not
    assert (out / "significance.md").read_text(encoding="utf-8") == significance_markdown(pairs)
    back = pd.read_parquet(out / "leaderboard.parquet")
    pd.testing.assert_frame_equal(back, lb, check_dtype=False)
    assert list(back["method"]) == ["amtl", "dwa", "ew", "nash"]
    assert (out / "leaderboard.md").read_text(encoding="utf-8") == to_markdown(lb)
    assert not list(out.glob(".*tmp"))
    # No weight history: no weights.png, everything else still written.
    lb2 = write_outputs(trials, None, tmp_path / "out2", HP)
    assert len(lb2) == 4 and not (tmp_path / "out2" / "weights.png").exists()


def test_weights_prefer_amtl_trial(tmp_path, monkeypatch):
    import sweeps.leaderboard as mod
    trials, hist = sweep_tables()
    seen = []
    monkeypatch.setattr(mod, "plot_weights", lambda h, tid, path, method=None: seen.append(tid))
    write_outputs(trials, hist, tmp_path, HP)
    assert seen == ["amtl-s0"]  # the scoring seed with the lowest val Delta-m is amtl-s2, not logged
    seen.clear()
    write_outputs(trials, hist[hist["trial_id"] == "ew-s0"], tmp_path, HP)
    assert seen == ["ew-s0"]


def test_kpi_metric_override_and_val_fallback():
    rows = [trial("s1", "ew", "search", 1.0, kpi=0.5)]
    lb = build_leaderboard(frame(rows), HP, kpi_metrics={"segmentation": "other"})
    assert lb_row(lb, "ew")["test/segmentation/other"] == pytest.approx(0.8)
    assert "test/depth/delta1" in lb.columns
    only_kpi = frame(rows).drop(columns=[c for c in frame(rows).columns if c.startswith(("val/", "test/"))])
    lb = build_leaderboard(only_kpi, HP)
    assert lb_row(lb, "ew")["kpi/depth"] == pytest.approx(0.5)
