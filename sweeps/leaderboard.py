"""Turn a sweep's trial table into a fair leaderboard: one row per method, ranked only where it is earned.

Input is the sweep's trial table (one row per trial, see :func:`build_leaderboard`) and, for the
weights plot, its long-format epoch history. Outputs are ``leaderboard.parquet``, ``leaderboard.md``,
``leaderboard.png`` and ``weights.png`` (:func:`write_outputs`). Delta-m is lower-is-better
(:func:`amtl.tasks.delta_m`).

Which rows score a method
    Phase ``"potentials"`` rows are never counted (not in scores, ``trials``, ``failed`` nor
    ``compute_seconds``): they calibrate AMTL, they do not compare balancers. When a method has
    successful ``"seeds"`` rows (its best configuration rerun with K seeds) those score it; otherwise
    its single successful search row with the lowest ``val_delta_m`` does (selection on val, report
    on test, so the test split never picks a winner).

Confidence interval
    ``test_delta_m_ci95`` is the half-width of the two-sided 95% Student-t interval of the mean,
    ``t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation. With one seed there is
    no variance estimate, so half-width, low and high are NaN (not 0: 0 would claim certainty).

Rank
    Rows are sorted by ``test_delta_m_mean`` (best first). A method's ``rank`` is 1 + the number of
    methods significantly better than it (:func:`paired_tests`): every pair of methods is compared
    on test Delta-m over the seeds both ran, by a paired t-test, and the p-values of all pairs are
    Holm-corrected together; a pair differs when its corrected p is below ``ALPHA``. Methods that do
    not differ share a rank, and ranks can skip (1, 1, 3). The seeds phase runs every method with the
    same seeds (same initial weights, same batches), so the differences are paired: the test sees a
    consistent gap that overlapping intervals hide. A method with a single scored run cannot be
    tested: it neither beats nor is beaten. Methods with no successful run get NaN scores, a missing
    rank and sit at the bottom.

Per-task columns
    ``test/<task>/<kpi>``: the mean over the scoring rows of each task's test-split KPI (the metric
    the balancers read, e.g. ``segmentation/miou``), so the per-task view comes from the same split
    as the Delta-m it explains. The KPI metric of a task is found from the data: it is the
    ``val/<task>/<metric>`` column equal to ``kpi/<task>`` (how the trainer defines KPIs), or given
    with ``kpi_metrics``. When no test column can be matched the column is ``kpi/<task>`` (val KPI).
    Each has a ``<column>_ci95`` beside it: the same interval as Delta-m's, over the same rows.
    ``delta/<task>`` (when the trials report it): the task's own test Delta-m, where the method's
    Delta-m comes from, with its interval too.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sweeps.trial import TASK_DELTA_PREFIX

OK_STATUS = "TERMINATED"
FAILED_STATUS = "ERROR"
STOPPED_STATUS = "STOPPED"  # ended early by the scheduler (ASHA)
CI_SUFFIX = "_ci95"  # beside each per-task column: its 95% interval's half-width
# Columns a caller might list as hyperparameters by mistake; they differ between seed reruns of
# one configuration, so grouping by them would split a configuration.
_NOT_HPARAMS = {"seed", "trial_id", "phase", "method", "status", "error", "node_id", "train_seconds"}
# Saved PNG metadata names the matplotlib version by default; drop it so bytes depend on data only.
_PNG_META = {"Software": None}


# -- statistics -----------------------------------------------------------------------------
@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """Quantile ``t_{p, df}`` of Student's t distribution (e.g. ``t_quantile(0.975, 2) = 4.3027``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    return float(stats.t.ppf(p, df))


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of the finite ``values``; half-width NaN for n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    return float(x.mean()), t_quantile(0.975, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


#: Family-wise error rate of the pairwise comparisons that decide ranks (after Holm's correction).
ALPHA = 0.05


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values; a NaN (a pair that could not be tested) is left out of the
    family and stays NaN. (statsmodels has it, but is not worth a dependency for these lines.)"""
    p = np.asarray(p, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for k, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - k) * p[i]))  # step-down, kept monotone
        adjusted[i] = running
    return adjusted


def paired_tests(scores: Mapping[str, pd.Series]) -> pd.DataFrame:
    """Every pair of methods compared on their scores (``{method: test Delta-m by seed}``).

    A two-sided paired t-test over the seeds both ran (``scipy.stats.ttest_rel``): the seeds phase
    gives every method the same seeds, so a seed's two runs share initial weights and batches. With
    so few seeds a rank test cannot reach 5% (Wilcoxon needs six pairs), so the t-test it is. Fewer
    than two shared seeds: not tested (NaN). Differences that are all equal and not zero have
    t = +-inf, p = 0. Columns: ``method_a``, ``method_b``, ``pairs``, ``mean_diff`` (a - b; negative:
    a is better), ``t``, ``p``, ``p_holm`` (over all tested pairs) and ``better`` (the method that is
    significantly better at ``ALPHA``, or missing).
    """
    records = []
    for a, b in itertools.combinations(sorted(scores), 2):
        both = pd.concat([scores[a].rename("a"), scores[b].rename("b")], axis=1, join="inner").dropna()
        diff = (both["a"] - both["b"]).to_numpy(float)
        t = p = math.nan
        if len(diff) >= 2 and np.all(diff == diff[0]):
            t, p = (math.copysign(math.inf, diff[0]), 0.0) if diff[0] != 0 else (0.0, 1.0)
        elif len(diff) >= 2:
            result = stats.ttest_rel(both["a"], both["b"])
            t, p = float(result.statistic), float(result.pvalue)
        records.append({"method_a": a, "method_b": b, "pairs": len(diff),
                        "mean_diff": float(diff.mean()) if len(diff) else math.nan, "t": t, "p": p})
    columns = ["method_a", "method_b", "pairs", "mean_diff", "t", "p", "p_holm", "better"]
    if not records:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    pairs = pd.DataFrame.from_records(records)
    pairs["p_holm"] = holm(pairs["p"])
    pairs["better"] = [(r.method_a if r.mean_diff < 0 else r.method_b) if r.p_holm < ALPHA else None
                       for r in pairs.itertuples()]
    return pairs[columns]


def method_scores(trials: pd.DataFrame, hparam_columns: list[str]) -> dict[str, pd.Series]:
    """Each method's scoring test Delta-m by seed (the rows :func:`build_leaderboard` scores it by)."""
    hparams = [c for c in hparam_columns if c in trials.columns and c not in _NOT_HPARAMS]
    rows_all = trials[trials["phase"] != "potentials"]
    return {str(m): _scores_by_seed(_scoring_rows(rows, hparams)[0]) for m, rows in rows_all.groupby("method")}


def _ranks(methods: Sequence[str], pairs: pd.DataFrame, scored: Sequence[bool]) -> list[int | None]:
    """1 + the number of methods significantly better than each one; None without a score."""
    beaten = {m: 0 for m in methods}
    for r in pairs.itertuples():
        if pd.notna(r.better):
            beaten[r.method_b if r.better == r.method_a else r.method_a] += 1
    return [1 + beaten[m] if ok else None for m, ok in zip(methods, scored)]


def _scores_by_seed(scoring: pd.DataFrame) -> pd.Series:
    """A method's scoring test Delta-m by seed (a seed scored twice: its mean)."""
    if "seed" not in scoring.columns or scoring.empty:
        return pd.Series(dtype=float)
    values = pd.to_numeric(scoring["test_delta_m"], errors="coerce")
    return values.groupby(scoring["seed"]).mean().dropna()


# -- selection ------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-friendly Python scalar (numpy ints/floats/bools become their Python counterparts)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        # Float columns hold ints next to NaN (e.g. a batch size); 2 reads better than 2.0.
        return int(value)
    return value


def is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists/dicts in a column: present
        return False


def config_json(row: Mapping[str, Any], hparam_columns: Iterable[str]) -> str:
    """JSON (sorted keys) of the row's hyperparameters that are set (non-NaN)."""
    cfg = {c: _plain(row[c]) for c in hparam_columns if c in row and not is_missing(row[c])}
    return json.dumps(cfg, sort_keys=True, default=str)


def _infer_kpi_metrics(trials: pd.DataFrame) -> dict[str, str]:
    """``{task: metric}`` whose ``val/<task>/<metric>`` equals ``kpi/<task>`` wherever both are set."""
    found: dict[str, str] = {}
    for col in trials.columns:
        if not col.startswith("kpi/"):
            continue
        task = col[len("kpi/"):]
        kpi = pd.to_numeric(trials[col], errors="coerce")
        prefix = f"val/{task}/"
        for vcol in sorted(c for c in trials.columns if c.startswith(prefix)):
            val = pd.to_numeric(trials[vcol], errors="coerce")
            both = kpi.notna() & val.notna()
            if both.any() and np.allclose(kpi[both], val[both], rtol=1e-9, atol=1e-12):
                found[task] = vcol[len(prefix):]
                break
    return found


def _task_columns(trials: pd.DataFrame, kpi_metrics: Mapping[str, str] | None) -> dict[str, str]:
    """``{task: column}`` of the per-task score to report (test KPI where known, else val KPI)."""
    tasks = sorted({c.split("/")[1] for c in trials.columns if c.startswith("kpi/")}
                   | set(kpi_metrics or {}))
    metrics = {**_infer_kpi_metrics(trials), **(kpi_metrics or {})}
    out: dict[str, str] = {}
    for task in tasks:
        test_col = f"test/{task}/{metrics.get(task, '')}"
        if task in metrics and test_col in trials.columns:
            out[task] = test_col
        elif f"kpi/{task}" in trials.columns:
            out[task] = f"kpi/{task}"
    return out


def _scoring_rows(rows: pd.DataFrame, hparams: list[str]) -> tuple[pd.DataFrame, str]:
    """The rows that score one method and which phase they come from ("seeds", "search" or "")."""
    ok = rows[(rows["status"] == OK_STATUS) & pd.to_numeric(rows["test_delta_m"], errors="coerce").notna()]
    seeds = ok[ok["phase"] == "seeds"]
    if len(seeds):
        # The seeds phase reruns one configuration; if a resumed sweep left two, keep the one with
        # the most seeds (then the better mean val Delta-m) rather than mixing configurations.
        keys = seeds.apply(lambda r: config_json(r, hparams), axis=1)
        groups = sorted(seeds.groupby(keys, sort=True),
                        key=lambda kv: (-len(kv[1]), kv[1]["val_delta_m"].mean(), kv[0]))
        return groups[0][1], "seeds"
    search = ok[(ok["phase"] != "seeds") & pd.to_numeric(ok["val_delta_m"], errors="coerce").notna()]
    if len(search):
        # Lowest val Delta-m; trial_id breaks ties so the choice does not depend on row order.
        best = search.assign(_v=search["val_delta_m"].astype(float),
                             _id=search["trial_id"].astype(str)).sort_values(["_v", "_id"]).head(1)
        return best.drop(columns=["_v", "_id"]), "search"
    return rows.iloc[0:0], ""


def _why_unscored(rows: pd.DataFrame) -> str:
    """Why a method has no scored run, in the words a reader needs."""
    if rows.empty:
        return "never sampled"
    failed = rows[rows["status"] == FAILED_STATUS]
    stopped = rows[rows["status"] == STOPPED_STATUS]
    parts = []
    if len(failed):
        errors = failed["error"].dropna().astype(str) if "error" in failed else pd.Series(dtype=str)
        first = f": {errors.iloc[0]}" if len(errors) else ""
        parts.append(f"{len(failed)} of {len(rows)} trial(s) failed{first}")
    if len(stopped):
        parts.append(f"{len(stopped)} of {len(rows)} trial(s) stopped early by the scheduler")
    return "; ".join(parts) or "no trial reported test metrics"


def build_leaderboard(trials: pd.DataFrame, hparam_columns: list[str],
                      kpi_metrics: Mapping[str, str] | None = None, methods: Sequence[str] = ()) -> pd.DataFrame:
    """One row per method (phase "potentials" excluded), sorted best first; see the module docstring.

    ``trials`` needs ``trial_id``, ``phase``, ``method``, ``status``, ``val_delta_m``,
    ``test_delta_m``; ``train_seconds``, ``kpi/<task>`` and ``val|test/<task>/<metric>`` are used
    when present. ``kpi_metrics`` (``{task: metric}``) overrides the KPI metric found from the data.

    Columns: ``method``, ``rank`` (nullable Int64), ``n_seeds``, ``test_delta_m_mean``,
    ``test_delta_m_ci95``, ``test_delta_m_low``, ``test_delta_m_high``, ``val_delta_m_mean``, the
    per-task ``test/<task>/<kpi>`` (or ``kpi/<task>``) means, ``best_config`` (JSON, missing without a
    successful run), ``best_trial_id`` (the scoring trial with the lowest val Delta-m),
    ``scored_on`` ("seeds", "search" or ""), and the budget the method received: ``trials``,
    ``failed``, ``epochs`` (trained, over all its trials), ``compute_seconds``; ``note`` says why a
    method has no score. ``methods`` (the sweep's) adds a row for a method that has no trial at all.
    """
    required = {"trial_id", "phase", "method", "status", "val_delta_m", "test_delta_m"}
    missing = sorted(required - set(trials.columns))
    if missing:
        raise KeyError(f"trial table lacks columns {missing}")
    hparams = [c for c in hparam_columns if c in trials.columns and c not in _NOT_HPARAMS]
    rows_all = trials[trials["phase"] != "potentials"]
    task_cols = _task_columns(rows_all, kpi_metrics)
    delta_cols = sorted(c for c in rows_all.columns if c.startswith(TASK_DELTA_PREFIX))
    records: list[dict[str, Any]] = []
    scores: dict[str, pd.Series] = {}
    groups = dict(iter(rows_all.groupby("method", sort=True)))
    for method in methods:
        groups.setdefault(method, rows_all.iloc[0:0])
    for method, rows in sorted(groups.items()):
        scoring, source = _scoring_rows(rows, hparams)
        scores[str(method)] = _scores_by_seed(scoring)
        mean, ci = mean_ci95(scoring["test_delta_m"].astype(float))
        rec: dict[str, Any] = {
            "method": str(method),
            "n_seeds": len(scoring),
            "test_delta_m_mean": mean,
            "test_delta_m_ci95": ci,
            "test_delta_m_low": mean - ci,
            "test_delta_m_high": mean + ci,
            "val_delta_m_mean": float(scoring["val_delta_m"].astype(float).mean()) if len(scoring) else math.nan,
        }
        for col in [*task_cols.values(), *delta_cols]:
            values = pd.to_numeric(scoring[col], errors="coerce").dropna()
            rec[col], rec[col + CI_SUFFIX] = mean_ci95(values) if len(values) else (math.nan, math.nan)
        if len(scoring):
            best = scoring.assign(_v=scoring["val_delta_m"].astype(float),
                                  _id=scoring["trial_id"].astype(str)).sort_values(["_v", "_id"]).iloc[0]
            rec["best_config"] = config_json(best, hparams)
            rec["best_trial_id"] = str(best["trial_id"])
        else:
            rec["best_config"] = None
            rec["best_trial_id"] = None
        rec["scored_on"] = source
        rec["trials"] = len(rows)
        rec["failed"] = int((rows["status"] == FAILED_STATUS).sum())
        epochs = rows["epochs"] if "epochs" in rows else pd.Series(dtype=float)
        rec["epochs"] = int(pd.to_numeric(epochs, errors="coerce").fillna(0).sum())
        secs = rows["train_seconds"] if "train_seconds" in rows else pd.Series(dtype=float)
        rec["compute_seconds"] = float(pd.to_numeric(secs, errors="coerce").sum())  # failed trials cost too
        rec["note"] = "" if len(scoring) else _why_unscored(rows)
        records.append(rec)
    columns = ["method", "rank", "n_seeds", "test_delta_m_mean", "test_delta_m_ci95", "test_delta_m_low",
               "test_delta_m_high", "val_delta_m_mean",
               *(c for col in [*task_cols.values(), *delta_cols] for c in (col, col + CI_SUFFIX)),
               "best_config", "best_trial_id", "scored_on", "trials", "failed", "epochs", "compute_seconds", "note"]
    if not records:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    lb = pd.DataFrame.from_records(records)
    scored = lb["test_delta_m_mean"].notna().tolist()
    lb["rank"] = pd.array(_ranks(list(lb["method"]), paired_tests(scores), scored), dtype="Int64")
    # Best mean first; unscored methods last; method name makes the order total.
    lb = lb.sort_values(["test_delta_m_mean", "method"], na_position="last", kind="mergesort")
    return lb[columns].reset_index(drop=True)


# -- markdown -------------------------------------------------------------------------------
def fmt_cell(value: Any, digits: int = 2) -> str:
    if is_missing(value):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _task_score_columns(lb: pd.DataFrame) -> list[str]:
    return [c for c in lb.columns if c.startswith(("test/", "kpi/")) and not c.endswith(CI_SUFFIX)]


def mean_ci_text(mean: Any, ci: Any, digits: int) -> str:
    if is_missing(mean):
        return "-"
    return f"{mean:.{digits}f} ± " + ("n/a" if is_missing(ci) else f"{ci:.{digits}f}")


def task_label(col: str) -> str:
    """``test/depth/delta1`` -> ``depth delta1``; ``kpi/depth`` -> ``depth (val KPI)``."""
    parts = col.split("/")
    return f"{parts[1]} {'/'.join(parts[2:])}" if parts[0] == "test" else f"{parts[1]} (val KPI)"


def to_markdown(lb: pd.DataFrame, note: str = "") -> str:
    """Leaderboard as an aligned markdown table (readable in a terminal too), plus a legend line and
    ``note`` (e.g. that a joint search gave the methods unequal budgets)."""
    task_cols = _task_score_columns(lb)
    header = ["rank", "method", "test Δm (mean ± ci95)", "val Δm", "seeds",
              *(f"{task_label(c)} (± ci95)" for c in task_cols),
              "trials", "failed", "epochs", "compute s", "best config"]
    body: list[list[str]] = []
    for _, r in lb.iterrows():
        dm = mean_ci_text(r["test_delta_m_mean"], r["test_delta_m_ci95"], 2)
        cfg = f"`{r['best_config']}`" if not is_missing(r["best_config"]) else "-"
        if not is_missing(r.get("note")) and r.get("note"):
            cfg = f"({r['note']})"
        body.append([fmt_cell(r["rank"]), str(r["method"]), dm, fmt_cell(r["val_delta_m_mean"]),
                     fmt_cell(r["n_seeds"]),
                     *(mean_ci_text(r[c], r.get(c + CI_SUFFIX), 4) for c in task_cols), fmt_cell(r["trials"]),
                     fmt_cell(r["failed"]), fmt_cell(r.get("epochs")), fmt_cell(r.get("compute_seconds"), 0), cfg])
    table = markdown_table(header, body, numeric={0, 2, 3, 4, *range(5, 9 + len(task_cols))})
    legend = ("Δm: Delta-m on test in %, lower is better. ci95: half-width of the 95% t-interval over seeds "
              "(n/a with one run). rank: 1 + number of methods significantly better (paired t-test over the "
              "seeds, Holm-corrected over all pairs, p < 0.05; significance.md); methods that do not differ "
              "share a rank. trials, epochs, compute s: the budget each method received (search and seeds).")
    return "\n".join([*table, "", legend, *([note] if note else [])]) + "\n"


def markdown_table(header: list[str], body: list[list[str]], numeric: set[int]) -> list[str]:
    """Lines of an aligned markdown table (readable in a terminal too); ``numeric`` columns right-aligned."""
    # A literal "|" inside a cell would end the cell in markdown.
    body = [[cell.replace("|", "\\|") for cell in row] for row in body]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join((("-" * (w + 1)) + ":") if i in numeric else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *(line(r) for r in body)]


def _p_value(value: Any) -> str:
    return "-" if is_missing(value) else f"{value:.3g}"


def significance_markdown(pairs: pd.DataFrame) -> str:
    """``significance.md``: every pair of methods, its paired test and the verdict the ranks use."""
    header = ["method a", "method b", "seeds", "mean Δm a - b", "t", "p", "p (Holm)", "verdict"]
    body = []
    for r in pairs.itertuples():
        verdict = (f"{r.better} better" if pd.notna(r.better) else
                   "not tested (fewer than 2 shared seeds)" if pd.isna(r.p) else "no significant difference")
        body.append([str(r.method_a), str(r.method_b), fmt_cell(r.pairs), fmt_cell(r.mean_diff), fmt_cell(r.t),
                     _p_value(r.p), _p_value(r.p_holm), verdict])
    legend = (f"Paired two-sided t-test on test Delta-m over the seeds both methods ran (same seed: same initial "
              f"weights and batches); p-values Holm-corrected over all tested pairs; a verdict needs p (Holm) < "
              f"{ALPHA}. The leaderboard's rank is 1 + the number of methods significantly better.")
    return "\n".join([*markdown_table(header, body, numeric={2, 3, 4, 5, 6}), "", legend]) + "\n"


# -- plots ----------------------------------------------------------------------------------
def agg_figure(width: float, height: float) -> Figure:
    """A Figure on the Agg canvas: headless, deterministic, and no pyplot state or global backend switch."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> None:
    """Save atomically: a reader never sees a half-written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata=_PNG_META))


def plot_leaderboard(lb: pd.DataFrame, path: str | Path) -> None:
    """``leaderboard.png``: test Delta-m mean ± ci95 per method (left) and per-task KPIs (right),
    from ``lb`` alone, so it shows exactly the numbers of the table."""
    task_cols = _task_score_columns(lb)
    n = max(len(lb), 1)
    fig = agg_figure(13 if task_cols else 7, 1.2 + 0.45 * n)
    axes = fig.subplots(1, 2 if task_cols else 1, squeeze=False)
    y = np.arange(len(lb))[::-1]  # best (first row) on top
    labels = [f"{m}  (failed)" if is_missing(r) else f"{m}  (#{r})" for m, r in zip(lb["method"], lb["rank"])]
    ax = axes[0, 0]
    mean = lb["test_delta_m_mean"].to_numpy(float)
    ci = lb["test_delta_m_ci95"].to_numpy(float)
    has_ci = ~np.isnan(ci)
    ax.errorbar(mean[has_ci], y[has_ci], xerr=ci[has_ci], fmt="o", color="tab:blue", capsize=4,
                label="mean ± 95% CI")
    single = ~has_ci & ~np.isnan(mean)
    if single.any():
        ax.plot(mean[single], y[single], "o", mfc="none", color="tab:orange", label="single run (no CI)")
    for yi, m in zip(y, mean):
        if np.isnan(m):
            ax.text(0.01, yi, "no successful run", transform=ax.get_yaxis_transform(), va="center",
                    color="tab:red", fontsize=9)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")  # 0 = as good as single-task models
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.7, len(lb) - 0.3)
    ax.set_xlabel("test Δm (%)  — lower is better")
    ax.set_title("Delta-m per method (rank in parentheses)")
    ax.grid(axis="x", alpha=0.3)
    if len(lb):
        ax.legend(loc="best", fontsize=8)
    if task_cols:
        ax2 = axes[0, 1]
        height = 0.8 / len(task_cols)
        for k, col in enumerate(task_cols):
            vals = lb[col].to_numpy(float)
            ax2.barh(y + 0.4 - height * (k + 0.5), np.nan_to_num(vals), height=height, label=task_label(col))
        ax2.set_yticks(y, list(lb["method"]))
        ax2.set_ylim(-0.7, len(lb) - 0.3)
        ax2.set_xlabel("KPI (higher is better)")
        ax2.set_title("per-task KPI (mean over scored runs)")
        ax2.grid(axis="x", alpha=0.3)
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def plot_weights(history: pd.DataFrame, trial_id: Any, path: str | Path, method: str | None = None) -> None:
    """``weights.png``: task weights over epochs for one trial, with its val KPIs below when logged."""
    rows = history[history["trial_id"].astype(str) == str(trial_id)].sort_values("epoch")
    wcols = sorted(c for c in rows.columns if c.startswith("weight/") and rows[c].notna().any())
    if rows.empty or not wcols:
        raise ValueError(f"no task-weight history for trial {trial_id!r}")
    kcols = sorted(c for c in rows.columns if c.startswith("kpi/") and rows[c].notna().any())
    fig = agg_figure(8, 7 if kcols else 4)
    axes = fig.subplots(2 if kcols else 1, 1, sharex=True, squeeze=False)
    epochs = rows["epoch"].to_numpy(float)
    ax = axes[0, 0]
    for c in wcols:
        ax.plot(epochs, rows[c].to_numpy(float), marker="o", ms=3, label=c.split("/", 1)[1])
    title = f"task weights — trial {trial_id}"
    if method is None and "method" in rows.columns and rows["method"].notna().any():
        method = str(rows["method"].dropna().iloc[0])
    if method:
        title += f" ({method})"
    ax.set_title(title)
    ax.set_ylabel("weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if kcols:
        axk = axes[1, 0]
        for c in kcols:
            axk.plot(epochs, rows[c].to_numpy(float), marker="o", ms=3, label=c.split("/", 1)[1])
        axk.set_ylabel("val KPI")
        axk.grid(alpha=0.3)
        axk.legend(fontsize=8)
    axes[-1, 0].set_xlabel("epoch")
    fig.tight_layout()
    save_png(fig, path)


# -- outputs --------------------------------------------------------------------------------
def atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def logged_weight_trials(history: pd.DataFrame | None) -> set[str]:
    """Ids of the trials whose history holds task weights."""
    if history is None or history.empty or "trial_id" not in history:
        return set()
    wcols = [c for c in history.columns if c.startswith("weight/")]
    if not wcols:
        return set()
    return set(history.loc[history[wcols].notna().any(axis=1), "trial_id"].astype(str))


def weights_trial_of(method: str, lb: pd.DataFrame, trials: pd.DataFrame, logged: set[str]) -> str | None:
    """The trial of ``method`` whose task weights to show: its scoring trial when that logged weights,
    else its logged trial with the lowest val Delta-m; None when none logged any. ``logged``: the
    trials with weight history (:func:`logged_weight_trials`)."""
    if not logged:
        return None
    best = lb.loc[lb["method"] == method, "best_trial_id"]
    if len(best) and not is_missing(best.iloc[0]) and str(best.iloc[0]) in logged:
        return str(best.iloc[0])
    mine = trials[(trials["method"] == method) & (trials["phase"] != "potentials")
                  & trials["trial_id"].astype(str).isin(logged)]
    if mine.empty:
        return None
    mine = mine.assign(_v=pd.to_numeric(mine["val_delta_m"], errors="coerce"), _id=mine["trial_id"].astype(str))
    return str(mine.sort_values(["_v", "_id"], na_position="last")["_id"].iloc[0])


def _weights_trial(lb: pd.DataFrame, trials: pd.DataFrame, history: pd.DataFrame) -> tuple[str, str] | None:
    """The trial whose weights to plot: best-scoring ``amtl*`` method first, then any method."""
    ranked = [str(m) for m in lb["method"]]  # already best first
    logged = logged_weight_trials(history)
    for method in [m for m in ranked if m.startswith("amtl")] + [m for m in ranked if not m.startswith("amtl")]:
        trial = weights_trial_of(method, lb, trials, logged)
        if trial is not None:
            return trial, method
    return None


def write_outputs(trials: pd.DataFrame, history: pd.DataFrame | None, out_dir: str | Path,
                  hparam_columns: list[str], kpi_metrics: Mapping[str, str] | None = None,
                  methods: Sequence[str] = (), note: str = "") -> pd.DataFrame:
    """Write ``leaderboard.{parquet,md,png}`` (and ``weights.png`` when weight history exists); return the leaderboard.

    ``weights.png`` shows the best-scoring ``amtl*`` method's scoring trial (or its best logged
    trial), else the best method with logged weights; an old ``weights.png`` is left as it is.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lb = build_leaderboard(trials, hparam_columns, kpi_metrics, methods)
    atomic_write(out / "leaderboard.parquet", lambda tmp: lb.to_parquet(tmp, index=False))
    text = to_markdown(lb, note)
    atomic_write(out / "leaderboard.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    pairs = paired_tests(method_scores(trials, hparam_columns))
    atomic_write(out / "significance.parquet", lambda tmp: pairs.to_parquet(tmp, index=False))
    significance = significance_markdown(pairs)
    atomic_write(out / "significance.md", lambda tmp: tmp.write_text(significance, encoding="utf-8"))
    plot_leaderboard(lb, out / "leaderboard.png")
    pick = _weights_trial(lb, trials, history) if history is not None else None
    if pick is not None:
        plot_weights(history, pick[0], out / "weights.png", method=pick[1])
    return lb
