"""The balancers as a library in a user's own training loop (examples/own_loop.py)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from amtl import balancers

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


@pytest.mark.parametrize("method", ["ew", "cagrad", "gradnorm", "uw", "dwa", "pcgrad"])
def test_the_example_loop_trains_both_tasks(method):
    done = subprocess.run([sys.executable, str(EXAMPLE), "--method", method], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = re.findall(r"step (\d+): sum ([\d.]+) \(w [\d.]+\), energy ([\d.]+)", done.stdout)
    first, last = lines[0], lines[-1]
    assert first[0] == "1" and last[0] == "300"
    assert float(last[1]) < 0.2 * float(first[1]) and float(last[2]) < 0.5 * float(first[2]), done.stdout


def test_backward_gives_heads_their_own_gradient_and_the_encoder_the_aggregated_one():
    torch.manual_seed(0)
    encoder, heads = nn.Linear(4, 3), nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    x = torch.randn(8, 4)
    z = encoder(x)
    losses = {t: head(z).pow(2).mean() for t, head in heads.items()}
    own = {t: torch.autograd.grad(losses[t], list(heads[t].parameters()), retain_graph=True) for t in heads}
    method = balancers.make("mgda", tasks=["a", "b"])
    report = balancers.backward(method, losses, shared=encoder.parameters(), heads=heads.parameters(),
                                representation=z)
    for t in heads:
        for p, g in zip(heads[t].parameters(), own[t]):
            assert torch.allclose(p.grad, g)
    alpha = report.weights
    task_grads = [torch.autograd.grad(heads[t](encoder(x)).pow(2).mean(), encoder.weight)[0] for t in heads]
    expected = alpha["a"] * task_grads[0] + alpha["b"] * task_grads[1]
    assert torch.allclose(encoder.weight.grad, expected, atol=1e-6)


def test_an_instance_level_method_says_it_needs_the_trainer():
    method = balancers.make("iltp", tasks=["a"], num_instances=4)
    with pytest.raises(balancers.HParamError, match="runs in amtl's Trainer"):
        balancers.backward(method, {"a": torch.zeros((), requires_grad=True)}, shared=[], heads=[])
