"""End-to-end sweeps on a real local Ray cluster, real Optuna and real W&B offline runs."""
import dataclasses
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from amtl.tasks import delta_m, directions, make_task
from sweeps.runner import SweepOptions, run
from sweeps.wandb_offline import find_offline_runs, read_offline_run

TASKS = ["segmentation", "depth"]
TINY = dict(tasks=TASKS, image_size=32, n_train=64, n_val=16, n_test=16, batch_size=16, epochs=2,
            max_concurrent=2, seed=0, reference="none")


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory, monkeypatch_module):
    """One small sweep: potentials for 2 tasks, 2 AMTL search trials, best config over 2 seeds."""
    storage = tmp_path_factory.mktemp("sweeps")
    options = SweepOptions.of(methods=["amtl"], samples=2, seeds=2, storage=str(storage), name="first", **TINY)
    messages = []
    board = run(options, say=messages.append)
    return {"storage": storage, "dir": storage / "first", "board": board, "messages": messages, "options": options}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.delenv("WANDB_API_KEY", raising=False)  # offline W&B, whatever the machine has
    yield mp
    mp.undo()


def trials(sweep) -> pd.DataFrame:
    return pd.read_parquet(sweep["dir"] / "trials.parquet")


def test_trials_parquet_has_one_row_per_trial_with_the_columns(sweep):
    frame = trials(sweep)
    assert frame["trial_id"].is_unique
    assert frame.groupby("phase").size().to_dict() == {"potentials": 2, "search": 2, "seeds": 2}
    required = {"trial_id", "phase", "method", "seed", "status", "focusing", "margin", "lr", "val_delta_m",
                "test_delta_m", "kpi/segmentation", "kpi/depth", "val/depth/abs_err", "test/segmentation/miou",
                "node_id", "train_seconds"}
    assert required <= set(frame.columns)
    # ASHA may stop a weak search trial early (STOPPED: no test metrics); everything else finishes.
    finishing = frame[frame["phase"] != "search"]
    assert (finishing["status"] == "TERMINATED").all(), frame[["phase", "status", "error"]]
    search = frame[frame["phase"] == "search"]
    assert set(search["status"]) <= {"TERMINATED", "STOPPED"} and (search["status"] == "TERMINATED").any()
    assert search.loc[search["status"] == "STOPPED", "test_delta_m"].isna().all()
    assert search["focusing"].notna().all() and search["margin"].between(0, 0.2).all()
    assert (frame["train_seconds"] > 0).all()
    seeds = frame[frame["phase"] == "seeds"]
    assert sorted(seeds["seed"]) == [0, 1]


def test_potentials_feed_amtl_and_delta_m(sweep):
    frame = trials(sweep)
    potentials = pd.read_parquet(sweep["storage"] / "potentials.parquet")
    assert sorted(potentials["task"]) == sorted(TASKS)
    state = json.loads((sweep["dir"] / "state.json").read_text())
    expected = dict(zip(potentials["task"], potentials["potential"]))
    assert state["potentials"]["potentials"] == pytest.approx(expected)
    # The single-task val metrics are the Delta-m baselines: recompute Delta-m of a search trial.
    tasks = [make_task(t, num_classes=6) for t in TASKS]
    baselines = state["potentials"]["baselines"]
    for _, row in frame[frame["phase"] != "potentials"].iterrows():
        val = {k[len("val/"):]: row[k] for k in frame.columns if k.startswith("val/") and pd.notna(row[k])}
        assert row["val_delta_m"] == pytest.approx(delta_m(val, baselines["val"], directions(tasks)))
    # Every AMTL trial received those potentials (W&B config of each trial run).
    runs = [read_offline_run(p) for p in find_offline_runs(sweep["dir"] / "wandb")]
    amtl_runs = [r for r in runs if r.job_type in ("search", "seeds")]
    assert len(amtl_runs) == (frame["phase"] != "potentials").sum()  # trials ASHA stopped too
    for r in amtl_runs:
        assert r.config["balancer"] == "amtl"
        assert r.config["potentials/segmentation"] == pytest.approx(expected["segmentation"])


def test_wandb_offline_runs_hold_history_and_the_leaderboard_table(sweep):
    runs = [read_offline_run(p) for p in find_offline_runs(sweep["dir"] / "wandb")]
    by_type = {}
    for r in runs:
        by_type.setdefault(r.job_type, []).append(r)
    assert len(by_type["potentials"]) == 2 and len(by_type["leaderboard"]) == 1
    frame = trials(sweep).set_index("trial_id")
    finished = [r for r in by_type["search"] + by_type["seeds"] if frame.loc[r.run_id, "status"] == "TERMINATED"]
    assert len(finished) == (frame["status"] == "TERMINATED").sum() - 2  # all but the potentials
    for r in finished:
        assert r.group == "first" and r.tags == ["amtl"]
        epochs = [h for h in r.history if "val/segmentation/miou" in h]
        assert [h["epoch"] for h in epochs] == [1, 2]
        assert all("weight/depth" in h and "kpi/depth" in h for h in epochs)
        assert epochs[-1]["val/depth/abs_err"] == pytest.approx(frame.loc[r.run_id, "val/depth/abs_err"])
        assert r.summary["test_delta_m"] == pytest.approx(frame.loc[r.run_id, "test_delta_m"])
    # A trial ASHA stopped is killed with its processes: the epochs it reported are in its run all the same.
    history = pd.read_parquet(sweep["dir"] / "history.parquet")
    for r in by_type["search"] + by_type["seeds"]:
        reported = set(history.loc[history["trial_id"] == r.run_id, "epoch"])
        logged = {h["epoch"] for h in r.history if "val/segmentation/miou" in h}
        assert reported and reported <= logged, (r.run_id, frame.loc[r.run_id, "status"], reported, logged)
    table = by_type["leaderboard"][0].tables["leaderboard"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["method"] for row in rows] == ["amtl"]
    assert rows[0]["test_delta_m_mean"] == pytest.approx(sweep["board"]["test_delta_m_mean"].iloc[0])
    # The report's tables and plots too (one method: no pair to test, so no significance table).
    board_run = by_type["leaderboard"][0]
    pareto = board_run.tables["pareto"]
    assert sorted(dict(zip(pareto["columns"], row))["trial_id"] for row in pareto["data"]) == \
        sorted(pd.read_parquet(sweep["dir"] / "pareto.parquet")["trial_id"])
    assert "compute" in board_run.tables
    media = " ".join(board_run.files)
    for name in ("leaderboard", "tradeoffs", "pareto", "weights_by_method"):
        assert f"media/images/{name}_" in media, (name, board_run.files)
    assert "media/html/report_" in media


def test_every_trial_of_every_phase_gets_a_complete_spec_from_its_phase(sweep):
    """A trial's Tune config is one complete TrialSpec that its phase built (search values, the seed,
    the potentials applied); the trial itself merges nothing."""
    from amtl.trainer import TrainConfig
    from sweeps.trial import TrialSpec

    specs: dict[str, list[TrialSpec]] = {}
    for params in sweep["dir"].glob("*/*/params.json"):
        spec = TrialSpec.of(json.loads(params.read_text()))
        TrainConfig.from_dict(spec.train).validate()  # whole: every option, nothing left to fill in
        specs.setdefault(spec.phase, []).append(spec)
    assert sorted(specs) == ["potentials", "search", "seeds"]
    assert sorted(tuple(s.train["tasks"]) for s in specs["potentials"]) == [("depth",), ("segmentation",)]
    assert all(s.method == "ew" and s.searched == {} for s in specs["potentials"])
    searched = [s.searched for s in specs["search"]]
    for s in specs["search"] + specs["seeds"]:
        assert s.method == "amtl" and s.searched in searched and set(s.train["potentials"]) == set(TASKS)
        assert s.train["hparams"] == {k.split(":", 1)[1]: v for k, v in s.searched.items()
                                      if k.startswith("amtl:") and ":@" not in k}
        assert s.train["lr"] == s.searched.get("amtl:@lr", s.searched.get("lr", s.train["lr"]))
    assert len(specs["search"]) == 2 and sorted(s.train["seed"] for s in specs["seeds"]) == [0, 1]


def test_saved_config_reproduces_the_sweeps_options(sweep, tmp_path):
    """``<sweep>/sweep.yaml`` holds every option; ``--config`` of it gives them back, and flags override it."""
    from amtl.options import with_values
    from run_sweep import parse_options

    saved = sweep["dir"] / "sweep.yaml"
    assert parse_options(["--config", str(saved)])[0] == sweep["options"]
    again, _ = parse_options(["--config", str(saved), "--name", "again", "--samples", "5", "--tasks", "depth"])
    assert again == with_values(sweep["options"], name="again", samples=5, tasks=["depth"])
    assert again.train.tasks == ("depth",) and again.train.n_train == sweep["options"].train.n_train


def test_leaderboard_files(sweep):
    for name in ("leaderboard.parquet", "leaderboard.md", "leaderboard.png", "weights.png"):
        assert (sweep["dir"] / name).stat().st_size > 0, name
    board = pd.read_parquet(sweep["dir"] / "leaderboard.parquet")
    seeds = trials(sweep).query("phase == 'seeds'")["test_delta_m"]
    assert board.loc[0, "test_delta_m_mean"] == pytest.approx(seeds.mean())
    assert board.loc[0, "n_seeds"] == 2
    assert "amtl" in (sweep["dir"] / "leaderboard.md").read_text()


def test_a_running_sweep_says_each_trial_event_and_its_phases_progress(sweep):
    """One line per trial start, epoch (with the objective) and end, and a progress line per ended
    trial; Ray Tune's own status tables go to tune.log, not to the lines."""
    messages, rows = sweep["messages"], trials(sweep)
    history = pd.read_parquet(sweep["dir"] / "history.parquet")
    for trial_id, phase in rows[["trial_id", "phase"]].itertuples(index=False):
        own = [m[len(f"[{phase}] {trial_id} "):] for m in messages if m.startswith(f"[{phase}] {trial_id} ")]
        assert own[0].startswith("started: ") and own[0].endswith(" alone" if phase == "potentials" else "")
        epochs = history[history["trial_id"] == trial_id].sort_values("epoch")
        objective = "kpi/" if phase == "potentials" else "val_delta_m "
        expected = [f"epoch {int(e)}: {objective}" for e in epochs["epoch"]]
        assert [m[:len(x)] for m, x in zip(own[1:-1], expected)] == expected
        assert own[-1].startswith(("finished after", "stopped early by the scheduler")), own
    for phase, n in rows.groupby("phase").size().items():
        progress = [m for m in messages if m.startswith(f"[{phase}] ") and " trials done, " in m]
        assert len(progress) == n and progress[-1].startswith(f"[{phase}] {n}/{n} trials done, 0 running")
        assert all("left" in m for m in progress[:-1])  # an ETA until the last
    search = [m for m in messages if re.match(r"\[search\] \S+ epoch \d+: ", m)]
    assert search and all(re.search(r"val_delta_m -?\d", m) for m in search), search
    table = (sweep["dir"] / "tune.log").read_text()
    assert "== Status ==" in table and "Trial name" in table
    assert not any("== Status ==" in m or "Trial name" in m for m in messages)


def test_interrupted_sweep_resumes_without_rerunning_and_reuses_potentials(sweep, capsys):
    storage = sweep["storage"]
    options = SweepOptions.of(methods=["amtl"], samples=2, seeds=1, storage=str(storage), name="second", **TINY)
    messages = []

    def interrupt_at_seeds(message):
        messages.append(message)
        if message.startswith("[seeds]"):
            raise KeyboardInterrupt  # the driver dies between the search and the seeds phase

    with pytest.raises(KeyboardInterrupt):
        run(options, say=interrupt_at_seeds)
    assert any("reusing single-task results" in m for m in messages)  # potentials computed once
    assert not (storage / "second" / "potentials").exists()
    before = pd.read_parquet(storage / "second" / "trials.parquet")
    assert set(before["phase"]) == {"search"}

    with pytest.raises(ValueError, match=r"sweep 'second' in .* was run with other options \(seeds: 1 -> 3\)"):
        run(dataclasses.replace(options, seeds=3), say=lambda m: None)
    # The resume goes through the Python API, as from a notebook: checked options, the leaderboard back.
    import sweeps
    with pytest.raises(ValueError, match="--samples must be at least 1"):
        sweeps.sweep(options, resume=True, samples=0)
    capsys.readouterr()
    board = sweeps.sweep(options, resume=True)
    out = capsys.readouterr().out
    assert "[search] already done" in out
    assert "[seeds] " in out and " started: amtl " in out and "[seeds] 1/1 trials done" in out
    assert "== Status ==" not in out and "Trial status" not in out  # Tune's tables: in tune.log
    assert list(board["method"]) == ["amtl"] and board.loc[0, "n_seeds"] == 1
    after = pd.read_parquet(storage / "second" / "trials.parquet")
    search_after = after[after["phase"] == "search"].sort_values("trial_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(search_after, before.sort_values("trial_id").reset_index(drop=True),
                                  check_like=True)
    assert (after["phase"] == "seeds").sum() == 1 and after["trial_id"].is_unique


def test_running_a_finished_sweep_again_shows_its_results_and_trains_nothing(sweep):
    before = trials(sweep)
    messages = []
    board = run(sweep["options"], say=messages.append)
    assert any(m.startswith("[sweep] 'first' is finished with these options") for m in messages)
    assert not any(" started: " in m for m in messages)  # no trial ran
    pd.testing.assert_frame_equal(trials(sweep), before)
    pd.testing.assert_frame_equal(board, sweep["board"])


def test_two_workers_per_trial_follow_one_worker(ray_cluster, tmp_path):
    """A DDP trial (2 gloo workers, global batch 16) reports what the 1-worker trial reports.

    With a nonlinear aggregator on the representation gradients (Nash-MTL's weights also depend on
    the Gramian's scale), so the cross-rank Gramian must be exact, not only the loss average."""
    from ray import tune

    from sweeps.runner import DRIVER_RESOURCES
    from amtl.trainer import TrainConfig
    from sweeps.trial import TRIAL_KEY, TrialSpec, run_trial

    train = TrainConfig(tasks=TASKS, image_size=32, n_train=64, n_val=16, n_test=16, batch_size=16, epochs=2,
                        device="cpu", threads=1, log_every=50, balancer="nash", hparams={"source": "representation"})
    final = {}
    for workers in (1, 2):
        spec = TrialSpec(phase="ddp", train=train.to_dict(), searched={}, workers=workers, cpus_per_worker=1,
                         gpus_per_worker=0, train_storage=f"{tmp_path}/train", max_failures=2)
        grid = tune.Tuner(tune.with_resources(run_trial, DRIVER_RESOURCES), param_space={TRIAL_KEY: spec.to_dict()},
                          run_config=tune.RunConfig(name=f"w{workers}", storage_path=str(tmp_path), verbose=0)).fit()
        assert not grid.errors, grid.errors
        final[workers] = grid[0].metrics
    compared = [k for k in final[1] if k.startswith(("val/", "test/"))]
    assert len(compared) == 10
    for key in compared:
        assert final[2][key] == pytest.approx(final[1][key], rel=2e-3, abs=2e-3), key


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Debian's Chromium, headless (as root it needs --no-sandbox); .ci/run installs it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "the report test needs Chromium: apt-get install chromium (.ci/run installs it)"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1280,1000", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=180, check=True)


def test_the_report_renders_in_a_real_browser_and_shows_the_leaderboard(sweep, tmp_path):
    page = (sweep["dir"] / "report.html").as_uri()
    dom = chromium("--dump-dom", page).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    data = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    # Every plot is an embedded image the browser decoded: leaderboard, trade-offs, Pareto, the
    # search's parallel coordinates, the weights of the method's best trial.
    assert int(data["images"]) == 5 and data["images-decoded"] == data["images"]
    board = pd.read_html(io.StringIO(dom), attrs={"id": "leaderboard"})[0]
    assert list(board["method"]) == list(sweep["board"]["method"])
    # The screenshot is not blank, and where the browser laid out the leaderboard there is its text.
    chromium(f"--screenshot={tmp_path / 'shot.png'}", page)
    with Image.open(tmp_path / "shot.png") as shot:
        pixels = np.asarray(shot.convert("L"), dtype=float)
    left, top, right, bottom = map(int, data["leaderboard-box"].split(","))
    assert 0 <= top < bottom <= pixels.shape[0] and right - left > 200
    table = pixels[top:bottom, left:right]
    assert (table < 128).mean() > 0.02  # dark text and borders, on white
    assert (pixels < 250).mean() > 0.05


def test_the_pareto_set_of_the_sweep_is_its_non_dominated_finished_search_trials(sweep):
    rows = trials(sweep)
    done = rows[(rows["status"] == "TERMINATED") & (rows["phase"] == "search")]
    points = done[[f"kpi/{t}" for t in sorted(TASKS)]].to_numpy(float)
    front = pd.read_parquet(sweep["dir"] / "pareto.parquet")
    on = done["trial_id"].isin(front["trial_id"]).to_numpy()
    assert on.any()
    for i, p in enumerate(points):
        beaten = ((points >= p).all(axis=1) & (points > p).any(axis=1)).any()
        assert beaten != on[i], done["trial_id"].iloc[i]


def test_report_rebuilds_every_output_from_the_stored_results(sweep):
    import run_sweep
    outputs = sorted(p for p in sweep["dir"].iterdir() if p.suffix in (".html", ".png", ".md"))
    assert {"report.html", "leaderboard.md", "significance.md", "tradeoffs.png", "pareto.png"} <= \
        {p.name for p in outputs}
    before = {p.name: p.read_bytes() for p in outputs}
    rows = trials(sweep)
    for p in outputs:
        p.unlink()
    code = run_sweep.main(["--storage", str(sweep["storage"]), "--name", "first", "--report", "--no-wandb"])
    assert code == 0
    assert {p.name: p.read_bytes() for p in outputs} == before  # the same bytes, plots included
    pd.testing.assert_frame_equal(trials(sweep), rows)  # nothing trained


def test_a_pareto_search_optimises_every_tasks_kpi_and_lists_its_pareto_set(sweep):
    """--objective pareto: Optuna's study has one maximised objective per task (the val KPIs the trials
    reported), and the seeds phase reruns the Pareto-optimal config with the best val Delta-m."""
    import optuna

    from sweeps.report import pareto_mask
    storage = sweep["storage"]  # its potentials are this sweep's too: reused, not retrained
    options = SweepOptions.of(methods=["ew"], samples=4, seeds=1, objective="pareto", storage=str(storage),
                              name="pareto", no_wandb=True, **TINY)
    messages = []
    run(options, say=messages.append)
    assert any(m.startswith("[potentials] reusing") for m in messages)
    assert any("objective Pareto front of kpi/segmentation, kpi/depth (max)" in m for m in messages)
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{storage / 'pareto' / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    rows = pd.read_parquet(storage / "pareto" / "trials.parquet")
    search = rows[(rows["phase"] == "search") & (rows["status"] == "TERMINATED")].reset_index(drop=True)
    kpis = search[["kpi/segmentation", "kpi/depth"]].to_numpy(float)
    told = sorted(tuple(t.values) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert told == sorted(map(tuple, kpis.tolist())) and len(told) == 4
    front = search[pareto_mask(kpis)]
    chosen = front.sort_values("val_delta_m").iloc[0]
    seeds = rows[rows["phase"] == "seeds"]
    assert list(seeds["searched"]) == [chosen["searched"]]
    board = (storage / "pareto" / "leaderboard.md").read_text()
    assert f"Pareto set: {len(front)} search trial(s)" in board
    assert sorted(pd.read_parquet(storage / "pareto" / "pareto.parquet")["trial_id"]) == sorted(front["trial_id"])
