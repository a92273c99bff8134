"""Task losses and metrics against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from amtl.tasks import delta_m, directions, make_task


def logits_for(classes: list[int], num_classes: int) -> torch.Tensor:
    """[1, C, 1, N] logits whose argmax is ``classes``."""
    return F.one_hot(torch.tensor(classes), num_classes).float().T.reshape(1, num_classes, 1, -1) * 5


def test_segmentation_metrics_hand_computed():
    # gt:   0 0 1 1 2 ignore ; pred: 0 1 1 1 0 2
    # confusion (gt rows): [[1,1,0],[0,2,0],[1,0,0]] -> IoU = 1/3, 2/3, 0 ; pixel acc 3/5
    task = make_task("segmentation", num_classes=3)
    metric = task.metric()
    metric.update(logits_for([0, 1, 1, 1, 0, 2], 3), torch.tensor([[[0, 0, 1, 1, 2, -1]]]))
    out = metric.compute()
    assert out["miou"].item() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert out["pixel_acc"].item() == pytest.approx(3 / 5)


def test_segmentation_miou_skips_classes_absent_from_gt_and_pred():
    task = make_task("segmentation", num_classes=5)  # classes 3, 4 never appear
    metric = task.metric()
    metric.update(logits_for([0, 1], 5), torch.tensor([[[0, 1]]]))
    assert metric.compute()["miou"].item() == pytest.approx(1.0)


def test_depth_metrics_hand_computed():
    # valid pixels: (p, g) = (1, 1), (2, 4), (5, 4); the g = 0 pixel is invalid
    # abs = (0 + 2 + 1) / 3 = 1 ; rel = (0 + 0.5 + 0.25) / 3 = 0.25 ; delta1: ratios 1, 2, 1.25 -> 1/3
    metric = make_task("depth").metric()
    metric.update(torch.tensor([1.0, 2, 3, 5]).view(1, 1, 1, 4), torch.tensor([1.0, 4, 0, 4]).view(1, 1, 1, 4))
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out == pytest.approx({"abs_err": 1.0, "rel_err": 0.25, "delta1": 1 / 3})


def unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.sin(r), 0.0, math.cos(r)]


def test_normal_metrics_hand_computed():
    angles = [0, 10, 20, 40, 50]
    pred = torch.tensor([unit(a) for a in angles] + [unit(0)]).T.reshape(1, 3, 1, 6)
    target = torch.tensor([unit(0)] * 5 + [[0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 6)  # last pixel invalid
    metric = make_task("normal").metric()
    metric.update(pred, target)
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out["mean_angle"] == pytest.approx(24.0, abs=1e-3)
    assert out["median_angle"] == pytest.approx(20.0, abs=0.01)
    assert out["within_11.25"] == pytest.approx(2 / 5)
    assert out["within_22.5"] == pytest.approx(3 / 5)
    assert out["within_30"] == pytest.approx(3 / 5)


def test_metrics_accumulate_over_the_split_not_batch_means():
    # Two batches with different numbers of valid pixels: the split metric weights pixels, not batches.
    depth = make_task("depth")
    whole, split = depth.metric(), depth.metric()
    pred = torch.tensor([1.0, 1, 1, 1]).view(1, 1, 1, 4)
    gt = torch.tensor([2.0, 0, 0, 4]).view(1, 1, 1, 4)
    gt2 = torch.tensor([1.5, 1.5, 1.5, 1.5]).view(1, 1, 1, 4)
    whole.update(torch.cat([pred, pred]), torch.cat([gt, gt2]))
    split.update(pred, gt)
    split.update(pred, gt2)
    assert split.compute()["abs_err"].item() == pytest.approx(whole.compute()["abs_err"].item())
    assert whole.compute()["abs_err"].item() == pytest.approx((1 + 3 + 4 * 0.5) / 6)


@pytest.mark.parametrize("name", ["segmentation", "depth", "normal"])
def test_unlabelled_sample_leaves_loss_and_gradient_unchanged(name):
    torch.manual_seed(0)
    task = make_task(name, num_classes=4)
    head = task.head(8)
    rep = torch.randn(3, 8, 4, 4)
    targets = {
        "segmentation": torch.randint(-1, 4, (3, 8, 8)),
        "depth": torch.rand(3, 1, 8, 8) + 0.5,
        "normal": F.normalize(torch.randn(3, 3, 8, 8), dim=1),
    }[name]

    def loss_and_grad(rep, target, has):
        head.zero_grad()
        loss = task.loss(head(rep, (8, 8)), target, has)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in head.parameters()]

    with_extra, g1 = loss_and_grad(rep, targets, torch.tensor([True, True, False]))
    without, g2 = loss_and_grad(rep[:2], targets[:2], None)
    assert with_extra == pytest.approx(without.item(), rel=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_sample_with_no_valid_pixels_is_invalid():
    losses, valid = make_task("depth").sample_losses(torch.ones(2, 1, 2, 2), torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]))
    assert valid.tolist() == [False, True]
    assert losses[0].item() == 0.0


def test_delta_m_worked_example():
    # miou 0.5 vs base 0.4 (higher better): -(0.1/0.4) = -0.25
    # abs_err 0.6 vs base 0.5 (lower better): +(0.1/0.5) = +0.2  -> 100/2 * (-0.05) = -2.5
    dirs = {"segmentation/miou": True, "depth/abs_err": False}
    value = delta_m({"segmentation/miou": 0.5, "depth/abs_err": 0.6}, {"segmentation/miou": 0.4, "depth/abs_err": 0.5}, dirs)
    assert value == pytest.approx(-2.5)
    assert delta_m({"segmentation/miou": 0.4, "depth/abs_err": 0.5}, {"segmentation/miou": 0.4, "depth/abs_err": 0.5}, dirs) == 0


def test_delta_m_rejects_missing_or_zero_baselines():
    dirs = directions([make_task("depth")])
    with pytest.raises(KeyError, match="depth/delta1"):
        delta_m({"depth/abs_err": 1, "depth/rel_err": 1}, {"depth/abs_err": 1, "depth/rel_err": 1}, dirs)
    with pytest.raises(ValueError, match="baseline"):
        delta_m({"x": 1}, {"x": 0}, {"x": True})


def test_unknown_task_error_lists_known():
    with pytest.raises(ValueError, match="known: depth, detection, normal, segmentation"):
        make_task("nope")
