"""amtl's balancers inside your own training loop, on any model: ``python examples/own_loop.py --method cagrad``.

Two regression tasks share an encoder; the balancer decides how their gradients combine.
"""
import argparse

import torch
from torch import nn

from amtl import balancers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="cagrad", help=f"any of: {', '.join(balancers.names())}, or A+B")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1024, 16)
    y = torch.cat([x[:, :8].sum(1, keepdim=True), (x[:, 4:] ** 2).mean(1, keepdim=True)], dim=1)
    encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    heads = nn.ModuleDict({"sum": nn.Linear(32, 1), "energy": nn.Linear(32, 1)})
    method = balancers.make(args.method, tasks=list(heads), seed=0)
    params = [*encoder.parameters(), *heads.parameters(), *method.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    totals = dict.fromkeys(heads, 0.0)
    for step in range(args.steps):
        batch = torch.randint(0, len(x), (64,))
        z = encoder(x[batch])
        losses = {task: nn.functional.mse_loss(head(z).squeeze(1), y[batch, i])
                  for i, (task, head) in enumerate(heads.items())}
        optimizer.zero_grad()
        report = balancers.backward(method, losses, shared=encoder.parameters(), heads=heads.parameters(),
                                    representation=z, last_shared=encoder[2].parameters(), step=step)
        optimizer.step()
        method.after_step()
        totals = {task: totals[task] + loss.item() for task, loss in losses.items()}
        if (step + 1) % 50 == 0:  # an "epoch" of 50 steps: loss-history methods (DWA) read its means
            method.on_epoch_end({task: total / 50 for task, total in totals.items()})
            totals = dict.fromkeys(heads, 0.0)
        if step == 0 or (step + 1) % 100 == 0:
            shown = ", ".join(f"{t} {loss.item():.3f} (w {report.weights[t]:.2f})" for t, loss in losses.items())
            print(f"step {step + 1}: {shown}")


if __name__ == "__main__":
    main()
