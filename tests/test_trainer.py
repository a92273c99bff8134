"""The trainer and the single-run CLI on small rendered scenes."""
import json
import subprocess
import sys

import pytest
import torch

from amtl.trainer import CHECKPOINT, ConfigError, NonFiniteLossError, TrainConfig, Trainer

TINY = dict(image_size=32, n_train=48, n_val=16, n_test=16, batch_size=16, log_every=2)


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def test_fit_writes_metrics_and_logs(tmp_path):
    result = Trainer(tiny(epochs=2), tmp_path, progress=None).fit()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test"}
    assert metrics["val"] == pytest.approx(result["val"])
    for key in ("segmentation/miou", "depth/abs_err", "normal/within_11.25", "normal/median_angle"):
        assert key in metrics["test"]
    steps = [json.loads(l) for l in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 7))  # 48 / 16 = 3 steps per epoch
    assert set(steps[0]["losses"]) == {"segmentation", "depth", "normal"}
    epochs = [json.loads(l) for l in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert set(epochs[0]["kpis"]) == {"segmentation", "depth", "normal"}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = Trainer(tiny(epochs=2), tmp_path / "a", progress=None)
    straight.fit()

    class Crash:  # the process dies right after epoch 1 was checkpointed
        def on_epoch(self, record, trainer):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny(epochs=2), tmp_path / "b", callbacks=[Crash()], progress=None).fit()
    resumed = Trainer(tiny(epochs=2), tmp_path / "b", progress=None)
    resumed.fit()
    assert resumed.step == straight.step == 6
    assert len(resumed.history) == 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_resume_with_other_options_is_refused(tmp_path):
    Trainer(tiny(epochs=1), tmp_path, progress=None).fit()
    with pytest.raises(ConfigError, match="lr"):
        Trainer(tiny(epochs=2, lr=0.5), tmp_path, progress=None).fit()


def test_checkpoint_from_before_an_option_existed_resumes():
    """A checkpoint written before ``amp_dtype`` existed was made with its default: it resumes."""
    state = Trainer(tiny(), None, progress=None).state_dict()
    del state["config"]["amp_dtype"]
    Trainer(tiny(), None, progress=None).load_state_dict(state)
    with pytest.raises(ConfigError, match="amp_dtype"):
        Trainer(tiny(amp_dtype="float16"), None, progress=None).load_state_dict(state)


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    trainer = Trainer(tiny(epochs=2), tmp_path, progress=None)
    trainer.fit()
    before = (tmp_path / CHECKPOINT).read_bytes()
    broken = Trainer(tiny(epochs=3), tmp_path, progress=None)
    broken.load_checkpoint(tmp_path / CHECKPOINT)
    with torch.no_grad():
        next(broken.model.heads["depth"].parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="depth.*lower the learning rate"):
        broken.fit(resume=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_task_without_labels_in_batch_is_left_out(tmp_path):
    trainer = Trainer(tiny(tasks=("segmentation", "depth")), None, progress=None)
    batch = next(iter(trainer._loader(trainer.data.train, shuffle=False)))
    batch["has"]["depth"][:] = False
    step = trainer.compute_losses(batch)
    assert set(step.losses) == {"segmentation"}
    batch["has"]["depth"][0] = True
    step = trainer.compute_losses(batch)
    only_first = step.sample_losses["depth"].detach()
    assert only_first[1:].abs().sum() == 0 and only_first[0] > 0
    assert step.losses["depth"].item() == pytest.approx(only_first[0].item())


@pytest.mark.parametrize("balancer, hparams", [("uw", {}), ("nash", {"source": "representation"})])
def test_loss_scaled_steps_equal_unscaled_steps(balancer, hparams):
    """The float16 path's GradScaler (here its CPU twin, as CUDA is not needed for the logic): a
    power-of-two scale is exact, so scaled steps (model, UW's own parameters, Nash's scale-dependent
    weights) must equal unscaled ones."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 14)):
        trainer = Trainer(tiny(epochs=1, balancer=balancer, hparams=hparams, optimizer="sgd"), None, progress=None)
        trainer.scaler = scaler
        trainer.fit()
        runs.append([p.detach().clone() for p in [*trainer.model.parameters(), *trainer.method.parameters()]])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad, fragment", [
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lr=-1.0), "lr must be a positive"),
    (dict(optimizer="lbfgs"), "unknown optimizer"),
    (dict(tasks=()), "no tasks"),
    (dict(amp_dtype="float8"), "unknown amp_dtype 'float8'"),
])
def test_bad_config_is_rejected(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny(**bad).validate()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amtl.train", *args], capture_output=True, text=True, timeout=300)


def test_cli_single_run_writes_metrics(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--tasks", "segmentation,depth", "--epochs", "1", "--out", str(out), "--image-size", "32",
                   "--n-train", "32", "--n-val", "16", "--n-test", "16", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["val"]) == {"segmentation/miou", "segmentation/pixel_acc", "depth/abs_err",
                                   "depth/rel_err", "depth/delta1"}


@pytest.mark.parametrize("args, fragment", [
    (["--tasks", "segmentation,colour"], "unknown task(s) colour"),
    (["--dataset", "nyuv2", "--tasks", "detection"], "has no labels for task(s) detection"),
    (["--balancer", "nope"], "unknown balancer 'nope'"),
    (["--epochs", "-1"], "epochs must be at least 1"),
    (["--epochs", "two"], "invalid int value"),
    (["--hparams", "{bad json"], "--hparams is not valid JSON"),
    (["--hparams", "missing.json"], "neither a JSON object nor an existing file"),
    (["--dataset", "nyuv2"], "needs a data root"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--device", "tpu"], "device must be"),
    (["--amp-dtype", "half"], "--amp-dtype: invalid choice: 'half' (choose from 'bfloat16', 'float16')"),
    (["--optimizer", "lbfgs"], "--optimizer: invalid choice: 'lbfgs'"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, args, fragment):
    from amtl.train import main
    argv = ["--out", str(tmp_path / "x"), "--image-size", "32", "--n-train", "16", "--n-val", "8", "--n-test", "8", *args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert fragment in lines[0]
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_cli_refuses_to_overwrite_with_no_resume(tmp_path):
    Trainer(tiny(epochs=1), tmp_path, progress=None).fit()
    before = (tmp_path / CHECKPOINT).read_bytes()
    proc = run_cli("--out", str(tmp_path), "--no-resume")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def _step_weights(out) -> list[dict[str, float]]:
    return [json.loads(line)["weights"] for line in (out / "steps.jsonl").read_text().splitlines()]


def test_the_training_seed_reaches_stochastic_balancers(tmp_path):
    """Each training seed draws its own RLW weights and PCGrad projection orders (the seeds phase
    measures their spread); the same seed draws the same ones (runs reproduce, DDP ranks agree)."""
    draws = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 1)):
        Trainer(tiny(epochs=1, balancer="rlw", seed=seed), tmp_path / name, progress=None).fit()
        draws[name] = _step_weights(tmp_path / name)
    assert draws["a"] == draws["c"]
    assert all(a != b for a, b in zip(draws["a"], draws["b"]))

    # Three tasks whose gradients all conflict: the projection order changes PCGrad's weights.
    g = torch.tensor([[1.0, 0.0], [-0.8, 0.6], [-0.3, -0.95]], dtype=torch.float64)
    orders = {}
    for seed in (1, 2, 1):
        aggregator = Trainer(tiny(balancer="pcgrad", seed=seed), progress=None).method.aggregator
        orders.setdefault(seed, []).append([tuple(aggregator.weights(g @ g.T).tolist()) for _ in range(8)])
    assert orders[1][0] == orders[1][1]
    assert orders[1][0] != orders[2][0]


@pytest.mark.parametrize("balancer, hparams", [("pcgrad", {"seed": 3}), ("amtl", {"potentials": {"depth": 0.5}})])
def test_run_context_given_as_a_hyperparameter_is_refused(balancer, hparams):
    with pytest.raises(ConfigError, match="set by the run"):
        tiny(balancer=balancer, hparams=hparams).validate()


def test_run_context_is_not_a_hyperparameter():
    """Hyperparameters are what a search may change; the seed and the potentials are the run's."""
    from amtl import balancers
    assert "potentials" not in balancers.hparam_specs("amtl") and "seed" not in balancers.hparam_specs("pcgrad")
    assert balancers.context_keys("amtl") == {"potentials"}
    assert balancers.context_keys("amtl+pcgrad") == {"potentials", "seed"}
    assert balancers.context_keys("ew") == set()


def test_a_seed_pairs_the_runs_of_every_method(tmp_path):
    """Seed ``s`` gives every method the same initial weights and the same batches, so a comparison
    across methods at one seed is paired (the seeds phase and the leaderboard rely on it)."""
    def start(balancer: str, seed: int, **hparams) -> tuple[dict, list[list[int]]]:
        trainer = Trainer(tiny(balancer=balancer, seed=seed, hparams=hparams), tmp_path / f"{balancer}-{seed}")
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        batches = [[b["index"].tolist() for b in trainer._loader(trainer.data.train, shuffle=True, epoch=e)]
                   for e in (0, 1)]
        return weights, batches

    ew, ew_batches = start("ew", 3)
    for other, hparams in (("uw", {}), ("rlw", {}), ("cagrad", {"c": 0.4})):  # learnable, stochastic, Gramian
        weights, batches = start(other, 3, **hparams)
        assert weights.keys() == ew.keys() and all(torch.equal(weights[k], ew[k]) for k in ew), other
        assert batches == ew_batches, other
    other_seed, other_batches = start("ew", 4)
    assert not all(torch.equal(other_seed[k], ew[k]) for k in ew) and other_batches != ew_batches
