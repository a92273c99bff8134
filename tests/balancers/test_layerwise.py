"""The layer-wise Gramian (``amtl/balancers/_layerwise.py``) against the plain per-task VJPs.

Everything runs in float64, where both engines agree to rounding (~1e-15); the bound is 1e-9. The
ResNet-18 model has BatchNorm (train mode), biased 1x1 convs and a GroupNorm; the ``small`` model
GroupNorm only. At 32x32, batch 4, ResNet-18 has convs on both sides of the A/B choice.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from amtl.balancers import StepInputs, make
from amtl.balancers import _layerwise
from amtl.balancers._layerwise import LayerwiseGramian, find_layers
from amtl.balancers.base import MatrixAggregator
from amtl.balancers.method import _AGGREGATORS
from amtl.models import build_model
from amtl.tasks import make_task

TASKS = ("segmentation", "depth", "normal")
RTOL = 1e-9


@pytest.fixture(scope="module", params=["resnet18", "small"])
def setup(request):
    torch.manual_seed(0)
    tasks = {t: make_task(t, num_classes=5) for t in TASKS}
    model = build_model(request.param, list(tasks.values())).double().train()
    b, s = 4, 32
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(b, 3, s, s, generator=gen, dtype=torch.float64)
    targets = {"segmentation": torch.randint(0, 5, (b, s, s), generator=gen),
               "depth": torch.rand(b, 1, s, s, generator=gen, dtype=torch.float64) + 0.1,
               "normal": nn.functional.normalize(torch.randn(b, 3, s, s, generator=gen, dtype=torch.float64), dim=1)}
    return request.param, model, tasks, images, targets


@pytest.fixture
def spy(monkeypatch):
    """Every LayerwiseGramian.build result (None: the plain engine ran)."""
    built = []
    original = LayerwiseGramian.build.__func__

    def build(cls, *args, **kwargs):
        built.append(original(cls, *args, **kwargs))
        return built[-1]
    monkeypatch.setattr(LayerwiseGramian, "build", classmethod(build))
    return built


def run(setup, name: str, layerwise: bool, present=TASKS, loss_scale=None, **hparams):
    """One step; returns (Gramian the aggregator saw, alpha, every model parameter's .grad)."""
    _, model, tasks, images, targets = setup
    model.zero_grad(set_to_none=True)
    method = make(name, list(TASKS), source="shared", **hparams)
    method.layerwise = layerwise
    seen = []
    solve = method.aggregator.weights
    method.aggregator.weights = lambda k: seen.append(k.clone()) or solve(k)
    z = model.encode(images)
    preds = model.decode(z, tuple(images.shape[-2:]))
    losses = {}
    for t in present:
        per, ok = tasks[t].sample_losses(preds[t], targets[t])
        losses[t] = per.sum() / ok.sum().clamp(min=1)
    method.backward(StepInputs(losses=losses, shared_params=model.shared_parameters(),
                               task_params=model.task_parameters(),
                               last_shared_params=model.last_shared_parameters(), representation=z),
                    loss_scale=loss_scale)
    return seen[0], torch.tensor(list(method._last_alpha.values()), dtype=torch.float64), \
        [None if p.grad is None else p.grad.clone() for p in model.parameters()]  # None: an absent task's head


def assert_same(new, old) -> None:
    (k1, a1, g1), (k0, a0, g0) = new, old
    torch.testing.assert_close(k1, k0, rtol=RTOL, atol=RTOL * float(k0.abs().max()))
    torch.testing.assert_close(a1, a0, rtol=RTOL, atol=RTOL * float(a0.abs().max()))
    for x, y in zip(g1, g0):
        assert (x is None) == (y is None)
        if y is not None:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=RTOL * float(y.abs().max().clamp(min=1e-30)))


@pytest.mark.parametrize("name", sorted(n for n, cls in _AGGREGATORS.items() if not issubclass(cls, MatrixAggregator)))
def test_matches_plain_engine(setup, name, spy):
    old = run(setup, name, layerwise=False)
    assert spy == []
    new = run(setup, name, layerwise=True)
    assert len(spy) == 1 and spy[0] is not None, "the layer-wise engine did not run"
    assert_same(new, old)
    assert not new[0].requires_grad and not any(g.requires_grad for g in new[2] if g is not None)
    if setup[0] == "resnet18":  # both options on this model and size
        assert {conv.kernel for conv in spy[0].convs} == {True, False}


@pytest.mark.parametrize("present", [TASKS[:2], ("segmentation", "normal")], ids=["two", "depth-absent"])
@pytest.mark.parametrize("name", ["mgda", "pcgrad", "nash"])
def test_two_tasks_and_an_absent_task(setup, name, present, spy):
    assert_same(run(setup, name, True, present=present), run(setup, name, False, present=present))
    assert spy[0] is not None and spy[0].gramian.shape == (2, 2)


def test_loss_scale(setup, spy):
    """fp16 semantics: .grad carries the scale, the aggregator sees the unscaled Gramian."""
    scale = 2.0 ** 10
    assert_same(run(setup, "nash", True, loss_scale=scale), run(setup, "nash", False, loss_scale=scale))
    assert spy[0] is not None


def test_grads_accumulate(setup):
    """Existing .grad is added to, as backward() would."""
    _, model, *_ = setup
    _, _, once = run(setup, "pcgrad", True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.zero_grad = lambda set_to_none=True: None  # keep the ones for this call
    try:
        _, _, twice = run(setup, "pcgrad", True)
    finally:
        del model.zero_grad
    for a, b in zip(twice, once):
        torch.testing.assert_close(a, b + 1, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("force", ["A", "B"])
def test_either_option_is_exact(setup, force):
    """Every conv forced to A or to B: the Gramian and update equal per-task autograd gradients."""
    name, model, tasks, images, targets = setup
    params = model.shared_parameters()
    z = model.encode(images)
    gen = torch.Generator().manual_seed(2)
    rep = torch.randn(3, *z.shape, generator=gen, dtype=z.dtype)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, params, r, retain_graph=True)]) for r in rep]
    g = torch.stack(rows)
    lw = LayerwiseGramian.build(z, params, rep, release=True, force=force)
    assert lw is not None and all(conv.kernel == (force == "B") for conv in lw.convs)
    if force == "B" and name == "resnet18":  # both forms of U U^T: channel Gramian and unfolded
        assert {conv.channel_gram for conv in lw.convs} == {True, False}
    torch.testing.assert_close(lw.gramian, g @ g.T, rtol=RTOL, atol=RTOL * float((g @ g.T).abs().max()))
    alpha = [0.7, -0.2, 1.3]
    update = torch.cat([u.reshape(-1) for u in lw.update(alpha)])
    ref = torch.tensor(alpha, dtype=g.dtype) @ g
    torch.testing.assert_close(update, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))


class Normed(nn.Module):
    """Supported owners beyond the two models: LayerNorm, BatchNorm in eval mode, a bias-only conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.ln = nn.LayerNorm([6, 5, 5])
        self.bn = nn.BatchNorm2d(6).eval()
        self.fixed = nn.Conv2d(6, 6, 1)
        self.fixed.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fixed(torch.relu(self.bn(self.ln(self.conv(x)))))


def _tiny_step(enc: nn.Module, x: torch.Tensor, layerwise: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Conv2d(6, 1, 1).double() for _ in range(3)])
    enc.zero_grad(set_to_none=True)
    z = enc(x)
    losses = {t: (h(z) ** 2).mean() * (i + 1) + h(z).mean() for i, (t, h) in enumerate(zip(TASKS, heads))}
    shared = [p for p in enc.parameters() if p.requires_grad]
    m = make("mgda", list(TASKS))
    m.layerwise = layerwise
    m.backward(StepInputs(losses=losses, shared_params=shared, task_params=list(heads.parameters()),
                          representation=z))
    return [p.grad.clone() for p in shared] + [torch.tensor(list(m._last_alpha.values()))]


def test_other_supported_owners(spy):
    torch.manual_seed(0)
    enc = Normed().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    new, old = _tiny_step(enc, x, True), _tiny_step(enc, x, False)
    assert spy[0] is not None and len(spy[0].convs) == 1
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))


# -- fallback -----------------------------------------------------------------------------------
class Embedded(nn.Module):
    """A shared embedding (unsupported owner) before a supported conv."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, H, W] token ids
        return self.conv(self.embed(x).permute(0, 3, 1, 2))


class Twice(nn.Module):
    """One conv weight used by two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.out = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(torch.relu(self.norm(self.conv(x)))))


class Hooked(Normed):
    """A tensor hook on a shared conv weight: it must see per-task gradients, so the plain VJPs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv.weight.register_hook(lambda g: g)


@pytest.mark.parametrize("cls", [Embedded, Twice, Hooked])
def test_unsupported_encoders_fall_back(cls, spy):
    torch.manual_seed(0)
    enc = cls().double()
    x = torch.randint(0, 10, (2, 5, 5)) if cls is Embedded else torch.randn(2, 4, 5, 5, dtype=torch.float64)
    z = enc(x)
    assert find_layers(z, [p for p in enc.parameters() if p.requires_grad]) is None
    new, old = _tiny_step(enc, x, True), _tiny_step(enc, x, False)
    assert spy == [None]
    for a, b in zip(new, old):
        assert torch.equal(a, b)


def test_autocast_falls_back():
    """Under autocast the conv weight reaches the graph through a cast: not handled, so the plain VJPs."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = conv(torch.randn(1, 3, 5, 5))
    assert find_layers(z, list(conv.parameters())) is None


def test_kernel_choice_counts_multiply_adds():
    # ResNet-18 at 64x64, batch 16, T=3: layer4's 3x3 convs (2x2 outputs) take B; layer3's stride-1
    # 3x3 convs (4x4) take B only with the channel-Gramian kernel (B/A 0.48; unfolded 0.77); its
    # stride-2 conv (8x8 input) and the stem take A.
    def unfolded(n: int, p: int) -> int:  # U U^T's multiply-adds when unfolded
        return n * n * p

    assert _layerwise._prefers_kernel(16 * 2 * 2, 512 * 9, 512, 3, unfolded(16 * 2 * 2, 512 * 9))
    cost, channel = _layerwise._kernel_cost((16, 256, 4, 4), (256, 256, 3, 3), 16 * 4 * 4, (1, 1))
    assert channel and _layerwise._prefers_kernel(16 * 4 * 4, 256 * 9, 256, 3, cost)
    assert not _layerwise._prefers_kernel(16 * 4 * 4, 256 * 9, 256, 3, unfolded(16 * 4 * 4, 256 * 9))
    cost, channel = _layerwise._kernel_cost((16, 128, 8, 8), (256, 128, 3, 3), 16 * 4 * 4, (1, 1))
    assert not channel and not _layerwise._prefers_kernel(16 * 4 * 4, 128 * 9, 256, 3, cost)
    assert not _layerwise._prefers_kernel(16 * 32 * 32, 3 * 49, 64, 3, unfolded(16 * 32 * 32, 3 * 49))
    # The padded channel Gramian is bounded like the kernel: a big input cannot take that form.
    assert not _layerwise._kernel_cost((64, 8, 16, 16), (8, 8, 7, 7), 64 * 16 * 16, (3, 3))[1]
    assert _layerwise._kernel_cost((4, 8, 16, 16), (8, 8, 7, 7), 4 * 16 * 16, (3, 3))[1]


@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    ((3, 3), (1, 1), (1, 1), (1, 1), (4, 4)),
    ((3, 3), (2, 2), (1, 1), (1, 1), (8, 8)),
    ((1, 3), (1, 2), (0, 2), (1, 2), (5, 7)),
    ((5, 5), (1, 1), (2, 2), (2, 1), (6, 5)),
    ((2, 2), (2, 1), (0, 0), (1, 1), (5, 5)),
    ((1, 1), (1, 1), (0, 0), (1, 1), (3, 3)),
])
def test_channel_gramian_kernel_equals_unfolded(kernel, stride, padding, dilation, size):
    """``_patch_kernel`` (shifted slices of the channel Gramian) is ``U U^T`` of the unfolded input,
    rows in the engine's (y, x, b) order, for strides, paddings, dilations and non-square kernels."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, *size, generator=gen, dtype=torch.float64)
    u = nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    out_hw = [(size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
    u = u.permute(2, 0, 1).reshape(-1, u.shape[1])
    conv = _layerwise._Conv(None, 0, x, stride, padding, dilation)
    kernel_matrix = _layerwise._patch_kernel(conv, x, (2, 4, *kernel), out_hw)
    torch.testing.assert_close(kernel_matrix, u @ u.T, rtol=RTOL, atol=RTOL * float((u @ u.T).abs().max()))
