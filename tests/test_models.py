"""Models: every trunk yields the declared shared parts; local weight files load, nothing is downloaded."""
import pytest
import torch
import torchvision

from amtl.models import MODELS, build_model
from amtl.tasks import make_task

TASKS = [make_task("segmentation", num_classes=6), make_task("depth"), make_task("normal")]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_predicts_at_input_size_and_declares_its_shared_parts(name):
    model = build_model(name, TASKS).eval()  # eval: EfficientNet's stochastic depth is random in train mode
    images = torch.rand(2, 3, 64, 64)
    rep = model.encode(images)
    out = model.decode(rep, (64, 64))
    assert out["segmentation"].shape == (2, 6, 64, 64)
    assert out["depth"].shape == (2, 1, 64, 64) and out["normal"].shape == (2, 3, 64, 64)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared and not shared & {id(p) for p in model.task_parameters()}
    assert {id(p) for p in model.last_shared_parameters()} <= shared
    # The last shared layer produces the representation.
    seen = []
    handle = model.last_shared_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    model.encode(images)
    handle.remove()
    torch.testing.assert_close(seen[0], rep)


def test_local_weights_file_is_loaded(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", TASKS, weights_path=path)
    torch.testing.assert_close(model.encoder.stages[1][0].conv1.weight, reference.layer1[0].conv1.weight)


def test_bad_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("resnet18", TASKS, weights_path=tmp_path / "missing.pth")
    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit the backbone"):
        build_model("resnet18", TASKS, weights_path=wrong)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", TASKS)
