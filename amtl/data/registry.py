"""Build the train/val/test splits of a dataset by name.

Validation is always a split of its own, separate from test: balancers that read KPIs (AMTL, DTP)
read them from val, never from test (the official AMTL code reads test).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset, Subset

DATASETS = ("scenes", "nyuv2", "voc", "partial")
SCENE_TASKS = ("segmentation", "depth", "normal", "detection")
NYU_TASKS = ("segmentation", "depth", "normal")
#: Fraction of NYUv2's on-disk train split held out as val; its on-disk val split serves as test.
NYU_VAL_FRACTION = 0.1
VOC_TASKS = ("segmentation", "detection")
#: Fraction of VOC's on-disk val list held out as test (VOC's own test labels are not public);
#: the rest is val, so KPIs and test metrics come from disjoint images.
VOC_TEST_FRACTION = 0.5


class DatasetConfigError(ValueError):
    """A dataset name, path or option is invalid."""


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    num_instances: int  # number of distinct training ``index`` values (instance-level methods)
    tasks: tuple[str, ...]  # tasks this dataset can label
    num_detection_classes: int = 0  # number of object classes of the detection task (0: none)


def build_datasets(name: str, tasks: Sequence[str], root: str | Path | None = None, image_size: int = 64,
                   n_train: int = 3000, n_val: int = 500, n_test: int = 500, seed: int = 0,
                   cache_dir: str | Path | None = None, augment: bool = False) -> DataSplits:
    tasks = tuple(tasks)
    if name == "scenes":
        from amtl.data.scenes import SceneConfig, SceneDataset
        available = SCENE_TASKS
        check_tasks(name, tasks, available)
        config = SceneConfig(size=image_size, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
        train, val, test = (SceneDataset(s, config, tasks=tasks, cache_dir=cache_dir) for s in ("train", "val", "test"))
        return DataSplits(train, val, test, train.num_classes, len(train), available,
                          num_detection_classes=len(train.detection_classes))
    if name == "nyuv2":
        from amtl.data.nyuv2 import NYUv2
        available = NYU_TASKS
        check_tasks(name, tasks, available)
        if root is None:
            raise DatasetConfigError("dataset 'nyuv2' needs a data root; pass --data-root DIR")
        full_train = NYUv2(root, "train", tasks=tasks, augment=augment, seed=seed)
        plain_train = NYUv2(root, "train", tasks=tasks, augment=False, seed=seed)
        n = len(full_train)
        n_held = max(1, int(round(n * NYU_VAL_FRACTION)))
        if n - n_held < 1:
            raise DatasetConfigError(f"NYUv2 train split at '{root}' has {n} images; need at least 2")
        train = Subset(full_train, range(n - n_held))
        val = Subset(plain_train, range(n - n_held, n))
        test = NYUv2(root, "val", tasks=tasks, augment=False, seed=seed)
        return DataSplits(train, val, test, full_train.num_classes, n, available)
    if name == "voc":
        from amtl.data.voc import VOC
        available = VOC_TASKS
        check_tasks(name, tasks, available)
        if root is None:
            raise DatasetConfigError("dataset 'voc' needs a data root (the folder holding VOCdevkit); "
                                     "pass --data-root DIR")
        train = VOC(root, "train", tasks=tasks, size=image_size)
        full_val = VOC(root, "val", tasks=tasks, size=image_size)
        n = len(full_val)
        n_test = int(round(n * VOC_TEST_FRACTION))
        if n - n_test < 1 or n_test < 1:
            raise DatasetConfigError(f"VOC val list at '{root}' has {n} images; need at least 2 "
                                     "(half is val, half is test)")
        val, test = Subset(full_val, range(n - n_test)), Subset(full_val, range(n - n_test, n))
        return DataSplits(train, val, test, train.num_classes, len(train), available,
                          num_detection_classes=len(train.detection_classes))
    if name == "partial":  # rendered scene sources, or VOC + NYUv2 with a root; see amtl/data/partial.py
        from amtl.data.partial import build_partial
        return build_partial(tasks, root, image_size, n_train, n_val, n_test, seed, cache_dir, augment)
    raise DatasetConfigError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")


def check_tasks(name: str, tasks: Sequence[str], available: Sequence[str]) -> None:
    if not tasks:
        raise DatasetConfigError("no tasks given; pass e.g. --tasks segmentation,depth,normal")
    lacking = [t for t in tasks if t not in available]
    if lacking:
        raise DatasetConfigError(f"dataset '{name}' has no labels for task(s) {', '.join(lacking)} "
                                 f"(it has: {', '.join(available)})")
