"""``report.html`` and the plots behind it: what a researcher reads after a sweep.

One self-contained page (styles inline, plots as ``data:`` images, no script from the network) with
the leaderboard and its significance tests, the winner's configuration and the commands that
reproduce it, where each method's Delta-m comes from (per task), the trials' trade-offs between tasks
with their Pareto front, which hyperparameters mattered, every method's task weights over training,
the compute spent per phase and method, and the failed trials with their reasons.

Everything here reads the stored tables (``trials.parquet``, ``history.parquet``, the leaderboard),
so ``run_sweep.py --report`` rebuilds the same files from a finished sweep without training.
"""
from __future__ import annotations

import base64
import html
import itertools
import json
import math
import shlex
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sweeps.leaderboard import (CI_SUFFIX, FAILED_STATUS, OK_STATUS, agg_figure, atomic_write, config_json, fmt_cell,
                                is_missing, logged_weight_trials, markdown_table, mean_ci_text, save_png, task_label,
                                weights_trial_of)
from sweeps.trial import TASK_DELTA_PREFIX

#: The page's plots, by file name, in the order the page shows them.
PLOTS = ("leaderboard.png", "tradeoffs.png", "pareto.png", "importance.png", "parallel.png",
         "weights_by_method.png")
#: The report's tables kept as files beside it (W&B gets them as Tables).
TABLES = ("significance.parquet", "pareto.parquet", "importance.parquet", "compute.parquet")
#: More task pairs than this make the scatter grid unreadable: the first ones are drawn, the table lists all.
MAX_PAIR_PANELS = 12


# -- Pareto ---------------------------------------------------------------------------------
def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Rows of ``points`` (n x k, every column higher-is-better) that no other row dominates.

    Row ``a`` dominates ``b`` when it is at least as good in every column and better in one. Rows
    with a NaN are never on the front. Equal rows are all kept (none dominates the other).
    """
    points = np.asarray(points, dtype=float)
    finite = ~np.isnan(points).any(axis=1)
    mask = finite.copy()
    others = points[finite]
    for i in np.flatnonzero(finite):
        dominated = np.any(np.all(others >= points[i], axis=1) & np.any(others > points[i], axis=1))
        mask[i] = not dominated
    return mask


def _kpi_columns(trials: pd.DataFrame) -> list[str]:
    return sorted(c for c in trials.columns if c.startswith("kpi/") and trials[c].notna().any())


def _finished_search_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Finished search trials with every val KPI: the configurations the search tried (the seeds
    phase reruns some of them with other seeds; those runs would add seed noise, not configurations)."""
    kpis = _kpi_columns(trials)
    rows = trials[(trials["phase"] == "search") & (trials["status"] == OK_STATUS)]
    if not kpis:
        return rows.iloc[0:0]
    values = rows[kpis].apply(pd.to_numeric, errors="coerce")
    return rows[values.notna().all(axis=1)]


def pareto_set(trials: pd.DataFrame, hparam_columns: Sequence[str]) -> pd.DataFrame:
    """The finished search trials no other beats on every task's val KPI (selection uses val, never test).

    Columns: ``method``, ``trial_id``, ``phase``, ``seed``, the ``kpi/<task>`` values, ``test_delta_m``
    and ``config`` (its hyperparameters as JSON); sorted by method, then trial.
    """
    rows = _finished_search_trials(trials)
    kpis = _kpi_columns(trials)
    columns = ["method", "trial_id", "phase", "seed", *kpis, "test_delta_m", "config"]
    if rows.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    front = rows[pareto_mask(rows[kpis].to_numpy(float))].copy()
    hparams = [c for c in hparam_columns if c in front.columns]
    front["config"] = [config_json(r, hparams) for _, r in front.iterrows()]
    for c in columns:
        if c not in front:
            front[c] = np.nan
    return front[columns].sort_values(["method", "trial_id"], key=lambda s: s.astype(str)).reset_index(drop=True)


def pareto_markdown(front: pd.DataFrame) -> str:
    """The Pareto set as a markdown section (``--objective pareto`` adds it to the leaderboard)."""
    kpis = [c for c in front.columns if c.startswith("kpi/")]
    header = ["method", "trial", *(f"{c[len('kpi/'):]} val KPI" for c in kpis), "test Δm", "config"]
    body = [[str(r["method"]), str(r["trial_id"]), *(fmt_cell(r[c], 4) for c in kpis), fmt_cell(r["test_delta_m"]),
             f"`{r['config']}`"] for _, r in front.iterrows()]
    title = (f"Pareto set: {len(front)} search trial(s) that no other beats on every task's val KPI "
             f"(--objective pareto)")
    return "\n".join([title, "", *markdown_table(header, body, numeric=set(range(2, 3 + len(kpis))))]) + "\n"


# -- plots ----------------------------------------------------------------------------------
def _method_colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab20" if len(methods) > 10 else "tab10"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_tradeoffs(lb: pd.DataFrame, path: str | Path) -> bool:
    """``tradeoffs.png``: each method's per-task test Delta-m (mean ± 95% CI over its scored runs).

    False (nothing written) when the trials reported no per-task Delta-m.
    """
    cols = [c for c in lb.columns if c.startswith(TASK_DELTA_PREFIX) and not c.endswith(CI_SUFFIX)]
    scored = lb[lb["test_delta_m_mean"].notna()]
    if not cols or scored.empty:
        return False
    fig = agg_figure(9, 1.4 + 0.5 * len(scored) * max(1, len(cols)) ** 0.5)
    ax = fig.subplots()
    y = np.arange(len(scored))[::-1]
    height = 0.8 / len(cols)
    for k, col in enumerate(cols):
        mean = scored[col].to_numpy(float)
        ci = np.nan_to_num(scored[col + CI_SUFFIX].to_numpy(float))
        offset = y + 0.4 - height * (k + 0.5)
        ax.barh(offset, np.nan_to_num(mean), height=height, xerr=ci, capsize=2, label=col[len(TASK_DELTA_PREFIX):])
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_yticks(y, list(scored["method"]))
    ax.set_xlabel("test Δm of the task (%): change vs its single-task model, lower is better")
    ax.set_title("Where each method's Delta-m comes from (mean ± 95% CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_png(fig, path)
    return True


def plot_pareto(trials: pd.DataFrame, path: str | Path) -> bool:
    """``pareto.png``: for every pair of tasks, the finished search trials' val KPIs by method, the pair's
    Pareto front as a line, and the trials on the all-task Pareto set circled. False with under 2 tasks."""
    rows = _finished_search_trials(trials)
    kpis = _kpi_columns(trials)
    if len(kpis) < 2 or rows.empty:
        return False
    pairs = list(itertools.combinations(kpis, 2))[:MAX_PAIR_PANELS]
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = agg_figure(4.6 * ncols, 4.0 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    methods = sorted(rows["method"].astype(str).unique())
    colors = _method_colors(methods)
    on_set = pareto_mask(rows[kpis].to_numpy(float))
    for ax, (a, b) in zip(axes, pairs):
        xy = rows[[a, b]].to_numpy(float)
        for m in methods:
            mine = (rows["method"].astype(str) == m).to_numpy()
            ax.scatter(xy[mine, 0], xy[mine, 1], s=18, color=colors[m], label=m, alpha=0.8)
        ax.scatter(xy[on_set, 0], xy[on_set, 1], s=80, facecolors="none", edgecolors="black", lw=0.8,
                   label="Pareto set (all tasks)")
        front = xy[pareto_mask(xy)]
        front = front[np.argsort(front[:, 0])]
        ax.step(front[:, 0], front[:, 1], where="post", color="black", lw=1.0, ls="--", label="front of this pair")
        ax.set_xlabel(f"{a[len('kpi/'):]} val KPI")
        ax.set_ylabel(f"{b[len('kpi/'):]} val KPI")
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle("Trade-offs between tasks (val KPIs, higher is better; finished search trials)")
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 6), 1, 0.97))
    save_png(fig, path)
    return True


def plot_weights_by_method(lb: pd.DataFrame, trials: pd.DataFrame, history: pd.DataFrame | None,
                           path: str | Path) -> list[tuple[str, str]]:
    """``weights_by_method.png``: task weights over epochs for every method's best trial that logged
    weights (the method's scoring trial where it has history). Returns ``[(method, trial_id)]`` drawn."""
    from matplotlib.ticker import MaxNLocator
    picks = []
    logged = logged_weight_trials(history)
    for method in lb["method"]:
        trial = weights_trial_of(str(method), lb, trials, logged)
        if trial is not None:
            picks.append((str(method), trial))
    if not picks:
        return []
    ncols = min(3, len(picks))
    nrows = math.ceil(len(picks) / ncols)
    fig = agg_figure(4.4 * ncols, 3.2 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharex=True)).ravel()
    for ax, (method, trial) in zip(axes, picks):
        rows = history[history["trial_id"].astype(str) == trial].sort_values("epoch")
        for c in sorted(c for c in rows.columns if c.startswith("weight/") and rows[c].notna().any()):
            ax.plot(rows["epoch"].to_numpy(float), rows[c].to_numpy(float), marker="o", ms=3,
                    label=c.split("/", 1)[1])
        ax.set_title(f"{method} (trial {trial})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(picks):]:
        ax.set_visible(False)
    for ax in axes[-ncols:]:
        ax.set_xlabel("epoch")
    fig.suptitle("Task weights over training, best trial of each method")
    fig.tight_layout()
    save_png(fig, path)
    return picks


# -- what mattered --------------------------------------------------------------------------
def _searched_rows(trials: pd.DataFrame, method: str, params: Sequence[str]) -> pd.DataFrame:
    rows = trials[(trials["phase"] == "search") & (trials["method"].astype(str) == method)]
    rows = rows[pd.to_numeric(rows["val_delta_m"], errors="coerce").notna()]
    return rows[rows[list(params)].notna().all(axis=1)] if params else rows.iloc[0:0]


def importances(trials: pd.DataFrame, space: Any, seed: int = 0) -> pd.DataFrame:
    """Optuna's fANOVA importance of each searched hyperparameter for val Delta-m, per method.

    The study is rebuilt from ``trials.parquet`` with the space's distributions (the search's own
    Optuna study may live in a database the report cannot reach); trials stopped by ASHA count with
    the val Delta-m of their last epoch, as the search saw them. Columns: ``method``, ``param``,
    ``importance``; a method with under 4 such trials, or no parameter that varied, has no rows.
    """
    import optuna

    records = []
    quiet = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per rebuilt study says nothing to a reader
    try:
        for method in space.methods:
            records += _importance_of(method, trials, space, seed)
    finally:
        optuna.logging.set_verbosity(quiet)
    return pd.DataFrame.from_records(records, columns=["method", "param", "importance"])


def _importance_of(method: str, trials: pd.DataFrame, space: Any, seed: int) -> list[dict[str, Any]]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    # The method's own parameters and its copy of the shared options (trials.parquet names them plainly).
    dists = {**space.params.get(method, {}), **space.shared}
    params = [p for p in dists if p in trials.columns]
    rows = _searched_rows(trials, method, params)
    varied = [p for p in params if rows[p].nunique() > 1]
    if len(rows) < 4 or not varied:
        return []
    study = optuna.create_study(direction="minimize")
    for _, r in rows.iterrows():
        values = {p: _optuna_value(r[p], dists[p]) for p in varied}
        study.add_trial(optuna.trial.create_trial(
            params=values, distributions={p: dists[p].optuna() for p in varied},
            value=float(r["val_delta_m"])))
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), normalize=True)
    return [{"method": method, "param": p, "importance": float(v)} for p, v in found.items()]


def _optuna_value(value: Any, dist: Any) -> Any:
    if dist.distribution == "int":
        return int(value)
    if dist.distribution == "categorical":
        return value.item() if isinstance(value, np.generic) else value
    return float(value)


def plot_importance(table: pd.DataFrame, path: str | Path) -> bool:
    """``importance.png``: one bar chart of fANOVA importances per method."""
    if table.empty:
        return False
    methods = list(dict.fromkeys(table["method"]))
    ncols = min(3, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig = agg_figure(4.2 * ncols, 0.6 + 2.4 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, method in zip(axes, methods):
        mine = table[table["method"] == method].sort_values("importance")
        ax.barh(list(mine["param"]), mine["importance"].to_numpy(float), color="tab:purple")
        ax.set_xlim(0, 1)
        ax.set_title(method, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    fig.suptitle("Hyperparameter importance for val Δm (Optuna fANOVA)")
    fig.tight_layout()
    save_png(fig, path)
    return True


def plot_parallel(trials: pd.DataFrame, space: Any, path: str | Path) -> bool:
    """``parallel.png``: per method with searched hyperparameters, one line per search trial across
    its parameters (each axis from its range's low to high, log where the space is), coloured by val Δm.

    Drawn here rather than with ``optuna.visualization.matplotlib``: that goes through pyplot's global
    state (and an experimental API), while every plot of the sweep is drawn on its own Agg figure.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    panels = []
    for method in space.methods:
        dists = {**space.params.get(method, {}), **space.shared}
        params = [p for p in dists if p in trials.columns and dists[p].distribution != "categorical"]
        rows = _searched_rows(trials, method, params)
        if len(params) and len(rows) >= 2:
            panels.append((method, params, dists, rows))
    if not panels:
        return False
    fig = agg_figure(9, 2.6 * len(panels) + 0.5)
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)).ravel()
    cmap = colormaps["viridis"]  # dark: low (good) Delta-m
    for ax, (method, params, dists, rows) in zip(axes, panels):
        scaled = np.column_stack([_unit(rows[p].to_numpy(float), dists[p]) for p in params])
        score = rows["val_delta_m"].to_numpy(float)
        norm = Normalize(vmin=float(score.min()), vmax=float(score.max()) if score.max() > score.min() else None)
        x = np.arange(len(params))
        for line, value in sorted(zip(scaled, score), key=lambda lv: -lv[1]):  # best drawn last, on top
            ax.plot(x if len(params) > 1 else [0, 1], line if len(params) > 1 else [line[0]] * 2,
                    color=cmap(norm(value)), alpha=0.8, marker="o", ms=3)
        ax.set_xticks(x if len(params) > 1 else [0.5], params if len(params) > 1 else params)
        ax.set_yticks([0, 1], ["low", "high"])
        ax.set_title(f"{method}: {len(rows)} search trials", fontsize=9)
        fig.colorbar(_mappable(cmap, norm), ax=ax, label="val Δm")
    fig.suptitle("Search trials across each method's hyperparameter ranges")
    fig.tight_layout()
    save_png(fig, path)
    return True


def _unit(values: np.ndarray, dist: Any) -> np.ndarray:
    low, high = float(dist.low), float(dist.high)
    if dist.log:
        values, low, high = np.log(values), math.log(low), math.log(high)
    return (values - low) / (high - low) if high > low else np.full_like(values, 0.5)


def _mappable(cmap: Any, norm: Any) -> Any:
    from matplotlib.cm import ScalarMappable
    return ScalarMappable(norm=norm, cmap=cmap)


# -- compute and failures -------------------------------------------------------------------
def compute_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials, epochs and training seconds per phase and method (every phase, failed trials included)."""
    if trials.empty:
        return pd.DataFrame(columns=["phase", "method", "trials", "failed", "epochs", "train seconds"])
    frame = trials.assign(_failed=(trials["status"] == FAILED_STATUS).astype(int),
                          _epochs=pd.to_numeric(trials.get("epochs"), errors="coerce"),
                          _secs=pd.to_numeric(trials.get("train_seconds"), errors="coerce"))
    order = {p: i for i, p in enumerate(("potentials", "search", "seeds"))}
    table = (frame.groupby(["phase", "method"], sort=False)
             .agg(trials=("trial_id", "size"), failed=("_failed", "sum"), epochs=("_epochs", "sum"),
                  secs=("_secs", "sum")).reset_index().rename(columns={"secs": "train seconds"}))
    table = table.sort_values(["phase", "method"], key=lambda s: s.map(order).fillna(9) if s.name == "phase" else s)
    total = {"phase": "all", "method": "", "trials": int(table["trials"].sum()), "failed": int(table["failed"].sum()),
             "epochs": table["epochs"].sum(), "train seconds": table["train seconds"].sum()}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def failed_table(trials: pd.DataFrame) -> pd.DataFrame:
    failed = trials[trials["status"] == FAILED_STATUS]
    error = failed["error"] if "error" in failed else pd.Series("", index=failed.index)
    return pd.DataFrame({"phase": failed["phase"], "method": failed["method"], "trial": failed["trial_id"],
                         "seed": failed.get("seed"), "why": error.fillna("")}).reset_index(drop=True)


# -- the winner -----------------------------------------------------------------------------
def winner_commands(lb: pd.DataFrame, trials: pd.DataFrame, train: Any, sweep_config: str,
                    potentials: Mapping[str, float] | None, skip: Sequence[str] = ()) -> dict[str, str]:
    """The winner (best mean among rank 1), the methods that share its rank, and two commands: the
    whole sweep again from its saved options (``sweep_config``), and its best trial alone with
    ``amtl.train``: the sweep's training options ``train`` (a TrainConfig; ``skip`` names those the
    sweep sets itself) with the trial's searched options, seed and hyperparameters, and the
    potentials when the method reads them. Empty without a scored method."""
    from amtl.balancers.method import context_keys
    from amtl.options import to_flags
    scored = lb[lb["test_delta_m_mean"].notna()]
    if scored.empty:
        return {}
    best = scored.iloc[0]
    config = json.loads(best["best_config"]) if not is_missing(best["best_config"]) else {}
    options = {f.name for f in fields(train)}
    shared = {k: v for k, v in config.items() if k in options}
    hparams = {k: v for k, v in config.items() if k not in options}
    row = trials[trials["trial_id"].astype(str) == str(best["best_trial_id"])]
    if len(row) and "seed" in row and not is_missing(row["seed"].iloc[0]):
        shared["seed"] = int(row["seed"].iloc[0])
    command = ["python", "-m", "amtl.train", "--out", f"runs/{best['method']}-best", "--balancer", str(best["method"]),
               *to_flags(replace(train, **shared), skip=skip)]
    if hparams:
        command += ["--hparams", json.dumps(hparams, sort_keys=True)]
    if potentials and "potentials" in context_keys(str(best["method"])):
        command += ["--potentials", json.dumps(dict(sorted(potentials.items())))]
    tied = [str(m) for m, r in zip(scored["method"], scored["rank"]) if m != best["method"] and r == best["rank"]]
    return {"method": str(best["method"]), "trial": str(best["best_trial_id"]), "tied": ", ".join(tied),
            "config": json.dumps(config, indent=1, sort_keys=True),
            "sweep": shlex.join(["python", "run_sweep.py", "--config", sweep_config]), "train": shlex.join(command)}


# -- the page -------------------------------------------------------------------------------
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { font-size: 24px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f2f4f7; } td:nth-child(2), th:nth-child(2) { text-align: left; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; display: block; margin: 8px 0; } .note { color: #555; }
#configs td:last-child, #pareto td:last-child { text-align: left; max-width: 30em; font: 11px monospace;
  overflow-wrap: anywhere; }
"""


def _table(frame: pd.DataFrame, table_id: str, digits: int = 4) -> str:
    if frame.empty:
        return '<p class="note">none</p>'
    return frame.to_html(index=False, table_id=table_id, na_rep="-", escape=True, border=0,
                         float_format=lambda v: f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}")


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _leaderboard_view(lb: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as a reader wants it: one "mean ± ci" cell per score, the budget, the note."""
    view = pd.DataFrame({"rank": lb["rank"].astype(object).where(lb["rank"].notna(), "-"), "method": lb["method"],
                         "test Δm %": [mean_ci_text(m, c, 2) for m, c in zip(lb["test_delta_m_mean"],
                                                                              lb["test_delta_m_ci95"])],
                         "val Δm %": [fmt_cell(m) for m in lb["val_delta_m_mean"]], "seeds": lb["n_seeds"]})
    for col in [c for c in lb.columns if c.startswith(("test/", "kpi/", TASK_DELTA_PREFIX))
                and not c.endswith(CI_SUFFIX)]:
        label = f"{col[len(TASK_DELTA_PREFIX):]} Δm %" if col.startswith(TASK_DELTA_PREFIX) else task_label(col)
        view[label] = [mean_ci_text(m, c, 2 if col.startswith(TASK_DELTA_PREFIX) else 4)
                       for m, c in zip(lb[col], lb[col + CI_SUFFIX])]
    for col, label in (("trials", "trials"), ("failed", "failed"), ("epochs", "epochs")):
        view[label] = lb[col]
    view["compute s"] = [fmt_cell(v, 0) for v in lb["compute_seconds"]]
    if lb["note"].fillna("").astype(str).str.len().any():
        view["why unscored"] = lb["note"].fillna("")
    return view


def _configs_view(lb: pd.DataFrame) -> pd.DataFrame:
    """Each scored method's best configuration, and the trial it comes from."""
    scored = lb[lb["best_config"].notna()]
    return pd.DataFrame({"method": scored["method"], "trial": scored["best_trial_id"],
                         "scored on": scored["scored_on"], "configuration": scored["best_config"]})


def write_report(out_dir: str | Path, trials: pd.DataFrame, history: pd.DataFrame | None, lb: pd.DataFrame,
                 pairs: pd.DataFrame, hparam_columns: Sequence[str], space: Any, title: str,
                 config_text: str, winner: Mapping[str, str], note: str = "") -> Path:
    """Draw the report's plots into ``out_dir`` and write ``report.html`` there; return its path.

    ``trials`` holds every phase's rows (potentials included: they cost compute too); ``lb`` and
    ``pairs`` are the leaderboard and its paired tests; ``space`` the sweep's search space.
    """
    out = Path(out_dir)
    compared = trials[trials["phase"] != "potentials"]
    drawn = {"leaderboard.png": (out / "leaderboard.png").exists(),
             "tradeoffs.png": plot_tradeoffs(lb, out / "tradeoffs.png"),
             "pareto.png": plot_pareto(compared, out / "pareto.png")}
    importance = importances(compared, space)
    atomic_write(out / "importance.parquet", lambda tmp: importance.to_parquet(tmp, index=False))
    drawn["importance.png"] = plot_importance(importance, out / "importance.png")
    drawn["parallel.png"] = plot_parallel(compared, space, out / "parallel.png")
    weights = plot_weights_by_method(lb, compared, history, out / "weights_by_method.png")
    drawn["weights_by_method.png"] = bool(weights)
    front = pareto_set(compared, hparam_columns)
    atomic_write(out / "pareto.parquet", lambda tmp: front.to_parquet(tmp, index=False))
    compute = compute_table(trials)
    atomic_write(out / "compute.parquet", lambda tmp: compute.to_parquet(tmp, index=False))

    def figure(name: str, alt: str, missing: str) -> str:
        return _image(out / name, alt) if drawn.get(name) else f'<p class="note">{html.escape(missing)}</p>'

    sig = pairs.assign(verdict=[f"{b} better" if isinstance(b, str) else
                                ("not tested: under 2 shared seeds" if is_missing(p) else "no significant difference")
                                for b, p in zip(pairs["better"], pairs["p"])]).drop(columns=["better"])
    n_seeds = int(lb["n_seeds"].max()) if len(lb) and lb["n_seeds"].notna().any() else 0
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(compared)} trials over {compared["method"].nunique() if len(compared) else 0} '
             f'methods, {int((trials["phase"] == "potentials").sum()) if len(trials) else 0} single-task '
             f'potential runs. Δm: Delta-m on the test split in %, lower is better (0: as good as the single-task '
             f'models).</p>',
             "<h2>Leaderboard</h2>", _table(_leaderboard_view(lb), "leaderboard"),
             '<p class="note">rank: 1 + the number of methods significantly better (paired t-test on test Δm over '
             'the seeds, Holm-corrected over all pairs, p &lt; 0.05); methods that do not differ share a rank. '
             'trials, epochs, compute s: the budget each method received.' + (f" {html.escape(note)}" if note else "")
             + "</p>",
             figure("leaderboard.png", "leaderboard plot", "no leaderboard plot"),
             "<h2>Each method's best configuration</h2>", _table(_configs_view(lb), "configs")]
    parts += ["<h2>Winner</h2>"]
    if winner:
        tied = (f" It is not significantly better than {html.escape(winner['tied'])}, which share its rank: more "
                f"seeds (--seeds) could separate them." if winner.get("tied") else "")
        parts += [f"<p>{html.escape(winner['method'])}: the best mean test Δm.{tied} Its best trial: "
                  f"{html.escape(winner['trial'])}, configuration:</p><pre>{html.escape(winner['config'])}</pre>",
                  f"<p>The whole sweep again:</p><pre>{html.escape(winner['sweep'])}</pre>",
                  f"<p>The winner's best trial alone:</p><pre>{html.escape(winner['train'])}</pre>"]
    else:
        parts.append('<p class="note">no method has a successful run</p>')
    parts += ["<h2>Significance</h2>",
              '<p class="note">' + ("One seed per method: no pairwise test is possible, so every scored method "
                                    "shares rank 1; run with --seeds 2 or more for a verdict." if n_seeds < 2 else
                                    "Paired two-sided t-test on test Δm over the seeds both methods ran (a seed's two "
                                    "runs share initial weights and batches), Holm-corrected over all pairs.")
              + "</p>", _table(sig, "significance"),
              "<h2>Where each Delta-m comes from</h2>",
              figure("tradeoffs.png", "per-task delta-m", "the trials reported no per-task Delta-m"),
              "<h2>Trade-offs between tasks and the Pareto set</h2>",
              figure("pareto.png", "pareto scatter", "fewer than two tasks, or no finished trial"),
              '<p class="note">The Pareto set: finished search trials that no other beats on every task\'s val KPI '
              '(selection by val; test Δm shown for reference).</p>', _table(front, "pareto"),
              "<h2>What mattered</h2>",
              figure("importance.png", "hyperparameter importance",
                     "no method had 4 or more search trials with a hyperparameter that varied"),
              figure("parallel.png", "parallel coordinates", "no method searched a numeric hyperparameter"),
              "<h2>Task weights over training</h2>",
              figure("weights_by_method.png", "task weights", "no trial logged task weights"),
              "<h2>Compute</h2>", _table(compute, "compute", digits=1),
              "<h2>Failed trials</h2>", _table(failed_table(trials), "failed"),
              "<h2>Options</h2>", f"<pre>{html.escape(config_text)}</pre>",
              # Lets a test in a real browser see that every embedded image decoded, and where the
              # leaderboard was laid out (to look for it in a screenshot).
              "<script>addEventListener('load', () => { const imgs = [...document.images], b = document.body.dataset; "
              "b.imagesDecoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length; b.images = imgs.length; "
              "const t = document.getElementById('leaderboard'); if (!t) return; const r = t.getBoundingClientRect(); "
              "b.leaderboardBox = [r.left, r.top, r.right, r.bottom].map(Math.round).join(','); });</script>",
              "</body></html>\n"]
    path = out / "report.html"
    text = "\n".join(parts)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
