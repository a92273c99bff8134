"""The partially annotated multi-dataset: task-specific sources composed into one dataset.

As in the AMTL paper's headline setting, each image is labelled only for the tasks of the source it
comes from, and the sources are of unequal size:

- ``semantic`` source: segmentation + detection labels (real: PASCAL VOC);
- ``depth`` source: depth labels only (real: NYUv2).

Every sample carries every requested task's key; a task its source does not label gets
``has[task] = False`` and the task's invalid target (segmentation -1, depth 0, no boxes), so it
contributes nothing to that task's loss or metrics (see :mod:`amtl.data`). Samples also carry
``"source"``, the position of their source in :attr:`PartialDataset.sources`.

Only the sources that label a requested task are composed: ``tasks=("depth",)`` is the depth
source alone, which is what a single-task (potential) run for depth trains and validates on.

Embedded default (no data root): two rendered scene sources with different camera and appearance
distributions (:data:`SOURCE_SCENES`: the depth source's camera has a wider field of view and sits
higher, looking further down; its colours are paler, its pixel noise stronger, its light mostly
directional). Each split is shared 3:1 (:data:`SEMANTIC_SHARE`) between them.

Real default: ``--data-root voc=DIR,nyuv2=DIR`` (each the root its own loader takes), or one folder
holding both ``VOCdevkit/`` and ``nyuv2/``. Splits keep their natural sizes; NYUv2 images are resized
(shorter side) and centre-cropped to the VOC samples' square ``image_size``. Segmentation and
detection classes are VOC's (21 and 20): the tasks come from the semantic source only, and NYUv2's
13 segmentation classes are never read.
"""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from amtl.data.labels import task_labels

TASKS = ("segmentation", "detection", "depth")
#: Sources in composition order and the tasks each labels.
SOURCE_TASKS: dict[str, tuple[str, ...]] = {"semantic": ("segmentation", "detection"), "depth": ("depth",)}
#: Fraction of each rendered split that comes from the semantic source (3:1 against the depth source).
SEMANTIC_SHARE = 0.75
#: SceneConfig options of each rendered source (the semantic source keeps the defaults).
SOURCE_SCENES: dict[str, dict[str, Any]] = {
    "semantic": {},
    "depth": dict(fov_deg=75.0, cam_height_range=(1.5, 2.3), cam_pitch_range=(-50.0, -15.0),
                  saturation_range=(0.05, 0.4), brightness_range=(0.3, 0.75), texture_scale_range=(0.5, 1.2),
                  noise_std=0.04, point_light_prob=0.2, ambient_range=(0.3, 0.5)),
}
#: Added to the data seed of the depth source so its random stream is independent of the semantic
#: source's (with equal seeds the two would draw the same room layouts through different ranges).
_SOURCE_SEED_OFFSET = {"semantic": 0, "depth": 1_000_003}
#: The real dataset behind each source (names as in ``--data-root voc=...,nyuv2=...``).
REAL_SOURCES = {"semantic": "voc", "depth": "nyuv2"}


def blank_target(task: str, height: int, width: int) -> Any:
    """The target of a sample without ``task``'s label: its invalid value everywhere."""
    if task == "segmentation":
        return torch.full((height, width), -1, dtype=torch.long)
    if task == "depth":
        return torch.zeros(1, height, width)
    if task == "normal":
        return torch.zeros(3, height, width)
    if task == "detection":
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    raise ValueError(f"no blank target for task '{task}'")


class PartialDataset(Dataset):
    """Sources concatenated; each sample keeps only its own source's labels.

    ``parts`` are ``(name, dataset, labelled_tasks)``; a part's samples must carry those tasks'
    targets. ``index`` is the position in the composed split, so instance-level methods see one
    index space.
    """

    def __init__(self, parts: Sequence[tuple[str, Dataset, Sequence[str]]], tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self.sources = [name for name, _, _ in parts]
        self.datasets = [d for _, d, _ in parts]
        self.labelled = [tuple(t for t in labelled if t in self.tasks) for _, _, labelled in parts]
        self.offsets = [0]
        for d in self.datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(source position, index within that source)`` of composed sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        part = bisect.bisect_right(self.offsets, index) - 1
        return part, index - self.offsets[part]

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, inner = self.locate(index)
        sample = self.datasets[part][inner]
        h, w = sample["image"].shape[-2:]
        own = self.labelled[part]
        out: dict[str, Any] = {"image": sample["image"], "index": index, "source": part,
                               "has": {t: t in own and bool(sample["has"].get(t, False)) for t in self.tasks}}
        for t in self.tasks:
            out[t] = sample[t] if t in own else blank_target(t, h, w)
        return out

    def task_labels(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        tables = []
        for d, own in zip(self.datasets, self.labelled):
            inner = task_labels(d, [t for t in tasks if t in own])
            tables.append({t: inner[t] if t in own else torch.zeros(len(d), dtype=torch.bool) for t in tasks})
        return {t: torch.cat([table[t] for table in tables]) for t in tasks}

    def source_sizes(self) -> dict[str, int]:
        return {name: len(d) for name, d in zip(self.sources, self.datasets)}

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to sources with per-epoch augmentation (NYUv2), through Subsets."""
        for d in self.datasets:
            while isinstance(d, (Subset, SquareCrop)):
                d = d.dataset
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={len(d)}:{'+'.join(own)}" for n, d, own in zip(self.sources, self.datasets, self.labelled))
        return f"PartialDataset({parts})"


class SquareCrop(Dataset):
    """Resize a dataset's dense samples (shorter side to ``size``) and centre-crop them square.

    Images are resized bilinearly; label maps with nearest neighbour, so an invalid pixel (depth 0,
    segmentation -1) is never blended with valid ones.
    """

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        h, w = sample["image"].shape[-2:]
        scale = self.size / min(h, w)
        rh, rw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        top, left = (rh - self.size) // 2, (rw - self.size) // 2

        def fit(x: Tensor, mode: str) -> Tensor:
            if (rh, rw) != (h, w):
                extra = dict(align_corners=False, antialias=True) if mode == "bilinear" else {}
                x = F.interpolate(x[None].float(), size=(rh, rw), mode=mode, **extra)[0]
            return x[..., top:top + self.size, left:left + self.size].contiguous()
        sample["image"] = fit(sample["image"], "bilinear").clamp(0, 1)
        if "depth" in sample:
            sample["depth"] = fit(sample["depth"], "nearest")
        if "segmentation" in sample:
            sample["segmentation"] = fit(sample["segmentation"][None], "nearest")[0].long()
        if "normal" in sample:
            sample["normal"] = fit(sample["normal"], "nearest")
        return sample

    def task_labels(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        return task_labels(self.dataset, tasks)


# -- building the splits -----------------------------------------------------------------------
def sources_for(tasks: Sequence[str]) -> list[str]:
    """The sources that label at least one of ``tasks``, in composition order."""
    return [s for s, own in SOURCE_TASKS.items() if any(t in own for t in tasks)]


def split_sizes(n: int) -> dict[str, int]:
    """How a rendered split of ``n`` samples is shared between the sources (3:1, each at least 1)."""
    depth = max(1, round(n * (1.0 - SEMANTIC_SHARE)))
    return {"semantic": n - depth, "depth": depth}


def scene_config(source: str, image_size: int, n_train: int, n_val: int, n_test: int, seed: int):
    """The :class:`~amtl.data.scenes.SceneConfig` of a rendered source (its key identifies its data)."""
    from amtl.data.scenes import SceneConfig
    sizes = {split: split_sizes(n)[source] for split, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    return SceneConfig(size=image_size, seed=seed + _SOURCE_SEED_OFFSET[source], n_train=sizes["train"],
                       n_val=sizes["val"], n_test=sizes["test"], **SOURCE_SCENES[source])


def parse_roots(root: str | Path) -> dict[str, Path]:
    """``voc=DIR,nyuv2=DIR`` -> ``{"voc": DIR, "nyuv2": DIR}``; one folder -> its ``VOCdevkit`` parent and ``nyuv2/``."""
    from amtl.data.registry import DatasetConfigError
    text = str(root)
    if "=" not in text:
        return {"voc": Path(text), "nyuv2": Path(text) / "nyuv2"}
    roots: dict[str, Path] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in REAL_SOURCES.values() or not value.strip():
            raise DatasetConfigError(f"--data-root for 'partial' must look like voc=DIR,nyuv2=DIR (or one folder "
                                     f"holding VOCdevkit/ and nyuv2/); cannot read '{item}'")
        roots[key] = Path(value.strip())
    return roots


def source_identity(task: str, root: str | Path | None, image_size: int, n_train: int, n_val: int,
                    n_test: int, seed: int) -> dict[str, Any]:
    """What a single-task run of ``task`` on the partial dataset trains on: its own source.

    Rendered: the source's scene-config key (which covers its camera, appearance, seed and split
    sizes); real: the source's data root.
    """
    from amtl.data.registry import DatasetConfigError
    matches = [s for s, own in SOURCE_TASKS.items() if task in own]
    if not matches:
        raise DatasetConfigError(f"dataset 'partial' has no labels for task {task} (it has: {', '.join(TASKS)})")
    source = matches[0]
    if root is None:
        return {"source": source, "scenes": scene_config(source, image_size, n_train, n_val, n_test, seed).key()}
    return {"source": source, "root": str(parse_roots(root).get(REAL_SOURCES[source]))}


def build_partial(tasks: Sequence[str], root: str | Path | None, image_size: int, n_train: int, n_val: int,
                  n_test: int, seed: int, cache_dir: str | Path | None, augment: bool):
    """The partial dataset's :class:`~amtl.data.registry.DataSplits` (see the module docstring)."""
    from amtl.data.registry import DataSplits, DatasetConfigError, build_datasets, check_tasks
    tasks = tuple(tasks)
    check_tasks("partial", tasks, TASKS)
    sources = sources_for(tasks)
    labelled = {s: tuple(t for t in SOURCE_TASKS[s] if t in tasks) for s in sources}
    splits: dict[str, list[tuple[str, Dataset, Sequence[str]]]] = {"train": [], "val": [], "test": []}
    if root is None:
        from amtl.data.scenes import SceneDataset
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            if n < 2:
                raise DatasetConfigError(f"dataset 'partial' needs at least 2 {split} samples (shared 3:1 between "
                                         f"its two sources), got {n}; raise --n-{split}")
        for s in sources:
            config = scene_config(s, image_size, n_train, n_val, n_test, seed)
            for split in splits:
                splits[split].append((s, SceneDataset(split, config, tasks=labelled[s], cache_dir=cache_dir),
                                      labelled[s]))
        from amtl.data.scenes import CLASSES, DETECTION_CLASSES
        num_classes, num_detection = len(CLASSES), len(DETECTION_CLASSES)
    else:
        from amtl.data.voc import CLASSES, DETECTION_CLASSES
        roots = parse_roots(root)
        for s in sources:
            real = REAL_SOURCES[s]
            if real not in roots:
                raise DatasetConfigError(f"dataset 'partial' needs the {real} root for {'+'.join(labelled[s])}; "
                                         f"pass --data-root voc=DIR,nyuv2=DIR")
            data = build_datasets(real, labelled[s], root=roots[real], image_size=image_size, seed=seed,
                                  cache_dir=cache_dir, augment=augment and real == "nyuv2")
            for split in splits:
                part = getattr(data, split)
                splits[split].append((s, SquareCrop(part, image_size) if real == "nyuv2" else part, labelled[s]))
        num_classes, num_detection = len(CLASSES), len(DETECTION_CLASSES)
    train, val, test = (PartialDataset(splits[split], tasks) for split in ("train", "val", "test"))
    return DataSplits(train, val, test, num_classes, len(train), TASKS, num_detection_classes=num_detection)


__all__ = ["PartialDataset", "SquareCrop", "SOURCE_TASKS", "TASKS", "blank_target", "build_partial",
           "parse_roots", "scene_config", "source_identity", "sources_for", "split_sizes"]
