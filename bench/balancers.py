"""Step time (and peak memory) of every balancer relative to EW, on one model and one batch.

Every method runs the same forward + ``Method.backward`` on the same weights and batch (no optimizer
step, so nothing drifts); methods are interleaved round by round, in a new random order each round.
A method's "x EW" is the median over rounds of its step time divided by EW's in the same round (a
paired ratio: load that drifts during a run cancels, where a ratio of the two medians may pair rounds
minutes apart); the quartiles of those per-round ratios show the noise. Each timed step follows an
untimed one of the same method (what a training loop does).

    python bench/balancers.py                 # markdown table on stdout
    python bench/balancers.py --memory        # + peak memory (CUDA: allocator peak; CPU: RSS of a fresh process)
    python bench/balancers.py --write-docs    # + replace the "Balancer step time" section of docs/benchmarks.md
    python bench/balancers.py --torchjd       # only compare our aggregators with torchjd's (docs/balancers.md)
    python bench/balancers.py --engines       # + every "(shared)" row again with the plain per-task VJPs
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from amtl.balancers import StepInputs, make
from amtl.balancers.base import MatrixAggregator
from amtl.balancers.method import _AGGREGATORS, _WEIGHTINGS
from amtl.models import build_model
from amtl.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
HEADING = "## Balancer step time"
TASKS = ("segmentation", "depth", "normal")


def setup(args: argparse.Namespace):
    """The model, one batch with targets for every task, and the device."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    tasks = [make_task(t, num_classes=13) for t in TASKS]
    model = build_model(args.model, tasks).to(device).train()
    b, s = args.batch, args.size
    images = torch.rand(b, 3, s, s, device=device)
    targets = {"segmentation": torch.randint(0, 13, (b, s, s), device=device),
               "depth": torch.rand(b, 1, s, s, device=device) + 0.1,
               "normal": torch.nn.functional.normalize(torch.randn(b, 3, s, s, device=device), dim=1)}
    return model, {t.name: t for t in tasks}, images, targets, device


def variants(engines: bool = False) -> list[tuple[str, str, dict]]:
    """(label, method name, keyword arguments) for every weighting and every aggregator x source.

    ``engines``: each ``source='shared'`` aggregator also as ``"<name> (shared-vjp)"``, which forces
    the plain per-task VJPs instead of the layer-wise Gramian (``Method.layerwise = False``).
    """
    out = []
    for w in sorted(_WEIGHTINGS):
        kw: dict = {}
        if "num_instances" in getattr(_WEIGHTINGS[w], "context", ()):
            kw["num_instances"] = 64
        if "potentials" in _WEIGHTINGS[w].context:
            kw["potentials"] = {t: 1.0 for t in TASKS}
        out.append((w, w, kw))
    for a in sorted(_AGGREGATORS):
        for src in _AGGREGATORS[a].sources:
            out.append((f"{a} ({src})", a, {"source": src}))
            if engines and src == "shared" and _layerwise_capable(a):
                out.append((f"{a} (shared-vjp)", a, {"source": src, "layerwise": False}))
    return out


def _layerwise_capable(aggregator: str) -> bool:
    """Whether the layer-wise Gramian engine serves it (MatrixAggregators read the flat matrix)."""
    return not issubclass(_AGGREGATORS[aggregator], MatrixAggregator)


def build(name: str, kwargs: dict):
    kwargs = dict(kwargs)
    layerwise = kwargs.pop("layerwise", True)
    method = make(name, list(TASKS), **kwargs)
    method.layerwise = layerwise
    return method


def step_fn(model, tasks, images, targets, method, device):
    def step(sample_ids=torch.arange(images.shape[0], device=device)) -> None:
        model.zero_grad(set_to_none=True)
        for p in method.parameters():
            p.grad = None
        z = model.encode(images)
        preds = model.decode(z, tuple(images.shape[-2:]))
        sample_losses, valid, losses = {}, {}, {}
        for name, task in tasks.items():
            per, ok = task.sample_losses(preds[name], targets[name])
            sample_losses[name], valid[name] = per, ok
            losses[name] = per.sum() / ok.sum().clamp(min=1)
        method.backward(StepInputs(losses=losses, sample_losses=sample_losses, valid=valid,
                                   sample_ids=sample_ids, shared_params=model.shared_parameters(),
                                   task_params=model.task_parameters(),
                                   last_shared_params=model.last_shared_parameters(),
                                   representation=z))
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(args: argparse.Namespace) -> dict[str, list[float]]:
    """Step times in seconds, one per round for every method (index r: round r)."""
    model, tasks, images, targets, device = setup(args)
    steps = {}
    for label, name, kw in variants(args.engines):
        if args.methods and label not in args.methods and label != "ew":
            continue
        try:
            method = build(name, kw)
            _prime(method)
            steps[label] = step_fn(model, tasks, images, targets, method, device)
            steps[label]()  # warm-up (and fail early)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run here is reported, not fatal
            print(f"skip {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            steps.pop(label, None)
    times: dict[str, list[float]] = {label: [] for label in steps}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(steps)
        rng.shuffle(order)  # no method always runs right after another
        for label in order:
            # One untimed step first: the timed one then finds the heap and caches as its own
            # previous step left them, not as the (maybe much heavier) previous method did.
            steps[label]()
            sync(device)
            t0 = time.perf_counter()
            steps[label]()
            sync(device)
            times[label].append(time.perf_counter() - t0)
    return times


@dataclass
class Timing:
    """One method's step time and its paired ratios to EW (see the module docstring)."""

    step: float          # median step time, seconds
    ratios: list[float]  # per round: step / EW's step in that round

    @classmethod
    def from_rounds(cls, times: list[float], ew: list[float]) -> "Timing":
        return cls(statistics.median(times), [t / e for t, e in zip(times, ew, strict=True)])

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def quartiles(self) -> str:
        return quartiles(self.ratios)


def quartiles(values: list[float]) -> str:
    """First and third quartiles as ``"q1-q3"`` (the value itself for one sample)."""
    if len(values) < 2:
        return f"{values[0]:.2f}"
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{q1:.2f}-{q3:.2f}"


def _prime(method) -> None:
    """Give KPI-reading weightings a validation result, as after the first validation."""
    if method.needs_kpis:
        method.on_validation({t: 0.5 for t in TASKS})


def peak_memory(args: argparse.Namespace, label: str) -> float:
    """Peak memory of one method's steps in MiB (CUDA allocator peak, or max RSS of a fresh process)."""
    if args.device.startswith("cuda"):
        model, tasks, images, targets, device = setup(args)
        name, kw = next((n, k) for l, n, k in variants(True) if l == label)
        method = build(name, kw)
        _prime(method)
        step = step_fn(model, tasks, images, targets, method, device)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    cmd = [sys.executable, __file__, "--_memory-child", label, "--model", args.model,
           "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def memory_child(args: argparse.Namespace) -> None:
    model, tasks, images, targets, device = setup(args)
    name, kw = next((n, k) for l, n, k in variants(True) if l == args._memory_child)
    method = build(name, kw)
    _prime(method)
    step = step_fn(model, tasks, images, targets, method, device)
    step()
    try:  # reset the peak RSS (Linux), so model construction does not mask the step's peak
        Path("/proc/self/clear_refs").write_text("5")
        step()
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        rss = int(hwm.split()[1]) / 1024
    except OSError:
        step()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_mib": rss}))


def table(args: argparse.Namespace, timings: dict[str, Timing], memory: dict[str, float]) -> str:
    ew = timings["ew"].step
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads"
    lines = [f"Model `{args.model}` with heads for {', '.join(TASKS)}; batch {args.batch}, "
             f"{args.size}x{args.size}; {device}; torch {torch.__version__}; {args.rounds} interleaved "
             f"rounds, each timed step after an untimed one; EW step {ew * 1e3:.0f} ms (median). "
             "x EW: median over rounds of the step time divided by EW's in the same round; "
             "quartiles: the first and third quartiles of those ratios.", ""]
    head = "| method | step (ms) | x EW | quartiles |" + (" peak memory (MiB) | x EW memory |" if memory else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, timing in timings.items():
        row = f"| {label} | {timing.step * 1e3:.0f} | {timing.ratio:.2f} | {timing.quartiles} |"
        if memory:
            m = memory.get(label)
            row += f" {m:.0f} | {m / memory['ew']:.2f} |" if m is not None else " | |"
        lines.append(row)
    # The Gramian aggregators' `shared` rows run the same engine; their solvers differ by under 1 ms a
    # step. Pooled, their per-round ratios estimate the engine's cost with several times the samples
    # of one row. (Entry methods do work of their own on the flat matrix: not pooled.)
    shared = [t for label, t in timings.items()
              if label.endswith(" (shared)") and _layerwise_capable(label.removesuffix(" (shared)"))]
    if len(shared) > 1:
        pooled = [r for t in shared for r in t.ratios]
        lines += ["", f"The {len(shared)} `(shared)` rows of Gramian aggregators pooled ({len(pooled)} per-round "
                      f"ratios): median {statistics.median(pooled):.2f}x EW, quartiles {quartiles(pooled)}."]
    return "\n".join(lines)


#: Everything from this line to the next section of docs/benchmarks.md is hand-written and kept.
NOTES_MARKER = "<!-- hand-written notes: kept by --write-docs -->"


def write_docs(text: str) -> None:
    """Replace (or append) the generated part of the "Balancer step time" section of
    docs/benchmarks.md, keeping the notes after :data:`NOTES_MARKER`."""
    body = f"{HEADING}\n\nGenerated by `python bench/balancers.py --write-docs`.\n\n{text}\n\n"
    old = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        end = nxt + 1 if nxt >= 0 else len(old)
        marker = old.find(NOTES_MARKER, start, end)
        notes = old[marker:end] if marker >= 0 else ""
        new = old[:start] + body + notes + old[end:]
    else:
        new = old.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    DOCS.write_text(new)


def compare_torchjd(threads: int) -> None:
    """Accuracy and speed of our aggregators against torchjd's on the same random Gramians.

    Needs ``torchjd``; CAGrad and Nash-MTL also need its optional ``cvxpy`` extras.
    """
    import math

    import numpy as np
    import torchjd.linalg as tj_linalg
    import torchjd.aggregation as tj

    def us(fn, n: int = 100) -> float:
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                fn()
            ts.append((time.perf_counter() - t0) / (n // 5))
        return statistics.median(ts) * 1e6

    gen = torch.Generator().manual_seed(0)

    def systems(t: int):
        for kind in ("plain", "scaled", "shifted"):
            for _ in range(10):
                g = torch.randn(t, 64, generator=gen, dtype=torch.float64)
                if kind == "scaled":
                    g = g * torch.logspace(-2, 2, t, dtype=torch.float64)[:, None]
                if kind == "shifted":
                    g = g + 2.0 * torch.randn(1, 64, generator=gen, dtype=torch.float64)
                yield g

    try:
        import cvxpy  # noqa: F401
        have_cvxpy = True
    except ImportError:
        have_cvxpy = False
    print(f"torch threads {threads}; 30 systems per T (plain, norms over 4 decades, shared component)")
    for t in (3, 10):
        ours = {n: make(n, [f"t{i}" for i in range(t)]).aggregator for n in _AGGREGATORS}
        gap, imtl, aligned, pc, cag, nash_o, nash_t, cone, fair_o, fair_t = [], [], [], [], [], [], [], [], [], []
        exact = tj_linalg.QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
        for g in systems(t):
            k = g @ g.T
            kn = k.numpy()
            f = lambda w: float(w @ kn @ w)  # noqa: E731
            wo, wt = ours["mgda"].weights(k).numpy(), tj.MGDAWeighting()(k).numpy()
            gap.append((f(wt) - f(wo)) / f(wo))
            imtl.append(float((ours["imtl-g"].weights(k) - tj.IMTLGWeighting()(k)).abs().max()))
            for name, theirs in (("upgrad", tj.UPGradWeighting), ("dualproj", tj.DualProjWeighting)):
                d = ours[name].weights(k) @ g
                cone.append(float((d - theirs(projector=exact)(k) @ g).norm() / d.norm()))
            for weights, into in ((ours["fairgrad"].weights(k), fair_o), (tj.FairGradWeighting(alpha=2.0)(k), fair_t)):
                into.append(float(((k @ weights - weights ** -0.5) / weights ** -0.5).abs().max()))
            aligned.append(float((ours["aligned"].weights(k) - t * tj.AlignedMTLWeighting()(k)).abs().max()))
            if t == 2:
                pc.append(float((ours["pcgrad"].weights(k) - tj.PCGradWeighting()(k)).abs().max()))
            if have_cvxpy:
                b0 = np.full(t, 1.0 / t)
                rho = 0.5 * math.sqrt(b0 @ kn @ b0)
                obj = lambda a: (kn @ b0) @ a + rho * math.sqrt(max(a @ kn @ a, 0.0))  # noqa: E731
                ao = make("cagrad", ["x"], rescale=0).aggregator.weights(k).numpy() - b0
                at = tj.CAGradWeighting(c=0.5, norm_eps=0.0)(k).numpy() - b0
                cag.append((obj(at / at.sum()) - obj(ao / ao.sum())) / abs(obj(ao / ao.sum())))
                no = make("nash", ["x"], max_norm=0.0).aggregator.weights(k).numpy()
                nt = tj.NashMTL(n_tasks=t, max_norm=0.0).weighting(g.float()).double().numpy()
                nash_o.append(np.abs(kn @ no * no - 1).max())
                nash_t.append(np.abs(kn @ nt * nt - 1).max())
        print(f"T={t}: MGDA torchjd objective above ours: median {statistics.median(gap):.1e}, max {max(gap):.1e}")
        print(f"  IMTL-G max |alpha diff| {max(imtl):.1e}; Aligned (sum) max |alpha diff| {max(aligned):.1e}, "
              f"median {statistics.median(aligned):.1e}")
        print(f"  UPGrad/DualProj vs torchjd's program without its regulariser: max relative update diff "
              f"{max(cone):.1e}")
        print(f"  FairGrad (alpha 2) |K w / w^-1/2 - 1|: ours max {max(fair_o):.1e}; torchjd max {max(fair_t):.1e}, "
              f"median {statistics.median(fair_t):.1e}")
        if have_cvxpy:
            print(f"  CAGrad dual objective torchjd minus ours (relative): max {max(cag):.1e}, min {min(cag):.1e}")
            print(f"  Nash |K a * a - 1|: ours max {max(nash_o):.1e}; torchjd max {max(nash_t):.1e}, "
                  f"median {statistics.median(nash_t):.1e}")
        g = next(systems(t))
        k = g @ g.T
        pairs = {"mgda": tj.MGDAWeighting(), "pcgrad": tj.PCGradWeighting(), "imtl-g": tj.IMTLGWeighting(),
                 "aligned": tj.AlignedMTLWeighting(), "upgrad": tj.UPGradWeighting(),
                 "dualproj": tj.DualProjWeighting(), "fairgrad": tj.FairGradWeighting(alpha=2.0)}
        if have_cvxpy:
            pairs["cagrad"] = tj.CAGradWeighting(c=0.5)
        for name, theirs in pairs.items():
            print(f"  time {name}: ours {us(lambda: ours[name].weights(k)):.0f} us, torchjd {us(lambda: theirs(k)):.0f} us")
        if have_cvxpy:
            nt = tj.NashMTL(n_tasks=t)
            gf = g.float()
            print(f"  time nash (warm): ours {us(lambda: ours['nash'].weights(gf @ gf.T)):.0f} us, "
                  f"torchjd {us(lambda: nt(gf), 20):.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",")], default=None,
                        help="comma-separated labels to run (EW always runs), e.g. 'pcgrad (shared),uw'")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--engines", action="store_true",
                        help="also run every '(shared)' row with the plain per-task VJPs, as '<name> (shared-vjp)'")
    parser.add_argument("--torchjd", action="store_true")
    parser.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.torchjd:
        compare_torchjd(args.threads)
        return
    if args._memory_child:
        memory_child(args)
        return
    times = time_all(args)
    timings = {label: Timing.from_rounds(ts, times["ew"]) for label, ts in times.items()}
    memory = {label: peak_memory(args, label) for label in timings} if args.memory else {}
    text = table(args, timings, memory)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
