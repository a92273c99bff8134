"""Checks of the CUDA code paths, for a machine with a GPU (``bench/gpu_check.sh`` runs it).

    python bench/gpu_check.py [--device cuda] [--methods ew,mgda]

1. engine: every Gramian aggregator's step with the layer-wise engine on the device, in float64,
   against the plain per-task passes (the engine must engage and agree to 1e-9, as on CPU);
2. train: one short epoch of every registered method on the device in float32;
3. amp: the same under autocast bfloat16 and float16 (float16 with the gradient scaler), for one
   method of each kind.

Each check prints one line per case and the run ends with a summary; the exit status is 1 if any
case failed. On CPU (``--device cpu``) autocast is off, so ``amp`` only checks that the code runs;
the tests run it that way to keep the script working where no GPU is.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, also when not installed

from amtl import balancers  # noqa: E402
from amtl.balancers import StepInputs  # noqa: E402
from amtl.balancers._layerwise import LayerwiseGramian  # noqa: E402
from amtl.balancers.base import MatrixAggregator  # noqa: E402
from amtl.balancers.method import _AGGREGATORS  # noqa: E402
from amtl.data.registry import build_datasets  # noqa: E402
from amtl.models import build_model  # noqa: E402
from amtl.tasks import make_task  # noqa: E402
from amtl.trainer import TrainConfig, Trainer  # noqa: E402

TASKS = ("segmentation", "depth", "normal")
POTENTIALS = {"segmentation": 0.5, "depth": 0.6, "normal": 0.4}
RTOL = 1e-9
#: One method of each kind under autocast: a weighting, a Gramian aggregator, one that reads the
#: flat gradient matrix, one with learnable state, one fed with three parts of each batch.
AMP_METHODS = ("amtl", "nash", "graddrop", "famo", "modo")


def engine_case(name: str, device: torch.device, model_name: str) -> str:
    """The layer-wise Gramian against the plain passes, float64, for aggregator ``name``."""
    torch.manual_seed(0)
    tasks = {t: make_task(t, num_classes=5) for t in TASKS}
    model = build_model(model_name, list(tasks.values())).double().to(device).train()
    gen = torch.Generator().manual_seed(1)
    b, s = 4, 32
    images = torch.rand(b, 3, s, s, generator=gen, dtype=torch.float64).to(device)
    targets = {"segmentation": torch.randint(0, 5, (b, s, s), generator=gen).to(device),
               "depth": (torch.rand(b, 1, s, s, generator=gen, dtype=torch.float64) + 0.1).to(device),
               "normal": nn.functional.normalize(torch.randn(b, 3, s, s, generator=gen, dtype=torch.float64),
                                                 dim=1).to(device)}
    built: list = []
    original = LayerwiseGramian.build.__func__

    def step(layerwise: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        method = balancers.make(name, list(TASKS), source="shared")
        method.layerwise = layerwise
        z = model.encode(images)
        preds = model.decode(z, tuple(images.shape[-2:]))
        losses = {}
        for t in TASKS:
            per, ok = tasks[t].sample_losses(preds[t], targets[t])
            losses[t] = per.sum() / ok.sum().clamp(min=1)
        LayerwiseGramian.build = classmethod(lambda cls, *a, **k: built.append(original(cls, *a, **k)) or built[-1])
        try:
            method.backward(StepInputs(losses=losses, shared_params=model.shared_parameters(),
                                       task_params=model.task_parameters(),
                                       last_shared_params=model.last_shared_parameters(), representation=z))
        finally:
            LayerwiseGramian.build = classmethod(original)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = step(False)
    layerwise = step(True)
    if not built or built[-1] is None:
        raise AssertionError("the layer-wise engine did not engage")
    worst = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30) for a, b in zip(layerwise, plain))
    if worst > RTOL:
        raise AssertionError(f"layer-wise gradients differ from the plain passes by {worst:.1e} (bound {RTOL:.0e})")
    return f"max relative difference {worst:.1e}"


def train_case(name: str, device: torch.device, data, amp_dtype: str | None = None) -> str:
    """One short epoch of ``name`` on ``device``; ``amp_dtype`` None: float32, no autocast."""
    potentials = POTENTIALS if "potentials" in balancers.context_keys(name) else None
    config = TrainConfig(balancer=name, potentials=potentials, tasks=TASKS, image_size=32, n_train=64, n_val=16,
                         n_test=16, batch_size=16, epochs=1, log_every=1000, device=str(device),
                         amp=amp_dtype is not None, amp_dtype=amp_dtype or "bfloat16")
    trainer = Trainer(config, None, data=data, progress=None)
    result = trainer.fit()
    if not all(math.isfinite(v) for v in result["val"].values()):
        raise AssertionError(f"non-finite validation metrics {result['val']}")
    weights = trainer.method.weights
    if not all(math.isfinite(w) for w in weights.values()):
        raise AssertionError(f"non-finite task weights {weights}")
    uses_scaler = trainer.scaler is not None
    if device.type == "cuda" and uses_scaler != (amp_dtype == "float16"):
        raise AssertionError(f"gradient scaler {'on' if uses_scaler else 'off'} under {amp_dtype}")
    return f"{trainer.step} steps, val {', '.join(f'{k}={v:.3g}' for k, v in sorted(result['val'].items())[:3])}" + \
           (f", loss scale {trainer.scaler.get_scale():.0f}" if uses_scaler else "")


def run(label: str, case: Callable[[], str], failures: list[str]) -> None:
    start = time.perf_counter()
    try:
        detail = case()
        print(f"ok    {label:40s} {time.perf_counter() - start:6.1f} s  {detail}", flush=True)
    except Exception as err:  # every case runs; the summary lists the failures
        failures.append(label)
        print(f"FAIL  {label:40s} {type(err).__name__}: {err}", flush=True)
        traceback.print_exc(limit=3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",") if m.strip()], default=None,
                        help="comma-separated method names (default: every registered one)")
    parser.add_argument("--checks", default="engine,train,amp", help="comma-separated: engine, train, amp")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on a machine with a GPU, or pass --device cpu", file=sys.stderr)
        return 2
    checks = set(args.checks.split(","))
    names = args.methods or balancers.names()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    failures: list[str] = []
    if "engine" in checks:
        gramian = [n for n in names if n in _AGGREGATORS and not issubclass(_AGGREGATORS[n], MatrixAggregator)]
        for model_name in ("small", "resnet18"):
            for name in gramian:
                run(f"engine {model_name} {name}", lambda: engine_case(name, device, model_name), failures)
    data = build_datasets("scenes", TASKS, image_size=32, n_train=64, n_val=16, n_test=16)
    if "train" in checks:
        for name in names:
            run(f"train float32 {name}", lambda: train_case(name, device, data), failures)
    if "amp" in checks:
        for amp_dtype in ("bfloat16", "float16"):
            for name in [n for n in AMP_METHODS if n in names] or names[:1]:
                run(f"train {amp_dtype} {name}", lambda: train_case(name, device, data, amp_dtype), failures)
    print(f"{len(failures)} failed" + (f": {', '.join(failures)}" if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
