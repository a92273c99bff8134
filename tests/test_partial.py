"""The partially annotated multi-dataset: composition, sampling, masked losses and training on it."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from amtl import balancers
from amtl.data import collate
from amtl.data.labels import label_counts, task_balanced_weights, task_labels
from amtl.data.partial import SOURCE_SCENES, TASKS
from amtl.data.registry import DatasetConfigError, build_datasets
from amtl.distributed import GlobalBatchSampler
from amtl.trainer import TrainConfig, Trainer

SIZES = dict(image_size=32, n_train=48, n_val=16, n_test=16)
POTENTIALS = {"segmentation": 0.5, "detection": 0.3, "depth": 0.5}
SEMANTIC_TRAIN, DEPTH_TRAIN = 36, 12  # 48 training samples shared 3:1


@pytest.fixture(scope="module")
def data():
    return build_datasets("partial", TASKS, **SIZES)


def tiny(**overrides) -> TrainConfig:
    values = dict(dataset="partial", tasks=TASKS, batch_size=16, log_every=1, epochs=1, **SIZES)
    return TrainConfig(**{**values, **overrides})


# -- the composed dataset -----------------------------------------------------------------------
def test_each_sample_carries_only_its_sources_labels(data):
    assert data.train.source_sizes() == {"semantic": SEMANTIC_TRAIN, "depth": DEPTH_TRAIN}
    assert data.val.source_sizes() == data.test.source_sizes() == {"semantic": 12, "depth": 4}
    assert (data.num_classes, data.num_detection_classes, data.num_instances) == (6, 3, 48)
    assert label_counts(data.train, TASKS) == {"segmentation": 36, "detection": 36, "depth": 12}
    for i in (0, 35, 36, 47):
        s = data.train[i]
        assert s["index"] == i and s["image"].shape == (3, 32, 32)
        if i < SEMANTIC_TRAIN:
            assert s["source"] == 0 and s["has"] == {"segmentation": True, "detection": True, "depth": False}
            assert (s["segmentation"] >= 0).any() and len(s["detection"]["boxes"]) > 0
            assert torch.equal(s["depth"], torch.zeros(1, 32, 32))  # the invalid value, not a target
        else:
            assert s["source"] == 1 and s["has"] == {"segmentation": False, "detection": False, "depth": True}
            assert (s["depth"] > 0).any()
            assert (s["segmentation"] == -1).all() and s["detection"]["boxes"].shape == (0, 4)
    table = task_labels(data.train, TASKS)
    assert [bool(table[t][i]) for t in TASKS for i in (0, 40)] == [True, False, True, False, False, True]


def test_the_two_sources_differ_in_camera_and_appearance(data):
    """The depth source's camera is pitched further down (more floor, less ceiling), its colours paler."""
    def stats(part):
        arrays = data.train.datasets[part].data  # every rendered array, labelled for this source or not
        images = arrays["image"].float() / 255
        saturation = (images.max(dim=1).values - images.min(dim=1).values).mean()
        return float(saturation), float((arrays["segmentation"] == 0).float().mean()), \
            float((arrays["segmentation"] == 2).float().mean())
    sat_a, floor_a, ceiling_a = stats(0)
    sat_b, floor_b, ceiling_b = stats(1)
    assert sat_b < 0.7 * sat_a  # measured 0.087 vs 0.153
    assert floor_b > floor_a and ceiling_b < 0.5 * ceiling_a  # measured 0.44 vs 0.38, 0.009 vs 0.033
    assert SOURCE_SCENES["depth"]["fov_deg"] != 60.0 and SOURCE_SCENES["semantic"] == {}


def test_a_single_task_is_trained_on_its_own_source(data):
    depth = build_datasets("partial", ["depth"], **SIZES)
    assert depth.train.sources == ["depth"] and len(depth.train) == DEPTH_TRAIN
    assert torch.equal(depth.train[0]["image"], data.train[SEMANTIC_TRAIN]["image"])
    assert torch.equal(depth.val[3]["depth"], data.val[15]["depth"])  # validated on the same images
    seg = build_datasets("partial", ["segmentation"], **SIZES)
    assert seg.train.sources == ["semantic"] and len(seg.train) == SEMANTIC_TRAIN
    assert set(seg.train[0]) == {"image", "index", "source", "has", "segmentation"}


def test_potential_fingerprints_name_each_tasks_source(monkeypatch):
    from sweeps.potentials import fingerprint
    from sweeps.runner import SweepOptions
    train = SweepOptions.of(dataset="partial", tasks=list(TASKS)).trial_train.to_dict()
    before = {t: fingerprint(train, t) for t in TASKS}
    assert len(set(before.values())) == 3
    # Changing the depth source's rendering changes the depth potential's key, and only that one.
    monkeypatch.setitem(SOURCE_SCENES, "depth", {**SOURCE_SCENES["depth"], "fov_deg": 80.0})
    after = {t: fingerprint(train, t) for t in TASKS}
    assert after["depth"] != before["depth"]
    assert after["segmentation"] == before["segmentation"] and after["detection"] == before["detection"]


# -- batches and the sampler --------------------------------------------------------------------
def test_training_batches_mix_sources():
    trainer = Trainer(tiny(), None, progress=None)
    sources = [batch["source"].tolist() for batch in trainer._loader(trainer.data.train, shuffle=True)]
    assert len(sources) == 3 and all(set(s) == {0, 1} for s in sources)


def test_task_balanced_sampler_draws_every_tasks_labels_equally_often(data):
    labels = task_labels(data.train, TASKS)
    weights = task_balanced_weights(labels)
    drawn = torch.tensor([i for epoch in range(40)
                          for batch in GlobalBatchSampler(48, 16, seed=1, epoch=epoch, weights=weights)
                          for i in batch])
    share = {t: float(labels[t][drawn].double().mean()) for t in TASKS}
    assert share["segmentation"] == share["detection"]
    assert share["depth"] == pytest.approx(0.5, abs=0.05)  # 0.25 without balancing
    assert share["segmentation"] + share["depth"] == pytest.approx(1.0)
    # Data parallelism: two ranks slice exactly the batches one process draws.
    single = list(GlobalBatchSampler(48, 16, seed=1, epoch=3, weights=weights))
    ranks = [list(GlobalBatchSampler(48, 16, rank=r, world_size=2, seed=1, epoch=3, weights=weights)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == single


def test_trainer_uses_the_task_balanced_sampler():
    trainer = Trainer(tiny(sampler="task-balanced", epochs=1), None, progress=None)
    drawn = [i for e in range(10) for b in trainer._loader(trainer.data.train, shuffle=True, epoch=e)
             for i in b["index"].tolist()]
    depth_share = np.mean([i >= SEMANTIC_TRAIN for i in drawn])
    assert 0.4 < depth_share < 0.6


# -- masked losses ------------------------------------------------------------------------------
def _subset(batch, keep: torch.Tensor):
    out = {}
    for key, value in batch.items():
        if key == "has":
            out[key] = {t: v[keep] for t, v in value.items()}
        elif isinstance(value, list):
            out[key] = [v for v, k in zip(value, keep.tolist()) if k]
        else:
            out[key] = value[keep]
    return out


def _grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))]


def test_a_sample_without_a_tasks_label_is_as_if_absent():
    trainer = Trainer(tiny(), None, progress=None)
    data = trainer.data.train
    batch = collate([data[i] for i in (0, 36, 1, 37, 2, 38)])  # both sources, interleaved
    params = list(trainer.model.parameters())
    full = trainer.compute_losses(batch)
    for task in TASKS:
        keep = batch["has"][task]
        assert 0 < int(keep.sum()) < len(keep)
        alone = trainer.compute_losses(_subset(batch, keep))
        torch.testing.assert_close(full.losses[task], alone.losses[task], rtol=1e-5, atol=1e-7)
        for a, b in zip(_grads(full.losses[task], params), _grads(alone.losses[task], params)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name, hparams", [("ew", {}), ("amtl", {"potentials": POTENTIALS}), ("gls", {}),
                                           ("mgda", {}), ("pcgrad", {}), ("nash", {}),
                                           ("amtl+pcgrad", {"potentials": POTENTIALS, "source": "representation"})])
def test_a_task_absent_from_the_whole_batch_contributes_nothing(name, hparams):
    """A depth-only batch: the update is the depth gradient alone (Nash-MTL: rescaled, its head too);
    other heads get none."""
    trainer = Trainer(tiny(), None, progress=None)
    batch = collate([trainer.data.train[i] for i in range(SEMANTIC_TRAIN, SEMANTIC_TRAIN + 6)])
    model = trainer.model
    reference = trainer.compute_losses(batch)
    assert set(reference.losses) == {"depth"}
    shared, head = model.shared_parameters(), list(model.heads["depth"].parameters())
    expected = _grads(reference.losses["depth"], shared + head)
    method = balancers.make(name, list(TASKS), **hparams)
    model.zero_grad(set_to_none=True)
    report = method.backward(trainer.compute_losses(batch), diagnose=True)
    got = [torch.zeros_like(p) if p.grad is None else p.grad for p in shared + head]
    flat_got = torch.cat([g.flatten() for g in got[:len(shared)]])
    flat_expected = torch.cat([g.flatten() for g in expected[:len(shared)]])
    # Nash-MTL solves (G G^T) alpha = 1/alpha, i.e. alpha = 1/|g| for one task: a unit-norm step.
    scale = 1.0 / float(flat_expected.norm()) if name == "nash" else 1.0
    torch.testing.assert_close(flat_got, scale * flat_expected, rtol=1e-4, atol=1e-7)
    # The head gets its task gradient; scaled by alpha (the same 1/|g|) where the method weights heads.
    head_scale = scale if method.aggregator is not None and method.aggregator.heads == "weighted" else 1.0
    for a, b in zip(got[len(shared):], expected[len(shared):]):
        torch.testing.assert_close(a, head_scale * b, rtol=1e-4, atol=1e-7)
    for t in ("segmentation", "detection"):
        assert all(p.grad is None or not p.grad.any() for p in model.heads[t].parameters())
    if name != "ew":  # EW's weights are constants; every other method reports 0 for an absent task
        assert report.weights["segmentation"] == report.weights["detection"] == 0.0
    assert all(np.isfinite(list(method.weights.values())))


# -- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("balancer, sampler", [("amtl", "task-balanced"), ("gls", "random"), ("mgda", "task-balanced"),
                                               ("pcgrad", "random"), ("amtl+mgda", "random")])
def test_all_three_tasks_train(tmp_path, balancer, sampler):
    potentials = POTENTIALS if balancer.startswith("amtl") else None
    result = Trainer(tiny(balancer=balancer, potentials=potentials, sampler=sampler, epochs=2), tmp_path,
                     progress=None).fit()
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 6
    seen = {t for s in steps for t in s["losses"]}
    assert seen == set(TASKS)
    assert all(np.isfinite(v) for s in steps for v in s["losses"].values())
    for key in ("segmentation/miou", "detection/map_50", "depth/abs_err"):
        assert np.isfinite(result["val"][key]) and np.isfinite(result["test"][key])
    first = [s["losses"]["depth"] for s in steps[:3] if "depth" in s["losses"]]
    assert first  # depth labels reach training in the first epoch


def test_cli_trains_the_partial_dataset(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "amtl.train", "--dataset", "partial", "--tasks",
                           "segmentation,detection,depth", "--epochs", "1", "--out", str(out), "--image-size", "32",
                           "--n-train", "48", "--n-val", "16", "--n-test", "16", "--batch-size", "16",
                           "--sampler", "task-balanced"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ("training labels per task (task-balanced sampler): segmentation 36/48, detection 36/48, depth 12/48"
            in proc.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k.split("/")[0] for k in metrics["test"]} == set(TASKS)


@pytest.mark.parametrize("args, fragment", [
    (["--tasks", "segmentation,normal"], "dataset 'partial' has no labels for task(s) normal"),
    (["--tasks", "depth", "--n-val", "1"], "needs at least 2 val samples"),
    (["--tasks", "depth", "--sampler", "uniform"], "--sampler: invalid choice: 'uniform'"),
    (["--tasks", "depth", "--data-root", "coco=/x"], "voc=DIR,nyuv2=DIR"),
    (["--tasks", "depth", "--data-root", "voc=/x"], "needs the nyuv2 root"),
])
def test_cli_bad_partial_input_one_line_exit_2(tmp_path, capsys, args, fragment):
    from amtl.train import main
    try:
        code = main(["--out", str(tmp_path / "x"), "--dataset", "partial", "--image-size", "32", "--n-train", "8",
                     "--n-val", "4", "--n-test", "4", *args])
    except SystemExit as exit_:  # argparse's own errors (choices)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and fragment in err
    assert not (tmp_path / "x" / "metrics.json").exists()


# -- the real default: VOC (segmentation + detection) + NYUv2 (depth) ---------------------------
@pytest.fixture
def real_root(tmp_path):
    from amtl.data.nyuv2 import write_nyuv2_tree
    from amtl.data.voc import write_voc_tree
    g = torch.Generator().manual_seed(0)

    def voc_split(names):
        seg = {n: torch.randint(0, 21, (12, 16), generator=g) for n in names}
        det = {n: {"boxes": torch.tensor([[2.0, 2.0, 10.0, 9.0]]), "labels": torch.tensor([i % 20])}
               for i, n in enumerate(names)}
        return {"images": {n: torch.rand(3, 12, 16, generator=g) for n in names}, "segmentation": seg,
                "detection": det}
    write_voc_tree(tmp_path / "both", {"train": voc_split(["a", "b", "c"]), "val": voc_split(["d", "e"])})
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        write_nyuv2_tree(tmp_path / "both" / "nyuv2", split, rng.random((n, 10, 14, 3)), None,
                         rng.uniform(0.5, 5.0, (n, 10, 14, 1)), None)
    return tmp_path / "both"


def test_real_sources_voc_and_nyuv2(real_root):
    both = build_datasets("partial", TASKS, root=real_root, image_size=8)
    pairs = build_datasets("partial", TASKS, root=f"voc={real_root},nyuv2={real_root / 'nyuv2'}", image_size=8)
    assert (both.num_classes, both.num_detection_classes) == (21, 20)  # VOC's classes, not NYUv2's 13
    # VOC train 3; NYUv2 train 4 of which 1 is held out as val; VOC val 2 = val 1 + test 1; NYUv2 val is test.
    assert both.train.source_sizes() == pairs.train.source_sizes() == {"semantic": 3, "depth": 3}
    assert both.val.source_sizes() == {"semantic": 1, "depth": 1}
    assert both.test.source_sizes() == {"semantic": 1, "depth": 2}
    batch = collate([both.train[i] for i in range(len(both.train))])  # NYUv2 resized+cropped to 8x8
    assert batch["image"].shape == (6, 3, 8, 8) and batch["depth"].shape == (6, 1, 8, 8)
    assert batch["has"]["depth"].tolist() == [False] * 3 + [True] * 3
    assert (batch["depth"][3:] > 0).all() and (batch["segmentation"][3:] == -1).all()
    depth_only = build_datasets("partial", ["depth"], root=f"nyuv2={real_root / 'nyuv2'}", image_size=8)
    assert depth_only.train.sources == ["depth"]
    with pytest.raises(DatasetConfigError, match="needs the voc root"):
        build_datasets("partial", ["segmentation"], root=f"nyuv2={real_root / 'nyuv2'}", image_size=8)


# -- sweeps --------------------------------------------------------------------------------------
# A whole tiny sweep on `partial` (5 Ray Train trials) took 256 s on the shared 2-core machine, too long for
# the suite; the sweep machinery itself is covered by tests/test_sweep.py. Here: the partial-specific wiring.
def test_potential_trials_train_on_their_tasks_source(tmp_path):
    """A potentials-phase trial spec (one task, EW) gives a trainer on that task's source only."""
    from sweeps import potentials as pot
    from sweeps.runner import Sweep, SweepOptions
    options = SweepOptions.of(dataset="partial", tasks=list(TASKS), no_wandb=True, storage=str(tmp_path), **SIZES)
    spec = Sweep(options, say=lambda m: None).trial_spec("potentials")
    for task, source, n in (("depth", "depth", DEPTH_TRAIN), ("detection", "semantic", SEMANTIC_TRAIN)):
        single = spec.with_train(tasks=[task], balancer="ew")
        train, method = single.train, single.method
        trainer = Trainer(TrainConfig.from_dict(train), None, progress=None)
        assert method == "ew" and trainer.data.train.sources == [source] and len(trainer.data.train) == n
        assert trainer.label_counts == {task: n}
        identity = pot.fingerprint(options.trial_train.to_dict(), task)
        assert identity == pot.fingerprint(train, task)  # the trial's own options give the same key


def test_zero_single_task_results_stop_the_sweep_with_the_fix():
    from sweeps.potentials import Potentials, PotentialsError, check_usable
    ok = Potentials("f", {"depth": 0.4, "detection": 0.02}, {"val": {"detection/map_50": 0.02}, "test": {}})
    check_usable(ok)
    zero = Potentials("f", {"depth": 0.4, "detection": 0.0}, {"val": {"detection/map_50": 0.0}, "test": {}})
    with pytest.raises(PotentialsError, match=r"potential of detection, val/detection/map_50.*raise --epochs"):
        check_usable(zero)


def test_sweep_input_check_accepts_partial_without_rendering(tmp_path, monkeypatch):
    from sweeps.cli import check_options
    from sweeps.runner import SweepOptions
    monkeypatch.setenv("AMTL_CACHE_DIR", str(tmp_path / "cache"))
    check_options(SweepOptions.of(dataset="partial", tasks=list(TASKS), storage=str(tmp_path / "s")))
    assert not (tmp_path / "cache").exists()  # rendered inside the trials, not by the driver's check
    with pytest.raises(DatasetConfigError, match="'partial' has no labels for task.s. normal"):
        check_options(SweepOptions.of(dataset="partial", tasks=["depth", "normal"], storage=str(tmp_path / "s")))


def test_sweep_passes_the_sampler_to_every_trial():
    from run_sweep import parse_options
    options, _ = parse_options(["--dataset", "partial", "--tasks", "segmentation,depth", "--sampler", "task-balanced"])
    assert options.trial_train.sampler == "task-balanced"
    assert parse_options([])[0].trial_train.sampler == "random"
