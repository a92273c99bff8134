"""Typed options: each defined once, the two command lines and the config file made from them."""
import argparse
from dataclasses import replace

import pytest
import yaml

import run_sweep
from amtl import train
from amtl.options import OptionsError, names_with, options, read_yaml, to_flags, to_yaml
from amtl.trainer import TrainConfig
from sweeps.runner import SweepOptions, config_yaml


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("cls, parser", [(SweepOptions, run_sweep.build_parser()), (TrainConfig, train.build_parser())],
                         ids=["run_sweep", "amtl.train"])
def test_every_option_has_one_flag_with_its_help_and_default(cls, parser):
    flags = _flags(parser)
    for o in options(cls):
        if not o.meta.cli:
            continue
        flag = (o.meta.off_flag or f"--no-{o.name.replace('_', '-')}") if o.kind is bool and o.default else o.flag
        action = flags[flag]
        assert action.dest == o.name and o.meta.help and o.meta.help in action.help
        if o.kind is not bool:
            assert action.default == (list(o.default) if o.kind is list else o.default)
            assert action.choices == o.meta.choices


def test_the_command_line_reads_back_into_the_dataclass():
    args = train.build_parser().parse_args(["--out", "x", "--tasks", "depth, normal", "--no-amp", "--lr", "0.1",
                                            "--steps-per-epoch", "7"])
    config = train.config_from_args(args)
    assert config == replace(TrainConfig(), tasks=("depth", "normal"), amp=False, lr=0.1, steps_per_epoch=7)
    args = train.build_parser().parse_args(["--out", "x", "--balancer", "amtl", "--hparams", '{"focusing": 3}',
                                            "--potentials", '{"depth": 0.5}'])
    config = train.config_from_args(args)  # the potentials are run context, not a hyperparameter
    assert config.hparams == {"focusing": 3} and config.potentials == {"depth": 0.5}
    options, _ = run_sweep.parse_options(["--methods", "ew,amtl+pcgrad", "--no-wandb", "--max-concurrent", "3"])
    assert options == replace(SweepOptions(), methods=["ew", "amtl+pcgrad"], no_wandb=True, max_concurrent=3)


def test_flags_written_for_options_read_back_into_the_same_options():
    config = replace(TrainConfig(), tasks=("depth", "normal"), amp=False, lr=0.1, steps_per_epoch=7, seed=3,
                     dataset="multifashion", augment=True)
    flags = to_flags(config, skip=("hparams", "potentials"))
    assert "--no-amp" in flags and "--augment" in flags and "--out" not in flags
    assert train.config_from_args(train.build_parser().parse_args(["--out", "x", *flags])) == config
    assert to_flags(TrainConfig()) == []  # defaults need no flag
    sweep = replace(SweepOptions(), methods=["ew", "dwa"], samples=9, objective="pareto", no_wandb=True,
                    train=replace(TrainConfig(), epochs=2, tasks=("segmentation", "depth")))
    assert run_sweep.parse_options(to_flags(sweep))[0] == sweep


def test_a_sweep_takes_every_training_option_from_the_one_train_config():
    """One home per option: the sweep's training flags are TrainConfig's own fields (name, default,
    help), all of them but those a sweep sets for each trial; nothing is restated in SweepOptions."""
    from amtl.options import with_values
    from sweeps.runner import SET_BY_SWEEP

    train_options = {o.name: o for o in options(TrainConfig)}
    in_sweep = {o.name: o for o in options(SweepOptions) if o.path == ("train",)}
    assert set(in_sweep) == set(train_options) - set(SET_BY_SWEEP)
    assert all(in_sweep[n].default == train_options[n].default and in_sweep[n].meta == train_options[n].meta
               for n in in_sweep)
    assert not {o.name for o in options(SweepOptions) if not o.path} & set(train_options)  # none restated
    options_, _ = run_sweep.parse_options(["--n-train", "64", "--weight-decay", "0.01", "--optimizer", "sgd",
                                           "--seed", "3", "--no-wandb"])
    assert options_.train == replace(TrainConfig(), n_train=64, weight_decay=0.01, optimizer="sgd", seed=3)
    assert with_values(options_, epochs=7, samples=2).train.epochs == 7
    with pytest.raises(TypeError, match="no option 'balancer'"):  # the sweep chooses it per trial
        SweepOptions.of(balancer="amtl")
    for flag in ("--balancer", "--device", "--threads"):
        assert flag not in _flags(run_sweep.build_parser())


def test_every_sweep_compares_with_the_reference_unless_told_not_to():
    parse = lambda *argv: run_sweep.parse_options([*argv, "--no-wandb"])[0].compared  # noqa: E731
    assert parse("--method", "amtl") == ["amtl", "ew"]  # what `make sweep` compares
    assert parse("--method", "ew,amtl") == ["ew", "amtl"]
    assert parse("--method", "amtl", "--reference", "gls") == ["amtl", "gls"]
    assert parse("--method", "amtl", "--reference", "none") == ["amtl"]
    assert parse("--method", "all") == ["all"]  # the list of all.yaml (or --space) decides


def test_repeatable_plugin_flags_add_up():
    options, _ = run_sweep.parse_options(["--plugin", "a.py", "--plugin", "b.py,c", "--no-wandb"])
    assert options.train.plugins == ["a.py", "b.py", "c"]
    assert SweepOptions().train.plugins == [] and TrainConfig().plugins == []  # no shared default list
    assert SweepOptions().train is not SweepOptions().train


def test_metadata_says_what_enters_the_potentials_fingerprint_and_what_a_search_may_change():
    fingerprint, searchable = set(names_with(TrainConfig, "fingerprint")), set(names_with(TrainConfig, "searchable"))
    assert {"dataset", "n_train", "epochs", "lr", "model"} <= fingerprint
    assert not {"seed", "tasks", "balancer", "hparams", "device", "threads"} & fingerprint
    assert searchable == {"lr", "weight_decay", "batch_size", "optimizer", "schedule", "augment"}
    from sweeps.space import SHARED_HPARAMS
    assert set(SHARED_HPARAMS) == searchable  # every searchable option has its search bounds


def test_config_file_round_trip_and_spellings(tmp_path):
    config = replace(TrainConfig(), tasks=("depth",), width=8, amp=False, threads=None)
    path = tmp_path / "train.yaml"
    path.write_text(to_yaml(config, skip=("hparams",)))
    assert TrainConfig(**read_yaml(path, TrainConfig)) == config
    # Flag spellings are keys too: --method for methods, dashes for underscores, a comma string for a list.
    path.write_text("method: ew,dwa\nn-train: 10\nstall_timeout: 5\n")
    assert read_yaml(path, SweepOptions) == {"methods": ["ew", "dwa"], "n_train": 10, "stall_timeout": 5.0}
    path.write_text("methods: [ew]\nmethod: [dwa]\n")
    with pytest.raises(OptionsError, match="'method' sets 'methods' a second time"):
        read_yaml(path, SweepOptions)
    path.write_text("max_concurrent: null\nkpi: depth\nno_wandb: yes\n")
    assert read_yaml(path, SweepOptions) == {"max_concurrent": None, "kpi": "depth", "no_wandb": True}
    path.write_text("no_wandb: 1\n")
    with pytest.raises(OptionsError, match="'no_wandb' must be true or false, got 1"):
        read_yaml(path, SweepOptions)


def test_saved_sweep_config_keeps_no_database_password(tmp_path):
    options = replace(SweepOptions(), optuna_storage="postgresql://amtl:s3cret@db:5432/studies", resume=True)
    text = config_yaml(options)
    assert "s3cret" not in text and "resume" not in yaml.safe_load(text)
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    assert replace(SweepOptions.of(**read_yaml(path, SweepOptions)), optuna_storage=None) == \
        replace(options, optuna_storage=None, resume=False)
