"""Multi-Fashion (Lin et al., "Pareto Multi-Task Learning", NeurIPS 2019) as an amtl plugin.

Two Fashion-MNIST items share one 36x36 image: one shifted 4 px up-left of the centre, the other
4 px down-right, the overlap resolved by a pixel max. Task ``left`` classifies the top-left item,
task ``right`` the bottom-right one (10 classes each). The model ``lenet`` is the papers' MultiLeNet:
a shared LeNet trunk to a 50-wide representation and a small classifier head per task.

It is written only against :mod:`amtl.extend`, as any user plugin is; load it with
``--plugin benchmarks/multifashion/multifashion.py`` and then use its names like built-in ones::

    python -m amtl.train --plugin benchmarks/multifashion/multifashion.py --dataset multifashion \\
        --tasks left,right --model lenet --epochs 10 --out runs/multifashion

Data: the original Fashion-MNIST IDX files (``apt-get install dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``; ``--data-root DIR`` points elsewhere). Nothing is downloaded.
Pairs are drawn with a numpy Generator seeded by ``--data-seed``: test pairs from the 10k test
images only, val pairs from the last 10k training images, train pairs from the first 50k, so no
item is shared between splits. ``--n-train/--n-val/--n-test`` count pairs. The images are always
36x36 (the benchmark's size); ``--image-size`` is ignored.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics import Metric

from amtl.extend import (DataOptions, DatasetConfigError, DataSplits, ModelOptions, MultiTaskModel, Task,
                         register_dataset, register_model, register_task)

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TASKS = ("left", "right")
CANVAS = 36   # image side
ITEM = 28     # Fashion-MNIST item side
SHIFT = 4     # each item sits SHIFT px from the centre: left up-left, right down-right
#: Source image ranges (file, first, end) of each split: val and train never share a training image.
SOURCES = {"train": ("train", 0, 50_000), "val": ("train", 50_000, 60_000), "test": ("t10k", 0, 10_000)}
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}  # each split draws from its own seeded stream


# -- data -------------------------------------------------------------------------------------------
def _find(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # unreadable, or a broken gzip stream
        raise DatasetConfigError(f"cannot read '{path}' ({e}); reinstall dataset-fashion-mnist or fix "
                                 f"--data-root") from None
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        raise DatasetConfigError(f"'{path}' is not a Fashion-MNIST IDX file (bad magic number); "
                                 f"reinstall dataset-fashion-mnist or fix --data-root")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DatasetConfigError(f"'{path}' is truncated ({array.size} of {int(np.prod(shape))} values); "
                                 f"reinstall dataset-fashion-mnist or fix --data-root")
    return array.reshape(shape)


_RAW: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def load_fashion_mnist(root: str | Path | None, part: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` of ``part`` ("train" or "t10k"), parsed once."""
    folder = Path(root).expanduser() if root is not None else DEFAULT_ROOT
    key = (str(folder.resolve()), part)
    if key not in _RAW:
        stems = [s for p in ("train", "t10k") for s in FILES[p]]
        found = {s: _find(folder, s) for s in stems}
        missing = [f"{s}.gz" for s, p in found.items() if p is None]
        if missing:
            raise DatasetConfigError(f"Fashion-MNIST not found in '{folder}' (missing {', '.join(missing)}); "
                                     f"install it with 'apt-get install dataset-fashion-mnist' or pass "
                                     f"--data-root DIR holding the four IDX files")
        images = _read_idx(found[FILES[part][0]], 2051)
        labels = _read_idx(found[FILES[part][1]], 2049)
        if images.shape[1:] != (ITEM, ITEM) or len(images) != len(labels):
            raise DatasetConfigError(f"Fashion-MNIST {part} files in '{folder}' have images {images.shape} and "
                                     f"labels {labels.shape}; expected [N, 28, 28] and [N]")
        _RAW[key] = (images, labels)
    return _RAW[key]


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``[N, 36, 36]`` uint8: ``left`` items shifted up-left, ``right`` down-right, pixel max."""
    canvas = np.zeros((len(left), CANVAS, CANVAS), dtype=np.uint8)
    a, b = CANVAS // 2 - ITEM // 2 - SHIFT, CANVAS // 2 - ITEM // 2 + SHIFT  # 0 and 8
    canvas[:, a:a + ITEM, a:a + ITEM] = left
    canvas[:, b:b + ITEM, b:b + ITEM] = np.maximum(canvas[:, b:b + ITEM, b:b + ITEM], right)
    return canvas


def draw_pairs(n: int, first: int, end: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 2]`` source indices in ``[first, end)``, the two items of a pair always distinct images.

    Pair by pair from one stream, so the first ``n`` pairs of a bigger draw are these ``n``."""
    size = end - first
    draws = rng.integers([0, 1], [size, size], size=(n, 2))  # first item, offset of the second
    return np.stack([draws[:, 0], (draws[:, 0] + draws[:, 1]) % size], axis=1) + first


class MultiFashion(Dataset):
    """One split, built eagerly in memory; ``__getitem__`` only indexes.

    ``source`` ("train" or "t10k") and ``source_indices`` ``[N, 2]`` say which Fashion-MNIST images
    each pair overlays (column 0: the top-left item, column 1: the bottom-right one).
    """

    def __init__(self, split: str, n: int, seed: int = 0, root: str | Path | None = None,
                 tasks: Sequence[str] = TASKS) -> None:
        if split not in SOURCES:
            raise ValueError(f"unknown split '{split}' (known: {', '.join(SOURCES)})")
        if n < 1:
            raise DatasetConfigError(f"multifashion {split} split needs at least 1 pair, got {n}")
        part, first, end = SOURCES[split]
        images, labels = load_fashion_mnist(root, part)
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split]]))
        pairs = draw_pairs(n, first, end, rng)
        self.split, self.source, self.tasks = split, part, tuple(tasks)
        self.source_indices = torch.from_numpy(pairs)
        self.images = torch.from_numpy(overlay(images[pairs[:, 0]], images[pairs[:, 1]])).unsqueeze(1)  # [N,1,36,36]
        self.labels = torch.from_numpy(labels[pairs].astype(np.int64))  # [N, 2]: left, right

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"image": self.images[i].float().div_(255), "index": i,
                                  "has": dict.fromkeys(self.tasks, True)}
        for t in self.tasks:
            sample[t] = self.labels[i, TASKS.index(t)]
        return sample

    def task_labels(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        return {t: torch.full((len(self),), t in self.tasks, dtype=torch.bool) for t in tasks}


def build_multifashion(tasks: tuple[str, ...], options: DataOptions) -> DataSplits:
    o = options
    train, val, test = (MultiFashion(split, n, o.seed, o.root, tasks)
                        for split, n in (("train", o.n_train), ("val", o.n_val), ("test", o.n_test)))
    return DataSplits(train, val, test, len(CLASSES), len(train), TASKS)


# -- tasks ------------------------------------------------------------------------------------------
class Accuracy(Metric):
    """Top-1 accuracy from summed counts (exact across DDP ranks and batches)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.correct += (logits.argmax(-1) == target).sum()
        self.total += target.numel()

    def compute(self) -> dict[str, Tensor]:
        return {"acc": self.correct.double() / self.total.clamp(min=1)}


class ClassifierHead(nn.Module):
    """The MultiLeNet head: ``linear 50 -> relu -> linear classes`` on the representation."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 50) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, representation: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        return self.net(representation)  # size (the input's H, W) means nothing to a classifier


class Item(Task):
    """Classify one of the two items (10 Fashion-MNIST classes); subclasses say which."""

    kpi = "acc"
    higher_is_better = {"acc": True}

    def __init__(self, num_classes: int = len(CLASSES), **_: Any) -> None:
        self.num_classes = num_classes

    def head(self, in_channels: int) -> nn.Module:
        return ClassifierHead(in_channels, self.num_classes)

    def sample_losses(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = target >= 0
        losses = F.cross_entropy(pred.float(), target.clamp(min=0), reduction="none")
        return losses, valid

    def metric(self) -> Metric:
        return Accuracy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes})"


class Left(Item):
    name = "left"


class Right(Item):
    name = "right"


# -- model ------------------------------------------------------------------------------------------
class LeNetTrunk(nn.Module):
    """The shared MultiLeNet trunk on 1x36x36 images: conv 10@5x5, pool, relu, conv 20@5x5, pool,
    relu, flatten, linear to ``width`` (50) and relu. ``fc`` outputs the representation."""

    def __init__(self, width: int = 50, size: int = CANVAS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        side = ((size - 4) // 2 - 4) // 2  # 6 for 36x36 inputs
        self.fc = nn.Sequential(nn.Linear(20 * side * side, width), nn.ReLU())
        self.out_channels = width

    def forward(self, images: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(images), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc(x.flatten(1))


def build_lenet(tasks: Sequence[Task], options: ModelOptions) -> MultiTaskModel:
    if options.weights_path is not None:
        raise ValueError("model 'lenet' has no pretrained weights; drop --weights-path")
    trunk = LeNetTrunk(options.width or 50)
    return MultiTaskModel(trunk, {t.name: t.head(trunk.out_channels) for t in tasks}, last_shared=trunk.fc)


# -- registration (runs once, on import) --------------------------------------------------------------
register_task("left", Left)
register_task("right", Right)
register_dataset("multifashion", build_multifashion, TASKS)
register_model("lenet", build_lenet)
