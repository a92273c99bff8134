"""Search spaces: shipped YAML validates, the Optuna space is conditional, bad files fail clearly."""
from __future__ import annotations

from dataclasses import replace

import pickle
import textwrap
from pathlib import Path

import optuna
import pytest

from amtl.balancers import context_keys, hparam_specs, make, names
from sweeps.space import (ALL, METHOD_KEY, SHARED_HPARAMS, SPACE_DIR, SearchSpace, SpaceError,
                          load_space, make_sampler, make_searcher, qualify, split_config)

optuna.logging.set_verbosity(optuna.logging.WARNING)

TASKS = ["segmentation", "depth", "normal"]
# Two methods share the hparam name `focusing`; a combination; aggregators; one without params.
MIXED = ["amtl", "dtp", "dwa", "cagrad", "amtl+pcgrad", "ew"]


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- shipped files -----------------------------------------------------------------------------

def test_every_single_method_has_a_file_and_nothing_else_lies_there():
    stems = {p.stem for p in SPACE_DIR.glob("*.yaml")}
    assert set(names()) <= stems, f"missing: {sorted(set(names()) - stems)}"
    assert stems - set(names()) == {ALL}
    assert (SPACE_DIR / "README.md").is_file()


def test_shipped_files_load_validate_and_build_the_methods():
    space = load_space([ALL])
    assert set(space.methods) == set(names())  # `--method all` compares every single method
    assert set(space.shared) == {"lr", "weight_decay", "batch_size"}
    for method in space.methods:
        alone = load_space([method])
        assert alone.methods == (method,) and alone.params[method] == space.params[method]
        specs = hparam_specs(method)
        assert set(space.params[method]) <= set(specs)
        assert "potentials" not in space.params[method] and "seed" not in space.params[method]
        # Every bound of a range and every choice is a value the method itself accepts.
        for name, dist in space.params[method].items():
            values = dist.choices if dist.distribution == "categorical" else (dist.low, dist.high)
            for value in values:
                specs[name].validate(value, method)


def test_combination_is_the_union_of_both_files():
    space = load_space(["amtl+pcgrad"])
    amtl, pcgrad = load_space(["amtl"]).params["amtl"], load_space(["pcgrad"]).params["pcgrad"]
    assert dict(space.params["amtl+pcgrad"]) == {**amtl, **pcgrad}
    assert set(space.params["amtl+pcgrad"]) == {"focusing", "margin", "source"}


# -- the conditional Optuna space -------------------------------------------------------------

def _objective(space: SearchSpace):
    def objective(trial: optuna.Trial) -> float:
        constants = space.define_by_run(trial)
        method, hparams, shared = split_config({**trial.params, **constants})
        # What the trial gets is a valid method: the registry builds it with these hparams
        # (potentials are run context from upstream trials, never part of the space).
        potentials = {t: 0.5 for t in TASKS} if "potentials" in context_keys(method) else None
        make(method, TASKS, potentials=potentials, **hparams)
        assert set(shared) == set(space.shared)
        return sum(v for v in trial.params.values() if isinstance(v, float))
    return objective


def test_conditional_space_suggests_only_the_chosen_methods_params():
    space = load_space(MIXED)
    study = optuna.create_study(sampler=make_sampler(seed=0))  # the sampler sweeps use
    study.optimize(_objective(space), n_trials=60)

    seen = set()
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        method = trial.params[METHOD_KEY]
        assert trial.user_attrs[METHOD_KEY] == method
        # Exactly the chosen method's params (all of them) and the shared ones, nothing else.
        assert set(trial.params) == space.optuna_names(method)
        for name, value in trial.params.items():
            if name != METHOD_KEY:
                owner, _, hparam = name.rpartition(":")
                dist = space.params[owner][hparam] if owner else space.shared[name]
                assert dist.contains(value), (name, value)
        seen.add(method)
    assert seen == set(MIXED)
    # `focusing` of amtl and of dtp are two Optuna parameters, never one.
    all_names = {n for t in study.trials for n in t.params}
    assert {"amtl:focusing", "dtp:focusing", "amtl+pcgrad:focusing"} <= all_names
    assert "focusing" not in all_names


def test_a_per_method_search_gives_every_method_equal_turns_and_its_own_shared_options():
    space = replace(load_space(MIXED), per_method=True)
    study = optuna.create_study(sampler=make_sampler(seed=0))
    study.optimize(_objective(space), n_trials=4 * len(MIXED))
    turns = [t.user_attrs[METHOD_KEY] for t in study.trials]
    assert turns == list(MIXED) * 4  # round robin: exactly 4 trials each, in order
    for trial, method in zip(study.trials, turns):
        assert METHOD_KEY not in trial.params  # not a choice TPE could favour
        assert set(trial.params) == space.optuna_names(method)
        # The shared options are this method's own copies ("ew:@lr"), so TPE models each method apart.
        assert {f"{method}:@{name}" for name in space.shared} <= set(trial.params)
        _, _, shared = split_config({**trial.params, METHOD_KEY: method})
        assert shared == {name: trial.params[f"{method}:@{name}"] for name in space.shared}


def test_single_method_is_a_constant_not_a_suggestion():
    space = load_space(["dwa"])
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1))
    trial = study.ask()
    assert space.define_by_run(trial) == {METHOD_KEY: "dwa"}
    assert set(trial.params) == {"dwa:temperature", *space.shared} == space.optuna_names("dwa")


def test_split_config_round_trip():
    space = load_space(["amtl+pcgrad", "dwa"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(8):
        trial = study.ask()
        constants = space.define_by_run(trial)  # before reading params: it suggests them
        config = {**trial.params, **constants}
        method, hparams, shared = split_config(config)
        assert set(hparams) == set(space.params[method])  # registry names, no prefix, no renames
        assert set(shared) == set(space.shared)
        rebuilt = {METHOD_KEY: method, **{qualify(method, k): v for k, v in hparams.items()}, **shared}
        assert rebuilt == config
    assert split_config({"method": "amtl", "amtl:focusing": 2.0, "lr": 1e-3, "epochs": 3}) == (
        "amtl", {"focusing": 2.0}, {"lr": 1e-3, "epochs": 3})
    with pytest.raises(ValueError, match="belongs to 'dtp'"):
        split_config({"method": "amtl", "dtp:focusing": 1.0})
    with pytest.raises(ValueError, match="no 'method'"):
        split_config({"lr": 1e-3})


# -- overrides ---------------------------------------------------------------------------------

def test_space_file_overrides_shared_and_one_method(tmp_path):
    path = _write(tmp_path, """
        methods: [amtl, dwa]
        shared:
          lr: {distribution: loguniform, low: 1e-4, high: 1e-3}   # 1e-4 is a float here, not a string
          optimizer: {distribution: categorical, choices: [adam, sgd]}
        params_by_method:
          amtl:
            margin: {distribution: categorical, choices: [0.1]}   # one choice fixes a value
    """)
    space = load_space([ALL], space_file=path)
    assert space.methods == ("amtl", "dwa")
    assert set(space.shared) == {"lr", "optimizer"} and space.shared["lr"].low == 1e-4
    assert set(space.params["amtl"]) == {"margin"}
    assert space.params["dwa"] == load_space(["dwa"]).params["dwa"]  # not overridden: its own file
    assert load_space([], space_file=path).methods == ("amtl", "dwa")
    assert load_space(["dwa", "cagrad"], space_file=path).methods == ("dwa", "cagrad")  # names given win


def test_single_method_space_file(tmp_path):
    path = _write(tmp_path, """
        method: cagrad
        params:
          c: {distribution: uniform, low: 0.2, high: 0.6}
        shared:
          batch_size: {distribution: int, low: 8, high: 32, step: 8}
    """)
    space = load_space([], space_file=path)
    assert space.methods == ("cagrad",) and set(space.params["cagrad"]) == {"c"}
    assert space.shared["batch_size"].step == 8


# -- Ray Tune searcher and storage ------------------------------------------------------------

def test_searcher_suggests_through_tune_api_and_persists_in_sqlite(tmp_path):
    space = load_space(["amtl", "cagrad", "ew"])
    url = f"sqlite:///{tmp_path / 'nested' / 'study' / 'optuna.db'}"  # folders are created
    searcher = make_searcher(space, metric="val/delta_m", mode="min", seed=0, storage_url=url,
                             study_name="demo")
    configs = {}
    for i in range(3):
        configs[f"t{i}"] = config = searcher.suggest(f"t{i}")
        method, hparams, shared = split_config(config)
        assert method in space.methods and set(hparams) == set(space.params[method])
        assert set(shared) == set(space.shared)
        searcher.on_trial_complete(f"t{i}", {"val/delta_m": float(i), "training_iteration": 1})
    pickle.dumps(space.define_by_run)  # Ray pickles the searcher (and so the space) in checkpoints

    study = optuna.load_study(study_name="demo", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.user_attrs[METHOD_KEY] for t in study.trials] == [configs[f"t{i}"]["method"] for i in range(3)]
    assert study.best_value == 0.0

    resumed = make_searcher(space, metric="val/delta_m", mode="min", seed=0, storage_url=url,
                            study_name="demo")
    resumed.suggest("t3")
    assert len(optuna.load_study(study_name="demo", storage=url).trials) == 4  # continued, not new


def test_restored_searcher_tolerates_a_trial_the_study_already_finished(tmp_path):
    """A driver killed after Optuna stored trial t0 but before Tune checkpointed: on --resume Tune
    restarts t0 from its (older) searcher checkpoint and reports it again."""
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(["amtl"])
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(space, metric="val/delta_m", mode="min", seed=0, storage_url=url, study_name="kill")
    searcher.suggest("t0")
    checkpoint = pickle.dumps(searcher)  # what Tune saved before the kill: t0 still running
    searcher.on_trial_complete("t0", {"val/delta_m": 1.5, "training_iteration": 1})

    restored = pickle.loads(checkpoint)
    restored.on_trial_result("t0", {"val/delta_m": 2.5, "training_iteration": 1})  # no error
    restored.on_trial_complete("t0", {"val/delta_m": 2.5, "training_iteration": 1})
    restored.suggest("t1")
    study = optuna.load_study(study_name="kill", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    assert study.trials[0].value == 1.5  # the first result stands

    plain = pickle.loads(checkpoint)
    plain.__class__ = OptunaSearch  # what Tune's own searcher does with the same state
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        plain.on_trial_result("t0", {"val/delta_m": 2.5, "training_iteration": 1})


# -- bad files ---------------------------------------------------------------------------------

BAD = [
    ("malformed YAML", "method: amtl\nparams: {focusing: {distribution: uniform, low: 1\n",
     r"malformed YAML at line \d"),
    ("root not a mapping", "- amtl\n- dwa\n", "expected a mapping"),
    ("unknown method", "method: amtlx\nparams: {}\n", "unknown balancer 'amtlx'"),
    ("unknown method in list", "methods: [ew, nope]\n", r"methods\[1\]: unknown balancer 'nope'"),
    ("unknown method key", "methods: [dwa]\nparams_by_method: {dwaa: {}}\n", "params_by_method.dwaa: unknown balancer"),
    ("unknown hparam", "method: dwa\nparams:\n  temp: {distribution: uniform, low: 1.0, high: 2.0}\n",
     r"params.temp: 'dwa' has no hyperparameter 'temp' \(searchable: temperature\)"),
    ("unknown distribution", "method: dwa\nparams:\n  temperature: {distribution: normal, low: 1.0, high: 2.0}\n",
     "unknown distribution 'normal'"),
    ("missing distribution", "method: dwa\nparams:\n  temperature: {low: 1.0, high: 2.0}\n", "missing 'distribution'"),
    ("missing high", "method: dwa\nparams:\n  temperature: {distribution: uniform, low: 1.0}\n", "add 'high'"),
    ("misspelt key", "method: dwa\nparams:\n  temperature: {distribution: uniform, low: 1.0, hihg: 2.0}\n",
     "unknown key.*'hihg'"),
    ("non-number bound", "method: dwa\nparams:\n  temperature: {distribution: uniform, low: one, high: 2.0}\n",
     "temperature.low: must be a finite number"),
    ("inverted range", "method: dwa\nparams:\n  temperature: {distribution: uniform, low: 3.0, high: 2.0}\n",
     "empty range: low 3.0 must be below high 2.0"),
    ("empty range", "method: amtl\nparams:\n  margin: {distribution: uniform, low: 0.1, high: 0.1}\n",
     "empty range.*categorical, choices: \\[0.1\\]"),
    ("loguniform at 0", "method: amtl\nparams:\n  margin: {distribution: loguniform, low: 0.0, high: 0.2}\n",
     "margin.low: a log-scale range must stay above 0"),
    ("loguniform below 0", "method: gradnorm\nparams:\n  alpha: {distribution: loguniform, low: -1.0, high: 2.0}\n",
     "must stay above 0"),
    ("outside declared range", "method: amtl\nparams:\n  margin: {distribution: uniform, low: 0.0, high: 2.0}\n",
     r"leaves the valid range \[0.0, 1.0\] of 'margin'"),
    ("int for float", "method: dwa\nparams:\n  temperature: {distribution: int, low: 1, high: 4}\n",
     "float hyperparameter 'temperature' cannot take an int distribution"),
    ("uniform for str", "method: aligned\nparams:\n  scale_mode: {distribution: uniform, low: 0.0, high: 1.0}\n",
     "str hyperparameter 'scale_mode' cannot take a uniform distribution"),
    ("int range over choices", "method: cagrad\nparams:\n  rescale: {distribution: int, low: 0, high: 2}\n",
     r"takes only the values \[0, 1, 2\]; use \{distribution: categorical"),
    ("bad choice", "method: mgda\nparams:\n  source: {distribution: categorical, choices: [shared, everywhere]}\n",
     "must be one of .*got 'everywhere'"),
    ("empty choices", "method: mgda\nparams:\n  source: {distribution: categorical, choices: []}\n",
     "choices: must be a non-empty list"),
    ("repeated choice", "method: mgda\nparams:\n  source: {distribution: categorical, choices: [last, last]}\n",
     "lists a value twice"),
    ("potentials searched", "method: amtl\nparams:\n  potentials: {distribution: uniform, low: 0.1, high: 1.0}\n",
     "potentials come from the upstream single-task trials"),
    ("seed searched", "method: pcgrad\nparams:\n  seed: {distribution: int, low: 0, high: 9}\n",
     "seeds are set per trial"),
    ("shared not an option", "methods: [ew]\nshared:\n  momentum: {distribution: uniform, low: 0.5, high: 0.9}\n",
     "shared.momentum: 'momentum' is not a training option; searchable: lr"),
    ("shared option not searchable", "methods: [ew]\nshared:\n  epochs: {distribution: int, low: 1, high: 9}\n",
     "'epochs' is a training option but not searched here"),
    ("shared non-integer int", "methods: [ew]\nshared:\n  batch_size: {distribution: int, low: 8.5, high: 32}\n",
     "batch_size.low: must be an integer"),
    ("shared bad optimizer",
     "methods: [ew]\nshared:\n  optimizer: {distribution: categorical, choices: [adam, lion]}\n",
     "optimizer.choices: .*must be one of"),
    ("both forms", "method: ew\nmethods: [ew]\n", "either 'method' \\+ 'params' or"),
    ("repeated method", "methods: [ew, dwa, ew]\n", "lists ew more than once"),
]


@pytest.mark.parametrize("text, pattern", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_space_file_is_one_clear_line(tmp_path, text, pattern):
    path = _write(tmp_path, text, "bad.yaml")
    with pytest.raises(SpaceError, match=pattern) as err:
        load_space([], space_file=path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")


def test_bad_method_name_and_missing_files(tmp_path):
    with pytest.raises(SpaceError, match="--method: method: unknown balancer 'nope'"):
        load_space(["nope"])
    with pytest.raises(SpaceError, match="no methods given"):
        load_space([])
    (tmp_path / "all.yaml").write_text("methods: [dwa]\n")
    with pytest.raises(SpaceError, match=r"dwa.yaml: no search space file for 'dwa'"):
        load_space([ALL], space_dir=tmp_path)
    (tmp_path / "dwa.yaml").write_text("method: dtp\nparams: {}\n")
    with pytest.raises(SpaceError, match="says 'dtp' but the file is for 'dwa'"):
        load_space(["dwa"], space_dir=tmp_path)
    (tmp_path / "dwa.yaml").write_text("method: dwa\nparams: {}\nshared: {}\n")
    with pytest.raises(SpaceError, match="'shared' belongs in all.yaml"):
        load_space(["dwa"], space_dir=tmp_path)
    with pytest.raises(SpaceError, match="cannot read the file"):
        load_space(["dwa"], space_file=tmp_path / "missing.yaml")


def test_shared_specs_are_trainer_fields():
    from dataclasses import fields

    from amtl.trainer import TrainConfig
    assert set(SHARED_HPARAMS) <= {f.name for f in fields(TrainConfig)}
